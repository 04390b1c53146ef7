//! The io_uring driver: one glommio executor per shard, pinned to a core.
//!
//! glommio's non-buffered `TcpStream` waits for readiness with an io_uring
//! poll and then reads into the buffer it is given (the shard's scratch
//! buffer), so a waiting connection pins no read buffer.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_io::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement, spawn_local};
use herald_proto::plane::{ShardCommand, ShardEvent};

use crate::shard::{self, ConnSocket, Shard, ShardSettings};
use crate::wheel::TICK;

/// Memory glommio registers with io_uring for file I/O. The gateway does no
/// file I/O, so it asks for the minimum instead of the 10 MiB default.
const IO_MEMORY_BYTES: usize = 64 * 1024;

impl ConnSocket for TcpStream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        AsyncRead::poll_read(Pin::new(self), cx, buf)
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

/// Starts one shard's executor on `cpu`; `ready` hears whether it listens.
pub(crate) fn spawn_shard(
    settings: ShardSettings,
    listen: SocketAddr,
    cpu: usize,
    commands: async_channel::Receiver<ShardCommand>,
    events: async_channel::Sender<ShardEvent>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) -> Result<ExecutorJoinHandle<()>, String> {
    let name = format!("herald-shard-{}", settings.id);
    LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name(&name)
        .io_memory(IO_MEMORY_BYTES)
        .spawn(move || async move {
            let listener = match TcpListener::bind(listen) {
                Ok(listener) => listener,
                Err(error) => {
                    let _ = ready.send(Err(io::Error::other(error.to_string())));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            let shard = Rc::new(RefCell::new(Shard::new(settings, Instant::now())));
            let accept = spawn_local(accept_loop(shard.clone(), listener));
            shard.borrow_mut().set_accept_task(Box::new(accept));
            let _timer = spawn_local(tick_loop(shard.clone()));
            let _forwarder = spawn_local(shard::forward_events(shard.clone(), events));
            shard::run_commands(shard, commands).await;
        })
        .map_err(|error| error.to_string())
}

async fn accept_loop(shard: Rc<RefCell<Shard>>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                // Out of file descriptors or similar: back off instead of
                // spinning on the same error.
                tracing::warn!(%error, "accept failed");
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = shard.borrow_mut().admit(Instant::now()) else {
            continue;
        };
        // Small frames both ways: don't hold them back for coalescing.
        let _ = stream.set_nodelay(true);
        spawn_local(shard::serve_conn(shard.clone(), slot, stream)).detach();
    }
}

async fn tick_loop(shard: Rc<RefCell<Shard>>) {
    loop {
        glommio::timer::sleep(TICK).await;
        shard.borrow_mut().handle_tick(Instant::now());
    }
}
