//! The client side of one connection, as a state machine with no I/O.
//!
//! A driver (the tokio SDK, the benchmark) feeds it frames and timeouts and
//! drains `poll_transmit` and `poll_event`. It sends HELLO, binds every
//! configured app once the server answers, pings at the interval the server
//! chose, drops pushes it already delivered, and sends cumulative ACKs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::{
    BindErrorCode, ErrorCode, Features, Frame, GoAwayReason, MessageId, NetworkType, PullStatus,
    ResetSequence, UnbindReason, UpstreamStatus,
};
use crate::limits::ROUTE_LEN_MAX;

/// How long the server may take to answer HELLO.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One app to bind, with the last sequence the client holds for it (sent in
/// BIND so the server resumes after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCredentials {
    pub app: String,
    pub token: String,
    pub last_seq: Option<u64>,
    /// The last broadcast of the app the client holds, if it knows it.
    pub last_broadcast_seq: Option<u64>,
    /// What broadcasts may target this client by (`platform=ios`, ...).
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub device_id: String,
    pub client_version: String,
    pub network: NetworkType,
    pub apps: Vec<AppCredentials>,
    /// The server storage epoch the apps' resume points came from (what an
    /// earlier connection's HELLO_OK said), if known.
    pub storage_epoch: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub app: String,
    pub message_id: MessageId,
    pub seq: u64,
    pub payload: Bytes,
}

/// A NOTIFY: message `seq` of `app` is `size` bytes, to be pulled after a
/// random delay of up to `pull_spread`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub app: String,
    pub message_id: MessageId,
    pub seq: u64,
    pub size: u32,
    pub pull_spread: Duration,
    pub hint: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server answered HELLO.
    Ready {
        heartbeat_interval: Duration,
    },
    Bound {
        app: String,
        user: String,
    },
    BindFailed {
        app: String,
        code: BindErrorCode,
        message: String,
    },
    /// A message not delivered before on this connection or an earlier one
    /// (as far as the resume point tells).
    Push(Push),
    /// A message pushed to be pulled: its body comes with `pull`.
    Notify(Notification),
    /// The answer to a `pull`.
    Pulled {
        app: String,
        seq: u64,
        status: PullStatus,
        message_id: MessageId,
        payload: Bytes,
    },
    /// A broadcast to the app's users; `seq` is the app's broadcast
    /// sequence, apart from the inbox's.
    Broadcast(Push),
    /// A message that was never stored (typing indicators, presence): not
    /// acked, outside the inbox's seqs, and not sent again after a
    /// reconnect.
    Transient {
        app: String,
        payload: Bytes,
    },
    UpstreamAck {
        app: String,
        request_id: u64,
        status: UpstreamStatus,
    },
    /// The server unbound `app` from this connection (the app was
    /// deleted); the connection stays for its other apps, and the app is
    /// not bound again.
    Unbound {
        app: String,
        reason: UnbindReason,
    },
    /// The server is closing the connection.
    GoAway {
        reason: GoAwayReason,
        reconnect_delay_ms: Option<u32>,
    },
    /// The server resumed `app`'s inbox or broadcasts after `after`, below
    /// what this client said it held (the server's data was reset or
    /// restored). Seqs after `after` are delivered again as new; an
    /// application that keeps its own record of seen seqs must forget
    /// those above `after`.
    Reset {
        app: String,
        sequence: ResetSequence,
        after: u64,
    },
    /// The server reported a protocol error and is closing.
    ServerError {
        code: ErrorCode,
        message: String,
    },
    /// The server sent nothing within twice the heartbeat interval (or did
    /// not answer HELLO in time): the connection is dead.
    TimedOut,
    /// The server answered a PING: one heartbeat interval held.
    PingAnswered,
    /// The server answered a HEARTBEAT proposal with the interval now in
    /// force (the proposal clamped to the server's range).
    HeartbeatSet {
        interval: Duration,
    },
    /// The server closed this device's previous connection because nothing
    /// came from it within its heartbeat deadline: its pings, at `interval`
    /// on `network`, stopped arriving. Reported once per connection (the
    /// server says it for each app bound again).
    PreviousTimedOut {
        network: NetworkType,
        interval: Duration,
        /// How long before this connection's BIND the server closed it.
        closed_ago: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHelloOk,
    Open,
    Closed,
}

