//! The center: Herald's HTTP API for business servers (axum, JSON).
//!
//! Every `/v1/apps/{app}/...` route needs `Authorization: Bearer <api key>`
//! of that app. Errors are `{"error": {"code": "...", "message": "..."}}`,
//! the framework's rejections of a path, query or body included: handlers
//! take their input through `input`, which also reads every body under its
//! size and time limits before routing.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value, json};
use tower_http::catch_panic::CatchPanicLayer;

use herald_proto::plane::BroadcastMode;
use herald_storage::StoredRef;

use crate::admin;
use crate::api_error::{ApiError, ErrorCode};
use crate::apps::{App, Apps};
use crate::clock::unix_ms;
use crate::cluster::directory::{LoadProbe, NodeDirectory, NodeRecord};
use crate::config::ControlConfig;
use crate::delivery::Delivery;
use crate::dispatcher::{self, Net};
use crate::input::{
    ApiPath, ApiQuery, BodyLimits, JsonBody, RawBody, bearer, decode_payload_base64, parse_json,
    read_body, whole_number,
};
use crate::overview::OverviewSources;
use crate::pace::PaceShares;
use crate::register::AppOnline;
use crate::trace;

/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;

/// Multicasts being parsed, stored and handed to the shards at once. The
/// saver writes one transaction at a time anyway, so two keep it busy (one
/// storing while the other hands over); the rest wait as their raw bodies,
/// not as parsed user lists and results, which keeps a burst of calls (a
/// push to every user of an app) from ballooning the node's memory.
const MULTICASTS_IN_FLIGHT_MAX: usize = 2;

/// Renders the gateway's metrics (the control plane cannot see them itself).
pub type MetricsRenderer = Box<dyn Fn(&mut String) + Send + Sync>;

pub struct CenterState {
    config: ControlConfig,
    /// Each app's `AppId` is made once there and shared by every delivery
    /// of every call.
    apps: Arc<Apps>,
    delivery: Arc<Delivery>,
    directory: Arc<NodeDirectory>,
    gateway_metrics: MetricsRenderer,
    requests_by_status: Mutex<BTreeMap<u16, u64>>,
    multicasts: tokio::sync::Semaphore,
}

/// Takes `cost` pushes from the app's budget, if it has one.
fn admit_pushes(app: &App, cost: u64) -> Result<(), ApiError> {
    match &app.push_bucket {
        Some(bucket) => bucket
            .take(cost, Instant::now())
            .map_err(|wait| ApiError::rate_limited("push", wait)),
        None => Ok(()),
    }
}

fn admit_broadcast(app: &App) -> Result<(), ApiError> {
    match &app.broadcast_bucket {
        Some(bucket) => bucket
            .take(1, Instant::now())
            .map_err(|wait| ApiError::rate_limited("broadcast", wait)),
        None => Ok(()),
    }
}

pub fn router(
    config: ControlConfig,
    apps: Arc<Apps>,
    delivery: Arc<Delivery>,
    directory: Arc<NodeDirectory>,
    gateway_metrics: MetricsRenderer,
    local_load: Option<LoadProbe>,
) -> Router {
    let body_limits = BodyLimits {
        // Base64 grows a payload by a third, JSON escaping can double text;
        // allow for both and let the payload check give the precise error.
        bytes_max: config.payload_bytes_max * 2 + 64 * 1024,
        read_timeout: config.http.body_read_timeout,
    };
    let ttl_secs_max = config.ttl_secs_max;
    let admin_key = config.admin_api_key.clone();
    let overview = OverviewSources {
        delivery: delivery.clone(),
        directory: directory.clone(),
        local_load,
    };
    let state = Arc::new(CenterState {
        apps: apps.clone(),
        config,
        delivery,
        directory,
        gateway_metrics,
        requests_by_status: Mutex::default(),
        multicasts: tokio::sync::Semaphore::new(MULTICASTS_IN_FLIGHT_MAX),
    });
    Router::new()
        .route("/v1/apps/{app}/users/{user}/messages", post(push).get(pull))
        .route("/v1/apps/{app}/messages", post(multicast))
        .route("/v1/apps/{app}/users/{user}/presence", get(presence))
        .route("/v1/apps/{app}/users/{user}/kick", post(kick))
        .route("/v1/apps/{app}/broadcasts", post(broadcast))
        .route("/v1/apps/{app}/broadcasts/{id}", get(broadcast_progress))
        .route("/v1/apps/{app}/stats", get(app_stats))
        .route("/v1/dispatch", get(dispatch))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin::routes(apps, admin_key, ttl_secs_max, overview))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the server failed on this request").into_response()
        }))
        .layer(middleware::from_fn_with_state(body_limits, read_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn(trace::trace_requests))
        .with_state(state)
}

