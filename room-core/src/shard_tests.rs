//! Deterministic tests of the shard loop: the real `Shard` over the fake
//! driver (`driver/fake.rs`), turned with a clock the test moves, talking
//! to a client that speaks the real protocol (frames from
//! `herald_proto`, the handshake through its `ClientConn`).
//!
//! Each test runs on both kinds of driver, completion-based like io_uring
//! (`uring::`) and readiness-based like epoll (`epoll::`), but the one about
//! io_uring's buffer ring. No network, no sleeping: time moves only when a
//! test moves it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_proto::client::{AppCredentials, ClientConfig, ClientConn, ClientEvent};
use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::{
    Bound, ConnCommand, ConnEvent, ConnId, GatewayApp, PushMessage, ShardCommand, ShardEvent,
    TimedOut, TokenSecret,
};
use herald_proto::rate::Rate;
use herald_proto::server::{HeartbeatRanges, ServerConfig};
use herald_proto::{
    BindErrorCode, Frame, GoAwayReason, MessageId, NetworkType, TokenClaims, decode_slice, encode,
    encoded_len, sign_token,
};

use super::{CLOSE_FLUSH_TIMEOUT, LoopEnds, OUTBOX_LEN_MAX, SCRATCH_LEN, Shard, ShardSettings};
use crate::ReadDeadlines;
use crate::auth::AppSecrets;
use crate::driver::fake::FakeDriver;
use crate::driver::{Driver as _, Event, Input, SendBuffer, WakeFd};
use crate::metrics::{CLOSE_REASONS, GatewayMetrics, TURN_AWAY_REASONS};
use crate::per_ip::{PerIpConfig, PerIpLimits};
use crate::transport::{TransportKind, WebSocketSettings};
use crate::wheel::TICK;

const APP: &str = "chat";
const SECRET: &[u8] = b"shard-tests-secret";
const HEARTBEAT: Duration = Duration::from_secs(10);
/// What the connection logic allows on top of the interval: half of one.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(15);
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
const STORAGE_EPOCH: u64 = 7;
/// The event channel's room, unless a test wants it small.
const EVENTS_LEN: usize = 1 << 16;
/// Turns `settle` takes before it decides the shard spins.
const SETTLE_TURNS_MAX: usize = 1_000;
/// A frame's time: 2 s before HELLO (4 s on cellular), plus a second per
/// 100 bytes.
const READ_DEADLINES: ReadDeadlines = ReadDeadlines {
    unknown: Duration::from_secs(2),
    wifi: Duration::from_secs(2),
    cellular: Duration::from_secs(4),
    wired: Duration::from_secs(2),
    bytes_per_sec_min: 100,
};

/// Runs each named test, generic over the driver kind, on both kinds.
macro_rules! on_both_drivers {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test]
            fn $name() {
                super::$name::<true>();
            })*
        }
        mod epoll {
            $(#[test]
            fn $name() {
                super::$name::<false>();
            })*
        }
    };
}

on_both_drivers!(
    accepts_and_binds,
    refuses_binds_past_the_apps_connection_limit,
    honours_a_retired_token_secret_only_in_its_grace,
    ends_the_bindings_of_a_deleted_app,
    refuses_past_the_connection_limit,
    turns_away_past_the_accept_rate,
    decodes_a_frame_split_over_receives,
    handles_several_frames_in_one_receive,
    sends_the_rest_of_a_short_write_in_order,
    cuts_off_a_slow_consumer_past_the_byte_limit,
    cuts_off_a_slow_consumer_past_the_frame_limit,
    counts_only_what_waits_behind_a_blocked_send,
    keeps_a_client_one_frame_behind_however_long,
    cuts_a_slow_consumer_that_never_reads_at_the_flush_deadline,
    heartbeats_keep_a_connection_and_silence_ends_it,
    closes_a_connection_that_does_not_bind_in_time,
    frees_the_slot_on_the_clients_end,
    kicks_with_goaway_then_closes_on_the_clients_end,
    cuts_a_kicked_client_that_never_reads_at_the_flush_deadline,
    ends_a_connection_whose_socket_fails,
    ends_a_connection_whose_send_fails,
    ignores_what_is_left_of_a_connection_once_its_slot_is_reused,
    drains_every_connection_then_reports_drained,
    spreads_a_drains_goaways_over_its_window_with_jittered_hints,
    stops_reading_while_the_outbox_is_full,
    limits_connections_per_address_but_not_allow_listed_ones,
    limits_new_connections_per_address_a_second,
    cuts_a_frame_that_trickles_past_its_deadline_and_serves_others,
    gives_a_longer_frame_and_a_slower_network_more_time,
    waits_with_a_frame_deadline_while_the_shard_holds_input_back,
);

/// One client connection, as the test sees it.
struct Client {
    token: u64,
    /// Bytes of its wire already decoded.
    read: usize,
    proto: ClientConn,
}

impl Client {
    fn slot(&self) -> usize {
        (self.token & u64::from(u32::MAX)) as usize
    }

    /// Its id, as the control plane would name it.
    fn id(&self) -> ConnId {
        ConnId {
            shard: 0,
            slot: self.slot() as u32,
            generation: (self.token >> 32) as u32,
        }
    }
}

struct Harness<const R: bool> {
    shard: Shard<FakeDriver<R>>,
    ends: LoopEnds,
    commands: async_channel::Sender<ShardCommand>,
    events: async_channel::Receiver<ShardEvent>,
    metrics: Arc<GatewayMetrics>,
    now: Instant,
}

fn server_config() -> ServerConfig {
    ServerConfig {
        heartbeat: HeartbeatRanges::fixed(HEARTBEAT),
        auth_timeout: AUTH_TIMEOUT,
        bind_failures_max: 3,
        apps_per_conn_max: 4,
        inflight_pushes_max: 64,
        storage_epoch: STORAGE_EPOCH,
    }
}

fn current_secret() -> TokenSecret {
    TokenSecret {
        secret: SECRET.to_vec(),
        retires_at_ms: None,
    }
}

/// The test app, with these secrets and limit, counted afresh.
fn gateway_app(token_secrets: Vec<TokenSecret>, max_connections: Option<u32>) -> GatewayApp {
    GatewayApp {
        id: APP.to_owned(),
        token_secrets,
        max_connections,
        bound: Arc::default(),
    }
}

fn token_for(user: &str) -> String {
    let claims = TokenClaims {
        app: APP.to_owned(),
        user: user.to_owned(),
        expires_at_unix_secs: u64::MAX,
    };
    sign_token(SECRET, &claims).unwrap()
}

fn client_config(user: &str) -> ClientConfig {
    ClientConfig {
        device_id: format!("{user}-phone"),
        client_version: "test".to_owned(),
        network: NetworkType::Wifi,
        apps: vec![AppCredentials {
            app: APP.to_owned(),
            token: token_for(user),
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        }],
        storage_epoch: None,
    }
}

fn hello() -> Frame {
    Frame::Hello {
        device_id: "phone".to_owned(),
        client_version: "test".to_owned(),
        network: NetworkType::Wifi,
        features: herald_proto::Features::ALL,
    }
}

fn bind(user: &str) -> Frame {
    Frame::Bind {
        app: APP.to_owned(),
        token: token_for(user),
        last_seq: None,
        last_broadcast_seq: None,
        tags: Vec::new(),
    }
}

