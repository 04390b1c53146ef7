//! Bad input gets the documented error, and the server keeps serving
//! everyone else. Also heartbeats: silent clients are cut, pinging ones not.

mod support;

use std::time::Duration;

use herald_proto::{BindErrorCode, ErrorCode, Frame, GoAwayReason};
use support::{API_KEY, APP, Io, OTHER_API_KEY, RawClient, Server, token};

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
    assert_eq!(
        client.recv().await,
        Some(Frame::GoAway {
            reason: GoAwayReason::AUTH_FAILED,
            reconnect_delay_ms: None
        })
    );
    assert_eq!(client.recv().await, None);
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

/// ERROR with `code`, then GOAWAY(protocol_error), then the server closes.
async fn expect_protocol_error(client: &mut RawClient, code: ErrorCode) -> String {
    let message = match client.recv().await {
        Some(Frame::Error { code: got, message }) if got == code => message,
        other => panic!("expected ERROR {code}, got {other:?}"),
    };
    assert_eq!(
        client.recv().await,
        Some(Frame::GoAway {
            reason: GoAwayReason::PROTOCOL_ERROR,
            reconnect_delay_ms: None
        })
    );
    assert_eq!(client.recv().await, None);
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
    assert_eq!(
        client.recv().await,
        Some(Frame::GoAway {
            reason: GoAwayReason::AUTH_FAILED,
            reconnect_delay_ms: None
        })
    );
    assert_eq!(client.recv().await, None);
}

async fn a_connection_that_never_binds_is_closed_after_the_auth_timeout(io: Io) {
    let server = Server::start_on(io);
    let mut client = RawClient::connect(&server.gateway).await;
    client.hello("phone").await;
    // auth_timeout_secs = 3 in the test config.
    assert_eq!(
        client.recv().await,
        Some(Frame::GoAway {
            reason: GoAwayReason::AUTH_TIMEOUT,
            reconnect_delay_ms: None
        })
    );
    assert_eq!(client.recv().await, None);
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
    assert_eq!(
        silent.recv().await,
        Some(Frame::GoAway {
            reason: GoAwayReason::HEARTBEAT_TIMEOUT,
            reconnect_delay_ms: None
        })
    );
    assert_eq!(silent.recv().await, None);
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
