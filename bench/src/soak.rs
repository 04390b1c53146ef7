//! The `soak` scenario: hours of churn against `herald serve` gateways.
//!
//! Connections are held for `--duration`; every `--reconnect-every` s a
//! `--reconnect-fraction` of them (a different slice each time) is dropped
//! and comes back at once, resuming from the last push and broadcast it
//! received and acked; unicast pushes go at `--push-rate` to random users
//! through the API, and a broadcast every `--broadcast-every` s. Every push
//! the API accepted (200, with its seq) must reach its user's client
//! exactly once, and every broadcast every client: what was not is counted
//! as lost, what came that was not sent as unexpected, what came twice as
//! duplicated. Each gateway's RSS is sampled throughout (`herald serve` is
//! the gateway and the control plane in one process, so this is both) and
//! its growth reported from the end of the warm-up to the end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::{Value, json};

use crate::pool::{Clients, Workers};
use crate::systems::AppCreds;
use crate::worker::{Delivered, Target, user_id};
use crate::{Common, Gateways, now_nanos, payload, percentiles, pool, procfs};

/// API calls in flight at most, as in `push`.
const IN_FLIGHT_MAX: usize = 256;
/// The warm-up excluded from the growth figure, at most: 5 minutes.
const WARM_UP_MAX: Duration = Duration::from_secs(300);
/// The window whose mean RSS is compared, at most: a minute.
const WINDOW_MAX: Duration = Duration::from_secs(60);
/// How long receipts may trail the last accepted call.
const RECEIPT_GRACE: Duration = Duration::from_secs(60);

#[derive(Args, Clone)]
pub struct SoakArgs {
    /// Unicast pushes per second, each to a random user.
    #[arg(long, default_value_t = 100)]
    pub push_rate: u64,
    /// The fraction of the connections dropped (they reconnect at once and
    /// resume) every --reconnect-every seconds.
    #[arg(long, default_value_t = 0.1)]
    pub reconnect_fraction: f64,
    #[arg(long, default_value_t = 60)]
    pub reconnect_every: u64,
    /// Seconds between broadcasts (the first comes at half of it).
    #[arg(long, default_value_t = 300)]
    pub broadcast_every: u64,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 5)]
    pub sample_every: u64,
    /// Seconds at the start left out of the growth figure (default: 5
    /// minutes, or the first quarter of a shorter run).
    #[arg(long)]
    pub warm_up: Option<u64>,
}

impl SoakArgs {
    fn check(&self, common: &Common) -> anyhow::Result<()> {
        anyhow::ensure!(self.push_rate > 0, "--push-rate must be at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.reconnect_fraction),
            "--reconnect-fraction is a fraction, 0 to 1"
        );
        anyhow::ensure!(
            self.reconnect_every > 0 && self.broadcast_every > 0 && self.sample_every > 0,
            "--reconnect-every, --broadcast-every and --sample-every are at least 1 s"
        );
        anyhow::ensure!(
            common.duration >= 8 * self.sample_every,
            "--duration must hold at least 8 samples (--sample-every {})",
            self.sample_every
        );
        anyhow::ensure!(
            common.gateways_running.is_empty(),
            "soak starts its own gateways: --gateway is not taken"
        );
        anyhow::ensure!(
            common.transports().len() == 1,
            "soak runs over one --transport"
        );
        Ok(())
    }

    /// The warm-up left out of the growth figure and the window whose
    /// mean is compared, for a run of `duration`.
    fn windows(&self, duration: Duration) -> (Duration, Duration) {
        let warm_up = self
            .warm_up
            .map_or_else(|| WARM_UP_MAX.min(duration / 4), Duration::from_secs);
        let window = WINDOW_MAX
            .min(duration / 8)
            .max(Duration::from_secs(self.sample_every));
        (warm_up, window)
    }
}

/// One reading of the gateways' memory, `at` seconds into the churn.
struct Sample {
    at: f64,
    rss: Vec<u64>,
    /// The file-backed part of each gateway's RSS (`RssFile`).
    file: Vec<u64>,
    /// What SQLite holds of each gateway's RSS (its page-cache region and
    /// what it allocates besides), from its
    /// `/metrics`; 0 when it did not answer.
    sqlite: Vec<u64>,
    slab: u64,
}

