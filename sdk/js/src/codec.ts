/**
 * The binary encoding of Herald wire protocol v1 (docs/protocol.md in the
 * Herald repository), a port of `proto/src/codec.rs`.
 *
 * Every frame is a big-endian u32 body length, then the body: the version
 * byte, the op byte and the op's fields. `decodeFrame` is incremental (it
 * answers `null` until a whole frame is there, and refuses an oversized
 * length from the prefix alone); `decodeMessage` takes one WebSocket
 * message, which must hold exactly one frame. Every u64 is a `bigint`.
 */

/** The hard limits of `proto/src/limits.rs`. */
export const PROTOCOL_VERSION = 1;
export const LENGTH_PREFIX_LEN = 4;
export const FRAME_BODY_LEN_MIN = 2;
export const FRAME_BODY_LEN_MAX = 65_536;
export const PAYLOAD_LEN_MAX = 65_024;
export const APP_ID_LEN_MAX = 64;
export const USER_ID_LEN_MAX = 128;
export const DEVICE_ID_LEN_MAX = 128;
export const CLIENT_VERSION_LEN_MAX = 64;
export const TOKEN_LEN_MAX = 1024;
export const TEXT_LEN_MAX = 1024;
/** Longest hint a NOTIFY carries, in bytes (may be empty). */
export const HINT_LEN_MAX = 1024;
/** Most PULLs one connection may have unanswered; the server answers one more with `busy`. */
export const PULLS_IN_FLIGHT_MAX = 4;
export const APPS_PER_CONN_MAX = 16;
export const TAGS_PER_BIND_MAX = 8;
export const TAG_LEN_MAX = 64;
/** Longest webhook route name an UPSTREAM may carry, in bytes. */
export const ROUTE_LEN_MAX = 64;
export const MESSAGE_ID_LEN = 16;

/** The op byte of each frame. */
export const Op = {
  Hello: 0x01,
  HelloOk: 0x02,
  Bind: 0x03,
  BindOk: 0x04,
  BindErr: 0x05,
  Ping: 0x06,
  Pong: 0x07,
  Push: 0x08,
  Ack: 0x09,
  Upstream: 0x0a,
  UpstreamAck: 0x0b,
  Unbind: 0x0c,
  GoAway: 0x0d,
  Error: 0x0e,
  Broadcast: 0x0f,
  BroadcastAck: 0x10,
  Reset: 0x11,
  UpstreamRouted: 0x12,
  Transient: 0x13,
  Heartbeat: 0x14,
  Notify: 0x15,
  Pull: 0x16,
  PullReply: 0x17,
  SessionTimedOut: 0x18,
} as const;
export type Op = (typeof Op)[keyof typeof Op];

/**
 * HELLO's network byte. A receiver reads any other value as unknown. Byte 2
 * was `cellular` before the radio generations were told apart: it is 4g.
 */
export const NetworkType = {
  Unknown: 0,
  Wifi: 1,
  Cellular4g: 2,
  Wired: 3,
  Cellular2g: 4,
  Cellular3g: 5,
  Cellular5g: 6,
} as const;
export type NetworkType = (typeof NetworkType)[keyof typeof NetworkType];

/**
 * HELLO's `features` bits: the ops a client understands beyond the first v1
 * ones. The server sends TRANSIENT, NOTIFY and SESSION_TIMED_OUT only to a
 * client that named them; a receiver ignores bits it does not know.
 */
export const Features = {
  /** TRANSIENT frames (`"store": false` pushes). */
  Transient: 0x1,
  /** NOTIFY, PULL and PULL_REPLY (`"delivery": "notify"` pushes). */
  Notify: 0x2,
  /** SESSION_TIMED_OUT (the previous connection's heartbeat deadline passed). */
  SessionTimedOut: 0x4,
} as const;

/** RESET's sequence byte. */
export const ResetSequence = { Inbox: 0, Broadcasts: 1 } as const;
export type ResetSequence = (typeof ResetSequence)[keyof typeof ResetSequence];

export const GoAwayReason = {
  Kicked: 1,
  ServerShutdown: 2,
  AuthTimeout: 3,
  AuthFailed: 4,
  SlowConsumer: 5,
  ProtocolError: 6,
  HeartbeatTimeout: 7,
  Overloaded: 8,
  AppDeleted: 9,
} as const;

/** Why the server unbound an app from a connection that stays open. */
export const UnbindReason = {
  AppDeleted: 1,
} as const;

export const BindErrorCode = {
  InvalidToken: 1,
  TokenExpired: 2,
  UnknownApp: 3,
  TooManyApps: 4,
  AlreadyBound: 5,
  TooManyConnections: 6,
} as const;

export const ErrorCode = {
  MalformedFrame: 1,
  FrameTooLarge: 2,
  UnsupportedVersion: 3,
  UnexpectedFrame: 4,
  NotBound: 5,
} as const;

