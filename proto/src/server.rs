//! The server side of one client connection, as a state machine with no I/O.
//!
//! The gateway feeds it decoded frames (`handle_frame`), deadlines
//! (`handle_timeout`) and control-plane commands (`deliver`, `fill`, `kick`,
//! ...). It answers through an [`Output`] the caller owns and reuses for every
//! connection of a shard, so an idle connection carries no output queue.
//!
//! Delivery is windowed per bound app: at most `inflight_pushes_max` pushes
//! are unacked at a time. A message that arrives out of order, before the
//! first fill, or while the window is full is not queued here: the binding is
//! marked behind and asks the control plane for a catch-up from storage once
//! it has room. Memory per connection therefore stays bounded however much a
//! user's inbox holds.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::{
    BindErrorCode, ErrorCode, Features, Frame, GoAwayReason, MessageId, NetworkType, PullStatus,
    ResetSequence, UnbindReason, UpstreamStatus,
};
use crate::ids::{AppId, UserId};
use crate::limits::{APPS_PER_CONN_MAX, PULLS_IN_FLIGHT_MAX};
use crate::plane::{
    Bound, BroadcastMessage, BroadcastsNext, CatchUp, ConnEvent, PullAnswer, PushMessage, TimedOut,
};

/// One network type's heartbeat: the interval HELLO_OK hands out, and the
/// range a client may negotiate within (HEARTBEAT). Whole seconds: that is
/// what the gateway keeps per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRange {
    pub start_secs: u16,
    pub min_secs: u16,
    pub max_secs: u16,
}

impl HeartbeatRange {
    /// The interval in force for a client that asked for `proposed_ms`:
    /// rounded down to whole seconds and clamped to the range.
    pub fn in_force_secs(&self, proposed_ms: u32) -> u16 {
        let secs = u16::try_from(proposed_ms / 1000).unwrap_or(u16::MAX);
        secs.clamp(self.min_secs, self.max_secs)
    }
}

/// Heartbeat settings per network type, indexed by `NetworkType::index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRanges(pub [HeartbeatRange; NetworkType::ALL.len()]);

impl HeartbeatRanges {
    /// The same fixed interval for every network type: nothing to
    /// negotiate.
    pub fn fixed(interval: Duration) -> HeartbeatRanges {
        let secs = u16::try_from(interval.as_secs()).unwrap_or(u16::MAX);
        HeartbeatRanges(
            [HeartbeatRange {
                start_secs: secs,
                min_secs: secs,
                max_secs: secs,
            }; NetworkType::ALL.len()],
        )
    }

    pub fn for_network(&self, network: NetworkType) -> &HeartbeatRange {
        &self.0[network.index()]
    }

    /// The longest interval any network type may negotiate.
    pub fn longest(&self) -> Duration {
        let secs = self.0.iter().map(|range| range.max_secs).max();
        Duration::from_secs(u64::from(secs.unwrap_or(0)))
    }
}

/// The settings every connection of a gateway shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub heartbeat: HeartbeatRanges,
    /// HELLO and a first successful BIND must both arrive within this time.
    pub auth_timeout: Duration,
    /// Failed BINDs a connection may make before it is closed.
    pub bind_failures_max: u32,
    /// Apps one connection may bind (at most `limits::APPS_PER_CONN_MAX`).
    pub apps_per_conn_max: usize,
    /// Pushes a binding may have sent and not yet acked.
    pub inflight_pushes_max: u32,
    /// The storage's epoch, told to clients in HELLO_OK (see
    /// `Frame::HelloOk`).
    pub storage_epoch: u64,
}

/// The time a connection may stay silent: one interval plus half of one
/// more for network jitter, so a client that pings on time is never cut.
fn heartbeat_deadline(interval_secs: u16) -> Duration {
    Duration::from_millis(u64::from(interval_secs) * 1500)
}

/// What a connection does with a broadcast that reached its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BroadcastFate {
    /// Not bound to the app, or lacking a required tag.
    NotFor,
    /// For it, but it had it already or gets it from its first fill.
    Later,
    /// Send it now.
    Send,
}

/// Where a BIND says the client stands, and what it is tagged with.
struct Resume {
    last_seq: Option<u64>,
    last_broadcast_seq: Option<u64>,
    tags: Vec<String>,
}

/// Why a BIND's token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRejection {
    pub code: BindErrorCode,
    pub message: String,
}

/// Checks BIND tokens. The gateway implements it over its app table and the
/// wall clock; tests implement it with a fixed answer.
pub trait Authenticator {
    /// Returns who the token was issued to.
    fn authenticate(&self, app: &str, token: &str) -> Result<Authenticated, BindRejection>;
}

/// A token that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The app id, shared with the authenticator's table: every binding of
    /// an app points at one copy instead of holding its own.
    pub app: AppId,
    /// The user the token was issued to.
    pub user: UserId,
}

/// Why a connection ends. The label doubles as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a frame it must not send, or bytes that do not decode.
    ProtocolError(ErrorCode),
    /// The client reported an error of its own and is going away.
    ClientError,
    AuthTimeout,
    AuthFailed,
    HeartbeatTimeout,
    Kicked,
    Drained,
    /// The gateway cut the client off because its queue hit the limit.
    SlowConsumer,
    /// The gateway turned the connection away at its accept-rate limit.
    Overloaded,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ProtocolError(_) => "protocol_error",
            CloseReason::ClientError => "client_error",
            CloseReason::AuthTimeout => "auth_timeout",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Kicked => "kicked",
            CloseReason::Drained => "drained",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Overloaded => "overloaded",
        }
    }
}

/// Output of one call into a [`ServerConn`]: frames to send, events for the
/// control plane, and whether to close once the frames are flushed. Owned by
/// the caller and drained after every call.
#[derive(Debug, Default)]
pub struct Output {
    pub transmit: Vec<Frame>,
    pub events: Vec<ConnEvent>,
    pub close: Option<CloseReason>,
    /// Set when the connection's heartbeat interval was set (HELLO) or
    /// negotiated (HEARTBEAT): what the gateway's metric observes.
    pub heartbeat_set: Option<(NetworkType, Duration)>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.transmit.is_empty()
            && self.events.is_empty()
            && self.close.is_none()
            && self.heartbeat_set.is_none()
    }

    pub fn clear(&mut self) {
        self.transmit.clear();
        self.events.clear();
        self.close = None;
        self.heartbeat_set = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Open,
    Closing,
}

/// One app bound on the connection, with its delivery window.
#[derive(Debug)]
struct Binding {
    app: AppId,
    /// A `Box<str>`, not a shared `UserId`: the reference counts would add
    /// 16 bytes to every bound connection. Events copy it.
    user: Box<str>,
    /// Highest seq sent on this connection, once `resumed` (see `sent`);
    /// until then, the seq the client's BIND said it holds (0: none).
    sent_seq: u64,
    /// The first fill arrived: `sent_seq` holds.
    resumed: bool,
    /// Highest seq the client acked on this connection (starts at the resume
    /// point).
    acked: u64,
    /// A catch-up request is outstanding; at most one at a time.
    fill_pending: bool,
    /// Storage holds messages this connection is owed and has not been sent.
    behind: bool,
    /// The next message owed is one to pull, going whole to a client that
    /// cannot pull: no catch-up until every message sent is acked.
    behind_whole: bool,
    /// What broadcasts may be targeted by (`platform=ios`, ...); `None`
    /// for most clients.
    tags: Option<Box<Tags>>,
    /// Highest broadcast seq the client holds or was sent, once a first
    /// broadcast fill said where it resumes; until then, the broadcast seq
    /// the client's BIND said it holds (0: none).
    broadcast_sent: u64,
    /// Highest broadcast seq that reached the connection live while it
    /// could not take it (0: none). Its fan-out counted it as a target; a
    /// fill that sends it counts it as sent.
    broadcast_owed: u64,
    broadcasts: BroadcastPhase,
}

/// How broadcasts reach a binding. They go out live only while its inbox
/// is caught up: otherwise they come from storage interleaved with the
/// inbox's fills, so a client behind on both gets them in the order they
/// were created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BroadcastPhase {
    /// The first fills are on their way: where the client resumes is not
    /// known yet.
    AwaitingFill,
    /// A batch of fills holding the broadcasts is on its way.
    Filling,
    /// The inbox is behind: its next catch-up asks for the broadcasts too.
    WithInbox,
    /// A `BroadcastCatchUp` is out for broadcasts owed.
    CatchingUp,
    /// Live broadcasts go out as they come.
    Live,
}

/// Stored messages for one binding (see `ServerConn::fill`).
#[derive(Debug, Clone, Copy)]
pub struct InboxFill<'a> {
    /// The seq the messages follow.
    pub after: u64,
    /// In ascending order.
    pub messages: &'a [PushMessage],
    /// Storage holds further messages.
    pub more: bool,
    /// Set on the last fill of a batch that answers for broadcasts without
    /// holding one: they stand at this seq.
    pub broadcasts_from: Option<u64>,
}

/// A binding's tags, boxed so that the field is a thin pointer: every
/// binding pays for the field, few have tags.
#[derive(Debug)]
struct Tags(Vec<Box<str>>);

// Multiplied by every bound connection: `room-core/tests/conn_memory.rs`
// holds the heap per idle connection to its budget.
const _: () = assert!(size_of::<Binding>() <= 80);

impl Binding {
    /// Highest seq sent on this connection; `None` until the control
    /// plane's first fill tells where the device resumes. (Two fields, not
    /// an `Option<u64>`, to keep a binding at 80 bytes.)
    fn sent(&self) -> Option<u64> {
        self.resumed.then_some(self.sent_seq)
    }

