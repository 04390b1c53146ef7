//! Hard limits of wire protocol v1, in one place.
//!
//! The decoder enforces every one of them before it allocates, so a peer can
//! never make the other side hold more than these bounds per frame. Runtime
//! configuration may lower a limit (for example the largest push payload an
//! app accepts) but never raise it past the constant here.

/// The protocol version byte every v1 frame carries after its length prefix.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes of the big-endian `u32` length prefix in front of every frame.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Largest frame body (the bytes after the length prefix: version, op and
/// fields). 64 KiB keeps a connection's worst-case partial-frame buffer small
/// while leaving room for any push payload a mobile push system carries.
pub const FRAME_BODY_LEN_MAX: usize = 64 * 1024;

/// Smallest frame body: the version byte and the op byte.
pub const FRAME_BODY_LEN_MIN: usize = 2;

/// Largest payload of a PUSH or UPSTREAM frame. The 512 bytes of headroom hold
/// the frame's other fields (op, app id, message id, sequence).
pub const PAYLOAD_LEN_MAX: usize = FRAME_BODY_LEN_MAX - 512;

/// Longest app id, in bytes.
pub const APP_ID_LEN_MAX: usize = 64;

/// Longest user id, in bytes.
pub const USER_ID_LEN_MAX: usize = 128;

/// Longest device id, in bytes.
pub const DEVICE_ID_LEN_MAX: usize = 128;

/// Longest client version string, in bytes.
pub const CLIENT_VERSION_LEN_MAX: usize = 64;

/// Longest client token, in bytes.
pub const TOKEN_LEN_MAX: usize = 1024;

/// Longest human-readable text in BIND_ERR and ERROR frames, in bytes.
pub const TEXT_LEN_MAX: usize = 1024;

/// Most tags one BIND may carry, and the longest tag, in bytes.
pub const TAGS_PER_BIND_MAX: usize = 8;
pub const TAG_LEN_MAX: usize = 64;

/// Longest webhook route name an UPSTREAM may carry, in bytes.
pub const ROUTE_LEN_MAX: usize = 64;

/// Longest hint a NOTIFY carries, in bytes.
pub const HINT_LEN_MAX: usize = 1024;

/// Most PULLs one connection may have unanswered at once; the server
/// answers one more with `busy` without reading storage.
pub const PULLS_IN_FLIGHT_MAX: usize = 4;

/// Most apps one connection may have bound at once.
pub const APPS_PER_CONN_MAX: usize = 16;

// A PUSH with the longest app id and the largest payload must fit in a frame:
// version + op + app (1 + len) + message id (16) + seq (8) + payload.
const _: () = assert!(2 + 1 + APP_ID_LEN_MAX + 16 + 8 + PAYLOAD_LEN_MAX <= FRAME_BODY_LEN_MAX);
// An UPSTREAM with the longest app id, route and payload must fit too:
// version + op + app (1 + len) + request id (8) + route (1 + len) + payload.
const _: () =
    assert!(2 + 1 + APP_ID_LEN_MAX + 8 + 1 + ROUTE_LEN_MAX + PAYLOAD_LEN_MAX <= FRAME_BODY_LEN_MAX);
// A PULL_REPLY with the longest app id and the largest payload must fit:
// version + op + app (1 + len) + seq (8) + status (2) + message id (16) + payload.
const _: () = assert!(2 + 1 + APP_ID_LEN_MAX + 8 + 2 + 16 + PAYLOAD_LEN_MAX <= FRAME_BODY_LEN_MAX);
// A BIND with the longest app id and token must fit too.
const _: () = assert!(
    2 + 1 + APP_ID_LEN_MAX + 2 + TOKEN_LEN_MAX + 9 + 9 + 1 + TAGS_PER_BIND_MAX * (1 + TAG_LEN_MAX)
        <= FRAME_BODY_LEN_MAX
);
// Every length-limited string is written with a u8 length prefix except
// tokens and texts, which use a u16 prefix.
const _: () = assert!(APP_ID_LEN_MAX <= u8::MAX as usize);
const _: () = assert!(USER_ID_LEN_MAX <= u8::MAX as usize);
const _: () = assert!(DEVICE_ID_LEN_MAX <= u8::MAX as usize);
const _: () = assert!(CLIENT_VERSION_LEN_MAX <= u8::MAX as usize);
const _: () = assert!(TOKEN_LEN_MAX <= u16::MAX as usize);
const _: () = assert!(TEXT_LEN_MAX <= u16::MAX as usize);
const _: () = assert!(HINT_LEN_MAX <= u16::MAX as usize);
