//! The register on Redis: every user's sessions in one hash, written by
//! the room nodes that hold them, read by every node; an entry counts only
//! while its node's liveness record (the directory) names its run.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use redis::AsyncCommands as _;

use herald_proto::NetworkType;
use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::ConnId;

use crate::cluster::connection::RedisConn;
use crate::cluster::directory::{NodeDirectory, is_alive};
use crate::register::{
    AppOnline, Change, DeviceBinding, MemoryRegister, Register, RegisterError, Session,
    SessionTimeout,
};

/// Commands per pipeline: a reconnect storm of 20,000 binds is 20 round
/// trips, and one pipeline's reply stays a few hundred KiB.
const PIPELINE_COMMANDS_MAX: usize = 1_000;

/// How long a user's sessions key outlives its last write. A room node
/// writes all its sessions again every [`SESSIONS_REWRITE_INTERVAL`], so a
/// live session never expires, and entries of nodes that died without
/// anyone reading them are gone within this time.
const SESSIONS_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
pub const SESSIONS_REWRITE_INTERVAL: Duration = Duration::from_secs(12 * 3600);

/// Register changes a room node keeps while Redis does not take them. A
/// longer outage ends in writing every session again instead.
const UNWRITTEN_CHANGES_MAX: usize = 100_000;

/// Per-key pipelines in flight at once on a Redis Cluster: they share each
/// node's connection, so a storm's writes overlap instead of queueing
/// behind one another's round trips.
const CLUSTER_PIPELINES_IN_FLIGHT_MAX: usize = 256;

fn sessions_key(app: &str, user: &str) -> String {
    format!("herald:{{{app}:{user}}}:sessions")
}

/// Where a device's timed-out connection is remembered: beside the user's
/// sessions (one cluster slot), so one script reads both.
fn timeout_key(binding: &DeviceBinding) -> String {
    format!(
        "herald:{{{}:{}}}:timed_out:{}",
        binding.app, binding.user, binding.device_id
    )
}

fn timeout_value(timeout: &SessionTimeout) -> String {
    format!(
        "{}|{}|{}",
        timeout.network as u8, timeout.interval_ms, timeout.closed_at_ms
    )
}

/// Reads back a remembered timeout; `None` for one this code did not write.
fn parse_timeout(value: &str) -> Option<SessionTimeout> {
    let mut value = value.splitn(3, '|');
    Some(SessionTimeout {
        network: NetworkType::from_u8(value.next()?.parse().ok()?),
        interval_ms: value.next()?.parse().ok()?,
        closed_at_ms: value.next()?.parse().ok()?,
    })
}

