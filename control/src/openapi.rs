//! The HTTP API's OpenAPI 3.1 document, served at `/openapi.json`.
//!
//! Why generated: a document written by hand drifts from the server. This
//! one is assembled from the handlers' `#[utoipa::path]` annotations and
//! the request and reply types the handlers take and return (`ToSchema`,
//! `IntoParams`), so a changed field changes the document with it. A test
//! here holds the document's routes to the ones `center` and `admin`
//! declare (a route without an annotation fails it), and
//! `tests/openapi.rs` runs schemathesis against a live server to hold the
//! server's answers to the document.

use std::sync::LazyLock;

use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, OneOfBuilder, Schema};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{self, PathItem, RefOr};
use utoipa::{Modify, OpenApi};

use crate::{admin, center};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald HTTP API",
        description = "Push, pull and broadcast to the users of an app; manage apps at runtime. \
            Errors are `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}`; the codes are \
            listed in the README's \"Errors\". Request bodies are JSON whatever their \
            `Content-Type`.",
    ),
    paths(
        center::push,
        center::multicast,
        center::pull,
        center::presence,
        center::kick,
        center::broadcast,
        center::broadcast_progress,
        center::app_stats,
        center::client_pull,
        center::dispatch,
        center::livez,
        center::readyz,
        center::metrics,
        admin::create_app,
        admin::list_apps,
        admin::get_app,
        admin::update_app,
        admin::rotate,
        admin::delete_app,
        admin::get_overview,
        center::openapi_document,
    ),
    modifiers(&SecuritySchemes, &HealthzAlias, &ExtensibleAppSettings, &OnePayload),
    tags(
        (name = "messages", description = "Stored messages: push to users' inboxes, pull them back"),
        (name = "users", description = "Users' connections"),
        (name = "broadcasts", description = "One message to every (tagged) client of an app"),
        (name = "clients", description = "What clients call before they connect; no key"),
        (name = "client", description = "What clients call with their client token (the token they bind with)"),
        (name = "admin", description = "Apps at runtime; the admin key (`[admin] api_key`)"),
        (name = "operations", description = "Health, metrics and this document; no key"),
    ),
)]
struct ApiDoc;

/// The two keys: an app's API key on `/v1/apps/{app}`, the admin key on
/// `/v1/admin`, each as `Authorization: Bearer <key>`.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, description) in [
            (
                "app_key",
                "The app's API key (`api_key` of its `[[apps]]` entry, or made by the admin API), \
                 as `Authorization: Bearer <api key>`",
            ),
            (
                "admin_key",
                "The admin key (`[admin] api_key` in the config), as `Authorization: Bearer <admin key>`",
            ),
            (
                "client_token",
                "A client token the app's business server issued (`herald token`, or signed with \
                 the app's token secret), as `Authorization: Bearer <client token>`",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(description))
                        .build(),
                ),
            );
        }
    }
}

/// `/healthz` is the `/readyz` handler under a second path.
struct HealthzAlias;

impl Modify for HealthzAlias {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        let Some(readyz) = openapi.paths.paths.get("/readyz") else {
            return;
        };
        let mut healthz: PathItem = readyz.clone();
        if let Some(operation) = healthz.get.as_mut() {
            operation.operation_id = Some("healthz".to_owned());
            operation.summary = Some("The same as `/readyz`".to_owned());
        }
        openapi.paths.paths.insert("/healthz".to_owned(), healthz);
    }
}

/// `AppSettings` refuses unknown fields where it is read (an apps row),
/// which utoipa publishes as `additionalProperties: false`; but the admin
/// API's replies extend it (`id`, `version`, a new app's secrets), which
/// that would forbid. No request body is an `AppSettings`.
struct ExtensibleAppSettings;

impl Modify for ExtensibleAppSettings {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        let settings = openapi
            .components
            .as_mut()
            .and_then(|components| components.schemas.get_mut("AppSettings"));
        if let Some(RefOr::T(Schema::Object(settings))) = settings {
            settings.additional_properties = None;
        }
    }
}

/// A message body takes exactly one of `payload` and `payload_base64`,
/// which the fields' types alone cannot say.
struct OnePayload;

impl Modify for OnePayload {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for body in ["MessageBody", "BroadcastBody"] {
            let Some(RefOr::T(Schema::Object(fields))) = components.schemas.remove(body) else {
                continue;
            };
            let with = |field: &str| ObjectBuilder::new().required(field).build();
            let exactly_one = OneOfBuilder::new()
                .item(with("payload"))
                .item(with("payload_base64"))
                .build();
            let schema = AllOfBuilder::new()
                .item(fields)
                .item(Schema::OneOf(exactly_one))
                .build();
            components
                .schemas
                .insert(body.to_owned(), Schema::AllOf(schema).into());
        }
    }
}

