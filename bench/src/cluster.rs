//! A Herald cluster for `push --cluster-storage URL`: one `herald control`
//! (the API the pushes go to) and `herald room` nodes (the gateways the
//! clients hold), on the local Redis and a database server, as README
//! "Running a cluster" describes.
//!
//! Every run is on its own: a new database `herald_bench_<pid>_<ms>` on
//! the server of URL (the nodes' migrations make its tables), dropped
//! afterwards; an app id and node ids of the run's own, so nothing another
//! run left in Redis is read, and the run's Redis keys (its users'
//! sessions) are deleted afterwards.

use std::path::Path;

use anyhow::Context as _;
use sqlx::Connection as _;

use crate::systems::{self, AppCreds, Server};
use crate::transport::{Pki, Transport};

/// The database engines a cluster stores in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    MySql,
    Postgres,
}

impl Engine {
    /// The engine of a database URL.
    pub fn of(url: &str) -> anyhow::Result<Engine> {
        match url.split_once("://").map(|(scheme, _)| scheme) {
            Some("mysql" | "mariadb") => Ok(Engine::MySql),
            Some("postgres" | "postgresql") => Ok(Engine::Postgres),
            _ => anyhow::bail!(
                "--cluster-storage {url:?}: give a mysql:// or postgres:// URL (the server \
                 and a database to connect to while creating the run's own)"
            ),
        }
    }

    /// The name rows of this engine carry: `herald-cluster-mysql`.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::MySql => "mysql",
            Engine::Postgres => "postgres",
        }
    }
}

/// `url` with its database (the path) replaced by `name`.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
    parsed.set_path(&format!("/{name}"));
    Ok(parsed.to_string())
}

/// The run's own database on the server of `admin_url`. Its name, which
/// the statements here are built with, is `herald_bench_` and digits.
struct Database {
    engine: Engine,
    /// Where it was created from, and is dropped from.
    admin_url: String,
    name: String,
    /// What the nodes connect to.
    url: String,
}

