//! The epoll driver: one tokio current-thread runtime per shard, on a thread
//! pinned to a core. It runs the same shard logic as the io_uring driver and
//! is the fallback where io_uring is blocked (for example by a container's
//! seccomp profile), and the control group the benchmark compares it with.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use herald_proto::plane::{ShardCommand, ShardEvent};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::shard::{self, ConnSocket, Shard, ShardSettings};
use crate::wheel::TICK;

/// Pending connections the kernel queues for a shard's listener (capped by
/// net.core.somaxconn), as glommio's listener does.
const LISTEN_BACKLOG: i32 = 1024;

impl ConnSocket for TcpStream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(buf);
        AsyncRead::poll_read(Pin::new(self), cx, &mut buf).map_ok(|()| buf.filled().len())
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(self), cx, buf)
    }

    fn shutdown_write(&mut self) {
        // SAFETY: shutdown(2) on the descriptor this stream owns; it only
        // changes the socket's state.
        unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
    }
}

/// Aborts the accept task when dropped, as dropping a glommio task does.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts one shard's thread on `cpu`; `ready` hears whether it listens.
pub(crate) fn spawn_shard(
    settings: ShardSettings,
    listen: SocketAddr,
    cpu: usize,
    commands: async_channel::Receiver<ShardCommand>,
    events: async_channel::Sender<ShardEvent>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("herald-shard-{}", settings.id))
        .spawn(move || {
            pin_to_cpu(cpu);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready.send(Err(error));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let listener = match bind_listener(listen) {
                    Ok(listener) => listener,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                let shard = Rc::new(RefCell::new(Shard::new(settings, Instant::now())));
                let accept = tokio::task::spawn_local(accept_loop(shard.clone(), listener));
                shard
                    .borrow_mut()
                    .set_accept_task(Box::new(AbortOnDrop(accept)));
                let timer = AbortOnDrop(tokio::task::spawn_local(tick_loop(shard.clone())));
                let forwarder = AbortOnDrop(tokio::task::spawn_local(shard::forward_events(
                    shard.clone(),
                    events,
                )));
                shard::run_commands(shard, commands).await;
                drop((timer, forwarder));
            });
        })
}

/// A listener in the port's SO_REUSEPORT group, so the kernel spreads new
/// connections over the shards.
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
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
    TcpListener::from_std(socket.into())
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

async fn accept_loop(shard: Rc<RefCell<Shard>>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors or similar: back off instead of
                // spinning on the same error.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = shard.borrow_mut().admit(Instant::now()) else {
            continue;
        };
        // Small frames both ways: don't hold them back for coalescing.
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(shard::serve_conn(shard.clone(), slot, stream));
    }
}

async fn tick_loop(shard: Rc<RefCell<Shard>>) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        shard.borrow_mut().handle_tick(Instant::now());
    }
}
