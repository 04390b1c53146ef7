//! Transient messages (`"store": false`) end to end: they reach the
//! connections bound when they are pushed, on this node and on the other
//! room nodes of a cluster, and nowhere else; they are never stored, acked
//! or sent again; the reply counts the connections they went to.

mod support;

use std::time::Duration;

use bytes::Bytes;
use herald_client::{Client, Event};
use herald_proto::Frame;
use serde_json::{Value, json};
use support::cluster::{Cluster, eventually};
use support::{API_KEY, APP, Io, RawClient, Server, WAIT, sdk_options, token};

/// The next frame, which must be a TRANSIENT of the test app: its payload.
async fn recv_transient(client: &mut RawClient) -> String {
    match client.recv().await {
        Some(Frame::Transient { app, payload }) => {
            assert_eq!(app, APP);
            String::from_utf8(payload.to_vec()).unwrap()
        }
        other => panic!("expected TRANSIENT, got {other:?}"),
    }
}

/// A transient push to `user` through `server`: status and reply.
async fn push_transient(server: &Server, user: &str, payload: &str) -> (u16, Value) {
    server
        .post(
            &format!("/v1/apps/{APP}/users/{user}/messages"),
            API_KEY,
            json!({"payload": payload, "store": false}).to_string(),
        )
        .await
}

/// The messages a pull of `user`'s inbox returns.
async fn pulled(server: &Server, user: &str) -> Vec<Value> {
    let (status, reply) = server
        .get(&format!("/v1/apps/{APP}/users/{user}/messages"), API_KEY)
        .await;
    assert_eq!(status, 200, "{reply}");
    reply["messages"].as_array().unwrap().clone()
}

async fn a_transient_push_reaches_bound_connections_only_and_is_never_stored(io: Io) {
    let server = Server::start_on(io);
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    let mut laptop = RawClient::bound(&server.gateway, "laptop", "alice", None).await;
    server.wait_connections("alice", 2).await;

    let (status, reply) = push_transient(&server, "alice", "typing").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"delivered_to": 2}));
    for client in [&mut phone, &mut laptop] {
        assert_eq!(recv_transient(client).await, "typing");
    }

    // An offline user: it went nowhere, and nothing waits for bob.
    let (status, reply) = push_transient(&server, "bob", "typing").await;
    assert_eq!((status, reply), (200, json!({"delivered_to": 0})));

    // A multicast: each user's connections, and the sum.
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/messages"),
            API_KEY,
            json!({"users": ["alice", "bob"], "payload": "online", "store": false}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({
            "results": [{"user": "alice", "delivered_to": 2}, {"user": "bob", "delivered_to": 0}],
            "delivered_to": 2
        })
    );
    for client in [&mut phone, &mut laptop] {
        assert_eq!(recv_transient(client).await, "online");
    }
    assert_eq!(
        server
            .counter(&format!(
                "herald_transient_deliveries_total{{app=\"{APP}\"}}"
            ))
            .await,
        4
    );

    // Never stored: no pull finds them, no seq was used, and neither a
    // reconnect nor the offline user's first bind gets them.
    assert!(pulled(&server, "alice").await.is_empty());
    assert!(pulled(&server, "bob").await.is_empty());
    assert_eq!(
        server
            .counter(&format!("herald_messages_stored_total{{app=\"{APP}\"}}"))
            .await,
        0
    );
    drop(phone);
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    let mut bob = RawClient::bound(&server.gateway, "phone", "bob", None).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    bob.expect_silence(Duration::from_millis(100)).await;
    // Nothing was owed an ack: the next stored push is the inbox's first,
    // and goes out at once.
    assert_eq!(server.push("alice", "stored").await["seq"], 1);
    for client in [&mut phone, &mut laptop] {
        assert_eq!(client.recv_push().await, (1, "stored".to_owned()));
    }
}

