//! The io_uring driver: one ring per shard, completion-based.
//!
//! - Each listener has a multishot accept: one submission accepts until
//!   the kernel stops it (an error such as EMFILE, or its own choice), and
//!   then the shard arms it again.
//! - Each connection has a multishot receive that selects its buffer from
//!   the shard's provided buffer ring ([`BufferRing`]). A buffer belongs to
//!   the kernel while it is in the ring and to the shard from the completion
//!   that names it until the shard gives it back, right after the codec
//!   consumed it. An idle connection holds no buffer; when the ring runs
//!   dry, a receive ends with ENOBUFS and the shard arms it again once
//!   buffers are back.
//! - Each send is a submission that points at a buffer this driver holds
//!   until the completion, so nothing the kernel may still read from can be
//!   freed or moved. A short send is submitted again for the rest.
//! - Nothing reaches the kernel before `wait`: a turn's accepts, receives,
//!   sends and cancellations go in the one `io_uring_enter` that also waits
//!   (more only when the submission queue fills).
//!
//! Closing: a removed connection's receive and held send are cancelled by
//! their user data, and its socket is closed only after the submission that
//! carries the cancellations (and every earlier entry naming the socket) has
//! reached the kernel, so no entry can meet a reused descriptor number.
//! Cancelled sends still complete; their buffers are released then.

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::{Driver, Event, Input, RecvBuffer, SendBuffer, TOKEN_BITS_MAX};

/// Submission queue entries: the most a turn queues before it must submit
/// early. The completion queue is twice this; past that the kernel keeps
/// completions on its overflow list rather than dropping them.
const SUBMISSION_ENTRIES: u32 = 4096;

/// Room for completions the driver keeps between waits.
const COMPLETIONS_KEPT_CAPACITY: usize = 256;

/// The buffer group of the shard's receive buffer ring.
const RECV_GROUP: u16 = 0;

/// What a request is, in the top bits of its user data (connection tokens
/// take the low 61).
const KIND_SHIFT: u32 = TOKEN_BITS_MAX;
const RECV: u64 = 0 << KIND_SHIFT;
const SEND: u64 = 1 << KIND_SHIFT;
const WAKE: u64 = 2 << KIND_SHIFT;
const ACCEPT: u64 = 3 << KIND_SHIFT;
const CANCEL: u64 = 4 << KIND_SHIFT;
const TOKEN_MASK: u64 = (1 << KIND_SHIFT) - 1;

const WAKE_EVENTS: u32 = libc::POLLIN as u32;

/// How a shard's receive buffer ring is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvBuffers {
    /// Buffers in the ring: a power of two, at most 32,768.
    pub count: u16,
    /// Bytes per buffer.
    pub len: u32,
}

impl RecvBuffers {
    pub const COUNT_MAX: u16 = 1 << 15;

    /// The ring's memory: its buffers and their 16-byte descriptors.
    pub fn memory_bytes(self) -> usize {
        usize::from(self.count) * (self.len as usize + size_of::<BufRingEntry>())
    }
}

/// A send the kernel may be reading from.
struct InFlight {
    fd: RawFd,
    buffer: SendBuffer,
    /// Its connection is gone: never submit the rest, its descriptor may
    /// name another socket by now.
    cancelled: bool,
    /// The `enters` count when it was first submitted. A short send's rest
    /// is resubmitted without changing it: the socket was full, so the
    /// send counts as blocked (`send_blocked`) from then on.
    submitted_at: u64,
}

pub(crate) struct UringDriver {
    // Declared (and so dropped) before the buffer ring: see `Drop`.
    ring: IoUring,
    buffers: BufferRing,
    in_flight: HashMap<u64, InFlight>,
    /// Sockets removed since the last submission; closed once it is made.
    to_close: Vec<OwnedFd>,
    wake_fd: RawFd,
    /// `io_uring_enter` calls made by `wait`.
    enters: u64,
    /// Completions copied out of the queue before they are handled (which
    /// needs the ring), kept between waits so that a wake allocates nothing.
    completions: Vec<(u64, i32, u32)>,
}

