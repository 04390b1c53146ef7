//! Webhooks a business server can trust, against the real server: every
//! call signed and checked by the receiver, routes (named, default,
//! unknown), HTTPS to a private CA, retries and their deadline, receivers
//! that are down, silent or failing, and one app's dead webhook beside
//! another app's live one.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use herald_client::{Client, Event};
use herald_proto::{Frame, TokenClaims, UpstreamStatus, sign_token};
use support::webhook::{Answer, Received, Receiver, tls_with_private_ca};
use support::{
    APP, OTHER_APP, OTHER_TOKEN_SECRET, RawClient, Server, TOKEN_SECRET, WAIT, herald_bin,
    sdk_options, token,
};

const SECRET: &str = "webhook-secret-0123456789abcdef-0123";

/// Short enough that a test waits out a deadline in a few seconds.
const FAST_DEADLINES: &str =
    "timeout_secs = 1\nupstream_deadline_secs = 2\nretry_deadline_secs = 3";

/// `herald serve` with `[webhooks]` lines `section`, the test app's
/// `webhooks` routes `routes` (a TOML array) and the other app's `other`
/// lines.
fn server(section: &str, routes: &str, other: &str) -> Server {
    let anchor = format!("token_secret = \"{TOKEN_SECRET}\"\n");
    let other_anchor = format!("token_secret = \"{OTHER_TOKEN_SECRET}\"\n");
    Server::start_with_edited_config(|text| {
        text.replacen(
            "[gateway]\n",
            &format!("[webhooks]\n{section}\n[gateway]\n"),
            1,
        )
        .replacen(
            &anchor,
            &format!("{anchor}webhooks = {routes}\nwebhook_secret = \"{SECRET}\"\n"),
            1,
        )
        .replacen(&other_anchor, &format!("{other_anchor}{other}\n"), 1)
    })
}

/// A route as a TOML inline table.
fn route(name: &str, url: &str, events: &[&str]) -> String {
    let events: Vec<String> = events.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "{{ route = \"{name}\", url = \"{url}\", events = [{}] }}",
        events.join(", ")
    )
}

fn upstream(request_id: u64, route: Option<&str>, payload: &'static str) -> Frame {
    Frame::Upstream {
        app: APP.to_owned(),
        request_id,
        route: route.map(str::to_owned),
        payload: Bytes::from_static(payload.as_bytes()),
    }
}

/// Reads UPSTREAM_ACKs until `count` have come: status and arrival, by
/// request id.
async fn acks(client: &mut RawClient, count: usize) -> BTreeMap<u64, (UpstreamStatus, Instant)> {
    let mut acks = BTreeMap::new();
    while acks.len() < count {
        match client.recv().await {
            Some(Frame::UpstreamAck {
                request_id, status, ..
            }) => {
                acks.insert(request_id, (status, Instant::now()));
            }
            other => panic!("expected UPSTREAM_ACK, got {other:?}"),
        }
    }
    acks
}

fn statuses(acks: &BTreeMap<u64, (UpstreamStatus, Instant)>) -> BTreeMap<u64, &'static str> {
    acks.iter()
        .map(|(id, (status, _))| (*id, status.name()))
        .collect()
}