#[tokio::test]
async fn store_false_refuses_what_only_a_stored_message_takes() {
    let server = Server::start();
    for (extra, field) in [
        (json!({"ttl_secs": 60}), "ttl_secs"),
        (json!({"idempotency_key": "k1"}), "idempotency_key"),
    ] {
        let mut body = json!({"payload": "typing", "store": false});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        for (path, users) in [
            (format!("/v1/apps/{APP}/users/alice/messages"), None),
            (format!("/v1/apps/{APP}/messages"), Some(json!(["alice"]))),
        ] {
            let mut body = body.clone();
            if let Some(users) = users {
                body["users"] = users;
            }
            let (status, reply) = server.post(&path, API_KEY, body.to_string()).await;
            assert_eq!(status, 400, "{path} {body}: {reply}");
            assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
            let message = reply["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(field) && message.contains("\"store\": false"),
                "{message}"
            );
        }
    }
    // `store: true` is the default, spelled out.
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/users/alice/messages"),
            API_KEY,
            json!({"payload": "kept", "store": true, "ttl_secs": 60}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["seq"], 1);
}

/// The Rust SDK reports a transient message as its own event, and acks
/// nothing for it.
#[tokio::test]
async fn the_rust_sdk_reports_a_transient_message() {
    let server = Server::start();
    let mut client = Client::start(sdk_options(&server.gateway, token("carol", 3600)));
    support::until_bound(&mut client).await;
    server.wait_connections("carol", 1).await;
    let (_, reply) = push_transient(&server, "carol", "typing").await;
    assert_eq!(reply["delivered_to"], 1, "{reply}");
    let event = tokio::time::timeout(WAIT, client.next_event())
        .await
        .unwrap();
    assert_eq!(
        event,
        Some(Event::Transient {
            app: APP.to_owned(),
            payload: Bytes::from_static(b"typing"),
        })
    );
    assert_eq!(server.push("carol", "stored").await["seq"], 1);
    match tokio::time::timeout(WAIT, client.next_event())
        .await
        .unwrap()
    {
        Some(Event::Push(push)) => assert_eq!(push.seq, 1),
        other => panic!("expected the stored push, got {other:?}"),
    }
}

/// In a cluster the control node hands a transient push to the room nodes
/// its user's connections are on, through the node channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_push_crosses_room_nodes_in_a_cluster() {
    const TEST: &str = "a_transient_push_crosses_room_nodes_in_a_cluster";
    let Some(cluster) = Cluster::start(TEST, 2, 1).await else {
        return;
    };
    let control = &cluster.controls[0];
    let mut clients = Vec::new();
    for (i, room) in cluster.rooms.iter().enumerate() {
        clients.push(RawClient::bound(&room.gateway, &format!("device{i}"), "dave", None).await);
    }
    eventually("the control node sees dave on both room nodes", || async {
        let (_, presence) = control
            .get(&format!("/v1/apps/{APP}/users/dave/presence"), API_KEY)
            .await;
        presence["connections"].as_array().map(Vec::len) == Some(2)
    })
    .await;

    let (status, reply) = push_transient(control, "dave", "typing").await;
    assert_eq!((status, reply), (200, json!({"delivered_to": 2})));
    for client in clients.iter_mut() {
        assert_eq!(recv_transient(client).await, "typing");
    }
    let (status, reply) = push_transient(control, "erin", "typing").await;
    assert_eq!((status, reply), (200, json!({"delivered_to": 0})));

    assert!(pulled(control, "dave").await.is_empty());
    let mut again = RawClient::bound(&cluster.rooms[1].gateway, "device2", "dave", None).await;
    again.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(control.push("dave", "stored").await["seq"], 1);
    for client in clients.iter_mut().chain([&mut again]) {
        assert_eq!(client.recv_push().await, (1, "stored".to_owned()));
    }
}

on_both_drivers!(a_transient_push_reaches_bound_connections_only_and_is_never_stored);