fn encoded(frames: &[Frame]) -> Vec<u8> {
    let mut bytes = bytes::BytesMut::new();
    for frame in frames {
        encode(frame, &mut bytes).unwrap();
    }
    bytes.to_vec()
}

fn message(seq: u64, payload_len: usize) -> PushMessage {
    PushMessage {
        seq,
        message_id: MessageId([seq as u8; 16]),
        payload: Bytes::from(vec![b'm'; payload_len]),
        notice: None,
    }
}

fn push(message: &PushMessage) -> Frame {
    Frame::Push {
        app: APP.to_owned(),
        message_id: message.message_id,
        seq: message.seq,
        payload: message.payload.clone(),
    }
}

fn goaway(reason: GoAwayReason) -> Frame {
    Frame::GoAway {
        reason,
        reconnect_delay_ms: None,
    }
}

impl<const R: bool> Harness<R> {
    fn new() -> Harness<R> {
        Harness::with(EVENTS_LEN, |_| {})
    }

    fn with(events_len: usize, tweak: impl FnOnce(&mut ShardSettings)) -> Harness<R> {
        let metrics = Arc::new(GatewayMetrics::new(1));
        let mut settings = ShardSettings {
            id: 0,
            server: server_config(),
            auth: AppSecrets::new(&[gateway_app(vec![current_secret()], None)]),
            connections_max: 16,
            send_queue_bytes_max: 64 * 1024,
            send_queue_frames_max: 1024,
            accept_rate: None,
            per_ip: None,
            read_deadlines: READ_DEADLINES,
            metrics: metrics.clone(),
            tls: None,
            websocket: WebSocketSettings::default(),
        };
        tweak(&mut settings);
        let now = Instant::now();
        let listeners = vec![(FakeDriver::<R>::listener(), TransportKind::Tcp)];
        let mut shard = Shard::new(settings, FakeDriver::new(), listeners, now);
        let (commands, command_rx) = async_channel::bounded(64);
        let (event_tx, events) = async_channel::bounded(events_len);
        let wake = Arc::new(WakeFd::new().unwrap());
        // What `run` does before its first turn.
        shard.driver.add_wake(wake.raw_fd()).unwrap();
        shard.start_accepting().unwrap();
        Harness {
            shard,
            ends: LoopEnds::new(command_rx, event_tx, wake, now),
            commands,
            events,
            metrics,
            now,
        }
    }

    fn driver(&mut self) -> &mut FakeDriver<R> {
        &mut self.shard.driver
    }

    /// One turn of the shard's loop at the test's time.
    fn turn(&mut self) {
        let now = self.now;
        let going = self.shard.turn(&mut self.ends, || now).unwrap();
        assert!(going, "the shard saw the control plane go");
    }

    /// Turns until the shard waits with nothing to do: its last wait
    /// reported nothing and it was not told to come straight back.
    fn settle(&mut self) {
        for _ in 0..SETTLE_TURNS_MAX {
            self.turn();
            let driver = &self.shard.driver;
            if driver.last_events() == 0 && driver.last_timeout() != Some(Duration::ZERO) {
                return;
            }
        }
        panic!("the shard does not settle");
    }

    /// Moves the clock on, then lets the shard catch up.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.settle();
    }

    /// A client connects; the shard takes it.
    fn connect(&mut self) -> Client {
        self.connect_from(None)
    }

    /// A client at `peer` connects; the shard takes it.
    fn connect_from(&mut self, peer: Option<IpAddr>) -> Client {
        let fd = self.driver().connect_from(0, peer);
        self.settle();
        let token = self
            .driver()
            .token_of(fd)
            .expect("the shard took the connection");
        Client {
            token,
            read: 0,
            proto: ClientConn::new(self.now, client_config("alice")),
        }
    }

    fn send(&mut self, client: &Client, frames: &[Frame]) {
        self.send_bytes(client, &encoded(frames));
    }

    /// The client's bytes arrive as one receive.
    fn send_bytes(&mut self, client: &Client, bytes: &[u8]) {
        self.driver().input(client.token, bytes);
        self.settle();
    }

    /// The frames the client's socket took since the client last looked
    /// (a frame cut short by the socket waits for its end).
    fn received(&self, client: &mut Client) -> Vec<Frame> {
        let wire = self.shard.driver.wire(client.token);
        let mut frames = Vec::new();
        while let Some((frame, used)) =
            decode_slice(&wire[client.read..]).expect("the gateway sends frames that decode")
        {
            client.read += used;
            frames.push(frame);
        }
        frames
    }

    /// Events the shard handed the control plane since the last look.
    fn events(&self) -> Vec<ShardEvent> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    fn command(&mut self, command: ShardCommand) {
        self.commands.try_send(command).unwrap();
        self.settle();
    }

    /// A client that is bound: HELLO and BIND made by the client state
    /// machine, the shard's answers fed back into it, and the first fill
    /// (an empty inbox) from the control plane. Returns its id from
    /// `Bound`.
    fn open(&mut self, user: &str) -> (Client, ConnId) {
        let mut client = self.connect();
        client.proto = ClientConn::new(self.now, client_config(user));
        // HELLO; then BIND, which the client sends once HELLO_OK is in.
        for _ in 0..2 {
            let frames: Vec<Frame> = std::iter::from_fn(|| client.proto.poll_transmit()).collect();
            self.send(&client, &frames);
            for frame in self.received(&mut client) {
                client.proto.handle_frame(self.now, frame);
            }
        }
        let seen: Vec<ClientEvent> = std::iter::from_fn(|| client.proto.poll_event()).collect();
        assert_eq!(
            seen,
            [
                ClientEvent::Ready {
                    heartbeat_interval: HEARTBEAT
                },
                ClientEvent::Bound {
                    app: APP.to_owned(),
                    user: user.to_owned()
                }
            ]
        );
        let id = match self.events().as_slice() {
            [
                ShardEvent::Conn {
                    conn,
                    event: ConnEvent::Bound(..),
                },
            ] => *conn,
            other => panic!("expected one Bound, got {other:?}"),
        };
        assert_eq!(id, client.id());
        self.command(ShardCommand::Conn {
            conn: id,
            command: ConnCommand::Fill {
                app: APP.into(),
                after: 0,
                messages: Vec::new(),
                more: false,
                broadcasts_from: Some(0),
            },
        });
        (client, id)
    }

    /// A new connection that says HELLO and BINDs `user`, and the code of
    /// the BIND_ERR it must get.
    fn bind_refused(&mut self, user: &str) -> (Client, BindErrorCode) {
        let mut client = self.connect();
        self.send(&client, &[hello(), bind(user)]);
        let answer = self.received(&mut client);
        match answer.last() {
            Some(Frame::BindErr { code, .. }) => (client, *code),
            _ => panic!("expected BIND_ERR, got {answer:?}"),
        }
    }

    fn deliver(&mut self, conn: ConnId, message: &PushMessage) {
        self.command(ShardCommand::Conn {
            conn,
            command: ConnCommand::Deliver {
                app: APP.into(),
                message: message.clone(),
                stored_at: Instant::now(),
            },
        });
    }

    /// Connections turned away for `label` (a `TURN_AWAY_REASONS` entry).
    fn turned_away(&self, label: &str) -> u64 {
        let index = TURN_AWAY_REASONS.iter().position(|&l| l == label).unwrap();
        self.metrics.snapshot().turned_away[index]
    }

    /// Connections that ended for `label` (a `CLOSE_REASONS` entry).
    fn closed(&self, label: &str) -> u64 {
        let index = CLOSE_REASONS.iter().position(|&l| l == label).unwrap();
        self.metrics.snapshot().closed[index]
    }

    fn is_open(&self, client: &Client) -> bool {
        self.shard.slot_of(client.token).is_some()
    }

    fn is_closing(&self, client: &Client) -> bool {
        let slot = self.shard.slot_of(client.token).expect("a live connection");
        self.shard.conns[slot].closing.is_some()
    }

    /// The client's end arrives; the shard removes the connection.
    fn end(&mut self, client: &Client) {
        self.driver().end(client.token);
        self.settle();
        self.assert_removed(client);
    }

    /// The connection is gone: its slot freed, the driver told.
    fn assert_removed(&self, client: &Client) {
        assert!(!self.is_open(client), "the slot is still the connection's");
        assert!(self.shard.driver.is_removed(client.token));
        assert!(!self.shard.driver.is_live(client.token));
    }

    /// A closing connection whose peer takes nothing stays until its flush
    /// deadline (give or take a wheel tick), and is removed then.
    fn assert_cut_at_the_flush_deadline(&mut self, client: &Client) {
        self.advance(CLOSE_FLUSH_TIMEOUT - TICK);
        assert!(self.is_open(client));
        self.advance(2 * TICK);
        self.assert_removed(client);
    }
}

