//! Cluster mode on Redis: the register every node shares, each room node's
//! liveness record, and the channel that carries deliveries to a room node.
//!
//! Keys (every key of one user shares the hash tag `{app:user}`, so Redis
//! Cluster keeps them on one slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `herald:{app:user}:sessions` | hash | field `instance\|conn\|node`, value `network\|connected_at_ms\|device` |
//! | `herald:node:<node>` | string, TTL [`LIVENESS_TTL`] | the node's [`NodeRecord`] (JSON) |
//! | `herald:nodes` | sorted set | node ids by last heartbeat (ms) |
//! | channel `herald:deliver:<node>:<instance>` | pub/sub | [`NodeMessage`]s (JSON) |
//!
//! A session counts only while its node's liveness record names the same
//! instance: entries of a node that died or restarted are ignored, and
//! removed by whoever reads them. A room node re-registers every session it
//! holds whenever it finds its record gone (Redis restarted, or the node was
//! cut off past the TTL), and asks its connections to re-check storage,
//! since deliveries in that gap found nobody.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::{StreamExt as _, TryStreamExt as _};
use redis::AsyncCommands as _;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use serde::{Deserialize, Serialize};

use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::{BroadcastMode, ConnId, PushMessage};
use herald_proto::{GoAwayReason, MessageId, NetworkType};
use herald_storage::StoredBroadcast;

use crate::broadcast::{PaceShares, ProgressDelta, ProgressReport};
use crate::delivery::{Delivery, Remote, unix_ms};
use crate::register::{Change, MemoryRegister, Register, RegisterError, Session};

/// How long a room node's liveness record lives without a heartbeat: how
/// long a node that died may still be offered by the dispatcher and looked
/// up for deliveries (which then wait in storage).
pub const LIVENESS_TTL: Duration = Duration::from_secs(5);

/// How often a room node renews its record (several times per TTL, so one
/// slow round trip does not make a live node look dead).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How soon a failed heartbeat is tried again. While Redis does not answer
/// a room node asks it this often, so that once Redis is back (perhaps
/// empty) the node's sessions are written again within about this long.
pub const HEARTBEAT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// How long a node's view of the live nodes is reused before it is read
/// again. An entry naming a node or instance the view does not know makes
/// it read again at once, so a node that just started is never ignored.
const DIRECTORY_MAX_AGE: Duration = Duration::from_secs(1);

/// Commands per pipeline: a reconnect storm of 20,000 binds is 20 round
/// trips, and one pipeline's reply stays a few hundred KiB.
const PIPELINE_COMMANDS_MAX: usize = 1_000;

/// How long a user's sessions key outlives its last write. A room node
/// writes all its sessions again every [`SESSIONS_REWRITE_INTERVAL`], so a
/// live session never expires, and entries of nodes that died without
/// anyone reading them are gone within this time.
const SESSIONS_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
const SESSIONS_REWRITE_INTERVAL: Duration = Duration::from_secs(12 * 3600);

/// Register changes a room node keeps while Redis does not take them. A
/// longer outage ends in writing every session again instead.
const UNWRITTEN_CHANGES_MAX: usize = 100_000;

/// Per-key pipelines in flight at once on a Redis Cluster: they share each
/// node's connection, so a storm's writes overlap instead of queueing
/// behind one another's round trips.
const CLUSTER_PIPELINES_IN_FLIGHT_MAX: usize = 256;

/// Redis calls fail after this long rather than hold an API call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait between two tries to subscribe again: the pace of the
/// heartbeat's retries, so deliveries reach the node again about when its
/// sessions are back in Redis.
const RESUBSCRIBE_DELAY_MAX: Duration = HEARTBEAT_RETRY_INTERVAL;

/// Node records share a hash tag, so the directory's reads (ZRANGE, MGET)
/// and the heartbeat's writes stay on one Redis Cluster slot.
const NODES_KEY: &str = "herald:{nodes}:live";

fn sessions_key(app: &str, user: &str) -> String {
    format!("herald:{{{app}:{user}}}:sessions")
}

fn node_key(node: &str) -> String {
    format!("herald:{{nodes}}:node:{node}")
}

/// The channel every room node listens on for broadcasts: one publish
/// reaches them all.
pub const BROADCAST_CHANNEL: &str = "herald:broadcasts";

