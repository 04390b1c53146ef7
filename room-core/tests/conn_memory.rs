//! What an idle authenticated connection costs the gateway in heap memory,
//! counted by a global allocator that tracks live bytes. It runs the real
//! gateway on loopback with both drivers and prints bytes per connection by
//! driver; the assertion is the budget ARCHITECTURE.md states, so a change
//! that makes idle connections heavier fails here rather than in production.
//!
//! The slab slot itself is not counted here (the slab's storage is reserved
//! before the first connection); its size is checked at compile time.
//!
//! Over TLS too: what an established TLS connection adds (its transport
//! box and the session's key material). The clients run on a thread of
//! their own whose allocations are not counted (a TLS client holds several
//! KB), so that only the gateway's side is.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use herald_proto::ids::AppId;
use herald_proto::plane::{ConnCommand, ConnEvent, ShardCommand, ShardEvent};
use herald_proto::server::{HeartbeatRanges, ServerConfig};
use herald_proto::{Frame, NetworkType, TokenClaims, decode, encode, sign_token};
use herald_room::{Gateway, GatewayConfig, IoDriver, ListenerConfig, TlsAcceptor, TransportKind};

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_ALLOCATIONS: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Set on the clients' thread: its allocations are not the gateway's.
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    !UNCOUNTED.with(Cell::get)
}

// SAFETY: forwards every call to the system allocator unchanged and only
// counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
            LIVE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counted() {
            LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
            LIVE_ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const APP: &str = "bench";
const SECRET: &[u8] = b"conn-memory-secret-0123456789";
const CONNECTIONS: usize = 2_000;

/// Heap bytes the gateway may hold for one idle connection bound to one
/// app, on top of its slab slot (see ARCHITECTURE.md, "Memory per
/// connection").
const HEAP_BYTES_PER_IDLE_CONN_MAX: i64 = 144;
/// What an established TLS 1.3 connection may add: its transport box and
/// its session (keys, IVs, sequence numbers, the two traffic secrets).
const TLS_HEAP_BYTES_PER_IDLE_CONN_MAX: i64 = 320;

/// A certificate for 127.0.0.1, and a client configuration trusting it.
struct Pki {
    acceptor: TlsAcceptor,
    client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, made.cert.pem()).unwrap();
        std::fs::write(&key_file, made.signing_key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Pki {
            acceptor: TlsAcceptor::load(&cert_file, &key_file).unwrap(),
            client: Arc::new(client),
            _dir: dir,
        }
    }
}

trait Stream: Read + Write + Send {}

impl<T: Read + Write + Send> Stream for T {}

fn config(io: IoDriver, tls: Option<&Pki>) -> GatewayConfig {
    let interval = Duration::from_secs(60);
    GatewayConfig {
        io,
        recv_buffers: herald_room::RecvBuffers {
            count: 64,
            len: 2048,
        },
        listeners: vec![ListenerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            transport: if tls.is_some() {
                TransportKind::Tls
            } else {
                TransportKind::Tcp
            },
        }],
        tls: tls.map(|pki| pki.acceptor.clone()),
        websocket: Default::default(),
        shards: 1,
        server: ServerConfig {
            heartbeat: HeartbeatRanges::fixed(interval),
            auth_timeout: Duration::from_secs(30),
            bind_failures_max: 3,
            apps_per_conn_max: 4,
            inflight_pushes_max: 32,
            storage_epoch: 1,
        },
        apps: vec![herald_room::AppAccess {
            id: APP.to_owned(),
            token_secrets: vec![herald_room::TokenSecret {
                secret: SECRET.to_vec(),
                retires_at_ms: None,
            }],
            max_connections: None,
        }],
        connections_per_shard_max: CONNECTIONS * 2,
        send_queue_bytes_max: 256 * 1024,
        command_queue_len: 1024,
        send_queue_frames_max: 1024,
        accept_rate: None,
        per_ip: None,
        read_deadlines: herald_room::ReadDeadlines {
            unknown: Duration::from_secs(10),
            wifi: Duration::from_secs(10),
            cellular: Duration::from_secs(10),
            wired: Duration::from_secs(10),
            bytes_per_sec_min: 1024,
        },
        pin_shards: true,
    }
}

fn send(stream: &mut dyn Stream, frame: &Frame) {
    let mut buffer = BytesMut::new();
    encode(frame, &mut buffer).unwrap();
    stream.write_all(&buffer).unwrap();
    stream.flush().unwrap();
}

