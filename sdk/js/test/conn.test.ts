import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  ClientConn,
  type ConnConfig,
  type ConnEvent,
  ConnError,
  ErrorCode,
  type Frame,
  HANDSHAKE_TIMEOUT_MS,
  PAYLOAD_LEN_MAX,
  encodeFrame,
  fromHex,
} from "herald-client";

const T0 = 1_000_000;

function config(overrides: Partial<ConnConfig> = {}, lastSeq?: bigint, lastBroadcastSeq?: bigint): ConnConfig {
  return {
    deviceId: "phone",
    clientVersion: "test",
    network: 1,
    apps: [{ app: "chat", token: "t", lastSeq, lastBroadcastSeq, tags: [] }],
    storageEpoch: undefined,
    ...overrides,
  };
}

function start(lastSeq?: bigint, overrides: Partial<ConnConfig> = {}): ClientConn {
  return new ClientConn(T0, config(overrides, lastSeq));
}

function drain(conn: ClientConn): Frame[] {
  const frames: Frame[] = [];
  for (let f = conn.pollTransmit(); f !== undefined; f = conn.pollTransmit()) frames.push(f);
  return frames;
}

function events(conn: ClientConn): ConnEvent[] {
  const out: ConnEvent[] = [];
  for (let e = conn.pollEvent(); e !== undefined; e = conn.pollEvent()) out.push(e);
  return out;
}

const helloOk = (heartbeatIntervalMs = 1_000, storageEpoch?: bigint): Frame =>
  storageEpoch === undefined
    ? { type: "helloOk", heartbeatIntervalMs }
    : { type: "helloOk", heartbeatIntervalMs, storageEpoch };

const push = (seq: bigint, app = "chat"): Frame => ({
  type: "push",
  app,
  messageId: new Uint8Array(16),
  seq,
  payload: new Uint8Array(),
});

const broadcast = (seq: bigint): Frame => ({
  type: "broadcast",
  app: "chat",
  messageId: new Uint8Array(16).fill(Number(seq)),
  seq,
  payload: new TextEncoder().encode("all"),
});

function open(conn: ClientConn, heartbeatIntervalMs = 1_000, storageEpoch?: bigint): void {
  conn.handleFrame(T0, helloOk(heartbeatIntervalMs, storageEpoch));
  drain(conn);
  events(conn);
}

function bindClaims(conn: ClientConn): [bigint | undefined, bigint | undefined] {
  const bind = drain(conn).find((f) => f.type === "bind");
  assert.ok(bind !== undefined && bind.type === "bind", "a BIND");
  return [bind.lastSeq, bind.lastBroadcastSeq];
}

const seqsOf = (list: ConnEvent[], type: "push" | "broadcast"): bigint[] =>
  list.flatMap((e) => (e.type === type ? [e.seq] : []));

