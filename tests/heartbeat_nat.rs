//! The adaptive heartbeat against a NAT: an SDK, probing, behind a relay
//! that silently drops flows idle for more than T, converges to an
//! interval below T, then holds its connection; with T raised, it climbs.
//! Run for the Rust SDK over TCP (behind a NAT that drops silently, and
//! one that resets), and for the JS SDK in Node over ws
//! (`sdk/js/e2e/heartbeat_nat.mjs`; needs Node 20+ and the SDK's npm
//! packages, else skipped, except with CI=true). And the gateway's report
//! of a connection it closed at its heartbeat deadline (SESSION_TIMED_OUT):
//! what a raw client's next bind hears (on one node, and on another node
//! of a cluster), and what each SDK makes of it after an outage.

mod support;

use std::process::Stdio;
use std::time::Duration;

use herald_client::{Client, Event, HeartbeatProbe};
use herald_proto::{Features, Frame, NetworkType};
use support::nat::{Forget, NatRelay};
use support::{APP, RawClient, Server, sdk_options, token};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tokio::time::Instant;

/// The relay's first idle limit: between 3 s (which holds) and 4 s (which
/// does not) for a client probing 1, 2, 3, 4 s...
const NAT_IDLE: Duration = Duration::from_millis(3_500);
/// The raised limit, which 4 s and 5 s fit under.
const NAT_IDLE_RAISED: Duration = Duration::from_secs(8);
/// Each probe is this much longer.
const STEP: Duration = Duration::from_secs(1);
/// Answered PINGs before an interval counts as held.
const HEALTHY_BEFORE_PROBE: u32 = 2;
/// After a failure the client probes no higher for this long: through the
/// steady phase, so that it shows no connection lost.
const HOLD: Duration = Duration::from_secs(25);
/// How long the steady phase watches for a lost connection.
const STEADY: Duration = Duration::from_secs(15);
/// Disconnects the client may take to find an interval below the limit:
/// the probe that fails, and one more for a timing accident.
const PROBES_FAILED_MAX: usize = 2;

/// The gateway's wifi heartbeat: 1 s to start, negotiable up to 30 s; a ws
/// listener beside plain TCP for the JS SDK.
fn server() -> Server {
    Server::start_with_edited_config(|text| {
        let legacy = text
            .find("[gateway.heartbeat_secs]")
            .expect("the support config has the section");
        let end = text[legacy..].find("[api]").unwrap() + legacy;
        format!(
            "{}[gateway.heartbeat.wifi]\nstart_secs = 1\nmin_secs = 1\nmax_secs = 30\n\
             [[gateway.listeners]]\naddress = \"127.0.0.1:0\"\ntransport = \"ws\"\n{}",
            &text[..legacy],
            &text[end..]
        )
    })
}

/// The events the scenario follows, from either SDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Observed {
    Connected,
    Disconnected,
    HeartbeatSet(Duration),
    Other,
}

/// A probing client of either SDK.
enum Sdk {
    Rust(Client),
    /// The Node process, and its stdout's lines; its stdin is held open
    /// (it exits when it closes).
    Node {
        child: Child,
        lines: Lines<BufReader<ChildStdout>>,
    },
}

impl Sdk {
    async fn next(&mut self) -> Observed {
        match self {
            Sdk::Rust(client) => match client.next_event().await.expect("the client stopped") {
                Event::Connected { .. } => Observed::Connected,
                Event::Disconnected { .. } => Observed::Disconnected,
                Event::HeartbeatSet { interval } => Observed::HeartbeatSet(interval),
                _ => Observed::Other,
            },
            Sdk::Node { child, lines } => {
                let Some(line) = lines.next_line().await.unwrap() else {
                    let status = child.wait().await.unwrap();
                    panic!("the Node client exited: {status}");
                };
                let event: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("not a JSON event from Node: {line}"));
                match event["type"].as_str() {
                    Some("connected") => Observed::Connected,
                    Some("disconnected") => Observed::Disconnected,
                    Some("heartbeatSet") => Observed::HeartbeatSet(Duration::from_millis(
                        event["intervalMs"].as_u64().expect("intervalMs"),
                    )),
                    Some("closed") => panic!("the Node client stopped: {line}"),
                    _ => Observed::Other,
                }
            }
        }
    }
}

/// What the client did up to a point.
#[derive(Debug, Default)]
struct Seen {
    connects: usize,
    disconnects: usize,
    intervals_set: Vec<Duration>,
}

