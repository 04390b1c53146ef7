/**
 * The client side of one connection, as a state machine with no I/O: a
 * port of `proto/src/client.rs` (`ClientConn`).
 *
 * A driver (the WebSocket client in client.ts, or a test) feeds it
 * messages, frames and the time, and drains `pollTransmit` and `pollEvent`.
 * It sends HELLO, binds every configured app once the server answers,
 * pings at the interval the server chose, times out a silent server, drops
 * pushes, notifies and broadcasts it already delivered, sends cumulative
 * ACKs and PULLs, follows RESET and drops resume points from another
 * storage epoch. When to pull a notified message is the driver's choice.
 *
 * Time is a number of milliseconds on any monotonic clock the driver
 * chooses (`performance.now()`, or a test's counter).
 */

import {
  type Frame,
  type NetworkType,
  DecodeError,
  ErrorCode,
  Features,
  PAYLOAD_LEN_MAX,
  ROUTE_LEN_MAX,
  ResetSequence as Sequence,
  bindErrorName,
  decodeMessage,
  errorCodeName,
  goAwayReasonName,
  opName,
  frameOp,
  pullStatusName,
  resetSequenceName,
  unbindReasonName,
  toHex,
  upstreamStatusName,
} from "./codec.js";

/** How long the server may take to answer HELLO. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

/** The smallest heartbeat interval taken from HELLO_OK: zero would make the client ping in a busy loop. */
export const HEARTBEAT_INTERVAL_MIN_MS = 100;

/** One app to bind, with the resume points the client holds for it (sent in BIND). */
export interface AppCredentials {
  app: string;
  token: string;
  /** The last inbox seq the client holds, if it knows it. */
  lastSeq?: bigint | undefined;
  /** The last broadcast seq of the app the client holds, if it knows it. */
  lastBroadcastSeq?: bigint | undefined;
  /** What broadcasts may target this client by (`platform=ios`, ...). */
  tags?: string[] | undefined;
}

export interface ConnConfig {
  deviceId: string;
  clientVersion: string;
  network: NetworkType;
  apps: AppCredentials[];
  /** The storage epoch the apps' resume points came from (an earlier HELLO_OK's), if known. */
  storageEpoch?: bigint | undefined;
  /** The request id of the first UPSTREAM (default 1). */
  firstRequestId?: bigint | undefined;
}

/** A push or a broadcast handed to the application. */
export interface Message {
  app: string;
  /** The message's id as 32 lowercase hex digits. */
  messageId: string;
  /** The inbox seq (push) or the app's broadcast seq (broadcast). */
  seq: bigint;
  payload: Uint8Array;
}

export interface BoundEvent {
  type: "bound";
  app: string;
  user: string;
}
export interface BindFailedEvent {
  type: "bindFailed";
  app: string;
  code: number;
  /** The code's name (`invalid_token`, `token_expired`, ...; `unknown` for a code v1 does not define). */
  codeName: string;
  message: string;
}
export interface PushEvent extends Message {
  type: "push";
  /**
   * Whether the body came in a PULL_REPLY after a NOTIFY (the client
   * pulled it) rather than in a PUSH. This state machine reports only
   * PUSH frames as pushes (false); the driver builds the pulled ones.
   */
  pulled: boolean;
}
/**
 * Message `seq` of `app` was pushed to be pulled: its size and hint came,
 * not its body. Pull it after a random delay of 0 to `pullSpreadMs`, and
 * ack the seq once the body is held (or the pull said it is gone).
 */
