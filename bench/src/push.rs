//! The `push` scenario: unicast pushes through Herald's API to random
//! connected users at an offered rate, each timed end to end at the client
//! from the send time its payload starts with. Herald is one `herald
//! serve` per 15,000 connections (SQLite), or with `--cluster-storage` a
//! cluster of a control node and room nodes on MySQL/MariaDB or
//! PostgreSQL. With `--with-http-floor`, the same calls answered by a bare
//! axum handler that stores and delivers nothing (see `http_floor`), and
//! with `--with-jetstream`, NATS JetStream's publish-with-ack of the same
//! payloads at the same rates, are measured in the same run.
//!
//! A measurement is one step at `--rate` for `--duration`, or with
//! `--find-max-rate` a search (see `search`) for the highest rate that
//! passes: p99 latency within `--p99-max-ms`, the achieved rate at least
//! 95% of the offered one, no errors and every push received. `--runs N`
//! repeats it, each run against servers (and a database) of its own, and
//! reports the medians.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterSpec};
use crate::http_floor;
use crate::jetstream::{self, JetStream};
use crate::pool::{Clients, Workers, progress_bar};
use crate::search::{Outcome, Search, highest_passed, median};
use crate::systems::{AppCreds, Server};
use crate::transport::{Transport, row_name};
use crate::worker::{Target, user_id};
use crate::{Common, Gateways, failures_json, now_nanos, payload, pool, settle_after_teardown};

#[derive(Args, Clone)]
pub struct PushArgs {
    /// `push`: bytes of each payload (the send time, a space, padding).
    #[arg(long, default_value_t = 256, value_parser = payload::parse_len)]
    pub payload_bytes: usize,
    /// `push`: find the highest rate that passes (p99 within --p99-max-ms,
    /// achieved at least 95% of offered, every push received), from
    /// --rate up: doubling, then bisecting, in steps of --step-secs.
    #[arg(long)]
    pub find_max_rate: bool,
    /// `push --find-max-rate`: the p99 end-to-end latency bound.
    #[arg(long, default_value_t = 50.0)]
    pub p99_max_ms: f64,
    /// `push --find-max-rate`: seconds each step pushes for.
    #[arg(long, default_value_t = 5)]
    pub step_secs: u64,
    /// `push`: measure N times, each against servers of its own, and
    /// report the medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub runs: u64,
    /// `push`: run Herald as a cluster storing on this database server
    /// (mysql://USER@HOST:PORT/DB or postgres://USER@HOST:PORT/DB, DB
    /// being where the run's own database is created from): one `herald
    /// control` taking the pushes, and the room nodes (--gateways) the
    /// clients connect to.
    #[arg(long, value_name = "URL")]
    pub cluster_storage: Option<String>,
    /// `push --cluster-storage`: the Redis the nodes share.
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub cluster_redis: String,
    /// `push`: also make the same calls at the same rates to an HTTP
    /// server on Herald's API stack that parses them and answers, storing
    /// and delivering nothing: the floor of an API call on this machine.
    #[arg(long)]
    pub with_http_floor: bool,
    /// `push`: also publish the same payloads at the same rates to NATS
    /// JetStream file streams with acks, on servers started here with
    /// `sync_interval: always` and with the default sync.
    #[arg(long)]
    pub with_jetstream: bool,
    /// `push --with-jetstream`: the nats-server binary (sync_interval
    /// needs 2.10 or later; an older server's always row is skipped, with
    /// its reason).
    #[arg(long, value_name = "PATH", default_value = "nats-server")]
    pub nats_server: PathBuf,
}