export const UpstreamStatus = {
  Accepted: 0,
  NoEndpoint: 1,
  Rejected: 2,
  Unavailable: 3,
  NotBound: 4,
  UnknownRoute: 5,
} as const;

export const PullStatus = {
  Ok: 0,
  /** The inbox holds no such message (expired, or never stored): ack the seq and go on. */
  Gone: 1,
  /** Storage did not answer; pull again later. */
  Unavailable: 2,
  /** The connection already has as many PULLs unanswered as it may; pull again later. */
  Busy: 3,
  NotBound: 4,
} as const;

const GOAWAY_NAMES = [
  "",
  "kicked",
  "server_shutdown",
  "auth_timeout",
  "auth_failed",
  "slow_consumer",
  "protocol_error",
  "heartbeat_timeout",
  "overloaded",
  "app_deleted",
];
const UNBIND_NAMES = ["", "app_deleted"];
const BIND_ERROR_NAMES = [
  "",
  "invalid_token",
  "token_expired",
  "unknown_app",
  "too_many_apps",
  "already_bound",
  "too_many_connections",
];
const ERROR_NAMES = [
  "",
  "malformed_frame",
  "frame_too_large",
  "unsupported_version",
  "unexpected_frame",
  "not_bound",
];
const UPSTREAM_NAMES = [
  "accepted",
  "no_endpoint",
  "rejected",
  "unavailable",
  "not_bound",
  "unknown_route",
];
const PULL_NAMES = ["ok", "gone", "unavailable", "busy", "not_bound"];
const OP_NAMES = [
  "",
  "HELLO",
  "HELLO_OK",
  "BIND",
  "BIND_OK",
  "BIND_ERR",
  "PING",
  "PONG",
  "PUSH",
  "ACK",
  "UPSTREAM",
  "UPSTREAM_ACK",
  "UNBIND",
  "GOAWAY",
  "ERROR",
  "BROADCAST",
  "BROADCAST_ACK",
  "RESET",
  "UPSTREAM_ROUTED",
  "TRANSIENT",
  "HEARTBEAT",
  "NOTIFY",
  "PULL",
  "PULL_REPLY",
  "SESSION_TIMED_OUT",
];

function nameIn(names: readonly string[], code: number): string {
  return (code >= 0 && names[code]) || "unknown";
}

/** The snake_case name of a GOAWAY reason ("unknown" for a code v1 does not define). */
export const goAwayReasonName = (code: number): string => nameIn(GOAWAY_NAMES, code);
/** The snake_case name of an UNBIND reason. */
export const unbindReasonName = (code: number): string => nameIn(UNBIND_NAMES, code);
/** The snake_case name of a BIND_ERR code. */
export const bindErrorName = (code: number): string => nameIn(BIND_ERROR_NAMES, code);
/** The snake_case name of an ERROR code. */
export const errorCodeName = (code: number): string => nameIn(ERROR_NAMES, code);
/** The snake_case name of an UPSTREAM_ACK status. */
export const upstreamStatusName = (code: number): string => nameIn(UPSTREAM_NAMES, code);
/** The snake_case name of a PULL_REPLY status. */
export const pullStatusName = (code: number): string => nameIn(PULL_NAMES, code);
/** The name of an op as docs/protocol.md spells it (HELLO_OK, ...). */
export const opName = (op: number): string => nameIn(OP_NAMES, op);
/** The name of a RESET sequence: "inbox" or "broadcasts". */
export const resetSequenceName = (sequence: ResetSequence): "inbox" | "broadcasts" =>
  sequence === ResetSequence.Inbox ? "inbox" : "broadcasts";