impl<const R: bool> Drop for Harness<R> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // Whatever the test did, every receive buffer went back.
            assert_eq!(
                self.shard.driver.recv_buffers_lent(),
                0,
                "receive buffers kept"
            );
        }
    }
}

/// A connection is accepted, watched by the driver and answered: HELLO_OK
/// with the configured interval and epoch, BIND_OK, and `Bound` for the
/// control plane naming the device and its resume point.
fn accepts_and_binds<const R: bool>() {
    let mut h = Harness::<R>::new();
    assert!(h.driver().is_accepting(0));
    let mut client = h.connect();
    assert!(h.is_open(&client));
    assert!(h.shard.driver.is_live(client.token));
    assert_eq!(h.metrics.snapshot().connections_open, 1);
    assert!(
        h.received(&mut client).is_empty(),
        "the gateway speaks second"
    );

    h.send(&client, &[hello()]);
    assert_eq!(
        h.received(&mut client),
        [Frame::HelloOk {
            heartbeat_interval_ms: HEARTBEAT.as_millis() as u32,
            storage_epoch: Some(STORAGE_EPOCH),
        }]
    );
    h.send(&client, &[bind("alice")]);
    assert_eq!(
        h.received(&mut client),
        [Frame::BindOk {
            app: APP.to_owned(),
            user: "alice".to_owned(),
        }]
    );
    match h.events().as_slice() {
        [
            ShardEvent::Conn {
                conn,
                event:
                    ConnEvent::Bound(Bound {
                        app,
                        user,
                        device_id,
                        network,
                        client_last_seq: None,
                        client_last_broadcast_seq: None,
                        ..
                    }),
            },
        ] => {
            assert_eq!(*conn, client.id());
            assert_eq!((&**app, &**user), (APP, "alice"));
            assert_eq!(device_id, "phone");
            assert_eq!(*network, NetworkType::Wifi);
        }
        other => panic!("expected one Bound, got {other:?}"),
    }
    let counts = h.metrics.snapshot();
    assert_eq!((counts.frames_in, counts.frames_out), (2, 2));
}

/// Past `connections_max`, an accepted socket is closed at once: never
/// given to the driver, counted as refused.
fn refuses_past_the_connection_limit<const R: bool>() {
    let mut h = Harness::<R>::with(EVENTS_LEN, |s| s.connections_max = 2);
    let first = h.connect();
    let _second = h.connect();
    let fd = h.driver().connect(0);
    h.settle();
    assert_eq!(h.driver().token_of(fd), None);
    assert_eq!(h.shard.conns.len(), 2);
    let counts = h.metrics.snapshot();
    assert_eq!(
        (counts.connections_open, counts.connections_refused),
        (2, 1)
    );

    // A slot freed makes room again.
    h.end(&first);
    let _third = h.connect();
    assert_eq!(h.shard.conns.len(), 2);
}

/// Past the accept rate, a connection is told when to come back
/// (GOAWAY(overloaded) with a delay of at least a second) and closed once
/// the client closes its side; once the bucket refills, connections are
/// taken again.
fn turns_away_past_the_accept_rate<const R: bool>() {
    let mut h = Harness::<R>::with(EVENTS_LEN, |s| {
        s.accept_rate = Some(Rate {
            per_sec: 1.0,
            burst: 2,
        });
    });
    let mut within: Vec<Client> = (0..2).map(|_| h.connect()).collect();
    let mut over = h.connect();
    for client in &mut within {
        assert!(h.received(client).is_empty());
    }
    match h.received(&mut over).as_slice() {
        [
            Frame::GoAway {
                reason: GoAwayReason::OVERLOADED,
                reconnect_delay_ms: Some(delay),
            },
        ] => assert!((1_000..=60_000).contains(delay), "delay {delay} ms"),
        other => panic!("expected GOAWAY(overloaded), got {other:?}"),
    }
    assert!(h.is_closing(&over));
    // It never bound: nothing to unregister.
    assert!(h.events().is_empty());
    h.end(&over);
    assert_eq!(h.closed("overloaded"), 1);

    h.advance(Duration::from_secs(1));
    let mut later = h.connect();
    h.send(&later, &[hello()]);
    assert!(matches!(
        h.received(&mut later).as_slice(),
        [Frame::HelloOk { .. }]
    ));
}

/// A frame split over receives is handled once, when its last byte is in;
/// the part that came first waits in a buffer that goes back once the
/// frame is whole.
fn decodes_a_frame_split_over_receives<const R: bool>() {
    let mut h = Harness::<R>::new();
    let mut client = h.connect();
    let bytes = encoded(&[hello()]);
    // Inside the length prefix, then inside the body.
    for chunk in [&bytes[..2], &bytes[2..9]] {
        h.send_bytes(&client, chunk);
        assert!(h.received(&mut client).is_empty());
        assert!(h.shard.conns[client.slot()].partial.is_some());
    }
    h.send_bytes(&client, &bytes[9..]);
    assert!(matches!(
        h.received(&mut client).as_slice(),
        [Frame::HelloOk { .. }]
    ));
    assert!(h.shard.conns[client.slot()].partial.is_none());
    assert_eq!(h.metrics.snapshot().frames_in, 1);

    // One byte at a time.
    for byte in encoded(&[bind("alice")]) {
        assert!(h.received(&mut client).is_empty());
        h.send_bytes(&client, &[byte]);
    }
    assert!(matches!(
        h.received(&mut client).as_slice(),
        [Frame::BindOk { .. }]
    ));
    assert_eq!(h.events().len(), 1);
}

