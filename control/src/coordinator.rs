//! The coordinator: what clients send toward an app's business server.
//! Upstream data, and online/offline events of its users, go to the app's
//! webhook routes as signed HTTP(S) POSTs with a JSON body, paced per app by
//! a token bucket, so a storm of clients becomes a steady stream of
//! requests rather than a storm on the business server.
//!
//! Each app has a bounded queue and one worker that starts calls at the
//! app's rate, a few at a time. A call that fails in a way a retry can help
//! (no connection, no answer in time, 5xx, 429) goes back into its app's
//! queue after a jittered backoff, until its deadline; it keeps its place
//! in the queue bound while it waits, and each attempt takes a token and an
//! in-flight slot like a first call. Upstream data's outcome goes back to
//! the client (UPSTREAM_ACK `accepted` once the business server answered
//! 2xx, `rejected`, `unavailable`, `unknown_route`); when the queue is full
//! the client is told `unavailable` at once. User-state events are
//! advisory: when the queue is full they are dropped. Every call given up
//! is counted per app and reason.
//!
//! Apps' routes, secrets and rates change at runtime (`Coordinator::set_app`)
//! without touching other apps' queues.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use herald_proto::UpstreamStatus;
use herald_proto::plane::ConnId;
use herald_proto::rate::{Rate, TokenBucket};
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use utoipa::ToSchema;

use crate::clock::unix_ms;
use crate::metrics::{Metrics, WebhookOutcome};

/// Calls per app waiting to start, in flight, or waiting to be retried. A
/// storm beyond this is refused (upstream) or dropped (user state) rather
/// than held in memory.
pub const WEBHOOK_QUEUE_LEN: usize = 10_000;

/// Calls in flight at once per app: enough to keep up with a slow business
/// server at the app's rate, few enough not to flood it.
const WEBHOOK_CALLS_IN_FLIGHT_MAX: usize = 16;

/// How long one attempt may take before it counts as unanswered.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a user-state event is retried.
pub const DEFAULT_STATE_DEADLINE: Duration = Duration::from_secs(30);
/// How long an upstream is retried: the client waits for its UPSTREAM_ACK
/// meanwhile, so this is shorter than the state events' deadline.
pub const DEFAULT_UPSTREAM_DEADLINE: Duration = Duration::from_secs(10);

/// The most of a business server's answer body that is read (and
/// ignored): reading it lets the connection be reused.
const ANSWER_BODY_LEN_MAX: usize = 64 * 1024;

/// The longest wait before the first retry; each retry doubles it.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest wait before any retry: a business server back after an
/// outage sees its queued calls within seconds.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// `t=<unix seconds>,v1=<hex HMAC-SHA256>` (one `v1` per secret).
pub const SIGNATURE_HEADER: &str = "Herald-Signature";
/// `upstream`, `online`, `offline` or `parked`.
pub const EVENT_HEADER: &str = "Herald-Event";
/// The route the call was made for.
pub const ROUTE_HEADER: &str = "Herald-Route";

/// What a webhook route is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    /// A client's UPSTREAM data naming this route (or naming none, for the
    /// app's default route).
    Upstream,
    /// A user bound the app on a connection.
    Online,
    /// A user's binding of the app ended.
    Offline,
    /// A device never acked a message through `delivery.redeliveries_max`
    /// binds in a row: it is not sent to that device again.
    Parked,
}

impl WebhookEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Upstream => "upstream",
            WebhookEvent::Online => "online",
            WebhookEvent::Offline => "offline",
            WebhookEvent::Parked => "parked",
        }
    }
}

/// One of an app's webhook routes: `{"route": "orders", "url":
/// "https://biz.example/herald", "events": ["upstream", "online"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    /// an unfinished rotation's grace still honours. Calls carry one
    /// signature per secret; with none they carry a signature header no
    /// receiver accepts.
    pub secrets: Vec<String>,
    /// Calls a second; `None`: as fast as they come.
    pub rate: Option<Rate>,
}