/// The request id of an upstream call's body.
fn request_id(call: &Received) -> u64 {
    call.body["request_id"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn upstream_goes_to_its_route_or_the_default_and_state_events_to_their_routes() {
    // The first online/offline call fails: state events are retried too.
    let presence_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = presence_failed.clone();
    let receiver = Receiver::start(SECRET, move |call, _| {
        let first = call.path == "/presence" && !failed.swap(true, Ordering::SeqCst);
        Answer::Status(if first { 503 } else { 200 })
    })
    .await;
    let base = &receiver.base;
    let routes = format!(
        "[{}, {}, {}]",
        route(
            "presence",
            &format!("{base}/presence"),
            &["online", "offline"]
        ),
        route("main", &format!("{base}/main"), &["upstream"]),
        route("orders", &format!("{base}/orders"), &["upstream"]),
    );
    let server = server("", &routes, "");
    let mut client = RawClient::bound(&server.gateway, "phone", "ann", None).await;
    client.send(upstream(1, None, "default")).await;
    client.send(upstream(2, Some("orders"), "named")).await;
    client
        .send(upstream(3, Some("presence"), "not for upstream"))
        .await;
    client.send(upstream(4, Some("nope"), "unknown")).await;
    let acks = acks(&mut client, 4).await;
    assert_eq!(
        statuses(&acks),
        BTreeMap::from([
            (1, "accepted"),
            (2, "accepted"),
            (3, "unknown_route"),
            (4, "unknown_route")
        ])
    );

    // The Rust SDK names a route too.
    let mut sdk = Client::start(sdk_options(&server.gateway, token("bob", 3600)));
    let sent = loop {
        match tokio::time::timeout(WAIT, sdk.next_event()).await.unwrap() {
            Some(Event::Bound { .. }) => {
                break sdk
                    .upstream_to_route(APP, "orders", Bytes::from_static(b"sdk"))
                    .await
                    .unwrap();
            }
            Some(Event::Closed(why)) => panic!("closed: {why}"),
            _ => {}
        }
    };
    loop {
        match tokio::time::timeout(WAIT, sdk.next_event()).await.unwrap() {
            Some(Event::UpstreamAck {
                request_id, status, ..
            }) => {
                assert_eq!((request_id, status), (sent, UpstreamStatus::ACCEPTED));
                break;
            }
            Some(Event::Closed(why)) => panic!("closed: {why}"),
            _ => {}
        }
    }
    sdk.close().await;

    drop(client);
    let ann_calls = |event: &'static str| {
        let receiver = receiver.clone();
        move || {
            receiver
                .calls()
                .iter()
                .filter(|call| call.event == event && call.body["user"] == "ann")
                .count()
        }
    };
    let (online_calls, offline_calls) = (ann_calls("online"), ann_calls("offline"));
    support::cluster::eventually("ann's offline event arrives", || async {
        offline_calls() == 1
    })
    .await;
    support::cluster::eventually("ann's online event, refused once, is retried", || async {
        online_calls() >= 2
    })
    .await;
    assert_eq!(
        online_calls(),
        2,
        "retried until it was accepted, then not again"
    );
    receiver.assert_all_signed();
    let calls = receiver.calls();
    let mut seen: Vec<(&str, &str, &str, u64)> = calls
        .iter()
        .filter(|call| call.body["user"] == "ann")
        .map(|call| {
            (
                call.path.as_str(),
                call.route.as_str(),
                call.event.as_str(),
                request_id(call),
            )
        })
        .collect();
    seen.sort();
    seen.dedup();
    for expected in [
        ("/presence", "presence", "online", 0),
        ("/main", "main", "upstream", 1),
        ("/orders", "orders", "upstream", 2),
        ("/presence", "presence", "offline", 0),
    ] {
        assert!(seen.contains(&expected), "{expected:?} not in {seen:?}");
    }
    assert_eq!(seen.len(), 4, "nothing else: {seen:?}");
    assert!(
        calls
            .iter()
            .any(|call| call.body["user"] == "bob" && call.path == "/orders"),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_receiver_with_another_secret_sees_signatures_that_do_not_verify() {
    let receiver = Receiver::start("not-the-secret-the-app-signs-with", |_, _| {
        Answer::Status(200)
    })
    .await;
    let routes = format!("[{}]", route("main", &receiver.base, &["upstream"]));
    let server = server("", &routes, "");
    let mut client = RawClient::bound(&server.gateway, "phone", "ann", None).await;
    client.send(upstream(1, None, "x")).await;
    acks(&mut client, 1).await;
    let outcome = std::panic::catch_unwind(|| receiver.assert_all_signed());
    assert!(
        outcome.is_err(),
        "the receiver's check must catch a bad signature"
    );
}

#[tokio::test]
async fn calls_go_over_https_to_a_server_whose_ca_is_the_configured_ca_file() {
    let (ca_pem, tls) = tls_with_private_ca();
    let receiver = Receiver::start_tls(SECRET, tls, |_, _| Answer::Status(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let routes = format!(
        "[{}]",
        route("main", &format!("{}/in", receiver.base), &["upstream"])
    );
    let section = format!(
        "{FAST_DEADLINES}\nca_file = {:?}",
        ca_file.to_str().unwrap()
    );
    let server = self::server(&section, &routes, "");
    let mut client = RawClient::bound(&server.gateway, "phone", "ann", None).await;
    client.send(upstream(1, None, "secure")).await;
    assert_eq!(statuses(&acks(&mut client, 1).await)[&1], "accepted");
    receiver.assert_all_signed();
    assert!(receiver.calls().iter().any(|call| call.path == "/in"));
    drop(server);

    // Without the CA the certificate is not trusted: no call gets through.
    let before = receiver.calls().len();
    let server = self::server(FAST_DEADLINES, &routes, "");
    let mut client = RawClient::bound(&server.gateway, "phone", "ann", None).await;
    client.send(upstream(2, None, "untrusted")).await;
    assert_eq!(statuses(&acks(&mut client, 1).await)[&2], "unavailable");
    assert_eq!(receiver.calls().len(), before);
}

#[tokio::test]
async fn failures_are_retried_until_accepted_refused_or_out_of_time() {
    // Each request's answers in turn; the last repeats.
    let plans: HashMap<&str, Vec<u16>> = HashMap::from([
        ("flaky", vec![500, 200]),
        ("busy", vec![429, 503, 200]),
        ("broken", vec![500]),
        ("bad", vec![400]),
    ]);
    let tries: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counted = tries.clone();
    let receiver = Receiver::start(SECRET, move |call, _| {
        let payload = call.body["payload_base64"].as_str().unwrap_or_default();
        let payload =
            String::from_utf8(base64_decode(payload).expect("payload_base64 is base64")).unwrap();
        let mut tries = counted.lock().unwrap();
        let n = tries.entry(payload.clone()).or_default();
        let plan = &plans[payload.as_str()];
        let status = plan[(*n).min(plan.len() - 1)];
        *n += 1;
        Answer::Status(status)
    })
    .await;
    let routes = format!("[{}]", route("main", &receiver.base, &["upstream"]));
    let server = server(FAST_DEADLINES, &routes, "");
    let mut client = RawClient::bound(&server.gateway, "phone", "ann", None).await;
    let sent = Instant::now();
    for (id, payload) in [(1, "flaky"), (2, "busy"), (3, "broken"), (4, "bad")] {
        client.send(upstream(id, None, payload)).await;
    }
    let acks = acks(&mut client, 4).await;
    assert_eq!(
        statuses(&acks),
        BTreeMap::from([
            (1, "accepted"),
            (2, "accepted"),
            (3, "unavailable"),
            (4, "rejected")
        ])
    );
    let tries = tries.lock().unwrap().clone();
    assert_eq!((tries["flaky"], tries["busy"], tries["bad"]), (2, 3, 1));
    assert!(
        tries["broken"] >= 3,
        "retried until the deadline: {tries:?}"
    );
    // Given up at the 2 s upstream deadline, in time for the client.
    let broken = acks[&3].1 - sent;
    assert!(
        (Duration::from_millis(1_000)..Duration::from_millis(3_500)).contains(&broken),
        "{broken:?}"
    );
    receiver.assert_all_signed();
    let metrics = server.metrics().await;
    for line in [
        "herald_webhook_gave_up_total{app=\"chat\",reason=\"deadline\"} 1",
        "herald_webhook_gave_up_total{app=\"chat\",reason=\"rejected\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // Every attempt the receiver saw, by how it answered.
    let server_errors = 1 + 2 + tries["broken"];
    let attempts: usize = tries.values().sum();
    for line in [
        "herald_webhook_attempts_total{app=\"chat\",outcome=\"accepted\"} 2".to_owned(),
        "herald_webhook_attempts_total{app=\"chat\",outcome=\"refused\"} 1".to_owned(),
        format!(
            "herald_webhook_attempts_total{{app=\"chat\",outcome=\"server_error\"}} {server_errors}"
        ),
        format!("herald_webhook_call_seconds_count{{app=\"chat\"}} {attempts}"),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
}

#[tokio::test]
async fn a_receiver_that_is_down_or_never_answers_gets_unavailable_in_time() {
    let silent = Receiver::start(SECRET, |_, _| Answer::Never).await;
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/gone", listener.local_addr().unwrap())
    };
    let routes = format!(
        "[{}, {}]",
        route("down", &down, &["upstream"]),
        route("silent", &silent.base, &["upstream"]),
    );
    let server = server(FAST_DEADLINES, &routes, "");
    let mut client = RawClient::bound(&server.gateway, "phone", "ann", None).await;
    let sent = Instant::now();
    client.send(upstream(1, Some("down"), "x")).await;
    client.send(upstream(2, Some("silent"), "x")).await;
    let acks = acks(&mut client, 2).await;
    assert_eq!(
        statuses(&acks),
        BTreeMap::from([(1, "unavailable"), (2, "unavailable")])
    );
    for (_, at) in acks.values() {
        assert!(
            *at - sent < Duration::from_millis(3_500),
            "{:?}",
            *at - sent
        );
    }
    assert!(!silent.calls().is_empty(), "the silent receiver was called");
    let metrics = server.metrics().await;
    let line = "herald_webhook_gave_up_total{app=\"chat\",reason=\"deadline\"} 2";
    assert!(metrics.contains(line), "{line} not in\n{metrics}");
}

#[tokio::test]
async fn one_apps_dead_webhook_does_not_slow_another_apps_calls() {
    let silent = Receiver::start(SECRET, |_, _| Answer::Never).await;
    let live = Receiver::start(SECRET, |_, _| Answer::Status(200)).await;
    let routes = format!("[{}]", route("main", &silent.base, &["upstream"]));
    let other = format!(
        "webhook_url = \"{}/news\"\nwebhook_secret = \"{SECRET}\"",
        live.base
    );
    let server = server(
        "timeout_secs = 10\nupstream_deadline_secs = 10",
        &routes,
        &other,
    );
    // More of chat's calls than it may have in flight, all hanging.
    let mut chat = RawClient::bound(&server.gateway, "phone", "ann", None).await;
    for id in 1..=40 {
        chat.send(upstream(id, None, "stuck")).await;
    }
    support::cluster::eventually("chat's calls hang at its webhook", || async {
        silent.calls().len() >= 16
    })
    .await;

    let mut news = bound_to_other_app(&server.gateway).await;
    let started = Instant::now();
    for id in 1..=20 {
        news.send(Frame::Upstream {
            app: OTHER_APP.to_owned(),
            request_id: id,
            route: None,
            payload: Bytes::from_static(b"fresh"),
        })
        .await;
        match news.recv().await {
            Some(Frame::UpstreamAck { status, .. }) => {
                assert_eq!(status, UpstreamStatus::ACCEPTED)
            }
            other => panic!("expected UPSTREAM_ACK, got {other:?}"),
        }
    }
    let took = started.elapsed();
    println!("20 upstreams of news took {took:?} while chat's webhook hangs");
    assert!(took < Duration::from_secs(2), "{took:?}");
    live.assert_all_signed();
    assert_eq!(
        live.calls()
            .iter()
            .filter(|call| call.event == "upstream" && call.route == "default")
            .count(),
        20
    );
}

#[tokio::test]
async fn a_webhook_url_that_is_not_http_is_refused_at_startup() {
    for (url, expected) in [
        ("ftp://biz.example/herald", "a webhook URL must be http://"),
        ("biz.example/herald", "a webhook URL must be http://"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = support::write_config(dir.path(), 60, "");
        let anchor = format!("token_secret = \"{TOKEN_SECRET}\"\n");
        let text = std::fs::read_to_string(&config).unwrap().replacen(
            &anchor,
            &format!(
                "{anchor}webhooks = [{}]\nwebhook_secret = \"{SECRET}\"\n",
                route("orders", url, &["upstream"])
            ),
            1,
        );
        std::fs::write(&config, text).unwrap();
        let output = std::process::Command::new(herald_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("\"orders\""), "names the route: {stderr}");
    }
}

/// A raw client bound to the other test app as `carol`.
async fn bound_to_other_app(gateway: &str) -> RawClient {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = sign_token(
        OTHER_TOKEN_SECRET.as_bytes(),
        &TokenClaims {
            app: OTHER_APP.to_owned(),
            user: "carol".to_owned(),
            expires_at_unix_secs: now + 3600,
        },
    )
    .unwrap();
    let mut client = RawClient::connect(gateway).await;
    client.hello("tablet").await;
    client
        .send(Frame::Bind {
            app: OTHER_APP.to_owned(),
            token,
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        })
        .await;
    match client.recv().await {
        Some(Frame::BindOk { .. }) => client,
        other => panic!("expected BIND_OK, got {other:?}"),
    }
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}