/// Reads events until `done` says so (true) or `until` passes (false).
async fn watch(
    sdk: &mut Sdk,
    seen: &mut Seen,
    until: Instant,
    mut done: impl FnMut(&Seen, Observed) -> bool,
) -> bool {
    loop {
        let Ok(event) = tokio::time::timeout_at(until, sdk.next()).await else {
            return false;
        };
        match event {
            Observed::Connected => seen.connects += 1,
            Observed::Disconnected => seen.disconnects += 1,
            Observed::HeartbeatSet(interval) => seen.intervals_set.push(interval),
            Observed::Other => {}
        }
        if done(seen, event) {
            return true;
        }
    }
}

/// Converge, hold, climb; then check the gateway's metric against what
/// the client saw.
async fn scenario(server: &Server, relay: &NatRelay, sdk: &mut Sdk) {
    let mut seen = Seen::default();

    // Converge: a probe above the limit fails, and after the reconnect the
    // client settles below it.
    let converged = watch(
        sdk,
        &mut seen,
        Instant::now() + Duration::from_secs(90),
        |seen, event| {
            seen.disconnects > 0
                && matches!(event, Observed::HeartbeatSet(interval) if interval < NAT_IDLE)
        },
    )
    .await;
    assert!(converged, "never settled below the limit: {seen:?}");
    assert!(
        seen.disconnects <= PROBES_FAILED_MAX,
        "{} probes failed: {seen:?}",
        seen.disconnects
    );
    assert_eq!(relay.dropped() as usize, seen.disconnects);
    let settled = *seen.intervals_set.last().unwrap();
    assert!(
        settled + STEP > NAT_IDLE,
        "settled at {settled:?}, more than a step below the limit"
    );

    // Steady: no connection lost, no interval above the limit.
    let disconnects = seen.disconnects;
    let sets = seen.intervals_set.len();
    let lost = watch(sdk, &mut seen, Instant::now() + STEADY, |seen, _| {
        seen.disconnects > disconnects
    })
    .await;
    assert!(!lost, "a connection was lost while steady: {seen:?}");
    assert!(
        seen.intervals_set[sets..].iter().all(|i| *i < NAT_IDLE),
        "probed above the limit while holding: {seen:?}"
    );

    // The limit rises: once the hold is over the client climbs past the
    // old limit, and an interval above it holds (the next probe starts
    // only after it held).
    relay.set_idle_limit(NAT_IDLE_RAISED);
    let climbed = watch(
        sdk,
        &mut seen,
        Instant::now() + HOLD + Duration::from_secs(40),
        |seen, event| {
            seen.disconnects > disconnects
                || matches!(event, Observed::HeartbeatSet(interval) if interval > NAT_IDLE + STEP)
        },
    )
    .await;
    assert!(climbed, "never climbed: {seen:?}");
    assert_eq!(
        seen.disconnects, disconnects,
        "a connection was lost while climbing: {seen:?}"
    );

    // The gateway observed every interval it put in force: one at each
    // HELLO, one at each negotiation.
    let metrics = server.metrics().await;
    let observed = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("herald_heartbeat_interval_seconds_count{network=\"wifi\"} ")
        })
        .expect("the wifi heartbeat series")
        .parse::<usize>()
        .unwrap();
    assert_eq!(observed, seen.connects + seen.intervals_set.len());
}

async fn rust_sdk_behind(forget: Forget) {
    let server = server();
    let relay = NatRelay::start_forgetting(&server.gateway, NAT_IDLE, forget).await;
    let mut sdk = Sdk::Rust(Client::start(herald_client::ClientOptions {
        heartbeat_probe: Some(HeartbeatProbe {
            step: STEP,
            healthy_before_probe: HEALTHY_BEFORE_PROBE,
            hold: HOLD,
            network_id: Some("test-nat".to_owned()),
            store: None,
        }),
        ..sdk_options(&relay.addr, token("alice", 3600))
    }));
    scenario(&server, &relay, &mut sdk).await;
}

#[tokio::test]
async fn the_rust_sdk_finds_the_nat_limit_holds_below_it_and_climbs_when_it_rises() {
    rust_sdk_behind(Forget::Silently).await;
}

/// A NAT that resets a forgotten flow: the connection is lost at once,
/// with its PING unanswered, rather than timing out.
#[tokio::test]
async fn the_rust_sdk_learns_the_same_from_a_nat_that_resets_forgotten_flows() {
    rust_sdk_behind(Forget::WithReset).await;
}

const JS_TEST: &str = "the_js_sdk_finds_the_nat_limit_holds_below_it_and_climbs_when_it_rises";

#[tokio::test]
async fn the_js_sdk_finds_the_nat_limit_holds_below_it_and_climbs_when_it_rises() {
    let Some(sdk_dir) = support::js_sdk_built(JS_TEST).await else {
        return;
    };

    let server = server();
    let relay = NatRelay::start(ws_addr(&server), NAT_IDLE).await;
    let mut sdk = node_sdk(&sdk_dir, &relay);
    scenario(&server, &relay, &mut sdk).await;
}

