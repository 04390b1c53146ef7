//! Flow control end to end: an app's push and broadcast budgets answer 429
//! with Retry-After once used up, and refill at their rate.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{API_KEY, APP, Server};

async fn post(server: &Server, path: &str, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url(path))
        .bearer_auth(API_KEY)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn over_its_budget_an_app_gets_429_with_retry_after_and_nothing_is_stored() {
    let server = Server::start_with_app_settings(
        "push_rate = { per_sec = 2, burst = 3 }\nbroadcast_rate = { per_sec = 0.5, burst = 1 }",
    );
    let push = format!("/v1/apps/{APP}/users/alice/messages");
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let response = post(&server, &push, json!({"payload": "x"})).await;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        seqs.push(body["seq"].as_u64().unwrap());
    }
    let refused = post(&server, &push, json!({"payload": "x"})).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        retry_after, 1,
        "one token at 2/s is half a second away, rounded up"
    );
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    // A multicast counts each user: it goes through on the next token and
    // leaves the bucket in debt for its size.
    tokio::time::sleep(Duration::from_millis(550)).await;
    let multicast = post(
        &server,
        &format!("/v1/apps/{APP}/messages"),
        json!({"users": ["bob", "carol", "dave", "erin"], "payload": "x"}),
    )
    .await;
    assert_eq!(multicast.status(), 200);
    let refused = post(&server, &push, json!({"payload": "x"})).await;
    assert_eq!(refused.status(), 429);
    assert!(
        refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 2
    );

    // Broadcasts have their own budget: one, then one every 2 s.
    let broadcasts = format!("/v1/apps/{APP}/broadcasts");
    assert_eq!(
        post(&server, &broadcasts, json!({"payload": "b"}))
            .await
            .status(),
        200
    );
    let started = Instant::now();
    let refused = post(&server, &broadcasts, json!({"payload": "b"})).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "2");
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
    assert_eq!(
        post(&server, &broadcasts, json!({"payload": "b"}))
            .await
            .status(),
        200
    );

    // What was refused was not stored: alice's inbox holds the first three.
    let (_, inbox) = server.get(&push, API_KEY).await;
    let stored: Vec<u64> = inbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(stored, seqs);
}

#[tokio::test]
async fn a_rate_that_admits_nothing_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), 60, "");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        &format!("token_secret = \"{}\"\n", support::TOKEN_SECRET),
        &format!(
            "token_secret = \"{}\"\npush_rate = {{ per_sec = 0, burst = 5 }}\n",
            support::TOKEN_SECRET
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let output = std::process::Command::new(support::herald_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("push_rate needs per_sec above 0"),
        "{stderr}"
    );
}

#[tokio::test]
async fn past_its_accept_rate_the_gateway_turns_connections_away_with_a_retry_delay() {
    use herald_proto::{Frame, GoAwayReason};
    let server = Server::start_with_edited_config(|text| {
        text.replace(
            "[gateway]\n",
            "[gateway]\naccept_rate = { per_sec = 2, burst = 2 }\n",
        )
    });
    let (mut welcomed, mut delays) = (0, Vec::new());
    for _ in 0..12 {
        let mut client = support::RawClient::connect(&server.gateway).await;
        client
            .send(Frame::Hello {
                device_id: "storm".to_owned(),
                client_version: "test".to_owned(),
                network: herald_proto::NetworkType::Wifi,
                features: herald_proto::Features::ALL,
            })
            .await;
        match client.recv().await {
            Some(Frame::HelloOk { .. }) => welcomed += 1,
            Some(Frame::GoAway {
                reason,
                reconnect_delay_ms: Some(delay),
            }) if reason == GoAwayReason::OVERLOADED => delays.push(delay),
            other => panic!("expected HELLO_OK or GOAWAY(overloaded), got {other:?}"),
        }
    }
    // Two shards with one token each, refilling at one a second each (a
    // shard the port's hash sends nobody to welcomes nobody).
    assert!((1..=4).contains(&welcomed), "{welcomed} welcomed");
    assert_eq!(welcomed + delays.len(), 12);
    assert!(
        delays.iter().all(|&d| (1_000..=60_000).contains(&d)),
        "{delays:?}"
    );
    let distinct: std::collections::HashSet<_> = delays.iter().collect();
    assert!(distinct.len() > 1, "retry delays are jittered: {delays:?}");
    support::cluster::eventually("turned-away connections are counted", || async {
        !server
            .metrics()
            .await
            .contains("herald_connections_closed_total{reason=\"overloaded\"} 0")
    })
    .await;
}

