//! A client that never acks: it crashes on a message before acking it, and
//! every bind sends it the message again. Past `delivery.redeliveries_max`
//! binds in a row the server parks the message for that device: the loop
//! ends, later messages arrive, a metric counts it and the app's webhook is
//! told.

mod support;

use std::time::Duration;

use support::cluster::{Cluster, eventually};
use support::webhook::{Answer, Receiver};
use support::{API_KEY, APP, RawClient, Server, TOKEN_SECRET, WAIT};

const SECRET: &str = "webhook-secret-0123456789abcdef-0123";

/// Binds in a row that may resend one unacked message.
const REDELIVERIES_MAX: u64 = 3;

/// `herald serve` with `redeliveries_max` set, and the test app's `parked`
/// events going to `receiver`.
fn server(receiver: &Receiver) -> Server {
    let anchor = format!("token_secret = \"{TOKEN_SECRET}\"\n");
    let route = format!(
        "[{{ route = \"ops\", url = \"{}/parked\", events = [\"parked\"] }}]",
        receiver.base
    );
    Server::start_with_edited_config(|text| {
        text.replacen(
            "[gateway]\n",
            &format!("[delivery]\nredeliveries_max = {REDELIVERIES_MAX}\n[gateway]\n"),
            1,
        )
        .replacen(
            &anchor,
            &format!("{anchor}webhooks = {route}\nwebhook_secret = \"{SECRET}\"\n"),
            1,
        )
    })
}

#[tokio::test]
async fn a_message_a_device_never_acks_is_parked_and_the_next_ones_arrive() {
    let receiver = Receiver::start(SECRET, |_, _| Answer::Status(200)).await;
    let server = server(&receiver);
    let parked_series = format!("herald_messages_parked_total{{app=\"{APP}\"}}");

    // Message 1 waits in the inbox; each bind sends it, and the client
    // crashes before acking it, up to the max. (Pushed before the first
    // bind, so every bind's first fill holds it.)
    let first = server.push("alice", "crashes the client").await;
    for _ in 0..REDELIVERIES_MAX {
        server.wait_connections("alice", 0).await;
        let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
        assert_eq!(
            phone.recv_push().await,
            (1, "crashes the client".to_owned())
        );
    }
    assert_eq!(server.counter(&parked_series).await, 0);

    // The next bind past the max: parked, not sent; a later message
    // arrives, and its ack covers the parked one.
    server.wait_connections("alice", 0).await;
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    server.wait_for_metric(&parked_series, 1).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(server.push("alice", "the next one").await["seq"], 2);
    assert_eq!(phone.recv_push().await, (2, "the next one".to_owned()));
    // Once the phone's cursor (2) is written, no device owes an ack.
    phone.ack(2).await;
    drop(phone);
    eventually("the phone's ack is written", || async {
        let (_, stats) = server.get(&format!("/v1/apps/{APP}/stats"), API_KEY).await;
        stats["messages_pending"] == 0
    })
    .await;

    // Another device of the user still gets message 1: parking is per
    // device.
    let mut tablet = RawClient::bound(&server.gateway, "tablet", "alice", None).await;
    assert_eq!(
        tablet.recv_push().await,
        (1, "crashes the client".to_owned())
    );
    assert_eq!(tablet.recv_push().await, (2, "the next one".to_owned()));
    drop(tablet);

    // The phone binds again: nothing, and it was parked once.
    server.wait_connections("alice", 0).await;
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(server.counter(&parked_series).await, 1);

    // The webhook got one `parked` event, signed, naming the message.
    let deadline = tokio::time::Instant::now() + WAIT;
    let calls = loop {
        let calls = receiver.calls();
        if !calls.is_empty() || tokio::time::Instant::now() > deadline {
            break calls;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    receiver.assert_all_signed();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(
        (call.event.as_str(), call.route.as_str()),
        ("parked", "ops")
    );
    assert_eq!(call.path, "/parked");
    let body = &call.body;
    assert_eq!(body["kind"], "parked");
    assert_eq!(body["app"], APP);
    assert_eq!(body["user"], "alice");
    assert_eq!(body["device_id"], "phone");
    assert_eq!(body["seq"], 1);
    assert_eq!(body["message_id"], first["message_id"]);
}

/// `delivery.redeliveries_max` when the config does not set it, as the
/// README's configuration reference gives it.
const DEFAULT_REDELIVERIES_MAX: usize = 10;

/// In a cluster the count is in the database, so binds on different room
/// nodes count in one row: a device that crashes on a message wherever it
/// reconnects has it parked all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binds_on_different_room_nodes_count_toward_one_park() {
    const TEST: &str = "binds_on_different_room_nodes_count_toward_one_park";
    let Some(cluster) = Cluster::start(TEST, 2, 1).await else {
        return;
    };
    let control = &cluster.controls[0];
    let parked_series = format!("herald_messages_parked_total{{app=\"{APP}\"}}");
    let offline = || async {
        let (_, presence) = control
            .get(&format!("/v1/apps/{APP}/users/fred/presence"), API_KEY)
            .await;
        presence["connections"]
            .as_array()
            .is_some_and(Vec::is_empty)
    };
    control.push("fred", "crashes the client").await;
    for bind in 0..DEFAULT_REDELIVERIES_MAX {
        eventually("fred is offline", offline).await;
        let room = &cluster.rooms[bind % 2];
        let mut phone = RawClient::bound(&room.gateway, "phone", "fred", None).await;
        assert_eq!(
            phone.recv_push().await,
            (1, "crashes the client".to_owned())
        );
    }
    eventually("fred is offline", offline).await;
    let room = &cluster.rooms[DEFAULT_REDELIVERIES_MAX % 2];
    let mut phone = RawClient::bound(&room.gateway, "phone", "fred", None).await;
    room.wait_for_metric(&parked_series, 1).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(control.push("fred", "the next one").await["seq"], 2);
    assert_eq!(phone.recv_push().await, (2, "the next one".to_owned()));
    let other = &cluster.rooms[(DEFAULT_REDELIVERIES_MAX + 1) % 2];
    assert_eq!(other.counter(&parked_series).await, 0, "parked once");
}
