//! The epoll poller, through mio (the layer tokio runs on), without tokio's
//! per-socket task and registration: one `mio::Poll` per shard.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};

use super::{Poller, Readiness};

/// Readiness events taken from the kernel per wait.
const EVENTS_PER_WAIT: usize = 1024;

pub(crate) struct EpollPoller {
    poll: mio::Poll,
    events: Events,
}

impl EpollPoller {
    pub fn new() -> io::Result<EpollPoller> {
        Ok(EpollPoller {
            poll: mio::Poll::new()?,
            events: Events::with_capacity(EVENTS_PER_WAIT),
        })
    }
}

impl Poller for EpollPoller {
    fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        // Edge-triggered on both directions, once: an idle socket never
        // wakes the shard, and asking for writes costs no system call.
        self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(token as usize),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    fn want_writable(&mut self, _fd: RawFd, _token: u64) -> io::Result<()> {
        // Already registered for writability, edge-triggered.
        Ok(())
    }

    fn remove(&mut self, fd: RawFd, _token: u64) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }

    fn wait(&mut self, timeout: Duration, ready: &mut Vec<Readiness>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(error) => return Err(error),
        }
        for event in &self.events {
            ready.push(Readiness {
                token: event.token().0 as u64,
                readable: event.is_readable() || event.is_read_closed() || event.is_error(),
                writable: event.is_writable() || event.is_write_closed(),
                rearm: false,
            });
        }
        Ok(())
    }
}
