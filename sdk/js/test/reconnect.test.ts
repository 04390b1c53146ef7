import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  Backoff,
  Gateways,
  type Ended,
  decide,
  dispatchUrl,
  endedByClose,
  endedByGoAway,
  goAwayReasonName,
  lost,
} from "herald-client";

const fixed = (value: number) => () => value;
const ALMOST_ONE = 0.999_999;

describe("backoff", () => {
  test("the bound doubles from initial up to max", () => {
    const backoff = new Backoff({ initialMs: 200, maxMs: 30_000 });
    const bounds: number[] = [];
    for (let i = 0; i < 10; i++) {
      bounds.push(backoff.bound);
      backoff.next(fixed(0));
    }
    assert.deepEqual(bounds, [200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000]);
  });

  test("full jitter: each wait is in [0, bound], spread over all of it", () => {
    const backoff = new Backoff({ initialMs: 1_000, maxMs: 1_000 });
    assert.equal(backoff.next(fixed(0)), 0);
    assert.ok(backoff.next(fixed(ALMOST_ONE)) < 1_000);
    assert.equal(backoff.next(fixed(0.25)), 250);
    let min = Infinity;
    let max = -Infinity;
    for (let i = 0; i < 2_000; i++) {
      const wait = backoff.next(Math.random);
      assert.ok(wait >= 0 && wait <= 1_000, String(wait));
      min = Math.min(min, wait);
      max = Math.max(max, wait);
    }
    // Full jitter, not "bound/2 plus jitter": draws reach both ends.
    assert.ok(min < 100 && max > 900, `${min}..${max}`);
  });

  test("reset goes back to the initial bound", () => {
    const backoff = new Backoff({ initialMs: 200, maxMs: 30_000 });
    for (let i = 0; i < 5; i++) backoff.next(fixed(0.5));
    assert.equal(backoff.bound, 6_400);
    backoff.reset();
    assert.equal(backoff.bound, 200);
    assert.equal(backoff.next(fixed(0.5)), 100);
  });

  test("a server's hint is waited out, plus up to half of it again", () => {
    const backoff = new Backoff({ initialMs: 200, maxMs: 30_000 });
    assert.equal(backoff.next(fixed(0), 1_000), 1_000);
    assert.equal(backoff.next(fixed(0.5), 1_000), 1_250);
    assert.ok(backoff.next(fixed(ALMOST_ONE), 1_000) < 1_500);
    assert.equal(backoff.bound, 1_600, "the bound still doubles");
  });

  test("bad bounds are refused", () => {
    assert.throws(() => new Backoff({ initialMs: 500, maxMs: 100 }), RangeError);
    assert.throws(() => new Backoff({ initialMs: -1, maxMs: 100 }), RangeError);
  });
});

describe("how a connection ended", () => {
  const goAway = (reason: number, reconnectDelayMs?: number) => ({
    reason,
    reasonName: goAwayReasonName(reason),
    reconnectDelayMs,
  });

  test("GOAWAY kicked and auth_failed stop for good; the others reconnect", () => {
    const kicked = endedByGoAway(goAway(1), true);
    assert.equal(kicked.kind, "terminal");
    assert.equal(kicked.kind === "terminal" && kicked.closed.reason, "kicked");
    const failure = { app: "chat", code: 1, codeName: "invalid_token", message: "bad" };
    const auth = endedByGoAway(goAway(4), true, failure);
    assert.ok(auth.kind === "terminal" && auth.closed.reason === "authFailed" && auth.closed.app === "chat");
    for (const reason of [2, 3, 5, 6, 7, 8, 99]) {
      const ended = endedByGoAway(goAway(reason, reason === 2 ? 1_000 : undefined), true);
      assert.equal(ended.kind, "lost", String(reason));
      assert.equal(ended.kind === "lost" && ended.hintMs, reason === 2 ? 1_000 : undefined);
      assert.equal(ended.kind === "lost" && ended.protocolError, reason === 6, String(reason));
    }
  });

  test("a close with 1001 is taken as server_shutdown; 1002 as a protocol error", () => {
    const away = endedByClose(1001, "", true);
    assert.equal(away.goAway?.reasonName, "server_shutdown");
    assert.equal(away.closeCode, 1001);
    assert.equal(away.protocolError, undefined);
    assert.equal(endedByClose(1002, "", true).protocolError, true);
    assert.equal(endedByClose(1006, "", false).handshakeDone, false);
  });
});