/// Every frame of a receive is handled, in order; a receive that ends
/// inside a frame handles those before it and keeps the rest.
fn handles_several_frames_in_one_receive<const R: bool>() {
    let mut h = Harness::<R>::new();
    let mut client = h.connect();
    h.send(&client, &[hello(), bind("alice"), Frame::Ping, Frame::Ping]);
    let frames = h.received(&mut client);
    assert!(matches!(
        frames.as_slice(),
        [
            Frame::HelloOk { .. },
            Frame::BindOk { .. },
            Frame::Pong,
            Frame::Pong
        ]
    ));
    assert!(matches!(
        h.events().as_slice(),
        [ShardEvent::Conn {
            event: ConnEvent::Bound(..),
            ..
        }]
    ));

    let bytes = encoded(&[Frame::Ping, Frame::Ping, Frame::Ping]);
    let cut = bytes.len() - 3;
    h.send_bytes(&client, &bytes[..cut]);
    assert_eq!(h.received(&mut client), [Frame::Pong, Frame::Pong]);
    h.send_bytes(&client, &bytes[cut..]);
    assert_eq!(h.received(&mut client), [Frame::Pong]);
    assert_eq!(h.metrics.snapshot().frames_in, 7);
}

/// A socket that takes part of a send gets the rest later, ahead of what
/// was produced meanwhile: every byte once, in order.
fn sends_the_rest_of_a_short_write_in_order<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (mut client, id) = h.open("alice");
    assert!(h.received(&mut client).is_empty());
    let messages: Vec<PushMessage> = (1..=4).map(|seq| message(seq, 300)).collect();
    let frame_len = encoded_len(&push(&messages[0]));
    let before = h.driver().wire(client.token).len();

    h.driver().set_room(client.token, Some(100));
    h.command(ShardCommand::Conn {
        conn: id,
        command: ConnCommand::Fill {
            app: APP.into(),
            after: 0,
            messages: messages[..3].to_vec(),
            more: false,
            broadcasts_from: None,
        },
    });
    // One send of three pushes, of which the socket took 100 bytes.
    assert_eq!(h.driver().wire(client.token).len(), before + 100);
    assert_eq!(h.driver().held_len(client.token), 3 * frame_len - 100);
    assert!(h.received(&mut client).is_empty());
    // Produced meanwhile: it waits behind the send.
    h.deliver(id, &messages[3]);
    assert_eq!(h.driver().held_len(client.token), 3 * frame_len - 100);
    assert!(h.shard.conns[client.slot()].queue.is_some());

    h.driver().set_room(client.token, Some(frame_len));
    h.settle();
    assert_eq!(h.received(&mut client), [push(&messages[0])]);
    h.driver().set_room(client.token, None);
    h.settle();
    assert_eq!(
        h.received(&mut client),
        [push(&messages[1]), push(&messages[2]), push(&messages[3])]
    );
    assert_eq!(
        h.driver().wire(client.token).len(),
        before + 4 * frame_len,
        "nothing sent twice"
    );
    assert_eq!(h.driver().held_len(client.token), 0);
    assert!(h.shard.conns[client.slot()].queue.is_none());
    assert_eq!(h.metrics.snapshot().pushes_out, 4);
}

/// A bound client whose socket takes nothing, with a first push held
/// (blocked) by the driver.
fn blocked_client<const R: bool>(
    tweak: impl FnOnce(&mut ShardSettings),
) -> (Harness<R>, Client, ConnId) {
    let mut h = Harness::<R>::with(EVENTS_LEN, tweak);
    let (mut client, id) = h.open("alice");
    assert!(h.received(&mut client).is_empty());
    h.driver().set_room(client.token, Some(0));
    h.deliver(id, &message(1, 200));
    assert!(h.driver().send_blocked(client.token));
    (h, client, id)
}

/// A client whose socket stops taking data is cut off once what waits for
/// it would pass `send_queue_bytes_max`, not before: it gets the frames
/// that fit, then GOAWAY(slow_consumer), and leaves the register at once.
fn cuts_off_a_slow_consumer_past_the_byte_limit<const R: bool>() {
    let frame_len = encoded_len(&push(&message(1, 200)));
    // The blocked send and three frames behind it.
    let (mut h, mut client, id) = blocked_client::<R>(|s| s.send_queue_bytes_max = 4 * frame_len);
    for seq in 2..=4 {
        h.deliver(id, &message(seq, 200));
        assert!(!h.is_closing(&client), "cut off at {seq}, within the limit");
    }
    assert!(h.events().is_empty());
    h.deliver(id, &message(5, 200));
    assert!(h.is_closing(&client));
    match h.events().as_slice() {
        [
            ShardEvent::Conn {
                conn,
                event:
                    ConnEvent::Closed {
                        bindings,
                        timed_out: None,
                    },
            },
        ] => {
            assert_eq!(*conn, id);
            assert_eq!(bindings, &[(AppId::from(APP), UserId::from("alice"))]);
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    // Nothing more is queued for it.
    h.deliver(id, &message(6, 200));

    h.driver().set_room(client.token, None);
    h.settle();
    let mut expected: Vec<Frame> = (1..=4).map(|seq| push(&message(seq, 200))).collect();
    expected.push(goaway(GoAwayReason::SLOW_CONSUMER));
    assert_eq!(h.received(&mut client), expected);
    h.end(&client);
    assert_eq!(h.closed("slow_consumer"), 1);
    assert!(h.events().is_empty(), "Closed is reported once");
}

/// The same with `send_queue_frames_max`: frames waiting behind a blocked
/// send are counted too.
fn cuts_off_a_slow_consumer_past_the_frame_limit<const R: bool>() {
    let (mut h, mut client, id) = blocked_client::<R>(|s| s.send_queue_frames_max = 2);
    for seq in 2..=3 {
        h.deliver(id, &message(seq, 10));
        assert!(!h.is_closing(&client), "cut off at {seq}, within the limit");
    }
    h.deliver(id, &message(4, 10));
    assert!(h.is_closing(&client));
    h.driver().set_room(client.token, None);
    h.settle();
    let frames = h.received(&mut client);
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[3], goaway(GoAwayReason::SLOW_CONSUMER));
    h.end(&client);
    assert_eq!(h.closed("slow_consumer"), 1);
}

/// The limits apply to what waits behind a send the socket is not taking.
/// On io_uring a send handed over in this turn is on its way (the kernel
/// tries it in the next wait), so a batch made in the same turn is not cut
/// whatever its count; on epoll a send the socket did not take at once is
/// blocked already.
fn counts_only_what_waits_behind_a_blocked_send<const R: bool>() {
    let mut h = Harness::<R>::with(EVENTS_LEN, |s| s.send_queue_frames_max = 1);
    let (mut client, id) = h.open("alice");
    assert!(h.received(&mut client).is_empty());
    h.driver().set_room(client.token, Some(0));
    // Three commands taken in one turn.
    for seq in 1..=3 {
        h.commands
            .try_send(ShardCommand::Conn {
                conn: id,
                command: ConnCommand::Deliver {
                    app: APP.into(),
                    message: message(seq, 10),
                    stored_at: Instant::now(),
                },
            })
            .unwrap();
    }
    h.settle();
    assert_eq!(h.is_closing(&client), !R);
    if R {
        // One more now that the send is blocked: cut, the three before it
        // counted as waiting.
        h.deliver(id, &message(4, 10));
        assert!(h.is_closing(&client));
    }
    h.driver().set_room(client.token, None);
    h.settle();
    let frames = h.received(&mut client);
    let pushes = if R { 3 } else { 2 };
    assert_eq!(frames.len(), pushes + 1);
    assert_eq!(frames[pushes], goaway(GoAwayReason::SLOW_CONSUMER));
}

/// A client that keeps up, one push behind: each time its socket has
/// taken the send it had, one more push waits behind the next. Never more
/// than one frame waits, so the frame limit never cuts it, however long
/// it goes on without its output draining.
fn keeps_a_client_one_frame_behind_however_long<const R: bool>() {
    let (mut h, mut client, id) = blocked_client::<R>(|s| s.send_queue_frames_max = 4);
    let mut expected = vec![push(&message(1, 200))];
    for seq in 2..=20 {
        h.deliver(id, &message(seq, 200));
        assert!(!h.is_closing(&client), "cut off at {seq}");
        expected.push(push(&message(seq, 200)));
        // The socket takes what was sent before, and no more: the push
        // just queued goes as the next send, which waits.
        let held = h.driver().held_len(client.token);
        h.driver().set_room(client.token, Some(held));
        h.settle();
        assert!(h.driver().send_blocked(client.token));
    }
    h.driver().set_room(client.token, None);
    h.settle();
    assert_eq!(h.received(&mut client), expected);
}

/// A slow consumer that never reads its GOAWAY is cut at the flush
/// deadline, and still counted as a slow consumer.
fn cuts_a_slow_consumer_that_never_reads_at_the_flush_deadline<const R: bool>() {
    let (mut h, client, id) = blocked_client::<R>(|s| s.send_queue_frames_max = 1);
    h.deliver(id, &message(2, 10));
    h.deliver(id, &message(3, 10));
    assert!(h.is_closing(&client));
    h.assert_cut_at_the_flush_deadline(&client);
    assert_eq!(h.closed("slow_consumer"), 1);
    assert_eq!(h.closed("flush_timeout"), 0);
}

/// A client that pings at the interval its client state machine keeps
/// stays; once it falls silent it is closed one heartbeat deadline after
/// its last frame (give or take a wheel tick), with
/// GOAWAY(heartbeat_timeout), and unregistered at once.
fn heartbeats_keep_a_connection_and_silence_ends_it<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (mut client, id) = h.open("alice");
    let bound_at = h.now;
    // Ten intervals of pings, as the client sends them.
    while h.now < bound_at + 10 * HEARTBEAT {
        h.advance(TICK);
        client.proto.handle_timeout(h.now);
        let frames: Vec<Frame> = std::iter::from_fn(|| client.proto.poll_transmit()).collect();
        if !frames.is_empty() {
            assert_eq!(frames, [Frame::Ping]);
            h.send(&client, &frames);
            assert_eq!(h.received(&mut client), [Frame::Pong]);
            client.proto.handle_frame(h.now, Frame::Pong);
        }
        assert!(!h.is_closing(&client), "closed at {:?}", h.now - bound_at);
    }
    let last_frame = h.now;
    // Silence: not closed before the deadline...
    h.advance(HEARTBEAT_DEADLINE - TICK);
    assert!(!h.is_closing(&client));
    assert!(h.events().is_empty());
    // ... closed within a tick after it.
    h.advance(2 * TICK);
    assert!(h.now - last_frame > HEARTBEAT_DEADLINE);
    assert!(h.is_closing(&client));
    assert_eq!(
        h.received(&mut client),
        [goaway(GoAwayReason::HEARTBEAT_TIMEOUT)]
    );
    // The register hears why, for the device's next bind.
    let expected = TimedOut {
        device_id: "alice-phone".to_owned(),
        network: NetworkType::Wifi,
        interval_ms: HEARTBEAT.as_millis() as u32,
    };
    assert!(matches!(
        h.events().as_slice(),
        [ShardEvent::Conn {
            conn,
            event: ConnEvent::Closed { timed_out: Some(timed_out), .. },
        }] if *conn == id && *timed_out == expected
    ));
    h.end(&client);
    assert_eq!(h.closed("heartbeat_timeout"), 1);
}

