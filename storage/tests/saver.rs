//! The saver's contract, checked on every engine: each test below runs
//! once on SQLite (a file in a temporary directory), once on MariaDB/MySQL
//! and once on PostgreSQL, each in a database of its own that is dropped
//! afterwards. The servers are found at `HERALD_TEST_MYSQL_URL` and
//! `HERALD_TEST_POSTGRES_URL` (default: the local ones,
//! `scripts/start-services.sh` starts them). Without a server a test is
//! skipped with a message, except under CI=true, where it fails.

mod engines;

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use engines::TestDb;
use herald_storage::{
    AckCursor, CommitCounts, FillStart, GroupCommit, InboxHead, InboxKey, MESSAGES_AFTER_LIMIT_MAX,
    MessageCounts, NewBroadcast, NewMessage, Notice, PURGE_BATCH_ROWS, Saver, StorageError,
    StoreOutcome, StoredApp,
};

const APP: &str = "app1";
const T0: u64 = 1_700_000_000_000;
const HOUR_MS: u64 = 3_600_000;

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// Stores `payload` for `users` of `app` with a one-hour TTL and no key.
async fn store(
    saver: &Saver,
    app: &str,
    users: &[String],
    payload: &[u8],
    now_ms: u64,
) -> StoreOutcome {
    saver
        .store(NewMessage {
            app: app.into(),
            users: users.to_vec(),
            payload: Bytes::copy_from_slice(payload),
            ttl_ms: HOUR_MS,
            now_ms,
            idempotency_key: None,
            notice: None,
        })
        .await
        .unwrap()
}

async fn seqs_of(saver: &Saver, app: &str, user: &str, now_ms: u64) -> Vec<u64> {
    let (messages, more) = saver
        .messages_after(app, user, 0, MESSAGES_AFTER_LIMIT_MAX, now_ms)
        .await
        .unwrap();
    assert!(!more);
    messages.iter().map(|message| message.seq).collect()
}

fn key(app: &str, user: &str, device_id: Option<&str>) -> InboxKey {
    InboxKey {
        app: app.to_owned(),
        user: user.to_owned(),
        device_id: device_id.map(str::to_owned),
    }
}

/// The ack cursor of alice's `device` in APP.
async fn cursor(saver: &Saver, device: &str) -> Option<u64> {
    let heads = saver
        .inbox_heads(&[key(APP, "alice", Some(device))])
        .await
        .unwrap();
    heads[0].acked_seq
}

async fn seqs_rise_per_inbox_and_are_independent_across_users_and_apps(db: TestDb) {
    let saver = db.open().await;
    let alice = users(&["alice"]);
    let bob = users(&["bob"]);
    for expected in 1..=3 {
        assert_eq!(
            store(&saver, APP, &alice, b"a", T0).await.stored[0].seq,
            expected
        );
    }
    assert_eq!(store(&saver, APP, &bob, b"b", T0).await.stored[0].seq, 1);
    assert_eq!(
        store(&saver, "app2", &alice, b"c", T0).await.stored[0].seq,
        1
    );
    assert_eq!(store(&saver, APP, &alice, b"d", T0).await.stored[0].seq, 4);

    assert_eq!(seqs_of(&saver, APP, "alice", T0).await, [1, 2, 3, 4]);
    assert_eq!(seqs_of(&saver, APP, "bob", T0).await, [1]);
    assert_eq!(seqs_of(&saver, "app2", "alice", T0).await, [1]);
}

async fn stored_message_reads_back_as_written(db: TestDb) {
    let saver = db.open().await;
    let outcome = store(&saver, APP, &users(&["alice"]), b"hello", T0).await;
    assert!(!outcome.replayed);
    let (messages, more) = saver.messages_after(APP, "alice", 0, 10, T0).await.unwrap();
    assert!(!more);
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.seq, 1);
    assert_eq!(message.message_id, outcome.stored[0].message_id);
    assert_eq!(&message.payload[..], b"hello");
    assert_eq!(message.created_at_ms, T0);
    assert_eq!(message.expires_at_ms, T0 + HOUR_MS);
    assert_eq!(message.message_id.0[..6], T0.to_be_bytes()[2..]);
}

