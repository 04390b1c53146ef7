//! How the API takes its input, and the forms it accepts (README, "Accepted
//! input"): the request body read whole under its size and time limits,
//! path, query and body extractors whose every rejection is an [`ApiError`],
//! and the rules for base64 payloads and numeric fields.
//!
//! The error-code rule for bodies: `malformed_json` when the body is not
//! JSON, not an object, or has an unknown field, a field twice or a field
//! of the wrong JSON type (serde finds all of these); `bad_request` when a
//! field has the right type but a value the call does not take.

use std::ops::RangeInclusive;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::api_error::{ApiError, ErrorCode};
use utoipa::IntoParams;

/// The path of a user's routes, `/v1/apps/{app}/users/{user}/...`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AppUserPath {
    /// The app's id
    pub app: String,
    /// The user's id: 1 to 128 bytes of UTF-8 without control characters (`%2F` for `/`)
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
    )]
    pub user: String,
}

/// What a request body may be: its size and how long it may take to arrive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    pub bytes_max: usize,
    pub read_timeout: Duration,
}

/// Middleware: reads the request body whole before the handler runs, so
/// that no handler waits on a slow client. A `Content-Length` past
/// the limit is answered 413 from the headers alone; a body that grows past
/// it (chunked) is 413 as soon as it does; one that has not arrived within
/// the read timeout is 408. Each of these closes the connection, since the
/// rest of the body was never read.
pub(crate) async fn read_body(
    State(limits): State<BodyLimits>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.bytes_max as u64) {
        return closing(body_too_large(limits));
    }
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(
        limits.read_timeout,
        Limited::new(body, limits.bytes_max).collect(),
    )
    .await;
    let body = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.is::<LengthLimitError>() => return closing(body_too_large(limits)),
        Ok(Err(error)) => {
            return closing(ApiError::bad_request(format!(
                "the request body could not be read: {error}"
            )));
        }
        Err(_elapsed) => {
            return closing(ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s",
                    limits.read_timeout.as_secs()
                ),
            ));
        }
    };
    next.run(Request::from_parts(parts, Body::from(body))).await
}

fn body_too_large(limits: BodyLimits) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("the request body is larger than {} bytes", limits.bytes_max),
    )
}

/// An answer given before the body was read whole: the connection cannot
/// carry another request.
pub(crate) fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The path's parameters, with a rejection in the API's format naming the
/// bad segment.
pub(crate) struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // axum passes a `%` without two hex digits through as it is; the
        // API refuses it rather than guess what was meant.
        if let Some(segment) = parts.uri.path().split('/').find(|s| bad_escape(s)) {
            return Err(ApiError::bad_request(format!(
                "path segment {segment:?} is not valid percent-encoding"
            )));
        }
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| {
                let message = match &rejection {
                    PathRejection::FailedToDeserializePathParams(error) => match error.kind() {
                        axum::extract::path::ErrorKind::InvalidUtf8InPathParam { key } => {
                            format!("path segment `{key}` is not UTF-8 once percent-decoded")
                        }
                        _ => rejection.body_text(),
                    },
                    _ => rejection.body_text(),
                };
                match rejection.status() {
                    StatusCode::BAD_REQUEST => ApiError::bad_request(message),
                    _ => ApiError::internal(message),
                }
            })
    }
}

/// Whether a path segment has a `%` that does not start a `%XX` escape.
fn bad_escape(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.iter().enumerate().any(|(i, &byte)| {
        byte == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// The bytes a text's `%XX` escapes stand for (once [`bad_escape`] found
/// none broken).
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| text.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                at += 3;
            }
            None => {
                decoded.push(bytes[at]);
                at += 1;
            }
        }
    }
    decoded
}

/// The query string, with a rejection in the API's format.
pub(crate) struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // axum decodes a query leniently (a bad escape stays as it is,
        // bytes that are not UTF-8 become U+FFFD): refuse both instead.
        for parameter in parts.uri.query().unwrap_or("").split('&') {
            if bad_escape(parameter) {
                return Err(ApiError::bad_request(format!(
                    "query parameter {parameter:?} is not valid percent-encoding"
                )));
            }
            if std::str::from_utf8(&percent_decode(parameter)).is_err() {
                let name = parameter.split('=').next().unwrap_or(parameter);
                return Err(ApiError::bad_request(format!(
                    "query parameter {name:?} is not UTF-8 once percent-decoded"
                )));
            }
        }
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// The request body as read by [`read_body`].
pub(crate) struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        // `read_body` holds it whole already: this cannot wait or fail on
        // the client.
        axum::body::to_bytes(request.into_body(), usize::MAX)
            .await
            .map(RawBody)
            .map_err(|error| ApiError::internal(format!("the buffered body failed: {error}")))
    }
}

/// Parses a JSON body, whatever its Content-Type (so a plain `curl -d`
/// works).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| {
        ApiError::new(
            ErrorCode::MalformedJson,
            format!("request body is not valid JSON for this call: {error}"),
        )
    })
}