    fn set_sent(&mut self, seq: u64) {
        self.sent_seq = seq;
        self.resumed = true;
    }

    /// The first inbox fill says where the device resumes. Below what the
    /// client claimed (its inbox was reset or restored), the client is told,
    /// before any push, so that it does not drop what follows as seen.
    fn resume_inbox(&mut self, after: u64, out: &mut Output) {
        debug_assert!(!self.resumed);
        if self.sent_seq > after {
            out.transmit.push(Frame::Reset {
                app: self.app.to_string(),
                sequence: ResetSequence::Inbox,
                after,
            });
        }
        self.set_sent(after);
        self.acked = after;
    }

    /// The same for broadcasts, on the first fill that says where they
    /// resume.
    fn resume_broadcasts(&mut self, after: u64, out: &mut Output) {
        debug_assert_eq!(self.broadcasts, BroadcastPhase::AwaitingFill);
        if self.broadcast_sent > after {
            out.transmit.push(Frame::Reset {
                app: self.app.to_string(),
                sequence: ResetSequence::Broadcasts,
                after,
            });
        }
        self.broadcast_sent = after;
    }

    fn window_room(&self, window: u32) -> u32 {
        let sent = self.sent().unwrap_or(self.acked);
        let inflight = sent.saturating_sub(self.acked);
        window.saturating_sub(u32::try_from(inflight).unwrap_or(u32::MAX))
    }

    /// Whether `message` may go out now. A message pushed to be pulled goes
    /// whole (up to `api.notify_payload_bytes_max`) to a client that cannot
    /// pull, so it goes only when nothing else is unacked: a window of
    /// them would outgrow the send queue a window of ordinary pushes fits.
    fn has_room_for(&self, message: &PushMessage, notify: bool, window: u32) -> bool {
        let room = self.window_room(window);
        room > 0 && (notify || message.notice.is_none() || room == window)
    }

    /// Asks for a catch-up if the binding is behind, has room and has no
    /// request outstanding.
    fn request_catch_up(&mut self, window: u32, out: &mut Output) {
        let Some(sent) = self.sent() else { return };
        let room = self.window_room(window);
        if !self.behind || self.fill_pending || room == 0 || (self.behind_whole && room < window) {
            return;
        }
        self.behind_whole = false;
        self.behind = false;
        self.fill_pending = true;
        let with_broadcasts = self.broadcasts == BroadcastPhase::WithInbox;
        if with_broadcasts {
            self.broadcasts = BroadcastPhase::Filling;
        }
        out.events.push(ConnEvent::CatchUp(CatchUp {
            app: self.app.clone(),
            user: UserId::from(&*self.user),
            after: sent,
            limit: room,
            broadcasts_after: with_broadcasts.then_some(self.broadcast_sent),
        }));
    }

    /// Ends a batch of fills as its last one says. `progressed`: the fill
    /// held broadcasts past where it started.
    fn end_broadcast_fills(&mut self, next: BroadcastsNext, progressed: bool, out: &mut Output) {
        match next {
            BroadcastsNext::Continue => {}
            BroadcastsNext::WithInbox => self.broadcasts = BroadcastPhase::WithInbox,
            BroadcastsNext::Live => {
                // Owed broadcasts may have been stored after the fills'
                // read: read again, unless a catch-up just brought nothing
                // new (what is still owed expired meanwhile).
                let catching_up = self.broadcasts == BroadcastPhase::CatchingUp;
                if self.broadcast_owed > self.broadcast_sent && (!catching_up || progressed) {
                    self.broadcasts = BroadcastPhase::CatchingUp;
                    out.events.push(ConnEvent::BroadcastCatchUp {
                        app: self.app.clone(),
                        after: self.broadcast_sent,
                    });
                } else {
                    self.broadcasts = BroadcastPhase::Live;
                    self.broadcast_owed = 0;
                }
            }
        }
    }

    /// Whether a broadcast targeted at `required` tags is for this binding.
    fn matches(&self, required: &[String]) -> bool {
        let own = self
            .tags
            .as_deref()
            .map_or(&[][..], |tags| tags.0.as_slice());
        required
            .iter()
            .all(|tag| own.iter().any(|own| **own == **tag))
    }

    /// Sends `message`: as NOTIFY when it was pushed to be pulled and the
    /// client said it can pull (`notify`), else whole, as PUSH.
    fn push(&mut self, message: &PushMessage, notify: bool, out: &mut Output) {
        self.set_sent(message.seq);
        out.transmit.push(match &message.notice {
            Some(notice) if notify => Frame::Notify {
                app: self.app.to_string(),
                message_id: message.message_id,
                seq: message.seq,
                size: message.payload.len() as u32,
                pull_spread_ms: notice.pull_spread_ms,
                hint: notice.hint.to_string(),
            },
            _ => Frame::Push {
                app: self.app.to_string(),
                message_id: message.message_id,
                seq: message.seq,
                payload: message.payload.clone(),
            },
        });
    }
}

/// The server side of one connection.
#[derive(Debug)]
pub struct ServerConn {
    phase: Phase,
    /// From HELLO (empty before it). Copied into the events that name the
    /// device rather than shared, for the reason `Binding::user` is.
    device_id: Box<str>,
    network: NetworkType,
    /// When the gateway accepted the connection, unix milliseconds: what
    /// `Bound` tells the register.
    connected_at_ms: u64,
    /// Set until the first successful BIND.
    auth_deadline: Option<Instant>,
    heartbeat_deadline: Instant,
    /// The interval in force, in whole seconds (it fits the struct's
    /// padding, which a `Duration` would not).
    heartbeat_secs: u16,
    bind_failures: u16,
    /// What HELLO said the client understands ([`Features`] bits this
    /// version knows; they fit a byte, and the struct's padding).
    features: u8,
    /// PULLs sent to the control plane and not answered yet.
    pulls_in_flight: u8,
    bindings: Vec<Binding>,
}

impl ServerConn {
    /// A connection accepted at `now`, which is `connected_at_ms` on the
    /// wall clock.
    pub fn new(now: Instant, connected_at_ms: u64, config: &ServerConfig) -> ServerConn {
        debug_assert!(config.apps_per_conn_max <= APPS_PER_CONN_MAX);
        let unknown_secs = config
            .heartbeat
            .for_network(NetworkType::Unknown)
            .start_secs;
        ServerConn {
            phase: Phase::AwaitHello,
            device_id: Box::default(),
            network: NetworkType::Unknown,
            connected_at_ms,
            auth_deadline: Some(now + config.auth_timeout),
            heartbeat_deadline: now + heartbeat_deadline(unknown_secs),
            heartbeat_secs: unknown_secs,
            bind_failures: 0,
            features: 0,
            pulls_in_flight: 0,
            bindings: Vec::new(),
        }
    }

    fn understands(&self, feature: Features) -> bool {
        Features(u32::from(self.features)).contains(feature)
    }

    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// The (app, user) pairs bound now.
    pub fn bindings(&self) -> impl Iterator<Item = (&AppId, &str)> {
        self.bindings.iter().map(|b| (&b.app, &*b.user))
    }

    /// The earliest instant at which `handle_timeout` has work to do.
    /// The network the client said it is on (unknown before its HELLO).
    pub fn network(&self) -> NetworkType {
        self.network
    }

    pub fn poll_timeout(&self) -> Instant {
        match self.auth_deadline {
            Some(auth) => auth.min(self.heartbeat_deadline),
            None => self.heartbeat_deadline,
        }
    }