impl AppWebhooks {
    /// The route an upstream naming `route` goes to (none named: the
    /// app's default route, the first that takes upstream data).
    fn upstream_route(&self, route: Option<&str>) -> Option<usize> {
        self.routes.iter().position(|candidate| {
            candidate.events.contains(&WebhookEvent::Upstream)
                && route.is_none_or(|name| candidate.route == name)
        })
    }
}

/// How calls are made and retried, for every app.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookPolicy {
    /// PEM certificates that https:// webhooks must chain to, instead of
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// How long one attempt may take.
    pub call_timeout: Duration,
    /// How long after it was queued an upstream is retried (its client
    /// waits that long at most).
    pub upstream_deadline: Duration,
    /// How long after it was queued a user-state event is retried.
    pub state_deadline: Duration,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        WebhookPolicy {
            ca_file: None,
            call_timeout: DEFAULT_WEBHOOK_TIMEOUT,
            upstream_deadline: DEFAULT_UPSTREAM_DEADLINE,
            state_deadline: DEFAULT_STATE_DEADLINE,
        }
    }
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookSetupError {
    #[error("cannot read the webhook CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("the webhook CA file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("a webhook CA certificate is not usable: {0}")]
    Certificate(rustls::Error),
}

/// Why a call was given up, a label of `herald_webhook_gave_up_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GiveUpReason {
    /// Retried without success until its deadline.
    Deadline,
    /// The business server refused it (a 4xx other than 429, or a 3xx:
    /// a signed call is never redirected).
    Rejected,
    /// The app's queue was full.
    QueueFull,
}

impl GiveUpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::Deadline => "deadline",
            GiveUpReason::Rejected => "rejected",
            GiveUpReason::QueueFull => "queue_full",
        }
    }
}

/// One call to make, with its place in the app's queue bound.
struct Call {
    app: Arc<str>,
    webhooks: Arc<AppWebhooks>,
    /// Index into `webhooks.routes`.
    route: usize,
    event: WebhookEvent,
    body: Bytes,
    deadline: Instant,
    /// Attempts made so far.
    attempts: u32,
    /// Where an upstream's outcome goes.
    reply: Option<oneshot::Sender<UpstreamStatus>>,
    /// The app's queue, for a retry. Held by every call, so a removed
    /// app's worker runs until its last call is done.
    queue: mpsc::Sender<Call>,
    _pending: OwnedSemaphorePermit,
}

impl Call {
    fn answer(self, status: UpstreamStatus) {
        if let Some(reply) = self.reply {
            let _ = reply.send(status);
        }
    }
}

/// One app's queue.
struct AppQueue {
    app: Arc<str>,
    /// The routes and secrets new calls are made with; calls already
    /// queued keep the ones they were queued with.
    webhooks: Arc<AppWebhooks>,
    calls: mpsc::Sender<Call>,
    /// `WEBHOOK_QUEUE_LEN` permits, one held by every call until it is
    /// done: the queue's channel can then never be full for a retry.
    pending: Arc<Semaphore>,
    rate: watch::Sender<Option<Rate>>,
}

/// The HTTP/1.1 client calls go through, http:// or https://.
type HttpClient = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What makes the calls, shared by every app's worker.
struct Caller {
    client: HttpClient,
    policy: WebhookPolicy,
    retries: AtomicU64,
    gave_up: Mutex<BTreeMap<(String, GiveUpReason), u64>>,
    metrics: Arc<Metrics>,
}

/// The apps' webhook queues. Cloning shares them.
#[derive(Clone)]
pub struct Coordinator {
    apps: Arc<RwLock<HashMap<String, AppQueue>>>,
    caller: Arc<Caller>,
    runtime: tokio::runtime::Handle,
}

/// A webhook call's outcome that is not a 2xx.
enum Failure {
    /// A retry may help: no connection, no answer in time, 5xx, 429.
    Retryable,
    /// The business server said no.
    Final,
}

