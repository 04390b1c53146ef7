//! Notify, then pull (`"delivery": "notify"`) end to end: the client gets
//! a NOTIFY with the size and hint in the PUSH's place, pulls the body
//! with PULL (or over HTTP with its token), and acks it as a push; a
//! client that cannot pull gets the message whole, one at a time; the
//! Rust SDK pulls by itself and keeps the order; in a cluster the room
//! node answers the pull from storage.

mod support;

use std::time::Duration;

use bytes::Bytes;
use herald_client::{Client, Event};
use herald_proto::{Features, Frame, MessageId, PullStatus};
use serde_json::{Value, json};
use support::cluster::{Cluster, eventually};
use support::{API_KEY, APP, Io, RawClient, Server, WAIT, sdk_options, token};

/// Pushes `body` (with `"delivery": "notify"` added) to `user`.
async fn push_notify(server: &Server, user: &str, body: Value) -> Value {
    let mut body = body;
    body["delivery"] = json!("notify");
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/users/{user}/messages"),
            API_KEY,
            body.to_string(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    reply
}

fn pull(seq: u64) -> Frame {
    Frame::Pull {
        app: APP.to_owned(),
        seq,
    }
}

/// The next frame, which must be a PULL_REPLY: (seq, status, payload).
async fn recv_pull_reply(client: &mut RawClient) -> (u64, PullStatus, String) {
    match client.recv().await {
        Some(Frame::PullReply {
            seq,
            status,
            payload,
            ..
        }) => (seq, status, String::from_utf8(payload.to_vec()).unwrap()),
        other => panic!("expected PULL_REPLY, got {other:?}"),
    }
}

async fn a_notify_push_is_announced_then_pulled(io: Io) {
    let server = Server::start_on(io);
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    server.wait_connections("alice", 1).await;

    // Ten times the ordinary payload limit: notify allows more.
    let body = "b".repeat(40_000);
    let reply = push_notify(
        &server,
        "alice",
        json!({"payload": body, "hint": "news", "pull_spread_ms": 2000}),
    )
    .await;
    assert_eq!(reply["seq"], 1, "{reply}");
    assert_eq!(reply["online"], true, "{reply}");
    let message_id: MessageId = reply["message_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        phone.recv().await,
        Some(Frame::Notify {
            app: APP.to_owned(),
            message_id,
            seq: 1,
            size: 40_000,
            pull_spread_ms: 2000,
            hint: "news".to_owned(),
        })
    );
    phone.send(pull(1)).await;
    match phone.recv().await {
        Some(Frame::PullReply {
            seq: 1,
            status: PullStatus::OK,
            message_id: pulled_id,
            payload,
            ..
        }) => {
            assert_eq!(pulled_id, message_id);
            assert_eq!(payload, Bytes::from(body.clone()));
        }
        other => panic!("expected the body, got {other:?}"),
    }
    // A seq the inbox never had, and an app not bound here.
    phone.send(pull(99)).await;
    assert_eq!(
        recv_pull_reply(&mut phone).await,
        (99, PullStatus::GONE, String::new())
    );
    phone
        .send(Frame::Pull {
            app: "other".to_owned(),
            seq: 1,
        })
        .await;
    match phone.recv().await {
        Some(Frame::PullReply { status, .. }) => assert_eq!(status, PullStatus::NOT_BOUND),
        other => panic!("expected PULL_REPLY, got {other:?}"),
    }
    // Five PULLs in one write: the fifth finds four unanswered.
    let mut five = bytes::BytesMut::new();
    for _ in 0..5 {
        herald_proto::encode(&pull(1), &mut five).unwrap();
    }
    phone.send_raw(&five).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(recv_pull_reply(&mut phone).await.1);
    }
    assert_eq!(statuses.first(), Some(&PullStatus::BUSY), "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == PullStatus::OK).count(),
        4,
        "{statuses:?}"
    );
    assert!(
        server
            .counter(&format!("herald_pulls_total{{app=\"{APP}\"}}"))
            .await
            >= 6
    );

    // Acked as a push: the next message follows it, whole.
    phone.ack(1).await;
    assert_eq!(server.push("alice", "after").await["seq"], 2);
    assert_eq!(phone.recv_push().await, (2, "after".to_owned()));

    // The same body over HTTP with the client's token, with how it was
    // pushed; a business server's pull says the same.
    let client_path = format!("/v1/client/apps/{APP}/messages?after=0");
    let (status, reply) = server.get(&client_path, &token("alice", 60)).await;
    assert_eq!(status, 200, "{reply}");
    let messages = reply["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{reply}");
    assert_eq!(messages[0]["delivery"], "notify");
    assert_eq!(messages[0]["hint"], "news");
    assert_eq!(messages[0]["payload"], body.as_str());
    assert_eq!(messages[1]["delivery"], "push");
    assert!(messages[1].get("hint").is_none(), "{reply}");
    let (_, reply) = server
        .get(&format!("/v1/apps/{APP}/users/alice/messages"), API_KEY)
        .await;
    assert_eq!(reply["messages"][0]["delivery"], "notify", "{reply}");
    // Bob's token reads bob's inbox, which is empty.
    let (status, reply) = server.get(&client_path, &token("bob", 60)).await;
    assert_eq!((status, reply["messages"].clone()), (200, json!([])));
}