/// The channel a room node's run listens on.
pub fn delivery_channel(node: &str, instance: u64) -> String {
    format!("herald:deliver:{node}:{instance}")
}

/// A broadcast's cluster-wide counts: a hash the room nodes add to.
fn progress_key(app: &str, seq: u64) -> String {
    format!("herald:{{{app}}}:broadcast:{seq}")
}

/// Adds each room node's new counts to the cluster-wide ones, one
/// pipeline; the keys expire with their broadcasts.
async fn report_progress(
    redis: &RedisConn,
    deltas: Vec<ProgressDelta>,
) -> Result<(), RegisterError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut redis = redis.clone();
    for delta in deltas {
        let key = progress_key(&delta.app, delta.seq);
        let mut pipe = redis::pipe();
        for (field, added) in ["target", "sent", "dropped", "acked"]
            .iter()
            .zip(delta.added)
        {
            if added > 0 {
                pipe.hincr(&key, *field, added).ignore();
            }
        }
        pipe.cmd("PEXPIREAT")
            .arg(&key)
            .arg(delta.expires_at_ms)
            .ignore();
        pipe.query_async::<()>(&mut redis)
            .await
            .map_err(redis_error)?;
    }
    Ok(())
}

fn session_field(node: &str, instance: u64, conn: ConnId) -> String {
    format!("{instance}|{conn}|{node}")
}

fn session_value(session: &Session) -> String {
    format!(
        "{}|{}|{}",
        session.network as u8, session.connected_at_ms, session.device_id
    )
}

/// Reads back a sessions-hash entry; `None` for one this code did not write.
fn parse_session(field: &str, value: &str) -> Option<Session> {
    let mut field = field.splitn(3, '|');
    let instance = field.next()?.parse().ok()?;
    let mut conn = field.next()?.split('.');
    let conn = ConnId {
        shard: conn.next()?.parse().ok()?,
        slot: conn.next()?.parse().ok()?,
        generation: conn.next()?.parse().ok()?,
    };
    let node = field.next()?.to_owned();
    let mut value = value.splitn(3, '|');
    let network = NetworkType::from_u8(value.next()?.parse().ok()?);
    let connected_at_ms = value.next()?.parse().ok()?;
    let device_id = value.next()?.to_owned();
    Some(Session {
        conn,
        node,
        instance,
        device_id,
        network,
        connected_at_ms,
    })
}

/// Where Redis is: one server (or a proxy in front of many), or the seed
/// nodes of a Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Clients to subscribe through, in the order to try them. Redis
    /// Cluster carries a PUBLISH to every node, so any node will do.
    fn subscription_clients(&self) -> Result<Vec<redis::Client>, RegisterError> {
        let urls = match self {
            RedisTarget::Single(url) => std::slice::from_ref(url),
            RedisTarget::Cluster(urls) => urls.as_slice(),
        };
        urls.iter()
            .map(|url| redis::Client::open(url.as_str()).map_err(redis_error))
            .collect()
    }
}

/// A connection to Redis that reconnects by itself: to one server, or to a
/// Redis Cluster (commands are routed by key; every command Herald sends
/// touches keys of one slot).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Connects to Redis with bounded timeouts.
///
/// Calls made while a connection is re-established wait for that attempt,
/// so it tries once per failed call rather than retrying with backoff:
/// while Redis is down an API call answers within `REDIS_TIMEOUT` instead
/// of seconds later.
pub async fn connect(target: &RedisTarget) -> Result<RedisConn, RegisterError> {
    match target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str()).map_err(redis_error)?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_number_of_retries(0);
            let conn = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(redis_error)?;
            Ok(RedisConn::Single(conn))
        }
        RedisTarget::Cluster(seeds) => {
            let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(REDIS_TIMEOUT)
                .response_timeout(REDIS_TIMEOUT)
                .retries(1)
                .build()
                .map_err(redis_error)?;
            let conn = client.get_async_connection().await.map_err(redis_error)?;
            Ok(RedisConn::Cluster(conn))
        }
    }
}

fn redis_error(error: redis::RedisError) -> RegisterError {
    RegisterError(format!("redis: {error}"))
}

