import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ClientConn, type Frame, HeartbeatLearner, type HeartbeatProbeOptions, type StorageLike } from "herald-client";

const T0 = 1_000_000;

class MapStorage implements StorageLike {
  readonly items = new Map<string, string>();
  getItem(key: string): string | null {
    return this.items.get(key) ?? null;
  }
  setItem(key: string, value: string): void {
    this.items.set(key, value);
  }
}

function probe(storage: StorageLike, networkId = "carrier-a"): HeartbeatProbeOptions {
  return { stepMs: 10_000, healthyBeforeProbe: 2, holdMs: 3_600_000, networkId, storage };
}

describe("HeartbeatLearner", () => {
  test("probes after healthy pings, falls back on a failure and holds there", () => {
    const learner = new HeartbeatLearner(probe(new MapStorage()), "4g");
    assert.equal(learner.connected(30_000), undefined, "nothing learned yet");
    assert.equal(learner.pingAnswered(), undefined);
    assert.equal(learner.pingAnswered(), 40_000);
    assert.equal(learner.learnedMs, 30_000);
    learner.set(40_000);
    learner.pingAnswered();
    assert.equal(learner.pingAnswered(), 50_000);
    learner.set(50_000);
    learner.failed();
    assert.equal(learner.learnedMs, 40_000);
    assert.equal(learner.connected(30_000), 40_000);
    learner.set(40_000);
    for (let i = 0; i < 6; i++) assert.equal(learner.pingAnswered(), undefined);
  });

  test("a clamped answer stops the probing", () => {
    const learner = new HeartbeatLearner(probe(new MapStorage()), "wifi");
    learner.connected(30_000);
    learner.pingAnswered();
    assert.equal(learner.pingAnswered(), 40_000);
    learner.set(35_000);
    for (let i = 0; i < 6; i++) assert.equal(learner.pingAnswered(), undefined);
  });

  test("the hold ends: probing resumes above the interval that held", () => {
    let wall = 0;
    const learner = new HeartbeatLearner({ ...probe(new MapStorage()), holdMs: 1_000 }, "wifi", () => wall);
    learner.connected(30_000);
    learner.pingAnswered();
    learner.pingAnswered();
    learner.set(40_000);
    learner.failed();
    learner.connected(30_000);
    learner.set(30_000);
    learner.pingAnswered();
    assert.equal(learner.pingAnswered(), undefined, "held");
    wall = 1_000;
    learner.pingAnswered();
    assert.equal(learner.pingAnswered(), 40_000);
  });

  test("a timeout the server reports counts for an unexplained loss only, once", () => {
    let wall = T0;
    const learner = new HeartbeatLearner(probe(new MapStorage()), "wifi", () => wall);
    // The first connection: nothing before it to report about.
    learner.connected(30_000);
    assert.equal(learner.previousTimedOut(30_000, 0), undefined);
    learner.pingAnswered();
    assert.equal(learner.pingAnswered(), 40_000);
    learner.set(40_000);
    wall += 60_000;
    // Lost with no PING out; the next connection starts at the 30 s that
    // held, and the server says the 40 s one timed out.
    assert.equal(learner.connected(30_000), undefined);
    assert.equal(learner.previousTimedOut(40_000, 1_000), undefined);
    assert.equal(learner.learnedMs, 30_000);
    learner.pingAnswered();
    assert.equal(learner.pingAnswered(), undefined, "no probe above 30 s for now");
    // A loss already counted is not counted again.
    learner.failed();
    assert.equal(learner.learnedMs, 20_000);
    wall += 60_000;
    learner.connected(30_000);
    assert.equal(learner.previousTimedOut(30_000, 0), undefined);
    assert.equal(learner.learnedMs, 20_000);
  });

  test("a reported timeout of the interval in force moves the current connection down", () => {
    let wall = T0;
    const learner = new HeartbeatLearner(probe(new MapStorage()), "wifi", () => wall);
    learner.connected(30_000);
    learner.pingAnswered();
    learner.pingAnswered();
    learner.set(40_000);
    learner.pingAnswered();
    learner.pingAnswered();
    learner.set(50_000);
    learner.pingAnswered();
    learner.pingAnswered();
    wall += 600_000;
    assert.equal(learner.connected(30_000), 50_000);
    learner.set(50_000);
    assert.equal(learner.previousTimedOut(50_000, 0), 40_000);
    assert.equal(learner.learnedMs, 40_000);
  });

  test("a report about a connection before the last, or after a GOAWAY, changes nothing", () => {
    let wall = T0;
    const learner = new HeartbeatLearner(probe(new MapStorage()), "wifi", () => wall);
    learner.connected(30_000);
    wall += 1_000;
    learner.connected(30_000);
    wall += 1_000;
    assert.equal(learner.previousTimedOut(30_000, 3_600_000), undefined, "closed before it began");
    learner.explained();
    learner.connected(30_000);
    assert.equal(learner.previousTimedOut(30_000, 0), undefined, "the server said why");
    assert.equal(learner.learnedMs, undefined);
  });

  test("learned intervals are kept in the storage per network type and id", () => {
    const storage = new MapStorage();
    const learner = new HeartbeatLearner(probe(storage), "wifi");
    learner.connected(30_000);
    learner.pingAnswered();
    learner.pingAnswered();
    learner.set(40_000);
    learner.failed();
    assert.equal(new HeartbeatLearner(probe(storage), "wifi").learnedMs, 30_000);
    assert.equal(new HeartbeatLearner(probe(storage, "carrier-b"), "wifi").learnedMs, undefined);
    assert.equal(new HeartbeatLearner(probe(storage), "4g").learnedMs, undefined);
  });
});

