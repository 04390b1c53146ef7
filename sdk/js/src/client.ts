/**
 * HeraldClient: drives the sans-IO `ClientConn` over a WebSocket, and
 * reconnects with exponential backoff and full jitter, resuming every app
 * from its last acked seq and broadcast seq (the same rules as the Rust
 * SDK, `client/src/lib.rs`). NOTIFY frames are pulled and delivered in
 * order by `Puller` (pull.ts) unless the application pulls itself.
 */

import {
  type NetworkType,
  APPS_PER_CONN_MAX,
  NetworkType as Network,
  encodeFrame,
} from "./codec.js";
import {
  type BindFailedEvent,
  type BoundEvent,
  type BroadcastEvent,
  type NotifyEvent,
  type TransientEvent,
  type PushEvent,
  type ResetEvent,
  type UnboundEvent,
  type UpstreamAckEvent,
  ClientConn,
  ConnError,
} from "./conn.js";
import { type DispatchOptions, type FetchLike, askDispatcher, isWebSocketUrl } from "./dispatch.js";
import { EventHub, type EventStream } from "./events.js";
import { HeartbeatLearner, type HeartbeatProbeOptions } from "./heartbeat.js";
import { type Delivery, type NotifyGoneEvent, Puller } from "./pull.js";
import {
  type BackoffOptions,
  type BindFailure,
  type ClosedEvent,
  type Ended,
  type GoAwayInfo,
  Backoff,
  DEFAULT_BACKOFF,
  Gateways,
  authFailed,
  decide,
  endedByClose,
  endedByGoAway,
  lost,
} from "./reconnect.js";
import { type ResumeState, type ResumeStore, parseState, parseU64, tokenClaims } from "./storage.js";
import { type WebSocketConstructor, type WebSocketLike, WS_OPEN, resolveWebSocket } from "./websocket.js";

/** A network type; `cellular`, the name from before the radio generations were told apart, is 4g. */
export type NetworkName = "unknown" | "wifi" | "wired" | "2g" | "3g" | "4g" | "5g" | "cellular";

const NETWORKS: Record<NetworkName, NetworkType> = {
  unknown: Network.Unknown,
  wifi: Network.Wifi,
  wired: Network.Wired,
  "2g": Network.Cellular2g,
  "3g": Network.Cellular3g,
  "4g": Network.Cellular4g,
  "5g": Network.Cellular5g,
  cellular: Network.Cellular4g,
};

/** One app to bind. */
export interface AppToken {
  app: string;
  /** A token the app's business server minted for the user (docs/protocol.md, Tokens). */
  token: string;
  /** What broadcasts may target this client by, e.g. `platform=web` (at most 8). */
  tags?: string[];
}

