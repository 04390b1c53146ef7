//! This node's link to the others over Redis: publishing to room nodes'
//! channels ([`RedisRemote`]), and a room node's presence
//! ([`RoomLink`]): its liveness heartbeat, which also writes its sessions
//! again when Redis lost them and reports broadcast progress, and its
//! subscription, which hands what other nodes send to delivery; and on
//! every node, app changes announced and followed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use tracing::Instrument as _;

use crate::apps::Apps;
use crate::clock::unix_ms;
use crate::cluster::channel::{BROADCAST_CHANNEL, NodeMessage, delivery_channel};
use crate::cluster::connection::{RedisConn, RedisTarget};
use crate::cluster::directory::{self, LoadProbe, NodeLoad, NodeRecord};
use crate::cluster::register::{RedisRegister, SESSIONS_REWRITE_INTERVAL};
use crate::delivery::Delivery;
use crate::progress::{PROGRESS_FIELDS, ProgressDelta, ProgressReport};
use crate::register::{Register as _, RegisterError};
use crate::router::Remote;
use crate::trace::{current_request_id, request_span};

/// How often a room node renews its record (several times per TTL, so one
/// slow round trip does not make a live node look dead).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How soon a failed heartbeat is tried again. While Redis does not answer
/// a room node asks it this often, so that once Redis is back (perhaps
/// empty) the node's sessions are written again within about this long.
pub const HEARTBEAT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Longest wait between two tries to subscribe again: the pace of the
/// heartbeat's retries, so deliveries reach the node again about when its
/// sessions are back in Redis.
const RESUBSCRIBE_DELAY_MAX: Duration = HEARTBEAT_RETRY_INTERVAL;

/// A broadcast's cluster-wide counts: a hash the room nodes add to.
fn progress_key(app: &str, seq: u64) -> String {
    format!("herald:{{{app}}}:broadcast:{seq}")
}

/// Adds each room node's new counts to the cluster-wide ones, one
/// pipeline; the keys expire with their broadcasts.
async fn report_progress(
    redis: &RedisConn,
    deltas: Vec<ProgressDelta>,
) -> Result<(), redis::RedisError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut redis = redis.clone();
    for delta in deltas {
        let key = progress_key(&delta.app, delta.seq);
        let mut pipe = redis::pipe();
        for (field, added) in PROGRESS_FIELDS.into_iter().zip(delta.added) {
            if added > 0 {
                pipe.hincr(&key, field, added).ignore();
            }
        }
        pipe.cmd("PEXPIREAT")
            .arg(&key)
            .arg(delta.expires_at_ms)
            .ignore();
        pipe.query_async::<()>(&mut redis).await?;
    }
    Ok(())
}

/// Publishes to room nodes' channels: fire and forget, as Redis pub/sub is.
pub struct RedisRemote {
    redis: RedisConn,
}

impl RedisRemote {
    pub fn new(redis: RedisConn) -> RedisRemote {
        RedisRemote { redis }
    }
}

#[async_trait::async_trait]
impl Remote for RedisRemote {
    async fn send(&self, node: &str, instance: u64, message: NodeMessage) {
        let channel = delivery_channel(node, instance);
        let mut redis = self.redis.clone();
        // A message lost here is stored already: the connection gets it on
        // its next catch-up, resync or reconnect (ARCHITECTURE.md).
        let request_id = current_request_id();
        let bytes = message.encode_traced(request_id.as_deref());
        if let Err(error) = redis.publish::<_, _, ()>(&channel, bytes).await {
            tracing::warn!(%error, node.id = node, "publishing a delivery failed");
        }
    }

    async fn broadcast_progress(&self, app: &str, seq: u64) -> Option<ProgressReport> {
        let mut redis = self.redis.clone();
        let counts: HashMap<String, u64> = redis
            .hgetall(progress_key(app, seq))
            .await
            .inspect_err(|error| tracing::warn!(%error, "reading broadcast progress failed"))
            .ok()?;
        Some(ProgressReport::from_counts(
            PROGRESS_FIELDS.map(|field| counts.get(field).copied().unwrap_or(0)),
        ))
    }

    async fn broadcast(&self, message: NodeMessage) {
        let mut redis = self.redis.clone();
        // Lost in transit, it is stored: clients get it when they bind again.
        let request_id = current_request_id();
        let bytes = message.encode_traced(request_id.as_deref());
        if let Err(error) = redis.publish::<_, _, ()>(BROADCAST_CHANNEL, bytes).await {
            tracing::warn!(%error, "publishing a broadcast failed");
        }
    }
}