/// Remembers a timeout (KEYS[2] = ARGV[2] for ARGV[3] ms) unless the user's
/// sessions (KEYS[1]) hold one of the device (ARGV[1]), in one step: the
/// device may be binding again on another node at the same moment.
static REMEMBER_TIMEOUT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
            if string.match(value, '^[^|]*|[^|]*|(.*)$') == ARGV[1] then
                return 0
            end
        end
        redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
        return 1
        ",
    )
});

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
    pub(crate) fn has_unwritten(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|own| !own.unwritten.lock().expect("register lock").is_empty())
    }

    /// Takes the flag that says every session must be written again.
    pub(crate) fn take_rewrite_needed(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|own| own.rewrite_needed.swap(false, Ordering::Relaxed))
    }

    pub(crate) fn flag_rewrite(&self) {
        if let Some(own) = &self.own {
            own.rewrite_needed.store(true, Ordering::Relaxed);
        }
    }

    /// Takes the flag that says bindings must re-check storage.
    pub(crate) fn take_resync_needed(&self) -> bool {
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
        let own = self.own.as_ref().ok_or(RegisterError::ReadOnly)?;
        match &self.redis {
            RedisConn::Single(_) => {
                let mut redis = self.redis.clone();
                for pipe in pipelines(&own.node, own.instance, changes) {
                    pipe.query_async::<()>(&mut redis).await?;
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
                    .await?;
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
        let entries: HashMap<String, String> = redis.hgetall(&key).await?;
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
    fn online(&self) -> BTreeMap<String, AppOnline> {
        self.own
            .as_ref()
            .map_or_else(BTreeMap::new, |own| own.sessions.online())
    }

    async fn remember_timeouts(
        &self,
        timeouts: Vec<(DeviceBinding, SessionTimeout)>,
        kept_for: Duration,
    ) -> Result<(), RegisterError> {
        let kept_ms = u64::try_from(kept_for.as_millis()).unwrap_or(u64::MAX);
        futures_util::stream::iter(timeouts)
            .map(|(binding, timeout)| {
                let mut redis = self.redis.clone();
                let mut invocation = REMEMBER_TIMEOUT.prepare_invoke();
                invocation
                    .key(sessions_key(&binding.app, &binding.user))
                    .key(timeout_key(&binding))
                    .arg(&binding.device_id)
                    .arg(timeout_value(&timeout))
                    .arg(kept_ms);
                async move { invocation.invoke_async::<i64>(&mut redis).await }
            })
            .buffer_unordered(CLUSTER_PIPELINES_IN_FLIGHT_MAX)
            .try_collect::<Vec<i64>>()
            .await?;
        Ok(())
    }

    async fn take_timeouts(
        &self,
        bindings: Vec<DeviceBinding>,
    ) -> Result<Vec<Option<SessionTimeout>>, RegisterError> {
        let values: Vec<Option<String>> = match &self.redis {
            RedisConn::Single(_) => {
                let mut redis = self.redis.clone();
                let mut values = Vec::with_capacity(bindings.len());
                for batch in bindings.chunks(PIPELINE_COMMANDS_MAX) {
                    let mut pipe = redis::pipe();
                    for binding in batch {
                        pipe.get_del(timeout_key(binding));
                    }
                    values.extend(pipe.query_async::<Vec<Option<String>>>(&mut redis).await?);
                }
                values
            }
            // One key per command, in order, many in flight at once.
            RedisConn::Cluster(_) => {
                futures_util::stream::iter(bindings)
                    .map(|binding| {
                        let mut redis = self.redis.clone();
                        async move {
                            redis
                                .get_del::<_, Option<String>>(timeout_key(&binding))
                                .await
                        }
                    })
                    .buffered(CLUSTER_PIPELINES_IN_FLIGHT_MAX)
                    .try_collect()
                    .await?
            }
        };
        Ok(values
            .iter()
            .map(|value| value.as_deref().and_then(parse_timeout))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::connection::hash_tag;

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
            network: NetworkType::Cellular4g,
            connected_at_ms: 42,
        };
        let field = session_field(&session.node, session.instance, session.conn);
        assert_eq!(
            parse_session(&field, &session_value(&session)),
            Some(session)
        );
        assert_eq!(parse_session("junk", "1|2|d"), None);
    }

    #[test]
    fn a_timeout_reads_back_as_written() {
        let timeout = SessionTimeout {
            network: NetworkType::Cellular3g,
            interval_ms: 45_000,
            closed_at_ms: 1_764_000_000_123,
        };
        assert_eq!(parse_timeout(&timeout_value(&timeout)), Some(timeout));
        assert_eq!(parse_timeout("3|x|1"), None);
    }

    #[test]
    fn a_users_keys_share_one_cluster_slot() {
        let key = sessions_key("chat", "alice");
        assert_eq!(key, "herald:{chat:alice}:sessions");
        assert_eq!(hash_tag(&key), "chat:alice");
        let binding = DeviceBinding {
            app: AppId::from("chat"),
            user: UserId::from("alice"),
            device_id: "phone".to_owned(),
        };
        assert_eq!(hash_tag(&timeout_key(&binding)), "chat:alice");
        // A user id holding braces still hashes by a prefix every key of
        // that user shares.
        assert_eq!(hash_tag(&sessions_key("chat", "a}b")), "chat:a");
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
}