/// Calls in flight at once, at most, to Herald's API, the HTTP floor or
/// JetStream: past
/// it, sending waits, and the achieved rate falls behind the offered one.
const IN_FLIGHT_MAX: usize = 256;
/// A step is kept up with when it achieved at least this share of the
/// offered rate.
const ACHIEVED_SHARE_MIN: f64 = 0.95;
/// How close `--find-max-rate` gets: the rate that failed is within 5% of
/// the answer.
const SEARCH_RESOLUTION: f64 = 0.05;
/// The most steps one search takes.
const SEARCH_STEPS_MAX: usize = 16;
/// How long a step waits for receipts after its last push is answered.
const RECEIPT_WAIT: Duration = Duration::from_secs(30);
/// The rate when `--rate` is not given.
const DEFAULT_RATE: u64 = 1_000;

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.50),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// What offering calls at one rate for a while showed.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub offered_per_sec: u64,
    /// From the first call to the last answer.
    pub secs: f64,
    pub sent: u64,
    /// Answered with success (Herald, the HTTP floor: 2xx; JetStream:
    /// acked).
    pub accepted: u64,
    pub errors: u64,
    /// Herald: receipts at the clients; the HTTP floor: its answers;
    /// JetStream: acks.
    pub received: u64,
    pub not_received: u64,
    /// Accepted calls a second over `secs`.
    pub achieved_per_sec: f64,
    /// Herald: end to end, from the API call to the client's receipt; the
    /// HTTP floor: from the request to its answer; JetStream: from the
    /// publish to its ack.
    pub latency_us: Percentiles,
    /// Herald: the API calls, from the request to its answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_latency_us: Option<Percentiles>,
    /// Whether the step meets the criteria.
    pub passed: bool,
}

/// When a step passes.
#[derive(Debug, Clone, Copy)]
pub struct Criteria {
    pub p99_max_us: u64,
}

impl Criteria {
    pub fn passes(
        self,
        offered_per_sec: u64,
        achieved_per_sec: f64,
        errors: u64,
        not_received: u64,
        latency: &Percentiles,
    ) -> bool {
        errors == 0
            && not_received == 0
            && latency.count > 0
            && achieved_per_sec >= ACHIEVED_SHARE_MIN * offered_per_sec as f64
            && latency.p99 <= self.p99_max_us
    }

    fn json(self) -> Value {
        json!({
            "p99_max_us": self.p99_max_us,
            "achieved_share_min": ACHIEVED_SHARE_MIN,
            "errors": 0,
            "not_received": 0,
        })
    }
}

/// What `offer` saw.
struct Offered {
    sent: u64,
    accepted: u64,
    errors: u64,
    secs: f64,
    call_latency: Histogram<u64>,
}