async fn count_requests(
    State(state): State<Arc<CenterState>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    *state
        .requests_by_status
        .lock()
        .expect("metrics lock")
        .entry(response.status().as_u16())
        .or_default() += 1;
    response
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not take that method",
    )
}

/// Finds the app and checks the request's API key for it (the current key,
/// or one a rotation retired whose grace has not ended).
fn authorize(state: &CenterState, app: &str, headers: &HeaderMap) -> Result<Arc<App>, ApiError> {
    let Some(found) = state.apps.table().get(app).cloned() else {
        return Err(ApiError::new(
            ErrorCode::UnknownApp,
            format!("no app {app:?} on this server"),
        ));
    };
    let key = bearer(headers)?;
    if !found.secrets.api_key.accepts(key.as_bytes(), unix_ms()) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("this API key is not valid for app {app:?}"),
        ));
    }
    Ok(found)
}

/// `authorize`, then checks the user id of a `/users/{user}/` route.
fn authorize_user(
    state: &CenterState,
    app: &str,
    user: &str,
    headers: &HeaderMap,
) -> Result<Arc<App>, ApiError> {
    let app = authorize(state, app, headers)?;
    check_user(user)?;
    Ok(app)
}

fn check_user(user: &str) -> Result<(), ApiError> {
    herald_proto::ids::check_user_id(user)
        .map_err(|rule| ApiError::bad_request(format!("{rule}: {user:?}")))
}

/// The message fields shared by unicast and multicast.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    payload: Option<String>,
    payload_base64: Option<String>,
    /// Any JSON number: a value out of range is `bad_request`, not
    /// `malformed_json` (see `input`).
    ttl_secs: Option<Number>,
    idempotency_key: Option<String>,
    /// Multicast only.
    users: Option<Vec<String>>,
}

struct CheckedMessage {
    /// The bytes the body was parsed into, shared from here to storage and
    /// every connection's delivery without another copy.
    payload: Bytes,
    ttl: Duration,
    idempotency_key: Option<String>,
}

fn check_message(
    state: &CenterState,
    app: &App,
    body: MessageBody,
) -> Result<CheckedMessage, ApiError> {
    let payload = match (body.payload, body.payload_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => decode_payload_base64(&encoded)?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of \"payload\" (UTF-8 text) or \"payload_base64\"",
            ));
        }
    };
    if payload.len() > state.config.payload_bytes_max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "payload is {} bytes; the limit is {}",
                payload.len(),
                state.config.payload_bytes_max
            ),
        ));
    }
    let ttl_secs = match &body.ttl_secs {
        None => app.settings.default_ttl_secs,
        Some(ttl) => whole_number("ttl_secs", ttl, 1..=state.config.ttl_secs_max)?,
    };
    if let Some(key) = &body.idempotency_key
        && (key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX)
    {
        return Err(ApiError::bad_request(format!(
            "idempotency_key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} bytes"
        )));
    }
    Ok(CheckedMessage {
        payload: Bytes::from(payload),
        ttl: Duration::from_secs(ttl_secs),
        idempotency_key: body.idempotency_key,
    })
}

/// The reply to a multicast: typed rather than built as a `Value`, since a
/// reply to thousands of users would otherwise hold a map per user.
#[derive(Serialize)]
struct MulticastReply<'a> {
    results: Vec<PushResultJson<'a>>,
    replayed: bool,
}

/// One user's result: `{"user", "seq", "message_id", "online"}`.
#[derive(Serialize)]
struct PushResultJson<'a> {
    #[serde(flatten)]
    stored: &'a StoredRef,
    online: bool,
}

async fn push(
    State(state): State<Arc<CenterState>>,
    ApiPath((app, user)): ApiPath<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<MessageBody>,
) -> Result<Json<Value>, ApiError> {
    let app = authorize_user(&state, &app, &user, &headers)?;
    if body.users.is_some() {
        return Err(ApiError::bad_request(
            "\"users\" belongs to POST /v1/apps/{app}/messages",
        ));
    }
    let message = check_message(&state, &app, body)?;
    admit_pushes(&app, 1)?;
    let (results, replayed) = state
        .delivery
        .push(
            &app.id,
            vec![user],
            message.payload,
            message.ttl,
            message.idempotency_key,
        )
        .await
        .map_err(ApiError::storage)?;
    let result = results
        .first()
        .ok_or_else(|| ApiError::internal("storage returned no result"))?;
    Ok(Json(json!({
        "seq": result.stored.seq,
        "message_id": result.stored.message_id.to_string(),
        "online": result.online,
        "replayed": replayed,
    })))
}

