//! The messages the control plane and the gateway shards exchange.
//!
//! Both planes depend on this module and never on each other. Every message
//! travels over a bounded channel created at startup: commands go from the
//! control plane to one shard, events go from every shard to the control
//! plane.

use std::fmt;

use bytes::Bytes;

use crate::frame::{GoAwayReason, MessageId, NetworkType, UpstreamStatus};

/// A connection's address: the shard that owns it, its slab slot and the
/// slot's generation. Slots are reused, so the generation keeps a stale
/// command from ever reaching a newer connection in the same slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub shard: u16,
    pub slot: u32,
    pub generation: u32,
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.shard, self.slot, self.generation)
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnId({self})")
    }
}

/// One stored message on its way to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushMessage {
    pub seq: u64,
    pub message_id: MessageId,
    pub payload: Bytes,
}

/// Control plane -> shard.
#[derive(Debug)]
pub enum ShardCommand {
    /// A message just stored for the user bound to `app` on `conn`. The shard
    /// sends it only if it is the next one the connection is owed; otherwise
    /// it notes that the connection is behind and asks for a catch-up.
    Deliver {
        conn: ConnId,
        app: String,
        message: PushMessage,
    },
    /// The reply to a `Bound` or `CatchUp` event: the stored messages after
    /// `after`, in order. `more` says storage holds further messages.
    Fill {
        conn: ConnId,
        app: String,
        after: u64,
        messages: Vec<PushMessage>,
        more: bool,
    },
    /// Deliveries to this binding may have been lost (the register or the
    /// channel between nodes was down for a while): check storage for
    /// messages past what was sent, as a `CatchUp` does.
    Resync { conn: ConnId, app: String },
    /// The outcome of an UPSTREAM the connection sent.
    UpstreamAck {
        conn: ConnId,
        app: String,
        request_id: u64,
        status: UpstreamStatus,
    },
    /// Send GOAWAY with `reason`, flush, close.
    Kick { conn: ConnId, reason: GoAwayReason },
    /// Stop accepting, send every connection GOAWAY(server_shutdown) with
    /// the reconnect hint, flush and close them all, then report `Drained`.
    Drain { reconnect_delay_ms: u32 },
}

/// Shard -> control plane.
#[derive(Debug)]
pub enum ShardEvent {
    /// A BIND succeeded. The control plane registers the connection and
    /// answers with a `Fill` starting after `client_last_seq` if the client
    /// reported one, else after the device's stored ack cursor.
    Bound {
        conn: ConnId,
        app: String,
        user: String,
        device_id: String,
        network: NetworkType,
        client_last_seq: Option<u64>,
        /// Unix milliseconds.
        connected_at_ms: u64,
    },
    /// The client unbound the app; the connection stays open.
    Unbound {
        conn: ConnId,
        app: String,
        user: String,
    },
    /// The connection is closing or closed and takes no more pushes:
    /// unregister these bindings. Sent once, when the close begins.
    Closed {
        conn: ConnId,
        bindings: Vec<(String, String)>,
    },
    /// The device holds every message of (app, user) up to `seq`.
    Ack {
        conn: ConnId,
        app: String,
        user: String,
        device_id: String,
        seq: u64,
    },
    /// The connection is owed stored messages after `after` and has room
    /// for `limit` of them.
    CatchUp {
        conn: ConnId,
        app: String,
        user: String,
        after: u64,
        limit: u32,
    },
    /// Data the client sent for the app's business server.
    Upstream {
        conn: ConnId,
        app: String,
        user: String,
        device_id: String,
        request_id: u64,
        payload: Bytes,
    },
    /// The shard finished a `Drain`: every connection is closed.
    Drained { shard: u16 },
}
