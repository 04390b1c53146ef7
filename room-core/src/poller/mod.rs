//! Readiness: which sockets a shard can read or write now.
//!
//! A shard does its own reads and writes with non-blocking system calls
//! into its one scratch buffer; a poller only tells it when to try. That
//! keeps a waiting connection down to its slab slot: no task, no future, no
//! registration object and no buffer on the heap. Two pollers implement the
//! same contract: io_uring (multishot poll requests) and epoll (mio).

pub(crate) mod epoll;
pub(crate) mod uring;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::task::Wake;
use std::time::Duration;

/// What a token became ready for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Readiness {
    pub token: u64,
    /// Readable, closed by the peer, or in error: a read will tell which.
    pub readable: bool,
    pub writable: bool,
    /// The poller stopped watching reads of this token on its own (io_uring
    /// may end a multishot request): the shard adds it again.
    pub rearm: bool,
}

/// Tokens use the low 62 bits; pollers may use the top two.
pub(crate) const TOKEN_BITS_MAX: u32 = 62;

/// How a shard waits for its sockets.
pub(crate) trait Poller {
    /// Reports `fd` readable (or closed, or in error) each time that becomes
    /// true, until `remove`. On registration it reports at once if `fd` is
    /// already readable.
    fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()>;

    /// Reports `fd` writable once, the next time it is.
    fn want_writable(&mut self, fd: RawFd, token: u64) -> io::Result<()>;

    /// Stops reporting `fd`. The caller closes `fd` right after.
    fn remove(&mut self, fd: RawFd, token: u64);

    /// Waits up to `timeout` for readiness and appends it to `ready`.
    fn wait(&mut self, timeout: Duration, ready: &mut Vec<Readiness>) -> io::Result<()>;
}

/// An eventfd that wakes a shard from `Poller::wait`: the waker the shard
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