impl Coordinator {
    /// Starts one worker per app that has webhooks, on the current runtime.
    pub fn start(
        webhooks: HashMap<String, AppWebhooks>,
        policy: WebhookPolicy,
        metrics: Arc<Metrics>,
    ) -> Result<Coordinator, WebhookSetupError> {
        let client = http_client(&policy)?;
        let coordinator = Coordinator {
            apps: Arc::default(),
            caller: Arc::new(Caller {
                client,
                policy,
                retries: AtomicU64::new(0),
                gave_up: Mutex::default(),
                metrics,
            }),
            runtime: tokio::runtime::Handle::current(),
        };
        for (app, webhooks) in webhooks {
            coordinator.set_app(&app, Some(webhooks));
        }
        Ok(coordinator)
    }

    /// Replaces an app's routes, secrets and rate (`None`: removes its
    /// webhooks; its upstream is then answered `no_endpoint`). Calls
    /// already queued are made as they were queued; other apps' queues are
    /// not touched. Returns at once.
    pub fn set_app(&self, app: &str, webhooks: Option<AppWebhooks>) {
        let mut apps = self.apps.write().expect("coordinator lock");
        let Some(webhooks) = webhooks else {
            // The worker finishes the calls queued so far, then ends.
            apps.remove(app);
            return;
        };
        if let Some(queue) = apps.get_mut(app) {
            queue.rate.send_replace(webhooks.rate);
            queue.webhooks = Arc::new(webhooks);
            return;
        }
        let (calls, receiver) = mpsc::channel(WEBHOOK_QUEUE_LEN);
        let (rate, rate_changes) = watch::channel(webhooks.rate);
        self.runtime
            .spawn(run_app(receiver, rate_changes, self.caller.clone()));
        apps.insert(
            app.to_owned(),
            AppQueue {
                app: app.into(),
                webhooks: Arc::new(webhooks),
                calls,
                pending: Arc::new(Semaphore::new(WEBHOOK_QUEUE_LEN)),
                rate,
            },
        );
    }

    /// Sends a client's upstream data to the app's business server, to
    /// `route` or the app's default route, and says how it went:
    /// `no_endpoint` for an app without an upstream route, `unknown_route`
    /// for a route the app does not have for upstream data.
    pub async fn upstream(
        &self,
        app: &str,
        user: &str,
        device_id: &str,
        request_id: u64,
        route: Option<&str>,
        payload: &Bytes,
    ) -> UpstreamStatus {
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
        {
            let apps = self.apps.read().expect("coordinator lock");
            let Some(queue) = apps.get(app) else {
                return UpstreamStatus::NO_ENDPOINT;
            };
            let Some(index) = queue.webhooks.upstream_route(route) else {
                return match route {
                    Some(_) => UpstreamStatus::UNKNOWN_ROUTE,
                    None => UpstreamStatus::NO_ENDPOINT,
                };
            };
            let deadline = Instant::now() + self.caller.policy.upstream_deadline;
            let event = WebhookEvent::Upstream;
            if !self.enqueue(queue, index, event, deadline, Some(reply), to_bytes(&body)) {
                return UpstreamStatus::UNAVAILABLE;
            }
        }
        outcome.await.unwrap_or(UpstreamStatus::UNAVAILABLE)
    }

    /// Tells each of the app's routes that takes the event that a user
    /// came online (on a device) or went offline on a connection; dropped
    /// (and counted) when the app's queue is full. `conn_id` pairs the two.
    pub fn user_state(
        &self,
        app: &str,
        user: &str,
        conn: ConnId,
        device_id: Option<&str>,
        online: bool,
    ) {
        let event = if online {
            WebhookEvent::Online
        } else {
            WebhookEvent::Offline
        };
        let apps = self.apps.read().expect("coordinator lock");
        let Some(queue) = apps.get(app) else {
            return;
        };
        let body = to_bytes(&json!({
            "kind": event.as_str(),
            "app": app,
            "user": user,
            "conn_id": conn.to_string(),
            "device_id": device_id,
            "at_ms": unix_ms(),
        }));
        self.enqueue_advisory(queue, event, body);
    }