/// What a room node publishes about itself every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub instance: u64,
    /// The plain TCP address clients connect to (empty without one).
    pub gateway: String,
    /// Every transport's address, by transport name (`tcp`, `tls`, `ws`,
    /// `wss`), as clients name it: `host:port` for tcp, a URL for the
    /// others. Absent in records of nodes from before transports.
    #[serde(default)]
    pub gateways: BTreeMap<String, String>,
    pub region: String,
    pub connections: u64,
    /// The node's CPU use since its last heartbeat, in percent of one core.
    pub cpu_percent: f64,
    pub heartbeat_at_ms: u64,
}

/// Live room nodes by id.
pub type LiveNodes = Arc<HashMap<String, NodeRecord>>;

/// The room nodes that are alive, as this node last read them.
pub struct NodeDirectory {
    source: DirectorySource,
    /// When the view was read, and the view.
    cached: Mutex<Option<(Instant, LiveNodes)>>,
}

enum DirectorySource {
    /// One process holds the only gateway (`herald serve`).
    Fixed(LiveNodes),
    Redis(RedisConn),
}

impl NodeDirectory {
    pub fn fixed(record: NodeRecord) -> NodeDirectory {
        let nodes = HashMap::from([(record.node.clone(), record)]);
        NodeDirectory {
            source: DirectorySource::Fixed(Arc::new(nodes)),
            cached: Mutex::new(None),
        }
    }

    pub fn redis(redis: RedisConn) -> NodeDirectory {
        NodeDirectory {
            source: DirectorySource::Redis(redis),
            cached: Mutex::new(None),
        }
    }

    /// The live nodes by id, read again when older than `DIRECTORY_MAX_AGE`.
    pub async fn live(&self) -> Result<LiveNodes, RegisterError> {
        if let Some((read_at, nodes)) = &*self.cached.lock().expect("directory lock")
            && read_at.elapsed() < DIRECTORY_MAX_AGE
        {
            return Ok(nodes.clone());
        }
        self.read().await
    }

    /// The live nodes by id, read now.
    async fn read(&self) -> Result<LiveNodes, RegisterError> {
        let mut redis = match &self.source {
            DirectorySource::Fixed(nodes) => return Ok(nodes.clone()),
            DirectorySource::Redis(redis) => redis.clone(),
        };
        let ids: Vec<String> = redis.zrange(NODES_KEY, 0, -1).await.map_err(redis_error)?;
        let mut nodes = HashMap::with_capacity(ids.len());
        if !ids.is_empty() {
            let keys: Vec<String> = ids.iter().map(|id| node_key(id)).collect();
            let records: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut redis)
                .await
                .map_err(redis_error)?;
            let mut dead = Vec::new();
            for (id, record) in ids.into_iter().zip(records) {
                match record.map(|json| serde_json::from_str::<NodeRecord>(&json)) {
                    Some(Ok(record)) => {
                        nodes.insert(id, record);
                    }
                    Some(Err(error)) => {
                        tracing::warn!(node.id = %id, %error, "unreadable liveness record");
                    }
                    None => dead.push(id),
                }
            }
            if !dead.is_empty() {
                // Only forgets the id; a node that comes back adds it again.
                let _: Result<usize, _> = redis.zrem(NODES_KEY, &dead).await;
            }
        }
        let nodes = Arc::new(nodes);
        *self.cached.lock().expect("directory lock") = Some((Instant::now(), nodes.clone()));
        Ok(nodes)
    }

    /// The live nodes, read again at once when the cached view does not
    /// know every (node, instance) in `sessions`: a node that just started
    /// (or restarted) is then seen, and its previous run is seen dead.
    async fn live_for(&self, sessions: &[Option<Session>]) -> Result<LiveNodes, RegisterError> {
        let nodes = self.live().await?;
        let all_known = sessions
            .iter()
            .flatten()
            .all(|session| is_alive(&nodes, session));
        if all_known {
            return Ok(nodes);
        }
        self.read().await
    }
}

fn is_alive(nodes: &HashMap<String, NodeRecord>, session: &Session) -> bool {
    nodes
        .get(&session.node)
        .is_some_and(|record| record.instance == session.instance)
}

/// The register on Redis. A room node's register also keeps its own
/// sessions in memory, to write them again if Redis loses them.
pub struct RedisRegister {
    redis: RedisConn,
    directory: Arc<NodeDirectory>,
    /// Set on room nodes: who this node is, and its own sessions.
    own: Option<OwnSessions>,
}