/// A notice reads back with its message, whichever way the group was
/// written: a unicast among others, a multicast, and one with a key.
async fn a_notice_reads_back_with_its_message(db: TestDb) {
    let saver = db.open().await;
    let notice = Notice {
        pull_spread_ms: 5_000,
        hint: Arc::from("a long read ✓"),
    };
    let send = |users: &[&str], notice: Option<Notice>, key: Option<&str>| NewMessage {
        app: APP.into(),
        users: self::users(users),
        payload: Bytes::from_static(b"body"),
        ttl_ms: HOUR_MS,
        now_ms: T0,
        idempotency_key: key.map(str::to_owned),
        notice,
    };
    let (plain, unicast, multicast, keyed) = tokio::join!(
        saver.store(send(&["alice"], None, None)),
        saver.store(send(&["alice"], Some(notice.clone()), None)),
        saver.store(send(&["alice", "bob"], Some(notice.clone()), None)),
        saver.store(send(&["alice"], Some(notice.clone()), Some("k1"))),
    );
    for outcome in [&plain, &unicast, &multicast, &keyed] {
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let (messages, _) = saver.messages_after(APP, "alice", 0, 10, T0).await.unwrap();
    let notices: Vec<_> = messages.iter().map(|m| m.notice.is_some()).collect();
    assert_eq!(notices.iter().filter(|n| **n).count(), 3, "{notices:?}");
    for message in &messages {
        if let Some(read) = &message.notice {
            assert_eq!(read, &notice);
            assert_eq!(&message.payload[..], b"body");
        }
    }
    let (bobs, _) = saver.messages_after(APP, "bob", 0, 10, T0).await.unwrap();
    assert_eq!(bobs[0].notice.as_ref(), Some(&notice));
}

async fn seq_is_not_reused_after_purge(db: TestDb) {
    let saver = db.open().await;
    let alice = users(&["alice"]);
    store(&saver, APP, &alice, b"1", T0).await;
    store(&saver, APP, &alice, b"2", T0).await;
    let later = T0 + 2 * HOUR_MS;
    assert_eq!(saver.purge_expired(later).await.unwrap(), 2);
    assert!(seqs_of(&saver, APP, "alice", later).await.is_empty());
    assert_eq!(
        store(&saver, APP, &alice, b"3", later).await.stored[0].seq,
        3
    );
}

async fn multicast_shares_one_message_id_and_gives_each_user_one_seq(db: TestDb) {
    let saver = db.open().await;
    store(&saver, APP, &users(&["bob"]), b"earlier", T0).await;
    let outcome = store(&saver, APP, &users(&["alice", "bob", "carol"]), b"all", T0).await;
    let summary: Vec<(&str, u64)> = outcome
        .stored
        .iter()
        .map(|stored| (stored.user.as_str(), stored.seq))
        .collect();
    assert_eq!(summary, [("alice", 1), ("bob", 2), ("carol", 1)]);
    let message_id = outcome.stored[0].message_id;
    assert!(
        outcome
            .stored
            .iter()
            .all(|stored| stored.message_id == message_id)
    );
    for stored in &outcome.stored {
        let (messages, _) = saver
            .messages_after(APP, &stored.user, stored.seq - 1, 10, T0)
            .await
            .unwrap();
        assert_eq!(messages[0].message_id, message_id);
        assert_eq!(&messages[0].payload[..], b"all");
    }

    // A separate call is a separate logical message.
    let next = store(&saver, APP, &users(&["alice"]), b"next", T0).await;
    assert_ne!(next.stored[0].message_id, message_id);
}

async fn idempotent_replay_returns_the_first_result_and_stores_nothing(db: TestDb) {
    let saver = db.open().await;
    let alice_bob = users(&["alice", "bob"]);
    let payloads = [&b"first"[..], b"retry", b"other app"].map(Bytes::from_static);
    let send = |payload: usize, now_ms| NewMessage {
        app: APP.into(),
        users: alice_bob.clone(),
        payload: payloads[payload].clone(),
        ttl_ms: HOUR_MS,
        now_ms,
        idempotency_key: Some("send-1".into()),
        notice: None,
    };
    let first = saver.store(send(0, T0)).await.unwrap();
    assert!(!first.replayed);

    let retry = saver.store(send(1, T0 + HOUR_MS - 1)).await.unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.stored, first.stored);
    for user in ["alice", "bob"] {
        assert_eq!(seqs_of(&saver, APP, user, T0).await, [1]);
    }

    // The same key in another app is another send.
    let other_app = saver
        .store(NewMessage {
            app: "app2".into(),
            ..send(2, T0)
        })
        .await
        .unwrap();
    assert!(!other_app.replayed);
}

async fn idempotency_key_past_its_ttl_stores_anew(db: TestDb) {
    let saver = db.open().await;
    let alice = users(&["alice"]);
    let x = Bytes::from_static(b"x");
    let send = |now_ms| NewMessage {
        app: APP.into(),
        users: alice.clone(),
        payload: x.clone(),
        ttl_ms: HOUR_MS,
        now_ms,
        idempotency_key: Some("send-1".into()),
        notice: None,
    };
    let first = saver.store(send(T0)).await.unwrap();
    let expired = T0 + HOUR_MS;
    let second = saver.store(send(expired)).await.unwrap();
    assert!(!second.replayed);
    assert_eq!(second.stored[0].seq, 2);
    assert_ne!(second.stored[0].message_id, first.stored[0].message_id);

    // The replaced key now replays the second result.
    let third = saver.store(send(expired + 1)).await.unwrap();
    assert!(third.replayed);
    assert_eq!(third.stored, second.stored);
}

async fn messages_after_pages_in_order_and_flags_more(db: TestDb) {
    let saver = db.open().await;
    let alice = users(&["alice"]);
    for payload in [b"1", b"2", b"3", b"4", b"5"] {
        store(&saver, APP, &alice, payload, T0).await;
    }
    let page = |after, limit| saver.messages_after(APP, "alice", after, limit, T0);

    let (messages, more) = page(0, 2).await.unwrap();
    assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(&messages[1].payload[..], b"2");
    assert!(more);
    let (messages, more) = page(2, 2).await.unwrap();
    assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);
    assert!(more);
    let (messages, more) = page(4, 2).await.unwrap();
    assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [5]);
    assert!(!more);
    let (messages, more) = page(3, 2).await.unwrap();
    assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [4, 5]);
    assert!(!more, "exactly `limit` left is not more");
    let (messages, more) = page(5, 2).await.unwrap();
    assert!(messages.is_empty() && !more);
    let (messages, more) = page(0, 0).await.unwrap();
    assert!(messages.is_empty() && more);
    let (messages, more) = page(u64::MAX, 10).await.unwrap();
    assert!(messages.is_empty() && !more);
}

