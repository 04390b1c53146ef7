//! Cluster mode end to end: `herald room` and `herald control` processes on
//! loopback, sharing one Redis (register, liveness, pub/sub) and one
//! MariaDB database (messages). See tests/support/cluster.rs for how the
//! engines are found, and why a test may be skipped outside CI.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use herald_proto::{Frame, GoAwayReason};
use serde_json::{Value, json};
use support::cluster::{Cluster, Engines, Relay, eventually, flush_redis};
use support::{API_KEY, APP, RawClient, WAIT};

/// The node ids presence reports for `user`, as asked of `api`.
async fn nodes_of(api: &support::Server, user: &str) -> Vec<String> {
    let (_, presence) = api
        .get(&format!("/v1/apps/{APP}/users/{user}/presence"), API_KEY)
        .await;
    let mut nodes: Vec<String> = presence["connections"]
        .as_array()
        .map(|connections| {
            connections
                .iter()
                .map(|c| c["node"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}

async fn dispatch(api: &support::Server, user: &str) -> Vec<String> {
    let response = reqwest::get(api.url(&format!("/v1/dispatch?app={APP}&user={user}&net=wifi")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_presence_kicks_and_multicasts_cross_nodes() {
    let Some(cluster) = Cluster::start("pushes_presence_kicks_and_multicasts_cross_nodes", 3, 2).await
    else {
        return;
    };
    // One user on each room node.
    let mut clients = Vec::new();
    for (i, room) in cluster.rooms.iter().enumerate() {
        let user = format!("user{i}");
        clients.push(RawClient::bound(&room.gateway, "phone", &user, None).await);
    }
    for (i, control) in cluster.controls.iter().enumerate() {
        for j in 0..3 {
            let user = format!("user{j}");
            eventually(&format!("control-{i} sees {user} on room-{j}"), || async {
                nodes_of(control, &user).await == [format!("room-{j}")]
            })
            .await;
        }
    }

    // A push through either control node reaches the user wherever it is.
    for (j, client) in clients.iter_mut().enumerate() {
        let control = &cluster.controls[j % 2];
        let reply = control.push(&format!("user{j}"), &format!("hello {j}")).await;
        assert_eq!(reply["online"], true, "{reply}");
        assert_eq!(client.recv_push().await, (1, format!("hello {j}")));
        client.ack(1).await;
    }

    // A multicast over users on all three nodes: each gets it once.
    let (status, reply) = cluster.controls[1]
        .post(
            &format!("/v1/apps/{APP}/messages"),
            API_KEY,
            json!({"users": ["user0", "user1", "user2"], "payload": "to all"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    for client in clients.iter_mut() {
        assert_eq!(client.recv_push().await, (2, "to all".to_owned()));
        client.ack(2).await;
        client.expect_silence(Duration::from_millis(200)).await;
    }

    // The dispatcher offers every live room node, the same home each time.
    let gateways = dispatch(&cluster.controls[0], "user0").await;
    let mut sorted = gateways.clone();
    sorted.sort();
    let mut expected: Vec<String> = cluster.rooms.iter().map(|r| r.gateway.clone()).collect();
    expected.sort();
    assert_eq!(sorted, expected);
    assert_eq!(dispatch(&cluster.controls[1], "user0").await[0], gateways[0]);

    // A kick through a control node reaches the user's room node.
    let (status, reply) = cluster.controls[0]
        .post(&format!("/v1/apps/{APP}/users/user2/kick"), API_KEY, String::new())
        .await;
    assert_eq!((status, &reply["kicked"]), (200, &json!(1)), "{reply}");
    match clients[2].recv().await {
        Some(Frame::GoAway { reason, .. }) => assert_eq!(reason, GoAwayReason::KICKED),
        other => panic!("expected GOAWAY kicked, got {other:?}"),
    }
    eventually("user2 leaves the register", || async {
        nodes_of(&cluster.controls[1], "user2").await.is_empty()
    })
    .await;
}
