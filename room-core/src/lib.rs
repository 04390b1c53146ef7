//! herald-room: the gateway ("room") that holds client connections.
//!
//! One thread per shard, pinned to a core of those the process may use
//! (unless told not to); every shard listens on the same
//! port (SO_REUSEPORT) and owns its connections outright in a `slab`, with no
//! lock and no shared map on the per-connection path. The per-connection
//! logic (handshake, auth, heartbeats, framing, acks) is
//! `herald_proto::server::ServerConn`; this crate only drives it with sockets,
//! an I/O driver, a timer wheel and buffer pools. Two drivers run the same
//! shard loop: io_uring, completion-based (the default), and epoll (the
//! fallback where io_uring is blocked).
//!
//! It does not store messages or know where users are: it talks to the
//! control plane only through bounded channels of `ShardCommand` and
//! `ShardEvent` (`herald_proto::plane`), and it never waits on storage.

mod auth;
mod driver;
pub mod metrics;
mod per_ip;
mod pool;
mod shard;
pub mod transport;
mod wheel;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_proto::NetworkType;
pub use herald_proto::plane::TokenSecret;
use herald_proto::plane::{GatewayApp, ShardCommand, ShardEvent};
use herald_proto::server::ServerConfig;

pub use auth::AppSecrets;
pub use metrics::{GatewayMetrics, GatewaySnapshot};
pub use per_ip::PerIpConfig;
pub use shard::LISTENERS_MAX;
pub use transport::{CertificateError, TlsAcceptor, TransportKind, WebSocketSettings};

pub use driver::uring::RecvBuffers;

/// How long a frame that has begun to arrive may take to finish: a base
/// time for the client's network (before its HELLO: `unknown`), plus its
/// length at `bytes_per_sec_min`. A client that trickles a frame slower
/// than that is cut (`read_timeout`); only a connection holding part of a
/// frame has the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadDeadlines {
    pub unknown: Duration,
    pub wifi: Duration,
    /// 2g to 5g.
    pub cellular: Duration,
    pub wired: Duration,
    /// At least 1.
    pub bytes_per_sec_min: u32,
}

impl ReadDeadlines {
    /// The time a frame of `len` bytes may take on `network`.
    pub fn for_frame(&self, network: NetworkType, len: usize) -> Duration {
        let base = match network {
            NetworkType::Unknown => self.unknown,
            NetworkType::Wifi => self.wifi,
            NetworkType::Cellular2g
            | NetworkType::Cellular3g
            | NetworkType::Cellular4g
            | NetworkType::Cellular5g => self.cellular,
            NetworkType::Wired => self.wired,
        };
        base + Duration::from_secs_f64(len as f64 / f64::from(self.bytes_per_sec_min.max(1)))
    }
}

/// How the shards do their sockets' I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoDriver {
    /// io_uring, completion-based: multishot accept and receive (into a
    /// provided buffer ring per shard), sends as submissions, all of a turn
    /// in one system call.
    #[default]
    Uring,
    /// epoll, through mio: readiness, then a system call per operation.
    Epoll,
}

impl IoDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            IoDriver::Uring => "uring",
            IoDriver::Epoll => "epoll",
        }
    }
}

/// Pending connections the kernel queues for each shard's listener (capped
/// by net.core.somaxconn): room for a reconnect storm's burst.
const LISTEN_BACKLOG: i32 = 4096;

