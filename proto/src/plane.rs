//! The messages the control plane and the gateway shards exchange.
//!
//! Both planes depend on this module and never on each other. Every message
//! travels over a bounded channel created at startup: commands go from the
//! control plane to one shard, events go from every shard to the control
//! plane. Most of them are about one connection: a [`ConnCommand`] for its
//! `ServerConn`, or a [`ConnEvent`] it made, each sent with the connection's
//! [`ConnId`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::{Features, GoAwayReason, MessageId, NetworkType, PullStatus, UpstreamStatus};
use crate::ids::{AppId, UserId};

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
    /// Set when it was pushed with `"delivery": "notify"`: a client that
    /// can pull gets a NOTIFY, not the payload.
    pub notice: Option<Notice>,
}

/// What a NOTIFY says besides the message's size: a pushed message's
/// `"delivery": "notify"` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The client pulls after a random delay of up to this.
    pub pull_spread_ms: u32,
    /// Shown to the client before it pulls (0 to 1,024 bytes).
    pub hint: Arc<str>,
}

/// The control plane's answer to a PULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullAnswer {
    Message {
        message_id: MessageId,
        payload: Bytes,
    },
    /// Any status but `ok`.
    Refused(PullStatus),
}

/// One stored broadcast on its way to connections. `seq` is the app's
/// broadcast sequence; a connection gets it only if its binding carries
/// every tag in `required_tags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastMessage {
    pub seq: u64,
    pub message_id: MessageId,
    pub payload: Bytes,
    pub required_tags: Vec<String>,
}

/// How far one broadcast got, counted by the shards as they send it and by
/// the control plane as acks come back.
#[derive(Debug, Default)]
pub struct BroadcastProgress {
    /// Connections it was for: bound to the app, carrying its tags.
    pub target: AtomicU64,
    /// Of those, the ones it was written to (the others had it already, or
    /// get it from a fill once their inbox is caught up, and count then).
    pub sent: AtomicU64,
    /// Of those, low-priority ones dropped for connections that were behind.
    pub dropped: AtomicU64,
    pub acked: AtomicU64,
    /// Connections a paced fan-out found it was for when each shard began
    /// (it counts `target` as it goes, so this says how far it has to go).
    pub planned: AtomicU64,
    /// Shard fan-outs begun (counted by the control plane as it sends each
    /// shard the broadcast) and finished (every connection visited): it is
    /// going out while fewer finished than began.
    pub shards_started: AtomicU64,
    pub shards_finished: AtomicU64,
}

/// How a broadcast goes out.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BroadcastMode {
    /// Connections a second it is sent to; `None`: all at once.
    pub rate_per_sec: Option<f64>,
    /// Dropped, rather than queued, for a connection that is behind (its
    /// output already queued): the first thing given up under load.
    pub low_priority: bool,
}

/// Where a fill leaves the broadcasts of the binding it is for. The fills
/// answering a bind, or a catch-up that asked for broadcasts, come as a
/// batch (inbox and broadcast fills in creation order); the last one says
/// how it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BroadcastsNext {
    /// More fills of the same batch follow.
    Continue,
    /// The batch ends with the inbox still behind: broadcasts keep coming
    /// with its catch-ups.
    WithInbox,
    /// The batch ends with the inbox caught up (or it answers a
    /// `BroadcastCatchUp`): broadcasts go out live once any owed are in.
    Live,
}

/// Control plane -> shard.
#[derive(Debug)]
pub enum ShardCommand {
    /// A command for one connection. One for a connection gone since (an
    /// older generation of its slot) is dropped.
    Conn { conn: ConnId, command: ConnCommand },
    /// A broadcast for every connection of the shard with `app` bound and
    /// every tag in `required_tags`. `frame` is its BROADCAST frame,
    /// encoded once for all connections of all shards; each shard adds to
    /// `progress` what it targeted and sent.
    Broadcast {
        app: AppId,
        seq: u64,
        required_tags: Arc<[String]>,
        frame: Bytes,
        progress: Arc<BroadcastProgress>,
        /// This shard's share of the pace, and the priority.
        mode: BroadcastMode,
    },
    /// Stop accepting, send every connection GOAWAY(server_shutdown), in
    /// even batches over `spread` (all at once when it is zero), each with
    /// a reconnect hint drawn uniformly from `reconnect_delay_ms / 2` to
    /// `reconnect_delay_ms * 3 / 2`; flush and close them all, then report
    /// `Drained`.
    Drain {
        reconnect_delay_ms: u32,
        spread: Duration,
    },
    /// The apps BINDs are checked against from now on. Bindings of an app
    /// no longer in the list end (the app was deleted).
    SetApps(Arc<[GatewayApp]>),
}

/// An app as the gateway checks a BIND for it.
#[derive(Debug, Clone)]
pub struct GatewayApp {
    pub id: String,
    /// The secrets a token may be signed with: the current one, and any a
    /// rotation retired whose grace has not ended.
    pub token_secrets: Vec<TokenSecret>,
    /// Bindings of the app this gateway process allows at once.
    pub max_connections: Option<u32>,
    /// The process's bindings of the app, which every shard counts.
    pub bound: Arc<AtomicU32>,
}

/// A token secret, and when a retired one stops being honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSecret {
    pub secret: Vec<u8>,
    /// Unix ms; none for the current secret.
    pub retires_at_ms: Option<u64>,
}

