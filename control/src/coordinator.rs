//! The coordinator: what clients send toward an app's business server.
//! Upstream data, and online/offline events of its users, go to the app's
//! webhook as HTTP POSTs with a JSON body, paced per app by a token bucket,
//! so a storm of clients becomes a steady stream of requests rather than a
//! storm on the business server.
//!
//! Each app has a bounded queue and one worker that starts calls at the
//! app's rate, a few at a time. Upstream data waits its turn and its
//! outcome goes back to the client (UPSTREAM_ACK `accepted`, `rejected` or
//! `unavailable`); when the queue is full the client is told `unavailable`
//! at once. User-state events are advisory: when the queue is full they are
//! dropped and counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use herald_proto::UpstreamStatus;
use herald_proto::plane::ConnId;
use herald_proto::rate::{Rate, TokenBucket};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::clock::unix_ms;

/// Calls waiting per app. A storm beyond this is refused (upstream) or
/// dropped (user state) rather than held in memory.
pub const WEBHOOK_QUEUE_LEN: usize = 10_000;

/// Calls in flight at once per app: enough to keep up with a slow business
/// server at the app's rate, few enough not to flood it.
const WEBHOOK_CALLS_IN_FLIGHT_MAX: usize = 16;

/// How long one call may take before it counts as unavailable.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// What a webhook route is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    /// A client's UPSTREAM data naming this route (or naming none, for the
    /// app's default route).
    Upstream,
    /// A user bound the app on a connection.
    Online,
    /// A user's binding of the app ended.
    Offline,
}

/// One of an app's webhook routes: `{"route": "orders", "url":
/// "https://biz.example/herald", "events": ["upstream", "online"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRoute {
    pub route: String,
    pub url: String,
    pub events: Vec<WebhookEvent>,
}

/// Where an app's calls go, how they are signed, and how fast they go.
#[derive(Debug, Clone, PartialEq)]
pub struct AppWebhooks {
    pub routes: Vec<WebhookRoute>,
    /// The secrets calls are signed with: the current one first, then any
    /// an unfinished rotation's grace still honours.
    pub secrets: Vec<String>,
    /// Calls a second; `None`: as fast as they come.
    pub rate: Option<Rate>,
}

/// One call to make.
enum Call {
    Upstream {
        body: serde_json::Value,
        reply: oneshot::Sender<UpstreamStatus>,
    },
    State {
        body: serde_json::Value,
    },
}

/// Counts the coordinator keeps, for metrics.
#[derive(Debug, Default)]
pub struct CoordinatorCounters {
    pub calls: AtomicU64,
    pub failed: AtomicU64,
    /// Upstreams refused and state events dropped because a queue was full.
    pub shed: AtomicU64,
}

/// The apps' webhook queues. Cloning shares them.
#[derive(Clone, Default)]
pub struct Coordinator {
    queues: Arc<HashMap<String, mpsc::Sender<Call>>>,
    pub counters: Arc<CoordinatorCounters>,
}

impl Coordinator {
    /// Starts one worker per app that has a webhook, on the current runtime.
    pub fn start(webhooks: HashMap<String, AppWebhooks>) -> Coordinator {
        let counters = Arc::new(CoordinatorCounters::default());
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .expect("an HTTP client without TLS builds");
        let queues = webhooks
            .into_iter()
            .map(|(app, webhook)| {
                let (sender, receiver) = mpsc::channel(WEBHOOK_QUEUE_LEN);
                let worker = worker(webhook, receiver, client.clone(), counters.clone());
                tokio::spawn(worker);
                (app, sender)
            })
            .collect();
        Coordinator {
            queues: Arc::new(queues),
            counters,
        }
    }

    /// Sends a client's upstream data to the app's business server and
    /// says how it went; `no_endpoint` for an app without a webhook.
    pub async fn upstream(
        &self,
        app: &str,
        user: &str,
        device_id: &str,
        request_id: u64,
        payload: &Bytes,
    ) -> UpstreamStatus {
        let Some(queue) = self.queues.get(app) else {
            return UpstreamStatus::NO_ENDPOINT;
        };
        let body = json!({
            "kind": "upstream",
            "app": app,
            "user": user,
            "device_id": device_id,
            "request_id": request_id,
            "payload_base64": BASE64.encode(payload),
            "at_ms": unix_ms(),
        });
        let (reply, outcome) = oneshot::channel();
        if queue.try_send(Call::Upstream { body, reply }).is_err() {
            self.counters.shed.fetch_add(1, Ordering::Relaxed);
            return UpstreamStatus::UNAVAILABLE;
        }
        outcome.await.unwrap_or(UpstreamStatus::UNAVAILABLE)
    }

    /// Tells the app's business server a user came online (on a device) or
    /// went offline on a connection; dropped (and counted) when the app's
    /// queue is full. `conn_id` pairs the two.
    pub fn user_state(
        &self,
        app: &str,
        user: &str,
        conn: ConnId,
        device_id: Option<&str>,
        online: bool,
    ) {
        let Some(queue) = self.queues.get(app) else {
            return;
        };
        let body = json!({
            "kind": if online { "online" } else { "offline" },
            "app": app,
            "user": user,
            "conn_id": conn.to_string(),
            "device_id": device_id,
            "at_ms": unix_ms(),
        });
        if queue.try_send(Call::State { body }).is_err() {
            self.counters.shed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the app's calls at its rate, at most a few at once.
async fn worker(
    webhook: AppWebhooks,
    mut calls: mpsc::Receiver<Call>,
    client: reqwest::Client,
    counters: Arc<CoordinatorCounters>,
) {
    let mut bucket = webhook
        .rate
        .map(|rate| TokenBucket::new(rate, Instant::now()));
    let in_flight = Arc::new(Semaphore::new(WEBHOOK_CALLS_IN_FLIGHT_MAX));
    let Some(route) = webhook.routes.into_iter().next() else {
        return;
    };
    let url: Arc<str> = route.url.into();
    while let Some(call) = calls.recv().await {
        if let Some(bucket) = bucket.as_mut() {
            while let Err(wait) = bucket.take(1, Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (client, url, counters) = (client.clone(), url.clone(), counters.clone());
        tokio::spawn(async move {
            let (body, reply) = match call {
                Call::Upstream { body, reply } => (body, Some(reply)),
                Call::State { body } => (body, None),
            };
            counters.calls.fetch_add(1, Ordering::Relaxed);
            let status = match client.post(&*url).json(&body).send().await {
                Ok(response) if response.status().is_success() => UpstreamStatus::ACCEPTED,
                Ok(response) => {
                    tracing::debug!(status = %response.status(), "webhook refused a call");
                    UpstreamStatus::REJECTED
                }
                Err(error) => {
                    tracing::warn!(%error, "webhook unreachable");
                    UpstreamStatus::UNAVAILABLE
                }
            };
            if status != UpstreamStatus::ACCEPTED {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(reply) = reply {
                let _ = reply.send(status);
            }
            drop(permit);
        });
    }
}