export interface NotifyEvent {
  type: "notify";
  app: string;
  /** The message's id as 32 lowercase hex digits. */
  messageId: string;
  seq: bigint;
  /** The body's length in bytes. */
  size: number;
  pullSpreadMs: number;
  /** Text from the push, for the app to show before the body is there. */
  hint: string;
}
/** The answer to a PULL. */
export interface PulledEvent {
  type: "pulled";
  app: string;
  seq: bigint;
  status: number;
  /** `ok`, `gone`, `unavailable`, `busy`, `not_bound` or `unknown`. */
  statusName: string;
  /** All zeros unless `status` is ok. */
  messageId: string;
  /** Empty unless `status` is ok. */
  payload: Uint8Array;
}
export interface BroadcastEvent extends Message {
  type: "broadcast";
}
/**
 * A message the app pushed with `"store": false` (typing indicators, live
 * presence): it reached this client because it was bound then. It has no
 * seq, is not acked, and is never delivered again.
 */
export interface TransientEvent {
  type: "transient";
  app: string;
  payload: Uint8Array;
}
export interface UpstreamAckEvent {
  type: "upstreamAck";
  app: string;
  requestId: bigint;
  status: number;
  /** `accepted`, `no_endpoint`, `rejected`, `unavailable`, `not_bound` or `unknown`. */
  statusName: string;
}
/**
 * The server resumed `app`'s inbox or broadcasts after `after`, below what
 * this client said it held (the server's data was reset or restored), or
 * (`after` 0) the storage epoch changed and the resume points were dropped.
 * Seqs after `after` are delivered again as new: an application that keeps
 * its own record of seen seqs must forget those above `after`.
 */
/** The server unbound `app` (it was deleted); it is not bound again. */
export interface UnboundEvent {
  type: "unbound";
  app: string;
  reason: number;
  reasonName: string;
}

export interface ResetEvent {
  type: "reset";
  app: string;
  sequence: "inbox" | "broadcasts";
  after: bigint;
}

/** What the state machine reports. */
export type ConnEvent =
  | { type: "ready"; heartbeatIntervalMs: number; storageEpoch: bigint | undefined }
  | BoundEvent
  | BindFailedEvent
  | PushEvent
  | NotifyEvent
  | PulledEvent
  | BroadcastEvent
  | TransientEvent
  | UpstreamAckEvent
  | ResetEvent
  | UnboundEvent
  /** The server is closing the connection. */
  | { type: "goAway"; reason: number; reasonName: string; reconnectDelayMs: number | undefined }
  /** The server sent ERROR: it found a protocol error and is closing. */
  | { type: "serverError"; code: number; codeName: string; message: string }
  /** This side found a protocol error in what the server sent; ERROR is queued, then close. */
  | { type: "protocolError"; code: number; codeName: string; message: string }
  /** The server sent nothing within twice the heartbeat interval (or did not answer HELLO in time). */
  | { type: "timedOut" }
  /** The server answered a PING: one heartbeat interval held. */
  | { type: "pingAnswered" }
  /** The server answered a HEARTBEAT proposal with the interval now in force. */
  | { type: "heartbeatSet"; intervalMs: number }
  /**
   * The server closed this device's previous connection at its heartbeat
   * deadline: its pings, at `intervalMs` on `network`, stopped arriving.
   * Reported once per connection (the server says it for each app bound again).
   */
  | { type: "previousTimedOut"; network: number; intervalMs: number; closedAgoMs: number };

/** Why `upstream` or `pull` refused. */
export class ConnError extends Error {
  readonly kind: "not_bound" | "closed";
  constructor(kind: "not_bound" | "closed", message: string) {
    super(message);
    this.name = "ConnError";
    this.kind = kind;
  }
}

type Phase = "awaitHelloOk" | "open" | "closed";

interface AppState {
  credentials: AppCredentials;
  user: string | undefined;
  /** Highest seq handed to the application. */
  delivered: bigint | undefined;
  /** Highest seq acked to the server. */
  acked: bigint | undefined;
  /** The same two for the app's broadcasts. */
  broadcastDelivered: bigint | undefined;
  broadcastAcked: bigint | undefined;
  /** Whether the server refused this app's BIND on this connection. */
  bindFailed: boolean;
}

/** Per app: the last acked seq and broadcast seq, to resume from. */
export interface ResumePoint {
  app: string;
  lastSeq: bigint | undefined;
  lastBroadcastSeq: bigint | undefined;
}

