//! The Rust SDK and `herald listen` against the real server.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use herald_client::{AckMode, Client, ClientOptions, Event, Terminal};
use herald_proto::{BindErrorCode, UpstreamStatus};
use support::{API_KEY, APP, Server, WAIT, herald_bin, sdk_options, token};

fn options(server: &Server, token: String, ack_mode: AckMode) -> ClientOptions {
    ClientOptions {
        ack_mode,
        ..sdk_options(&server.gateway, token)
    }
}

async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("timed out waiting for an event")
        .expect("client stopped")
}

/// Skips connection-state events up to the next push.
async fn next_push(client: &mut Client) -> (u64, String) {
    tokio::time::timeout(WAIT, next_push_inner(client))
        .await
        .expect("timed out waiting for a push")
}

async fn next_push_inner(client: &mut Client) -> (u64, String) {
    loop {
        match next(client).await {
            Event::Push(push) => {
                return (push.seq, String::from_utf8(push.payload.to_vec()).unwrap());
            }
            Event::Closed(why) => panic!("closed: {why}"),
            _ => {}
        }
    }
}

async fn wait_bound(client: &mut Client) {
    loop {
        match next(client).await {
            Event::Bound { .. } => return,
            Event::Closed(why) => panic!("closed: {why}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn sdk_receives_acks_and_resumes_after_a_server_restart() {
    let server = Server::start();
    let mut client = Client::start(options(&server, token("alice", 3600), AckMode::Manual));
    wait_bound(&mut client).await;
    server.push("alice", "one").await;
    assert_eq!(next_push(&mut client).await, (1, "one".to_owned()));
    client.ack(APP, 1).await.unwrap();
    // A round trip through the driver: the ack before it was applied.
    let request_id = client
        .upstream(APP, Bytes::from_static(b"ping"))
        .await
        .unwrap();
    loop {
        if let Event::UpstreamAck {
            request_id: id,
            status,
            ..
        } = next(&mut client).await
        {
            assert_eq!(id, request_id);
            assert_eq!(status, UpstreamStatus::NO_ENDPOINT);
            break;
        }
    }

    let server = server.kill_and_restart();
    server.push("alice", "two").await;
    // Reconnected by itself, resumed after the acked 1: only 2 arrives.
    assert_eq!(next_push(&mut client).await, (2, "two".to_owned()));
    client.close().await;
}

#[tokio::test]
async fn sdk_auto_ack_acks_after_the_handler() {
    let server = Server::start();
    for text in ["a", "b"] {
        server.push("bob", text).await;
    }
    let mut client = Client::start(options(&server, token("bob", 3600), AckMode::Auto));
    assert_eq!(next_push(&mut client).await.0, 1);
    assert_eq!(next_push(&mut client).await.0, 2);
    // Calling next_event again acks 2; a new device session sees nothing old.
    let _ = tokio::time::timeout(Duration::from_millis(300), client.next_event()).await;
    client.close().await;
    let mut again = Client::start(options(&server, token("bob", 3600), AckMode::Auto));
    wait_bound(&mut again).await;
    server.push("bob", "c").await;
    assert_eq!(next_push(&mut again).await, (3, "c".to_owned()));
}

#[tokio::test]
async fn sdk_stops_when_every_bind_fails() {
    let server = Server::start();
    let mut client = Client::start(options(&server, token("carol", -5), AckMode::Auto));
    loop {
        match next(&mut client).await {
            Event::Closed(Terminal::AuthFailed { code, .. }) => {
                assert_eq!(code, BindErrorCode::TOKEN_EXPIRED);
                break;
            }
            Event::Closed(other) => panic!("unexpected terminal {other}"),
            _ => {}
        }
    }
    assert_eq!(client.next_event().await, None);
}

#[tokio::test]
async fn listen_prints_pushes_as_json_lines_and_exits_nonzero_when_kicked() {
    let server = Server::start();
    let mut listen = Command::new(herald_bin())
        .args(["listen", "--gateway", &server.gateway, "--app", APP])
        .args(["--user", "dave", "--token", &token("dave", 3600)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(listen.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(listen.stderr.take().unwrap()).lines();
    // The listener says when it is bound.
    loop {
        let line = stderr.next().expect("listen exited early").unwrap();
        if line.contains("bound app") {
            break;
        }
    }
    // Reads the next line off the blocking pipe, handing the reader back.
    let next_line = |mut lines: std::io::Lines<BufReader<std::process::ChildStdout>>| {
        tokio::task::spawn_blocking(move || (lines.next().unwrap().unwrap(), lines))
    };
    let reply = server.push("dave", "hello dave").await;
    let (line, lines) = next_line(lines).await.unwrap();
    let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(printed["app"], APP);
    assert_eq!(printed["seq"], 1);
    assert_eq!(printed["payload"], "hello dave");
    assert_eq!(printed["message_id"], reply["message_id"]);
    assert_eq!(printed["kind"], "push");

    let (status, _) = server
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            serde_json::json!({"payload": "to all"}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    let (line, _) = next_line(lines).await.unwrap();
    let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (&printed["kind"], &printed["seq"], &printed["payload"]),
        (
            &serde_json::json!("broadcast"),
            &serde_json::json!(1),
            &serde_json::json!("to all")
        )
    );

    let (status, _) = server
        .post(
            &format!("/v1/apps/{APP}/users/dave/kick"),
            API_KEY,
            String::new(),
        )
        .await;
    assert_eq!(status, 200);
    let status = tokio::task::spawn_blocking(move || listen.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success());
    let said: Vec<String> = stderr.map_while(Result::ok).collect();
    assert!(said.iter().any(|l| l.contains("kicked")), "{said:?}");
}

#[test]
fn listen_needs_a_gateway_or_a_dispatcher() {
    let output = Command::new(herald_bin())
        .args(["listen", "--app", APP, "--user", "dave", "--token", "t"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("--gateway") && said.contains("--dispatch"),
        "{said}"
    );
}

/// The README quick start: serve with no config, mint a token with the CLI,
/// push with the printed API key, receive.
#[tokio::test]
async fn the_demo_quick_start_works_with_cli_tokens() {
    let server = Server::start_demo();
    let api_key = server
        .demo_api_key
        .clone()
        .expect("serve printed the API key");
    let output = Command::new(herald_bin())
        .args(["token", "--data-dir"])
        .arg(&server.data_dir)
        .args(["--app", "demo", "--user", "alice", "--ttl-secs", "600"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let demo_token = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let mut options = options(&server, demo_token, AckMode::Auto);
    options.apps[0].app = "demo".to_owned();
    let mut client = Client::start(options);
    wait_bound(&mut client).await;
    let (status, reply) = server
        .post(
            "/v1/apps/demo/users/alice/messages",
            &api_key,
            r#"{"payload": "hello alice"}"#.to_owned(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(next_push(&mut client).await, (1, "hello alice".to_owned()));

    // A token for an app the data dir does not have is refused clearly.
    let output = Command::new(herald_bin())
        .args(["token", "--data-dir"])
        .arg(&server.data_dir)
        .args(["--app", "other", "--user", "alice"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("demo"));
}

#[tokio::test]
async fn token_from_a_config_file_binds() {
    let server = Server::start();
    let output = Command::new(herald_bin())
        .args(["token", "--config"])
        .arg(server.config_path.as_ref().unwrap())
        .args(["--app", APP, "--user", "zed"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let cli_token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let mut client = Client::start(options(&server, cli_token, AckMode::Auto));
    match next(&mut client).await {
        Event::Connected {
            gateway,
            heartbeat_interval,
        } => {
            assert_eq!(gateway, server.gateway);
            // 60 s for every network in the test config.
            assert_eq!(heartbeat_interval, Duration::from_secs(60));
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    assert_eq!(
        next(&mut client).await,
        Event::Bound {
            app: APP.to_owned(),
            user: "zed".to_owned()
        }
    );
}

/// `herald token` takes the user ids the API takes, and says why not.
#[test]
fn token_refuses_a_user_id_the_api_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), 60, "");
    for user in ["a\nb", "", &"u".repeat(129)] {
        let output = Command::new(herald_bin())
            .args(["token", "--config"])
            .arg(&config)
            .args(["--app", APP, "--user", user])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{user:?}");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains("a user id must"), "{user:?}: {said}");
    }
    let output = Command::new(herald_bin())
        .args(["token", "--config"])
        .arg(&config)
        .args(["--app", APP, "--user", "élodie/ü 用户"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}