async fn messages_after_caps_the_limit(db: TestDb) {
    let saver = db.open().await;
    // A user listed n times gets n seqs in one transaction.
    let many = vec!["alice".to_string(); MESSAGES_AFTER_LIMIT_MAX as usize + 1];
    store(&saver, APP, &many, b"x", T0).await;
    let (messages, more) = saver
        .messages_after(APP, "alice", 0, u32::MAX, T0)
        .await
        .unwrap();
    assert_eq!(messages.len(), MESSAGES_AFTER_LIMIT_MAX as usize);
    assert!(more);
}

async fn messages_after_skips_expired_messages(db: TestDb) {
    let saver = db.open().await;
    let alice = users(&["alice"]);
    let x = Bytes::from_static(b"x");
    let send = |ttl_ms| NewMessage {
        app: APP.into(),
        users: alice.clone(),
        payload: x.clone(),
        ttl_ms,
        now_ms: T0,
        idempotency_key: None,
        notice: None,
    };
    saver.store(send(HOUR_MS)).await.unwrap(); // seq 1
    saver.store(send(10)).await.unwrap(); // seq 2, expires first
    saver.store(send(HOUR_MS)).await.unwrap(); // seq 3

    assert_eq!(seqs_of(&saver, APP, "alice", T0 + 9).await, [1, 2, 3]);
    assert_eq!(seqs_of(&saver, APP, "alice", T0 + 10).await, [1, 3]);
    // The `more` flag counts only unexpired messages.
    let (messages, more) = saver
        .messages_after(APP, "alice", 0, 1, T0 + HOUR_MS - 1)
        .await
        .unwrap();
    assert_eq!(messages[0].seq, 1);
    assert!(more);
    let (messages, more) = saver
        .messages_after(APP, "alice", 1, 1, T0 + HOUR_MS)
        .await
        .unwrap();
    assert!(messages.is_empty() && !more);
}

