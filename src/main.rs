//! The `herald` command: load the configuration, build the gateway, the
//! control plane and storage, and wire them together, as one process
//! (`serve`) or as a cluster's room and control nodes (`room`, `control`).
//! Nothing else lives here; each part's logic is in its crate.

mod admin;
mod config;
mod config_check;
mod listen;
mod logging;
mod open_files;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use herald_control::apps::{AppSettings, AppTable, Apps, FileApp, RateLimit};
use herald_control::cluster::connection::{RedisConn, RedisTarget};
use herald_control::cluster::directory::{LoadProbe, NodeDirectory, NodeLoad, NodeRecord};
use herald_control::cluster::register::RedisRegister;
use herald_control::coordinator::{AppWebhooks, Coordinator};
use herald_control::link::{RedisRemote, RoomLink};
use herald_control::metrics::Metrics;
use herald_control::router::Router;
use herald_control::{
    ControlConfig, Delivery, DeliveryLimits, MemoryRegister, NodeName, Register, Remote,
};
use herald_proto::server::ServerConfig;
use herald_proto::{TokenClaims, sign_token};
use herald_room::metrics::{CLOSE_REASONS, TURN_AWAY_REASONS};
use herald_room::{
    AppAccess, AppUpdater, Gateway, GatewayConfig, GatewayError, GatewayMetrics, TlsAcceptor,
    TokenSecret, TransportKind, WebSocketSettings,
};

use crate::config::{Config, IoSetting};

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Everything in one process: gateway, API, SQLite, in-memory register.
    Embedded,
    /// A cluster's gateway node: sessions in Redis, messages in MySQL or
    /// PostgreSQL, deliveries from other nodes over Redis pub/sub.
    Room,
    /// A cluster's API node: stores, looks users up, publishes deliveries.
    Control,
}

/// Capacity of the channel that carries every shard's events to the control
/// plane. Shards hold their own outbox and stop reading when it fills, so
/// this only smooths bursts; its slots are memory every node pays for.
const EVENT_QUEUE_LEN: usize = 8 * 1024;

/// How often freed heap memory is handed back to the kernel.
const HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: long-connection push and messaging"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Herald: gateway, API and storage in one process.
    Serve {
        /// TOML configuration file. Without one, Herald runs a `demo` app
        /// whose keys it keeps in the data dir.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Where business servers call the HTTP API, e.g. 127.0.0.1:8080.
        #[arg(long)]
        api_listen: Option<std::net::SocketAddr>,
        /// Development only: make a self-signed certificate for localhost
        /// in the data dir (once) and serve TLS on 0.0.0.0:7071 and WSS on
        /// 0.0.0.0:7443 unless listeners are configured.
        #[arg(long)]
        tls_self_signed: bool,
    },
    /// Run a room node of a cluster: a gateway that registers its sessions
    /// in Redis and takes deliveries from control nodes (needs the config's cluster section).
    Room {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Health, metrics and the API of this node.
        #[arg(long)]
        api_listen: Option<std::net::SocketAddr>,
    },
    /// Run a control node of a cluster: the stateless HTTP API and
    /// dispatcher (needs the config's cluster section). Run any number behind a load balancer.
    Control {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        api_listen: Option<std::net::SocketAddr>,
    },
    /// Print a client token for a user of an app.
    Token {
        /// The configuration that holds the app's token secret; without one
        /// (and without --token-secret), the `demo` app of the data dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The app's token secret, as `herald admin apps create` printed it.
        #[arg(
            long,
            env = "HERALD_TOKEN_SECRET",
            hide_env_values = true,
            conflicts_with = "config"
        )]
        token_secret: Option<String>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        app: String,
        #[arg(long)]
        user: String,
        /// How long the token is valid.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl_secs: u64,
    },
    /// Connect as a client and print each push as one JSON line, acking it.
    Listen(listen::ListenArgs),
    /// Call the admin API: create, list, change, rotate and delete apps.
    Admin(admin::AdminArgs),
    /// Work with a config file before a node runs it.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a config: every problem listed (exit 1), else the effective
    /// configuration (secrets masked), the memory its connection limits
    /// budget for, and the kernel limits they need.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

/// The gateway's settings a command line may override.
#[derive(Debug, Clone, Default, clap::Args)]
struct GatewayArgs {
    /// Where clients connect over plain TCP, e.g. 0.0.0.0:7070.
    #[arg(long)]
    gateway_listen: Option<std::net::SocketAddr>,
    /// Another listener, TRANSPORT=ADDRESS with a transport of tcp, tls,
    /// ws or wss, e.g. wss=0.0.0.0:443 (repeatable; added to
    /// [[gateway.listeners]]).
    #[arg(long = "listener", value_parser = parse_listener)]
    listeners: Vec<config::ListenerSection>,
    /// How the gateway waits for sockets: io_uring or epoll. Unset:
    /// io_uring where the kernel allows it, else epoll (said in one line).
    #[arg(long, value_enum)]
    io: Option<IoSetting>,
}

impl GatewayArgs {
    fn apply(self, config: &mut Config) {
        if let Some(addr) = self.gateway_listen {
            config.gateway.listen = Some(addr);
        }
        config.gateway.listeners.extend(self.listeners);
        if let Some(io) = self.io {
            config.gateway.io = Some(io);
        }
    }
}