impl Database {
    /// Creates `name` and says how the server makes commits durable (its
    /// settings, as it reports them).
    async fn create(admin_url: &str, name: &str) -> anyhow::Result<(Database, String)> {
        let engine = Engine::of(admin_url)?;
        let durability = match engine {
            Engine::MySql => {
                let mut conn = sqlx::MySqlConnection::connect(admin_url)
                    .await
                    .with_context(|| format!("cannot connect to {admin_url}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await?;
                let (version, flush, sync_binlog, log_bin): (String, String, String, String) =
                    sqlx::query_as(
                        "SELECT @@version, CAST(@@innodb_flush_log_at_trx_commit AS CHAR), \
                         CAST(@@sync_binlog AS CHAR), CAST(@@log_bin AS CHAR)",
                    )
                    .fetch_one(&mut conn)
                    .await?;
                conn.close().await?;
                format!(
                    "MySQL/MariaDB {version}: innodb_flush_log_at_trx_commit={flush}, \
                     log_bin={log_bin}, sync_binlog={sync_binlog}"
                )
            }
            Engine::Postgres => {
                let mut conn = sqlx::PgConnection::connect(admin_url)
                    .await
                    .with_context(|| format!("cannot connect to {admin_url}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await?;
                let (version, fsync, synchronous_commit, wal_sync_method): (
                    String,
                    String,
                    String,
                    String,
                ) = sqlx::query_as(
                    "SELECT current_setting('server_version'), current_setting('fsync'), \
                     current_setting('synchronous_commit'), current_setting('wal_sync_method')",
                )
                .fetch_one(&mut conn)
                .await?;
                conn.close().await?;
                format!(
                    "PostgreSQL {version}: fsync={fsync}, synchronous_commit={synchronous_commit}, \
                     wal_sync_method={wal_sync_method}"
                )
            }
        };
        let database = Database {
            engine,
            admin_url: admin_url.to_owned(),
            name: name.to_owned(),
            url: with_database(admin_url, name)?,
        };
        Ok((database, durability))
    }

    async fn drop_database(&self) -> anyhow::Result<()> {
        let statement = format!("DROP DATABASE {}", self.name);
        match self.engine {
            Engine::MySql => {
                let mut conn = sqlx::MySqlConnection::connect(&self.admin_url).await?;
                sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
            }
            Engine::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
                // The killed nodes' sessions end a moment after them, and
                // PostgreSQL refuses to drop a database anyone is using.
                let mut tries = 0;
                loop {
                    match sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                        .execute(&mut conn)
                        .await
                    {
                        Ok(_) => break,
                        Err(_) if tries < 50 => {
                            tries += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
                conn.close().await?;
            }
        }
        Ok(())
    }
}

/// The settings of the cluster nodes a run starts.
pub struct ClusterSpec<'a> {
    pub herald: &'a Path,
    pub storage_url: &'a str,
    pub redis_url: &'a str,
    pub rooms: usize,
    pub heartbeat_secs: u64,
    pub io: &'a str,
    pub transport: Transport,
    pub pki: Option<&'a Pki>,
}

/// A running cluster: its nodes, killed when it is stopped, and what the
/// run made in the database server and Redis, removed then.
pub struct Cluster {
    pub control: Server,
    pub rooms: Vec<Server>,
    pub creds: AppCreds,
    /// How the database server makes a commit durable.
    pub durability: String,
    database: Database,
    redis_url: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(spec: &ClusterSpec<'_>) -> anyhow::Result<Cluster> {
        let run = format!("{}_{}", std::process::id(), crate::worker::unix_ms());
        let (database, durability) =
            Database::create(spec.storage_url, &format!("herald_bench_{run}")).await?;
        // Ids are A-Z a-z 0-9 - _ . (and a database name no '-').
        let run = run.replace('_', "-");
        let creds = AppCreds {
            app: format!("bench-{run}"),
            ..AppCreds::default()
        };
        let dir = tempfile::tempdir()?;
        let node = |command: &str, node_id: String| {
            let config = dir.path().join(format!("{node_id}.toml"));
            std::fs::write(
                &config,
                node_config(spec, &creds, dir.path(), &node_id, &database.url)?,
            )?;
            let log = dir.path().join(format!("{node_id}.log"));
            systems::start_herald_node(spec.herald, command, &config, &log)
                .with_context(|| format!("cluster node {node_id}"))
        };
        // The control node first (its migrations make the tables), then
        // the rooms, in the order README "What to start, in order" gives.
        let nodes = node("control", format!("bench-control-{run}")).and_then(|control| {
            let rooms = (0..spec.rooms)
                .map(|i| node("room", format!("bench-room-{run}-{i}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((control, rooms))
        });
        match nodes {
            Ok((control, rooms)) => Ok(Cluster {
                control,
                rooms,
                creds,
                durability,
                database,
                redis_url: spec.redis_url.to_owned(),
                dir,
            }),
            Err(error) => {
                remove_run_data(&database, spec.redis_url, &creds.app).await;
                Err(error)
            }
        }
    }

    /// Kills the nodes, drops the run's database and deletes the run's
    /// Redis keys; what fails is said, and the rest still done.
    pub async fn stop(self) {
        let Cluster {
            control,
            rooms,
            creds,
            database,
            redis_url,
            dir,
            ..
        } = self;
        drop(rooms);
        drop(control);
        remove_run_data(&database, &redis_url, &creds.app).await;
        drop(dir);
    }
}

/// Drops the run's database and deletes its app's Redis keys, saying what
/// could not be removed.
async fn remove_run_data(database: &Database, redis_url: &str, app: &str) {
    if let Err(error) = database.drop_database().await {
        eprintln!(
            "herald-bench: cannot drop the run's database {}: {error:#}",
            database.name
        );
    }
    if let Err(error) = delete_app_keys(redis_url, app).await {
        eprintln!("herald-bench: cannot delete the run's Redis keys (app {app}): {error:#}");
    }
}

/// A cluster node's config: `herald serve`'s (the gateway and API
/// sections, used by room nodes), and `[cluster]`.
fn node_config(
    spec: &ClusterSpec<'_>,
    creds: &AppCreds,
    dir: &Path,
    node_id: &str,
    database_url: &str,
) -> anyhow::Result<String> {
    let base = systems::herald_config(
        dir,
        spec.heartbeat_secs,
        spec.io,
        spec.transport,
        spec.pki,
        creds,
    )?;
    Ok(format!(
        "{base}\n[cluster]\nnode_id = \"{node_id}\"\nredis_url = \"{}\"\ndatabase_url = \"{database_url}\"\n",
        spec.redis_url
    ))
}

/// Deletes every key of `app` (its users' sessions and broadcasts:
/// `herald:{app:...}` and `herald:{app}:...`).
async fn delete_app_keys(redis_url: &str, app: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for pattern in [format!("herald:{{{app}:*"), format!("herald:{{{app}}}:*")] {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_url_scheme() {
        assert_eq!(
            Engine::of("mysql://root@127.0.0.1:3306/test").unwrap(),
            Engine::MySql
        );
        assert_eq!(
            Engine::of("postgres://postgres@127.0.0.1:5432/postgres").unwrap(),
            Engine::Postgres
        );
        assert!(Engine::of("sqlite:herald.db").is_err());
    }

    #[test]
    fn the_nodes_connect_to_the_runs_database() {
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306/test", "herald_bench_1_2").unwrap(),
            "mysql://root@127.0.0.1:3306/herald_bench_1_2"
        );
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "herald_bench_1_2").unwrap(),
            "postgres://postgres@127.0.0.1:5432/herald_bench_1_2"
        );
    }

    #[test]
    fn a_node_config_is_a_cluster_config() {
        let spec = ClusterSpec {
            herald: Path::new("herald"),
            storage_url: "mysql://root@127.0.0.1:3306/test",
            redis_url: "redis://127.0.0.1:6379",
            rooms: 1,
            heartbeat_secs: 60,
            io: "epoll",
            transport: Transport::Tcp,
            pki: None,
        };
        let creds = AppCreds {
            app: "bench-1-2".to_owned(),
            ..AppCreds::default()
        };
        let text = node_config(
            &spec,
            &creds,
            Path::new("data"),
            "bench-room-1-2-0",
            "mysql://root@127.0.0.1:3306/herald_bench_1_2",
        )
        .unwrap();
        let value: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(
            value["cluster"]["node_id"].as_str(),
            Some("bench-room-1-2-0")
        );
        assert_eq!(
            value["cluster"]["database_url"].as_str(),
            Some("mysql://root@127.0.0.1:3306/herald_bench_1_2")
        );
        assert_eq!(value["apps"][0]["id"].as_str(), Some("bench-1-2"));
    }
}
