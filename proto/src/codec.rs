//! The binary encoding of wire protocol v1 (see `docs/protocol.md`).
//!
//! Every frame is a big-endian `u32` body length, then the body: the version
//! byte, the op byte and the op's fields. The decoder is incremental: it
//! accepts any split of the byte stream, answering `Ok(None)` until a whole
//! frame is there, and it rejects an oversized length from the prefix alone,
//! before anything is buffered for it.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{
    BindErrorCode, ErrorCode, Features, Frame, GoAwayReason, MessageId, NetworkType, Op,
    PullStatus, ResetSequence, UnbindReason, UpstreamStatus,
};
use crate::limits::{
    APP_ID_LEN_MAX, CLIENT_VERSION_LEN_MAX, DEVICE_ID_LEN_MAX, FRAME_BODY_LEN_MAX,
    FRAME_BODY_LEN_MIN, HINT_LEN_MAX, LENGTH_PREFIX_LEN, PAYLOAD_LEN_MAX, PROTOCOL_VERSION,
    ROUTE_LEN_MAX, TAG_LEN_MAX, TAGS_PER_BIND_MAX, TEXT_LEN_MAX, TOKEN_LEN_MAX, USER_ID_LEN_MAX,
};

/// Why bytes from the peer are not a v1 frame. Every variant is final for
/// the connection: the stream cannot be resynchronised after a bad frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame length {len} exceeds the maximum of {FRAME_BODY_LEN_MAX} bytes")]
    FrameTooLarge { len: u32 },
    #[error("frame length {len} is below the minimum of {FRAME_BODY_LEN_MIN} bytes")]
    FrameTooShort { len: u32 },
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown op 0x{0:02x}")]
    UnknownOp(u8),
    #[error("{op:?} frame ends in the middle of a field")]
    Truncated { op: Op },
    #[error("{op:?} frame has bytes after its last field")]
    TrailingBytes { op: Op },
    #[error("field {field} is longer than its limit")]
    FieldTooLong { field: &'static str },
    #[error("field {field} must not be empty")]
    EmptyField { field: &'static str },
    #[error("field {field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("field {field} has an invalid presence tag")]
    InvalidTag { field: &'static str },
    #[error("field {field} has a value this version does not define")]
    InvalidCode { field: &'static str },
}

impl DecodeError {
    /// The ERROR code to report to the peer. Only the two failures a peer
    /// can act on (a smaller frame, another version) get their own code.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UNSUPPORTED_VERSION,
            _ => ErrorCode::MALFORMED_FRAME,
        }
    }
}

/// Why a frame cannot be encoded: one of its fields breaks a limit the
/// decoder enforces, so a conforming peer would refuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("field {field} is longer than its limit")]
    FieldTooLong { field: &'static str },
    #[error("field {field} must not be empty")]
    EmptyField { field: &'static str },
}

/// A string field: its name, its byte limit, whether it may be empty, and
/// whether its length prefix is a u16 (else a u8).
#[derive(Clone, Copy)]
struct StrField {
    name: &'static str,
    len_max: usize,
    non_empty: bool,
    wide: bool,
}

const APP: StrField = StrField {
    name: "app",
    len_max: APP_ID_LEN_MAX,
    non_empty: true,
    wide: false,
};
const USER: StrField = StrField {
    name: "user",
    len_max: USER_ID_LEN_MAX,
    non_empty: true,
    wide: false,
};
const DEVICE_ID: StrField = StrField {
    name: "device_id",
    len_max: DEVICE_ID_LEN_MAX,
    non_empty: true,
    wide: false,
};
const CLIENT_VERSION: StrField = StrField {
    name: "client_version",
    len_max: CLIENT_VERSION_LEN_MAX,
    non_empty: false,
    wide: false,
};
const TOKEN: StrField = StrField {
    name: "token",
    len_max: TOKEN_LEN_MAX,
    non_empty: false,
    wide: true,
};
const TAG: StrField = StrField {
    name: "tag",
    len_max: TAG_LEN_MAX,
    non_empty: true,
    wide: false,
};
const ROUTE: StrField = StrField {
    name: "route",
    len_max: ROUTE_LEN_MAX,
    non_empty: true,
    wide: false,
};
const HINT: StrField = StrField {
    name: "hint",
    len_max: HINT_LEN_MAX,
    non_empty: false,
    wide: true,
};
const TEXT: StrField = StrField {
    name: "message",
    len_max: TEXT_LEN_MAX,
    non_empty: false,
    wide: true,
};

fn check_str(field: StrField, value: &str) -> Result<(), EncodeError> {
    if value.len() > field.len_max {
        return Err(EncodeError::FieldTooLong { field: field.name });
    }
    if field.non_empty && value.is_empty() {
        return Err(EncodeError::EmptyField { field: field.name });
    }
    Ok(())
}

fn check_payload(payload: &[u8]) -> Result<(), EncodeError> {
    if payload.len() > PAYLOAD_LEN_MAX {
        return Err(EncodeError::FieldTooLong { field: "payload" });
    }
    Ok(())
}

fn str_len(field: StrField, value: &str) -> usize {
    (if field.wide { 2 } else { 1 }) + value.len()
}

fn opt_len<T>(value: &Option<T>, size: usize) -> usize {
    1 + if value.is_some() { size } else { 0 }
}

/// A `u64` that came later in v1 and ends its frame: written only when
/// present, so a frame without it is what every v1 peer reads.
fn trailing_len(value: &Option<u64>) -> usize {
    if value.is_some() { 8 } else { 0 }
}

fn body_len(frame: &Frame) -> usize {
    2 + match frame {
        Frame::Hello {
            device_id,
            client_version,
            features,
            ..
        } => {
            str_len(DEVICE_ID, device_id)
                + str_len(CLIENT_VERSION, client_version)
                + 1
                + if *features == Features::NONE { 0 } else { 4 }
        }
        Frame::HelloOk { storage_epoch, .. } => 4 + trailing_len(storage_epoch),
        Frame::Bind {
            app,
            token,
            last_seq,
            last_broadcast_seq,
            tags,
        } => {
            let broadcast_fields = if bind_has_broadcast_fields(last_broadcast_seq, tags) {
                opt_len(last_broadcast_seq, 8)
                    + 1
                    + tags.iter().map(|tag| str_len(TAG, tag)).sum::<usize>()
            } else {
                0
            };
            str_len(APP, app) + str_len(TOKEN, token) + opt_len(last_seq, 8) + broadcast_fields
        }
        Frame::BindOk { app, user } => str_len(APP, app) + str_len(USER, user),
        Frame::BindErr { app, message, .. } => str_len(APP, app) + 2 + str_len(TEXT, message),
        Frame::Ping | Frame::Pong => 0,
        Frame::Push { app, payload, .. } => str_len(APP, app) + 16 + 8 + payload.len(),
        Frame::Ack { app, .. } | Frame::BroadcastAck { app, .. } => str_len(APP, app) + 8,
        Frame::Transient { app, payload } => str_len(APP, app) + payload.len(),
        Frame::Broadcast { app, payload, .. } => str_len(APP, app) + 16 + 8 + payload.len(),
        Frame::Upstream {
            app,
            route,
            payload,
            ..
        } => {
            str_len(APP, app)
                + 8
                + route.as_ref().map_or(0, |route| str_len(ROUTE, route))
                + payload.len()
        }
        Frame::UpstreamAck { app, .. } => str_len(APP, app) + 8 + 2,
        Frame::Unbind { app, reason } => str_len(APP, app) + if reason.is_some() { 2 } else { 0 },
        Frame::GoAway {
            reconnect_delay_ms, ..
        } => 2 + opt_len(reconnect_delay_ms, 4),
        Frame::Error { message, .. } => 2 + str_len(TEXT, message),
        Frame::Reset { app, .. } => str_len(APP, app) + 1 + 8,
        Frame::Heartbeat { .. } => 4,
        Frame::Notify { app, hint, .. } => str_len(APP, app) + 16 + 8 + 4 + 4 + str_len(HINT, hint),
        Frame::Pull { app, .. } => str_len(APP, app) + 8,
        Frame::PullReply { app, payload, .. } => str_len(APP, app) + 8 + 2 + 16 + payload.len(),
        Frame::SessionTimedOut { app, .. } => str_len(APP, app) + 1 + 4 + 4,
    }
}

/// Total bytes `encode` writes for `frame`, length prefix included.
pub fn encoded_len(frame: &Frame) -> usize {
    LENGTH_PREFIX_LEN + body_len(frame)
}

fn check(frame: &Frame) -> Result<(), EncodeError> {
    match frame {
        Frame::Hello {
            device_id,
            client_version,
            ..
        } => {
            check_str(DEVICE_ID, device_id)?;
            check_str(CLIENT_VERSION, client_version)
        }
        Frame::HelloOk { .. }
        | Frame::Ping
        | Frame::Pong
        | Frame::GoAway { .. }
        | Frame::Heartbeat { .. } => Ok(()),
        Frame::Bind {
            app, token, tags, ..
        } => {
            check_str(APP, app)?;
            check_str(TOKEN, token)?;
            if tags.len() > TAGS_PER_BIND_MAX {
                return Err(EncodeError::FieldTooLong { field: "tags" });
            }
            tags.iter().try_for_each(|tag| check_str(TAG, tag))
        }
        Frame::BindOk { app, user } => {
            check_str(APP, app)?;
            check_str(USER, user)
        }
        Frame::BindErr { app, message, .. } => {
            check_str(APP, app)?;
            check_str(TEXT, message)
        }
        Frame::Push { app, payload, .. }
        | Frame::Broadcast { app, payload, .. }
        | Frame::Transient { app, payload } => {
            check_str(APP, app)?;
            check_payload(payload)
        }
        Frame::Upstream {
            app,
            route,
            payload,
            ..
        } => {
            check_str(APP, app)?;
            if let Some(route) = route {
                check_str(ROUTE, route)?;
            }
            check_payload(payload)
        }
        Frame::Notify { app, hint, .. } => {
            check_str(APP, app)?;
            check_str(HINT, hint)
        }
        Frame::PullReply { app, payload, .. } => {
            check_str(APP, app)?;
            check_payload(payload)
        }
        Frame::Ack { app, .. }
        | Frame::Pull { app, .. }
        | Frame::BroadcastAck { app, .. }
        | Frame::UpstreamAck { app, .. }
        | Frame::Unbind { app, .. }
        | Frame::Reset { app, .. }
        | Frame::SessionTimedOut { app, .. } => check_str(APP, app),
        Frame::Error { message, .. } => check_str(TEXT, message),
    }
}

/// A BIND without broadcast fields is written as it was before they
/// existed, so every v1 peer reads it.
fn bind_has_broadcast_fields(last_broadcast_seq: &Option<u64>, tags: &[String]) -> bool {
    last_broadcast_seq.is_some() || !tags.is_empty()
}

fn put_str(dst: &mut BytesMut, field: StrField, value: &str) {
    if field.wide {
        dst.put_u16(value.len() as u16);
    } else {
        dst.put_u8(value.len() as u8);
    }
    dst.put_slice(value.as_bytes());
}

fn put_opt_u64(dst: &mut BytesMut, value: Option<u64>) {
    match value {
        Some(v) => {
            dst.put_u8(1);
            dst.put_u64(v);
        }
        None => dst.put_u8(0),
    }
}

fn put_opt_u32(dst: &mut BytesMut, value: Option<u32>) {
    match value {
        Some(v) => {
            dst.put_u8(1);
            dst.put_u32(v);
        }
        None => dst.put_u8(0),
    }
}

/// Appends `frame` to `dst`. Every limit the decoder enforces is checked
/// first, so nothing this writes is refused by a conforming peer; on error
/// nothing is written.
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    check(frame)?;
    let body = body_len(frame);
    debug_assert!(body <= FRAME_BODY_LEN_MAX);
    dst.reserve(LENGTH_PREFIX_LEN + body);
    dst.put_u32(body as u32);
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(frame.op() as u8);
    match frame {
        Frame::Hello {
            device_id,
            client_version,
            network,
            features,
        } => {
            put_str(dst, DEVICE_ID, device_id);
            put_str(dst, CLIENT_VERSION, client_version);
            dst.put_u8(*network as u8);
            if *features != Features::NONE {
                dst.put_u32(features.0);
            }
        }
        Frame::HelloOk {
            heartbeat_interval_ms,
            storage_epoch,
        } => {
            dst.put_u32(*heartbeat_interval_ms);
            if let Some(epoch) = storage_epoch {
                dst.put_u64(*epoch);
            }
        }
        Frame::Bind {
            app,
            token,
            last_seq,
            last_broadcast_seq,
            tags,
        } => {
            put_str(dst, APP, app);
            put_str(dst, TOKEN, token);
            put_opt_u64(dst, *last_seq);
            if bind_has_broadcast_fields(last_broadcast_seq, tags) {
                put_opt_u64(dst, *last_broadcast_seq);
                dst.put_u8(tags.len() as u8);
                for tag in tags {
                    put_str(dst, TAG, tag);
                }
            }
        }
        Frame::BindOk { app, user } => {
            put_str(dst, APP, app);
            put_str(dst, USER, user);
        }
        Frame::BindErr { app, code, message } => {
            put_str(dst, APP, app);
            dst.put_u16(code.0);
            put_str(dst, TEXT, message);
        }
        Frame::Ping | Frame::Pong => {}
        Frame::Push {
            app,
            message_id,
            seq,
            payload,
        }
        | Frame::Broadcast {
            app,
            message_id,
            seq,
            payload,
        } => {
            put_str(dst, APP, app);
            dst.put_slice(&message_id.0);
            dst.put_u64(*seq);
            dst.put_slice(payload);
        }
        Frame::Ack { app, seq } | Frame::BroadcastAck { app, seq } | Frame::Pull { app, seq } => {
            put_str(dst, APP, app);
            dst.put_u64(*seq);
        }
        Frame::Transient { app, payload } => {
            put_str(dst, APP, app);
            dst.put_slice(payload);
        }
        Frame::Upstream {
            app,
            request_id,
            route,
            payload,
        } => {
            put_str(dst, APP, app);
            dst.put_u64(*request_id);
            if let Some(route) = route {
                put_str(dst, ROUTE, route);
            }
            dst.put_slice(payload);
        }
        Frame::UpstreamAck {
            app,
            request_id,
            status,
        } => {
            put_str(dst, APP, app);
            dst.put_u64(*request_id);
            dst.put_u16(status.0);
        }
        Frame::Unbind { app, reason } => {
            put_str(dst, APP, app);
            if let Some(reason) = reason {
                dst.put_u16(reason.0);
            }
        }
        Frame::GoAway {
            reason,
            reconnect_delay_ms,
        } => {
            dst.put_u16(reason.0);
            put_opt_u32(dst, *reconnect_delay_ms);
        }
        Frame::Error { code, message } => {
            dst.put_u16(code.0);
            put_str(dst, TEXT, message);
        }
        Frame::Reset {
            app,
            sequence,
            after,
        } => {
            put_str(dst, APP, app);
            dst.put_u8(*sequence as u8);
            dst.put_u64(*after);
        }
        Frame::Heartbeat { interval_ms } => dst.put_u32(*interval_ms),
        Frame::Notify {
            app,
            message_id,
            seq,
            size,
            pull_spread_ms,
            hint,
        } => {
            put_str(dst, APP, app);
            dst.put_slice(&message_id.0);
            dst.put_u64(*seq);
            dst.put_u32(*size);
            dst.put_u32(*pull_spread_ms);
            put_str(dst, HINT, hint);
        }
        Frame::PullReply {
            app,
            seq,
            status,
            message_id,
            payload,
        } => {
            put_str(dst, APP, app);
            dst.put_u64(*seq);
            dst.put_u16(status.0);
            dst.put_slice(&message_id.0);
            dst.put_slice(payload);
        }
        Frame::SessionTimedOut {
            app,
            network,
            interval_ms,
            closed_ago_ms,
        } => {
            put_str(dst, APP, app);
            dst.put_u8(*network as u8);
            dst.put_u32(*interval_ms);
            dst.put_u32(*closed_ago_ms);
        }
    }
    Ok(())
}

/// Reads the fields of one frame body.
struct Reader<'a> {
    op: Op,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated { op: self.op });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn str(&mut self, field: StrField) -> Result<String, DecodeError> {
        let len = if field.wide {
            usize::from(self.u16()?)
        } else {
            usize::from(self.u8()?)
        };
        if len > field.len_max {
            return Err(DecodeError::FieldTooLong { field: field.name });
        }
        if field.non_empty && len == 0 {
            return Err(DecodeError::EmptyField { field: field.name });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { field: field.name })
    }

    fn tag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidTag { field }),
        }
    }

    fn opt_u64(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        Ok(if self.tag(field)? {
            Some(self.u64()?)
        } else {
            None
        })
    }

    /// A field that came later in v1 at the end of its frame: absent when
    /// the frame ends before it.
    fn trailing_u16(&mut self) -> Result<Option<u16>, DecodeError> {
        if self.rest.is_empty() {
            Ok(None)
        } else {
            self.u16().map(Some)
        }
    }

    fn trailing_u32(&mut self) -> Result<Option<u32>, DecodeError> {
        if self.rest.is_empty() {
            Ok(None)
        } else {
            self.u32().map(Some)
        }
    }

    fn trailing_u64(&mut self) -> Result<Option<u64>, DecodeError> {
        if self.rest.is_empty() {
            Ok(None)
        } else {
            self.u64().map(Some)
        }
    }

    fn payload(&mut self) -> Result<Bytes, DecodeError> {
        if self.rest.len() > PAYLOAD_LEN_MAX {
            return Err(DecodeError::FieldTooLong { field: "payload" });
        }
        let payload = Bytes::copy_from_slice(self.rest);
        self.rest = &[];
        Ok(payload)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { op: self.op })
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
    debug_assert!(body.len() >= FRAME_BODY_LEN_MIN);
    if body[0] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(body[0]));
    }
    let op = Op::from_u8(body[1]).ok_or(DecodeError::UnknownOp(body[1]))?;
    let mut r = Reader {
        op,
        rest: &body[2..],
    };
    let frame = match op {
        Op::Hello => Frame::Hello {
            device_id: r.str(DEVICE_ID)?,
            client_version: r.str(CLIENT_VERSION)?,
            network: NetworkType::from_u8(r.u8()?),
            features: Features(r.trailing_u32()?.unwrap_or(0)),
        },
        Op::HelloOk => Frame::HelloOk {
            heartbeat_interval_ms: r.u32()?,
            storage_epoch: r.trailing_u64()?,
        },
        Op::Bind => {
            let app = r.str(APP)?;
            let token = r.str(TOKEN)?;
            let last_seq = r.opt_u64("last_seq")?;
            // The broadcast fields came later in v1: a BIND may end here.
            let (last_broadcast_seq, tags) = if r.rest.is_empty() {
                (None, Vec::new())
            } else {
                let last_broadcast_seq = r.opt_u64("last_broadcast_seq")?;
                let count = usize::from(r.u8()?);
                if count > TAGS_PER_BIND_MAX {
                    return Err(DecodeError::FieldTooLong { field: "tags" });
                }
                let tags = (0..count)
                    .map(|_| r.str(TAG))
                    .collect::<Result<Vec<_>, _>>()?;
                (last_broadcast_seq, tags)
            };
            Frame::Bind {
                app,
                token,
                last_seq,
                last_broadcast_seq,
                tags,
            }
        }
        Op::BindOk => Frame::BindOk {
            app: r.str(APP)?,
            user: r.str(USER)?,
        },
        Op::BindErr => Frame::BindErr {
            app: r.str(APP)?,
            code: BindErrorCode(r.u16()?),
            message: r.str(TEXT)?,
        },
        Op::Ping => Frame::Ping,
        Op::Heartbeat => Frame::Heartbeat {
            interval_ms: r.u32()?,
        },
        Op::Pong => Frame::Pong,
        Op::Push => Frame::Push {
            app: r.str(APP)?,
            message_id: MessageId(r.take(16)?.try_into().expect("16 bytes")),
            seq: r.u64()?,
            payload: r.payload()?,
        },
        Op::Ack => Frame::Ack {
            app: r.str(APP)?,
            seq: r.u64()?,
        },
        Op::Transient => Frame::Transient {
            app: r.str(APP)?,
            payload: r.payload()?,
        },
        Op::Broadcast => Frame::Broadcast {
            app: r.str(APP)?,
            message_id: MessageId(r.take(16)?.try_into().expect("16 bytes")),
            seq: r.u64()?,
            payload: r.payload()?,
        },
        Op::BroadcastAck => Frame::BroadcastAck {
            app: r.str(APP)?,
            seq: r.u64()?,
        },
        Op::Upstream => Frame::Upstream {
            app: r.str(APP)?,
            request_id: r.u64()?,
            route: None,
            payload: r.payload()?,
        },
        Op::UpstreamRouted => Frame::Upstream {
            app: r.str(APP)?,
            request_id: r.u64()?,
            route: Some(r.str(ROUTE)?),
            payload: r.payload()?,
        },
        Op::UpstreamAck => Frame::UpstreamAck {
            app: r.str(APP)?,
            request_id: r.u64()?,
            status: UpstreamStatus(r.u16()?),
        },
        Op::Unbind => Frame::Unbind {
            app: r.str(APP)?,
            reason: r.trailing_u16()?.map(UnbindReason),
        },
        Op::GoAway => Frame::GoAway {
            reason: GoAwayReason(r.u16()?),
            reconnect_delay_ms: if r.tag("reconnect_delay_ms")? {
                Some(r.u32()?)
            } else {
                None
            },
        },
        Op::Error => Frame::Error {
            code: ErrorCode(r.u16()?),
            message: r.str(TEXT)?,
        },
        Op::Notify => Frame::Notify {
            app: r.str(APP)?,
            message_id: MessageId(r.take(16)?.try_into().expect("16 bytes")),
            seq: r.u64()?,
            size: r.u32()?,
            pull_spread_ms: r.u32()?,
            hint: r.str(HINT)?,
        },
        Op::Pull => Frame::Pull {
            app: r.str(APP)?,
            seq: r.u64()?,
        },
        Op::PullReply => Frame::PullReply {
            app: r.str(APP)?,
            seq: r.u64()?,
            status: PullStatus(r.u16()?),
            message_id: MessageId(r.take(16)?.try_into().expect("16 bytes")),
            payload: r.payload()?,
        },
        Op::SessionTimedOut => Frame::SessionTimedOut {
            app: r.str(APP)?,
            network: NetworkType::from_u8(r.u8()?),
            interval_ms: r.u32()?,
            closed_ago_ms: r.u32()?,
        },
        Op::Reset => Frame::Reset {
            app: r.str(APP)?,
            sequence: ResetSequence::from_u8(r.u8()?)
                .ok_or(DecodeError::InvalidCode { field: "sequence" })?,
            after: r.u64()?,
        },
    };
    r.finish()?;
    Ok(frame)
}