/// A business server's webhook: records each call's arrival time and JSON
/// body; answers 400 (final, no retry) to upstream data that says "reject".
async fn webhook() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(Instant, serde_json::Value)>>>,
) {
    use axum::routing::post;
    let calls: std::sync::Arc<std::sync::Mutex<Vec<(Instant, serde_json::Value)>>> =
        Default::default();
    let recorded = calls.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let recorded = recorded.clone();
            async move {
                let reject = body["payload_base64"] == "cmVqZWN0"; // "reject"
                recorded.lock().unwrap().push((Instant::now(), body));
                if reject {
                    axum::http::StatusCode::BAD_REQUEST
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

#[tokio::test]
async fn upstream_and_user_state_reach_the_webhook_at_the_apps_pace() {
    use herald_proto::{Frame, UpstreamStatus};
    const UPSTREAMS: u64 = 20;
    let (url, calls) = webhook().await;
    let server = Server::start_with_app_settings(&format!(
        "webhook_url = \"{url}\"\nwebhook_secret = \"{}\"\n\
         webhook_rate = {{ per_sec = 10, burst = 1 }}",
        "w".repeat(32)
    ));
    let mut client = support::RawClient::bound(&server.gateway, "phone", "ann", None).await;
    for request_id in 1..=UPSTREAMS {
        let payload: &[u8] = if request_id == UPSTREAMS {
            b"reject"
        } else {
            b"data"
        };
        client
            .send(Frame::Upstream {
                app: APP.to_owned(),
                request_id,
                route: None,
                payload: bytes::Bytes::copy_from_slice(payload),
            })
            .await;
    }
    let mut statuses = std::collections::BTreeMap::new();
    while statuses.len() < UPSTREAMS as usize {
        match client.recv().await {
            Some(Frame::UpstreamAck {
                request_id, status, ..
            }) => {
                statuses.insert(request_id, status);
            }
            other => panic!("expected UPSTREAM_ACK, got {other:?}"),
        }
    }
    assert!(
        statuses
            .range(..UPSTREAMS)
            .all(|(_, s)| *s == UpstreamStatus::ACCEPTED),
        "{statuses:?}"
    );
    assert_eq!(statuses[&UPSTREAMS], UpstreamStatus::REJECTED);

    drop(client);
    support::cluster::eventually("the offline event arrives", || async {
        calls
            .lock()
            .unwrap()
            .iter()
            .any(|(_, body)| body["kind"] == "offline")
    })
    .await;
    let calls = calls.lock().unwrap();
    let kinds: Vec<&str> = calls
        .iter()
        .map(|(_, b)| b["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "online");
    assert_eq!(calls[0].1["device_id"], "phone");
    assert_eq!(
        kinds.iter().filter(|k| **k == "upstream").count(),
        UPSTREAMS as usize
    );
    let upstream = calls.iter().find(|(_, b)| b["kind"] == "upstream").unwrap();
    assert_eq!(
        (
            upstream.1["user"].as_str(),
            upstream.1["request_id"].as_u64()
        ),
        (Some("ann"), Some(1))
    );
    // 22 calls at 10 a second with a burst of 1: paced over about 2.1 s.
    let spread = calls.last().unwrap().0 - calls[0].0;
    println!("{} webhook calls spread over {spread:?}", calls.len());
    assert!(spread >= Duration::from_millis(1_800), "{spread:?}");
}

#[tokio::test]
async fn a_client_with_too_many_frames_waiting_is_cut_off_however_small_they_are() {
    // A byte limit no client reaches here: only the frame limit can act.
    let server = Server::start_with_edited_config(|text| {
        text.replace(
            "[gateway]\n",
            "[gateway]\nsend_queue_bytes_max = 67108864\nsend_queue_frames_max = 512\n",
        )
    });
    let mut stream = support::unread_client(&server.gateway, "pinger", None).await;
    // Each PING asks for a 6-byte PONG that is never read.
    let cut_off = support::ping_until_cut_off(&mut stream).await;
    assert!(cut_off, "the server queued frames without bound");
    support::cluster::eventually("the cut-off is counted as a slow consumer", || async {
        server
            .metrics()
            .await
            .contains("herald_connections_closed_total{reason=\"slow_consumer\"} 1")
    })
    .await;
}