#[tokio::test]
async fn the_client_route_takes_only_a_valid_client_token() {
    let server = Server::start();
    let path = format!("/v1/client/apps/{APP}/messages");
    for (credential, expected) in [
        (API_KEY.to_owned(), "malformed"),
        (token("alice", -10), "expired"),
        (
            support::app_token("another-secret", APP, "alice"),
            "not signed with the app's token secret",
        ),
        (
            support::app_token(support::TOKEN_SECRET, "other", "alice"),
            "not issued for app",
        ),
    ] {
        let (status, reply) = server.get(&path, &credential).await;
        assert_eq!(status, 401, "{reply}");
        assert_eq!(reply["error"]["code"], "unauthorized", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{expected}: {message}");
    }
    let (status, reply) = server
        .get("/v1/client/apps/nope/messages", &token("alice", 60))
        .await;
    assert_eq!(
        (status, reply["error"]["code"].clone()),
        (404, json!("unknown_app"))
    );
    let (status, reply) = server
        .get(&format!("{path}?after=x"), &token("alice", 60))
        .await;
    assert_eq!(status, 400, "{reply}");
    let response = reqwest::get(server.url(&path)).await.unwrap();
    assert_eq!(response.status(), 401);
    let reply: Value = response.json().await.unwrap();
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Bearer <client token>"),
        "{reply}"
    );
}

#[tokio::test]
async fn a_notify_push_refuses_what_does_not_go_with_it() {
    let server = Server::start();
    let unicast = format!("/v1/apps/{APP}/users/alice/messages");
    for (body, status, expected) in [
        (
            json!({"payload": "x", "hint": "h"}),
            400,
            "\"hint\" goes only with",
        ),
        (
            json!({"payload": "x", "pull_spread_ms": 5}),
            400,
            "\"pull_spread_ms\" goes only with",
        ),
        (
            json!({"payload": "x", "delivery": "notify", "store": false}),
            400,
            "nothing to pull",
        ),
        (json!({"payload": "x", "delivery": "pigeon"}), 400, "pigeon"),
        (
            json!({"payload": "x", "delivery": "notify", "hint": "h".repeat(1025)}),
            400,
            "hint is 1025 bytes",
        ),
        (
            json!({"payload": "x", "delivery": "notify", "pull_spread_ms": 600_001}),
            400,
            "pull_spread_ms",
        ),
        (
            json!({"payload": "x".repeat(5000)}),
            413,
            "the limit is 1024",
        ),
        (
            json!({"payload": "x".repeat(65_025), "delivery": "notify"}),
            413,
            "the limit with \"delivery\": \"notify\" is 65024",
        ),
    ] {
        let (got, reply) = server.post(&unicast, API_KEY, body.to_string()).await;
        assert_eq!(got, status, "{body}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{expected}: {message}");
    }
    // Nothing refused was stored.
    let (_, reply) = server.get(&unicast, API_KEY).await;
    assert_eq!(reply["messages"], json!([]));
}