/// Alice's `device` acked up to `acked_seq`.
fn ack(device: &'static str, acked_seq: u64) -> AckCursor<'static> {
    AckCursor {
        app: APP,
        user: "alice",
        device_id: device,
        acked_seq,
    }
}

async fn device_cursors_only_rise(db: TestDb) {
    let saver = db.open().await;
    assert_eq!(cursor(&saver, "phone").await, None);

    saver
        .save_acks(&[ack("phone", 5), ack("laptop", 2)], T0)
        .await
        .unwrap();
    assert_eq!(cursor(&saver, "phone").await, Some(5));
    assert_eq!(cursor(&saver, "laptop").await, Some(2));

    saver.save_acks(&[ack("phone", 3)], T0 + 1).await.unwrap();
    assert_eq!(cursor(&saver, "phone").await, Some(5));

    // Within one batch the highest wins whatever the order.
    saver
        .save_acks(&[ack("phone", 9), ack("phone", 7)], T0 + 2)
        .await
        .unwrap();
    assert_eq!(cursor(&saver, "phone").await, Some(9));

    saver.save_acks(&[], T0 + 3).await.unwrap();
    let others = saver
        .inbox_heads(&[
            key(APP, "bob", Some("phone")),
            key("app2", "alice", Some("phone")),
        ])
        .await
        .unwrap();
    assert!(others.iter().all(|head| head.acked_seq.is_none()));
}

/// Stored counts what has not expired; unacked, what no device of the
/// message's user holds (one device's ack is enough).
async fn message_counts_tell_stored_from_unacked(db: TestDb) {
    let saver = db.open().await;
    let counts = |now_ms| {
        let saver = saver.clone();
        async move { saver.message_counts(APP, now_ms).await.unwrap() }
    };
    assert_eq!(
        counts(T0).await,
        MessageCounts {
            stored: 0,
            unacked: 0
        }
    );
    for _ in 0..3 {
        store(&saver, APP, &users(&["alice", "bob"]), b"m", T0).await;
    }
    store(&saver, "app2", &users(&["alice"]), b"other app", T0).await;
    assert_eq!(
        counts(T0).await,
        MessageCounts {
            stored: 6,
            unacked: 6
        }
    );
    // Alice's laptop holds 2 of her 3; her phone none.
    saver
        .save_acks(&[ack("laptop", 2), ack("phone", 0)], T0)
        .await
        .unwrap();
    assert_eq!(
        counts(T0).await,
        MessageCounts {
            stored: 6,
            unacked: 4
        }
    );
    // An hour on, every one has expired.
    assert_eq!(
        counts(T0 + HOUR_MS).await,
        MessageCounts {
            stored: 0,
            unacked: 0
        }
    );
}

/// A cursor left past its inbox by a reset goes down, and only down.
async fn a_device_cursor_can_be_lowered_for_a_reset(db: TestDb) {
    let saver = db.open().await;
    saver
        .save_acks(&[ack("phone", 9), ack("laptop", 2)], T0)
        .await
        .unwrap();
    saver.lower_ack_cursor(&ack("phone", 0)).await.unwrap();
    saver.lower_ack_cursor(&ack("laptop", 5)).await.unwrap();
    saver.lower_ack_cursor(&ack("tablet", 0)).await.unwrap();
    assert_eq!(cursor(&saver, "phone").await, Some(0));
    assert_eq!(cursor(&saver, "laptop").await, Some(2), "never raised");
    assert_eq!(cursor(&saver, "tablet").await, None, "never created");
    saver.save_acks(&[ack("phone", 1)], T0 + 1).await.unwrap();
    assert_eq!(
        cursor(&saver, "phone").await,
        Some(1),
        "rises again from there"
    );
}

/// Alice's `device`'s fill starts after `after`: how many binds in a row
/// started there.
async fn fill_start(saver: &Saver, device: &str, after: u64, now_ms: u64) -> u64 {
    let start = FillStart {
        app: APP,
        user: "alice",
        device_id: device,
        after,
    };
    saver.count_fill_start(&start, now_ms).await.unwrap()
}

/// Fills starting at one seq are counted in a row per device; a new start
/// counts from 1 again, and acks leave the count alone.
async fn fill_starts_are_counted_in_a_row_per_device(db: TestDb) {
    let saver = db.open().await;
    assert_eq!(fill_start(&saver, "phone", 0, T0).await, 1);
    assert_eq!(
        cursor(&saver, "phone").await,
        Some(0),
        "a device that never acked gets a cursor at 0"
    );
    assert_eq!(fill_start(&saver, "phone", 0, T0 + 1).await, 2);
    assert_eq!(fill_start(&saver, "laptop", 0, T0 + 1).await, 1);
    saver.save_acks(&[ack("phone", 4)], T0 + 2).await.unwrap();
    assert_eq!(
        fill_start(&saver, "phone", 0, T0 + 3).await,
        3,
        "acks do not reset it"
    );
    assert_eq!(
        cursor(&saver, "phone").await,
        Some(4),
        "nor does it move the cursor"
    );
    assert_eq!(
        fill_start(&saver, "phone", 4, T0 + 4).await,
        1,
        "a new start"
    );
    assert_eq!(fill_start(&saver, "phone", 4, T0 + 5).await, 2);
    assert_eq!(fill_start(&saver, "phone", 0, T0 + 6).await, 1);
}

/// Every node on a database reads one epoch; a new database has another.
async fn the_storage_epoch_is_written_once_per_database(db: TestDb) {
    let nodes = [db.open().await, db.open().await];
    let first = nodes[0].storage_epoch().await.unwrap();
    assert_eq!(nodes[1].storage_epoch().await.unwrap(), first);
    assert_eq!(nodes[0].storage_epoch().await.unwrap(), first);
    db.execute("DELETE FROM storage_epoch").await;
    let renewed = nodes[1].storage_epoch().await.unwrap();
    assert_ne!(renewed, first, "an emptied database gets a new epoch");
}

async fn broadcast_head_counts_expired_ones_too(db: TestDb) {
    let saver = db.open().await;
    assert_eq!(saver.broadcast_head(APP).await.unwrap(), 0);
    for ttl_ms in [10, HOUR_MS, 10] {
        saver
            .store_broadcast(NewBroadcast {
                app: APP,
                payload: b"b",
                required_tags: &[],
                ttl_ms,
                now_ms: T0,
            })
            .await
            .unwrap();
    }
    saver.purge_expired(T0 + 20).await.unwrap();
    assert_eq!(saver.broadcast_head(APP).await.unwrap(), 3);
    assert_eq!(saver.broadcast_head("app2").await.unwrap(), 0);
}

async fn purge_removes_only_expired_rows(db: TestDb) {
    let saver = db.open().await;
    let alice = users(&["alice"]);
    let x = Bytes::from_static(b"x");
    let send = |ttl_ms, idempotency_key| NewMessage {
        app: APP.into(),
        users: alice.clone(),
        payload: x.clone(),
        ttl_ms,
        now_ms: T0,
        idempotency_key,
        notice: None,
    };
    saver.store(send(10, Some("short".into()))).await.unwrap(); // seq 1
    saver
        .store(send(HOUR_MS, Some("long".into())))
        .await
        .unwrap(); // seq 2
    saver.store(send(20, None)).await.unwrap(); // seq 3

    assert_eq!(saver.purge_expired(T0 + 9).await.unwrap(), 0);
    assert_eq!(saver.purge_expired(T0 + 20).await.unwrap(), 2);
    // Read with a clock before any expiry: only what purge left is there.
    assert_eq!(seqs_of(&saver, APP, "alice", T0).await, [2]);
    assert_eq!(saver.purge_expired(T0 + 20).await.unwrap(), 0);

    // The unexpired key still replays.
    assert!(
        saver
            .store(send(HOUR_MS, Some("long".into())))
            .await
            .unwrap()
            .replayed
    );
}

async fn purge_loops_over_batches(db: TestDb) {
    let saver = db.open().await;
    let rows = PURGE_BATCH_ROWS as usize + 1;
    let many = vec!["alice".to_string(); rows];
    store(&saver, APP, &many, b"x", T0).await;
    assert_eq!(
        saver.purge_expired(T0 + HOUR_MS).await.unwrap(),
        rows as u64
    );
}

async fn stored_messages_survive_close_and_reopen(db: TestDb) {
    let alice = users(&["alice"]);

    let saver = db.open().await;
    let first = store(&saver, APP, &alice, b"before close", T0).await;
    saver
        .save_acks(
            &[AckCursor {
                app: APP,
                user: "alice",
                device_id: "phone",
                acked_seq: 1,
            }],
            T0,
        )
        .await
        .unwrap();
    saver.close().await;
    saver.close().await; // A second close is harmless.
    assert!(matches!(
        saver.ping().await,
        Err(StorageError::Unavailable(_))
    ));

    // Opening again runs the (already applied) migrations a second time.
    let saver = db.open().await;
    let (messages, _) = saver.messages_after(APP, "alice", 0, 10, T0).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].message_id, first.stored[0].message_id);
    assert_eq!(&messages[0].payload[..], b"before close");
    assert_eq!(cursor(&saver, "phone").await, Some(1));
    assert_eq!(
        store(&saver, APP, &alice, b"after", T0).await.stored[0].seq,
        2
    );

    // Dropped without close: committed data is still there.
    drop(saver);
    let saver = db.open().await;
    assert_eq!(seqs_of(&saver, APP, "alice", T0).await, [1, 2]);
    saver.close().await;
}