/// Starts a call (`call()`) every 1/`rate` s for `duration`, at most
/// `IN_FLIGHT_MAX` in flight; a call due while that many are in flight
/// waits, and those not started by the end of `duration` are not sent.
/// Returns once every call has answered.
async fn offer<F, Fut>(rate: u64, duration: Duration, mut call: F) -> anyhow::Result<Offered>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
    let mut calls = tokio::task::JoinSet::new();
    let mut offered = Offered {
        sent: 0,
        accepted: 0,
        errors: 0,
        secs: 0.0,
        call_latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    let mut first_error = None;
    let mut account = |done: Result<(Result<(), String>, Duration), tokio::task::JoinError>,
                       offered: &mut Offered|
     -> anyhow::Result<()> {
        let (result, took) = done?;
        let _ = offered
            .call_latency
            .record((took.as_micros() as u64).max(1));
        match result {
            Ok(()) => offered.accepted += 1,
            Err(error) => {
                offered.errors += 1;
                first_error.get_or_insert(error);
            }
        }
        Ok(())
    };
    let bar = progress_bar(rate * duration.as_secs(), "calls sent");
    let start = Instant::now();
    let end = start + duration;
    loop {
        let due = start + Duration::from_secs_f64(offered.sent as f64 / rate as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let permit = in_flight.clone().acquire_owned().await?;
        if Instant::now() >= end {
            break;
        }
        let future = call();
        calls.spawn(async move {
            let started = Instant::now();
            let result = future.await;
            drop(permit);
            (result, started.elapsed())
        });
        offered.sent += 1;
        bar.set_position(offered.sent);
        while let Some(done) = calls.try_join_next() {
            account(done, &mut offered)?;
        }
    }
    while let Some(done) = calls.join_next().await {
        account(done, &mut offered)?;
    }
    offered.secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let Some(error) = first_error {
        eprintln!(
            "herald-bench: {} of {} calls failed, the first: {error}",
            offered.errors, offered.sent
        );
    }
    Ok(offered)
}

/// A push call as the load generator makes it to Herald's API, and to the
/// HTTP floor: to a random one of `connections` users, whose calls go to
/// `apis[user % len]`, with the app's API key and a timestamped payload of
/// `payload_bytes`. Succeeds on a 2xx answer.
fn push_call(
    client: &reqwest::Client,
    apis: &[SocketAddr],
    creds: &AppCreds,
    connections: u64,
    payload_bytes: usize,
) -> impl Future<Output = Result<(), String>> + Send + 'static {
    let user = rand::random_range(0..connections);
    let api = apis[(user % apis.len() as u64) as usize];
    let url = format!(
        "http://{api}/v1/apps/{}/users/{}/messages",
        creds.app,
        user_id(user)
    );
    let request = client.post(url).bearer_auth(&creds.api_key);
    async move {
        let payload = payload::timestamped(now_nanos(), payload_bytes);
        let payload = String::from_utf8(payload).expect("ASCII");
        match request.json(&json!({ "payload": payload })).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("status {}", response.status())),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// Herald under test: its processes, where the clients connect and
/// where pushes go.
struct Herald {
    /// `herald serve` processes, or the cluster (stopped apart).
    gateways: Option<Gateways>,
    cluster: Option<Cluster>,
    /// User `u` connects to `addrs[u % len]`.
    addrs: Vec<SocketAddr>,
    /// User `u`'s pushes go to `apis[u % len]`.
    apis: Vec<SocketAddr>,
    creds: AppCreds,
    durability: String,
}

/// What Herald on SQLite does before its API answers a push.
const SQLITE_DURABILITY: &str =
    "Herald on SQLite (WAL, synchronous=FULL): fsync per group commit before the API answers";

impl Herald {
    async fn start(common: &Common, args: &PushArgs, transport: Transport) -> anyhow::Result<Self> {
        let Some(storage_url) = &args.cluster_storage else {
            let gateways = Gateways::start(common, transport)?;
            let servers: &[Server] = &gateways.servers;
            let apis = servers
                .iter()
                .map(|s| s.api.context("no api"))
                .collect::<anyhow::Result<_>>()?;
            return Ok(Herald {
                addrs: gateways.addrs(),
                apis,
                creds: common.creds()?,
                durability: if common.gateways_running.is_empty() {
                    SQLITE_DURABILITY.to_owned()
                } else {
                    "running gateways (--gateway): as configured there".to_owned()
                },
                gateways: Some(gateways),
                cluster: None,
            });
        };
        let herald = crate::systems::herald_bin(common.herald.as_deref())?;
        let cluster = Cluster::start(&ClusterSpec {
            herald: &herald,
            storage_url,
            redis_url: &args.cluster_redis,
            rooms: common.gateway_count(),
            heartbeat_secs: common.heartbeat_secs,
            io: &common.io,
            transport,
            pki: common.pki.as_deref(),
        })
        .await?;
        Ok(Herald {
            addrs: cluster.rooms.iter().map(|s| s.addr).collect(),
            apis: vec![cluster.control.api.context("no api")?],
            creds: cluster.creds.clone(),
            durability: format!(
                "Herald cluster ({} room node(s), 1 control node) on {}: the database's commit \
                 before the API answers",
                cluster.rooms.len(),
                cluster.durability
            ),
            gateways: None,
            cluster: Some(cluster),
        })
    }

    async fn stop(self) {
        drop(self.gateways);
        if let Some(cluster) = self.cluster {
            cluster.stop().await;
        }
    }
}

/// A system being measured: Herald with its clients connected, the HTTP
/// floor, or a JetStream stream (boxed: one of each is alive at a time).
enum UnderTest {
    Herald {
        herald: Box<Herald>,
        workers: Workers,
        client: reqwest::Client,
        connections: u64,
    },
    HttpFloor {
        server: Server,
        client: reqwest::Client,
        creds: AppCreds,
        /// The users the calls go to, as Herald's row's.
        connections: u64,
    },
    JetStream(Box<JetStream>),
}

impl UnderTest {
    fn durability(&self, row: &Row) -> String {
        match (self, row) {
            (UnderTest::Herald { herald, .. }, _) => herald.durability.clone(),
            (UnderTest::HttpFloor { .. }, _) => "none: nothing is stored".to_owned(),
            (UnderTest::JetStream(js), Row::JetStream(sync)) => {
                format!("{} (nats-server {})", sync.durability(), js.version)
            }
            (UnderTest::JetStream(_), _) => unreachable!("a JetStream row"),
        }
    }

    /// Offers calls at `rate` for `duration` and waits for their receipts.
    async fn step(
        &mut self,
        rate: u64,
        duration: Duration,
        payload_bytes: usize,
        criteria: Criteria,
    ) -> anyhow::Result<Step> {
        match self {
            UnderTest::Herald {
                herald,
                workers,
                client,
                connections,
            } => {
                let (_, latency_before) = workers.report()?;
                let received_before = workers.pushes_received();
                let offered = offer(rate, duration, || {
                    push_call(
                        client,
                        &herald.apis,
                        &herald.creds,
                        *connections,
                        payload_bytes,
                    )
                })
                .await?;
                let deadline = Instant::now() + RECEIPT_WAIT;
                while workers.pushes_received() - received_before < offered.accepted
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let received = workers.pushes_received() - received_before;
                let (_, mut latency) = workers.report()?;
                latency.subtract(&latency_before)?;
                Ok(step(
                    rate,
                    &offered,
                    received,
                    Percentiles::of(&latency),
                    Some(Percentiles::of(&offered.call_latency)),
                    criteria,
                ))
            }
            UnderTest::HttpFloor {
                server,
                client,
                creds,
                connections,
            } => {
                let apis = [server.addr];
                let offered = offer(rate, duration, || {
                    push_call(client, &apis, creds, *connections, payload_bytes)
                })
                .await?;
                Ok(answered_step(rate, &offered, criteria))
            }
            UnderTest::JetStream(js) => {
                let offered = offer(rate, duration, || {
                    let context = js.context.clone();
                    async move {
                        let payload = payload::timestamped(now_nanos(), payload_bytes);
                        jetstream::publish(context, payload).await
                    }
                })
                .await?;
                Ok(answered_step(rate, &offered, criteria))
            }
        }
    }

    /// Connection failures of Herald's clients (none for the others: they
    /// have no clients connected).
    fn failures(&self) -> (Value, u64) {
        match self {
            UnderTest::Herald { workers, .. } => failures_json(&workers.failures()),
            UnderTest::HttpFloor { .. } | UnderTest::JetStream(_) => (json!({}), 0),
        }
    }

    async fn stop(self) {
        if let UnderTest::Herald {
            herald, workers, ..
        } = self
        {
            drop(workers);
            herald.stop().await;
            settle_after_teardown();
        }
    }
}

/// A step of a row whose latency is the calls' own (the HTTP floor and
/// JetStream): what was answered counts as received.
fn answered_step(rate: u64, offered: &Offered, criteria: Criteria) -> Step {
    let latency = Percentiles::of(&offered.call_latency);
    step(rate, offered, offered.accepted, latency, None, criteria)
}

fn step(
    rate: u64,
    offered: &Offered,
    received: u64,
    latency_us: Percentiles,
    api_latency_us: Option<Percentiles>,
    criteria: Criteria,
) -> Step {
    let achieved_per_sec = offered.accepted as f64 / offered.secs.max(0.001);
    let not_received = offered.accepted.saturating_sub(received);
    Step {
        offered_per_sec: rate,
        secs: offered.secs,
        sent: offered.sent,
        accepted: offered.accepted,
        errors: offered.errors,
        received,
        not_received,
        achieved_per_sec,
        latency_us,
        api_latency_us,
        passed: criteria.passes(
            rate,
            achieved_per_sec,
            offered.errors,
            not_received,
            &latency_us,
        ),
    }
}

/// A row of the table: Herald over a transport, the HTTP floor, or
/// JetStream with a sync setting.
enum Row {
    Herald(Transport),
    HttpFloor,
    JetStream(jetstream::Sync),
}

/// The `push` scenario: Herald over each transport, then the HTTP floor,
/// then JetStream.
pub async fn push(common: &Common, args: &PushArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.cluster_storage.is_none() || common.gateways_running.is_empty(),
        "--cluster-storage starts a cluster here: it does not go with --gateway"
    );
    let criteria = Criteria {
        p99_max_us: (args.p99_max_ms * 1000.0) as u64,
    };
    let herald_name = match &args.cluster_storage {
        Some(url) => format!(
            "herald-cluster-{}",
            crate::cluster::Engine::of(url)?.as_str()
        ),
        None => "herald".to_owned(),
    };
    let mut rows = serde_json::Map::new();
    let mut herald_rows = Vec::new();
    for transport in common.transports() {
        let name = row_name(transport, &herald_name);
        let row = measure(common, args, criteria, &Row::Herald(transport), &name).await?;
        rows.insert(name.clone(), row);
        herald_rows.push(name);
    }
    if args.with_http_floor {
        let row = measure(common, args, criteria, &Row::HttpFloor, http_floor::ROW).await?;
        rows.insert(http_floor::ROW.to_owned(), row);
        compare_with_floor(&mut rows, &herald_rows);
    }
    if args.with_jetstream {
        for sync in jetstream::Sync::ALL {
            let name = sync.row_name();
            let row = measure(common, args, criteria, &Row::JetStream(sync), name).await?;
            rows.insert(name.to_owned(), row);
        }
    }
    let mut value = crate::rows_json(rows);
    value["mode"] = json!(if args.find_max_rate {
        "find-max-rate"
    } else {
        "fixed-rate"
    });
    value["payload_bytes"] = json!(args.payload_bytes);
    value["runs"] = json!(args.runs);
    value["in_flight_max"] = json!(IN_FLIGHT_MAX);
    if args.find_max_rate {
        value["criteria"] = criteria.json();
        value["step_secs"] = json!(args.step_secs);
    }
    Ok(value)
}