/// A client from before NOTIFY (its HELLO names no features) gets such a
/// message whole, as a PUSH, and the next one only once it acked: a window
/// of them would not fit the send queue. It gets no TRANSIENT either.
#[tokio::test]
async fn a_client_that_cannot_pull_gets_the_message_whole_one_at_a_time() {
    let server = Server::start();
    let mut old = RawClient::bound_with(&server.gateway, "old", "bob", Features::NONE).await;
    server.wait_connections("bob", 1).await;
    for seq in 1..=2 {
        let reply = push_notify(&server, "bob", json!({"payload": format!("big{seq}")})).await;
        assert_eq!(reply["seq"], seq);
    }
    assert_eq!(server.push("bob", "small").await["seq"], 3);
    assert_eq!(old.recv_push().await, (1, "big1".to_owned()));
    old.expect_silence(Duration::from_millis(300)).await;
    old.ack(1).await;
    assert_eq!(old.recv_push().await, (2, "big2".to_owned()));
    assert_eq!(old.recv_push().await, (3, "small".to_owned()));

    let (status, _) = server
        .post(
            &format!("/v1/apps/{APP}/users/bob/messages"),
            API_KEY,
            json!({"payload": "typing", "store": false}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    old.expect_silence(Duration::from_millis(300)).await;
}

/// A multicast's clients pull over its users / `api.notify_pulls_per_sec`
/// seconds unless the push says otherwise.
#[tokio::test]
async fn a_multicast_spreads_its_pulls_by_default() {
    let server = Server::start_with_api_settings("notify_pulls_per_sec = 2\n");
    let mut phone = RawClient::bound(&server.gateway, "phone", "carol", None).await;
    server.wait_connections("carol", 1).await;
    let users: Vec<String> = (0..10)
        .map(|i| format!("user{i}"))
        .chain(["carol".to_owned()])
        .collect();
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/messages"),
            API_KEY,
            json!({"users": users, "payload": "x", "delivery": "notify"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    match phone.recv().await {
        // 11 users at 2 pulls a second: within 5.5 s.
        Some(Frame::Notify { pull_spread_ms, .. }) => assert_eq!(pull_spread_ms, 5_499),
        other => panic!("expected NOTIFY, got {other:?}"),
    }
}

/// The Rust SDK says `Notified` at once, pulls after the spread, and hands
/// out the body, then what came after it, in seq order, acking each.
#[tokio::test]
async fn the_rust_sdk_pulls_the_body_and_keeps_the_order() {
    let server = Server::start();
    let mut client = Client::start(sdk_options(&server.gateway, token("dana", 3600)));
    support::until_bound(&mut client).await;
    server.wait_connections("dana", 1).await;
    push_notify(
        &server,
        "dana",
        json!({"payload": "the body", "hint": "from erin", "pull_spread_ms": 300}),
    )
    .await;
    assert_eq!(server.push("dana", "next").await["seq"], 2);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap()
        {
            Some(Event::Notified {
                seq, size, hint, ..
            }) => {
                seen.push(format!("notified {seq} {size} {hint}"));
            }
            Some(Event::Push(push)) => seen.push(format!(
                "push {} {}",
                push.seq,
                String::from_utf8_lossy(&push.payload)
            )),
            Some(Event::Closed(terminal)) => panic!("closed: {terminal:?}"),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        ["notified 1 8 from erin", "push 1 the body", "push 2 next"]
    );
    // Auto-acked: the server's count of acks reaches seq 2.
    let _ = tokio::time::timeout(Duration::from_millis(200), client.next_event()).await;
    server
        .wait_for_metric(&format!("herald_acks_received_total{{app=\"{APP}\"}}"), 2)
        .await;
}

/// In a cluster the control node stores the notice, the room node sends
/// the NOTIFY and answers the PULL from storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notify_push_is_pulled_from_a_room_node_in_a_cluster() {
    const TEST: &str = "a_notify_push_is_pulled_from_a_room_node_in_a_cluster";
    let Some(cluster) = Cluster::start(TEST, 1, 1).await else {
        return;
    };
    let control = &cluster.controls[0];
    let mut phone = RawClient::bound(&cluster.rooms[0].gateway, "phone", "frank", None).await;
    eventually("the control node sees frank", || async {
        let (_, presence) = control
            .get(&format!("/v1/apps/{APP}/users/frank/presence"), API_KEY)
            .await;
        presence["connections"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    let reply = push_notify(control, "frank", json!({"payload": "far", "hint": "h"})).await;
    assert_eq!(reply["seq"], 1, "{reply}");
    match phone.recv().await {
        Some(Frame::Notify {
            seq: 1,
            size: 3,
            hint,
            ..
        }) => assert_eq!(hint, "h"),
        other => panic!("expected NOTIFY, got {other:?}"),
    }
    phone.send(pull(1)).await;
    assert_eq!(
        recv_pull_reply(&mut phone).await,
        (1, PullStatus::OK, "far".to_owned())
    );
}

on_both_drivers!(a_notify_push_is_announced_then_pulled);

const JS_TEST: &str = "the_js_sdk_pulls_the_body_and_keeps_the_order";

/// The same with the JS SDK in Node, over WebSocket
/// (`sdk/js/e2e/notify.mjs`).
#[tokio::test]
async fn the_js_sdk_pulls_the_body_and_keeps_the_order() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let Some(sdk_dir) = support::js_sdk_built(JS_TEST).await else {
        return;
    };
    let server = Server::start_with_edited_config(|text| {
        text.replacen(
            "[api]\n",
            "[[gateway.listeners]]\naddress = \"127.0.0.1:0\"\ntransport = \"ws\"\n[api]\n",
            1,
        )
    });
    let ws = server.gateways.get("ws").expect("a ws listener").clone();
    let mut child = tokio::process::Command::new("node")
        .arg("e2e/notify.mjs")
        .arg(ws)
        .arg(token("gina", 3600))
        .current_dir(&sdk_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("an event from Node in time")
            .unwrap()
            .expect("the Node client exited");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON from Node: {line}"))
    };
    while next().await["type"] != "bound" {}
    server.wait_connections("gina", 1).await;
    push_notify(
        &server,
        "gina",
        json!({"payload": "the body", "hint": "from hal", "pull_spread_ms": 300}),
    )
    .await;
    assert_eq!(server.push("gina", "next").await["seq"], 2);
    assert_eq!(
        next().await,
        json!({"type": "notify", "seq": 1, "size": 8, "hint": "from hal"})
    );
    assert_eq!(
        next().await,
        json!({"type": "push", "seq": 1, "pulled": true, "payload": "the body"})
    );
    assert_eq!(
        next().await,
        json!({"type": "push", "seq": 2, "pulled": false, "payload": "next"})
    );
    server
        .wait_for_metric(&format!("herald_acks_received_total{{app=\"{APP}\"}}"), 1)
        .await;
    // Acked through seq 2: a client that binds from the cursor gets nothing.
    eventually("gina's ack reaches storage", || async {
        let (_, reply) = server.get(&format!("/v1/apps/{APP}/stats"), API_KEY).await;
        reply["messages_pending"] == 0
    })
    .await;
}