#[derive(Debug)]
struct AppState {
    credentials: AppCredentials,
    user: Option<String>,
    /// Highest seq handed to the application.
    delivered: Option<u64>,
    /// Highest seq acked to the server.
    acked: Option<u64>,
    /// The same two for the app's broadcasts.
    broadcast_delivered: Option<u64>,
    broadcast_acked: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("app is not bound on this connection")]
    NotBound,
    #[error("connection is closed")]
    Closed,
    #[error("a route name is 1 to {ROUTE_LEN_MAX} bytes")]
    InvalidRoute,
}

#[derive(Debug)]
pub struct ClientConn {
    phase: Phase,
    heartbeat_interval: Option<Duration>,
    next_ping: Option<Instant>,
    /// A PING went out and its PONG has not come back.
    ping_unanswered: bool,
    /// `PreviousTimedOut` was reported on this connection.
    previous_timed_out: bool,
    silence_deadline: Instant,
    apps: Vec<AppState>,
    /// The storage epoch the resume points belong to.
    storage_epoch: Option<u64>,
    next_request_id: u64,
    transmit: VecDeque<Frame>,
    events: VecDeque<ClientEvent>,
}

impl ClientConn {
    /// Starts a connection: HELLO is queued at once.
    pub fn new(now: Instant, config: ClientConfig) -> ClientConn {
        let mut transmit = VecDeque::new();
        transmit.push_back(Frame::Hello {
            device_id: config.device_id,
            client_version: config.client_version,
            network: config.network,
            features: Features::ALL,
        });
        ClientConn {
            phase: Phase::AwaitHelloOk,
            heartbeat_interval: None,
            next_ping: None,
            ping_unanswered: false,
            previous_timed_out: false,
            silence_deadline: now + HANDSHAKE_TIMEOUT,
            apps: config
                .apps
                .into_iter()
                .map(|credentials| AppState {
                    delivered: credentials.last_seq,
                    acked: credentials.last_seq,
                    broadcast_delivered: credentials.last_broadcast_seq,
                    broadcast_acked: credentials.last_broadcast_seq,
                    credentials,
                    user: None,
                })
                .collect(),
            storage_epoch: config.storage_epoch,
            next_request_id: 1,
            transmit,
            events: VecDeque::new(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The next instant `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Closed {
            return None;
        }
        Some(match self.next_ping {
            Some(ping) => ping.min(self.silence_deadline),
            None => self.silence_deadline,
        })
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        if now >= self.silence_deadline {
            self.phase = Phase::Closed;
            self.events.push_back(ClientEvent::TimedOut);
            return;
        }
        if let (Some(next), Some(interval)) = (self.next_ping, self.heartbeat_interval)
            && now >= next
        {
            self.transmit.push_back(Frame::Ping);
            self.ping_unanswered = true;
            self.next_ping = Some(now + interval);
        }
    }

    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Some(interval) = self.heartbeat_interval {
            self.silence_deadline = now + interval * 2;
        }
        match frame {
            Frame::HelloOk {
                heartbeat_interval_ms,
                storage_epoch,
            } if self.phase == Phase::AwaitHelloOk => {
                // A zero interval would make the client ping in a busy loop.
                let interval = Duration::from_millis(u64::from(heartbeat_interval_ms.max(100)));
                self.phase = Phase::Open;
                if let Some(epoch) = storage_epoch {
                    if self.storage_epoch.is_some_and(|held| held != epoch) {
                        self.forget_resume_points();
                    }
                    self.storage_epoch = Some(epoch);
                }
                self.heartbeat_interval = Some(interval);
                self.next_ping = Some(now + interval);
                self.silence_deadline = now + interval * 2;
                for app in &self.apps {
                    self.transmit.push_back(Frame::Bind {
                        app: app.credentials.app.clone(),
                        token: app.credentials.token.clone(),
                        last_seq: app.acked,
                        last_broadcast_seq: app.broadcast_acked,
                        tags: app.credentials.tags.clone(),
                    });
                }
                self.events.push_back(ClientEvent::Ready {
                    heartbeat_interval: interval,
                });
            }
            Frame::BindOk { app, user } => {
                if let Some(state) = self.app_mut(&app) {
                    state.user = Some(user.clone());
                }
                self.events.push_back(ClientEvent::Bound { app, user });
            }
            Frame::BindErr { app, code, message } => {
                self.events
                    .push_back(ClientEvent::BindFailed { app, code, message });
            }
            Frame::Pong => {
                self.ping_unanswered = false;
                self.events.push_back(ClientEvent::PingAnswered);
            }
            Frame::Heartbeat { interval_ms } if self.phase == Phase::Open => {
                let interval = Duration::from_millis(u64::from(interval_ms.max(100)));
                self.heartbeat_interval = Some(interval);
                self.next_ping = Some(now + interval);
                self.silence_deadline = now + interval * 2;
                self.events
                    .push_back(ClientEvent::HeartbeatSet { interval });
            }
            Frame::Push {
                app,
                message_id,
                seq,
                payload,
            } => {
                if !self.first_delivery(&app, seq) {
                    return;
                }
                self.events.push_back(ClientEvent::Push(Push {
                    app,
                    message_id,
                    seq,
                    payload,
                }));
            }
            Frame::Notify {
                app,
                message_id,
                seq,
                size,
                pull_spread_ms,
                hint,
            } => {
                if !self.first_delivery(&app, seq) {
                    return;
                }
                self.events.push_back(ClientEvent::Notify(Notification {
                    app,
                    message_id,
                    seq,
                    size,
                    pull_spread: Duration::from_millis(u64::from(pull_spread_ms)),
                    hint,
                }));
            }
            Frame::PullReply {
                app,
                seq,
                status,
                message_id,
                payload,
            } => {
                self.events.push_back(ClientEvent::Pulled {
                    app,
                    seq,
                    status,
                    message_id,
                    payload,
                });
            }
            Frame::SessionTimedOut {
                app,
                network,
                interval_ms,
                closed_ago_ms,
            } => {
                if self.previous_timed_out || self.app_mut(&app).is_none() {
                    return;
                }
                self.previous_timed_out = true;
                self.events.push_back(ClientEvent::PreviousTimedOut {
                    network,
                    interval: Duration::from_millis(u64::from(interval_ms)),
                    closed_ago: Duration::from_millis(u64::from(closed_ago_ms)),
                });
            }
            Frame::Transient { app, payload } => {
                if self.app_mut(&app).is_some() {
                    self.events
                        .push_back(ClientEvent::Transient { app, payload });
                }
            }
            Frame::Broadcast {
                app,
                message_id,
                seq,
                payload,
            } => {
                let Some(state) = self.app_mut(&app) else {
                    return;
                };
                if state
                    .broadcast_delivered
                    .is_some_and(|delivered| seq <= delivered)
                {
                    return;
                }
                state.broadcast_delivered = Some(seq);
                self.events.push_back(ClientEvent::Broadcast(Push {
                    app,
                    message_id,
                    seq,
                    payload,
                }));
            }
            Frame::UpstreamAck {
                app,
                request_id,
                status,
            } => self.events.push_back(ClientEvent::UpstreamAck {
                app,
                request_id,
                status,
            }),
            Frame::GoAway {
                reason,
                reconnect_delay_ms,
            } => {
                self.phase = Phase::Closed;
                self.events.push_back(ClientEvent::GoAway {
                    reason,
                    reconnect_delay_ms,
                });
            }
            Frame::Unbind {
                app,
                reason: Some(reason),
            } => {
                self.apps.retain(|state| state.credentials.app != app);
                self.events.push_back(ClientEvent::Unbound { app, reason });
            }
            Frame::Reset {
                app,
                sequence,
                after,
            } => {
                let Some(state) = self.app_mut(&app) else {
                    return;
                };
                let (delivered, acked) = match sequence {
                    ResetSequence::Inbox => (&mut state.delivered, &mut state.acked),
                    ResetSequence::Broadcasts => {
                        (&mut state.broadcast_delivered, &mut state.broadcast_acked)
                    }
                };
                *delivered = Some(after);
                *acked = Some(after);
                self.events.push_back(ClientEvent::Reset {
                    app,
                    sequence,
                    after,
                });
            }
            Frame::Error { code, message } => {
                self.phase = Phase::Closed;
                self.events
                    .push_back(ClientEvent::ServerError { code, message });
            }
            other => {
                self.phase = Phase::Closed;
                let message = format!("unexpected {:?} frame from the server", other.op());
                self.transmit.push_back(Frame::Error {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    message: message.clone(),
                });
                self.events.push_back(ClientEvent::ServerError {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    message,
                });
            }
        }
    }

    /// Asks the server to put `interval` in force (HEARTBEAT); the client
    /// pings at its old interval until the answer (`HeartbeatSet`) comes.
    /// Only servers that negotiate understand it: one that does not closes
    /// the connection with a protocol error.
    pub fn propose_heartbeat(&mut self, interval: Duration) -> Result<(), ClientError> {
        if self.phase != Phase::Open {
            return Err(ClientError::Closed);
        }
        self.transmit.push_back(Frame::Heartbeat {
            interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        });
        Ok(())
    }

    /// A PING is waiting for its PONG: a connection lost now died while
    /// its heartbeat was out (a NAT that forgot the flow answers a PING
    /// with a reset, if not with silence).
    pub fn ping_unanswered(&self) -> bool {
        self.ping_unanswered
    }

    /// The heartbeat interval the client pings at, once HELLO_OK set it.
    pub fn heartbeat_interval(&self) -> Option<Duration> {
        self.heartbeat_interval
    }

    /// Acks every message of `app` up to `seq`. Returns false (and sends
    /// nothing) if that acks nothing new.
    pub fn ack(&mut self, app: &str, seq: u64) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        let Some(state) = self.app_mut(app) else {
            return false;
        };
        if state.acked.is_some_and(|acked| seq <= acked)
            || state.delivered.is_none_or(|delivered| seq > delivered)
        {
            return false;
        }
        state.acked = Some(seq);
        self.transmit.push_back(Frame::Ack {
            app: app.to_owned(),
            seq,
        });
        true
    }

    /// Acks every broadcast of `app` up to `seq`. Returns false (and sends
    /// nothing) if that acks nothing new.
    pub fn ack_broadcast(&mut self, app: &str, seq: u64) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        let Some(state) = self.app_mut(app) else {
            return false;
        };
        if state.broadcast_acked.is_some_and(|acked| seq <= acked)
            || state
                .broadcast_delivered
                .is_none_or(|delivered| seq > delivered)
        {
            return false;
        }
        state.broadcast_acked = Some(seq);
        self.transmit.push_back(Frame::BroadcastAck {
            app: app.to_owned(),
            seq,
        });
        true
    }

    /// Whether inbox message `seq` of `app` (a PUSH, or a NOTIFY in its
    /// place) is new: a bound app's seq past what was delivered. Marks it
    /// delivered.
    fn first_delivery(&mut self, app: &str, seq: u64) -> bool {
        let Some(state) = self.app_mut(app) else {
            return false;
        };
        if state.delivered.is_some_and(|delivered| seq <= delivered) {
            return false;
        }
        state.delivered = Some(seq);
        true
    }

    /// Asks for the body of message `seq` of `app` (one a NOTIFY
    /// announced); the answer comes as `ClientEvent::Pulled`.
    pub fn pull(&mut self, app: &str, seq: u64) -> Result<(), ClientError> {
        if self.phase != Phase::Open {
            return Err(ClientError::Closed);
        }
        if self.app_mut(app).and_then(|s| s.user.as_ref()).is_none() {
            return Err(ClientError::NotBound);
        }
        self.transmit.push_back(Frame::Pull {
            app: app.to_owned(),
            seq,
        });
        Ok(())
    }

    /// Queues data for the app's business server, for its webhook `route`
    /// (none: the app's default route); returns its request id.
    pub fn upstream(
        &mut self,
        app: &str,
        route: Option<&str>,
        payload: Bytes,
    ) -> Result<u64, ClientError> {
        if self.phase != Phase::Open {
            return Err(ClientError::Closed);
        }
        if self.app_mut(app).and_then(|s| s.user.as_ref()).is_none() {
            return Err(ClientError::NotBound);
        }
        if route.is_some_and(|route| route.is_empty() || route.len() > ROUTE_LEN_MAX) {
            return Err(ClientError::InvalidRoute);
        }
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.transmit.push_back(Frame::Upstream {
            app: app.to_owned(),
            request_id,
            route: route.map(str::to_owned),
            payload,
        });
        Ok(request_id)
    }

    /// The server's storage was created anew since the resume points were
    /// taken: its sequences start over, so the BINDs claim nothing and the
    /// server resumes from what it holds.
    fn forget_resume_points(&mut self) {
        for state in &mut self.apps {
            let app = &state.credentials.app;
            for (sequence, delivered, acked) in [
                (ResetSequence::Inbox, &mut state.delivered, &mut state.acked),
                (
                    ResetSequence::Broadcasts,
                    &mut state.broadcast_delivered,
                    &mut state.broadcast_acked,
                ),
            ] {
                if delivered.is_some() || acked.is_some() {
                    *delivered = None;
                    *acked = None;
                    self.events.push_back(ClientEvent::Reset {
                        app: app.clone(),
                        sequence,
                        after: 0,
                    });
                }
            }
        }
    }

    /// The storage epoch the resume points belong to, to start the next
    /// connection with.
    pub fn storage_epoch(&self) -> Option<u64> {
        self.storage_epoch
    }

    /// The highest acked seq and broadcast seq of each app, to resume
    /// from on reconnect.
    pub fn resume_points(&self) -> impl Iterator<Item = (&str, Option<u64>, Option<u64>)> {
        self.apps
            .iter()
            .map(|s| (s.credentials.app.as_str(), s.acked, s.broadcast_acked))
    }

    fn app_mut(&mut self, app: &str) -> Option<&mut AppState> {
        self.apps.iter_mut().find(|s| s.credentials.app == app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(now: Instant, last_seq: Option<u64>) -> ClientConn {
        ClientConn::new(
            now,
            ClientConfig {
                device_id: "phone".to_owned(),
                client_version: "test".to_owned(),
                network: NetworkType::Wifi,
                apps: vec![AppCredentials {
                    app: "chat".to_owned(),
                    token: "t".to_owned(),
                    last_seq,
                    last_broadcast_seq: None,
                    tags: Vec::new(),
                }],
                storage_epoch: None,
            },
        )
    }

    /// The server's HELLO_OK: a 1 s heartbeat, no storage epoch.
    fn hello_ok(conn: &mut ClientConn, now: Instant) {
        conn.handle_frame(
            now,
            Frame::HelloOk {
                heartbeat_interval_ms: 1_000,
                storage_epoch: None,
            },
        );
    }

    fn drain(conn: &mut ClientConn) -> Vec<Frame> {
        std::iter::from_fn(|| conn.poll_transmit()).collect()
    }

    fn push(seq: u64) -> Frame {
        Frame::Push {
            app: "chat".to_owned(),
            message_id: MessageId([0; 16]),
            seq,
            payload: Bytes::new(),
        }
    }

    #[test]
    fn handshake_binds_with_the_resume_point_and_pings_on_interval() {
        let now = Instant::now();
        let mut conn = start(now, Some(4));
        assert!(matches!(drain(&mut conn)[..], [Frame::Hello { .. }]));
        hello_ok(&mut conn, now);
        assert_eq!(
            drain(&mut conn),
            vec![Frame::Bind {
                app: "chat".to_owned(),
                token: "t".to_owned(),
                last_seq: Some(4),
                last_broadcast_seq: None,
                tags: Vec::new(),
            }]
        );
        assert_eq!(conn.poll_timeout(), Some(now + Duration::from_secs(1)));
        conn.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(drain(&mut conn), vec![Frame::Ping]);
    }

    #[test]
    fn an_upstream_names_its_route_only_when_given_one() {
        let now = Instant::now();
        let mut conn = start(now, None);
        hello_ok(&mut conn, now);
        conn.handle_frame(
            now,
            Frame::BindOk {
                app: "chat".to_owned(),
                user: "ann".to_owned(),
            },
        );
        drain(&mut conn);
        let data = Bytes::from_static(b"x");
        assert_eq!(conn.upstream("chat", None, data.clone()), Ok(1));
        assert_eq!(conn.upstream("chat", Some("orders"), data.clone()), Ok(2));
        assert_eq!(
            conn.upstream("chat", Some(""), data.clone()),
            Err(ClientError::InvalidRoute)
        );
        let too_long = "r".repeat(ROUTE_LEN_MAX + 1);
        assert_eq!(
            conn.upstream("chat", Some(&too_long), data.clone()),
            Err(ClientError::InvalidRoute)
        );
        let routes: Vec<Option<String>> = drain(&mut conn)
            .into_iter()
            .map(|frame| match frame {
                Frame::Upstream { route, .. } => route,
                other => panic!("expected UPSTREAM, got {other:?}"),
            })
            .collect();
        assert_eq!(routes, [None, Some("orders".to_owned())]);
    }

    #[test]
    fn a_reset_moves_the_resume_point_back_so_what_follows_is_delivered() {
        let now = Instant::now();
        let mut conn = start(now, Some(50));
        hello_ok(&mut conn, now);
        conn.handle_frame(
            now,
            Frame::Reset {
                app: "chat".to_owned(),
                sequence: ResetSequence::Inbox,
                after: 0,
            },
        );
        conn.handle_frame(now, push(1));
        let events: Vec<ClientEvent> = std::iter::from_fn(|| conn.poll_event()).collect();
        assert!(events.contains(&ClientEvent::Reset {
            app: "chat".to_owned(),
            sequence: ResetSequence::Inbox,
            after: 0,
        }));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, ClientEvent::Push(p) if p.seq == 1)),
            "seq 1 is new after the reset: {events:?}"
        );
        assert!(conn.ack("chat", 1));
        assert_eq!(
            conn.resume_points().collect::<Vec<_>>(),
            [("chat", Some(1), None)],
            "the next BIND resumes from the new point"
        );
    }

    #[test]
    fn a_new_storage_epoch_voids_the_resume_points() {
        let now = Instant::now();
        let config = |storage_epoch| ClientConfig {
            device_id: "phone".to_owned(),
            client_version: "test".to_owned(),
            network: NetworkType::Wifi,
            apps: vec![AppCredentials {
                app: "chat".to_owned(),
                token: "t".to_owned(),
                last_seq: Some(7),
                last_broadcast_seq: Some(3),
                tags: Vec::new(),
            }],
            storage_epoch,
        };
        let hello_ok = |storage_epoch| Frame::HelloOk {
            heartbeat_interval_ms: 1_000,
            storage_epoch: Some(storage_epoch),
        };
        let bind_claims = |conn: &mut ClientConn| {
            drain(conn)
                .into_iter()
                .find_map(|frame| match frame {
                    Frame::Bind {
                        last_seq,
                        last_broadcast_seq,
                        ..
                    } => Some((last_seq, last_broadcast_seq)),
                    _ => None,
                })
                .expect("a BIND")
        };

        // The same epoch, or none known yet: the claims stand.
        for known in [Some(5), None] {
            let mut conn = ClientConn::new(now, config(known));
            conn.handle_frame(now, hello_ok(5));
            assert_eq!(bind_claims(&mut conn), (Some(7), Some(3)), "{known:?}");
            assert_eq!(conn.storage_epoch(), Some(5));
        }

        // Another epoch: the server's storage is new; claim nothing.
        let mut conn = ClientConn::new(now, config(Some(4)));
        conn.handle_frame(now, hello_ok(5));
        assert_eq!(bind_claims(&mut conn), (None, None));
        assert_eq!(conn.storage_epoch(), Some(5));
        let resets: Vec<ClientEvent> = std::iter::from_fn(|| conn.poll_event())
            .filter(|e| matches!(e, ClientEvent::Reset { .. }))
            .collect();
        assert_eq!(
            resets,
            [ResetSequence::Inbox, ResetSequence::Broadcasts].map(|sequence| {
                ClientEvent::Reset {
                    app: "chat".to_owned(),
                    sequence,
                    after: 0,
                }
            })
        );
        conn.handle_frame(now, push(1));
        assert!(
            std::iter::from_fn(|| conn.poll_event())
                .any(|e| matches!(e, ClientEvent::Push(p) if p.seq == 1))
        );
    }

    #[test]
    fn a_previous_timeout_is_reported_once_per_connection() {
        let now = Instant::now();
        let mut conn = start(now, None);
        hello_ok(&mut conn, now);
        let timed_out = |app: &str| Frame::SessionTimedOut {
            app: app.to_owned(),
            network: NetworkType::Cellular4g,
            interval_ms: 45_000,
            closed_ago_ms: 2_000,
        };
        // Not an app of this connection: ignored.
        conn.handle_frame(now, timed_out("mail"));
        conn.handle_frame(now, timed_out("chat"));
        conn.handle_frame(now, timed_out("chat"));
        let reports: Vec<ClientEvent> = std::iter::from_fn(|| conn.poll_event())
            .filter(|e| matches!(e, ClientEvent::PreviousTimedOut { .. }))
            .collect();
        assert_eq!(
            reports,
            [ClientEvent::PreviousTimedOut {
                network: NetworkType::Cellular4g,
                interval: Duration::from_secs(45),
                closed_ago: Duration::from_secs(2),
            }]
        );
    }

    #[test]
    fn a_negotiated_interval_moves_the_pings_and_the_silence_deadline() {
        let now = Instant::now();
        let mut conn = start(now, None);
        hello_ok(&mut conn, now);
        drain(&mut conn);
        conn.propose_heartbeat(Duration::from_secs(5)).unwrap();
        assert_eq!(
            drain(&mut conn),
            vec![Frame::Heartbeat { interval_ms: 5_000 }]
        );
        // The server clamped it to 3 s.
        conn.handle_frame(now, Frame::Heartbeat { interval_ms: 3_000 });
        let events: Vec<_> = std::iter::from_fn(|| conn.poll_event()).collect();
        assert!(events.contains(&ClientEvent::HeartbeatSet {
            interval: Duration::from_secs(3)
        }));
        assert_eq!(conn.heartbeat_interval(), Some(Duration::from_secs(3)));
        conn.handle_timeout(now + Duration::from_millis(2_999));
        assert!(drain(&mut conn).is_empty());
        conn.handle_timeout(now + Duration::from_secs(3));
        assert_eq!(drain(&mut conn), vec![Frame::Ping]);
        assert!(conn.ping_unanswered());
        conn.handle_frame(now + Duration::from_secs(3), Frame::Pong);
        assert_eq!(conn.poll_event(), Some(ClientEvent::PingAnswered));
        assert!(!conn.ping_unanswered());
        // Silent for twice the new interval: dead.
        conn.handle_timeout(now + Duration::from_millis(8_999));
        assert!(!conn.is_closed());
        conn.handle_timeout(now + Duration::from_secs(9));
        assert!(conn.is_closed());
    }

    #[test]
    fn silent_server_times_out() {
        let now = Instant::now();
        let mut conn = start(now, None);
        hello_ok(&mut conn, now);
        conn.handle_timeout(now + Duration::from_millis(1_999));
        assert!(!conn.is_closed());
        conn.handle_timeout(now + Duration::from_secs(2));
        assert!(conn.is_closed());
        assert!(std::iter::from_fn(|| conn.poll_event()).any(|e| e == ClientEvent::TimedOut));
    }

    #[test]
    fn duplicate_pushes_are_dropped_and_acks_are_cumulative() {
        let now = Instant::now();
        let mut conn = start(now, Some(2));
        hello_ok(&mut conn, now);
        drain(&mut conn);
        for seq in [2, 3, 3, 4] {
            conn.handle_frame(now, push(seq));
        }
        let seqs: Vec<u64> = std::iter::from_fn(|| conn.poll_event())
            .filter_map(|e| match e {
                ClientEvent::Push(p) => Some(p.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [3, 4]);
        assert!(conn.ack("chat", 4));
        assert!(!conn.ack("chat", 3));
        assert!(!conn.ack("chat", 9), "never delivered");
        assert_eq!(
            drain(&mut conn),
            vec![Frame::Ack {
                app: "chat".to_owned(),
                seq: 4
            }]
        );
        assert_eq!(
            conn.resume_points().collect::<Vec<_>>(),
            [("chat", Some(4), None)]
        );
    }

    #[test]
    fn a_transient_message_is_an_event_that_moves_no_seq_and_is_not_acked() {
        let now = Instant::now();
        let mut conn = start(now, Some(2));
        hello_ok(&mut conn, now);
        drain(&mut conn);
        assert!(matches!(conn.poll_event(), Some(ClientEvent::Ready { .. })));
        let transient = |app: &str| Frame::Transient {
            app: app.to_owned(),
            payload: Bytes::from_static(b"typing"),
        };
        conn.handle_frame(now, transient("chat"));
        conn.handle_frame(now, transient("other"));
        let events: Vec<ClientEvent> = std::iter::from_fn(|| conn.poll_event()).collect();
        assert_eq!(
            events,
            [ClientEvent::Transient {
                app: "chat".to_owned(),
                payload: Bytes::from_static(b"typing")
            }],
            "only a bound app's transient message is reported"
        );
        assert!(!conn.is_closed());
        assert!(drain(&mut conn).is_empty(), "nothing is acked");
        assert_eq!(
            conn.resume_points().collect::<Vec<_>>(),
            [("chat", Some(2), None)]
        );
        conn.handle_frame(now, push(3));
        assert!(
            matches!(
                conn.poll_event(),
                Some(ClientEvent::Push(Push { seq: 3, .. }))
            ),
            "the inbox's seqs go on where they were"
        );
    }

    #[test]
    fn an_app_the_server_unbinds_is_forgotten_and_the_connection_stays() {
        let now = Instant::now();
        let mut conn = start(now, None);
        conn.handle_frame(
            now,
            Frame::Unbind {
                app: "chat".to_owned(),
                reason: Some(UnbindReason::APP_DELETED),
            },
        );
        assert!(!conn.is_closed());
        assert_eq!(
            conn.poll_event(),
            Some(ClientEvent::Unbound {
                app: "chat".to_owned(),
                reason: UnbindReason::APP_DELETED
            })
        );
        assert_eq!(conn.resume_points().count(), 0);
        assert!(!conn.ack("chat", 1), "nothing is acked for an app unbound");
    }

    #[test]
    fn goaway_closes_and_is_reported() {
        let now = Instant::now();
        let mut conn = start(now, None);
        conn.handle_frame(
            now,
            Frame::GoAway {
                reason: GoAwayReason::KICKED,
                reconnect_delay_ms: None,
            },
        );
        assert!(conn.is_closed());
        assert_eq!(
            conn.poll_event(),
            Some(ClientEvent::GoAway {
                reason: GoAwayReason::KICKED,
                reconnect_delay_ms: None
            })
        );
    }

    #[test]
    fn broadcasts_are_deduplicated_acked_and_resumed_apart_from_pushes() {
        let now = Instant::now();
        let mut conn = start(now, None);
        hello_ok(&mut conn, now);
        drain(&mut conn);
        for seq in [1, 2, 2] {
            conn.handle_frame(
                now,
                Frame::Broadcast {
                    app: "chat".to_owned(),
                    message_id: MessageId([seq as u8; 16]),
                    seq,
                    payload: Bytes::from_static(b"all"),
                },
            );
        }
        let seqs: Vec<u64> = std::iter::from_fn(|| conn.poll_event())
            .filter_map(|e| match e {
                ClientEvent::Broadcast(b) => Some(b.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [1, 2]);
        assert!(conn.ack_broadcast("chat", 2));
        assert!(!conn.ack_broadcast("chat", 3), "never delivered");
        assert_eq!(
            drain(&mut conn),
            [Frame::BroadcastAck {
                app: "chat".to_owned(),
                seq: 2
            }]
        );
        assert_eq!(
            conn.resume_points().collect::<Vec<_>>(),
            [("chat", None, Some(2))]
        );
    }
}