async fn concurrent_stores_get_gapless_distinct_seqs(db: TestDb) {
    const STORES: u64 = 200;
    let saver = db.open().await;
    let tasks: Vec<_> = (0..STORES)
        .map(|i| {
            let saver = saver.clone();
            tokio::spawn(async move {
                // Every other call also writes to its own inbox.
                let users = if i % 2 == 0 {
                    vec!["alice".to_string()]
                } else {
                    vec![format!("user-{i}"), "alice".to_string()]
                };
                saver
                    .store(NewMessage {
                        app: APP.into(),
                        users: users.clone(),
                        payload: Bytes::copy_from_slice(&i.to_be_bytes()),
                        ttl_ms: HOUR_MS,
                        now_ms: T0,
                        idempotency_key: None,
                        notice: None,
                    })
                    .await
            })
        })
        .collect();
    let mut seqs = HashSet::new();
    let mut payload_of_seq = std::collections::HashMap::new();
    for (i, task) in (0..STORES).zip(tasks) {
        let outcome = task.await.unwrap().expect("store failed under concurrency");
        let alice = outcome.stored.last().unwrap();
        assert_eq!(alice.user, "alice");
        assert!(seqs.insert(alice.seq), "duplicate seq");
        payload_of_seq.insert(alice.seq, i.to_be_bytes().to_vec());
        if i % 2 == 1 {
            assert_eq!(outcome.stored[0].seq, 1, "user-{i}'s first message");
        }
    }
    assert_eq!(seqs, (1..=STORES).collect::<HashSet<_>>());
    let (stored, _) = saver
        .messages_after(APP, "alice", 0, MESSAGES_AFTER_LIMIT_MAX, T0)
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|message| message.seq).collect::<Vec<_>>(),
        (1..=STORES).collect::<Vec<_>>()
    );
    for message in &stored {
        assert_eq!(
            message.payload[..],
            payload_of_seq[&message.seq][..],
            "the row stored under seq {} is another call's",
            message.seq
        );
    }
    let counts = saver.commit_counts();
    println!("{:?}: {STORES} concurrent stores in {counts:?}", db.engine);
    assert_eq!(counts.stores, STORES);
    // Stores that arrive while a commit is being synced share the next, on
    // every engine.
    assert!(counts.transactions < STORES / 4, "{counts:?}");
}

async fn empty_recipient_list_stores_nothing(db: TestDb) {
    let saver = db.open().await;
    let outcome = store(&saver, APP, &[], b"x", T0).await;
    assert_eq!(
        outcome,
        StoreOutcome {
            stored: Vec::new(),
            replayed: false
        }
    );
}

async fn ping_answers_while_open(db: TestDb) {
    let saver = db.open().await;
    saver.ping().await.unwrap();
}

async fn unreadable_idempotency_record_is_reported_as_corrupt(db: TestDb) {
    let saver = db.open().await;
    db.execute(
        "INSERT INTO idempotency_keys (app, idem_key, results, expires_at_ms) \
         VALUES ('app1', 'broken', 'not json', 9223372036854775807)",
    )
    .await;

    let alice = users(&["alice"]);
    let result = saver
        .store(NewMessage {
            app: APP.into(),
            users: alice.clone(),
            payload: Bytes::from_static(b"x"),
            ttl_ms: HOUR_MS,
            now_ms: T0,
            idempotency_key: Some("broken".into()),
            notice: None,
        })
        .await;
    assert!(
        matches!(result, Err(StorageError::Corrupt(_))),
        "{result:?}"
    );
}

async fn inbox_heads_answer_each_key_in_order_in_one_call(db: TestDb) {
    let saver = db.open().await;
    assert!(saver.inbox_heads(&[]).await.unwrap().is_empty());
    for _ in 0..3 {
        store(&saver, APP, &users(&["alice"]), b"a", T0).await;
    }
    store(&saver, APP, &users(&["bob"]), b"b", T0).await;
    saver
        .save_acks(
            &[AckCursor {
                app: APP,
                user: "alice",
                device_id: "phone",
                acked_seq: 2,
            }],
            T0,
        )
        .await
        .unwrap();

    let keys = [
        key(APP, "alice", Some("phone")),
        key(APP, "alice", Some("laptop")),
        key(APP, "alice", None),
        key(APP, "carol", Some("phone")),
        key("app2", "alice", Some("phone")),
        key(APP, "bob", None),
        // A name that would break naive string building is just a name.
        key(APP, "o'hara\"},[", Some("x")),
    ];
    let heads = saver.inbox_heads(&keys).await.unwrap();
    let expected = [
        (3, Some(2)),
        (3, None),
        (3, None),
        (0, None),
        (0, None),
        (1, None),
        (0, None),
    ];
    assert_eq!(
        heads,
        expected.map(|(last_seq, acked_seq)| InboxHead {
            last_seq,
            acked_seq
        })
    );

    // A large batch (as a reconnect storm makes) is still one answer per key.
    let many: Vec<InboxKey> = (0..5_000)
        .map(|i| key(APP, &format!("user{i}"), Some("phone")))
        .collect();
    let heads = saver.inbox_heads(&many).await.unwrap();
    assert_eq!(heads.len(), many.len());
}