/// Decodes one frame from the start of `src`. `Ok(None)`: more bytes are
/// needed. `Ok(Some((frame, used)))`: the frame and how many bytes of `src`
/// it took. Payloads are copied, so the caller may reuse `src`.
pub fn decode_slice(src: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(prefix) = src.get(..LENGTH_PREFIX_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
    if len as usize > FRAME_BODY_LEN_MAX {
        return Err(DecodeError::FrameTooLarge { len });
    }
    if (len as usize) < FRAME_BODY_LEN_MIN {
        return Err(DecodeError::FrameTooShort { len });
    }
    let end = LENGTH_PREFIX_LEN + len as usize;
    let Some(body) = src.get(LENGTH_PREFIX_LEN..end) else {
        return Ok(None);
    };
    decode_body(body).map(|frame| Some((frame, end)))
}

/// Decodes one frame from `src` and removes its bytes (the tokio-util codec
/// contract). On `Ok(None)`, room for the rest of the frame is reserved if
/// its length is known, so the next read can land in one piece. On error
/// `src` is left as it was; the caller answers ERROR and closes.
pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    match decode_slice(src)? {
        Some((frame, used)) => {
            let _ = src.split_to(used);
            Ok(Some(frame))
        }
        None => {
            if let Some(prefix) = src.get(..LENGTH_PREFIX_LEN) {
                let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
                src.reserve(LENGTH_PREFIX_LEN + len - src.len());
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One golden vector per op; `docs/protocol.md` shows the same bytes.
    fn vectors() -> Vec<(Frame, &'static str)> {
        let id = MessageId(*b"0123456789abcdef");
        vec![
            (
                Frame::Hello {
                    device_id: "dev1".into(),
                    client_version: "1.0".into(),
                    network: NetworkType::Wifi,
                    features: Features::NONE,
                },
                "0000000c 01 01 04 64657631 03 312e30 01",
            ),
            (
                Frame::HelloOk {
                    heartbeat_interval_ms: 120_000,
                    storage_epoch: Some(7),
                },
                "0000000e 01 02 0001d4c0 0000000000000007",
            ),
            (
                Frame::Bind {
                    app: "chat".into(),
                    token: "tok".into(),
                    last_seq: Some(7),
                    last_broadcast_seq: None,
                    tags: Vec::new(),
                },
                "00000015 01 03 04 63686174 0003 746f6b 01 0000000000000007",
            ),
            (
                Frame::BindOk {
                    app: "chat".into(),
                    user: "alice".into(),
                },
                "0000000d 01 04 04 63686174 05 616c696365",
            ),
            (
                Frame::BindErr {
                    app: "chat".into(),
                    code: BindErrorCode::TOKEN_EXPIRED,
                    message: "expired".into(),
                },
                "00000012 01 05 04 63686174 0002 0007 65787069726564",
            ),
            (
                Frame::Hello {
                    device_id: "dev1".into(),
                    client_version: "1.0".into(),
                    network: NetworkType::Wifi,
                    features: Features::ALL,
                },
                "00000010 01 01 04 64657631 03 312e30 01 00000007",
            ),
            (
                Frame::Notify {
                    app: "chat".into(),
                    message_id: id,
                    seq: 3,
                    size: 40_000,
                    pull_spread_ms: 5_000,
                    hint: "news".into(),
                },
                "0000002d 01 15 04 63686174 30313233343536373839616263646566 0000000000000003 00009c40 00001388 0004 6e657773",
            ),
            (
                Frame::Pull {
                    app: "chat".into(),
                    seq: 3,
                },
                "0000000f 01 16 04 63686174 0000000000000003",
            ),
            (
                Frame::PullReply {
                    app: "chat".into(),
                    seq: 3,
                    status: PullStatus::OK,
                    message_id: id,
                    payload: Bytes::from_static(b"hi"),
                },
                "00000023 01 17 04 63686174 0000000000000003 0000 30313233343536373839616263646566 6869",
            ),
            (
                Frame::SessionTimedOut {
                    app: "chat".into(),
                    network: NetworkType::Cellular4g,
                    interval_ms: 45_000,
                    closed_ago_ms: 1_500,
                },
                "00000010 01 18 04 63686174 02 0000afc8 000005dc",
            ),
            (Frame::Ping, "00000002 01 06"),
            (Frame::Pong, "00000002 01 07"),
            (
                Frame::Heartbeat {
                    interval_ms: 90_000,
                },
                "00000006 01 14 00015f90",
            ),
            (
                Frame::Push {
                    app: "chat".into(),
                    message_id: id,
                    seq: 1,
                    payload: Bytes::from_static(b"hi"),
                },
                "00000021 01 08 04 63686174 30313233343536373839616263646566 0000000000000001 6869",
            ),
            (
                Frame::Ack {
                    app: "chat".into(),
                    seq: 1,
                },
                "0000000f 01 09 04 63686174 0000000000000001",
            ),
            (
                Frame::Transient {
                    app: "chat".into(),
                    payload: Bytes::from_static(b"hi"),
                },
                "00000009 01 13 04 63686174 6869",
            ),
            (
                Frame::Upstream {
                    app: "chat".into(),
                    request_id: 5,
                    route: None,
                    payload: Bytes::from_static(b"up"),
                },
                "00000011 01 0a 04 63686174 0000000000000005 7570",
            ),
            (
                Frame::Upstream {
                    app: "chat".into(),
                    request_id: 5,
                    route: Some("orders".into()),
                    payload: Bytes::from_static(b"up"),
                },
                "00000018 01 12 04 63686174 0000000000000005 06 6f7264657273 7570",
            ),
            (
                Frame::UpstreamAck {
                    app: "chat".into(),
                    request_id: 5,
                    status: UpstreamStatus::ACCEPTED,
                },
                "00000011 01 0b 04 63686174 0000000000000005 0000",
            ),
            (
                Frame::Unbind {
                    app: "chat".into(),
                    reason: None,
                },
                "00000007 01 0c 04 63686174",
            ),
            (
                Frame::Unbind {
                    app: "chat".into(),
                    reason: Some(UnbindReason::APP_DELETED),
                },
                "00000009 01 0c 04 63686174 0001",
            ),
            (
                Frame::GoAway {
                    reason: GoAwayReason::SERVER_SHUTDOWN,
                    reconnect_delay_ms: Some(1000),
                },
                "00000009 01 0d 0002 01 000003e8",
            ),
            (
                Frame::Error {
                    code: ErrorCode::MALFORMED_FRAME,
                    message: "bad".into(),
                },
                "00000009 01 0e 0001 0003 626164",
            ),
            (
                Frame::Reset {
                    app: "chat".into(),
                    sequence: ResetSequence::Inbox,
                    after: 0,
                },
                "00000010 01 11 04 63686174 00 0000000000000000",
            ),
        ]
    }

    fn unhex(text: &str) -> Vec<u8> {
        hex::decode(text.replace(' ', "")).unwrap()
    }

    #[test]
    fn golden_vectors_encode_and_decode() {
        for (frame, text) in vectors() {
            let expected = unhex(text);
            let mut encoded = BytesMut::new();
            encode(&frame, &mut encoded).unwrap();
            assert_eq!(hex::encode(&encoded), hex::encode(&expected), "{frame:?}");
            assert_eq!(encoded_len(&frame), expected.len());
            let mut src = BytesMut::from(&expected[..]);
            assert_eq!(decode(&mut src).unwrap(), Some(frame));
            assert!(src.is_empty());
        }
    }

    /// The protocol document shows every golden vector, spelled the same
    /// way, so the two cannot drift apart.
    #[test]
    fn golden_vectors_are_the_documented_examples() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
        let doc = std::fs::read_to_string(path).expect("docs/protocol.md");
        let examples: Vec<&str> = doc.split("```").skip(1).step_by(2).map(str::trim).collect();
        for (frame, text) in vectors() {
            assert!(
                examples.contains(&text),
                "docs/protocol.md has no example block `{text}` for {frame:?}"
            );
        }
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_prefix_alone() {
        assert_eq!(
            decode_slice(&[0, 1, 0, 1]),
            Err(DecodeError::FrameTooLarge { len: 65_537 })
        );
        assert_eq!(
            decode_slice(&[0, 0, 0, 1]),
            Err(DecodeError::FrameTooShort { len: 1 })
        );
    }

    #[test]
    fn partial_input_needs_more() {
        let bytes = unhex("0000000f 01 09 04 63686174 0000000000000001");
        for cut in 0..bytes.len() {
            assert_eq!(decode_slice(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert_eq!(
            decode_slice(&unhex("00000002 02 06")),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            decode_slice(&unhex("00000002 01 ee")),
            Err(DecodeError::UnknownOp(0xee))
        );
        assert_eq!(
            decode_slice(&unhex("00000003 01 06 00")),
            Err(DecodeError::TrailingBytes { op: Op::Ping })
        );
        assert_eq!(
            decode_slice(&unhex("00000004 01 09 04 63")),
            Err(DecodeError::Truncated { op: Op::Ack })
        );
        assert_eq!(
            decode_slice(&unhex("0000000b 01 09 00 0000000000000001")),
            Err(DecodeError::EmptyField { field: "app" })
        );
        assert_eq!(
            decode_slice(&unhex("00000005 01 0d 0002 07")),
            Err(DecodeError::InvalidTag {
                field: "reconnect_delay_ms"
            })
        );
        assert_eq!(
            decode_slice(&unhex("00000005 01 0c 02 ffff")),
            Err(DecodeError::InvalidUtf8 { field: "app" })
        );
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would() {
        let mut dst = BytesMut::new();
        let long_app = Frame::Unbind {
            app: "a".repeat(APP_ID_LEN_MAX + 1),
            reason: None,
        };
        assert_eq!(
            encode(&long_app, &mut dst),
            Err(EncodeError::FieldTooLong { field: "app" })
        );
        let big = Frame::Push {
            app: "chat".into(),
            message_id: MessageId([0; 16]),
            seq: 1,
            payload: Bytes::from(vec![0; PAYLOAD_LEN_MAX + 1]),
        };
        assert_eq!(
            encode(&big, &mut dst),
            Err(EncodeError::FieldTooLong { field: "payload" })
        );
        assert!(dst.is_empty());
    }

    #[test]
    fn encode_leaves_existing_bytes_and_writes_nothing_on_error() {
        let mut dst = BytesMut::from(&b"xyz"[..]);
        let refused = [
            (
                Frame::Hello {
                    device_id: String::new(),
                    client_version: "1.0".into(),
                    network: NetworkType::Wifi,
                    features: Features::NONE,
                },
                EncodeError::EmptyField { field: "device_id" },
            ),
            (
                Frame::Hello {
                    device_id: "d".repeat(DEVICE_ID_LEN_MAX + 1),
                    client_version: String::new(),
                    network: NetworkType::Wifi,
                    features: Features::NONE,
                },
                EncodeError::FieldTooLong { field: "device_id" },
            ),
            (
                Frame::Hello {
                    device_id: "dev1".into(),
                    client_version: "v".repeat(CLIENT_VERSION_LEN_MAX + 1),
                    network: NetworkType::Wifi,
                    features: Features::NONE,
                },
                EncodeError::FieldTooLong {
                    field: "client_version",
                },
            ),
            (
                Frame::Bind {
                    app: "chat".into(),
                    token: "t".repeat(TOKEN_LEN_MAX + 1),
                    last_seq: None,
                    last_broadcast_seq: None,
                    tags: Vec::new(),
                },
                EncodeError::FieldTooLong { field: "token" },
            ),
            (
                Frame::BindOk {
                    app: "chat".into(),
                    user: String::new(),
                },
                EncodeError::EmptyField { field: "user" },
            ),
            (
                Frame::Ack {
                    app: String::new(),
                    seq: 1,
                },
                EncodeError::EmptyField { field: "app" },
            ),
            (
                Frame::Error {
                    code: ErrorCode::MALFORMED_FRAME,
                    message: "m".repeat(TEXT_LEN_MAX + 1),
                },
                EncodeError::FieldTooLong { field: "message" },
            ),
        ];
        for (frame, error) in refused {
            assert_eq!(encode(&frame, &mut dst), Err(error), "{frame:?}");
        }
        assert_eq!(&dst[..], b"xyz");

        encode(&Frame::Ping, &mut dst).unwrap();
        assert_eq!(&dst[..], b"xyz\x00\x00\x00\x02\x01\x06");
    }

    #[test]
    fn the_largest_frames_fit_and_one_byte_more_is_refused() {
        let push = Frame::Push {
            app: "a".repeat(APP_ID_LEN_MAX),
            message_id: MessageId([0xff; 16]),
            seq: u64::MAX,
            payload: Bytes::from(vec![7; PAYLOAD_LEN_MAX]),
        };
        let bind = Frame::Bind {
            app: "a".repeat(APP_ID_LEN_MAX),
            token: "t".repeat(TOKEN_LEN_MAX),
            last_seq: Some(u64::MAX),
            last_broadcast_seq: None,
            tags: Vec::new(),
        };
        for frame in [push, bind] {
            let mut dst = BytesMut::new();
            encode(&frame, &mut dst).unwrap();
            assert_eq!(dst.len(), encoded_len(&frame));
            assert!(dst.len() <= LENGTH_PREFIX_LEN + FRAME_BODY_LEN_MAX);
            assert_eq!(decode(&mut dst), Ok(Some(frame)));
        }

        // A PUSH whose payload is one byte over the limit, though the frame
        // itself is within FRAME_BODY_LEN_MAX: the decoder must still refuse.
        let body_len = 2 + 2 + 16 + 8 + PAYLOAD_LEN_MAX + 1;
        let mut bytes = (body_len as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[PROTOCOL_VERSION, Op::Push as u8, 1, b'a']);
        bytes.extend_from_slice(&[0; 24]);
        bytes.resize(LENGTH_PREFIX_LEN + body_len, 0);
        assert_eq!(
            decode_slice(&bytes),
            Err(DecodeError::FieldTooLong { field: "payload" })
        );
    }

    #[test]
    fn decode_takes_one_frame_and_leaves_the_next() {
        let mut bytes = unhex("00000002 01 06 00000002 01 07 000000");
        assert_eq!(decode_slice(&bytes), Ok(Some((Frame::Ping, 6))));
        let mut src = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut src), Ok(Some(Frame::Ping)));
        assert_eq!(decode(&mut src), Ok(Some(Frame::Pong)));
        assert_eq!(decode(&mut src), Ok(None));
        assert_eq!(&src[..], &[0, 0, 0]);

        // Once the length is known, room for the whole frame is reserved.
        bytes = unhex("000003e8 01 08");
        let mut src = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut src), Ok(None));
        assert!(src.capacity() >= LENGTH_PREFIX_LEN + 1_000);
        assert_eq!(src.len(), 6);
    }

    #[test]
    fn an_unknown_network_byte_decodes_as_unknown() {
        assert_eq!(
            decode_slice(&unhex("0000000c 01 01 04 64657631 03 312e30 09"))
                .unwrap()
                .map(|(frame, _)| frame),
            Some(Frame::Hello {
                device_id: "dev1".into(),
                client_version: "1.0".into(),
                network: NetworkType::Unknown,
                features: Features::NONE,
            })
        );
        // Byte 2, `cellular` before the generations, is 4g.
        assert_eq!(
            decode_slice(&unhex("0000000c 01 01 04 64657631 03 312e30 02"))
                .unwrap()
                .map(|(frame, _)| frame),
            Some(Frame::Hello {
                device_id: "dev1".into(),
                client_version: "1.0".into(),
                network: NetworkType::Cellular4g,
                features: Features::NONE,
            })
        );
    }

    #[test]
    fn field_limits_are_checked_before_the_bytes_are_read() {
        // The app claims 65 bytes: refused from the length byte alone.
        assert_eq!(
            decode_slice(&unhex("00000003 01 0c 41")),
            Err(DecodeError::FieldTooLong { field: "app" })
        );
        assert_eq!(
            decode_slice(&unhex("00000009 01 03 04 63686174 0401")),
            Err(DecodeError::FieldTooLong { field: "token" })
        );
        assert_eq!(
            decode_slice(&unhex("00000003 01 01 00")),
            Err(DecodeError::EmptyField { field: "device_id" })
        );
        assert_eq!(
            decode_slice(&unhex("0000000c 01 03 04 63686174 0000 02 00000000")),
            Err(DecodeError::InvalidTag { field: "last_seq" })
        );
        assert_eq!(
            decode_slice(&unhex("00000000")),
            Err(DecodeError::FrameTooShort { len: 0 })
        );
        // The version is checked before the op.
        assert_eq!(
            decode_slice(&unhex("00000002 00 ee")),
            Err(DecodeError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn decode_errors_map_to_error_codes() {
        assert_eq!(
            DecodeError::FrameTooLarge { len: 1 << 20 }.error_code(),
            ErrorCode::FRAME_TOO_LARGE
        );
        assert_eq!(
            DecodeError::UnsupportedVersion(2).error_code(),
            ErrorCode::UNSUPPORTED_VERSION
        );
        for error in [
            DecodeError::FrameTooShort { len: 1 },
            DecodeError::UnknownOp(0),
            DecodeError::Truncated { op: Op::Ack },
            DecodeError::TrailingBytes { op: Op::Ping },
            DecodeError::FieldTooLong { field: "app" },
            DecodeError::EmptyField { field: "app" },
            DecodeError::InvalidUtf8 { field: "app" },
            DecodeError::InvalidTag { field: "last_seq" },
        ] {
            assert_eq!(error.error_code(), ErrorCode::MALFORMED_FRAME, "{error}");
        }
    }
}