struct OwnSessions {
    node: String,
    instance: u64,
    sessions: MemoryRegister,
    /// Changes Redis did not take, in order: written before the next ones.
    unwritten: Mutex<Vec<Change>>,
    /// Sessions were written late: pushes in between found nobody, so the
    /// bindings must re-check storage.
    resync_needed: AtomicBool,
    /// More changes failed than are kept: only writing every session again
    /// restores the register.
    rewrite_needed: AtomicBool,
}

impl RedisRegister {
    /// The register as a control node uses it: it only reads.
    pub fn reader(redis: RedisConn, directory: Arc<NodeDirectory>) -> RedisRegister {
        RedisRegister {
            redis,
            directory,
            own: None,
        }
    }

    /// The register as room node `node` (run `instance`) writes it.
    pub fn writer(
        redis: RedisConn,
        directory: Arc<NodeDirectory>,
        node: String,
        instance: u64,
    ) -> RedisRegister {
        RedisRegister {
            redis,
            directory,
            own: Some(OwnSessions {
                node,
                instance,
                sessions: MemoryRegister::default(),
                unwritten: Mutex::default(),
                resync_needed: AtomicBool::new(false),
                rewrite_needed: AtomicBool::new(false),
            }),
        }
    }

    /// This node's own sessions (room nodes), as (app, user, session).
    pub fn own_sessions(&self) -> Vec<(AppId, UserId, Session)> {
        self.own
            .as_ref()
            .map_or_else(Vec::new, |own| own.sessions.all())
    }

    /// Whether changes wait to be written (Redis failed to take them).
    fn has_unwritten(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|own| !own.unwritten.lock().expect("register lock").is_empty())
    }

    /// Takes the flag that says every session must be written again.
    fn take_rewrite_needed(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|own| own.rewrite_needed.swap(false, Ordering::Relaxed))
    }

    fn flag_rewrite(&self) {
        if let Some(own) = &self.own {
            own.rewrite_needed.store(true, Ordering::Relaxed);
        }
    }

    /// Takes the flag that says bindings must re-check storage.
    fn take_resync_needed(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|own| own.resync_needed.swap(false, Ordering::Relaxed))
    }

    /// Writes every session this node holds again, in pipelined batches.
    /// Returns how many.
    pub async fn rewrite_own(&self) -> Result<usize, RegisterError> {
        let sessions = self.own_sessions();
        let changes: Vec<Change> = sessions
            .iter()
            .map(|(app, user, session)| Change::Add {
                app: app.clone(),
                user: user.clone(),
                session: session.clone(),
            })
            .collect();
        self.write(&changes).await?;
        Ok(sessions.len())
    }

    async fn write(&self, changes: &[Change]) -> Result<(), RegisterError> {
        let own = self
            .own
            .as_ref()
            .ok_or_else(|| RegisterError("a control node does not register sessions".into()))?;
        match &self.redis {
            RedisConn::Single(_) => {
                let mut redis = self.redis.clone();
                for pipe in pipelines(&own.node, own.instance, changes) {
                    pipe.query_async::<()>(&mut redis)
                        .await
                        .map_err(redis_error)?;
                }
            }
            // A Redis Cluster takes no pipeline across slots: one per key,
            // many in flight at once over each node's connection.
            RedisConn::Cluster(_) => {
                futures_util::stream::iter(pipelines_per_key(&own.node, own.instance, changes))
                    .map(|pipe| {
                        let mut redis = self.redis.clone();
                        async move { pipe.query_async::<()>(&mut redis).await }
                    })
                    .buffer_unordered(CLUSTER_PIPELINES_IN_FLIGHT_MAX)
                    .try_collect::<Vec<()>>()
                    .await
                    .map_err(redis_error)?;
            }
        }
        Ok(())
    }
}

/// `changes` as pipelines of at most [`PIPELINE_COMMANDS_MAX`] commands,
/// in order: one round trip each.
fn pipelines(node: &str, instance: u64, changes: &[Change]) -> Vec<redis::Pipeline> {
    // An Add is two commands (HSET, EXPIRE).
    changes
        .chunks(PIPELINE_COMMANDS_MAX / 2)
        .map(|batch| {
            let mut pipe = redis::pipe();
            for change in batch {
                add_commands(&mut pipe, node, instance, change);
            }
            pipe
        })
        .collect()
}