describe("handshake", () => {
  test("HELLO first, then BIND with the resume point after HELLO_OK, and PING on the interval", () => {
    const conn = start(4n);
    assert.deepEqual(drain(conn), [{ type: "hello", deviceId: "phone", clientVersion: "test", network: 1, features: 7 }]);
    assert.equal(conn.isOpen, false);
    conn.handleFrame(T0, helloOk());
    assert.deepEqual(drain(conn), [
      { type: "bind", app: "chat", token: "t", lastSeq: 4n, lastBroadcastSeq: undefined, tags: [] },
    ]);
    assert.deepEqual(events(conn), [{ type: "ready", heartbeatIntervalMs: 1_000, storageEpoch: undefined }]);
    assert.equal(conn.pollTimeout(), T0 + 1_000);
    conn.handleTimeout(T0 + 999);
    assert.deepEqual(drain(conn), []);
    conn.handleTimeout(T0 + 1_000);
    assert.deepEqual(drain(conn), [{ type: "ping" }]);
    assert.equal(conn.pollTimeout(), T0 + 2_000, "the next ping, before the silence deadline");
  });

  test("every app is bound, each with its own resume points and tags", () => {
    const conn = new ClientConn(T0, {
      deviceId: "phone",
      clientVersion: "",
      network: 0,
      apps: [
        { app: "chat", token: "a", lastSeq: 3n },
        { app: "news", token: "b", lastBroadcastSeq: 9n, tags: ["platform=web"] },
      ],
    });
    drain(conn);
    conn.handleFrame(T0, helloOk());
    assert.deepEqual(drain(conn), [
      { type: "bind", app: "chat", token: "a", lastSeq: 3n, lastBroadcastSeq: undefined, tags: [] },
      { type: "bind", app: "news", token: "b", lastSeq: undefined, lastBroadcastSeq: 9n, tags: ["platform=web"] },
    ]);
  });

  test("a zero heartbeat interval is taken as 100 ms, not a busy loop", () => {
    const conn = start();
    conn.handleFrame(T0, helloOk(0));
    assert.deepEqual(events(conn), [{ type: "ready", heartbeatIntervalMs: 100, storageEpoch: undefined }]);
    assert.equal(conn.pollTimeout(), T0 + 100);
  });

  test("no HELLO_OK within the handshake timeout: timed out", () => {
    const conn = start();
    assert.equal(conn.pollTimeout(), T0 + HANDSHAKE_TIMEOUT_MS);
    conn.handleTimeout(T0 + HANDSHAKE_TIMEOUT_MS - 1);
    assert.equal(conn.isClosed, false);
    conn.handleTimeout(T0 + HANDSHAKE_TIMEOUT_MS);
    assert.equal(conn.isClosed, true);
    assert.deepEqual(events(conn), [{ type: "timedOut" }]);
    assert.equal(conn.pollTimeout(), undefined);
  });

  test("bound and bind failures are reported; every BIND failed is known", () => {
    const conn = new ClientConn(T0, config({ apps: [{ app: "chat", token: "a" }, { app: "news", token: "b" }] }));
    open(conn);
    conn.handleFrame(T0, { type: "bindOk", app: "chat", user: "alice" });
    conn.handleFrame(T0, { type: "bindErr", app: "news", code: 2, message: "expired" });
    assert.deepEqual(events(conn), [
      { type: "bound", app: "chat", user: "alice" },
      { type: "bindFailed", app: "news", code: 2, codeName: "token_expired", message: "expired" },
    ]);
    assert.equal(conn.boundUser("chat"), "alice");
    assert.equal(conn.everyBindFailed(), false);
    const failing = new ClientConn(T0, config({ apps: [{ app: "chat", token: "a" }, { app: "news", token: "b" }] }));
    open(failing);
    failing.handleFrame(T0, { type: "bindErr", app: "chat", code: 1, message: "" });
    assert.equal(failing.everyBindFailed(), false);
    failing.handleFrame(T0, { type: "bindErr", app: "news", code: 77, message: "" });
    assert.equal(failing.everyBindFailed(), true);
    const last = events(failing).at(-1);
    assert.ok(last?.type === "bindFailed" && last.codeName === "unknown", "a code v1 does not define");
  });
});

describe("heartbeats", () => {
  test("a silent server times out at twice the interval", () => {
    const conn = start();
    conn.handleFrame(T0, helloOk());
    conn.handleTimeout(T0 + 1_999);
    assert.equal(conn.isClosed, false);
    conn.handleTimeout(T0 + 2_000);
    assert.equal(conn.isClosed, true);
    assert.ok(events(conn).some((e) => e.type === "timedOut"));
  });

  test("any frame from the server moves the silence deadline", () => {
    const conn = start();
    open(conn);
    conn.handleFrame(T0 + 1_500, { type: "pong" });
    assert.equal(conn.pollTimeout(), T0 + 1_000, "the ping is still due first");
    conn.handleTimeout(T0 + 1_000);
    assert.deepEqual(drain(conn), [{ type: "ping" }]);
    conn.handleTimeout(T0 + 2_000);
    assert.deepEqual(drain(conn), [{ type: "ping" }]);
    conn.handleTimeout(T0 + 3_499);
    assert.equal(conn.isClosed, false, "the PONG at 1.5 s holds the deadline to 3.5 s");
    conn.handleTimeout(T0 + 3_500);
    assert.equal(conn.isClosed, true);
  });
});

