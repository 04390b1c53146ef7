//! The io_uring poller: one ring per shard, a multishot poll request per
//! socket for reads and a one-shot poll request when a write would block.
//! Arming, re-arming and cancelling are batched into the ring and reach the
//! kernel with the next wait, in one system call.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{IoUring, opcode, squeue, types};

use super::{Poller, Readiness};

/// Submission queue entries; the completion queue gets twice as many, and
/// the kernel keeps overflowing completions rather than dropping them.
const RING_ENTRIES: u32 = 4096;

/// The top bits of a request's user data: a write poll, a cancel.
const WRITE_FLAG: u64 = 1 << 63;
const CANCEL_FLAG: u64 = 1 << 62;
const _: () = assert!(super::TOKEN_BITS_MAX == 62);

const READ_EVENTS: u32 = (libc::POLLIN | libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32;
const WRITE_EVENTS: u32 = (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) as u32;

pub(crate) struct UringPoller {
    ring: IoUring,
}

impl UringPoller {
    pub fn new() -> io::Result<UringPoller> {
        Ok(UringPoller {
            ring: IoUring::builder().build(RING_ENTRIES)?,
        })
    }

    /// Queues a request, making room by submitting what is queued if the
    /// submission queue is full.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: poll requests carry no buffers or pointers the kernel
            // could use after this call.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_read(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), READ_EVENTS)
            .multi(true)
            .build()
            .user_data(token);
        self.push(entry)
    }
}

impl Poller for UringPoller {
    fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert_eq!(token >> super::TOKEN_BITS_MAX, 0);
        self.arm_read(fd, token)
    }

    fn want_writable(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), WRITE_EVENTS)
            .build()
            .user_data(token | WRITE_FLAG);
        self.push(entry)
    }

    fn remove(&mut self, _fd: RawFd, token: u64) {
        // A pending poll holds a reference to the socket, so closing the
        // descriptor alone would not close the connection. The requests are
        // removed by their user data, not by descriptor: the caller closes
        // the descriptor before the ring sees these, and its number may be
        // reused by then. A write poll that is not pending answers ENOENT.
        for user_data in [token, token | WRITE_FLAG] {
            let entry = opcode::PollRemove::new(user_data)
                .build()
                .user_data(token | CANCEL_FLAG);
            let _ = self.push(entry);
        }
    }

    fn wait(&mut self, timeout: Duration, ready: &mut Vec<Readiness>) -> io::Result<()> {
        let timespec = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&timespec);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(error)
                if error.raw_os_error() == Some(libc::ETIME)
                    || error.kind() == io::ErrorKind::Interrupted
                    || error.raw_os_error() == Some(libc::EBUSY) => {}
            Err(error) => return Err(error),
        }
        for completion in self.ring.completion() {
            let user_data = completion.user_data();
            let result = completion.result();
            if user_data & CANCEL_FLAG != 0 || result < 0 {
                // A cancel's own completion, a cancelled request, or a poll
                // on a descriptor that is being closed: nothing to report.
                continue;
            }
            if user_data & WRITE_FLAG != 0 {
                ready.push(Readiness {
                    token: user_data & !WRITE_FLAG,
                    readable: false,
                    writable: true,
                    rearm: false,
                });
            } else {
                ready.push(Readiness {
                    token: user_data,
                    readable: true,
                    writable: false,
                    // The kernel may end a multishot request, for example
                    // when its completion queue overflowed.
                    rearm: !io_uring::cqueue::more(completion.flags()),
                });
            }
        }
        Ok(())
    }
}