/// `changes` as one pipeline per sessions key, each in order (keys are
/// independent, so their order between keys does not matter).
fn pipelines_per_key(node: &str, instance: u64, changes: &[Change]) -> Vec<redis::Pipeline> {
    let mut by_key: HashMap<(&str, &str), usize> = HashMap::new();
    let mut pipes: Vec<redis::Pipeline> = Vec::new();
    for change in changes {
        let (Change::Add { app, user, .. } | Change::Remove { app, user, .. }) = change;
        let index = *by_key.entry((&**app, &**user)).or_insert_with(|| {
            pipes.push(redis::pipe());
            pipes.len() - 1
        });
        add_commands(&mut pipes[index], node, instance, change);
    }
    pipes
}

fn add_commands(pipe: &mut redis::Pipeline, node: &str, instance: u64, change: &Change) {
    match change {
        Change::Add { app, user, session } => {
            let key = sessions_key(app, user);
            let field = session_field(node, instance, session.conn);
            pipe.hset(&key, field, session_value(session)).ignore();
            pipe.expire(&key, SESSIONS_KEY_TTL.as_secs() as i64)
                .ignore();
        }
        Change::Remove { app, user, conn } => {
            let field = session_field(node, instance, *conn);
            pipe.hdel(sessions_key(app, user), field).ignore();
        }
    }
}

#[async_trait::async_trait]
impl Register for RedisRegister {
    /// Changes Redis fails to take are kept (up to `UNWRITTEN_CHANGES_MAX`)
    /// and written first next time, in order, so a failed Remove cannot
    /// leave a dead session behind; the heartbeat retries them too.
    async fn apply(&self, changes: Vec<Change>) -> Result<(), RegisterError> {
        let Some(own) = &self.own else {
            return self.write(&changes).await;
        };
        own.sessions.apply(changes.clone()).await?;
        let mut batch = std::mem::take(&mut *own.unwritten.lock().expect("register lock"));
        let late = !batch.is_empty();
        batch.extend(changes);
        match self.write(&batch).await {
            Ok(()) => {
                if late {
                    own.resync_needed.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(error) => {
                if batch.len() > UNWRITTEN_CHANGES_MAX {
                    own.rewrite_needed.store(true, Ordering::Relaxed);
                } else {
                    *own.unwritten.lock().expect("register lock") = batch;
                }
                Err(error)
            }
        }
    }

    async fn sessions(&self, app: &str, user: &str) -> Result<Vec<Session>, RegisterError> {
        let key = sessions_key(app, user);
        let mut redis = self.redis.clone();
        let entries: HashMap<String, String> = redis.hgetall(&key).await.map_err(redis_error)?;
        let parsed: Vec<(String, Option<Session>)> = entries
            .into_iter()
            .map(|(field, value)| {
                let session = parse_session(&field, &value);
                (field, session)
            })
            .collect();
        let sessions: Vec<Option<Session>> = parsed.iter().map(|(_, s)| s.clone()).collect();
        let nodes = self.directory.live_for(&sessions).await?;
        let mut live = Vec::with_capacity(parsed.len());
        let mut stale = Vec::new();
        for (field, session) in parsed {
            match session {
                Some(session) if is_alive(&nodes, &session) => live.push(session),
                _ => stale.push(field),
            }
        }
        if !stale.is_empty() {
            tracing::debug!(
                app.id = app,
                stale = stale.len(),
                "removing sessions of dead nodes"
            );
            let _: Result<usize, _> = redis.hdel(&key, &stale).await;
        }
        Ok(live)
    }
}

/// What one node tells another over its delivery channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeMessage {
    /// One stored message for connections of this node: the payload once,
    /// with each connection's sequence.
    Deliver {
        app: String,
        message_id: String,
        /// Base64.
        payload: String,
        /// (shard, slot, generation, seq).
        targets: Vec<(u16, u32, u32, u64)>,
    },
    /// A stored broadcast for every room node's connections.
    Broadcast {
        app: String,
        seq: u64,
        broadcast_id: String,
        /// Base64.
        payload: String,
        required_tags: Vec<String>,
        created_at_ms: u64,
        expires_at_ms: u64,
        /// Connections a second in the whole system, if paced; each room
        /// node takes its part of `pace_shares`.
        rate_per_sec: Option<f64>,
        #[serde(default)]
        pace_shares: PaceShares,
        #[serde(default)]
        low_priority: bool,
    },
    Kick {
        reason: u16,
        /// (shard, slot, generation).
        conns: Vec<(u16, u32, u32)>,
    },
}

impl NodeMessage {
    pub fn deliver(
        app: &str,
        message_id: MessageId,
        payload: &[u8],
        targets: &[(ConnId, u64)],
    ) -> NodeMessage {
        NodeMessage::Deliver {
            app: app.to_owned(),
            message_id: message_id.to_string(),
            payload: BASE64.encode(payload),
            targets: targets
                .iter()
                .map(|(conn, seq)| (conn.shard, conn.slot, conn.generation, *seq))
                .collect(),
        }
    }

