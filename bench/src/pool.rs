//! The coordinator's side of the workers: starts them, follows their
//! progress, sends them commands, and merges their reports.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use indicatif::{ProgressBar, ProgressStyle};

use crate::systems::{AppCreds, CONNECTIONS_PER_PROCESS};
use crate::transport::Transport;
use crate::worker::{Delivered, Progress, Target, WorkerMessage, WorkerSpec};

/// Source addresses per worker: 127.(worker + 2).0.1 and up.
pub const SOURCES_PER_WORKER: u8 = 16;

/// Clients connecting and handshaking at once, over all workers. More in
/// flight do not make the servers accept faster: past what they get
/// through within the clients' 15 s handshake timeout, connections only
/// wait in accept queues and time out. At the slowest accept rate seen on
/// the 2-core machine (~5,000 a second, with other builds running) these
/// wait about 3 s.
const HANDSHAKES_IN_FLIGHT: u64 = 16_384;
/// But at least this many per worker.
const HANDSHAKES_IN_FLIGHT_PER_WORKER_MIN: u64 = 64;

/// How long all connections may take to come up: 300 s, and 1 s more
/// per 2,000 connections (a million take 200 s at 5,000 a second).
pub fn ramp_timeout(connections: u64) -> Duration {
    Duration::from_secs(300 + connections / 2_000)
}

/// The load-generator workers for `connections`: one per
/// `CONNECTIONS_PER_PROCESS`.
pub fn worker_count(connections: u64) -> u64 {
    connections.div_ceil(CONNECTIONS_PER_PROCESS).max(1)
}

/// What each user received, by user.
pub type Deliveries = BTreeMap<u64, Delivered>;

/// A worker's progress, latency histogram (V2, base64) and deliveries.
type WorkerReport = (Progress, String, Deliveries);

struct WorkerHandle {
    child: Child,
    stdin: ChildStdin,
    progress: Arc<Mutex<Progress>>,
    report: Arc<Mutex<Option<WorkerReport>>>,
}

pub struct Workers {
    workers: Vec<WorkerHandle>,
    pub connections: u64,
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            crate::interrupt::kill_and_forget(&mut worker.child);
        }
    }
}

/// The clients the workers hold, and how.
pub struct Clients<'a> {
    pub target: Target,
    pub transport: Transport,
    /// The CA certificate the clients trust, for tls and wss.
    pub ca_file: Option<&'a Path>,
    pub creds: &'a AppCreds,
    /// User `u` connects to `servers[u % servers.len()]`.
    pub servers: &'a [SocketAddr],
    pub connections: u64,
    /// New connections per second in all; 0 is as fast as they go.
    pub rate_per_sec: u64,
    pub heartbeat_secs: u64,
    /// MQTT topic or NATS subject to subscribe to after connecting.
    pub subscribe: Option<&'a str>,
    /// Herald clients ack each broadcast, as the SDK's users do.
    pub ack_broadcasts: bool,
    /// Where clients a drain sends away come back (`WorkerSpec::drain_to`).
    pub drain_to: Option<SocketAddr>,
    /// Keep what each user receives and resume from it
    /// (`WorkerSpec::track_deliveries`).
    pub track_deliveries: bool,
}

/// What ramping up to N connections took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ramp {
    pub connections: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub failures: BTreeMap<String, u64>,
}

pub fn progress_bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

