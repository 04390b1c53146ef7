//! The Redis register against a real Redis and a real Redis Cluster: what
//! a room node writes, a control node reads; a node's restart or departure
//! hides its sessions and they are cleaned up; a lost register is refilled;
//! a timed-out session waits for its device's next bind (and the same in
//! memory).
//! The single server is `HERALD_TEST_REDIS_URL` (default: the local one,
//! logical database 15, emptied first); the cluster is three redis-server
//! processes the test starts. Without them the test is skipped, except
//! under CI=true, where it fails.

mod support;

use std::sync::Arc;

use herald_control::cluster::connection::{RedisConn, RedisTarget, connect};
use herald_control::cluster::directory::{LoadProbe, NodeDirectory, NodeLoad};
use herald_control::cluster::register::RedisRegister;
use herald_control::link::RoomLink;
use herald_control::register::{DeviceBinding, SessionTimeout};
use herald_control::{Change, MemoryRegister, Register, Session};
use herald_proto::NetworkType;
use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::ConnId;
use support::cluster::{PrivateRedisCluster, flush_redis, redis_server_url, service_missing};

/// A room node's register and heartbeat, as `herald room` wires them.
async fn room(target: &RedisTarget, node: &str, instance: u64) -> Arc<RoomLink> {
    let manager = connect(target).await.unwrap();
    let directory = Arc::new(NodeDirectory::redis(manager.clone()));
    let register = Arc::new(RedisRegister::writer(
        manager.clone(),
        directory,
        node.to_owned(),
        instance,
    ));
    Arc::new(RoomLink {
        target: target.clone(),
        redis: manager,
        register,
        node: node.to_owned(),
        instance,
        gateways: [("tcp".to_owned(), format!("{node}:7070"))].into(),
        region: String::new(),
    })
}

async fn reader(target: &RedisTarget) -> RedisRegister {
    let manager = connect(target).await.unwrap();
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
        app: AppId::from("chat"),
        user: UserId::from(user),
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
    Box::new(NodeLoad::default)
}

#[tokio::test]
async fn on_one_redis() {
    let url = format!("{}/15", redis_server_url());
    if let Err(error) = flush_redis(&url).await {
        let message = format!(
            "Redis is not reachable at {url} ({error}); start it with scripts/start-services.sh"
        );
        service_missing("on_one_redis", message);
        return;
    }
    let target = RedisTarget::Single(url.clone());
    sessions_follow_their_node(&target, || async { flush_redis(&url).await.unwrap() }).await;
    let room = room(&target, "room-t", 1).await;
    timeouts_wait_for_the_next_bind(&*room.register).await;
}

#[tokio::test]
async fn timeouts_in_memory() {
    timeouts_wait_for_the_next_bind(&MemoryRegister::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster() {
    let Some(cluster) = PrivateRedisCluster::start("on_a_redis_cluster") else {
        return;
    };
    sessions_follow_their_node(&cluster.target(), || async { cluster.flush() }).await;
    let room = room(&cluster.target(), "room-t", 1).await;
    timeouts_wait_for_the_next_bind(&*room.register).await;
}

/// A session closed at its heartbeat deadline is told to its device's next
/// bind of the app, once; not if the device already had another session
/// (it came back by itself), nor after it expires.
async fn timeouts_wait_for_the_next_bind(register: &dyn Register) {
    let binding = |user: &str, device: &str| DeviceBinding {
        app: AppId::from("chat"),
        user: UserId::from(user),
        device_id: device.to_owned(),
    };
    let timeout = SessionTimeout {
        network: NetworkType::Cellular4g,
        interval_ms: 45_000,
        closed_at_ms: 1_764_000_000_000,
    };
    let minute = std::time::Duration::from_secs(60);
    let remember = |binding, kept_for| async move {
        register
            .remember_timeouts(vec![(binding, timeout)], kept_for)
            .await
            .unwrap();
    };
    let take = |binding| async move {
        let taken = register.take_timeouts(vec![binding]).await.unwrap();
        taken[0]
    };
    // Device 1 of tim times out; tim's device 2 is still connected.
    register
        .apply(vec![add("tim", 1, "room-t", 1), add("tim", 2, "room-t", 1)])
        .await
        .unwrap();
    let removed = Change::Remove {
        app: AppId::from("chat"),
        user: UserId::from("tim"),
        conn: conn(1),
    };
    register.apply(vec![removed]).await.unwrap();
    remember(binding("tim", "device-1"), minute).await;
    let asked = vec![
        binding("tim", "device-1"),
        binding("tim", "device-2"),
        binding("tom", "device-1"),
    ];
    assert_eq!(
        register.take_timeouts(asked.clone()).await.unwrap(),
        [Some(timeout), None, None]
    );
    assert_eq!(
        register.take_timeouts(asked).await.unwrap(),
        [None, None, None],
        "told once"
    );
    // Device 2 reconnected (a new session) before its old one timed out.
    register
        .apply(vec![add("tim", 2, "room-t", 1)])
        .await
        .unwrap();
    remember(binding("tim", "device-2"), minute).await;
    assert_eq!(
        take(binding("tim", "device-2")).await,
        None,
        "the device came back by itself"
    );
    // Kept for a while only.
    let short = std::time::Duration::from_millis(50);
    remember(binding("tom", "device-1"), short).await;
    tokio::time::sleep(short * 3).await;
    assert_eq!(take(binding("tom", "device-1")).await, None, "expired");
}

/// The scenario on `target`; `flush` empties it.
async fn sessions_follow_their_node<F, Fut>(target: &RedisTarget, flush: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let control = reader(target).await;
    let first_run = room(target, "room-a", 1).await;
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
        app: AppId::from("chat"),
        user: UserId::from("user0"),
        conn: conn(0),
    };
    first_run.register.apply(vec![remove]).await.unwrap();
    assert!(control.sessions("chat", "user0").await.unwrap().is_empty());

    // Redis loses everything: the next beat says so, and the node writes
    // its sessions again.
    flush().await;
    assert!(control.sessions("chat", "user1").await.unwrap().is_empty());
    assert!(
        first_run.heartbeat(&idle()).await.unwrap(),
        "the loss is noticed"
    );
    assert_eq!(first_run.register.rewrite_own().await.unwrap(), 19_999);
    assert_eq!(control.sessions("chat", "user1").await.unwrap().len(), 1);

    // The node restarts: its old run's sessions no longer count, and the
    // reader that finds them removes them.
    let second_run = room(target, "room-a", 2).await;
    second_run.heartbeat(&idle()).await.unwrap();
    second_run
        .register
        .apply(vec![add("user1", 7, "room-a", 2)])
        .await
        .unwrap();
    let sessions = control.sessions("chat", "user1").await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!((sessions[0].instance, sessions[0].conn.slot), (2, 7));
    let mut raw: RedisConn = connect(target).await.unwrap();
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