export class ClientConn {
  private phase: Phase = "awaitHelloOk";
  private heartbeatIntervalMs: number | undefined;
  private nextPing: number | undefined;
  private pingOut = false;
  /** `previousTimedOut` was reported on this connection. */
  private previousTimedOut = false;
  private silenceDeadline: number;
  private readonly apps: AppState[];
  private epoch: bigint | undefined;
  private nextRequestId: bigint;
  private readonly transmit: Frame[] = [];
  private readonly events: ConnEvent[] = [];

  /** Starts a connection: HELLO is queued at once. */
  constructor(now: number, config: ConnConfig) {
    this.transmit.push({
      type: "hello",
      deviceId: config.deviceId,
      clientVersion: config.clientVersion,
      network: config.network,
      features: Features.Transient | Features.Notify | Features.SessionTimedOut,
    });
    this.silenceDeadline = now + HANDSHAKE_TIMEOUT_MS;
    this.apps = config.apps.map((credentials) => ({
      credentials: { ...credentials, tags: [...(credentials.tags ?? [])] },
      user: undefined,
      delivered: credentials.lastSeq,
      acked: credentials.lastSeq,
      broadcastDelivered: credentials.lastBroadcastSeq,
      broadcastAcked: credentials.lastBroadcastSeq,
      bindFailed: false,
    }));
    this.epoch = config.storageEpoch;
    this.nextRequestId = config.firstRequestId ?? 1n;
  }

  get isClosed(): boolean {
    return this.phase === "closed";
  }

  /** Whether HELLO_OK arrived (and the connection is not closed). */
  get isOpen(): boolean {
    return this.phase === "open";
  }

  pollTransmit(): Frame | undefined {
    return this.transmit.shift();
  }

  pollEvent(): ConnEvent | undefined {
    return this.events.shift();
  }

  /** The next instant `handleTimeout` has work to do; undefined once closed. */
  pollTimeout(): number | undefined {
    if (this.phase === "closed") return undefined;
    return this.nextPing === undefined ? this.silenceDeadline : Math.min(this.nextPing, this.silenceDeadline);
  }

  handleTimeout(now: number): void {
    if (this.phase === "closed") return;
    if (now >= this.silenceDeadline) {
      this.phase = "closed";
      this.events.push({ type: "timedOut" });
      return;
    }
    if (this.nextPing !== undefined && this.heartbeatIntervalMs !== undefined && now >= this.nextPing) {
      this.transmit.push({ type: "ping" });
      this.pingOut = true;
      this.nextPing = now + this.heartbeatIntervalMs;
    }
  }

  /**
   * One WebSocket message from the server: exactly one frame, or a
   * protocol error (ERROR with the decode error's code is queued, and the
   * connection closes). A text message is `malformed_frame` too.
   */
  handleMessage(now: number, message: Uint8Array | string): void {
    if (this.phase === "closed") return;
    if (typeof message === "string") {
      this.protocolError(ErrorCode.MalformedFrame, "a text message: Herald messages are binary");
      return;
    }
    let frame: Frame;
    try {
      frame = decodeMessage(message);
    } catch (error) {
      if (error instanceof DecodeError) {
        this.protocolError(error.errorCode, error.message);
        return;
      }
      throw error;
    }
    this.handleFrame(now, frame);
  }