describe("delivery", () => {
  test("duplicate pushes are dropped and acks are cumulative", () => {
    const conn = start(2n);
    open(conn);
    for (const seq of [2n, 3n, 3n, 4n]) conn.handleFrame(T0, push(seq));
    assert.deepEqual(seqsOf(events(conn), "push"), [3n, 4n]);
    assert.equal(conn.ack("chat", 4n), true);
    assert.equal(conn.ack("chat", 3n), false);
    assert.equal(conn.ack("chat", 9n), false, "never delivered");
    assert.equal(conn.ack("news", 1n), false, "not an app of this connection");
    assert.deepEqual(drain(conn), [{ type: "ack", app: "chat", seq: 4n }]);
    assert.deepEqual(conn.resumePoints(), [{ app: "chat", lastSeq: 4n, lastBroadcastSeq: undefined }]);
  });

  test("a push carries its message id as hex and its payload", () => {
    const conn = start();
    open(conn);
    conn.handleFrame(T0, {
      type: "push",
      app: "chat",
      messageId: fromHex("30313233343536373839616263646566"),
      seq: 1n,
      payload: new TextEncoder().encode("hi"),
    });
    conn.handleFrame(T0, push(1n, "other"));
    assert.deepEqual(events(conn), [
      {
        type: "push",
        app: "chat",
        messageId: "30313233343536373839616263646566",
        seq: 1n,
        payload: new TextEncoder().encode("hi"),
        pulled: false,
      },
    ]);
  });

  test("broadcasts are de-duplicated, acked and resumed apart from pushes", () => {
    const conn = start();
    open(conn);
    for (const seq of [1n, 2n, 2n]) conn.handleFrame(T0, broadcast(seq));
    conn.handleFrame(T0, push(1n));
    const seen = events(conn);
    assert.deepEqual(seqsOf(seen, "broadcast"), [1n, 2n]);
    assert.deepEqual(seqsOf(seen, "push"), [1n]);
    assert.equal(conn.ackBroadcast("chat", 2n), true);
    assert.equal(conn.ackBroadcast("chat", 3n), false, "never delivered");
    assert.equal(conn.ackBroadcast("chat", 2n), false, "already acked");
    assert.deepEqual(drain(conn), [{ type: "broadcastAck", app: "chat", seq: 2n }]);
    assert.deepEqual(conn.resumePoints(), [{ app: "chat", lastSeq: undefined, lastBroadcastSeq: 2n }]);
  });

  test("a transient message is an event for a bound app, moves no seq and is not acked", () => {
    const conn = start(2n);
    open(conn);
    const typing = new TextEncoder().encode("typing");
    conn.handleFrame(T0, { type: "transient", app: "chat", payload: typing });
    conn.handleFrame(T0, { type: "transient", app: "other", payload: typing });
    assert.deepEqual(events(conn), [{ type: "transient", app: "chat", payload: typing }], "only the bound app's");
    assert.equal(conn.isOpen, true);
    assert.deepEqual(drain(conn), [], "nothing is acked");
    assert.deepEqual(conn.resumePoints(), [{ app: "chat", lastSeq: 2n, lastBroadcastSeq: undefined }]);
    conn.handleFrame(T0, push(3n));
    assert.deepEqual(seqsOf(events(conn), "push"), [3n], "the inbox's seqs go on where they were");
  });

  test("acks before HELLO_OK or after the close send nothing", () => {
    const conn = start();
    drain(conn);
    conn.handleFrame(T0, push(1n));
    assert.equal(conn.ack("chat", 1n), false);
    conn.handleFrame(T0, helloOk());
    drain(conn);
    conn.close();
    assert.equal(conn.ack("chat", 1n), false);
    assert.deepEqual(drain(conn), []);
  });
});

