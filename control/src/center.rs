//! The center: Herald's HTTP API for business servers (axum, JSON).
//!
//! Every `/v1/apps/{app}/...` route needs `Authorization: Bearer <api key>`
//! of that app. Errors are `{"error": {"code": "...", "message": "..."}}`,
//! the framework's rejections of a path, query or body included: handlers
//! take their input through `input`, which also reads every body under its
//! size and time limits before routing.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Number;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::{IntoParams, ToSchema};

use herald_proto::limits::HINT_LEN_MAX;
use herald_proto::plane::{BroadcastMode, Notice};
use herald_proto::{TokenError, verify_token_with_any};
use herald_storage::{StoredMessage, StoredRef};

use crate::admin;
use crate::api_error::{ApiError, AppKeyRefusals, ErrorBody, ErrorCode};
use crate::apps::{App, Apps};
use crate::clock::unix_ms;
use crate::cluster::directory::{LoadProbe, NodeDirectory, NodeRecord};
use crate::config::ControlConfig;
use crate::delivery::Delivery;
use crate::dispatcher::{self, Net};
use crate::input::{
    ApiPath, ApiQuery, AppUserPath, BodyLimits, JsonBody, RawBody, bearer, bearer_of, closing,
    decode_payload_base64, parse_json, read_body, whole_number,
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
    /// `/openapi.json`: `openapi::document_json()`, given by the caller
    /// since `openapi` imports this module.
    openapi_json: &'static str,
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
    openapi_json: &'static str,
) -> Router {
    let body_limits = BodyLimits {
        // Base64 grows a payload by a third, JSON escaping can double text;
        // allow for both and let the payload check give the precise error.
        bytes_max: config
            .payload_bytes_max
            .max(config.notify_payload_bytes_max)
            * 2
            + 64 * 1024,
        read_timeout: config.http.body_read_timeout,
    };
    let ttl_secs_max = config.ttl_secs_max;
    let admin_key = config.admin_api_key.clone();
    let allowed = Arc::new(AllowedNetworks {
        api: config.api_allowed.clone(),
        admin: config.admin_allowed.clone(),
    });
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
        openapi_json,
    });
    Router::new()
        .route("/v1/apps/{app}/users/{user}/messages", post(push).get(pull))
        .route("/v1/apps/{app}/messages", post(multicast))
        .route("/v1/apps/{app}/users/{user}/presence", get(presence))
        .route("/v1/apps/{app}/users/{user}/kick", post(kick))
        .route("/v1/apps/{app}/broadcasts", post(broadcast))
        .route("/v1/apps/{app}/broadcasts/{id}", get(broadcast_progress))
        .route("/v1/apps/{app}/stats", get(app_stats))
        .route("/v1/client/apps/{app}/messages", get(client_pull))
        .route("/v1/dispatch", get(dispatch))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_document))
        .merge(admin::routes(apps, admin_key, ttl_secs_max, overview))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the server failed on this request").into_response()
        }))
        .layer(middleware::from_fn_with_state(body_limits, read_body))
        .layer(middleware::from_fn_with_state(allowed, check_peer))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn(trace::trace_requests))
        .with_state(state)
}

/// The networks each part of the API answers (`allowed_cidrs`); an empty
/// list: any.
struct AllowedNetworks {
    /// The app routes, `/v1/apps/...`.
    api: Vec<IpNet>,
    /// The admin API and its page.
    admin: Vec<IpNet>,
}

impl AllowedNetworks {
    /// The list that covers `path`, and the key that sets it; `None` for
    /// the routes open to all (probes, metrics, dispatch, the document).
    fn covering(&self, path: &str) -> Option<(&[IpNet], &'static str)> {
        if path.starts_with("/v1/apps/") {
            Some((&self.api, "[api] allowed_cidrs"))
        } else if path.starts_with("/v1/admin/") || path == "/admin" || path.starts_with("/admin/")
        {
            Some((&self.admin, "[admin] allowed_cidrs"))
        } else {
            None
        }
    }
}

