//! How a shard's sockets do their I/O: the one place that differs between
//! io_uring and epoll.
//!
//! The shard's connection logic (framing, transports, queues, limits,
//! closing) is the same over both drivers; what a driver decides is how
//! bytes come in and go out:
//!
//! - **io_uring** is completion-based. Each listener has a multishot
//!   accept, each connection a multishot receive that the kernel fills from
//!   the shard's provided buffer ring (no buffer per connection, no recv(2)
//!   per read), and each send is a submission queue entry. Everything a turn
//!   of the shard's loop queued reaches the kernel in its one
//!   `io_uring_enter`, together with the wait.
//! - **epoll** (through mio) reports readiness, and the shard accepts,
//!   reads into its scratch buffer and sends with one system call each.
//!
//! Both take a send the same way: a buffer the driver owns until it is all
//! written (or the socket failed), returned at once when epoll wrote it all,
//! later in an [`Event::Sent`] otherwise. A connection has at most one send
//! with its driver at a time; what it produces meanwhile waits in its queue.

pub(crate) mod epoll;
#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod uring;

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::Wake;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

/// Connection tokens use the low 61 bits; drivers use the top three.
pub(crate) const TOKEN_BITS_MAX: u32 = 61;

/// Bytes on their way to a socket: a pooled buffer the connection's frames
/// were encoded into, or a frame shared by many connections (a broadcast on
/// plain TCP), sent from where it lies.
#[derive(Debug)]
pub(crate) enum SendBuffer {
    Pooled(Box<BytesMut>),
    Shared(Bytes),
}

impl SendBuffer {
    pub fn bytes(&self) -> &[u8] {
        match self {
            SendBuffer::Pooled(buffer) => buffer,
            SendBuffer::Shared(bytes) => bytes,
        }
    }

    pub fn advance(&mut self, len: usize) {
        match self {
            SendBuffer::Pooled(buffer) => buffer.advance(len),
            SendBuffer::Shared(bytes) => bytes.advance(len),
        }
    }
}

/// A buffer of the io_uring driver's ring holding input the kernel
/// received. The kernel does not write into it again until it is given back
/// with [`Driver::give_back`].
#[derive(Debug)]
pub(crate) struct RecvBuffer {
    start: NonNull<u8>,
    len: usize,
    id: u16,
}

impl RecvBuffer {
    /// The received bytes.
    ///
    /// # Safety
    /// The driver that made this buffer must still be alive: its ring owns
    /// the memory.
    pub unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `start..start + len` lies inside the driver's buffer
        // memory (its ring gave out this buffer id with this length); the
        // kernel does not touch a buffer between handing it to us and us
        // giving it back, and this handle is the only one for its id, so
        // nothing else aliases it. The caller keeps the driver alive.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len) }
    }
}

/// What a socket's receive came to (io_uring).
#[derive(Debug)]
pub(crate) enum Input {
    Bytes(RecvBuffer),
    /// The peer closed its side.
    End,
    /// The socket failed (reset, for one).
    Failed,
    /// The ring had no free buffer: nothing was read, and receiving stopped
    /// until the shard arms it again.
    NoBuffer,
}

/// What a driver reports from a wait.
#[derive(Debug)]
pub(crate) enum Event {
    /// The shard's wakeup eventfd fired.
    Wake,
    /// epoll: a listener may have connections waiting; the shard accepts.
    Acceptable { listener: usize },
    /// io_uring: the kernel accepted a connection on a listener. Its
    /// multishot accept gives no address: `peer` is `None`, and the shard
    /// asks the socket when it needs one (fake drivers in tests give one).
    Accepted {
        listener: usize,
        socket: OwnedFd,
        peer: Option<IpAddr>,
    },
    /// io_uring: a listener's accepting stopped, on an error or by the
    /// kernel's choice; the shard arms it again when it should.
    AcceptStopped {
        listener: usize,
        error: Option<io::Error>,
    },
    /// epoll: a connection may have input (or its end, or an error); the
    /// shard reads.
    Readable { token: u64 },
    /// io_uring: a connection's receive completed. With `rearm`, the kernel
    /// stopped receiving for it and the shard arms it again.
    Received {
        token: u64,
        input: Input,
        rearm: bool,
    },
    /// A send the driver held is done: all written, or the socket failed.
    Sent {
        token: u64,
        buffer: SendBuffer,
        result: io::Result<()>,
    },
}

