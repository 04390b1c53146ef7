//! Bad input gets the documented error, and the server keeps serving
//! everyone else. Also heartbeats: silent clients are cut, pinging ones not.

mod support;

use std::time::Duration;

use herald_proto::{BindErrorCode, ErrorCode, Frame, GoAwayReason};
use serde_json::{Value, json};
use support::{API_KEY, APP, Io, OTHER_API_KEY, RawClient, RawResponse, Server, token};

fn error_code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn api_errors_have_the_documented_status_and_code() {
    let server = Server::start();
    let path = format!("/v1/apps/{APP}/users/alice/messages");
    let ok = r#"{"payload": "x"}"#.to_owned();

    let (status, body) = server.post(&path, "wrong-key", ok.clone()).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    // Another app's key is wrong for this app.
    let (status, _) = server.post(&path, OTHER_API_KEY, ok.clone()).await;
    assert_eq!(status, 403);

    let response = reqwest::Client::new()
        .post(server.url(&path))
        .body(ok.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    let (status, body) = server
        .post("/v1/apps/nope/users/alice/messages", API_KEY, ok.clone())
        .await;
    assert_eq!((status, error_code(&body)), (404, "unknown_app"));

    let (status, body) = server.post(&path, API_KEY, "{not json".to_owned()).await;
    assert_eq!((status, error_code(&body)), (400, "malformed_json"));

    let (status, body) = server
        .post(
            &path,
            API_KEY,
            r#"{"payload": "a", "payload_base64": "YQ=="}"#.to_owned(),
        )
        .await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"));

    let (status, body) = server
        .post(&path, API_KEY, r#"{"payload_base64": "%%%"}"#.to_owned())
        .await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"));

    // The test config allows 1024-byte payloads.
    let big = serde_json::json!({ "payload": "x".repeat(1025) }).to_string();
    let (status, body) = server.post(&path, API_KEY, big).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"));
    // Past the HTTP body limit the body is refused before it is parsed.
    let huge = serde_json::json!({ "payload": "x".repeat(100 << 10) }).to_string();
    let (status, body) = server.post(&path, API_KEY, huge).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"));

    let (status, _) = server
        .post(
            &path,
            API_KEY,
            r#"{"payload": "x", "ttl_secs": 0}"#.to_owned(),
        )
        .await;
    assert_eq!(status, 400);

    let (status, body) = server.get("/no/such/route", API_KEY).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = server.post("/livez", API_KEY, String::new()).await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));

    // Nothing bad was stored, and good requests still work.
    assert_eq!(server.push("alice", "fine").await["seq"], 1);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("herald_api_requests_total{status=\"413\"} 2"),
        "{metrics}"
    );
}

/// A request as it goes on the wire, with the test app's key.
fn wire_request(method: &str, target: &str, body: Option<&str>) -> Vec<u8> {
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {API_KEY}\r\n\
         Connection: close\r\n"
    );
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        request.push_str("\r\n");
    }
    request.into_bytes()
}

/// Why `response` is not the documented error `(status, code)`, if it is not.
fn not_the_error(response: &RawResponse, status: u16, code: &str) -> Option<String> {
    let error = &response.body["error"];
    let documented = response.status == status
        && error["code"] == code
        && error["message"].as_str().is_some_and(|m| !m.is_empty())
        && error.as_object().is_some_and(|fields| fields.len() == 2)
        && response.body.as_object().is_some_and(|top| top.len() == 1)
        && response.header("content-type") == Some("application/json");
    (!documented).then(|| format!("{} {}", response.status, response.body))
}

