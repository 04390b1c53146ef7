//! The frames of wire protocol v1 and the small value types they carry.
//!
//! Codes (GOAWAY reasons, BIND_ERR codes, ERROR codes, UPSTREAM_ACK statuses)
//! are `u16` newtypes rather than closed enums so that a v1 peer can carry a
//! code a newer peer defined without failing to decode it.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// One frame of wire protocol v1. Both directions share the type; which side
/// may send which op is the connection state machines' business, not the
/// codec's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client -> server, first frame of a connection.
    Hello {
        device_id: String,
        client_version: String,
        network: NetworkType,
        /// What the client understands beyond the first v1 ops. Optional on
        /// the wire: a HELLO that ends after `network` has none, and one
        /// with none is written without it.
        features: Features,
    },
    /// Server -> client, reply to HELLO: the heartbeat interval the client
    /// must keep (it depends on the network type the client reported), and
    /// the epoch of the server's storage, which changes when the storage is
    /// created anew (a wiped database): sequences of one epoch mean nothing
    /// in another. Optional on the wire: a HELLO_OK may end before it.
    HelloOk {
        heartbeat_interval_ms: u32,
        storage_epoch: Option<u64>,
    },
    /// Client -> server: bind an app on this connection. `last_seq` is the
    /// last sequence the client holds for this app, if it knows it;
    /// `last_broadcast_seq` the last broadcast it holds. `tags` (for example
    /// `platform=ios`) are what broadcasts may be targeted by. The last two
    /// fields are optional on the wire: a BIND that ends after `last_seq`
    /// decodes with none.
    Bind {
        app: String,
        token: String,
        last_seq: Option<u64>,
        last_broadcast_seq: Option<u64>,
        tags: Vec<String>,
    },
    /// Server -> client: the app is bound for `user`.
    BindOk { app: String, user: String },
    /// Server -> client: the app could not be bound.
    BindErr {
        app: String,
        code: BindErrorCode,
        message: String,
    },
    /// Client -> server heartbeat.
    Ping,
    /// Server -> client heartbeat reply.
    Pong,
    /// Server -> client: one message of the app's inbox for the bound user.
    Push {
        app: String,
        message_id: MessageId,
        seq: u64,
        payload: Bytes,
    },
    /// Client -> server: the client holds every message of `app` up to and
    /// including `seq`.
    Ack { app: String, seq: u64 },
    /// Server -> client: a message for the bound user that was never stored
    /// (a push with `"store": false`: typing indicators, live presence). It
    /// has no seq: the client does not ack it, and it does not move the
    /// client's resume point. Only connections bound when it was pushed get
    /// it; it is never sent again.
    Transient { app: String, payload: Bytes },
    /// Server -> client: one broadcast to every (targeted) user of the app.
    /// `seq` is the app's broadcast sequence, apart from inbox sequences.
    Broadcast {
        app: String,
        message_id: MessageId,
        seq: u64,
        payload: Bytes,
    },
    /// Client -> server: the client holds every broadcast of `app` up to
    /// and including `seq`.
    BroadcastAck { app: String, seq: u64 },
    /// Client -> server: data for the app's business server. With a
    /// `route` it goes to that webhook route, else to the app's default
    /// route; on the wire a routed UPSTREAM is op `UpstreamRouted`, so a
    /// frame without a route is what every v1 peer reads.
    Upstream {
        app: String,
        request_id: u64,
        route: Option<String>,
        payload: Bytes,
    },
    /// Server -> client: the outcome of an UPSTREAM.
    UpstreamAck {
        app: String,
        request_id: u64,
        status: UpstreamStatus,
    },
    /// Client -> server: stop receiving pushes for `app` on this connection.
    /// From a client: stop pushes for `app` (no reason). From the server:
    /// the app was unbound for `reason` (and the connection stays open).
    Unbind {
        app: String,
        reason: Option<UnbindReason>,
    },
    /// Server -> client: the server is about to close the connection.
    GoAway {
        reason: GoAwayReason,
        reconnect_delay_ms: Option<u32>,
    },
    /// Either direction: a protocol error; the sender closes after it.
    Error { code: ErrorCode, message: String },
    /// Server -> client: the server resumes `app`'s inbox or broadcasts
    /// after `after`, below the seq the client's BIND said it holds (the
    /// server's data was reset or restored): the client's resume point for
    /// that sequence is now `after`, and it must not drop the seqs that
    /// follow as duplicates.
    Reset {
        app: String,
        sequence: ResetSequence,
        after: u64,
    },
    /// Heartbeat negotiation. Client -> server: the interval the client is
    /// about to ping at. Server -> client, only ever in answer to one: the
    /// interval in force, the proposal clamped to the server's range for
    /// the connection's network type. A server never sends it unasked, so
    /// clients that do not negotiate never see it.
    Heartbeat { interval_ms: u32 },
    /// Server -> client: message `seq` of the app's inbox was pushed with
    /// `"delivery": "notify"`: only its size and hint come; the client
    /// pulls the body (PULL) after a random delay of up to
    /// `pull_spread_ms`, and acks `seq` as for a PUSH. Sent only to clients
    /// whose HELLO carried [`Features::NOTIFY`]; others get the PUSH.
    Notify {
        app: String,
        message_id: MessageId,
        seq: u64,
        size: u32,
        pull_spread_ms: u32,
        hint: String,
    },
    /// Client -> server: send the body of message `seq` of the app's inbox.
    Pull { app: String, seq: u64 },
    /// Server -> client: the answer to a PULL. With [`PullStatus::OK`] it
    /// carries the message; otherwise `message_id` is all zeros and the
    /// payload empty.
    PullReply {
        app: String,
        seq: u64,
        status: PullStatus,
        message_id: MessageId,
        payload: Bytes,
    },
    /// Server -> client, after BIND_OK: the server closed this device's
    /// previous connection bound to `app` because nothing came from it
    /// within its heartbeat deadline (1.5 times `interval_ms`, the interval
    /// in force then, on `network`), `closed_ago_ms` before this bind. A
    /// client that lost that connection without knowing why learns that
    /// its pings stopped arriving: the interval did not hold. Sent only to
    /// clients whose HELLO carried [`Features::SESSION_TIMED_OUT`].
    SessionTimedOut {
        app: String,
        network: NetworkType,
        interval_ms: u32,
        closed_ago_ms: u32,
    },
}