impl Sample {
    /// The gateways' RSS less what SQLite holds of it.
    fn rss_without_sqlite(&self) -> u64 {
        self.rss
            .iter()
            .zip(&self.sqlite)
            .map(|(rss, sqlite)| rss.saturating_sub(*sqlite))
            .sum()
    }

    /// The gateways' anonymous memory (RSS less its file-backed pages)
    /// less what SQLite holds of it: the heap, stacks and rings.
    fn anonymous_without_sqlite(&self) -> u64 {
        self.rss_without_sqlite()
            .saturating_sub(self.file.iter().sum())
    }
}

/// `herald_storage_sqlite_memory_bytes` from the `/metrics` of the API at
/// `api`, over a plain blocking request (the sampler is a thread).
fn sqlite_bytes(api: SocketAddr) -> Option<u64> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&api, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("herald_storage_sqlite_memory_bytes "))
        .and_then(|value| value.trim().parse().ok())
}

/// Reads the gateways' RSS, what SQLite holds of it and the kernel's slab
/// every `every` until stopped.
fn sample_memory(
    pids: Vec<u32>,
    apis: Vec<SocketAddr>,
    start: Instant,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        let mut next = start;
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                let rss: Vec<procfs::Rss> = pids
                    .iter()
                    .map(|&pid| procfs::rss(pid).unwrap_or_default())
                    .collect();
                samples.push(Sample {
                    at: start.elapsed().as_secs_f64(),
                    rss: rss.iter().map(|r| r.total).collect(),
                    file: rss.iter().map(|r| r.file).collect(),
                    sqlite: apis
                        .iter()
                        .map(|&api| sqlite_bytes(api).unwrap_or(0))
                        .collect(),
                    slab: procfs::slab_bytes().unwrap_or(0),
                });
                next += every;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        samples
    })
}

fn mean(values: impl Iterator<Item = u64>) -> Option<f64> {
    let (sum, n) = values.fold((0u128, 0u64), |(s, n), v| (s + u128::from(v), n + 1));
    (n > 0).then(|| sum as f64 / n as f64)
}

/// The mean of `value` over the samples in `[from, to)` seconds.
fn window_mean(samples: &[Sample], from: f64, to: f64, value: impl Fn(&Sample) -> u64) -> f64 {
    mean(
        samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(value),
    )
    .unwrap_or(0.0)
}

/// Growth from the baseline window to the end window, both as means.
fn growth_json(
    samples: &[Sample],
    baseline: (f64, f64),
    end: (f64, f64),
    value: impl Fn(&Sample) -> u64,
) -> Value {
    let before = window_mean(samples, baseline.0, baseline.1, &value);
    let after = window_mean(samples, end.0, end.1, &value);
    json!({
        "baseline_mean_bytes": before,
        "end_mean_bytes": after,
        "growth": (after - before) / before.max(1.0),
        "peak_bytes": samples.iter().map(&value).max().unwrap_or(0),
    })
}

/// Lost, unexpected and duplicated receipts of one user's messages.
#[derive(Default, Debug, PartialEq, Eq)]
struct Accounting {
    lost: u64,
    unexpected: u64,
    duplicated: u64,
}

impl Accounting {
    /// Counts `received` (in order, duplicates included) against `sent`.
    fn add(&mut self, sent: &BTreeSet<u64>, received: &[u64]) {
        let distinct: BTreeSet<u64> = received.iter().copied().collect();
        self.lost += sent.difference(&distinct).count() as u64;
        self.unexpected += distinct.difference(sent).count() as u64;
        self.duplicated += (received.len() - distinct.len()) as u64;
    }

    fn total(&self) -> u64 {
        self.lost + self.unexpected + self.duplicated
    }

    fn json(&self) -> Value {
        json!({
            "lost": self.lost,
            "unexpected": self.unexpected,
            "duplicated": self.duplicated,
        })
    }
}

/// A call's answer: its `seq`, or why there is none.
async fn accepted_seq(request: reqwest::RequestBuilder) -> Result<u64, String> {
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    body["seq"]
        .as_u64()
        .ok_or_else(|| format!("no seq in the answer {body}"))
}

