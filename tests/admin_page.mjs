// The admin page in headless Chromium (Debian's, driven by playwright-core
// from the JS SDK's npm packages): a wrong key shows the refusal, the
// admin key signs in, the page shows the connections the server holds;
// then a paced broadcast is sent through the API and the page shows its
// progress on the way and reaching 100%; a screenshot is saved.
//
//   ADMIN_URL=http://127.0.0.1:PORT/admin ADMIN_KEY=... API_URL=http://127.0.0.1:PORT \
//   APP=chat APP_API_KEY=... CONNECTIONS=12 BROADCAST_RATE=2 \
//   PLAYWRIGHT_FROM=sdk/js CHROMIUM=/usr/bin/chromium \
//   node tests/admin_page.mjs SCREENSHOT.png
//
// Run by tests/admin_page.rs, which starts the server and binds the
// clients. Prints what it saw; exits non-zero on the first failure.

import { createRequire } from "node:module";
import path from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} must be set`);
  return value;
};
const ADMIN_URL = env("ADMIN_URL");
const ADMIN_KEY = env("ADMIN_KEY");
const CONNECTIONS = env("CONNECTIONS");
const API_URL = env("API_URL");
const APP = env("APP");
const APP_API_KEY = env("APP_API_KEY");
const BROADCAST_RATE = Number(env("BROADCAST_RATE"));
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SCREENSHOT = path.resolve(process.argv[2] ?? "admin-page.png");
const WAIT_MS = 20_000;

// playwright-core is one of the JS SDK's dev packages: no second npm project.
const require = createRequire(path.resolve(env("PLAYWRIGHT_FROM"), "package.json"));
const { chromium } = require("playwright-core");

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  // A script error, or anything the Content-Security-Policy blocked, fails.
  const problems = [];
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error" && !message.text().includes("403")) {
      problems.push(`console error: ${message.text()}`);
    }
  });

  await page.goto(ADMIN_URL);
  await page.locator("#login").waitFor({ state: "visible", timeout: WAIT_MS });

  // A wrong key: refused, said so, still signed out.
  await page.fill("#admin-key", "not-the-admin-key-0123456789-0123456789");
  await page.click("#login button[type=submit]");
  const error = page.locator("#error");
  await error.waitFor({ state: "visible", timeout: WAIT_MS });
  const refusal = await error.textContent();
  if (!refusal.includes("refused")) throw new Error(`unexpected error text: ${refusal}`);
  if (!(await page.locator("#login").isVisible())) throw new Error("a wrong key signed in");
  console.log(`wrong key: ${refusal}`);

  // The admin key: the dashboard, with the server's connection count.
  await page.fill("#admin-key", ADMIN_KEY);
  await page.click("#login button[type=submit]");
  await page
    .locator(`#total-connections[data-connections="${CONNECTIONS}"]`)
    .waitFor({ timeout: WAIT_MS });
  const appConnections = await page
    .locator(`#apps tr[data-app="${APP}"] td:nth-child(2)`)
    .textContent();
  if (appConnections !== CONNECTIONS) {
    throw new Error(`app ${APP} shows ${appConnections} connections, not ${CONNECTIONS}`);
  }
  if (await page.locator("#login").isVisible()) throw new Error("the key form stays after sign-in");
  console.log(`connections shown: ${CONNECTIONS} (node total and app ${APP})`);

  // A paced broadcast, sent now that the page watches.
  const sent = await fetch(`${API_URL}/v1/apps/${APP}/broadcasts`, {
    method: "POST",
    headers: { Authorization: `Bearer ${APP_API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ payload: "to everyone", rate_per_sec: BROADCAST_RATE }),
  });
  if (!sent.ok) throw new Error(`the broadcast failed: ${sent.status} ${await sent.text()}`);
  const { seq } = await sent.json();

  // Its progress, as the page shows it on each refresh, to 100%.
  const row = page.locator(`#broadcasts tr[data-app="${APP}"][data-seq="${seq}"]`);
  const seen = [];
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const percent = (await row.count()) ? await row.getAttribute("data-percent") : null;
    if (percent !== null && seen.at(-1) !== percent) seen.push(percent);
    if (percent === "100") break;
    if (Date.now() > deadline) {
      throw new Error(`broadcast ${seq} never reached 100% (seen: ${seen.join(", ")})`);
    }
    await page.waitForTimeout(100);
  }
  console.log(`broadcast ${seq} progress seen: ${seen.map((p) => `${p}%`).join(" -> ")}`);
  if (seen.length < 2) throw new Error("the page never showed the broadcast on its way");

  // Reloading keeps the key for the tab (sessionStorage); from the second
  // reading on, the counters show as rates.
  await page.reload();
  await page
    .locator(`#total-connections[data-connections="${CONNECTIONS}"]`)
    .waitFor({ timeout: WAIT_MS });
  await page.waitForFunction(
    (app) => /^\d+\.\d$/.test(
      document.querySelector(`#apps tr[data-app="${app}"] td:nth-child(4)`)?.textContent ?? "",
    ),
    APP,
    { timeout: WAIT_MS },
  );

  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`screenshot: ${SCREENSHOT}`);
  if (problems.length) throw new Error(problems.join("\n"));
} finally {
  await browser.close();
}