/// On each Herald row, `herald_to_floor`: its highest passing rate over the
/// HTTP floor's (`--find-max-rate` rows only; none when the floor's is 0).
fn compare_with_floor(rows: &mut serde_json::Map<String, Value>, herald_rows: &[String]) {
    let Some(floor) = rows
        .get(http_floor::ROW)
        .and_then(|row| row["max_rate_per_sec"].as_f64())
        .filter(|&rate| rate > 0.0)
    else {
        return;
    };
    for name in herald_rows {
        if let Some(row) = rows.get_mut(name)
            && let Some(rate) = row["max_rate_per_sec"].as_f64()
        {
            row["herald_to_floor"] = json!(rate / floor);
        }
    }
}

/// One row: `--runs` runs, each against a system of its own, and their
/// medians.
async fn measure(
    common: &Common,
    args: &PushArgs,
    criteria: Criteria,
    row: &Row,
    label: &str,
) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    let mut warm_ups = Vec::new();
    let mut durability = String::new();
    let mut failures = serde_json::Map::new();
    let mut failures_total = 0;
    for run in 1..=args.runs {
        let mut system = match start(common, args, row, label).await {
            Ok(system) => system,
            Err(error) if matches!(row, Row::JetStream(_)) => {
                // A server that cannot be set up so (too old for the
                // setting) leaves its row out, saying why.
                eprintln!("herald-bench: {label} not measured: {error:#}");
                return Ok(json!({
                    "skipped": format!("{error:#}"),
                    "failures_total": 0,
                }));
            }
            Err(error) => return Err(error),
        };
        durability = system.durability(row);
        let steps = run_steps(&mut system, common, args, criteria, label, run).await;
        let (run_failures, run_failures_total) = system.failures();
        system.stop().await;
        let (warm_up, steps) = steps?;
        warm_ups.push(warm_up);
        runs.push(steps);
        failures.insert(format!("run_{run}"), run_failures);
        failures_total += run_failures_total;
    }
    let mut value = if args.find_max_rate {
        search_summary(&runs)
    } else {
        fixed_summary(&runs)
    };
    value["durability"] = json!(durability);
    match row {
        Row::Herald(transport) => value["transport"] = json!(transport),
        Row::HttpFloor => value["label"] = json!(http_floor::LABEL),
        Row::JetStream(_) => {}
    }
    value["runs"] = json!(
        runs.iter()
            .zip(&warm_ups)
            .map(|(steps, warm_up)| json!({
                "warm_up": warm_up,
                "steps": steps,
                "max_rate_per_sec": args.find_max_rate.then(|| max_rate(steps)),
            }))
            .collect::<Vec<_>>()
    );
    value["connection_failures"] = json!(failures);
    // In a search, failing steps are how the limit is found; at a fixed
    // rate, every error and every push not received is a failure.
    let lost: u64 = if args.find_max_rate {
        0
    } else {
        runs.iter()
            .flatten()
            .map(|step| step.errors + step.not_received)
            .sum()
    };
    value["failures_total"] = json!(failures_total + lost);
    Ok(value)
}