/// Two savers on one database are two control nodes: their stores into one
/// inbox, and multicasts over overlapping users in opposite orders, must
/// still give every copy its own sequence with no gap.
async fn two_nodes_storing_at_once_get_gapless_distinct_seqs(db: TestDb) {
    const STORES_PER_NODE: u64 = 100;
    let nodes = [db.open().await, db.open().await];
    let mut tasks = Vec::new();
    for (n, saver) in nodes.iter().enumerate() {
        for i in 0..STORES_PER_NODE {
            let saver = saver.clone();
            tasks.push(tokio::spawn(async move {
                // Half the stores are multicasts whose user order differs
                // between the nodes: the deadlock-prone case.
                let recipients = match (i % 2, n) {
                    (0, _) => users(&["alice"]),
                    (_, 0) => users(&["alice", "bob", "carol"]),
                    _ => users(&["carol", "bob", "alice"]),
                };
                saver
                    .store(NewMessage {
                        app: APP.into(),
                        users: recipients.clone(),
                        payload: Bytes::copy_from_slice(&i.to_be_bytes()),
                        ttl_ms: HOUR_MS,
                        now_ms: T0,
                        idempotency_key: None,
                        notice: None,
                    })
                    .await
                    .expect("store failed with two nodes writing")
            }));
        }
    }
    let mut seqs: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for task in tasks {
        for stored in task.await.unwrap().stored {
            seqs.entry(stored.user).or_default().push(stored.seq);
        }
    }
    for (user, mut got) in seqs {
        got.sort_unstable();
        let expected: Vec<u64> = (1..=got.len() as u64).collect();
        assert_eq!(got, expected, "{user}'s sequences have a gap or a repeat");
        assert_eq!(seqs_of(&nodes[0], APP, &user, T0).await, expected);
    }
}

/// The same idempotency key sent to two nodes at once stores once: one
/// call stores, the other replays its result.
async fn one_key_sent_to_two_nodes_at_once_stores_once(db: TestDb) {
    let nodes = [db.open().await, db.open().await];
    one_key_sent_at_once_stores_once(&nodes, 8).await;
}

/// Many calls with one idempotency key at once on one node (on SQLite they
/// meet in one group commit) store once: one call stores, the others
/// replay its result.
async fn one_key_sent_many_times_at_once_to_one_node_stores_once(db: TestDb) {
    one_key_sent_at_once_stores_once(&[db.open().await], 64).await;
}

/// Sends `calls` stores with one idempotency key at once, spread over
/// `nodes`, and checks that exactly one stored and the rest replayed it.
async fn one_key_sent_at_once_stores_once(nodes: &[Saver], calls: usize) {
    let alice = users(&["alice"]);
    let calls = nodes.iter().cycle().take(calls).map(|saver| {
        let saver = saver.clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            saver
                .store(NewMessage {
                    app: APP.into(),
                    users: alice.clone(),
                    payload: Bytes::from_static(b"once"),
                    ttl_ms: HOUR_MS,
                    now_ms: T0,
                    idempotency_key: Some("order-7".into()),
                    notice: None,
                })
                .await
                .expect("store with a key failed")
        })
    });
    let outcomes: Vec<StoreOutcome> = joined(calls).await;
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    assert!(outcomes.iter().all(|o| o.stored == outcomes[0].stored));
    assert_eq!(
        seqs_of(&nodes[nodes.len() - 1], APP, "alice", T0).await,
        [1]
    );
}

/// Statements that make the database refuse any message row for the user
/// `poison`, in each engine's dialect.
fn poison_trigger(engine: engines::Engine) -> &'static [&'static str] {
    match engine {
        engines::Engine::Sqlite => &["CREATE TRIGGER poison BEFORE INSERT ON messages \
              WHEN NEW.user_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"],
        engines::Engine::MySql => &[
            "CREATE TRIGGER poison BEFORE INSERT ON messages FOR EACH ROW \
              BEGIN IF NEW.user_id = 'poison' THEN \
              SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned'; END IF; END",
        ],
        engines::Engine::Postgres => &[
            "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN \
             IF NEW.user_id = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER poison BEFORE INSERT ON messages \
             FOR EACH ROW EXECUTE FUNCTION poison()",
        ],
    }
}

/// A store that fails half way (its first recipient's row is written, the
/// database refuses the second's) fails alone: nothing of it is kept, and
/// the stores beside it (on SQLite, in the same group commit) are all
/// answered, durable, and given gapless sequences.
async fn a_store_that_fails_half_way_fails_alone(db: TestDb) {
    const STORES: u64 = 64;
    let saver = db.open().await;
    for statement in poison_trigger(db.engine) {
        db.execute(statement).await;
    }
    let poisoned = |i: u64| i % 8 == 3;
    let calls = (0..STORES).map(|i| {
        let saver = saver.clone();
        tokio::spawn(async move {
            let recipients = if poisoned(i) {
                users(&["alice", "poison"])
            } else {
                users(&["alice"])
            };
            saver
                .store(NewMessage {
                    app: APP.into(),
                    users: recipients.clone(),
                    payload: Bytes::copy_from_slice(&i.to_be_bytes()),
                    ttl_ms: HOUR_MS,
                    now_ms: T0,
                    idempotency_key: None,
                    notice: None,
                })
                .await
        })
    });
    let outcomes = joined(calls).await;
    let mut seqs = Vec::new();
    for (i, outcome) in (0..STORES).zip(&outcomes) {
        match outcome {
            Ok(outcome) => {
                assert!(!poisoned(i), "store {i} has a refused row yet succeeded");
                seqs.push(outcome.stored[0].seq);
            }
            Err(error) => assert!(poisoned(i), "store {i} failed: {error}"),
        }
    }
    seqs.sort_unstable();
    let good = (0..STORES).filter(|&i| !poisoned(i)).count() as u64;
    assert_eq!(seqs, (1..=good).collect::<Vec<_>>());
    assert_eq!(seqs_of(&saver, APP, "alice", T0).await, seqs);
    assert!(seqs_of(&saver, APP, "poison", T0).await.is_empty());
}

