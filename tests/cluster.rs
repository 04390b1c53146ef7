//! Cluster mode end to end: `herald room` and `herald control` processes on
//! loopback, sharing one Redis (register, liveness, pub/sub) and one
//! MariaDB database (messages). See tests/support/cluster.rs for how the
//! engines are found, and why a test may be skipped outside CI.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use herald_proto::{Frame, GoAwayReason};
use serde_json::{Value, json};
use support::cluster::{
    ADMIN_KEY, Cluster, Database, Engines, PrivateRedis, PrivateRedisCluster, Relay, eventually,
};
use support::{
    API_KEY, APP, RawClient, Reaped, Server, WAIT, answered_pushes_survive_a_kill, app_token,
    herald_bin, line_after, lines_of, token,
};

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
    const TEST: &str = "pushes_presence_kicks_and_multicasts_cross_nodes";
    let Some(cluster) = Cluster::start(TEST, 3, 2).await else {
        return;
    };
    across_nodes(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_on_a_redis_cluster() {
    const TEST: &str = "the_same_on_a_redis_cluster";
    let Some(redis) = PrivateRedisCluster::start(TEST) else {
        return;
    };
    let Some(mut engines) = Engines::create(TEST).await else {
        return;
    };
    engines.redis = redis.target();
    across_nodes(&Cluster::start_on(engines, 3, 2, |_| None)).await;
}

/// Pushes through either control node, a multicast over users on every
/// room node, presence, dispatch and a kick.
async fn across_nodes(cluster: &Cluster) {
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

    // The app's stats sum what every room node's heartbeat reports.
    for (i, control) in cluster.controls.iter().enumerate() {
        eventually(
            &format!("control-{i}'s stats count 3 users on 3 nodes"),
            || async {
                let (_, stats) = control.get(&format!("/v1/apps/{APP}/stats"), API_KEY).await;
                stats["online_connections"] == 3
                    && stats["online_users"] == 3
                    && stats["nodes_reporting"] == 3
            },
        )
        .await;
    }

    // A push through either control node reaches the user wherever it is.
    for (j, client) in clients.iter_mut().enumerate() {
        let control = &cluster.controls[j % 2];
        let reply = control
            .push(&format!("user{j}"), &format!("hello {j}"))
            .await;
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
    assert_eq!(
        dispatch(&cluster.controls[1], "user0").await[0],
        gateways[0]
    );

    // A broadcast through a control node: one publish, every room node.
    let (status, reply) = cluster.controls[0]
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            json!({"payload": "everyone"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    for client in clients.iter_mut() {
        match client.recv().await {
            Some(Frame::Broadcast { seq, payload, .. }) => {
                assert_eq!((seq, &payload[..]), (1, &b"everyone"[..]));
            }
            other => panic!("expected BROADCAST, got {other:?}"),
        }
        client
            .send(Frame::BroadcastAck {
                app: APP.to_owned(),
                seq: 1,
            })
            .await;
    }
    // Each room node adds its share to the cluster-wide progress.
    let id = reply["broadcast_id"].as_str().unwrap().to_owned();
    eventually("the progress sums every room node", || async {
        let (_, report) = cluster.controls[1]
            .get(&format!("/v1/apps/{APP}/broadcasts/{id}"), API_KEY)
            .await;
        report["target"] == 3 && report["sent"] == 3 && report["acked"] == 3
    })
    .await;
    // The admin overview shows it done, and each room node's connections
    // by shard, from the heartbeats.
    eventually(
        "the overview shows every room node and the broadcast done",
        || async {
            let (_, overview) = cluster.controls[1]
                .get("/v1/admin/overview", ADMIN_KEY)
                .await;
            let Some(nodes) = overview["nodes"].as_array() else {
                return false;
            };
            let by_shard_adds_up = nodes.iter().all(|node| {
                let shards = node["shard_connections"].as_array().unwrap();
                !shards.is_empty()
                    && shards.iter().map(|n| n.as_u64().unwrap()).sum::<u64>()
                        == node["connections"].as_u64().unwrap()
            });
            let chat = overview["apps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|app| app["id"] == APP)
                .unwrap();
            let broadcast = &chat["broadcasts"][0];
            nodes.len() == cluster.rooms.len()
                && by_shard_adds_up
                && chat["online_connections"] == 3
                && broadcast["sent"] == 3
                && broadcast["in_progress"] == false
                && broadcast["percent"] == 100
        },
    )
    .await;

    // A kick through a control node reaches the user's room node.
    let (status, reply) = cluster.controls[0]
        .post(
            &format!("/v1/apps/{APP}/users/user2/kick"),
            API_KEY,
            String::new(),
        )
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

/// What the SDK clients of one test have seen, by user.
#[derive(Default)]
struct Seen {
    /// Message ids received, in order, duplicates included.
    received: HashMap<String, Vec<String>>,
    /// The gateway each user's client last connected to.
    gateway: HashMap<String, String>,
}

/// Starts one SDK client per user, dispatched by `api`, recording what it
/// receives; each push is acked (auto mode) once its next event is asked.
fn start_clients(
    api: &support::Server,
    users: &[String],
) -> (
    std::sync::Arc<std::sync::Mutex<Seen>>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    use herald_client::{Client, ClientOptions, Dispatch, Event, Transport};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let tasks = users
        .iter()
        .map(|user| {
            let options = ClientOptions {
                dispatch: Some(Dispatch {
                    url: format!("http://{}", api.api),
                    app: APP.to_owned(),
                    user: user.clone(),
                    region: None,
                    transport: Transport::Tcp,
                }),
                device_id: format!("dev-{user}"),
                client_version: "cluster-test".to_owned(),
                // Never used: the dispatcher answers.
                ..support::sdk_options("127.0.0.1:1", support::token(user, 3600))
            };
            let seen = seen.clone();
            let user = user.clone();
            tokio::spawn(async move {
                let mut client = Client::start(options);
                while let Some(event) = client.next_event().await {
                    let mut seen = seen.lock().unwrap();
                    match event {
                        Event::Connected { gateway, .. } => {
                            seen.gateway.insert(user.clone(), gateway);
                        }
                        Event::Push(push) => seen
                            .received
                            .entry(user.clone())
                            .or_default()
                            .push(push.message_id.to_string()),
                        _ => {}
                    }
                }
            })
        })
        .collect();
    (seen, tasks)
}

/// Pushes to `users` in turn through the control nodes in turn, `rate` a
/// second for `duration`, calling `midway` once half way; returns the ids
/// of the messages the API accepted (200), by user, and the refusals.
async fn push_steadily(
    controls: &[support::Server],
    users: &[String],
    rate: u32,
    duration: Duration,
    midway: impl FnOnce(),
) -> (BTreeMap<String, Vec<String>>, usize) {
    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut refused = 0;
    let mut midway = Some(midway);
    let pushes = (rate as f64 * duration.as_secs_f64()) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    for n in 0..pushes {
        tick.tick().await;
        if n == pushes / 2
            && let Some(midway) = midway.take()
        {
            midway();
        }
        let user = &users[n % users.len()];
        let (status, reply) = controls[n % controls.len()]
            .post(
                &format!("/v1/apps/{APP}/users/{user}/messages"),
                API_KEY,
                json!({ "payload": format!("m{n}") }).to_string(),
            )
            .await;
        if status == 200 {
            let id = reply["message_id"].as_str().unwrap().to_owned();
            accepted.entry(user.clone()).or_default().push(id);
        } else {
            refused += 1;
        }
    }
    (accepted, refused)
}

/// Waits until every user received every accepted message at least once
/// (a user's SDK sees them in order, possibly some twice after a failover),
/// and returns (unique deliveries, duplicates).
async fn all_delivered(
    seen: &std::sync::Mutex<Seen>,
    accepted: &BTreeMap<String, Vec<String>>,
    within: Duration,
) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (missing, unique, duplicates) = {
            let seen = seen.lock().unwrap();
            let mut missing = Vec::new();
            let (mut unique, mut duplicates) = (0, 0);
            for (user, ids) in accepted {
                let received = seen.received.get(user).cloned().unwrap_or_default();
                let distinct: HashSet<&String> = received.iter().collect();
                unique += distinct.len();
                duplicates += received.len() - distinct.len();
                missing.extend(
                    ids.iter()
                        .filter(|id| !distinct.contains(id))
                        .map(|id| (user.clone(), id.clone())),
                );
            }
            (missing, unique, duplicates)
        };
        if missing.is_empty() {
            return (unique, duplicates);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} accepted messages never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_node_killed_mid_push_loses_nothing() {
    let Some(mut cluster) = Cluster::start("a_room_node_killed_mid_push_loses_nothing", 3, 2).await
    else {
        return;
    };
    let users: Vec<String> = (0..24).map(|i| format!("u{i}")).collect();
    let (seen, clients) = start_clients(&cluster.controls[0], &users);
    for user in &users {
        eventually(&format!("{user} registered"), || async {
            !nodes_of(&cluster.controls[1], user).await.is_empty()
        })
        .await;
    }
    // The victim is the room node holding the most clients.
    let by_room: HashMap<String, usize> =
        seen.lock()
            .unwrap()
            .gateway
            .values()
            .fold(HashMap::new(), |mut count, gateway| {
                *count.entry(gateway.clone()).or_default() += 1;
                count
            });
    let (victim_gateway, victims) = by_room.iter().max_by_key(|(_, n)| **n).unwrap();
    let (victim_gateway, victims) = (victim_gateway.clone(), *victims);
    let victim = cluster.room_at(&victim_gateway);
    let mut victim_node = cluster.rooms.remove(victim);

    let (accepted, refused) = push_steadily(
        &cluster.controls,
        &users,
        40,
        Duration::from_secs(6),
        || {
            victim_node.child.kill().unwrap();
            victim_node.child.wait().unwrap();
        },
    )
    .await;
    let accepted_total: usize = accepted.values().map(Vec::len).sum();
    let (unique, duplicates) = all_delivered(&seen, &accepted, Duration::from_secs(30)).await;
    let moved = seen
        .lock()
        .unwrap()
        .gateway
        .values()
        .filter(|gateway| **gateway == victim_gateway)
        .count();
    println!(
        "kill -9 of {victim_gateway} ({victims} of {} clients) mid-push: accepted {accepted_total}, \
         refused {refused}, delivered {unique} unique, {duplicates} redelivered (deduped by id), \
         lost 0; clients still on the dead node: {moved}",
        users.len()
    );
    assert_eq!(
        refused, 0,
        "the API refused pushes while only a room node was down"
    );
    assert_eq!(unique, accepted_total);
    assert_eq!(
        moved, 0,
        "every client of the dead node moved to a live one"
    );
    // Each device acked everything: its stored cursor reached its inbox's
    // last sequence (acks are written in batches, so wait for the batch).
    eventually(
        "every device's ack cursor reaches its inbox's end",
        || async { unacked_devices(&cluster.engines.database_url).await == 0 },
    )
    .await;
    for client in clients {
        client.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listen_follows_a_failover_through_the_dispatcher() {
    const TEST: &str = "listen_follows_a_failover_through_the_dispatcher";
    let Some(mut cluster) = Cluster::start(TEST, 2, 1).await else {
        return;
    };
    let mut listen = Reaped(
        std::process::Command::new(herald_bin())
            .args(["listen", "--dispatch"])
            .arg(format!("http://{}", cluster.controls[0].api))
            .args([
                "--app",
                APP,
                "--user",
                "lena",
                "--token",
                &token("lena", 3600),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut printed = lines_of(listen.0.stdout.take().unwrap());
    let mut said = lines_of(listen.0.stderr.take().unwrap());

    // Pushes to lena once the register has her on `node`; returns the line
    // listen printed for the push, after any earlier push printed again
    // (one whose ack the dead node never took comes again).
    async fn push_and_print(
        cluster: &Cluster,
        node: &str,
        payload: &str,
        printed: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> Value {
        eventually(&format!("lena registered on {node}"), || async {
            nodes_of(&cluster.controls[0], "lena")
                .await
                .iter()
                .any(|n| n == node)
        })
        .await;
        cluster.controls[0].push("lena", payload).await;
        loop {
            let line: Value = serde_json::from_str(&line_after(printed, "").await).unwrap();
            if line["payload"] == payload {
                return line;
            }
        }
    }

    let first = line_after(&mut said, "herald listen: connected to ").await;
    let first_node = format!("room-{}", cluster.room_at(&first));
    let line = push_and_print(&cluster, &first_node, "before", &mut printed).await;
    assert_eq!(
        (&line["kind"], &line["seq"], &line["payload"]),
        (&json!("push"), &json!(1), &json!("before"))
    );

    // kill -9 of lena's room node: listen moves to the other one.
    let mut dead = cluster.rooms.remove(cluster.room_at(&first));
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let second = line_after(&mut said, "herald listen: connected to ").await;
    assert_ne!(second, first, "listen reconnected to the dead node");
    let second_node = format!("room-{}", cluster.room_at(&second));
    let line = push_and_print(&cluster, &second_node, "after", &mut printed).await;
    assert_eq!(
        (&line["kind"], &line["seq"], &line["payload"]),
        (&json!("push"), &json!(2), &json!("after"))
    );
    assert!(
        listen.0.try_wait().unwrap().is_none(),
        "the same listen process"
    );
}

/// Devices whose stored ack cursor is behind their inbox's last sequence
/// (or that never acked an inbox holding messages).
async fn unacked_devices(database_url: &str) -> i64 {
    use sqlx::Connection as _;
    let mut db = sqlx::MySqlConnection::connect(database_url).await.unwrap();
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM inbox_heads AS h LEFT JOIN device_cursors AS c \
           ON c.app = h.app AND c.user_id = h.user_id \
         WHERE c.acked_seq IS NULL OR c.acked_seq < h.last_seq",
    )
    .fetch_one(&mut db)
    .await
    .unwrap()
}

/// How soon after Redis answers again, empty, every room node has written
/// all its sessions and subscribed to its delivery channel again: the bound
/// README's "When a part fails" table states.
const REDIS_RETURN_BOUND: Duration = Duration::from_millis(500);

/// When Redis had every session again, and when every room node was
/// subscribed again, after Redis came back.
struct BackInRedis {
    sessions: Duration,
    subscriptions: Duration,
}

/// Times from `answering` (when the restarted Redis took connections)
/// until every user has a session in Redis again and until `rooms`
/// delivery channels are subscribed, polled every 5 ms.
async fn time_until_back_in_redis(
    redis_url: String,
    users: Vec<String>,
    rooms: usize,
    answering: std::time::Instant,
) -> BackInRedis {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (mut sessions_back, mut subscriptions_back) = (None, None);
    loop {
        let mut sessions = redis::pipe();
        for user in &users {
            sessions.hlen(format!("herald:{{{APP}:{user}}}:sessions"));
        }
        let sessions: Vec<u64> = sessions.query_async(&mut conn).await.unwrap();
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("herald:deliver:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let elapsed = answering.elapsed();
        if sessions.iter().all(|&n| n > 0) {
            sessions_back.get_or_insert(elapsed);
        }
        if channels.len() == rooms {
            subscriptions_back.get_or_insert(elapsed);
        }
        if let (Some(sessions), Some(subscriptions)) = (sessions_back, subscriptions_back) {
            return BackInRedis {
                sessions,
                subscriptions,
            };
        }
        assert!(
            elapsed < WAIT,
            "not back in Redis after {WAIT:?}: sessions per user {sessions:?}, channels {channels:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_loses_nothing() {
    const TEST: &str = "a_redis_restart_loses_nothing";
    let Some(mut redis) = PrivateRedis::start(TEST) else {
        return;
    };
    let Some(mut engines) = Engines::create(TEST).await else {
        return;
    };
    engines.redis = herald_control::cluster::connection::RedisTarget::Single(redis.url.clone());
    let cluster = Cluster::start_on(engines, 2, 1, |_| None);
    let users: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    let (seen, clients) = start_clients(&cluster.controls[0], &users);
    for user in &users {
        eventually(&format!("{user} registered"), || async {
            !nodes_of(&cluster.controls[0], user).await.is_empty()
        })
        .await;
    }
    let rate = 40;
    let (before, _) = push_steadily(
        &cluster.controls,
        &users,
        rate,
        Duration::from_secs(1),
        || {},
    )
    .await;
    all_delivered(&seen, &before, WAIT).await;

    // Redis dies and comes back empty; pushes go on throughout.
    redis.kill();
    let (during, refused_during) = push_steadily(
        &cluster.controls,
        &users,
        rate,
        Duration::from_secs(1),
        || {},
    )
    .await;
    redis.restart();
    let back = tokio::spawn(time_until_back_in_redis(
        redis.url.clone(),
        users.clone(),
        cluster.rooms.len(),
        std::time::Instant::now(),
    ));
    let (after, refused_after) = push_steadily(
        &cluster.controls,
        &users,
        rate,
        Duration::from_secs(3),
        || {},
    )
    .await;
    let back = back.await.unwrap();

    let mut accepted = before;
    for (user, ids) in during.into_iter().chain(after) {
        accepted.entry(user).or_default().extend(ids);
    }
    let accepted_total: usize = accepted.values().map(Vec::len).sum();
    let (unique, duplicates) = all_delivered(&seen, &accepted, Duration::from_secs(20)).await;
    println!(
        "Redis killed and restarted empty mid-push: accepted {accepted_total}, refused \
         {refused_during} during the outage and {refused_after} after, delivered {unique} unique, \
         {duplicates} redelivered, lost 0; after Redis answered again, every session was back \
         in it in {} ms and every room node subscribed in {} ms",
        back.sessions.as_millis(),
        back.subscriptions.as_millis()
    );
    assert!(
        back.sessions.max(back.subscriptions) < REDIS_RETURN_BOUND,
        "the room nodes took too long to come back to Redis (README says under {REDIS_RETURN_BOUND:?})"
    );
    assert_eq!(unique, accepted_total);
    eventually(
        "every device's ack cursor reaches its inbox's end",
        || async { unacked_devices(&cluster.engines.database_url).await == 0 },
    )
    .await;
    assert_eq!(
        refused_during + refused_after,
        0,
        "storage was up: every push is accepted"
    );
    // The register was refilled: every user is found on a node again.
    for user in &users {
        assert!(
            !nodes_of(&cluster.controls[0], user).await.is_empty(),
            "{user} not re-registered"
        );
    }
    for client in clients {
        client.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_database_gets_503_and_nothing_is_half_stored() {
    const TEST: &str = "an_unreachable_database_gets_503_and_nothing_is_half_stored";
    let Some(engines) = Engines::create(TEST).await else {
        return;
    };
    // The control node reaches the database through a relay the test cuts.
    let database_server = engines.database_url.trim_start_matches("mysql://root@");
    let (server_addr, database) = database_server.split_once('/').unwrap();
    let relay = Relay::start(server_addr).await;
    let relayed = format!("mysql://root@{}/{database}", relay.addr);
    let cluster = Cluster::start_on(engines, 1, 1, |node| {
        node.starts_with("control").then(|| relayed.clone())
    });
    let control = &cluster.controls[0];
    let mut client = RawClient::bound(&cluster.rooms[0].gateway, "phone", "dora", None).await;
    eventually("dora registered", || async {
        !nodes_of(control, "dora").await.is_empty()
    })
    .await;
    control.push("dora", "before").await;
    assert_eq!(client.recv_push().await, (1, "before".to_owned()));

    relay.cut();
    for attempt in 0..3 {
        let (status, reply) = control
            .post(
                &format!("/v1/apps/{APP}/users/dora/messages"),
                API_KEY,
                json!({ "payload": format!("refused {attempt}") }).to_string(),
            )
            .await;
        assert_eq!(status, 503, "{reply}");
        assert_eq!(reply["error"]["code"], "storage_unavailable");
    }
    let (status, _) = control.get("/readyz", "").await;
    assert_eq!(status, 503, "not ready while the database is unreachable");

    relay.restore();
    eventually("the API takes pushes again", || async {
        control.get("/readyz", "").await.0 == 200
    })
    .await;
    control.push("dora", "after").await;
    // Seq 2: the refused pushes stored nothing and used no sequence.
    assert_eq!(client.recv_push().await, (2, "after".to_owned()));
    client.ack(2).await;
    client.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_control_nodes_give_one_user_gapless_seqs() {
    const PUSHES: usize = 120;
    let Some(cluster) = Cluster::start("two_control_nodes_give_one_user_gapless_seqs", 0, 2).await
    else {
        return;
    };
    let calls: Vec<_> = (0..PUSHES)
        .map(|n| {
            let control = &cluster.controls[n % 2];
            let request = reqwest::Client::new()
                .post(control.url(&format!("/v1/apps/{APP}/users/hot/messages")))
                .bearer_auth(API_KEY)
                .body(json!({ "payload": format!("p{n}") }).to_string());
            tokio::spawn(async move {
                let reply: Value = request.send().await.unwrap().json().await.unwrap();
                reply["seq"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("push failed: {reply}"))
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for call in calls {
        seqs.push(call.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=PUSHES as u64).collect::<Vec<_>>(),
        "gap or duplicate"
    );
    // What was stored agrees with what was answered.
    let (status, stored) = cluster.controls[1]
        .get(
            &format!("/v1/apps/{APP}/users/hot/messages?limit=100"),
            API_KEY,
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    let stored_seqs: Vec<u64> = stored["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(stored_seqs, (1..=100).collect::<Vec<_>>());
}

/// The connections a room node last reported in its liveness record.
async fn reported_connections(redis_url: &str, node: &str) -> u64 {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("herald:{{nodes}}:node:{node}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    record.map_or(0, |text| {
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["connections"]
            .as_u64()
            .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paced_broadcast_is_shared_by_the_room_nodes_connections() {
    const TEST: &str = "a_paced_broadcast_is_shared_by_the_room_nodes_connections";
    const RATE: f64 = 8.0;
    // Most clients on one node: split evenly, that node would take about
    // 2.3 times as long as the rate implies.
    const SPREAD: [usize; 3] = [20, 2, 2];
    let Some(cluster) = Cluster::start(TEST, 3, 1).await else {
        return;
    };
    let mut clients = Vec::new();
    for (r, count) in SPREAD.iter().enumerate() {
        for i in 0..*count {
            let name = format!("pace{r}-{i}");
            clients.push(RawClient::bound(&cluster.rooms[r].gateway, &name, &name, None).await);
        }
    }
    let herald_control::cluster::connection::RedisTarget::Single(redis_url) =
        &cluster.engines.redis
    else {
        panic!("one Redis");
    };
    for (r, count) in SPREAD.iter().enumerate() {
        let node = format!("room-{r}");
        eventually(
            &format!("{node} reports its {count} connections"),
            || async { reported_connections(redis_url, &node).await == *count as u64 },
        )
        .await;
    }
    // The control node's view of the directory may be a second old.
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let started = std::time::Instant::now();
    let (status, reply) = cluster.controls[0]
        .post(
            &format!("/v1/apps/{APP}/broadcasts"),
            API_KEY,
            json!({"payload": "paced", "rate_per_sec": RATE}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let mut last = Duration::ZERO;
    for client in &mut clients {
        assert_eq!(client.recv_broadcast().await.0, 1);
        last = last.max(started.elapsed());
    }
    let clients_total: usize = SPREAD.iter().sum();
    let implied = (clients_total as f64 - 1.0) / RATE;
    let last = last.as_secs_f64();
    println!(
        "{clients_total} clients over 3 room nodes ({SPREAD:?}) at {RATE}/s: last receipt \
         after {last:.2} s (the rate implies {implied:.1} s)"
    );
    // Each shard sends its first one at once and moves on 250 ms ticks;
    // an even split over the nodes would take over 6 s here.
    assert!(
        last >= implied * 0.5 && last <= implied + 2.0,
        "{last:.2} s"
    );
}

/// A control node killed with kill -9 in the middle of its group commits,
/// on `engine`: every push it answered 200 is stored under the seq it
/// was given, read back through the restarted node.
async fn a_control_node_killed_mid_group_commit_loses_no_answered_push(engine: Database) {
    let test =
        format!("a_control_node_killed_mid_group_commit_loses_no_answered_push on {engine:?}");
    let Some(engines) = Engines::create_on(&test, engine).await else {
        return;
    };
    let mut cluster = Cluster::start_on(engines, 1, 1, |_| None);
    let control = cluster.controls.remove(0);
    answered_pushes_survive_a_kill(control, |mut control| {
        control.child.kill().unwrap();
        control.child.wait().unwrap();
        let config = control.config_path.clone().expect("a node has a config");
        Server::spawn_node("control", &config, None)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_node_killed_mid_group_commit_on_mariadb_loses_no_answered_push() {
    a_control_node_killed_mid_group_commit_loses_no_answered_push(Database::MariaDb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_node_killed_mid_group_commit_on_postgres_loses_no_answered_push() {
    a_control_node_killed_mid_group_commit_loses_no_answered_push(Database::Postgres).await;
}

/// Calls `node`'s admin API: (status, JSON body).
async fn admin_call(
    node: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, node.url(path))
        .bearer_auth(ADMIN_KEY);
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Creates the app `shop` through `node`'s admin API; its reply (with its
/// secrets).
async fn create_shop(node: &Server) -> Value {
    let (status, created) = admin_call(
        node,
        reqwest::Method::POST,
        "/v1/admin/apps",
        Some(json!({"id": "shop"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn push_status(node: &Server, app: &str, api_key: &str, payload: &str) -> u16 {
    reqwest::Client::new()
        .post(node.url(&format!("/v1/apps/{app}/users/alice/messages")))
        .bearer_auth(api_key)
        .body(json!({ "payload": payload }).to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Connects to `gateway` and sends BIND of `app` for alice; the answer.
async fn bind_app(gateway: &str, device: &str, app: &str, token: String) -> (RawClient, Frame) {
    let mut client = RawClient::connect(gateway).await;
    client.hello(device).await;
    let answer = client.bind_app(app, token).await;
    (client, answer)
}

/// How long an app change may take to reach every node (README, "Apps at
/// runtime").
const APP_CHANGE_BOUND: Duration = Duration::from_secs(1);

/// Polls `check` every 10 ms until it holds; fails past
/// [`APP_CHANGE_BOUND`] from `since`.
async fn within_the_bound<F, Fut>(what: &str, since: std::time::Instant, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    while !check().await {
        assert!(
            since.elapsed() < APP_CHANGE_BOUND,
            "not within {APP_CHANGE_BOUND:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An app created, used, rotated, changed behind the nodes' backs and
/// deleted through the admin API of one node: every one of 3 room and 2
/// control nodes follows each change within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_changes_reach_every_node_within_a_second() {
    const TEST: &str = "app_changes_reach_every_node_within_a_second";
    let Some(cluster) = Cluster::start(TEST, 3, 2).await else {
        return;
    };
    let nodes: Vec<&Server> = cluster.rooms.iter().chain(&cluster.controls).collect();

    // Created on one control node: every node's API takes its key, every
    // room node binds its tokens.
    let created = create_shop(&cluster.controls[0]).await;
    let created_at = std::time::Instant::now();
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    let token_secret = created["token_secret"].as_str().unwrap().to_owned();
    for (i, node) in nodes.iter().enumerate() {
        within_the_bound(
            &format!("node {i} takes the new key"),
            created_at,
            || async { push_status(node, "shop", &api_key, "hello").await == 200 },
        )
        .await;
    }
    let mut clients = Vec::new();
    for (i, room) in cluster.rooms.iter().enumerate() {
        let device = format!("phone{i}");
        let client = loop {
            let (client, answer) = bind_app(
                &room.gateway,
                &device,
                "shop",
                app_token(&token_secret, "shop", "alice"),
            )
            .await;
            if matches!(answer, Frame::BindOk { .. }) {
                break client;
            }
            assert!(
                created_at.elapsed() < APP_CHANGE_BOUND,
                "room-{i} does not bind the new app within {APP_CHANGE_BOUND:?}: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        clients.push(client);
    }
    // A push through the other control node reaches alice on every room node.
    assert_eq!(
        push_status(&cluster.controls[1], "shop", &api_key, "to all").await,
        200
    );
    for client in &mut clients {
        loop {
            match client.recv().await {
                Some(Frame::Push { payload, .. }) if &payload[..] == b"to all" => break,
                Some(Frame::Push { .. }) => {}
                other => panic!("expected the push, got {other:?}"),
            }
        }
    }

    // Rotated on the other control node without grace: the old key stops
    // working everywhere.
    let (status, rotated) = admin_call(
        &cluster.controls[1],
        reqwest::Method::POST,
        "/v1/admin/apps/shop/rotate",
        Some(json!({"what": "api_key", "grace_secs": 0})),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let rotated_at = std::time::Instant::now();
    let new_key = rotated["api_key"].as_str().unwrap().to_owned();
    for (i, node) in nodes.iter().enumerate() {
        within_the_bound(
            &format!("node {i} refuses the old key"),
            rotated_at,
            || async { push_status(node, "shop", &api_key, "old").await == 403 },
        )
        .await;
        assert_eq!(push_status(node, "shop", &new_key, "new").await, 200);
    }

    // A change no node announced (made in the database directly, as a
    // lost publish would leave it) is read within the bound too.
    {
        use sqlx::Connection as _;
        let mut db = sqlx::MySqlConnection::connect(&cluster.engines.database_url)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE apps SET settings = '{\"default_ttl_secs\": 77}', version = version + 1 \
             WHERE id = 'shop'",
        )
        .execute(&mut db)
        .await
        .unwrap();
    }
    let changed_at = std::time::Instant::now();
    for (i, node) in nodes.iter().enumerate() {
        within_the_bound(
            &format!("node {i} reads the unannounced change"),
            changed_at,
            || async {
                let (_, app) =
                    admin_call(node, reqwest::Method::GET, "/v1/admin/apps/shop", None).await;
                app["default_ttl_secs"] == 77
            },
        )
        .await;
    }

    // Deleted on a room node: every client of the app is told at once,
    // and no node takes the app's calls.
    let (status, _) = admin_call(
        &cluster.rooms[2],
        reqwest::Method::DELETE,
        "/v1/admin/apps/shop",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let deleted_at = std::time::Instant::now();
    for (i, client) in clients.iter_mut().enumerate() {
        loop {
            match client.recv().await {
                Some(Frame::GoAway { reason, .. }) => {
                    assert_eq!(reason, GoAwayReason::APP_DELETED);
                    assert!(
                        deleted_at.elapsed() < APP_CHANGE_BOUND,
                        "room-{i} told its client late"
                    );
                    break;
                }
                Some(Frame::Push { .. }) => {}
                other => panic!("expected GOAWAY app_deleted on room-{i}, got {other:?}"),
            }
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        within_the_bound(&format!("node {i} forgets the app"), deleted_at, || async {
            push_status(node, "shop", &new_key, "gone").await == 404
        })
        .await;
    }
}

/// An app made through a control node's API, with a webhook route: a
/// client on every room node sends upstream data, each room node's
/// coordinator calls the route, and every call verifies with the secret
/// the API gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_made_apps_upstream_reaches_its_signed_webhook_from_every_room_node() {
    use support::webhook::{Answer, Receiver};
    const TEST: &str = "an_api_made_apps_upstream_reaches_its_signed_webhook_from_every_room_node";
    let Some(cluster) = Cluster::start(TEST, 3, 1).await else {
        return;
    };
    let created = create_shop(&cluster.controls[0]).await;
    let token_secret = created["token_secret"].as_str().unwrap().to_owned();
    let receiver = Receiver::start(created["webhook_secret"].as_str().unwrap(), |_, _| {
        Answer::Status(200)
    })
    .await;
    let (status, _) = admin_call(
        &cluster.controls[0],
        reqwest::Method::PATCH,
        "/v1/admin/apps/shop",
        Some(
            json!({"webhooks": [{"route": "main", "url": receiver.base, "events": ["upstream"]}]}),
        ),
    )
    .await;
    assert_eq!(status, 200);

    for (i, room) in cluster.rooms.iter().enumerate() {
        let (mut client, answer) = bind_app(
            &room.gateway,
            &format!("phone{i}"),
            "shop",
            app_token(&token_secret, "shop", "alice"),
        )
        .await;
        assert!(
            matches!(answer, Frame::BindOk { .. }),
            "room-{i}: {answer:?}"
        );
        // Until this room node has the route, an upstream finds no endpoint.
        let deadline = std::time::Instant::now() + WAIT;
        for request_id in 1.. {
            client
                .send(Frame::Upstream {
                    app: "shop".to_owned(),
                    request_id,
                    route: None,
                    payload: bytes::Bytes::from(format!("from room-{i}")),
                })
                .await;
            match client.recv().await {
                Some(Frame::UpstreamAck { status, .. })
                    if status == herald_proto::UpstreamStatus::ACCEPTED =>
                {
                    break;
                }
                Some(Frame::UpstreamAck { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("room-{i}: expected the upstream accepted, got {other:?}"),
            }
        }
    }
    let payloads: HashSet<String> = receiver
        .calls()
        .iter()
        .filter(|call| call.event == "upstream")
        .filter_map(|call| call.body["payload_base64"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        payloads.len(),
        3,
        "one upstream from each room node: {payloads:?}"
    );
    receiver.assert_all_signed();
}

/// A push's request id goes with its message to the room node holding the
/// connection: the room node's JSON log shows the message arriving under
/// the id the caller gave the control node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pushs_request_id_reaches_the_room_node_that_delivers_it() {
    let Some(engines) = Engines::create("request_id").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = |node: &str| {
        support::cluster::write_node_config(dir.path(), node, &engines.redis, &engines.database_url)
    };
    let room_config = config("room-0");
    let mut text = std::fs::read_to_string(&room_config).unwrap();
    text.push_str("[log]\nformat = \"json\"\nlevel = \"warn,herald_control::delivery=debug\"\n");
    std::fs::write(&room_config, text).unwrap();
    let room = Server::spawn_node("room", &room_config, None);
    let control = Server::spawn_node("control", &config("control-0"), None);

    let mut phone = RawClient::bound(&room.gateway, "phone", "ann", None).await;
    eventually("control-0 sees ann on room-0", || async {
        nodes_of(&control, "ann").await == ["room-0"]
    })
    .await;
    let response = reqwest::Client::new()
        .post(control.url(&format!("/v1/apps/{APP}/users/ann/messages")))
        .bearer_auth(API_KEY)
        .header("x-request-id", "trace-me-7")
        .body(r#"{"payload": "hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-request-id"], "trace-me-7");
    assert_eq!(phone.recv_push().await, (1, "hi".to_owned()));
    let deadline = std::time::Instant::now() + WAIT;
    let arrived = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = room.stdout.recv_timeout(left).expect("no arrival logged");
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("arrived"))
        {
            break event;
        }
    };
    assert_eq!(arrived["span"]["request_id"], "trace-me-7", "{arrived}");
}
