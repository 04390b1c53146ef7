//! One shard: a thread pinned to a core that owns its connections.
//!
//! A shard runs five kinds of task, all on its own thread and sharing its
//! state through one `RefCell` that is never borrowed across an await:
//! the accept loop, one task per connection, the command loop (control plane
//! -> shard), the event forwarder (shard -> control plane), and the timer
//! tick that sweeps the shard's wheel. This module is the same for both
//! drivers; `uring` and `epoll` only supply sockets, spawning and a clock
//! tick.
//!
//! A connection task waits for readiness, then reads into the shard's one
//! scratch buffer and decodes in place; only the tail of a partial frame is
//! copied into a small pooled buffer, and output is encoded into a pooled
//! buffer that goes back to the pool once the socket took it all. An idle
//! connection therefore owns no buffer.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use herald_proto::plane::{ConnId, ShardCommand, ShardEvent};
use herald_proto::server::{CloseReason, ConnEvent, Output, ServerConfig, ServerConn};
use herald_proto::{Frame, decode_slice, encode, encoded_len};
use slab::Slab;

use crate::auth::AppSecrets;
use crate::metrics::{ConnEnd, GatewayMetrics, ShardCounters};
use crate::pool::BufferPool;
use crate::wheel::{TimerKey, TimerWheel};

/// The shard's read buffer: one maximum frame plus its prefix, so a single
/// read can always complete any frame.
const SCRATCH_LEN: usize =
    herald_proto::limits::FRAME_BODY_LEN_MAX + herald_proto::limits::LENGTH_PREFIX_LEN;

/// Starting size of a partial-frame buffer. Most frames (pings, acks) are a
/// few dozen bytes; a larger partial frame grows its buffer, which the pool
/// then frees rather than keeps.
const READ_BUFFER_CAPACITY: usize = 512;

/// Starting size of an output buffer: a handful of typical pushes.
const WRITE_BUFFER_CAPACITY: usize = 4 * 1024;

/// Buffers a pool keeps while unused: bounds idle pool memory to about
/// 4.5 MiB per shard.
const POOL_FREE_MAX: usize = 1024;

/// Rounds of flush-then-read one connection gets per wakeup before it yields,
/// so a busy client cannot starve the others on its shard.
const CONN_POLL_ROUNDS_MAX: usize = 16;

/// Events a shard holds for the control plane before its connections stop
/// reading (backpressure instead of an unbounded queue). Commands may still
/// add catch-up requests past it, at most one per binding.
const OUTBOX_LEN_MAX: usize = 4096;

/// Commands handled per wakeup of the command loop before it yields.
const COMMAND_BATCH_MAX: usize = 256;

/// How long a closing connection may take to accept its last frames
/// (GOAWAY, ERROR) and to close its side, before it is cut.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// What a shard needs from a connection's socket, whichever driver owns it.
/// Both calls are non-blocking and register the task's waker when they
/// return `Pending`, like `futures::AsyncRead`/`AsyncWrite`.
pub(crate) trait ConnSocket {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Shuts our sending side: the last frame is out.
    fn shutdown_write(&mut self);
}

/// The driver's accept task; dropping it stops accepting and closes the
/// shard's listening socket.
pub(crate) type AcceptTask = Box<dyn Any>;

/// Everything a shard is told at startup.
pub struct ShardSettings {
    pub id: u16,
    pub server: ServerConfig,
    pub auth: AppSecrets,
    pub connections_max: usize,
    pub send_queue_bytes_max: usize,
    pub metrics: Arc<GatewayMetrics>,
}

struct Conn {
    generation: u32,
    server: ServerConn,
    connected_at_ms: u64,
    /// The start of a frame whose end has not arrived yet.
    partial: Option<BytesMut>,
    /// Encoded frames the socket has not taken yet.
    queue: Option<BytesMut>,
    /// The connection task, when it waits for the socket.
    waker: Option<Waker>,
    /// Set once the connection must close; it does after the queue drains
    /// and the client closes its side (or the flush deadline passes).
    closing: Option<ConnEnd>,
    flush_deadline: Option<Instant>,
    flush_timed_out: bool,
    /// Our side is shut down: the last frame is out, we wait for EOF.
    write_shut: bool,
}