/// The ops a client understands beyond the first v1 ones, as HELLO's
/// trailing bit set. A server sends a frame of a later op only to a client
/// that named it, so an older client never sees an op it cannot decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u32);

impl Features {
    pub const NONE: Features = Features(0);
    /// TRANSIENT frames (`"store": false` pushes).
    pub const TRANSIENT: Features = Features(1);
    /// NOTIFY, PULL and PULL_REPLY (`"delivery": "notify"` pushes).
    pub const NOTIFY: Features = Features(2);
    /// SESSION_TIMED_OUT (the previous connection's heartbeat deadline
    /// passed).
    pub const SESSION_TIMED_OUT: Features = Features(4);
    /// Everything this version understands.
    pub const ALL: Features =
        Features(Features::TRANSIENT.0 | Features::NOTIFY.0 | Features::SESSION_TIMED_OUT.0);

    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Which of an app's two sequences a RESET moves back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResetSequence {
    /// The inbox: PUSH and ACK seqs.
    Inbox = 0,
    /// The app's broadcasts: BROADCAST and BROADCAST_ACK seqs.
    Broadcasts = 1,
}

impl ResetSequence {
    pub fn from_u8(byte: u8) -> Option<ResetSequence> {
        match byte {
            0 => Some(ResetSequence::Inbox),
            1 => Some(ResetSequence::Broadcasts),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ResetSequence::Inbox => "inbox",
            ResetSequence::Broadcasts => "broadcasts",
        }
    }
}

/// The op byte of each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Hello = 0x01,
    HelloOk = 0x02,
    Bind = 0x03,
    BindOk = 0x04,
    BindErr = 0x05,
    Ping = 0x06,
    Pong = 0x07,
    Push = 0x08,
    Ack = 0x09,
    Upstream = 0x0A,
    UpstreamAck = 0x0B,
    Unbind = 0x0C,
    GoAway = 0x0D,
    Error = 0x0E,
    Broadcast = 0x0F,
    BroadcastAck = 0x10,
    Reset = 0x11,
    UpstreamRouted = 0x12,
    Transient = 0x13,
    Heartbeat = 0x14,
    Notify = 0x15,
    Pull = 0x16,
    PullReply = 0x17,
    SessionTimedOut = 0x18,
}