/// What the API accepted during the run.
#[derive(Default)]
struct Sent {
    /// By user: the push seqs answered 200.
    pushes: BTreeMap<u64, BTreeSet<u64>>,
    /// By gateway: the broadcast seqs answered 200.
    broadcasts: Vec<BTreeSet<u64>>,
    calls: u64,
    api_errors: u64,
    first_error: Option<String>,
}

impl Sent {
    fn error(&mut self, error: String) {
        self.api_errors += 1;
        self.first_error.get_or_insert(error);
    }
}

pub async fn soak(common: &Common, args: &SoakArgs) -> anyhow::Result<Value> {
    args.check(common)?;
    let transport = common.transports()[0];
    let duration = Duration::from_secs(common.duration);
    let (warm_up, window) = args.windows(duration);
    let gateways = Gateways::start(common, transport)?;
    let creds = common.creds()?;
    let addrs = gateways.addrs();
    let apis: Vec<SocketAddr> = gateways
        .servers
        .iter()
        .map(|s| s.api.context("no api"))
        .collect::<anyhow::Result<_>>()?;
    let mut workers = Workers::start(&Clients {
        track_deliveries: true,
        ..common.clients(Target::Herald, transport, &creds, &addrs)
    })?;
    let ramp = workers.wait_all_up(pool::ramp_timeout(common.connections), "soak")?;
    let failures_before = workers.failures();

    let start = Instant::now();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_memory(
        gateways.servers.iter().map(|s| s.pid()).collect(),
        apis.clone(),
        start,
        Duration::from_secs(args.sample_every),
        stop_sampling.clone(),
    );
    let sent = Arc::new(Mutex::new(Sent {
        broadcasts: vec![BTreeSet::new(); apis.len()],
        ..Sent::default()
    }));
    let reconnect_rounds = churn(common, args, &creds, &apis, &mut workers, &sent, start).await?;
    let churn_secs = start.elapsed().as_secs_f64();

    // Every accepted push once, every broadcast to each of its gateway's
    // users once; wait for that many receipts (and everyone back).
    let (expected, calls) = {
        let sent = sent.lock().unwrap();
        let pushes: u64 = sent.pushes.values().map(|s| s.len() as u64).sum();
        let broadcasts: u64 = (0..common.connections)
            .map(|u| sent.broadcasts[(u % apis.len() as u64) as usize].len() as u64)
            .sum();
        (pushes + broadcasts, sent.calls)
    };
    let deadline = Instant::now() + RECEIPT_GRACE;
    while (workers.pushes_received() < expected || workers.connected() < common.connections)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything sent twice comes right behind the first copy.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
    let connected_at_end = workers.connected();
    let (progress, latency, deliveries) = workers.report_with_deliveries()?;
    let sessions: u64 = progress.iter().map(|p| p.sessions).sum();
    let mut failures = workers.failures();
    for (kind, before) in failures_before {
        if let Some(n) = failures.get_mut(&kind) {
            *n -= before;
        }
    }
    failures.retain(|_, n| *n > 0);
    drop(workers);
    drop(gateways);

    let sent = Arc::into_inner(sent)
        .context("calls still running")?
        .into_inner()
        .unwrap();
    let nothing = Delivered::default();
    let no_seqs = BTreeSet::new();
    let mut pushes = Accounting::default();
    let mut broadcasts = Accounting::default();
    let mut broadcasts_per_connection = (u64::MAX, 0u64);
    for u in 0..common.connections {
        let delivered = deliveries.get(&u).unwrap_or(&nothing);
        pushes.add(sent.pushes.get(&u).unwrap_or(&no_seqs), &delivered.pushes);
        let expected = &sent.broadcasts[(u % apis.len() as u64) as usize];
        broadcasts.add(expected, &delivered.broadcasts);
        let got = delivered
            .broadcasts
            .iter()
            .filter(|seq| expected.contains(seq))
            .collect::<BTreeSet<_>>()
            .len() as u64;
        broadcasts_per_connection.0 = broadcasts_per_connection.0.min(got);
        broadcasts_per_connection.1 = broadcasts_per_connection.1.max(got);
    }
    let accepted_pushes: u64 = sent.pushes.values().map(|s| s.len() as u64).sum();
    let accepted_broadcasts: Vec<usize> = sent.broadcasts.iter().map(BTreeSet::len).collect();
    if let Some(error) = &sent.first_error {
        eprintln!(
            "herald-bench: {} of {calls} API calls failed, the first: {error}",
            sent.api_errors
        );
    }

    let end = duration.as_secs_f64();
    let baseline = (warm_up.as_secs_f64(), (warm_up + window).as_secs_f64());
    let end_window = (end - window.as_secs_f64(), end + 1.0);
    let per_gateway: Vec<Value> = (0..apis.len())
        .map(|g| growth_json(&samples, baseline, end_window, |s| s.rss[g]))
        .collect();
    let all = growth_json(&samples, baseline, end_window, |s| s.rss.iter().sum());
    let without_sqlite = growth_json(&samples, baseline, end_window, Sample::rss_without_sqlite);
    let sqlite = growth_json(&samples, baseline, end_window, |s| s.sqlite.iter().sum());
    let file = growth_json(&samples, baseline, end_window, |s| s.file.iter().sum());
    let anonymous = growth_json(
        &samples,
        baseline,
        end_window,
        Sample::anonymous_without_sqlite,
    );
    let slab = growth_json(&samples, baseline, end_window, |s| s.slab);
    let completed = connected_at_end == common.connections && churn_secs >= end;
    let failures_total = pushes.total() + broadcasts.total() + sent.api_errors;
    Ok(json!({
        "transport": transport,
        "duration_secs": common.duration,
        "churn_secs": churn_secs,
        "completed": completed,
        "ramp": ramp,
        "push_rate_per_sec": args.push_rate,
        "reconnect_fraction": args.reconnect_fraction,
        "reconnect_every_secs": args.reconnect_every,
        "reconnect_rounds": reconnect_rounds,
        "sessions": sessions,
        "connected_at_end": connected_at_end,
        "connection_failures": failures,
        "broadcast_every_secs": args.broadcast_every,
        "api_calls": calls,
        "api_errors": sent.api_errors,
        "pushes_accepted": accepted_pushes,
        "pushes": pushes.json(),
        "broadcasts_accepted_per_gateway": accepted_broadcasts,
        "broadcasts": broadcasts.json(),
        "broadcasts_received_per_connection": {
            "min": broadcasts_per_connection.0.min(broadcasts_per_connection.1),
            "max": broadcasts_per_connection.1,
        },
        "receipt_latency_us": percentiles(&latency),
        "receipts_later_than": {
            "1s": latency.count_between(1_000_000, u64::MAX),
            "10s": latency.count_between(10_000_000, u64::MAX),
        },
        "memory": {
            "what": "VmRSS of each `herald serve` process (gateway and control plane in one)",
            "sample_every_secs": args.sample_every,
            "samples": samples.len(),
            "warm_up_secs": warm_up.as_secs(),
            "window_secs": window.as_secs(),
            "baseline_window_secs": [baseline.0, baseline.1],
            "end_window_secs": [end_window.0, end],
            "gateways_rss": all,
            "gateways_sqlite": sqlite,
            "gateways_rss_without_sqlite": without_sqlite,
            "gateways_file_backed": file,
            "gateways_anonymous_without_sqlite": anonymous,
            "per_gateway_rss": per_gateway,
            "kernel_slab": slab,
        },
        "failures_total": failures_total,
    }))
}