// A slab slot is 208 bytes today (the connection logic is 88 of them);
// heap strings for device and bindings come on top. Growing a connection
// multiplies by millions, so it takes a deliberate change of this budget.
const _: () = assert!(size_of::<Conn>() <= 256);

pub(crate) struct Shard {
    settings: ShardSettings,
    conns: Slab<Conn>,
    next_generation: u32,
    scratch: Box<[u8]>,
    out: Output,
    read_pool: BufferPool,
    write_pool: BufferPool,
    wheel: TimerWheel,
    expired: Vec<TimerKey>,
    outbox: VecDeque<ShardEvent>,
    forwarder: Option<Waker>,
    /// Connections that stopped reading because the outbox was full.
    readers_waiting: Vec<Waker>,
    accept_task: Option<AcceptTask>,
    draining: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shard {
    pub(crate) fn new(settings: ShardSettings, now: Instant) -> Shard {
        Shard {
            conns: Slab::with_capacity(settings.connections_max.min(1 << 16)),
            settings,
            next_generation: 0,
            scratch: vec![0; SCRATCH_LEN].into_boxed_slice(),
            out: Output::default(),
            read_pool: BufferPool::new(READ_BUFFER_CAPACITY, POOL_FREE_MAX),
            write_pool: BufferPool::new(WRITE_BUFFER_CAPACITY, POOL_FREE_MAX),
            wheel: TimerWheel::new(now),
            expired: Vec::new(),
            outbox: VecDeque::new(),
            forwarder: None,
            readers_waiting: Vec::new(),
            accept_task: None,
            draining: false,
        }
    }

    fn counters(&self) -> &ShardCounters {
        self.settings.metrics.shard(usize::from(self.settings.id))
    }

    fn conn_id(&self, slot: usize) -> ConnId {
        ConnId {
            shard: self.settings.id,
            slot: slot as u32,
            generation: self.conns[slot].generation,
        }
    }

    /// The slot of a live connection, or `None` for a stale id.
    fn live_slot(&self, conn: ConnId) -> Option<usize> {
        let slot = conn.slot as usize;
        match self.conns.get(slot) {
            Some(c) if c.generation == conn.generation && conn.shard == self.settings.id => {
                Some(slot)
            }
            _ => None,
        }
    }

    pub(crate) fn set_accept_task(&mut self, task: AcceptTask) {
        self.accept_task = Some(task);
    }

    /// Takes a just-accepted connection into the slab, or refuses it (the
    /// caller drops the socket) when the shard is full.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<usize> {
        if self.conns.len() >= self.settings.connections_max {
            self.counters().connection_refused();
            return None;
        }
        Some(self.open_conn(now))
    }

    fn open_conn(&mut self, now: Instant) -> usize {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let server = ServerConn::new(now, &self.settings.server);
        let deadline = server.poll_timeout();
        let slot = self.conns.insert(Conn {
            generation,
            server,
            connected_at_ms: unix_ms(),
            partial: None,
            queue: None,
            waker: None,
            closing: None,
            flush_deadline: None,
            flush_timed_out: false,
            write_shut: false,
        });
        self.wheel.insert(
            deadline,
            TimerKey {
                slot: slot as u32,
                generation,
            },
        );
        self.counters().connection_opened();
        slot
    }

    fn remove_conn(&mut self, slot: usize, end: ConnEnd) {
        let id = self.conn_id(slot);
        let conn = self.conns.remove(slot);
        if let Some(partial) = conn.partial {
            self.read_pool.give(partial);
        }
        if let Some(queue) = conn.queue {
            self.write_pool.give(queue);
        }
        self.counters().connection_closed(end);
        // A connection that began a close was unregistered then.
        if conn.closing.is_none()
            && let Some(event) = closed_event(id, &conn.server)
        {
            self.push_event(event);
        }
        if self.draining && self.conns.is_empty() {
            self.push_event(ShardEvent::Drained {
                shard: self.settings.id,
            });
        }
    }

    fn push_event(&mut self, event: ShardEvent) {
        self.outbox.push_back(event);
        if let Some(waker) = self.forwarder.take() {
            waker.wake();
        }
    }