describe("notify and pull", () => {
  const notify = (seq: bigint, app = "chat"): Frame => ({
    type: "notify",
    app,
    messageId: fromHex("30313233343536373839616263646566"),
    seq,
    size: 40_000,
    pullSpreadMs: 5_000,
    hint: "news",
  });

  test("a NOTIFY takes a PUSH's place: de-duplicated by seq, acked, and it moves the resume point", () => {
    const conn = start(2n);
    open(conn);
    conn.handleFrame(T0, notify(2n));
    conn.handleFrame(T0, notify(3n));
    conn.handleFrame(T0, push(3n));
    conn.handleFrame(T0, notify(3n));
    conn.handleFrame(T0, push(4n));
    conn.handleFrame(T0, notify(4n));
    conn.handleFrame(T0, notify(5n, "other"));
    const seen = events(conn);
    assert.deepEqual(seen, [
      {
        type: "notify",
        app: "chat",
        messageId: "30313233343536373839616263646566",
        seq: 3n,
        size: 40_000,
        pullSpreadMs: 5_000,
        hint: "news",
      },
      { type: "push", app: "chat", messageId: "0".repeat(32), seq: 4n, payload: new Uint8Array(), pulled: false },
    ]);
    assert.equal(conn.ack("chat", 3n), true, "a notified seq is acked as a pushed one");
    assert.deepEqual(drain(conn), [{ type: "ack", app: "chat", seq: 3n }]);
    assert.deepEqual(conn.resumePoints(), [{ app: "chat", lastSeq: 3n, lastBroadcastSeq: undefined }]);
  });

  test("pull queues a PULL for a bound app of an open connection", () => {
    const conn = start();
    drain(conn);
    assert.throws(() => conn.pull("chat", 3n), (e: unknown) => e instanceof ConnError && e.kind === "closed");
    conn.handleFrame(T0, helloOk());
    drain(conn);
    assert.throws(() => conn.pull("chat", 3n), (e: unknown) => e instanceof ConnError && e.kind === "not_bound");
    conn.handleFrame(T0, { type: "bindOk", app: "chat", user: "alice" });
    assert.throws(() => conn.pull("news", 3n), (e: unknown) => e instanceof ConnError && e.kind === "not_bound");
    conn.pull("chat", 3n);
    conn.pull("chat", 3n);
    assert.deepEqual(drain(conn), [
      { type: "pull", app: "chat", seq: 3n },
      { type: "pull", app: "chat", seq: 3n },
    ]);
    conn.close();
    assert.throws(() => conn.pull("chat", 3n), (e: unknown) => e instanceof ConnError && e.kind === "closed");
  });

  test("a PULL_REPLY is a pulled event, its status named (unknown codes kept)", () => {
    const conn = start();
    open(conn);
    conn.handleFrame(T0, {
      type: "pullReply",
      app: "chat",
      seq: 3n,
      status: 0,
      messageId: fromHex("30313233343536373839616263646566"),
      payload: new TextEncoder().encode("hi"),
    });
    conn.handleFrame(T0, { type: "pullReply", app: "chat", seq: 4n, status: 1, messageId: new Uint8Array(16), payload: new Uint8Array() });
    conn.handleFrame(T0, { type: "pullReply", app: "chat", seq: 5n, status: 77, messageId: new Uint8Array(16), payload: new Uint8Array() });
    assert.deepEqual(events(conn), [
      {
        type: "pulled",
        app: "chat",
        seq: 3n,
        status: 0,
        statusName: "ok",
        messageId: "30313233343536373839616263646566",
        payload: new TextEncoder().encode("hi"),
      },
      { type: "pulled", app: "chat", seq: 4n, status: 1, statusName: "gone", messageId: "0".repeat(32), payload: new Uint8Array() },
      { type: "pulled", app: "chat", seq: 5n, status: 77, statusName: "unknown", messageId: "0".repeat(32), payload: new Uint8Array() },
    ]);
    assert.deepEqual(drain(conn), [], "nothing is acked by itself");
  });
});

