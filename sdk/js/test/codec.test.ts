import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import {
  APP_ID_LEN_MAX,
  CLIENT_VERSION_LEN_MAX,
  DEVICE_ID_LEN_MAX,
  DecodeError,
  EncodeError,
  ErrorCode,
  FRAME_BODY_LEN_MAX,
  Features,
  type Frame,
  type FrameOf,
  HINT_LEN_MAX,
  LENGTH_PREFIX_LEN,
  PAYLOAD_LEN_MAX,
  PullStatus,
  TAGS_PER_BIND_MAX,
  TEXT_LEN_MAX,
  TOKEN_LEN_MAX,
  decodeFrame,
  decodeMessage,
  encodeFrame,
  fromHex,
  pullStatusName,
  toHex,
} from "herald-client";

const ascii = (text: string): Uint8Array => new TextEncoder().encode(text);
const ID = ascii("0123456789abcdef");

/**
 * The frame each worked example of docs/protocol.md decodes to, by the
 * example's bold name ("NAME (2)" for the second under one name, "The
 * same NAME ..."). The bytes come from the document itself.
 */
const DOCUMENTED: Record<string, Frame> = {
  HELLO: { type: "hello", deviceId: "dev1", clientVersion: "1.0", network: 1, features: 0 },
  "HELLO (2)": {
    type: "hello",
    deviceId: "dev1",
    clientVersion: "1.0",
    network: 1,
    features: Features.Transient | Features.Notify | Features.SessionTimedOut,
  },
  HELLO_OK: { type: "helloOk", heartbeatIntervalMs: 120_000, storageEpoch: 7n },
  BIND: { type: "bind", app: "chat", token: "tok", lastSeq: 7n, tags: [] },
  BIND_OK: { type: "bindOk", app: "chat", user: "alice" },
  BIND_ERR: { type: "bindErr", app: "chat", code: 2, message: "expired" },
  PING: { type: "ping" },
  PONG: { type: "pong" },
  HEARTBEAT: { type: "heartbeat", intervalMs: 90_000 },
  PUSH: { type: "push", app: "chat", messageId: ID, seq: 1n, payload: ascii("hi") },
  ACK: { type: "ack", app: "chat", seq: 1n },
  NOTIFY: { type: "notify", app: "chat", messageId: ID, seq: 3n, size: 40_000, pullSpreadMs: 5_000, hint: "news" },
  PULL: { type: "pull", app: "chat", seq: 3n },
  PULL_REPLY: { type: "pullReply", app: "chat", seq: 3n, status: PullStatus.Ok, messageId: ID, payload: ascii("hi") },
  SESSION_TIMED_OUT: { type: "sessionTimedOut", app: "chat", network: 2, intervalMs: 45_000, closedAgoMs: 1_500 },
  TRANSIENT: { type: "transient", app: "chat", payload: ascii("hi") },
  UPSTREAM: { type: "upstream", app: "chat", requestId: 5n, payload: ascii("up") },
  UPSTREAM_ROUTED: { type: "upstream", app: "chat", requestId: 5n, route: "orders", payload: ascii("up") },
  UPSTREAM_ACK: { type: "upstreamAck", app: "chat", requestId: 5n, status: 0 },
  UNBIND: { type: "unbind", app: "chat" },
  "UNBIND (2)": { type: "unbind", app: "chat", reason: 1 },
  GOAWAY: { type: "goAway", reason: 2, reconnectDelayMs: 1000 },
  RESET: { type: "reset", app: "chat", sequence: 0, after: 0n },
  ERROR: { type: "error", code: 1, message: "bad" },
};