/// One room node's presence in the cluster: its liveness heartbeat and its
/// delivery channel.
pub struct RoomLink {
    /// Where Redis is (the subscription has its own connection).
    pub target: RedisTarget,
    pub redis: RedisConn,
    pub register: Arc<RedisRegister>,
    pub node: String,
    pub instance: u64,
    /// Every transport's client address (see `NodeRecord::gateways`).
    pub gateways: BTreeMap<String, String>,
    pub region: String,
}

impl RoomLink {
    /// Writes the liveness record once; returns whether Redis had lost the
    /// previous one (always so on the first beat of a run).
    ///
    /// A failed write is tried again at once: a connection to one Redis
    /// server that could not be made again answers the next call with that
    /// old attempt's error (say, connection refused while Redis was down)
    /// and only then connects anew, so it is the second call that finds
    /// out whether Redis answers now.
    pub async fn heartbeat(&self, load: &LoadProbe) -> Result<bool, RegisterError> {
        self.beat(load, false).await
    }

    /// `heartbeat`, saying whether the node is draining.
    async fn beat(&self, load: &LoadProbe, draining: bool) -> Result<bool, RegisterError> {
        let record = self.record(load, draining);
        match self.write_record(&record).await {
            Err(_) => self.write_record(&record).await,
            written => written,
        }
    }

    fn record(&self, load: &LoadProbe, draining: bool) -> NodeRecord {
        let NodeLoad {
            connections,
            cpu_percent,
            shard_connections,
        } = load();
        NodeRecord {
            node: self.node.clone(),
            instance: self.instance,
            gateway: self.gateways.get("tcp").cloned().unwrap_or_default(),
            gateways: self.gateways.clone(),
            region: self.region.clone(),
            connections,
            cpu_percent,
            heartbeat_at_ms: unix_ms(),
            apps_online: self.register.online(),
            shard_connections,
            draining,
        }
    }

    async fn write_record(&self, record: &NodeRecord) -> Result<bool, RegisterError> {
        let ours = directory::write_record(&self.redis, record)
            .await?
            .is_some_and(|previous| {
                if previous.instance != self.instance {
                    tracing::warn!(
                        node.id = %self.node,
                        "another run of this node id wrote its liveness record: \
                         two processes may share one node_id"
                    );
                }
                previous.instance == self.instance
            });
        Ok(!ours)
    }

    /// Removes the liveness record at a graceful stop, so the dispatcher
    /// stops offering this node at once rather than after the TTL.
    pub async fn leave(&self) {
        if let Err(error) = directory::remove_record(&self.redis, &self.node).await {
            tracing::warn!(%error, "removing the liveness record failed");
        }
    }