impl UringDriver {
    pub fn new(recv_buffers: RecvBuffers) -> io::Result<UringDriver> {
        // One thread submits and reaps: the kernel may skip the locking
        // and inter-processor interrupts that several would need
        // (SINGLE_ISSUER), and run completion work only when the shard
        // asks for events, in its own time (DEFER_TASKRUN).
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(SUBMISSION_ENTRIES)?;
        let buffers = BufferRing::new(recv_buffers)?;
        // SAFETY: the ring of descriptors lives in `buffers`, which is
        // dropped only after the ring is (field order, and `Drop` cancels
        // every request first).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                buffers.entries.as_ptr() as u64,
                buffers.count,
                RECV_GROUP,
                0,
            )?;
        }
        Ok(UringDriver {
            ring,
            buffers,
            in_flight: HashMap::new(),
            to_close: Vec::new(),
            wake_fd: -1,
            enters: 0,
            completions: Vec::new(),
        })
    }

    /// Queues a request, making room by submitting what is queued if the
    /// submission queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points at must stay valid, and unmoved, until
    /// its completion.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: passed on from the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Queues a request that carries no buffer of ours.
    fn push_plain(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: accepts, polls, cancellations and buffer-selecting
        // receives name no memory of ours that the kernel could use later
        // (a receive's buffers come from the registered ring).
        unsafe { self.push(&entry) }
    }

    fn arm_recv(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(fd), RECV_GROUP)
            .build()
            .user_data(RECV | token);
        self.push_plain(entry)
    }

    fn submit_send(&mut self, token: u64) -> io::Result<()> {
        let flight = &self.in_flight[&token];
        let bytes = flight.buffer.bytes();
        let entry = opcode::Send::new(types::Fd(flight.fd), bytes.as_ptr(), bytes.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(SEND | token);
        // SAFETY: the bytes are the held buffer's, which stays in
        // `in_flight` until this request's completion: nothing moves or
        // frees it before (a `Box<BytesMut>`'s or `Bytes`' data does not
        // move with its handle, and nobody writes to it while held).
        unsafe { self.push(&entry) }
    }

    /// Cancels every request with this user data.
    fn cancel(&mut self, user_data: u64) {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::user_data(user_data).all())
            .build()
            .user_data(CANCEL);
        let _ = self.push_plain(entry);
    }

    /// The event for one completion, if it makes one.
    fn complete(&mut self, user_data: u64, result: i32, flags: u32, events: &mut Vec<Event>) {
        let token = user_data & TOKEN_MASK;
        let more = cqueue::more(flags);
        match user_data & !TOKEN_MASK {
            WAKE => {
                events.push(Event::Wake);
                if !more {
                    let _ = self.arm_wake();
                }
            }
            ACCEPT => {
                let listener = token as usize;
                if result >= 0 {
                    // SAFETY: the kernel installed this new descriptor for
                    // us; nothing else owns it.
                    let socket = unsafe { OwnedFd::from_raw_fd(result) };
                    // The multishot accept gives no address; the shard
                    // asks for it only when it limits per address.
                    events.push(Event::Accepted {
                        listener,
                        socket,
                        peer: None,
                    });
                }
                if !more && result != -libc::ECANCELED {
                    events.push(Event::AcceptStopped {
                        listener,
                        error: (result < 0).then(|| io::Error::from_raw_os_error(-result)),
                    });
                }
            }
            RECV => {
                let buffer = cqueue::buffer_select(flags);
                let input = if result > 0 {
                    let id = buffer.expect("a receive with data names its buffer");
                    Input::Bytes(self.buffers.taken(id, result as usize))
                } else {
                    if let Some(id) = buffer {
                        // A buffer with nothing in it: straight back.
                        self.buffers.taken(id, 0);
                        self.buffers.give_back(id);
                    }
                    match -result {
                        0 => Input::End,
                        libc::ENOBUFS => Input::NoBuffer,
                        // Its connection is gone: the shard removed it.
                        libc::ECANCELED => return,
                        _ => Input::Failed,
                    }
                };
                events.push(Event::Received {
                    token,
                    input,
                    rearm: !more,
                });
            }
            SEND => {
                let Some(flight) = self.in_flight.get_mut(&token) else {
                    debug_assert!(false, "a send completed that was not held");
                    return;
                };
                if result > 0 {
                    flight.buffer.advance(result as usize);
                    if !flight.buffer.bytes().is_empty() && !flight.cancelled {
                        // A short send (the socket's buffer filled): the
                        // rest goes again, ahead of anything queued.
                        if self.submit_send(token).is_ok() {
                            return;
                        }
                    }
                }
                let flight = self.in_flight.remove(&token).expect("held above");
                let result = if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else if flight.buffer.bytes().is_empty() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the send was cut short",
                    ))
                };
                events.push(Event::Sent {
                    token,
                    buffer: flight.buffer,
                    result,
                });
            }
            _ => {}
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(self.wake_fd), WAKE_EVENTS)
            .multi(true)
            .build()
            .user_data(WAKE);
        self.push_plain(entry)
    }
}

impl Driver for UringDriver {
    const RECEIVES: bool = true;