/** Vectors the document does not show (it has no BROADCAST or BROADCAST_ACK example), worked out by hand. */
const EXTRA: Array<[string, Frame]> = [
  [
    "00000021 01 0f 04 63686174 30313233343536373839616263646566 0000000000000001 6869",
    { type: "broadcast", app: "chat", messageId: ID, seq: 1n, payload: ascii("hi") },
  ],
  ["0000000f 01 10 04 63686174 0000000000000001", { type: "broadcastAck", app: "chat", seq: 1n }],
  [
    "00000024 01 03 04 63686174 0003 746f6b 00 01 0000000000000003 01 0c 706c6174666f726d3d776562",
    { type: "bind", app: "chat", token: "tok", lastBroadcastSeq: 3n, tags: ["platform=web"] },
  ],
  [
    "00000017 01 03 04 63686174 0003 746f6b 01 0000000000000007 00 00",
    { type: "bind", app: "chat", token: "tok", lastSeq: 7n, tags: [] },
  ],
  ["00000006 01 02 0001d4c0", { type: "helloOk", heartbeatIntervalMs: 120_000 }],
  ["00000005 01 0d 0001 00", { type: "goAway", reason: 1 }],
  ["00000010 01 11 04 63686174 01 ffffffffffffffff", { type: "reset", app: "chat", sequence: 1, after: 2n ** 64n - 1n }],
  ["0000000b 01 05 04 63686174 0063 0000", { type: "bindErr", app: "chat", code: 99, message: "" }],
  [
    "00000029 01 15 04 63686174 00000000000000000000000000000000 0000000000000009 00000000 00000000 0000",
    { type: "notify", app: "chat", messageId: new Uint8Array(16), seq: 9n, size: 0, pullSpreadMs: 0, hint: "" },
  ],
  [
    "00000021 01 17 04 63686174 0000000000000003 0001 00000000000000000000000000000000",
    { type: "pullReply", app: "chat", seq: 3n, status: PullStatus.Gone, messageId: new Uint8Array(16), payload: new Uint8Array() },
  ],
];

/**
 * The examples of the "Worked examples" section, name and hex text: each
 * code block under a `**NAME**` paragraph, the second one (a variant, "The
 * same NAME ...") as "NAME (2)".
 */
function documentedExamples(): Map<string, string> {
  const doc = readFileSync(new URL("../../../../docs/protocol.md", import.meta.url), "utf8");
  const start = doc.indexOf("\n## Worked examples");
  assert.ok(start >= 0, "docs/protocol.md has a Worked examples section");
  const next = doc.indexOf("\n## ", start + 1);
  const section = doc.slice(start, next < 0 ? undefined : next);
  const examples = new Map<string, string>();
  // split with a capturing group: [before, name, its text, name, its text, ...]
  const parts = section.split(/^\*\*([A-Z_]+)\*\*/m);
  for (let i = 1; i < parts.length; i += 2) {
    const name = parts[i]!;
    assert.ok(!examples.has(name), `one example paragraph for ${name}`);
    let n = 0;
    for (const [, hex] of parts[i + 1]!.matchAll(/^```\n([\s\S]*?)\n```/gm)) {
      n++;
      examples.set(n === 1 ? name : `${name} (${n})`, hex!.trim());
    }
    assert.ok(n > 0, `${name} has its bytes`);
  }
  return examples;
}

const unhex = fromHex;

/** A frame of the given body (hex), its length prefix added. */
function withLength(bodyHex: string): Uint8Array {
  const body = unhex(bodyHex);
  const bytes = new Uint8Array(4 + body.length);
  new DataView(bytes.buffer).setUint32(0, body.length);
  bytes.set(body, 4);
  return bytes;
}

function decodeError(bytes: Uint8Array): DecodeError {
  try {
    decodeFrame(bytes);
  } catch (error) {
    assert.ok(error instanceof DecodeError, `a DecodeError, not ${String(error)}`);
    return error;
  }
  assert.fail(`${toHex(bytes)} decoded`);
}

function encodeError(frame: Frame): EncodeError {
  try {
    encodeFrame(frame);
  } catch (error) {
    assert.ok(error instanceof EncodeError, `an EncodeError, not ${String(error)}`);
    return error;
  }
  assert.fail(`${JSON.stringify(frame, (_k, v: unknown) => (typeof v === "bigint" ? `${v}n` : v))} encoded`);
}