/// HELLO and a BIND must both come within the auth timeout: a connection
/// that only said HELLO gets GOAWAY(auth_timeout) then, one that bound is
/// not affected.
fn closes_a_connection_that_does_not_bind_in_time<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (mut bound, _) = h.open("alice");
    let mut silent = h.connect();
    h.send(&silent, &[hello()]);
    assert!(matches!(
        h.received(&mut silent).as_slice(),
        [Frame::HelloOk { .. }]
    ));
    h.advance(AUTH_TIMEOUT - TICK);
    assert!(!h.is_closing(&silent));
    h.advance(2 * TICK);
    assert!(h.is_closing(&silent));
    assert_eq!(
        h.received(&mut silent),
        [goaway(GoAwayReason::AUTH_TIMEOUT)]
    );
    assert!(h.events().is_empty(), "nothing to unregister");
    assert!(!h.is_closing(&bound));
    assert!(h.received(&mut bound).is_empty());
    h.end(&silent);
    assert_eq!(h.closed("auth_timeout"), 1);
}

/// The client's end: the connection's slot is freed, the driver is told
/// to remove it, and `Closed` unregisters its bindings. The slot's next
/// connection has a new generation, so a command for the old one does not
/// reach it.
fn frees_the_slot_on_the_clients_end<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (client, id) = h.open("alice");
    h.end(&client);
    match h.events().as_slice() {
        [
            ShardEvent::Conn {
                conn,
                event:
                    ConnEvent::Closed {
                        bindings,
                        timed_out: None,
                    },
            },
        ] => {
            assert_eq!(*conn, id);
            assert_eq!(bindings, &[(AppId::from(APP), UserId::from("alice"))]);
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(h.shard.conns.is_empty());
    assert_eq!(h.closed("peer_closed"), 1);
    assert_eq!(h.metrics.snapshot().connections_open, 0);

    let (mut next, next_id) = h.open("bob");
    assert_eq!(next_id.slot, id.slot);
    assert_ne!(next_id.generation, id.generation);
    h.command(ShardCommand::Conn {
        conn: id,
        command: ConnCommand::Kick {
            reason: GoAwayReason::KICKED,
        },
    });
    assert!(h.received(&mut next).is_empty());
    assert!(!h.is_closing(&next));
}

/// A kick: GOAWAY(kicked), `Closed` at once (before the socket goes), no
/// more reading until the GOAWAY is out; then the shard shuts its side and
/// reads (and discards) until the client's end, which frees the slot.
/// The limit counts bindings of the app in the process: a BIND past it is
/// refused, and a binding that ends makes room.
fn refuses_binds_past_the_apps_connection_limit<const R: bool>() {
    let mut h = Harness::<R>::new();
    let app = gateway_app(vec![current_secret()], Some(1));
    let bound = app.bound.clone();
    h.command(ShardCommand::SetApps(Arc::from([app])));
    let (alice, _) = h.open("alice");
    assert_eq!(bound.load(std::sync::atomic::Ordering::Relaxed), 1);
    let (mut bob, refused) = h.bind_refused("bob");
    assert_eq!(refused, BindErrorCode::TOO_MANY_CONNECTIONS);
    h.end(&alice);
    h.settle();
    assert_eq!(bound.load(std::sync::atomic::Ordering::Relaxed), 0);
    h.send(&bob, &[bind("bob")]);
    assert!(matches!(
        h.received(&mut bob).as_slice(),
        [Frame::BindOk { .. }]
    ));
    assert_eq!(bound.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// After a rotation, tokens signed with the old secret bind until its
/// grace ends.
fn honours_a_retired_token_secret_only_in_its_grace<const R: bool>() {
    let mut h = Harness::<R>::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let rotated = |retires_at_ms| {
        gateway_app(
            vec![
                TokenSecret {
                    secret: b"the new secret, 32 bytes or so..".to_vec(),
                    retires_at_ms: None,
                },
                TokenSecret {
                    secret: SECRET.to_vec(),
                    retires_at_ms: Some(retires_at_ms),
                },
            ],
            None,
        )
    };
    h.command(ShardCommand::SetApps(Arc::from([rotated(now_ms + 60_000)])));
    h.open("alice");
    h.command(ShardCommand::SetApps(Arc::from([rotated(now_ms - 1)])));
    let (_bob, refused) = h.bind_refused("bob");
    assert_eq!(refused, BindErrorCode::INVALID_TOKEN);
}

/// A deleted app's only binding ends its connection with GOAWAY
/// (app_deleted), reported closed; new BINDs find no such app.
fn ends_the_bindings_of_a_deleted_app<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (mut alice, id) = h.open("alice");
    h.command(ShardCommand::SetApps(Arc::from([])));
    assert_eq!(h.received(&mut alice), [goaway(GoAwayReason::APP_DELETED)]);
    assert!(matches!(
        h.events().as_slice(),
        [ShardEvent::Conn { conn, event: ConnEvent::Closed { .. } }] if *conn == id
    ));
    let (_bob, refused) = h.bind_refused("bob");
    assert_eq!(refused, BindErrorCode::UNKNOWN_APP);
}

fn kicks_with_goaway_then_closes_on_the_clients_end<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (mut client, id) = h.open("alice");
    h.command(ShardCommand::Conn {
        conn: id,
        command: ConnCommand::Kick {
            reason: GoAwayReason::KICKED,
        },
    });
    assert_eq!(h.received(&mut client), [goaway(GoAwayReason::KICKED)]);
    assert!(matches!(
        h.events().as_slice(),
        [ShardEvent::Conn { conn, event: ConnEvent::Closed { .. } }] if *conn == id
    ));
    let slot = client.slot();
    assert!(h.shard.conns[slot].write_shut);
    if R {
        // Receiving again, to see the client's end.
        assert!(h.driver().is_receiving(client.token));
    }
    // What the client still sends is read and dropped.
    h.send(&client, &[Frame::Ping]);
    assert!(h.received(&mut client).is_empty());
    assert!(h.is_open(&client));
    h.end(&client);
    assert!(h.events().is_empty(), "Closed is reported once");
    assert_eq!(h.closed("kicked"), 1);
}

/// A kicked client that takes nothing (not even the GOAWAY) is cut at the
/// flush deadline; its send is cancelled, and its buffer goes back.
fn cuts_a_kicked_client_that_never_reads_at_the_flush_deadline<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (client, id) = h.open("alice");
    h.driver().set_room(client.token, Some(0));
    h.command(ShardCommand::Conn {
        conn: id,
        command: ConnCommand::Kick {
            reason: GoAwayReason::KICKED,
        },
    });
    if R {
        assert!(!h.driver().is_receiving(client.token));
    }
    h.assert_cut_at_the_flush_deadline(&client);
    assert_eq!(h.closed("flush_timeout"), 1);
    assert_eq!(h.closed("kicked"), 0);
}

