//! Broadcasts end to end against a real `herald serve`: every online client
//! of the app gets one once, tag filters hold, clients that were away get
//! the unexpired ones they missed when they bind, and the progress report
//! counts what was targeted, sent and acked.

mod support;

use std::time::Duration;

use herald_proto::Frame;
use serde_json::{Value, json};
use support::cluster::eventually;
use support::{API_KEY, APP, RawClient, Server};

async fn broadcast(server: &Server, body: Value) -> Value {
    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            body.to_string(),
        )
        .await;
    assert_eq!(status, 200, "broadcast failed: {reply}");
    reply
}

async fn progress(server: &Server, id: &str) -> Value {
    let (status, reply) = server
        .get(&format!("/v1/apps/{APP}/broadcasts/{id}"), API_KEY)
        .await;
    assert_eq!(status, 200, "{reply}");
    reply
}

#[tokio::test]
async fn a_broadcast_reaches_every_online_client_once_and_the_rest_on_bind() {
    let server = Server::start();
    let mut ios =
        RawClient::bound_tagged(&server.gateway, "d1", "ann", None, None, &["platform=ios"]).await;
    let mut android = RawClient::bound_tagged(
        &server.gateway,
        "d2",
        "bob",
        None,
        None,
        &["platform=android"],
    )
    .await;
    // Two devices of one user each get it: a broadcast is per connection.
    let mut bob_again = RawClient::bound(&server.gateway, "d3", "bob", None).await;
    server.wait_connections("ann", 1).await;
    server.wait_connections("bob", 2).await;

    let first = broadcast(&server, json!({"payload": "to everyone"})).await;
    assert_eq!(first["seq"], 1);
    for client in [&mut ios, &mut android, &mut bob_again] {
        assert_eq!(client.recv_broadcast().await, (1, "to everyone".to_owned()));
        client
            .send(Frame::BroadcastAck {
                app: APP.to_owned(),
                seq: 1,
            })
            .await;
    }
    let id = first["broadcast_id"].as_str().unwrap().to_owned();
    eventually("3 targeted, sent and acked", || async {
        let report = progress(&server, &id).await;
        report["target"] == 3 && report["sent"] == 3 && report["acked"] == 3
    })
    .await;

    // A tag filter: only the iOS client.
    broadcast(
        &server,
        json!({"payload": "ios only", "tags": ["platform=ios"]}),
    )
    .await;
    assert_eq!(ios.recv_broadcast().await, (2, "ios only".to_owned()));
    android.expect_silence(Duration::from_millis(200)).await;
    bob_again.expect_silence(Duration::from_millis(200)).await;

    // One that expires before anyone else binds.
    broadcast(&server, json!({"payload": "short", "ttl_secs": 1})).await;
    assert_eq!(ios.recv_broadcast().await, (3, "short".to_owned()));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    broadcast(&server, json!({"payload": "latest"})).await;
    assert_eq!(ios.recv_broadcast().await, (4, "latest".to_owned()));

    // Clients that were away: a new one gets every unexpired broadcast it
    // is targeted by, in order; one that holds 1 gets what came after.
    let mut newcomer = RawClient::bound(&server.gateway, "d4", "cat", None).await;
    assert_eq!(
        newcomer.recv_broadcast().await,
        (1, "to everyone".to_owned())
    );
    assert_eq!(newcomer.recv_broadcast().await, (4, "latest".to_owned()));
    newcomer.expect_silence(Duration::from_millis(200)).await;
    let mut returning = RawClient::bound_tagged(
        &server.gateway,
        "d5",
        "dan",
        None,
        Some(1),
        &["platform=ios"],
    )
    .await;
    assert_eq!(returning.recv_broadcast().await, (2, "ios only".to_owned()));
    assert_eq!(returning.recv_broadcast().await, (4, "latest".to_owned()));
    returning.expect_silence(Duration::from_millis(200)).await;

    // The broadcasts reached nobody's inbox.
    let (_, inbox) = server
        .get(&format!("/v1/apps/{APP}/users/cat/messages"), API_KEY)
        .await;
    assert_eq!(inbox["messages"], json!([]));
}