/// The gateway's ws listener, as `host:port`.
fn ws_addr(server: &Server) -> &str {
    let ws = server.gateways.get("ws").expect("a ws listener");
    ws.strip_prefix("ws://")
        .and_then(|rest| rest.strip_suffix("/v1/connect"))
        .unwrap_or_else(|| panic!("a ws URL: {ws}"))
}

/// The JS SDK's probing client in Node, connected through `relay`.
fn node_sdk(sdk_dir: &std::path::Path, relay: &NatRelay) -> Sdk {
    let mut child = tokio::process::Command::new("node")
        .arg("e2e/heartbeat_nat.mjs")
        .arg(format!("ws://{}/v1/connect", relay.addr))
        .arg(token("alice", 3600))
        .arg(STEP.as_millis().to_string())
        .arg(HEALTHY_BEFORE_PROBE.to_string())
        .arg(HOLD.as_millis().to_string())
        .current_dir(sdk_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Sdk::Node { child, lines }
}

/// The gateway closes a silent connection at its heartbeat deadline and
/// tells the device's next bind of the app, once: the network and the
/// interval in force then, and how long ago. Not a device that had come
/// back before the old connection timed out, nor a client whose HELLO did
/// not name the feature.
#[tokio::test]
async fn the_next_bind_hears_that_the_last_connection_timed_out() {
    let server = Server::start_with(1, "");
    let gateway = &server.gateway;
    // Silent: GOAWAY(heartbeat_timeout) 1.5 s after BIND. The client
    // then closes its end.
    let timed_out = |mut client: RawClient| async move {
        let goaway = Frame::GoAway {
            reason: herald_proto::GoAwayReason::HEARTBEAT_TIMEOUT,
            reconnect_delay_ms: None,
        };
        assert_eq!(client.recv().await, Some(goaway));
    };

    timed_out(RawClient::bound(gateway, "phone", "alice", None).await).await;
    let mut again = RawClient::bound(gateway, "phone", "alice", None).await;
    match again.recv().await {
        Some(Frame::SessionTimedOut {
            app,
            network,
            interval_ms,
            closed_ago_ms,
        }) => {
            assert_eq!(app, APP);
            assert_eq!(network, NetworkType::Wifi);
            assert_eq!(interval_ms, 1_000);
            assert!(closed_ago_ms < 5_000, "closed {closed_ago_ms} ms ago");
        }
        other => panic!("expected SESSION_TIMED_OUT, got {other:?}"),
    }
    again.expect_silence(Duration::from_millis(200)).await;
    drop(again);
    let mut third = RawClient::bound(gateway, "phone", "alice", None).await;
    third.expect_silence(Duration::from_millis(300)).await;
    drop(third);

    // The device came back by itself before its old connection timed out
    // (and pings on the new one meanwhile).
    let mut old = RawClient::bound(gateway, "tablet", "alice", None).await;
    let mut new = RawClient::bound(gateway, "tablet", "alice", None).await;
    let goaway = loop {
        new.send(Frame::Ping).await;
        assert_eq!(new.recv().await, Some(Frame::Pong));
        if let Ok(frame) = tokio::time::timeout(Duration::from_millis(300), old.recv()).await {
            break frame;
        }
    };
    assert!(matches!(goaway, Some(Frame::GoAway { .. })), "{goaway:?}");
    drop(old);
    drop(new);
    let mut later = RawClient::bound(gateway, "tablet", "alice", None).await;
    later.expect_silence(Duration::from_millis(300)).await;
    drop(later);

    // An older client is not told.
    timed_out(RawClient::bound_with(gateway, "watch", "alice", Features::NONE).await).await;
    let mut older = RawClient::bound_with(gateway, "watch", "alice", Features::NONE).await;
    older.expect_silence(Duration::from_millis(300)).await;

    let series = format!("herald_session_timeouts_reported_total{{app=\"{APP}\"}}");
    assert_eq!(server.counter(&series).await, 1);
}

/// In a cluster the timeout is kept with the register: a device whose
/// connection timed out on one room node hears it when it binds on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_on_another_room_node_hears_of_the_timeout() {
    const TEST: &str = "a_bind_on_another_room_node_hears_of_the_timeout";
    let Some(engines) = support::cluster::Engines::create(TEST).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rooms: Vec<Server> = ["room-0", "room-1"]
        .into_iter()
        .map(|node| {
            let path = support::cluster::write_node_config(
                dir.path(),
                node,
                &engines.redis,
                &engines.database_url,
            );
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, text.replacen("wifi = 60", "wifi = 1", 1)).unwrap();
            Server::spawn_node("room", &path, None)
        })
        .collect();

    let mut first = RawClient::bound(&rooms[0].gateway, "phone", "carol", None).await;
    let goaway = Frame::GoAway {
        reason: herald_proto::GoAwayReason::HEARTBEAT_TIMEOUT,
        reconnect_delay_ms: None,
    };
    assert_eq!(first.recv().await, Some(goaway));
    drop(first);
    // Room-0's control plane writes the timeout to Redis as it takes the
    // close: wait for it, so the bind below cannot overtake it.
    let herald_control::cluster::connection::RedisTarget::Single(redis_url) = &engines.redis else {
        unreachable!("the engines' Redis is one server")
    };
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("herald:{{{APP}:carol}}:timed_out:phone");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis::AsyncCommands::exists::<_, bool>(&mut redis, &key)
        .await
        .unwrap()
    {
        assert!(Instant::now() < deadline, "the timeout never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = RawClient::bound(&rooms[1].gateway, "phone", "carol", None).await;
    match again.recv().await {
        Some(Frame::SessionTimedOut {
            app,
            network,
            interval_ms,
            ..
        }) => assert_eq!(
            (app.as_str(), network, interval_ms),
            (APP, NetworkType::Wifi, 1_000)
        ),
        other => panic!("expected SESSION_TIMED_OUT, got {other:?}"),
    }
    assert!(
        !redis::AsyncCommands::exists::<_, bool>(&mut redis, &key)
            .await
            .unwrap(),
        "taken by the bind"
    );
}

/// A connection lost with no PING out (the client's network went away)
/// is not one the client counts against its interval. When the gateway
/// closed it at its heartbeat deadline before the client could come back,
/// the next bind says so, and the SDK counts the interval that was in
/// force then as failed: it holds below it instead of probing it again.
#[tokio::test]
async fn the_rust_sdk_counts_a_timeout_the_gateway_reports_after_an_outage() {
    let server = server();
    // A NAT that never forgets an idle flow: only the outage cuts.
    let relay = NatRelay::start(&server.gateway, Duration::from_secs(3600)).await;
    let mut sdk = Sdk::Rust(Client::start(herald_client::ClientOptions {
        heartbeat_probe: Some(HeartbeatProbe {
            step: STEP,
            healthy_before_probe: HEALTHY_BEFORE_PROBE,
            hold: HOLD,
            network_id: None,
            store: None,
        }),
        ..sdk_options(&relay.addr, token("alice", 3600))
    }));
    outage_scenario(&server, &relay, &mut sdk).await;
}

const JS_OUTAGE_TEST: &str = "the_js_sdk_counts_a_timeout_the_gateway_reports_after_an_outage";

#[tokio::test]
async fn the_js_sdk_counts_a_timeout_the_gateway_reports_after_an_outage() {
    let Some(sdk_dir) = support::js_sdk_built(JS_OUTAGE_TEST).await else {
        return;
    };
    let server = server();
    let relay = NatRelay::start(ws_addr(&server), Duration::from_secs(3600)).await;
    let mut sdk = node_sdk(&sdk_dir, &relay);
    outage_scenario(&server, &relay, &mut sdk).await;
}

/// Probe to 3 s; the network goes away just after the 3 s answer (no PING
/// out) for longer than the gateway's deadline; the client comes back at
/// the 2 s that held, hears that the 3 s connection timed out, and then
/// does not probe 3 s again while it holds.
async fn outage_scenario(server: &Server, relay: &NatRelay, sdk: &mut Sdk) {
    const PROBED: Duration = Duration::from_secs(3);
    const HELD: Duration = Duration::from_secs(2);
    let mut seen = Seen::default();
    let probed = watch(
        sdk,
        &mut seen,
        Instant::now() + Duration::from_secs(30),
        |_, event| event == Observed::HeartbeatSet(PROBED),
    )
    .await;
    assert!(probed, "never probed {PROBED:?}: {seen:?}");
    relay.outage();
    let back = watch(
        sdk,
        &mut seen,
        Instant::now() + Duration::from_secs(30),
        |seen, event| seen.disconnects > 0 && event == Observed::HeartbeatSet(HELD),
    )
    .await;
    assert!(back, "never came back at {HELD:?}: {seen:?}");
    assert!(!relay.in_outage());
    let series = format!("herald_session_timeouts_reported_total{{app=\"{APP}\"}}");
    server.wait_for_metric(&series, 1).await;

    // Without the report, 3 s would be probed again after two answered
    // PINGs at 2 s; with it, 3 s failed and is held off.
    let sets = seen.intervals_set.len();
    let disconnects = seen.disconnects;
    let probed_again = watch(sdk, &mut seen, Instant::now() + 5 * HELD, |seen, event| {
        seen.disconnects > disconnects
            || matches!(event, Observed::HeartbeatSet(interval) if interval > HELD)
    })
    .await;
    assert!(
        !probed_again,
        "probed above {HELD:?} again or lost the connection: {:?}",
        &seen.intervals_set[sets..]
    );
}