async fn start(
    common: &Common,
    args: &PushArgs,
    row: &Row,
    label: &str,
) -> anyhow::Result<UnderTest> {
    match row {
        Row::Herald(transport) => {
            let herald = Herald::start(common, args, *transport).await?;
            match connect_clients(common, &herald, *transport, label) {
                Ok(workers) => Ok(UnderTest::Herald {
                    herald: Box::new(herald),
                    workers,
                    client: reqwest::Client::new(),
                    connections: common.connections,
                }),
                Err(error) => {
                    herald.stop().await;
                    Err(error)
                }
            }
        }
        Row::HttpFloor => {
            let creds = common.creds()?;
            Ok(UnderTest::HttpFloor {
                server: http_floor::start(&creds)?,
                client: reqwest::Client::new(),
                creds,
                connections: common.connections,
            })
        }
        Row::JetStream(sync) => Ok(UnderTest::JetStream(Box::new(
            JetStream::start(&args.nats_server, *sync).await?,
        ))),
    }
}

/// Herald's clients, one per connection, all up.
fn connect_clients(
    common: &Common,
    herald: &Herald,
    transport: Transport,
    label: &str,
) -> anyhow::Result<Workers> {
    let mut workers = Workers::start(&Clients {
        // `--rate` is the push rate here: connect as fast as they go.
        rate_per_sec: 0,
        ..common.clients(Target::Herald, transport, &herald.creds, &herald.addrs)
    })?;
    workers.wait_all_up(pool::ramp_timeout(common.connections), label)?;
    Ok(workers)
}