    /// Tells each of the app's routes that takes `parked` that a message
    /// was parked for a device (it never acked it); dropped (and counted)
    /// when the app's queue is full, like the user-state events.
    pub fn parked(&self, app: &str, user: &str, device_id: &str, seq: u64, message_id: &str) {
        let event = WebhookEvent::Parked;
        let apps = self.apps.read().expect("coordinator lock");
        let Some(queue) = apps.get(app) else {
            return;
        };
        let body = to_bytes(&json!({
            "kind": event.as_str(),
            "app": app,
            "user": user,
            "device_id": device_id,
            "seq": seq,
            "message_id": message_id,
            "at_ms": unix_ms(),
        }));
        self.enqueue_advisory(queue, event, body);
    }

    /// Queues an advisory event (user state, parked) for each of the app's
    /// routes that takes it, retried until the state deadline.
    fn enqueue_advisory(&self, queue: &AppQueue, event: WebhookEvent, body: Bytes) {
        let deadline = Instant::now() + self.caller.policy.state_deadline;
        for (index, route) in queue.webhooks.routes.iter().enumerate() {
            if route.events.contains(&event) {
                self.enqueue(queue, index, event, deadline, None, body.clone());
            }
        }
    }

    /// Queues a call unless the app's queue bound is reached (then counts
    /// it given up).
    fn enqueue(
        &self,
        queue: &AppQueue,
        route: usize,
        event: WebhookEvent,
        deadline: Instant,
        reply: Option<oneshot::Sender<UpstreamStatus>>,
        body: Bytes,
    ) -> bool {
        let Ok(pending) = queue.pending.clone().try_acquire_owned() else {
            self.caller.give_up(&queue.app, GiveUpReason::QueueFull);
            return false;
        };
        let call = Call {
            app: queue.app.clone(),
            webhooks: queue.webhooks.clone(),
            route,
            event,
            body,
            deadline,
            attempts: 0,
            reply,
            queue: queue.calls.clone(),
            _pending: pending,
        };
        // The permit guarantees room; only a worker that died refuses.
        if queue.calls.try_send(call).is_err() {
            self.caller.give_up(&queue.app, GiveUpReason::QueueFull);
            return false;
        }
        true
    }

    /// Calls given up so far, by app and reason.
    pub fn gave_up_counts(&self) -> Vec<(String, GiveUpReason, u64)> {
        let gave_up = self.caller.gave_up.lock().expect("counter lock");
        gave_up
            .iter()
            .map(|((app, reason), count)| (app.clone(), *reason, *count))
            .collect()
    }

    /// Attempts that were retries.
    pub fn retry_count(&self) -> u64 {
        self.caller.retries.load(Ordering::Relaxed)
    }
}