/** One frame of wire protocol v1. Both directions share the type. */
export type Frame =
  /**
   * `features` (the `Features` bits) came later in v1: written only when
   * not 0, and decoded as 0 from a HELLO without it.
   */
  | { type: "hello"; deviceId: string; clientVersion: string; network: number; features?: number }
  | { type: "helloOk"; heartbeatIntervalMs: number; storageEpoch?: bigint }
  | {
      type: "bind";
      app: string;
      token: string;
      lastSeq?: bigint;
      lastBroadcastSeq?: bigint;
      tags: string[];
    }
  | { type: "bindOk"; app: string; user: string }
  | { type: "bindErr"; app: string; code: number; message: string }
  | { type: "ping" }
  | { type: "pong" }
  | { type: "push"; app: string; messageId: Uint8Array; seq: bigint; payload: Uint8Array }
  | { type: "ack"; app: string; seq: bigint }
  /** A message the app pushed with `"store": false`: no seq, not acked, never sent again. */
  | { type: "transient"; app: string; payload: Uint8Array }
  /**
   * With a `route` the data goes to that webhook route (on the wire op
   * UPSTREAM_ROUTED), else to the app's default route.
   */
  | { type: "upstream"; app: string; requestId: bigint; route?: string; payload: Uint8Array }
  | { type: "upstreamAck"; app: string; requestId: bigint; status: number }
  /** From the server, with the reason it unbound the app (deleted). */
  | { type: "unbind"; app: string; reason?: number }
  | { type: "goAway"; reason: number; reconnectDelayMs?: number }
  | { type: "error"; code: number; message: string }
  | { type: "broadcast"; app: string; messageId: Uint8Array; seq: bigint; payload: Uint8Array }
  | { type: "broadcastAck"; app: string; seq: bigint }
  | { type: "reset"; app: string; sequence: ResetSequence; after: bigint }
  /** Client to server: the interval about to be used; server to client: the interval in force. */
  | { type: "heartbeat"; intervalMs: number }
  /**
   * Message `seq` pushed to be pulled: its size and hint, not its body; pull
   * it after a random delay of up to `pullSpreadMs`, ack it as a PUSH.
   */
  | {
      type: "notify";
      app: string;
      messageId: Uint8Array;
      seq: bigint;
      size: number;
      pullSpreadMs: number;
      hint: string;
    }
  | { type: "pull"; app: string; seq: bigint }
  /** `messageId` is all zeros and `payload` empty unless `status` is ok. */
  | { type: "pullReply"; app: string; seq: bigint; status: number; messageId: Uint8Array; payload: Uint8Array }
  /**
   * After BIND_OK: the server closed this device's previous connection of
   * `app` at its heartbeat deadline, `closedAgoMs` before the bind, while it
   * pinged at `intervalMs` on `network`.
   */
  | { type: "sessionTimedOut"; app: string; network: number; intervalMs: number; closedAgoMs: number };

export type FrameType = Frame["type"];
/** The frame of one type, e.g. `FrameOf<"push">`. */
export type FrameOf<T extends FrameType> = Extract<Frame, { type: T }>;

const OP_OF: { [T in FrameType]: Op } = {
  hello: Op.Hello,
  helloOk: Op.HelloOk,
  bind: Op.Bind,
  bindOk: Op.BindOk,
  bindErr: Op.BindErr,
  ping: Op.Ping,
  pong: Op.Pong,
  push: Op.Push,
  ack: Op.Ack,
  transient: Op.Transient,
  upstream: Op.Upstream,
  upstreamAck: Op.UpstreamAck,
  unbind: Op.Unbind,
  goAway: Op.GoAway,
  error: Op.Error,
  broadcast: Op.Broadcast,
  broadcastAck: Op.BroadcastAck,
  reset: Op.Reset,
  heartbeat: Op.Heartbeat,
  notify: Op.Notify,
  pull: Op.Pull,
  pullReply: Op.PullReply,
  sessionTimedOut: Op.SessionTimedOut,
};

/** The op byte of a frame. */
export function frameOp(frame: Frame): Op {
  if (frame.type === "upstream" && frame.route !== undefined) return Op.UpstreamRouted;
  return OP_OF[frame.type];
}

export type DecodeErrorKind =
  | "frame_too_large"
  | "frame_too_short"
  | "unsupported_version"
  | "unknown_op"
  | "truncated"
  | "trailing_bytes"
  | "field_too_long"
  | "empty_field"
  | "invalid_utf8"
  | "invalid_tag"
  | "invalid_code"
  | "not_one_frame";

/**
 * Why bytes from the peer are not a v1 frame. Every kind is final for the
 * connection: the receiver sends ERROR with `errorCode` and closes.
 */
export class DecodeError extends Error {
  readonly kind: DecodeErrorKind;
  /** The field at fault, for the field kinds. */
  readonly field: string | undefined;
  /** The op of the frame, for `truncated` and `trailing_bytes`; the unknown op for `unknown_op`. */
  readonly op: number | undefined;

  constructor(kind: DecodeErrorKind, message: string, details: { field?: string; op?: number } = {}) {
    super(message);
    this.name = "DecodeError";
    this.kind = kind;
    this.field = details.field;
    this.op = details.op;
  }

  /**
   * The ERROR code to report to the peer: only the two failures a peer can
   * act on (a smaller frame, another version) get their own code.
   */
  get errorCode(): number {
    switch (this.kind) {
      case "frame_too_large":
        return ErrorCode.FrameTooLarge;
      case "unsupported_version":
        return ErrorCode.UnsupportedVersion;
      default:
        return ErrorCode.MalformedFrame;
    }
  }
}

export type EncodeErrorKind = "field_too_long" | "empty_field" | "invalid_value";

/**
 * Why a frame cannot be encoded: a field breaks a limit the decoder
 * enforces (so a conforming peer would refuse it), or is not a value of its
 * wire type.
 */
export class EncodeError extends Error {
  readonly kind: EncodeErrorKind;
  readonly field: string;

  constructor(kind: EncodeErrorKind, field: string, message?: string) {
    super(
      message ??
        (kind === "field_too_long"
          ? `field ${field} is longer than its limit`
          : kind === "empty_field"
            ? `field ${field} must not be empty`
            : `field ${field} is not a valid value`),
    );
    this.name = "EncodeError";
    this.kind = kind;
    this.field = field;
  }
}