/// One run's steps: one at `--rate` for `--duration`; or a search, after
/// a warm-up step at the first rate that does not count (the first
/// seconds of fresh servers, connections and database are slower, and a
/// search that started with a failure would look only below it).
async fn run_steps(
    system: &mut UnderTest,
    common: &Common,
    args: &PushArgs,
    criteria: Criteria,
    label: &str,
    run: u64,
) -> anyhow::Result<(Option<Step>, Vec<Step>)> {
    let rate = if common.rate == 0 {
        DEFAULT_RATE
    } else {
        common.rate
    };
    if !args.find_max_rate {
        let duration = Duration::from_secs(common.duration);
        let step = system
            .step(rate, duration, args.payload_bytes, criteria)
            .await?;
        return Ok((None, vec![step]));
    }
    let search = Search {
        first_rate: rate,
        resolution: SEARCH_RESOLUTION,
        steps_max: SEARCH_STEPS_MAX,
    };
    let duration = Duration::from_secs(args.step_secs);
    let warm_up = system
        .step(rate, duration, args.payload_bytes, criteria)
        .await?;
    print_step(label, run, "warm-up (not counted)", &warm_up);
    let mut steps = Vec::new();
    while let Some(rate) = search.next_rate(&outcomes(&steps)) {
        let step = system
            .step(rate, duration, args.payload_bytes, criteria)
            .await?;
        print_step(label, run, &format!("step {}", steps.len() + 1), &step);
        steps.push(step);
    }
    println!(
        "push {label} run {run}: highest passing rate {}",
        max_rate(&steps).map_or_else(|| "none".to_owned(), |rate| format!("{rate}/s"))
    );
    Ok((Some(warm_up), steps))
}