/// The HTTP client every call goes through: rustls on the ring provider,
/// trusting the system's roots or `policy.ca_file`. It never follows a
/// redirect: a signed call goes only where it was configured to.
fn http_client(policy: &WebhookPolicy) -> Result<HttpClient, WebhookSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match &policy.ca_file {
        Some(path) => {
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
                .map_err(|error| WebhookSetupError::CaFile {
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            if certificates.is_empty() {
                return Err(WebhookSetupError::NoCertificate { path: path.clone() });
            }
            for certificate in certificates {
                roots
                    .add(certificate)
                    .map_err(WebhookSetupError::Certificate)?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "a system root certificate could not be read");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                tracing::warn!(
                    ignored,
                    "no system root certificates: https:// webhooks will fail until \
                     [webhooks] ca_file names a CA"
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(HyperClient::builder(TokioExecutor::new()).build(connector))
}

fn to_bytes(body: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(body).expect("a JSON value serializes"))
}

/// The `Herald-Signature` value: `t=<timestamp>`, then `,v1=<hex>` per
/// secret, each the HMAC-SHA256 under that secret of `"<timestamp>.<body>"`
/// (Stripe's scheme: the timestamp inside the MAC lets a receiver refuse
/// a replayed call).
pub fn signature(secrets: &[String], timestamp_secs: u64, body: &[u8]) -> String {
    let mut header = format!("t={timestamp_secs}");
    for secret in secrets {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(timestamp_secs.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let _ = write!(header, ",v1={}", hex::encode(mac.finalize().into_bytes()));
    }
    header
}

/// The longest wait before retry number `retry` (0: the first): 100 ms
/// doubling, capped at 5 s.
fn backoff_ceiling(retry: u32) -> Duration {
    let factor = 1_u32.checked_shl(retry).unwrap_or(u32::MAX);
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_CAP)
}

/// The wait before retry number `retry`: uniform up to its ceiling ("full
/// jitter"), so calls that failed together do not come back together.
fn backoff(retry: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = backoff_ceiling(retry).as_micros() as u64;
    Duration::from_micros(rng.random_range(0..=ceiling))
}

impl Caller {
    fn give_up(&self, app: &str, reason: GiveUpReason) {
        let mut gave_up = self.gave_up.lock().expect("counter lock");
        *gave_up.entry((app.to_owned(), reason)).or_default() += 1;
    }

    /// One attempt of `call`, within `time_left` of its deadline.
    async fn send(&self, call: &Call, time_left: Duration) -> Result<(), Failure> {
        let route = &call.webhooks.routes[call.route];
        let timestamp = unix_ms() / 1_000;
        let request = Request::post(&route.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                signature(&call.webhooks.secrets, timestamp, &call.body),
            )
            .header(EVENT_HEADER, call.event.as_str())
            .header(ROUTE_HEADER, &route.route)
            .body(Full::new(call.body.clone()));
        let request = match request {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%error, url = %route.url, "webhook URL or route is not usable");
                return Err(Failure::Final);
            }
        };
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            // Read (a bounded part of) the answer so the connection is kept.
            let _ = Limited::new(response.into_body(), ANSWER_BODY_LEN_MAX)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>(status)
        };
        let timeout = self.policy.call_timeout.min(time_left);
        let started = Instant::now();
        let (outcome, result) = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(status)) if status.is_success() => (WebhookOutcome::Accepted, Ok(())),
            Ok(Ok(status))
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS =>
            {
                tracing::debug!(%status, url = %route.url, "webhook call failed; retrying");
                (WebhookOutcome::ServerError, Err(Failure::Retryable))
            }
            Ok(Ok(status)) => {
                tracing::debug!(%status, url = %route.url, "webhook refused a call");
                (WebhookOutcome::Refused, Err(Failure::Final))
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, url = %route.url, "webhook unreachable; retrying");
                (WebhookOutcome::Unreachable, Err(Failure::Retryable))
            }
            Err(_) => {
                tracing::debug!(url = %route.url, "webhook did not answer in time; retrying");
                (WebhookOutcome::Unreachable, Err(Failure::Retryable))
            }
        };
        self.metrics.webhook_attempt(&call.app, outcome, started);
        result
    }

    /// Makes one attempt and settles the call, or puts it back in its
    /// queue after a backoff.
    async fn attempt(self: Arc<Self>, mut call: Call, in_flight: OwnedSemaphorePermit) {
        let app = call.app.clone();
        let time_left = call.deadline.saturating_duration_since(Instant::now());
        let outcome = self.send(&call, time_left).await;
        drop(in_flight);
        match outcome {
            Ok(()) => call.answer(UpstreamStatus::ACCEPTED),
            Err(Failure::Final) => {
                self.give_up(&app, GiveUpReason::Rejected);
                call.answer(UpstreamStatus::REJECTED);
            }
            Err(Failure::Retryable) => {
                let time_left = call.deadline.saturating_duration_since(Instant::now());
                if time_left < RETRY_TIME_LEFT_MIN {
                    self.give_up(&app, GiveUpReason::Deadline);
                    call.answer(UpstreamStatus::UNAVAILABLE);
                    return;
                }
                // A backoff that would pass the deadline is cut short: the
                // call uses its whole deadline rather than giving up early.
                let wait = backoff(call.attempts, &mut rand::rng()).min(time_left / 2);
                call.attempts += 1;
                tokio::time::sleep(wait).await;
                self.retries.fetch_add(1, Ordering::Relaxed);
                let queue = call.queue.clone();
                // The call's permit keeps room for it in the channel.
                if let Err(error) = queue.try_send(call) {
                    self.give_up(&app, GiveUpReason::QueueFull);
                    error.into_inner().answer(UpstreamStatus::UNAVAILABLE);
                }
            }
        }
    }
}

