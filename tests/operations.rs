//! What an operator reads, on the real `herald` binary on loopback: the
//! per-app counters and latency histograms of `/metrics`, and an app's
//! `/v1/apps/{app}/stats`.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{API_KEY, APP, RawClient, Server};

/// The value of the series `series` (name and labels as printed).
fn series(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn stats(server: &Server) -> Value {
    let (status, stats) = server.get(&format!("/v1/apps/{APP}/stats"), API_KEY).await;
    assert_eq!(status, 200, "{stats}");
    stats
}

/// Waits until the app's stats show `field` at `value`: sessions are
/// registered and acks written asynchronously.
async fn wait_for_stat(server: &Server, field: &str, value: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = stats(server).await;
        if stats[field] == value {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{field} never reached {value}: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two devices of alice and one of bob bind; three pushes reach alice's
/// phone, which acks two. Every per-app counter and histogram counts what
/// happened, and the stats say who is online and what is still unacked.
#[tokio::test]
async fn metrics_and_stats_count_each_apps_binds_pushes_writes_and_acks() {
    let server = Server::start();
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    let _laptop = RawClient::bound(&server.gateway, "laptop", "alice", None).await;
    let _bob = RawClient::bound(&server.gateway, "phone", "bob", None).await;
    let stats = wait_for_stat(&server, "online_connections", 3).await;
    assert_eq!(stats["online_users"], 2, "{stats}");
    assert_eq!(stats["messages_stored"], 0, "{stats}");

    // Each bind's first fill (empty) is read before the pushes, so none of
    // them is also handed out as catch-up.
    server.wait_for_metric("herald_fills_total", 3).await;
    let payloads = ["one", "two", "three!"];
    for payload in payloads {
        server.push("alice", payload).await;
    }
    for seq in 1..=3 {
        assert_eq!(phone.recv_push().await.0, seq);
    }
    phone.ack(2).await;
    server.wait_for_metric("herald_acks_saved_total", 1).await;
    // Alice's phone holds two of her three; nothing else was pushed.
    let stats = wait_for_stat(&server, "messages_pending", 1).await;
    assert_eq!(stats["messages_stored"], 3, "{stats}");
    assert_eq!(stats["broadcasts_unexpired"], 0, "{stats}");

    let metrics = server.metrics().await;
    let app = |name: &str| series(&metrics, &format!("{name}{{app=\"{APP}\"}}"));
    assert_eq!(app("herald_binds_total"), Some(3.0), "{metrics}");
    assert_eq!(app("herald_messages_stored_total"), Some(3.0), "{metrics}");
    // Each push went to alice's two connections.
    assert_eq!(app("herald_deliveries_total"), Some(6.0), "{metrics}");
    let bytes: usize = payloads.iter().map(|p| 2 * p.len()).sum();
    assert_eq!(
        app("herald_payload_bytes_out_total"),
        Some(bytes as f64),
        "{metrics}"
    );
    assert_eq!(app("herald_acks_received_total"), Some(1.0), "{metrics}");
    assert_eq!(
        app("herald_push_store_seconds_count"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        app("herald_push_write_seconds_count"),
        Some(6.0),
        "{metrics}"
    );
    // One ack settled the phone's first two messages; the laptop acked none.
    assert_eq!(app("herald_push_ack_seconds_count"), Some(2.0), "{metrics}");
    assert!(
        app("herald_push_ack_seconds_sum").is_some_and(|sum| sum > 0.0),
        "{metrics}"
    );
    let shard_connections: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("herald_shard_connections{shard="))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(shard_connections, 3.0, "{metrics}");
    assert!(
        series(&metrics, "herald_shard_turn_seconds_count{shard=\"0\"}")
            .is_some_and(|turns| turns > 0.0),
        "{metrics}"
    );
    // No user, device or connection ever becomes a label.
    for private in ["alice", "bob", "phone", "laptop"] {
        assert!(!metrics.contains(private), "{private} in {metrics}");
    }
}

/// A broadcast counts for the app and shows in its stats until it expires.
#[tokio::test]
async fn a_broadcast_counts_and_shows_in_the_stats() {
    let server = Server::start();
    let _phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    wait_for_stat(&server, "online_connections", 1).await;
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            r#"{"payload": "to everyone", "ttl_secs": 60}"#.to_owned(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    wait_for_stat(&server, "broadcasts_unexpired", 1).await;
    // Its fan-out to the one connection finishes, and it stays unexpired.
    let stats = wait_for_stat(&server, "broadcasts_in_progress", 0).await;
    assert_eq!(stats["broadcasts_unexpired"], 1, "{stats}");
    let metrics = server.metrics().await;
    assert_eq!(
        series(
            &metrics,
            &format!("herald_broadcasts_total{{app=\"{APP}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// The stats are the app's own: they need its key, like its other routes.
#[tokio::test]
async fn stats_need_the_apps_key() {
    let server = Server::start();
    let path = format!("/v1/apps/{APP}/stats");
    let (status, reply) = server.get(&path, "not-the-key").await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (403, &"forbidden".into())
    );
    let (status, reply) = server.get("/v1/apps/nope/stats", API_KEY).await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (404, &"unknown_app".into())
    );
    let reply = reqwest::get(server.url(&path)).await.unwrap();
    assert_eq!(reply.status().as_u16(), 401);
}

/// The next line of the JSON log that `wanted` accepts.
fn next_log_line(server: &Server, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = server
            .stdout
            .recv_timeout(left)
            .expect("the wanted log line never came");
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if wanted(&event) {
            return event;
        }
    }
}

async fn push_status(server: &Server, user: &str, request_id: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(server.url(&format!("/v1/apps/{APP}/users/{user}/messages")))
        .bearer_auth(API_KEY)
        .body(r#"{"payload": "x"}"#);
    if let Some(id) = request_id {
        request = request.header("x-request-id", id);
    }
    let response = request.send().await.unwrap();
    let echoed = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    (response.status().as_u16(), echoed)
}

/// With `log.format = "json"` every line is a JSON object; an API call's
/// lines carry its request id (the caller's, echoed back, or a new one),
/// down to handing the message to the shard. SIGHUP reads the file again:
/// a new log filter and app rate apply at once, and the log says what was
/// reloaded and what waits for a restart.
#[tokio::test]
async fn json_logs_carry_request_ids_and_sighup_reloads_level_and_rates() {
    let level = |filter: &str| format!("[log]\nformat = \"json\"\nlevel = \"{filter}\"\n");
    let tight = "push_rate = { per_sec = 1, burst = 1 }";
    let with_rate = |text: String, rate: &str| {
        text.replacen(
            &format!("token_secret = \"{}\"\n", support::TOKEN_SECRET),
            &format!("token_secret = \"{}\"\n{rate}\n", support::TOKEN_SECRET),
            1,
        )
    };
    let server = Server::start_with_edited_config(|text| {
        let text = with_rate(text, tight);
        format!("{text}{}", level("warn,herald_control::delivery=debug"))
    });

    let (status, echoed) = push_status(&server, "alice", Some("req-42")).await;
    assert_eq!((status, echoed.as_str()), (200, "req-42"));
    let stored = next_log_line(&server, |event| event["fields"]["message"] == "stored");
    assert_eq!(stored["span"]["request_id"], "req-42", "{stored}");
    assert_eq!(stored["level"], "DEBUG", "{stored}");
    // The rate allows one push a second: the next is refused.
    let (status, generated) = push_status(&server, "alice", Some("bad id!")).await;
    assert_eq!(status, 429);
    assert_eq!(
        generated.len(),
        16,
        "a new id, not the caller's: {generated}"
    );

    // Loosen the rate, log at info, and change what needs a restart.
    let path = server.config_path.clone().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .replace(tight, "push_rate = { per_sec = 1000, burst = 1000 }")
        .replace("warn,herald_control::delivery=debug", "info")
        .replace("payload_bytes_max = 1024", "payload_bytes_max = 2048");
    std::fs::write(&path, text).unwrap();
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let reloaded = next_log_line(&server, |event| {
        event["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("SIGHUP"))
    });
    let fields = &reloaded["fields"];
    assert_eq!(
        fields["reloaded"], "log level \"info\", 2 [[apps]]",
        "{reloaded}"
    );
    assert_eq!(fields["needs_restart"], "api", "{reloaded}");
    for _ in 0..5 {
        assert_eq!(push_status(&server, "alice", None).await.0, 200);
    }

    // A file with a problem changes nothing, and the log says why.
    std::fs::write(&path, "[log]\nlevel = \"info\"\nformat = \"xml\"\n").unwrap();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let refused = next_log_line(&server, |event| event["level"] == "WARN");
    assert!(
        refused["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("not applied")),
        "{refused}"
    );
    assert_eq!(push_status(&server, "alice", None).await.0, 200);
}
