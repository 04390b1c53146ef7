//! Cluster test support: room and control nodes as real processes on one
//! Redis and one MariaDB (or PostgreSQL) database, and a TCP relay that can
//! cut a node off its database.
//!
//! Redis, MariaDB and PostgreSQL are the local services
//! (`HERALD_TEST_REDIS_URL`, `HERALD_TEST_MYSQL_URL`,
//! `HERALD_TEST_POSTGRES_URL` override them; `scripts/start-services.sh`
//! starts them). A test whose service is missing is skipped with a message,
//! except under CI=true, where it fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_control::cluster::connection::RedisTarget;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, PgConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{API_KEY, APP, OTHER_API_KEY, OTHER_APP, Server, TOKEN_SECRET, WAIT};

pub fn redis_server_url() -> String {
    std::env::var("HERALD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn mysql_server_url() -> String {
    std::env::var("HERALD_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned())
}

pub fn postgres_server_url() -> String {
    std::env::var("HERALD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// The database engine a cluster stores in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    MariaDb,
    Postgres,
}

impl Database {
    fn server_url(self) -> String {
        match self {
            Database::MariaDb => mysql_server_url(),
            Database::Postgres => postgres_server_url(),
        }
    }
}

/// Skips (returns `None` after saying why) when a service is missing,
/// unless CI=true, where a missing service fails the test.
pub fn service_missing(test: &str, message: String) -> Option<std::convert::Infallible> {
    if std::env::var_os("CI").is_some() {
        panic!("{message}");
    }
    eprintln!("SKIPPED {test}: {message}");
    None
}

/// A MariaDB database and a Redis logical database of one test's own,
/// emptied first and dropped afterwards.
pub struct Engines {
    pub database_url: String,
    pub redis: RedisTarget,
    engine: Database,
    database: String,
}

/// Redis logical databases 1..=15 go to the tests of one binary in turn
/// (database 0 is left to whatever else uses the server).
static NEXT_REDIS_DB: AtomicU32 = AtomicU32::new(1);
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

impl Engines {
    /// Redis and a MariaDB database.
    pub async fn create(test: &str) -> Option<Engines> {
        Engines::create_on(test, Database::MariaDb).await
    }

    /// Redis and a database on `engine`.
    pub async fn create_on(test: &str, engine: Database) -> Option<Engines> {
        let redis_db = NEXT_REDIS_DB.fetch_add(1, Ordering::Relaxed);
        assert!(redis_db <= 15, "more cluster tests than Redis databases");
        let redis_url = format!("{}/{redis_db}", redis_server_url());
        if let Err(error) = flush_redis(&redis_url).await {
            service_missing(
                test,
                format!(
                    "Redis is not reachable at {redis_url} ({error}); start it with scripts/start-services.sh"
                ),
            )?;
        }
        let server = engine.server_url();
        let database = format!(
            "herald_cluster_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(error) = admin(engine, &format!("CREATE DATABASE {database}")).await {
            service_missing(
                test,
                format!(
                    "{engine:?} is not reachable at {server} ({error}); start it with scripts/start-services.sh"
                ),
            )?;
        }
        Some(Engines {
            database_url: format!("{server}/{database}"),
            redis: RedisTarget::Single(redis_url),
            engine,
            database,
        })
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        let engine = self.engine;
        let mut statement = format!("DROP DATABASE IF EXISTS {}", self.database);
        if engine == Database::Postgres {
            // Nodes just killed may still hold connections.
            statement.push_str(" WITH (FORCE)");
        }
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(admin(engine, &statement))
        })
        .join();
    }
}

pub async fn flush_redis(url: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("FLUSHDB").query_async(&mut conn).await
}

/// Runs `statement` on `engine`'s server, outside any test database.
async fn admin(engine: Database, statement: &str) -> Result<(), sqlx::Error> {
    let statement = sqlx::raw_sql(AssertSqlSafe(statement.to_owned()));
    match engine {
        Database::MariaDb => {
            let mut conn = MySqlConnection::connect(&mysql_server_url()).await?;
            statement.execute(&mut conn).await?;
        }
        Database::Postgres => {
            let server = postgres_server_url();
            let mut conn = PgConnection::connect(&format!("{server}/postgres")).await?;
            statement.execute(&mut conn).await?;
        }
    }
    Ok(())
}

/// The admin key of every test cluster.
pub const ADMIN_KEY: &str = "cluster-admin-key-0123456789-0123456789";

/// A config file for one cluster node.
pub fn write_node_config(
    dir: &Path,
    node_id: &str,
    redis: &RedisTarget,
    database_url: &str,
) -> PathBuf {
    let path = dir.join(format!("{node_id}.toml"));
    let redis = match redis {
        RedisTarget::Single(url) => format!("redis_url = {url:?}"),
        RedisTarget::Cluster(urls) => format!("redis_cluster_urls = {urls:?}"),
    };
    let text = format!(
        r#"
[gateway]
shards = 2
connections_per_shard_max = 5000
auth_timeout_secs = 3
drain_timeout_secs = 5
drain_spread_secs = 0
[gateway.heartbeat_secs]
unknown = 60
wifi = 60
cellular = 60
wired = 60
[api]
payload_bytes_max = 1024
[storage]
ack_flush_interval_ms = 50
[cluster]
node_id = "{node_id}"
{redis}
database_url = "{database_url}"
[admin]
api_key = "{ADMIN_KEY}"
[[apps]]
id = "{APP}"
api_key = "{API_KEY}"
token_secret = "{TOKEN_SECRET}"
[[apps]]
id = "{OTHER_APP}"
api_key = "{OTHER_API_KEY}"
token_secret = "other-secret-0123456789"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Room nodes `room-0..` and control nodes `control-0..` on one set of
/// engines.
pub struct Cluster {
    pub rooms: Vec<Server>,
    pub controls: Vec<Server>,
    pub dir: tempfile::TempDir,
    pub engines: Engines,
}

impl Cluster {
    pub async fn start(test: &str, rooms: usize, controls: usize) -> Option<Cluster> {
        let engines = Engines::create(test).await?;
        Some(Cluster::start_on(engines, rooms, controls, |_| None))
    }

    /// Starts the nodes; `database_url_of(node_id)` may route a node to
    /// the database another way (through a [`Relay`]).
    pub fn start_on(
        engines: Engines,
        rooms: usize,
        controls: usize,
        database_url_of: impl Fn(&str) -> Option<String>,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let config = |node: &str| {
            let database_url =
                database_url_of(node).unwrap_or_else(|| engines.database_url.clone());
            write_node_config(dir.path(), node, &engines.redis, &database_url)
        };
        let rooms = (0..rooms)
            .map(|i| Server::spawn_node("room", &config(&format!("room-{i}")), None))
            .collect();
        let controls = (0..controls)
            .map(|i| Server::spawn_node("control", &config(&format!("control-{i}")), None))
            .collect();
        Cluster {
            rooms,
            controls,
            dir,
            engines,
        }
    }

    /// The room node whose gateway is `gateway`.
    pub fn room_at(&self, gateway: &str) -> usize {
        self.rooms
            .iter()
            .position(|room| room.gateway == gateway)
            .unwrap_or_else(|| panic!("no room node at {gateway}"))
    }
}

/// A TCP relay to `target` that can be cut (every relayed connection
/// closed, new ones closed at once) and restored: a database that becomes
/// unreachable without stopping it for everyone else.
pub struct Relay {
    pub addr: String,
    open: Arc<Mutex<bool>>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let open = Arc::new(Mutex::new(true));
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = target.to_owned();
        let accept = tokio::spawn({
            let open = open.clone();
            let pipes = pipes.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !*open.lock().unwrap() {
                        continue; // dropped: closed at once
                    }
                    let target = target.clone();
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    pipes.lock().unwrap().push(pipe);
                }
            }
        });
        Relay {
            addr,
            open,
            pipes,
            accept,
        }
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        *self.open.lock().unwrap() = false;
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    pub fn restore(&self) {
        *self.open.lock().unwrap() = true;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Polls `check` until it holds or [`WAIT`] passes.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis server of one test's own, to restart without disturbing others.
/// It keeps nothing on disk: a restart loses every key, as a crashed
/// cache-only Redis does.
pub struct PrivateRedis {
    pub url: String,
    port: u16,
    child: std::process::Child,
}

impl PrivateRedis {
    pub fn start(test: &str) -> Option<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        match PrivateRedis::spawn(port) {
            Ok(child) => Some(PrivateRedis {
                url: format!("redis://127.0.0.1:{port}"),
                port,
                child,
            }),
            Err(error) => {
                service_missing(test, format!("cannot run redis-server ({error})"))?;
                None
            }
        }
    }

    fn spawn(port: u16) -> std::io::Result<std::process::Child> {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let deadline = std::time::Instant::now() + WAIT;
        // Polled often: a test times what happens after Redis answers.
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server never listened"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(child)
    }

    /// Kills the server (SIGKILL: nothing saved).
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts it again on the same port, empty; returns within 5 ms of it
    /// taking connections.
    pub fn restart(&mut self) {
        self.child = PrivateRedis::spawn(self.port).expect("restart redis-server");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A three-node Redis Cluster of one test's own (no replicas, nothing on
/// disk but each node's cluster state file in a temporary directory).
pub struct PrivateRedisCluster {
    pub urls: Vec<String>,
    nodes: Vec<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl PrivateRedisCluster {
    pub fn start(test: &str) -> Option<PrivateRedisCluster> {
        let dir = tempfile::tempdir().unwrap();
        // A cluster node also listens on its port + 10,000 (the bus).
        let ports: Vec<u16> = (0..3).map(|_| free_cluster_port()).collect();
        let mut nodes = Vec::new();
        for port in &ports {
            let spawned = std::process::Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--cluster-config-file")
                .arg(dir.path().join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn();
            match spawned {
                Ok(child) => nodes.push(child),
                Err(error) => {
                    service_missing(test, format!("cannot run redis-server ({error})"))?;
                }
            }
        }
        let mut cluster = PrivateRedisCluster {
            urls: ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect(),
            nodes,
            _dir: dir,
        };
        for port in &ports {
            wait_for_port(*port);
        }
        let created = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status();
        match created {
            Ok(status) if status.success() => {}
            other => {
                service_missing(
                    test,
                    format!("redis-cli --cluster create failed: {other:?}"),
                )?;
            }
        }
        cluster.wait_until_ok();
        Some(cluster)
    }

    fn wait_until_ok(&mut self) {
        let deadline = std::time::Instant::now() + WAIT;
        for url in &self.urls {
            let client = redis::Client::open(url.as_str()).unwrap();
            loop {
                let info: String = client
                    .get_connection()
                    .and_then(|mut conn| redis::cmd("CLUSTER").arg("INFO").query(&mut conn))
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the Redis Cluster never became ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn target(&self) -> RedisTarget {
        RedisTarget::Cluster(self.urls.clone())
    }

    /// Empties every node, as a restart of the whole cluster would.
    pub fn flush(&self) {
        for url in &self.urls {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client.get_connection().unwrap();
            redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
        }
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// A free port whose cluster bus port (+10,000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = 20_000 + rand::random::<u16>() % 25_000;
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

fn wait_for_port(port: u16) {
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