fn print_step(label: &str, run: u64, what: &str, step: &Step) {
    println!(
        "push {label} run {run} {what}: offered {}/s, achieved {:.0}/s, received {} of {}, \
         errors {}, p50 {:.1} ms, p99 {:.1} ms: {}",
        step.offered_per_sec,
        step.achieved_per_sec,
        step.received,
        step.accepted,
        step.errors,
        step.latency_us.p50 as f64 / 1000.0,
        step.latency_us.p99 as f64 / 1000.0,
        if step.passed { "pass" } else { "fail" }
    );
}

fn outcomes(steps: &[Step]) -> Vec<Outcome> {
    steps
        .iter()
        .map(|step| Outcome {
            rate: step.offered_per_sec,
            passed: step.passed,
        })
        .collect()
}

fn max_rate(steps: &[Step]) -> Option<u64> {
    highest_passed(&outcomes(steps))
}

/// The medians of some figure of each run's step, or null.
fn median_of<'a>(steps: impl Iterator<Item = &'a Step>, figure: impl Fn(&Step) -> f64) -> Value {
    json!(median(&steps.map(figure).collect::<Vec<_>>()))
}

/// The medians of the latency percentiles of `steps`.
fn latency_medians(steps: &[&Step]) -> Value {
    let of = |figure: fn(&Percentiles) -> u64| {
        median_of(steps.iter().copied(), |s| figure(&s.latency_us) as f64)
    };
    json!({
        "count": steps.iter().map(|s| s.latency_us.count).sum::<u64>(),
        "p50": of(|p| p.p50),
        "p99": of(|p| p.p99),
        "p999": of(|p| p.p999),
        "max": of(|p| p.max),
    })
}

/// Totals over every step of every run.
fn totals(runs: &[Vec<Step>]) -> Value {
    let sum = |figure: fn(&Step) -> u64| runs.iter().flatten().map(figure).sum::<u64>();
    json!({
        "pushes": sum(|s| s.sent),
        "accepted": sum(|s| s.accepted),
        "received": sum(|s| s.received),
        "errors": sum(|s| s.errors),
        "not_received": sum(|s| s.not_received),
    })
}

/// A fixed-rate row: each figure the median over the runs (one step each).
fn fixed_summary(runs: &[Vec<Step>]) -> Value {
    let steps: Vec<&Step> = runs.iter().flatten().collect();
    let mut value = totals(runs);
    value["target_rate"] = json!(steps.first().map(|s| s.offered_per_sec));
    value["throughput_per_sec"] = median_of(steps.iter().copied(), |s| s.achieved_per_sec);
    value["latency_us"] = latency_medians(&steps);
    value
}