    /// Sends what the connection logic produced: encodes frames into the
    /// connection's queue, forwards events, starts a close.
    fn apply(&mut self, slot: usize, now: Instant) {
        let id = self.conn_id(slot);
        let shard_id = usize::from(self.settings.id);
        let Shard {
            settings,
            conns,
            out,
            write_pool,
            outbox,
            forwarder,
            wheel,
            ..
        } = self;
        let counters = settings.metrics.shard(shard_id);
        let conn = &mut conns[slot];

        let mut frames = 0;
        let mut pushes = 0;
        let mut overflow = false;
        if conn.closing.is_some() {
            out.transmit.clear();
        } else if !out.transmit.is_empty() {
            let queue = conn.queue.get_or_insert_with(|| write_pool.take());
            for frame in out.transmit.drain(..) {
                if queue.len() + encoded_len(&frame) > settings.send_queue_bytes_max {
                    overflow = true;
                    break;
                }
                if let Err(error) = encode(&frame, queue) {
                    // The connection logic only builds frames from checked
                    // input, so this is a bug: close this one connection.
                    debug_assert!(false, "unencodable frame {frame:?}: {error}");
                    tracing::error!(conn.id = %id, %error, "unencodable frame");
                    overflow = true;
                    break;
                }
                frames += 1;
                if matches!(frame, Frame::Push { .. }) {
                    pushes += 1;
                }
            }
            out.transmit.clear();
        }
        counters.frames_out(frames);
        counters.pushes_out(pushes);
        if overflow {
            // A slow consumer: drop what it has not read and cut it off.
            if let Some(queue) = conn.queue.take() {
                write_pool.give(queue);
            }
            conn.server.close_slow_consumer(out);
        }

        for event in out.events.drain(..) {
            let device_id = || conn.server.device_id().to_owned();
            outbox.push_back(match event {
                ConnEvent::Bound {
                    app,
                    user,
                    client_last_seq,
                } => ShardEvent::Bound {
                    conn: id,
                    app,
                    user,
                    device_id: device_id(),
                    network: conn.server.network(),
                    client_last_seq,
                    connected_at_ms: conn.connected_at_ms,
                },
                ConnEvent::Unbound { app, user } => ShardEvent::Unbound {
                    conn: id,
                    app,
                    user,
                },
                ConnEvent::Ack { app, user, seq } => {
                    counters.acks_in(1);
                    ShardEvent::Ack {
                        conn: id,
                        app,
                        user,
                        device_id: device_id(),
                        seq,
                    }
                }
                ConnEvent::CatchUp {
                    app,
                    user,
                    after,
                    limit,
                } => ShardEvent::CatchUp {
                    conn: id,
                    app,
                    user,
                    after,
                    limit,
                },
                ConnEvent::Upstream {
                    app,
                    user,
                    request_id,
                    payload,
                } => ShardEvent::Upstream {
                    conn: id,
                    app,
                    user,
                    device_id: device_id(),
                    request_id,
                    payload,
                },
            });
            if let Some(waker) = forwarder.take() {
                waker.wake();
            }
        }

        if let Some(reason) = out.close.take()
            && conn.closing.is_none()
        {
            // Unregister now, not when the socket is finally gone: from
            // here on the connection takes no more pushes.
            if let Some(event) = closed_event(id, &conn.server) {
                outbox.push_back(event);
                if let Some(waker) = forwarder.take() {
                    waker.wake();
                }
            }
            let deadline = now + CLOSE_FLUSH_TIMEOUT;
            conn.closing = Some(ConnEnd::Closed(reason));
            conn.flush_deadline = Some(deadline);
            wheel.insert(
                deadline,
                TimerKey {
                    slot: id.slot,
                    generation: id.generation,
                },
            );
        }
        if (conn.queue.is_some() || conn.closing.is_some())
            && let Some(waker) = conn.waker.take()
        {
            waker.wake();
        }
    }

