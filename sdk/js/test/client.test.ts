/**
 * The WebSocket driver, with a scripted socket and a manual clock: no
 * network and no real time.
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  type ClientEvent,
  type ClientOptions,
  type Frame,
  HeraldClient,
  HeraldError,
  MemoryStore,
  tokenClaims,
} from "herald-client";

import {
  type FakeSocket,
  ManualClock,
  fakeWebSocket,
  messageIdOf,
  mintToken,
  notifyFrame,
  pullReplyFrame,
  pushFrame,
  record,
  settle,
} from "./helpers.js";

const GATEWAY = "ws://gw-a.test/v1/connect";
const GATEWAY_B = "ws://gw-b.test/v1/connect";

function setup(options: Partial<ClientOptions> = {}) {
  const clock = new ManualClock();
  const { WebSocket, sockets } = fakeWebSocket();
  const client = new HeraldClient({
    gateways: [GATEWAY],
    deviceId: "dev1",
    clientVersion: "test/1",
    network: "wifi",
    apps: [{ app: "chat", token: "tok" }],
    WebSocket,
    timers: clock,
    random: () => 0.5,
    ...options,
  });
  const events = record(client);
  const last = (): FakeSocket => {
    const socket = sockets.at(-1);
    assert.ok(socket !== undefined, "a socket was opened");
    return socket;
  };
  return { client, clock, sockets, events, last };
}

/** Opens the latest socket and answers HELLO and every BIND. */
async function handshake(
  socket: FakeSocket,
  { epoch, user = "alice", interval = 60_000 }: { epoch?: bigint; user?: string; interval?: number } = {},
): Promise<Frame[]> {
  socket.open();
  await settle();
  const [hello] = socket.take();
  assert.equal(hello?.type, "hello");
  socket.receive(
    epoch === undefined
      ? { type: "helloOk", heartbeatIntervalMs: interval }
      : { type: "helloOk", heartbeatIntervalMs: interval, storageEpoch: epoch },
  );
  const binds = socket.take();
  for (const bind of binds) {
    assert.equal(bind.type, "bind");
    if (bind.type === "bind") socket.receive({ type: "bindOk", app: bind.app, user });
  }
  await settle();
  return binds;
}

const types = (events: ClientEvent[]) => events.map((e) => e.type);
const only = <T extends ClientEvent["type"]>(events: ClientEvent[], type: T) =>
  events.filter((e): e is Extract<ClientEvent, { type: T }> => e.type === type);