fn parse_listener(text: &str) -> Result<config::ListenerSection, String> {
    let (transport, address) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not TRANSPORT=ADDRESS, e.g. wss=0.0.0.0:443"))?;
    let transport = transport.parse()?;
    let address = address
        .parse()
        .map_err(|error| format!("{address:?} is not an address: {error}"))?;
    Ok(config::ListenerSection { address, transport })
}

/// Reads the config again as the process was started with it (SIGHUP).
type ConfigSource = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = logging::Logging::install();
    let result = match cli.command {
        Command::Serve {
            config,
            data_dir,
            gateway,
            api_listen,
            tls_self_signed,
        } => {
            // Without a file there is nothing to read again.
            let source = config.clone().map(|path| {
                let (data_dir, gateway) = (data_dir.clone(), gateway.clone());
                Box::new(move || {
                    load_serve_config(
                        Some(path.clone()),
                        data_dir.clone(),
                        gateway.clone(),
                        api_listen,
                        tls_self_signed,
                    )
                }) as ConfigSource
            });
            load_serve_config(config, data_dir, gateway, api_listen, tls_self_signed)
                .and_then(|config| run(config, Role::Embedded, logging, source))
        }
        Command::Room {
            config,
            gateway,
            api_listen,
        } => {
            let source = {
                let (config, gateway) = (config.clone(), gateway.clone());
                Box::new(move || {
                    load_cluster_config(&config, gateway.clone(), api_listen, Role::Room)
                }) as ConfigSource
            };
            load_cluster_config(&config, gateway, api_listen, Role::Room)
                .and_then(|config| run(config, Role::Room, logging, Some(source)))
        }
        Command::Control { config, api_listen } => {
            let source = {
                let config = config.clone();
                Box::new(move || {
                    load_cluster_config(&config, GatewayArgs::default(), api_listen, Role::Control)
                }) as ConfigSource
            };
            load_cluster_config(&config, GatewayArgs::default(), api_listen, Role::Control)
                .and_then(|config| run(config, Role::Control, logging, Some(source)))
        }
        Command::Token {
            config,
            token_secret,
            data_dir,
            app,
            user,
            ttl_secs,
        } => token(config, token_secret, data_dir, &app, &user, ttl_secs),
        Command::Listen(args) => listen::run(args),
        Command::Admin(args) => admin::run(args),
        Command::Config(ConfigCommand::Check { config }) => config_check::run(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fails with one clear line, before anything is created, on a host
/// where the io_uring gateway cannot run.
fn resolve_io(config: &mut Config) -> anyhow::Result<()> {
    let (io, fallback) = choose_io(config.gateway.io, herald_room::probe_io_uring)?;
    if let Some(line) = fallback {
        eprintln!("herald: {line}");
    }
    config.gateway.io = Some(io);
    Ok(())
}

/// The gateway's driver: the one asked for (io_uring failing with one clear
/// error where the kernel refuses it), or without a choice io_uring where
/// `probe` finds it, else epoll and the line that says so.
fn choose_io(
    requested: Option<IoSetting>,
    probe: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<(IoSetting, Option<String>)> {
    match requested {
        Some(IoSetting::Epoll) => Ok((IoSetting::Epoll, None)),
        Some(IoSetting::Uring) => probe().map(|()| (IoSetting::Uring, None)).map_err(|error| {
            anyhow::anyhow!(
                "{}; run with --io epoll to use epoll instead",
                GatewayError::IoUringUnavailable(error)
            )
        }),
        None => Ok(match probe() {
            Ok(()) => (IoSetting::Uring, None),
            Err(error) => (
                IoSetting::Epoll,
                Some(format!(
                    "io_uring is unavailable here ({error}); the gateway runs on epoll \
                     (--io or gateway.io chooses)"
                )),
            ),
        }),
    }
}

/// The file's settings, or the defaults with the generated `demo` app, then
/// the command-line overrides.
fn load_serve_config(
    path: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    gateway: GatewayArgs,
    api_listen: Option<std::net::SocketAddr>,
    tls_self_signed: bool,
) -> anyhow::Result<Config> {
    let mut config = match &path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    anyhow::ensure!(
        config.cluster.is_none(),
        "the config has a [cluster] section: run its nodes with `herald room` and \
         `herald control`; `herald serve` is the single-process mode"
    );
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    gateway.apply(&mut config);
    if let Some(addr) = api_listen {
        config.api.listen = addr;
    }
    if tls_self_signed {
        use_self_signed_certificate(&mut config)?;
    }
    resolve_io(&mut config)?;
    if path.is_none() {
        let (demo, created) = config::demo_app(&config.data_dir)?;
        print_demo_banner(&config, &demo, created);
        config.apps.push(demo);
    }
    config.validate()?;
    Ok(config)
}

/// A cluster node's config file, checked, with the command-line overrides.
fn load_cluster_config(
    path: &std::path::Path,
    gateway: GatewayArgs,
    api_listen: Option<std::net::SocketAddr>,
    role: Role,
) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    gateway.apply(&mut config);
    if let Some(addr) = api_listen {
        config.api.listen = addr;
    }
    config.validate()?;
    config.cluster()?;
    if role == Role::Room {
        resolve_io(&mut config)?;
    }
    Ok(config)
}

/// `--tls-self-signed`: a certificate for localhost, made once and kept in
/// the data dir, and TLS and WSS listeners unless some are configured.
fn use_self_signed_certificate(config: &mut Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.gateway.tls.is_none(),
        "--tls-self-signed and [gateway.tls] both name a certificate: keep one"
    );
    let dir = config.data_dir.join("tls");
    let cert_file = dir.join("self-signed-cert.pem");
    let key_file = dir.join("self-signed-key.pem");
    if !cert_file.exists() || !key_file.exists() {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let names = ["localhost", "127.0.0.1", "::1"]
            .map(str::to_owned)
            .to_vec();
        let made = rcgen::generate_simple_self_signed(names)
            .context("cannot make a self-signed certificate")?;
        std::fs::write(&cert_file, made.cert.pem())
            .with_context(|| format!("cannot write {}", cert_file.display()))?;
        write_private(&key_file, &made.signing_key.serialize_pem())?;
    }
    let uses_tls = config
        .gateway
        .listeners
        .iter()
        .any(|listener| listener.transport.uses_tls());
    if !uses_tls {
        for (address, transport) in [
            (SELF_SIGNED_TLS_LISTEN, TransportKind::Tls),
            (SELF_SIGNED_WSS_LISTEN, TransportKind::Wss),
        ] {
            config.gateway.listeners.push(config::ListenerSection {
                address: address.parse().expect("valid default"),
                transport,
            });
        }
    }
    println!(
        "herald: self-signed TLS certificate for localhost (development only): {}\n\
         herald:   clients must trust it, e.g. herald listen --ca {}",
        cert_file.display(),
        cert_file.display()
    );
    config.gateway.tls = Some(config::TlsSection {
        cert_file,
        key_file,
    });
    Ok(())
}

/// Where `--tls-self-signed` serves TLS and WSS when no listener is set.
const SELF_SIGNED_TLS_LISTEN: &str = "0.0.0.0:7071";
const SELF_SIGNED_WSS_LISTEN: &str = "0.0.0.0:7443";

/// Writes a file only its owner may read.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print_demo_banner(config: &Config, demo: &config::AppSection, created: bool) {
    let data_dir = config.data_dir.display();
    let origin = if created { "created" } else { "loaded" };
    println!(
        "herald: no --config given: serving the `demo` app ({origin} in {})\n\
         herald:   API key:      {}\n\
         herald:   mint a token: herald token --data-dir {data_dir} --app demo --user alice",
        config::demo_app_path(&config.data_dir).display(),
        demo.api_key,
    );
}