    /// Decodes the `len` bytes just read into the scratch buffer (after any
    /// partial frame held from before) and runs them through the connection
    /// logic.
    fn handle_input(&mut self, slot: usize, len: usize, now: Instant) {
        let Shard {
            settings,
            conns,
            scratch,
            out,
            read_pool,
            ..
        } = self;
        let Conn {
            server, partial, ..
        } = &mut conns[slot];
        if let Some(partial) = partial.as_mut() {
            partial.extend_from_slice(&scratch[..len]);
        }
        let input: &[u8] = match partial {
            Some(partial) => partial,
            None => &scratch[..len],
        };
        let mut consumed = 0;
        let mut frames = 0;
        while !server.is_closing() {
            match decode_slice(&input[consumed..]) {
                Ok(Some((frame, used))) => {
                    consumed += used;
                    frames += 1;
                    server.handle_frame(now, frame, &settings.server, &settings.auth, out);
                }
                Ok(None) => break,
                Err(error) => {
                    server.handle_decode_error(error.error_code(), error.to_string(), out);
                    break;
                }
            }
        }
        let rest = input.len() - consumed;
        match partial {
            Some(buffer) => {
                buffer.advance(consumed);
                if buffer.is_empty() {
                    read_pool.give(partial.take().expect("partial is some"));
                }
            }
            None if rest > 0 && !server.is_closing() => {
                let mut buffer = read_pool.take();
                buffer.extend_from_slice(&scratch[consumed..len]);
                *partial = Some(buffer);
            }
            None => {}
        }
        self.counters().frames_in(frames);
        self.apply(slot, now);
    }

    /// Drives one connection's socket: flush output, read input, until both
    /// would block or the connection ends.
    fn poll_conn(
        &mut self,
        cx: &mut Context<'_>,
        slot: usize,
        stream: &mut impl ConnSocket,
    ) -> Poll<ConnEnd> {
        self.conns[slot].waker = None;
        for _ in 0..CONN_POLL_ROUNDS_MAX {
            let mut progressed = false;

            let conn = &mut self.conns[slot];
            if conn.flush_timed_out {
                // Everything was sent and only the client's EOF is missing:
                // the close went as intended.
                return Poll::Ready(match conn.closing {
                    Some(end) if conn.write_shut => end,
                    _ => ConnEnd::FlushTimeout,
                });
            }
            if let Some(queue) = conn.queue.as_mut() {
                match stream.poll_write(cx, queue) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(ConnEnd::Io),
                    Poll::Ready(Ok(written)) => {
                        queue.advance(written);
                        if queue.is_empty() {
                            let queue = conn.queue.take().expect("queue is some");
                            self.write_pool.give(queue);
                        }
                        progressed = true;
                    }
                    Poll::Pending => {}
                }
            }
            let conn = &mut self.conns[slot];
            if let Some(end) = conn.closing {
                // A slow consumer's output was dropped: nothing to protect.
                if end == ConnEnd::Closed(CloseReason::SlowConsumer) {
                    return Poll::Ready(end);
                }
                if conn.queue.is_none() {
                    // Lingering close: shut our side, then read and discard
                    // until the client's EOF. Closing with its bytes still
                    // unread would make the kernel send a reset, and the
                    // client could lose the GOAWAY or ERROR just sent.
                    if !conn.write_shut {
                        conn.write_shut = true;
                        stream.shutdown_write();
                    }
                    match stream.poll_read(cx, &mut self.scratch) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(end),
                        Poll::Ready(Ok(_)) => progressed = true,
                        Poll::Pending => {}
                    }
                }
            } else if self.outbox.len() >= OUTBOX_LEN_MAX {
                self.readers_waiting.push(cx.waker().clone());
            } else {
                match stream.poll_read(cx, &mut self.scratch) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(ConnEnd::PeerClosed),
                    Poll::Ready(Err(_)) => return Poll::Ready(ConnEnd::Io),
                    Poll::Ready(Ok(len)) => {
                        self.handle_input(slot, len, Instant::now());
                        progressed = true;
                    }
                    Poll::Pending => {}
                }
            }

            if !progressed {
                self.conns[slot].waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn handle_command(&mut self, command: ShardCommand, now: Instant) {
        let config = &self.settings.server;
        match command {
            ShardCommand::Deliver { conn, app, message } => {
                if let Some(slot) = self.live_slot(conn) {
                    self.conns[slot]
                        .server
                        .deliver(&app, &message, config, &mut self.out);
                    self.apply(slot, now);
                }
            }
            ShardCommand::Fill {
                conn,
                app,
                after,
                messages,
                more,
            } => {
                if let Some(slot) = self.live_slot(conn) {
                    self.conns[slot].server.fill(
                        &app,
                        after,
                        &messages,
                        more,
                        config,
                        &mut self.out,
                    );
                    self.apply(slot, now);
                }
            }
            ShardCommand::UpstreamAck {
                conn,
                app,
                request_id,
                status,
            } => {
                if let Some(slot) = self.live_slot(conn) {
                    self.conns[slot]
                        .server
                        .upstream_ack(&app, request_id, status, &mut self.out);
                    self.apply(slot, now);
                }
            }
            ShardCommand::Kick { conn, reason } => {
                if let Some(slot) = self.live_slot(conn) {
                    self.conns[slot].server.kick(reason, &mut self.out);
                    self.apply(slot, now);
                }
            }
            ShardCommand::Drain { reconnect_delay_ms } => self.drain(reconnect_delay_ms, now),
        }
    }

    /// Stops accepting and closes every connection with GOAWAY. `Drained` is
    /// reported when the last one is gone (at once if there are none).
    fn drain(&mut self, reconnect_delay_ms: u32, now: Instant) {
        if self.draining {
            return;
        }
        self.draining = true;
        // Dropping the accept task cancels it and closes this shard's
        // listening socket.
        self.accept_task = None;
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.conns[slot]
                .server
                .drain(reconnect_delay_ms, &mut self.out);
            self.apply(slot, now);
        }
        if self.conns.is_empty() {
            self.push_event(ShardEvent::Drained {
                shard: self.settings.id,
            });
        }
    }

    /// Fires the wheel: deadlines that moved are put back, closing
    /// connections past their flush deadline are cut, the rest time out.
    pub(crate) fn handle_tick(&mut self, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(now, &mut expired);
        for key in expired.drain(..) {
            let slot = key.slot as usize;
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != key.generation {
                continue;
            }
            if conn.closing.is_some() {
                if conn.flush_deadline.is_some_and(|deadline| now >= deadline) {
                    conn.flush_timed_out = true;
                    if let Some(waker) = conn.waker.take() {
                        waker.wake();
                    }
                }
                continue;
            }
            let deadline = conn.server.poll_timeout();
            if now >= deadline {
                conn.server.handle_timeout(now, &mut self.out);
                self.apply(slot, now);
            } else {
                self.wheel.insert(deadline, key);
            }
        }
        self.expired = expired;
    }
}

