//! Gateway counters: one set per shard, each written only by its shard and
//! summed when scraped, so counting never contends across cores. The
//! shards' latency histograms live in a Prometheus registry; each shard
//! observes only its own series.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use herald_proto::NetworkType;
use herald_proto::server::CloseReason;
use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};

use crate::per_ip::Refusal;
use crate::transport::TransportEnd;

/// Why connections ended, as metric labels, in a fixed order.
pub const CLOSE_REASONS: [&str; 16] = [
    "protocol_error",
    "client_error",
    "auth_timeout",
    "auth_failed",
    "heartbeat_timeout",
    "kicked",
    "drained",
    "slow_consumer",
    "overloaded",
    "peer_closed",
    "io_error",
    "flush_timeout",
    "tls_error",
    "websocket_upgrade_refused",
    "websocket_error",
    "read_timeout",
];

/// Why connections were turned away with GOAWAY(overloaded), as
/// `herald_connections_turned_away_total` labels them.
pub const TURN_AWAY_REASONS: [&str; 3] = ["accept_rate", "per_ip_connections", "per_ip_rate"];

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnAway {
    /// The gateway's `accept_rate`.
    AcceptRate,
    /// Its address's limits (`[gateway.per_ip]`).
    PerIp(Refusal),
}

impl TurnAway {
    pub fn label(self) -> &'static str {
        match self {
            TurnAway::AcceptRate => "accept_rate",
            TurnAway::PerIp(refusal) => refusal.label(),
        }
    }

    fn index(self) -> usize {
        let label = self.label();
        TURN_AWAY_REASONS
            .iter()
            .position(|&known| known == label)
            .expect("every TurnAway label is in TURN_AWAY_REASONS")
    }
}

/// How a connection ended, from the gateway's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEnd {
    /// The connection logic decided to close and its output was flushed.
    Closed(CloseReason),
    /// The client closed its side.
    PeerClosed,
    Io,
    /// The connection was closing but the client did not take the last
    /// frames in time.
    FlushTimeout,
    /// Its TLS or WebSocket layer failed.
    Transport(TransportEnd),
    /// A frame it began to send did not finish within its deadline
    /// (`[gateway.frame_read]`).
    ReadTimeout,
}

impl ConnEnd {
    pub fn label(self) -> &'static str {
        match self {
            ConnEnd::Closed(reason) => reason.as_str(),
            ConnEnd::PeerClosed => "peer_closed",
            ConnEnd::Io => "io_error",
            ConnEnd::FlushTimeout => "flush_timeout",
            ConnEnd::Transport(end) => end.label(),
            ConnEnd::ReadTimeout => "read_timeout",
        }
    }

    fn index(self) -> usize {
        let label = self.label();
        CLOSE_REASONS
            .iter()
            .position(|&known| known == label)
            .expect("every ConnEnd label is in CLOSE_REASONS")
    }
}

#[derive(Debug, Default)]
struct Counter(CachePadded<AtomicU64>);

impl Counter {
    /// Only the owning shard writes, so a load and a store suffice.
    fn add(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    fn sub(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed) - n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A shard's loop turn, in seconds: from a few microseconds (a turn with
/// little to do) to the 100 ms that would be a pause clients feel.
const TURN_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

/// Stored to written, in seconds: the control plane's hand-off and the
/// shard's queue, so from tens of microseconds to a backlog of seconds.
const WRITE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 5.0,
];

/// Heartbeat intervals, in seconds: from the seconds tests and probing
/// clients start at to the half hour a wired client may keep.
const HEARTBEAT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 450.0,
    600.0, 900.0, 1800.0,
];

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardCounters {
    connections_open: Counter,
    connections_accepted: Counter,
    connections_refused: Counter,
    frames_in: Counter,
    frames_out: Counter,
    pushes_out: Counter,
    acks_in: Counter,
    closed: [Counter; CLOSE_REASONS.len()],
    turned_away: [Counter; TURN_AWAY_REASONS.len()],
    /// Set once the shard's series exists in the registry.
    turn_seconds: Option<Histogram>,
    /// The heartbeat-interval series, indexed by `NetworkType::index`
    /// (empty until the registry has them).
    heartbeat_seconds: Vec<Histogram>,
}

impl ShardCounters {
    /// One loop turn's work took `seconds` (the wait for events excluded).
    pub fn turn(&self, seconds: f64) {
        if let Some(histogram) = &self.turn_seconds {
            histogram.observe(seconds);
        }
    }

    /// A connection's heartbeat interval was set (HELLO) or negotiated.
    pub fn heartbeat_set(&self, network: NetworkType, interval_secs: f64) {
        if let Some(histogram) = self.heartbeat_seconds.get(network.index()) {
            histogram.observe(interval_secs);
        }
    }