/// One address the gateway listens on, and what clients speak there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub transport: TransportKind,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub io: IoDriver,
    /// Each shard's io_uring receive buffer ring (unused on epoll).
    pub recv_buffers: RecvBuffers,
    /// At least one; every shard listens on each (SO_REUSEPORT).
    pub listeners: Vec<ListenerConfig>,
    /// The certificate of tls and wss listeners.
    pub tls: Option<TlsAcceptor>,
    pub websocket: WebSocketSettings,
    pub shards: usize,
    pub server: ServerConfig,
    /// The apps clients may bind at first; `AppUpdater::set` changes them.
    pub apps: Vec<AppAccess>,
    pub connections_per_shard_max: usize,
    /// A connection whose unsent output would pass this is cut off.
    pub send_queue_bytes_max: usize,
    /// ... or whose waiting frames would pass this (at most 65,535).
    pub send_queue_frames_max: usize,
    /// Capacity of each shard's command channel.
    pub command_queue_len: usize,
    /// New connections per second the whole gateway takes (split evenly
    /// over the shards); past it they are turned away with
    /// GOAWAY(overloaded) and a jittered retry delay. `None`: no limit.
    pub accept_rate: Option<herald_proto::rate::Rate>,
    /// Limits per client address, across every shard; `None`: none.
    pub per_ip: Option<PerIpConfig>,
    pub read_deadlines: ReadDeadlines,
    /// Pin shard `i` to the `i`-th CPU this process may run on (its
    /// affinity mask, so `taskset` and cpusets choose the CPUs). Off when
    /// several processes share the CPUs: pinned, they would all crowd the
    /// first ones.
    pub pin_shards: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "io_uring is unavailable on this host ({0}); the gateway needs it \
         (Linux 6.1+, kernel.io_uring_disabled=0, not blocked by a seccomp profile)"
    )]
    IoUringUnavailable(io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("listener {addr} speaks {transport}, which needs [gateway.tls]")]
    NoCertificate {
        addr: SocketAddr,
        transport: TransportKind,
    },
    #[error("at most {max} listeners, not {count}")]
    TooManyListeners { count: usize, max: usize },
    #[error("cannot start gateway shard {shard}: {message}")]
    Shard { shard: usize, message: String },
}

/// A running gateway: its address, the command channel of each shard and its
/// counters.
/// An app clients may bind, as the gateway is given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppAccess {
    pub id: String,
    /// The current secret, and any a rotation retired that is still in its
    /// grace.
    pub token_secrets: Vec<TokenSecret>,
    /// Bindings of the app this process allows at once.
    pub max_connections: Option<u32>,
}

/// Changes the apps every shard checks BINDs against. Cloning shares it.
/// It does not keep the shards running: they stop when the gateway's own
/// senders are dropped, whoever still holds an updater.
#[derive(Clone)]
pub struct AppUpdater {
    commands: Vec<async_channel::WeakSender<ShardCommand>>,
    /// Each app's count of bindings in this process, kept across changes.
    bound: Arc<Mutex<HashMap<String, Arc<AtomicU32>>>>,
    /// A deleted app's series leave it.
    metrics: Arc<GatewayMetrics>,
}

impl AppUpdater {
    fn new(metrics: Arc<GatewayMetrics>) -> AppUpdater {
        AppUpdater {
            commands: Vec::new(),
            bound: Arc::default(),
            metrics,
        }
    }

    /// The table each shard gets for `apps`; a deleted app's count goes.
    fn table(&self, apps: &[AppAccess]) -> Arc<[GatewayApp]> {
        let mut bound = self.bound.lock().expect("bound counts lock");
        bound.retain(|id, _| {
            let kept = apps.iter().any(|app| app.id == *id);
            if !kept {
                self.metrics.forget_app(id);
            }
            kept
        });
        apps.iter()
            .map(|app| GatewayApp {
                id: app.id.clone(),
                token_secrets: app.token_secrets.clone(),
                max_connections: app.max_connections,
                bound: bound.entry(app.id.clone()).or_default().clone(),
            })
            .collect()
    }