describe("connecting", () => {
  test("HELLO with the options, BIND for each app, then connected and bound", async () => {
    const { client, last, events } = setup({
      apps: [
        { app: "chat", token: "a" },
        { app: "news", token: "b", tags: ["platform=web"] },
      ],
    });
    await client.start();
    assert.equal(client.state, "connecting");
    const socket = last();
    assert.equal(socket.url, GATEWAY);
    socket.open();
    assert.deepEqual(socket.take(), [{ type: "hello", deviceId: "dev1", clientVersion: "test/1", network: 1, features: 7 }]);
    socket.receive({ type: "helloOk", heartbeatIntervalMs: 30_000, storageEpoch: 3n });
    assert.deepEqual(socket.take(), [
      { type: "bind", app: "chat", token: "a", tags: [] },
      { type: "bind", app: "news", token: "b", tags: ["platform=web"] },
    ]);
    socket.receive({ type: "bindOk", app: "chat", user: "alice" });
    await settle();
    assert.equal(client.state, "connected");
    assert.deepEqual(events, [
      { type: "connected", gateway: GATEWAY, heartbeatIntervalMs: 30_000, storageEpoch: 3n },
      { type: "bound", app: "chat", user: "alice" },
    ]);
    await client.close();
  });

  test("invalid options are refused at once", () => {
    const base: ClientOptions = { gateways: GATEWAY, deviceId: "d", apps: [{ app: "chat", token: "t" }] };
    assert.throws(() => new HeraldClient({ ...base, gateways: "http://h/v1/connect" }), TypeError);
    assert.throws(() => new HeraldClient({ ...base, gateways: [] }), TypeError);
    assert.throws(() => new HeraldClient({ ...base, apps: [] }), TypeError);
    assert.throws(() => new HeraldClient({ ...base, apps: [{ app: "a", token: "" }, { app: "a", token: "" }] }), TypeError);
    assert.throws(() => new HeraldClient({ ...base, deviceId: "" }), /device_id/);
    assert.throws(() => new HeraldClient({ ...base, apps: [{ app: "x".repeat(65), token: "t" }] }), /app/);
    assert.throws(() => new HeraldClient({ ...base, network: "6g" as "wifi" }), TypeError);
  });

  test("an unreachable gateway: the next one at once, then a wait when all failed", async () => {
    const { client, sockets, clock, events } = setup({ gateways: [GATEWAY, GATEWAY_B] });
    await client.start();
    sockets[0]!.fail();
    await settle();
    assert.equal(sockets.length, 2, "the next gateway is tried at once");
    assert.equal(sockets[1]!.url, GATEWAY_B);
    sockets[1]!.fail();
    await settle();
    assert.deepEqual(
      only(events, "disconnected").map((e) => e.reconnectInMs),
      [0, 100],
      "failover without a wait, then full jitter in [0, 200]",
    );
    assert.equal(client.state, "waiting");
    await clock.advance(99);
    assert.equal(sockets.length, 2);
    await clock.advance(1);
    assert.equal(sockets.length, 3);
    assert.equal(sockets[2]!.url, GATEWAY, "the list starts over");
    await client.close();
  });

  test("a WebSocket that does not open within connectTimeoutMs is given up", async () => {
    const { client, sockets, clock, events } = setup({ connectTimeoutMs: 5_000 });
    await client.start();
    await clock.advance(4_999);
    assert.equal(sockets[0]!.closedWith, undefined);
    await clock.advance(1);
    assert.equal(sockets[0]!.closedWith, 1000);
    assert.deepEqual(only(events, "disconnected")[0]?.error, "connect: timed out");
    await client.close();
  });

  test("the dispatcher is asked, with net and transport, and its gateways are tried", async () => {
    const asked: string[] = [];
    const fetch = async (url: string) => {
      asked.push(url);
      return { ok: true, status: 200, json: async () => ({ gateways: ["127.0.0.1:7070", GATEWAY_B] }) };
    };
    const { client, sockets } = setup({
      gateways: [],
      dispatch: { url: "http://api.test:8080/", app: "chat", user: "alice", transport: "ws" },
      fetch,
    });
    await client.start();
    await settle();
    assert.deepEqual(asked, ["http://api.test:8080/v1/dispatch?app=chat&user=alice&net=wifi&transport=ws"]);
    assert.deepEqual(sockets.map((s) => s.url), [GATEWAY_B], "an entry that is not a ws URL is skipped");
    await client.close();
  });

  test("a dispatcher that fails is reported and the configured gateways are used", async () => {
    const fetch = async () => ({ ok: false, status: 503, json: async () => ({}) });
    const { client, sockets, events } = setup({
      dispatch: { url: "http://api.test", app: "chat", user: "alice" },
      fetch,
    });
    await client.start();
    await settle();
    assert.deepEqual(only(events, "dispatchFailed"), [{ type: "dispatchFailed", error: "dispatcher answered HTTP 503" }]);
    assert.deepEqual(sockets.map((s) => s.url), [GATEWAY]);
    await client.close();
  });
});

describe("closing early and late consumers", () => {
  test("close while the dispatcher is being asked stops at once", async () => {
    const fetch = () => new Promise<never>(() => {});
    const { client, sockets, events } = setup({
      gateways: [],
      dispatch: { url: "http://api.test", app: "chat", user: "alice" },
      fetch,
    });
    await client.start();
    await settle();
    await client.close();
    assert.equal(client.state, "closed");
    await settle();
    assert.deepEqual(types(events), ["closed"]);
    assert.equal(sockets.length, 0);
  });

  test("events wait for a first listener or iterator, and are not acked before", async () => {
    const clock = new ManualClock();
    const { WebSocket, sockets } = fakeWebSocket();
    const client = new HeraldClient({ gateways: GATEWAY, deviceId: "d", apps: [{ app: "chat", token: "t" }], WebSocket, timers: clock });
    await client.start();
    const socket = sockets[0]!;
    await handshake(socket);
    socket.receive(pushFrame(1n));
    await settle();
    assert.deepEqual(socket.take(), [], "nobody has seen push 1");
    const iterator = client.events();
    assert.deepEqual((await iterator.next()).value?.type, "connected");
    assert.deepEqual((await iterator.next()).value?.type, "bound");
    assert.deepEqual((await iterator.next()).value?.type, "push");
    await iterator.return();
    await settle();
    assert.deepEqual(socket.take(), [{ type: "ack", app: "chat", seq: 1n }], "leaving the loop counts as handled");
    await client.close();
  });
});

