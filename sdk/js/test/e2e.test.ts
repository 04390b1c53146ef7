/**
 * End to end over real WebSockets: a fake gateway written with the `ws`
 * package's WebSocketServer speaks just enough Herald. The client finds its
 * WebSocket by itself (Node 20 has no global one: it loads `ws`).
 */

import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { after, describe, test } from "node:test";

import { type ClientEvent, type Frame, type FrameOf, HeraldClient, decodeMessage, encodeFrame } from "herald-client";
import { type WebSocket, WebSocketServer } from "ws";

import { pushFrame } from "./helpers.js";

/** One client connection, seen from the gateway. */
class Peer {
  private readonly frames: Frame[] = [];
  private waiter: (() => void) | undefined;
  closeCode: number | undefined;
  readonly closed: Promise<number>;

  constructor(
    readonly ws: WebSocket,
    readonly path: string,
  ) {
    ws.on("message", (data: Buffer, isBinary: boolean) => {
      assert.ok(isBinary, "Herald messages are binary");
      // Each message must be exactly one frame, its length prefix included.
      this.frames.push(decodeMessage(new Uint8Array(data.buffer, data.byteOffset, data.length)));
      this.waiter?.();
    });
    this.closed = new Promise((resolve) =>
      ws.on("close", (code: number) => {
        this.closeCode = code;
        resolve(code);
      }),
    );
  }

  async next(): Promise<Frame> {
    while (this.frames.length === 0) await new Promise<void>((resolve) => (this.waiter = resolve));
    return this.frames.shift()!;
  }

  /** The next frame other than PING, which must be of `type`. */
  async expect<T extends Frame["type"]>(type: T): Promise<FrameOf<T>> {
    for (;;) {
      const frame = await this.next();
      if (frame.type === "ping" && type !== "ping") continue;
      assert.equal(frame.type, type, `expected ${type}, got ${JSON.stringify(frame, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))}`);
      return frame as FrameOf<T>;
    }
  }

  send(frame: Frame): void {
    this.ws.send(encodeFrame(frame));
  }
}

/** A gateway on a free port of 127.0.0.1. */
async function fakeGateway(): Promise<{ url: string; nextPeer(): Promise<Peer>; close(): Promise<void> }> {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise<void>((resolve) => server.once("listening", () => resolve()));
  const peers: Peer[] = [];
  let waiter: (() => void) | undefined;
  server.on("connection", (ws, request) => {
    peers.push(new Peer(ws, request.url ?? ""));
    waiter?.();
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `ws://127.0.0.1:${port}/v1/connect`,
    async nextPeer() {
      while (peers.length === 0) await new Promise<void>((resolve) => (waiter = resolve));
      return peers.shift()!;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const ws of server.clients) ws.terminate();
        server.close(() => resolve());
      }),
  };
}

/** A port nothing listens on (taken, then freed). */
async function deadUrl(): Promise<string> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return `ws://127.0.0.1:${port}/v1/connect`;
}

const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  for (const cleanup of cleanups) await cleanup();
});