/// Control plane -> one connection (in a [`ShardCommand::Conn`]).
#[derive(Debug)]
pub enum ConnCommand {
    /// A message just stored for the user bound to `app`. The shard sends
    /// it only if it is the next one the connection is owed; otherwise it
    /// notes that the connection is behind and asks for a catch-up.
    Deliver {
        app: AppId,
        message: PushMessage,
        /// When it was stored (or arrived from the node that stored it),
        /// for the gateway's stored-to-write latency.
        stored_at: Instant,
    },
    /// The reply to a `Bound` or `CatchUp` event: the stored messages after
    /// `after`, in order. `more` says storage holds further messages.
    Fill {
        app: AppId,
        after: u64,
        messages: Vec<PushMessage>,
        more: bool,
        /// Set on the last fill of a batch answering for broadcasts (a
        /// bind's first fills, or a catch-up that asked for broadcasts)
        /// when no broadcast fill ends it: the broadcasts stand at this seq.
        /// A bind that missed no broadcast is then one command, not two.
        broadcasts_from: Option<u64>,
    },
    /// Part of the reply to a `Bound` or a `CatchUp` asking for
    /// broadcasts, or the reply to a `BroadcastCatchUp`: the app's
    /// unexpired broadcasts after `after`, in order.
    BroadcastFill {
        app: AppId,
        after: u64,
        broadcasts: Vec<BroadcastMessage>,
        next: BroadcastsNext,
    },
    /// Deliveries to this binding may have been lost (the register or the
    /// channel between nodes was down for a while): check storage for
    /// messages past what was sent, as a `CatchUp` does.
    Resync { app: AppId },
    /// A message pushed with `"store": false` for the user bound to `app`:
    /// sent if the binding is still there, never stored nor sent again.
    Transient { app: AppId, payload: Bytes },
    /// The answer to a PULL the connection sent.
    PullReply {
        app: AppId,
        seq: u64,
        answer: PullAnswer,
    },
    /// The outcome of an UPSTREAM the connection sent.
    UpstreamAck {
        app: AppId,
        request_id: u64,
        status: UpstreamStatus,
    },
    /// The device's previous connection bound to `app` timed out: tell
    /// the client (SESSION_TIMED_OUT), if it understands it.
    SessionTimedOut {
        app: AppId,
        network: NetworkType,
        interval_ms: u32,
        closed_ago_ms: u32,
    },
    /// Send GOAWAY with `reason`, flush, close.
    Kick { reason: GoAwayReason },
}

/// Shard -> control plane.
#[derive(Debug)]
pub enum ShardEvent {
    /// What a connection asks of the control plane.
    Conn { conn: ConnId, event: ConnEvent },
    /// The shard finished a `Drain`: every connection is closed.
    Drained { shard: u16 },
}

/// What a connection asks of the control plane: made by its `ServerConn`,
/// except `Closed`, which its shard reports when the close begins. The
/// events the control plane hands on whole to a task of their own are
/// structs of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEvent {
    Bound(Bound),
    /// The client unbound the app; the connection stays open.
    Unbound {
        app: AppId,
        user: UserId,
    },
    /// The connection is closing or closed and takes no more pushes:
    /// unregister these bindings. Sent once, when the close begins.
    /// `timed_out` is set when the gateway closed it because its heartbeat
    /// deadline passed.
    Closed {
        bindings: Vec<(AppId, UserId)>,
        timed_out: Option<TimedOut>,
    },
    /// The device holds every message of (app, user) up to `seq`.
    Ack {
        app: AppId,
        user: UserId,
        device_id: String,
        seq: u64,
    },
    CatchUp(CatchUp),
    /// The client holds every broadcast of the app up to `seq`.
    BroadcastAck {
        app: AppId,
        seq: u64,
    },
    /// Broadcasts reached the connection while it could not take them live
    /// and the fills since did not hold them: it is owed the app's
    /// broadcasts after `after`, which must be read again.
    BroadcastCatchUp {
        app: AppId,
        after: u64,
    },
    /// The client asks for the body of message `seq` of (app, user)'s
    /// inbox; answered with a `PullReply`.
    Pull {
        app: AppId,
        user: UserId,
        seq: u64,
    },
    /// Data the client sent for the app's business server, for the
    /// webhook route it named (none: the app's default route).
    Upstream {
        app: AppId,
        user: UserId,
        device_id: String,
        request_id: u64,
        route: Option<String>,
        payload: Bytes,
    },
}

/// A BIND succeeded. The control plane registers the connection and answers
/// with a `Fill` starting after `client_last_seq` if the client reported
/// one, else after the device's stored ack cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub app: AppId,
    pub user: UserId,
    /// The device HELLO named.
    pub device_id: String,
    pub network: NetworkType,
    /// When the gateway accepted the connection, unix milliseconds.
    pub connected_at_ms: u64,
    /// What the client said it last received; `None`: it resumes from the
    /// device's ack cursor.
    pub client_last_seq: Option<u64>,
    /// The last broadcast the client holds; `None`: it keeps no count, so
    /// it gets every unexpired broadcast.
    pub client_last_broadcast_seq: Option<u64>,
    /// The later ops the client's HELLO said it understands.
    pub features: Features,
}

/// A connection the gateway closed because nothing came from it within its
/// heartbeat deadline: the device's next bind of each of its apps is told
/// (SESSION_TIMED_OUT), so a client that did not see why it lost the
/// connection learns that its pings stopped arriving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub device_id: String,
    pub network: NetworkType,
    /// The heartbeat interval in force when it was closed.
    pub interval_ms: u32,
}

/// The connection is owed stored messages of (app, user) after `after` and
/// has room for `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    pub app: AppId,
    pub user: UserId,
    pub after: u64,
    pub limit: u32,
    /// Set while the binding's broadcasts come with its inbox: the
    /// broadcasts after this seq are to be interleaved with the reply.
    pub broadcasts_after: Option<u64>,
}
