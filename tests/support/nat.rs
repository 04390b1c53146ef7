//! A NAT-like TCP relay: it forwards each flow between a client and an
//! upstream, and drops a flow that stayed idle for longer than its idle
//! limit the way a carrier NAT drops a mapping: silently. Bytes that come
//! after are discarded, in both directions, and nothing is closed (no FIN,
//! no RST), so each end learns only by its own timeouts. The limit can be
//! changed while flows run. Some NATs answer a packet of a forgotten flow
//! with a reset instead: [`Forget::WithReset`].

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
        });
        let upstream = upstream.to_owned();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut flows = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
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
                    });
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                        flows.spawn(forward(from, to, flow.clone(), shared.clone()));
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