    pub fn broadcast(
        app: &str,
        stored: &StoredBroadcast,
        mode: BroadcastMode,
        shares: &PaceShares,
    ) -> NodeMessage {
        NodeMessage::Broadcast {
            app: app.to_owned(),
            seq: stored.seq,
            broadcast_id: stored.broadcast_id.to_string(),
            payload: BASE64.encode(&stored.payload),
            required_tags: stored.required_tags.clone(),
            created_at_ms: stored.created_at_ms,
            expires_at_ms: stored.expires_at_ms,
            rate_per_sec: mode.rate_per_sec,
            pace_shares: shares.clone(),
            low_priority: mode.low_priority,
        }
    }

    pub fn kick(reason: GoAwayReason, conns: &[ConnId]) -> NodeMessage {
        NodeMessage::Kick {
            reason: reason.0,
            conns: conns
                .iter()
                .map(|conn| (conn.shard, conn.slot, conn.generation))
                .collect(),
        }
    }
}

/// What a room node does with one [`NodeMessage`] for its shards.
pub enum Arrival {
    Broadcast {
        app: String,
        stored: StoredBroadcast,
        /// The whole system's pace; this node takes its share.
        mode: BroadcastMode,
        shares: PaceShares,
    },
    Deliver {
        app: AppId,
        targets: Vec<(ConnId, PushMessage)>,
    },
    Kick {
        reason: GoAwayReason,
        conns: Vec<ConnId>,
    },
}

impl TryFrom<NodeMessage> for Arrival {
    type Error = String;

    fn try_from(message: NodeMessage) -> Result<Arrival, String> {
        let conn = |(shard, slot, generation)| ConnId {
            shard,
            slot,
            generation,
        };
        Ok(match message {
            NodeMessage::Deliver {
                app,
                message_id,
                payload,
                targets,
            } => {
                let message_id: MessageId = message_id
                    .parse()
                    .map_err(|error| format!("bad message id: {error}"))?;
                let payload = bytes::Bytes::from(
                    BASE64
                        .decode(payload)
                        .map_err(|error| format!("bad payload: {error}"))?,
                );
                let targets = targets
                    .into_iter()
                    .map(|(shard, slot, generation, seq)| {
                        let message = PushMessage {
                            seq,
                            message_id,
                            payload: payload.clone(),
                        };
                        (conn((shard, slot, generation)), message)
                    })
                    .collect();
                Arrival::Deliver {
                    app: AppId::from(app),
                    targets,
                }
            }
            NodeMessage::Broadcast {
                app,
                seq,
                broadcast_id,
                payload,
                required_tags,
                created_at_ms,
                expires_at_ms,
                rate_per_sec,
                pace_shares,
                low_priority,
            } => Arrival::Broadcast {
                app,
                shares: pace_shares,
                mode: BroadcastMode {
                    rate_per_sec,
                    low_priority,
                },
                stored: StoredBroadcast {
                    seq,
                    broadcast_id: broadcast_id
                        .parse()
                        .map_err(|error| format!("bad broadcast id: {error}"))?,
                    payload: bytes::Bytes::from(
                        BASE64
                            .decode(payload)
                            .map_err(|error| format!("bad payload: {error}"))?,
                    ),
                    required_tags,
                    created_at_ms,
                    expires_at_ms,
                },
            },
            NodeMessage::Kick { reason, conns } => Arrival::Kick {
                reason: GoAwayReason(reason),
                conns: conns.into_iter().map(conn).collect(),
            },
        })
    }
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
        let json = serde_json::to_string(&message).expect("node messages serialize");
        let channel = delivery_channel(node, instance);
        let mut redis = self.redis.clone();
        // A message lost here is stored already: the connection gets it on
        // its next catch-up, resync or reconnect (ARCHITECTURE.md).
        if let Err(error) = redis.publish::<_, _, ()>(&channel, json).await {
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
        let count = |field: &str| counts.get(field).copied().unwrap_or(0);
        Some(ProgressReport {
            target: count("target"),
            sent: count("sent"),
            dropped: count("dropped"),
            acked: count("acked"),
        })
    }