describe("golden vectors", () => {
  const examples = documentedExamples();

  test("every worked example of docs/protocol.md is covered, and only those", () => {
    assert.deepEqual([...examples.keys()].sort(), Object.keys(DOCUMENTED).sort());
  });

  for (const [name, frame] of Object.entries(DOCUMENTED)) {
    test(`${name}: encodes to the documented bytes and decodes back`, () => {
      const text = examples.get(name);
      assert.ok(text !== undefined, `docs/protocol.md has an example for ${name}`);
      const bytes = unhex(text);
      assert.equal(toHex(encodeFrame(frame)), toHex(bytes));
      assert.deepEqual(decodeFrame(bytes), { frame, used: bytes.length });
      assert.deepEqual(decodeMessage(bytes), frame);
    });
  }

  test("vectors the document does not show", () => {
    for (const [text, frame] of EXTRA) {
      const bytes = unhex(text);
      assert.deepEqual(decodeMessage(bytes), frame, text);
      // A BIND with an absent last_broadcast_seq and no tags is written without the broadcast fields.
      if (!(frame.type === "bind" && frame.lastBroadcastSeq === undefined && frame.tags.length === 0)) {
        assert.equal(toHex(encodeFrame(frame)), toHex(bytes), text);
      }
    }
  });
});