/// The event that unregisters a connection's bindings, if it has any.
fn closed_event(conn: ConnId, server: &ServerConn) -> Option<ShardEvent> {
    let bindings: Vec<(String, String)> = server
        .bindings()
        .map(|(app, user)| (app.to_owned(), user.to_owned()))
        .collect();
    (!bindings.is_empty()).then_some(ShardEvent::Closed { conn, bindings })
}

/// Handles commands until the control plane drops its command channel.
pub(crate) async fn run_commands(
    shard: Rc<RefCell<Shard>>,
    commands: async_channel::Receiver<ShardCommand>,
) {
    while let Ok(command) = commands.recv().await {
        let mut shard = shard.borrow_mut();
        let now = Instant::now();
        shard.handle_command(command, now);
        for _ in 1..COMMAND_BATCH_MAX {
            match commands.try_recv() {
                Ok(command) => shard.handle_command(command, now),
                Err(_) => break,
            }
        }
    }
    // The accept task holds the shard; break the cycle so it is freed.
    shard.borrow_mut().accept_task = None;
}

/// Drives one connection until it ends, then frees its slot.
pub(crate) async fn serve_conn(
    shard: Rc<RefCell<Shard>>,
    slot: usize,
    mut stream: impl ConnSocket,
) {
    let end = poll_fn(|cx| shard.borrow_mut().poll_conn(cx, slot, &mut stream)).await;
    drop(stream);
    shard.borrow_mut().remove_conn(slot, end);
}

/// Moves the shard's outbox to the control plane's event channel.
pub(crate) async fn forward_events(
    shard: Rc<RefCell<Shard>>,
    events: async_channel::Sender<ShardEvent>,
) {
    loop {
        let event = poll_fn(|cx| {
            let mut shard = shard.borrow_mut();
            match shard.outbox.pop_front() {
                Some(event) => {
                    if shard.outbox.len() < OUTBOX_LEN_MAX / 2 {
                        for waker in shard.readers_waiting.drain(..) {
                            waker.wake();
                        }
                    }
                    Poll::Ready(event)
                }
                None => {
                    shard.forwarder = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        if events.send(event).await.is_err() {
            return;
        }
    }
}