/// A JSON body (see [`parse_json`]).
pub(crate) struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let RawBody(bytes) = RawBody::from_request(request, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Decodes `payload_base64`: the standard alphabet (`+/`) or the URL-safe
/// one (`-_`), not both in one value; with canonical `=` padding or none;
/// no whitespace; the last symbol's unused bits zero (one encoding per
/// payload).
pub(crate) fn decode_payload_base64(encoded: &str) -> Result<Vec<u8>, ApiError> {
    let refuse = |rule: &str| ApiError::bad_request(format!("payload_base64 {rule}"));
    if encoded.bytes().any(|byte| byte.is_ascii_whitespace()) {
        return Err(refuse("must not contain whitespace or line breaks"));
    }
    let standard = encoded.contains(['+', '/']);
    let url_safe = encoded.contains(['-', '_']);
    if standard && url_safe {
        return Err(refuse(
            "mixes the standard (+/) and the URL-safe (-_) alphabets",
        ));
    }
    let engine = match (url_safe, encoded.ends_with('=')) {
        (false, true) => &STANDARD,
        (false, false) => &STANDARD_NO_PAD,
        (true, true) => &URL_SAFE,
        (true, false) => &URL_SAFE_NO_PAD,
    };
    engine.decode(encoded).map_err(|error| {
        use base64::DecodeError;
        let bad_padding =
            || refuse("has wrong padding: pad with = to a multiple of 4 symbols, or not at all");
        match error {
            DecodeError::InvalidByte(_, b'=') | DecodeError::InvalidPadding => bad_padding(),
            DecodeError::InvalidByte(offset, byte) => refuse(&format!(
                "has {:?} at offset {offset}, which is not a base64 symbol",
                char::from(byte)
            )),
            DecodeError::InvalidLength(_) => refuse("has a length no base64 text has"),
            DecodeError::InvalidLastSymbol(..) => {
                refuse("is not canonical: its last symbol has unused bits set")
            }
        }
    })
}

/// A numeric field that must be a whole number in `range` (60 and 60.0
/// alike). The right JSON type with another value is `bad_request`.
pub(crate) fn whole_number(
    field: &str,
    value: &serde_json::Number,
    range: RangeInclusive<u64>,
) -> Result<u64, ApiError> {
    let whole = value.as_u64().or_else(|| {
        let float = value.as_f64()?;
        (float.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&float)).then_some(float as u64)
    });
    whole.filter(|n| range.contains(n)).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{field} must be a whole number from {} to {}, not {value}",
            range.start(),
            range.end()
        ))
    })
}

/// The key of an `Authorization: Bearer <key>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    bearer_of(headers, "api key")
}

/// The `Authorization: Bearer` value, named `credential` in the errors.
pub(crate) fn bearer_of<'h>(headers: &'h HeaderMap, credential: &str) -> Result<&'h str, ApiError> {
    let unauthorized = |message: String| ApiError::new(ErrorCode::Unauthorized, message);
    let key = match headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str())
    {
        None => {
            return Err(unauthorized(format!(
                "missing `Authorization: Bearer <{credential}>` header"
            )));
        }
        Some(Err(_)) => {
            return Err(unauthorized(format!(
                "the Authorization header must be visible ASCII: `Bearer <{credential}>`"
            )));
        }
        Some(Ok(value)) => value.strip_prefix("Bearer ").ok_or_else(|| {
            unauthorized(format!(
                "the Authorization header must be `Bearer <{credential}>`"
            ))
        })?,
    };
    Ok(key.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_in_either_alphabet_padded_or_not() {
        for (encoded, decoded) in [
            ("aGk=", &b"hi"[..]),
            ("aGk", b"hi"),
            ("+/8=", &[0xfb, 0xff]),
            ("+/8", &[0xfb, 0xff]),
            ("-_8=", &[0xfb, 0xff]),
            ("-_8", &[0xfb, 0xff]),
            ("QQ==", b"A"),
            ("", b""),
        ] {
            assert_eq!(
                decode_payload_base64(encoded).unwrap(),
                decoded,
                "{encoded}"
            );
        }
    }

    #[test]
    fn base64_refusals_say_which_rule() {
        for (encoded, rule) in [
            ("+_8=", "mixes"),
            ("aGk =", "whitespace"),
            ("aGk\n", "whitespace"),
            ("aGl=", "canonical"),
            ("aGk==", "padding"),
            ("aG=k", "padding"),
            ("aGk=a", "padding"),
            ("QQ=", "padding"),
            ("a", "length"),
            ("%%%", "not a base64 symbol"),
        ] {
            let error = decode_payload_base64(encoded).unwrap_err();
            assert!(format!("{error:?}").contains(rule), "{encoded}: {error:?}");
        }
    }

    #[test]
    fn whole_numbers_in_range() {
        let number = |text: &str| serde_json::from_str::<serde_json::Number>(text).unwrap();
        assert_eq!(whole_number("n", &number("60"), 1..=100).unwrap(), 60);
        assert_eq!(whole_number("n", &number("60.0"), 1..=100).unwrap(), 60);
        assert_eq!(whole_number("n", &number("6e1"), 1..=100).unwrap(), 60);
        for refused in ["0", "-1", "1.5", "101", "1e300", "-0.0"] {
            assert!(
                whole_number("n", &number(refused), 1..=100).is_err(),
                "{refused}"
            );
        }
    }
}
