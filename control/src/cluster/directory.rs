//! The node directory: which room nodes are alive, from the liveness
//! record each writes every heartbeat (or one fixed record, when one
//! process is the whole system).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};

use crate::cluster::connection::RedisConn;
use crate::register::{AppOnline, RegisterError, Session};

/// How long a room node's liveness record lives without a heartbeat: how
/// long a node that died may still be offered by the dispatcher and looked
/// up for deliveries (which then wait in storage).
pub const LIVENESS_TTL: Duration = Duration::from_secs(5);

/// How long a node's view of the live nodes is reused before it is read
/// again. An entry naming a node or instance the view does not know makes
/// it read again at once, so a node that just started is never ignored.
const DIRECTORY_MAX_AGE: Duration = Duration::from_secs(1);

/// Node records share a hash tag, so the directory's reads (ZRANGE, MGET)
/// and the heartbeat's writes stay on one Redis Cluster slot.
const NODES_KEY: &str = "herald:{nodes}:live";

fn node_key(node: &str) -> String {
    format!("herald:{{nodes}}:node:{node}")
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
    /// The node's sessions per app. Absent in records of nodes from before
    /// app stats.
    #[serde(default)]
    pub apps_online: BTreeMap<String, AppOnline>,
    /// Connections open on each of the node's gateway shards. Absent in
    /// records of nodes from before per-shard counts.
    #[serde(default)]
    pub shard_connections: Vec<u64>,
    /// The node is draining: still alive for the clients it holds (they
    /// are told to leave over its drain's spread), but the dispatcher
    /// names it no more. Absent in records of nodes from before drains.
    #[serde(default)]
    pub draining: bool,
}

/// A node's load as its gateway and CPU meter tell it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLoad {
    pub connections: u64,
    /// Since the last reading, in percent of one core.
    pub cpu_percent: f64,
    /// By gateway shard.
    pub shard_connections: Vec<u64>,
}

/// Reads the node's load: at each heartbeat, and for the admin overview
/// when one process holds the only gateway.
pub type LoadProbe = Box<dyn Fn() -> NodeLoad + Send + Sync>;

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
    /// Whether room nodes report through Redis (a cluster), rather than
    /// this process holding the only gateway.
    pub fn is_shared(&self) -> bool {
        matches!(self.source, DirectorySource::Redis(_))
    }

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
        let ids: Vec<String> = redis.zrange(NODES_KEY, 0, -1).await?;
        let mut nodes = HashMap::with_capacity(ids.len());
        if !ids.is_empty() {
            let keys: Vec<String> = ids.iter().map(|id| node_key(id)).collect();
            let records: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut redis)
                .await?;
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
    pub(crate) async fn live_for(
        &self,
        sessions: &[Option<Session>],
    ) -> Result<LiveNodes, RegisterError> {
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

/// Whether `session`'s node is alive and in the run the session names.
pub(crate) fn is_alive(nodes: &HashMap<String, NodeRecord>, session: &Session) -> bool {
    nodes
        .get(&session.node)
        .is_some_and(|record| record.instance == session.instance)
}

/// Writes `record` as its node's liveness record, which lives
/// [`LIVENESS_TTL`] unless written again, and returns the record it
/// replaced (`None` if there was none, or it was unreadable).
pub(crate) async fn write_record(
    redis: &RedisConn,
    record: &NodeRecord,
) -> Result<Option<NodeRecord>, RegisterError> {
    let json = serde_json::to_string(record).expect("records serialize");
    let mut redis = redis.clone();
    let (previous,): (Option<String>,) = redis::pipe()
        .cmd("SET")
        .arg(node_key(&record.node))
        .arg(json)
        .arg("PX")
        .arg(LIVENESS_TTL.as_millis() as u64)
        .arg("GET")
        .zadd(NODES_KEY, &record.node, record.heartbeat_at_ms)
        .ignore()
        .query_async(&mut redis)
        .await?;
    Ok(previous.and_then(|json| serde_json::from_str(&json).ok()))
}

/// Removes `node`'s liveness record: the node is gone at once rather than
/// after the TTL.
pub(crate) async fn remove_record(redis: &RedisConn, node: &str) -> Result<(), RegisterError> {
    let mut redis = redis.clone();
    redis::pipe()
        .del(node_key(node))
        .ignore()
        .zrem(NODES_KEY, node)
        .ignore()
        .query_async::<()>(&mut redis)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::connection::hash_tag;

    #[test]
    fn the_directorys_keys_share_one_cluster_slot() {
        // ZRANGE then MGET, and the heartbeat's SET and ZADD, each touch a
        // single slot.
        assert_eq!(hash_tag(NODES_KEY), "nodes");
        assert_eq!(hash_tag(&node_key("room-1")), "nodes");
    }
}