    fn add_wake(&mut self, fd: RawFd) -> io::Result<()> {
        self.wake_fd = fd;
        self.arm_wake()
    }

    fn accept(&mut self, fd: RawFd, listener: usize) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(ACCEPT | listener as u64);
        self.push_plain(entry)
    }

    fn remove_listener(&mut self, socket: OwnedFd, listener: usize) {
        self.cancel(ACCEPT | listener as u64);
        self.to_close.push(socket);
    }

    fn add_conn(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert_eq!(token >> TOKEN_BITS_MAX, 0);
        self.arm_recv(fd, token)
    }

    fn rearm_recv(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        self.arm_recv(fd, token)
    }

    fn stop_recv(&mut self, token: u64) {
        self.cancel(RECV | token);
    }

    fn has_recv_buffers(&self) -> bool {
        self.buffers.free > 0
    }

    fn give_back(&mut self, buffer: RecvBuffer) {
        self.buffers.give_back(buffer.id);
    }

    fn send(
        &mut self,
        fd: RawFd,
        token: u64,
        buffer: SendBuffer,
    ) -> Option<(SendBuffer, io::Result<()>)> {
        if buffer.bytes().is_empty() {
            return Some((buffer, Ok(())));
        }
        let previous = self.in_flight.insert(
            token,
            InFlight {
                fd,
                buffer,
                cancelled: false,
                submitted_at: self.enters,
            },
        );
        assert!(previous.is_none(), "one send per connection at a time");
        if let Err(error) = self.submit_send(token) {
            let flight = self.in_flight.remove(&token).expect("inserted above");
            return Some((flight.buffer, Err(error)));
        }
        None
    }

    fn unsent_len(&self, token: u64) -> usize {
        self.in_flight
            .get(&token)
            .map_or(0, |flight| flight.buffer.bytes().len())
    }

    fn send_blocked(&self, token: u64) -> bool {
        // A socket send is tried as it is submitted, and completes in that
        // same system call if the socket has room: one that went in an
        // earlier `io_uring_enter` and is still here waits for room.
        self.in_flight
            .get(&token)
            .is_some_and(|flight| flight.submitted_at < self.enters)
    }

    fn remove_conn(&mut self, socket: OwnedFd, token: u64, receiving: bool) {
        // A multishot receive stays armed until cancelled, and it holds a
        // reference to the socket: without the cancel, the socket would
        // never close. One that ended (the peer closed, or the shard
        // stopped it) is not looked for: a cancel searches a hash table of
        // a few hundred buckets that holds every armed receive, which
        // made it a quarter of the shard's time when many clients left.
        if receiving {
            self.cancel(RECV | token);
        }
        if let Some(flight) = self.in_flight.get_mut(&token) {
            flight.cancelled = true;
            self.cancel(SEND | token);
        }
        self.to_close.push(socket);
    }

    fn wait(&mut self, timeout: Duration, events: &mut Vec<Event>) -> io::Result<()> {
        self.buffers.publish();
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
        self.enters += 1;
        if self.ring.submission().is_empty() {
            // Every entry naming these sockets is with the kernel, which
            // holds its own reference to each: closing can no longer let
            // an entry meet a reused descriptor number.
            self.to_close.clear();
        }
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(self.ring.completion().map(|completion| {
            (
                completion.user_data(),
                completion.result(),
                completion.flags(),
            )
        }));
        for (user_data, result, flags) in completions.drain(..) {
            self.complete(user_data, result, flags, events);
        }
        // What a storm grew is given back.
        completions.shrink_to(COMPLETIONS_KEPT_CAPACITY);
        self.completions = completions;
        Ok(())
    }
}

impl Drop for UringDriver {
    fn drop(&mut self) {
        // Nothing may write into the buffer ring's memory or read from a
        // held send after they are freed: cancel every request and wait
        // (briefly) for the cancellations before the fields are dropped.
        let _ = self.ring.submit();
        let _ = self
            .ring
            .submitter()
            .register_sync_cancel(Some(Timespec::new().sec(1)), CancelBuilder::any());
        let _ = self.ring.submitter().unregister_buf_ring(RECV_GROUP);
    }
}

/// AddressSanitizer's view of the receive buffers. ASan watches the heap by
/// itself, but not this mapping: without being told, it would let the shard
/// read a buffer it already gave back to the kernel (which may be filling
/// it with another connection's bytes). So, in the ASan build
/// (`--cfg herald_asan`, which `tests/asan.rs` sets), a buffer is poisoned
/// while it is the kernel's, and only the bytes the kernel wrote are
/// unpoisoned while it is the shard's.
#[cfg(herald_asan)]
mod asan {
    use std::ffi::c_void;
    use std::ptr::NonNull;