/// Refuses, with 403 `forbidden`, a request from an address outside the
/// networks its route allows, before its body is read (so the connection
/// closes after the answer). A request without a peer address (one the
/// HTTP server did not accept) is refused where a list is set.
async fn check_peer(
    State(allowed): State<Arc<AllowedNetworks>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some((networks, key)) = allowed.covering(request.uri().path())
        && !networks.is_empty()
    {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip().to_canonical());
        if !peer.is_some_and(|peer| networks.iter().any(|net| net.contains(&peer))) {
            let shown = peer.map_or_else(|| "unknown".to_owned(), |peer| peer.to_string());
            return closing(ApiError::new(
                ErrorCode::Forbidden,
                format!("this address ({shown}) is not in {key}"),
            ));
        }
    }
    next.run(request).await
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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessageBody {
    /// UTF-8 text; give exactly one of `payload` and `payload_base64`.
    payload: Option<String>,
    /// Binary data in base64 (standard or URL-safe alphabet, padded or not).
    payload_base64: Option<String>,
    /// Whole seconds, 1 to `api.ttl_secs_max` (60 and 60.0 alike).
    /// Default: the app's `default_ttl_secs`.
    // Any JSON number: a value out of range is `bad_request`, not
    // `malformed_json` (see `input`).
    #[schema(value_type = Option<u64>, minimum = 1)]
    ttl_secs: Option<Number>,
    /// 1 to 128 bytes; the same key within the message's TTL replays the
    /// first call's reply.
    idempotency_key: Option<String>,
    /// Default true. `false`: a transient message (typing indicators, live
    /// presence), never stored: it goes only to the connections bound now,
    /// is not acked and never sent again, and the reply says how many
    /// connections it went to (`delivered_to`). Takes neither `ttl_secs`
    /// nor `idempotency_key`.
    store: Option<bool>,
    /// Default `push`: the message goes whole. `notify`: clients get a
    /// small NOTIFY (seq, size, `hint`) and pull the body (PULL over their
    /// connection, or `GET /v1/client/apps/{app}/messages`); the payload
    /// may then be up to `api.notify_payload_bytes_max`. Clients that
    /// predate it get the whole message as a push.
    delivery: Option<DeliveryMode>,
    /// `notify` only: up to 1,024 bytes of text the client sees before it
    /// pulls (a subject line, a sender). Default empty.
    hint: Option<String>,
    /// `notify` only: clients pull after a random delay of 0 to this many
    /// milliseconds (0 to 600,000), so that many clients do not pull at
    /// once. Default: 0 for one user; for a multicast, its users over
    /// `api.notify_pulls_per_sec`.
    #[schema(value_type = Option<u32>, minimum = 0, maximum = 600000)]
    pull_spread_ms: Option<Number>,
    /// Multicast only (required there, refused on a push): 1 to
    /// `api.multicast_users_max` user ids.
    users: Option<Vec<String>>,
}

/// How a stored message reaches its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DeliveryMode {
    /// Whole, in a PUSH.
    Push,
    /// Announced in a NOTIFY; the client pulls the body.
    Notify,
}

/// The longest pull spread a push may ask for: ten minutes.
const PULL_SPREAD_MS_MAX: u64 = 600_000;

struct CheckedMessage {
    /// The bytes the body was parsed into, shared from here to storage and
    /// every connection's delivery without another copy.
    payload: Bytes,
    ttl: Duration,
    idempotency_key: Option<String>,
    /// False for a transient message: handed to bound connections only.
    store: bool,
    /// Set for `"delivery": "notify"`.
    notice: Option<Notice>,
}