impl Workers {
    /// Starts enough workers for the clients and lets them connect.
    pub fn start(clients: &Clients<'_>) -> anyhow::Result<Workers> {
        let connections = clients.connections;
        let count = worker_count(connections);
        let in_flight = (HANDSHAKES_IN_FLIGHT / count).max(HANDSHAKES_IN_FLIGHT_PER_WORKER_MIN);
        let exe = std::env::current_exe()?;
        let mut workers = Vec::new();
        for w in 0..count {
            let first = connections * w / count;
            let end = connections * (w + 1) / count;
            let octet = u8::try_from(w + 2).context("too many workers")?;
            let spec = WorkerSpec {
                target: clients.target,
                servers: clients.servers.to_vec(),
                first_user: first,
                connections: end - first,
                sources: (1..=SOURCES_PER_WORKER)
                    .map(|host| Ipv4Addr::new(127, octet, 0, host))
                    .collect(),
                rate_per_sec: clients.rate_per_sec / count,
                heartbeat_secs: clients.heartbeat_secs,
                app: clients.creds.app.clone(),
                token_secret: clients.creds.token_secret.clone(),
                subscribe: clients.subscribe.map(str::to_owned),
                ack_broadcasts: clients.ack_broadcasts,
                transport: clients.transport,
                ca_file: clients.ca_file.map(Path::to_owned),
                handshakes_in_flight: Some(in_flight as usize),
                drain_to: clients.drain_to,
                track_deliveries: clients.track_deliveries,
            };
            let mut child = Command::new(&exe)
                .arg("worker")
                .arg(serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            crate::interrupt::register(child.id());
            let stdin = child.stdin.take().context("no stdin")?;
            let stdout = child.stdout.take().context("no stdout")?;
            let progress = Arc::new(Mutex::new(Progress::default()));
            let report = Arc::new(Mutex::new(None));
            let (progress_in, report_in) = (progress.clone(), report.clone());
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    match serde_json::from_str::<WorkerMessage>(&line) {
                        Ok(WorkerMessage::Progress(p)) => *progress_in.lock().unwrap() = p,
                        Ok(WorkerMessage::Report {
                            progress,
                            latency_us_v2,
                            deliveries,
                        }) => {
                            *report_in.lock().unwrap() =
                                Some((progress, latency_us_v2, deliveries));
                        }
                        Err(_) => {}
                    }
                }
            });
            workers.push(WorkerHandle {
                child,
                stdin,
                progress,
                report,
            });
        }
        Ok(Workers {
            workers,
            connections,
        })
    }

    pub fn progress(&self) -> Vec<Progress> {
        self.workers
            .iter()
            .map(|w| w.progress.lock().unwrap().clone())
            .collect()
    }

    pub fn connected(&self) -> u64 {
        self.progress().iter().map(|p| p.connected).sum()
    }

    /// The worker processes, for reading their CPU time.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    pub fn pushes_received(&self) -> u64 {
        self.progress().iter().map(|p| p.pushes_received).sum()
    }

    pub fn failures(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for progress in self.progress() {
            for (kind, n) in progress.failures {
                *all.entry(kind).or_default() += n;
            }
        }
        all
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            if let Some(status) = worker.child.try_wait()? {
                // Reaped: its pid may be reused.
                crate::interrupt::forget(worker.child.id());
                bail!("a load-generator worker exited with {status}");
            }
        }
        Ok(())
    }

    /// Waits until every connection is up, drawing progress.
    pub fn wait_all_up(&mut self, timeout: Duration, label: &str) -> anyhow::Result<Ramp> {
        let bar = progress_bar(self.connections, label);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let progress = self.progress();
            bar.set_position(progress.iter().map(|p| p.connected).sum());
            if progress.len() == self.workers.len()
                && progress.iter().all(|p| p.all_up_at_ms.is_some())
            {
                bar.finish_and_clear();
                let start = progress.iter().map(|p| p.started_at_ms).min().unwrap_or(0);
                let end = progress
                    .iter()
                    .filter_map(|p| p.all_up_at_ms)
                    .max()
                    .unwrap_or(0);
                let seconds = (end.saturating_sub(start)) as f64 / 1000.0;
                return Ok(Ramp {
                    connections: self.connections,
                    seconds,
                    per_second: self.connections as f64 / seconds.max(0.001),
                    failures: self.failures(),
                });
            }
            if Instant::now() > deadline {
                bar.abandon();
                bail!(
                    "only {} of {} connections up after {timeout:?}; failures: {:?}",
                    self.connected(),
                    self.connections,
                    self.failures()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn command(&mut self, line: &str) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            writeln!(worker.stdin, "{line}")?;
            worker.stdin.flush()?;
        }
        Ok(())
    }

    /// Asks every worker for its report; merges the latency histograms.
    pub fn report(&mut self) -> anyhow::Result<(Vec<Progress>, Histogram<u64>)> {
        let (progress, latency, _) = self.report_with_deliveries()?;
        Ok((progress, latency))
    }

    /// `report`, and what each user received (with `track_deliveries`;
    /// users are the workers' own, so the maps do not overlap).
    pub fn report_with_deliveries(
        &mut self,
    ) -> anyhow::Result<(Vec<Progress>, Histogram<u64>, Deliveries)> {
        for worker in &self.workers {
            *worker.report.lock().unwrap() = None;
        }
        self.command("report")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut progress = Vec::new();
        let mut deliveries = BTreeMap::new();
        for worker in &self.workers {
            let (p, encoded, delivered) = loop {
                if let Some(report) = worker.report.lock().unwrap().take() {
                    break report;
                }
                if Instant::now() > deadline {
                    bail!("a worker did not report within 30 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
            let histogram: Histogram<u64> = Deserializer::new()
                .deserialize(&mut bytes.as_slice())
                .map_err(|error| anyhow::anyhow!("histogram: {error:?}"))?;
            merged.add(&histogram)?;
            progress.push(p);
            deliveries.extend(delivered);
        }
        Ok((progress, merged, deliveries))
    }
}