/// The document as JSON, made once; `center::router` serves it.
pub fn document_json() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes")
    });
    &DOCUMENT
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    /// Every `(METHOD, path)` the `.route(...)` calls in `source` serve:
    /// the path literal, then each method router (`get(...)`,
    /// `.post(...)`) inside the call's parentheses.
    fn declared_routes(source: &str) -> BTreeSet<(String, String)> {
        let mut routes = BTreeSet::new();
        for (start, _) in source.match_indices(".route(") {
            let call = &source[start + ".route(".len()..];
            let path = call
                .split('"')
                .nth(1)
                .expect("a .route( call starts with its path literal");
            let mut depth = 1;
            let end = call
                .char_indices()
                .find_map(|(at, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    (depth == 0).then_some(at)
                })
                .expect("a .route( call is closed");
            let arguments = &call[..end];
            for method in METHODS {
                let opened = format!("{method}(");
                let serves = arguments.match_indices(&opened).any(|(at, _)| {
                    !arguments[..at]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if serves {
                    routes.insert((method.to_uppercase(), path.to_owned()));
                }
            }
        }
        routes
    }

    fn documented_routes(document: &Value) -> BTreeSet<(String, String)> {
        let mut routes = BTreeSet::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for method in METHODS {
                if item.get(method).is_some() {
                    routes.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        routes
    }

    fn document() -> Value {
        serde_json::from_str(document_json()).expect("the document is JSON")
    }

    /// The admin page's static files (`admin_page`) are not API routes and
    /// are not in the document.
    #[test]
    fn the_document_lists_every_route_the_router_serves_and_no_other() {
        let declared: BTreeSet<_> = declared_routes(include_str!("center.rs"))
            .union(&declared_routes(include_str!("admin.rs")))
            .cloned()
            .collect();
        // The parse found the routes (a broken parse would compare nothing).
        assert!(declared.contains(&("POST".into(), "/v1/apps/{app}/users/{user}/messages".into())));
        assert!(declared.contains(&("GET".into(), "/v1/apps/{app}/users/{user}/messages".into())));
        assert!(declared.contains(&("DELETE".into(), "/v1/admin/apps/{app}".into())));
        let documented = documented_routes(&document());
        let unannotated: Vec<_> = declared.difference(&documented).collect();
        let not_served: Vec<_> = documented.difference(&declared).collect();
        assert!(
            unannotated.is_empty() && not_served.is_empty(),
            "routes without a #[utoipa::path] listed in ApiDoc: {unannotated:?}; \
             documented routes the router does not serve: {not_served:?}"
        );
    }

    #[test]
    fn the_route_parse_finds_every_method_of_a_chain() {
        let source = r#"Router::new().route("/a/{x}", get(one).patch(two).delete(three))
            .route("/b", post(forget_it))"#;
        let routes: Vec<_> = declared_routes(source).into_iter().collect();
        let expected: Vec<(String, String)> = [
            ("DELETE", "/a/{x}"),
            ("GET", "/a/{x}"),
            ("PATCH", "/a/{x}"),
            ("POST", "/b"),
        ]
        .into_iter()
        .map(|(method, path)| (method.to_owned(), path.to_owned()))
        .collect();
        assert_eq!(routes, expected);
    }

    #[test]
    fn keys_and_errors_are_described_where_the_routes_need_them() {
        let document = document();
        assert_eq!(document["openapi"], "3.1.0");
        let schemes = &document["components"]["securitySchemes"];
        assert_eq!(schemes["app_key"]["scheme"], "bearer");
        assert_eq!(schemes["admin_key"]["scheme"], "bearer");
        assert_eq!(schemes["client_token"]["scheme"], "bearer");
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let key = if path.starts_with("/v1/apps/") {
                    Some("app_key")
                } else if path.starts_with("/v1/admin/") {
                    Some("admin_key")
                } else if path.starts_with("/v1/client/") {
                    Some("client_token")
                } else {
                    None
                };
                let security = &operation["security"];
                let responses = operation["responses"].as_object().unwrap();
                match key {
                    Some(key) => {
                        assert!(
                            security[0].get(key).is_some(),
                            "{method} {path}: {security}"
                        );
                        // A client token is right or wrong: there is no
                        // valid one that lacks a permission.
                        let statuses: &[&str] = if key == "client_token" {
                            &["401"]
                        } else {
                            &["401", "403"]
                        };
                        for status in statuses {
                            let body = &responses[*status]["content"]["application/json"]["schema"];
                            assert_eq!(
                                body["$ref"], "#/components/schemas/ErrorBody",
                                "{method} {path} {status}"
                            );
                        }
                    }
                    None => assert!(security.is_null(), "{method} {path} needs no key"),
                }
                assert!(
                    responses.keys().any(|status| status.starts_with('2')),
                    "{method} {path}: no success answer"
                );
            }
        }
        let grace_max =
            &document["components"]["schemas"]["RotateBody"]["properties"]["grace_secs"]["maximum"];
        assert_eq!(grace_max, crate::apps::GRACE_SECS_MAX);
        let codes = &document["components"]["schemas"]["ErrorCode"]["enum"];
        assert!(
            codes.as_array().unwrap().contains(&"rate_limited".into()),
            "{codes}"
        );
    }
}
