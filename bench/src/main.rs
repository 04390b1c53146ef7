//! herald-bench: Herald's capacity and latency benchmark.
//!
//! It starts the servers under test and a pool of load-generator processes
//! (a process may hold at most 20,000 open files here, so both sides are
//! spread over several processes, and clients over many source addresses in
//! 127.0.0.0/8), measures, prints a one-screen summary with the machine and
//! the command, and writes the figures as JSON. See bench/README.md.

mod broadcast;
mod cluster;
mod conn;
mod http_floor;
mod interrupt;
mod jetstream;
mod payload;
mod pool;
mod procfs;
mod push;
mod search;
mod soak;
mod systems;
mod transport;
mod tuning;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::pool::{Clients, Workers, progress_bar};
use crate::procfs::PeakSampler;
use crate::push::PushArgs;
use crate::systems::{AppCreds, CONNECTIONS_PER_PROCESS, Server};
use crate::transport::{Pki, Transport, row_name};
use crate::worker::{Target, user_id};

#[derive(Parser)]
#[command(
    name = "herald-bench",
    about = "Herald's density and latency benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Ramp to N authenticated connections; report the accept+auth rate.
    Connect(Common),
    /// Hold N idle connections: bytes per connection, heartbeat CPU, and
    /// peak memory while pushing to all of them at once.
    Idle(Common),
    /// Unicast pushes at a rate through the API: end-to-end latency; or
    /// the highest rate kept up with (--find-max-rate); Herald alone or as
    /// a cluster, with JetStream beside it.
    Push {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        push: PushArgs,
    },
    /// Drop a fraction of the connections at once and time their return;
    /// with --drain, drain a gateway and record its clients' return to
    /// another, second by second.
    Storm {
        #[command(flatten)]
        common: Common,
        /// The fraction of connections dropped.
        #[arg(long, default_value_t = 0.2)]
        fraction: f64,
        #[command(flatten)]
        drain: DrainArgs,
    },
    /// The same idle connections against Herald, Mosquitto and NATS.
    Peers(Common),
    /// One 256-byte message to every connected client, through Herald,
    /// Mosquitto and NATS: time to the last receipt, and peak memory.
    Broadcast(Common),
    /// Churn for --duration: reconnects, unicast pushes and broadcasts;
    /// every accepted message received exactly once, and the gateways'
    /// memory growth.
    Soak {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        soak: soak::SoakArgs,
    },
    /// Every scenario in turn.
    All {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 0.2)]
        fraction: f64,
        #[command(flatten)]
        push: PushArgs,
    },
    #[command(hide = true)]
    Worker { spec: String },
    /// The HTTP floor of `push --with-http-floor` (see `http_floor`).
    #[command(hide = true)]
    HttpFloorServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        app: String,
        #[arg(long)]
        api_key: String,
    },
    #[command(hide = true)]
    Hold {
        /// Send with batched io_uring submissions instead of send(2).
        #[arg(long)]
        uring: bool,
        /// After each line's sends, read every client's reply.
        #[arg(long)]
        read_replies: bool,
    },
}

/// `storm --drain`: two gateways, every client on the first, which gets
/// SIGTERM; they come back to the second after their GOAWAY's hint.
#[derive(Args, Clone)]
struct DrainArgs {
    /// Drain a gateway instead of dropping connections.
    #[arg(long)]
    drain: bool,
    /// The drained gateway's `gateway.drain_spread_secs`.
    #[arg(long, default_value_t = 30, requires = "drain")]
    drain_spread_secs: u64,
    /// Its `gateway.drain_reconnect_delay_ms`.
    #[arg(long, default_value_t = 1_000, requires = "drain")]
    drain_reconnect_delay_ms: u32,
}

#[derive(Args, Clone)]
struct Common {
    /// Connections in all.
    #[arg(long, default_value_t = 20_000)]
    connections: u64,
    /// New connections per second (0: as fast as they go); in `push`,
    /// pushes per second.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds to hold (idle), to push (push) or to churn (soak; default
    /// 30, soak: 3600).
    #[arg(long = "duration")]
    duration_arg: Option<u64>,
    /// `--duration`, or the scenario's default.
    #[arg(skip)]
    duration: u64,
    /// Client heartbeat interval, and the gateways' configured one.
    #[arg(long, default_value_t = 60)]
    heartbeat_secs: u64,
    /// Gateway processes (default: one per 15,000 connections).
    #[arg(long)]
    gateways: Option<usize>,
    /// The gateway driver: uring or epoll.
    #[arg(long, default_value = "uring")]
    io: String,
    /// The herald binary (default: HERALD_BIN, or beside herald-bench).
    #[arg(long)]
    herald: Option<PathBuf>,
    /// A running gateway to load instead of starting them here (repeat
    /// for several processes). Needs --api and --config.
    #[arg(long = "gateway", value_name = "ADDR")]
    gateways_running: Vec<SocketAddr>,
    /// The HTTP API of the running gateways: once for all of them, or once
    /// per --gateway in the same order (one `herald serve` each).
    #[arg(long = "api", value_name = "ADDR")]
    apis_running: Vec<SocketAddr>,
    /// The running gateways' config file, for the app's token secret and
    /// API key.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The app to bind and push to (default: the config's only app).
    #[arg(long)]
    app: Option<String>,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// In `broadcast`, Herald's clients do not ack it (the peers' QoS 0
    /// clients never do): shows what the acks cost.
    #[arg(long)]
    no_broadcast_ack: bool,
    /// The systems `peers` and `broadcast` compare (repeat; default: all).
    #[arg(long = "system", value_name = "NAME",
          value_parser = clap::builder::PossibleValuesParser::new(SYSTEMS.map(|(name, _)| name)))]
    systems: Vec<String>,
    /// What the clients speak: tcp, tls, ws or wss (repeat to measure
    /// several in one run, each against its own servers; default tcp).
    /// Mosquitto and NATS are measured over tcp and tls; bare sockets are
    /// always plain TCP.
    #[arg(long = "transport", value_name = "TRANSPORT")]
    transports: Vec<Transport>,
    /// With --gateway and a tls or wss transport: the CA certificate (PEM)
    /// the running gateways' certificate is checked against (it must name
    /// their IP address).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The certificate made for the servers started here (tls, wss).
    #[arg(skip)]
    pki: Option<Arc<Pki>>,
    /// A small run for CI: 2,000 connections, 5 s, checks zero failures.
    #[arg(long)]
    quick: bool,
}