/** The clock and timers the client uses; tests pass their own. */
export interface Timers {
  /** Milliseconds on a monotonic clock. */
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface ClientOptions {
  /** Gateway URLs (`wss://host:port/v1/connect`), tried in order. Needed unless `dispatch` is set; with it, the fallback. */
  gateways?: string | string[];
  /** Ask the dispatcher for the gateways (tried in order, the last that worked first). */
  dispatch?: DispatchOptions;
  /** Stable per app install: the server keeps an ack cursor per device (1-128 bytes of UTF-8). */
  deviceId: string;
  /** Free-form, at most 64 bytes (default `herald-client-js/<version>`). */
  clientVersion?: string;
  /** Sent in HELLO; the server picks the heartbeat interval by it (default `unknown`). */
  network?: NetworkName;
  /** The apps to bind (1 to 16). */
  apps: AppToken[];
  /**
   * Probe for a longer heartbeat interval and negotiate it with the server
   * (see `HeartbeatProbeOptions`); unset: ping at the server's interval.
   * A server that refuses the first proposal (it predates HEARTBEAT) turns
   * probing off for the client.
   */
  heartbeatProbe?: HeartbeatProbeOptions;
  /** `auto` (default): a push or broadcast is acked once every listener handled it. `manual`: call `ack`/`ackBroadcast`. */
  ackMode?: "auto" | "manual";
  /**
   * `true` (default): the body of a NOTIFY is pulled after a random delay
   * of up to its `pullSpreadMs`, and comes as a `push` event (`pulled`
   * true), in seq order with the other pushes. `false`: only the `notify`
   * event; the application calls `pull`.
   */
  autoPull?: boolean;
  /** Reconnect backoff bounds (default 200 ms doubling up to 30 s). */
  reconnect?: Partial<BackoffOptions>;
  /** How long a WebSocket may take to open (default 10,000 ms). */
  connectTimeoutMs?: number;
  /** How long the dispatcher may take to answer (default 5,000 ms). */
  dispatchTimeoutMs?: number;
  /** Where to keep resume points across restarts (default: memory only). */
  store?: ResumeStore;
  /** A WebSocket implementation (default: the global one, else the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /** A fetch implementation for the dispatcher (default: the global one). */
  fetch?: FetchLike;
  /** Numbers in [0, 1) for the jitter and the pull spread (default Math.random). */
  random?: () => number;
  /** Clock and timers (default performance.now and the global timers). */
  timers?: Timers;
  /** Called when a listener throws or rejects (default: console.error). The event still counts as handled. */
  onListenerError?: (error: unknown, event: ClientEvent) => void;
}

/** The server answered HELLO: the connection is up (binds follow). */
/** The options of `HeraldClient.upstream`. */
export interface UpstreamOptions {
  /** The app's webhook route the data goes to; none: the app's default route. */
  route?: string;
}

/** The answer to `pull`. */
export interface PullResult {
  status: number;
  /** `ok`, `gone`, `unavailable`, `busy`, `not_bound` or `unknown`. */
  statusName: string;
  /** The message's id as 32 lowercase hex digits; all zeros unless ok. */
  messageId: string;
  /** The message's body; empty unless ok. */
  payload: Uint8Array;
}

export interface ConnectedEvent {
  type: "connected";
  gateway: string;
  heartbeatIntervalMs: number;
  /** The server storage's epoch, if it said. */
  storageEpoch: bigint | undefined;
}

/** The server answered a heartbeat proposal: the client pings at `intervalMs` from now on (only with `heartbeatProbe`). */
export interface HeartbeatSetEvent {
  type: "heartbeatSet";
  intervalMs: number;
}

/** The dispatcher could not be asked; the client tries the gateway that last worked, or the configured ones. */
export interface DispatchFailedEvent {
  type: "dispatchFailed";
  error: string;
}

/** A connection was lost (or could not be made); the client reconnects by itself. */
export interface DisconnectedEvent {
  type: "disconnected";
  error: string;
  /** How long the client waits before the next try (0: it tries the next gateway at once). */
  reconnectInMs: number;
  gateway: string | undefined;
  /** The GOAWAY that ended the connection, if one did (close code 1001 counts as server_shutdown). */
  goAway: GoAwayInfo | undefined;
  /** The WebSocket close code, if the socket closed before anything else ended the connection. */
  closeCode: number | undefined;
}

export type ClientEvent =
  | ConnectedEvent
  | BoundEvent
  | BindFailedEvent
  | PushEvent
  | NotifyEvent
  | NotifyGoneEvent
  | BroadcastEvent
  | TransientEvent
  | UpstreamAckEvent
  | ResetEvent
  | UnboundEvent
  | HeartbeatSetEvent
  | DispatchFailedEvent
  | DisconnectedEvent
  | ClosedEvent;

export type ClientEventType = ClientEvent["type"];
export type ClientEventOf<T extends ClientEventType> = Extract<ClientEvent, { type: T }>;

export type ClientState =
  /** Not started. */
  | "idle"
  /** Asking the dispatcher, opening a WebSocket, or waiting for HELLO_OK. */
  | "connecting"
  /** HELLO_OK arrived. */
  | "connected"
  /** Waiting before the next try. */
  | "waiting"
  /** Stopped for good. */
  | "closed";

/**
 * Why a call on the client was refused, or (`disconnected`) why a `pull`
 * got no answer: its connection ended first.
 */
export class HeraldError extends Error {
  readonly kind: "not_bound" | "closed" | "disconnected";
  constructor(kind: "not_bound" | "closed" | "disconnected", message: string) {
    super(message);
    this.name = "HeraldError";
    this.kind = kind;
  }
}

export const SDK_VERSION = "0.1.0";

const DEFAULT_TIMERS: Timers = {
  now: () => performance.now(),
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle as ReturnType<typeof globalThis.setTimeout>),
};