describe("delivery and acks", () => {
  test("auto ack: a push is acked once its listener (and the promise it returned) finished", async () => {
    const { client, last } = setup();
    let release!: () => void;
    const seen: bigint[] = [];
    client.on("push", async (push) => {
      seen.push(push.seq);
      if (push.seq === 2n) await new Promise<void>((resolve) => (release = resolve));
    });
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.receive(pushFrame(1n));
    socket.receive(pushFrame(2n));
    socket.receive(pushFrame(3n));
    await settle();
    assert.deepEqual(seen, [1n, 2n], "push 3 waits for push 2's listener");
    assert.deepEqual(socket.take(), [{ type: "ack", app: "chat", seq: 1n }]);
    release();
    await settle();
    assert.deepEqual(seen, [1n, 2n, 3n]);
    assert.deepEqual(socket.take(), [
      { type: "ack", app: "chat", seq: 2n },
      { type: "ack", app: "chat", seq: 3n },
    ]);
    await client.close();
  });

  test("auto ack with the iterator: acked when the loop asks for the next event", async () => {
    const { client, last } = setup();
    await client.start();
    const socket = last();
    const iterator = client.events();
    socket.open();
    socket.receive({ type: "helloOk", heartbeatIntervalMs: 60_000 });
    socket.receive({ type: "bindOk", app: "chat", user: "alice" });
    socket.receive(pushFrame(1n, "hello"));
    socket.take();
    assert.equal((await iterator.next()).value?.type, "connected");
    assert.equal((await iterator.next()).value?.type, "bound");
    const push = (await iterator.next()).value;
    assert.ok(push?.type === "push" && push.seq === 1n && new TextDecoder().decode(push.payload) === "hello");
    await settle();
    assert.deepEqual(socket.take(), [], "not acked while the loop body runs");
    const pending = iterator.next();
    await settle();
    assert.deepEqual(socket.take(), [{ type: "ack", app: "chat", seq: 1n }]);
    await client.close();
    assert.equal((await pending).value?.type, "closed");
    assert.equal((await iterator.next()).done, true, "the iterator ends after closed");
  });

  test("manual ack: nothing is acked until ack / ackBroadcast", async () => {
    const { client, last } = setup({ ackMode: "manual" });
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.receive(pushFrame(1n));
    socket.receive(pushFrame(2n));
    socket.receive({ type: "broadcast", app: "chat", messageId: new Uint8Array(16), seq: 7n, payload: new Uint8Array() });
    await settle();
    assert.deepEqual(socket.take(), []);
    assert.equal(client.ack("chat", 2n), true);
    assert.equal(client.ack("chat", 2n), false);
    assert.equal(client.ackBroadcast("chat", 7), true);
    assert.deepEqual(socket.take(), [
      { type: "ack", app: "chat", seq: 2n },
      { type: "broadcastAck", app: "chat", seq: 7n },
    ]);
    await client.close();
  });

  test("duplicates are dropped across a reconnect, which resumes from the last acked seqs", async () => {
    const { client, last, clock, sockets, events } = setup({ ackMode: "manual" });
    await client.start();
    let socket = last();
    await handshake(socket, { epoch: 1n });
    for (const seq of [1n, 2n, 3n]) socket.receive(pushFrame(seq));
    socket.receive({ type: "broadcast", app: "chat", messageId: new Uint8Array(16), seq: 4n, payload: new Uint8Array() });
    await settle();
    client.ack("chat", 2n); // 3 delivered, not acked
    client.ackBroadcast("chat", 4n);
    socket.serverClose(1006);
    await settle();
    const [disconnected] = only(events, "disconnected");
    assert.equal(disconnected?.reconnectInMs, 100, "the backoff was reset by the handshake: jitter in [0, 200]");
    await clock.advance(100);
    assert.equal(sockets.length, 2);
    socket = last();
    const binds = await handshake(socket, { epoch: 1n });
    assert.deepEqual(binds, [{ type: "bind", app: "chat", token: "tok", lastSeq: 2n, lastBroadcastSeq: 4n, tags: [] }]);
    socket.receive(pushFrame(3n));
    socket.receive(pushFrame(3n));
    socket.receive(pushFrame(4n));
    await settle();
    assert.deepEqual(
      only(events, "push").map((p) => p.seq),
      [1n, 2n, 3n, 3n, 4n],
      "3 again (never acked), once per connection",
    );
    await client.close();
  });

  test("a listener that throws is reported, and delivery goes on", async () => {
    const failures: unknown[] = [];
    const { client, last } = setup({ onListenerError: (error) => failures.push(error) });
    client.on("push", () => {
      throw new Error("handler bug");
    });
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.receive(pushFrame(1n));
    await settle();
    assert.equal(failures.length, 1);
    assert.deepEqual(socket.take(), [{ type: "ack", app: "chat", seq: 1n }]);
    await client.close();
  });
});

