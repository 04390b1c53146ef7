//! Delivery: store first, then send; answer the shards' events.
//!
//! A push is made durable by the saver before anything else, then handed to
//! every connection the register knows for the user. Shards ask for stored
//! messages when a client binds or falls behind (`CatchUp`), and this module
//! answers with a `Fill` read from storage, so a shard never waits on
//! storage and never holds more than its delivery window per binding.
//!
//! In a cluster a user's connections may live on other room nodes: what is
//! for them goes through the router's `Remote` (Redis pub/sub), one message
//! per node per call however many of its connections it names.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::{
    Bound, CatchUp, ConnCommand, ConnEvent, ConnId, Notice, PullAnswer, PushMessage, ShardCommand,
    ShardEvent,
};
use herald_proto::{Features, GoAwayReason, PullStatus};
use herald_storage::{
    AckCursor, FillStart, InboxKey, NewMessage, Saver, StorageError, StoredMessage, StoredRef,
};
use tokio::sync::Notify;

use crate::broadcast::{Broadcasts, Fills};
use crate::clock::unix_ms;
use crate::cluster::channel::NodeMessage;
use crate::coordinator::Coordinator;
use crate::metrics::Metrics;
use crate::register::{Change, DeviceBinding, Register, Session, SessionTimeout};
use crate::router::{NodeName, Router};

/// Longest wait between two tries of a fill storage could not serve.
const FILL_RETRY_DELAY_MAX: Duration = Duration::from_secs(5);

/// Shard events handled as one batch: one register update and one inbox
/// read for up to this many binds. Large enough that a reconnect storm
/// (tens of thousands of binds a second) costs tens of round trips a second;
/// small enough that a batch's work stays in the milliseconds.
const EVENT_BATCH_MAX: usize = 512;

/// (app, user, device) as one allocation: `[app len][app][user len][user]
/// [device]`. A node holds one per device that acked in the last flush
/// interval, which after a push to everyone is every connected device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AckKey(Box<[u8]>);

impl AckKey {
    fn new(app: &str, user: &str, device_id: &str) -> AckKey {
        // The protocol caps app and user ids at 255 bytes (limits.rs).
        let app_len = u8::try_from(app.len()).expect("app id fits a u8 length");
        let user_len = u8::try_from(user.len()).expect("user id fits a u8 length");
        let mut key = Vec::with_capacity(2 + app.len() + user.len() + device_id.len());
        key.push(app_len);
        key.extend_from_slice(app.as_bytes());
        key.push(user_len);
        key.extend_from_slice(user.as_bytes());
        key.extend_from_slice(device_id.as_bytes());
        AckKey(key.into_boxed_slice())
    }

    fn parts(&self) -> (&str, &str, &str) {
        let app_end = 1 + usize::from(self.0[0]);
        let user_end = app_end + 1 + usize::from(self.0[app_end]);
        // Every part was copied whole from a str, so each slice is UTF-8.
        let part = |bytes| std::str::from_utf8(bytes).expect("AckKey parts are UTF-8");
        (
            part(&self.0[1..app_end]),
            part(&self.0[app_end + 1..user_end]),
            part(&self.0[user_end..]),
        )
    }
}

