//! Request ids: each API call gets one (the caller's `X-Request-Id` if it
//! sent a usable one), its handling runs in a span that carries it, the
//! answer echoes it, and a message sent to another node for the call
//! carries it on, so one id finds a push's lines on every node.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng as _;
use tracing::Instrument as _;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller; a longer one is replaced.
pub const REQUEST_ID_LEN_MAX: usize = 64;

tokio::task_local! {
    static REQUEST_ID: Arc<str>;
}

/// The request id of the API call this task is handling, if any.
pub fn current_request_id() -> Option<Arc<str>> {
    REQUEST_ID.try_with(Arc::clone).ok()
}

/// A caller's id is kept if it is 1 to 64 of `A-Z a-z 0-9 . _ -`: it goes
/// into logs and headers as it is.
fn usable(id: &str) -> bool {
    (1..=REQUEST_ID_LEN_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn new_request_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

/// The span a request id's work runs in, here or on another node. A
/// span's level only decides when it is kept: at ERROR it is kept under
/// every filter that logs anything, so every line of a call, at any level
/// the filter lets through, carries the call's id.
pub fn request_span(request_id: &str) -> tracing::Span {
    tracing::error_span!("request", request_id = %request_id)
}

/// Middleware: the call's id, its span, and the id in the answer.
pub async fn trace_requests(request: Request, next: Next) -> Response {
    let request_id: Arc<str> = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| usable(id))
        .map_or_else(|| new_request_id().into(), Arc::from);
    // ERROR for the reason `request_span` gives.
    let span = tracing::error_span!(
        "request",
        request_id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = REQUEST_ID
        .scope(request_id.clone(), next.run(request))
        .instrument(span)
        .await;
    let value = HeaderValue::from_str(&request_id).expect("request ids are header-safe");
    response.headers_mut().insert(REQUEST_ID_HEADER, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_ids_are_taken_from_callers() {
        assert!(usable("req-42.a_b"));
        assert!(usable(&"x".repeat(REQUEST_ID_LEN_MAX)));
        for bad in ["", "has space", "new\nline", "ünï", &"x".repeat(65)] {
            assert!(!usable(bad), "{bad:?}");
        }
        let id = new_request_id();
        assert!(usable(&id) && id.len() == 16, "{id}");
    }
}