  handleFrame(now: number, frame: Frame): void {
    if (this.phase === "closed") return;
    if (this.heartbeatIntervalMs !== undefined) {
      this.silenceDeadline = now + this.heartbeatIntervalMs * 2;
    }
    switch (frame.type) {
      case "helloOk": {
        if (this.phase !== "awaitHelloOk") break;
        const interval = Math.max(frame.heartbeatIntervalMs, HEARTBEAT_INTERVAL_MIN_MS);
        this.phase = "open";
        if (frame.storageEpoch !== undefined) {
          if (this.epoch !== undefined && this.epoch !== frame.storageEpoch) {
            this.forgetResumePoints();
          }
          this.epoch = frame.storageEpoch;
        }
        this.heartbeatIntervalMs = interval;
        this.nextPing = now + interval;
        this.silenceDeadline = now + interval * 2;
        for (const app of this.apps) {
          this.transmit.push({
            type: "bind",
            app: app.credentials.app,
            token: app.credentials.token,
            lastSeq: app.acked,
            lastBroadcastSeq: app.broadcastAcked,
            tags: [...(app.credentials.tags ?? [])],
          });
        }
        this.events.push({ type: "ready", heartbeatIntervalMs: interval, storageEpoch: this.epoch });
        return;
      }
      case "bindOk": {
        const state = this.app(frame.app);
        // An answer for an app this side unbound (or never bound) is dropped.
        if (state === undefined) return;
        state.user = frame.user;
        state.bindFailed = false;
        this.events.push({ type: "bound", app: frame.app, user: frame.user });
        return;
      }
      case "bindErr": {
        const state = this.app(frame.app);
        if (state === undefined) return;
        state.bindFailed = true;
        this.events.push({
          type: "bindFailed",
          app: frame.app,
          code: frame.code,
          codeName: bindErrorName(frame.code),
          message: frame.message,
        });
        return;
      }
      case "pong":
        this.pingOut = false;
        this.events.push({ type: "pingAnswered" });
        return;
      case "sessionTimedOut": {
        if (this.previousTimedOut || this.app(frame.app) === undefined) return;
        this.previousTimedOut = true;
        const { network, intervalMs, closedAgoMs } = frame;
        this.events.push({ type: "previousTimedOut", network, intervalMs, closedAgoMs });
        return;
      }
      case "heartbeat": {
        if (this.phase !== "open") break;
        const interval = Math.max(frame.intervalMs, HEARTBEAT_INTERVAL_MIN_MS);
        this.heartbeatIntervalMs = interval;
        this.nextPing = now + interval;
        this.silenceDeadline = now + interval * 2;
        this.events.push({ type: "heartbeatSet", intervalMs: interval });
        return;
      }
      case "push": {
        const state = this.app(frame.app);
        if (state === undefined) return;
        if (state.delivered !== undefined && frame.seq <= state.delivered) return;
        state.delivered = frame.seq;
        this.events.push({
          type: "push",
          app: frame.app,
          messageId: toHex(frame.messageId),
          seq: frame.seq,
          payload: frame.payload,
          pulled: false,
        });
        return;
      }
      case "notify": {
        const state = this.app(frame.app);
        if (state === undefined) return;
        // A NOTIFY takes a PUSH's place in the inbox: the same de-duplication,
        // and it moves the resume point the same way once acked.
        if (state.delivered !== undefined && frame.seq <= state.delivered) return;
        state.delivered = frame.seq;
        this.events.push({
          type: "notify",
          app: frame.app,
          messageId: toHex(frame.messageId),
          seq: frame.seq,
          size: frame.size,
          pullSpreadMs: frame.pullSpreadMs,
          hint: frame.hint,
        });
        return;
      }
      case "pullReply":
        this.events.push({
          type: "pulled",
          app: frame.app,
          seq: frame.seq,
          status: frame.status,
          statusName: pullStatusName(frame.status),
          messageId: toHex(frame.messageId),
          payload: frame.payload,
        });
        return;
      case "broadcast": {
        const state = this.app(frame.app);
        if (state === undefined) return;
        if (state.broadcastDelivered !== undefined && frame.seq <= state.broadcastDelivered) return;
        state.broadcastDelivered = frame.seq;
        this.events.push({
          type: "broadcast",
          app: frame.app,
          messageId: toHex(frame.messageId),
          seq: frame.seq,
          payload: frame.payload,
        });
        return;
      }
      case "transient":
        // For an app this side unbound (or never bound): dropped.
        if (this.app(frame.app) === undefined) return;
        this.events.push({ type: "transient", app: frame.app, payload: frame.payload });
        return;
      case "upstreamAck":
        this.events.push({
          type: "upstreamAck",
          app: frame.app,
          requestId: frame.requestId,
          status: frame.status,
          statusName: upstreamStatusName(frame.status),
        });
        return;
      case "unbind": {
        // Only the server's UNBIND carries a reason; one without is a
        // client's frame, which the server never sends.
        if (frame.reason === undefined) break;
        const index = this.apps.findIndex((a) => a.credentials.app === frame.app);
        if (index >= 0) this.apps.splice(index, 1);
        this.events.push({
          type: "unbound",
          app: frame.app,
          reason: frame.reason,
          reasonName: unbindReasonName(frame.reason),
        });
        return;
      }
      case "goAway":
        this.phase = "closed";
        this.events.push({
          type: "goAway",
          reason: frame.reason,
          reasonName: goAwayReasonName(frame.reason),
          reconnectDelayMs: frame.reconnectDelayMs,
        });
        return;
      case "reset": {
        const state = this.app(frame.app);
        if (state === undefined) return;
        if (frame.sequence === Sequence.Inbox) {
          state.delivered = frame.after;
          state.acked = frame.after;
        } else {
          state.broadcastDelivered = frame.after;
          state.broadcastAcked = frame.after;
        }
        this.events.push({
          type: "reset",
          app: frame.app,
          sequence: resetSequenceName(frame.sequence),
          after: frame.after,
        });
        return;
      }
      case "error":
        this.phase = "closed";
        this.events.push({
          type: "serverError",
          code: frame.code,
          codeName: errorCodeName(frame.code),
          message: frame.message,
        });
        return;
      default:
        break;
    }
    // A client-only frame, or a second HELLO_OK.
    this.protocolError(ErrorCode.UnexpectedFrame, `unexpected ${opName(frameOp(frame))} frame from the server`);
  }

