//! End to end, with the real `herald` binary on loopback: store-then-send,
//! acks, offline delivery, redelivery, restarts, several devices, kick.

mod support;

use std::time::Duration;

use herald_proto::{Frame, GoAwayReason};
use support::{API_KEY, APP, Io, RawClient, Server, answered_pushes_survive_a_kill};

async fn push_to_an_online_user_arrives_and_its_ack_is_kept(io: Io) {
    let server = Server::start_on(io);
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    server.wait_connections("alice", 1).await;
    phone.expect_silence(Duration::from_millis(100)).await;

    let reply = server.push("alice", "hello alice").await;
    assert_eq!(reply["seq"], 1);
    assert_eq!(reply["online"], true);
    assert_eq!(reply["message_id"].as_str().unwrap().len(), 32);
    assert_eq!(phone.recv_push().await, (1, "hello alice".to_owned()));
    phone.ack(1).await;
    server.wait_for_metric("herald_acks_saved_total", 1).await;
    drop(phone);

    // The same device reconnecting without a resume point gets nothing
    // again: the server kept its ack.
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(server.push("alice", "second").await["seq"], 2);
    assert_eq!(phone.recv_push().await, (2, "second".to_owned()));
}

async fn push_to_an_offline_user_arrives_when_it_connects(io: Io) {
    let server = Server::start_on(io);
    let reply = server.push("bob", "while you were away").await;
    assert_eq!(reply["online"], false);
    server.push("bob", "and another").await;
    let mut phone = RawClient::bound(&server.gateway, "phone", "bob", None).await;
    assert_eq!(
        phone.recv_push().await,
        (1, "while you were away".to_owned())
    );
    assert_eq!(phone.recv_push().await, (2, "and another".to_owned()));
}

async fn unacked_messages_come_again_and_acked_ones_never_do(io: Io) {
    let server = Server::start_on(io);
    for text in ["one", "two", "three"] {
        server.push("carol", text).await;
    }
    let mut phone = RawClient::bound(&server.gateway, "phone", "carol", None).await;
    for seq in 1..=3 {
        assert_eq!(phone.recv_push().await.0, seq);
    }
    phone.ack(1).await;
    server.wait_for_metric("herald_acks_saved_total", 1).await;
    // Killed before acking 2 and 3.
    drop(phone);

    let mut phone = RawClient::bound(&server.gateway, "phone", "carol", None).await;
    assert_eq!(phone.recv_push().await, (2, "two".to_owned()));
    assert_eq!(phone.recv_push().await, (3, "three".to_owned()));
    phone.expect_silence(Duration::from_millis(200)).await;
}

async fn the_client_reported_last_seq_wins_over_the_server_cursor(io: Io) {
    let server = Server::start_on(io);
    for text in ["one", "two", "three"] {
        server.push("dave", text).await;
    }
    let mut phone = RawClient::bound(&server.gateway, "phone", "dave", Some(2)).await;
    assert_eq!(phone.recv_push().await, (3, "three".to_owned()));
    phone.expect_silence(Duration::from_millis(200)).await;
}

async fn a_message_stored_before_a_hard_restart_is_still_delivered(io: Io) {
    let server = Server::start_on(io);
    assert_eq!(server.push("erin", "durable").await["online"], false);
    let server = server.kill_and_restart();
    let mut phone = RawClient::bound(&server.gateway, "phone", "erin", None).await;
    assert_eq!(phone.recv_push().await, (1, "durable".to_owned()));
    // Sequences continue after the restart.
    assert_eq!(server.push("erin", "after").await["seq"], 2);
}