fn recv(stream: &mut dyn Stream, buffer: &mut BytesMut) -> Frame {
    loop {
        if let Some(frame) = decode(buffer).unwrap() {
            return frame;
        }
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the gateway closed the connection");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn connect_and_bind(
    gateway: std::net::SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
    user: usize,
) -> Box<dyn Stream> {
    let tcp = TcpStream::connect(gateway).unwrap();
    let stream: Box<dyn Stream> = match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::from(gateway.ip());
            let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
        None => Box::new(tcp),
    };
    bind(stream, user)
}

/// Says HELLO and binds user `user` on a connected stream.
fn bind(mut stream: Box<dyn Stream>, user: usize) -> Box<dyn Stream> {
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = sign_token(
        SECRET,
        &TokenClaims {
            app: APP.to_owned(),
            user: format!("user-{user:07}"),
            expires_at_unix_secs: expires,
        },
    )
    .unwrap();
    let mut buffer = BytesMut::new();
    send(
        &mut *stream,
        &Frame::Hello {
            device_id: format!("device-{user:07}"),
            client_version: "conn-memory/1".to_owned(),
            network: NetworkType::Wifi,
            features: herald_proto::Features::NONE,
        },
    );
    assert!(matches!(
        recv(&mut *stream, &mut buffer),
        Frame::HelloOk { .. }
    ));
    send(
        &mut *stream,
        &Frame::Bind {
            app: APP.to_owned(),
            token,
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        },
    );
    let reply = recv(&mut *stream, &mut buffer);
    assert!(matches!(reply, Frame::BindOk { .. }), "{reply:?}");
    stream
}

/// One test at a time, for the whole of its body: the counters are the
/// whole process's, and what another test allocates or frees meanwhile (a
/// certificate, a captured line of output) would count as the gateway's.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    MEASURING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Live heap bytes and allocations per idle bound connection.
fn measure(io: IoDriver, tls: Option<&Pki>) -> (f64, f64) {
    let (events_tx, events_rx) = async_channel::bounded(CONNECTIONS * 4);
    let gateway = Gateway::start(config(io, tls), events_tx).unwrap();
    let addr = gateway.local_addr();
    let client_tls = tls.map(|pki| pki.client.clone());
    // The clients' thread: 64 to warm up (the first connections grow pools
    // and executor queues), then the measured ones, held until told.
    let (step_tx, step_rx) = sync_channel::<()>(1);
    let (done_tx, done_rx) = sync_channel::<()>(1);
    let clients = std::thread::spawn(move || {
        UNCOUNTED.with(|uncounted| uncounted.set(true));
        let tls = client_tls.as_ref();
        let warm: Vec<_> = (0..64).map(|i| connect_and_bind(addr, tls, i)).collect();
        done_tx.send(()).unwrap();
        step_rx.recv().unwrap();
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|i| connect_and_bind(addr, tls, 1_000 + i))
            .collect();
        done_tx.send(()).unwrap();
        step_rx.recv().unwrap();
        drop(clients);
        drop(warm);
    });
    done_rx.recv().unwrap();
    wait_for_events(&events_rx, 64);

    let bytes_before = LIVE_BYTES.load(Ordering::Relaxed);
    let allocations_before = LIVE_ALLOCATIONS.load(Ordering::Relaxed);
    step_tx.send(()).unwrap();
    done_rx.recv().unwrap();
    wait_for_events(&events_rx, CONNECTIONS);
    // Let the shard finish whatever the last BIND started.
    std::thread::sleep(Duration::from_millis(200));
    let bytes = LIVE_BYTES.load(Ordering::Relaxed) - bytes_before;
    let allocations = LIVE_ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;

    step_tx.send(()).unwrap();
    clients.join().unwrap();
    drop(events_rx);
    gateway.join();
    let n = CONNECTIONS as f64;
    (bytes as f64 / n, allocations as f64 / n)
}