    async fn broadcast(&self, message: NodeMessage) {
        let json = serde_json::to_string(&message).expect("node messages serialize");
        let mut redis = self.redis.clone();
        // Lost in transit, it is stored: clients get it when they bind again.
        if let Err(error) = redis.publish::<_, _, ()>(BROADCAST_CHANNEL, json).await {
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

/// The node's load, read at each heartbeat.
pub type LoadProbe = Box<dyn Fn() -> (u64, f64) + Send + Sync>;

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
        let record = self.record(load);
        match self.write_record(&record).await {
            Err(_) => self.write_record(&record).await,
            written => written,
        }
    }

    fn record(&self, load: &LoadProbe) -> NodeRecord {
        let (connections, cpu_percent) = load();
        NodeRecord {
            node: self.node.clone(),
            instance: self.instance,
            gateway: self.gateways.get("tcp").cloned().unwrap_or_default(),
            gateways: self.gateways.clone(),
            region: self.region.clone(),
            connections,
            cpu_percent,
            heartbeat_at_ms: unix_ms(),
        }
    }

    async fn write_record(&self, record: &NodeRecord) -> Result<bool, RegisterError> {
        let json = serde_json::to_string(record).expect("records serialize");
        let mut redis = self.redis.clone();
        let (previous, ()): (Option<String>, ()) = redis::pipe()
            .cmd("SET")
            .arg(node_key(&self.node))
            .arg(json)
            .arg("PX")
            .arg(LIVENESS_TTL.as_millis() as u64)
            .arg("GET")
            .zadd(NODES_KEY, &self.node, record.heartbeat_at_ms)
            .ignore()
            .query_async::<(Option<String>,)>(&mut redis)
            .await
            .map(|(previous,)| (previous, ()))
            .map_err(redis_error)?;
        let ours = previous
            .and_then(|json| serde_json::from_str::<NodeRecord>(&json).ok())
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
        let mut redis = self.redis.clone();
        let left: Result<(), _> = redis::pipe()
            .del(node_key(&self.node))
            .ignore()
            .zrem(NODES_KEY, &self.node)
            .ignore()
            .query_async(&mut redis)
            .await;
        if let Err(error) = left {
            tracing::warn!(%error, "removing the liveness record failed");
        }
    }

    /// Heartbeats until the process ends. Whenever the record was lost, or
    /// every `SESSIONS_REWRITE_INTERVAL`, it writes every session again;
    /// after a loss it also has every binding re-check storage, since pushes
    /// in the gap found no session.
    pub async fn run_heartbeat(self: Arc<Self>, delivery: Arc<Delivery>, load: LoadProbe) {
        let mut rewritten_at = Instant::now();
        // When the heartbeats started failing; the warning is said once.
        let mut failing_since: Option<Instant> = None;
        loop {
            let pause = match failing_since {
                Some(_) => HEARTBEAT_RETRY_INTERVAL,
                None => HEARTBEAT_INTERVAL,
            };
            tokio::time::sleep(pause).await;
            let lost = match self.heartbeat(&load).await {
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
            if let Err(error) = report_progress(&self.redis, delivery.broadcast_deltas()).await {
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
        let mut delay = Duration::from_millis(50);
        for client in clients.iter().cycle() {
            let mut pubsub = match client.get_async_pubsub().await {
                Ok(pubsub) => pubsub,
                Err(error) => {
                    tracing::warn!(%error, "cannot connect to Redis for deliveries");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RESUBSCRIBE_DELAY_MAX);
                    continue;
                }
            };
            if let Err(error) = pubsub
                .subscribe(&[channel.as_str(), BROADCAST_CHANNEL])
                .await
            {
                tracing::warn!(%error, "cannot subscribe to deliveries");
                tokio::time::sleep(delay).await;
                continue;
            }
            delay = Duration::from_millis(50);
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
                let arrival = serde_json::from_slice::<NodeMessage>(message.get_payload_bytes())
                    .map_err(|error| error.to_string())
                    .and_then(Arrival::try_from);
                match arrival {
                    Ok(arrival) => delivery.arrive(arrival).await,
                    Err(error) => tracing::warn!(%error, "unreadable node message dropped"),
                }
            }
            tracing::warn!("lost the delivery subscription; subscribing again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_reads_back_as_written() {
        let session = Session {
            conn: ConnId {
                shard: 3,
                slot: 70_000,
                generation: 9,
            },
            node: "room-2".to_owned(),
            instance: 1_764_000_000_123,
            device_id: "phone|with|bars".to_owned(),
            network: NetworkType::Cellular,
            connected_at_ms: 42,
        };
        let field = session_field(&session.node, session.instance, session.conn);
        assert_eq!(
            parse_session(&field, &session_value(&session)),
            Some(session)
        );
        assert_eq!(parse_session("junk", "1|2|d"), None);
    }

    /// What Redis Cluster hashes to pick a key's slot: the part between the
    /// first `{` and the next `}`, when not empty, else the whole key.
    fn hash_tag(key: &str) -> &str {
        key.split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(tag, _)| tag)
            .filter(|tag| !tag.is_empty())
            .unwrap_or(key)
    }

    #[test]
    fn a_users_keys_share_one_cluster_slot() {
        let key = sessions_key("chat", "alice");
        assert_eq!(key, "herald:{chat:alice}:sessions");
        assert_eq!(hash_tag(&key), "chat:alice");
        // A user id holding braces still hashes by a prefix every key of
        // that user shares.
        assert_eq!(hash_tag(&sessions_key("chat", "a}b")), "chat:a");
        // The directory's keys share one slot: ZRANGE then MGET, and the
        // heartbeat's SET and ZADD, each touch a single slot.
        assert_eq!(hash_tag(NODES_KEY), "nodes");
        assert_eq!(hash_tag(&node_key("room-1")), "nodes");
    }

    #[test]
    fn a_reconnect_storm_is_a_few_round_trips() {
        let session = |slot| Session {
            conn: ConnId {
                shard: 0,
                slot,
                generation: 0,
            },
            node: "room-1".to_owned(),
            instance: 1,
            device_id: "phone".to_owned(),
            network: NetworkType::Wifi,
            connected_at_ms: 0,
        };
        let storm: Vec<Change> = (0..20_000)
            .map(|slot| Change::Add {
                app: AppId::from("chat"),
                user: UserId::from(format!("user{slot}")),
                session: session(slot),
            })
            .collect();
        let pipes = pipelines("room-1", 1, &storm);
        assert_eq!(pipes.len(), 40, "20,000 binds, 40 round trips");
        assert!(pipes.iter().all(|pipe| pipe.len() <= PIPELINE_COMMANDS_MAX));
    }

    #[test]
    fn node_messages_carry_the_payload_once_and_come_back_whole() {
        let conns = [
            ConnId {
                shard: 0,
                slot: 1,
                generation: 2,
            },
            ConnId {
                shard: 1,
                slot: 5,
                generation: 0,
            },
        ];
        let message = NodeMessage::deliver(
            "chat",
            MessageId([7; 16]),
            b"hello",
            &[(conns[0], 10), (conns[1], 3)],
        );
        let json = serde_json::to_string(&message).unwrap();
        assert_eq!(json.matches("aGVsbG8=").count(), 1, "{json}");
        let Ok(Arrival::Deliver { app, targets }) =
            Arrival::try_from(serde_json::from_str::<NodeMessage>(&json).unwrap())
        else {
            panic!("not a delivery");
        };
        assert_eq!(&*app, "chat");
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[1].0, conns[1]);
        assert_eq!(targets[1].1.seq, 3);
        assert_eq!(&targets[1].1.payload[..], b"hello");

        let kick = NodeMessage::kick(GoAwayReason::KICKED, &conns);
        let Ok(Arrival::Kick {
            reason,
            conns: back,
        }) = Arrival::try_from(kick)
        else {
            panic!("not a kick");
        };
        assert_eq!((reason, back), (GoAwayReason::KICKED, conns.to_vec()));
    }
}