    /// Each app's bindings in this process now, by app id.
    pub fn bound_counts(&self) -> Vec<(String, u32)> {
        let bound = self.bound.lock().expect("bound counts lock");
        let mut counts: Vec<(String, u32)> = bound
            .iter()
            .map(|(app, count)| {
                (
                    app.clone(),
                    count.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect();
        counts.sort_unstable();
        counts
    }

    /// From now on BINDs are checked against `apps`; bindings of apps not
    /// in it end (UNBIND or GOAWAY `app_deleted`). Waits for room in each
    /// shard's command queue.
    pub async fn set(&self, apps: &[AppAccess]) {
        let table = self.table(apps);
        for shard in &self.commands {
            // A shard that stopped has no bindings left to check.
            if let Some(shard) = shard.upgrade() {
                let _ = shard.send(ShardCommand::SetApps(table.clone())).await;
            }
        }
    }
}

pub struct Gateway {
    listeners: Vec<ListenerConfig>,
    commands: Vec<async_channel::Sender<ShardCommand>>,
    apps: AppUpdater,
    metrics: Arc<GatewayMetrics>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// Starts every shard and returns once all of them listen. Every event
    /// goes to `events`.
    pub fn start(
        config: GatewayConfig,
        events: async_channel::Sender<ShardEvent>,
    ) -> Result<Gateway, GatewayError> {
        assert!(config.shards > 0 && config.shards <= usize::from(u16::MAX));
        assert!(config.connections_per_shard_max <= u32::MAX as usize);
        assert!(!config.listeners.is_empty());
        if config.listeners.len() > shard::LISTENERS_MAX {
            return Err(GatewayError::TooManyListeners {
                count: config.listeners.len(),
                max: shard::LISTENERS_MAX,
            });
        }
        if let Some(listener) = config
            .listeners
            .iter()
            .find(|listener| listener.transport.uses_tls() && config.tls.is_none())
        {
            return Err(GatewayError::NoCertificate {
                addr: listener.addr,
                transport: listener.transport,
            });
        }
        if config.io == IoDriver::Uring {
            probe_io_uring().map_err(GatewayError::IoUringUnavailable)?;
        }

        // Resolve port 0 once per listener, so that every shard joins one
        // SO_REUSEPORT group on the same port. A reservation never listens,
        // so it never receives a connection; it is dropped once the shards
        // listen.
        let mut reservations = Vec::with_capacity(config.listeners.len());
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let reservation =
                reserve_port(listener.addr).map_err(|source| GatewayError::Listen {
                    addr: listener.addr,
                    source,
                })?;
            let addr = reservation
                .local_addr()
                .ok()
                .and_then(|addr| addr.as_socket())
                .unwrap_or(listener.addr);
            reservations.push(reservation);
            listeners.push(ListenerConfig {
                addr,
                transport: listener.transport,
            });
        }

        let cpus = if config.pin_shards {
            allowed_cpus()
        } else {
            Vec::new()
        };
        let metrics = Arc::new(GatewayMetrics::new(config.shards));
        let per_ip = config
            .per_ip
            .clone()
            .map(|limits| Arc::new(per_ip::PerIpLimits::new(limits)));
        let mut apps = AppUpdater::new(metrics.clone());
        let initial_apps = apps.table(&config.apps);
        let mut commands = Vec::with_capacity(config.shards);
        let mut threads = Vec::with_capacity(config.shards);
        for shard in 0..config.shards {
            let (command_tx, command_rx) = async_channel::bounded(config.command_queue_len);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
            let settings = shard::ShardSettings {
                id: shard as u16,
                server: config.server.clone(),
                auth: AppSecrets::new(&initial_apps),
                connections_max: config.connections_per_shard_max,
                send_queue_bytes_max: config.send_queue_bytes_max,
                send_queue_frames_max: config.send_queue_frames_max.min(usize::from(u16::MAX)),
                accept_rate: config.accept_rate.map(|rate| herald_proto::rate::Rate {
                    per_sec: rate.per_sec / config.shards as f64,
                    burst: (rate.burst / config.shards as u32).max(1),
                }),
                per_ip: per_ip.clone(),
                read_deadlines: config.read_deadlines,
                metrics: metrics.clone(),
                tls: config.tls.clone(),
                websocket: config.websocket.clone(),
            };
            let cpu = (!cpus.is_empty()).then(|| cpus[shard % cpus.len()]);
            let events = events.clone();
            let io = config.io;
            let recv_buffers = config.recv_buffers;
            let shard_listeners = listeners.clone();
            let thread = std::thread::Builder::new()
                .name(format!("herald-shard-{shard}"))
                .spawn(move || {
                    run_shard_thread(
                        (io, recv_buffers),
                        cpu,
                        shard_listeners,
                        settings,
                        command_rx,
                        events,
                        ready_tx,
                    )
                })
                .map_err(|error| GatewayError::Shard {
                    shard,
                    message: error.to_string(),
                })?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    return Err(GatewayError::Listen {
                        addr: listeners[0].addr,
                        source,
                    });
                }
                Err(_) => {
                    return Err(GatewayError::Shard {
                        shard,
                        message: "the shard's thread stopped while starting".to_owned(),
                    });
                }
            }
            threads.push(thread);
            commands.push(command_tx);
        }
        drop(reservations);
        apps.commands = commands
            .iter()
            .map(async_channel::Sender::downgrade)
            .collect();
        Ok(Gateway {
            listeners,
            apps,
            commands,
            metrics,
            threads,
        })
    }