/** A string field: its name, byte limit, whether it may be empty, and its length prefix size. */
interface StrField {
  readonly name: string;
  readonly lenMax: number;
  readonly nonEmpty: boolean;
  readonly wide: boolean;
}

const APP: StrField = { name: "app", lenMax: APP_ID_LEN_MAX, nonEmpty: true, wide: false };
const USER: StrField = { name: "user", lenMax: USER_ID_LEN_MAX, nonEmpty: true, wide: false };
const DEVICE_ID: StrField = { name: "device_id", lenMax: DEVICE_ID_LEN_MAX, nonEmpty: true, wide: false };
const CLIENT_VERSION: StrField = {
  name: "client_version",
  lenMax: CLIENT_VERSION_LEN_MAX,
  nonEmpty: false,
  wide: false,
};
const TOKEN: StrField = { name: "token", lenMax: TOKEN_LEN_MAX, nonEmpty: false, wide: true };
const TAG: StrField = { name: "tag", lenMax: TAG_LEN_MAX, nonEmpty: true, wide: false };
const ROUTE: StrField = { name: "route", lenMax: ROUTE_LEN_MAX, nonEmpty: true, wide: false };
const TEXT: StrField = { name: "message", lenMax: TEXT_LEN_MAX, nonEmpty: false, wide: true };
const HINT: StrField = { name: "hint", lenMax: HINT_LEN_MAX, nonEmpty: false, wide: true };

const U64_MAX = (1n << 64n) - 1n;
const utf8Encoder = new TextEncoder();
// fatal: invalid UTF-8 is an error, not U+FFFD; ignoreBOM: a leading U+FEFF
// is part of the string, as in Rust, not stripped.
const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** Whether a JS string has no lone surrogate, so it has a UTF-8 form. */
function isWellFormed(value: string): boolean {
  for (let i = 0; i < value.length; i++) {
    const unit = value.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdbff) {
      const next = value.charCodeAt(i + 1);
      if (!(next >= 0xdc00 && next <= 0xdfff)) return false;
      i++;
    } else if (unit >= 0xdc00 && unit <= 0xdfff) {
      return false;
    }
  }
  return true;
}

/** The UTF-8 bytes of a string field, checked against its limits. */
function strBytes(field: StrField, value: unknown): Uint8Array {
  if (typeof value !== "string") {
    throw new EncodeError("invalid_value", field.name, `field ${field.name} must be a string`);
  }
  if (!isWellFormed(value)) {
    throw new EncodeError(
      "invalid_value",
      field.name,
      `field ${field.name} has a lone surrogate (no UTF-8 form)`,
    );
  }
  const bytes = utf8Encoder.encode(value);
  if (bytes.length > field.lenMax) throw new EncodeError("field_too_long", field.name);
  if (field.nonEmpty && bytes.length === 0) throw new EncodeError("empty_field", field.name);
  return bytes;
}

function checkPayload(payload: unknown): Uint8Array {
  if (!(payload instanceof Uint8Array)) {
    throw new EncodeError("invalid_value", "payload", "field payload must be a Uint8Array");
  }
  if (payload.length > PAYLOAD_LEN_MAX) throw new EncodeError("field_too_long", "payload");
  return payload;
}

function checkInt(field: string, value: unknown, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > max) {
    throw new EncodeError("invalid_value", field, `field ${field} must be an integer in 0..=${max}`);
  }
  return value;
}

function checkU64(field: string, value: unknown): bigint {
  if (typeof value !== "bigint" || value < 0n || value > U64_MAX) {
    throw new EncodeError("invalid_value", field, `field ${field} must be a bigint in 0..=2^64-1`);
  }
  return value;
}

function checkOptU64(field: string, value: unknown): bigint | undefined {
  return value === undefined || value === null ? undefined : checkU64(field, value);
}

function checkMessageId(value: unknown): Uint8Array {
  if (!(value instanceof Uint8Array) || value.length !== MESSAGE_ID_LEN) {
    throw new EncodeError("invalid_value", "message_id", "field message_id must be 16 bytes");
  }
  return value;
}

/** Builds a body from checked parts; sizes are known before anything is written. */
class Writer {
  private readonly parts: Array<(view: DataView, bytes: Uint8Array, at: number) => number> = [];
  private size = 0;

  u8(value: number): void {
    this.size += 1;
    this.parts.push((view, _b, at) => (view.setUint8(at, value), 1));
  }
  u16(value: number): void {
    this.size += 2;
    this.parts.push((view, _b, at) => (view.setUint16(at, value), 2));
  }
  u32(value: number): void {
    this.size += 4;
    this.parts.push((view, _b, at) => (view.setUint32(at, value), 4));
  }
  u64(value: bigint): void {
    this.size += 8;
    this.parts.push((view, _b, at) => (view.setBigUint64(at, value), 8));
  }
  raw(value: Uint8Array): void {
    this.size += value.length;
    this.parts.push((_v, bytes, at) => (bytes.set(value, at), value.length));
  }
  str(field: StrField, value: Uint8Array): void {
    if (field.wide) this.u16(value.length);
    else this.u8(value.length);
    this.raw(value);
  }
  optU64(value: bigint | undefined): void {
    if (value === undefined) {
      this.u8(0);
    } else {
      this.u8(1);
      this.u64(value);
    }
  }