interface Resume {
  user: string | undefined;
  lastSeq: bigint | undefined;
  lastBroadcastSeq: bigint | undefined;
}

/** The live connection. */
interface Current {
  conn: ClientConn | undefined;
  puller: Puller;
  pump(): void;
  finish(ended: Ended): void;
}

const utf8 = new TextEncoder();
const U64_MAX = (1n << 64n) - 1n;

function toBytes(data: unknown): Uint8Array | string | undefined {
  if (typeof data === "string") return data;
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (data instanceof ArrayBuffer || Object.prototype.toString.call(data) === "[object ArrayBuffer]") {
    return new Uint8Array(data as ArrayBuffer);
  }
  return undefined;
}

function payloadBytes(payload: Uint8Array | ArrayBuffer | string): Uint8Array {
  if (typeof payload === "string") return utf8.encode(payload);
  if (payload instanceof Uint8Array) return payload;
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  throw new TypeError("a payload is a Uint8Array, an ArrayBuffer or a string");
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export class HeraldClient {
  private readonly deviceId: string;
  private readonly clientVersion: string;
  private readonly networkName: NetworkName;
  private readonly network: NetworkType;
  private apps: AppToken[];
  private readonly autoAck: boolean;
  private readonly autoPull: boolean;
  private readonly connectTimeoutMs: number;
  private readonly dispatchTimeoutMs: number;
  private readonly dispatch: DispatchOptions | undefined;
  private readonly store: ResumeStore | undefined;
  private readonly fetchFn: FetchLike | undefined;
  private readonly random: () => number;
  private readonly timers: Timers;
  private readonly webSocket: WebSocketConstructor | undefined;
  private learner: HeartbeatLearner | undefined;

  private readonly backoff: Backoff;
  private readonly gatewayList: Gateways;
  private readonly hub: EventHub<ClientEvent>;
  private readonly resume = new Map<string, Resume>();
  private storageEpoch: bigint | undefined;
  private nextRequestId = 1n;
  private lastSaved: string | undefined;
  private saving: Promise<void> = Promise.resolve();

  private stateValue: ClientState = "idle";
  private gatewayValue: string | undefined;
  private current: Current | undefined;
  private started: Promise<void> | undefined;
  private closing = false;
  private cancelWait: (() => void) | undefined;
  private resolveClosed!: (event: ClosedEvent) => void;

  /** Resolves with the last event once the client stopped for good. */
  readonly closed: Promise<ClosedEvent>;

  constructor(options: ClientOptions) {
    const gateways = options.gateways === undefined ? [] : typeof options.gateways === "string" ? [options.gateways] : [...options.gateways];
    for (const gateway of gateways) {
      if (!isWebSocketUrl(gateway)) throw new TypeError(`gateway ${JSON.stringify(gateway)} is not a ws:// or wss:// URL`);
    }
    if (gateways.length === 0 && options.dispatch === undefined) {
      throw new TypeError("HeraldClient needs gateways, dispatch, or both");
    }
    const networkName = options.network ?? "unknown";
    if (!(networkName in NETWORKS)) throw new TypeError(`unknown network ${JSON.stringify(networkName)}`);
    if (!Array.isArray(options.apps) || options.apps.length === 0 || options.apps.length > APPS_PER_CONN_MAX) {
      throw new TypeError(`apps: 1 to ${APPS_PER_CONN_MAX} apps`);
    }
    const names = new Set(options.apps.map((a) => a.app));
    if (names.size !== options.apps.length) throw new TypeError("apps: each app at most once");

    this.deviceId = options.deviceId;
    this.clientVersion = options.clientVersion ?? `herald-client-js/${SDK_VERSION}`;
    this.networkName = networkName;
    this.network = NETWORKS[networkName];
    if (options.heartbeatProbe !== undefined) {
      const probe = options.heartbeatProbe;
      if (!(probe.stepMs > 0) || !(probe.holdMs >= 0) || !Number.isInteger(probe.healthyBeforeProbe)) {
        throw new TypeError("heartbeatProbe: stepMs > 0, holdMs >= 0 and an integer healthyBeforeProbe");
      }
      // The learned interval is kept by the type's current name: `cellular` is 4g.
      this.learner = new HeartbeatLearner(probe, networkName === "cellular" ? "4g" : networkName);
    }
    this.apps = options.apps.map((a) => ({ app: a.app, token: a.token, tags: [...(a.tags ?? [])] }));
    // Every frame this client will send from the options must encode: fail now, not at each connection.
    encodeFrame({ type: "hello", deviceId: this.deviceId, clientVersion: this.clientVersion, network: this.network });
    for (const a of this.apps) encodeFrame({ type: "bind", app: a.app, token: a.token, tags: a.tags ?? [] });

    this.autoAck = (options.ackMode ?? "auto") === "auto";
    this.autoPull = options.autoPull ?? true;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.dispatchTimeoutMs = options.dispatchTimeoutMs ?? 5_000;
    this.dispatch = options.dispatch;
    this.store = options.store;
    this.fetchFn = options.fetch;
    this.random = options.random ?? Math.random;
    this.timers = options.timers ?? DEFAULT_TIMERS;
    this.webSocket = options.WebSocket;
    this.backoff = new Backoff({ ...DEFAULT_BACKOFF, ...options.reconnect });
    this.gatewayList = new Gateways(gateways);
    const onListenerError =
      options.onListenerError ?? ((error: unknown) => console.error("herald-client: an event listener failed", error));
    this.hub = new EventHub<ClientEvent>(onListenerError);
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
  }

  /** Where the client is. */
  get state(): ClientState {
    return this.stateValue;
  }

  /** The gateway of the current (or last) connection. */
  get gateway(): string | undefined {
    return this.gatewayValue;
  }

  /**
   * Starts connecting. Resolves once the WebSocket implementation is found
   * and the store's resume points are loaded (the connection goes on in
   * the background); rejects, and the client closes, if there is no
   * WebSocket implementation.
   */
  start(): Promise<void> {
    if (this.started === undefined) {
      this.started = this.init().then((ws) => {
        void this.loop(ws);
      });
    }
    return this.started;
  }

  /**
   * Calls `listener` for each event of `type`. A listener may return a
   * promise: the next event waits for it. Returns a function that removes
   * the listener.
   */
  on<T extends ClientEventType>(type: T, listener: (event: ClientEventOf<T>) => unknown): () => void {
    return this.hub.on(type, listener as (event: ClientEvent) => unknown);
  }

  off<T extends ClientEventType>(type: T, listener: (event: ClientEventOf<T>) => unknown): void {
    this.hub.off(type, listener as (event: ClientEvent) => unknown);
  }

  /**
   * Every event, in order, ending after `closed`. In auto ack mode a push
   * is acked when the loop asks for the next event, that is, after its body
   * ran for the push.
   */
  events(): EventStream<ClientEvent> {
    return this.hub.stream();
  }

  [Symbol.asyncIterator](): AsyncIterator<ClientEvent> {
    return this.events();
  }

  /** Acks every push of `app` up to `seq` on the live connection. False if that acks nothing new, or no connection is up. */
  ack(app: string, seq: bigint | number): boolean {
    const current = this.current;
    if (current?.conn === undefined || !current.conn.ack(app, BigInt(seq))) return false;
    current.pump();
    return true;
  }

  /** Acks every broadcast of `app` up to `seq` on the live connection. */
  ackBroadcast(app: string, seq: bigint | number): boolean {
    const current = this.current;
    if (current?.conn === undefined || !current.conn.ackBroadcast(app, BigInt(seq))) return false;
    current.pump();
    return true;
  }

  /**
   * Sends data for the app's business server; returns its request id, which
   * comes back in an `upstreamAck` event. Throws `HeraldError` when no
   * connection is up or the app is not bound on it (nothing is queued for
   * later), and a `RangeError` for a payload over 65,024 bytes or a route
   * that is not 1 to 64 bytes. `options.route` names the app's webhook
   * route the data goes to (the server answers `unknown_route` if the app
   * has no such route for upstream data); without it the data goes to the
   * app's default route.
   */
  upstream(app: string, payload: Uint8Array | ArrayBuffer | string, options: UpstreamOptions = {}): bigint {
    if (this.stateValue === "closed") throw new HeraldError("closed", "the client is closed");
    const current = this.current;
    if (current?.conn === undefined || !current.conn.isOpen || current.conn.boundUser(app) === undefined) {
      throw new HeraldError("not_bound", `not connected, or app ${JSON.stringify(app)} is not bound`);
    }
    const requestId = current.conn.upstream(app, payloadBytes(payload), options.route);
    this.nextRequestId = requestId + 1n;
    current.pump();
    return requestId;
  }

  /**
   * Asks for the body of message `seq` of `app`, one a `notify` event
   * announced (for `autoPull: false`; the spread of the NOTIFY's
   * `pullSpreadMs` is yours to keep). At most 4 PULLs are out at once; more
   * wait their turn. Rejects with `HeraldError`: `not_bound` or `closed`
   * as `upstream` throws, `disconnected` if the connection ended before
   * the answer (pull again once bound); a `RangeError` for a seq that is
   * not a u64. Ack the seq once you hold the body (or it is `gone`).
   */
  async pull(app: string, seq: bigint | number): Promise<PullResult> {
    if (this.stateValue === "closed") throw new HeraldError("closed", "the client is closed");
    const s = BigInt(seq);
    if (s < 0n || s > U64_MAX) throw new RangeError(`a seq is in 0..=2^64-1, not ${s}`);
    const current = this.current;
    if (current?.conn === undefined || !current.conn.isOpen || current.conn.boundUser(app) === undefined) {
      throw new HeraldError("not_bound", `not connected, or app ${JSON.stringify(app)} is not bound`);
    }
    return new Promise((resolve, reject) => {
      current.puller.request({
        app,
        seq: s,
        answer: (reply) =>
          resolve({ status: reply.status, statusName: reply.statusName, messageId: reply.messageId, payload: reply.payload }),
        lost: () =>
          reject(
            this.closing
              ? new HeraldError("closed", "the client is closed")
              : new HeraldError("disconnected", "the connection ended before the PULL was answered"),
          ),
      });
      current.pump();
    });
  }

  /**
   * Stops pushes for `app`: UNBIND on the live connection, and the app is
   * not bound on later ones. Returns false if the app is not one of the
   * client's.
   */
  unbind(app: string): boolean {
    const index = this.apps.findIndex((a) => a.app === app);
    if (index < 0) return false;
    this.apps.splice(index, 1);
    const current = this.current;
    current?.puller.forget(app);
    if (current?.conn?.unbind(app)) current.pump();
    return true;
  }

  /** The resume points the client holds, as a store would keep them. */
  resumeState(): ResumeState {
    const state: ResumeState = { apps: {} };
    if (this.storageEpoch !== undefined) state.storageEpoch = this.storageEpoch.toString();
    for (const [app, r] of this.resume) {
      const entry: ResumeState["apps"][string] = {};
      if (r.user !== undefined) entry.user = r.user;
      if (r.lastSeq !== undefined) entry.lastSeq = r.lastSeq.toString();
      if (r.lastBroadcastSeq !== undefined) entry.lastBroadcastSeq = r.lastBroadcastSeq.toString();
      state.apps[app] = entry;
    }
    return state;
  }

  /** Closes the connection and stops for good; resolves once the client stopped (the `closed` event is queued). */
  async close(): Promise<void> {
    if (this.stateValue === "closed") return;
    this.closing = true;
    if (this.started === undefined) {
      this.stop({ type: "closed", reason: "closedByClient", message: "closed by the client" });
      return;
    }
    const closed: ClosedEvent = { type: "closed", reason: "closedByClient", message: "closed by the client" };
    this.cancelWait?.();
    this.current?.finish({ kind: "terminal", closed });
    // At once, even while the dispatcher is being asked: the loop stops when it looks next.
    this.stop(closed);
    await this.closed;
  }

  private async init(): Promise<WebSocketConstructor> {
    let ws: WebSocketConstructor;
    try {
      ws = await resolveWebSocket(this.webSocket);
    } catch (error) {
      this.stop({ type: "closed", reason: "error", message: message(error) });
      throw error;
    }
    if (this.store !== undefined) {
      try {
        this.loadResume(parseState(await this.store.load()));
      } catch {
        // An unreadable store: start from what the server holds.
      }
    }
    return ws;
  }

  private loadResume(state: ResumeState | undefined): void {
    if (state === undefined) return;
    this.storageEpoch = parseU64(state.storageEpoch);
    for (const { app, token } of this.apps) {
      const kept = state.apps[app];
      if (kept === undefined) continue;
      // An inbox seq belongs to one user's inbox: resume it only for the
      // user this client's token names. Broadcast seqs are the app's.
      const sameUser = kept.user !== undefined && kept.user === tokenClaims(token)?.user;
      this.resume.set(app, {
        user: kept.user,
        lastSeq: sameUser ? parseU64(kept.lastSeq) : undefined,
        lastBroadcastSeq: parseU64(kept.lastBroadcastSeq),
      });
    }
    this.lastSaved = JSON.stringify(this.resumeState());
  }

  private async loop(ws: WebSocketConstructor): Promise<void> {
    while (!this.closing) {
      this.stateValue = "connecting";
      const dispatch = this.dispatch;
      const fetchFn = this.fetchFn ?? (globalThis as { fetch?: FetchLike }).fetch;
      const dispatcher =
        dispatch === undefined
          ? undefined
          : () => {
              if (fetchFn === undefined) return Promise.reject(new Error("no fetch here: pass the fetch option"));
              return askDispatcher(fetchFn, dispatch, this.networkName, this.dispatchTimeoutMs, this.timers);
            };
      const { gateway, dispatchError } = await this.gatewayList.next(this.networkName, dispatcher);
      if (this.closing) break;
      if (dispatchError !== undefined) this.hub.emit({ type: "dispatchFailed", error: dispatchError });
      const ended = gateway === undefined ? lost("no gateway to try", false) : await this.connect(ws, gateway);
      if (this.closing) break;
      const decision = decide(ended, gateway, this.networkName, this.backoff, this.gatewayList, this.random);
      if (decision.action === "stop") {
        this.stop(decision.closed);
        return;
      }
      const lostInfo = ended.kind === "lost" ? ended : undefined;
      const delayMs = decision.action === "wait" ? decision.delayMs : 0;
      this.hub.emit({
        type: "disconnected",
        error: lostInfo?.error ?? "connection lost",
        reconnectInMs: delayMs,
        gateway,
        goAway: lostInfo?.goAway,
        closeCode: lostInfo?.closeCode,
      });
      if (decision.action === "wait") {
        this.stateValue = "waiting";
        await this.sleep(delayMs);
      }
    }
    this.stop({ type: "closed", reason: "closedByClient", message: "closed by the client" });
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const handle = this.timers.setTimeout(() => {
        this.cancelWait = undefined;
        resolve();
      }, ms);
      this.cancelWait = () => {
        this.timers.clearTimeout(handle);
        this.cancelWait = undefined;
        resolve();
      };
    });
  }

  private stop(closed: ClosedEvent): void {
    if (this.stateValue === "closed") return;
    this.stateValue = "closed";
    this.closing = true;
    this.hub.emit(closed);
    this.hub.finish();
    this.resolveClosed(closed);
  }

  /** One connection, from the WebSocket's opening to its end. */
  private connect(ws: WebSocketConstructor, gateway: string): Promise<Ended> {
    this.gatewayValue = gateway;
    return new Promise<Ended>((resolve) => {
      const timers = this.timers;
      let socket: WebSocketLike | undefined;
      let conn: ClientConn | undefined;
      let done = false;
      let handshakeDone = false;
      let lastBindFailure: BindFailure | undefined;
      let connectTimer: unknown;
      let deadlineTimer: unknown;

      const finish = (ended: Ended): void => {
        if (done) return;
        done = true;
        timers.clearTimeout(connectTimer);
        timers.clearTimeout(deadlineTimer);
        conn?.close();
        // What was pulled or held and not acked comes again on the next bind.
        puller.close();
        if (socket !== undefined) {
          socket.onopen = null;
          socket.onmessage = null;
          socket.onclose = null;
          // Kept: `ws` throws an 'error' event nobody listens to.
          socket.onerror = () => {};
          try {
            socket.close(1000);
          } catch {
            // Closing a socket that is not open yet may throw; it is gone either way.
          }
        }
        if (this.current === current) this.current = undefined;
        resolve(ended);
      };

      const schedule = (): void => {
        timers.clearTimeout(deadlineTimer);
        const deadline = conn?.pollTimeout();
        if (deadline === undefined) return;
        const wait = Math.max(0, Math.ceil(deadline - timers.now()));
        deadlineTimer = timers.setTimeout(() => {
          if (done || conn === undefined) return;
          conn.handleTimeout(timers.now());
          pump();
        }, wait);
      };

      /** Hands a message to the application; under auto ack it is acked once handled. */
      const deliver = (c: ClientConn, event: Delivery | BroadcastEvent): void => {
        this.hub.emit(event, this.autoAck ? () => this.ackHandled(c, event) : undefined);
      };

      const puller = new Puller({
        pull: (app, seq) => {
          try {
            conn!.pull(app, seq);
            return true;
          } catch (error) {
            if (error instanceof ConnError) return false;
            throw error;
          }
        },
        flush: () => pump(),
        deliver: (event) => deliver(conn!, event),
        timers,
        random: this.random,
      });

      /** Sends what the state machine queued; false if the connection ended. */
      const transmit = (c: ClientConn): boolean => {
        for (let frame = c.pollTransmit(); frame !== undefined; frame = c.pollTransmit()) {
          let bytes: Uint8Array;
          try {
            bytes = encodeFrame(frame);
          } catch (error) {
            finish(lost(`cannot encode ${frame.type}: ${message(error)}`, handshakeDone));
            return false;
          }
          if (socket !== undefined && socket.readyState === WS_OPEN) socket.send(bytes);
        }
        return true;
      };

      const pump = (): void => {
        if (done || conn === undefined) return;
        const c = conn;
        // 1. What the state machine sends (an ERROR before its close, too).
        if (!transmit(c)) return;
        // 2. Where to resume on the next connection.
        this.takeResumePoints(c);
        // 3. What it reports.
        for (let event = c.pollEvent(); event !== undefined; event = c.pollEvent()) {
          switch (event.type) {
            case "ready": {
              handshakeDone = true;
              const proposal = this.learner?.connected(event.heartbeatIntervalMs);
              if (proposal !== undefined) c.proposeHeartbeat(proposal);
              this.stateValue = "connected";
              this.hub.emit({
                type: "connected",
                gateway,
                heartbeatIntervalMs: event.heartbeatIntervalMs,
                storageEpoch: event.storageEpoch,
              });
              break;
            }
            case "pingAnswered": {
              const proposal = this.learner?.pingAnswered();
              if (proposal !== undefined) c.proposeHeartbeat(proposal);
              break;
            }
            case "heartbeatSet":
              this.learner?.set(event.intervalMs);
              this.hub.emit(event);
              break;
            case "previousTimedOut": {
              // The last connection's pings stopped arriving: if it was lost
              // without a known cause, its interval failed.
              if (event.network !== this.network) break;
              const proposal = this.learner?.previousTimedOut(event.intervalMs, event.closedAgoMs);
              if (proposal !== undefined) c.proposeHeartbeat(proposal);
              break;
            }
            case "bound":
              this.hub.emit(event);
              break;
            case "bindFailed":
              lastBindFailure = { app: event.app, code: event.code, codeName: event.codeName, message: event.message };
              this.hub.emit(event);
              if (c.everyBindFailed()) {
                finish(authFailed(lastBindFailure, `every app's BIND failed (last: ${event.app}: ${event.codeName})`));
                return;
              }
              break;
            case "push":
              if (this.autoPull) puller.push(event);
              else deliver(c, event);
              break;
            case "broadcast":
              deliver(c, event);
              break;
            case "notify":
              // At once, so the app can show the hint before the body is there.
              this.hub.emit(event);
              if (this.autoPull) puller.notify(event);
              break;
            case "pulled":
              puller.answered(event);
              break;
            case "transient":
            case "upstreamAck":
            case "reset":
              this.hub.emit(event);
              break;
            case "unbound": {
              // Deleted: not bound on later connections either.
              const index = this.apps.findIndex((a) => a.app === event.app);
              if (index >= 0) this.apps.splice(index, 1);
              puller.forget(event.app);
              this.hub.emit(event);
              break;
            }
            case "goAway":
              this.learner?.explained();
              finish(
                endedByGoAway(
                  { reason: event.reason, reasonName: event.reasonName, reconnectDelayMs: event.reconnectDelayMs },
                  handshakeDone,
                  lastBindFailure,
                ),
              );
              return;
            case "serverError":
              // A server that predates HEARTBEAT refuses it: stop proposing.
              if (this.learner?.awaitingAnswer === true) this.learner = undefined;
              finish(lost(`server sent ERROR ${event.codeName}: ${event.message}`, handshakeDone, { protocolError: true }));
              return;
            case "protocolError":
              finish(lost(`bad frame from the server: ${event.message}`, handshakeDone, { protocolError: true }));
              return;
            case "timedOut":
              if (handshakeDone) this.learner?.failed();
              finish(lost(handshakeDone ? "server went silent" : "no HELLO_OK in time", handshakeDone));
              return;
          }
        }
        // 4. What handling the events queued (PULLs, a heartbeat proposal).
        if (!transmit(c)) return;
        // 5. When to look again (heartbeat, silence deadline).
        schedule();
      };

      const current: Current = {
        get conn() {
          return conn;
        },
        puller,
        pump,
        finish,
      };
      this.current = current;

      try {
        socket = new ws(gateway);
        socket.binaryType = "arraybuffer";
      } catch (error) {
        finish(lost(`connect: ${message(error)}`, false));
        return;
      }
      connectTimer = timers.setTimeout(() => finish(lost("connect: timed out", false)), this.connectTimeoutMs);
      socket.onerror = () => {
        // A close event follows, with the code.
      };
      socket.onopen = () => {
        if (done) return;
        timers.clearTimeout(connectTimer);
        conn = new ClientConn(timers.now(), {
          deviceId: this.deviceId,
          clientVersion: this.clientVersion,
          network: this.network,
          apps: this.apps.map((a) => ({
            app: a.app,
            token: a.token,
            tags: a.tags,
            lastSeq: this.resume.get(a.app)?.lastSeq,
            lastBroadcastSeq: this.resume.get(a.app)?.lastBroadcastSeq,
          })),
          storageEpoch: this.storageEpoch,
          firstRequestId: this.nextRequestId,
        });
        pump();
      };
      socket.onmessage = (event) => {
        if (done || conn === undefined) return;
        const data = toBytes(event.data);
        conn.handleMessage(timers.now(), data ?? "");
        pump();
      };
      socket.onclose = (event) => {
        // Lost while a PING was out: the heartbeat was too long for a NAT
        // that resets the flow it forgot rather than dropping it silently.
        if (!done && handshakeDone && conn?.pingUnanswered === true) this.learner?.failed();
        finish(endedByClose(event.code, event.reason, handshakeDone));
      };
    });
  }

  /**
   * Auto ack: `event` was handled (a gone notify counts as delivered). Only
   * on the connection that delivered it.
   */
  private ackHandled(conn: ClientConn, event: Delivery | BroadcastEvent): void {
    const current = this.current;
    if (current === undefined || current.conn !== conn) return;
    const acked = event.type === "broadcast" ? conn.ackBroadcast(event.app, event.seq) : conn.ack(event.app, event.seq);
    if (acked) current.pump();
  }

  private takeResumePoints(conn: ClientConn): void {
    this.storageEpoch = conn.storageEpoch;
    for (const point of conn.resumePoints()) {
      // The user the seqs belong to: the one BIND_OK named, else the one
      // the token names (what the server will bind this client as).
      const token = this.apps.find((a) => a.app === point.app)?.token;
      this.resume.set(point.app, {
        user: conn.boundUser(point.app) ?? (token === undefined ? undefined : tokenClaims(token)?.user),
        lastSeq: point.lastSeq,
        lastBroadcastSeq: point.lastBroadcastSeq,
      });
    }
    this.save();
  }

  private save(): void {
    const store = this.store;
    if (store === undefined) return;
    const state = this.resumeState();
    const text = JSON.stringify(state);
    if (text === this.lastSaved) return;
    this.lastSaved = text;
    // In order, one at a time; a failed save is not the connection's problem.
    this.saving = this.saving.then(async () => {
      try {
        await store.save(state);
      } catch {
        // Kept in memory; the next change tries again.
      }
    });
  }
}