async fn multicast(
    State(state): State<Arc<CenterState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let app = authorize(&state, &app, &headers)?;
    let _turn = state
        .multicasts
        .acquire()
        .await
        .expect("the multicast semaphore is never closed");
    let mut body: MessageBody = parse_json(&body)?;
    let users = body
        .users
        .take()
        .ok_or_else(|| ApiError::bad_request("\"users\" (a list of user ids) is required"))?;
    if users.is_empty() || users.len() > state.config.multicast_users_max {
        return Err(ApiError::bad_request(format!(
            "\"users\" must list 1 to {} users",
            state.config.multicast_users_max
        )));
    }
    // One copy per user, even if the caller listed someone twice.
    let first_listing: Vec<bool> = {
        let mut seen = HashSet::with_capacity(users.len());
        users
            .iter()
            .map(|user| seen.insert(user.as_str()))
            .collect()
    };
    let mut first_listing = first_listing.into_iter();
    let mut users = users;
    users.retain(|_| first_listing.next().unwrap_or(false));
    for user in &users {
        check_user(user)?;
    }
    let message = check_message(&state, &app, body)?;
    admit_pushes(&app, users.len() as u64)?;
    let (results, replayed) = state
        .delivery
        .push(
            &app.id,
            users,
            message.payload,
            message.ttl,
            message.idempotency_key,
        )
        .await
        .map_err(ApiError::storage)?;
    let results = results
        .iter()
        .map(|result| PushResultJson {
            stored: &result.stored,
            online: result.online,
        })
        .collect();
    Ok(Json(MulticastReply { results, replayed }).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PullQuery {
    after: Option<u64>,
    limit: Option<u32>,
}

async fn pull(
    State(state): State<Arc<CenterState>>,
    ApiPath((app, user)): ApiPath<(String, String)>,
    headers: HeaderMap,
    query: Result<ApiQuery<PullQuery>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    // The key is checked before the query, so a caller without one learns
    // nothing from the query's errors.
    authorize_user(&state, &app, &user, &headers)?;
    let ApiQuery(query) = query?;
    let limit = query.limit.unwrap_or(state.config.pull_limit_max);
    if limit == 0 || limit > state.config.pull_limit_max {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {}",
            state.config.pull_limit_max
        )));
    }
    let (messages, more) = state
        .delivery
        .saver()
        .messages_after(&app, &user, query.after.unwrap_or(0), limit, unix_ms())
        .await
        .map_err(ApiError::storage)?;
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| {
            json!({
                "seq": m.seq,
                "message_id": m.message_id.to_string(),
                "payload": std::str::from_utf8(&m.payload).ok(),
                "payload_base64": BASE64.encode(&m.payload),
                "created_at_ms": m.created_at_ms,
                "expires_at_ms": m.expires_at_ms,
            })
        })
        .collect();
    Ok(Json(json!({"messages": messages, "more": more})))
}

async fn presence(
    State(state): State<Arc<CenterState>>,
    ApiPath((app, user)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_user(&state, &app, &user, &headers)?;
    let sessions = state.delivery.sessions(&app, &user).await;
    let connections: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "node": s.node,
                "conn_id": s.conn.to_string(),
                "device_id": s.device_id,
                "connected_at_ms": s.connected_at_ms,
                "network": s.network.as_str(),
            })
        })
        .collect();
    Ok(Json(json!({
        "online": !connections.is_empty(),
        "connections": connections,
    })))
}

/// What an app comes to now: its sessions (summed over the room nodes'
/// last heartbeats in a cluster), its stored messages and broadcasts.
async fn app_stats(
    State(state): State<Arc<CenterState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let app = authorize(&state, &app, &headers)?;
    let (online, nodes_reporting) = if state.directory.is_shared() {
        let nodes = state.directory.live().await.map_err(ApiError::register)?;
        let online = nodes
            .values()
            .filter_map(|node| node.apps_online.get(&*app.id))
            .fold(AppOnline::default(), |sum, node| AppOnline {
                connections: sum.connections + node.connections,
                users: sum.users + node.users,
            });
        (online, nodes.len())
    } else {
        let online = state.delivery.register().online();
        (online.get(&*app.id).copied().unwrap_or_default(), 1)
    };
    let messages = state
        .delivery
        .saver()
        .message_counts(&app.id, unix_ms())
        .await
        .map_err(ApiError::storage)?;
    let (broadcasts_unexpired, broadcasts_in_progress) =
        state.delivery.broadcasts().in_progress(&app.id).await;
    Ok(Json(json!({
        "app": &*app.id,
        "online_connections": online.connections,
        "online_users": online.users,
        "messages_stored": messages.stored,
        "messages_pending": messages.unacked,
        "broadcasts_unexpired": broadcasts_unexpired,
        "broadcasts_in_progress": broadcasts_in_progress,
        "nodes_reporting": nodes_reporting,
    })))
}

