//! Limits against abusive clients on `herald serve`, over several loopback
//! addresses (a client socket bound to 127.0.0.2, 127.0.0.3, ... before it
//! connects): `[gateway.per_ip]` turns an address away past its
//! connections or its rate with GOAWAY(overloaded) and a retry hint while
//! other and allow-listed addresses are served; `[gateway.frame_read]`
//! cuts a client that trickles a frame (or a WebSocket upgrade) while the
//! shard serves the others; `allowed_cidrs` keeps the API's app and admin
//! routes to their networks.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use herald_proto::{Frame, GoAwayReason};
use support::{API_KEY, APP, Io, RawClient, Server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// `herald serve` with these lines as its `[gateway.per_ip]`.
fn per_ip_server(io: Io, per_ip: &str) -> Server {
    Server::start_with_edited_config_on(io, |text| {
        text.replacen(
            "[api]\n",
            &format!("[gateway.per_ip]\n{per_ip}\n[api]\n"),
            1,
        )
    })
}

/// The value of the metric line `name` (with its labels), 0 if absent.
async fn metric(server: &Server, name: &str) -> u64 {
    server
        .metrics()
        .await
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A client the gateway took: it says HELLO and gets HELLO_OK.
async fn taken(server: &Server, source: IpAddr) -> RawClient {
    let mut client = RawClient::connect_from(&server.gateway, source).await;
    client.hello("phone").await;
    client
}

/// A client turned away: GOAWAY(overloaded) with a retry hint of one to
/// sixty seconds, then the end of the connection. Returns the hint.
async fn turned_away(server: &Server, source: IpAddr) -> u32 {
    let mut client = RawClient::connect_from(&server.gateway, source).await;
    let hint = match client.recv().await {
        Some(Frame::GoAway {
            reason: GoAwayReason::OVERLOADED,
            reconnect_delay_ms: Some(hint),
        }) => hint,
        other => panic!("expected GOAWAY(overloaded) with a hint, got {other:?}"),
    };
    assert!((1_000..=60_000).contains(&hint), "hint {hint} ms");
    assert_eq!(client.recv().await, None, "the gateway closes after it");
    hint
}

on_both_drivers!(
    limits_connections_per_address_except_allow_listed_networks,
    limits_new_connections_per_address_a_second,
    cuts_a_client_that_trickles_a_frame_and_serves_the_others,
);

async fn limits_connections_per_address_except_allow_listed_networks(io: Io) {
    let server = per_ip_server(io, "connections_max = 2\nallow_cidrs = [\"127.0.0.4/32\"]");
    let (a, b, nat) = (loopback(2), loopback(3), loopback(4));
    let mut first = vec![taken(&server, a).await, taken(&server, a).await];
    turned_away(&server, a).await;
    let mut others = vec![taken(&server, b).await, taken(&server, b).await];
    for _ in 0..5 {
        others.push(taken(&server, nat).await);
    }
    for client in first.iter_mut().chain(&mut others) {
        client.expect_silence(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(
            &server,
            "herald_connections_turned_away_total{reason=\"per_ip_connections\"}"
        )
        .await,
        1
    );

    // A connection that closes makes room; the gateway sees the close in
    // its own time.
    drop(first.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut client = RawClient::connect_from(&server.gateway, a).await;
        client
            .send(Frame::Hello {
                device_id: "phone".to_owned(),
                client_version: "test".to_owned(),
                network: herald_proto::NetworkType::Wifi,
                features: herald_proto::Features::ALL,
            })
            .await;
        match client.recv().await {
            Some(Frame::HelloOk { .. }) => break,
            Some(Frame::GoAway { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("expected HELLO_OK once a connection closed, got {other:?}"),
        }
    }
}

async fn limits_new_connections_per_address_a_second(io: Io) {
    // One new connection every five seconds after a burst of three: the
    // test's connections all fall within the burst's refill.
    let server = per_ip_server(io, "new_per_sec = 0.2\nnew_burst = 3");
    let (a, b) = (loopback(5), loopback(6));
    let mut kept = Vec::new();
    for _ in 0..3 {
        kept.push(taken(&server, a).await);
    }
    // The hint is no sooner than the address's next token, five seconds
    // away.
    let hint = turned_away(&server, a).await;
    assert!(hint >= 5_000, "hint {hint} ms");
    // Closing does not give the rate back.
    drop(kept.pop());
    turned_away(&server, a).await;
    kept.push(taken(&server, b).await);
    assert_eq!(
        metric(
            &server,
            "herald_connections_turned_away_total{reason=\"per_ip_rate\"}"
        )
        .await,
        2
    );
}

async fn cuts_a_client_that_trickles_a_frame_and_serves_the_others(io: Io) {
    // One shard, so the slow client and the normal one share it; a frame
    // gets 1 s plus a second per 100 bytes.
    let server = Server::start_with_edited_config_on(io, |text| {
        text.replacen("shards = 2", "shards = 1", 1).replacen(
            "[api]\n",
            "[gateway.frame_read]\nunknown_ms = 1000\nwifi_ms = 1000\nbytes_per_sec_min = 100\n[api]\n",
            1,
        )
    });
    let mut normal = RawClient::bound(&server.gateway, "normal-phone", "alice", None).await;
    let mut slow = RawClient::connect(&server.gateway).await;
    slow.hello("slow-phone").await;
    // A 196-byte body announced: 1 s, plus 2 s for its 200 bytes.
    let allowed = Duration::from_secs(3);
    let started = Instant::now();
    slow.send_raw(&196u32.to_be_bytes()).await;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let trickle = tokio::spawn(async move {
        // A byte every 100 ms: 10 bytes a second, a tenth of the rate,
        // until told to stop or the gateway cuts the connection.
        loop {
            tokio::select! {
                _ = &mut stop_rx => return slow,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if slow.try_send_raw(&[0]).await.is_err() {
                return slow;
            }
        }
    });
    // The normal client is answered all along, and gets its push.
    let mut pongs = 0;
    while started.elapsed() < allowed - Duration::from_millis(500) {
        normal.send(Frame::Ping).await;
        assert_eq!(normal.recv().await, Some(Frame::Pong));
        pongs += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pongs > 0);
    server.push("alice", "while the other trickles").await;
    let (seq, payload) = normal.recv_push().await;
    assert_eq!(payload, "while the other trickles");
    normal.ack(seq).await;

    let _ = stop_tx.send(());
    let mut slow = trickle.await.unwrap();
    assert_eq!(slow.recv().await, None, "the trickling client is cut");
    let cut_after = started.elapsed();
    assert!(
        cut_after >= allowed,
        "cut after {cut_after:?}, before its {allowed:?}"
    );
    server
        .wait_for_metric(
            "herald_connections_closed_total{reason=\"read_timeout\"}",
            1,
        )
        .await;
    normal.expect_silence(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn allowed_cidrs_keep_the_app_and_admin_routes_to_their_networks() {
    const ADMIN_KEY: &str = "admin-key-0123456789-0123456789-0123456789";
    let server = Server::start_with_edited_config(|text| {
        let text = text.replacen(
            "[api]\n",
            "[api]\nallowed_cidrs = [\"127.0.0.1/32\", \"127.0.0.2\"]\n",
            1,
        );
        format!("{text}\n[admin]\napi_key = \"{ADMIN_KEY}\"\nallowed_cidrs = [\"127.0.0.3/32\"]\n")
    });
    let from = |last: u8| {
        reqwest::Client::builder()
            .local_address(loopback(last))
            .build()
            .unwrap()
    };
    let push = format!("/v1/apps/{APP}/users/alice/messages");
    let body = serde_json::json!({ "payload": "hi" }).to_string();
    for (last, expected) in [(1, 200), (2, 200), (3, 403), (7, 403)] {
        let response = from(last)
            .post(server.url(&push))
            .bearer_auth(API_KEY)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "from 127.0.0.{last}");
        if expected == 403 {
            // Refused before its body was read: the connection closes.
            assert_eq!(
                response.headers().get("connection").unwrap(),
                "close",
                "from 127.0.0.{last}"
            );
            let reply: serde_json::Value = response.json().await.unwrap();
            assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
            let message = reply["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("127.0.0.{last}")) && message.contains("[api]"),
                "{message}"
            );
        }
    }
    // The admin routes have their own list; probes and metrics are open.
    for (last, expected) in [(3, 200), (1, 403)] {
        let response = from(last)
            .get(server.url("/v1/admin/apps"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "from 127.0.0.{last}");
    }
    for path in ["/metrics", "/livez"] {
        let response = from(7).get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
}

/// On a WebSocket listener, an upgrade request that stops halfway is held
/// to the same deadline (the bytes held count, the layers announcing no
/// length).
#[tokio::test]
async fn cuts_a_websocket_upgrade_that_stalls() {
    let server = Server::start_with_args(
        "[gateway.frame_read]\nunknown_ms = 1000\n",
        &["--listener", "ws=127.0.0.1:0"],
    );
    let ws = server.gateways["ws"]
        .trim_start_matches("ws://")
        .trim_end_matches("/v1/connect");
    let mut stream = tokio::net::TcpStream::connect(ws).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /v1/connect HTTP/1.1\r\nHost: herald\r\n")
        .await
        .unwrap();
    let mut buffer = [0; 64];
    let read = tokio::time::timeout(WAIT, stream.read(&mut buffer))
        .await
        .expect("the stalled upgrade is cut");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the end, got {read:?}"
    );
    let cut_after = started.elapsed();
    assert!(
        cut_after >= Duration::from_secs(1),
        "cut after {cut_after:?}"
    );
    server
        .wait_for_metric(
            "herald_connections_closed_total{reason=\"read_timeout\"}",
            1,
        )
        .await;
}
