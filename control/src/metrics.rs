//! The control plane's metrics: what it does for each app, counted and
//! timed in one Prometheus registry that `/metrics` encodes after the
//! gateway's counters.
//!
//! Labels are bounded by what an operator configures: an app, a webhook
//! outcome. No user, device or connection is ever a label.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use herald_proto::ids::AppId;
use herald_proto::plane::ConnId;
use prometheus::core::Collector as _;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from half a millisecond (a push stored on
/// a quiet node) to 30 s (a webhook at its deadline).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Messages delivered live whose ack is awaited for `herald_push_ack_seconds`,
/// over every connection of the node. Past it new deliveries go untimed
/// rather than the table growing with clients that never ack.
const ACK_CLOCKS_MAX: usize = 100_000;

/// Per connection and app: past it the oldest delivery's clock is dropped.
const ACK_CLOCKS_PER_BINDING_MAX: usize = 64;

/// How a webhook attempt ended, a label of `herald_webhook_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// A 2xx.
    Accepted,
    /// A 4xx other than 429: the business server refused the call.
    Refused,
    /// A 5xx or 429.
    ServerError,
    /// No connection, or no answer before the call's timeout.
    Unreachable,
}

impl WebhookOutcome {
    pub const ALL: [WebhookOutcome; 4] = [
        WebhookOutcome::Accepted,
        WebhookOutcome::Refused,
        WebhookOutcome::ServerError,
        WebhookOutcome::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Accepted => "accepted",
            WebhookOutcome::Refused => "refused",
            WebhookOutcome::ServerError => "server_error",
            WebhookOutcome::Unreachable => "unreachable",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub binds: IntCounterVec,
    pub messages_stored: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub transient_deliveries: IntCounterVec,
    pub messages_parked: IntCounterVec,
    pub session_timeouts_reported: IntCounterVec,
    pub broadcasts: IntCounterVec,
    pub acks: IntCounterVec,
    pub upstreams: IntCounterVec,
    pub pulls: IntCounterVec,
    pub payload_bytes_in: IntCounterVec,
    pub payload_bytes_out: IntCounterVec,
    pub fills: IntCounter,
    pub acks_saved: IntCounter,
    webhook_attempts: IntCounterVec,
    webhook_seconds: HistogramVec,
    store_seconds: HistogramVec,
    ack_seconds: HistogramVec,
    /// When each message delivered live to a connection was stored, until
    /// the connection acks it.
    ack_clocks: Mutex<AckClocks>,
}

/// The (seq, stored at) of each message delivered live on one binding and
/// not yet acked, oldest first.
type Waiting = VecDeque<(u64, Instant)>;

#[derive(Default)]
struct AckClocks {
    /// By connection, so that its close drops its clocks at once; each
    /// connection's few bound apps in a list.
    by_conn: HashMap<ConnId, Vec<(AppId, Waiting)>>,
    len: usize,
}

fn app_counter(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), &["app"]).expect("valid counter");
    registry
        .register(Box::new(counter.clone()))
        .expect("metric names are unique");
    counter
}