  finish(op: Op): Uint8Array {
    const bodyLen = 2 + this.size;
    if (bodyLen > FRAME_BODY_LEN_MAX) {
      // Unreachable with the field limits above; kept as a last guard.
      throw new EncodeError("field_too_long", "frame");
    }
    const bytes = new Uint8Array(LENGTH_PREFIX_LEN + bodyLen);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, bodyLen);
    view.setUint8(4, PROTOCOL_VERSION);
    view.setUint8(5, op);
    let at = 6;
    for (const part of this.parts) at += part(view, bytes, at);
    return bytes;
  }
}

/**
 * Encodes one whole frame, length prefix included. Every limit the decoder
 * enforces is checked first (throwing `EncodeError`), so nothing this
 * returns is refused by a conforming peer.
 */
export function encodeFrame(frame: Frame): Uint8Array {
  const w = new Writer();
  switch (frame.type) {
    case "hello": {
      const deviceId = strBytes(DEVICE_ID, frame.deviceId);
      const clientVersion = strBytes(CLIENT_VERSION, frame.clientVersion);
      const network = checkInt("network", frame.network, 0xff);
      const features = checkInt("features", frame.features ?? 0, 0xffff_ffff);
      w.str(DEVICE_ID, deviceId);
      w.str(CLIENT_VERSION, clientVersion);
      w.u8(network);
      // A field that came later in v1: a HELLO without features is written
      // as before, so a server that predates the field reads it.
      if (features !== 0) w.u32(features);
      break;
    }
    case "helloOk": {
      w.u32(checkInt("heartbeat_interval_ms", frame.heartbeatIntervalMs, 0xffff_ffff));
      const epoch = checkOptU64("storage_epoch", frame.storageEpoch);
      // A field that came later in v1: written only when present.
      if (epoch !== undefined) w.u64(epoch);
      break;
    }
    case "bind": {
      const app = strBytes(APP, frame.app);
      const token = strBytes(TOKEN, frame.token);
      const lastSeq = checkOptU64("last_seq", frame.lastSeq);
      const lastBroadcastSeq = checkOptU64("last_broadcast_seq", frame.lastBroadcastSeq);
      const tagList: unknown = frame.tags ?? [];
      if (!Array.isArray(tagList)) throw new EncodeError("invalid_value", "tags", "field tags must be an array");
      if (tagList.length > TAGS_PER_BIND_MAX) throw new EncodeError("field_too_long", "tags");
      const tags = tagList.map((tag) => strBytes(TAG, tag));
      w.str(APP, app);
      w.str(TOKEN, token);
      w.optU64(lastSeq);
      // A BIND without broadcast fields is written as it was before they
      // existed, so every v1 peer reads it.
      if (lastBroadcastSeq !== undefined || tags.length > 0) {
        w.optU64(lastBroadcastSeq);
        w.u8(tags.length);
        for (const tag of tags) w.str(TAG, tag);
      }
      break;
    }
    case "bindOk": {
      const app = strBytes(APP, frame.app);
      const user = strBytes(USER, frame.user);
      w.str(APP, app);
      w.str(USER, user);
      break;
    }
    case "bindErr": {
      const app = strBytes(APP, frame.app);
      const code = checkInt("code", frame.code, 0xffff);
      const message = strBytes(TEXT, frame.message);
      w.str(APP, app);
      w.u16(code);
      w.str(TEXT, message);
      break;
    }
    case "ping":
    case "pong":
      break;
    case "push":
    case "broadcast": {
      const app = strBytes(APP, frame.app);
      const messageId = checkMessageId(frame.messageId);
      const seq = checkU64("seq", frame.seq);
      const payload = checkPayload(frame.payload);
      w.str(APP, app);
      w.raw(messageId);
      w.u64(seq);
      w.raw(payload);
      break;
    }
    case "ack":
    case "broadcastAck":
    case "pull": {
      const app = strBytes(APP, frame.app);
      const seq = checkU64("seq", frame.seq);
      w.str(APP, app);
      w.u64(seq);
      break;
    }
    case "transient": {
      const app = strBytes(APP, frame.app);
      const payload = checkPayload(frame.payload);
      w.str(APP, app);
      w.raw(payload);
      break;
    }
    case "upstream": {
      const app = strBytes(APP, frame.app);
      const requestId = checkU64("request_id", frame.requestId);
      const route = frame.route === undefined ? undefined : strBytes(ROUTE, frame.route);
      const payload = checkPayload(frame.payload);
      w.str(APP, app);
      w.u64(requestId);
      if (route !== undefined) w.str(ROUTE, route);
      w.raw(payload);
      break;
    }
    case "upstreamAck": {
      const app = strBytes(APP, frame.app);
      const requestId = checkU64("request_id", frame.requestId);
      const status = checkInt("status", frame.status, 0xffff);
      w.str(APP, app);
      w.u64(requestId);
      w.u16(status);
      break;
    }
    case "unbind": {
      const app = strBytes(APP, frame.app);
      const reason =
        frame.reason === undefined ? undefined : checkInt("reason", frame.reason, 0xffff);
      w.str(APP, app);
      if (reason !== undefined) w.u16(reason);
      break;
    }
    case "goAway": {
      const reason = checkInt("reason", frame.reason, 0xffff);
      const delay =
        frame.reconnectDelayMs === undefined || frame.reconnectDelayMs === null
          ? undefined
          : checkInt("reconnect_delay_ms", frame.reconnectDelayMs, 0xffff_ffff);
      w.u16(reason);
      if (delay === undefined) {
        w.u8(0);
      } else {
        w.u8(1);
        w.u32(delay);
      }
      break;
    }
    case "error": {
      const code = checkInt("code", frame.code, 0xffff);
      const message = strBytes(TEXT, frame.message);
      w.u16(code);
      w.str(TEXT, message);
      break;
    }
    case "reset": {
      const app = strBytes(APP, frame.app);
      if (frame.sequence !== ResetSequence.Inbox && frame.sequence !== ResetSequence.Broadcasts) {
        throw new EncodeError("invalid_value", "sequence", "field sequence must be 0 or 1");
      }
      const after = checkU64("after", frame.after);
      w.str(APP, app);
      w.u8(frame.sequence);
      w.u64(after);
      break;
    }
    case "heartbeat":
      w.u32(checkInt("interval_ms", frame.intervalMs, 0xffff_ffff));
      break;
    case "notify": {
      const app = strBytes(APP, frame.app);
      const messageId = checkMessageId(frame.messageId);
      const seq = checkU64("seq", frame.seq);
      const size = checkInt("size", frame.size, 0xffff_ffff);
      const pullSpreadMs = checkInt("pull_spread_ms", frame.pullSpreadMs, 0xffff_ffff);
      const hint = strBytes(HINT, frame.hint);
      w.str(APP, app);
      w.raw(messageId);
      w.u64(seq);
      w.u32(size);
      w.u32(pullSpreadMs);
      w.str(HINT, hint);
      break;
    }
    case "pullReply": {
      const app = strBytes(APP, frame.app);
      const seq = checkU64("seq", frame.seq);
      const status = checkInt("status", frame.status, 0xffff);
      const messageId = checkMessageId(frame.messageId);
      const payload = checkPayload(frame.payload);
      w.str(APP, app);
      w.u64(seq);
      w.u16(status);
      w.raw(messageId);
      w.raw(payload);
      break;
    }
    case "sessionTimedOut": {
      const app = strBytes(APP, frame.app);
      const network = checkInt("network", frame.network, 0xff);
      const intervalMs = checkInt("interval_ms", frame.intervalMs, 0xffff_ffff);
      const closedAgoMs = checkInt("closed_ago_ms", frame.closedAgoMs, 0xffff_ffff);
      w.str(APP, app);
      w.u8(network);
      w.u32(intervalMs);
      w.u32(closedAgoMs);
      break;
    }
    default: {
      const unknown: { type?: unknown } = frame;
      throw new EncodeError("invalid_value", "type", `unknown frame type ${String(unknown.type)}`);
    }
  }
  return w.finish(frameOp(frame));
}

