// The example page's script: reads its settings from the query string,
// connects with herald-client (built into ../../dist by `npm run build`),
// and shows the state and every push and broadcast it receives.
//
// Stable ids for a browser test: #state (text and data-state: idle,
// connecting, connected, waiting, closed, error), #gateway, #user, #error,
// #pushes and #broadcasts (one <li> per message, with data-app, data-seq
// and data-message-id, and .seq / .payload spans), #log (one <li> per event).
// The client is window.heraldClient.

import { HeraldClient, LocalStorageStore } from "../../dist/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function setState(state) {
  $("state").textContent = state;
  $("state").dataset.state = state;
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
  $("log").append(item);
}

/** A device id for this browser, kept in localStorage (or one per page load without it). */
function deviceId() {
  const given = params.get("device");
  if (given) return given;
  const key = "herald-example:device";
  let id = null;
  try {
    id = localStorage.getItem(key);
  } catch {}
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    id = "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    try {
      localStorage.setItem(key, id);
    } catch {}
  }
  return id;
}

function showMessage(list, message) {
  const item = document.createElement("li");
  item.dataset.app = message.app;
  item.dataset.seq = String(message.seq);
  item.dataset.messageId = message.messageId;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = String(message.seq);
  const payload = document.createElement("span");
  payload.className = "payload";
  payload.textContent = new TextDecoder().decode(message.payload);
  item.append(seq, " ", payload);
  $(list).append(item);
}

async function main() {
  const gateways = params.getAll("gateway");
  const app = params.get("app");
  const user = params.get("user");
  const token = params.get("token");
  const dispatchUrl = params.get("dispatch");
  if (!app || !token || (gateways.length === 0 && !dispatchUrl) || (dispatchUrl && !user)) {
    throw new Error("the query string needs gateway (or dispatch and user), app and token");
  }
  const device = deviceId();
  const client = new HeraldClient({
    gateways,
    dispatch: dispatchUrl
      ? { url: dispatchUrl, app, user, transport: params.get("transport") === "ws" ? "ws" : "wss" }
      : undefined,
    deviceId: device,
    clientVersion: "herald-example-page/1",
    network: params.get("network") ?? "unknown",
    apps: [{ app, token, tags: ["platform=web"] }],
    store: params.get("persist") === "1" ? new LocalStorageStore(`herald-example:resume:${device}:${app}`) : undefined,
  });
  window.heraldClient = client;

  const refresh = () => setState(client.state);
  client.on("connected", (e) => {
    $("gateway").textContent = e.gateway;
    log(`connected to ${e.gateway} (heartbeat ${e.heartbeatIntervalMs} ms)`);
    refresh();
  });
  client.on("bound", (e) => {
    $("user").textContent = e.user;
    $("error").textContent = "";
    log(`bound ${e.app} as ${e.user}`);
  });
  client.on("bindFailed", (e) => {
    $("error").textContent = `BIND ${e.app} failed: ${e.codeName} ${e.message}`;
    log(`bind of ${e.app} failed: ${e.codeName}`);
  });
  client.on("push", (e) => {
    showMessage("pushes", e);
    log(`push ${e.app} #${e.seq}`);
  });
  client.on("broadcast", (e) => {
    showMessage("broadcasts", e);
    log(`broadcast ${e.app} #${e.seq}`);
  });
  client.on("reset", (e) => log(`reset ${e.app} ${e.sequence} after ${e.after}`));
  client.on("dispatchFailed", (e) => log(`dispatcher: ${e.error}`));
  client.on("disconnected", (e) => {
    $("error").textContent = e.error;
    log(`disconnected: ${e.error}; again in ${Math.round(e.reconnectInMs)} ms`);
    refresh();
  });
  client.on("closed", (e) => {
    $("error").textContent = e.message;
    log(`closed: ${e.reason}`);
    refresh();
  });

  setState("connecting");
  await client.start();
  refresh();
}

main().catch((error) => {
  setState("error");
  $("error").textContent = error instanceof Error ? error.message : String(error);
});