/// A search row: the median over the runs of each run's highest passing
/// rate (a run where none passed counts as 0), and the medians of the
/// figures at those steps.
fn search_summary(runs: &[Vec<Step>]) -> Value {
    let rates: Vec<f64> = runs
        .iter()
        .map(|steps| max_rate(steps).unwrap_or(0) as f64)
        .collect();
    let at_max: Vec<&Step> = runs
        .iter()
        .filter_map(|steps| {
            let rate = max_rate(steps)?;
            steps.iter().find(|s| s.passed && s.offered_per_sec == rate)
        })
        .collect();
    let mut value = totals(runs);
    value["max_rate_per_sec"] = json!(median(&rates));
    value["throughput_per_sec"] = median_of(at_max.iter().copied(), |s| s.achieved_per_sec);
    value["latency_us"] = latency_medians(&at_max);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p99: u64) -> Percentiles {
        Percentiles {
            count: 100,
            p50: p99 / 2,
            p99,
            p999: p99,
            max: p99,
        }
    }

    const CRITERIA: Criteria = Criteria { p99_max_us: 50_000 };

    #[test]
    fn a_step_passes_within_the_bound_keeping_up_with_everything_received() {
        assert!(CRITERIA.passes(1_000, 990.0, 0, 0, &latency(50_000)));
        assert!(
            !CRITERIA.passes(1_000, 990.0, 0, 0, &latency(50_001)),
            "p99"
        );
        assert!(
            !CRITERIA.passes(1_000, 940.0, 0, 0, &latency(10_000)),
            "rate"
        );
        assert!(
            !CRITERIA.passes(1_000, 990.0, 1, 0, &latency(10_000)),
            "error"
        );
        assert!(
            !CRITERIA.passes(1_000, 990.0, 0, 1, &latency(10_000)),
            "lost"
        );
        let nothing = Percentiles::default();
        assert!(!CRITERIA.passes(1_000, 990.0, 0, 0, &nothing), "no receipt");
    }

    fn step_at(rate: u64, passed: bool, p99: u64) -> Step {
        Step {
            offered_per_sec: rate,
            secs: 1.0,
            sent: rate,
            accepted: rate,
            errors: 0,
            received: rate,
            not_received: 0,
            achieved_per_sec: rate as f64,
            latency_us: latency(p99),
            api_latency_us: None,
            passed,
        }
    }

    #[test]
    fn a_search_row_reports_the_median_highest_rate_and_its_figures() {
        let runs = vec![
            vec![step_at(1_000, true, 10), step_at(2_000, false, 90)],
            vec![step_at(1_000, true, 20), step_at(1_500, true, 30)],
            vec![step_at(1_000, true, 40), step_at(1_200, true, 50)],
        ];
        let value = search_summary(&runs);
        assert_eq!(value["max_rate_per_sec"], json!(1_200.0));
        assert_eq!(value["latency_us"]["p99"], json!(30.0));
        assert_eq!(value["pushes"], json!(7_700));
    }

    #[test]
    fn herald_rows_get_their_highest_rate_over_the_floors() {
        let mut rows = serde_json::Map::new();
        rows.insert("herald".to_owned(), json!({ "max_rate_per_sec": 1_000.0 }));
        rows.insert(
            "herald-tls".to_owned(),
            json!({ "max_rate_per_sec": 500.0 }),
        );
        rows.insert(
            http_floor::ROW.to_owned(),
            json!({ "max_rate_per_sec": 4_000.0 }),
        );
        compare_with_floor(&mut rows, &["herald".to_owned(), "herald-tls".to_owned()]);
        assert_eq!(rows["herald"]["herald_to_floor"], json!(0.25));
        assert_eq!(rows["herald-tls"]["herald_to_floor"], json!(0.125));
        assert!(rows[http_floor::ROW].get("herald_to_floor").is_none());

        // At a fixed rate there is no highest rate, and a floor that
        // passed nothing gives no ratio.
        for floor in [
            json!({ "throughput_per_sec": 4_000.0 }),
            json!({ "max_rate_per_sec": 0.0 }),
        ] {
            let mut rows = serde_json::Map::new();
            rows.insert("herald".to_owned(), json!({ "max_rate_per_sec": 1_000.0 }));
            rows.insert(http_floor::ROW.to_owned(), floor);
            compare_with_floor(&mut rows, &["herald".to_owned()]);
            assert!(rows["herald"].get("herald_to_floor").is_none());
        }
    }

    #[test]
    fn a_fixed_row_reports_medians_over_runs() {
        let runs = vec![
            vec![step_at(1_000, true, 10)],
            vec![step_at(1_000, true, 30)],
            vec![step_at(1_000, true, 20)],
        ];
        let value = fixed_summary(&runs);
        assert_eq!(value["latency_us"]["p99"], json!(20.0));
        assert_eq!(value["throughput_per_sec"], json!(1_000.0));
        assert_eq!(value["received"], json!(3_000));
    }
}