    /// Where the gateway listens (port 0 resolved), in the configured
    /// order.
    pub fn listeners(&self) -> &[ListenerConfig] {
        &self.listeners
    }

    /// The first listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0].addr
    }

    /// A sender per shard, indexed by `ConnId::shard`.
    /// What changes the apps BINDs are checked against.
    pub fn app_updater(&self) -> AppUpdater {
        self.apps.clone()
    }

    pub fn commands(&self) -> Vec<async_channel::Sender<ShardCommand>> {
        self.commands.clone()
    }

    pub fn metrics(&self) -> Arc<GatewayMetrics> {
        self.metrics.clone()
    }

    /// Waits for every shard to stop. Shards stop once every sender of their
    /// command channel is dropped, so callers drop theirs first.
    pub fn join(self) {
        drop(self.commands);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// A shard's thread: pins itself, sets up its poller and listener, reports
/// whether it listens, then runs the shard loop.
fn run_shard_thread(
    (io, recv_buffers): (IoDriver, RecvBuffers),
    cpu: Option<usize>,
    listeners: Vec<ListenerConfig>,
    settings: shard::ShardSettings,
    commands: async_channel::Receiver<ShardCommand>,
    events: async_channel::Sender<ShardEvent>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    type Listeners = Vec<(std::net::TcpListener, TransportKind)>;
    let setup = || -> io::Result<(Listeners, Arc<driver::WakeFd>)> {
        let sockets = listeners
            .iter()
            .map(|listener| Ok((bind_listener(listener.addr)?, listener.transport)))
            .collect::<io::Result<_>>()?;
        Ok((sockets, Arc::new(driver::WakeFd::new()?)))
    };
    let id = settings.id;
    let result = match io {
        IoDriver::Uring => driver::uring::UringDriver::new(recv_buffers).and_then(|driver| {
            let (listeners, wake) = setup()?;
            let _ = ready.send(Ok(()));
            shard::Shard::new(settings, driver, listeners, Instant::now())
                .run(commands, events, wake)
        }),
        IoDriver::Epoll => driver::epoll::EpollDriver::new().and_then(|driver| {
            let (listeners, wake) = setup()?;
            let _ = ready.send(Ok(()));
            shard::Shard::new(settings, driver, listeners, Instant::now())
                .run(commands, events, wake)
        }),
    };
    if let Err(error) = result {
        // Before `ready` was sent this reaches the caller; after, the log.
        tracing::error!(shard = id, %error, "gateway shard stopped");
        let _ = ready.send(Err(error));
    }
}

/// A non-blocking listener in the port's SO_REUSEPORT group, so the kernel
/// spreads new connections over the shards.
fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes inside it,
    // and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it and
    // sched_setaffinity only reads it. Failing to pin is harmless.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn reserve_port(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Checks that this process may create an io_uring with everything the
/// io_uring driver uses (its setup flags and a provided buffer ring), so
/// that a host without it gets one clear error, or the epoll fallback,
/// instead of a shard that fails to start.
pub fn probe_io_uring() -> io::Result<()> {
    driver::uring::UringDriver::new(RecvBuffers { count: 1, len: 256 }).map(drop)
}