describe("RESET and the storage epoch", () => {
  test("a RESET moves the resume point back, so what follows is delivered", () => {
    const conn = start(50n);
    open(conn);
    conn.handleFrame(T0, { type: "reset", app: "chat", sequence: 0, after: 0n });
    conn.handleFrame(T0, push(1n));
    const seen = events(conn);
    assert.deepEqual(seen[0], { type: "reset", app: "chat", sequence: "inbox", after: 0n });
    assert.deepEqual(seqsOf(seen, "push"), [1n], "seq 1 is new after the reset");
    assert.equal(conn.ack("chat", 1n), true);
    assert.deepEqual(conn.resumePoints(), [{ app: "chat", lastSeq: 1n, lastBroadcastSeq: undefined }]);
  });

  test("a RESET of the broadcasts leaves the inbox alone", () => {
    const conn = new ClientConn(T0, config({}, 5n, 40n));
    open(conn);
    conn.handleFrame(T0, { type: "reset", app: "chat", sequence: 1, after: 3n });
    conn.handleFrame(T0, broadcast(4n));
    conn.handleFrame(T0, push(5n));
    const seen = events(conn);
    assert.deepEqual(seen[0], { type: "reset", app: "chat", sequence: "broadcasts", after: 3n });
    assert.deepEqual(seqsOf(seen, "broadcast"), [4n]);
    assert.deepEqual(seqsOf(seen, "push"), [], "the inbox still holds 5");
    assert.deepEqual(conn.resumePoints(), [{ app: "chat", lastSeq: 5n, lastBroadcastSeq: 3n }]);
  });

  test("a new storage epoch voids the resume points", () => {
    // The same epoch, or none known yet: the claims stand.
    for (const known of [5n, undefined]) {
      const conn = new ClientConn(T0, config({ storageEpoch: known }, 7n, 3n));
      conn.handleFrame(T0, helloOk(1_000, 5n));
      assert.deepEqual(bindClaims(conn), [7n, 3n], String(known));
      assert.equal(conn.storageEpoch, 5n);
      assert.ok(!events(conn).some((e) => e.type === "reset"));
    }
    // A HELLO_OK without an epoch keeps the one known.
    const quiet = new ClientConn(T0, config({ storageEpoch: 4n }, 7n, 3n));
    quiet.handleFrame(T0, helloOk(1_000));
    assert.deepEqual(bindClaims(quiet), [7n, 3n]);
    assert.equal(quiet.storageEpoch, 4n);

    // Another epoch: the server's storage is new; claim nothing.
    const conn = new ClientConn(T0, config({ storageEpoch: 4n }, 7n, 3n));
    conn.handleFrame(T0, helloOk(1_000, 5n));
    assert.deepEqual(bindClaims(conn), [undefined, undefined]);
    assert.equal(conn.storageEpoch, 5n);
    const seen = events(conn);
    assert.deepEqual(
      seen.filter((e) => e.type === "reset"),
      [
        { type: "reset", app: "chat", sequence: "inbox", after: 0n },
        { type: "reset", app: "chat", sequence: "broadcasts", after: 0n },
      ],
    );
    assert.equal(seen.at(-1)?.type, "ready", "the resets come before ready");
    conn.handleFrame(T0, push(1n));
    assert.deepEqual(seqsOf(events(conn), "push"), [1n]);
  });

  test("another epoch with nothing held reports no reset", () => {
    const conn = new ClientConn(T0, config({ storageEpoch: 4n }));
    conn.handleFrame(T0, helloOk(1_000, 5n));
    assert.deepEqual(events(conn).map((e) => e.type), ["ready"]);
  });

  test("epochs beyond 2^53 are compared exactly", () => {
    const held = 2n ** 63n + 1n;
    const conn = new ClientConn(T0, config({ storageEpoch: held }, 7n));
    conn.handleFrame(T0, helloOk(1_000, held + 1n));
    assert.deepEqual(bindClaims(conn), [undefined, undefined]);
  });
});