describe("notify, then pull", () => {
  const hex = (seq: bigint) => Buffer.from(messageIdOf(seq)).toString("hex");
  const text = (payload: Uint8Array) => new TextDecoder().decode(payload);
  const pull = (seq: bigint): Frame => ({ type: "pull", app: "chat", seq });
  const ack = (seq: bigint): Frame => ({ type: "ack", app: "chat", seq });

  test("a NOTIFY: the notify event at once, the PULL after the spread, then the body as a pulled push, acked", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(notifyFrame(1n, { pullSpreadMs: 1_000, hint: "news" }));
    await settle();
    assert.deepEqual(only(events, "notify"), [
      { type: "notify", app: "chat", messageId: hex(1n), seq: 1n, size: 2, pullSpreadMs: 1_000, hint: "news" },
    ]);
    assert.deepEqual(socket.take(), []);
    // random() is 0.5: the PULL goes out half-way through the spread.
    await clock.advance(499);
    assert.deepEqual(socket.take(), []);
    await clock.advance(1);
    assert.deepEqual(socket.take(), [pull(1n)]);
    assert.deepEqual(only(events, "push"), []);
    socket.receive(pullReplyFrame(1n));
    await settle();
    assert.deepEqual(only(events, "push"), [
      { type: "push", app: "chat", messageId: hex(1n), seq: 1n, payload: new TextEncoder().encode("m1"), pulled: true },
    ]);
    assert.deepEqual(socket.take(), [ack(1n)], "acked as a PUSH once handled");
    await client.close();
  });

  test("messages reach the app in seq order: what follows a NOTIFY waits for its body", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(notifyFrame(1n));
    socket.receive(pushFrame(2n));
    socket.receive(notifyFrame(3n));
    socket.receive(pushFrame(4n));
    await clock.advance(0);
    assert.deepEqual(socket.take(), [pull(1n), pull(3n)]);
    assert.deepEqual(only(events, "notify").map((n) => n.seq), [1n, 3n], "notify events do not wait");
    socket.receive(pullReplyFrame(3n));
    await settle();
    assert.deepEqual(only(events, "push"), [], "3's body came first: nothing can go before 1's");
    socket.receive(pullReplyFrame(1n));
    await settle();
    assert.deepEqual(
      only(events, "push").map((p) => [p.seq, p.pulled, text(p.payload)]),
      [
        [1n, true, "m1"],
        [2n, false, "m2"],
        [3n, true, "m3"],
        [4n, false, "m4"],
      ],
    );
    assert.deepEqual(socket.take(), [ack(1n), ack(2n), ack(3n), ack(4n)]);
    socket.receive(pushFrame(5n));
    await settle();
    assert.deepEqual(only(events, "push").at(-1)?.seq, 5n, "nothing held: a PUSH goes straight through");
    await client.close();
  });

  test("gone: notifyGone in the body's place, its seq acked, and what waited released", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(notifyFrame(1n));
    socket.receive(pushFrame(2n));
    await clock.advance(0);
    assert.deepEqual(socket.take(), [pull(1n)]);
    socket.receive(pullReplyFrame(1n, 1));
    await settle();
    assert.deepEqual(
      events.flatMap((e) => (e.type === "notifyGone" || e.type === "push" ? [[e.type, e.seq]] : [])),
      [
        ["notifyGone", 1n],
        ["push", 2n],
      ],
    );
    assert.deepEqual(only(events, "notifyGone"), [{ type: "notifyGone", app: "chat", seq: 1n, messageId: hex(1n) }]);
    assert.deepEqual(socket.take(), [ack(1n), ack(2n)]);
    await client.close();
  });

  test("gone in manual ack mode: the app acks the seq", async () => {
    const { client, last, clock, events } = setup({ ackMode: "manual" });
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(notifyFrame(1n));
    await clock.advance(0);
    socket.take();
    socket.receive(pullReplyFrame(1n, 1));
    await settle();
    assert.equal(only(events, "notifyGone").length, 1);
    assert.deepEqual(socket.take(), []);
    assert.equal(client.ack("chat", 1n), true);
    assert.deepEqual(socket.take(), [ack(1n)]);
    await client.close();
  });

  test("unavailable or busy: pulled again after a backoff from 1 s, doubling", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(notifyFrame(1n));
    await clock.advance(0);
    assert.deepEqual(socket.take(), [pull(1n)]);
    socket.receive(pullReplyFrame(1n, 2));
    // Full jitter with random() 0.5: half of 1 s, then half of 2 s.
    await clock.advance(499);
    assert.deepEqual(socket.take(), []);
    await clock.advance(1);
    assert.deepEqual(socket.take(), [pull(1n)]);
    socket.receive(pullReplyFrame(1n, 3));
    await clock.advance(999);
    assert.deepEqual(socket.take(), []);
    await clock.advance(1);
    assert.deepEqual(socket.take(), [pull(1n)]);
    socket.receive(pullReplyFrame(1n));
    await settle();
    assert.deepEqual(only(events, "push").map((p) => p.seq), [1n]);
    assert.deepEqual(socket.take(), [ack(1n)]);
    await client.close();
  });

  test("at most 4 PULLs out at once; the next goes when one is answered", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    for (let seq = 1n; seq <= 6n; seq++) socket.receive(notifyFrame(seq));
    await clock.advance(0);
    assert.deepEqual(socket.take(), [pull(1n), pull(2n), pull(3n), pull(4n)]);
    socket.receive(pullReplyFrame(2n));
    await settle();
    assert.deepEqual(socket.take(), [pull(5n)]);
    for (const seq of [1n, 3n, 4n, 5n]) socket.receive(pullReplyFrame(seq));
    await settle();
    assert.deepEqual(socket.take(), [pull(6n), ack(1n), ack(2n), ack(3n), ack(4n), ack(5n)]);
    socket.receive(pullReplyFrame(6n));
    await settle();
    assert.deepEqual(only(events, "push").map((p) => p.seq), [1n, 2n, 3n, 4n, 5n, 6n]);
    await client.close();
  });

  test("not_bound: what is held for the app is dropped, unacked", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(notifyFrame(1n));
    socket.receive(pushFrame(2n));
    await clock.advance(0);
    socket.take();
    socket.receive(pullReplyFrame(1n, 4));
    await clock.advance(60_000);
    assert.deepEqual(only(events, "push"), []);
    assert.deepEqual(socket.take().filter((f) => f.type !== "ping"), []);
    await client.close();
  });

  test("a disconnect forgets pending pulls and held messages; the server sends them again", async () => {
    const { client, last, clock, sockets, events } = setup();
    await client.start();
    let socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(pushFrame(1n));
    socket.receive(notifyFrame(2n, { pullSpreadMs: 10_000 }));
    socket.receive(pushFrame(3n));
    await settle();
    assert.deepEqual(socket.take(), [ack(1n)]);
    socket.serverClose(1006);
    await clock.advance(100);
    assert.equal(sockets.length, 2);
    socket = last();
    const [bind] = await handshake(socket);
    assert.ok(bind?.type === "bind" && bind.lastSeq === 1n, "resumes after the acked seq");
    await clock.advance(10_000);
    assert.deepEqual(socket.take().filter((f) => f.type !== "ping"), [], "the old connection's PULL is not sent");
    socket.receive(notifyFrame(2n));
    socket.receive(pushFrame(3n));
    await clock.advance(0);
    assert.deepEqual(socket.take(), [pull(2n)]);
    socket.receive(pullReplyFrame(2n));
    await settle();
    assert.deepEqual(only(events, "push").map((p) => p.seq), [1n, 2n, 3n]);
    assert.deepEqual(only(events, "notify").map((n) => n.seq), [2n, 2n], "once per connection");
    assert.deepEqual(socket.take(), [ack(2n), ack(3n)]);
    await client.close();
  });

  test("without autoPull: only the notify event, nothing held, and pull() answers", async () => {
    const { client, last, clock, events } = setup({ autoPull: false, ackMode: "manual" });
    await client.start();
    await assert.rejects(client.pull("chat", 1n), (e: unknown) => e instanceof HeraldError && e.kind === "not_bound");
    let socket = last();
    await handshake(socket);
    socket.take();
    socket.receive(notifyFrame(1n, { pullSpreadMs: 0 }));
    socket.receive(pushFrame(2n));
    await clock.advance(1_000);
    assert.deepEqual(types(events).slice(-2), ["notify", "push"]);
    assert.deepEqual(only(events, "push")[0]?.pulled, false);
    assert.deepEqual(socket.take().filter((f) => f.type !== "ping"), [], "no PULL by itself");
    const answer = client.pull("chat", 1n);
    assert.deepEqual(socket.take(), [pull(1n)]);
    socket.receive(pullReplyFrame(1n));
    assert.deepEqual(await answer, { status: 0, statusName: "ok", messageId: hex(1n), payload: new TextEncoder().encode("m1") });
    await assert.rejects(client.pull("news", 1n), (e: unknown) => e instanceof HeraldError && e.kind === "not_bound");
    await assert.rejects(client.pull("chat", -1n), RangeError);
    const lostAnswer = client.pull("chat", 1n);
    socket.serverClose(1006);
    await assert.rejects(lostAnswer, (e: unknown) => e instanceof HeraldError && e.kind === "disconnected");
    await clock.advance(100);
    socket = last();
    await handshake(socket);
    const closing = client.pull("chat", 1n);
    await client.close();
    await assert.rejects(closing, (e: unknown) => e instanceof HeraldError && e.kind === "closed");
    await assert.rejects(client.pull("chat", 1n), (e: unknown) => e instanceof HeraldError && e.kind === "closed");
  });
});