    /// Closes the connection if a deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Output) {
        if self.phase == Phase::Closing {
            return;
        }
        if self.auth_deadline.is_some_and(|deadline| now >= deadline) {
            self.close_with_goaway(GoAwayReason::AUTH_TIMEOUT, CloseReason::AuthTimeout, out);
        } else if now >= self.heartbeat_deadline {
            self.close_with_goaway(
                GoAwayReason::HEARTBEAT_TIMEOUT,
                CloseReason::HeartbeatTimeout,
                out,
            );
        }
    }

    /// Handles bytes that could not be decoded: tell the client why, close.
    pub fn handle_decode_error(&mut self, code: ErrorCode, message: String, out: &mut Output) {
        self.protocol_error(code, message, out);
    }

    pub fn handle_frame(
        &mut self,
        now: Instant,
        frame: Frame,
        config: &ServerConfig,
        auth: &dyn Authenticator,
        out: &mut Output,
    ) {
        if self.phase == Phase::Closing {
            return;
        }
        // Any frame proves the client alive, not only PING.
        self.heartbeat_deadline = now + heartbeat_deadline(self.heartbeat_secs);
        match (self.phase, frame) {
            (
                Phase::AwaitHello,
                Frame::Hello {
                    device_id,
                    client_version: _,
                    network,
                    features,
                },
            ) => {
                self.device_id = device_id.into_boxed_str();
                self.network = network;
                self.features = (features.0 & Features::ALL.0) as u8;
                self.phase = Phase::Open;
                let start_secs = config.heartbeat.for_network(network).start_secs;
                self.set_heartbeat(now, start_secs, out);
                out.transmit.push(Frame::HelloOk {
                    heartbeat_interval_ms: u32::from(start_secs) * 1000,
                    storage_epoch: Some(config.storage_epoch),
                });
            }
            (Phase::Open, Frame::Heartbeat { interval_ms }) => {
                let secs = config
                    .heartbeat
                    .for_network(self.network)
                    .in_force_secs(interval_ms);
                self.set_heartbeat(now, secs, out);
                out.transmit.push(Frame::Heartbeat {
                    interval_ms: u32::from(secs) * 1000,
                });
            }
            (
                Phase::Open,
                Frame::Bind {
                    app,
                    token,
                    last_seq,
                    last_broadcast_seq,
                    tags,
                },
            ) => {
                let resume = Resume {
                    last_seq,
                    last_broadcast_seq,
                    tags,
                };
                self.handle_bind(app, token, resume, config, auth, out);
            }
            (Phase::Open, Frame::Ping) => out.transmit.push(Frame::Pong),
            (Phase::Open, Frame::Ack { app, seq }) => self.handle_ack(&app, seq, config, out),
            (Phase::Open, Frame::BroadcastAck { app, seq }) => {
                // Only broadcasts sent here count; an ack past them is ignored.
                if let Some(binding) = self.binding_mut(&app)
                    && binding.broadcasts != BroadcastPhase::AwaitingFill
                    && seq <= binding.broadcast_sent
                {
                    out.events.push(ConnEvent::BroadcastAck {
                        app: binding.app.clone(),
                        seq,
                    });
                }
            }
            (
                Phase::Open,
                Frame::Upstream {
                    app,
                    request_id,
                    route,
                    payload,
                },
            ) => match self.bindings.iter().find(|b| *b.app == *app) {
                Some(binding) => out.events.push(ConnEvent::Upstream {
                    app: binding.app.clone(),
                    user: UserId::from(&*binding.user),
                    device_id: self.device_id.to_string(),
                    request_id,
                    route,
                    payload,
                }),
                None => out.transmit.push(Frame::UpstreamAck {
                    app,
                    request_id,
                    status: UpstreamStatus::NOT_BOUND,
                }),
            },
            (Phase::Open, Frame::Pull { app, seq }) => self.handle_pull(app, seq, out),
            (Phase::Open, Frame::Unbind { app, .. }) => {
                if let Some(index) = self.bindings.iter().position(|b| *b.app == *app) {
                    let binding = self.bindings.swap_remove(index);
                    out.events.push(ConnEvent::Unbound {
                        app: binding.app,
                        user: UserId::from(binding.user.into_string()),
                    });
                }
            }
            (_, Frame::Error { .. }) => {
                self.phase = Phase::Closing;
                out.close = Some(CloseReason::ClientError);
            }
            (phase, frame) => {
                let expected = match (phase, &frame) {
                    (Phase::AwaitHello, _) => "HELLO must be the first frame",
                    (_, Frame::Hello { .. }) => "HELLO was already received on this connection",
                    _ => "only the server sends this frame",
                };
                self.protocol_error(
                    ErrorCode::UNEXPECTED_FRAME,
                    format!("unexpected {:?} frame: {expected}", frame.op()),
                    out,
                );
            }
        }
    }

    /// Puts `secs` in force from `now`. The deadline only moves here; the
    /// shard's timer wheel, which fires at the deadline it was given, puts
    /// the connection back at the new one when it fires early.
    fn set_heartbeat(&mut self, now: Instant, secs: u16, out: &mut Output) {
        self.heartbeat_secs = secs;
        self.heartbeat_deadline = now + heartbeat_deadline(secs);
        out.heartbeat_set = Some((self.network, Duration::from_secs(u64::from(secs))));
    }

    /// The heartbeat interval in force.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.heartbeat_secs))
    }

    fn handle_bind(
        &mut self,
        app: String,
        token: String,
        resume: Resume,
        config: &ServerConfig,
        auth: &dyn Authenticator,
        out: &mut Output,
    ) {
        let BindRejection { code, message } = if self.bindings.iter().any(|b| *b.app == *app) {
            BindRejection {
                code: BindErrorCode::ALREADY_BOUND,
                message: format!("app {app:?} is already bound on this connection"),
            }
        } else if self.bindings.len() >= config.apps_per_conn_max {
            BindRejection {
                code: BindErrorCode::TOO_MANY_APPS,
                message: format!(
                    "a connection may bind at most {} apps",
                    config.apps_per_conn_max
                ),
            }
        } else {
            match auth.authenticate(&app, &token) {
                Ok(Authenticated {
                    app: shared_app,
                    user,
                }) => {
                    debug_assert_eq!(*shared_app, *app);
                    self.auth_deadline = None;
                    out.transmit.push(Frame::BindOk {
                        app,
                        user: user.to_string(),
                    });
                    // Most connections bind one app: grow one at a time
                    // rather than by Vec's usual four, since this is
                    // multiplied by every connection.
                    self.bindings.reserve_exact(1);
                    self.bindings.push(Binding {
                        app: shared_app.clone(),
                        user: Box::from(&*user),
                        sent_seq: resume.last_seq.unwrap_or(0),
                        resumed: false,
                        acked: 0,
                        fill_pending: true,
                        behind: false,
                        behind_whole: false,
                        tags: (!resume.tags.is_empty()).then(|| {
                            let tags = resume.tags.into_iter().map(String::into_boxed_str);
                            Box::new(Tags(tags.collect()))
                        }),
                        broadcast_sent: resume.last_broadcast_seq.unwrap_or(0),
                        broadcast_owed: 0,
                        broadcasts: BroadcastPhase::AwaitingFill,
                    });
                    out.events.push(ConnEvent::Bound(Bound {
                        app: shared_app,
                        user,
                        device_id: self.device_id.to_string(),
                        network: self.network,
                        connected_at_ms: self.connected_at_ms,
                        client_last_seq: resume.last_seq,
                        client_last_broadcast_seq: resume.last_broadcast_seq,
                        features: Features(u32::from(self.features)),
                    }));
                    return;
                }
                Err(rejection) => rejection,
            }
        };
        // Every refusal counts, whatever its code: a client that keeps
        // sending BINDs the server refuses is broken or probing.
        self.bind_failures = self.bind_failures.saturating_add(1);
        out.transmit.push(Frame::BindErr { app, code, message });
        if u32::from(self.bind_failures) >= config.bind_failures_max {
            self.close_with_goaway(GoAwayReason::AUTH_FAILED, CloseReason::AuthFailed, out);
        }
    }

    /// An ACK for an app not bound here, for a seq never sent on this
    /// connection, or at or below the current ack is ignored.
    fn handle_ack(&mut self, app: &str, seq: u64, config: &ServerConfig, out: &mut Output) {
        let Some(binding) = self.bindings.iter_mut().find(|b| &*b.app == app) else {
            return;
        };
        let Some(sent) = binding.sent() else { return };
        if seq > sent || seq <= binding.acked {
            return;
        }
        binding.acked = seq;
        out.events.push(ConnEvent::Ack {
            app: binding.app.clone(),
            user: UserId::from(&*binding.user),
            device_id: self.device_id.to_string(),
            seq,
        });
        binding.request_catch_up(config.inflight_pushes_max, out);
    }

    /// A message was just stored for this binding's user. It goes out only if
    /// it is the next one owed and the window has room; otherwise the binding
    /// catches up from storage.
    pub fn deliver(
        &mut self,
        app: &str,
        message: &PushMessage,
        config: &ServerConfig,
        out: &mut Output,
    ) {
        if self.phase == Phase::Closing {
            return;
        }
        let window = config.inflight_pushes_max;
        let notify = self.understands(Features::NOTIFY);
        let Some(binding) = self.binding_mut(app) else {
            return;
        };
        let Some(sent) = binding.sent() else {
            // The first fill is on its way; it may have been read from
            // storage before this message was stored, so check again after.
            binding.behind = true;
            return;
        };
        if message.seq <= sent {
            return;
        }
        if message.seq == sent + 1 && binding.has_room_for(message, notify, window) {
            binding.push(message, notify, out);
        } else {
            binding.behind = true;
            binding.behind_whole |= message.seq == sent + 1 && binding.window_room(window) > 0;
            binding.request_catch_up(window, out);
        }
    }

    /// Stored messages in answer to a `Bound` or `CatchUp` event. The
    /// first fill sets the resume point.
    pub fn fill(
        &mut self,
        app: &str,
        fill: InboxFill<'_>,
        config: &ServerConfig,
        out: &mut Output,
    ) {
        let InboxFill {
            after,
            messages,
            more,
            broadcasts_from,
        } = fill;
        if self.phase == Phase::Closing {
            return;
        }
        let window = config.inflight_pushes_max;
        let notify = self.understands(Features::NOTIFY);
        let Some(binding) = self.binding_mut(app) else {
            return;
        };
        binding.fill_pending = false;
        if binding.sent().is_none() {
            binding.resume_inbox(after, out);
        }
        for message in messages {
            let sent = binding.sent().unwrap_or(after);
            if message.seq <= sent {
                continue;
            }
            if !binding.has_room_for(message, notify, window) {
                binding.behind = true;
                binding.behind_whole = binding.window_room(window) > 0;
                break;
            }
            binding.push(message, notify, out);
        }
        if more {
            binding.behind = true;
        }
        if let Some(from) = broadcasts_from {
            if binding.broadcasts == BroadcastPhase::AwaitingFill {
                binding.resume_broadcasts(from, out);
            }
            let next = if more {
                BroadcastsNext::WithInbox
            } else {
                BroadcastsNext::Live
            };
            binding.end_broadcast_fills(next, false, out);
        }
        binding.request_catch_up(window, out);
        if binding.broadcasts == BroadcastPhase::WithInbox
            && !binding.behind
            && !binding.fill_pending
        {
            // Broadcasts came while this fill (asked without them) was on
            // its way, and it caught the inbox up.
            binding.end_broadcast_fills(BroadcastsNext::Live, false, out);
        }
    }

    /// Deliveries may have been lost: catch up from storage once there is
    /// room. A binding still waiting for its first fill reads storage then
    /// anyway.
    pub fn resync(&mut self, app: &str, config: &ServerConfig, out: &mut Output) {
        if self.phase == Phase::Closing {
            return;
        }
        let Some(binding) = self.binding_mut(app) else {
            return;
        };
        if binding.sent().is_some() {
            binding.behind = true;
            binding.request_catch_up(config.inflight_pushes_max, out);
        }
    }

    /// A broadcast of `app` reached this connection's shard: says whether
    /// to send it here (the shard sends the frame it encoded once for all).
    /// While the binding cannot take it live (no broadcast fill yet, or its
    /// inbox is behind) it is noted as owed, not sent, and a later fill
    /// brings it in its place.
    pub fn broadcast(&mut self, app: &str, seq: u64, required_tags: &[String]) -> BroadcastFate {
        if self.phase == Phase::Closing {
            return BroadcastFate::NotFor;
        }
        let Some(binding) = self.binding_mut(app) else {
            return BroadcastFate::NotFor;
        };
        if !binding.matches(required_tags) {
            return BroadcastFate::NotFor;
        }
        if binding.broadcasts == BroadcastPhase::Live && (binding.behind || binding.fill_pending) {
            // Stored messages older than this broadcast are still to come.
            binding.broadcasts = BroadcastPhase::WithInbox;
        }
        if binding.broadcasts != BroadcastPhase::Live {
            binding.broadcast_owed = binding.broadcast_owed.max(seq);
            return BroadcastFate::Later;
        }
        if seq <= binding.broadcast_sent {
            return BroadcastFate::Later;
        }
        binding.broadcast_sent = seq;
        BroadcastFate::Send
    }

    /// Whether a broadcast of `app` with `required_tags` is for this
    /// connection now (bound to the app, carrying the tags), without
    /// sending it: a paced fan-out counts its connections up front.
    pub fn is_for_broadcast(&self, app: &str, required_tags: &[String]) -> bool {
        self.phase != Phase::Closing
            && self
                .bindings
                .iter()
                .any(|binding| &*binding.app == app && binding.matches(required_tags))
    }

    /// The broadcasts of `app` after `after` that this binding missed, in
    /// order: part of a batch of fills answering `Bound` or a `CatchUp`, or
    /// the answer to a `BroadcastCatchUp`. Broadcasts whose tags the
    /// binding lacks are skipped. Returns the owed ones sent (their fan-out
    /// counted this connection, so their progress counts them as sent now).
    pub fn broadcast_fill(
        &mut self,
        app: &str,
        after: u64,
        broadcasts: &[BroadcastMessage],
        next: BroadcastsNext,
        out: &mut Output,
    ) -> Vec<u64> {
        let mut owed_sent = Vec::new();
        if self.phase == Phase::Closing {
            return owed_sent;
        }
        let Some(binding) = self.binding_mut(app) else {
            return owed_sent;
        };
        if binding.broadcasts == BroadcastPhase::AwaitingFill {
            binding.resume_broadcasts(after, out);
            binding.broadcasts = BroadcastPhase::Filling;
        }
        for broadcast in broadcasts {
            if broadcast.seq <= binding.broadcast_sent || !binding.matches(&broadcast.required_tags)
            {
                continue;
            }
            binding.broadcast_sent = broadcast.seq;
            if broadcast.seq <= binding.broadcast_owed {
                owed_sent.push(broadcast.seq);
            }
            out.transmit.push(Frame::Broadcast {
                app: binding.app.to_string(),
                message_id: broadcast.message_id,
                seq: broadcast.seq,
                payload: broadcast.payload.clone(),
            });
        }
        let progressed = broadcasts.iter().any(|b| b.seq > after);
        binding.end_broadcast_fills(next, progressed, out);
        owed_sent
    }

    /// A message pushed with `"store": false`: sent now if `app` is bound
    /// here and the client understands TRANSIENT, else dropped (it is never
    /// stored, so nothing owes it later). It has no seq, so it goes out at
    /// once whatever the delivery window holds.
    pub fn transient(&mut self, app: &str, payload: &Bytes, out: &mut Output) {
        if self.phase != Phase::Open
            || !self.understands(Features::TRANSIENT)
            || self.binding_mut(app).is_none()
        {
            return;
        }
        out.transmit.push(Frame::Transient {
            app: app.to_owned(),
            payload: payload.clone(),
        });
    }

    /// The device's previous connection bound to `app` timed out: tell the
    /// client, if `app` is bound here and the client understands
    /// SESSION_TIMED_OUT.
    pub fn session_timed_out(
        &mut self,
        app: &str,
        network: NetworkType,
        interval_ms: u32,
        closed_ago_ms: u32,
        out: &mut Output,
    ) {
        if self.phase != Phase::Open
            || !self.understands(Features::SESSION_TIMED_OUT)
            || self.binding_mut(app).is_none()
        {
            return;
        }
        out.transmit.push(Frame::SessionTimedOut {
            app: app.to_owned(),
            network,
            interval_ms,
            closed_ago_ms,
        });
    }

    /// What the register is told of a connection the gateway closed
    /// because its heartbeat deadline passed.
    pub fn timed_out(&self) -> TimedOut {
        TimedOut {
            device_id: self.device_id.to_string(),
            network: self.network,
            interval_ms: u32::from(self.heartbeat_secs) * 1_000,
        }
    }

    /// A PULL for message `seq` of a bound app: it goes to the control
    /// plane, which reads storage and answers with `pull_reply`, unless the
    /// connection has as many PULLs unanswered as it may.
    fn handle_pull(&mut self, app: String, seq: u64, out: &mut Output) {
        let refusal = |status| Frame::PullReply {
            app: app.clone(),
            seq,
            status,
            message_id: MessageId([0; 16]),
            payload: Bytes::new(),
        };
        let Some(binding) = self.bindings.iter().find(|b| *b.app == *app) else {
            out.transmit.push(refusal(PullStatus::NOT_BOUND));
            return;
        };
        if usize::from(self.pulls_in_flight) >= PULLS_IN_FLIGHT_MAX {
            out.transmit.push(refusal(PullStatus::BUSY));
            return;
        }
        out.events.push(ConnEvent::Pull {
            app: binding.app.clone(),
            user: UserId::from(&*binding.user),
            seq,
        });
        self.pulls_in_flight += 1;
    }

    /// The control plane's answer to a PULL: the message, or why not.
    pub fn pull_reply(&mut self, app: &str, seq: u64, reply: PullAnswer, out: &mut Output) {
        self.pulls_in_flight = self.pulls_in_flight.saturating_sub(1);
        if self.phase == Phase::Closing {
            return;
        }
        let (status, message_id, payload) = match reply {
            _ if self.binding_mut(app).is_none() => {
                (PullStatus::NOT_BOUND, MessageId([0; 16]), Bytes::new())
            }
            PullAnswer::Message {
                message_id,
                payload,
            } => (PullStatus::OK, message_id, payload),
            PullAnswer::Refused(status) => (status, MessageId([0; 16]), Bytes::new()),
        };
        out.transmit.push(Frame::PullReply {
            app: app.to_owned(),
            seq,
            status,
            message_id,
            payload,
        });
    }

    pub fn upstream_ack(
        &mut self,
        app: &str,
        request_id: u64,
        status: UpstreamStatus,
        out: &mut Output,
    ) {
        if self.phase == Phase::Closing {
            return;
        }
        out.transmit.push(Frame::UpstreamAck {
            app: app.to_owned(),
            request_id,
            status,
        });
    }

    /// The business server kicked a user bound here.
    pub fn kick(&mut self, reason: GoAwayReason, out: &mut Output) {
        if self.phase != Phase::Closing {
            self.close_with_goaway(reason, CloseReason::Kicked, out);
        }
    }

    /// The app was deleted: its binding ends with UNBIND(app_deleted), or
    /// the connection with GOAWAY(app_deleted) when it was the only app.
    /// Reports the binding's end like a client's UNBIND.
    pub fn unbind_deleted_app(&mut self, app: &str, out: &mut Output) {
        if self.phase != Phase::Open {
            return;
        }
        let Some(index) = self.bindings.iter().position(|b| *b.app == *app) else {
            return;
        };
        if self.bindings.len() == 1 {
            self.close_with_goaway(GoAwayReason::APP_DELETED, CloseReason::Kicked, out);
            return;
        }
        let binding = self.bindings.swap_remove(index);
        out.transmit.push(Frame::Unbind {
            app: app.to_owned(),
            reason: Some(UnbindReason::APP_DELETED),
        });
        out.events.push(ConnEvent::Unbound {
            app: binding.app,
            user: UserId::from(binding.user.into_string()),
        });
    }

    /// The gateway is shutting down.
    pub fn drain(&mut self, reconnect_delay_ms: u32, out: &mut Output) {
        if self.phase == Phase::Closing {
            return;
        }
        self.phase = Phase::Closing;
        out.transmit.push(Frame::GoAway {
            reason: GoAwayReason::SERVER_SHUTDOWN,
            reconnect_delay_ms: Some(reconnect_delay_ms),
        });
        out.close = Some(CloseReason::Drained);
    }

    /// The gateway takes connections faster than it may: tell this one to
    /// come back after `reconnect_delay_ms` and close it.
    pub fn turn_away(&mut self, reconnect_delay_ms: u32, out: &mut Output) {
        self.phase = Phase::Closing;
        out.transmit.push(Frame::GoAway {
            reason: GoAwayReason::OVERLOADED,
            reconnect_delay_ms: Some(reconnect_delay_ms),
        });
        out.close = Some(CloseReason::Overloaded);
    }

    /// The transport under the connection failed (a TLS or WebSocket
    /// error): no frame goes in or out any more.
    pub fn abandon(&mut self) {
        self.phase = Phase::Closing;
    }

    /// The client's queue hit its limit: close without queueing more.
    pub fn close_slow_consumer(&mut self, out: &mut Output) {
        self.phase = Phase::Closing;
        out.close = Some(CloseReason::SlowConsumer);
    }

    fn binding_mut(&mut self, app: &str) -> Option<&mut Binding> {
        self.bindings.iter_mut().find(|b| &*b.app == app)
    }

    /// ERROR says what was wrong; GOAWAY, as before every close the
    /// server makes, says the client must not come back unchanged.
    fn protocol_error(&mut self, code: ErrorCode, message: String, out: &mut Output) {
        self.phase = Phase::Closing;
        out.transmit.push(Frame::Error { code, message });
        out.transmit.push(Frame::GoAway {
            reason: GoAwayReason::PROTOCOL_ERROR,
            reconnect_delay_ms: None,
        });
        out.close = Some(CloseReason::ProtocolError(code));
    }

    fn close_with_goaway(&mut self, reason: GoAwayReason, close: CloseReason, out: &mut Output) {
        self.phase = Phase::Closing;
        out.transmit.push(Frame::GoAway {
            reason,
            reconnect_delay_ms: None,
        });
        out.close = Some(close);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::plane::Notice;
    use std::sync::Arc;

    struct FixedAuth;

    impl Authenticator for FixedAuth {
        fn authenticate(&self, app: &str, token: &str) -> Result<Authenticated, BindRejection> {
            match token.strip_prefix("ok:") {
                Some(user) if app != "unknown" => Ok(Authenticated {
                    app: AppId::from(app),
                    user: UserId::from(user),
                }),
                _ => Err(BindRejection {
                    code: BindErrorCode::INVALID_TOKEN,
                    message: "bad token".to_owned(),
                }),
            }
        }
    }

    /// When the harness's connection was accepted, unix milliseconds.
    const CONNECTED_AT_MS: u64 = 1_700_000_000_000;

    fn config() -> ServerConfig {
        ServerConfig {
            // 4g: 30 s in [20, 90]; the others 60 s in [30, 300].
            heartbeat: HeartbeatRanges(NetworkType::ALL.map(|network| {
                if network == NetworkType::Cellular4g {
                    HeartbeatRange {
                        start_secs: 30,
                        min_secs: 20,
                        max_secs: 90,
                    }
                } else {
                    HeartbeatRange {
                        start_secs: 60,
                        min_secs: 30,
                        max_secs: 300,
                    }
                }
            })),
            auth_timeout: Duration::from_secs(10),
            bind_failures_max: 3,
            apps_per_conn_max: 2,
            inflight_pushes_max: 3,
            storage_epoch: 7,
        }
    }

    fn message(seq: u64) -> PushMessage {
        PushMessage {
            seq,
            message_id: MessageId([seq as u8; 16]),
            payload: Bytes::from(format!("m{seq}")),
            notice: None,
        }
    }

    fn pushed_seqs(out: &Output) -> Vec<u64> {
        out.transmit
            .iter()
            .filter_map(|f| match f {
                Frame::Push { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    fn catch_ups(out: &Output) -> Vec<(u64, u32)> {
        out.events
            .iter()
            .filter_map(|e| match e {
                ConnEvent::CatchUp(CatchUp { after, limit, .. }) => Some((*after, *limit)),
                _ => None,
            })
            .collect()
    }

    struct Harness {
        now: Instant,
        conn: ServerConn,
        config: ServerConfig,
        out: Output,
    }

    impl Harness {
        fn new() -> Harness {
            let now = Instant::now();
            let config = config();
            Harness {
                now,
                conn: ServerConn::new(now, CONNECTED_AT_MS, &config),
                config,
                out: Output::default(),
            }
        }

        fn frame(&mut self, frame: Frame) -> &Output {
            self.out.clear();
            self.conn
                .handle_frame(self.now, frame, &self.config, &FixedAuth, &mut self.out);
            &self.out
        }

        fn hello(&mut self, network: NetworkType) -> &Output {
            self.frame(Frame::Hello {
                device_id: "phone".to_owned(),
                client_version: "1.0".to_owned(),
                network,
                features: Features::ALL,
            })
        }

        fn bind(&mut self, app: &str, token: &str, last_seq: Option<u64>) -> &Output {
            self.frame(Frame::Bind {
                app: app.to_owned(),
                token: token.to_owned(),
                last_seq,
                last_broadcast_seq: None,
                tags: Vec::new(),
            })
        }

        fn open_bound(&mut self, after: u64) {
            self.hello(NetworkType::Wifi);
            self.bind("chat", "ok:alice", None);
            self.fill(after, &[], false);
        }

        fn deliver(&mut self, seq: u64) -> &Output {
            self.out.clear();
            self.conn
                .deliver("chat", &message(seq), &self.config, &mut self.out);
            &self.out
        }

        fn fill(&mut self, after: u64, seqs: &[u64], more: bool) -> &Output {
            self.fill_then_broadcasts(after, seqs, more, None)
        }

        /// A fill that also ends a batch answering for broadcasts, which
        /// stand at `broadcasts_from`.
        fn fill_then_broadcasts(
            &mut self,
            after: u64,
            seqs: &[u64],
            more: bool,
            broadcasts_from: Option<u64>,
        ) -> &Output {
            self.out.clear();
            let messages: Vec<_> = seqs.iter().map(|&s| message(s)).collect();
            let fill = InboxFill {
                after,
                messages: &messages,
                more,
                broadcasts_from,
            };
            self.conn.fill("chat", fill, &self.config, &mut self.out);
            &self.out
        }

        fn ack(&mut self, seq: u64) -> &Output {
            self.frame(Frame::Ack {
                app: "chat".to_owned(),
                seq,
            })
        }

        fn advance(&mut self, by: Duration) -> &Output {
            self.now += by;
            self.out.clear();
            self.conn.handle_timeout(self.now, &mut self.out);
            &self.out
        }
    }

    #[test]
    fn hello_gets_the_interval_of_its_network() {
        let mut h = Harness::new();
        let out = h.hello(NetworkType::Cellular4g);
        assert_eq!(
            out.transmit,
            vec![Frame::HelloOk {
                heartbeat_interval_ms: 30_000,
                storage_epoch: Some(7),
            }]
        );
        assert_eq!(
            out.heartbeat_set,
            Some((NetworkType::Cellular4g, Duration::from_secs(30)))
        );
    }

    #[test]
    fn a_proposed_interval_is_clamped_to_the_range_and_answered() {
        let mut h = Harness::new();
        h.hello(NetworkType::Cellular4g);
        h.bind("chat", "ok:alice", None);
        for (proposed_ms, in_force_secs) in [(45_500, 45u16), (5_000, 20), (600_000, 90)] {
            let out = h.frame(Frame::Heartbeat {
                interval_ms: proposed_ms,
            });
            assert_eq!(
                out.transmit,
                vec![Frame::Heartbeat {
                    interval_ms: u32::from(in_force_secs) * 1000
                }]
            );
            let in_force = Duration::from_secs(u64::from(in_force_secs));
            assert_eq!(out.heartbeat_set, Some((NetworkType::Cellular4g, in_force)));
            assert_eq!(h.conn.heartbeat_interval(), in_force);
        }
    }

    #[test]
    fn a_negotiated_interval_moves_the_deadline() {
        let mut h = Harness::new();
        h.hello(NetworkType::Cellular4g); // 30 s interval, 45 s deadline
        h.bind("chat", "ok:alice", None);
        h.frame(Frame::Heartbeat {
            interval_ms: 80_000,
        });
        // 80 s in force: silent for 119 s is fine, 120 s is not.
        let deadline = h.now + Duration::from_secs(120);
        assert_eq!(h.conn.poll_timeout(), deadline);
        assert!(h.advance(Duration::from_secs(119)).is_empty());
        let out = h.advance(Duration::from_secs(1));
        assert_eq!(out.close, Some(CloseReason::HeartbeatTimeout));
    }

    #[test]
    fn a_heartbeat_before_hello_is_a_protocol_error() {
        let mut h = Harness::new();
        let out = h.frame(Frame::Heartbeat {
            interval_ms: 80_000,
        });
        assert!(matches!(
            out.close,
            Some(CloseReason::ProtocolError(ErrorCode::UNEXPECTED_FRAME))
        ));
    }

    #[test]
    fn frames_before_hello_are_a_protocol_error() {
        let mut h = Harness::new();
        let out = h.bind("chat", "ok:alice", None);
        assert!(matches!(
            out.transmit[..],
            [
                Frame::Error {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    ..
                },
                Frame::GoAway {
                    reason: GoAwayReason::PROTOCOL_ERROR,
                    reconnect_delay_ms: None,
                }
            ]
        ));
        assert_eq!(
            out.close,
            Some(CloseReason::ProtocolError(ErrorCode::UNEXPECTED_FRAME))
        );
        assert!(h.conn.is_closing());
    }

    #[test]
    fn a_second_hello_is_refused_for_what_it_is() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        let out = h.hello(NetworkType::Wifi);
        let [Frame::Error { code, message }, Frame::GoAway { reason, .. }] = &out.transmit[..]
        else {
            panic!("ERROR then GOAWAY expected: {:?}", out.transmit);
        };
        assert_eq!(*code, ErrorCode::UNEXPECTED_FRAME);
        assert_eq!(*reason, GoAwayReason::PROTOCOL_ERROR);
        assert!(
            message.contains("HELLO was already received"),
            "the text names the reason: {message}"
        );
    }

    #[test]
    fn every_refused_bind_counts_toward_the_limit() {
        for (refusal, app, token) in [
            (BindErrorCode::ALREADY_BOUND, "chat", "ok:alice"),
            (BindErrorCode::INVALID_TOKEN, "news", "forged"),
        ] {
            let mut h = Harness::new();
            h.hello(NetworkType::Wifi);
            h.bind("chat", "ok:alice", None);
            for attempt in 1..=3 {
                let out = h.bind(app, token, None);
                assert!(
                    matches!(&out.transmit[0], Frame::BindErr { code, .. } if *code == refusal),
                    "{refusal}: {:?}",
                    out.transmit
                );
                let closed = out.close == Some(CloseReason::AuthFailed);
                assert_eq!(closed, attempt == 3, "{refusal}, attempt {attempt}");
            }
        }
        // too_many_apps too (this config allows two apps).
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.bind("chat", "ok:alice", None);
        h.bind("news", "ok:alice", None);
        for app in ["mail", "maps"] {
            assert_eq!(h.bind(app, "ok:alice", None).close, None);
        }
        assert_eq!(
            h.bind("docs", "ok:alice", None).close,
            Some(CloseReason::AuthFailed)
        );
    }

    #[test]
    fn server_only_frames_from_a_client_close_it() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        let out = h.frame(Frame::Pong);
        assert!(matches!(out.close, Some(CloseReason::ProtocolError(_))));
    }

    #[test]
    fn bind_ok_reports_bound_with_the_client_last_seq() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        let out = h.bind("chat", "ok:alice", Some(7));
        assert_eq!(
            out.transmit,
            vec![Frame::BindOk {
                app: "chat".to_owned(),
                user: "alice".to_owned()
            }]
        );
        assert_eq!(
            out.events,
            vec![ConnEvent::Bound(Bound {
                app: AppId::from("chat"),
                user: UserId::from("alice"),
                device_id: "phone".to_owned(),
                network: NetworkType::Wifi,
                connected_at_ms: CONNECTED_AT_MS,
                client_last_seq: Some(7),
                client_last_broadcast_seq: None,
                features: Features::ALL,
            })]
        );
        let bound: Vec<_> = h
            .conn
            .bindings()
            .map(|(app, user)| (&**app, user))
            .collect();
        assert_eq!(bound, [("chat", "alice")]);
    }

    #[test]
    fn repeated_bind_failures_close_the_connection() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        for attempt in 1..=3 {
            let out = h.bind("chat", "forged", None);
            assert!(matches!(
                out.transmit[0],
                Frame::BindErr {
                    code: BindErrorCode::INVALID_TOKEN,
                    ..
                }
            ));
            let closed = out.close == Some(CloseReason::AuthFailed);
            assert_eq!(closed, attempt == 3, "attempt {attempt}");
        }
    }

    #[test]
    fn bind_limits_apps_and_refuses_duplicates() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.bind("chat", "ok:alice", None);
        let out = h.bind("chat", "ok:alice", None);
        assert!(matches!(
            out.transmit[0],
            Frame::BindErr {
                code: BindErrorCode::ALREADY_BOUND,
                ..
            }
        ));
        h.bind("news", "ok:alice", None);
        let out = h.bind("mail", "ok:alice", None);
        assert!(matches!(
            out.transmit[0],
            Frame::BindErr {
                code: BindErrorCode::TOO_MANY_APPS,
                ..
            }
        ));
    }

    #[test]
    fn unbound_connection_times_out_with_goaway() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wired);
        assert!(h.advance(Duration::from_secs(9)).is_empty());
        let out = h.advance(Duration::from_secs(1));
        assert_eq!(out.close, Some(CloseReason::AuthTimeout));
        assert!(matches!(
            out.transmit[..],
            [Frame::GoAway {
                reason: GoAwayReason::AUTH_TIMEOUT,
                ..
            }]
        ));
    }

    #[test]
    fn silent_connection_is_closed_and_a_pinging_one_is_not() {
        let mut h = Harness::new();
        h.hello(NetworkType::Cellular4g); // 30 s interval, 45 s deadline
        h.bind("chat", "ok:alice", None);
        for _ in 0..10 {
            assert!(h.advance(Duration::from_secs(30)).is_empty());
            assert_eq!(h.frame(Frame::Ping).transmit, vec![Frame::Pong]);
        }
        assert!(h.advance(Duration::from_secs(44)).is_empty());
        let out = h.advance(Duration::from_secs(1));
        assert_eq!(out.close, Some(CloseReason::HeartbeatTimeout));
    }

    #[test]
    fn first_fill_sets_the_resume_point_and_sends_within_the_window() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.bind("chat", "ok:alice", None);
        let out = h.fill(4, &[5, 6, 7, 8], true);
        assert_eq!(pushed_seqs(out), [5, 6, 7]);
        assert!(catch_ups(out).is_empty(), "window full: no catch-up yet");
        let out = h.ack(6);
        assert_eq!(catch_ups(out), [(7, 2)]);
        let out = h.fill(7, &[8, 9], false);
        assert_eq!(pushed_seqs(out), [8, 9]);
    }

    #[test]
    fn a_transient_message_goes_out_at_once_outside_the_window_and_only_when_bound() {
        let mut h = Harness::new();
        h.open_bound(0);
        let window = u64::from(h.config.inflight_pushes_max);
        for seq in 1..=window {
            h.deliver(seq);
        }
        let payload = Bytes::from_static(b"typing");
        for app in ["chat", "other"] {
            h.out.clear();
            h.conn.transient(app, &payload, &mut h.out);
            let expected = (app == "chat").then(|| Frame::Transient {
                app: app.to_owned(),
                payload: payload.clone(),
            });
            assert_eq!(
                h.out.transmit,
                Vec::from_iter(expected),
                "{app}: sent though the window is full, and only to a bound app"
            );
            assert!(h.out.events.is_empty(), "nothing to catch up or ack");
        }
        let out = h.deliver(window + 1);
        assert!(
            pushed_seqs(out).is_empty(),
            "the window is as full as before"
        );
    }

    #[test]
    fn transient_and_notify_reach_only_clients_that_named_them_in_hello() {
        let notice = Some(Notice {
            pull_spread_ms: 2_000,
            hint: Arc::from("news"),
        });
        for features in [Features::NONE, Features::TRANSIENT, Features::ALL] {
            let mut h = Harness::new();
            h.frame(Frame::Hello {
                device_id: "phone".to_owned(),
                client_version: "0.9".to_owned(),
                network: NetworkType::Wifi,
                features,
            });
            h.bind("chat", "ok:alice", None);
            h.fill(0, &[], false);
            h.out.clear();
            h.conn
                .transient("chat", &Bytes::from_static(b"typing"), &mut h.out);
            assert_eq!(
                h.out.transmit.len(),
                usize::from(features.contains(Features::TRANSIENT)),
                "{features:?}: TRANSIENT only to a client that understands it"
            );
            let pulled = PushMessage {
                notice: notice.clone(),
                ..message(1)
            };
            h.out.clear();
            h.conn.deliver("chat", &pulled, &h.config, &mut h.out);
            let expected = if features.contains(Features::NOTIFY) {
                Frame::Notify {
                    app: "chat".to_owned(),
                    message_id: pulled.message_id,
                    seq: 1,
                    size: 2,
                    pull_spread_ms: 2_000,
                    hint: "news".to_owned(),
                }
            } else {
                Frame::Push {
                    app: "chat".to_owned(),
                    message_id: pulled.message_id,
                    seq: 1,
                    payload: pulled.payload.clone(),
                }
            };
            assert_eq!(h.out.transmit, [expected], "{features:?}");
        }
    }

    #[test]
    fn session_timed_out_reaches_only_a_bound_app_of_a_client_that_named_it() {
        for features in [Features::TRANSIENT, Features::ALL] {
            let mut h = Harness::new();
            h.frame(Frame::Hello {
                device_id: "phone".to_owned(),
                client_version: "0.9".to_owned(),
                network: NetworkType::Cellular4g,
                features,
            });
            h.bind("chat", "ok:alice", None);
            h.out.clear();
            h.conn
                .session_timed_out("mail", NetworkType::Wifi, 90_000, 1_200, &mut h.out);
            assert!(h.out.transmit.is_empty(), "mail is not bound");
            h.conn
                .session_timed_out("chat", NetworkType::Wifi, 90_000, 1_200, &mut h.out);
            let expected =
                features
                    .contains(Features::SESSION_TIMED_OUT)
                    .then(|| Frame::SessionTimedOut {
                        app: "chat".to_owned(),
                        network: NetworkType::Wifi,
                        interval_ms: 90_000,
                        closed_ago_ms: 1_200,
                    });
            assert_eq!(h.out.transmit, Vec::from_iter(expected), "{features:?}");
        }
    }

    #[test]
    fn a_timed_out_connection_reports_its_device_network_and_interval() {
        let mut h = Harness::new();
        h.hello(NetworkType::Cellular4g);
        let interval = h.conn.heartbeat_interval();
        assert_eq!(
            h.conn.timed_out(),
            TimedOut {
                device_id: "phone".to_owned(),
                network: NetworkType::Cellular4g,
                interval_ms: interval.as_millis() as u32,
            }
        );
    }

    #[test]
    fn a_client_that_cannot_pull_gets_pushes_meant_to_be_pulled_one_at_a_time() {
        let mut h = Harness::new();
        h.frame(Frame::Hello {
            device_id: "phone".to_owned(),
            client_version: "0.9".to_owned(),
            network: NetworkType::Wifi,
            features: Features::NONE,
        });
        h.bind("chat", "ok:alice", None);
        let large = |seq| PushMessage {
            notice: Some(Notice {
                pull_spread_ms: 0,
                hint: Arc::from(""),
            }),
            ..message(seq)
        };
        let messages = [large(1), large(2), message(3)];
        h.out.clear();
        let fill = InboxFill {
            after: 0,
            messages: &messages,
            more: false,
            broadcasts_from: None,
        };
        h.conn.fill("chat", fill, &h.config, &mut h.out);
        assert_eq!(
            pushed_seqs(&h.out),
            [1],
            "the second waits for the first's ack"
        );
        let out = h.ack(1);
        assert_eq!(catch_ups(out), [(1, 3)]);
        let messages = [large(2), message(3)];
        h.out.clear();
        let fill = InboxFill {
            after: 1,
            messages: &messages,
            more: false,
            broadcasts_from: None,
        };
        h.conn.fill("chat", fill, &h.config, &mut h.out);
        assert_eq!(pushed_seqs(&h.out), [2, 3], "ordinary pushes may follow it");
    }

    #[test]
    fn a_pull_goes_to_the_control_plane_and_its_answer_back_to_the_client() {
        let mut h = Harness::new();
        h.open_bound(0);
        let pull = |seq| Frame::Pull {
            app: "chat".to_owned(),
            seq,
        };
        let refused = |seq, status| Frame::PullReply {
            app: "chat".to_owned(),
            seq,
            status,
            message_id: MessageId([0; 16]),
            payload: Bytes::new(),
        };
        for seq in 1..=PULLS_IN_FLIGHT_MAX as u64 {
            let out = h.frame(pull(seq));
            assert!(out.transmit.is_empty());
            assert_eq!(
                out.events,
                [ConnEvent::Pull {
                    app: AppId::from("chat"),
                    user: UserId::from("alice"),
                    seq,
                }]
            );
        }
        let busy = PULLS_IN_FLIGHT_MAX as u64 + 1;
        let out = h.frame(pull(busy));
        assert!(out.events.is_empty(), "storage is not asked past the bound");
        assert_eq!(out.transmit, [refused(busy, PullStatus::BUSY)]);

        h.out.clear();
        let answer = PullAnswer::Message {
            message_id: MessageId([1; 16]),
            payload: Bytes::from_static(b"body"),
        };
        h.conn.pull_reply("chat", 1, answer, &mut h.out);
        assert_eq!(
            h.out.transmit,
            [Frame::PullReply {
                app: "chat".to_owned(),
                seq: 1,
                status: PullStatus::OK,
                message_id: MessageId([1; 16]),
                payload: Bytes::from_static(b"body"),
            }]
        );
        h.out.clear();
        h.conn
            .pull_reply("chat", 2, PullAnswer::Refused(PullStatus::GONE), &mut h.out);
        assert_eq!(h.out.transmit, [refused(2, PullStatus::GONE)]);
        let out = h.frame(pull(busy));
        assert_eq!(out.events.len(), 1, "answered pulls free their places");

        let out = h.frame(Frame::Pull {
            app: "other".to_owned(),
            seq: 1,
        });
        assert!(out.events.is_empty());
        assert_eq!(
            out.transmit,
            [Frame::PullReply {
                app: "other".to_owned(),
                seq: 1,
                status: PullStatus::NOT_BOUND,
                message_id: MessageId([0; 16]),
                payload: Bytes::new(),
            }]
        );
    }

    #[test]
    fn deliver_before_the_first_fill_is_caught_up_after_it() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.bind("chat", "ok:alice", None);
        assert!(h.deliver(1).is_empty());
        let out = h.fill(0, &[], false);
        assert_eq!(catch_ups(out), [(0, 3)]);
    }

    #[test]
    fn in_order_deliveries_go_straight_out_and_duplicates_are_dropped() {
        let mut h = Harness::new();
        h.open_bound(0);
        assert_eq!(pushed_seqs(h.deliver(1)), [1]);
        assert_eq!(pushed_seqs(h.deliver(2)), [2]);
        assert!(h.deliver(2).is_empty());
        assert!(h.deliver(1).is_empty());
    }

    fn reset_frame(sequence: ResetSequence, after: u64) -> Frame {
        Frame::Reset {
            app: "chat".to_owned(),
            sequence,
            after,
        }
    }

    #[test]
    fn a_first_fill_below_the_clients_claim_tells_it_before_any_push() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        // The client holds seq 50, but storage was reset: the inbox resumes at 0.
        h.bind("chat", "ok:alice", Some(50));
        let out = h.fill(0, &[1, 2], false);
        assert_eq!(
            out.transmit[0],
            reset_frame(ResetSequence::Inbox, 0),
            "RESET comes first"
        );
        assert_eq!(pushed_seqs(out), [1, 2]);
        assert_eq!(
            pushed_seqs(h.deliver(3)),
            [3],
            "live delivery goes on from there"
        );
        assert_eq!(h.ack(3).events.len(), 1, "acks below the old claim count");
    }

    #[test]
    fn a_first_fill_at_the_clients_claim_sends_no_reset() {
        for (claim, after) in [(Some(7), 7), (None, 4), (Some(0), 0)] {
            let mut h = Harness::new();
            h.hello(NetworkType::Wifi);
            h.bind("chat", "ok:alice", claim);
            let out = h.fill(after, &[after + 1], false);
            assert!(
                !out.transmit
                    .iter()
                    .any(|f| matches!(f, Frame::Reset { .. })),
                "claim {claim:?}: {:?}",
                out.transmit
            );
            // Later fills never reset, whatever they say.
            h.ack(after + 1);
            assert!(h.conn.bindings().count() == 1);
        }
    }

    #[test]
    fn broadcasts_resumed_below_the_clients_claim_are_announced() {
        // From a broadcast fill.
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.frame(Frame::Bind {
            app: "chat".to_owned(),
            token: "ok:alice".to_owned(),
            last_seq: None,
            last_broadcast_seq: Some(9),
            tags: Vec::new(),
        });
        h.out.clear();
        h.conn.broadcast_fill(
            "chat",
            0,
            &[broadcast(1, &[])],
            BroadcastsNext::Continue,
            &mut h.out,
        );
        assert_eq!(h.out.transmit[0], reset_frame(ResetSequence::Broadcasts, 0));
        assert_eq!(broadcast_seqs(&h.out), [1]);
        // From an inbox fill that says where broadcasts stand.
        let out = h.fill_then_broadcasts(0, &[], false, Some(1));
        assert!(
            !out.transmit
                .iter()
                .any(|f| matches!(f, Frame::Reset { .. })),
            "once only"
        );
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.frame(Frame::Bind {
            app: "chat".to_owned(),
            token: "ok:alice".to_owned(),
            last_seq: Some(3),
            last_broadcast_seq: Some(9),
            tags: Vec::new(),
        });
        let out = h.fill_then_broadcasts(3, &[], false, Some(2));
        assert_eq!(out.transmit, [reset_frame(ResetSequence::Broadcasts, 2)]);
        assert_eq!(h.conn.broadcast("chat", 3, &[]), BroadcastFate::Send);
    }

    fn broadcast(seq: u64, required_tags: &[&str]) -> BroadcastMessage {
        BroadcastMessage {
            seq,
            message_id: MessageId([seq as u8; 16]),
            payload: Bytes::from(format!("b{seq}")),
            required_tags: required_tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn broadcast_seqs(out: &Output) -> Vec<u64> {
        out.transmit
            .iter()
            .filter_map(|f| match f {
                Frame::Broadcast { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_binding_behind_on_its_inbox_gets_broadcasts_with_its_catch_ups() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.bind("chat", "ok:alice", None);
        // The first window holds 1..=3 of more; broadcasts stand at 0.
        let out = h.fill_then_broadcasts(0, &[1, 2, 3], true, Some(0));
        assert_eq!(pushed_seqs(out), [1, 2, 3]);
        assert_eq!(
            h.conn.broadcast("chat", 5, &[]),
            BroadcastFate::Later,
            "older stored messages are still to come"
        );
        let out = h.ack(3);
        assert!(
            out.events.iter().any(|e| matches!(
                e,
                ConnEvent::CatchUp(CatchUp {
                    after: 3,
                    broadcasts_after: Some(0),
                    ..
                })
            )),
            "the catch-up asks for the broadcasts: {:?}",
            out.events
        );
        // The reply, in creation order: broadcast 1, then message 4 (the
        // inbox's end), read before broadcast 5 was stored.
        h.out.clear();
        h.conn.broadcast_fill(
            "chat",
            0,
            &[broadcast(1, &[])],
            BroadcastsNext::Continue,
            &mut h.out,
        );
        assert_eq!(broadcast_seqs(&h.out), [1]);
        let out = h.fill_then_broadcasts(3, &[4], false, Some(1));
        assert_eq!(pushed_seqs(out), [4]);
        assert_eq!(
            out.events,
            [ConnEvent::BroadcastCatchUp {
                app: AppId::from("chat"),
                after: 1,
            }],
            "5 came live meanwhile: read once more"
        );
        h.out.clear();
        let owed = h.conn.broadcast_fill(
            "chat",
            1,
            &[broadcast(5, &[])],
            BroadcastsNext::Live,
            &mut h.out,
        );
        assert_eq!(owed, [5]);
        assert_eq!(broadcast_seqs(&h.out), [5]);
        assert_eq!(h.conn.broadcast("chat", 6, &[]), BroadcastFate::Send);
    }

    #[test]
    fn a_broadcast_that_comes_while_a_catch_up_is_out_follows_its_reply() {
        let mut h = Harness::new();
        h.open_bound(0);
        h.out.clear();
        h.conn
            .broadcast_fill("chat", 0, &[], BroadcastsNext::Live, &mut h.out);
        let window = h.config.inflight_pushes_max;
        assert_eq!(catch_ups(h.deliver(2)), [(0, window)], "1 is missing");
        assert_eq!(h.conn.broadcast("chat", 1, &[]), BroadcastFate::Later);
        let out = h.fill(0, &[1, 2], false);
        assert_eq!(pushed_seqs(out), [1, 2]);
        assert_eq!(
            out.events,
            [ConnEvent::BroadcastCatchUp {
                app: AppId::from("chat"),
                after: 0,
            }]
        );
        h.out.clear();
        let owed = h.conn.broadcast_fill(
            "chat",
            0,
            &[broadcast(1, &[])],
            BroadcastsNext::Live,
            &mut h.out,
        );
        assert_eq!(owed, [1]);
        assert_eq!(h.conn.broadcast("chat", 2, &[]), BroadcastFate::Send);
    }

    #[test]
    fn a_catch_up_that_finds_nothing_owed_ends_it() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.bind("chat", "ok:alice", None);
        assert_eq!(h.conn.broadcast("chat", 1, &[]), BroadcastFate::Later);
        let out = h.fill_then_broadcasts(0, &[], false, Some(0));
        assert_eq!(out.events.len(), 1, "{:?}", out.events);
        // Broadcast 1 expired before the catch-up read it.
        h.out.clear();
        h.conn
            .broadcast_fill("chat", 0, &[], BroadcastsNext::Live, &mut h.out);
        assert!(h.out.events.is_empty(), "no endless catch-ups");
        assert_eq!(h.conn.broadcast("chat", 2, &[]), BroadcastFate::Send);
    }

    #[test]
    fn broadcasts_wait_for_the_first_fill_then_go_out_once_by_tag() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        let out = h.frame(Frame::Bind {
            app: "chat".to_owned(),
            token: "ok:alice".to_owned(),
            last_seq: None,
            last_broadcast_seq: Some(2),
            tags: vec!["platform=ios".to_owned()],
        });
        assert!(matches!(
            out.events[..],
            [ConnEvent::Bound(Bound {
                client_last_broadcast_seq: Some(2),
                ..
            })]
        ));
        assert_eq!(
            h.conn.broadcast("chat", 3, &[]),
            BroadcastFate::Later,
            "before the first fill"
        );
        // A first fill read before broadcast 3 was stored lacks it: it is
        // read once more.
        let out = h.fill_then_broadcasts(0, &[], false, Some(2));
        assert_eq!(
            out.events,
            [ConnEvent::BroadcastCatchUp {
                app: AppId::from("chat"),
                after: 2,
            }],
            "the broadcast that came early is read again"
        );
        h.out.clear();
        let fill = [broadcast(3, &[]), broadcast(4, &["platform=android"])];
        let owed = h
            .conn
            .broadcast_fill("chat", 2, &fill, BroadcastsNext::Live, &mut h.out);
        assert_eq!(
            owed,
            [3],
            "3 reached this connection live, before it was ready"
        );
        let sent: Vec<u64> = h
            .out
            .transmit
            .iter()
            .filter_map(|f| match f {
                Frame::Broadcast { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(sent, [3], "4 targets another platform");
        assert!(h.out.events.is_empty(), "nothing more is owed");
        let ios = ["platform=ios".to_owned()];
        assert_eq!(h.conn.broadcast("chat", 5, &ios), BroadcastFate::Send);
        assert_eq!(
            h.conn.broadcast("chat", 5, &[]),
            BroadcastFate::Later,
            "once"
        );
        let eu = ["region=eu".to_owned()];
        assert_eq!(h.conn.broadcast("chat", 6, &eu), BroadcastFate::NotFor);
        assert_eq!(h.conn.broadcast("news", 7, &[]), BroadcastFate::NotFor);
        let out = h.frame(Frame::BroadcastAck {
            app: "chat".to_owned(),
            seq: 5,
        });
        assert_eq!(
            out.events,
            [ConnEvent::BroadcastAck {
                app: AppId::from("chat"),
                seq: 5
            }]
        );
        let out = h.frame(Frame::BroadcastAck {
            app: "chat".to_owned(),
            seq: 9,
        });
        assert!(out.events.is_empty(), "never sent here");
    }

    #[test]
    fn resync_catches_up_from_what_was_sent_and_waits_for_the_first_fill() {
        let mut h = Harness::new();
        h.hello(NetworkType::Wifi);
        h.bind("chat", "ok:alice", None);
        h.out.clear();
        h.conn.resync("chat", &h.config, &mut h.out);
        assert!(h.out.is_empty(), "the first fill reads storage anyway");
        h.fill(0, &[], false);
        h.deliver(1);
        h.out.clear();
        h.conn.resync("chat", &h.config, &mut h.out);
        assert_eq!(catch_ups(&h.out), [(1, 2)]);
        h.out.clear();
        h.conn.resync("chat", &h.config, &mut h.out);
        assert!(catch_ups(&h.out).is_empty(), "one request at a time");
    }

    #[test]
    fn a_gap_asks_for_a_catch_up_once() {
        let mut h = Harness::new();
        h.open_bound(0);
        let out = h.deliver(3);
        assert!(pushed_seqs(out).is_empty());
        assert_eq!(catch_ups(out), [(0, 3)]);
        assert!(h.deliver(4).events.is_empty(), "one request at a time");
        let out = h.fill(0, &[1, 2, 3], false);
        assert_eq!(pushed_seqs(out), [1, 2, 3]);
        let out = h.ack(3);
        assert_eq!(catch_ups(out), [(3, 3)], "4 was dropped, so catch up again");
    }

    #[test]
    fn full_window_defers_delivery_until_acked() {
        let mut h = Harness::new();
        h.open_bound(0);
        for seq in 1..=3 {
            assert_eq!(pushed_seqs(h.deliver(seq)), [seq]);
        }
        let out = h.deliver(4);
        assert!(pushed_seqs(out).is_empty());
        assert!(catch_ups(out).is_empty());
        assert_eq!(catch_ups(h.ack(1)), [(3, 1)]);
    }

    #[test]
    fn acks_are_ignored_unless_they_advance_over_sent_messages() {
        let mut h = Harness::new();
        h.open_bound(10);
        assert!(h.ack(11).events.is_empty(), "never sent");
        h.deliver(11);
        h.deliver(12);
        assert!(h.ack(10).events.is_empty(), "at the resume point");
        let out = h.ack(12);
        assert_eq!(
            out.events,
            vec![ConnEvent::Ack {
                app: AppId::from("chat"),
                user: UserId::from("alice"),
                device_id: "phone".to_owned(),
                seq: 12
            }]
        );
        assert!(h.ack(11).events.is_empty(), "below the current ack");
        let out = h.frame(Frame::Ack {
            app: "other".to_owned(),
            seq: 1,
        });
        assert!(
            out.events.is_empty() && out.close.is_none(),
            "app not bound"
        );
    }

    #[test]
    fn upstream_for_an_unbound_app_is_refused() {
        let mut h = Harness::new();
        h.open_bound(0);
        let out = h.frame(Frame::Upstream {
            app: "other".to_owned(),
            request_id: 9,
            route: None,
            payload: Bytes::from_static(b"x"),
        });
        assert_eq!(
            out.transmit,
            vec![Frame::UpstreamAck {
                app: "other".to_owned(),
                request_id: 9,
                status: UpstreamStatus::NOT_BOUND
            }]
        );
        let out = h.frame(Frame::Upstream {
            app: "chat".to_owned(),
            request_id: 10,
            route: Some("orders".to_owned()),
            payload: Bytes::from_static(b"y"),
        });
        assert!(matches!(
            &out.events[..],
            [ConnEvent::Upstream { request_id: 10, route: Some(route), .. }] if route == "orders"
        ));
    }

    #[test]
    fn a_deleted_app_is_unbound_or_its_only_connection_closed() {
        let mut h = Harness::new();
        h.open_bound(0);
        let mut out = Output::default();
        h.conn.unbind_deleted_app("other", &mut out);
        assert!(out.transmit.is_empty() && out.events.is_empty());
        h.conn.unbind_deleted_app("chat", &mut out);
        assert_eq!(
            out.transmit,
            [Frame::GoAway {
                reason: GoAwayReason::APP_DELETED,
                reconnect_delay_ms: None,
            }]
        );
        assert_eq!(out.close, Some(CloseReason::Kicked));

        // With another app bound, the connection stays and is told.
        let mut h = Harness::new();
        h.open_bound(0);
        h.bind("news", "ok:alice", None);
        let mut out = Output::default();
        h.conn.unbind_deleted_app("chat", &mut out);
        assert_eq!(
            out.transmit,
            [Frame::Unbind {
                app: "chat".into(),
                reason: Some(UnbindReason::APP_DELETED),
            }]
        );
        assert!(matches!(&out.events[..], [ConnEvent::Unbound { app, .. }] if &**app == "chat"));
        assert_eq!(out.close, None);
        let apps: Vec<&str> = h.conn.bindings().map(|(app, _)| &**app).collect();
        assert_eq!(apps, ["news"]);
    }

    #[test]
    fn unbind_stops_delivery() {
        let mut h = Harness::new();
        h.open_bound(0);
        let out = h.frame(Frame::Unbind {
            app: "chat".to_owned(),
            reason: None,
        });
        assert!(matches!(out.events[..], [ConnEvent::Unbound { .. }]));
        assert!(h.deliver(1).is_empty());
        assert_eq!(h.conn.bindings().count(), 0);
    }

    #[test]
    fn kick_sends_goaway_then_nothing_more() {
        let mut h = Harness::new();
        h.open_bound(0);
        h.out.clear();
        h.conn.kick(GoAwayReason::KICKED, &mut h.out);
        assert_eq!(h.out.close, Some(CloseReason::Kicked));
        assert!(h.deliver(1).is_empty());
        assert!(h.frame(Frame::Ping).is_empty());
    }
}