/// A shard's I/O: see the module documentation.
pub(crate) trait Driver {
    /// Input comes as [`Event::Received`] (the driver reads); otherwise as
    /// [`Event::Readable`] (the shard reads with recv(2)).
    const RECEIVES: bool;

    /// Reports [`Event::Wake`] each time `fd` (an eventfd) is signalled.
    fn add_wake(&mut self, fd: RawFd) -> io::Result<()>;

    /// Starts reporting the listener's connections (io_uring) or its
    /// readiness (epoll). On io_uring, called again after
    /// [`Event::AcceptStopped`].
    fn accept(&mut self, fd: RawFd, listener: usize) -> io::Result<()>;

    /// Stops accepting on a listener and closes it.
    fn remove_listener(&mut self, socket: OwnedFd, listener: usize);

    /// Starts reporting a new connection's input or readiness.
    fn add_conn(&mut self, fd: RawFd, token: u64) -> io::Result<()>;

    /// Receives on a connection again after `Received { rearm: true }`
    /// (io_uring only).
    fn rearm_recv(&mut self, fd: RawFd, token: u64) -> io::Result<()>;

    /// Stops receiving on a connection until `rearm_recv` (io_uring only):
    /// a closing connection reads nothing until its last frames are out.
    fn stop_recv(&mut self, token: u64);

    /// Whether the buffer ring has buffers to receive into (always, on
    /// epoll).
    fn has_recv_buffers(&self) -> bool;

    /// Gives a receive buffer back to the ring once its bytes are consumed.
    fn give_back(&mut self, buffer: RecvBuffer);

    /// Sends all of `buffer`. Returns it with the result if that is known
    /// now; otherwise the driver holds it and reports [`Event::Sent`]. The
    /// connection must have no other send held.
    fn send(
        &mut self,
        fd: RawFd,
        token: u64,
        buffer: SendBuffer,
    ) -> Option<(SendBuffer, io::Result<()>)>;

    /// Bytes of the connection's held send not written yet.
    fn unsent_len(&self, token: u64) -> usize;

    /// The connection's held send is waiting for room in its socket (the
    /// client is behind), not merely on its way.
    fn send_blocked(&self, token: u64) -> bool;

    /// Stops the connection's I/O and closes its socket: operations still
    /// in flight are cancelled, and a held send's buffer is dropped or
    /// reported (with an error) in [`Event::Sent`]. `receiving` says a
    /// receive is still armed (io_uring): one that ended needs no cancel.
    fn remove_conn(&mut self, socket: OwnedFd, token: u64, receiving: bool);

    /// Submits what is queued, waits up to `timeout` for events and appends
    /// them to `events`.
    fn wait(&mut self, timeout: Duration, events: &mut Vec<Event>) -> io::Result<()>;
}

/// An eventfd that wakes a shard from `Driver::wait`: the waker the shard
/// hands to its command channel.
#[derive(Debug)]
pub(crate) struct WakeFd {
    fd: OwnedFd,
}

impl WakeFd {
    pub fn new() -> io::Result<WakeFd> {
        // SAFETY: eventfd(2) takes no pointers; a negative result is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(WakeFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Resets the counter after a wakeup was seen.
    pub fn clear(&self) {
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a u64 we own; EAGAIN (already clear) is
        // fine to ignore.
        unsafe { libc::read(self.raw_fd(), (&raw mut value).cast(), 8) };
    }
}

impl Wake for WakeFd {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 we own. It can only fail when
        // the counter is near overflow, and then a wakeup is pending anyway.
        unsafe { libc::write(self.raw_fd(), (&raw const one).cast(), 8) };
    }
}

/// send(2) of as much of `bytes` as the socket takes now.
pub(crate) fn send_now(socket: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `bytes.len()` bytes from it.
    // MSG_NOSIGNAL: a closed peer is an error, not a SIGPIPE.
    let n = unsafe {
        libc::send(
            socket,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