describe("closing and errors", () => {
  test("GOAWAY closes and is reported", () => {
    const conn = start();
    conn.handleFrame(T0, { type: "goAway", reason: 1 });
    assert.equal(conn.isClosed, true);
    assert.deepEqual(events(conn), [{ type: "goAway", reason: 1, reasonName: "kicked", reconnectDelayMs: undefined }]);
    conn.handleFrame(T0, push(1n));
    assert.deepEqual(events(conn), [], "nothing after the close");
  });

  test("the server's UNBIND forgets the app and keeps the connection", () => {
    const conn = start();
    open(conn);
    conn.handleFrame(T0, { type: "unbind", app: "chat", reason: 1 });
    assert.equal(conn.isClosed, false);
    assert.deepEqual(events(conn), [{ type: "unbound", app: "chat", reason: 1, reasonName: "app_deleted" }]);
    conn.handleFrame(T0, push(1n));
    assert.deepEqual(events(conn), [], "no push for an app unbound");
  });

  test("an UNBIND without a reason from the server is a protocol error", () => {
    const conn = start();
    open(conn);
    conn.handleFrame(T0, { type: "unbind", app: "chat" });
    assert.equal(conn.isClosed, true);
  });

  test("GOAWAY with a delay reports it", () => {
    const conn = start();
    open(conn);
    conn.handleFrame(T0, { type: "goAway", reason: 8, reconnectDelayMs: 2_500 });
    assert.deepEqual(events(conn), [
      { type: "goAway", reason: 8, reasonName: "overloaded", reconnectDelayMs: 2_500 },
    ]);
  });

  test("ERROR from the server closes and is reported", () => {
    const conn = start();
    open(conn);
    conn.handleFrame(T0, { type: "error", code: 4, message: "HELLO was already received" });
    assert.equal(conn.isClosed, true);
    assert.deepEqual(events(conn), [
      { type: "serverError", code: 4, codeName: "unexpected_frame", message: "HELLO was already received" },
    ]);
    assert.deepEqual(drain(conn), [], "no ERROR answers an ERROR");
  });

  test("a client-only frame or a second HELLO_OK is unexpected: ERROR, then close", () => {
    const frames: Frame[] = [
      { type: "ack", app: "chat", seq: 1n },
      { type: "hello", deviceId: "d", clientVersion: "", network: 0 },
      { type: "ping" },
      { type: "pull", app: "chat", seq: 1n },
      helloOk(),
    ];
    for (const frame of frames) {
      const conn = start();
      open(conn);
      conn.handleFrame(T0, frame);
      assert.equal(conn.isClosed, true, frame.type);
      const sent = drain(conn);
      assert.equal(sent.length, 1);
      assert.equal(sent[0]!.type, "error");
      assert.equal(sent[0]!.type === "error" && sent[0]!.code, ErrorCode.UnexpectedFrame);
      const [event] = events(conn);
      assert.equal(event?.type, "protocolError", frame.type);
    }
  });

  test("a message that does not decode: ERROR with the decode error's code, then close", () => {
    const cases: Array<[Uint8Array | string, number]> = [
      [fromHex("00000002 01 ee"), ErrorCode.MalformedFrame],
      [fromHex("00010001 01 06"), ErrorCode.FrameTooLarge],
      [fromHex("00000002 02 07"), ErrorCode.UnsupportedVersion],
      [fromHex("00000002 01 07 00"), ErrorCode.MalformedFrame], // bytes after the frame
      [fromHex("00000002 01 07 00000002 01 07"), ErrorCode.MalformedFrame], // two frames in one message
      ["hello", ErrorCode.MalformedFrame], // a text message
    ];
    for (const [message, code] of cases) {
      const conn = start();
      open(conn);
      conn.handleMessage(T0, message);
      assert.equal(conn.isClosed, true);
      const sent = drain(conn);
      assert.equal(sent.length, 1);
      const error = sent[0]!;
      assert.ok(error.type === "error" && error.code === code, JSON.stringify(error));
      encodeFrame(error); // what is queued can be sent
      const [event] = events(conn);
      assert.ok(event?.type === "protocolError" && event.code === code);
    }
  });

  test("handleMessage decodes one frame", () => {
    const conn = start();
    conn.handleMessage(T0, encodeFrame(helloOk(30_000, 9n)));
    assert.deepEqual(events(conn), [{ type: "ready", heartbeatIntervalMs: 30_000, storageEpoch: 9n }]);
  });
});

