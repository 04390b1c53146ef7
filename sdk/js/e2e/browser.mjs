// The browser end-to-end test: the example page in headless Chromium
// (Debian's, driven by playwright-core) connects over wss to a real
// `herald serve --tls-self-signed`, receives a push sent through the HTTP
// API, survives `kill -9` and a restart of the server without getting the
// acked push again, and leaves a screenshot.
//
//   HERALD_BIN=target/debug/herald node e2e/browser.mjs [SCREENSHOT.png]
//
// Run by the Rust test tests/browser.rs (with `cargo test`), after
// scripts/install-test-tools.sh installed chromium and the npm packages.

import { spawn, execFileSync } from "node:child_process";
import { once } from "node:events";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const SDK_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const HERALD = process.env.HERALD_BIN;
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SCREENSHOT = path.resolve(process.argv[2] ?? "browser-test.png");
const WAIT_MS = 15_000;
const APP = "chat";
const API_KEY = "browser-test-api-key-0123456789";

if (!HERALD) {
  throw new Error("HERALD_BIN must name the herald binary");
}

async function freePort() {
  const server = net.createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "herald-browser-"));
const config = path.join(dir, "herald.toml");
fs.writeFileSync(
  config,
  `node_id = "browser-test"
[storage]
ack_flush_interval_ms = 50
[[apps]]
id = "${APP}"
api_key = "${API_KEY}"
token_secret = "browser-test-token-secret-0123456789"
`,
);
const wssPort = await freePort();
const apiPort = await freePort();
const api = `http://127.0.0.1:${apiPort}`;
const gateway = `wss://127.0.0.1:${wssPort}/v1/connect`;

/** Starts `herald serve` and resolves once its API listens. */
async function startHerald() {
  const child = spawn(
    HERALD,
    [
      "serve",
      "--config", config,
      "--data-dir", path.join(dir, "data"),
      "--tls-self-signed",
      "--gateway-listen", "127.0.0.1:0",
      "--listener", `wss=127.0.0.1:${wssPort}`,
      "--api-listen", `127.0.0.1:${apiPort}`,
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const lines = readline.createInterface({ input: child.stdout });
  const listening = new Promise((resolve, reject) => {
    lines.on("line", (line) => {
      if (line.startsWith("herald: api listening on")) resolve();
    });
    child.once("exit", (code) => reject(new Error(`herald exited with ${code} before listening`)));
  });
  await withTimeout(listening, "herald to listen");
  return child;
}

async function killHard(child) {
  child.kill("SIGKILL");
  await once(child, "exit");
}

function withTimeout(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), WAIT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function push(user, payload) {
  const response = await fetch(`${api}/v1/apps/${APP}/users/${encodeURIComponent(user)}/messages`, {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({ payload }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(`push failed: ${response.status} ${JSON.stringify(body)}`);
  return body;
}

/** Waits until the server has written `count` acks to storage. */
async function acksSaved(count) {
  const deadline = Date.now() + WAIT_MS;
  while (Date.now() < deadline) {
    const text = await (await fetch(`${api}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith("herald_acks_saved_total "));
    if (line && Number(line.split(" ")[1]) >= count) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`the server never saved ${count} acks`);
}

/** Serves the SDK's directory: the example page imports ../../dist. */
async function serveFiles() {
  const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript" };
  const server = http.createServer((request, response) => {
    const file = path.join(SDK_DIR, decodeURIComponent(new URL(request.url, "http://x").pathname));
    if (!file.startsWith(SDK_DIR) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" });
    fs.createReadStream(file).pipe(response);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return server;
}

let herald = await startHerald();
const token = execFileSync(HERALD, ["token", "--config", config, "--app", APP, "--user", "alice"])
  .toString()
  .trim();
const files = await serveFiles();
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  // The certificate is the server's self-signed one: trusted for this page.
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on("console", (message) => console.log(`page: ${message.text()}`));
  const query = new URLSearchParams({ gateway, app: APP, user: "alice", token, device: "browser" });
  await page.goto(`http://127.0.0.1:${files.address().port}/examples/browser/index.html?${query}`);
  await page.waitForSelector("#user:text('alice')", { timeout: WAIT_MS });

  const first = await push("alice", "hello browser");
  await page.waitForSelector(`#pushes li[data-seq="${first.seq}"]`, { timeout: WAIT_MS });
  await acksSaved(1);

  // kill -9 and a restart on the same ports: the page reconnects by itself
  // and resumes after the push it acked.
  await killHard(herald);
  herald = await startHerald();
  const second = await push("alice", "after the restart");
  await page.waitForSelector(`#pushes li[data-seq="${second.seq}"]`, { timeout: WAIT_MS });
  const seqs = await page.$$eval("#pushes li", (items) => items.map((item) => item.dataset.seq));
  if (JSON.stringify(seqs) !== JSON.stringify([String(first.seq), String(second.seq)])) {
    throw new Error(`the page shows pushes ${JSON.stringify(seqs)}: the acked one came again or one is missing`);
  }
  const payloads = await page.$$eval("#pushes li .payload", (items) => items.map((item) => item.textContent));
  if (payloads[1] !== "after the restart") throw new Error(`unexpected payloads ${JSON.stringify(payloads)}`);

  fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`browser test passed: pushes ${seqs.join(", ")} over ${gateway}; screenshot ${SCREENSHOT}`);
} finally {
  await browser.close();
  files.close();
  await killHard(herald);
  fs.rmSync(dir, { recursive: true, force: true });
}
