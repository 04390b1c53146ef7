//! The Redis register against a real Redis: what a room node writes, a
//! control node reads; a node's restart or departure hides its sessions and
//! they are cleaned up; a lost register is refilled. Redis is found at
//! `HERALD_TEST_REDIS_URL` (default: the local server, logical database
//! 15, emptied first). Without it the test is skipped, except under
//! CI=true, where it fails.

use std::sync::Arc;

use herald_control::cluster::{LoadProbe, NodeDirectory, RedisRegister, RoomLink, connect};
use herald_control::{Change, Register, Session};
use herald_proto::NetworkType;
use herald_proto::plane::ConnId;

async fn redis() -> Option<redis::Client> {
    let server = std::env::var("HERALD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let url = format!("{server}/15");
    let client = redis::Client::open(url.as_str()).unwrap();
    let flushed: redis::RedisResult<()> = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("FLUSHDB").query_async(&mut conn).await
    }
    .await;
    match flushed {
        Ok(()) => Some(client),
        Err(error) => {
            let message = format!("Redis is not reachable at {url} ({error})");
            assert!(std::env::var_os("CI").is_none(), "{message}");
            eprintln!("SKIPPED: {message}; start it with scripts/start-services.sh");
            None
        }
    }
}

/// A room node's register and heartbeat, as `herald room` wires them.
async fn room(client: &redis::Client, node: &str, instance: u64) -> Arc<RoomLink> {
    let manager = connect(client).await.unwrap();
    let directory = Arc::new(NodeDirectory::redis(manager.clone()));
    let register = Arc::new(RedisRegister::writer(
        manager.clone(),
        directory,
        node.to_owned(),
        instance,
    ));
    Arc::new(RoomLink {
        client: client.clone(),
        redis: manager,
        register,
        node: node.to_owned(),
        instance,
        gateway: format!("{node}:7070"),
        region: String::new(),
    })
}

async fn reader(client: &redis::Client) -> RedisRegister {
    let manager = connect(client).await.unwrap();
    RedisRegister::reader(manager.clone(), Arc::new(NodeDirectory::redis(manager)))
}

fn conn(slot: u32) -> ConnId {
    ConnId {
        shard: 0,
        slot,
        generation: 1,
    }
}

fn add(user: &str, slot: u32, node: &str, instance: u64) -> Change {
    Change::Add {
        app: "chat".to_owned(),
        user: user.to_owned(),
        session: Session {
            conn: conn(slot),
            node: node.to_owned(),
            instance,
            device_id: format!("device-{slot}"),
            network: NetworkType::Wifi,
            connected_at_ms: 5,
        },
    }
}

fn idle() -> LoadProbe {
    Box::new(|| (0, 0.0))
}

#[tokio::test]
async fn sessions_follow_their_node_through_storms_restarts_and_a_flush() {
    let Some(client) = redis().await else {
        return;
    };
    let control = reader(&client).await;
    let first_run = room(&client, "room-a", 1).await;
    assert!(
        first_run.heartbeat(&idle()).await.unwrap(),
        "a first beat finds no record"
    );
    assert!(!first_run.heartbeat(&idle()).await.unwrap());

    // A reconnect storm, written in pipelines, read back by another node.
    let storm: Vec<Change> = (0..20_000)
        .map(|i| add(&format!("user{i}"), i, "room-a", 1))
        .collect();
    first_run.register.apply(storm).await.unwrap();
    for i in [0, 9_999, 19_999] {
        let sessions = control.sessions("chat", &format!("user{i}")).await.unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(
            (sessions[0].node.as_str(), sessions[0].conn.slot),
            ("room-a", i)
        );
    }
    let remove = Change::Remove {
        app: "chat".to_owned(),
        user: "user0".to_owned(),
        conn: conn(0),
    };
    first_run.register.apply(vec![remove]).await.unwrap();
    assert!(control.sessions("chat", "user0").await.unwrap().is_empty());

    // Redis loses everything: the next beat says so, and the node writes
    // its sessions again.
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHDB")
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    assert!(control.sessions("chat", "user1").await.unwrap().is_empty());
    assert!(
        first_run.heartbeat(&idle()).await.unwrap(),
        "the loss is noticed"
    );
    assert_eq!(first_run.register.rewrite_own().await.unwrap(), 19_999);
    assert_eq!(control.sessions("chat", "user1").await.unwrap().len(), 1);

    // The node restarts: its old run's sessions no longer count, and the
    // reader that finds them removes them.
    let second_run = room(&client, "room-a", 2).await;
    second_run.heartbeat(&idle()).await.unwrap();
    second_run
        .register
        .apply(vec![add("user1", 7, "room-a", 2)])
        .await
        .unwrap();
    let sessions = control.sessions("chat", "user1").await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!((sessions[0].instance, sessions[0].conn.slot), (2, 7));
    let fields: usize = redis::cmd("HLEN")
        .arg("herald:{chat:user1}:sessions")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(fields, 1, "the dead run's entry was removed");

    // A node that leaves takes its sessions with it, once readers look at
    // the live nodes again (they reuse their view for a second).
    second_run.leave().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while !control.sessions("chat", "user1").await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the departed node still counts"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