/** Reads the fields of one frame body. */
class Reader {
  private at: number;
  private readonly view: DataView;

  constructor(
    private readonly op: Op,
    private readonly body: Uint8Array,
  ) {
    this.at = 2;
    this.view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  }

  get remaining(): number {
    return this.body.length - this.at;
  }

  private need(n: number): number {
    if (this.remaining < n) {
      throw new DecodeError("truncated", `${opName(this.op)} frame ends in the middle of a field`, {
        op: this.op,
      });
    }
    const at = this.at;
    this.at += n;
    return at;
  }

  take(n: number): Uint8Array {
    const at = this.need(n);
    return this.body.slice(at, at + n);
  }
  u8(): number {
    return this.view.getUint8(this.need(1));
  }
  u16(): number {
    return this.view.getUint16(this.need(2));
  }
  u32(): number {
    return this.view.getUint32(this.need(4));
  }
  u64(): bigint {
    return this.view.getBigUint64(this.need(8));
  }

  str(field: StrField): string {
    const len = field.wide ? this.u16() : this.u8();
    // The limit is checked before the bytes are waited for or read.
    if (len > field.lenMax) {
      throw new DecodeError("field_too_long", `field ${field.name} is longer than its limit`, {
        field: field.name,
      });
    }
    if (field.nonEmpty && len === 0) {
      throw new DecodeError("empty_field", `field ${field.name} must not be empty`, { field: field.name });
    }
    const at = this.need(len);
    try {
      return utf8Decoder.decode(this.body.subarray(at, at + len));
    } catch {
      throw new DecodeError("invalid_utf8", `field ${field.name} is not valid UTF-8`, { field: field.name });
    }
  }