impl Op {
    pub fn from_u8(byte: u8) -> Option<Op> {
        Some(match byte {
            0x01 => Op::Hello,
            0x02 => Op::HelloOk,
            0x03 => Op::Bind,
            0x04 => Op::BindOk,
            0x05 => Op::BindErr,
            0x06 => Op::Ping,
            0x07 => Op::Pong,
            0x08 => Op::Push,
            0x09 => Op::Ack,
            0x0A => Op::Upstream,
            0x0B => Op::UpstreamAck,
            0x0C => Op::Unbind,
            0x0D => Op::GoAway,
            0x0E => Op::Error,
            0x0F => Op::Broadcast,
            0x10 => Op::BroadcastAck,
            0x11 => Op::Reset,
            0x12 => Op::UpstreamRouted,
            0x13 => Op::Transient,
            0x14 => Op::Heartbeat,
            0x15 => Op::Notify,
            0x16 => Op::Pull,
            0x17 => Op::PullReply,
            0x18 => Op::SessionTimedOut,
            _ => return None,
        })
    }
}

impl Frame {
    pub fn op(&self) -> Op {
        match self {
            Frame::Hello { .. } => Op::Hello,
            Frame::HelloOk { .. } => Op::HelloOk,
            Frame::Bind { .. } => Op::Bind,
            Frame::BindOk { .. } => Op::BindOk,
            Frame::BindErr { .. } => Op::BindErr,
            Frame::Ping => Op::Ping,
            Frame::Pong => Op::Pong,
            Frame::Push { .. } => Op::Push,
            Frame::Ack { .. } => Op::Ack,
            Frame::Transient { .. } => Op::Transient,
            Frame::Upstream { route: None, .. } => Op::Upstream,
            Frame::Upstream { route: Some(_), .. } => Op::UpstreamRouted,
            Frame::UpstreamAck { .. } => Op::UpstreamAck,
            Frame::Unbind { .. } => Op::Unbind,
            Frame::GoAway { .. } => Op::GoAway,
            Frame::Error { .. } => Op::Error,
            Frame::Broadcast { .. } => Op::Broadcast,
            Frame::BroadcastAck { .. } => Op::BroadcastAck,
            Frame::Reset { .. } => Op::Reset,
            Frame::Heartbeat { .. } => Op::Heartbeat,
            Frame::Notify { .. } => Op::Notify,
            Frame::Pull { .. } => Op::Pull,
            Frame::PullReply { .. } => Op::PullReply,
            Frame::SessionTimedOut { .. } => Op::SessionTimedOut,
        }
    }
}

/// The kind of network the client is on; the server picks the heartbeat
/// interval and its negotiable range from it (carrier NATs drop idle
/// mappings sooner than wifi ones, and older radio generations sooner
/// still).
///
/// Byte 2 was `cellular` before the generations were told apart; it is
/// 4g now, so an old client's `cellular` gets the 4g settings and a new
/// client's 4g reads as `cellular` on an old server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum NetworkType {
    Unknown = 0,
    Wifi = 1,
    Cellular4g = 2,
    Wired = 3,
    Cellular2g = 4,
    Cellular3g = 5,
    Cellular5g = 6,
}

impl NetworkType {
    /// Every type, in byte order: what per-type tables are indexed by.
    pub const ALL: [NetworkType; 7] = [
        NetworkType::Unknown,
        NetworkType::Wifi,
        NetworkType::Cellular4g,
        NetworkType::Wired,
        NetworkType::Cellular2g,
        NetworkType::Cellular3g,
        NetworkType::Cellular5g,
    ];

    /// Unknown bytes decode as `Unknown` so that a newer client's network
    /// type never fails a HELLO.
    pub fn from_u8(byte: u8) -> NetworkType {
        NetworkType::ALL
            .get(usize::from(byte))
            .copied()
            .unwrap_or(NetworkType::Unknown)
    }

    /// The type's position in [`NetworkType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NetworkType::Unknown => "unknown",
            NetworkType::Wifi => "wifi",
            NetworkType::Cellular4g => "4g",
            NetworkType::Wired => "wired",
            NetworkType::Cellular2g => "2g",
            NetworkType::Cellular3g => "3g",
            NetworkType::Cellular5g => "5g",
        }
    }
}

impl FromStr for NetworkType {
    type Err = String;
    /// `cellular`, the name from before the generations were told apart,
    /// reads as 4g (the same byte).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cellular" {
            return Ok(NetworkType::Cellular4g);
        }
        NetworkType::ALL
            .into_iter()
            .find(|network| network.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown network type {s:?} (expected 2g, 3g, 4g, 5g, wifi, wired or unknown)"
                )
            })
    }
}

/// A message's id: 16 bytes, shown as 32 lowercase hex digits. Clients
/// de-duplicate redelivered messages by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id)
            .map_err(|_| format!("message id {s:?} is not 32 hex digits"))?;
        Ok(MessageId(id))
    }
}