#[tokio::test]
async fn every_route_answers_bad_input_with_the_documented_json_error() {
    let server = Server::start();
    let long = "u".repeat(129);
    let push_ok = r#"{"payload": "x"}"#;
    let multicast_ok = r#"{"users": ["alice"], "payload": "x"}"#;
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        // push
        (
            "POST",
            "/v1/apps/chat/users/%FF/messages".into(),
            Some(push_ok.into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/apps/chat/users/a%G1/messages".into(),
            Some(push_ok.into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("/v1/apps/chat/users/{long}/messages"),
            Some(push_ok.into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/apps/chat/users/alice/messages".into(),
            Some(r#"{"payload": 5}"#.into()),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/apps/chat/users/alice/messages".into(),
            Some("[]".into()),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/apps/chat/users/alice/messages".into(),
            Some(r#"{"payload": "x", "extra": 1}"#.into()),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/apps/chat/users/alice/messages".into(),
            Some(r#"{"payload": "x", "ttl_secs": 0}"#.into()),
            400,
            "bad_request",
        ),
        // pull
        (
            "GET",
            "/v1/apps/chat/users/%FF/messages".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            format!("/v1/apps/chat/users/{long}/messages"),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/apps/chat/users/alice/messages?after=x".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/apps/chat/users/alice/messages?after=-1".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/apps/chat/users/alice/messages?limit=0".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/apps/chat/users/alice/messages?after=%FF".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/apps/chat/users/alice/messages?after=%G".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/apps/chat/users/alice/messages?bogus=1".into(),
            None,
            400,
            "bad_request",
        ),
        // multicast
        (
            "POST",
            "/v1/apps/%FF/messages".into(),
            Some(multicast_ok.into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/apps/chat/messages".into(),
            Some(r#"{"users": "alice", "payload": "x"}"#.into()),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/apps/chat/messages".into(),
            Some(json!({"users": [long], "payload": "x"}).to_string()),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/apps/chat/messages".into(),
            Some(r#"{"users": ["a\u0000b"], "payload": "x"}"#.into()),
            400,
            "bad_request",
        ),
        // presence
        (
            "GET",
            "/v1/apps/chat/users/%FF/presence".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            format!("/v1/apps/chat/users/{long}/presence"),
            None,
            400,
            "bad_request",
        ),
        // kick
        (
            "POST",
            "/v1/apps/chat/users/%FF/kick".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("/v1/apps/chat/users/{long}/kick"),
            None,
            400,
            "bad_request",
        ),
        // broadcast
        (
            "POST",
            "/v1/apps/%FF/broadcasts".into(),
            Some(push_ok.into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/apps/chat/broadcasts".into(),
            Some(r#"{"payload": "x", "tags": "a"}"#.into()),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/apps/chat/broadcasts".into(),
            Some(r#"{"payload": "x", "rate_per_sec": 0}"#.into()),
            400,
            "bad_request",
        ),
        // broadcast progress
        (
            "GET",
            "/v1/apps/chat/broadcasts/%FF".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/apps/chat/broadcasts/nope".into(),
            None,
            404,
            "unknown_broadcast",
        ),
        // dispatch
        (
            "GET",
            "/v1/dispatch?app=chat&user=%FF".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/dispatch?app=chat&user=a%00b".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            format!("/v1/dispatch?app=chat&user={long}"),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/dispatch?app=chat".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/dispatch?app=chat&user=alice&net=6g".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/dispatch?app=%FF&user=alice".into(),
            None,
            400,
            "bad_request",
        ),
        // no such route or method
        ("GET", "/v1/nope".into(), None, 404, "not_found"),
        (
            "GET",
            "/v1/apps/chat/users/%FF/nope".into(),
            None,
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/v1/apps/chat/users/alice/messages".into(),
            None,
            405,
            "method_not_allowed",
        ),
        (
            "POST",
            "/livez".into(),
            Some(String::new()),
            405,
            "method_not_allowed",
        ),
    ];
    let mut wrong = Vec::new();
    for (method, target, body, status, code) in &cases {
        let response =
            support::raw_request(&server.api, &wire_request(method, target, body.as_deref())).await;
        if let Some(got) = not_the_error(&response, *status, code) {
            wrong.push(format!(
                "{method} {target}: expected {status} {code}, got {got}"
            ));
        }
    }

    // Headers: a key that is not visible ASCII, and one that is not Bearer.
    let path = "/v1/apps/chat/users/alice/presence";
    for authorization in [&b"Bearer \xffkey"[..], b"Basic dXNlcjpwYXNz"] {
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n").into_bytes();
        request.extend_from_slice(b"Authorization: ");
        request.extend_from_slice(authorization);
        request.extend_from_slice(b"\r\n\r\n");
        let response = support::raw_request(&server.api, &request).await;
        if let Some(got) = not_the_error(&response, 401, "unauthorized") {
            let shown = String::from_utf8_lossy(authorization);
            wrong.push(format!(
                "Authorization {shown:?}: expected 401 unauthorized, got {got}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of the answers were not the documented error:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// POSTs `body` to the test app's `path`: (status, reply).
async fn post_json(server: &Server, path: &str, body: &str) -> (u16, Value) {
    server.post(path, API_KEY, body.to_owned()).await
}

#[tokio::test]
async fn user_ids_are_1_to_128_bytes_of_utf8_without_control_characters() {
    let server = Server::start();
    let push = |user: String| {
        let server = &server;
        async move {
            let path = format!("/v1/apps/{APP}/users/{user}/messages");
            post_json(server, &path, r#"{"payload": "hi"}"#).await
        }
    };
    // `/` (as %2F), Unicode, compared byte for byte: é precomposed and
    // decomposed are two users.
    for user in [
        "a%2Fb",
        "%C3%A9lodie",
        "e%CC%81lodie",
        "%F0%9F%99%82",
        &"x".repeat(128),
    ] {
        let (status, reply) = push(user.to_owned()).await;
        assert_eq!((status, &reply["seq"]), (200, &json!(1)), "{user}: {reply}");
    }
    let (_, pulled) = server
        .get(&format!("/v1/apps/{APP}/users/a%2Fb/messages"), API_KEY)
        .await;
    assert_eq!(pulled["messages"][0]["payload"], "hi", "{pulled}");
    // `/` unescaped is a path separator: another route.
    assert_eq!(push("a/b".to_owned()).await.0, 404);
    for user in ["%00", "a%00b", "a%0Ab", "%7F", "%C2%85", &"x".repeat(129)] {
        let (status, reply) = push(user.to_owned()).await;
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{user}: {reply}"
        );
    }
    // The same rule in a multicast's list and at the dispatcher.
    let multicast = format!("/v1/apps/{APP}/messages");
    let (status, reply) = post_json(
        &server,
        &multicast,
        r#"{"users": ["a/b", "élodie"], "payload": "x"}"#,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["seq"], 2, "{reply}");
    let (status, reply) = post_json(
        &server,
        &multicast,
        r#"{"users": ["a/b", "a\nb"], "payload": "x"}"#,
    )
    .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{reply}"
    );
    let (status, _) = server
        .get(&format!("/v1/dispatch?app={APP}&user=%C3%A9lodie"), API_KEY)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn payload_base64_takes_either_alphabet_padded_or_not() {
    let server = Server::start();
    let path = format!("/v1/apps/{APP}/users/bin/messages");
    // (sent, the bytes as standard padded base64, which pull returns)
    let accepted = [
        ("aGk=", "aGk="),
        ("aGk", "aGk="),
        ("+/8=", "+/8="),
        ("+/8", "+/8="),
        ("-_8=", "+/8="),
        ("-_8", "+/8="),
    ];
    for (seq, (sent, standard)) in accepted.iter().enumerate() {
        let (status, reply) = post_json(
            &server,
            &path,
            &json!({ "payload_base64": sent }).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{sent}: {reply}");
        let (_, pulled) = server
            .get(&format!("{path}?after={seq}&limit=1"), API_KEY)
            .await;
        assert_eq!(pulled["messages"][0]["payload_base64"], *standard, "{sent}");
    }
    let refused = [
        ("+_8=", "mixes"),
        ("aGk=\n", "whitespace"),
        ("aG k=", "whitespace"),
        ("aGl=", "canonical"),
        ("QQ=", "padding"),
        ("aGk==", "padding"),
        ("a", "length"),
        ("aGk*", "base64 symbol"),
    ];
    for (sent, rule) in refused {
        let (status, reply) = post_json(
            &server,
            &path,
            &json!({ "payload_base64": sent }).to_string(),
        )
        .await;
        assert_eq!(status, 400, "{sent:?}: {reply}");
        assert_eq!(reply["error"]["code"], "bad_request", "{sent:?}");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(rule), "{sent:?}: {message}");
    }
}

#[tokio::test]
async fn numeric_fields_out_of_range_are_bad_request_and_of_the_wrong_type_malformed_json() {
    let server = Server::start();
    let path = format!("/v1/apps/{APP}/users/ttl/messages");
    let day_ms = 24 * 3600 * 1000;
    // ttl_secs as written in the body -> the TTL stored, or the error code.
    let table: [(&str, Result<u64, &str>); 13] = [
        ("", Ok(day_ms)),
        (r#", "ttl_secs": null"#, Ok(day_ms)),
        (r#", "ttl_secs": 60"#, Ok(60_000)),
        (r#", "ttl_secs": 60.0"#, Ok(60_000)),
        (r#", "ttl_secs": 2592000"#, Ok(2_592_000_000)),
        (r#", "ttl_secs": 0"#, Err("bad_request")),
        (r#", "ttl_secs": -1"#, Err("bad_request")),
        (r#", "ttl_secs": 1.5"#, Err("bad_request")),
        (r#", "ttl_secs": 2592001"#, Err("bad_request")),
        (r#", "ttl_secs": "60""#, Err("malformed_json")),
        (r#", "ttl_secs": true"#, Err("malformed_json")),
        (r#", "ttl_secs": [60]"#, Err("malformed_json")),
        (r#", "ttl_secs": {}"#, Err("malformed_json")),
    ];
    let mut wrong = Vec::new();
    for (field, expected) in table {
        let body = format!(r#"{{"payload": "x"{field}}}"#);
        let (status, reply) = post_json(&server, &path, &body).await;
        let got = match status {
            200 => {
                let seq = reply["seq"].as_u64().unwrap();
                let (_, pulled) = server
                    .get(&format!("{path}?after={}&limit=1", seq - 1), API_KEY)
                    .await;
                let message = &pulled["messages"][0];
                Ok(message["expires_at_ms"].as_u64().unwrap()
                    - message["created_at_ms"].as_u64().unwrap())
            }
            _ => Err(reply["error"]["code"]
                .as_str()
                .unwrap_or("<none>")
                .to_owned()),
        };
        if got.as_ref().map_err(String::as_str) != expected.as_ref().map_err(|code| *code) {
            wrong.push(format!(
                "{body}: expected {expected:?}, got {status} {got:?}"
            ));
        }
    }
    // The same rule on a broadcast's numbers.
    let broadcasts = format!("/v1/apps/{APP}/broadcasts");
    for (field, expected) in [
        (r#", "ttl_secs": 0"#, Err("bad_request")),
        (r#", "ttl_secs": "60""#, Err("malformed_json")),
        (r#", "rate_per_sec": 0"#, Err("bad_request")),
        (r#", "rate_per_sec": -5"#, Err("bad_request")),
        (r#", "rate_per_sec": "5""#, Err("malformed_json")),
        (r#", "rate_per_sec": 1.5"#, Ok(200)),
        (
            r#", "rate_per_sec": null, "tags": null, "priority": null"#,
            Ok(200),
        ),
        (r#", "tags": "a""#, Err("malformed_json")),
    ] {
        let body = format!(r#"{{"payload": "x"{field}}}"#);
        let (status, reply) = post_json(&server, &broadcasts, &body).await;
        let got = match status {
            200 => Ok(200),
            _ => Err(reply["error"]["code"].as_str().unwrap_or("<none>")),
        };
        if got != expected {
            wrong.push(format!(
                "broadcast {body}: expected {expected:?}, got {status} {reply}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn health_endpoints_answer() {
    let server = Server::start();
    for path in ["/livez", "/readyz", "/healthz"] {
        let response = reqwest::get(server.url(path)).await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("# TYPE herald_connections gauge"),
        "{metrics}"
    );
}

async fn an_expired_or_forged_token_gets_bind_err_and_repeated_failures_close(io: Io) {
    let server = Server::start_on(io);
    let mut client = RawClient::connect(&server.gateway).await;
    client.hello("phone").await;
    client
        .send(Frame::Bind {
            app: APP.to_owned(),
            token: token("alice", -10),
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        })
        .await;
    assert!(matches!(
        client.recv().await,
        Some(Frame::BindErr {
            code: BindErrorCode::TOKEN_EXPIRED,
            ..
        })
    ));
    for _ in 0..2 {
        client
            .send(Frame::Bind {
                app: APP.to_owned(),
                token: "forged.token".to_owned(),
                last_seq: None,
                last_broadcast_seq: None,
                tags: Vec::new(),
            })
            .await;
        assert!(matches!(
            client.recv().await,
            Some(Frame::BindErr {
                code: BindErrorCode::INVALID_TOKEN,
                ..
            })
        ));
    }
    expect_goaway_then_close(&mut client, GoAwayReason::AUTH_FAILED).await;
}

async fn garbage_and_oversized_frames_get_an_error_and_others_are_unharmed(io: Io) {
    let server = Server::start_on(io);
    let mut bystander = RawClient::bound(&server.gateway, "phone", "alice", None).await;

    let mut garbage = RawClient::connect(&server.gateway).await;
    // A valid length prefix around a body with version 9.
    garbage.send_raw(&[0, 0, 0, 3, 9, 1, 0]).await;
    expect_protocol_error(&mut garbage, ErrorCode::UNSUPPORTED_VERSION).await;

    // The bad frame is followed by 16 MiB, more than the socket buffers
    // hold, that the server never parses. The client still gets the ERROR:
    // closing with its input unread would reset the connection, failing
    // the client's write and losing the ERROR.
    let mut burst = RawClient::connect(&server.gateway).await;
    let mut bytes = vec![0, 0, 0, 3, 9, 1, 0];
    bytes.resize(16 << 20, 0xAB);
    burst.send_raw(&bytes).await;
    expect_protocol_error(&mut burst, ErrorCode::UNSUPPORTED_VERSION).await;

    let mut garbage = RawClient::connect(&server.gateway).await;
    garbage.hello("phone").await;
    garbage.send_raw(&[0, 0, 0, 2, 1, 0xEE]).await;
    expect_protocol_error(&mut garbage, ErrorCode::MALFORMED_FRAME).await;

    let mut oversized = RawClient::connect(&server.gateway).await;
    oversized.send_raw(&[0, 0x10, 0, 0, 1, 1]).await;
    expect_protocol_error(&mut oversized, ErrorCode::FRAME_TOO_LARGE).await;

    let mut early = RawClient::connect(&server.gateway).await;
    early.send(Frame::Ping).await;
    expect_protocol_error(&mut early, ErrorCode::UNEXPECTED_FRAME).await;

    server.push("alice", "still here").await;
    assert_eq!(bystander.recv_push().await, (1, "still here".to_owned()));
}

/// GOAWAY with `reason`, then the server closes.
async fn expect_goaway_then_close(client: &mut RawClient, reason: GoAwayReason) {
    assert_eq!(
        client.recv().await,
        Some(Frame::GoAway {
            reason,
            reconnect_delay_ms: None
        })
    );
    assert_eq!(client.recv().await, None);
}

/// ERROR with `code`, then GOAWAY(protocol_error), then the server closes.
async fn expect_protocol_error(client: &mut RawClient, code: ErrorCode) -> String {
    let message = match client.recv().await {
        Some(Frame::Error { code: got, message }) if got == code => message,
        other => panic!("expected ERROR {code}, got {other:?}"),
    };
    expect_goaway_then_close(client, GoAwayReason::PROTOCOL_ERROR).await;
    message
}

async fn a_second_hello_is_refused_naming_the_reason(io: Io) {
    let server = Server::start_on(io);
    let mut client = RawClient::connect(&server.gateway).await;
    client.hello("phone").await;
    client
        .send(Frame::Hello {
            device_id: "phone".to_owned(),
            client_version: "test".to_owned(),
            network: herald_proto::NetworkType::Wifi,
            features: herald_proto::Features::ALL,
        })
        .await;
    let message = expect_protocol_error(&mut client, ErrorCode::UNEXPECTED_FRAME).await;
    assert!(
        message.contains("HELLO was already received"),
        "the ERROR says why: {message}"
    );
}

async fn refused_binds_of_every_kind_count_toward_the_limit(io: Io) {
    let server = Server::start_on(io);
    let mut client = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    // bind_failures_max is 3 in the test config: three already_bound refusals close it.
    for attempt in 1..=3 {
        client
            .send(Frame::Bind {
                app: APP.to_owned(),
                token: token("alice", 3600),
                last_seq: None,
                last_broadcast_seq: None,
                tags: Vec::new(),
            })
            .await;
        loop {
            match client.recv().await {
                Some(Frame::BindErr { code, .. }) => {
                    assert_eq!(code, BindErrorCode::ALREADY_BOUND, "attempt {attempt}");
                    break;
                }
                Some(Frame::Push { .. } | Frame::Broadcast { .. }) => continue,
                other => panic!("attempt {attempt}: expected BIND_ERR, got {other:?}"),
            }
        }
    }
    expect_goaway_then_close(&mut client, GoAwayReason::AUTH_FAILED).await;
}

async fn a_connection_that_never_binds_is_closed_after_the_auth_timeout(io: Io) {
    let server = Server::start_on(io);
    let mut client = RawClient::connect(&server.gateway).await;
    client.hello("phone").await;
    // auth_timeout_secs = 3 in the test config.
    expect_goaway_then_close(&mut client, GoAwayReason::AUTH_TIMEOUT).await;
}

async fn a_silent_client_is_closed_and_a_pinging_one_is_not(io: Io) {
    // 1 s heartbeat: a client silent for 1.5 s is past its deadline.
    let server = Server::start_with_on(1, "", io);
    let mut silent = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    let mut pinging = RawClient::bound(&server.gateway, "laptop", "alice", None).await;
    let started = tokio::time::Instant::now();
    let pinger = tokio::spawn(async move {
        while started.elapsed() < Duration::from_secs(4) {
            pinging.send(Frame::Ping).await;
            assert_eq!(pinging.recv().await, Some(Frame::Pong));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        pinging
    });
    expect_goaway_then_close(&mut silent, GoAwayReason::HEARTBEAT_TIMEOUT).await;
    assert!(started.elapsed() >= Duration::from_millis(1_400));
    let mut pinging = pinger.await.unwrap();
    pinging.send(Frame::Ping).await;
    assert_eq!(
        pinging.recv().await,
        Some(Frame::Pong),
        "the pinging client is still served"
    );
}

async fn a_client_that_never_reads_is_cut_off_at_the_queue_limit(io: Io) {
    let server = Server::start_on(io);
    let mut stream = support::unread_client(&server.gateway, "flood", None).await;
    // Each 60 KB of PINGs asks for 60 KB of PONGs that are never read;
    // the server must cut the client at 256 KiB queued, not buffer on.
    let cut_off = support::ping_until_cut_off(&mut stream).await;
    assert!(
        cut_off,
        "the server kept reading from a client that never reads"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("herald_connections_closed_total{reason=\"slow_consumer\"} 1"),
        "{metrics}"
    );
}

on_both_drivers!(
    an_expired_or_forged_token_gets_bind_err_and_repeated_failures_close,
    garbage_and_oversized_frames_get_an_error_and_others_are_unharmed,
    a_connection_that_never_binds_is_closed_after_the_auth_timeout,
    a_second_hello_is_refused_naming_the_reason,
    refused_binds_of_every_kind_count_toward_the_limit,
    a_silent_client_is_closed_and_a_pinging_one_is_not,
    a_client_that_never_reads_is_cut_off_at_the_queue_limit,
);

/// Runs `herald config check` on `text`: (success, stdout, stderr).
fn config_check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, text).unwrap();
    let output = std::process::Command::new(support::herald_bin())
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn config_check_lists_every_problem_or_shows_the_config_masked_and_its_budget() {
    let (ok, _, stderr) = config_check(
        "[admin]\napi_key = \"short\"\n[gateway]\ninflight_pushes_max = 0\n\
         [[apps]]\nid = \"bad id\"\napi_key = \"k\"\ntoken_secret = \"0123456789abcdef\"\n",
    );
    assert!(!ok);
    for problem in [
        "4 problem(s)",
        "[admin] api_key must be at least 32",
        "app id \"bad id\" must be",
        "api_key must be at least 16",
        "gateway.inflight_pushes_max must be at least 1",
    ] {
        assert!(
            stderr.contains(problem),
            "{problem} missing from:\n{stderr}"
        );
    }
    let (ok, _, stderr) = config_check("[gateway]\nno_such_key = 1\n");
    assert!(!ok && stderr.contains("no_such_key"), "{stderr}");

    // Valid, on a connection limit this host's open-file limit can serve.
    let (ok, stdout, stderr) = config_check(
        "[gateway]\nshards = 1\nconnections_per_shard_max = 100\n\
         [cluster]\ndatabase_url = \"mysql://root:hunter2@127.0.0.1:3306/test\"\n\
         redis_url = \"redis://127.0.0.1:6379\"\n\
         [[apps]]\nid = \"chat\"\napi_key = \"app-key-0123456789\"\n\
         token_secret = \"token-secret-0123456789\"\n",
    );
    assert!(ok, "{stdout}\n{stderr}");
    for shown in [
        "valid",
        "id = \"chat\"",
        "mysql://root:********@127.0.0.1:3306/test",
        "connections: 1 shards x 100 = 100",
        "open files (hard limit, ulimit -Hn)",
    ] {
        assert!(stdout.contains(shown), "{shown} missing from:\n{stdout}");
    }
    for secret in ["hunter2", "app-key-0123456789", "token-secret-0123456789"] {
        assert!(!stdout.contains(secret), "{secret} shown:\n{stdout}");
    }

    // More connections than any host's open files (fs.nr_open is at most
    // 2^30): named, exit 1.
    let (ok, _, stderr) = config_check(
        "[gateway]\nshards = 1\nconnections_per_shard_max = 2000000000\n\
         [[apps]]\nid = \"chat\"\napi_key = \"app-key-0123456789\"\n\
         token_secret = \"token-secret-0123456789\"\n",
    );
    assert!(
        !ok && stderr.contains("cannot serve the configured connections"),
        "{stderr}"
    );
}
