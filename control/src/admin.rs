//! The admin API: apps at runtime (`/v1/admin/apps`) and what the admin
//! page shows (`/v1/admin/overview`, the page itself in `admin_page`).
//! Every call needs
//! `Authorization: Bearer <admin key>` (`[admin] api_key`); an app's API
//! key is refused here, as the admin key is on an app's routes. Secrets are
//! shown once, when made (created or rotated), never by a read.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin_page;
use crate::api_error::{ApiError, ErrorCode};
use crate::apps::{
    AdminError, App, AppPatch, AppSettings, Apps, RateLimit, SecretKind, constant_time_eq,
};
use crate::coordinator::WebhookRoute;
use crate::input::{ApiPath, JsonBody, bearer};
use crate::overview::{self, Overview, OverviewError, OverviewSources};

/// The shortest admin key the config may set.
pub const ADMIN_KEY_LEN_MIN: usize = 32;

/// An app's TTL when its creator gives none: a day, or the API's maximum
/// if that is shorter.
const DEFAULT_TTL_SECS: u64 = 86_400;

struct AdminState {
    apps: Arc<Apps>,
    /// None: the admin API is off.
    admin_key: Option<String>,
    ttl_secs_max: u64,
    overview: OverviewSources,
}

/// The admin routes and the admin page, for the center to merge into its
/// router.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>(
    apps: Arc<Apps>,
    admin_key: Option<String>,
    ttl_secs_max: u64,
    overview: OverviewSources,
) -> Router<S> {
    Router::new()
        .route("/v1/admin/apps", post(create_app).get(list_apps))
        .route(
            "/v1/admin/apps/{app}",
            get(get_app).patch(update_app).delete(delete_app),
        )
        .route("/v1/admin/apps/{app}/rotate", post(rotate))
        .route("/v1/admin/overview", get(get_overview))
        .with_state(Arc::new(AdminState {
            apps,
            admin_key,
            ttl_secs_max,
            overview,
        }))
        .merge(admin_page::routes())
}

fn authorize_admin(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(admin_key) = &state.admin_key else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the admin API is off: set `[admin] api_key` in the config",
        ));
    };
    let key = bearer(headers)?;
    if !constant_time_eq(key.as_bytes(), admin_key.as_bytes()) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this key is not the admin key (an app's API key does not work here)",
        ));
    }
    Ok(())
}

fn admin_error(error: AdminError) -> ApiError {
    match error {
        AdminError::Invalid(message) => ApiError::bad_request(message),
        AdminError::Exists(_) => ApiError::new(ErrorCode::AppExists, error.to_string()),
        AdminError::Unknown(_) => ApiError::new(ErrorCode::UnknownApp, error.to_string()),
        AdminError::TooMany => ApiError::bad_request(error.to_string()),
        AdminError::Storage(error) => ApiError::storage(error),
        AdminError::Contended | AdminError::Corrupt(_) => {
            tracing::error!(%error, "admin call failed");
            ApiError::internal(error.to_string())
        }
    }
}

/// An app as a read shows it: its settings, never its secrets.
fn app_json(app: &App) -> Value {
    let mut shown = serde_json::to_value(&app.settings).expect("settings serialize");
    shown["id"] = json!(&*app.id);
    shown["version"] = json!(app.version);
    shown
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAppBody {
    id: String,
    default_ttl_secs: Option<u64>,
    push_rate: Option<RateLimit>,
    broadcast_rate: Option<RateLimit>,
    #[serde(default)]
    webhooks: Vec<WebhookRoute>,
    webhook_rate: Option<RateLimit>,
    max_connections: Option<u32>,
}

/// `POST /v1/admin/apps`: 201 with the app and its secrets (shown once).
async fn create_app(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateAppBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authorize_admin(&state, &headers)?;
    let settings = AppSettings {
        default_ttl_secs: body
            .default_ttl_secs
            .unwrap_or(DEFAULT_TTL_SECS.min(state.ttl_secs_max)),
        push_rate: body.push_rate,
        broadcast_rate: body.broadcast_rate,
        webhooks: body.webhooks,
        webhook_rate: body.webhook_rate,
        max_connections: body.max_connections,
    };
    let created = state
        .apps
        .create(&body.id, settings)
        .await
        .map_err(admin_error)?;
    let app = state
        .apps
        .table()
        .get(body.id.as_str())
        .cloned()
        .ok_or_else(|| ApiError::internal("the app was created but is not in the table"))?;
    let mut reply = app_json(&app);
    reply["api_key"] = json!(created.api_key);
    reply["token_secret"] = json!(created.token_secret);
    reply["webhook_secret"] = json!(created.webhook_secret);
    Ok((StatusCode::CREATED, Json(reply)))
}

/// `GET /v1/admin/apps`: every app, by id.
async fn list_apps(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_admin(&state, &headers)?;
    let table = state.apps.table();
    let mut apps: Vec<&Arc<App>> = table.values().collect();
    apps.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let apps: Vec<Value> = apps.into_iter().map(|app| app_json(app)).collect();
    Ok(Json(json!({ "apps": apps })))
}

fn find(state: &AdminState, app: &str) -> Result<Arc<App>, ApiError> {
    state
        .apps
        .table()
        .get(app)
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownApp, format!("no app {app:?}")))
}

/// `GET /v1/admin/apps/{app}`.
async fn get_app(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_admin(&state, &headers)?;
    Ok(Json(app_json(&*find(&state, &app)?)))
}

/// `PATCH /v1/admin/apps/{app}`: changes the fields given (`null` removes
/// a limit); replies with the app after.
async fn update_app(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<AppPatch>,
) -> Result<Json<Value>, ApiError> {
    authorize_admin(&state, &headers)?;
    state.apps.update(&app, patch).await.map_err(admin_error)?;
    Ok(Json(app_json(&*find(&state, &app)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    what: SecretKind,
    #[serde(default)]
    grace_secs: u64,
}

/// `POST /v1/admin/apps/{app}/rotate`: a new value of the secret `what`
/// names, under that name; the old one works for `grace_secs` more.
async fn rotate(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RotateBody>,
) -> Result<Json<Value>, ApiError> {
    authorize_admin(&state, &headers)?;
    let value = state
        .apps
        .rotate(&app, body.what, Duration::from_secs(body.grace_secs))
        .await
        .map_err(admin_error)?;
    let mut reply = json!({ "grace_secs": body.grace_secs });
    reply[body.what.as_str()] = json!(value);
    Ok(Json(reply))
}

/// `GET /v1/admin/overview`: nodes, apps and broadcasts, for the admin
/// page.
async fn get_overview(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Result<Json<Overview>, ApiError> {
    authorize_admin(&state, &headers)?;
    match overview::gather(&state.overview, &state.apps).await {
        Ok(overview) => Ok(Json(overview)),
        Err(OverviewError::Directory(error)) => Err(ApiError::register(error)),
        Err(OverviewError::Storage(error)) => Err(ApiError::storage(error)),
    }
}

/// `DELETE /v1/admin/apps/{app}`: no new binds or calls from now on; bound
/// clients are told; the app's stored messages go in the background.
async fn delete_app(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_admin(&state, &headers)?;
    state.apps.delete(&app).await.map_err(admin_error)?;
    Ok(Json(json!({ "deleted": app })))
}
