//! The API's errors: `{"error": {"code": "...", "message": "..."}}` with
//! the HTTP status the code goes with. The codes are part of the API
//! (README, "Errors"): their strings never change.

use std::time::Duration;

use axum::Json;
use axum::http::{StatusCode, header};
use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, ToSchema};

/// What went wrong, as the API names it. Each code has one HTTP status.
/// Serialized in snake_case (`bad_request`): the strings README's "Errors"
/// lists, which the test below holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A value the call does not take.
    BadRequest,
    /// The body is not JSON for this call (see `input`).
    MalformedJson,
    Unauthorized,
    Forbidden,
    UnknownApp,
    /// An app with that id exists (or is still being deleted).
    AppExists,
    /// No such route.
    NotFound,
    UnknownBroadcast,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    RateLimited,
    /// A bug: the server failed on the request.
    Internal,
    StorageUnavailable,
    RegisterUnavailable,
    NoGateway,
    Draining,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest | ErrorCode::MalformedJson => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::UnknownApp | ErrorCode::NotFound | ErrorCode::UnknownBroadcast => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::AppExists => StatusCode::CONFLICT,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::StorageUnavailable
            | ErrorCode::RegisterUnavailable
            | ErrorCode::NoGateway
            | ErrorCode::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The body of every error reply; the OpenAPI document publishes this type.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// An error reply as the OpenAPI document lists it.
fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    let body = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    ResponseBuilder::new()
        .description(description)
        .content("application/json", body)
        .build()
        .into()
}

/// 401 without a key, 403 with `forbidden` saying why.
fn key_refusals(forbidden: &str) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    BTreeMap::from([
        (
            "401".to_owned(),
            error_response("`unauthorized`: no `Authorization: Bearer` header"),
        ),
        ("403".to_owned(), error_response(forbidden)),
    ])
}

/// How every route an app's key opens refuses a caller (OpenAPI).
pub struct AppKeyRefusals;

impl IntoResponses for AppKeyRefusals {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        key_refusals(
            "`forbidden`: the key is not this app's, or the caller's address is not in \
             `[api] allowed_cidrs`",
        )
    }
}

/// How every admin route refuses a caller (OpenAPI).
pub struct AdminKeyRefusals;

impl IntoResponses for AdminKeyRefusals {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        key_refusals(
            "`forbidden`: not the admin key, the admin API is off, or the caller's address \
             is not in `[admin] allowed_cidrs`",
        )
    }
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// What was wrong, for a person to read; not part of the API.
    pub message: String,
}

/// A JSON error reply.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn rate_limited(kind: &str, wait: Duration) -> ApiError {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        ApiError {
            retry_after: Some(Duration::from_secs(secs)),
            ..ApiError::new(
                ErrorCode::RateLimited,
                format!("the app's {kind} rate is used up; retry in {secs} s"),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }

    pub fn register(error: crate::register::RegisterError) -> ApiError {
        tracing::warn!(%error, "reading the register or the live nodes failed");
        ApiError::new(
            ErrorCode::RegisterUnavailable,
            "the register is unavailable; retry later",
        )
    }

    pub fn storage(error: herald_storage::StorageError) -> ApiError {
        tracing::warn!(%error, "storage call failed");
        ApiError::new(
            ErrorCode::StorageUnavailable,
            "storage is unavailable; retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut response = (self.code.status(), Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, wait.as_secs().into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_keep_the_strings_and_statuses_the_readme_documents() {
        for (code, text, status) in [
            (ErrorCode::MalformedJson, "malformed_json", 400),
            (ErrorCode::BadRequest, "bad_request", 400),
            (ErrorCode::Unauthorized, "unauthorized", 401),
            (ErrorCode::Forbidden, "forbidden", 403),
            (ErrorCode::UnknownApp, "unknown_app", 404),
            (ErrorCode::AppExists, "app_exists", 409),
            (ErrorCode::NotFound, "not_found", 404),
            (ErrorCode::MethodNotAllowed, "method_not_allowed", 405),
            (ErrorCode::RequestTimeout, "request_timeout", 408),
            (ErrorCode::PayloadTooLarge, "payload_too_large", 413),
            (ErrorCode::RateLimited, "rate_limited", 429),
            (ErrorCode::UnknownBroadcast, "unknown_broadcast", 404),
            (ErrorCode::Internal, "internal", 500),
            (ErrorCode::StorageUnavailable, "storage_unavailable", 503),
            (ErrorCode::Draining, "draining", 503),
            (ErrorCode::NoGateway, "no_gateway", 503),
            (ErrorCode::RegisterUnavailable, "register_unavailable", 503),
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), text);
            assert_eq!(code.status().as_u16(), status, "{text}");
        }
    }
}
