// The JS SDK's side of a Rust integration test of notify, then pull: a
// HeraldClient in Node, bound to app `chat` with auto ack and autoPull (the
// defaults), against a real gateway. It prints the events the test follows,
// one JSON object a line (seqs as JSON numbers, payloads as UTF-8 text),
// and runs until its standard input closes.
//
//   node e2e/notify.mjs GATEWAY_URL TOKEN
//
// Needs the built SDK (dist/, `npm run build`) and the `ws` package.

import { HeraldClient } from "../dist/index.js";

const [gateway, token] = process.argv.slice(2);
if (token === undefined) {
  throw new Error("usage: notify.mjs GATEWAY_URL TOKEN");
}

const client = new HeraldClient({
  gateways: gateway,
  deviceId: "js-notify",
  network: "wifi",
  apps: [{ app: "chat", token }],
  reconnect: { initialMs: 50, maxMs: 500 },
});
const print = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const text = new TextDecoder();
client.on("connected", () => print({ type: "connected" }));
client.on("bound", () => print({ type: "bound" }));
client.on("notify", (e) => print({ type: "notify", seq: Number(e.seq), size: e.size, hint: e.hint }));
// Acked (auto ack) once this returns: after the line is written.
client.on("push", (e) => print({ type: "push", seq: Number(e.seq), pulled: e.pulled, payload: text.decode(e.payload) }));
client.on("notifyGone", (e) => print({ type: "notifyGone", seq: Number(e.seq) }));
await client.start();
process.stdin.resume();
process.stdin.on("end", () => {
  client.close();
  process.exit(0);
});
