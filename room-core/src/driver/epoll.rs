//! The epoll driver, through mio (the layer tokio runs on), without tokio's
//! per-socket task and registration: one `mio::Poll` per shard. It reports
//! readiness; the shard accepts and reads with system calls of its own, and
//! this driver sends with send(2), holding a buffer only while its socket
//! would block.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};

use super::{Driver, Event, RecvBuffer, SendBuffer, TOKEN_BITS_MAX, send_now};

/// Readiness events taken from the kernel per wait.
const EVENTS_PER_WAIT: usize = 1024;

/// Tokens above every connection's: the wakeup eventfd, then listeners.
const WAKE_TOKEN: usize = 1 << TOKEN_BITS_MAX;
const LISTENER_TOKEN_BASE: usize = WAKE_TOKEN + 1;

/// A send whose socket would not take all of it yet.
struct Held {
    fd: RawFd,
    buffer: SendBuffer,
}

pub(crate) struct EpollDriver {
    poll: mio::Poll,
    events: Events,
    held: HashMap<u64, Held>,
    /// Listeners registered (a listener is registered once; accepting again
    /// after a pause needs nothing from epoll).
    listening: u64,
}

impl EpollDriver {
    pub fn new() -> io::Result<EpollDriver> {
        Ok(EpollDriver {
            poll: mio::Poll::new()?,
            events: Events::with_capacity(EVENTS_PER_WAIT),
            held: HashMap::new(),
            listening: 0,
        })
    }
}

/// Writes as much of `buffer` as the socket takes: `Ok(true)` once all of
/// it is written, `Ok(false)` when the socket would block.
fn write_some(fd: RawFd, buffer: &mut SendBuffer) -> io::Result<bool> {
    while !buffer.bytes().is_empty() {
        match send_now(fd, buffer.bytes()) {
            Ok(written) => buffer.advance(written),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(true)
}

impl Driver for EpollDriver {
    const RECEIVES: bool = false;

    fn add_wake(&mut self, fd: RawFd) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(WAKE_TOKEN), Interest::READABLE)
    }

    fn accept(&mut self, fd: RawFd, listener: usize) -> io::Result<()> {
        if self.listening & (1 << listener) != 0 {
            return Ok(());
        }
        self.listening |= 1 << listener;
        self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(LISTENER_TOKEN_BASE + listener),
            Interest::READABLE,
        )
    }

    fn remove_listener(&mut self, socket: OwnedFd, listener: usize) {
        self.listening &= !(1 << listener);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&socket.as_raw_fd()));
    }

    fn add_conn(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert_eq!(token >> TOKEN_BITS_MAX, 0);
        // Edge-triggered on both directions, once: an idle socket never
        // wakes the shard, and waiting for writes costs no system call.
        self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(token as usize),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    fn rearm_recv(&mut self, _fd: RawFd, _token: u64) -> io::Result<()> {
        Ok(())
    }

    fn stop_recv(&mut self, _token: u64) {}

    fn has_recv_buffers(&self) -> bool {
        true
    }

    fn give_back(&mut self, _buffer: RecvBuffer) {
        unreachable!("the epoll driver never receives into a buffer of its own")
    }

    fn send(
        &mut self,
        fd: RawFd,
        token: u64,
        mut buffer: SendBuffer,
    ) -> Option<(SendBuffer, io::Result<()>)> {
        debug_assert!(!self.held.contains_key(&token));
        match write_some(fd, &mut buffer) {
            Ok(true) => Some((buffer, Ok(()))),
            Ok(false) => {
                self.held.insert(token, Held { fd, buffer });
                None
            }
            Err(error) => Some((buffer, Err(error))),
        }
    }

    fn unsent_len(&self, token: u64) -> usize {
        self.held
            .get(&token)
            .map_or(0, |held| held.buffer.bytes().len())
    }

    fn send_blocked(&self, token: u64) -> bool {
        self.held.contains_key(&token)
    }

    fn remove_conn(&mut self, socket: OwnedFd, token: u64, _receiving: bool) {
        self.held.remove(&token);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&socket.as_raw_fd()));
    }

    fn wait(&mut self, timeout: Duration, events: &mut Vec<Event>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(error) => return Err(error),
        }
        for event in &self.events {
            match event.token().0 {
                WAKE_TOKEN => events.push(Event::Wake),
                token if token >= LISTENER_TOKEN_BASE => events.push(Event::Acceptable {
                    listener: token - LISTENER_TOKEN_BASE,
                }),
                token => {
                    let token = token as u64;
                    if (event.is_writable() || event.is_write_closed())
                        && let Some(held) = self.held.get_mut(&token)
                    {
                        let result = match write_some(held.fd, &mut held.buffer) {
                            Ok(false) => None,
                            Ok(true) => Some(Ok(())),
                            Err(error) => Some(Err(error)),
                        };
                        if let Some(result) = result {
                            let held = self.held.remove(&token).expect("held above");
                            events.push(Event::Sent {
                                token,
                                buffer: held.buffer,
                                result,
                            });
                        }
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        events.push(Event::Readable { token });
                    }
                }
            }
        }
        Ok(())
    }
}
