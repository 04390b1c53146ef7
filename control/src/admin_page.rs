//! The admin page (`GET /admin`): four static files built into the
//! binary, so running it needs no build step and no files beside Herald.
//! Loading the page needs no key; the page asks for the admin key and
//! sends it with each read of `/v1/admin/overview`, which checks it.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../assets/admin/index.html");
const ADMIN_JS: &str = include_str!("../assets/admin/admin.js");
const ADMIN_CSS: &str = include_str!("../assets/admin/admin.css");
const FAVICON_SVG: &str = include_str!("../assets/admin/favicon.svg");

/// Scripts and styles only from the page's own files (no inline script,
/// so injected markup cannot run), data only from this API, and never in
/// a frame.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/admin",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/admin/",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/admin/admin.js",
            get(|| asset("text/javascript; charset=utf-8", ADMIN_JS)),
        )
        .route(
            "/admin/admin.css",
            get(|| asset("text/css; charset=utf-8", ADMIN_CSS)),
        )
        .route(
            "/admin/favicon.svg",
            get(|| asset("image/svg+xml", FAVICON_SVG)),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A new binary may bring a new page: always ask again.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