describe("decoding malformed input", () => {
  test("an oversized or undersized length is refused from the prefix alone", () => {
    const large = decodeError(Uint8Array.of(0, 1, 0, 1));
    assert.equal(large.kind, "frame_too_large");
    assert.equal(large.errorCode, ErrorCode.FrameTooLarge);
    assert.equal(decodeError(Uint8Array.of(0, 0, 0, 1)).kind, "frame_too_short");
    assert.equal(decodeError(unhex("00000000")).kind, "frame_too_short");
    assert.equal(decodeError(unhex("ffffffff")).kind, "frame_too_large");
  });

  test("partial input needs more, at every cut", () => {
    const bytes = unhex("0000000f 01 09 04 63686174 0000000000000001");
    for (let cut = 0; cut < bytes.length; cut++) {
      assert.equal(decodeFrame(bytes.subarray(0, cut)), null, `cut at ${cut}`);
    }
  });

  test("decodeFrame takes one frame and leaves the next", () => {
    const bytes = unhex("00000002 01 06 00000002 01 07 000000");
    assert.deepEqual(decodeFrame(bytes), { frame: { type: "ping" }, used: 6 });
    assert.deepEqual(decodeFrame(bytes.subarray(6)), { frame: { type: "pong" }, used: 6 });
    assert.equal(decodeFrame(bytes.subarray(12)), null);
  });

  test("malformed bodies are named", () => {
    const cases: Array<[string, DecodeError["kind"], Partial<DecodeError>]> = [
      ["02 06", "unsupported_version", {}],
      ["00 ee", "unsupported_version", {}], // the version is checked before the op
      ["01 ee", "unknown_op", { op: 0xee }],
      ["01 00", "unknown_op", { op: 0 }],
      ["01 19", "unknown_op", { op: 0x19 }],
      ["01 18 04 63686174 02 0000afc8", "truncated", { op: 0x18 }],
      ["01 18 04 63686174 02 0000afc8 000005dc 00", "trailing_bytes", { op: 0x18 }],
      ["01 06 00", "trailing_bytes", { op: 0x06 }],
      ["01 09 04 63", "truncated", { op: 0x09 }],
      ["01 09 00 0000000000000001", "empty_field", { field: "app" }],
      ["01 0d 0002 07", "invalid_tag", { field: "reconnect_delay_ms" }],
      ["01 0c 02 ffff", "invalid_utf8", { field: "app" }],
      // Field limits are checked before the bytes are read.
      ["01 0c 41", "field_too_long", { field: "app" }],
      ["01 03 04 63686174 0401", "field_too_long", { field: "token" }],
      ["01 01 00", "empty_field", { field: "device_id" }],
      ["01 03 04 63686174 0000 02 00000000", "invalid_tag", { field: "last_seq" }],
      ["01 03 04 63686174 0000 00 05 000000", "invalid_tag", { field: "last_broadcast_seq" }],
      ["01 03 04 63686174 0000 00 00 09", "field_too_long", { field: "tags" }],
      ["01 03 04 63686174 0000 00 00 01 00", "empty_field", { field: "tag" }],
      ["01 03 04 63686174 0000 00 00 01 41", "field_too_long", { field: "tag" }],
      ["01 03 04 63686174 0000 00 00 01 01", "truncated", { op: 0x03 }],
      ["01 03 04 63686174 0000 00 00", "truncated", { op: 0x03 }],
      ["01 02 0001d4c0 000000", "truncated", { op: 0x02 }], // a cut storage epoch
      ["01 02 0001d4c0 0000000000000007 00", "trailing_bytes", { op: 0x02 }],
      ["01 11 04 63686174 02 0000000000000000", "invalid_code", { field: "sequence" }],
      ["01 04 04 63686174", "truncated", { op: 0x04 }],
      ["01 04 04 63686174 00", "empty_field", { field: "user" }],
      ["01 04 04 63686174 81", "field_too_long", { field: "user" }],
      ["01 05 04 63686174 0001 0401", "field_too_long", { field: "message" }],
      ["01 0e 0001 0401", "field_too_long", { field: "message" }],
      ["01 08 04 63686174 30313233343536373839616263646566", "truncated", { op: 0x08 }],
      ["01 0b 04 63686174 0000000000000005", "truncated", { op: 0x0b }],
      ["01 0b 04 63686174 0000000000000005 000000", "trailing_bytes", { op: 0x0b }],
      ["01 0d 0002 01 00", "truncated", { op: 0x0d }],
      ["01 0d 0002 01 000003e8 00", "trailing_bytes", { op: 0x0d }],
      ["01 0e 0001", "truncated", { op: 0x0e }],
      ["01 01 04 64657631 03 312e30 01 0000", "truncated", { op: 0x01 }], // a cut features field
      ["01 01 04 64657631 03 312e30 01 00000003 00", "trailing_bytes", { op: 0x01 }],
      [`01 15 04 63686174 ${"00".repeat(16)} 0000000000000003 00009c40 00001388 0401`, "field_too_long", { field: "hint" }],
      [`01 15 04 63686174 ${"00".repeat(16)} 0000000000000003 00009c40 00001388 0001 ff`, "invalid_utf8", { field: "hint" }],
      [`01 15 04 63686174 ${"00".repeat(16)} 0000000000000003 00009c40 00001388`, "truncated", { op: 0x15 }],
      [`01 15 04 63686174 ${"00".repeat(16)} 0000000000000003 00009c40 00001388 0000 00`, "trailing_bytes", { op: 0x15 }],
      ["01 16 00 0000000000000003", "empty_field", { field: "app" }],
      ["01 16 04 63686174 0000000000000003 00", "trailing_bytes", { op: 0x16 }],
      ["01 16 04 63686174 00000003", "truncated", { op: 0x16 }],
      ["01 17 04 63686174 0000000000000003 0000 3031", "truncated", { op: 0x17 }],
      // Overlong and surrogate UTF-8 forms are invalid, as in Rust.
      ["01 0c 02 c0af", "invalid_utf8", { field: "app" }],
      ["01 0c 03 eda080", "invalid_utf8", { field: "app" }],
    ];
    // Each case is a body; the length prefix is its length.
    for (const [text, kind, details] of cases) {
      const error = decodeError(withLength(text));
      assert.equal(error.kind, kind, text);
      for (const [key, value] of Object.entries(details)) {
        assert.equal((error as unknown as Record<string, unknown>)[key], value, `${text}: ${key}`);
      }
      const expectedCode =
        kind === "unsupported_version" ? ErrorCode.UnsupportedVersion : ErrorCode.MalformedFrame;
      assert.equal(error.errorCode, expectedCode, text);
    }
  });

  test("a PUSH or PULL_REPLY payload one byte over the limit is refused, though the frame fits", () => {
    // After the app `a`: PUSH's message id and seq; PULL_REPLY's seq, status and message id.
    for (const [op, fields] of [
      [0x08, 16 + 8],
      [0x17, 8 + 2 + 16],
    ]) {
      const bodyLen = 2 + 2 + fields! + PAYLOAD_LEN_MAX + 1;
      assert.ok(bodyLen <= FRAME_BODY_LEN_MAX);
      const bytes = new Uint8Array(LENGTH_PREFIX_LEN + bodyLen);
      new DataView(bytes.buffer).setUint32(0, bodyLen);
      bytes.set([1, op!, 1, 0x61], 4);
      const error = decodeError(bytes);
      assert.equal(error.kind, "field_too_long", `op ${op}`);
      assert.equal(error.field, "payload", `op ${op}`);
    }
  });

  test("a WebSocket message must hold exactly one frame", () => {
    const ping = unhex("00000002 01 06");
    assert.deepEqual(decodeMessage(ping), { type: "ping" });
    for (const text of ["", "000000", "00000002 01", "00000002 01 06 00", "00000002 01 06 00000002 01 07"]) {
      assert.throws(
        () => decodeMessage(unhex(text)),
        (error: unknown) =>
          error instanceof DecodeError && error.kind === "not_one_frame" && error.errorCode === ErrorCode.MalformedFrame,
        text,
      );
    }
    // The length is still checked first.
    assert.throws(() => decodeMessage(unhex("00010001 01 06")), (e: unknown) => e instanceof DecodeError && e.kind === "frame_too_large");
  });

  test("an unknown network byte decodes as unknown", () => {
    assert.deepEqual(decodeMessage(unhex("0000000c 01 01 04 64657631 03 312e30 09")), {
      type: "hello",
      deviceId: "dev1",
      clientVersion: "1.0",
      network: 0,
      features: 0,
    });
  });

  test("HELLO's features: 0 when absent, written only when not 0, unknown bits kept", () => {
    const without = "0000000c 01 01 04 64657631 03 312e30 01";
    const hello = { type: "hello", deviceId: "dev1", clientVersion: "1.0", network: 1 } as const;
    assert.equal(toHex(encodeFrame(hello)), toHex(unhex(without)));
    assert.equal(toHex(encodeFrame({ ...hello, features: 0 })), toHex(unhex(without)));
    assert.deepEqual(decodeMessage(unhex("00000010 01 01 04 64657631 03 312e30 01 ffffffff")), {
      ...hello,
      features: 0xffff_ffff,
    });
  });

  test("unknown codes pass through", () => {
    assert.deepEqual(decodeMessage(unhex("00000005 01 0d 1234 00")), { type: "goAway", reason: 0x1234 });
    assert.deepEqual(decodeMessage(unhex("00000006 01 0e ffff 0000")), { type: "error", code: 0xffff, message: "" });
    assert.deepEqual(decodeMessage(unhex(`00000021 01 17 04 63686174 0000000000000003 0009 ${"00".repeat(16)}`)), {
      type: "pullReply",
      app: "chat",
      seq: 3n,
      status: 9,
      messageId: new Uint8Array(16),
      payload: new Uint8Array(),
    });
    assert.deepEqual(
      [0, 1, 2, 3, 4, 9].map(pullStatusName),
      ["ok", "gone", "unavailable", "busy", "not_bound", "unknown"],
    );
  });

  test("a leading byte order mark is kept, not stripped", () => {
    const frame = decodeMessage(unhex("0000000a 01 0c 07 efbbbf 63686174"));
    assert.deepEqual(frame, { type: "unbind", app: "\ufeffchat" });
    assert.equal(toHex(encodeFrame(frame)), "0000000a010c07efbbbf63686174");
  });

  test("payloads are copies, so the input may be reused", () => {
    const bytes = unhex("00000021 01 08 04 63686174 30313233343536373839616263646566 0000000000000001 6869");
    const frame = decodeMessage(bytes);
    bytes.fill(0);
    assert.equal(frame.type, "push");
    if (frame.type === "push") {
      assert.deepEqual(frame.payload, ascii("hi"));
      assert.deepEqual(frame.messageId, ID);
    }
  });
});

