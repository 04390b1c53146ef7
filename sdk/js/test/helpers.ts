/** Test doubles: a manual clock, a scripted WebSocket, and a token maker. */

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";

import {
  type ClientEvent,
  type Frame,
  type HeraldClient,
  type Timers,
  type WebSocketConstructor,
  type WebSocketLike,
  decodeMessage,
  encodeFrame,
} from "herald-client";

/** Lets pending promise chains run (real macrotask turns, not the manual clock). */
export async function settle(rounds = 5): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Timers that only move when the test says so. */
export class ManualClock implements Timers {
  private t = 0;
  private nextId = 1;
  private readonly pending = new Map<number, { at: number; fn: () => void }>();

  now(): number {
    return this.t;
  }

  setTimeout(fn: () => void, ms: number): unknown {
    const id = this.nextId++;
    this.pending.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }

  clearTimeout(handle: unknown): void {
    this.pending.delete(handle as number);
  }

  /** Moves time forward by `ms`, running each timer that falls due, in order, and what it sets off. */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    await settle();
    for (;;) {
      let due: [number, { at: number; fn: () => void }] | undefined;
      for (const entry of this.pending) {
        if (entry[1].at <= end && (due === undefined || entry[1].at < due[1].at)) due = entry;
      }
      if (due === undefined) break;
      this.pending.delete(due[0]);
      this.t = due[1].at;
      due[1].fn();
      await settle();
    }
    this.t = end;
    await settle();
  }

  /** The delay of the earliest pending timer, if any. */
  get nextIn(): number | undefined {
    let at: number | undefined;
    for (const { at: a } of this.pending.values()) if (at === undefined || a < at) at = a;
    return at === undefined ? undefined : at - this.t;
  }
}

/** A WebSocket the test drives: it opens, delivers and closes when told to. */
export class FakeSocket implements WebSocketLike {
  binaryType = "blob";
  readyState = 0;
  /** What the client sent, decoded (each message must be exactly one frame). */
  readonly sent: Frame[] = [];
  /** The code the client closed with, once it did. */
  closedWith: number | undefined;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;

  constructor(readonly url: string) {}

  send(data: Uint8Array): void {
    assert.equal(this.readyState, 1, "sent only while open");
    this.sent.push(decodeMessage(data));
  }

  close(code?: number): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.closedWith = code ?? 1005;
  }

  // The server's side.

  open(): void {
    assert.equal(this.binaryType, "arraybuffer", "binaryType is set before the socket opens");
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(frame: Frame): void {
    const bytes = encodeFrame(frame);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }

  receiveRaw(data: unknown): void {
    this.onmessage?.({ data });
  }

  serverClose(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** The connection could not be made (refused, DNS, TLS). */
  fail(): void {
    this.readyState = 3;
    this.onerror?.({});
    this.onclose?.({ code: 1006, reason: "" });
  }

  /** Takes what was sent so far. */
  take(): Frame[] {
    return this.sent.splice(0);
  }
}

/** A WebSocket constructor making FakeSockets, and the list of them. */
export function fakeWebSocket(): { WebSocket: WebSocketConstructor; sockets: FakeSocket[] } {
  const sockets: FakeSocket[] = [];
  class Socket extends FakeSocket {
    constructor(url: string) {
      super(url);
      sockets.push(this);
    }
  }
  return { WebSocket: Socket, sockets };
}

/** Records every event of a client. */
export function record(client: HeraldClient): ClientEvent[] {
  const seen: ClientEvent[] = [];
  for (const type of [
    "connected",
    "bound",
    "bindFailed",
    "push",
    "notify",
    "notifyGone",
    "broadcast",
    "upstreamAck",
    "reset",
    "dispatchFailed",
    "disconnected",
    "closed",
  ] as const) {
    client.on(type, (event: ClientEvent) => {
      seen.push(event);
    });
  }
  return seen;
}

/** A Herald token (docs/protocol.md, Tokens). */
export function mintToken(secret: string, app: string, user: string, expiresAt = 4_000_000_000n): string {
  const appBytes = Buffer.from(app, "utf8");
  const userBytes = Buffer.from(user, "utf8");
  const expiry = Buffer.alloc(8);
  expiry.writeBigUInt64BE(expiresAt);
  const claims = Buffer.concat([
    Buffer.of(1, appBytes.length),
    appBytes,
    Buffer.of(userBytes.length),
    userBytes,
    expiry,
  ]);
  const tag = createHmac("sha256", secret).update(claims).digest();
  return `${claims.toString("base64url")}.${tag.toString("base64url")}`;
}

/** The message id the frames below give message `seq`: the seq in its last 8 bytes. */
export function messageIdOf(seq: bigint): Uint8Array {
  const messageId = new Uint8Array(16);
  new DataView(messageId.buffer).setBigUint64(8, seq);
  return messageId;
}

/** A PUSH frame of `app` with the seq in its message id. */
export function pushFrame(seq: bigint, payload = `m${seq}`, app = "chat"): Frame {
  return { type: "push", app, messageId: messageIdOf(seq), seq, payload: new TextEncoder().encode(payload) };
}

/** A NOTIFY frame of `app` for message `seq`, its body `m{seq}` to be pulled. */
export function notifyFrame(seq: bigint, { pullSpreadMs = 0, hint = `h${seq}`, app = "chat" } = {}): Frame {
  return { type: "notify", app, messageId: messageIdOf(seq), seq, size: `m${seq}`.length, pullSpreadMs, hint };
}

/** A PULL_REPLY frame for message `seq` of `app`: with status ok (0), its body `m{seq}`. */
export function pullReplyFrame(seq: bigint, status = 0, app = "chat"): Frame {
  const ok = status === 0;
  return {
    type: "pullReply",
    app,
    seq,
    status,
    messageId: ok ? messageIdOf(seq) : new Uint8Array(16),
    payload: new TextEncoder().encode(ok ? `m${seq}` : ""),
  };
}
