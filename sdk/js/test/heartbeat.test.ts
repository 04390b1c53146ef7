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

describe("ClientConn heartbeat negotiation", () => {
  test("a proposal goes out, and the answer moves the pings and the silence deadline", () => {
    const conn = new ClientConn(T0, {
      deviceId: "phone",
      clientVersion: "test",
      network: 1,
      apps: [{ app: "chat", token: "t", tags: [] }],
      storageEpoch: undefined,
    });
    conn.handleFrame(T0, { type: "helloOk", heartbeatIntervalMs: 1_000 });
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