describe("the storage epoch and RESET", () => {
  test("a later HELLO_OK naming another epoch drops the resume points", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    let socket = last();
    await handshake(socket, { epoch: 1n });
    socket.receive(pushFrame(5n));
    await settle();
    assert.deepEqual(socket.take(), [{ type: "ack", app: "chat", seq: 5n }]);
    socket.serverClose(1006);
    await clock.advance(1_000);
    socket = last();
    const binds = await handshake(socket, { epoch: 2n });
    assert.deepEqual(binds, [{ type: "bind", app: "chat", token: "tok", tags: [] }], "the BIND claims nothing");
    assert.deepEqual(only(events, "reset"), [{ type: "reset", app: "chat", sequence: "inbox", after: 0n }]);
    socket.receive(pushFrame(1n));
    await settle();
    assert.deepEqual(only(events, "push").map((p) => p.seq), [5n, 1n]);
    assert.equal(client.resumeState().storageEpoch, "2");
    await client.close();
  });

  test("a RESET is followed and becomes the next resume point", async () => {
    const store = new MemoryStore({ storageEpoch: "9", apps: { chat: { lastBroadcastSeq: "50" } } });
    const { client, last, clock, events } = setup({ store });
    await client.start();
    let socket = last();
    const [bind] = await handshake(socket, { epoch: 9n });
    assert.ok(bind?.type === "bind" && bind.lastBroadcastSeq === 50n);
    socket.receive({ type: "reset", app: "chat", sequence: 1, after: 0n });
    socket.receive({ type: "broadcast", app: "chat", messageId: new Uint8Array(16), seq: 1n, payload: new Uint8Array() });
    await settle();
    assert.deepEqual(only(events, "reset"), [{ type: "reset", app: "chat", sequence: "broadcasts", after: 0n }]);
    assert.deepEqual(only(events, "broadcast").map((b) => b.seq), [1n]);
    assert.deepEqual(socket.take(), [{ type: "broadcastAck", app: "chat", seq: 1n }]);
    socket.serverClose(1006);
    await clock.advance(1_000);
    socket = last();
    const [again] = await handshake(socket, { epoch: 9n });
    assert.ok(again?.type === "bind" && again.lastBroadcastSeq === 1n);
    await client.close();
  });
});