  /** Acks every push of `app` up to `seq`. Returns false (and sends nothing) if that acks nothing new. */
  ack(app: string, seq: bigint): boolean {
    if (this.phase !== "open") return false;
    const state = this.app(app);
    if (state === undefined) return false;
    if ((state.acked !== undefined && seq <= state.acked) || state.delivered === undefined || seq > state.delivered) {
      return false;
    }
    state.acked = seq;
    this.transmit.push({ type: "ack", app, seq });
    return true;
  }

  /** Acks every broadcast of `app` up to `seq`. Returns false (and sends nothing) if that acks nothing new. */
  ackBroadcast(app: string, seq: bigint): boolean {
    if (this.phase !== "open") return false;
    const state = this.app(app);
    if (state === undefined) return false;
    if (
      (state.broadcastAcked !== undefined && seq <= state.broadcastAcked) ||
      state.broadcastDelivered === undefined ||
      seq > state.broadcastDelivered
    ) {
      return false;
    }
    state.broadcastAcked = seq;
    this.transmit.push({ type: "broadcastAck", app, seq });
    return true;
  }

  /**
   * Queues data for the app's business server, for its webhook `route`
   * (none: the app's default route); returns its request id. Throws
   * `ConnError` when the connection is not open or the app is not bound,
   * and a `RangeError` for a payload over 65,024 bytes or a route that is
   * not 1 to 64 bytes.
   */
  /** A PING is waiting for its PONG. */
  get pingUnanswered(): boolean {
    return this.pingOut;
  }

  /**
   * Asks the server to put `intervalMs` in force (HEARTBEAT); pings keep
   * their old interval until the answer (`heartbeatSet`). Only servers
   * that negotiate understand it: one that does not closes with ERROR.
   */
  proposeHeartbeat(intervalMs: number): void {
    if (this.phase !== "open") throw new ConnError("closed", "the connection is not open");
    this.transmit.push({ type: "heartbeat", intervalMs: Math.min(Math.round(intervalMs), 0xffff_ffff) });
  }