macro_rules! code_type {
    ($(#[$doc:meta])* $name:ident { $($(#[$cdoc:meta])* $const:ident = $value:literal => $label:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u16);

        impl $name {
            $($(#[$cdoc])* pub const $const: $name = $name($value);)*

            /// A stable snake_case name for logs and metrics; codes this
            /// version does not know are "unknown".
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($value => $label,)*
                    _ => "unknown",
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({} {})", stringify!($name), self.0, self.name())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

code_type! {
    /// Why the server sends GOAWAY.
    GoAwayReason {
        /// The business server kicked the user; do not reconnect.
        KICKED = 1 => "kicked",
        /// The server is shutting down or draining; reconnect after the delay.
        SERVER_SHUTDOWN = 2 => "server_shutdown",
        /// HELLO and BIND did not both arrive within the auth timeout.
        AUTH_TIMEOUT = 3 => "auth_timeout",
        /// Too many failed BINDs on this connection.
        AUTH_FAILED = 4 => "auth_failed",
        /// The client did not read fast enough and its queue hit the limit.
        SLOW_CONSUMER = 5 => "slow_consumer",
        /// The client broke the protocol (garbage, oversized or unexpected frame).
        PROTOCOL_ERROR = 6 => "protocol_error",
        /// No frame arrived within the heartbeat deadline.
        HEARTBEAT_TIMEOUT = 7 => "heartbeat_timeout",
        /// The gateway is taking connections faster than it may (a
        /// reconnect storm): reconnect after the delay, which is jittered.
        OVERLOADED = 8 => "overloaded",
        /// The connection's only app was deleted; do not reconnect for it.
        APP_DELETED = 9 => "app_deleted",
    }
}

code_type! {
    /// Why the server unbound an app from a connection that stays open.
    UnbindReason {
        /// The app was deleted; do not bind it again.
        APP_DELETED = 1 => "app_deleted",
    }
}

code_type! {
    /// Why a BIND failed.
    BindErrorCode {
        /// The token's signature, format or claims are wrong.
        INVALID_TOKEN = 1 => "invalid_token",
        /// The token expired.
        TOKEN_EXPIRED = 2 => "token_expired",
        /// The server knows no such app.
        UNKNOWN_APP = 3 => "unknown_app",
        /// The connection already has the maximum number of apps bound.
        TOO_MANY_APPS = 4 => "too_many_apps",
        /// The app is already bound on this connection.
        ALREADY_BOUND = 5 => "already_bound",
        /// The app has as many connections bound as its `max_connections`
        /// allows; retry later.
        TOO_MANY_CONNECTIONS = 6 => "too_many_connections",
    }
}

code_type! {
    /// ERROR frame codes.
    ErrorCode {
        /// A frame could not be decoded.
        MALFORMED_FRAME = 1 => "malformed_frame",
        /// A frame's length exceeded the protocol maximum.
        FRAME_TOO_LARGE = 2 => "frame_too_large",
        /// The frame's version byte is not one the receiver speaks.
        UNSUPPORTED_VERSION = 3 => "unsupported_version",
        /// A valid frame arrived in a state where it is not allowed.
        UNEXPECTED_FRAME = 4 => "unexpected_frame",
        /// A frame named an app that is not bound on this connection.
        NOT_BOUND = 5 => "not_bound",
    }
}

code_type! {
    /// The outcome of an UPSTREAM.
    UpstreamStatus {
        /// The business server accepted the data.
        ACCEPTED = 0 => "accepted",
        /// The app has no business-server endpoint configured.
        NO_ENDPOINT = 1 => "no_endpoint",
        /// The business server answered with an error.
        REJECTED = 2 => "rejected",
        /// The business server could not be reached; retrying may help.
        UNAVAILABLE = 3 => "unavailable",
        /// The app named in the UPSTREAM is not bound on this connection.
        NOT_BOUND = 4 => "not_bound",
        /// The route named in the UPSTREAM is not one of the app's webhook
        /// routes that takes upstream data.
        UNKNOWN_ROUTE = 5 => "unknown_route",
    }
}

code_type! {
    /// The outcome of a PULL.
    PullStatus {
        /// The message follows.
        OK = 0 => "ok",
        /// The inbox holds no such message (expired, or never stored):
        /// there is nothing to pull, now or later.
        GONE = 1 => "gone",
        /// Storage did not answer; pull again later.
        UNAVAILABLE = 2 => "unavailable",
        /// The connection already has as many PULLs unanswered as it may;
        /// pull again once one is answered.
        BUSY = 3 => "busy",
        /// The app is not bound on this connection.
        NOT_BOUND = 4 => "not_bound",
    }
}