describe("GOAWAY, close codes and heartbeats", () => {
  test("GOAWAY kicked stops for good", async () => {
    const { client, last, clock, sockets, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.receive({ type: "goAway", reason: 1 });
    const closed = await client.closed;
    assert.equal(closed.reason, "kicked");
    await clock.advance(120_000);
    assert.equal(sockets.length, 1, "no reconnect");
    assert.equal(client.state, "closed");
    assert.equal(events.at(-1)?.type, "closed");
    assert.equal(socket.closedWith, 1000);
  });

  test("GOAWAY app_deleted stops for good", async () => {
    const { client, last, clock, sockets } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.receive({ type: "goAway", reason: 9 });
    const closed = await client.closed;
    assert.equal(closed.reason, "appDeleted");
    await clock.advance(120_000);
    assert.equal(sockets.length, 1, "no reconnect");
  });

  test("GOAWAY server_shutdown with a delay: the delay plus up to half of it", async () => {
    const { client, last, clock, sockets, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.receive({ type: "goAway", reason: 2, reconnectDelayMs: 1_000 });
    socket.serverClose(1001, "server_shutdown");
    await settle();
    const [disconnected] = only(events, "disconnected");
    assert.equal(disconnected?.reconnectInMs, 1_250);
    assert.deepEqual(disconnected?.goAway, { reason: 2, reasonName: "server_shutdown", reconnectDelayMs: 1_000 });
    await clock.advance(1_249);
    assert.equal(sockets.length, 1);
    await clock.advance(1);
    assert.equal(sockets.length, 2);
    await client.close();
  });

  test("a close with code 1001 and no GOAWAY is taken as server_shutdown", async () => {
    const { client, last, clock, sockets, events } = setup();
    await client.start();
    await handshake(last());
    last().serverClose(1001);
    await settle();
    const [disconnected] = only(events, "disconnected");
    assert.equal(disconnected?.goAway?.reasonName, "server_shutdown");
    assert.equal(disconnected?.closeCode, 1001);
    assert.equal(disconnected?.reconnectInMs, 100);
    await clock.advance(100);
    assert.equal(sockets.length, 2);
    await client.close();
  });

  test("every app's BIND failed: stop for good", async () => {
    const { client, last, clock, sockets, events } = setup({
      apps: [
        { app: "chat", token: "a" },
        { app: "news", token: "b" },
      ],
    });
    await client.start();
    const socket = last();
    socket.open();
    socket.receive({ type: "helloOk", heartbeatIntervalMs: 60_000 });
    socket.receive({ type: "bindErr", app: "chat", code: 1, message: "bad" });
    await settle();
    assert.equal(client.state, "connected", "one app may still bind");
    socket.receive({ type: "bindErr", app: "news", code: 2, message: "expired" });
    const closed = await client.closed;
    assert.equal(closed.reason, "authFailed");
    assert.equal(closed.app, "news");
    assert.equal(closed.codeName, "token_expired");
    assert.deepEqual(types(events).filter((t) => t === "bindFailed").length, 2);
    await clock.advance(120_000);
    assert.equal(sockets.length, 1);
  });

  test("GOAWAY auth_failed stops for good", async () => {
    const { client, last } = setup();
    await client.start();
    const socket = last();
    socket.open();
    socket.receive({ type: "helloOk", heartbeatIntervalMs: 60_000 });
    socket.receive({ type: "goAway", reason: 4 });
    assert.equal((await client.closed).reason, "authFailed");
  });

  test("PING on the interval; a silent server is dropped after twice it", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket, { interval: 1_000 });
    socket.take();
    await clock.advance(1_000);
    assert.deepEqual(socket.take(), [{ type: "ping" }]);
    socket.receive({ type: "pong" }); // at t=1000: the deadline moves to 3000
    await clock.advance(1_999);
    assert.deepEqual(socket.take(), [{ type: "ping" }]);
    assert.equal(socket.closedWith, undefined);
    await clock.advance(1);
    assert.equal(socket.closedWith, 1000);
    assert.equal(only(events, "disconnected")[0]?.error, "server went silent");
    await client.close();
  });

  test("a frame that does not decode: ERROR, close, reconnect", async () => {
    const { client, last, events } = setup();
    await client.start();
    const socket = last();
    await handshake(socket);
    socket.take();
    socket.receiveRaw(new Uint8Array([0, 0, 0, 2, 1, 0xee]).buffer);
    await settle();
    const [error] = socket.take();
    assert.ok(error?.type === "error" && error.code === 1);
    assert.equal(socket.closedWith, 1000);
    assert.match(only(events, "disconnected")[0]!.error, /unknown op/);
    await client.close();
  });
});