    /// Heartbeats until the process ends. Whenever the record was lost, or
    /// every `SESSIONS_REWRITE_INTERVAL`, it writes every session again;
    /// after a loss it also has every binding re-check storage, since pushes
    /// in the gap found no session. When the drain begins it beats at once,
    /// so that every dispatcher stops naming the node within its directory's
    /// refresh rather than a heartbeat later.
    pub async fn run_heartbeat(self: Arc<Self>, delivery: Arc<Delivery>, load: LoadProbe) {
        let mut rewritten_at = Instant::now();
        // When the heartbeats started failing; the warning is said once.
        let mut failing_since: Option<Instant> = None;
        loop {
            let pause = match failing_since {
                Some(_) => HEARTBEAT_RETRY_INTERVAL,
                None => HEARTBEAT_INTERVAL,
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = delivery.drain_begun() => {}
            }
            let lost = match self.beat(&load, delivery.is_draining()).await {
                Ok(lost) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(failing_for = ?since.elapsed(), "liveness heartbeat works again");
                    }
                    lost
                }
                Err(error) => {
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(
                            %error,
                            retry_every = ?HEARTBEAT_RETRY_INTERVAL,
                            "liveness heartbeat failed"
                        );
                    }
                    continue;
                }
            };
            let register = &self.register;
            let flagged = register.take_rewrite_needed();
            if lost || flagged || rewritten_at.elapsed() >= SESSIONS_REWRITE_INTERVAL {
                match register.rewrite_own().await {
                    Ok(sessions) => {
                        rewritten_at = Instant::now();
                        if lost || flagged {
                            tracing::warn!(
                                sessions,
                                "the register had lost sessions: written again"
                            );
                            delivery.resync(register.own_sessions()).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "writing sessions again failed");
                        if flagged {
                            register.flag_rewrite();
                        }
                    }
                }
            } else if register.has_unwritten()
                && let Err(error) = register.apply(Vec::new()).await
            {
                tracing::warn!(%error, "register changes still not written");
            }
            if register.take_resync_needed() {
                delivery.resync(register.own_sessions()).await;
            }
            if let Err(error) = report_progress(&self.redis, delivery.broadcasts().deltas()).await {
                tracing::warn!(%error, "reporting broadcast progress failed");
            }
        }
    }

    /// Subscribes to this run's delivery channel and hands every message to
    /// the shards, until the process ends. `subscribed` fires after the
    /// first subscription, so the gateway opens only once deliveries can
    /// reach it. After a lost subscription every binding re-checks storage.
    pub async fn run_subscriber(
        self: Arc<Self>,
        delivery: Arc<Delivery>,
        subscribed: tokio::sync::oneshot::Sender<()>,
    ) {
        let channel = delivery_channel(&self.node, self.instance);
        let clients = match self.target.subscription_clients() {
            Ok(clients) => clients,
            Err(error) => {
                tracing::error!(%error, "cannot subscribe to deliveries: bad Redis URL");
                return;
            }
        };
        let mut subscribed = Some(subscribed);
        let mut next_client = 0;
        loop {
            let channels = [channel.as_str(), BROADCAST_CHANNEL];
            let mut pubsub = subscribe(&clients, &mut next_client, &channels, "deliveries").await;
            match subscribed.take() {
                Some(first) => {
                    let _ = first.send(());
                }
                None => {
                    tracing::info!("subscribed again: bindings re-check storage");
                    delivery.resync(self.register.own_sessions()).await;
                }
            }
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                match NodeMessage::decode_traced(message.get_payload_bytes()) {
                    Ok((Some(request_id), message)) => {
                        delivery
                            .arrive(message)
                            .instrument(request_span(&request_id))
                            .await
                    }
                    Ok((None, message)) => delivery.arrive(message).await,
                    Err(error) => tracing::warn!(%error, "unreadable node message dropped"),
                }
            }
            tracing::warn!("lost the delivery subscription; subscribing again");
        }
    }
}

/// The channel on which a node that changed an app tells the others to
/// read the apps again.
pub const APPS_CHANNEL: &str = "herald:apps";

/// What [`Apps`] calls after this node changed an app: a PUBLISH on
/// [`APPS_CHANNEL`], in the background. A publish that is lost costs only
/// time: every node reads the apps again every second anyway.
pub fn announce_app_changes(redis: RedisConn) -> Box<dyn Fn() + Send + Sync> {
    Box::new(move || {
        let mut redis = redis.clone();
        tokio::spawn(async move {
            if let Err(error) = redis.publish::<_, _, ()>(APPS_CHANNEL, "changed").await {
                tracing::warn!(%error, "announcing an app change failed");
            }
        });
    })
}

/// Reads the apps again whenever another node announces a change, until
/// the process ends; subscribes again after a lost subscription.
pub async fn follow_app_changes(target: RedisTarget, apps: Arc<Apps>) {
    let clients = match target.subscription_clients() {
        Ok(clients) => clients,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to app changes: bad Redis URL");
            return;
        }
    };
    let mut next_client = 0;
    loop {
        let mut pubsub =
            subscribe(&clients, &mut next_client, &[APPS_CHANNEL], "app changes").await;
        let mut messages = pubsub.on_message();
        while messages.next().await.is_some() {
            if let Err(error) = apps.reload().await {
                tracing::warn!(%error, "reading the apps after a change failed");
            }
        }
        tracing::warn!("lost the app-change subscription; subscribing again");
    }
}

/// A subscription to `channels` through the next of `clients` (in turn,
/// from `next_client`) that takes it, waiting longer after each failure,
/// up to [`RESUBSCRIBE_DELAY_MAX`]. `what` names it in the logs.
async fn subscribe(
    clients: &[redis::Client],
    next_client: &mut usize,
    channels: &[&str],
    what: &str,
) -> redis::aio::PubSub {
    assert!(
        !clients.is_empty(),
        "a Redis target names at least one server"
    );
    let mut delay = Duration::from_millis(50);
    loop {
        let client = &clients[*next_client % clients.len()];
        *next_client += 1;
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(channels).await {
                Ok(()) => return pubsub,
                Err(error) => tracing::warn!(%error, "cannot subscribe to {what}"),
            },
            Err(error) => tracing::warn!(%error, "cannot connect to Redis for {what}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RESUBSCRIBE_DELAY_MAX);
    }
}
