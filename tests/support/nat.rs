//! A NAT-like TCP relay: it forwards each flow between a client and an
//! upstream, and drops a flow that stayed idle for longer than its idle
//! limit the way a carrier NAT drops a mapping: silently. Bytes that come
//! after are discarded, in both directions, and nothing is closed (no FIN,
//! no RST), so each end learns only by its own timeouts. The limit can be
//! changed while flows run. Some NATs answer a packet of a forgotten flow
//! with a reset instead: [`Forget::WithReset`]. An outage
//! ([`NatRelay::outage`]) takes the client's network away instead: the
//! client's end of every flow is reset at once, the upstream's stays open
//! and silent, and nothing gets through until the upstream gave up on
//! each of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the relay does with a flow it finds idle past the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    /// Discards its bytes from then on, and closes nothing.
    Silently,
    /// Resets both ends (RST) at the first packet after the limit.
    WithReset,
}

/// A running relay; it stops when dropped.
pub struct NatRelay {
    /// Where clients connect (`127.0.0.1:port`).
    pub addr: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    forget: Forget,
    idle_limit_ms: AtomicU64,
    flows: AtomicU64,
    dropped: AtomicU64,
    /// Counts outages; each flow watches it.
    outages: tokio::sync::watch::Sender<u64>,
    /// Flows cut by an outage whose upstream has not closed yet: while
    /// any is left, new flows are refused.
    cut_open: AtomicU64,
}

/// One flow's state, shared by its two directions.
struct Flow {
    started: Instant,
    /// Milliseconds since `started` of the last byte forwarded.
    last_active_ms: AtomicU64,
    /// Set once the flow was idle past the limit: nothing more is
    /// forwarded.
    dead: std::sync::atomic::AtomicBool,
    /// Woken when the flow dies and is to be reset: the direction that did
    /// not see it stops reading, so that both halves close.
    reset: Notify,
    /// After an outage cut the flow: the client's read half is gone and
    /// the flow counts in `cut_open`.
    client_cut: Notify,
    /// After an outage cut the flow: the upstream closed its end.
    upstream_closed: Notify,
}

impl NatRelay {
    /// A relay that forgets idle flows silently.
    pub async fn start(upstream: &str, idle_limit: Duration) -> NatRelay {
        NatRelay::start_forgetting(upstream, idle_limit, Forget::Silently).await
    }

    pub async fn start_forgetting(
        upstream: &str,
        idle_limit: Duration,
        forget: Forget,
    ) -> NatRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            forget,
            idle_limit_ms: AtomicU64::new(idle_limit.as_millis() as u64),
            flows: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            outages: tokio::sync::watch::Sender::new(0),
            cut_open: AtomicU64::new(0),
        });
        let upstream = upstream.to_owned();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut flows = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    if shared.cut_open.load(Ordering::Relaxed) > 0 {
                        // The client's network is still down.
                        client.set_zero_linger().unwrap();
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    if forget == Forget::WithReset {
                        // Closed with a zero linger, a socket sends RST.
                        client.set_zero_linger().unwrap();
                        server.set_zero_linger().unwrap();
                    }
                    shared.flows.fetch_add(1, Ordering::Relaxed);
                    let flow = Arc::new(Flow {
                        started: Instant::now(),
                        last_active_ms: AtomicU64::new(0),
                        dead: Default::default(),
                        reset: Notify::new(),
                        client_cut: Notify::new(),
                        upstream_closed: Notify::new(),
                    });
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let directions = [
                        (client_read, server_write, Direction::Up),
                        (server_read, client_write, Direction::Down),
                    ];
                    for (from, to, direction) in directions {
                        let outage = shared.outages.subscribe();
                        let task =
                            forward(from, to, direction, outage, flow.clone(), shared.clone());
                        flows.spawn(task);
                    }
                }
            }
        });
        NatRelay { addr, shared, task }
    }

    /// Changes the idle limit for every flow, running or new.
    pub fn set_idle_limit(&self, idle_limit: Duration) {
        self.shared
            .idle_limit_ms
            .store(idle_limit.as_millis() as u64, Ordering::Relaxed);
    }

    /// Flows accepted so far.
    pub fn flows(&self) -> u64 {
        self.shared.flows.load(Ordering::Relaxed)
    }

    /// Flows dropped for idling so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The client's network goes away: the client's end of every flow is
    /// reset now, the upstream's stays open and hears nothing more, and
    /// new flows are refused until the upstream closed each cut one.
    pub fn outage(&self) {
        self.shared.outages.send_modify(|outages| *outages += 1);
    }

    /// Whether flows cut by an outage still wait for their upstream.
    pub fn in_outage(&self) -> bool {
        self.shared.cut_open.load(Ordering::Relaxed) > 0
    }
}

/// Which way a forwarding task copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

impl Drop for NatRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a flow. The idle check is made when bytes
/// arrive: a flow idle past the limit at that moment is dead, as a NAT
/// would have forgotten its mapping by then. Write halves are held, never
/// shut, until the relay stops.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    mut outage: tokio::sync::watch::Receiver<u64>,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            },
            () = flow.reset.notified() => return,
            Ok(()) = outage.changed() => {
                cut(from, to, direction, &flow, &shared).await;
                return;
            }
        };
        let now_ms = flow.started.elapsed().as_millis() as u64;
        let idle_ms = now_ms.saturating_sub(flow.last_active_ms.load(Ordering::Relaxed));
        if !flow.dead.load(Ordering::Relaxed)
            && idle_ms > shared.idle_limit_ms.load(Ordering::Relaxed)
            && !flow.dead.swap(true, Ordering::Relaxed)
        {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if flow.dead.load(Ordering::Relaxed) {
            if shared.forget == Forget::WithReset {
                // Both halves of both sockets drop: RST to each end.
                flow.reset.notify_waiters();
                return;
            }
            continue;
        }
        flow.last_active_ms.store(now_ms, Ordering::Relaxed);
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    // The peer closed or failed: a NAT passes that on while the flow lives.
    if !flow.dead.load(Ordering::Relaxed) {
        let _ = to.shutdown().await;
    } else {
        // Hold the write half open: a dropped flow tells nobody anything.
        std::future::pending::<()>().await;
    }
}

/// An outage cuts a flow. Up: the client's socket is reset (its read half
/// goes here, its write half in the Down task), and the upstream's write
/// half is held, silent, until the upstream closed. Down: reads the
/// upstream, discarding, until it closes.
async fn cut(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    direction: Direction,
    flow: &Flow,
    shared: &Shared,
) {
    match direction {
        Direction::Up => {
            shared.cut_open.fetch_add(1, Ordering::Relaxed);
            from.as_ref().set_zero_linger().unwrap();
            drop(from);
            flow.client_cut.notify_one();
            flow.upstream_closed.notified().await;
            drop(to);
            shared.cut_open.fetch_sub(1, Ordering::Relaxed);
        }
        Direction::Down => {
            // Counted first, so that the client's reconnect finds the
            // network still down.
            flow.client_cut.notified().await;
            drop(to);
            let mut from = from;
            let mut discard = [0u8; 4096];
            while matches!(from.read(&mut discard).await, Ok(read) if read > 0) {}
            flow.upstream_closed.notify_one();
        }
    }
}