    unsafe extern "C" {
        fn __asan_poison_memory_region(addr: *const c_void, size: usize);
        fn __asan_unpoison_memory_region(addr: *const c_void, size: usize);
    }

    pub fn poison(start: NonNull<u8>, len: usize) {
        // SAFETY: only ASan's shadow of the range changes, not the memory.
        unsafe { __asan_poison_memory_region(start.as_ptr().cast(), len) }
    }

    pub fn unpoison(start: NonNull<u8>, len: usize) {
        // SAFETY: as above.
        unsafe { __asan_unpoison_memory_region(start.as_ptr().cast(), len) }
    }
}

#[cfg(not(herald_asan))]
mod asan {
    use std::ptr::NonNull;

    pub fn poison(_: NonNull<u8>, _: usize) {}

    pub fn unpoison(_: NonNull<u8>, _: usize) {}
}

/// The shard's provided buffer ring: `count` buffers of `len` bytes in one
/// mapping, and the ring of their descriptors the kernel takes them from.
struct BufferRing {
    entries: NonNull<BufRingEntry>,
    entries_bytes: usize,
    memory: NonNull<u8>,
    memory_bytes: usize,
    count: u16,
    len: u32,
    /// Our copy of the ring's tail, published to the kernel by `publish`.
    tail: u16,
    /// Buffers in the ring (the kernel's to fill).
    free: usize,
}

/// An anonymous private mapping: page-aligned (the ring of descriptors must
/// be) and zeroed.
fn map_anonymous(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a new anonymous mapping; no existing memory is touched.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(address.cast()).expect("mmap does not return null on success"))
}

impl BufferRing {
    fn new(sizes: RecvBuffers) -> io::Result<BufferRing> {
        assert!(sizes.count.is_power_of_two() && sizes.count <= RecvBuffers::COUNT_MAX);
        assert!(sizes.len > 0);
        let entries_bytes = usize::from(sizes.count) * size_of::<BufRingEntry>();
        let memory_bytes = usize::from(sizes.count) * sizes.len as usize;
        let entries = map_anonymous(entries_bytes)?.cast::<BufRingEntry>();
        let memory = match map_anonymous(memory_bytes) {
            Ok(memory) => memory,
            Err(error) => {
                // SAFETY: the mapping made just above, used by nothing.
                unsafe { libc::munmap(entries.as_ptr().cast(), entries_bytes) };
                return Err(error);
            }
        };
        let mut ring = BufferRing {
            entries,
            entries_bytes,
            memory,
            memory_bytes,
            count: sizes.count,
            len: sizes.len,
            tail: 0,
            free: 0,
        };
        for id in 0..sizes.count {
            ring.give_back(id);
        }
        ring.publish();
        Ok(ring)
    }

    /// The handle for buffer `id`, which the kernel just filled with `len`
    /// bytes.
    fn taken(&mut self, id: u16, len: usize) -> RecvBuffer {
        assert!(id < self.count && len <= self.len as usize);
        self.free -= 1;
        // SAFETY: `id < count`, so the offset stays inside the mapping.
        let start = unsafe { self.memory.add(usize::from(id) * self.len as usize) };
        asan::unpoison(start, len);
        RecvBuffer { start, len, id }
    }

    /// Puts buffer `id` back in the ring (seen by the kernel after the next
    /// `publish`).
    fn give_back(&mut self, id: u16) {
        assert!(id < self.count);
        let index = usize::from(self.tail & (self.count - 1));
        // SAFETY: `index < count` descriptors lie in the mapping; the kernel
        // reads a descriptor only between the head and the published tail,
        // and this one is past the published tail.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        // SAFETY: `id < count`, inside the mapping.
        let start = unsafe { self.memory.add(usize::from(id) * self.len as usize) };
        asan::poison(start, self.len as usize);
        entry.set_addr(start.as_ptr() as u64);
        entry.set_len(self.len);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.free += 1;
    }

    /// Lets the kernel see the buffers given back.
    fn publish(&mut self) {
        // SAFETY: the tail field overlays the first descriptor's reserved
        // field, in the mapping; the kernel reads it concurrently, hence
        // the atomic store, which orders the descriptor writes before it.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // Poisoned shadow would outlive the mapping and fault whatever is
        // mapped at these addresses next.
        asan::unpoison(self.memory, self.memory_bytes);
        // SAFETY: the two mappings made in `new`; the ring that used them
        // was dropped first, its requests cancelled.
        unsafe {
            libc::munmap(self.entries.as_ptr().cast(), self.entries_bytes);
            libc::munmap(self.memory.as_ptr().cast(), self.memory_bytes);
        }
    }
}