/// The churn itself, for `--duration` from `start`: pushes at the rate,
/// reconnect rounds, broadcasts. Returns the reconnect rounds done, once
/// every call has answered.
async fn churn(
    common: &Common,
    args: &SoakArgs,
    creds: &AppCreds,
    apis: &[SocketAddr],
    workers: &mut Workers,
    sent: &Arc<Mutex<Sent>>,
    start: Instant,
) -> anyhow::Result<u64> {
    let client = reqwest::Client::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
    let mut calls = tokio::task::JoinSet::new();
    let end = start + Duration::from_secs(common.duration);
    let reconnect_every = Duration::from_secs(args.reconnect_every);
    let broadcast_every = Duration::from_secs(args.broadcast_every);
    let mut pushes = 0u64;
    let mut rounds = 0u64;
    let mut next_broadcast = start + broadcast_every / 2;
    let bar = pool::progress_bar(common.duration, "soak (s)");
    loop {
        let next_push = start + Duration::from_secs_f64(pushes as f64 / args.push_rate as f64);
        let next_reconnect = start + reconnect_every * (rounds as u32 + 1);
        let due = next_push.min(next_reconnect).min(next_broadcast);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        bar.set_position(start.elapsed().as_secs());
        if due == next_reconnect {
            // A different slice each round: from where the last one ended.
            let from = (rounds as f64 * args.reconnect_fraction).fract();
            workers.command(&format!("drop {} {from}", args.reconnect_fraction))?;
            rounds += 1;
        } else if due == next_broadcast {
            next_broadcast += broadcast_every;
            let payload = String::from_utf8(payload::timestamped(now_nanos(), 64))?;
            let body = json!({ "payload": payload });
            for (g, api) in apis.iter().enumerate() {
                let request = client
                    .post(format!("http://{api}/v1/apps/{}/broadcasts", creds.app))
                    .bearer_auth(&creds.api_key)
                    .json(&body);
                let sent = sent.clone();
                calls.spawn(async move {
                    let result = accepted_seq(request).await;
                    let mut sent = sent.lock().unwrap();
                    sent.calls += 1;
                    match result {
                        Ok(seq) => {
                            sent.broadcasts[g].insert(seq);
                        }
                        Err(error) => sent.error(error),
                    }
                });
            }
        } else {
            pushes += 1;
            let permit = in_flight.clone().acquire_owned().await?;
            let user = rand::random_range(0..common.connections);
            let api = apis[(user % apis.len() as u64) as usize];
            let payload = String::from_utf8(payload::timestamped(now_nanos(), 256))?;
            let request = client
                .post(format!(
                    "http://{api}/v1/apps/{}/users/{}/messages",
                    creds.app,
                    user_id(user)
                ))
                .bearer_auth(&creds.api_key)
                .json(&json!({ "payload": payload }));
            let sent = sent.clone();
            calls.spawn(async move {
                let result = accepted_seq(request).await;
                drop(permit);
                let mut sent = sent.lock().unwrap();
                sent.calls += 1;
                match result {
                    Ok(seq) => {
                        sent.pushes.entry(user).or_default().insert(seq);
                    }
                    Err(error) => sent.error(error),
                }
            });
        }
        while let Some(done) = calls.try_join_next() {
            done?;
        }
    }
    tokio::time::sleep_until(end.into()).await;
    while let Some(done) = calls.join_next().await {
        done?;
    }
    bar.finish_and_clear();
    Ok(rounds)
}