  upstream(app: string, payload: Uint8Array, route?: string): bigint {
    if (this.phase !== "open") throw new ConnError("closed", "the connection is not open");
    if (this.app(app)?.user === undefined) throw new ConnError("not_bound", `app ${JSON.stringify(app)} is not bound`);
    if (payload.length > PAYLOAD_LEN_MAX) {
      throw new RangeError(`an upstream payload is at most ${PAYLOAD_LEN_MAX} bytes, not ${payload.length}`);
    }
    if (route !== undefined) {
      const length = new TextEncoder().encode(route).length;
      if (length === 0 || length > ROUTE_LEN_MAX) {
        throw new RangeError(`a route name is 1 to ${ROUTE_LEN_MAX} bytes, not ${length}`);
      }
    }
    const requestId = this.nextRequestId;
    this.nextRequestId += 1n;
    this.transmit.push(
      route === undefined
        ? { type: "upstream", app, requestId, payload }
        : { type: "upstream", app, requestId, route, payload },
    );
    return requestId;
  }

  /**
   * Asks for the body of message `seq` of `app` (one a NOTIFY announced);
   * the answer comes as a `pulled` event. Throws `ConnError` when the
   * connection is not open or the app is not bound. How many PULLs are out
   * at once is the caller's to limit (`PULLS_IN_FLIGHT_MAX`).
   */
  pull(app: string, seq: bigint): void {
    if (this.phase !== "open") throw new ConnError("closed", "the connection is not open");
    if (this.app(app)?.user === undefined) throw new ConnError("not_bound", `app ${JSON.stringify(app)} is not bound`);
    this.transmit.push({ type: "pull", app, seq });
  }

  /**
   * Stops pushes for `app` (UNBIND) and forgets it on this connection:
   * what the server still sends for it is dropped. Returns false if the
   * app is not one of this connection's, or the connection is not open.
   */
  unbind(app: string): boolean {
    if (this.phase !== "open") return false;
    const index = this.apps.findIndex((state) => state.credentials.app === app);
    if (index < 0) return false;
    this.apps.splice(index, 1);
    this.transmit.push({ type: "unbind", app });
    return true;
  }

  /** The driver lost the transport: nothing more is sent or reported. */
  close(): void {
    this.phase = "closed";
  }

  /** Whether every app's BIND was refused on this connection (and there was at least one app). */
  everyBindFailed(): boolean {
    return this.apps.length > 0 && this.apps.every((state) => state.bindFailed);
  }

  /** The storage epoch the resume points belong to, to start the next connection with. */
  get storageEpoch(): bigint | undefined {
    return this.epoch;
  }

  /** The highest acked seq and broadcast seq of each app, to resume from on reconnect. */
  resumePoints(): ResumePoint[] {
    return this.apps.map((state) => ({
      app: state.credentials.app,
      lastSeq: state.acked,
      lastBroadcastSeq: state.broadcastAcked,
    }));
  }

  /** The user an app is bound for, once BIND_OK named it. */
  boundUser(app: string): string | undefined {
    return this.app(app)?.user;
  }

  /** The server's storage was created anew since the resume points were taken: claim nothing. */
  private forgetResumePoints(): void {
    for (const state of this.apps) {
      const app = state.credentials.app;
      if (state.delivered !== undefined || state.acked !== undefined) {
        state.delivered = undefined;
        state.acked = undefined;
        this.events.push({ type: "reset", app, sequence: "inbox", after: 0n });
      }
      if (state.broadcastDelivered !== undefined || state.broadcastAcked !== undefined) {
        state.broadcastDelivered = undefined;
        state.broadcastAcked = undefined;
        this.events.push({ type: "reset", app, sequence: "broadcasts", after: 0n });
      }
    }
  }

  private protocolError(code: number, message: string): void {
    this.phase = "closed";
    this.transmit.push({ type: "error", code, message });
    this.events.push({ type: "protocolError", code, codeName: errorCodeName(code), message });
  }

  private app(app: string): AppState | undefined {
    return this.apps.find((state) => state.credentials.app === app);
  }
}
