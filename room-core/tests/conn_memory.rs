//! What an idle authenticated connection costs the gateway in heap memory,
//! counted by a global allocator that tracks live bytes. It runs the real
//! gateway on loopback with both drivers and prints bytes per connection by
//! driver; the assertion is the budget ARCHITECTURE.md states, so a change
//! that makes idle connections heavier fails here rather than in production.
//!
//! The slab slot itself is not counted here (the slab's storage is reserved
//! before the first connection); its size is checked at compile time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use herald_proto::plane::ShardEvent;
use herald_proto::server::{HeartbeatIntervals, ServerConfig};
use herald_proto::{Frame, NetworkType, TokenClaims, decode, encode, sign_token};
use herald_room::{Gateway, GatewayConfig, IoDriver, ListenerConfig, TransportKind};

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_ALLOCATIONS: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only
// counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
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

fn config(io: IoDriver) -> GatewayConfig {
    let interval = Duration::from_secs(60);
    GatewayConfig {
        io,
        listeners: vec![ListenerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            transport: TransportKind::Tcp,
        }],
        tls: None,
        websocket: Default::default(),
        shards: 1,
        server: ServerConfig {
            heartbeat: HeartbeatIntervals {
                unknown: interval,
                wifi: interval,
                cellular: interval,
                wired: interval,
            },
            auth_timeout: Duration::from_secs(30),
            bind_failures_max: 3,
            apps_per_conn_max: 4,
            inflight_pushes_max: 32,
            storage_epoch: 1,
        },
        apps: vec![(APP.to_owned(), SECRET.to_vec())],
        connections_per_shard_max: CONNECTIONS * 2,
        send_queue_bytes_max: 256 * 1024,
        command_queue_len: 1024,
        send_queue_frames_max: 1024,
        accept_rate: None,
        pin_shards: true,
    }
}

fn send(stream: &mut TcpStream, frame: &Frame) {
    let mut buffer = BytesMut::new();
    encode(frame, &mut buffer).unwrap();
    stream.write_all(&buffer).unwrap();
}

fn recv(stream: &mut TcpStream, buffer: &mut BytesMut) -> Frame {
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

fn connect_and_bind(gateway: std::net::SocketAddr, user: usize) -> TcpStream {
    let mut stream = TcpStream::connect(gateway).unwrap();
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
        &mut stream,
        &Frame::Hello {
            device_id: format!("device-{user:07}"),
            client_version: "conn-memory/1".to_owned(),
            network: NetworkType::Wifi,
        },
    );
    assert!(matches!(
        recv(&mut stream, &mut buffer),
        Frame::HelloOk { .. }
    ));
    send(
        &mut stream,
        &Frame::Bind {
            app: APP.to_owned(),
            token,
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        },
    );
    let reply = recv(&mut stream, &mut buffer);
    assert!(matches!(reply, Frame::BindOk { .. }), "{reply:?}");
    stream
}

/// Live heap bytes and allocations per idle bound connection.
fn measure(io: IoDriver) -> (f64, f64) {
    let (events_tx, events_rx) = async_channel::bounded(CONNECTIONS * 4);
    let gateway = Gateway::start(config(io), events_tx).unwrap();
    let addr = gateway.local_addr();
    // Warm up: the first connections grow pools and executor queues.
    let warm: Vec<TcpStream> = (0..64).map(|i| connect_and_bind(addr, i)).collect();
    wait_for_events(&events_rx, 64);

    let bytes_before = LIVE_BYTES.load(Ordering::Relaxed);
    let allocations_before = LIVE_ALLOCATIONS.load(Ordering::Relaxed);
    let clients: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|i| connect_and_bind(addr, 1_000 + i))
        .collect();
    wait_for_events(&events_rx, CONNECTIONS);
    // Let the shard finish whatever the last BIND started.
    std::thread::sleep(Duration::from_millis(200));
    let bytes = LIVE_BYTES.load(Ordering::Relaxed) - bytes_before;
    let allocations = LIVE_ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;

    drop(clients);
    drop(warm);
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
            Ok(ShardEvent::Bound { .. }) => seen += 1,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[test]
fn an_idle_bound_connection_stays_within_its_heap_budget() {
    for io in [IoDriver::Uring, IoDriver::Epoll] {
        let (bytes, allocations) = measure(io);
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