    pub fn connection_opened(&self) {
        self.connections_open.add(1);
        self.connections_accepted.add(1);
    }

    pub fn connection_refused(&self) {
        self.connections_refused.add(1);
    }

    pub fn turned_away(&self, reason: TurnAway) {
        self.turned_away[reason.index()].add(1);
    }

    pub fn connection_closed(&self, end: ConnEnd) {
        self.connections_open.sub(1);
        self.closed[end.index()].add(1);
    }

    pub fn frames_in(&self, n: u64) {
        self.frames_in.add(n);
    }

    pub fn frames_out(&self, n: u64) {
        self.frames_out.add(n);
    }

    pub fn pushes_out(&self, n: u64) {
        self.pushes_out.add(n);
    }

    pub fn acks_in(&self, n: u64) {
        self.acks_in.add(n);
    }
}

/// The sum over every shard at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewaySnapshot {
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub pushes_out: u64,
    pub acks_in: u64,
    /// Indexed like [`CLOSE_REASONS`].
    pub closed: [u64; CLOSE_REASONS.len()],
    /// Indexed like [`TURN_AWAY_REASONS`].
    pub turned_away: [u64; TURN_AWAY_REASONS.len()],
}

pub struct GatewayMetrics {
    shards: Vec<ShardCounters>,
    registry: Registry,
    write_seconds: HistogramVec,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl GatewayMetrics {
    pub fn new(shards: usize) -> GatewayMetrics {
        let registry = Registry::new();
        let turn_seconds = HistogramVec::new(
            HistogramOpts::new(
                "herald_shard_turn_seconds",
                "One turn of a shard's event loop: its commands, connections and events, \
                 without the wait for the next events.",
            )
            .buckets(TURN_BUCKETS.to_vec()),
            &["shard"],
        )
        .expect("valid histogram");
        let write_seconds = HistogramVec::new(
            HistogramOpts::new(
                "herald_push_write_seconds",
                "A pushed message from stored (or arrived from the node that stored it) \
                 to the shard writing it to the connection.",
            )
            .buckets(WRITE_BUCKETS.to_vec()),
            &["app"],
        )
        .expect("valid histogram");
        let heartbeat_seconds = HistogramVec::new(
            HistogramOpts::new(
                "herald_heartbeat_interval_seconds",
                "Heartbeat intervals put in force, by network type: observed at HELLO \
                 (the type's start interval) and at each HEARTBEAT negotiation (the \
                 clamped interval).",
            )
            .buckets(HEARTBEAT_BUCKETS.to_vec()),
            &["network"],
        )
        .expect("valid histogram");
        for collector in [
            turn_seconds.clone(),
            write_seconds.clone(),
            heartbeat_seconds.clone(),
        ] {
            registry
                .register(Box::new(collector))
                .expect("metric names are unique");
        }
        GatewayMetrics {
            shards: (0..shards)
                .map(|shard| ShardCounters {
                    turn_seconds: Some(turn_seconds.with_label_values(&[&shard.to_string()])),
                    heartbeat_seconds: NetworkType::ALL
                        .iter()
                        .map(|network| heartbeat_seconds.with_label_values(&[network.as_str()]))
                        .collect(),
                    ..ShardCounters::default()
                })
                .collect(),
            registry,
            write_seconds,
        }
    }

    /// The app's stored-to-written histogram, for a shard to keep.
    pub fn write_seconds(&self, app: &str) -> Histogram {
        self.write_seconds.with_label_values(&[app])
    }

    /// A deleted app's series goes, so deleted apps do not pile up.
    pub fn forget_app(&self, app: &str) {
        let _ = self.write_seconds.remove_label_values(&[app]);
    }

    /// The shards' histograms, for the Prometheus text encoder.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Each shard's open connections, by shard index.
    pub fn shard_connections(&self) -> Vec<u64> {
        self.shards
            .iter()
            .map(|shard| shard.connections_open.get())
            .collect()
    }

    pub fn shard(&self, shard: usize) -> &ShardCounters {
        &self.shards[shard]
    }

    pub fn snapshot(&self) -> GatewaySnapshot {
        let mut sum = GatewaySnapshot::default();
        for shard in &self.shards {
            sum.connections_open += shard.connections_open.get();
            sum.connections_accepted += shard.connections_accepted.get();
            sum.connections_refused += shard.connections_refused.get();
            sum.frames_in += shard.frames_in.get();
            sum.frames_out += shard.frames_out.get();
            sum.pushes_out += shard.pushes_out.get();
            sum.acks_in += shard.acks_in.get();
            for (total, counter) in sum.closed.iter_mut().zip(&shard.closed) {
                *total += counter.get();
            }
            for (total, counter) in sum.turned_away.iter_mut().zip(&shard.turned_away) {
                *total += counter.get();
            }
        }
        sum
    }
}