describe("deciding", () => {
  const setup = (configured = ["wss://a/v1/connect", "wss://b/v1/connect"]) => ({
    backoff: new Backoff({ initialMs: 200, maxMs: 30_000 }),
    gateways: new Gateways(configured),
  });

  test("a terminal end stops", () => {
    const { backoff, gateways } = setup();
    const ended = endedByGoAway({ reason: 1, reasonName: "kicked", reconnectDelayMs: undefined }, true);
    assert.deepEqual(decide(ended, "wss://a/v1/connect", "wifi", backoff, gateways, fixed(0.5)), {
      action: "stop",
      closed: { type: "closed", reason: "kicked", message: "kicked by the server (GOAWAY kicked)" },
    });
  });

  test("an unreachable gateway fails over at once while others are left, then waits", async () => {
    const { backoff, gateways } = setup();
    const first = await gateways.next("wifi", undefined);
    assert.equal(first.gateway, "wss://a/v1/connect");
    assert.deepEqual(decide(lost("refused", false), first.gateway, "wifi", backoff, gateways, fixed(0.5)), {
      action: "failover",
    });
    assert.equal(backoff.bound, 200, "a failover does not grow the backoff");
    const second = await gateways.next("wifi", undefined);
    assert.equal(second.gateway, "wss://b/v1/connect");
    assert.deepEqual(decide(lost("refused", false), second.gateway, "wifi", backoff, gateways, fixed(0.5)), {
      action: "wait",
      delayMs: 100,
    });
    assert.deepEqual(decide(lost("refused", false), undefined, "wifi", backoff, gateways, fixed(0.5)), {
      action: "wait",
      delayMs: 200,
    });
  });

  test("a connection that completed its handshake resets the backoff and is tried first next time", async () => {
    const { backoff, gateways } = setup();
    backoff.next(fixed(0));
    backoff.next(fixed(0));
    assert.equal(backoff.bound, 800);
    await gateways.next("wifi", undefined); // a
    const b = await gateways.next("wifi", undefined);
    assert.deepEqual(decide(lost("gone", true), b.gateway, "wifi", backoff, gateways, fixed(0.5)), {
      action: "wait",
      delayMs: 100,
    });
    const order = [];
    for (let i = 0; i < 3; i++) order.push((await gateways.next("wifi", undefined)).gateway);
    assert.deepEqual(order, ["wss://b/v1/connect", "wss://a/v1/connect", "wss://b/v1/connect"]);
  });

  test("a protocol error after the handshake does not reset the backoff", () => {
    const { backoff, gateways } = setup();
    backoff.next(fixed(0));
    const ended: Ended = lost("bad frame", true, { protocolError: true });
    assert.deepEqual(decide(ended, "wss://a/v1/connect", "wifi", backoff, gateways, fixed(0.5)), {
      action: "wait",
      delayMs: 200,
    });
  });

  test("a hint is honoured over the backoff", () => {
    const { backoff, gateways } = setup();
    const ended = endedByGoAway({ reason: 8, reasonName: "overloaded", reconnectDelayMs: 4_000 }, true);
    assert.deepEqual(decide(ended, "wss://a/v1/connect", "wifi", backoff, gateways, fixed(0.5)), {
      action: "wait",
      delayMs: 5_000,
    });
  });
});

describe("gateways", () => {
  test("the dispatcher's list, the last good gateway first, without repeats", async () => {
    const gateways = new Gateways(["wss://fallback/v1/connect"]);
    let answer = ["wss://x/v1/connect", "wss://y/v1/connect"];
    const dispatcher = async () => answer;
    assert.deepEqual(await gateways.next("wifi", dispatcher), { gateway: "wss://x/v1/connect", dispatchError: undefined });
    gateways.worked("wifi", "wss://x/v1/connect");
    answer = ["wss://y/v1/connect", "wss://x/v1/connect"];
    const order = [];
    for (let i = 0; i < 2; i++) order.push((await gateways.next("wifi", dispatcher)).gateway);
    assert.deepEqual(order, ["wss://x/v1/connect", "wss://y/v1/connect"]);
    // Per network: nothing worked on cellular yet.
    const cellular = new Gateways([]);
    cellular.worked("wifi", "wss://x/v1/connect");
    assert.equal((await cellular.next("cellular", dispatcher)).gateway, "wss://y/v1/connect");
  });

  test("a dispatcher that fails: the last good gateway, else the configured ones", async () => {
    const failing = async (): Promise<string[]> => {
      throw new Error("dispatcher answered HTTP 503");
    };
    const gateways = new Gateways(["wss://fallback/v1/connect"]);
    assert.deepEqual(await gateways.next("wifi", failing), {
      gateway: "wss://fallback/v1/connect",
      dispatchError: "dispatcher answered HTTP 503",
    });
    gateways.worked("wifi", "wss://good/v1/connect");
    assert.deepEqual(await gateways.next("wifi", failing), {
      gateway: "wss://good/v1/connect",
      dispatchError: "dispatcher answered HTTP 503",
    });
    const none = new Gateways([]);
    assert.equal((await none.next("wifi", failing)).gateway, undefined);
  });

  test("the dispatch URL", () => {
    assert.equal(
      dispatchUrl({ url: "https://api.example.com/", app: "chat", user: "al ice" }, "cellular"),
      "https://api.example.com/v1/dispatch?app=chat&user=al+ice&net=4g&transport=wss",
    );
    assert.equal(
      dispatchUrl({ url: "http://127.0.0.1:8080", app: "chat", user: "bob", region: "eu", transport: "ws" }, "unknown"),
      "http://127.0.0.1:8080/v1/dispatch?app=chat&user=bob&region=eu&transport=ws",
    );
    assert.match(dispatchUrl({ url: "http://h", app: "a", user: "u" }, "wired"), /net=wifi/);
  });
});