  tag(field: string): boolean {
    const tag = this.u8();
    if (tag === 0) return false;
    if (tag === 1) return true;
    throw new DecodeError("invalid_tag", `field ${field} has an invalid presence tag`, { field });
  }

  optU64(field: string): bigint | undefined {
    return this.tag(field) ? this.u64() : undefined;
  }

  payload(): Uint8Array {
    if (this.remaining > PAYLOAD_LEN_MAX) {
      throw new DecodeError("field_too_long", "field payload is longer than its limit", { field: "payload" });
    }
    return this.take(this.remaining);
  }

  finish(): void {
    if (this.remaining !== 0) {
      throw new DecodeError("trailing_bytes", `${opName(this.op)} frame has bytes after its last field`, {
        op: this.op,
      });
    }
  }
}

function isOp(byte: number): byte is Op {
  return byte >= Op.Hello && byte <= Op.SessionTimedOut;
}

function decodeBody(body: Uint8Array): Frame {
  const version = body[0]!;
  if (version !== PROTOCOL_VERSION) {
    throw new DecodeError(
      "unsupported_version",
      `unsupported protocol version ${version} (this side speaks ${PROTOCOL_VERSION})`,
    );
  }
  const opByte = body[1]!;
  if (!isOp(opByte)) {
    throw new DecodeError("unknown_op", `unknown op 0x${opByte.toString(16).padStart(2, "0")}`, { op: opByte });
  }
  const r = new Reader(opByte, body);
  let frame: Frame;
  switch (opByte) {
    case Op.Hello: {
      const deviceId = r.str(DEVICE_ID);
      const clientVersion = r.str(CLIENT_VERSION);
      const byte = r.u8();
      const network = byte <= NetworkType.Cellular5g ? byte : NetworkType.Unknown;
      // features came later in v1: the frame may end before it.
      const features = r.remaining === 0 ? 0 : r.u32();
      frame = { type: "hello", deviceId, clientVersion, network, features };
      break;
    }
    case Op.HelloOk: {
      const heartbeatIntervalMs = r.u32();
      // storage_epoch came later in v1: the frame may end before it.
      frame = r.remaining === 0 ? { type: "helloOk", heartbeatIntervalMs } : { type: "helloOk", heartbeatIntervalMs, storageEpoch: r.u64() };
      break;
    }
    case Op.Bind: {
      const app = r.str(APP);
      const token = r.str(TOKEN);
      const lastSeq = r.optU64("last_seq");
      let lastBroadcastSeq: bigint | undefined;
      const tags: string[] = [];
      // The broadcast fields came later in v1: a BIND may end here.
      if (r.remaining > 0) {
        lastBroadcastSeq = r.optU64("last_broadcast_seq");
        const count = r.u8();
        if (count > TAGS_PER_BIND_MAX) {
          throw new DecodeError("field_too_long", "field tags is longer than its limit", { field: "tags" });
        }
        for (let i = 0; i < count; i++) tags.push(r.str(TAG));
      }
      const bind: FrameOf<"bind"> = { type: "bind", app, token, tags };
      if (lastSeq !== undefined) bind.lastSeq = lastSeq;
      if (lastBroadcastSeq !== undefined) bind.lastBroadcastSeq = lastBroadcastSeq;
      frame = bind;
      break;
    }
    case Op.BindOk: {
      const app = r.str(APP);
      frame = { type: "bindOk", app, user: r.str(USER) };
      break;
    }
    case Op.BindErr: {
      const app = r.str(APP);
      const code = r.u16();
      frame = { type: "bindErr", app, code, message: r.str(TEXT) };
      break;
    }
    case Op.Ping:
      frame = { type: "ping" };
      break;
    case Op.Pong:
      frame = { type: "pong" };
      break;
    case Op.Push:
    case Op.Broadcast: {
      const app = r.str(APP);
      const messageId = r.take(MESSAGE_ID_LEN);
      const seq = r.u64();
      const payload = r.payload();
      frame = { type: opByte === Op.Push ? "push" : "broadcast", app, messageId, seq, payload };
      break;
    }
    case Op.Ack:
    case Op.BroadcastAck:
    case Op.Pull: {
      const app = r.str(APP);
      const type = opByte === Op.Ack ? "ack" : opByte === Op.Pull ? "pull" : "broadcastAck";
      frame = { type, app, seq: r.u64() };
      break;
    }
    case Op.Notify: {
      const app = r.str(APP);
      const messageId = r.take(MESSAGE_ID_LEN);
      const seq = r.u64();
      const size = r.u32();
      const pullSpreadMs = r.u32();
      frame = { type: "notify", app, messageId, seq, size, pullSpreadMs, hint: r.str(HINT) };
      break;
    }
    case Op.PullReply: {
      const app = r.str(APP);
      const seq = r.u64();
      const status = r.u16();
      const messageId = r.take(MESSAGE_ID_LEN);
      frame = { type: "pullReply", app, seq, status, messageId, payload: r.payload() };
      break;
    }
    case Op.Transient: {
      const app = r.str(APP);
      frame = { type: "transient", app, payload: r.payload() };
      break;
    }
    case Op.Upstream: {
      const app = r.str(APP);
      const requestId = r.u64();
      frame = { type: "upstream", app, requestId, payload: r.payload() };
      break;
    }
    case Op.UpstreamRouted: {
      const app = r.str(APP);
      const requestId = r.u64();
      const route = r.str(ROUTE);
      frame = { type: "upstream", app, requestId, route, payload: r.payload() };
      break;
    }
    case Op.UpstreamAck: {
      const app = r.str(APP);
      const requestId = r.u64();
      frame = { type: "upstreamAck", app, requestId, status: r.u16() };
      break;
    }
    case Op.Unbind: {
      const app = r.str(APP);
      frame = r.remaining === 0 ? { type: "unbind", app } : { type: "unbind", app, reason: r.u16() };
      break;
    }
    case Op.GoAway: {
      const reason = r.u16();
      frame = r.tag("reconnect_delay_ms")
        ? { type: "goAway", reason, reconnectDelayMs: r.u32() }
        : { type: "goAway", reason };
      break;
    }
    case Op.Error: {
      const code = r.u16();
      frame = { type: "error", code, message: r.str(TEXT) };
      break;
    }
    case Op.Reset: {
      const app = r.str(APP);
      const sequence = r.u8();
      if (sequence !== ResetSequence.Inbox && sequence !== ResetSequence.Broadcasts) {
        throw new DecodeError("invalid_code", "field sequence has a value this version does not define", {
          field: "sequence",
        });
      }
      frame = { type: "reset", app, sequence, after: r.u64() };
      break;
    }
    case Op.Heartbeat:
      frame = { type: "heartbeat", intervalMs: r.u32() };
      break;
    case Op.SessionTimedOut: {
      const app = r.str(APP);
      const network = r.u8();
      const intervalMs = r.u32();
      frame = { type: "sessionTimedOut", app, network, intervalMs, closedAgoMs: r.u32() };
      break;
    }
  }
  r.finish();
  return frame;
}