describe("encoding", () => {
  test("the encoder refuses what the decoder would", () => {
    const long = (n: number, c = "a") => c.repeat(n);
    const notify = (fields: Partial<FrameOf<"notify">>): Frame => ({
      type: "notify",
      app: "chat",
      messageId: ID,
      seq: 1n,
      size: 1,
      pullSpreadMs: 0,
      hint: "",
      ...fields,
    });
    const pullReply = (fields: Partial<FrameOf<"pullReply">>): Frame => ({
      type: "pullReply",
      app: "chat",
      seq: 1n,
      status: 0,
      messageId: ID,
      payload: new Uint8Array(),
      ...fields,
    });
    const cases: Array<[Frame, string, string]> = [
      [{ type: "hello", deviceId: "", clientVersion: "1.0", network: 1 }, "empty_field", "device_id"],
      [{ type: "hello", deviceId: long(DEVICE_ID_LEN_MAX + 1), clientVersion: "", network: 1 }, "field_too_long", "device_id"],
      [{ type: "hello", deviceId: "d", clientVersion: long(CLIENT_VERSION_LEN_MAX + 1), network: 1 }, "field_too_long", "client_version"],
      [{ type: "hello", deviceId: "d", clientVersion: "", network: 256 }, "invalid_value", "network"],
      [{ type: "bind", app: "chat", token: long(TOKEN_LEN_MAX + 1), tags: [] }, "field_too_long", "token"],
      [{ type: "bind", app: "chat", token: "t", tags: Array(TAGS_PER_BIND_MAX + 1).fill("x") }, "field_too_long", "tags"],
      [{ type: "bind", app: "chat", token: "t", tags: [""] }, "empty_field", "tag"],
      [{ type: "bind", app: "chat", token: "t", tags: [long(65)] }, "field_too_long", "tag"],
      [{ type: "bind", app: "chat", token: "t", lastSeq: -1n, tags: [] }, "invalid_value", "last_seq"],
      [{ type: "bind", app: "chat", token: "t", lastSeq: 2n ** 64n, tags: [] }, "invalid_value", "last_seq"],
      [{ type: "bindOk", app: "chat", user: "" }, "empty_field", "user"],
      [{ type: "ack", app: "", seq: 1n }, "empty_field", "app"],
      [{ type: "ack", app: "chat", seq: 1 as unknown as bigint }, "invalid_value", "seq"],
      [{ type: "unbind", app: long(APP_ID_LEN_MAX + 1) }, "field_too_long", "app"],
      // Limits count bytes, not characters: 33 two-byte characters are 66 bytes.
      [{ type: "unbind", app: long(33, "é") }, "field_too_long", "app"],
      [{ type: "unbind", app: "\ud800chat" }, "invalid_value", "app"],
      [{ type: "error", code: 1, message: long(TEXT_LEN_MAX + 1) }, "field_too_long", "message"],
      [{ type: "error", code: 65_536, message: "" }, "invalid_value", "code"],
      [{ type: "push", app: "chat", messageId: new Uint8Array(15), seq: 1n, payload: new Uint8Array() }, "invalid_value", "message_id"],
      [{ type: "push", app: "chat", messageId: ID, seq: 1n, payload: new Uint8Array(PAYLOAD_LEN_MAX + 1) }, "field_too_long", "payload"],
      [{ type: "upstream", app: "chat", requestId: 1n, payload: new Uint8Array(PAYLOAD_LEN_MAX + 1) }, "field_too_long", "payload"],
      [{ type: "upstream", app: "chat", requestId: 1n, route: "", payload: new Uint8Array() }, "empty_field", "route"],
      [{ type: "upstream", app: "chat", requestId: 1n, route: "r".repeat(65), payload: new Uint8Array() }, "field_too_long", "route"],
      [{ type: "goAway", reason: 2, reconnectDelayMs: 2 ** 32 }, "invalid_value", "reconnect_delay_ms"],
      [{ type: "reset", app: "chat", sequence: 2 as 0, after: 0n }, "invalid_value", "sequence"],
      [{ type: "helloOk", heartbeatIntervalMs: 1.5 }, "invalid_value", "heartbeat_interval_ms"],
      [{ type: "hello", deviceId: "d", clientVersion: "", network: 1, features: 2 ** 32 }, "invalid_value", "features"],
      [notify({ hint: "h".repeat(HINT_LEN_MAX + 1) }), "field_too_long", "hint"],
      [notify({ hint: "\udc00" }), "invalid_value", "hint"],
      [notify({ size: 2 ** 32 }), "invalid_value", "size"],
      [notify({ pullSpreadMs: -1 }), "invalid_value", "pull_spread_ms"],
      [notify({ messageId: new Uint8Array(17) }), "invalid_value", "message_id"],
      [{ type: "pull", app: "", seq: 1n }, "empty_field", "app"],
      [{ type: "pull", app: "chat", seq: -1n }, "invalid_value", "seq"],
      [pullReply({ status: 65_536 }), "invalid_value", "status"],
      [pullReply({ payload: new Uint8Array(PAYLOAD_LEN_MAX + 1) }), "field_too_long", "payload"],
    ];
    for (const [frame, kind, field] of cases) {
      const error = encodeError(frame);
      assert.equal(error.kind, kind, `${frame.type} ${field}`);
      assert.equal(error.field, field, `${frame.type} ${field}`);
    }
    assert.equal(encodeFrame({ type: "unbind", app: long(32, "é") }).length, 4 + 2 + 1 + 64);
  });

  test("the largest frames fit and decode back", () => {
    const frames: Frame[] = [
      { type: "push", app: "a".repeat(APP_ID_LEN_MAX), messageId: new Uint8Array(16).fill(0xff), seq: 2n ** 64n - 1n, payload: new Uint8Array(PAYLOAD_LEN_MAX).fill(7) },
      { type: "bind", app: "a".repeat(APP_ID_LEN_MAX), token: "t".repeat(TOKEN_LEN_MAX), lastSeq: 2n ** 64n - 1n, tags: [] },
      {
        type: "bind",
        app: "a".repeat(APP_ID_LEN_MAX),
        token: "t".repeat(TOKEN_LEN_MAX),
        lastSeq: 1n,
        lastBroadcastSeq: 2n,
        tags: Array(TAGS_PER_BIND_MAX).fill("g".repeat(64)),
      },
      {
        type: "pullReply",
        app: "a".repeat(APP_ID_LEN_MAX),
        seq: 2n ** 64n - 1n,
        status: 0xffff,
        messageId: new Uint8Array(16).fill(0xff),
        payload: new Uint8Array(PAYLOAD_LEN_MAX).fill(7),
      },
      {
        type: "notify",
        app: "a".repeat(APP_ID_LEN_MAX),
        messageId: new Uint8Array(16).fill(0xff),
        seq: 2n ** 64n - 1n,
        size: 0xffff_ffff,
        pullSpreadMs: 0xffff_ffff,
        hint: "é".repeat(HINT_LEN_MAX / 2),
      },
    ];
    for (const frame of frames) {
      const bytes = encodeFrame(frame);
      assert.ok(bytes.length <= LENGTH_PREFIX_LEN + FRAME_BODY_LEN_MAX);
      assert.deepEqual(decodeMessage(bytes), frame);
    }
  });
});