/// Checks a push's fields; `recipients` is how many users it is for.
fn check_message(
    state: &CenterState,
    app: &App,
    body: MessageBody,
    recipients: usize,
) -> Result<CheckedMessage, ApiError> {
    let notify = body.delivery == Some(DeliveryMode::Notify);
    let payload = match (body.payload, body.payload_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => decode_payload_base64(&encoded)?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of \"payload\" (UTF-8 text) or \"payload_base64\"",
            ));
        }
    };
    let (payload_max, limit_name) = if notify {
        (
            state.config.notify_payload_bytes_max,
            "the limit with \"delivery\": \"notify\"",
        )
    } else {
        (state.config.payload_bytes_max, "the limit")
    };
    if payload.len() > payload_max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "payload is {} bytes; {limit_name} is {payload_max}",
                payload.len()
            ),
        ));
    }
    let store = body.store.unwrap_or(true);
    if !notify {
        for (field, given) in [
            ("hint", body.hint.is_some()),
            ("pull_spread_ms", body.pull_spread_ms.is_some()),
        ] {
            if given {
                return Err(ApiError::bad_request(format!(
                    "\"{field}\" goes only with \"delivery\": \"notify\""
                )));
            }
        }
    } else if !store {
        return Err(ApiError::bad_request(
            "\"delivery\": \"notify\" does not go with \"store\": false: \
             a transient message is never stored, so there is nothing to pull",
        ));
    }
    let hint = body.hint.unwrap_or_default();
    if hint.len() > HINT_LEN_MAX {
        return Err(ApiError::bad_request(format!(
            "hint is {} bytes; the limit is {HINT_LEN_MAX}",
            hint.len()
        )));
    }
    let pull_spread_ms = match &body.pull_spread_ms {
        Some(spread) => whole_number("pull_spread_ms", spread, 0..=PULL_SPREAD_MS_MAX)?,
        // Enough to keep the pulls near the configured rate.
        None => (recipients as u64 * 1000)
            .div_ceil(u64::from(state.config.notify_pulls_per_sec.max(1)))
            .saturating_sub(1)
            .min(PULL_SPREAD_MS_MAX),
    };
    let notice = notify.then(|| Notice {
        pull_spread_ms: pull_spread_ms as u32,
        hint: Arc::from(hint),
    });
    if !store {
        // Nothing is kept, so nothing can expire or be replayed.
        for (field, given) in [
            ("ttl_secs", body.ttl_secs.is_some()),
            ("idempotency_key", body.idempotency_key.is_some()),
        ] {
            if given {
                return Err(ApiError::bad_request(format!(
                    "\"{field}\" does not go with \"store\": false: a transient message is never stored"
                )));
            }
        }
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
        store,
        notice,
    })
}

/// The reply to a multicast: stored, or transient (`"store": false`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum MulticastOutcome<'a> {
    Stored(MulticastReply<'a>),
    Transient(TransientMulticastReply<'a>),
}

/// The reply to a transient multicast.
#[derive(Serialize, ToSchema)]
pub(crate) struct TransientMulticastReply<'a> {
    /// One per distinct user, in the order the call listed them.
    results: Vec<TransientResultJson<'a>>,
    /// The connections it went to, over every user.
    delivered_to: usize,
}

/// One user's result of a transient multicast.
#[derive(Serialize, ToSchema)]
pub(crate) struct TransientResultJson<'a> {
    user: &'a str,
    /// The user's connections bound when it was pushed, which it went to
    /// (0: the user was offline, and the message is gone).
    delivered_to: usize,
}

/// The reply to a multicast: typed rather than built as a `Value`, since a
/// reply to thousands of users would otherwise hold a map per user.
#[derive(Serialize, ToSchema)]
pub(crate) struct MulticastReply<'a> {
    /// One per distinct user, in the order the call listed them.
    results: Vec<PushResultJson<'a>>,
    replayed: bool,
}

/// One user's result: `{"user", "seq", "message_id", "online"}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct PushResultJson<'a> {
    user: &'a str,
    seq: u64,
    #[serde(serialize_with = "as_text")]
    #[schema(value_type = String)]
    message_id: &'a herald_storage::MessageId,
    online: bool,
}

impl<'a> PushResultJson<'a> {
    fn new(stored: &'a StoredRef, online: bool) -> PushResultJson<'a> {
        PushResultJson {
            user: &stored.user,
            seq: stored.seq,
            message_id: &stored.message_id,
            online,
        }
    }
}

/// Serializes a value as its `Display` text (a message id's 32 hex digits)
/// without making a `String` of it.
fn as_text<T: std::fmt::Display, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// The reply to a push: stored, or transient (`"store": false`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum PushOutcome {
    Stored(PushReply),
    Transient(TransientPushReply),
}

/// The reply to a transient push.
#[derive(Serialize, ToSchema)]
pub(crate) struct TransientPushReply {
    /// The user's connections bound when it was pushed, which it went to
    /// (0: the user was offline, and the message is gone).
    delivered_to: usize,
}

/// The reply to a stored push.
#[derive(Serialize, ToSchema)]
pub(crate) struct PushReply {
    /// The message's sequence in the user's inbox for this app.
    seq: u64,
    /// 32 hex digits.
    message_id: String,
    /// Whether the user had a connection bound when it was stored.
    online: bool,
    /// True when the idempotency key was seen: the first call's result.
    replayed: bool,
}