/// A failed socket ends its connection as an I/O error, and unregisters
/// it.
fn ends_a_connection_whose_socket_fails<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (client, id) = h.open("alice");
    h.driver().fail(client.token);
    h.settle();
    h.assert_removed(&client);
    assert!(matches!(
        h.events().as_slice(),
        [ShardEvent::Conn { conn, event: ConnEvent::Closed { .. } }] if *conn == id
    ));
    assert_eq!(h.closed("io_error"), 1);
}

/// So does a send that fails (a broken pipe).
fn ends_a_connection_whose_send_fails<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (client, id) = h.open("alice");
    h.driver().fail_send(client.token, libc::EPIPE);
    h.deliver(id, &message(1, 10));
    h.assert_removed(&client);
    assert!(matches!(
        h.events().as_slice(),
        [ShardEvent::Conn { conn, event: ConnEvent::Closed { .. } }] if *conn == id
    ));
    assert_eq!(h.closed("io_error"), 1);
}

/// Completions that arrive for a connection after it is gone (input, a
/// send's end) never reach the connection that took its slot, and their
/// buffers go back.
fn ignores_what_is_left_of_a_connection_once_its_slot_is_reused<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (old, _) = h.open("alice");
    h.end(&old);
    assert_eq!(h.events().len(), 1, "Closed");
    let (mut new, _) = h.open("bob");
    assert_eq!(new.slot(), old.slot());
    assert_ne!(new.token, old.token);
    if R {
        let buffer = h.driver().recv_buffer(&encoded(&[Frame::Ping]));
        h.driver().event(Event::Received {
            token: old.token,
            input: Input::Bytes(buffer),
            rearm: false,
        });
        h.driver().event(Event::Received {
            token: old.token,
            input: Input::End,
            rearm: true,
        });
    } else {
        h.driver().event(Event::Readable { token: old.token });
    }
    h.driver().event(Event::Sent {
        token: old.token,
        buffer: SendBuffer::Pooled(Box::default()),
        result: Ok(()),
    });
    h.settle();
    assert!(h.received(&mut new).is_empty());
    assert!(h.is_open(&new) && !h.is_closing(&new));
    assert!(h.events().is_empty());
    h.send(&new, &[Frame::Ping]);
    assert_eq!(h.received(&mut new), [Frame::Pong]);
}

/// A drain stops accepting, tells every connection to come back after the
/// delay (GOAWAY(server_shutdown)), unregisters them, and reports
/// `Drained` once the last one is gone.
fn drains_every_connection_then_reports_drained<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (mut alice, _) = h.open("alice");
    let (mut bob, _) = h.open("bob");
    h.command(ShardCommand::Drain {
        reconnect_delay_ms: 5_000,
        spread: Duration::ZERO,
    });
    assert!(h.driver().listener_removed(0));
    for client in [&mut alice, &mut bob] {
        let delay = drain_hint(&h.received(client)).expect("a GOAWAY(server_shutdown)");
        assert!((2_500..=7_500).contains(&delay), "hint {delay} ms");
    }
    let events = h.events();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|event| matches!(
        event,
        ShardEvent::Conn {
            event: ConnEvent::Closed { .. },
            ..
        }
    )));
    h.end(&alice);
    assert!(h.events().is_empty());
    h.end(&bob);
    assert!(matches!(
        h.events().as_slice(),
        [ShardEvent::Drained { shard: 0 }]
    ));
    assert_eq!(h.closed("drained"), 2);
}

/// The reconnect hint of a GOAWAY(server_shutdown) alone among `frames`.
fn drain_hint(frames: &[Frame]) -> Option<u32> {
    match frames {
        [
            Frame::GoAway {
                reason: GoAwayReason::SERVER_SHUTDOWN,
                reconnect_delay_ms: Some(delay),
            },
        ] => Some(*delay),
        [] => None,
        other => panic!("expected one GOAWAY(server_shutdown), got {other:?}"),
    }
}