impl Common {
    fn apply_quick(&mut self) {
        if self.quick {
            self.connections = self.connections.min(2_000);
            self.duration = self.duration.min(5);
            self.gateways = Some(2);
        }
    }

    fn gateway_count(&self) -> usize {
        if !self.gateways_running.is_empty() {
            return self.gateways_running.len();
        }
        self.gateways
            .unwrap_or_else(|| self.connections.div_ceil(CONNECTIONS_PER_PROCESS) as usize)
            .max(1)
    }

    /// Checks the running-gateway flags go together.
    fn check(&self) -> anyhow::Result<()> {
        let running = self.gateways_running.len();
        if running == 0 {
            anyhow::ensure!(
                self.apis_running.is_empty()
                    && self.config.is_none()
                    && self.app.is_none()
                    && self.ca.is_none(),
                "--api, --config, --app and --ca describe running gateways: give --gateway too"
            );
            return Ok(());
        }
        let transports = self.transports();
        anyhow::ensure!(
            transports.len() == 1,
            "running gateways are loaded over the one transport they listen with: give one \
             --transport"
        );
        anyhow::ensure!(
            !transports[0].uses_tls() || self.ca.is_some(),
            "--transport {} with --gateway needs --ca (the CA certificate the gateways' \
             certificate is checked against)",
            transports[0]
        );
        anyhow::ensure!(
            self.config.is_some(),
            "--gateway needs --config (the gateways' config, for the app's secrets)"
        );
        anyhow::ensure!(
            self.apis_running.len() == 1 || self.apis_running.len() == running,
            "--gateway needs --api once, or once per --gateway ({running})"
        );
        Ok(())
    }

    /// The transports to measure, in the order given (default: tcp).
    fn transports(&self) -> Vec<Transport> {
        let mut transports = Vec::new();
        for &transport in &self.transports {
            if !transports.contains(&transport) {
                transports.push(transport);
            }
        }
        if transports.is_empty() {
            transports.push(Transport::Tcp);
        }
        transports
    }

    /// The CA certificate the clients trust: --ca, or the one made here.
    fn ca_file(&self) -> Option<&Path> {
        self.ca
            .as_deref()
            .or_else(|| self.pki.as_ref().map(|pki| pki.ca_file.as_path()))
    }