/** A connection that got HELLO_OK (1 s) for the app `chat`. */
function openConn(): ClientConn {
  const conn = new ClientConn(T0, {
    deviceId: "phone",
    clientVersion: "test",
    network: 1,
    apps: [{ app: "chat", token: "t", tags: [] }],
    storageEpoch: undefined,
  });
  conn.handleFrame(T0, { type: "helloOk", heartbeatIntervalMs: 1_000 });
  return conn;
}

describe("ClientConn heartbeat negotiation", () => {
  test("a previous timeout is reported once per connection, for a bound app", () => {
    const conn = openConn();
    while (conn.pollEvent() !== undefined);
    const report = (app: string): Frame => ({
      type: "sessionTimedOut",
      app,
      network: 2,
      intervalMs: 45_000,
      closedAgoMs: 2_000,
    });
    conn.handleFrame(T0, report("mail"));
    conn.handleFrame(T0, report("chat"));
    conn.handleFrame(T0, report("chat"));
    const reports = [];
    for (let e = conn.pollEvent(); e !== undefined; e = conn.pollEvent()) reports.push(e);
    assert.deepEqual(reports, [{ type: "previousTimedOut", network: 2, intervalMs: 45_000, closedAgoMs: 2_000 }]);
  });

  test("a proposal goes out, and the answer moves the pings and the silence deadline", () => {
    const conn = openConn();
    while (conn.pollTransmit() !== undefined);
    while (conn.pollEvent() !== undefined);
    conn.proposeHeartbeat(5_000);
    assert.deepEqual(conn.pollTransmit(), { type: "heartbeat", intervalMs: 5_000 } satisfies Frame);
    conn.handleFrame(T0, { type: "heartbeat", intervalMs: 3_000 });
    assert.deepEqual(conn.pollEvent(), { type: "heartbeatSet", intervalMs: 3_000 });
    assert.equal(conn.pollTimeout(), T0 + 3_000);
    conn.handleTimeout(T0 + 3_000);
    assert.deepEqual(conn.pollTransmit(), { type: "ping" });
    assert.equal(conn.pingUnanswered, true);
    conn.handleFrame(T0 + 3_000, { type: "pong" });
    assert.deepEqual(conn.pollEvent(), { type: "pingAnswered" });
    assert.equal(conn.pingUnanswered, false);
    conn.handleTimeout(T0 + 8_999);
    assert.equal(conn.isClosed, false);
    conn.handleTimeout(T0 + 9_000);
    assert.equal(conn.isClosed, true);
  });
});