describe("upstream and unbind", () => {
  test("upstream needs an open connection and a bound app; request ids count up", () => {
    const conn = start(undefined, { firstRequestId: 41n });
    drain(conn);
    assert.throws(() => conn.upstream("chat", new Uint8Array()), (e: unknown) => e instanceof ConnError && e.kind === "closed");
    conn.handleFrame(T0, helloOk());
    drain(conn);
    assert.throws(() => conn.upstream("chat", new Uint8Array()), (e: unknown) => e instanceof ConnError && e.kind === "not_bound");
    conn.handleFrame(T0, { type: "bindOk", app: "chat", user: "alice" });
    assert.equal(conn.upstream("chat", Uint8Array.of(1)), 41n);
    assert.equal(conn.upstream("chat", Uint8Array.of(2)), 42n);
    assert.equal(conn.upstream("chat", Uint8Array.of(3), "orders"), 43n);
    assert.throws(() => conn.upstream("chat", new Uint8Array(PAYLOAD_LEN_MAX + 1)), RangeError);
    assert.throws(() => conn.upstream("chat", Uint8Array.of(4), ""), RangeError);
    assert.throws(() => conn.upstream("chat", Uint8Array.of(4), "é".repeat(33)), RangeError);
    assert.deepEqual(drain(conn), [
      { type: "upstream", app: "chat", requestId: 41n, payload: Uint8Array.of(1) },
      { type: "upstream", app: "chat", requestId: 42n, payload: Uint8Array.of(2) },
      { type: "upstream", app: "chat", requestId: 43n, route: "orders", payload: Uint8Array.of(3) },
    ]);
    conn.handleFrame(T0, { type: "upstreamAck", app: "chat", requestId: 41n, status: 3 });
    assert.deepEqual(events(conn).at(-1), {
      type: "upstreamAck",
      app: "chat",
      requestId: 41n,
      status: 3,
      statusName: "unavailable",
    });
  });

  test("unbind sends UNBIND and forgets the app on this connection", () => {
    const conn = new ClientConn(T0, config({ apps: [{ app: "chat", token: "a" }, { app: "news", token: "b" }] }));
    assert.equal(conn.unbind("chat"), false, "not open yet");
    open(conn);
    assert.equal(conn.unbind("chat"), true);
    assert.equal(conn.unbind("chat"), false);
    assert.deepEqual(drain(conn), [{ type: "unbind", app: "chat" }]);
    conn.handleFrame(T0, push(1n, "chat"));
    conn.handleFrame(T0, { type: "bindOk", app: "chat", user: "alice" });
    assert.deepEqual(events(conn), [], "what still comes for it is dropped");
    assert.deepEqual(conn.resumePoints().map((p) => p.app), ["news"]);
  });
});
