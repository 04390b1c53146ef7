//! The connection to Redis: one server (or a proxy in front of many), or a
//! Redis Cluster, reconnecting by itself, with bounded timeouts.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

/// Redis calls fail after this long rather than hold an API call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub(crate) fn subscription_clients(&self) -> Result<Vec<redis::Client>, redis::RedisError> {
        let urls = match self {
            RedisTarget::Single(url) => std::slice::from_ref(url),
            RedisTarget::Cluster(urls) => urls.as_slice(),
        };
        urls.iter()
            .map(|url| redis::Client::open(url.as_str()))
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
pub async fn connect(target: &RedisTarget) -> Result<RedisConn, redis::RedisError> {
    match target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_number_of_retries(0);
            let conn = ConnectionManager::new_with_config(client, config).await?;
            Ok(RedisConn::Single(conn))
        }
        RedisTarget::Cluster(seeds) => {
            let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(REDIS_TIMEOUT)
                .response_timeout(REDIS_TIMEOUT)
                .retries(1)
                .build()?;
            let conn = client.get_async_connection().await?;
            Ok(RedisConn::Cluster(conn))
        }
    }
}

/// What Redis Cluster hashes to pick a key's slot: the part between the
/// first `{` and the next `}`, when not empty, else the whole key.
#[cfg(test)]
pub(crate) fn hash_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key)
}