/// With a spread, a drain tells the connections in even batches as the
/// tick comes round: by each tick, the share of them that the time elapsed
/// is of the spread, the first at once and the last at its end. Each hint
/// is drawn from half the configured delay to one and a half times it.
fn spreads_a_drains_goaways_over_its_window_with_jittered_hints<const R: bool>() {
    const CONNECTIONS: usize = 12;
    const DELAY_MS: u32 = 1_000;
    // Shorter than the close flush timeout: every client is still there
    // to end its side at the end.
    let spread = 6 * TICK;
    let mut h = Harness::<R>::with(EVENTS_LEN, |s| s.connections_max = CONNECTIONS);
    let mut clients: Vec<Client> = (0..CONNECTIONS)
        .map(|i| h.open(&format!("user{i}")).0)
        .collect();
    let started = h.now;
    h.command(ShardCommand::Drain {
        reconnect_delay_ms: DELAY_MS,
        spread,
    });
    assert!(h.driver().listener_removed(0));
    // When each client was told, and its hint.
    let mut told: Vec<Option<(Duration, u32)>> = vec![None; CONNECTIONS];
    loop {
        let elapsed = h.now - started;
        for (client, told) in clients.iter_mut().zip(&mut told) {
            if let Some(delay) = drain_hint(&h.received(client)) {
                assert!(told.is_none(), "told twice");
                *told = Some((elapsed, delay));
            }
        }
        let so_far = told.iter().flatten().count();
        let due = if elapsed >= spread {
            CONNECTIONS
        } else {
            (CONNECTIONS as f64 * elapsed.as_secs_f64() / spread.as_secs_f64()) as usize + 1
        };
        assert_eq!(so_far, due, "told by {elapsed:?}");
        if so_far == CONNECTIONS {
            break;
        }
        h.advance(TICK);
    }
    assert_eq!(h.now - started, spread);
    let hints: Vec<u32> = told.iter().flatten().map(|&(_, delay)| delay).collect();
    assert!(
        hints
            .iter()
            .all(|delay| (DELAY_MS / 2..=DELAY_MS * 3 / 2).contains(delay)),
        "{hints:?}"
    );
    let mut distinct = hints.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > CONNECTIONS / 2, "{hints:?}");

    for client in &clients {
        h.end(client);
    }
    let events = h.events();
    assert!(matches!(
        events.last(),
        Some(ShardEvent::Drained { shard: 0 })
    ));
    assert_eq!(h.closed("drained"), CONNECTIONS as u64);
}

/// While the outbox holds `OUTBOX_LEN_MAX` events the control plane has not
/// taken, the shard reads no more (io_uring holds what arrives, epoll
/// leaves it in the socket); once the control plane catches up, reading
/// goes on, and every event arrives once, in order.
fn stops_reading_while_the_outbox_is_full<const R: bool>() {
    const CHANNEL_LEN: usize = 64;
    const CHUNK: u64 = 1_000;
    let mut h = Harness::<R>::with(CHANNEL_LEN, |_| {});
    let (client, _) = h.open("alice");
    let upstream = |request_id| Frame::Upstream {
        app: APP.to_owned(),
        request_id,
        route: None,
        payload: Bytes::from_static(b"u"),
    };
    let chunk =
        |n: u64| -> Vec<Frame> { (n * CHUNK + 1..=(n + 1) * CHUNK).map(upstream).collect() };
    assert!(
        encoded(&chunk(0)).len() < SCRATCH_LEN,
        "a chunk is one read"
    );
    let mut chunks = 0;
    while h.shard.outbox.len() < OUTBOX_LEN_MAX {
        h.send(&client, &chunk(chunks));
        chunks += 1;
    }
    // One more while the outbox is full: not handled.
    let queued = h.shard.outbox.len();
    h.send(&client, &chunk(chunks));
    chunks += 1;
    assert_eq!(h.shard.outbox.len(), queued);
    if R {
        assert_eq!(h.shard.held_input.len(), 1);
    } else {
        assert_eq!(h.shard.readers_waiting, [client.slot()]);
    }
    // The control plane takes events; the shard reads again.
    let mut request_ids = Vec::new();
    for _ in 0..SETTLE_TURNS_MAX {
        for event in h.events() {
            match event {
                ShardEvent::Conn {
                    event: ConnEvent::Upstream { request_id, .. },
                    ..
                } => request_ids.push(request_id),
                other => panic!("unexpected {other:?}"),
            }
        }
        if request_ids.len() as u64 == chunks * CHUNK {
            break;
        }
        h.settle();
    }
    let expected: Vec<u64> = (1..=chunks * CHUNK).collect();
    assert_eq!(request_ids, expected);
    assert!(h.shard.held_input.is_empty() && h.shard.outbox.is_empty());
}

/// io_uring: when the buffer ring runs dry, a receive ends with no buffer;
/// it is armed again once buffers are back, and the input that waited
/// arrives then, in order.
#[test]
fn uring_waits_for_receive_buffers_then_reads_in_order() {
    let mut h = Harness::<true>::new();
    let (mut client, _) = h.open("alice");
    h.driver().set_recv_buffers(0);
    h.send(&client, &[Frame::Ping]);
    h.send(&client, &[Frame::Ping, Frame::Ping]);
    assert!(!h.driver().is_receiving(client.token));
    assert_eq!(h.shard.recv_rearm.len(), 1);
    assert!(h.received(&mut client).is_empty());
    h.driver().set_recv_buffers(1);
    h.settle();
    assert!(h.driver().is_receiving(client.token));
    assert_eq!(h.received(&mut client), vec![Frame::Pong; 3]);
    assert!(h.shard.recv_rearm.is_empty());
}

fn per_ip(connections_max: Option<u32>, new_per_sec: Option<Rate>) -> Option<Arc<PerIpLimits>> {
    Some(Arc::new(PerIpLimits::new(PerIpConfig {
        connections_max,
        new_per_sec,
        allowed: vec!["10.0.0.0/8".parse().unwrap()],
    })))
}

/// The retry hint of a GOAWAY(overloaded), if that is what came.
fn overloaded_hint(frames: &[Frame]) -> Option<u32> {
    match frames {
        [
            Frame::GoAway {
                reason: GoAwayReason::OVERLOADED,
                reconnect_delay_ms,
            },
        ] => *reconnect_delay_ms,
        _ => None,
    }
}

/// Past its address's connection limit, a client is turned away with
/// GOAWAY(overloaded) and a retry hint; other addresses, and those of an
/// allow-listed network, are not; a connection that closes makes room.
fn limits_connections_per_address_but_not_allow_listed_ones<const R: bool>() {
    let mut h = Harness::<R>::with(EVENTS_LEN, |s| s.per_ip = per_ip(Some(2), None));
    let a = Some("192.0.2.1".parse().unwrap());
    let b = Some("192.0.2.2".parse().unwrap());
    let nat = Some("10.1.2.3".parse().unwrap());
    let mut first: Vec<Client> = (0..2).map(|_| h.connect_from(a)).collect();
    let mut over = h.connect_from(a);
    let hint = overloaded_hint(&h.received(&mut over)).expect("GOAWAY(overloaded) with a hint");
    assert!((1_000..=60_000).contains(&hint), "hint {hint} ms");
    assert!(h.is_closing(&over));
    h.end(&over);
    assert_eq!(h.turned_away("per_ip_connections"), 1);
    assert_eq!(h.closed("overloaded"), 1);

    let mut others: Vec<Client> = std::iter::once(h.connect_from(b))
        .chain((0..5).map(|_| h.connect_from(nat)))
        .collect();
    for client in first.iter_mut().chain(&mut others) {
        assert!(h.received(client).is_empty(), "taken, and told nothing");
    }
    assert_eq!(h.turned_away("per_ip_connections"), 1);

    h.end(&first[0]);
    let mut again = h.connect_from(a);
    h.send(&again, &[hello()]);
    assert!(matches!(
        h.received(&mut again).as_slice(),
        [Frame::HelloOk { .. }]
    ));
}