fn app_histogram(registry: &Registry, name: &str, help: &str) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    let histogram = HistogramVec::new(opts, &["app"]).expect("valid histogram");
    registry
        .register(Box::new(histogram.clone()))
        .expect("metric names are unique");
    histogram
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("valid counter");
    registry
        .register(Box::new(counter.clone()))
        .expect("metric names are unique");
    counter
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let webhook_attempts = IntCounterVec::new(
            Opts::new(
                "herald_webhook_attempts_total",
                "Webhook attempts (first calls and retries) by app and outcome \
                 (accepted, refused, server_error, unreachable).",
            ),
            &["app", "outcome"],
        )
        .expect("valid counter");
        registry
            .register(Box::new(webhook_attempts.clone()))
            .expect("metric names are unique");
        Metrics {
            binds: app_counter(&registry, "herald_binds_total", "Successful BINDs."),
            messages_stored: app_counter(
                &registry,
                "herald_messages_stored_total",
                "Messages stored (one per recipient inbox).",
            ),
            deliveries: app_counter(
                &registry,
                "herald_deliveries_total",
                "Stored messages handed to a connection's shard (one per connection).",
            ),
            transient_deliveries: app_counter(
                &registry,
                "herald_transient_deliveries_total",
                "Transient (\"store\": false) messages handed to a bound connection's shard \
                 (one per connection).",
            ),
            messages_parked: app_counter(
                &registry,
                "herald_messages_parked_total",
                "Messages parked for a device that never acked them \
                 (past delivery.redeliveries_max binds in a row).",
            ),
            session_timeouts_reported: app_counter(
                &registry,
                "herald_session_timeouts_reported_total",
                "Binds told that the device's previous connection was closed at its \
                 heartbeat deadline (SESSION_TIMED_OUT).",
            ),
            broadcasts: app_counter(
                &registry,
                "herald_broadcasts_total",
                "Broadcasts stored and started.",
            ),
            acks: app_counter(
                &registry,
                "herald_acks_received_total",
                "ACKs from devices.",
            ),
            upstreams: app_counter(
                &registry,
                "herald_upstreams_total",
                "UPSTREAM frames received from clients.",
            ),
            pulls: app_counter(
                &registry,
                "herald_pulls_total",
                "PULL frames received from clients (bodies of messages pushed to be pulled).",
            ),
            payload_bytes_in: app_counter(
                &registry,
                "herald_payload_bytes_in_total",
                "Payload bytes of clients' upstream data.",
            ),
            payload_bytes_out: app_counter(
                &registry,
                "herald_payload_bytes_out_total",
                "Payload bytes of stored messages handed to connections (live and catch-up).",
            ),
            fills: counter(
                &registry,
                "herald_fills_total",
                "Catch-up reads from storage sent to connections.",
            ),
            acks_saved: counter(
                &registry,
                "herald_acks_saved_total",
                "Device ack cursors written to storage.",
            ),
            webhook_attempts,
            webhook_seconds: app_histogram(
                &registry,
                "herald_webhook_call_seconds",
                "One webhook attempt, request to answer (or failure).",
            ),
            store_seconds: app_histogram(
                &registry,
                "herald_push_store_seconds",
                "A push from the API call reaching delivery to stored (durable).",
            ),
            ack_seconds: app_histogram(
                &registry,
                "herald_push_ack_seconds",
                "A message delivered live, from stored (or arrived from another node) \
                 to the connection's ACK of it.",
            ),
            ack_clocks: Mutex::default(),
            registry,
        }
    }

    pub fn stored_in(&self, app: &str, started: Instant) {
        self.store_seconds
            .with_label_values(&[app])
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn webhook_attempt(&self, app: &str, outcome: WebhookOutcome, started: Instant) {
        self.webhook_attempts
            .with_label_values(&[app, outcome.as_str()])
            .inc();
        self.webhook_seconds
            .with_label_values(&[app])
            .observe(started.elapsed().as_secs_f64());
    }

    /// A message `stored_at` was handed to `conn` live: its ack is timed.
    pub fn delivered(&self, conn: ConnId, app: &AppId, seq: u64, stored_at: Instant) {
        let mut clocks = self.ack_clocks.lock().expect("ack clocks lock");
        if clocks.len >= ACK_CLOCKS_MAX {
            return;
        }
        let bindings = clocks.by_conn.entry(conn).or_default();
        let index = match bindings.iter().position(|(bound, _)| bound == app) {
            Some(index) => index,
            None => {
                bindings.push((app.clone(), VecDeque::new()));
                bindings.len() - 1
            }
        };
        let waiting = &mut bindings[index].1;
        let dropped = if waiting.len() >= ACK_CLOCKS_PER_BINDING_MAX {
            waiting.pop_front();
            1
        } else {
            0
        };
        waiting.push_back((seq, stored_at));
        clocks.len = clocks.len + 1 - dropped;
    }

    /// `conn` acked every message of `app` up to `seq`.
    pub fn acked(&self, conn: ConnId, app: &AppId, seq: u64) {
        self.acks.with_label_values(&[app]).inc();
        let now = Instant::now();
        let mut clocks = self.ack_clocks.lock().expect("ack clocks lock");
        let Some(bindings) = clocks.by_conn.get_mut(&conn) else {
            return;
        };
        let Some(index) = bindings.iter().position(|(bound, _)| bound == app) else {
            return;
        };
        let waiting = &mut bindings[index].1;
        let histogram = self.ack_seconds.with_label_values(&[app]);
        let mut settled = 0;
        while let Some(&(delivered_seq, stored_at)) = waiting.front() {
            if delivered_seq > seq {
                break;
            }
            histogram.observe(now.duration_since(stored_at).as_secs_f64());
            waiting.pop_front();
            settled += 1;
        }
        if waiting.is_empty() {
            bindings.swap_remove(index);
            if bindings.is_empty() {
                clocks.by_conn.remove(&conn);
            }
        }
        clocks.len -= settled;
    }

    /// The connection is gone: its deliveries will never be acked by it.
    pub fn closed(&self, conn: ConnId) {
        let mut clocks = self.ack_clocks.lock().expect("ack clocks lock");
        if let Some(bindings) = clocks.by_conn.remove(&conn) {
            clocks.len -= bindings
                .iter()
                .map(|(_, waiting)| waiting.len())
                .sum::<usize>();
        }
    }

    /// Every series of a deleted app goes, so deleted apps do not pile up.
    pub fn forget_app(&self, app: &str) {
        for counter in [
            &self.binds,
            &self.messages_stored,
            &self.deliveries,
            &self.transient_deliveries,
            &self.messages_parked,
            &self.session_timeouts_reported,
            &self.broadcasts,
            &self.acks,
            &self.upstreams,
            &self.pulls,
            &self.payload_bytes_in,
            &self.payload_bytes_out,
        ] {
            let _ = counter.remove_label_values(&[app]);
        }
        for histogram in [
            &self.webhook_seconds,
            &self.store_seconds,
            &self.ack_seconds,
        ] {
            let _ = histogram.remove_label_values(&[app]);
        }
        for outcome in WebhookOutcome::ALL {
            let _ = self
                .webhook_attempts
                .remove_label_values(&[app, outcome.as_str()]);
        }
    }

    /// Appends the Prometheus text of every series.
    pub fn encode(&self, text: &mut String) {
        encode_registry(&self.registry, text);
    }

    /// Each app's counters so far, by app: only apps with a series. Read
    /// from the collected series, so reading makes no series (a deleted
    /// app's would outlive `forget_app`).
    pub fn app_totals(&self) -> HashMap<String, AppTotals> {
        let mut totals: HashMap<String, AppTotals> = HashMap::new();
        let counters: [(&IntCounterVec, TotalField); 6] = [
            (&self.binds, |t| &mut t.binds),
            (&self.messages_stored, |t| &mut t.messages_stored),
            (&self.deliveries, |t| &mut t.deliveries),
            (&self.broadcasts, |t| &mut t.broadcasts),
            (&self.acks, |t| &mut t.acks),
            (&self.upstreams, |t| &mut t.upstreams),
        ];
        for (counter, field) in counters {
            for (labels, value) in counter_values(counter) {
                if let Some(app) = labels.get("app") {
                    *field(totals.entry(app.clone()).or_default()) = value;
                }
            }
        }
        for (labels, value) in counter_values(&self.webhook_attempts) {
            if let (Some(app), Some(outcome)) = (labels.get("app"), labels.get("outcome")) {
                totals
                    .entry(app.clone())
                    .or_default()
                    .webhook_attempts
                    .insert(outcome.clone(), value);
            }
        }
        totals
    }
}