/**
 * Decodes one frame from the start of `src`. `null`: more bytes are needed.
 * Otherwise the frame and how many bytes of `src` it took. The length is
 * checked from the prefix alone, before the body is waited for. Payloads
 * and message ids are copies, so the caller may reuse `src`. Throws
 * `DecodeError`.
 */
export function decodeFrame(src: Uint8Array): { frame: Frame; used: number } | null {
  if (src.length < LENGTH_PREFIX_LEN) return null;
  const len = new DataView(src.buffer, src.byteOffset, src.byteLength).getUint32(0);
  if (len > FRAME_BODY_LEN_MAX) {
    throw new DecodeError(
      "frame_too_large",
      `frame length ${len} exceeds the maximum of ${FRAME_BODY_LEN_MAX} bytes`,
    );
  }
  if (len < FRAME_BODY_LEN_MIN) {
    throw new DecodeError("frame_too_short", `frame length ${len} is below the minimum of ${FRAME_BODY_LEN_MIN} bytes`);
  }
  const end = LENGTH_PREFIX_LEN + len;
  if (src.length < end) return null;
  return { frame: decodeBody(src.subarray(LENGTH_PREFIX_LEN, end)), used: end };
}

/**
 * Decodes one WebSocket message, which must carry exactly one whole frame
 * (docs/protocol.md, Transports): a message too short for its frame, or
 * with bytes after it, is `malformed_frame` (kind `not_one_frame`).
 */
export function decodeMessage(message: Uint8Array): Frame {
  const decoded = decodeFrame(message);
  if (decoded === null) {
    throw new DecodeError("not_one_frame", `a ${message.length}-byte message does not hold a whole frame`);
  }
  if (decoded.used !== message.length) {
    throw new DecodeError(
      "not_one_frame",
      `a message has ${message.length - decoded.used} bytes after its frame`,
    );
  }
  return decoded.frame;
}

/** 16 raw bytes as 32 lowercase hex digits. */
export function toHex(bytes: Uint8Array): string {
  let out = "";
  for (const byte of bytes) out += byte.toString(16).padStart(2, "0");
  return out;
}

/** Hex digits (spaces allowed between them) as bytes. */
export function fromHex(text: string): Uint8Array {
  const digits = text.replace(/\s+/g, "");
  if (digits.length % 2 !== 0 || /[^0-9a-fA-F]/.test(digits)) {
    throw new TypeError(`not hex: ${JSON.stringify(text)}`);
  }
  const bytes = new Uint8Array(digits.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(digits.slice(2 * i, 2 * i + 2), 16);
  return bytes;
}