fn wait_for_events(events: &async_channel::Receiver<ShardEvent>, bound: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while seen < bound {
        assert!(
            Instant::now() < deadline,
            "only {seen} of {bound} binds reported"
        );
        match events.try_recv() {
            Ok(ShardEvent::Conn {
                event: ConnEvent::Bound(_),
                ..
            }) => seen += 1,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[test]
fn an_idle_bound_connection_stays_within_its_heap_budget() {
    let _alone = alone();
    for io in [IoDriver::Uring, IoDriver::Epoll] {
        let (bytes, allocations) = measure(io, None);
        println!(
            "{}: {bytes:.0} heap bytes and {allocations:.1} live allocations per idle bound connection",
            io.as_str()
        );
        assert!(
            bytes <= HEAP_BYTES_PER_IDLE_CONN_MAX as f64,
            "{}: {bytes:.0} heap bytes per idle connection, budget {HEAP_BYTES_PER_IDLE_CONN_MAX}",
            io.as_str()
        );
    }
}

#[test]
fn an_idle_tls_connection_adds_only_its_key_material() {
    let _alone = alone();
    let pki = Pki::new();
    for io in [IoDriver::Uring, IoDriver::Epoll] {
        let (tcp, _) = measure(io, None);
        let (bytes, allocations) = measure(io, Some(&pki));
        println!(
            "{} over TLS: {bytes:.0} heap bytes and {allocations:.1} live allocations per idle \
             bound connection, {:.0} more than over TCP",
            io.as_str(),
            bytes - tcp
        );
        assert!(
            bytes - tcp <= TLS_HEAP_BYTES_PER_IDLE_CONN_MAX as f64,
            "{}: TLS adds {:.0} heap bytes per idle connection, budget {TLS_HEAP_BYTES_PER_IDLE_CONN_MAX}",
            io.as_str(),
            bytes - tcp
        );
    }
}

/// Connections killed by a reset while the gateway has sends in flight to
/// them (their windows full of broadcasts they never read) and input half
/// received (a frame's first bytes) must leave nothing behind: after the
/// first round has grown the pools, tables and slab to their working size,
/// every later round ends with as many live allocations as the first ended
/// with (a leaked object per connection would be a thousand more), and
/// with the heap's bytes within a slack for tables a later round's timing
/// grew a little further.
///
/// `tests/asan.rs` runs this test again built with AddressSanitizer, so
/// that the same churn also shows no buffer used after it is freed and
/// nothing leaked.
#[test]
fn connections_killed_mid_send_and_mid_receive_leave_nothing_behind() {
    const CHURN: usize = 1_000;
    const ROUNDS: usize = 3;
    /// Live allocations the later rounds may end above the first: a
    /// handful, where a leak would be one or more per connection.
    const SLACK_ALLOCATIONS: i64 = 16;
    /// Heap the later rounds may end above the first: well below one
    /// leaked buffer per connection.
    const SLACK_BYTES: i64 = 32 * 1024;
    /// More broadcasts than a shard remembers (it keeps the latest few
    /// for catching up): sent before the first round, so that the list is
    /// full before the first round's end is counted.
    const WARM_BROADCASTS: u64 = 256;
    /// Short deadlines, so that the timer wheel's entries of the dead
    /// connections (the wheel keeps them until they come due) are gone
    /// before the heap is counted.
    const DEADLINE_INTERVAL: Duration = Duration::from_secs(2);
    let deadlines_passed = DEADLINE_INTERVAL * 2;
    let _alone = alone();
    for io in [IoDriver::Uring, IoDriver::Epoll] {
        let (events_tx, events_rx) = async_channel::bounded(CHURN * 8);
        let mut config = config(io, None);
        config.server.auth_timeout = DEADLINE_INTERVAL;
        config.server.heartbeat = HeartbeatRanges::fixed(DEADLINE_INTERVAL);
        // The half frames' deadlines pass too: their length adds little.
        config.read_deadlines = herald_room::ReadDeadlines {
            unknown: DEADLINE_INTERVAL / 2,
            wifi: DEADLINE_INTERVAL / 2,
            cellular: DEADLINE_INTERVAL / 2,
            wired: DEADLINE_INTERVAL / 2,
            bytes_per_sec_min: 1 << 20,
        };
        let gateway = Gateway::start(config, events_tx).unwrap();
        let addr = gateway.local_addr();
        let commands = gateway.commands();
        let metrics = gateway.metrics();
        let frame = {
            let mut frame = BytesMut::new();
            encode(
                &Frame::Broadcast {
                    app: APP.to_owned(),
                    message_id: herald_proto::MessageId([7; 16]),
                    seq: 0,
                    payload: bytes::Bytes::from(vec![b'x'; 32 * 1024]),
                },
                &mut frame,
            )
            .unwrap();
            frame.freeze()
        };
        let broadcast = |seq: u64| {
            for shard in &commands {
                shard
                    .send_blocking(ShardCommand::Broadcast {
                        app: AppId::from(APP),
                        seq,
                        required_tags: Arc::from(Vec::new()),
                        frame: frame.clone(),
                        progress: Arc::default(),
                        mode: Default::default(),
                    })
                    .unwrap();
            }
        };
        for seq in 1..=WARM_BROADCASTS {
            broadcast(seq);
        }
        let mut first_round_end = None;
        for round in 0..ROUNDS {
            let (kill_tx, kill_rx) = sync_channel::<()>(1);
            let (bound_tx, bound_rx) = sync_channel::<()>(1);
            let clients = std::thread::spawn(move || {
                UNCOUNTED.with(|uncounted| uncounted.set(true));
                let mut clients: Vec<_> = (0..CHURN)
                    .map(|i| {
                        // Closed with a reset rather than a FIN.
                        let tcp = TcpStream::connect(addr).unwrap();
                        socket2::SockRef::from(&tcp)
                            .set_linger(Some(Duration::ZERO))
                            .unwrap();
                        bind(Box::new(tcp), round * CHURN + i)
                    })
                    .collect();
                bound_tx.send(()).unwrap();
                kill_rx.recv().unwrap();
                // Half a frame in, then a reset: the gateway holds the
                // partial frame and has its sends in flight.
                let mut upstream = BytesMut::new();
                encode(
                    &Frame::Upstream {
                        app: APP.to_owned(),
                        request_id: 1,
                        route: None,
                        payload: bytes::Bytes::from(vec![b'y'; 4096]),
                    },
                    &mut upstream,
                )
                .unwrap();
                for client in &mut clients {
                    let _ = client.write_all(&upstream[..upstream.len() / 2]);
                }
                drop(clients);
            });
            bound_rx.recv().unwrap();
            // Each bound connection gets its first (empty) fill, so that
            // broadcasts go to it live.
            let mut bound = 0;
            let deadline = Instant::now() + Duration::from_secs(30);
            while bound < CHURN {
                assert!(Instant::now() < deadline, "only {bound} binds reported");
                match events_rx.try_recv() {
                    Ok(ShardEvent::Conn {
                        conn,
                        event: ConnEvent::Bound(_),
                    }) => {
                        bound += 1;
                        let fill = ConnCommand::Fill {
                            app: AppId::from(APP),
                            after: 0,
                            messages: Vec::new(),
                            more: false,
                            broadcasts_from: Some(0),
                        };
                        commands[usize::from(conn.shard)]
                            .send_blocking(ShardCommand::Conn {
                                conn,
                                command: fill,
                            })
                            .unwrap();
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // 16 broadcasts of 32 KiB: more than a socket's buffers take,
            // so sends stay in flight (and some clients pass their queue
            // limit and are being cut off when they die).
            for seq in 1..=16 {
                broadcast(WARM_BROADCASTS + (round * 100 + seq) as u64);
            }
            std::thread::sleep(Duration::from_millis(100));
            kill_tx.send(()).unwrap();
            clients.join().unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while metrics.snapshot().connections_open > 0 {
                assert!(
                    Instant::now() < deadline,
                    "{}: {} connections still open",
                    io.as_str(),
                    metrics.snapshot().connections_open
                );
                std::thread::sleep(Duration::from_millis(10));
                while events_rx.try_recv().is_ok() {}
            }
            // Cancelled sends complete on the shard's next turns; the dead
            // connections' deadlines pass.
            std::thread::sleep(deadlines_passed);
            while events_rx.try_recv().is_ok() {}
            let live = (
                LIVE_BYTES.load(Ordering::Relaxed),
                LIVE_ALLOCATIONS.load(Ordering::Relaxed),
            );
            match first_round_end {
                None => first_round_end = Some(live),
                Some(first) => {
                    let (bytes, allocations) = (live.0 - first.0, live.1 - first.1);
                    println!(
                        "{} round {round}: {bytes} heap bytes and {allocations} live allocations \
                         above the first round's end after killing {CHURN} connections",
                        io.as_str(),
                    );
                    assert!(
                        allocations <= SLACK_ALLOCATIONS && bytes <= SLACK_BYTES,
                        "{}: the heap grew by {bytes} bytes in {allocations} allocations in round {round}",
                        io.as_str(),
                    );
                }
            }
        }
        drop(events_rx);
        drop(commands);
        gateway.join();
    }
}