    /// Clients of `target` over `transport` for these servers, one per
    /// connection, receiving as the idle scenarios do.
    fn clients<'a>(
        &'a self,
        target: Target,
        transport: Transport,
        creds: &'a AppCreds,
        servers: &'a [SocketAddr],
    ) -> Clients<'a> {
        Clients {
            target,
            transport,
            ca_file: self.ca_file(),
            creds,
            servers,
            connections: self.connections,
            rate_per_sec: self.rate,
            heartbeat_secs: self.heartbeat_secs,
            subscribe: None,
            // Bare clients reply only in the `bare-acked` row.
            ack_broadcasts: target != Target::Bare,
            drain_to: None,
            track_deliveries: false,
        }
    }

    /// The systems to compare, in the usual order.
    fn systems(&self) -> impl Iterator<Item = (&'static str, Target)> + '_ {
        SYSTEMS
            .into_iter()
            .filter(|(name, _)| self.systems.is_empty() || self.systems.iter().any(|s| s == name))
    }

    /// What the run puts on this host, for the kernel settings it needs.
    fn needs(&self) -> tuning::Needs {
        let workers = pool::worker_count(self.connections);
        tuning::Needs {
            connections: self.connections,
            // Running gateways are already counted in the host's memory.
            servers: if self.gateways_running.is_empty() {
                self.gateway_count() as u64
            } else {
                0
            },
            workers,
            clients_per_worker: self.connections.div_ceil(workers),
            sources_per_worker: u64::from(pool::SOURCES_PER_WORKER),
        }
    }

    /// The app clients bind: the config's, or the one of gateways started here.
    fn creds(&self) -> anyhow::Result<AppCreds> {
        match &self.config {
            Some(path) => AppCreds::from_config(path, self.app.as_deref()),
            None => Ok(AppCreds::default()),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Scenario::Worker { .. } | Scenario::Hold { .. } | Scenario::HttpFloorServer { .. }
    ) {
        // Before any thread starts: they inherit the blocked signals.
        interrupt::install();
    }
    let result = match cli.command {
        Scenario::Worker { spec } => serde_json::from_str(&spec)
            .context("bad worker spec")
            .and_then(worker::run),
        Scenario::Hold {
            uring,
            read_replies,
        } => systems::hold(uring, read_replies),
        Scenario::HttpFloorServer {
            listen,
            app,
            api_key,
        } => http_floor::serve(listen, app, api_key),
        scenario => run(scenario),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald-bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(scenario: Scenario) -> anyhow::Result<()> {
    let mut drain = None;
    let mut soak_args = None;
    let (name, mut common, fraction, push_args) = match scenario {
        Scenario::Connect(c) => ("connect", c, 0.0, None),
        Scenario::Idle(c) => ("idle", c, 0.0, None),
        Scenario::Push { common, push } => ("push", common, 0.0, Some(push)),
        Scenario::Storm {
            common,
            drain: args,
            ..
        } if args.drain => {
            drain = Some(args);
            // One gateway drained, one the clients come back to.
            let common = Common {
                gateways: Some(2),
                ..common
            };
            ("storm-drain", common, 0.0, None)
        }
        Scenario::Storm {
            common, fraction, ..
        } => ("storm", common, fraction, None),
        Scenario::Peers(c) => ("peers", c, 0.0, None),
        Scenario::Broadcast(c) => ("broadcast", c, 0.0, None),
        Scenario::Soak { common, soak } => {
            soak_args = Some(soak);
            ("soak", common, 0.0, None)
        }
        Scenario::All {
            common,
            fraction,
            push,
        } => ("all", common, fraction, Some(push)),
        Scenario::Worker { .. } | Scenario::Hold { .. } | Scenario::HttpFloorServer { .. } => {
            unreachable!("handled in main")
        }
    };
    common.duration = common
        .duration_arg
        .unwrap_or(if name == "soak" { 3600 } else { 30 });
    common.apply_quick();
    common.check()?;
    // Before anything starts: the host's limits for this many connections,
    // raised for the run (as root) and restored when `_tuning` is dropped.
    let _tuning = tuning::prepare(&common.needs())?;
    raise_open_file_limit(common.connections)?;
    if common.gateways_running.is_empty() && common.transports().iter().any(|t| t.uses_tls()) {
        common.pki = Some(Arc::new(Pki::generate()?));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = serde_json::Map::new();
    let mut failures = 0u64;
    let mut record = |key: &str, value: Value| {
        failures += value["failures_total"].as_u64().unwrap_or(0);
        results.insert(key.to_owned(), value);
    };
    if matches!(name, "connect" | "all") {
        record("connect", connect(&common)?);
    }
    if matches!(name, "idle" | "all") {
        record("idle", runtime.block_on(idle(&common))?);
    }
    if let Some(push_args) = &push_args {
        record("push", runtime.block_on(push::push(&common, push_args))?);
    }
    if matches!(name, "storm" | "all") {
        record("storm", storm(&common, fraction)?);
    }
    if let Some(drain) = &drain {
        record("storm_drain", storm_drain(&common, drain)?);
    }
    if matches!(name, "peers" | "all") {
        record("peers", peers(&common)?);
    }
    if matches!(name, "broadcast" | "all") {
        record(
            "broadcast",
            runtime.block_on(broadcast::broadcast(&common))?,
        );
    }
    if let Some(soak_args) = &soak_args {
        record("soak", runtime.block_on(soak::soak(&common, soak_args))?);
    }
    let report = json!({
        "scenario": name,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": procfs::machine(),
        "connections": common.connections,
        "gateways": common.gateway_count(),
        "io": common.io,
        "transports": common.transports(),
        "heartbeat_secs": common.heartbeat_secs,
        "results": results,
        "failures_total": failures,
    });
    print_summary(&report);
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    anyhow::ensure!(
        !common.quick || failures == 0,
        "{failures} failures in a --quick run"
    );
    // A soak's failures are messages lost, unexpected or duplicated (and
    // API errors): the run's target is none.
    anyhow::ensure!(
        soak_args.is_none() || failures == 0,
        "{failures} messages lost, unexpected or duplicated, or API errors, in the soak"
    );
    Ok(())
}

/// Raises this process's soft open-file limit to the hard one (the
/// workers and bare acceptors it starts inherit it), and checks that a
/// worker's share of the connections fits under it.
fn raise_open_file_limit(connections: u64) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    // A worker's clients, and its own few files (pipes, runtime).
    let workers = pool::worker_count(connections);
    let need = connections.div_ceil(workers) + 64;
    anyhow::ensure!(
        limit.rlim_max >= need,
        "a process may hold {} open files here (hard limit), a load-generator worker needs {need}",
        limit.rlim_max
    );
    Ok(())
}

struct Gateways {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Gateways {
    /// The gateways under test: the running ones given with --gateway, or
    /// `herald serve` processes started here, listening with `transport`.
    fn start(common: &Common, transport: Transport) -> anyhow::Result<Gateways> {
        let dir = tempfile::tempdir()?;
        let servers = herald_servers(common, transport, dir.path())?;
        Ok(Gateways { servers, _dir: dir })
    }

    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }
}

/// The running gateways given with --gateway, or `herald serve` processes
/// started here with their data in `dir`, listening with `transport`.
fn herald_servers(
    common: &Common,
    transport: Transport,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Server>> {
    herald_servers_on(common, &common.io, transport, dir)
}

/// `herald_servers`, the ones started here on driver `io`.
fn herald_servers_on(
    common: &Common,
    io: &str,
    transport: Transport,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Server>> {
    if common.gateways_running.is_empty() {
        return start_heralds(common, io, transport, dir);
    }
    common
        .gateways_running
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            let api = common.apis_running[i.min(common.apis_running.len() - 1)];
            Server::external(addr, api)
        })
        .collect()
}

fn start_heralds(
    common: &Common,
    io: &str,
    transport: Transport,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Server>> {
    let herald = systems::herald_bin(common.herald.as_deref())?;
    (0..common.gateway_count())
        .map(|i| {
            systems::start_herald(
                &herald,
                dir,
                i,
                common.heartbeat_secs,
                io,
                transport,
                common.pki.as_deref(),
            )
        })
        .collect()
}

fn total_rss(servers: &[Server]) -> anyhow::Result<u64> {
    servers.iter().map(|s| procfs::rss_bytes(s.pid())).sum()
}

fn total_cpu(servers: &[Server]) -> anyhow::Result<f64> {
    servers.iter().map(|s| procfs::cpu_seconds(s.pid())).sum()
}

fn failures_json(failures: &std::collections::BTreeMap<String, u64>) -> (Value, u64) {
    (json!(failures), failures.values().sum())
}

/// What N idle connections cost a set of servers: user space (their RSS)
/// and kernel (slab, both ends on this host, so the server's share is half).
struct Density {
    ramp: pool::Ramp,
    rss_before: u64,
    rss_after: u64,
    slab_delta: i64,
    /// The load generator's own memory then (not part of any figure: it
    /// says the clients fit the machine).
    load_generator_rss: u64,
}

impl Density {
    fn user_per_conn(&self) -> f64 {
        (self.rss_after as f64 - self.rss_before as f64) / self.ramp.connections as f64
    }

    fn kernel_per_conn(&self) -> f64 {
        self.slab_delta as f64 / self.ramp.connections as f64 / 2.0
    }

    fn json(&self) -> Value {
        let (failures, total) = failures_json(&self.ramp.failures);
        json!({
            "connections": self.ramp.connections,
            "accept_per_sec": self.ramp.per_second,
            "ramp_secs": self.ramp.seconds,
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "slab_delta_bytes": self.slab_delta,
            "user_bytes_per_conn": self.user_per_conn(),
            "kernel_bytes_per_conn": self.kernel_per_conn(),
            "all_in_bytes_per_conn": self.user_per_conn() + self.kernel_per_conn(),
            "load_generator_rss_bytes": self.load_generator_rss,
            "load_generator_bytes_per_conn":
                self.load_generator_rss as f64 / self.ramp.connections.max(1) as f64,
            "failures": failures,
            "failures_total": total,
        })
    }
}

/// Connects N clients of `target` over `transport` to `servers` and
/// measures the density.
fn measure_density(
    servers: &[Server],
    target: Target,
    transport: Transport,
    common: &Common,
    label: &str,
) -> anyhow::Result<(Density, Workers)> {
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = total_rss(servers)?;
    let slab_before = procfs::slab_bytes()?;
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let creds = common.creds()?;
    let mut workers = Workers::start(&common.clients(target, transport, &creds, &addrs))?;
    let ramp = workers.wait_all_up(pool::ramp_timeout(common.connections), label)?;
    // Measure the steady state, not the connect storm: let the servers
    // finish what the storm started and return freed memory (Herald trims
    // its heap every 10 s), and the kernel run its deferred frees.
    std::thread::sleep(if common.quick { SETTLE_QUICK } else { SETTLE });
    let density = Density {
        ramp,
        rss_before,
        rss_after: total_rss(servers)?,
        slab_delta: procfs::slab_bytes()? as i64 - slab_before as i64,
        load_generator_rss: workers
            .pids()
            .into_iter()
            .filter_map(|pid| procfs::rss_bytes(pid).ok())
            .sum(),
    };
    Ok((density, workers))
}

/// The kernel's own cost of an idle TCP connection: plain sockets to bare
/// acceptors, measured the same way.
fn bare_baseline(common: &Common) -> anyhow::Result<Density> {
    let holders = (0..common.gateway_count())
        .map(|_| systems::start_holder(false, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (density, workers) = measure_density(
        &holders,
        Target::Bare,
        Transport::Tcp,
        common,
        "bare sockets",
    )?;
    drop(workers);
    drop(holders);
    settle_after_teardown();
    Ok(density)
}

/// How long after the last connection is up the steady state is measured
/// (`--quick` runs only check that everything works, and wait less).
const SETTLE: Duration = Duration::from_secs(12);
const SETTLE_QUICK: Duration = Duration::from_secs(2);

fn settle_after_teardown() {
    // Closed sockets leave the slab over a moment (RCU, TIME_WAIT).
    std::thread::sleep(Duration::from_secs(3));
}

/// Rows by name (`herald`, `herald-tls`, ...) with their failures summed.
fn rows_json(rows: serde_json::Map<String, Value>) -> Value {
    let failures_total: u64 = rows
        .values()
        .map(|row| row["failures_total"].as_u64().unwrap_or(0))
        .sum();
    json!({ "servers": rows, "failures_total": failures_total })
}

/// The `connect` scenario: for each transport, Herald's accept rate.
fn connect(common: &Common) -> anyhow::Result<Value> {
    let mut rows = serde_json::Map::new();
    for transport in common.transports() {
        let name = row_name(transport, "herald");
        rows.insert(name.clone(), connect_one(common, transport, &name)?);
    }
    Ok(rows_json(rows))
}

fn connect_one(common: &Common, transport: Transport, label: &str) -> anyhow::Result<Value> {
    let gateways = Gateways::start(common, transport)?;
    let creds = common.creds()?;
    let addrs = gateways.addrs();
    let mut workers = Workers::start(&common.clients(Target::Herald, transport, &creds, &addrs))?;
    let ramp = workers.wait_all_up(pool::ramp_timeout(common.connections), label)?;
    let (failures, total) = failures_json(&ramp.failures);
    drop(workers);
    drop(gateways);
    settle_after_teardown();
    Ok(json!({
        "transport": transport,
        "connections": ramp.connections,
        "target_rate": common.rate,
        "accept_per_sec": ramp.per_second,
        "secs_to_all": ramp.seconds,
        "failures": failures,
        "failures_total": total,
    }))
}

/// The `idle` scenario: the bare sockets once, then Herald over each
/// transport.
async fn idle(common: &Common) -> anyhow::Result<Value> {
    let bare = bare_baseline(common)?;
    let mut rows = serde_json::Map::new();
    for transport in common.transports() {
        let name = row_name(transport, "herald");
        rows.insert(
            name.clone(),
            idle_one(common, transport, &bare, &name).await?,
        );
    }
    let mut value = rows_json(rows);
    value["bare"] = bare.json();
    Ok(value)
}

async fn idle_one(
    common: &Common,
    transport: Transport,
    bare: &Density,
    label: &str,
) -> anyhow::Result<Value> {
    // The host before the run's gateways and clients: what they take at
    // each peak is measured from here.
    let available_before = procfs::memory_available_bytes()?;
    let gateways = Gateways::start(common, transport)?;
    let (density, mut workers) =
        measure_density(&gateways.servers, Target::Herald, transport, common, label)?;

    let cpu_before = total_cpu(&gateways.servers)?;
    let hold = Duration::from_secs(common.duration);
    let bar = progress_bar(common.duration, "holding (s)");
    let started = Instant::now();
    while started.elapsed() < hold {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(started.elapsed().as_secs());
    }
    bar.finish_and_clear();
    let cpu_secs = total_cpu(&gateways.servers)? - cpu_before;
    // Heartbeats kept every connection up through the hold: none closed,
    // none came back.
    let sessions_after_hold: u64 = workers.progress().iter().map(|p| p.sessions).sum();
    let connected_after_hold = workers.connected();

    let push_to_all =
        push_to_all(common, &gateways.servers, &mut workers, available_before).await?;
    // Let the gateways return what the push took before the broadcast's
    // idle is read (Herald trims its heap every 10 s).
    tokio::time::sleep(if common.quick { SETTLE_QUICK } else { SETTLE }).await;
    let broadcast_to_all =
        broadcast_to_all(common, &gateways.servers, &mut workers, available_before).await?;

    let failures = workers.failures();
    let (failures_value, failures_total) = failures_json(&failures);
    drop(workers);
    drop(gateways);
    settle_after_teardown();

    let lost = |step: &Value| {
        step["api_errors"].as_u64().unwrap_or(0) + step["not_received"].as_u64().unwrap_or(0)
    };
    let all_in = density.user_per_conn() + density.kernel_per_conn();
    let mut row = density.json();
    let extra = json!({
        "transport": transport,
        "all_in_over_bare": all_in / bare.kernel_per_conn(),
        "heartbeat_cpu_percent_of_one_core": cpu_secs / hold.as_secs_f64() * 100.0,
        "hold_secs": common.duration,
        "connected_after_hold": connected_after_hold,
        "sessions_after_hold": sessions_after_hold,
        "push_to_all": push_to_all,
        "broadcast_to_all": broadcast_to_all,
        // Every failure of the run: the ramp's, and any after it.
        "failures": failures_value,
        "failures_total": failures_total + lost(&push_to_all) + lost(&broadcast_to_all),
    });
    for (key, value) in extra.as_object().expect("an object") {
        row[key] = value.clone();
    }
    Ok(row)
}

/// How often the gateways' memory is read while a message goes to
/// everyone: often enough to see the peak, rarely enough that reading 67
/// processes' status does not take a core from them.
const FAN_OUT_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// One message to every connection at once: multicasts of up to 1,000
/// users to each gateway's API, all in flight together. The gateways' peak
/// memory against idle, receipt latency.
async fn push_to_all(
    common: &Common,
    servers: &[Server],
    workers: &mut Workers,
    available_before: u64,
) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let creds = common.creds()?;
    let fan_out = FanOut::start(servers, workers)?;
    let mut calls = tokio::task::JoinSet::new();
    let count = servers.len() as u64;
    for (g, server) in servers.iter().enumerate() {
        let api = server.api.context("no api")?;
        let users: Vec<String> = (0..common.connections)
            .filter(|u| u % count == g as u64)
            .map(user_id)
            .collect();
        for batch in users.chunks(1000) {
            let url = format!("http://{api}/v1/apps/{}/messages", creds.app);
            let body = json!({ "users": batch, "payload": now_nanos().to_string() });
            let request = client.post(url).bearer_auth(&creds.api_key).json(&body);
            let users = batch.len() as u64;
            calls.spawn(async move {
                match request.send().await {
                    Ok(response) if response.status().is_success() => Ok(users),
                    Ok(response) => Err(format!("status {}", response.status())),
                    Err(error) => Err(error.to_string()),
                }
            });
        }
    }
    let bar = progress_bar(common.connections, "push to all");
    let wait = broadcast::receipt_deadline(common.connections).max(Duration::from_secs(120));
    let deadline = Instant::now() + wait;
    let mut api_errors = 0u64;
    let mut accepted = 0u64;
    let mut received;
    loop {
        while let Some(done) = calls.try_join_next() {
            match done {
                Ok(Ok(users)) => accepted += users,
                Ok(Err(error)) => {
                    if api_errors == 0 {
                        eprintln!("herald-bench: a multicast failed: {error}");
                    }
                    api_errors += 1;
                }
                Err(error) => return Err(error.into()),
            }
        }
        received = workers.pushes_received() - fan_out.received_before;
        bar.set_position(received);
        if calls.is_empty() && received >= accepted {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "herald-bench: only {received} of {accepted} accepted pushes received in {} s",
                wait.as_secs()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut row = fan_out.finish(workers, available_before)?;
    let not_received = accepted.saturating_sub(received);
    bar.finish_and_clear();
    row["api_errors"] = json!(api_errors);
    row["pushes_accepted"] = json!(accepted);
    row["not_received"] = json!(not_received);
    Ok(row)
}

/// What `push_to_all` and `broadcast_to_all` both measure from: the
/// gateways' idle memory, the receipts and latencies so far, and a sampler
/// of the gateways' memory while the message goes out.
struct FanOut {
    idle_rss: u64,
    latency_before: Histogram<u64>,
    received_before: u64,
    sampler: PeakSampler,
}

impl FanOut {
    fn start(servers: &[Server], workers: &mut Workers) -> anyhow::Result<FanOut> {
        let idle_rss = total_rss(servers)?;
        let (_, latency_before) = workers.report()?;
        Ok(FanOut {
            idle_rss,
            latency_before,
            received_before: workers.pushes_received(),
            sampler: PeakSampler::start(
                servers.iter().map(Server::pid).collect(),
                FAN_OUT_SAMPLE_INTERVAL,
            ),
        })
    }

    /// What both report: the gateways' memory at the peak against idle,
    /// and receipt latency (every receipt is timed from the send time in
    /// the payload).
    fn finish(self, workers: &mut Workers, available_before: u64) -> anyhow::Result<Value> {
        let peaks = self.sampler.finish();
        let (_, mut latency) = workers.report()?;
        latency.subtract(&self.latency_before)?;
        let peak_rss = peaks.rss.max(self.idle_rss);
        Ok(json!({
            "idle_rss_bytes": self.idle_rss,
            "peak_rss_bytes": peak_rss,
            "peak_over_idle": peak_rss as f64 / self.idle_rss.max(1) as f64,
            "peak_tcp_buffer_bytes": peaks.tcp_buffers,
            // Everything the run held at this peak, both ends, kernel and
            // user space (other programs on the host move it too).
            "host_memory_used_peak_bytes":
                available_before.saturating_sub(peaks.memory_available_min),
            "latency_us": percentiles(&latency),
            "ms_to_last_receipt": latency.max() as f64 / 1000.0,
        }))
    }
}

/// One broadcast through the broadcast API (one call per gateway process)
/// that every connection must receive: the time from the call to the last
/// receipt, receipt latency, and the gateways' peak memory against idle.
async fn broadcast_to_all(
    common: &Common,
    servers: &[Server],
    workers: &mut Workers,
    available_before: u64,
) -> anyhow::Result<Value> {
    let apis: Vec<SocketAddr> = servers
        .iter()
        .map(|s| s.api.context("no api"))
        .collect::<anyhow::Result<_>>()?;
    let client = reqwest::Client::new();
    let creds = common.creds()?;
    let fan_out = FanOut::start(servers, workers)?;
    let bar = progress_bar(common.connections, "broadcast to all");
    let wait = broadcast::receipt_deadline(common.connections).max(Duration::from_secs(120));
    let sent =
        broadcast::herald_broadcast(&client, &apis, &creds, &broadcast::payload(now_nanos())).await;
    let deadline = Instant::now() + wait;
    let mut received;
    loop {
        received = workers.pushes_received() - fan_out.received_before;
        bar.set_position(received);
        if sent.is_err() || received >= common.connections {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "herald-bench: only {received} of {} connections received the broadcast in {} s",
                common.connections,
                wait.as_secs()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut row = fan_out.finish(workers, available_before)?;
    bar.finish_and_clear();
    if let Err(error) = &sent {
        eprintln!("herald-bench: the broadcast failed: {error:#}");
    }
    row["received"] = json!(received);
    row["api_errors"] = json!(u64::from(sent.is_err()));
    row["not_received"] = json!(common.connections.saturating_sub(received));
    Ok(row)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn percentiles(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.50),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

/// The `storm` scenario, over each transport.
fn storm(common: &Common, fraction: f64) -> anyhow::Result<Value> {
    let mut rows = serde_json::Map::new();
    for transport in common.transports() {
        let name = row_name(transport, "herald");
        rows.insert(name.clone(), storm_one(common, fraction, transport, &name)?);
    }
    Ok(rows_json(rows))
}

fn storm_one(
    common: &Common,
    fraction: f64,
    transport: Transport,
    label: &str,
) -> anyhow::Result<Value> {
    let gateways = Gateways::start(common, transport)?;
    let creds = common.creds()?;
    let addrs = gateways.addrs();
    let mut workers = Workers::start(&common.clients(Target::Herald, transport, &creds, &addrs))?;
    workers.wait_all_up(pool::ramp_timeout(common.connections), label)?;
    let failures_before: u64 = workers.failures().values().sum();
    let dropped = (common.connections as f64 * fraction) as u64;
    let started_ms = worker::unix_ms();
    workers.command(&format!("drop {fraction}"))?;
    let deadline = Instant::now() + Duration::from_secs(120.max(dropped / 2_000));
    let back_ms = loop {
        let progress = workers.progress();
        let back: Vec<u64> = progress
            .iter()
            .filter_map(|p| p.storm_back_at_ms.filter(|&at| at >= started_ms))
            .collect();
        if back.len() == progress.len() {
            break back.into_iter().max().unwrap_or(started_ms);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "dropped connections not back in {} s",
            120.max(dropped / 2_000)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = back_ms.saturating_sub(started_ms) as f64 / 1000.0;
    let failures = workers.failures();
    let failures_total = failures.values().sum::<u64>() - failures_before;
    drop(workers);
    drop(gateways);
    settle_after_teardown();
    Ok(json!({
        "transport": transport,
        "fraction": fraction,
        "dropped": dropped,
        "secs_until_all_back": seconds,
        "reconnects_per_sec": dropped as f64 / seconds.max(0.001),
        "failures": failures,
        "failures_total": failures_total,
    }))
}

/// `storm --drain`, over each transport.
fn storm_drain(common: &Common, drain: &DrainArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(
        common.gateways_running.is_empty(),
        "storm --drain starts its own two gateways: it sends one SIGTERM"
    );
    let mut rows = serde_json::Map::new();
    for transport in common.transports() {
        let name = row_name(transport, "herald");
        rows.insert(
            name.clone(),
            storm_drain_one(common, drain, transport, &name)?,
        );
    }
    Ok(rows_json(rows))
}

/// Two `herald serve` gateways; every client binds to the first, which then
/// gets SIGTERM. The clients come back to the second after their GOAWAY's
/// hint: how many a second, from the signal on.
fn storm_drain_one(
    common: &Common,
    drain: &DrainArgs,
    transport: Transport,
    label: &str,
) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let herald = systems::herald_bin(common.herald.as_deref())?;
    let gateways = (0..2)
        .map(|i| {
            let data_dir = dir.path().join(format!("gateway-{i}"));
            std::fs::create_dir_all(&data_dir)?;
            let config = systems::herald_config(
                &data_dir,
                common.heartbeat_secs,
                &common.io,
                transport,
                common.pki.as_deref(),
                &systems::AppCreds::default(),
            )?
            .replacen(
                "[gateway]\n",
                &format!(
                    "[gateway]\ndrain_spread_secs = {}\ndrain_reconnect_delay_ms = {}\n",
                    drain.drain_spread_secs, drain.drain_reconnect_delay_ms
                ),
                1,
            );
            let path = data_dir.join("herald.toml");
            std::fs::write(&path, config)?;
            systems::start_herald_node(&herald, "serve", &path, &data_dir.join("herald.log"))
        })
        .collect::<anyhow::Result<Vec<Server>>>()?;
    let (drained, survivor) = (&gateways[0], &gateways[1]);
    let creds = common.creds()?;
    let mut workers = Workers::start(&Clients {
        drain_to: Some(survivor.addr),
        ..common.clients(Target::Herald, transport, &creds, &[drained.addr])
    })?;
    workers.wait_all_up(pool::ramp_timeout(common.connections), label)?;
    let failures_before: u64 = workers.failures().values().sum();

    let terminated_ms = worker::unix_ms();
    // SAFETY: kill(2) on the pid of a child this process started.
    if unsafe { libc::kill(drained.pid() as libc::pid_t, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot send SIGTERM");
    }
    let wait = Duration::from_secs(drain.drain_spread_secs + 120);
    let deadline = Instant::now() + wait;
    let bar = progress_bar(common.connections, "back after drain");
    let returns = loop {
        let mut returns = std::collections::BTreeMap::<u64, u64>::new();
        for progress in workers.progress() {
            for (slot, n) in progress.drain_returns {
                *returns.entry(slot).or_default() += n;
            }
        }
        let back: u64 = returns.values().sum();
        bar.set_position(back);
        if back >= common.connections {
            break returns;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {back} of {} drained clients back in {} s",
            common.connections,
            wait.as_secs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    // Second by second from the signal.
    let mut per_second: Vec<u64> = Vec::new();
    let mut last_ms = terminated_ms;
    for (slot, n) in returns {
        let at_ms = slot * worker::DRAIN_RETURN_SLOT_MS;
        let second = (at_ms.saturating_sub(terminated_ms) / 1000) as usize;
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        per_second[second] += n;
        last_ms = last_ms.max(at_ms + worker::DRAIN_RETURN_SLOT_MS);
    }
    let failures = workers.failures();
    let failures_total = failures.values().sum::<u64>() - failures_before;
    drop(workers);
    drop(gateways);
    settle_after_teardown();
    let peak = per_second.iter().copied().max().unwrap_or(0);
    Ok(json!({
        "transport": transport,
        "connections": common.connections,
        "drain_spread_secs": drain.drain_spread_secs,
        "drain_reconnect_delay_ms": drain.drain_reconnect_delay_ms,
        "reconnects_per_sec_after_sigterm": per_second,
        "peak_reconnects_per_sec": peak,
        // None when every GOAWAY goes at once.
        "even_spread_per_sec": (drain.drain_spread_secs > 0)
            .then(|| common.connections as f64 / drain.drain_spread_secs as f64),
        "secs_until_all_back": (last_ms - terminated_ms) as f64 / 1000.0,
        "failures": failures,
        "failures_total": failures_total,
    }))
}

/// The systems compared in one run, by name.
/// `herald` runs on `--io`, `herald-epoll` on epoll (side by side with the
/// io_uring default). `bare` is the kernel alone (`herald-bench hold`): in
/// `broadcast`, one plain send(2) per socket, the floor no server can beat
/// on the machine; `bare-uring` the same sends as io_uring submissions in
/// batches; `bare-acked` the same as `bare` with clients that reply to each
/// line as Herald's clients ack a broadcast, and an acceptor that reads
/// each reply once its sends are done: the floor of a fan-out that is
/// acked. `peers` always measures `bare`, as its baseline.
const SYSTEMS: [(&str, Target); 7] = [
    ("herald", Target::Herald),
    ("herald-epoll", Target::Herald),
    ("mosquitto", Target::Mqtt),
    ("nats", Target::Nats),
    ("bare", Target::Bare),
    ("bare-uring", Target::Bare),
    ("bare-acked", Target::Bare),
];

/// Whether the benchmark's clients of `target` speak `transport`: Herald
/// all four; MQTT and NATS tcp and tls; bare sockets are plain TCP.
fn speaks(target: Target, transport: Transport) -> bool {
    match target {
        Target::Herald => true,
        Target::Mqtt | Target::Nats => !transport.uses_websocket(),
        Target::Bare => transport == Transport::Tcp,
    }
}

/// Herald's gateways (see `herald_servers`), or as many Mosquitto brokers
/// or NATS servers, listening with `transport`, with their files in `dir`.
fn start_servers(
    common: &Common,
    system: &str,
    target: Target,
    transport: Transport,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Server>> {
    anyhow::ensure!(speaks(target, transport), "{target:?} over {transport}");
    let pki = if transport.uses_tls() {
        Some(common.pki.as_deref().context("no certificate made")?)
    } else {
        None
    };
    match target {
        Target::Herald if system == "herald-epoll" => {
            herald_servers_on(common, "epoll", transport, dir)
        }
        Target::Herald => herald_servers(common, transport, dir),
        Target::Mqtt => (0..common.gateway_count())
            .map(|i| systems::start_mosquitto(dir, i, pki))
            .collect(),
        Target::Nats => (0..common.gateway_count())
            .map(|i| systems::start_nats(dir, i, pki))
            .collect(),
        Target::Bare => (0..common.gateway_count())
            .map(|_| systems::start_holder(system == "bare-uring", system == "bare-acked"))
            .collect(),
    }
}

/// The (system, transport) pairs `peers` and `broadcast` measure, in
/// order: each system over each transport it speaks (bare once, over
/// TCP); and the names of the pairs left out.
fn rows_to_measure(common: &Common) -> (Vec<(&'static str, Target, Transport)>, Vec<String>) {
    let mut measured = Vec::new();
    let mut skipped = Vec::new();
    for (name, target) in common.systems() {
        if target == Target::Bare {
            measured.push((name, target, Transport::Tcp));
            continue;
        }
        for transport in common.transports() {
            if speaks(target, transport) {
                measured.push((name, target, transport));
            } else {
                skipped.push(row_name(transport, name));
            }
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "herald-bench: not measured: {} (Mosquitto and NATS are measured over tcp and tls)",
            skipped.join(", ")
        );
    }
    (measured, skipped)
}

fn peers(common: &Common) -> anyhow::Result<Value> {
    let bare = bare_baseline(common)?;
    let mut rows = serde_json::Map::new();
    let (measured, skipped) = rows_to_measure(common);
    // The baseline above is the bare row.
    for (name, target, transport) in measured.into_iter().filter(|&(_, t, _)| t != Target::Bare) {
        let dir = tempfile::tempdir()?;
        let servers = start_servers(common, name, target, transport, dir.path())?;
        let name = row_name(transport, name);
        let (density, workers) = measure_density(&servers, target, transport, common, &name)?;
        drop(workers);
        drop(servers);
        let mut value = density.json();
        value["transport"] = json!(transport);
        rows.insert(name, value);
        settle_after_teardown();
    }
    let mut value = rows_json(rows);
    value["bare"] = bare.json();
    value["skipped"] = json!(skipped);
    Ok(value)
}

fn print_summary(report: &Value) {
    let m = &report["machine"];
    println!("herald-bench {}", report["scenario"].as_str().unwrap_or(""));
    println!(
        "machine: {} ({} cpus, {:.1} GiB, Linux {})",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cpus"],
        m["memory_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
        m["kernel"].as_str().unwrap_or("?")
    );
    println!("command: {}", report["command"].as_str().unwrap_or(""));
    println!(
        "connections: {}  gateways: {}  io: {}  heartbeat: {} s",
        report["connections"], report["gateways"], report["io"], report["heartbeat_secs"]
    );
    let r = &report["results"];
    let rows = |scenario: &Value| -> Vec<(String, Value)> {
        scenario["servers"]
            .as_object()
            .map(|rows| rows.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    if let Some(c) = r.get("connect") {
        for (name, c) in rows(c) {
            println!(
                "connect {name}: {:.0} conn/s (accept+handshake+auth), all up in {:.2} s, \
                 failures {}",
                f(&c["accept_per_sec"]),
                f(&c["secs_to_all"]),
                c["failures"]
            );
        }
    }
    if let Some(i) = r.get("idle") {
        let b = &i["bare"];
        println!(
            "idle: bare socket kernel {:.0} B/conn, accept {:.0} conn/s",
            f(&b["kernel_bytes_per_conn"]),
            f(&b["accept_per_sec"])
        );
        for (name, h) in rows(i) {
            println!(
                "idle {name}: user {:.0} B/conn, kernel {:.0} B/conn, all-in {:.0} B/conn; \
                 all-in/bare {:.2}; load generator {:.0} MiB ({:.0} B/conn)",
                f(&h["user_bytes_per_conn"]),
                f(&h["kernel_bytes_per_conn"]),
                f(&h["all_in_bytes_per_conn"]),
                f(&h["all_in_over_bare"]),
                f(&h["load_generator_rss_bytes"]) / (1u64 << 20) as f64,
                f(&h["load_generator_bytes_per_conn"])
            );
            println!(
                "idle {name}: accept+handshake+auth {:.0} conn/s; heartbeats {:.2}% of one core \
                 over {} s; connected after the hold {} (sessions {})",
                f(&h["accept_per_sec"]),
                f(&h["heartbeat_cpu_percent_of_one_core"]),
                h["hold_secs"],
                h["connected_after_hold"],
                h["sessions_after_hold"]
            );
            for (step, title) in [
                ("push_to_all", "push to all (multicasts)"),
                ("broadcast_to_all", "broadcast to all"),
            ] {
                let s = &h[step];
                println!(
                    "idle {name}: {title}: gateways idle {:.0} MiB, peak/idle {:.3}; TCP buffers \
                     peak {:.0} MiB; host memory used at the peak {:.2} GiB; receipt p50 {:.1} ms \
                     p99 {:.1} ms, last {:.1} ms; api errors {}, not received {}",
                    f(&s["idle_rss_bytes"]) / (1u64 << 20) as f64,
                    f(&s["peak_over_idle"]),
                    f(&s["peak_tcp_buffer_bytes"]) / (1u64 << 20) as f64,
                    f(&s["host_memory_used_peak_bytes"]) / (1u64 << 30) as f64,
                    f(&s["latency_us"]["p50"]) / 1000.0,
                    f(&s["latency_us"]["p99"]) / 1000.0,
                    f(&s["ms_to_last_receipt"]),
                    s["api_errors"],
                    s["not_received"]
                );
            }
        }
    }
    if let Some(p) = r.get("push") {
        print_push_summary(p);
    }
    if let Some(s) = r.get("soak") {
        soak::print_summary(s);
    }
    if let Some(s) = r.get("storm") {
        for (name, s) in rows(s) {
            println!(
                "storm {name}: {} dropped, all back in {:.2} s ({:.0} reconnects/s), failures {}",
                s["dropped"],
                f(&s["secs_until_all_back"]),
                f(&s["reconnects_per_sec"]),
                s["failures_total"]
            );
        }
    }
    if let Some(s) = r.get("storm_drain") {
        for (name, s) in rows(s) {
            println!(
                "storm --drain {name}: {} clients, spread {} s, hint {} ms +-50%: all back on the \
                 other gateway in {:.1} s, peak {} reconnects/s ({}), failures {}",
                s["connections"],
                s["drain_spread_secs"],
                s["drain_reconnect_delay_ms"],
                f(&s["secs_until_all_back"]),
                s["peak_reconnects_per_sec"],
                match s["even_spread_per_sec"].as_f64() {
                    Some(even) => format!("even spread {even:.0}/s"),
                    None => "every GOAWAY at once".to_owned(),
                },
                s["failures_total"]
            );
            println!(
                "  reconnects per second after SIGTERM: {}",
                s["reconnects_per_sec_after_sigterm"]
            );
        }
    }
    if let Some(p) = r.get("peers") {
        println!(
            "peers ({} idle connections each; kernel share = slab delta / N / 2):",
            report["connections"]
        );
        println!(
            "  {:<14} {:>12} {:>12} {:>12} {:>14}",
            "server", "user B/conn", "kernel B/c", "all-in B/c", "accept conn/s"
        );
        let b = &p["bare"];
        println!(
            "  {:<14} {:>12} {:>12.0} {:>12.0} {:>14.0}",
            "bare",
            "-",
            f(&b["kernel_bytes_per_conn"]),
            f(&b["all_in_bytes_per_conn"]),
            f(&b["accept_per_sec"])
        );
        for (name, s) in rows(p) {
            println!(
                "  {:<14} {:>12.0} {:>12.0} {:>12.0} {:>14.0}",
                name,
                f(&s["user_bytes_per_conn"]),
                f(&s["kernel_bytes_per_conn"]),
                f(&s["all_in_bytes_per_conn"]),
                f(&s["accept_per_sec"])
            );
        }
    }
    if let Some(b) = r.get("broadcast") {
        println!(
            "broadcast ({} bytes to {} connected clients, sent once per server process):",
            b["payload_bytes"], report["connections"]
        );
        println!(
            "  {:<14} {:>9} {:>10} {:>10} {:>12} {:>11} {:>10} {:>11} {:>11}",
            "server",
            "received",
            "p50 ms",
            "p99 ms",
            "last ms",
            "idle MiB",
            "peak/idle",
            "server cpu",
            "loadgen cpu"
        );
        if let Some(servers) = b["servers"].as_object() {
            for (name, s) in servers {
                let ms = |v: &Value| v.as_f64().unwrap_or(0.0) / 1000.0;
                println!(
                    "  {:<14} {:>9} {:>10.1} {:>10.1} {:>12.1} {:>11.1} {:>10.3} {:>10.2}s {:>10.2}s",
                    name,
                    s["received"],
                    ms(&s["latency_us"]["p50"]),
                    ms(&s["latency_us"]["p99"]),
                    s["ms_to_last_receipt"].as_f64().unwrap_or(0.0),
                    s["idle_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                    s["peak_over_idle"].as_f64().unwrap_or(0.0),
                    s["server_cpu_seconds"].as_f64().unwrap_or(0.0),
                    s["load_generator_cpu_seconds"].as_f64().unwrap_or(0.0)
                );
            }
            for (name, s) in servers {
                if let Some(ratio) = s["last_receipt_over_tcp"].as_f64() {
                    println!("  {name}: last receipt / the same over tcp: {ratio:.2}");
                }
                for floor in broadcast::FLOORS {
                    if let Some(ratio) = s[format!("last_receipt_over_{floor}")].as_f64() {
                        println!("  {name}: last receipt / {floor}'s: {ratio:.2}");
                    }
                }
            }
        }
    }
    println!("failures in all: {}", report["failures_total"]);
}

fn print_push_summary(push: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0) / 1000.0;
    println!(
        "push ({}; {}-byte payloads; {} run(s), medians; at most {} calls in flight):",
        push["mode"].as_str().unwrap_or(""),
        push["payload_bytes"],
        push["runs"],
        push["in_flight_max"]
    );
    let Some(rows) = push["servers"].as_object() else {
        return;
    };
    for (name, row) in rows {
        if let Some(reason) = row["skipped"].as_str() {
            println!("  {name}: not measured: {reason}");
            continue;
        }
        // The HTTP floor says what it is: it stores nothing.
        let described = row.get("label").unwrap_or(&row["durability"]);
        println!("  {name}: {}", described.as_str().unwrap_or(""));
        let latency = &row["latency_us"];
        if push["mode"] == "find-max-rate" {
            let per_run: Vec<String> = row["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|run| match run["max_rate_per_sec"].as_u64() {
                    Some(rate) => rate.to_string(),
                    None => "none".to_owned(),
                })
                .collect();
            println!(
                "  {name}: highest rate with p99 <= {:.0} ms, kept up with: {:.0}/s (runs: {}); \
                 there achieved {:.0}/s, latency p50 {:.1} ms p99 {:.1} ms",
                ms(&push["criteria"]["p99_max_us"]),
                f(&row["max_rate_per_sec"]),
                per_run.join(", "),
                f(&row["throughput_per_sec"]),
                ms(&latency["p50"]),
                ms(&latency["p99"])
            );
            if let Some(ratio) = row["herald_to_floor"].as_f64() {
                println!("  {name}: highest rate / {}'s: {ratio:.3}", http_floor::ROW);
            }
        } else {
            println!(
                "  {name}: offered {}/s, achieved {:.0}/s; {} pushes, received {}; latency p50 \
                 {:.1} ms p99 {:.1} ms p99.9 {:.1} ms max {:.1} ms; errors {}, not received {}",
                row["target_rate"],
                f(&row["throughput_per_sec"]),
                row["pushes"],
                row["received"],
                ms(&latency["p50"]),
                ms(&latency["p99"]),
                ms(&latency["p999"]),
                ms(&latency["max"]),
                row["errors"],
                row["not_received"]
            );
        }
    }
}
