//! A client that holds more than the server (its storage was wiped or
//! restored from a backup) is never left waiting, silently, for the
//! server's sequences to pass its own: the server resumes from what it has,
//! says so with RESET, and the SDK and `herald listen` follow.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use herald_client::{AckMode, Backoff, Client, ClientOptions, Event, ResetSequence};
use herald_proto::Frame;
use support::{
    API_KEY, APP, RawClient, Reaped, Server, WAIT, herald_bin, line_where, lines_of, token,
};

fn reset(sequence: ResetSequence, after: u64) -> Option<Frame> {
    Some(Frame::Reset {
        app: APP.to_owned(),
        sequence,
        after,
    })
}

/// Deletes the SQLite database: a server whose storage was wiped.
fn wipe(data_dir: &Path) {
    for entry in std::fs::read_dir(data_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("herald.db") {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

async fn broadcast(server: &Server, payload: &str) {
    let (status, body) = server
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            serde_json::json!({ "payload": payload }).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Alice's phone was sent three messages, acked up to `acked`, and left;
/// the ack is stored.
async fn phone_got_three_and_acked(server: &Server, acked: u64) {
    for text in ["one", "two", "three"] {
        server.push("alice", text).await;
    }
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    for seq in 1..=3 {
        assert_eq!(phone.recv_push().await.0, seq);
    }
    phone.ack(acked).await;
    server.wait_for_metric("herald_acks_saved_total", 1).await;
}

#[tokio::test]
async fn a_bind_past_the_inbox_head_resumes_from_the_device_cursor_and_says_so() {
    let server = Server::start();
    phone_got_three_and_acked(&server, 2).await;

    // The phone says it holds 50, which this inbox never handed out: it
    // resumes from its stored cursor, 2, and is told so before the push.
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", Some(50)).await;
    assert_eq!(phone.recv().await, reset(ResetSequence::Inbox, 2));
    assert_eq!(phone.recv_push().await, (3, "three".to_owned()));
    // A device with no cursor starts from the beginning.
    let mut tablet = RawClient::bound(&server.gateway, "tablet", "alice", Some(50)).await;
    assert_eq!(tablet.recv().await, reset(ResetSequence::Inbox, 0));
    for seq in 1..=3 {
        assert_eq!(tablet.recv_push().await.0, seq);
    }
    // New messages go on from there, live.
    server.push("alice", "four").await;
    assert_eq!(phone.recv_push().await, (4, "four".to_owned()));
    assert_eq!(tablet.recv_push().await, (4, "four".to_owned()));

    // A claim within the inbox gets no RESET.
    let mut laptop = RawClient::bound(&server.gateway, "laptop", "alice", Some(3)).await;
    assert_eq!(laptop.recv_push().await, (4, "four".to_owned()));
    laptop.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_bind_past_the_last_broadcast_gets_every_unexpired_one_and_says_so() {
    let server = Server::start();
    broadcast(&server, "b1").await;
    broadcast(&server, "b2").await;
    let mut client =
        RawClient::bound_tagged(&server.gateway, "phone", "alice", None, Some(9), &[]).await;
    assert_eq!(client.recv().await, reset(ResetSequence::Broadcasts, 0));
    assert_eq!(client.recv_broadcast().await, (1, "b1".to_owned()));
    assert_eq!(client.recv_broadcast().await, (2, "b2".to_owned()));
    broadcast(&server, "b3").await;
    assert_eq!(client.recv_broadcast().await, (3, "b3".to_owned()));
    // Within the app's broadcasts: no RESET, only what was missed.
    let mut other =
        RawClient::bound_tagged(&server.gateway, "tablet", "alice", None, Some(2), &[]).await;
    assert_eq!(other.recv_broadcast().await, (3, "b3".to_owned()));
    other.expect_silence(Duration::from_millis(200)).await;
}

/// A restore that kept a device's cursor but lost the inbox it pointed
/// into: the cursor is lowered, so the device neither gets the new inbox
/// again on every bind nor skips it once the inbox passes the old cursor.
#[tokio::test]
async fn a_cursor_past_the_inbox_head_is_lowered_so_nothing_is_skipped() {
    let server = Server::start();
    phone_got_three_and_acked(&server, 3).await;

    let server = server.kill_edit_and_restart(delete_the_inbox);
    server.push("alice", "new one").await;
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    assert_eq!(phone.recv_push().await, (1, "new one".to_owned()));
    phone.ack(1).await;
    server.wait_for_metric("herald_acks_saved_total", 1).await;
    drop(phone);

    // The cursor now says 1: nothing again, and 2 and 3 are not skipped.
    let mut phone = RawClient::bound(&server.gateway, "phone", "alice", None).await;
    phone.expect_silence(Duration::from_millis(300)).await;
    server.push("alice", "new two").await;
    server.push("alice", "new three").await;
    assert_eq!(phone.recv_push().await, (2, "new two".to_owned()));
    assert_eq!(phone.recv_push().await, (3, "new three".to_owned()));
}

/// Deletes every inbox's messages and heads, keeping device cursors.
fn delete_the_inbox(data_dir: &Path) {
    let url = format!("sqlite:{}", data_dir.join("herald.db").display());
    // On a thread of its own: the test's runtime cannot block on another.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            for statement in ["DELETE FROM messages", "DELETE FROM inbox_heads"] {
                sqlx::query(statement).execute(&mut conn).await.unwrap();
            }
            conn.close().await.unwrap();
        });
    })
    .join()
    .unwrap();
}

