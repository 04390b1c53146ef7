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
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admin_page;
use crate::api_error::{AdminKeyRefusals, ApiError, ErrorBody, ErrorCode};
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
#[derive(Serialize, ToSchema)]
pub(crate) struct AppJson {
    id: String,
    /// Raised by every change.
    version: u64,
    #[serde(flatten)]
    settings: AppSettings,
}

fn app_json(app: &App) -> AppJson {
    AppJson {
        id: app.id.to_string(),
        version: app.version,
        settings: app.settings.clone(),
    }
}

/// A created app: its settings and its secrets, shown this once.
#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedApp {
    #[serde(flatten)]
    app: AppJson,
    /// 64 hex characters each.
    api_key: String,
    token_secret: String,
    webhook_secret: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateAppBody {
    /// 1 to 64 characters of A-Z, a-z, 0-9, `-`, `_`, `.`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
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
#[utoipa::path(
    post,
    path = "/v1/admin/apps",
    tag = "admin",
    summary = "Create an app",
    request_body(content = CreateAppBody, example = json!({"id": "shop", "push_rate": {"per_sec": 100, "burst": 200}, "max_connections": 100000})),
    responses(
        (status = 201, description = "Created: the app and its secrets, shown only this once", body = CreatedApp),
        (status = 400, description = "`malformed_json` or `bad_request`: a body the call does not take", body = ErrorBody),
        AdminKeyRefusals,
        (status = 409, description = "`app_exists`: the id is taken (or its deleted app is still being emptied)", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: nothing changed; retry", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
async fn create_app(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateAppBody>,
) -> Result<(StatusCode, Json<CreatedApp>), ApiError> {
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
    let reply = CreatedApp {
        app: app_json(&app),
        api_key: created.api_key,
        token_secret: created.token_secret,
        webhook_secret: created.webhook_secret,
    };
    Ok((StatusCode::CREATED, Json(reply)))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct AppList {
    /// By id.
    apps: Vec<AppJson>,
}

/// `GET /v1/admin/apps`: every app, by id.
#[utoipa::path(
    get,
    path = "/v1/admin/apps",
    tag = "admin",
    summary = "List the apps",
    responses(
        (status = 200, description = "Every app's settings, never a secret", body = AppList),
        AdminKeyRefusals,
    ),
    security(("admin_key" = [])),
)]
async fn list_apps(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Result<Json<AppList>, ApiError> {
    authorize_admin(&state, &headers)?;
    let table = state.apps.table();
    let mut apps: Vec<&Arc<App>> = table.values().collect();
    apps.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let apps = apps.into_iter().map(|app| app_json(app)).collect();
    Ok(Json(AppList { apps }))
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
#[utoipa::path(
    get,
    path = "/v1/admin/apps/{app}",
    tag = "admin",
    summary = "An app's settings",
    params(("app" = String, Path, description = "The app's id")),
    responses(
        (status = 200, description = "The app's settings", body = AppJson),
        (status = 400, description = "`bad_request`: a path the call does not take", body = ErrorBody),
        AdminKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
async fn get_app(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<AppJson>, ApiError> {
    authorize_admin(&state, &headers)?;
    Ok(Json(app_json(&*find(&state, &app)?)))
}

/// `PATCH /v1/admin/apps/{app}`: changes the fields given (`null` removes
/// a limit); replies with the app after.
#[utoipa::path(
    patch,
    path = "/v1/admin/apps/{app}",
    tag = "admin",
    summary = "Change an app's settings",
    params(("app" = String, Path, description = "The app's id")),
    request_body(content = AppPatch, example = json!({"max_connections": 2000, "push_rate": null})),
    responses(
        (status = 200, description = "The app's settings after the change", body = AppJson),
        (status = 400, description = "`malformed_json` or `bad_request`: a body or path the call does not take", body = ErrorBody),
        AdminKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: nothing changed; retry", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
async fn update_app(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<AppPatch>,
) -> Result<Json<AppJson>, ApiError> {
    authorize_admin(&state, &headers)?;
    state.apps.update(&app, patch).await.map_err(admin_error)?;
    Ok(Json(app_json(&*find(&state, &app)?)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateBody {
    what: SecretKind,
    /// How long the old value keeps working (at most a week; default 0).
    #[serde(default)]
    // `apps::GRACE_SECS_MAX` (a test in `openapi` holds them together).
    #[schema(maximum = 604_800)]
    grace_secs: u64,
}

/// The new value, under the name of the secret rotated.
#[derive(Serialize, ToSchema)]
pub(crate) struct RotatedSecret {
    grace_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_secret: Option<String>,
}

/// `POST /v1/admin/apps/{app}/rotate`: a new value of the secret `what`
/// names, under that name; the old one works for `grace_secs` more.
#[utoipa::path(
    post,
    path = "/v1/admin/apps/{app}/rotate",
    tag = "admin",
    summary = "Rotate one of an app's secrets",
    params(("app" = String, Path, description = "The app's id")),
    request_body(content = RotateBody, example = json!({"what": "webhook_secret", "grace_secs": 3600})),
    responses(
        (status = 200, description = "The new value, under the name `what` gave", body = RotatedSecret),
        (status = 400, description = "`malformed_json` or `bad_request`: a body or path the call does not take", body = ErrorBody),
        AdminKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: nothing changed; retry", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
async fn rotate(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RotateBody>,
) -> Result<Json<RotatedSecret>, ApiError> {
    authorize_admin(&state, &headers)?;
    let value = state
        .apps
        .rotate(&app, body.what, Duration::from_secs(body.grace_secs))
        .await
        .map_err(admin_error)?;
    let mut reply = RotatedSecret {
        grace_secs: body.grace_secs,
        api_key: None,
        token_secret: None,
        webhook_secret: None,
    };
    *match body.what {
        SecretKind::ApiKey => &mut reply.api_key,
        SecretKind::TokenSecret => &mut reply.token_secret,
        SecretKind::WebhookSecret => &mut reply.webhook_secret,
    } = Some(value);
    Ok(Json(reply))
}

/// `GET /v1/admin/overview`: nodes, apps and broadcasts, for the admin
/// page.
#[utoipa::path(
    get,
    path = "/v1/admin/overview",
    tag = "admin",
    summary = "Nodes, apps and broadcasts (what the admin page shows)",
    responses(
        (status = 200, description = "The overview", body = Overview),
        AdminKeyRefusals,
        (status = 503, description = "`storage_unavailable` or `register_unavailable`", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
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
#[utoipa::path(
    delete,
    path = "/v1/admin/apps/{app}",
    tag = "admin",
    summary = "Delete an app",
    params(("app" = String, Path, description = "The app's id")),
    responses(
        (status = 200, description = "Deleted; its stored data goes in the background", body = DeletedApp),
        (status = 400, description = "`bad_request`: a path the call does not take", body = ErrorBody),
        AdminKeyRefusals,
        (status = 404, description = "`unknown_app`", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: nothing changed; retry", body = ErrorBody),
    ),
    security(("admin_key" = [])),
)]
async fn delete_app(
    State(state): State<Arc<AdminState>>,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<DeletedApp>, ApiError> {
    authorize_admin(&state, &headers)?;
    state.apps.delete(&app).await.map_err(admin_error)?;
    Ok(Json(DeletedApp { deleted: app }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct DeletedApp {
    /// The app's id.
    deleted: String,
}