/// A failed call with less time than this left before its deadline is
/// given up rather than tried again.
const RETRY_TIME_LEFT_MIN: Duration = Duration::from_millis(20);

/// Starts the app's calls at its rate, at most a few at once. Ends once
/// the app is removed and its last call is done.
async fn run_app(
    mut calls: mpsc::Receiver<Call>,
    mut rate: watch::Receiver<Option<Rate>>,
    caller: Arc<Caller>,
) {
    let mut bucket = rate
        .borrow_and_update()
        .map(|rate| TokenBucket::new(rate, Instant::now()));
    let in_flight = Arc::new(Semaphore::new(WEBHOOK_CALLS_IN_FLIGHT_MAX));
    while let Some(call) = calls.recv().await {
        if call.deadline <= Instant::now() {
            // It waited its whole deadline in the queue: spend nothing on it.
            caller.give_up(&call.app, GiveUpReason::Deadline);
            call.answer(UpstreamStatus::UNAVAILABLE);
            continue;
        }
        if rate.has_changed().unwrap_or(false) {
            bucket = rate
                .borrow_and_update()
                .map(|rate| TokenBucket::new(rate, Instant::now()));
        }
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
        tokio::spawn(caller.clone().attempt(call, permit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn a_signature_has_the_timestamp_then_one_hmac_per_secret() {
        let secrets = [
            "whsec-current-0123456789abcdef0123".to_owned(),
            "whsec-old-0123456789abcdef01234567".to_owned(),
        ];
        // Computed apart from this code (Python's hmac module).
        assert_eq!(
            signature(&secrets, 1_700_000_000, br#"{"kind":"online"}"#),
            "t=1700000000,\
             v1=6b55a7133cfc7d7a7847873f1e232bf9fdc38fb8688e676b4514abda5636f8fd,\
             v1=cfcb4c13552abcd378c2e24dcb70d779732bede8b5697b6c5c91578cde5d1dd5"
        );
        assert_eq!(signature(&[], 5, b"{}"), "t=5");
    }

    #[test]
    fn backoff_doubles_from_100_ms_up_to_5_s_and_is_jittered_below_that() {
        let ceilings: Vec<u128> = (0..8).map(|n| backoff_ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000]);
        assert_eq!(backoff_ceiling(200), BACKOFF_CAP);
        let mut rng = StdRng::seed_from_u64(7);
        let waits: Vec<Duration> = (0..100).map(|_| backoff(3, &mut rng)).collect();
        assert!(waits.iter().all(|wait| *wait <= Duration::from_millis(800)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 90, "{waits:?}");
        assert!(waits.iter().any(|wait| *wait < Duration::from_millis(400)));
        assert!(waits.iter().any(|wait| *wait > Duration::from_millis(400)));
    }

    fn route(name: &str, events: &[WebhookEvent]) -> WebhookRoute {
        WebhookRoute {
            route: name.to_owned(),
            url: format!("http://127.0.0.1:9/{name}"),
            events: events.to_vec(),
        }
    }

    fn webhooks() -> AppWebhooks {
        use WebhookEvent::*;
        AppWebhooks {
            routes: vec![
                route("presence", &[Online, Offline]),
                route("main", &[Upstream, Offline]),
                route("orders", &[Upstream]),
            ],
            secrets: vec!["s".repeat(32)],
            rate: None,
        }
    }

    #[test]
    fn an_upstream_goes_to_its_route_or_the_first_that_takes_upstream() {
        let webhooks = webhooks();
        assert_eq!(webhooks.upstream_route(None), Some(1));
        assert_eq!(webhooks.upstream_route(Some("orders")), Some(2));
        assert_eq!(webhooks.upstream_route(Some("presence")), None);
        assert_eq!(webhooks.upstream_route(Some("nope")), None);
    }

    #[tokio::test]
    async fn an_unknown_route_or_app_is_answered_at_once_and_set_app_replaces_routes() {
        let coordinator = Coordinator::start(
            HashMap::from([("chat".to_owned(), webhooks())]),
            WebhookPolicy::default(),
            Arc::default(),
        )
        .unwrap();
        let upstream = |app: &'static str, route: Option<&'static str>| {
            let coordinator = coordinator.clone();
            async move {
                let payload = Bytes::from_static(b"x");
                coordinator
                    .upstream(app, "ann", "phone", 1, route, &payload)
                    .await
            }
        };
        assert_eq!(
            upstream("chat", Some("presence")).await,
            UpstreamStatus::UNKNOWN_ROUTE
        );
        assert_eq!(upstream("news", None).await, UpstreamStatus::NO_ENDPOINT);

        let mut presence_only = webhooks();
        presence_only.routes.truncate(1);
        coordinator.set_app("chat", Some(presence_only));
        assert_eq!(upstream("chat", None).await, UpstreamStatus::NO_ENDPOINT);
        assert_eq!(
            upstream("chat", Some("orders")).await,
            UpstreamStatus::UNKNOWN_ROUTE
        );
        coordinator.set_app("news", Some(webhooks()));
        coordinator.set_app("chat", None);
        assert_eq!(upstream("chat", None).await, UpstreamStatus::NO_ENDPOINT);
        assert_eq!(
            upstream("news", Some("nope")).await,
            UpstreamStatus::UNKNOWN_ROUTE
        );
    }

    /// A business server on loopback that answers 200 once `release` is
    /// true, and counts the calls it took.
    async fn held_server(
        release: watch::Receiver<bool>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = taken.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move || {
                let (mut release, counted) = (release.clone(), counted.clone());
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = release.wait_for(|released| *released).await;
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, taken)
    }

    #[tokio::test]
    async fn set_app_keeps_calls_already_queued_for_that_app_and_others() {
        let (release, released) = watch::channel(false);
        let (url, taken) = held_server(released).await;
        let webhooks = |url: &str| AppWebhooks {
            routes: vec![WebhookRoute {
                route: "main".to_owned(),
                url: url.to_owned(),
                events: vec![WebhookEvent::Upstream],
            }],
            secrets: vec!["s".repeat(32)],
            rate: None,
        };
        let coordinator = Coordinator::start(
            HashMap::from([
                ("chat".to_owned(), webhooks(&url)),
                ("news".to_owned(), webhooks(&url)),
            ]),
            WebhookPolicy::default(),
            Arc::default(),
        )
        .unwrap();
        let upstream = |app: &'static str| {
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                let payload = Bytes::from_static(b"x");
                coordinator
                    .upstream(app, "ann", "phone", 1, None, &payload)
                    .await
            })
        };
        // More of chat's calls than may be in flight: some wait in its queue.
        let chat: Vec<_> = (0..WEBHOOK_CALLS_IN_FLIGHT_MAX + 4)
            .map(|_| upstream("chat"))
            .collect();
        let news = upstream("news");
        while taken.load(Ordering::SeqCst) < WEBHOOK_CALLS_IN_FLIGHT_MAX + 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // One app is moved to a dead URL, the other removed: what either
        // had queued or in flight is still made, as it was queued.
        coordinator.set_app("chat", Some(webhooks("http://127.0.0.1:9/")));
        coordinator.set_app("news", None);
        release.send_replace(true);
        for call in chat {
            assert_eq!(call.await.unwrap(), UpstreamStatus::ACCEPTED);
        }
        assert_eq!(news.await.unwrap(), UpstreamStatus::ACCEPTED);
        assert_eq!(
            taken.load(Ordering::SeqCst),
            WEBHOOK_CALLS_IN_FLIGHT_MAX + 5
        );
        assert_eq!(upstream("news").await.unwrap(), UpstreamStatus::NO_ENDPOINT);
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let policy = WebhookPolicy {
            ca_file: Some(path.clone()),
            ..WebhookPolicy::default()
        };
        let error = http_client(&policy).unwrap_err();
        assert!(
            matches!(&error, WebhookSetupError::NoCertificate { path: p } if *p == path),
            "{error}"
        );
        let missing = WebhookPolicy {
            ca_file: Some(dir.path().join("missing.pem")),
            ..WebhookPolicy::default()
        };
        assert!(matches!(
            http_client(&missing),
            Err(WebhookSetupError::CaFile { .. })
        ));
    }
}