/// The summary lines of a soak.
pub fn print_summary(s: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mib = |v: &Value| f(v) / (1u64 << 20) as f64;
    let m = &s["memory"];
    println!(
        "soak: {} s of churn ({}), {} pushes/s, {} of the connections reconnecting every {} s \
         ({} rounds, {} sessions in all, {} connected at the end), a broadcast every {} s",
        s["duration_secs"],
        if s["completed"].as_bool() == Some(true) {
            "completed"
        } else {
            "NOT completed"
        },
        s["push_rate_per_sec"],
        s["reconnect_fraction"],
        s["reconnect_every_secs"],
        s["reconnect_rounds"],
        s["sessions"],
        s["connected_at_end"],
        s["broadcast_every_secs"],
    );
    println!(
        "soak pushes: {} accepted of {} API calls ({} errors); lost {}, unexpected {}, \
         duplicated {}; receipt latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         ({} receipts later than 1 s, {} later than 10 s)",
        s["pushes_accepted"],
        s["api_calls"],
        s["api_errors"],
        s["pushes"]["lost"],
        s["pushes"]["unexpected"],
        s["pushes"]["duplicated"],
        f(&s["receipt_latency_us"]["p50"]) / 1000.0,
        f(&s["receipt_latency_us"]["p99"]) / 1000.0,
        f(&s["receipt_latency_us"]["max"]) / 1000.0,
        s["receipts_later_than"]["1s"],
        s["receipts_later_than"]["10s"],
    );
    println!(
        "soak broadcasts: {} accepted per gateway; received per connection min {} max {}; \
         lost {}, unexpected {}, duplicated {}; connection failures {}",
        s["broadcasts_accepted_per_gateway"],
        s["broadcasts_received_per_connection"]["min"],
        s["broadcasts_received_per_connection"]["max"],
        s["broadcasts"]["lost"],
        s["broadcasts"]["unexpected"],
        s["broadcasts"]["duplicated"],
        s["connection_failures"],
    );
    let g = &m["gateways_rss"];
    println!(
        "soak memory ({}; every {} s, {} samples; warm-up {} s left out; growth = mean of \
         {}-{} s over mean of {}-{} s): {:.1} -> {:.1} MiB, growth {:+.2}%, peak {:.1} MiB",
        m["what"].as_str().unwrap_or(""),
        m["sample_every_secs"],
        m["samples"],
        m["warm_up_secs"],
        m["end_window_secs"][0],
        m["end_window_secs"][1],
        m["baseline_window_secs"][0],
        m["baseline_window_secs"][1],
        mib(&g["baseline_mean_bytes"]),
        mib(&g["end_mean_bytes"]),
        f(&g["growth"]) * 100.0,
        mib(&g["peak_bytes"]),
    );
    for (i, g) in m["per_gateway_rss"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        println!(
            "soak gateway {i}: {:.1} -> {:.1} MiB, growth {:+.2}%",
            mib(&g["baseline_mean_bytes"]),
            mib(&g["end_mean_bytes"]),
            f(&g["growth"]) * 100.0,
        );
    }
    let (sqlite, rest) = (&m["gateways_sqlite"], &m["gateways_rss_without_sqlite"]);
    println!(
        "soak memory of it SQLite holds (its page-cache region and allocations; `herald_storage_sqlite_memory_bytes`): \
         {:.1} -> {:.1} MiB; the rest: {:.1} -> {:.1} MiB, growth {:+.2}%",
        mib(&sqlite["baseline_mean_bytes"]),
        mib(&sqlite["end_mean_bytes"]),
        mib(&rest["baseline_mean_bytes"]),
        mib(&rest["end_mean_bytes"]),
        f(&rest["growth"]) * 100.0,
    );
    let (file, anonymous) = (
        &m["gateways_file_backed"],
        &m["gateways_anonymous_without_sqlite"],
    );
    println!(
        "soak memory, the rest split: file-backed (RssFile: the executable's pages, shared by \
         every gateway process) {:.1} -> {:.1} MiB; anonymous (heap, stacks, rings) {:.1} -> \
         {:.1} MiB, growth {:+.2}%",
        mib(&file["baseline_mean_bytes"]),
        mib(&file["end_mean_bytes"]),
        mib(&anonymous["baseline_mean_bytes"]),
        mib(&anonymous["end_mean_bytes"]),
        f(&anonymous["growth"]) * 100.0,
    );
    let k = &m["kernel_slab"];
    println!(
        "soak kernel slab (host-wide, both ends' sockets): {:.1} -> {:.1} MiB, growth {:+.2}%",
        mib(&k["baseline_mean_bytes"]),
        mib(&k["end_mean_bytes"]),
        f(&k["growth"]) * 100.0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_are_counted_lost_unexpected_and_duplicated_against_what_was_sent() {
        let sent: BTreeSet<u64> = [1, 2, 3, 4].into();
        let mut accounting = Accounting::default();
        accounting.add(&sent, &[1, 2, 2, 5, 4]);
        assert_eq!(
            accounting,
            Accounting {
                lost: 1,
                unexpected: 1,
                duplicated: 1
            }
        );
        accounting.add(&BTreeSet::new(), &[]);
        assert_eq!(accounting.total(), 3);
    }

    #[test]
    fn short_runs_scale_the_warm_up_and_the_window() {
        let args = SoakArgs {
            push_rate: 1,
            reconnect_fraction: 0.1,
            reconnect_every: 60,
            broadcast_every: 300,
            sample_every: 5,
            warm_up: None,
        };
        assert_eq!(
            args.windows(Duration::from_secs(3600)),
            (Duration::from_secs(300), Duration::from_secs(60))
        );
        assert_eq!(
            args.windows(Duration::from_secs(120)),
            (Duration::from_secs(30), Duration::from_secs(15))
        );
    }
}