describe("upstream, unbind, close and the store", () => {
  test("upstream returns the request id; ids go on across connections", async () => {
    const { client, last, clock, events } = setup();
    await client.start();
    assert.throws(() => client.upstream("chat", "x"), (e: unknown) => e instanceof HeraldError && e.kind === "not_bound");
    let socket = last();
    await handshake(socket);
    socket.take();
    assert.equal(client.upstream("chat", "hello"), 1n);
    assert.throws(() => client.upstream("other", "x"), HeraldError);
    assert.equal(client.upstream("chat", "order", { route: "orders" }), 2n);
    assert.throws(() => client.upstream("chat", "x", { route: "" }), RangeError);
    assert.deepEqual(socket.take(), [
      { type: "upstream", app: "chat", requestId: 1n, payload: new TextEncoder().encode("hello") },
      { type: "upstream", app: "chat", requestId: 2n, route: "orders", payload: new TextEncoder().encode("order") },
    ]);
    socket.receive({ type: "upstreamAck", app: "chat", requestId: 1n, status: 0 });
    socket.receive({ type: "upstreamAck", app: "chat", requestId: 2n, status: 5 });
    await settle();
    assert.deepEqual(only(events, "upstreamAck"), [
      { type: "upstreamAck", app: "chat", requestId: 1n, status: 0, statusName: "accepted" },
      { type: "upstreamAck", app: "chat", requestId: 2n, status: 5, statusName: "unknown_route" },
    ]);
    socket.serverClose(1006);
    await clock.advance(1_000);
    socket = last();
    await handshake(socket);
    assert.equal(client.upstream("chat", new Uint8Array([1])), 3n);
    await client.close();
    assert.throws(() => client.upstream("chat", "x"), (e: unknown) => e instanceof HeraldError && e.kind === "closed");
  });

  test("unbind sends UNBIND and later connections do not bind the app", async () => {
    const { client, last, clock } = setup({
      apps: [
        { app: "chat", token: "a" },
        { app: "news", token: "b" },
      ],
    });
    await client.start();
    let socket = last();
    await handshake(socket);
    socket.take();
    assert.equal(client.unbind("news"), true);
    assert.equal(client.unbind("news"), false);
    assert.deepEqual(socket.take(), [{ type: "unbind", app: "news" }]);
    socket.serverClose(1006);
    await clock.advance(1_000);
    socket = last();
    const binds = await handshake(socket);
    assert.deepEqual(binds.map((b) => b.type === "bind" && b.app), ["chat"]);
    await client.close();
  });

  test("close while waiting to reconnect: closed, and nothing more", async () => {
    const { client, last, clock, sockets, events } = setup();
    await client.start();
    last().fail();
    await settle();
    assert.equal(client.state, "waiting");
    await client.close();
    assert.equal(client.state, "closed");
    assert.deepEqual(events.at(-1), { type: "closed", reason: "closedByClient", message: "closed by the client" });
    await clock.advance(60_000);
    assert.equal(sockets.length, 1);
  });

  test("resume points are saved, and loaded for the same user only", async () => {
    const token = mintToken("secret", "chat", "alice");
    assert.equal(tokenClaims(token)?.user, "alice");
    const store = new MemoryStore();
    {
      const { client, last } = setup({ store, apps: [{ app: "chat", token }] });
      await client.start();
      const socket = last();
      await handshake(socket, { epoch: 4n, user: "alice" });
      socket.receive(pushFrame(6n));
      socket.receive({ type: "broadcast", app: "chat", messageId: new Uint8Array(16), seq: 2n, payload: new Uint8Array() });
      await settle();
      await client.close();
      await settle();
      assert.deepEqual(store.state, {
        storageEpoch: "4",
        apps: { chat: { user: "alice", lastSeq: "6", lastBroadcastSeq: "2" } },
      });
    }
    {
      // The same user: both seqs resume.
      const { client, last } = setup({ store, apps: [{ app: "chat", token }] });
      await client.start();
      const binds = await handshake(last(), { epoch: 4n, user: "alice" });
      assert.deepEqual(binds, [{ type: "bind", app: "chat", token, lastSeq: 6n, lastBroadcastSeq: 2n, tags: [] }]);
      await client.close();
    }
    {
      // Another user on this device: the inbox seq is alice's, not bob's; the broadcast seq is the app's.
      const bobToken = mintToken("secret", "chat", "bob");
      const { client, last } = setup({ store, apps: [{ app: "chat", token: bobToken }] });
      await client.start();
      const binds = await handshake(last(), { epoch: 4n, user: "bob" });
      assert.deepEqual(binds, [{ type: "bind", app: "chat", token: bobToken, lastBroadcastSeq: 2n, tags: [] }]);
      await client.close();
    }
  });

  test("the documented example token's claims are read", () => {
    const token = mintToken("secret", "chat", "alice", 1000n);
    assert.equal(token, "AQRjaGF0BWFsaWNlAAAAAAAAA-g.ZMiKgNGtJ5Q0st0hv7vVTKVSBJIj69ZGs3-GWAlKkfk");
    assert.deepEqual(tokenClaims(token), { app: "chat", user: "alice", expiresAt: 1000n });
    for (const bad of ["", "abc", "a.b.c", "!!.x", "AA.x", "AQRjaGF0.x"]) assert.equal(tokenClaims(bad), undefined, bad);
  });
});