#[tokio::test]
async fn bad_broadcasts_get_clear_errors() {
    let server = Server::start();
    let path = format!("/v1/apps/{APP}/broadcasts");
    let too_many: Vec<String> = (0..9).map(|i| format!("t{i}")).collect();
    for (body, status, code) in [
        (
            json!({"payload": "x", "tags": too_many}),
            400,
            "bad_request",
        ),
        (json!({"payload": "x", "tags": [""]}), 400, "bad_request"),
        (json!({}), 400, "bad_request"),
        (json!({"payload": "x", "ttl_secs": 0}), 400, "bad_request"),
        (
            json!({"payload": "x", "users": ["a"]}),
            400,
            "malformed_json",
        ),
    ] {
        let (got, reply) = server.post(&path, API_KEY, body.to_string()).await;
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (status, _) = server
        .post(
            &path,
            "wrong-key-0123456789",
            json!({"payload": "x"}).to_string(),
        )
        .await;
    assert_eq!(status, 403);
    for id in ["nope", "00000000000000000000000000000000"] {
        let (status, reply) = server.get(&format!("{path}/{id}"), API_KEY).await;
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (404, Some("unknown_broadcast"))
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_others_are_not_slowed() {
    const BROADCASTS: u64 = 120;
    const PAYLOAD: usize = 60_000;
    // One unacked frame per binding, so the queue limit can be small.
    let server = Server::start_with_edited_config(|text| {
        text.replace(
            "[gateway]\n",
            "[gateway]\ninflight_pushes_max = 1\nsend_queue_bytes_max = 131072\n",
        )
        .replace("payload_bytes_max = 1024", "payload_bytes_max = 60000")
    });
    // The slow one binds, then never reads.
    let _slow = support::unread_client(&server.gateway, "slow", Some("slow")).await;
    let mut fast = RawClient::bound(&server.gateway, "fast", "fast", None).await;
    server.wait_connections("slow", 1).await;
    server.wait_connections("fast", 1).await;

    let reader = tokio::spawn(async move {
        for expected in 1..=BROADCASTS {
            let (seq, payload) = fast.recv_broadcast().await;
            assert_eq!((seq, payload.len()), (expected, PAYLOAD));
            fast.send(Frame::BroadcastAck {
                app: APP.to_owned(),
                seq,
            })
            .await;
        }
    });
    let started = std::time::Instant::now();
    let payload = "x".repeat(PAYLOAD);
    for _ in 0..BROADCASTS {
        broadcast(&server, json!({ "payload": payload })).await;
    }
    let sent_in = started.elapsed();
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the reading client was held up by the one that stopped")
        .unwrap();
    println!(
        "{BROADCASTS} broadcasts of {PAYLOAD} bytes sent in {sent_in:?}, all received by the \
         reading client {:?} after the first was sent",
        started.elapsed()
    );
    eventually("the slow consumer is cut off", || async {
        server
            .metrics()
            .await
            .contains("herald_connections_closed_total{reason=\"slow_consumer\"} 1")
    })
    .await;
}

#[tokio::test]
async fn a_paced_broadcast_takes_the_time_its_rate_implies() {
    const CLIENTS: usize = 30;
    const RATE: f64 = 10.0;
    let server = Server::start();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(
            RawClient::bound(&server.gateway, &format!("p{i}"), &format!("p{i}"), None).await,
        );
    }
    for i in 0..CLIENTS {
        server.wait_connections(&format!("p{i}"), 1).await;
    }
    let started = std::time::Instant::now();
    broadcast(&server, json!({"payload": "slowly", "rate_per_sec": RATE})).await;
    let mut receipts = Vec::new();
    for client in &mut clients {
        assert_eq!(client.recv_broadcast().await.0, 1);
        receipts.push(started.elapsed());
    }
    let last = receipts.iter().max().unwrap().as_secs_f64();
    // 30 at 10 a second, the first at once: about 2.9 s; the shards move
    // paced broadcasts on every 250 ms tick.
    let implied = (CLIENTS as f64 - 1.0) / RATE;
    println!(
        "{CLIENTS} clients at {RATE}/s: last receipt after {last:.2} s (the rate implies {implied:.1} s)"
    );
    // Not at once, and not much later than the rate implies (a loaded
    // machine may run the ticks late).
    assert!(
        last >= implied - 0.75 && last <= implied + 3.0,
        "{last:.2} s"
    );

    let (status, reply) = server
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            json!({"payload": "x", "rate_per_sec": 0}).to_string(),
        )
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
}

#[tokio::test]
async fn a_low_priority_broadcast_is_dropped_for_a_client_that_is_behind() {
    let server = Server::start_with_edited_config(|text| {
        text.replace("payload_bytes_max = 1024", "payload_bytes_max = 60000")
            .replace("[gateway]\n", "[gateway]\nsend_queue_bytes_max = 2000000\n")
    });
    let _behind = support::unread_client(&server.gateway, "behind", Some("behind")).await;
    server.wait_connections("behind", 1).await;
    // Normal broadcasts back the client up, past what the kernel buffers,
    // until a low-priority one finds it behind and is dropped, not queued.
    let big = "x".repeat(60_000);
    for _ in 0..400 {
        broadcast(&server, json!({ "payload": big })).await;
        let low = broadcast(&server, json!({"payload": "minor", "priority": "low"})).await;
        let id = low["broadcast_id"].as_str().unwrap().to_owned();
        // The shard counts it once the command reaches it.
        eventually("the low-priority broadcast reaches the shard", || async {
            progress(&server, &id).await["target"] == 1
        })
        .await;
        let report = progress(&server, &id).await;
        if report["dropped"] == 1 {
            assert_eq!(report["sent"], 0);
            let metrics = server.metrics().await;
            assert!(
                metrics.contains("herald_connections_closed_total{reason=\"slow_consumer\"} 0"),
                "dropped before any cut-off"
            );
            return;
        }
    }
    panic!("no low-priority broadcast was ever dropped");
}

#[tokio::test]
async fn missed_broadcasts_come_interleaved_with_the_inbox_in_creation_order() {
    let server = Server::start();
    let pause = || tokio::time::sleep(Duration::from_millis(5));
    server.push("ivy", "m1").await;
    pause().await;
    broadcast(&server, json!({"payload": "b1"})).await;
    pause().await;
    server.push("ivy", "m2").await;
    server.push("ivy", "m3").await;
    pause().await;
    broadcast(&server, json!({"payload": "b2"})).await;

    let mut ivy = RawClient::bound(&server.gateway, "phone", "ivy", None).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(match ivy.recv().await {
            Some(Frame::Push { payload, .. }) | Some(Frame::Broadcast { payload, .. }) => {
                String::from_utf8(payload.to_vec()).unwrap()
            }
            other => panic!("expected PUSH or BROADCAST, got {other:?}"),
        });
    }
    assert_eq!(got, ["m1", "b1", "m2", "m3", "b2"]);
    ivy.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_client_more_than_a_window_behind_gets_broadcasts_in_their_place() {
    // A window of 2: the inbox comes in three reads, each acked.
    let server = Server::start_with_edited_config(|text| {
        text.replacen("[gateway]\n", "[gateway]\ninflight_pushes_max = 2\n", 1)
    });
    let pause = || tokio::time::sleep(Duration::from_millis(5));
    let mut expected = Vec::new();
    for (i, kind) in ["m", "m", "m", "b", "m", "b", "m", "b"].iter().enumerate() {
        let payload = format!("{kind}{i}");
        if *kind == "m" {
            server.push("jay", &payload).await;
        } else {
            broadcast(&server, json!({ "payload": payload })).await;
        }
        expected.push(payload);
        pause().await;
    }

    let mut jay = RawClient::bound(&server.gateway, "phone", "jay", None).await;
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match jay.recv().await {
            Some(Frame::Push { seq, payload, .. }) => {
                got.push(String::from_utf8(payload.to_vec()).unwrap());
                jay.ack(seq).await;
            }
            Some(Frame::Broadcast { payload, .. }) => {
                got.push(String::from_utf8(payload.to_vec()).unwrap());
            }
            other => panic!("expected PUSH or BROADCAST, got {other:?}; so far {got:?}"),
        }
    }
    assert_eq!(got, expected);
    jay.expect_silence(Duration::from_millis(200)).await;

    // Caught up: the next broadcast comes live.
    broadcast(&server, json!({"payload": "live"})).await;
    assert_eq!(jay.recv_broadcast().await.1, "live");
}