async fn every_device_of_a_user_gets_the_push(io: Io) {
    let server = Server::start_on(io);
    let mut phone = RawClient::bound(&server.gateway, "phone", "frank", None).await;
    let mut laptop = RawClient::bound(&server.gateway, "laptop", "frank", None).await;
    server.wait_connections("frank", 2).await;
    let (status, presence) = server
        .get(&format!("/v1/apps/{APP}/users/frank/presence"), API_KEY)
        .await;
    assert_eq!(status, 200);
    assert_eq!(presence["connections"].as_array().unwrap().len(), 2);
    assert_eq!(presence["connections"][0]["node"], "test-node");
    assert_eq!(presence["connections"][0]["network"], "wifi");

    server.push("frank", "to both").await;
    assert_eq!(phone.recv_push().await, (1, "to both".to_owned()));
    assert_eq!(laptop.recv_push().await, (1, "to both".to_owned()));

    // The phone acks; a third device still gets the message from the inbox.
    phone.ack(1).await;
    let mut tablet = RawClient::bound(&server.gateway, "tablet", "frank", None).await;
    assert_eq!(tablet.recv_push().await, (1, "to both".to_owned()));
}

async fn multicast_stores_one_copy_per_user(io: Io) {
    let server = Server::start_on(io);
    let mut gina = RawClient::bound(&server.gateway, "phone", "gina", None).await;
    server.wait_connections("gina", 1).await;
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/messages"),
            API_KEY,
            r#"{"users": ["gina", "hank", "gina"], "payload": "hi all"}"#.to_owned(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let results = reply["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["online"], true);
    assert_eq!(results[1]["online"], false);
    assert_eq!(results[0]["message_id"], results[1]["message_id"]);
    assert_eq!(gina.recv_push().await, (1, "hi all".to_owned()));

    let (status, pulled) = server
        .get(
            &format!("/v1/apps/{APP}/users/hank/messages?after=0&limit=10"),
            API_KEY,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(pulled["messages"][0]["payload"], "hi all");
    assert_eq!(pulled["more"], false);
}

async fn many_multicasts_at_once_are_all_stored_and_delivered(io: Io) {
    let server = Server::start_on(io);
    let mut jo = RawClient::bound(&server.gateway, "phone", "jo", None).await;
    server.wait_connections("jo", 1).await;
    // More calls than are handled at a time: the rest wait their turn.
    const CALLS: u64 = 12;
    let mut calls = tokio::task::JoinSet::new();
    for i in 1..=CALLS {
        let request = reqwest::Client::new()
            .post(server.url(&format!("/v1/apps/{APP}/messages")))
            .bearer_auth(API_KEY)
            .body(format!(
                r#"{{"users": ["jo", "kim"], "payload": "call {i}"}}"#
            ));
        calls.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let mut seqs: Vec<u64> = Vec::new();
    for _ in 0..CALLS {
        let (seq, _) = jo.recv_push().await;
        jo.ack(seq).await;
        seqs.push(seq);
    }
    assert_eq!(seqs, (1..=CALLS).collect::<Vec<_>>());
}

async fn the_same_idempotency_key_stores_once(io: Io) {
    let server = Server::start_on(io);
    let body = r#"{"payload": "once", "idempotency_key": "order-17"}"#.to_owned();
    let path = format!("/v1/apps/{APP}/users/ivy/messages");
    let (_, first) = server.post(&path, API_KEY, body.clone()).await;
    let (status, second) = server.post(&path, API_KEY, body).await;
    assert_eq!(status, 200);
    assert_eq!(first["seq"], second["seq"]);
    assert_eq!(first["message_id"], second["message_id"]);
    assert_eq!(second["replayed"], true);
    let mut phone = RawClient::bound(&server.gateway, "phone", "ivy", None).await;
    assert_eq!(phone.recv_push().await, (1, "once".to_owned()));
    phone.expect_silence(Duration::from_millis(200)).await;
}

async fn kick_sends_goaway_and_closes(io: Io) {
    let server = Server::start_on(io);
    let mut phone = RawClient::bound(&server.gateway, "phone", "jack", None).await;
    server.wait_connections("jack", 1).await;
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/users/jack/kick"),
            API_KEY,
            String::new(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(reply["kicked"], 1);
    assert_eq!(
        phone.recv().await,
        Some(Frame::GoAway {
            reason: GoAwayReason::KICKED,
            reconnect_delay_ms: None
        })
    );
    assert_eq!(phone.recv().await, None, "closed after GOAWAY");
    server.wait_connections("jack", 0).await;
}

async fn a_large_backlog_is_delivered_in_order_through_the_window(io: Io) {
    let server = Server::start_on(io);
    // More than the default delivery window (32) and than one fill.
    for i in 1..=100 {
        server.push("kate", &format!("m{i}")).await;
    }
    let mut phone = RawClient::bound(&server.gateway, "phone", "kate", None).await;
    for seq in 1..=100u64 {
        let (got, payload) = phone.recv_push().await;
        assert_eq!((got, payload), (seq, format!("m{seq}")));
        phone.ack(seq).await;
    }
    phone.expect_silence(Duration::from_millis(200)).await;
}

async fn sigterm_drains_clients_with_goaway_and_exits_cleanly(io: Io) {
    let mut server = Server::start_on(io);
    let mut phone = RawClient::bound(&server.gateway, "phone", "liam", None).await;
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    match phone.recv().await {
        Some(Frame::GoAway {
            reason: GoAwayReason::SERVER_SHUTDOWN,
            reconnect_delay_ms: Some(_),
        }) => {}
        other => panic!("expected GOAWAY(server_shutdown), got {other:?}"),
    }
}

/// Pushes that arrive together are committed together (SQLite's group
/// commit): every call is answered 200 once its message is durable, each
/// inbox's seqs are gapless and distinct, and the calls took fewer
/// transactions than there were calls (the counters `/metrics` shows).
#[tokio::test]
async fn concurrent_pushes_share_commits_and_each_is_stored() {
    const PUSHES: u64 = 200;
    const USERS: u64 = 10;
    let server = Server::start();
    let client = reqwest::Client::new();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..PUSHES {
        let user = i % USERS;
        let request = client
            .post(server.url(&format!("/v1/apps/{APP}/users/user-{user}/messages")))
            .bearer_auth(API_KEY)
            .body(format!(r#"{{"payload": "push {i}"}}"#));
        calls.spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            (user, body["seq"].as_u64().expect("a seq"))
        });
    }
    let mut seqs = vec![Vec::new(); USERS as usize];
    while let Some(answer) = calls.join_next().await {
        let (user, seq) = answer.unwrap();
        seqs[user as usize].push(seq);
    }
    for inbox in &mut seqs {
        inbox.sort_unstable();
        assert_eq!(*inbox, (1..=PUSHES / USERS).collect::<Vec<_>>());
    }
    let metrics = server.metrics().await;
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let transactions = counter("herald_storage_store_transactions_total");
    println!("{PUSHES} concurrent pushes stored in {transactions} transactions");
    assert_eq!(counter("herald_storage_stores_committed_total"), PUSHES);
    assert!(transactions < PUSHES);
}

/// kill -9 in the middle of group commits loses nothing that was answered:
/// callers push as fast as they are answered, the process is killed while
/// they do, and after a restart every push that was answered 200 is in its
/// inbox under the seq it was given (one not answered may or may not be).
#[tokio::test]
async fn a_kill_in_the_middle_of_group_commits_loses_no_answered_push() {
    answered_pushes_survive_a_kill(Server::start(), Server::kill_and_restart).await;
}

on_both_drivers!(
    push_to_an_online_user_arrives_and_its_ack_is_kept,
    push_to_an_offline_user_arrives_when_it_connects,
    unacked_messages_come_again_and_acked_ones_never_do,
    the_client_reported_last_seq_wins_over_the_server_cursor,
    a_message_stored_before_a_hard_restart_is_still_delivered,
    every_device_of_a_user_gets_the_push,
    multicast_stores_one_copy_per_user,
    many_multicasts_at_once_are_all_stored_and_delivered,
    the_same_idempotency_key_stores_once,
    kick_sends_goaway_and_closes,
    a_large_backlog_is_delivered_in_order_through_the_window,
    sigterm_drains_clients_with_goaway_and_exits_cleanly,
);