describe("end to end over ws", { timeout: 15_000 }, () => {
  test("HELLO_OK, BIND_OK, PUSH; the connection drops; the client resumes from the last acked seq", async () => {
    const gateway = await fakeGateway();
    cleanups.push(gateway.close);
    let secondConnection!: () => void;
    const reconnected = new Promise<void>((resolve) => (secondConnection = resolve));

    const client = new HeraldClient({
      gateways: gateway.url,
      deviceId: "e2e-device",
      clientVersion: "e2e",
      network: "wired",
      apps: [{ app: "chat", token: "tok", tags: ["platform=node"] }],
      reconnect: { initialMs: 10, maxMs: 50 },
      random: () => 0,
    });
    const events: ClientEvent[] = [];
    const delivered: Array<[bigint, string]> = [];
    let heldBack = false;
    client.on("push", async (push) => {
      delivered.push([push.seq, new TextDecoder().decode(push.payload)]);
      // Push 3 is still being handled when the connection drops: never acked there.
      if (push.seq === 3n && !heldBack) {
        heldBack = true;
        await reconnected;
      }
    });
    for (const type of ["connected", "bound", "disconnected", "closed"] as const) {
      client.on(type, (event: ClientEvent) => void events.push(event));
    }
    await client.start();

    // First connection.
    const first = await gateway.nextPeer();
    assert.equal(first.path, "/v1/connect");
    assert.deepEqual(await first.expect("hello"), {
      type: "hello",
      deviceId: "e2e-device",
      clientVersion: "e2e",
      network: 3,
      features: 7,
    });
    first.send({ type: "helloOk", heartbeatIntervalMs: 60_000, storageEpoch: 9n });
    assert.deepEqual(await first.expect("bind"), { type: "bind", app: "chat", token: "tok", tags: ["platform=node"] });
    first.send({ type: "bindOk", app: "chat", user: "alice" });
    first.send(pushFrame(1n));
    first.send(pushFrame(2n));
    first.send(pushFrame(2n)); // a duplicate on the same connection
    first.send(pushFrame(3n));
    assert.deepEqual(await first.expect("ack"), { type: "ack", app: "chat", seq: 1n });
    assert.deepEqual(await first.expect("ack"), { type: "ack", app: "chat", seq: 2n });
    // Drop the TCP connection without a close frame.
    first.ws.terminate();

    // Second connection: BIND resumes after 2, the last acked seq (3 was delivered, not acked).
    const second = await gateway.nextPeer();
    secondConnection();
    await second.expect("hello");
    second.send({ type: "helloOk", heartbeatIntervalMs: 60_000, storageEpoch: 9n });
    const bind = await second.expect("bind");
    assert.equal(bind.lastSeq, 2n);
    second.send({ type: "bindOk", app: "chat", user: "alice" });
    second.send(pushFrame(2n)); // already acked: dropped
    second.send(pushFrame(3n)); // delivered again: it was never acked
    second.send(pushFrame(4n));
    assert.deepEqual(await second.expect("ack"), { type: "ack", app: "chat", seq: 3n });
    assert.deepEqual(await second.expect("ack"), { type: "ack", app: "chat", seq: 4n });

    await client.close();
    assert.equal(await second.closed, 1000, "the client closes with 1000");
    assert.deepEqual(delivered, [
      [1n, "m1"],
      [2n, "m2"],
      [3n, "m3"],
      [3n, "m3"],
      [4n, "m4"],
    ]);
    assert.deepEqual(
      events.map((e) => e.type),
      ["connected", "bound", "disconnected", "connected", "bound", "closed"],
    );
    const disconnected = events.find((e) => e.type === "disconnected");
    assert.ok(disconnected?.type === "disconnected" && disconnected.closeCode === 1006, JSON.stringify(disconnected));
  });

  test("through the dispatcher: an unreachable gateway is skipped; upstream and GOAWAY kicked", async () => {
    const gateway = await fakeGateway();
    cleanups.push(gateway.close);
    const dead = await deadUrl();
    const queries: string[] = [];
    const dispatcher = createServer((request, response) => {
      queries.push(request.url ?? "");
      response.setHeader("content-type", "application/json");
      response.end(JSON.stringify({ gateways: [dead, gateway.url] }));
    });
    await new Promise<void>((resolve) => dispatcher.listen(0, "127.0.0.1", resolve));
    cleanups.push(() => new Promise<void>((resolve) => dispatcher.close(() => resolve())));
    const { port } = dispatcher.address() as AddressInfo;

    const client = new HeraldClient({
      dispatch: { url: `http://127.0.0.1:${port}`, app: "chat", user: "bob", transport: "ws" },
      deviceId: "e2e-device-2",
      network: "cellular",
      apps: [{ app: "chat", token: "tok" }],
      reconnect: { initialMs: 10, maxMs: 50 },
    });
    const events: ClientEvent[] = [];
    for (const type of ["connected", "upstreamAck", "disconnected", "closed"] as const) {
      client.on(type, (event: ClientEvent) => void events.push(event));
    }
    const bound = new Promise((resolve) => client.on("bound", resolve));
    const closedSeen = new Promise((resolve) => client.on("closed", resolve));
    await client.start();
    const peer = await gateway.nextPeer();
    assert.deepEqual(queries, ["/v1/dispatch?app=chat&user=bob&net=4g&transport=ws"]);
    await peer.expect("hello");
    peer.send({ type: "helloOk", heartbeatIntervalMs: 60_000 });
    await peer.expect("bind");
    peer.send({ type: "bindOk", app: "chat", user: "bob" });
    await bound;
    const requestId = client.upstream("chat", "to the business server");
    const upstream = await peer.expect("upstream");
    assert.equal(upstream.requestId, requestId);
    assert.equal(new TextDecoder().decode(upstream.payload), "to the business server");
    peer.send({ type: "upstreamAck", app: "chat", requestId, status: 0 });
    peer.send({ type: "goAway", reason: 1 });
    peer.ws.close(1000, "kicked");
    const closed = await client.closed;
    assert.equal(closed.reason, "kicked");
    await closedSeen;
    assert.deepEqual(
      events.map((e) => e.type),
      ["disconnected", "connected", "upstreamAck", "closed"],
      "the dead gateway is reported and skipped at once",
    );
    const [skipped] = events;
    assert.ok(skipped?.type === "disconnected" && skipped.reconnectInMs === 0 && skipped.gateway === dead);
  });
});