async fn kick(
    State(state): State<Arc<CenterState>>,
    ApiPath((app, user)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_user(&state, &app, &user, &headers)?;
    let kicked = state.delivery.kick(&app, &user).await;
    Ok(Json(json!({"kicked": kicked})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    payload: Option<String>,
    payload_base64: Option<String>,
    ttl_secs: Option<Number>,
    /// Only clients carrying every one of these tags get it.
    tags: Option<Vec<String>>,
    /// Pace the fan-out: connections a second, all nodes together.
    rate_per_sec: Option<f64>,
    /// "low": dropped for clients that are behind (output already queued);
    /// "normal" (the default) is queued like any frame.
    priority: Option<String>,
}

/// `POST /v1/apps/{app}/broadcasts`: stores the broadcast once for the app
/// and fans it out to every online client it targets; replies once stored.
async fn broadcast(
    State(state): State<Arc<CenterState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<BroadcastBody>,
) -> Result<Json<Value>, ApiError> {
    let app = authorize(&state, &app, &headers)?;
    let tags = body.tags.unwrap_or_default();
    if tags.len() > herald_proto::limits::TAGS_PER_BIND_MAX
        || tags
            .iter()
            .any(|tag| tag.is_empty() || tag.len() > herald_proto::limits::TAG_LEN_MAX)
    {
        return Err(ApiError::bad_request(format!(
            "tags: at most {} tags of 1 to {} bytes",
            herald_proto::limits::TAGS_PER_BIND_MAX,
            herald_proto::limits::TAG_LEN_MAX
        )));
    }
    if let Some(rate) = body.rate_per_sec
        && !(rate >= 1.0 && rate.is_finite())
    {
        return Err(ApiError::bad_request(
            "rate_per_sec must be at least 1 (connections a second)",
        ));
    }
    let low_priority = match body.priority.as_deref() {
        None | Some("normal") => false,
        Some("low") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "priority {other:?} is not one of \"normal\", \"low\""
            )));
        }
    };
    let message = check_message(
        &state,
        &app,
        MessageBody {
            payload: body.payload,
            payload_base64: body.payload_base64,
            ttl_secs: body.ttl_secs,
            idempotency_key: None,
            users: None,
        },
    )?;
    admit_broadcast(&app)?;
    // The pace is the whole system's: each room node takes a share by its
    // connections (all of it in a single process), and splits that over
    // its shards.
    let shares = match body.rate_per_sec {
        Some(_) => match state.directory.live().await {
            Ok(nodes) => PaceShares::from_connections(
                nodes
                    .iter()
                    .map(|(id, node)| (id.as_str(), node.connections)),
            ),
            Err(error) => {
                tracing::warn!(%error, "no node directory: each room node paces alone");
                PaceShares::default()
            }
        },
        None => PaceShares::default(),
    };
    let stored = state
        .delivery
        .broadcasts()
        .broadcast(
            &app.id,
            &message.payload,
            message.ttl,
            &tags,
            BroadcastMode {
                rate_per_sec: body.rate_per_sec,
                low_priority,
            },
            &shares,
        )
        .await
        .map_err(ApiError::storage)?;
    state
        .delivery
        .metrics()
        .broadcasts
        .with_label_values(&[&*app.id])
        .inc();
    Ok(Json(json!({
        "broadcast_id": stored.broadcast_id.to_string(),
        "seq": stored.seq,
        "expires_at_ms": stored.expires_at_ms,
    })))
}