async fn joined<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut results = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        results.push(task.await.unwrap());
    }
    results
}

/// Broadcasts are stored once per app under a gapless per-app sequence,
/// read back after a point while unexpired, found by id, and purged.
async fn broadcasts_are_stored_once_per_app_in_sequence(db: TestDb) {
    let nodes = [db.open().await, db.open().await];
    let ios = vec!["platform=ios".to_owned()];
    let calls = (0..20u64).map(|i| {
        let saver = nodes[i as usize % 2].clone();
        let tags = if i == 0 { ios.clone() } else { Vec::new() };
        tokio::spawn(async move {
            saver
                .store_broadcast(NewBroadcast {
                    app: APP,
                    payload: &Bytes::copy_from_slice(&i.to_be_bytes()),
                    required_tags: &tags,
                    ttl_ms: if i == 19 { 10 } else { HOUR_MS },
                    now_ms: T0,
                })
                .await
                .expect("broadcast store failed")
        })
    });
    let stored = joined(calls).await;
    let mut seqs: Vec<u64> = stored.iter().map(|b| b.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "gap or duplicate");
    let other = nodes[0]
        .store_broadcast(NewBroadcast {
            app: "app2",
            payload: b"x",
            required_tags: &[],
            ttl_ms: HOUR_MS,
            now_ms: T0,
        })
        .await
        .unwrap();
    assert_eq!(other.seq, 1, "each app counts its own");

    // The one with a 10 ms TTL (whatever seq it drew) has expired by T0 + 1 s.
    let after_5 = nodes[1]
        .broadcasts_after(APP, 5, 100, T0 + 1_000)
        .await
        .unwrap();
    let unexpired_after_5 = stored
        .iter()
        .filter(|b| b.seq > 5 && b.expires_at_ms > T0 + 1_000)
        .count();
    assert_eq!(after_5.len(), unexpired_after_5);
    assert!((14..=15).contains(&unexpired_after_5));
    assert!(after_5.windows(2).all(|w| w[0].seq < w[1].seq));
    let first = &stored[0];
    let found = nodes[1]
        .broadcast(APP, first.broadcast_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, *first);
    assert_eq!(found.required_tags, ios);
    assert!(
        nodes[1]
            .broadcast("app2", first.broadcast_id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        nodes[0]
            .broadcasts_after(APP, 0, 3, T0)
            .await
            .unwrap()
            .len(),
        3
    );

    nodes[0].purge_expired(T0 + 1_000).await.unwrap();
    assert_eq!(
        nodes[0]
            .broadcasts_after(APP, 0, 100, T0)
            .await
            .unwrap()
            .len(),
        19
    );
}

/// Stores committed together with payloads of every byte value, more of
/// them than one statement carries (MySQL's JSON arrays take 4 MiB of
/// payload), read back byte for byte.
async fn a_group_of_large_binary_payloads_reads_back_byte_for_byte(db: TestDb) {
    let waiting = GroupCommit {
        wait: std::time::Duration::from_millis(300),
        ..GroupCommit::default()
    };
    let saver = db.open_with(waiting).await;
    let payload =
        |i: usize| -> Vec<u8> { (0..(1 << 20) + i).map(|byte| (byte + i) as u8).collect() };
    let calls = (0..6).map(|i| {
        let saver = saver.clone();
        let payload = payload(i);
        tokio::spawn(async move {
            let user = format!("user{i}");
            store(&saver, APP, &users(&[&user]), &payload, T0).await
        })
    });
    joined(calls).await;
    assert!(
        saver.commit_counts().transactions < 6,
        "the stores were meant to share a group: {:?}",
        saver.commit_counts()
    );
    for i in 0..6 {
        let (messages, _) = saver
            .messages_after(APP, &format!("user{i}"), 0, 10, T0)
            .await
            .unwrap();
        assert_eq!(messages.len(), 1);
        assert!(
            messages[0].payload[..] == payload(i)[..],
            "payload {i} differs"
        );
    }
}

/// The committers keep to their bounds: one call a transaction when told
/// so, and calls a few milliseconds apart in one transaction when told to
/// wait for company.
async fn group_commit_keeps_to_its_bounds(db: TestDb) {
    let one_a_transaction = GroupCommit {
        stores_max: 1,
        ..GroupCommit::default()
    };
    let saver = db.open_with(one_a_transaction).await;
    let calls = (0..20u64).map(|i| {
        let saver = saver.clone();
        tokio::spawn(
            async move { store(&saver, APP, &users(&["alice"]), &i.to_be_bytes(), T0).await },
        )
    });
    joined(calls).await;
    assert_eq!(
        saver.commit_counts(),
        CommitCounts {
            transactions: 20,
            stores: 20
        }
    );

    let waiting = GroupCommit {
        wait: std::time::Duration::from_millis(500),
        ..GroupCommit::default()
    };
    let saver = db.open_with(waiting).await;
    let mut calls = Vec::new();
    for i in 0..3u64 {
        let saver = saver.clone();
        calls.push(tokio::spawn(async move {
            store(&saver, APP, &users(&["alice"]), &i.to_be_bytes(), T0).await
        }));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    joined(calls.into_iter()).await;
    assert_eq!(
        saver.commit_counts(),
        CommitCounts {
            transactions: 1,
            stores: 3
        }
    );
}

async fn an_app_is_created_once_changed_by_version_and_deleted_with_its_rows(db: TestDb) {
    let saver = db.open().await;
    assert!(saver.apps().await.unwrap().is_empty());
    assert!(saver.create_app("chat", "{}", "{\"k\":1}").await.unwrap());
    assert!(
        !saver
            .create_app("chat", "{\"other\":1}", "{}")
            .await
            .unwrap()
    );
    let [chat] = <[StoredApp; 1]>::try_from(saver.apps().await.unwrap()).unwrap();
    assert_eq!(
        chat,
        StoredApp {
            id: "chat".into(),
            settings: "{}".into(),
            secrets: "{\"k\":1}".into(),
            version: 1,
            deleted_at_ms: None,
        }
    );

    // A change made against a version read before another change is refused.
    assert!(
        saver
            .update_app("chat", "{\"a\":1}", "{}", 1)
            .await
            .unwrap()
    );
    assert!(
        !saver
            .update_app("chat", "{\"b\":1}", "{}", 1)
            .await
            .unwrap()
    );
    assert!(!saver.update_app("nope", "{}", "{}", 1).await.unwrap());
    let chat = saver.apps().await.unwrap().remove(0);
    assert_eq!((chat.settings.as_str(), chat.version), ("{\"a\":1}", 2));

    // The app's rows, and another app's, which must stay.
    let many = vec!["alice".to_string(); PURGE_BATCH_ROWS as usize + 1];
    store(&saver, "chat", &many, b"x", T0).await;
    store(&saver, "chat", &users(&["bob"]), b"y", T0).await;
    store(&saver, APP, &users(&["alice"]), b"z", T0).await;
    saver
        .save_acks(
            &[AckCursor {
                app: "chat",
                user: "bob",
                device_id: "d1",
                acked_seq: 1,
            }],
            T0,
        )
        .await
        .unwrap();
    saver
        .store_broadcast(NewBroadcast {
            app: "chat",
            payload: b"all",
            required_tags: &[],
            ttl_ms: HOUR_MS,
            now_ms: T0,
        })
        .await
        .unwrap();

    assert!(saver.mark_app_deleted("chat", T0).await.unwrap());
    assert!(!saver.mark_app_deleted("chat", T0).await.unwrap());
    let chat = saver.apps().await.unwrap().remove(0);
    assert_eq!((chat.deleted_at_ms, chat.version), (Some(T0), 3));
    // Deleted, not yet purged: the id is not free and nothing changes it.
    assert!(!saver.create_app("chat", "{}", "{}").await.unwrap());
    assert!(!saver.update_app("chat", "{}", "{}", 3).await.unwrap());

    // Messages, heads, a cursor and a broadcast and its head.
    let rows = PURGE_BATCH_ROWS as u64 + 1 + 1 + 2 + 1 + 1 + 1;
    assert_eq!(saver.purge_app("chat").await.unwrap(), rows);
    assert_eq!(saver.purge_app("chat").await.unwrap(), 0);
    assert!(saver.apps().await.unwrap().is_empty());
    assert!(seqs_of(&saver, "chat", "bob", T0).await.is_empty());
    assert_eq!(saver.broadcast_head("chat").await.unwrap(), 0);
    assert_eq!(seqs_of(&saver, APP, "alice", T0).await, [1]);
    // The id is free again, and the new app's inboxes start at 1.
    assert!(saver.create_app("chat", "{}", "{}").await.unwrap());
    assert_eq!(
        store(&saver, "chat", &users(&["bob"]), b"new", T0)
            .await
            .stored[0]
            .seq,
        1
    );
}

on_every_engine!(
    seqs_rise_per_inbox_and_are_independent_across_users_and_apps,
    stored_message_reads_back_as_written,
    a_notice_reads_back_with_its_message,
    seq_is_not_reused_after_purge,
    multicast_shares_one_message_id_and_gives_each_user_one_seq,
    idempotent_replay_returns_the_first_result_and_stores_nothing,
    idempotency_key_past_its_ttl_stores_anew,
    messages_after_pages_in_order_and_flags_more,
    messages_after_caps_the_limit,
    messages_after_skips_expired_messages,
    device_cursors_only_rise,
    a_device_cursor_can_be_lowered_for_a_reset,
    fill_starts_are_counted_in_a_row_per_device,
    message_counts_tell_stored_from_unacked,
    the_storage_epoch_is_written_once_per_database,
    broadcast_head_counts_expired_ones_too,
    purge_removes_only_expired_rows,
    purge_loops_over_batches,
    stored_messages_survive_close_and_reopen,
    concurrent_stores_get_gapless_distinct_seqs,
    empty_recipient_list_stores_nothing,
    ping_answers_while_open,
    unreadable_idempotency_record_is_reported_as_corrupt,
    inbox_heads_answer_each_key_in_order_in_one_call,
    two_nodes_storing_at_once_get_gapless_distinct_seqs,
    one_key_sent_to_two_nodes_at_once_stores_once,
    one_key_sent_many_times_at_once_to_one_node_stores_once,
    a_store_that_fails_half_way_fails_alone,
    broadcasts_are_stored_once_per_app_in_sequence,
    group_commit_keeps_to_its_bounds,
    a_group_of_large_binary_payloads_reads_back_byte_for_byte,
    an_app_is_created_once_changed_by_version_and_deleted_with_its_rows,
);