/// Past its address's rate of new connections, a client is turned away
/// until the bucket refills, with a hint no sooner than that; another
/// address is not held up meanwhile.
fn limits_new_connections_per_address_a_second<const R: bool>() {
    let mut h = Harness::<R>::with(EVENTS_LEN, |s| {
        s.per_ip = per_ip(
            None,
            Some(Rate {
                per_sec: 1.0,
                burst: 2,
            }),
        );
    });
    let a = Some("192.0.2.1".parse().unwrap());
    let b = Some("192.0.2.2".parse().unwrap());
    for _ in 0..2 {
        let mut client = h.connect_from(a);
        assert!(h.received(&mut client).is_empty());
    }
    let mut over = h.connect_from(a);
    let hint = overloaded_hint(&h.received(&mut over)).expect("GOAWAY(overloaded) with a hint");
    // The bucket has a token again in a second; the usual hint comes on top.
    assert!((2_000..=60_000).contains(&hint), "hint {hint} ms");
    assert_eq!(h.turned_away("per_ip_rate"), 1);
    let mut other = h.connect_from(b);
    assert!(h.received(&mut other).is_empty());

    h.advance(Duration::from_secs(1));
    let mut later = h.connect_from(a);
    assert!(h.received(&mut later).is_empty());
    assert_eq!(h.turned_away("per_ip_rate"), 1);
}

/// The frame bytes of a PING announced as `len` bytes long, cut after
/// its length prefix and `body` bytes.
fn announced_frame(len: u32, body: usize) -> Vec<u8> {
    let mut bytes = len.to_be_bytes().to_vec();
    bytes.resize(4 + body, 0);
    bytes
}

/// A client that sends the start of a frame and then trickles its bytes
/// slower than the deadline allows is cut (`read_timeout`), with no timer
/// before it began and none after; a client on the same shard is answered
/// all along.
fn cuts_a_frame_that_trickles_past_its_deadline_and_serves_others<const R: bool>() {
    let mut h = Harness::<R>::new();
    let (mut normal, _) = h.open("alice");
    let slow = h.connect();
    assert!(
        h.shard.stalls.is_empty(),
        "no deadline without a partial frame"
    );
    // 100 bytes announced: 2 s, plus 1.04 s for 104 bytes.
    let bytes = announced_frame(100, 0);
    h.send_bytes(&slow, &bytes);
    assert!(h.shard.stalls.contains_key(&slow.slot()));
    for _ in 0..5 {
        h.advance(Duration::from_millis(500));
        h.send_bytes(&slow, &[0]);
        h.send(&normal, &[Frame::Ping]);
        assert!(matches!(h.received(&mut normal).as_slice(), [Frame::Pong]));
    }
    assert!(h.is_open(&slow), "2.5 s in, within its 3.04 s");
    h.advance(Duration::from_millis(500) + TICK);
    h.assert_removed(&slow);
    assert_eq!(h.closed("read_timeout"), 1);
    assert!(h.shard.stalls.is_empty());
    h.send(&normal, &[Frame::Ping]);
    assert!(matches!(h.received(&mut normal).as_slice(), [Frame::Pong]));
}

/// The deadline grows with the frame's announced length and the client's
/// network, and starts again with each frame: a client that finishes its
/// frames in time is never cut.
fn gives_a_longer_frame_and_a_slower_network_more_time<const R: bool>() {
    let mut h = Harness::<R>::new();
    let mut client = h.connect();
    let hello = Frame::Hello {
        device_id: "alice-phone".to_owned(),
        client_version: "test".to_owned(),
        network: NetworkType::Cellular4g,
        features: herald_proto::Features::ALL,
    };
    h.send(&client, &[hello]);
    assert!(matches!(
        h.received(&mut client).as_slice(),
        [Frame::HelloOk { .. }]
    ));
    // Cellular: 4 s, plus a second per 100 bytes of the BIND. In time;
    // then the PING's deadline counts from its own start.
    let mut bind_bytes = encoded(&[bind("alice")]);
    bind_bytes.extend(encoded(&[Frame::Ping]));
    let split = bind_bytes.len() - 3;
    h.send_bytes(&client, &bind_bytes[..4]);
    h.advance(Duration::from_secs(4));
    assert!(h.is_open(&client));
    h.send_bytes(&client, &bind_bytes[4..split]);
    assert!(matches!(
        h.received(&mut client).as_slice(),
        [Frame::BindOk { .. }]
    ));
    h.advance(Duration::from_secs(3));
    assert!(h.is_open(&client), "the PING's deadline began with it");
    h.send_bytes(&client, &bind_bytes[split..]);
    assert!(matches!(h.received(&mut client).as_slice(), [Frame::Pong]));
    h.advance(Duration::from_secs(10));
    assert!(h.is_open(&client), "nothing held, nothing due");

    let slow = h.connect();
    h.send_bytes(&slow, &announced_frame(300, 10));
    h.advance(Duration::from_secs(4));
    assert!(h.is_open(&slow), "2 s, plus 3 s for its 304 bytes");
    h.advance(Duration::from_secs(1) + TICK);
    h.assert_removed(&slow);
    assert_eq!(h.closed("read_timeout"), 1);
}

/// While the shard itself holds input back (its outbox is full), a frame
/// that is late may be whole in the socket: it is not cut then, and its
/// rest is read once the control plane takes the events.
fn waits_with_a_frame_deadline_while_the_shard_holds_input_back<const R: bool>() {
    const CHANNEL_LEN: usize = 64;
    let mut h = Harness::<R>::with(CHANNEL_LEN, |_| {});
    let (busy, _) = h.open("alice");
    let mut late = h.connect();
    let hello_bytes = encoded(&[hello()]);
    h.send_bytes(&late, &hello_bytes[..2]);
    let upstreams: Vec<Frame> = (1..=1_000)
        .map(|request_id| Frame::Upstream {
            app: APP.to_owned(),
            request_id,
            route: None,
            payload: Bytes::from_static(b"u"),
        })
        .collect();
    while h.shard.outbox.len() < OUTBOX_LEN_MAX {
        h.send(&busy, &upstreams);
    }
    h.send_bytes(&late, &hello_bytes[2..]);
    // Past its deadline (2 s and a little) with its rest unread.
    h.advance(Duration::from_secs(3));
    assert!(h.is_open(&late));
    assert_eq!(h.closed("read_timeout"), 0);
    for _ in 0..SETTLE_TURNS_MAX {
        h.events();
        if h.shard.outbox.is_empty() && h.shard.held_input.is_empty() {
            break;
        }
        h.settle();
    }
    assert!(matches!(
        h.received(&mut late).as_slice(),
        [Frame::HelloOk { .. }]
    ));
    h.advance(Duration::from_secs(3));
    assert!(h.is_open(&late));
}