/// `GET /v1/apps/{app}/broadcasts/{id}`: the broadcast and how far it got
/// on this node: connections targeted, sent, acked so far.
async fn broadcast_progress(
    State(state): State<Arc<CenterState>>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &app, &headers)?;
    let not_found = || {
        ApiError::new(
            ErrorCode::UnknownBroadcast,
            format!("no broadcast {id:?} in app {app:?}"),
        )
    };
    let broadcast_id = id.parse().map_err(|_| not_found())?;
    let stored = state
        .delivery
        .saver()
        .broadcast(&app, broadcast_id)
        .await
        .map_err(ApiError::storage)?
        .ok_or_else(not_found)?;
    let progress = state
        .delivery
        .broadcasts()
        .progress(&app, stored.seq)
        .await
        .unwrap_or_default();
    Ok(Json(json!({
        "broadcast_id": id,
        "seq": stored.seq,
        "tags": stored.required_tags,
        "created_at_ms": stored.created_at_ms,
        "expires_at_ms": stored.expires_at_ms,
        "expired": stored.expires_at_ms <= unix_ms(),
        "target": progress.target,
        "sent": progress.sent,
        "dropped": progress.dropped,
        "acked": progress.acked,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchQuery {
    app: String,
    user: String,
    net: Option<String>,
    region: Option<String>,
    transport: Option<String>,
}

/// `GET /v1/dispatch?app=&user=&net=&region=&transport=`: the gateways a client should
/// try, in order. Clients call it before they hold a token's connection, so
/// it needs no key; it reveals only the public gateway addresses.
async fn dispatch(
    State(state): State<Arc<CenterState>>,
    ApiQuery(query): ApiQuery<DispatchQuery>,
) -> Result<Json<Value>, ApiError> {
    if !state.apps.table().contains_key(query.app.as_str()) {
        return Err(ApiError::new(
            ErrorCode::UnknownApp,
            format!("no app {:?}", query.app),
        ));
    }
    check_user(&query.user)?;
    let net = match query.net.as_deref() {
        None => Net::Wifi,
        Some(text) => Net::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!("net {text:?} is not one of wifi, 4g, 3g, 2g"))
        })?,
    };
    let transport = query.transport.as_deref().unwrap_or("tcp");
    if !matches!(transport, "tcp" | "tls" | "ws" | "wss") {
        return Err(ApiError::bad_request(format!(
            "transport {transport:?} is not one of tcp, tls, ws, wss"
        )));
    }
    let nodes = state.directory.live().await.map_err(ApiError::register)?;
    let nodes: Vec<&NodeRecord> = nodes.values().collect();
    let gateways = dispatcher::order(
        &nodes,
        &query.app,
        &query.user,
        query.region.as_deref(),
        net,
        transport,
    );
    if gateways.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoGateway,
            format!("no gateway with a {transport} listener is alive; retry later"),
        ));
    }
    Ok(Json(json!({ "gateways": gateways })))
}

async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when listening (this answer proves the API listener; the gateway
/// listens before the API starts), storage answers and not draining.
async fn readyz(State(state): State<Arc<CenterState>>) -> Response {
    if state.delivery.is_draining() {
        return ApiError::new(ErrorCode::Draining, "server is shutting down").into_response();
    }
    match state.delivery.saver().ping().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(error) => ApiError::storage(error).into_response(),
    }
}

async fn metrics(State(state): State<Arc<CenterState>>) -> Response {
    let mut text = String::new();
    (state.gateway_metrics)(&mut text);
    let commits = state.delivery.saver().commit_counts();
    for (name, help, value) in [
        (
            "herald_storage_store_transactions_total",
            "Transactions that committed stored messages (on SQLite one group commit holds many API calls).",
            commits.transactions,
        ),
        (
            "herald_storage_stores_committed_total",
            "API calls whose message was stored (idempotent replays excluded).",
            commits.stores,
        ),
    ] {
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    state.delivery.metrics().encode(&mut text);
    let coordinator = state.delivery.coordinator();
    let retries = coordinator.retry_count();
    let _ = writeln!(
        text,
        "# HELP herald_webhook_retries_total Webhook attempts that were retries.\n\
         # TYPE herald_webhook_retries_total counter\nherald_webhook_retries_total {retries}\n\
         # HELP herald_webhook_gave_up_total Webhook calls given up, by app and reason \
         (deadline, rejected, queue_full).\n# TYPE herald_webhook_gave_up_total counter"
    );
    for (app, reason, count) in coordinator.gave_up_counts() {
        let _ = writeln!(
            text,
            "herald_webhook_gave_up_total{{app=\"{app}\",reason=\"{}\"}} {count}",
            reason.as_str()
        );
    }
    let _ = writeln!(
        text,
        "# HELP herald_api_requests_total API requests by HTTP status.\n# TYPE herald_api_requests_total counter"
    );
    for (status, count) in state
        .requests_by_status
        .lock()
        .expect("metrics lock")
        .iter()
    {
        let _ = writeln!(
            text,
            "herald_api_requests_total{{status=\"{status}\"}} {count}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
