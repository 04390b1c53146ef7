// The JS SDK's side of tests/heartbeat_nat.rs: a HeraldClient in Node,
// probing its heartbeat, connected through the test's NAT-like relay. It
// prints the events the test follows, one JSON object a line, and runs
// until its standard input closes.
//
//   node e2e/heartbeat_nat.mjs GATEWAY_URL TOKEN STEP_MS HEALTHY HOLD_MS
//
// Needs the built SDK (dist/, `npm run build`) and the `ws` package.

import { HeraldClient } from "../dist/index.js";

const [gateway, token, stepMs, healthy, holdMs] = process.argv.slice(2);
if (holdMs === undefined) {
  throw new Error("usage: heartbeat_nat.mjs GATEWAY_URL TOKEN STEP_MS HEALTHY HOLD_MS");
}

const client = new HeraldClient({
  gateways: gateway,
  deviceId: "js-nat",
  network: "wifi",
  apps: [{ app: "chat", token }],
  reconnect: { initialMs: 50, maxMs: 500 },
  heartbeatProbe: {
    stepMs: Number(stepMs),
    healthyBeforeProbe: Number(healthy),
    holdMs: Number(holdMs),
    networkId: "test-nat",
  },
});
const print = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
client.on("connected", (e) => print({ type: "connected", heartbeatIntervalMs: e.heartbeatIntervalMs }));
client.on("disconnected", (e) => print({ type: "disconnected", error: e.error }));
client.on("heartbeatSet", (e) => print({ type: "heartbeatSet", intervalMs: e.intervalMs }));
client.on("closed", () => print({ type: "closed" }));
await client.start();
process.stdin.resume();
process.stdin.on("end", () => {
  client.close();
  process.exit(0);
});