fn token(
    path: Option<PathBuf>,
    token_secret: Option<String>,
    data_dir: Option<PathBuf>,
    app: &str,
    user: &str,
    ttl_secs: u64,
) -> anyhow::Result<()> {
    let secret = match (path, token_secret) {
        (_, Some(secret)) => secret,
        (Some(path), None) => Config::load(&path)?.app(app)?.token_secret.clone(),
        (None, None) => {
            let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR));
            let demo_path = config::demo_app_path(&data_dir);
            anyhow::ensure!(
                app == "demo" && demo_path.exists(),
                "without --config only the `demo` app of a data dir that `herald serve` \
                 has used is known (looked for {})",
                demo_path.display()
            );
            config::demo_app(&data_dir)?.0.token_secret
        }
    };
    herald_proto::ids::check_user_id(user)
        .map_err(|rule| anyhow::anyhow!("user {user:?} cannot have a token: {rule}"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = TokenClaims {
        app: app.to_owned(),
        user: user.to_owned(),
        expires_at_unix_secs: now.saturating_add(ttl_secs),
    };
    let token = sign_token(secret.as_bytes(), &claims)
        .map_err(|error| anyhow::anyhow!("cannot sign a token for user {user:?}: {error}"))?;
    println!("{token}");
    Ok(())
}

fn gateway_config(
    config: &Config,
    apps: &AppTable,
    connections_per_shard_max: usize,
    storage_epoch: u64,
    tls: Option<TlsAcceptor>,
) -> GatewayConfig {
    GatewayConfig {
        io: config.io_driver(),
        recv_buffers: config.recv_buffers(),
        listeners: config.gateway_listeners(),
        tls,
        websocket: WebSocketSettings {
            allowed_origins: config.gateway.websocket.allowed_origins.clone(),
            test_echo: config.gateway.websocket.test_echo,
        },
        shards: config.shards(),
        server: ServerConfig {
            heartbeat: config.heartbeat(),
            auth_timeout: Duration::from_secs(config.gateway.auth_timeout_secs),
            bind_failures_max: config.gateway.bind_failures_max,
            apps_per_conn_max: config.gateway.apps_per_connection_max,
            inflight_pushes_max: config.gateway.inflight_pushes_max,
            storage_epoch,
        },
        apps: app_access(apps),
        connections_per_shard_max,
        send_queue_bytes_max: config.gateway.send_queue_bytes_max,
        send_queue_frames_max: config.gateway.send_queue_frames_max,
        command_queue_len: config.gateway.command_queue_len,
        accept_rate: config.gateway.accept_rate.map(config::RateSection::rate),
        per_ip: config
            .gateway
            .per_ip
            .as_ref()
            .map(config::PerIpSection::limits),
        read_deadlines: config.gateway.frame_read.deadlines(),
        pin_shards: config.gateway.pin_shards,
    }
}

/// What the gateway checks a BIND of each app against, now.
fn app_access(apps: &AppTable) -> Vec<AppAccess> {
    let now_ms = herald_control::clock::unix_ms();
    apps.values()
        .map(|app| AppAccess {
            id: app.id.to_string(),
            token_secrets: app
                .secrets
                .token_secret
                .valid_at(now_ms)
                .map(|value| TokenSecret {
                    secret: value.value.as_bytes().to_vec(),
                    retires_at_ms: value.retires_at_ms,
                })
                .collect(),
            max_connections: app.settings.max_connections,
        })
        .collect()
}

/// The config file's apps, as the apps table takes them at startup.
fn file_apps(config: &Config) -> Vec<FileApp> {
    let rate = |rate: Option<config::RateSection>| {
        rate.map(|rate| RateLimit {
            per_sec: rate.per_sec,
            burst: rate.burst,
        })
    };
    config
        .apps
        .iter()
        .map(|app| FileApp {
            id: app.id.clone(),
            api_key: app.api_key.clone(),
            token_secret: app.token_secret.clone(),
            webhook_secret: app.webhook_secret.clone(),
            settings: AppSettings {
                default_ttl_secs: app.default_ttl_secs,
                push_rate: rate(app.push_rate),
                broadcast_rate: rate(app.broadcast_rate),
                webhooks: app
                    .webhooks()
                    .map(|webhooks| webhooks.routes)
                    .unwrap_or_default(),
                webhook_rate: rate(app.webhook_rate),
                max_connections: app.max_connections,
            },
        })
        .collect()
}

/// How often every node reads the apps table again: what catches a change
/// whose announcement it missed, and a retired secret's grace ending.
const APPS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Reads the apps again every [`APPS_RELOAD_INTERVAL`].
async fn reload_apps(apps: Arc<Apps>) {
    let mut ticks = tokio::time::interval(APPS_RELOAD_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = apps.reload().await {
            tracing::warn!(%error, "reading the apps failed; keeping the ones known");
        }
    }
}

/// Hands every change of the apps table to the gateway (on nodes that
/// have one) and to the coordinator.
async fn follow_apps(
    mut table: tokio::sync::watch::Receiver<Arc<AppTable>>,
    gateway: Option<AppUpdater>,
    coordinator: Coordinator,
    metrics: Arc<Metrics>,
) {
    let mut known: HashMap<String, AppWebhooks> = HashMap::new();
    let mut present: Vec<String> = Vec::new();
    loop {
        let apps = table.borrow_and_update().clone();
        for gone in present
            .iter()
            .filter(|app| !apps.contains_key(app.as_str()))
        {
            metrics.forget_app(gone);
        }
        present = apps.keys().map(|app| app.to_string()).collect();
        if let Some(gateway) = &gateway {
            gateway.set(&app_access(&apps)).await;
        }
        let now_ms = herald_control::clock::unix_ms();
        let webhooks: HashMap<String, AppWebhooks> = apps
            .values()
            .filter_map(|app| Some((app.id.to_string(), app.webhooks(now_ms)?)))
            .collect();
        for (app, hooks) in &webhooks {
            if known.get(app) != Some(hooks) {
                coordinator.set_app(app, Some(hooks.clone()));
            }
        }
        for app in known.keys().filter(|app| !webhooks.contains_key(*app)) {
            coordinator.set_app(app, None);
        }
        known = webhooks;
        if table.changed().await.is_err() {
            return;
        }
    }
}

fn control_config(config: &Config) -> ControlConfig {
    ControlConfig {
        admin_api_key: config.admin.as_ref().map(|admin| admin.api_key.clone()),
        payload_bytes_max: config.api.payload_bytes_max,
        notify_payload_bytes_max: config.api.notify_payload_bytes_max,
        notify_pulls_per_sec: config.api.notify_pulls_per_sec,
        multicast_users_max: config.api.multicast_users_max,
        pull_limit_max: config.api.pull_limit_max,
        ttl_secs_max: config.api.ttl_secs_max,
        http: config.http_limits(),
        ack_flush_interval: Duration::from_millis(config.storage.ack_flush_interval_ms),
        purge_interval: Duration::from_secs(config.storage.purge_interval_secs),
        api_allowed: config::parse_cidrs(&config.api.allowed_cidrs).expect("validated"),
        admin_allowed: config.admin.as_ref().map_or_else(Vec::new, |admin| {
            config::parse_cidrs(&admin.allowed_cidrs).expect("validated")
        }),
    }
}

/// This run's instance number: unix milliseconds with random low bits, so
/// a node restarted within the same millisecond is still another run.
fn new_instance() -> u64 {
    (herald_control::clock::unix_ms() << 12) | u64::from(rand::random::<u16>() & 0xfff)
}

/// The gateway address clients are told to use: the configured one, else
/// the listening address (a wildcard listen is given out as loopback).
fn advertised_gateway(config: &Config, local: std::net::SocketAddr) -> String {
    if let Some(advertise) = config.cluster.as_ref().and_then(|c| c.advertise.clone()) {
        return advertise;
    }
    advertised_gateway_of(local)
}

/// What the dispatcher gives clients for each of the gateway's
/// transports: the tcp listener's advertised address, and for the others
/// the advertised host (else the listening address) with their own port.
fn advertised_gateways(config: &Config, gateway: &Gateway) -> BTreeMap<String, String> {
    let advertised_host = config
        .cluster
        .as_ref()
        .and_then(|cluster| cluster.advertise.as_deref())
        .and_then(|advertise| advertise.rsplit_once(':'))
        .map(|(host, _)| host.to_owned());
    gateway
        .listeners()
        .iter()
        .map(|listener| {
            let address = match (listener.transport, &advertised_host) {
                (TransportKind::Tcp, _) => advertised_gateway(config, listener.addr),
                (_, Some(host)) => format!("{host}:{}", listener.addr.port()),
                (_, None) => advertised_gateway_of(listener.addr),
            };
            (
                listener.transport.as_str().to_owned(),
                listener.transport.url(&address),
            )
        })
        .collect()
}

/// A listening address as clients reach it (a wildcard is loopback).
fn advertised_gateway_of(mut local: std::net::SocketAddr) -> String {
    if local.ip().is_unspecified() {
        local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    local.to_string()
}

fn run(
    config: Config,
    role: Role,
    logging: logging::Logging,
    source: Option<ConfigSource>,
) -> anyhow::Result<()> {
    logging.configure(&config.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("herald-control")
        .build()
        .context("cannot start the control plane runtime")?;
    runtime.block_on(run_node(config, role, logging, source))
}

async fn run_node(
    config: Config,
    role: Role,
    logging: logging::Logging,
    source: Option<ConfigSource>,
) -> anyhow::Result<()> {
    let mut shutdown = ShutdownSignal::install()?;
    let name = NodeName {
        node: config.node_id().to_owned(),
        instance: new_instance(),
    };
    let saver = match role {
        Role::Embedded => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
            let db_path = config.data_dir.join("herald.db");
            herald_storage::Saver::open_sqlite(&db_path, config.storage.group_commit())
                .await
                .with_context(|| format!("cannot open storage at {}", db_path.display()))?
        }
        Role::Room | Role::Control => {
            let url = &config.cluster()?.database_url;
            herald_storage::Saver::open_with(url, config.storage.group_commit())
                .await
                .context("cannot open the cluster database (cluster.database_url)")?
        }
    };
    let redis = match role {
        Role::Embedded => None,
        Role::Room | Role::Control => {
            let target = config.cluster()?.redis_target()?;
            let conn = herald_control::cluster::connection::connect(&target)
                .await
                .with_context(|| format!("cannot reach Redis at {target:?}"))?;
            Some((target, conn))
        }
    };
    let announce = match &redis {
        Some((_, conn)) => herald_control::link::announce_app_changes(conn.clone()),
        None => Box::new(|| {}),
    };
    let apps = Apps::open(
        saver.clone(),
        config.api.ttl_secs_max,
        file_apps(&config),
        announce,
    )
    .await
    .context("cannot load the apps")?;
    if let Some((target, _)) = &redis {
        tokio::spawn(herald_control::link::follow_app_changes(
            target.clone(),
            apps.clone(),
        ));
    }

    // The gateway, on nodes that hold connections.
    let mut gateway = None;
    let mut tls = None;
    let mut events_rx = None;
    if role != Role::Control {
        let shards = config.shards();
        let connections_per_shard_max =
            open_files::connections_per_shard(config.gateway.connections_per_shard_max, shards)?;
        limit_heap_arenas(shards);
        let (events_tx, events) = async_channel::bounded(EVENT_QUEUE_LEN);
        let storage_epoch = saver
            .storage_epoch()
            .await
            .context("cannot read the storage epoch")?;
        tls = match &config.gateway.tls {
            Some(section) => Some(
                TlsAcceptor::load(&section.cert_file, &section.key_file)
                    .context("cannot load the gateway's TLS certificate ([gateway.tls])")?,
            ),
            None => None,
        };
        gateway = Some(
            Gateway::start(
                gateway_config(
                    &config,
                    &apps.table(),
                    connections_per_shard_max,
                    storage_epoch,
                    tls.clone(),
                ),
                events_tx,
            )
            .context("cannot start the gateway")?,
        );
        events_rx = Some(events);
    }
    let shard_senders = gateway.as_ref().map_or_else(Vec::new, Gateway::commands);

    let Wiring {
        register,
        directory,
        remote,
        link,
    } = wire(&config, &name, redis.as_ref(), gateway.as_ref()).await?;

    let now_ms = herald_control::clock::unix_ms();
    let webhooks = apps
        .table()
        .values()
        .filter_map(|app| Some((app.id.to_string(), app.webhooks(now_ms)?)))
        .collect();
    let metrics = Arc::new(Metrics::new());
    let coordinator = Coordinator::start(webhooks, config.webhooks.policy(), metrics.clone())
        .context("cannot start the webhook coordinator")?;
    tokio::spawn(follow_apps(
        apps.watch(),
        gateway.as_ref().map(Gateway::app_updater),
        coordinator.clone(),
        metrics.clone(),
    ));
    tokio::spawn(reload_apps(apps.clone()));
    let delivery = Delivery::new(
        Router::new(name.clone(), shard_senders, remote),
        saver.clone(),
        register,
        coordinator,
        metrics,
        DeliveryLimits {
            fill_limit: config.gateway.inflight_pushes_max,
            redeliveries_max: config.delivery.redeliveries_max,
            timeouts_kept_for: config.heartbeat().longest(),
        },
    );
    if let Some(link) = &link {
        // Deliveries must reach this node before any session is registered.
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(link.clone().run_subscriber(delivery.clone(), subscribed_tx));
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .context("cannot subscribe to this node's delivery channel in Redis")??;
        let load = load_probe(gateway.as_ref().expect("room nodes have a gateway"));
        tokio::spawn(link.clone().run_heartbeat(delivery.clone(), load));
    }
    if let Some(events) = events_rx {
        tokio::spawn(delivery.clone().run_events(events));
    }
    let control_config = control_config(&config);
    tokio::spawn(
        delivery
            .clone()
            .run_ack_flusher(control_config.ack_flush_interval),
    );
    tokio::spawn(delivery.clone().run_purger(control_config.purge_interval));
    tokio::spawn(trim_heap());

    let gateway_metrics: herald_control::MetricsRenderer = match &gateway {
        Some(gateway) => {
            let metrics = gateway.metrics();
            let apps = gateway.app_updater();
            Box::new(move |text| render_gateway_metrics(&metrics, &apps, text))
        }
        None => Box::new(|_| {}),
    };
    // The overview reads a lone process's load from its gateway; a room
    // node's comes through its heartbeat.
    let local_load = match (&gateway, &link) {
        (Some(gateway), None) => Some(load_probe(gateway)),
        _ => None,
    };
    let http_limits = control_config.http;
    let router = herald_control::router(
        control_config,
        apps.clone(),
        delivery.clone(),
        directory,
        gateway_metrics,
        local_load,
        herald_control::openapi::document_json(),
    );
    let listener = herald_control::http::listen(config.api.listen)
        .with_context(|| format!("cannot listen on {}", config.api.listen))?;
    if let Some(gateway) = &gateway {
        for listener in gateway.listeners() {
            println!(
                "herald: gateway listening on {} ({}, {} shards, {})",
                listener.transport.url(&listener.addr.to_string()),
                listener.transport,
                config.shards(),
                config.io_driver().as_str()
            );
        }
    }
    tokio::spawn(reload_on_hangup(
        shutdown.hangup.take(),
        Reload {
            source,
            config: config.clone(),
            logging,
            apps: apps.clone(),
            tls,
        },
    ));
    println!("herald: api listening on {}", listener.local_addr()?);
    tracing::info!(node.id = %name.node, role = ?role, "herald is ready");

    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(herald_control::http::serve(
        listener,
        router,
        http_limits,
        async {
            let _ = stopped_rx.await;
        },
    ));
    shutdown.recv().await;
    tracing::info!("draining: clients get GOAWAY, acks are flushed");
    delivery
        .drain(
            config.gateway.drain_reconnect_delay_ms,
            Duration::from_secs(config.gateway.drain_spread_secs),
            Duration::from_secs(config.gateway.drain_timeout_secs),
        )
        .await;
    if let Some(link) = &link {
        link.leave().await;
    }
    let _ = stopped_tx.send(());
    let _ = server.await;
    saver.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// How a node reaches sessions and other nodes: in memory alone, or
/// through Redis.
struct Wiring {
    register: Arc<dyn Register>,
    directory: Arc<NodeDirectory>,
    remote: Option<Arc<dyn Remote>>,
    /// A room node's heartbeat and delivery channel.
    link: Option<Arc<RoomLink>>,
}

async fn wire(
    config: &Config,
    name: &NodeName,
    redis: Option<&(RedisTarget, RedisConn)>,
    gateway: Option<&Gateway>,
) -> anyhow::Result<Wiring> {
    let Some((target, manager)) = redis else {
        let gateway = gateway.expect("an embedded node has a gateway");
        let record = NodeRecord {
            node: name.node.clone(),
            instance: name.instance,
            gateway: advertised_gateways(config, gateway)
                .remove("tcp")
                .unwrap_or_default(),
            gateways: advertised_gateways(config, gateway),
            region: String::new(),
            connections: 0,
            cpu_percent: 0.0,
            heartbeat_at_ms: 0,
            apps_online: BTreeMap::new(),
            shard_connections: Vec::new(),
            draining: false,
        };
        return Ok(Wiring {
            register: Arc::new(MemoryRegister::default()),
            directory: Arc::new(NodeDirectory::fixed(record)),
            remote: None,
            link: None,
        });
    };
    let directory = Arc::new(NodeDirectory::redis(manager.clone()));
    let remote: Option<Arc<dyn Remote>> = Some(Arc::new(RedisRemote::new(manager.clone())));
    let Some(gateway) = gateway else {
        return Ok(Wiring {
            register: Arc::new(RedisRegister::reader(manager.clone(), directory.clone())),
            directory,
            remote,
            link: None,
        });
    };
    let register = Arc::new(RedisRegister::writer(
        manager.clone(),
        directory.clone(),
        name.node.clone(),
        name.instance,
    ));
    let link = Arc::new(RoomLink {
        target: target.clone(),
        redis: manager.clone(),
        register: register.clone(),
        node: name.node.clone(),
        instance: name.instance,
        gateways: advertised_gateways(config, gateway),
        region: config.cluster()?.region.clone(),
    });
    // Alive before any session names this run.
    let idle: LoadProbe = Box::new(NodeLoad::default);
    link.heartbeat(&idle)
        .await
        .context("cannot write this node's liveness record")?;
    Ok(Wiring {
        register,
        directory,
        remote,
        link: Some(link),
    })
}

/// The gateway's connections and this process's CPU use, read when asked.
fn load_probe(gateway: &Gateway) -> LoadProbe {
    let metrics = gateway.metrics();
    let cpu = Mutex::new(CpuMeter::start());
    Box::new(move || NodeLoad {
        connections: metrics.snapshot().connections_open,
        cpu_percent: cpu.lock().expect("cpu meter lock").percent(),
        shard_connections: metrics.shard_connections(),
    })
}

/// This process's CPU use between two readings, from /proc/self/stat.
struct CpuMeter {
    read_at: Instant,
    cpu_ticks: u64,
}

impl CpuMeter {
    fn start() -> CpuMeter {
        CpuMeter {
            read_at: Instant::now(),
            cpu_ticks: process_cpu_ticks().unwrap_or(0),
        }
    }

    /// Percent of one core used since the last call.
    fn percent(&mut self) -> f64 {
        let Some(ticks) = process_cpu_ticks() else {
            return 0.0;
        };
        // SAFETY: sysconf only reads a system constant.
        let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let elapsed = self.read_at.elapsed().as_secs_f64().max(1e-3);
        let used = ticks.saturating_sub(self.cpu_ticks) as f64 / ticks_per_sec;
        self.read_at = Instant::now();
        self.cpu_ticks = ticks;
        100.0 * used / elapsed
    }
}

/// utime + stime of this process, in clock ticks.
fn process_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may itself hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// glibc gives threads up to eight heap arenas per core, and each arena keeps
/// its own freed memory: a burst served by many threads leaves every arena
/// it touched at its peak. The limit is set once storage is open, before
/// the shards start: the runtime's workers and SQLite's connection threads
/// have their arenas by then and keep them, and later threads (the shards)
/// make no new one once that many exist. Set before any thread started, it
/// put SQLite's threads in the shards' arenas, and a 12-minute churn run
/// grew 4.9 MiB against 1.2 MiB: SQLite's churn fragmented them.
fn limit_heap_arenas(shards: usize) {
    let arenas = libc::c_int::try_from(shards + 1).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes allocator tuning.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

/// A connect storm allocates and frees many small objects across threads;
/// glibc keeps the freed pages in its arenas, so resident memory would stay
/// at the storm's peak. Trimming returns whole free pages to the kernel, so
/// steady-state memory tracks the connections actually held.
async fn trim_heap() {
    loop {
        tokio::time::sleep(HEAP_TRIM_INTERVAL).await;
        // SAFETY: malloc_trim only releases memory the allocator holds free.
        unsafe { libc::malloc_trim(0) };
    }
}

/// SIGTERM and Ctrl-C, caught from startup on: one that arrives while the
/// node starts still drains it instead of killing it.
struct ShutdownSignal {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    /// SIGHUP, caught from startup too (by default it would kill the
    /// process); it reloads the TLS certificate.
    hangup: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<ShutdownSignal> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignal {
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            hangup: Some(signal(SignalKind::hangup()).context("installing a SIGHUP handler")?),
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// What SIGHUP can change without a restart.
struct Reload {
    /// None: no config file (`herald serve` on its defaults).
    source: Option<ConfigSource>,
    /// The config as last read.
    config: Config,
    logging: logging::Logging,
    apps: Arc<Apps>,
    tls: Option<TlsAcceptor>,
}

/// The config's top-level sections that SIGHUP applies; a change to any
/// other waits for a restart.
const RELOADED_SECTIONS: [&str; 2] = ["log", "apps"];

/// The top-level sections (and keys) whose values differ.
fn changed_sections(old: &Config, new: &Config) -> Vec<String> {
    let table = |config: &Config| match toml::Value::try_from(config) {
        Ok(toml::Value::Table(table)) => table,
        _ => toml::map::Map::new(),
    };
    let (old, new) = (table(old), table(new));
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|key| old.get(*key) != new.get(*key))
        .cloned()
        .collect()
}

impl Reload {
    /// Reads the config file again and applies what can change: the log
    /// filter, the file's apps (rates, limits, secrets, webhooks), and the
    /// TLS certificate's PEM files. A file with problems changes nothing.
    async fn reload(&mut self) {
        let mut reloaded = Vec::new();
        let mut needs_restart = Vec::new();
        if let Some(source) = &self.source {
            match source() {
                Ok(config) => {
                    match self.logging.set_level(&config.log) {
                        Ok(level) => reloaded.push(format!("log level {level:?}")),
                        Err(error) => tracing::warn!("SIGHUP: log level kept: {error:#}"),
                    }
                    match self.apps.put_file_apps(file_apps(&config)).await {
                        Ok(()) => reloaded.push(format!("{} [[apps]]", config.apps.len())),
                        Err(error) => {
                            tracing::warn!(%error, "SIGHUP: the file's apps were not all applied")
                        }
                    }
                    if config.log.format != self.config.log.format {
                        needs_restart.push("log.format".to_owned());
                    }
                    needs_restart.extend(
                        changed_sections(&self.config, &config)
                            .into_iter()
                            .filter(|section| !RELOADED_SECTIONS.contains(&section.as_str())),
                    );
                    self.config = config;
                }
                Err(error) => {
                    tracing::warn!("SIGHUP: the config file was not applied: {error:#}");
                }
            }
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => reloaded.push("TLS certificate".to_owned()),
                Err(error) => tracing::warn!(%error, "SIGHUP: kept the TLS certificate in use"),
            }
        }
        tracing::info!(
            reloaded = %reloaded.join(", "),
            needs_restart = %needs_restart.join(", "),
            "SIGHUP: reloaded what can change without a restart"
        );
    }
}

async fn reload_on_hangup(hangup: Option<tokio::signal::unix::Signal>, mut reload: Reload) {
    let Some(mut hangup) = hangup else { return };
    while hangup.recv().await.is_some() {
        reload.reload().await;
    }
}

fn render_gateway_metrics(metrics: &GatewayMetrics, apps: &AppUpdater, text: &mut String) {
    let s = metrics.snapshot();
    for (name, kind, help, value) in [
        (
            "herald_connections",
            "gauge",
            "Client connections open now.",
            s.connections_open,
        ),
        (
            "herald_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            s.connections_accepted,
        ),
        (
            "herald_connections_refused_total",
            "counter",
            "Client connections refused at the per-shard limit.",
            s.connections_refused,
        ),
        (
            "herald_frames_in_total",
            "counter",
            "Frames received from clients.",
            s.frames_in,
        ),
        (
            "herald_frames_out_total",
            "counter",
            "Frames sent to clients.",
            s.frames_out,
        ),
        (
            "herald_pushes_sent_total",
            "counter",
            "PUSH frames sent to clients.",
            s.pushes_out,
        ),
        (
            "herald_acks_total",
            "counter",
            "ACKs from clients that advanced a cursor.",
            s.acks_in,
        ),
    ] {
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let _ = writeln!(
        text,
        "# HELP herald_connections_closed_total Client connections closed, by reason.\n\
         # TYPE herald_connections_closed_total counter"
    );
    for (reason, count) in CLOSE_REASONS.iter().zip(s.closed) {
        let _ = writeln!(
            text,
            "herald_connections_closed_total{{reason=\"{reason}\"}} {count}"
        );
    }
    let _ = writeln!(
        text,
        "# HELP herald_connections_turned_away_total Client connections turned away with \
         GOAWAY(overloaded), by the limit they met.\n\
         # TYPE herald_connections_turned_away_total counter"
    );
    for (reason, count) in TURN_AWAY_REASONS.iter().zip(s.turned_away) {
        let _ = writeln!(
            text,
            "herald_connections_turned_away_total{{reason=\"{reason}\"}} {count}"
        );
    }
    let _ = writeln!(
        text,
        "# HELP herald_app_connections Connections with the app bound now, by app.\n\
         # TYPE herald_app_connections gauge"
    );
    for (app, bound) in apps.bound_counts() {
        let _ = writeln!(text, "herald_app_connections{{app=\"{app}\"}} {bound}");
    }
    let _ = writeln!(
        text,
        "# HELP herald_shard_connections Client connections open now, by gateway shard.\n\
         # TYPE herald_shard_connections gauge"
    );
    for (shard, open) in metrics.shard_connections().iter().enumerate() {
        let _ = writeln!(text, "herald_shard_connections{{shard=\"{shard}\"}} {open}");
    }
    herald_control::metrics::encode_registry(metrics.registry(), text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }

    #[test]
    fn without_a_choice_io_uring_is_used_where_it_can_be_else_epoll_says_so() {
        let (io, line) = choose_io(None, || Ok(())).unwrap();
        assert_eq!((io, line), (IoSetting::Uring, None));
        let (io, line) = choose_io(None, refused).unwrap();
        assert_eq!(io, IoSetting::Epoll);
        let line = line.expect("one line says why");
        assert!(
            line.contains("io_uring is unavailable") && line.contains("epoll"),
            "{line}"
        );
    }

    #[test]
    fn a_chosen_driver_is_kept_or_fails_clearly() {
        assert_eq!(
            choose_io(Some(IoSetting::Epoll), refused).unwrap(),
            (IoSetting::Epoll, None)
        );
        let error = choose_io(Some(IoSetting::Uring), refused)
            .unwrap_err()
            .to_string();
        assert!(error.contains("--io epoll"), "{error}");
        assert_eq!(
            choose_io(Some(IoSetting::Uring), || Ok(())).unwrap(),
            (IoSetting::Uring, None)
        );
    }
}
