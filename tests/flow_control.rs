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
    // Two shards with one token each, refilling at one a second each.
    assert!((2..=4).contains(&welcomed), "{welcomed} welcomed");
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