#[utoipa::path(
    post,
    path = "/v1/apps/{app}/users/{user}/messages",
    tag = "messages",
    summary = "Push to one user",
    description = "Stores the message in the user's inbox, durably, then sends it to the user's bound connections. With `\"store\": false`, only sends it to the connections bound now (a transient message: never stored, acked or sent again).",
    params(
        AppUserPath,
    ),
    request_body(content = MessageBody, example = json!({"payload": "hello", "ttl_secs": 3600, "idempotency_key": "order-17"})),
    responses(
        (status = 200, description = "Stored (and sent to the user's connections); or, transient, sent to `delivered_to` connections", body = PushOutcome),
        (status = 400, description = "`malformed_json` or `bad_request`: a body, user id or path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the payload or the body is over its limit", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the app's `push_rate` is used up (see `Retry-After`)", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: nothing was stored; retry", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
async fn push(
    State(state): State<Arc<CenterState>>,
    ApiPath(AppUserPath { app, user }): ApiPath<AppUserPath>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<MessageBody>,
) -> Result<Json<PushOutcome>, ApiError> {
    let app = authorize_user(&state, &app, &user, &headers)?;
    if body.users.is_some() {
        return Err(ApiError::bad_request(
            "\"users\" belongs to POST /v1/apps/{app}/messages",
        ));
    }
    let message = check_message(&state, &app, body, 1)?;
    admit_pushes(&app, 1)?;
    if !message.store {
        let delivered_to = state
            .delivery
            .push_transient(&app.id, std::slice::from_ref(&user), message.payload)
            .await;
        return Ok(Json(PushOutcome::Transient(TransientPushReply {
            delivered_to: delivered_to.iter().sum(),
        })));
    }
    let (results, replayed) = state
        .delivery
        .push(
            &app.id,
            vec![user],
            message.payload,
            message.ttl,
            message.idempotency_key,
            message.notice,
        )
        .await
        .map_err(ApiError::storage)?;
    let result = results
        .first()
        .ok_or_else(|| ApiError::internal("storage returned no result"))?;
    Ok(Json(PushOutcome::Stored(PushReply {
        seq: result.stored.seq,
        message_id: result.stored.message_id.to_string(),
        online: result.online,
        replayed,
    })))
}

#[utoipa::path(
    post,
    path = "/v1/apps/{app}/messages",
    tag = "messages",
    summary = "Push to many users",
    description = "One message to each user listed in `users` (duplicates are sent once); all share one `message_id`. With `\"store\": false`, only sent to the users' connections bound now (transient).",
    params(("app" = String, Path, description = "The app's id")),
    request_body(content = MessageBody, example = json!({"users": ["alice", "bob"], "payload": "hello"})),
    responses(
        (status = 200, description = "Stored for every user; or, transient, sent to `delivered_to` connections", body = MulticastOutcome),
        (status = 400, description = "`malformed_json` or `bad_request`: a body, user id or path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the payload or the body is over its limit", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the app's `push_rate` is used up (see `Retry-After`)", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: nothing was stored; retry", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
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
    let message = check_message(&state, &app, body, users.len())?;
    admit_pushes(&app, users.len() as u64)?;
    if !message.store {
        let delivered_to = state
            .delivery
            .push_transient(&app.id, &users, message.payload)
            .await;
        let results = users
            .iter()
            .zip(&delivered_to)
            .map(|(user, &delivered_to)| TransientResultJson { user, delivered_to })
            .collect();
        let reply = TransientMulticastReply {
            results,
            delivered_to: delivered_to.iter().sum(),
        };
        return Ok(Json(MulticastOutcome::Transient(reply)).into_response());
    }
    let (results, replayed) = state
        .delivery
        .push(
            &app.id,
            users,
            message.payload,
            message.ttl,
            message.idempotency_key,
            message.notice,
        )
        .await
        .map_err(ApiError::storage)?;
    let results = results
        .iter()
        .map(|result| PushResultJson::new(&result.stored, result.online))
        .collect();
    Ok(Json(MulticastOutcome::Stored(MulticastReply {
        results,
        replayed,
    }))
    .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PullQuery {
    /// Messages after this sequence (default 0).
    after: Option<u64>,
    /// At most this many (default and maximum `api.pull_limit_max`).
    #[param(minimum = 1)]
    limit: Option<u32>,
}

/// One stored message, as pull returns it.
#[derive(Serialize, ToSchema)]
pub(crate) struct PulledMessage {
    seq: u64,
    message_id: String,
    /// `null` when the payload is not UTF-8.
    payload: Option<String>,
    /// The payload in standard, padded base64.
    payload_base64: String,
    /// How it was pushed: `push` or `notify`.
    delivery: DeliveryMode,
    /// `notify` only: the hint it was pushed with.
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
    created_at_ms: u64,
    expires_at_ms: u64,
}

impl PulledMessage {
    fn new(message: &StoredMessage) -> PulledMessage {
        PulledMessage {
            seq: message.seq,
            message_id: message.message_id.to_string(),
            payload: std::str::from_utf8(&message.payload)
                .ok()
                .map(str::to_owned),
            payload_base64: BASE64.encode(&message.payload),
            delivery: if message.notice.is_some() {
                DeliveryMode::Notify
            } else {
                DeliveryMode::Push
            },
            hint: message
                .notice
                .as_ref()
                .map(|notice| notice.hint.to_string()),
            created_at_ms: message.created_at_ms,
            expires_at_ms: message.expires_at_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct PullReply {
    /// Oldest first.
    messages: Vec<PulledMessage>,
    /// Whether more messages follow the last one.
    more: bool,
}

#[utoipa::path(
    get,
    path = "/v1/apps/{app}/users/{user}/messages",
    tag = "messages",
    summary = "Pull stored messages",
    description = "The user's unexpired messages after `after`, oldest first. Other query parameters are refused.",
    params(
        AppUserPath,
        PullQuery,
    ),
    responses(
        (status = 200, description = "The messages", body = PullReply),
        (status = 400, description = "`bad_request`: a query or path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
async fn pull(
    State(state): State<Arc<CenterState>>,
    ApiPath(AppUserPath { app, user }): ApiPath<AppUserPath>,
    headers: HeaderMap,
    query: Result<ApiQuery<PullQuery>, ApiError>,
) -> Result<Json<PullReply>, ApiError> {
    // The key is checked before the query, so a caller without one learns
    // nothing from the query's errors.
    authorize_user(&state, &app, &user, &headers)?;
    let ApiQuery(query) = query?;
    read_inbox(&state, &app, &user, query).await.map(Json)
}

/// The messages a pull asks for.
async fn read_inbox(
    state: &CenterState,
    app: &str,
    user: &str,
    query: PullQuery,
) -> Result<PullReply, ApiError> {
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
        .messages_after(app, user, query.after.unwrap_or(0), limit, unix_ms())
        .await
        .map_err(ApiError::storage)?;
    let messages = messages.iter().map(PulledMessage::new).collect();
    Ok(PullReply { messages, more })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct ClientAppPath {
    /// The app's id
    app: String,
}

#[utoipa::path(
    get,
    path = "/v1/client/apps/{app}/messages",
    tag = "client",
    summary = "Pull stored messages, as a client",
    description = "For clients rather than business servers: the messages of the user a client token was issued to (the token the client binds with, as `Authorization: Bearer <client token>`), after `after`, oldest first. How a client that got a NOTIFY may fetch the body over HTTPS instead of PULL. Not limited by `[api] allowed_cidrs`.",
    params(
        ClientAppPath,
        PullQuery,
    ),
    responses(
        (status = 200, description = "The messages", body = PullReply),
        (status = 400, description = "`bad_request`: a query or path the call does not take", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no `Authorization: Bearer <client token>`, or a token that is malformed, expired, not signed with the app's token secret or not issued for this app", body = ErrorBody),
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`", body = ErrorBody),
    ),
    security(("client_token" = [])),
)]
async fn client_pull(
    State(state): State<Arc<CenterState>>,
    ApiPath(ClientAppPath { app }): ApiPath<ClientAppPath>,
    headers: HeaderMap,
    query: Result<ApiQuery<PullQuery>, ApiError>,
) -> Result<Json<PullReply>, ApiError> {
    let Some(found) = state.apps.table().get(app.as_str()).cloned() else {
        return Err(ApiError::new(
            ErrorCode::UnknownApp,
            format!("no app {app:?} on this server"),
        ));
    };
    let token = bearer_of(&headers, "client token")?;
    let now_ms = unix_ms();
    let secrets = found
        .secrets
        .token_secret
        .valid_at(now_ms)
        .map(|secret| secret.value.as_bytes());
    let claims = verify_token_with_any(secrets, &app, token, now_ms / 1000).map_err(|error| {
        let message = match error {
            TokenError::Expired => "the client token expired".to_owned(),
            TokenError::WrongApp => format!("the client token was not issued for app {app:?}"),
            TokenError::BadSignature => {
                "the client token is not signed with the app's token secret".to_owned()
            }
            TokenError::Malformed => "the client token is malformed".to_owned(),
        };
        ApiError::new(ErrorCode::Unauthorized, message)
    })?;
    let ApiQuery(query) = query?;
    read_inbox(&state, &app, &claims.user, query)
        .await
        .map(Json)
}

/// One of a user's connections.
#[derive(Serialize, ToSchema)]
pub(crate) struct ConnectionJson {
    node: String,
    conn_id: String,
    device_id: String,
    connected_at_ms: u64,
    /// `2g`, `3g`, `4g`, `5g`, `wifi`, `wired` or `unknown`, as the client
    /// said (an older client's `cellular` is `4g`).
    network: &'static str,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct PresenceReply {
    online: bool,
    connections: Vec<ConnectionJson>,
}

#[utoipa::path(
    get,
    path = "/v1/apps/{app}/users/{user}/presence",
    tag = "users",
    summary = "A user's connections",
    params(
        AppUserPath,
    ),
    responses(
        (status = 200, description = "Whether the user is online, and where", body = PresenceReply),
        (status = 400, description = "`bad_request`: a path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
async fn presence(
    State(state): State<Arc<CenterState>>,
    ApiPath(AppUserPath { app, user }): ApiPath<AppUserPath>,
    headers: HeaderMap,
) -> Result<Json<PresenceReply>, ApiError> {
    authorize_user(&state, &app, &user, &headers)?;
    let sessions = state.delivery.sessions(&app, &user).await;
    let connections: Vec<ConnectionJson> = sessions
        .iter()
        .map(|s| ConnectionJson {
            node: s.node.clone(),
            conn_id: s.conn.to_string(),
            device_id: s.device_id.clone(),
            connected_at_ms: s.connected_at_ms,
            network: s.network.as_str(),
        })
        .collect();
    Ok(Json(PresenceReply {
        online: !connections.is_empty(),
        connections,
    }))
}

/// What an app comes to now (README, "App stats").
#[derive(Serialize, ToSchema)]
pub(crate) struct AppStatsReply {
    app: String,
    /// Connections with the app bound (in a cluster: summed over the room
    /// nodes' last heartbeats).
    online_connections: u64,
    /// Users with at least one such connection.
    online_users: u64,
    /// Unexpired messages, one per recipient inbox.
    messages_stored: u64,
    /// Of those, the ones no device of their user has acked.
    messages_pending: u64,
    broadcasts_unexpired: u64,
    /// Broadcasts whose fan-out has not reached every connection it targets.
    broadcasts_in_progress: u64,
    /// Room nodes summed.
    nodes_reporting: usize,
}

/// What an app comes to now: its sessions (summed over the room nodes'
/// last heartbeats in a cluster), its stored messages and broadcasts.
#[utoipa::path(
    get,
    path = "/v1/apps/{app}/stats",
    tag = "operations",
    summary = "What an app comes to now",
    params(("app" = String, Path, description = "The app's id")),
    responses(
        (status = 200, description = "The app's connections, messages and broadcasts", body = AppStatsReply),
        (status = 400, description = "`bad_request`: a path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 503, description = "`storage_unavailable` or `register_unavailable`", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
async fn app_stats(
    State(state): State<Arc<CenterState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<AppStatsReply>, ApiError> {
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
    Ok(Json(AppStatsReply {
        app: app.id.to_string(),
        online_connections: online.connections,
        online_users: online.users,
        messages_stored: messages.stored,
        messages_pending: messages.unacked,
        broadcasts_unexpired,
        broadcasts_in_progress,
        nodes_reporting,
    }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct KickReply {
    /// Connections told GOAWAY(`kicked`) and closed.
    kicked: usize,
}

#[utoipa::path(
    post,
    path = "/v1/apps/{app}/users/{user}/kick",
    tag = "users",
    summary = "Close every connection of a user",
    params(
        AppUserPath,
    ),
    responses(
        (status = 200, description = "The user's connections were told and closed", body = KickReply),
        (status = 400, description = "`bad_request`: a path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
async fn kick(
    State(state): State<Arc<CenterState>>,
    ApiPath(AppUserPath { app, user }): ApiPath<AppUserPath>,
    headers: HeaderMap,
) -> Result<Json<KickReply>, ApiError> {
    authorize_user(&state, &app, &user, &headers)?;
    let kicked = state.delivery.kick(&app, &user).await;
    Ok(Json(KickReply { kicked }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BroadcastBody {
    /// UTF-8 text; give exactly one of `payload` and `payload_base64`.
    payload: Option<String>,
    /// Binary data in base64 (standard or URL-safe alphabet, padded or not).
    payload_base64: Option<String>,
    /// Whole seconds, 1 to `api.ttl_secs_max` (60 and 60.0 alike).
    /// Default: the app's `default_ttl_secs`.
    #[schema(value_type = Option<u64>, minimum = 1)]
    ttl_secs: Option<Number>,
    /// Only clients carrying every one of these tags get it (at most 8, of
    /// 1 to 64 bytes).
    tags: Option<Vec<String>>,
    /// Pace the fan-out: connections a second, all nodes together.
    #[schema(minimum = 1)]
    rate_per_sec: Option<f64>,
    /// "low": dropped for clients that are behind (output already queued);
    /// "normal" (the default) is queued like any frame.
    #[schema(pattern = "^(normal|low)$")]
    priority: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct BroadcastReply {
    /// 32 hex digits.
    broadcast_id: String,
    /// The app's broadcast sequence.
    seq: u64,
    expires_at_ms: u64,
}

/// `POST /v1/apps/{app}/broadcasts`: stores the broadcast once for the app
/// and fans it out to every online client it targets; replies once stored.
#[utoipa::path(
    post,
    path = "/v1/apps/{app}/broadcasts",
    tag = "broadcasts",
    summary = "Broadcast to every user of an app",
    params(("app" = String, Path, description = "The app's id")),
    request_body(content = BroadcastBody, example = json!({"payload": "hello", "tags": ["platform=ios"]})),
    responses(
        (status = 200, description = "Stored; the fan-out has started", body = BroadcastReply),
        (status = 400, description = "`malformed_json` or `bad_request`: a body or path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the payload or the body is over its limit", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the app's `broadcast_rate` is used up (see `Retry-After`)", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: nothing was stored; retry", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
async fn broadcast(
    State(state): State<Arc<CenterState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<BroadcastBody>,
) -> Result<Json<BroadcastReply>, ApiError> {
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
            store: None,
            delivery: None,
            hint: None,
            pull_spread_ms: None,
            users: None,
        },
        1,
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
    Ok(Json(BroadcastReply {
        broadcast_id: stored.broadcast_id.to_string(),
        seq: stored.seq,
        expires_at_ms: stored.expires_at_ms,
    }))
}

/// A broadcast and its progress.
#[derive(Serialize, ToSchema)]
pub(crate) struct BroadcastProgressReply {
    broadcast_id: String,
    seq: u64,
    tags: Vec<String>,
    created_at_ms: u64,
    expires_at_ms: u64,
    expired: bool,
    /// Connections it was for.
    target: u64,
    /// Connections it was written to.
    sent: u64,
    /// Connections it was dropped for (a low-priority broadcast to a client
    /// that was behind).
    dropped: u64,
    /// Connections that acked it.
    acked: u64,
}

/// `GET /v1/apps/{app}/broadcasts/{id}`: the broadcast and how far it got
/// on this node: connections targeted, sent, acked so far.
#[utoipa::path(
    get,
    path = "/v1/apps/{app}/broadcasts/{id}",
    tag = "broadcasts",
    summary = "A broadcast and how far it got",
    params(
        ("app" = String, Path, description = "The app's id"),
        ("id" = String, Path, description = "The broadcast id (32 hex digits)")),
    responses(
        (status = 200, description = "The broadcast and its progress", body = BroadcastProgressReply),
        (status = 400, description = "`bad_request`: a path the call does not take", body = ErrorBody),
        AppKeyRefusals,
        (status = 404, description = "`unknown_app` or `unknown_broadcast`", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`", body = ErrorBody),
    ),
    security(("app_key" = [])),
)]
async fn broadcast_progress(
    State(state): State<Arc<CenterState>>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<BroadcastProgressReply>, ApiError> {
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
    Ok(Json(BroadcastProgressReply {
        broadcast_id: id,
        seq: stored.seq,
        tags: stored.required_tags,
        created_at_ms: stored.created_at_ms,
        expires_at_ms: stored.expires_at_ms,
        expired: stored.expires_at_ms <= unix_ms(),
        target: progress.target,
        sent: progress.sent,
        dropped: progress.dropped,
        acked: progress.acked,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DispatchQuery {
    /// The app's id.
    app: String,
    /// The user's id: 1 to 128 bytes of UTF-8 without control characters.
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
    )]
    user: String,
    /// `wifi` (the default), `wired`, `5g`, `4g`, `3g` or `2g`: slow
    /// networks (3g, 2g) get a shorter list.
    #[param(pattern = "^(wifi|wired|5g|4g|3g|2g)$")]
    net: Option<String>,
    /// Prefer gateways of this region.
    region: Option<String>,
    /// `tcp` (the default), `tls`, `ws` or `wss`.
    #[param(pattern = "^(tcp|tls|ws|wss)$")]
    transport: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct DispatchReply {
    /// Gateway addresses to try, best first.
    gateways: Vec<String>,
}

/// `GET /v1/dispatch?app=&user=&net=&region=&transport=`: the gateways a client should
/// try, in order. Clients call it before they hold a token's connection, so
/// it needs no key; it reveals only the public gateway addresses.
#[utoipa::path(
    get,
    path = "/v1/dispatch",
    tag = "clients",
    summary = "The gateways a client should try",
    params(DispatchQuery),
    responses(
        (status = 200, description = "Gateway addresses, best first", body = DispatchReply),
        (status = 400, description = "`bad_request`: a query the call does not take", body = ErrorBody),
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 503, description = "`no_gateway` or `register_unavailable`; retry later", body = ErrorBody),
    ),
)]
async fn dispatch(
    State(state): State<Arc<CenterState>>,
    ApiQuery(query): ApiQuery<DispatchQuery>,
) -> Result<Json<DispatchReply>, ApiError> {
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
            ApiError::bad_request(format!(
                "net {text:?} is not one of wifi, wired, 5g, 4g, 3g, 2g"
            ))
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
    Ok(Json(DispatchReply { gateways }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct StatusReply {
    /// `ok` from `/livez`, `ready` from `/readyz`.
    status: &'static str,
}

#[utoipa::path(
    get,
    path = "/livez",
    tag = "operations",
    summary = "Whether the process runs",
    responses((status = 200, description = "Alive", body = StatusReply)),
)]
async fn livez() -> Json<StatusReply> {
    Json(StatusReply { status: "ok" })
}

/// Ready when listening (this answer proves the API listener; the gateway
/// listens before the API starts), storage answers and not draining.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Whether the node takes traffic",
    responses(
        (status = 200, description = "Ready", body = StatusReply),
        (status = 503, description = "`draining` or `storage_unavailable`", body = ErrorBody),
    ),
)]
async fn readyz(State(state): State<Arc<CenterState>>) -> Response {
    if state.delivery.is_draining() {
        return ApiError::new(ErrorCode::Draining, "server is shutting down").into_response();
    }
    match state.delivery.saver().ping().await {
        Ok(()) => Json(StatusReply { status: "ready" }).into_response(),
        Err(error) => ApiError::storage(error).into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")),
)]
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
    if let Some(bytes) = state.delivery.saver().engine_memory_bytes() {
        let _ = writeln!(
            text,
            "# HELP herald_storage_sqlite_memory_bytes Memory SQLite holds in this process \
             (its page-cache region, resident from startup, and what it allocates besides).\n\
             # TYPE herald_storage_sqlite_memory_bytes gauge\n\
             herald_storage_sqlite_memory_bytes {bytes}"
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

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")),
)]
async fn openapi_document(State(state): State<Arc<CenterState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi_json,
    )
        .into_response()
}