/// The register changes an event makes (none for most events).
fn register_changes(name: &NodeName, event: &ShardEvent) -> Vec<Change> {
    let ShardEvent::Conn { conn, event } = event else {
        return Vec::new();
    };
    match event {
        ConnEvent::Bound(bound) => vec![Change::Add {
            app: bound.app.clone(),
            user: bound.user.clone(),
            session: Session {
                conn: *conn,
                node: name.node.clone(),
                instance: name.instance,
                device_id: bound.device_id.clone(),
                network: bound.network,
                connected_at_ms: bound.connected_at_ms,
            },
        }],
        ConnEvent::Unbound { app, user } => vec![Change::Remove {
            app: app.clone(),
            user: user.clone(),
            conn: *conn,
        }],
        ConnEvent::Closed { bindings, .. } => bindings
            .iter()
            .map(|(app, user)| Change::Remove {
                app: app.clone(),
                user: user.clone(),
                conn: *conn,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What a connection closed at its heartbeat deadline leaves to remember:
/// one timeout per binding (none for any other event).
fn session_timeouts(event: &ShardEvent) -> Vec<(DeviceBinding, SessionTimeout)> {
    let ShardEvent::Conn {
        event:
            ConnEvent::Closed {
                bindings,
                timed_out: Some(timed_out),
            },
        ..
    } = event
    else {
        return Vec::new();
    };
    let closed_at_ms = unix_ms();
    bindings
        .iter()
        .map(|(app, user)| {
            let binding = DeviceBinding {
                app: app.clone(),
                user: user.clone(),
                device_id: timed_out.device_id.clone(),
            };
            let timeout = SessionTimeout {
                network: timed_out.network,
                interval_ms: timed_out.interval_ms,
                closed_at_ms,
            };
            (binding, timeout)
        })
        .collect()
}

/// One recipient's result of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushResult {
    pub stored: StoredRef,
    pub online: bool,
}

/// The bounds a node's delivery works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryLimits {
    /// Messages read for a connection's first fill: its delivery window.
    pub fill_limit: u32,
    /// Binds in a row a device's fill may start at one message it never
    /// acks before that message is parked for it (0: never parked).
    pub redeliveries_max: u32,
    /// How long a connection closed at its heartbeat deadline is
    /// remembered for the device's next bind: as long as the longest
    /// interval a client may negotiate, which is about how long a client
    /// pinging at it takes to notice a dead connection and come back.
    pub timeouts_kept_for: Duration,
}

pub struct Delivery {
    router: Arc<Router>,
    saver: Saver,
    register: Arc<dyn Register>,
    limits: DeliveryLimits,
    /// Acks not yet written: the highest seq per (app, user, device).
    pending_acks: Mutex<HashMap<AckKey, u64>>,
    drained_shards: AtomicU64,
    drained: Notify,
    draining: AtomicBool,
    /// Told once when the drain begins, so a room node's heartbeat
    /// announces it at once rather than at its next beat.
    drain_begun: Notify,
    broadcasts: Broadcasts,
    /// Upstream data and user state toward the apps' business servers.
    coordinator: Coordinator,
    metrics: Arc<Metrics>,
}

impl Delivery {
    pub fn new(
        router: Router,
        saver: Saver,
        register: Arc<dyn Register>,
        coordinator: Coordinator,
        metrics: Arc<Metrics>,
        limits: DeliveryLimits,
    ) -> Arc<Delivery> {
        let router = Arc::new(router);
        Arc::new(Delivery {
            broadcasts: Broadcasts::new(router.clone(), saver.clone()),
            router,
            saver,
            register,
            limits,
            pending_acks: Mutex::default(),
            drained_shards: AtomicU64::new(0),
            drained: Notify::new(),
            draining: AtomicBool::new(false),
            drain_begun: Notify::new(),
            coordinator,
            metrics,
        })
    }

    /// The webhook queues: their counts for metrics, and `set_app` for
    /// apps that change at runtime.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    pub fn register(&self) -> &dyn Register {
        &*self.register
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn saver(&self) -> &Saver {
        &self.saver
    }

    pub fn broadcasts(&self) -> &Broadcasts {
        &self.broadcasts
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Completes once the drain has begun (at once if it began while
    /// nobody waited). Meant for one waiter: the heartbeat.
    pub async fn drain_begun(&self) {
        self.drain_begun.notified().await;
    }

    /// Stores `payload` for every user, then hands it to their connections.
    /// Returns once stored (durable) and handed to the shards.
    pub async fn push(
        &self,
        app: &AppId,
        users: Vec<String>,
        payload: Bytes,
        ttl: Duration,
        idempotency_key: Option<String>,
        notice: Option<Notice>,
    ) -> Result<(Vec<PushResult>, bool), StorageError> {
        let started = Instant::now();
        let outcome = self
            .saver
            .store(NewMessage {
                app: app.clone(),
                users,
                payload: payload.clone(),
                ttl_ms: ttl.as_millis() as u64,
                now_ms: unix_ms(),
                idempotency_key,
                notice: notice.clone(),
            })
            .await?;
        let stored_at = Instant::now();
        tracing::debug!(
            app.id = %app,
            inboxes = outcome.stored.len(),
            replayed = outcome.replayed,
            "stored"
        );
        if !outcome.replayed {
            self.metrics.stored_in(app, started);
            self.metrics
                .messages_stored
                .with_label_values(&[&**app])
                .inc_by(outcome.stored.len() as u64);
        }
        let mut remote: HashMap<(String, u64), Vec<(ConnId, u64)>> = HashMap::new();
        let mut results = Vec::with_capacity(outcome.stored.len());
        for stored in outcome.stored {
            let sessions = self.sessions(app, &stored.user).await;
            let online = !sessions.is_empty();
            // A replay was handed over the first time; only report presence.
            if !outcome.replayed {
                // Taken by value: a remote session's node name becomes the
                // key of its group without a copy.
                for session in sessions {
                    self.count_delivery(app, payload.len());
                    if !self.router.is_local(&session) {
                        remote
                            .entry((session.node, session.instance))
                            .or_default()
                            .push((session.conn, stored.seq));
                        continue;
                    }
                    let message = PushMessage {
                        seq: stored.seq,
                        message_id: stored.message_id,
                        payload: payload.clone(),
                        notice: notice.clone(),
                    };
                    self.metrics
                        .delivered(session.conn, app, stored.seq, stored_at);
                    tracing::debug!(conn = %session.conn, seq = stored.seq, "handed to its shard");
                    let command = ConnCommand::Deliver {
                        app: app.clone(),
                        message,
                        stored_at,
                    };
                    self.router.to_conn(session.conn, command).await;
                }
            }
            results.push(PushResult { online, stored });
        }
        if let Some(message_id) = results.first().map(|result| result.stored.message_id) {
            for ((node, instance), targets) in remote {
                let targets_len = targets.len();
                let message = NodeMessage::Deliver {
                    app: app.clone(),
                    message_id,
                    payload: payload.clone(),
                    notice: notice.clone(),
                    targets,
                };
                tracing::debug!(node.id = %node, connections = targets_len, "sent to its room node");
                self.router.to_node(&node, instance, message).await;
            }
        }
        Ok((results, outcome.replayed))
    }

    /// Hands `payload` to the bound connections of each user without
    /// storing it (a push with `"store": false`): nothing is acked or sent
    /// again, so a connection that binds later never sees it. Returns, per
    /// user in `users`' order, how many connections it was handed to.
    pub async fn push_transient(
        &self,
        app: &AppId,
        users: &[String],
        payload: Bytes,
    ) -> Vec<usize> {
        let mut remote: HashMap<(String, u64), Vec<ConnId>> = HashMap::new();
        let mut delivered_to = Vec::with_capacity(users.len());
        for user in users {
            let sessions = self.sessions(app, user).await;
            delivered_to.push(sessions.len());
            self.metrics
                .transient_deliveries
                .with_label_values(&[&**app])
                .inc_by(sessions.len() as u64);
            for session in sessions {
                if !self.router.is_local(&session) {
                    remote
                        .entry((session.node, session.instance))
                        .or_default()
                        .push(session.conn);
                    continue;
                }
                let command = ConnCommand::Transient {
                    app: app.clone(),
                    payload: payload.clone(),
                };
                self.router.to_conn(session.conn, command).await;
            }
        }
        for ((node, instance), conns) in remote {
            let message = NodeMessage::Transient {
                app: app.clone(),
                payload: payload.clone(),
                conns,
            };
            self.router.to_node(&node, instance, message).await;
        }
        delivered_to
    }

    fn count_delivery(&self, app: &str, payload_len: usize) {
        self.metrics.deliveries.with_label_values(&[app]).inc();
        self.metrics
            .payload_bytes_out
            .with_label_values(&[app])
            .inc_by(payload_len as u64);
    }

    fn count_fill(&self, app: &str, messages: &[StoredMessage]) {
        self.metrics.fills.inc();
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        self.metrics
            .payload_bytes_out
            .with_label_values(&[app])
            .inc_by(bytes as u64);
    }

    /// The user's connections. A register failure counts as offline: the
    /// message is stored and reaches the user on the next bind.
    pub async fn sessions(&self, app: &str, user: &str) -> Vec<Session> {
        match self.register.sessions(app, user).await {
            Ok(sessions) => sessions,
            Err(error) => {
                tracing::warn!(%error, app.id = app, "register lookup failed");
                Vec::new()
            }
        }
    }

    /// Sends GOAWAY(kicked) to every connection of the user; returns how many.
    pub async fn kick(&self, app: &str, user: &str) -> usize {
        let sessions = self.sessions(app, user).await;
        let kicked = sessions.len();
        let mut remote: HashMap<(String, u64), Vec<ConnId>> = HashMap::new();
        for session in sessions {
            if self.router.is_local(&session) {
                let command = ConnCommand::Kick {
                    reason: GoAwayReason::KICKED,
                };
                self.router.to_conn(session.conn, command).await;
            } else {
                remote
                    .entry((session.node, session.instance))
                    .or_default()
                    .push(session.conn);
            }
        }
        for ((node, instance), conns) in remote {
            let message = NodeMessage::Kick {
                reason: GoAwayReason::KICKED,
                conns,
            };
            self.router.to_node(&node, instance, message).await;
        }
        kicked
    }

    /// Hands what another node sent to this node's shards.
    pub async fn arrive(&self, message: NodeMessage) {
        match message {
            NodeMessage::Deliver {
                app,
                message_id,
                payload,
                notice,
                targets,
            } => {
                // The storing node's clock is not this one's: here a
                // message's latency starts when it arrives.
                let arrived_at = Instant::now();
                for (conn, seq) in targets {
                    let message = PushMessage {
                        seq,
                        message_id,
                        payload: payload.clone(),
                        notice: notice.clone(),
                    };
                    self.metrics.delivered(conn, &app, seq, arrived_at);
                    tracing::debug!(%conn, seq, "arrived; handed to its shard");
                    let command = ConnCommand::Deliver {
                        app: app.clone(),
                        message,
                        stored_at: arrived_at,
                    };
                    self.router.to_conn(conn, command).await;
                }
            }
            NodeMessage::Broadcast {
                app,
                stored,
                mode,
                shares,
            } => {
                let mode = self.broadcasts.node_pace(mode, &shares);
                self.broadcasts.fan_out(&app, &stored, mode).await;
            }
            NodeMessage::Kick { reason, conns } => {
                for conn in conns {
                    self.router
                        .to_conn(conn, ConnCommand::Kick { reason })
                        .await;
                }
            }
            NodeMessage::Transient {
                app,
                payload,
                conns,
            } => {
                for conn in conns {
                    let command = ConnCommand::Transient {
                        app: app.clone(),
                        payload: payload.clone(),
                    };
                    self.router.to_conn(conn, command).await;
                }
            }
        }
    }

    /// The body of message `seq` of (app, user)'s inbox, for a PULL.
    async fn pull(&self, app: &str, user: &str, seq: u64) -> PullAnswer {
        let Some(after) = seq.checked_sub(1) else {
            return PullAnswer::Refused(PullStatus::GONE);
        };
        match self
            .saver
            .messages_after(app, user, after, 1, unix_ms())
            .await
        {
            Ok((messages, _)) => match messages.into_iter().next() {
                Some(message) if message.seq == seq => PullAnswer::Message {
                    message_id: message.message_id,
                    payload: message.payload,
                },
                _ => PullAnswer::Refused(PullStatus::GONE),
            },
            Err(error) => {
                tracing::warn!(app.id = %app, seq, %error, "a pull could not read storage");
                PullAnswer::Refused(PullStatus::UNAVAILABLE)
            }
        }
    }

    /// Has every listed binding of this node check storage for messages it
    /// was not told of (deliveries may have been lost on the way here).
    pub async fn resync(&self, sessions: Vec<(AppId, UserId, Session)>) {
        for (app, _user, session) in sessions {
            self.router
                .to_conn(session.conn, ConnCommand::Resync { app })
                .await;
        }
    }

    /// Handles shard events until every shard's sender is gone.
    ///
    /// Events are taken in batches of whatever has queued up (at most
    /// `EVENT_BATCH_MAX`): one register update and one storage read per
    /// batch, so a reconnect storm costs round trips per batch rather than
    /// per connection, and a quiet node still answers each event at once.
    pub async fn run_events(self: Arc<Self>, events: async_channel::Receiver<ShardEvent>) {
        let mut batch = Vec::with_capacity(EVENT_BATCH_MAX);
        while let Ok(first) = events.recv().await {
            batch.push(first);
            while batch.len() < EVENT_BATCH_MAX {
                match events.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            self.handle_events(&mut batch).await;
        }
    }

    async fn handle_events(self: &Arc<Self>, batch: &mut Vec<ShardEvent>) {
        // Register changes are applied first, in event order, so a Closed
        // can never overtake the Bound before it, and a resume below never
        // runs before its binding is registered. A heartbeat timeout is
        // remembered where it falls in that order: after its own session's
        // removal, before the removals of sessions that closed after it
        // (the device's other session is judged as it was at the timeout).
        let mut changes: Vec<Change> = Vec::new();
        for event in batch.iter() {
            changes.extend(register_changes(self.router.name(), event));
            let timeouts = session_timeouts(event);
            if !timeouts.is_empty() {
                self.apply_register(std::mem::take(&mut changes)).await;
                if let Err(error) = self
                    .register
                    .remember_timeouts(timeouts, self.limits.timeouts_kept_for)
                    .await
                {
                    tracing::warn!(%error, "timed-out sessions not remembered");
                }
            }
        }
        self.apply_register(changes).await;
        for event in batch.iter() {
            self.report_user_state(event);
        }
        let mut resumes = Vec::new();
        for event in batch.drain(..) {
            let (conn, event) = match event {
                ShardEvent::Conn { conn, event } => (conn, event),
                ShardEvent::Drained { .. } => {
                    self.drained_shards.fetch_add(1, Ordering::SeqCst);
                    self.drained.notify_waiters();
                    continue;
                }
            };
            match event {
                ConnEvent::Bound(bound) => {
                    self.metrics.binds.with_label_values(&[&*bound.app]).inc();
                    resumes.push((conn, bound));
                }
                ConnEvent::BroadcastAck { app, seq } => self.broadcasts.acked(&app, seq),
                ConnEvent::BroadcastCatchUp { app, after } => {
                    let this = self.clone();
                    tokio::spawn(async move { this.broadcasts.fill(conn, app, after).await });
                }
                ConnEvent::Unbound { .. } => {}
                ConnEvent::Closed { .. } => self.metrics.closed(conn),
                ConnEvent::Ack {
                    app,
                    user,
                    device_id,
                    seq,
                } => {
                    self.metrics.acked(conn, &app, seq);
                    let mut pending = self.pending_acks.lock().expect("ack lock");
                    let key = AckKey::new(&app, &user, &device_id);
                    let acked = pending.entry(key).or_insert(seq);
                    *acked = (*acked).max(seq);
                }
                ConnEvent::CatchUp(catch_up) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.fill(conn, catch_up).await });
                }
                ConnEvent::Pull { app, user, seq } => {
                    self.metrics.pulls.with_label_values(&[&*app]).inc();
                    let this = self.clone();
                    tokio::spawn(async move {
                        let answer = this.pull(&app, &user, seq).await;
                        let command = ConnCommand::PullReply { app, seq, answer };
                        this.router.to_conn(conn, command).await;
                    });
                }
                ConnEvent::Upstream {
                    app,
                    user,
                    device_id,
                    request_id,
                    route,
                    payload,
                } => {
                    self.metrics.upstreams.with_label_values(&[&*app]).inc();
                    self.metrics
                        .payload_bytes_in
                        .with_label_values(&[&*app])
                        .inc_by(payload.len() as u64);
                    // The call waits its turn at the app's pace; the event
                    // loop does not.
                    let this = self.clone();
                    tokio::spawn(async move {
                        let status = this
                            .coordinator
                            .upstream(
                                &app,
                                &user,
                                &device_id,
                                request_id,
                                route.as_deref(),
                                &payload,
                            )
                            .await;
                        let command = ConnCommand::UpstreamAck {
                            app,
                            request_id,
                            status,
                        };
                        this.router.to_conn(conn, command).await;
                    });
                }
            }
        }
        let told: Vec<(ConnId, DeviceBinding)> = resumes
            .iter()
            .filter(|(_, bound)| bound.features.contains(Features::SESSION_TIMED_OUT))
            .map(|(conn, bound)| {
                let binding = DeviceBinding {
                    app: bound.app.clone(),
                    user: bound.user.clone(),
                    device_id: bound.device_id.clone(),
                };
                (*conn, binding)
            })
            .collect();
        if !told.is_empty() {
            let this = self.clone();
            tokio::spawn(async move { this.report_timeouts(told).await });
        }
        if !resumes.is_empty() {
            // Storage reads run beside the event loop, so a slow read never
            // holds up registering the next connections.
            let this = self.clone();
            tokio::spawn(async move { this.resume(resumes).await });
        }
    }

    async fn apply_register(&self, changes: Vec<Change>) {
        if !changes.is_empty()
            && let Err(error) = self.register.apply(changes).await
        {
            tracing::warn!(%error, "register update failed");
        }
    }

    /// Tells each new binding whose device's previous connection of the
    /// app timed out (SESSION_TIMED_OUT).
    async fn report_timeouts(&self, binds: Vec<(ConnId, DeviceBinding)>) {
        let bindings = binds.iter().map(|(_, binding)| binding.clone()).collect();
        let timeouts = match self.register.take_timeouts(bindings).await {
            Ok(timeouts) => timeouts,
            Err(error) => {
                tracing::warn!(%error, "timed-out sessions not read");
                return;
            }
        };
        let now_ms = unix_ms();
        for ((conn, binding), timeout) in binds.into_iter().zip(timeouts) {
            let Some(timeout) = timeout else { continue };
            self.metrics
                .session_timeouts_reported
                .with_label_values(&[&*binding.app])
                .inc();
            let closed_ago_ms = now_ms.saturating_sub(timeout.closed_at_ms);
            let command = ConnCommand::SessionTimedOut {
                app: binding.app,
                network: timeout.network,
                interval_ms: timeout.interval_ms,
                closed_ago_ms: u32::try_from(closed_ago_ms).unwrap_or(u32::MAX),
            };
            self.router.to_conn(conn, command).await;
        }
    }

    /// Tells the app's business server (through the coordinator) who came
    /// online and who left.
    fn report_user_state(&self, event: &ShardEvent) {
        let ShardEvent::Conn { conn, event } = event else {
            return;
        };
        match event {
            ConnEvent::Bound(bound) => self.coordinator.user_state(
                &bound.app,
                &bound.user,
                *conn,
                Some(&bound.device_id),
                true,
            ),
            ConnEvent::Unbound { app, user } => {
                self.coordinator.user_state(app, user, *conn, None, false);
            }
            ConnEvent::Closed { bindings, .. } => {
                for (app, user) in bindings {
                    self.coordinator.user_state(app, user, *conn, None, false);
                }
            }
            _ => {}
        }
    }

    /// Sends each new binding its first fill. One read learns where every
    /// inbox of the batch stands; only the inboxes holding messages past the
    /// resume point are read further (for an idle reconnect, none are).
    ///
    /// A client claiming a seq its inbox (or its app's broadcasts) never
    /// handed out holds data from before a reset or restore of storage: it
    /// resumes from the device's cursor (or the first broadcast) instead of
    /// waiting, silently, for the inbox to pass its old seq, and the shard
    /// tells it so (RESET).
    async fn resume(&self, mut resumes: Vec<(ConnId, Bound)>) {
        let mut broadcasts = self
            .broadcasts
            .read(
                resumes
                    .iter()
                    .map(|(_, bound)| (&bound.app, bound.client_last_broadcast_seq.unwrap_or(0))),
            )
            .await;
        let broadcast_afters: Vec<u64> = resumes
            .iter()
            .map(|(_, bound)| {
                let claimed = bound.client_last_broadcast_seq.unwrap_or(0);
                match broadcasts.get(&*bound.app) {
                    Some(read) if claimed > read.last_handed_out => {
                        tracing::warn!(
                            app.id = %bound.app, user.id = %bound.user, claimed,
                            last_handed_out = read.last_handed_out,
                            "a client holds broadcasts storage never handed out \
                             (storage reset or restored): it gets them from the first"
                        );
                        0
                    }
                    _ => claimed,
                }
            })
            .collect();
        let reread: HashSet<&AppId> = resumes
            .iter()
            .zip(&broadcast_afters)
            .filter(|((_, bound), after)| {
                **after == 0 && bound.client_last_broadcast_seq.unwrap_or(0) > 0
            })
            .map(|((_, bound), _)| &bound.app)
            .collect();
        if !reread.is_empty() {
            let from_first = self
                .broadcasts
                .read(reread.into_iter().map(|app| (app, 0)))
                .await;
            broadcasts.extend(from_first);
        }
        // Acks not yet written are read before storage, so an ack flushed
        // in between is seen in storage instead: a resume point may come out
        // low (a redelivery), never high (a loss).
        let pending: Vec<u64> = {
            let pending = self.pending_acks.lock().expect("ack lock");
            resumes
                .iter()
                .map(|(_, bound)| {
                    let key = AckKey::new(&bound.app, &bound.user, &bound.device_id);
                    pending.get(&key).copied().unwrap_or(0)
                })
                .collect()
        };
        let mut delay = Duration::from_millis(100);
        let heads = loop {
            let keys: Vec<InboxKey> = resumes
                .iter()
                .map(|(_, bound)| InboxKey {
                    app: bound.app.to_string(),
                    user: bound.user.to_string(),
                    device_id: Some(bound.device_id.clone()),
                })
                .collect();
            match self.saver.inbox_heads(&keys).await {
                Ok(heads) => break heads,
                Err(error) => {
                    tracing::warn!(%error, binds = resumes.len(), "reading inbox heads failed");
                    // A client that left no longer needs its fill; the ones
                    // still here get nothing until storage answers, rather
                    // than a guess at where they resume.
                    let mut still_bound = Vec::with_capacity(resumes.len());
                    for (conn, bound) in resumes {
                        if self.still_bound(&bound.app, &bound.user).await {
                            still_bound.push((conn, bound));
                        }
                    }
                    resumes = still_bound;
                    if resumes.is_empty() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(FILL_RETRY_DELAY_MAX);
                }
            }
        };
        let resumes = resumes.into_iter().zip(broadcast_afters);
        for ((((conn, bound), broadcast_after), head), pending) in resumes.zip(heads).zip(pending) {
            let cursor = head.acked_seq.unwrap_or(0).max(pending);
            let after = match bound.client_last_seq {
                Some(claimed) if claimed <= head.last_seq => claimed,
                claimed => {
                    if let Some(claimed) = claimed {
                        tracing::warn!(
                            app.id = %bound.app, user.id = %bound.user, claimed,
                            inbox_head = head.last_seq,
                            "a client holds seqs its inbox never handed out \
                             (storage reset or restored): it resumes from its device's cursor"
                        );
                    }
                    if cursor <= head.last_seq {
                        cursor
                    } else {
                        self.lower_cursor(&bound).await;
                        0
                    }
                }
            };
            // Nothing stored past the resume point: no read, an empty fill.
            let (mut messages, more) = if head.last_seq <= after {
                (Vec::new(), false)
            } else {
                let read =
                    self.read_inbox(conn, &bound.app, &bound.user, after, self.limits.fill_limit);
                match read.await {
                    Some(found) => found,
                    None => continue,
                }
            };
            let mut after = after;
            if !messages.is_empty() && self.limits.redeliveries_max > 0 {
                let starts = self.count_fill_start(&bound, after).await;
                let first_parks = starts == u64::from(self.limits.redeliveries_max) + 1;
                // Past the first park at this start, the client claims a
                // resume point below its cursor (it never acked): only a
                // message the cursor is past, the one parked then, is
                // dropped again, never one that was not tried.
                let parked_before = starts > u64::from(self.limits.redeliveries_max) + 1
                    && messages[0].seq <= cursor;
                if first_parks || parked_before {
                    // The fill resumes after the parked message: the client
                    // gets the next ones as if it had acked it.
                    let parked = messages.remove(0);
                    self.park(&bound, &parked, first_parks);
                    after = parked.seq;
                }
            }
            self.count_fill(&bound.app, &messages);
            let missed = broadcasts
                .get(&*bound.app)
                .map(|read| {
                    read.unexpired
                        .iter()
                        .filter(|b| b.seq > broadcast_after)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            self.broadcasts
                .send_fills(Fills {
                    conn,
                    app: bound.app,
                    inbox_after: after,
                    messages,
                    more,
                    broadcast_after,
                    broadcasts: missed,
                })
                .await;
        }
    }

    /// How many binds of the device in a row (this one included) started
    /// their fill after `after`; 0 when storage cannot say, so the message
    /// is sent rather than parked on a guess.
    async fn count_fill_start(&self, bound: &Bound, after: u64) -> u64 {
        let start = FillStart {
            app: &bound.app,
            user: &bound.user,
            device_id: &bound.device_id,
            after,
        };
        match self.saver.count_fill_start(&start, unix_ms()).await {
            Ok(starts) => starts,
            Err(error) => {
                tracing::warn!(%error, app.id = %bound.app, "counting a fill's start failed");
                0
            }
        }
    }

    /// Parks `message` for the bound device, which never acked it through
    /// `redeliveries_max` binds in a row: its cursor moves past it (with
    /// the next ack flush), so it is not sent to that device again. The
    /// metric and the `parked` webhook event come once, on the bind that
    /// passed the max (`first`); a client that keeps claiming a resume
    /// point below the cursor finds the message dropped again on each
    /// later bind.
    fn park(&self, bound: &Bound, message: &StoredMessage, first: bool) {
        {
            let mut pending = self.pending_acks.lock().expect("ack lock");
            let key = AckKey::new(&bound.app, &bound.user, &bound.device_id);
            let acked = pending.entry(key).or_insert(message.seq);
            *acked = (*acked).max(message.seq);
        }
        if !first {
            return;
        }
        tracing::info!(
            app.id = %bound.app, user.id = %bound.user, device.id = %bound.device_id,
            seq = message.seq, "a message the device never acked is parked for it"
        );
        self.metrics
            .messages_parked
            .with_label_values(&[&*bound.app])
            .inc();
        self.coordinator.parked(
            &bound.app,
            &bound.user,
            &bound.device_id,
            message.seq,
            &message.message_id.to_string(),
        );
    }

    /// A device's cursor past its inbox's head (left by a reset or restore
    /// of storage) would hold back its resume point until the inbox passed
    /// it, skipping what came before: it goes back to the start, in memory
    /// and in storage.
    async fn lower_cursor(&self, bound: &Bound) {
        let key = AckKey::new(&bound.app, &bound.user, &bound.device_id);
        self.pending_acks.lock().expect("ack lock").remove(&key);
        let cursor = AckCursor {
            app: &bound.app,
            user: &bound.user,
            device_id: &bound.device_id,
            acked_seq: 0,
        };
        if let Err(error) = self.saver.lower_ack_cursor(&cursor).await {
            // Resuming from the start still delivers everything; the cursor
            // is lowered on a later bind.
            tracing::warn!(%error, app.id = %bound.app, "lowering an ack cursor failed");
        }
    }

    async fn still_bound(&self, app: &str, user: &str) -> bool {
        !self.is_draining() && !self.sessions(app, user).await.is_empty()
    }

    /// Reads stored messages after `after`, retrying while storage is down
    /// and the user is still connected; `None` once the user left.
    async fn read_inbox(
        &self,
        conn: ConnId,
        app: &str,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Option<(Vec<StoredMessage>, bool)> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self
                .saver
                .messages_after(app, user, after, limit, unix_ms())
                .await
            {
                Ok(found) => return Some(found),
                Err(error) => {
                    tracing::warn!(%error, conn.id = %conn, "reading an inbox failed");
                    if !self.still_bound(app, user).await {
                        return None;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(FILL_RETRY_DELAY_MAX);
                }
            }
        }
    }

    /// Reads stored messages after `after` and sends them to the connection
    /// (the answer to a `CatchUp`), with the broadcasts it asked for
    /// interleaved in creation order.
    async fn fill(&self, conn: ConnId, catch_up: CatchUp) {
        let CatchUp {
            app,
            user,
            after,
            limit,
            broadcasts_after,
        } = catch_up;
        let Some((messages, more)) = self.read_inbox(conn, &app, &user, after, limit).await else {
            return;
        };
        self.count_fill(&app, &messages);
        if let Some(broadcast_after) = broadcasts_after {
            let broadcasts = self
                .broadcasts
                .read(std::iter::once((&app, broadcast_after)))
                .await
                .remove(&*app)
                .unwrap_or_default()
                .unexpired;
            self.broadcasts
                .send_fills(Fills {
                    conn,
                    app,
                    inbox_after: after,
                    messages,
                    more,
                    broadcast_after,
                    broadcasts,
                })
                .await;
            return;
        }
        let messages = messages
            .into_iter()
            .map(|m| PushMessage {
                seq: m.seq,
                message_id: m.message_id,
                payload: m.payload,
                notice: m.notice,
            })
            .collect();
        let command = ConnCommand::Fill {
            app,
            after,
            messages,
            more,
            broadcasts_from: None,
        };
        self.router.to_conn(conn, command).await;
    }

    /// Writes pending acks. On failure they are merged back for next time.
    pub async fn flush_acks(&self) -> Result<(), StorageError> {
        let pending = std::mem::take(&mut *self.pending_acks.lock().expect("ack lock"));
        if pending.is_empty() {
            return Ok(());
        }
        let cursors: Vec<AckCursor> = pending
            .iter()
            .map(|(key, &acked_seq)| {
                let (app, user, device_id) = key.parts();
                AckCursor {
                    app,
                    user,
                    device_id,
                    acked_seq,
                }
            })
            .collect();
        match self.saver.save_acks(&cursors, unix_ms()).await {
            Ok(()) => {
                self.metrics.acks_saved.inc_by(cursors.len() as u64);
                Ok(())
            }
            Err(error) => {
                let mut current = self.pending_acks.lock().expect("ack lock");
                for (key, seq) in pending {
                    let acked = current.entry(key).or_insert(seq);
                    *acked = (*acked).max(seq);
                }
                Err(error)
            }
        }
    }

    /// Writes acks every `interval` until the process ends.
    pub async fn run_ack_flusher(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(error) = self.flush_acks().await {
                tracing::warn!(%error, "saving acks failed; will retry");
            }
        }
    }

    /// Deletes expired messages every `interval`.
    pub async fn run_purger(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            self.broadcasts.forget_expired(unix_ms());
            match self.saver.purge_expired(unix_ms()).await {
                Ok(purged) if purged > 0 => tracing::info!(purged, "purged expired messages"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "purging expired messages failed"),
            }
        }
    }

    /// Graceful stop:
    /// 1. mark draining, so /readyz answers 503 and load balancers move away,
    ///    and a room node's liveness record says so (the dispatcher stops
    ///    naming it);
    /// 2. tell every shard to drain: clients get GOAWAY(server_shutdown),
    ///    spread evenly over `spread`, each with a reconnect hint jittered
    ///    around `reconnect_delay_ms`, and each shard reports `Drained` when
    ///    it is empty;
    /// 3. wait for that (bounded by `spread + timeout`: a shard that cannot
    ///    flush its clients in time must not hold the process);
    /// 4. write the acks that arrived meanwhile.
    ///
    /// The caller closes storage afterwards.
    pub async fn drain(&self, reconnect_delay_ms: u32, spread: Duration, timeout: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_begun.notify_one();
        for shard in self.router.shards() {
            let _ = shard
                .send(ShardCommand::Drain {
                    reconnect_delay_ms,
                    spread,
                })
                .await;
        }
        let all = self.router.shards().len() as u64;
        let wait = async {
            loop {
                let notified = self.drained.notified();
                if self.drained_shards.load(Ordering::SeqCst) >= all {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(spread + timeout, wait).await.is_err() {
            tracing::warn!("shards did not drain in time; closing anyway");
        }
        if let Err(error) = self.flush_acks().await {
            tracing::warn!(%error, "saving the last acks failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_keys_split_back_into_their_parts() {
        for (app, user, device) in [
            ("chat", "alice", "phone"),
            ("a", "", ""),
            ("x", "u\0v", "d\u{e9}vice"),
        ] {
            assert_eq!(AckKey::new(app, user, device).parts(), (app, user, device));
        }
        // Where one part ends and the next begins is part of the key.
        assert_ne!(AckKey::new("ab", "c", "d"), AckKey::new("a", "bc", "d"));
        let longest = "u".repeat(herald_proto::limits::USER_ID_LEN_MAX);
        assert_eq!(AckKey::new("a", &longest, "d").parts().1, longest);
    }
}