fn sdk_options(server: &Server) -> ClientOptions {
    ClientOptions {
        ack_mode: AckMode::Manual,
        reconnect: Backoff {
            // Long, so that the wiped server is usually written to past
            // the client's old seqs before it comes back.
            initial: Duration::from_secs(2),
            max: Duration::from_secs(2),
        },
        ..support::sdk_options(&server.gateway, token("alice", 3600))
    }
}

/// What a client printed or reported, in order, up to and including the
/// first event `done` accepts.
async fn sdk_events_until(client: &mut Client, done: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, client.next_event())
            .await
            .expect("timed out waiting for an event")
            .expect("client stopped");
        let finished = done(&event);
        seen.push(event);
        if finished {
            return seen;
        }
    }
}

fn position(events: &[Event], wanted: impl Fn(&Event) -> bool) -> usize {
    events
        .iter()
        .position(wanted)
        .unwrap_or_else(|| panic!("not among {events:?}"))
}

#[tokio::test]
async fn the_sdk_and_listen_follow_a_server_whose_data_was_wiped() {
    let server = Server::start();
    let mut sdk = Client::start(sdk_options(&server));
    let mut listen = Reaped(
        Command::new(herald_bin())
            .args(["listen", "--gateway", &server.gateway, "--app", APP])
            .args(["--user", "dave", "--token", &token("dave", 3600)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout_rx = lines_of(listen.0.stdout.take().unwrap());
    let mut stderr_rx = lines_of(listen.0.stderr.take().unwrap());
    line_where(&mut stderr_rx, "bound app", |l| l.contains("bound app")).await;

    // Both hold inbox seqs 1..=2 and broadcast 1, acked.
    for seq in 1..=2 {
        server.push("alice", &format!("old {seq}")).await;
        server.push("dave", &format!("old {seq}")).await;
    }
    broadcast(&server, "old broadcast").await;
    sdk_events_until(&mut sdk, |e| matches!(e, Event::Broadcast(_))).await;
    sdk.ack(APP, 2).await.unwrap();
    sdk.ack_broadcast(APP, 1).await.unwrap();
    // A round trip through the driver: the acks before it were applied.
    sdk.upstream(APP, bytes::Bytes::from_static(b"sync"))
        .await
        .unwrap();
    line_where(&mut stdout_rx, "old broadcast", |l| {
        l.contains("old broadcast")
    })
    .await;
    // The inbox acks are written before the wipe.
    server.wait_for_metric("herald_acks_saved_total", 2).await;

    // The new inbox passes the old seqs (2) and the new broadcasts the old
    // one (1), most likely before the clients are back: only the storage
    // epoch can tell them apart then.
    let server = server.kill_edit_and_restart(wipe);
    for seq in 1..=2 {
        let stored = server.push("alice", &format!("new {seq}")).await;
        assert_eq!(stored["seq"], seq);
        server.push("dave", &format!("new {seq}")).await;
    }
    broadcast(&server, "new broadcast").await;

    let mut events = Vec::new();
    let mut wanted = vec![(false, 1), (false, 2), (true, 1)];
    while !wanted.is_empty() {
        let event = tokio::time::timeout(WAIT, sdk.next_event())
            .await
            .expect("timed out waiting for the new messages")
            .expect("client stopped");
        let item = match &event {
            Event::Push(p) if p.payload.starts_with(b"new") => Some((false, p.seq)),
            Event::Broadcast(b) if b.payload == "new broadcast" => Some((true, b.seq)),
            _ => None,
        };
        wanted.retain(|w| Some(*w) != item);
        events.push(event);
    }
    for sequence in [ResetSequence::Inbox, ResetSequence::Broadcasts] {
        let reset = position(
            &events,
            |e| matches!(e, Event::Reset { sequence: s, after: 0, .. } if *s == sequence),
        );
        let first = position(&events, |e| match e {
            Event::Push(_) => sequence == ResetSequence::Inbox,
            Event::Broadcast(_) => sequence == ResetSequence::Broadcasts,
            _ => false,
        });
        assert!(reset < first, "the reset comes first: {events:?}");
    }

    for (kind, seq, text) in [
        ("push", 1, "new 1"),
        ("push", 2, "new 2"),
        ("broadcast", 1, "new broadcast"),
    ] {
        let printed = line_where(&mut stdout_rx, text, |l| l.contains(text)).await;
        let printed: serde_json::Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(
            (printed["kind"].as_str(), printed["seq"].as_u64()),
            (Some(kind), Some(seq)),
            "{printed}"
        );
    }
    line_where(&mut stderr_rx, "resuming after seq 0", |l| {
        l.contains("resuming after seq 0")
    })
    .await;

    sdk.close().await;
}