/// An app's counters on this node since it started (what `/metrics`
/// shows as `herald_*_total{app=..}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct AppTotals {
    pub binds: u64,
    pub messages_stored: u64,
    pub deliveries: u64,
    pub broadcasts: u64,
    pub acks: u64,
    pub upstreams: u64,
    /// By outcome (`WebhookOutcome::as_str`).
    pub webhook_attempts: BTreeMap<String, u64>,
}

/// Where `Metrics::app_totals` puts one counter's value.
type TotalField = fn(&mut AppTotals) -> &mut u64;

/// Every series of `counter`: its labels by name, and its value.
fn counter_values(counter: &IntCounterVec) -> Vec<(HashMap<String, String>, u64)> {
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|metric| {
            let labels = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name().to_owned(), pair.value().to_owned()))
                .collect();
            (labels, metric.get_counter().get_value() as u64)
        })
        .collect()
}

/// Appends a registry's series in the Prometheus text format.
pub fn encode_registry(registry: &Registry, text: &mut String) {
    let mut bytes = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut bytes)
        .expect("text encoding of gathered metrics");
    text.push_str(&String::from_utf8(bytes).expect("the text format is UTF-8"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(n: u32) -> ConnId {
        ConnId {
            shard: 0,
            slot: n,
            generation: 1,
        }
    }

    #[test]
    fn an_ack_times_every_delivery_up_to_its_seq_and_nothing_after() {
        let metrics = Metrics::new();
        let app = AppId::from("chat");
        let stored_at = Instant::now();
        for seq in 1..=3 {
            metrics.delivered(conn(1), &app, seq, stored_at);
        }
        metrics.acked(conn(1), &app, 2);
        let histogram = metrics.ack_seconds.with_label_values(&["chat"]);
        assert_eq!(histogram.get_sample_count(), 2);
        // Another connection's ack of the same seq times nothing.
        metrics.acked(conn(2), &app, 3);
        assert_eq!(histogram.get_sample_count(), 2);
        metrics.acked(conn(1), &app, 3);
        assert_eq!(histogram.get_sample_count(), 3);
        assert_eq!(metrics.ack_clocks.lock().unwrap().len, 0);
        assert_eq!(metrics.acks.with_label_values(&["chat"]).get(), 3);
    }

    #[test]
    fn clocks_stay_bounded_per_binding_and_go_with_their_connection() {
        let metrics = Metrics::new();
        let app = AppId::from("chat");
        let now = Instant::now();
        for seq in 0..(ACK_CLOCKS_PER_BINDING_MAX as u64 + 10) {
            metrics.delivered(conn(1), &app, seq, now);
        }
        metrics.delivered(conn(2), &app, 1, now);
        assert_eq!(
            metrics.ack_clocks.lock().unwrap().len,
            ACK_CLOCKS_PER_BINDING_MAX + 1
        );
        metrics.closed(conn(1));
        assert_eq!(metrics.ack_clocks.lock().unwrap().len, 1);
    }

    #[test]
    fn a_deleted_app_leaves_no_series() {
        let metrics = Metrics::new();
        metrics.binds.with_label_values(&["gone"]).inc();
        metrics.stored_in("gone", Instant::now());
        metrics.webhook_attempt("gone", WebhookOutcome::Refused, Instant::now());
        metrics.forget_app("gone");
        let mut text = String::new();
        metrics.encode(&mut text);
        assert!(!text.contains("\"gone\""), "{text}");
    }

    #[test]
    fn the_text_names_each_series_with_its_app() {
        let metrics = Metrics::new();
        metrics
            .messages_stored
            .with_label_values(&["chat"])
            .inc_by(3);
        metrics.stored_in("chat", Instant::now());
        let mut text = String::new();
        metrics.encode(&mut text);
        assert!(
            text.contains("herald_messages_stored_total{app=\"chat\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("herald_push_store_seconds_count{app=\"chat\"} 1"),
            "{text}"
        );
    }
}
