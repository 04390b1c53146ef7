//! One shard: a thread pinned to a core that owns its connections.
//!
//! A shard is one loop, not a set of tasks: it takes commands from the
//! control plane, accepts, drives the connections that have work, hands its
//! events to the control plane, sweeps its timer wheel, then waits on its
//! poller (io_uring or epoll) until a socket, a command or the next tick
//! needs it. A waiting connection is its slab slot and its socket, nothing
//! else: no task, no future, no buffer.
//!
//! Input is decoded where it lies: in a buffer of the shard's io_uring
//! buffer ring, or (epoll) in the shard's one scratch buffer; only the tail
//! of a partial frame is copied into a small pooled buffer. Output is
//! encoded into a pooled buffer and handed to the driver at once (a
//! broadcast's shared frame, on plain TCP, is sent from where it lies);
//! while a connection's send is with the driver, what it produces waits in
//! its queue, also pooled. Every buffer goes back to its pool once drained.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_core::Stream;
use herald_proto::ids::{AppId, UserId};
use herald_proto::plane::{
    BroadcastMode, BroadcastProgress, ConnCommand, ConnEvent, ConnId, GatewayApp, ShardCommand,
    ShardEvent,
};
use herald_proto::rate::{Rate, TokenBucket};
use herald_proto::server::{
    BroadcastFate, CloseReason, InboxFill, Output, ServerConfig, ServerConn,
};
use herald_proto::{Frame, GoAwayReason, decode_slice, encode, encoded_len};
use prometheus::Histogram;
use slab::Slab;

use crate::ReadDeadlines;
use crate::auth::AppSecrets;
use crate::driver::{Driver, Event, Input, SendBuffer, TOKEN_BITS_MAX, WakeFd};
use crate::metrics::{ConnEnd, GatewayMetrics, ShardCounters, TurnAway};
use crate::per_ip::{PerIpLimits, Refusal};
use crate::pool::BufferPool;
use crate::transport::{
    self, CloseCode, Message, TlsAcceptor, Transport, TransportEnd, TransportKind, Upgrade,
    WebSocketSettings, Ws, WsError, WsState,
};
use crate::wheel::{TICK, TimerKey, TimerWheel};

/// The epoll shard's read buffer: one maximum frame plus its prefix, so a
/// single read can always complete any frame.
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

/// How often the pools free the buffers no one took meanwhile (the
/// process returns freed heap to the kernel as often).
const POOL_SHED_INTERVAL: Duration = Duration::from_secs(10);

/// Events the outbox keeps room for between turns.
const OUTBOX_KEPT_CAPACITY: usize = 64;

/// Rounds of flush-then-read one connection gets per turn before it goes to
/// the back of the run queue, so a busy client cannot starve the others.
const CONN_POLL_ROUNDS_MAX: usize = 16;

/// Events a shard holds for the control plane before its connections stop
/// reading (backpressure instead of an unbounded queue). Commands may still
/// add catch-up requests past it, at most one per binding.
const OUTBOX_LEN_MAX: usize = 4096;

/// Entries' room the `stalls` and `counted` maps keep without shrinking:
/// a storm of connections holding partial frames grows them far past what
/// a usual moment needs, and they do not keep that.
const SIDE_MAP_KEPT_CAPACITY: usize = 64;

/// Commands handled per turn of the loop.
const COMMAND_BATCH_MAX: usize = 256;

/// Broadcasts a shard remembers for counting late sends (broadcasts are
/// rare; a connection's first fill follows its bind within milliseconds).
const RECENT_BROADCASTS_MAX: usize = 64;

/// Bounds of the retry delay told to a connection turned away at the
/// accept-rate limit.
const TURN_AWAY_DELAY_MIN_MS: u32 = 1_000;
const TURN_AWAY_DELAY_MAX_MS: u32 = 60_000;

/// Connections accepted per turn of the loop, so a connect storm leaves
/// room for the connections already there.
const ACCEPT_BATCH_MAX: usize = 256;

/// How long accepting pauses after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long the loop sleeps while the control plane's event channel is full.
const OUTBOX_RETRY: Duration = Duration::from_millis(1);

/// How long a closing connection may take to accept its last frames
/// (GOAWAY, ERROR) and to close its side, before it is cut.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Driver tokens: a connection's is its slot and the low bits of its
/// generation, so an operation of a closed connection never reaches the
/// connection that takes its slot next.
const GENERATION_TOKEN_MASK: u32 = (1 << (TOKEN_BITS_MAX - 32)) - 1;
/// Listeners a gateway may have.
pub const LISTENERS_MAX: usize = 8;

/// The largest slot a connection may have.
pub(crate) const SLOTS_MAX: usize = u32::MAX as usize - 1;

fn conn_token(slot: usize, generation: u32) -> u64 {
    (u64::from(generation & GENERATION_TOKEN_MASK) << 32) | slot as u64
}

/// Everything a shard is told at startup.
pub struct ShardSettings {
    pub id: u16,
    pub server: ServerConfig,
    pub auth: AppSecrets,
    pub connections_max: usize,
    pub send_queue_bytes_max: usize,
    /// Frames a connection may have waiting (queued since its queue was
    /// last empty) before it is cut off as a slow consumer.
    pub send_queue_frames_max: usize,
    /// This shard's share of the gateway's accept-rate limit, if any.
    pub accept_rate: Option<Rate>,
    /// The gateway's per-address limits, shared by every shard.
    pub per_ip: Option<Arc<PerIpLimits>>,
    /// How long a frame that has begun to arrive may take to finish.
    pub read_deadlines: ReadDeadlines,
    pub metrics: Arc<GatewayMetrics>,
    /// For tls and wss listeners.
    pub tls: Option<TlsAcceptor>,
    pub websocket: WebSocketSettings,
}

/// One of the shard's listening sockets.
struct Listener {
    socket: OwnedFd,
    transport: TransportKind,
    /// epoll: it may have connections waiting.
    ready: bool,
    /// Its driver is accepting on it (io_uring stops after an error, and
    /// the shard starts it again).
    accepting: bool,
}

/// One broadcast's way through the shard's connections.
struct Fanout {
    app: AppId,
    seq: u64,
    required_tags: Arc<[String]>,
    frame: Bytes,
    progress: Arc<BroadcastProgress>,
    /// The slab slot to look at next.
    next_slot: usize,
    started: Instant,
    mode: BroadcastMode,
    /// Connections it was written to so far.
    sent: u64,
}

struct Conn {
    socket: OwnedFd,
    generation: u32,
    server: ServerConn,
    /// The start of a frame whose end has not arrived yet.
    partial: Option<Box<BytesMut>>,
    /// Encoded frames the socket has not taken yet.
    queue: Option<Box<BytesMut>>,
    /// TLS and WebSocket state; `None` on plain TCP.
    transport: Option<Box<Transport>>,
    /// Frames waiting in `queue`: counted as they join it, from zero again
    /// once it goes to the driver (what is with the driver is bounded by
    /// its bytes).
    queued_frames: u16,
    /// Set once the connection must close; it does after the queue drains
    /// and the client closes its side (or the flush deadline passes).
    closing: Option<ConnEnd>,
    flush_deadline: Option<Instant>,
    flush_timed_out: bool,
    /// Our side is shut down: the last frame is out, we wait for EOF.
    write_shut: bool,
    /// epoll: the socket may hold input: the driver said so and no read
    /// since has come back empty.
    readable: bool,
    /// io_uring: a receive is armed.
    receiving: bool,
    /// A send is with the driver; output waits in `queue` until it is done.
    sending: bool,
    /// A send failed (reset, broken pipe) or receiving could not be armed
    /// again: the connection ends.
    io_failed: bool,
    /// The connection is in the run queue.
    queued: bool,
}

// A slab slot is 152 bytes today (the connection logic is 88 of them, the
// transport pointer 8); heap strings for device and bindings come on top.
// Growing a connection multiplies by millions, so it takes a deliberate
// change of this budget.
const _: () = assert!(size_of::<Conn>() <= 152);

pub(crate) struct Shard<D> {
    settings: ShardSettings,
    driver: D,
    /// Empty once draining.
    listeners: Vec<Listener>,
    accept_paused_until: Option<Instant>,
    /// Accepts this shard may still take; over it, new connections are
    /// turned away with GOAWAY(overloaded) and a jittered retry delay.
    accept_limiter: Option<TokenBucket>,
    /// Connections turned away since `turned_away_since` (a second at
    /// most): how far to spread the next one's retry.
    turned_away: u32,
    turned_away_since: Instant,
    /// xorshift state for the retry jitter.
    jitter_state: u64,
    conns: Slab<Conn>,
    next_generation: u32,
    /// Connections with work to do: input, output or a close to finish.
    run_queue: VecDeque<usize>,
    /// epoll's read buffer (empty on io_uring, which reads into its ring).
    scratch: Box<[u8]>,
    /// io_uring: input that arrived while the outbox was full, taken in
    /// order once it has room (its ring buffers held meanwhile, so the ring
    /// running dry stops further reading).
    held_input: VecDeque<(u64, Input, bool)>,
    /// io_uring: connections whose receive stopped (the ring ran dry, or
    /// the kernel ended it), armed again once buffers are back.
    recv_rearm: Vec<u64>,
    /// A TLS connection's output before it is sealed; empty between uses.
    tls_plain: BytesMut,
    /// What a TLS connection's records held (a plain WebSocket
    /// connection's input is read where it lies); empty between uses.
    plain_in: BytesMut,
    /// What a TLS handshake sends back, and what the layers above it
    /// answer (upgrade response, pongs, close echo); empty between uses.
    handshake_out: BytesMut,
    transport_reply: BytesMut,
    out: Output,
    /// A frame encoded once for many connections (a broadcast), sent by the
    /// next `apply` ahead of `out`'s frames.
    encoded: Option<Bytes>,
    /// Broadcasts sent at a rate, moved on every tick.
    paced: Vec<Fanout>,
    /// The last broadcasts fanned out here, to count in their progress the
    /// connections that get them right after their first fill.
    recent: VecDeque<((AppId, u64), Arc<BroadcastProgress>)>,
    /// Each app's stored-to-written histogram, looked up once.
    write_seconds: HashMap<AppId, Histogram>,
    read_pool: BufferPool,
    write_pool: BufferPool,
    /// When the pools next shed the buffers unused since the last time.
    pools_shed_at: Instant,
    wheel: TimerWheel,
    expired: Vec<TimerKey>,
    outbox: VecDeque<ShardEvent>,
    /// Connections that stopped reading because the outbox was full.
    readers_waiting: Vec<usize>,
    /// Set once draining: how far the GOAWAYs have got.
    drain: Option<DrainProgress>,
    /// The address each connection counted in the per-address limits is
    /// counted under, by slot: kept here, not in `Conn`, so a connection
    /// pays for it only when the limits are on.
    counted: HashMap<usize, IpAddr>,
    /// Connections holding part of a frame (or of a TLS record, WebSocket
    /// frame or upgrade request), by slot: an idle connection has no entry
    /// and no timer.
    stalls: HashMap<usize, Stall>,
    /// The deadlines of `stalls`, apart from the heartbeat deadlines of
    /// `wheel` so that each connection keeps at most one entry in each.
    stall_wheel: TimerWheel,
}

/// A connection's input that stopped short of a whole frame.
struct Stall {
    /// When the unfinished frame began (the first read that left input
    /// held, or the last one that completed a frame and still left some);
    /// `None` once nothing is held but the entry in `stall_wheel` is still
    /// out.
    since: Option<Instant>,
}

/// A drain's GOAWAYs, sent in even batches over its spread as the tick
/// comes round (no timer per connection): by each tick, the share of the
/// connections open at the start that the time elapsed is of the spread.
struct DrainProgress {
    reconnect_delay_ms: u32,
    started: Instant,
    spread: Duration,
    /// Connections open when the drain began.
    total: usize,
    /// Connections told so far.
    told: usize,
    /// Connections are told in slot order; nothing new is accepted while
    /// draining, so no slot behind this one fills again.
    next_slot: usize,
}

impl DrainProgress {
    /// Connections that should have been told by `now`: the first at once,
    /// every one by the end of the spread.
    fn due(&self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= self.spread {
            return usize::MAX;
        }
        let share = elapsed.as_secs_f64() / self.spread.as_secs_f64();
        (self.total as f64 * share) as usize + 1
    }
}

/// The shard loop's ends toward the control plane (its channels, and the
/// eventfd that wakes it for a command), and what it keeps from one turn
/// to the next.
struct LoopEnds {
    commands: Pin<Box<async_channel::Receiver<ShardCommand>>>,
    events: async_channel::Sender<ShardEvent>,
    wake: Arc<WakeFd>,
    /// The command channel wakes the loop through the eventfd.
    waker: Waker,
    driver_events: Vec<Event>,
    next_tick: Instant,
}

impl LoopEnds {
    fn new(
        commands: async_channel::Receiver<ShardCommand>,
        events: async_channel::Sender<ShardEvent>,
        wake: Arc<WakeFd>,
        now: Instant,
    ) -> LoopEnds {
        LoopEnds {
            commands: Box::pin(commands),
            events,
            waker: Waker::from(wake.clone()),
            wake,
            driver_events: Vec::new(),
            next_tick: now + TICK,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Puts a connection at the back of the run queue unless it is there.
fn enqueue(run_queue: &mut VecDeque<usize>, conn: &mut Conn, slot: usize) {
    if !conn.queued {
        conn.queued = true;
        run_queue.push_back(slot);
    }
}

fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

fn recv(socket: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buffer.len()` bytes into it.
    let n = unsafe { libc::recv(socket, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl<D: Driver> Shard<D> {
    pub(crate) fn new(
        settings: ShardSettings,
        driver: D,
        listeners: Vec<(std::net::TcpListener, TransportKind)>,
        now: Instant,
    ) -> Shard<D> {
        assert!(settings.connections_max <= SLOTS_MAX);
        assert!(listeners.len() <= LISTENERS_MAX);
        let accept_limiter = settings.accept_rate.map(|rate| TokenBucket::new(rate, now));
        let jitter_state = (unix_ms() << 16) ^ u64::from(settings.id) | 1;
        Shard {
            conns: Slab::with_capacity(settings.connections_max.min(1 << 16)),
            settings,
            driver,
            listeners: listeners
                .into_iter()
                .map(|(socket, transport)| Listener {
                    socket: socket.into(),
                    transport,
                    ready: true,
                    accepting: false,
                })
                .collect(),
            accept_paused_until: None,
            accept_limiter,
            turned_away: 0,
            turned_away_since: now,
            jitter_state,
            next_generation: 0,
            run_queue: VecDeque::new(),
            scratch: if D::RECEIVES {
                Box::default()
            } else {
                vec![0; SCRATCH_LEN].into_boxed_slice()
            },
            held_input: VecDeque::new(),
            recv_rearm: Vec::new(),
            tls_plain: BytesMut::new(),
            plain_in: BytesMut::new(),
            handshake_out: BytesMut::new(),
            transport_reply: BytesMut::new(),
            out: Output::default(),
            encoded: None,
            paced: Vec::new(),
            recent: VecDeque::new(),
            write_seconds: HashMap::new(),
            read_pool: BufferPool::new(READ_BUFFER_CAPACITY, POOL_FREE_MAX),
            write_pool: BufferPool::new(WRITE_BUFFER_CAPACITY, POOL_FREE_MAX),
            pools_shed_at: now + POOL_SHED_INTERVAL,
            wheel: TimerWheel::new(now),
            expired: Vec::new(),
            outbox: VecDeque::new(),
            readers_waiting: Vec::new(),
            drain: None,
            counted: HashMap::new(),
            stalls: HashMap::new(),
            stall_wheel: TimerWheel::new(now),
        }
    }

    /// Runs the shard until the control plane drops its command channel or
    /// the driver fails.
    pub(crate) fn run(
        mut self,
        commands: async_channel::Receiver<ShardCommand>,
        events: async_channel::Sender<ShardEvent>,
        wake: Arc<WakeFd>,
    ) -> io::Result<()> {
        self.driver.add_wake(wake.raw_fd())?;
        self.start_accepting()?;
        let mut ends = LoopEnds::new(commands, events, wake, Instant::now());
        while self.turn(&mut ends, Instant::now)? {}
        Ok(())
    }

    /// One turn of the loop: commands, held input, accepts, connections,
    /// events to the control plane, the wheel, then the driver's wait and
    /// what it reports. The clock is read before the work and after the
    /// wait; it is a parameter so that tests can drive the loop with a
    /// fake one. Returns `false` once the control plane is gone.
    fn turn(&mut self, ends: &mut LoopEnds, clock: impl Fn() -> Instant) -> io::Result<bool> {
        let LoopEnds {
            commands,
            events,
            wake,
            waker,
            driver_events,
            next_tick,
        } = ends;
        let mut cx = Context::from_waker(waker);
        // The real clock even under a test's fake one: this times the work.
        let work_started = Instant::now();
        let now = clock();
        let mut commands_left = true;
        for _ in 0..COMMAND_BATCH_MAX {
            match commands.as_mut().poll_next(&mut cx) {
                Poll::Ready(Some(command)) => self.handle_command(command, now),
                Poll::Ready(None) => return Ok(false),
                Poll::Pending => {
                    commands_left = false;
                    break;
                }
            }
        }
        self.take_held_input(now);
        self.rearm_receives();
        if self.accept_paused_until.is_none_or(|until| now >= until) {
            self.accept_paused_until = None;
            self.start_accepting()?;
            if self.accept_ready() {
                self.accept(now);
            }
        }
        self.run_connections(now);
        // Before the flush: a connection the tick closes leaves the register
        // now, not a tick later (after a close the client made since).
        if now >= *next_tick {
            self.handle_tick(now);
            *next_tick = now + TICK;
        }
        let Some(outbox_blocked) = self.flush_outbox(events) else {
            return Ok(false);
        };

        let busy = commands_left
            || !self.run_queue.is_empty()
            || (!self.held_input.is_empty() && self.outbox.len() < OUTBOX_LEN_MAX)
            || (self.accept_ready() && self.accept_paused_until.is_none());
        let timeout = if busy {
            Duration::ZERO
        } else if outbox_blocked {
            OUTBOX_RETRY
        } else {
            let mut until = *next_tick;
            if let Some(paused) = self.accept_paused_until {
                until = until.min(paused);
            }
            until.saturating_duration_since(now)
        };
        self.counters().turn(work_started.elapsed().as_secs_f64());
        self.driver.wait(timeout, driver_events)?;
        let now = clock();
        for event in driver_events.drain(..) {
            self.on_event(event, wake, now);
        }
        Ok(true)
    }

    /// Has the driver accept on every listener it is not accepting on.
    fn start_accepting(&mut self) -> io::Result<()> {
        for (index, listener) in self.listeners.iter_mut().enumerate() {
            if !listener.accepting {
                self.driver.accept(listener.socket.as_raw_fd(), index)?;
                listener.accepting = true;
            }
        }
        Ok(())
    }

    fn on_event(&mut self, event: Event, wake: &WakeFd, now: Instant) {
        match event {
            Event::Wake => wake.clear(),
            Event::Acceptable { listener } => {
                if let Some(listener) = self.listeners.get_mut(listener) {
                    listener.ready = true;
                }
            }
            Event::Accepted {
                listener,
                socket,
                peer,
            } => {
                if let Some(transport) = self.listeners.get(listener).map(|l| l.transport) {
                    self.accept_one(socket, peer, transport, now);
                }
            }
            Event::AcceptStopped { listener, error } => {
                let Some(listener) = self.listeners.get_mut(listener) else {
                    return;
                };
                listener.accepting = false;
                if let Some(error) = error
                    && !matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN)
                    )
                {
                    // Out of descriptors or memory: pause instead of
                    // spinning on the same error.
                    tracing::warn!(%error, "accept failed");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                }
            }
            Event::Readable { token } => {
                if let Some(slot) = self.slot_of(token) {
                    let conn = &mut self.conns[slot];
                    conn.readable = true;
                    enqueue(&mut self.run_queue, conn, slot);
                }
            }
            Event::Received {
                token,
                input,
                rearm,
            } => {
                if self.held_input.is_empty() && self.outbox.len() < OUTBOX_LEN_MAX {
                    self.on_received(token, input, rearm, now);
                } else {
                    self.held_input.push_back((token, input, rearm));
                }
            }
            Event::Sent {
                token,
                buffer,
                result,
            } => match self.slot_of(token) {
                Some(slot) => {
                    self.finish_send(slot, buffer, result);
                    let conn = &mut self.conns[slot];
                    enqueue(&mut self.run_queue, conn, slot);
                }
                None => self.recycle(buffer),
            },
        }
    }

    /// The slot of the live connection a driver token names.
    fn slot_of(&self, token: u64) -> Option<usize> {
        let slot = (token & u64::from(u32::MAX)) as usize;
        let conn = self.conns.get(slot)?;
        (conn_token(slot, conn.generation) == token).then_some(slot)
    }

    /// Takes input that arrived while the outbox was full, in order, as far
    /// as the outbox has room.
    fn take_held_input(&mut self, now: Instant) {
        while self.outbox.len() < OUTBOX_LEN_MAX
            && let Some((token, input, rearm)) = self.held_input.pop_front()
        {
            self.on_received(token, input, rearm, now);
        }
    }

    /// Arms again the receives that stopped, once the ring has buffers and
    /// no input is held back.
    fn rearm_receives(&mut self) {
        if self.recv_rearm.is_empty()
            || !self.held_input.is_empty()
            || !self.driver.has_recv_buffers()
        {
            return;
        }
        for token in std::mem::take(&mut self.recv_rearm) {
            if let Some(slot) = self.slot_of(token) {
                let conn = &mut self.conns[slot];
                // A closing connection receives again once its side is
                // shut (`drive`).
                if conn.receiving || (conn.closing.is_some() && !conn.write_shut) {
                    continue;
                }
                conn.receiving = true;
                if self
                    .driver
                    .rearm_recv(conn.socket.as_raw_fd(), token)
                    .is_err()
                {
                    conn.io_failed = true;
                    enqueue(&mut self.run_queue, conn, slot);
                }
            }
        }
    }

    /// io_uring: what a connection's receive brought; with `rearm`, its
    /// receiving stopped and is armed again unless the connection ends.
    fn on_received(&mut self, token: u64, input: Input, rearm: bool, now: Instant) {
        let Some(slot) = self.slot_of(token) else {
            if let Input::Bytes(buffer) = input {
                self.driver.give_back(buffer);
            }
            return;
        };
        let closing = self.conns[slot].closing;
        if rearm {
            self.conns[slot].receiving = false;
        }
        match input {
            Input::Bytes(mut buffer) => {
                if closing.is_none() {
                    // SAFETY: the driver that made the buffer is this
                    // shard's, alive for as long as the shard.
                    let bytes = unsafe { buffer.bytes_mut() };
                    self.handle_input(slot, bytes, now);
                }
                // A closing connection's input is read and discarded.
                self.driver.give_back(buffer);
                if rearm && self.slot_of(token).is_some() {
                    self.recv_rearm.push(token);
                }
            }
            Input::End => self.remove_conn(slot, closing.unwrap_or(ConnEnd::PeerClosed)),
            Input::Failed => self.remove_conn(slot, closing.unwrap_or(ConnEnd::Io)),
            Input::NoBuffer => self.recv_rearm.push(token),
        }
    }

    /// Hands a connection's output to the driver; what it could not finish
    /// now it reports in `Event::Sent`.
    fn transmit(&mut self, slot: usize, buffer: SendBuffer) {
        let conn = &mut self.conns[slot];
        debug_assert!(!conn.sending);
        let token = conn_token(slot, conn.generation);
        match self.driver.send(conn.socket.as_raw_fd(), token, buffer) {
            None => conn.sending = true,
            Some((buffer, result)) => self.finish_send(slot, buffer, result),
        }
    }

    /// A send is done: its buffer goes back, and a failure ends the
    /// connection.
    fn finish_send(&mut self, slot: usize, buffer: SendBuffer, result: io::Result<()>) {
        self.recycle(buffer);
        let conn = &mut self.conns[slot];
        conn.sending = false;
        if result.is_err() {
            conn.io_failed = true;
        }
    }

    fn recycle(&mut self, buffer: SendBuffer) {
        if let SendBuffer::Pooled(buffer) = buffer {
            self.write_pool.give(buffer);
        }
    }

    /// Hands queued events to the control plane. Returns whether some are
    /// left because its channel is full, or `None` once it is gone.
    fn flush_outbox(&mut self, events: &async_channel::Sender<ShardEvent>) -> Option<bool> {
        while let Some(event) = self.outbox.pop_front() {
            match events.try_send(event) {
                Ok(()) => {}
                Err(async_channel::TrySendError::Full(event)) => {
                    self.outbox.push_front(event);
                    return Some(true);
                }
                Err(async_channel::TrySendError::Closed(_)) => return None,
            }
        }
        // A storm (thousands of connections closing in one turn) grows the
        // outbox far past a usual turn's events; it does not keep that.
        if self.outbox.capacity() > OUTBOX_KEPT_CAPACITY {
            self.outbox.shrink_to(OUTBOX_KEPT_CAPACITY);
        }
        for slot in self.readers_waiting.drain(..) {
            if let Some(conn) = self.conns.get_mut(slot) {
                enqueue(&mut self.run_queue, conn, slot);
            }
        }
        Some(false)
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

    /// epoll: a listener may have connections waiting.
    fn accept_ready(&self) -> bool {
        !D::RECEIVES && self.listeners.iter().any(|listener| listener.ready)
    }

    /// epoll: accepts waiting connections, at most a batch per listener per
    /// turn.
    fn accept(&mut self, now: Instant) {
        for index in 0..self.listeners.len() {
            if self.listeners[index].ready && self.accept_paused_until.is_none() {
                self.accept_from(index, now);
            }
        }
    }

    fn accept_from(&mut self, index: usize, now: Instant) {
        let listener = self.listeners[index].socket.as_raw_fd();
        let transport = self.listeners[index].transport;
        for _ in 0..ACCEPT_BATCH_MAX {
            // SAFETY: accept4(2) writes at most the length it is given into
            // the address storage socket2 hands it.
            let accepted = unsafe {
                socket2::SockAddr::try_init(|address, address_len| {
                    let fd = libc::accept4(
                        listener,
                        address.cast(),
                        address_len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    );
                    if fd < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(fd)
                    }
                })
            };
            let (fd, address) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    match error.raw_os_error() {
                        Some(libc::EAGAIN) => self.listeners[index].ready = false,
                        Some(libc::EINTR | libc::ECONNABORTED) => continue,
                        _ => {
                            // Out of descriptors or memory: pause instead of
                            // spinning on the same error.
                            tracing::warn!(%error, "accept failed");
                            self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                        }
                    }
                    return;
                }
            };
            // SAFETY: fd is the new descriptor accept4 just returned.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            let peer = address.as_socket().map(|address| address.ip());
            self.accept_one(socket, peer, transport, now);
        }
    }

    /// Takes a connection just accepted: refused past the connection
    /// limit, turned away past its address's limits or the accept rate,
    /// opened otherwise.
    fn accept_one(
        &mut self,
        socket: OwnedFd,
        peer: Option<IpAddr>,
        transport: TransportKind,
        now: Instant,
    ) {
        if self.conns.len() >= self.settings.connections_max {
            self.counters().connection_refused();
            return;
        }
        set_nodelay(&socket);
        // io_uring's accept gives no address: getpeername(2), only when
        // addresses are limited.
        let peer = match (peer, &self.settings.per_ip) {
            (None, Some(_)) => socket2::SockRef::from(&socket)
                .peer_addr()
                .ok()
                .and_then(|address| address.as_socket())
                .map(|address| address.ip()),
            _ => peer,
        };
        let Some(slot) = self.open_conn(socket, transport, now) else {
            return;
        };
        let mut turned_away = None;
        if let Some(limits) = &self.settings.per_ip
            && let Some(key) = peer.and_then(|peer| limits.key(peer))
        {
            match limits.admit(key, now) {
                Ok(()) => {
                    self.counted.insert(slot, key);
                }
                Err(refusal) => turned_away = Some(TurnAway::PerIp(refusal)),
            }
        }
        if turned_away.is_none()
            && self
                .accept_limiter
                .as_mut()
                .is_some_and(|limiter| limiter.take(1, now).is_err())
        {
            turned_away = Some(TurnAway::AcceptRate);
            self.release_address(slot);
        }
        if let Some(reason) = turned_away {
            // Told when to come back rather than left to time out; the
            // usual lingering close makes sure the GOAWAY arrives.
            self.counters().turned_away(reason);
            let mut delay_ms = self.turn_away_delay_ms(now);
            if let TurnAway::PerIp(Refusal::Rate { wait }) = reason {
                // No sooner than its address may open another.
                let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
                delay_ms = delay_ms.saturating_add(wait_ms).min(TURN_AWAY_DELAY_MAX_MS);
            }
            self.conns[slot].server.turn_away(delay_ms, &mut self.out);
            self.apply(slot, now);
        }
    }

    /// The connection no longer counts toward its address's limit.
    fn release_address(&mut self, slot: usize) {
        if let Some(key) = self.counted.remove(&slot)
            && let Some(limits) = &self.settings.per_ip
        {
            limits.release(key, Instant::now());
        }
    }

    /// A retry delay for a connection turned away: at least
    /// [`TURN_AWAY_DELAY_MIN_MS`], plus a random share of the time the
    /// accept rate needs to take everyone turned away in the last second,
    /// so a storm's excess comes back spread out instead of all at once.
    fn turn_away_delay_ms(&mut self, now: Instant) -> u32 {
        if now.saturating_duration_since(self.turned_away_since) >= Duration::from_secs(1) {
            self.turned_away = 0;
            self.turned_away_since = now;
        }
        self.turned_away = self.turned_away.saturating_add(1);
        let per_sec = self
            .accept_limiter
            .as_ref()
            .map_or(1.0, |limiter| limiter.rate().per_sec);
        let spread_ms = (1000.0 * f64::from(self.turned_away) / per_sec).max(1000.0);
        let jitter = (self.next_random() % 1_000_000) as f64 / 1_000_000.0 * spread_ms;
        (TURN_AWAY_DELAY_MIN_MS as f64 + jitter).min(TURN_AWAY_DELAY_MAX_MS as f64) as u32
    }

    /// A drained connection's reconnect hint: uniform from half the
    /// configured delay to one and a half times it, so the clients of one
    /// batch do not come back in the same millisecond.
    fn drain_delay_ms(&mut self, reconnect_delay_ms: u32) -> u32 {
        let half = reconnect_delay_ms / 2;
        let jitter = self.next_random() % (u64::from(reconnect_delay_ms) + 1);
        half.saturating_add(jitter as u32)
    }

    /// xorshift64: good enough to spread retries, and no dependency.
    fn next_random(&mut self) -> u64 {
        self.jitter_state ^= self.jitter_state << 13;
        self.jitter_state ^= self.jitter_state >> 7;
        self.jitter_state ^= self.jitter_state << 17;
        self.jitter_state
    }

    fn open_conn(
        &mut self,
        socket: OwnedFd,
        transport: TransportKind,
        now: Instant,
    ) -> Option<usize> {
        let transport = match transport {
            TransportKind::Tcp => None,
            kind => {
                let tls = match (kind.uses_tls(), &self.settings.tls) {
                    (false, _) => None,
                    (true, Some(acceptor)) => match acceptor.accept() {
                        Ok(tls) => Some(tls),
                        Err(error) => {
                            tracing::warn!(%error, "cannot start a TLS connection");
                            return None;
                        }
                    },
                    (true, None) => unreachable!("a TLS listener is started with a certificate"),
                };
                Some(Box::new(Transport::new(kind, tls)))
            }
        };
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let server = ServerConn::new(now, unix_ms(), &self.settings.server);
        let deadline = server.poll_timeout();
        let fd = socket.as_raw_fd();
        let slot = self.conns.insert(Conn {
            socket,
            generation,
            server,
            partial: None,
            queue: None,
            transport,
            queued_frames: 0,
            closing: None,
            flush_deadline: None,
            flush_timed_out: false,
            write_shut: false,
            // HELLO may already be there: look before epoll says so.
            readable: true,
            receiving: true,
            sending: false,
            io_failed: false,
            queued: false,
        });
        if let Err(error) = self.driver.add_conn(fd, conn_token(slot, generation)) {
            tracing::warn!(%error, "cannot watch a new connection; closing it");
            self.conns.remove(slot);
            return None;
        }
        self.wheel.insert(
            deadline,
            TimerKey {
                slot: slot as u32,
                generation,
            },
        );
        self.counters().connection_opened();
        enqueue(&mut self.run_queue, &mut self.conns[slot], slot);
        Some(slot)
    }

    fn remove_conn(&mut self, slot: usize, end: ConnEnd) {
        let id = self.conn_id(slot);
        let Conn {
            socket,
            generation,
            server,
            partial,
            queue,
            transport,
            closing,
            receiving,
            ..
        } = self.conns.remove(slot);
        // Counted before the socket goes: a client that sees its connection
        // end, then reads /metrics, finds the close there.
        self.counters().connection_closed(end);
        self.driver
            .remove_conn(socket, conn_token(slot, generation), receiving);
        if let Some(partial) = partial {
            self.read_pool.give(partial);
        }
        self.stalls.remove(&slot);
        self.release_address(slot);
        if let Some(queue) = queue {
            self.write_pool.give(queue);
        }
        if let Some(transport) = transport {
            let Transport {
                tls_pending,
                ws_pending,
                ..
            } = *transport;
            for buffer in [tls_pending, ws_pending].into_iter().flatten() {
                self.read_pool.give(buffer);
            }
        }
        // A connection that began a close was unregistered then.
        if closing.is_none()
            && let Some(event) = closed_event(id, &server, end, &self.settings.auth)
        {
            self.outbox.push_back(event);
        }
        if self.drain.is_some() && self.conns.is_empty() {
            self.outbox.push_back(ShardEvent::Drained {
                shard: self.settings.id,
            });
        }
    }

    fn push_event(&mut self, event: ShardEvent) {
        self.outbox.push_back(event);
    }

    /// Drives every connection that was in the run queue when the turn
    /// began; those that still have work go to the back.
    fn run_connections(&mut self, now: Instant) {
        for _ in 0..self.run_queue.len() {
            let Some(slot) = self.run_queue.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if !conn.queued {
                continue;
            }
            conn.queued = false;
            if let Some(end) = self.drive(slot, now) {
                self.remove_conn(slot, end);
            }
        }
    }

    /// Hands queued output to the driver, moves a close on and (epoll)
    /// reads input, until nothing more can be done now, the turn's rounds
    /// run out (the connection is queued again) or it ends.
    fn drive(&mut self, slot: usize, now: Instant) -> Option<ConnEnd> {
        for _ in 0..CONN_POLL_ROUNDS_MAX {
            let mut progressed = false;

            let conn = &mut self.conns[slot];
            if conn.flush_timed_out {
                // Everything was sent and only the client's EOF is missing:
                // the close went as intended.
                // A slow consumer that never read its GOAWAY is still that.
                return Some(match conn.closing {
                    Some(end) if conn.write_shut => end,
                    Some(end @ ConnEnd::Closed(CloseReason::SlowConsumer)) => end,
                    _ => ConnEnd::FlushTimeout,
                });
            }
            if !conn.sending
                && !conn.io_failed
                && let Some(queue) = conn.queue.take()
            {
                conn.queued_frames = 0;
                self.transmit(slot, SendBuffer::Pooled(queue));
                progressed = !self.conns[slot].sending;
            }
            let conn = &mut self.conns[slot];
            if conn.io_failed {
                return Some(ConnEnd::Io);
            }
            let fd = conn.socket.as_raw_fd();
            if let Some(end) = conn.closing {
                if conn.queue.is_none() && !conn.sending {
                    // Lingering close: shut our side, then read and discard
                    // until the client's EOF. Closing with its bytes still
                    // unread would make the kernel send a reset, and the
                    // client could lose the GOAWAY or ERROR just sent.
                    if !conn.write_shut {
                        conn.write_shut = true;
                        // SAFETY: shutdown(2) on the socket this slot owns.
                        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                        if D::RECEIVES && !conn.receiving {
                            conn.receiving = true;
                            let token = conn_token(slot, conn.generation);
                            if self.driver.rearm_recv(fd, token).is_err() {
                                return Some(end);
                            }
                        }
                    }
                    // io_uring's receive reports the EOF in its own time.
                    if !D::RECEIVES && conn.readable {
                        match recv(fd, &mut self.scratch) {
                            Ok(0) => return Some(end),
                            Ok(_) => progressed = true,
                            Err(error) if would_block(&error) => conn.readable = false,
                            Err(_) => return Some(end),
                        }
                    }
                }
            } else if !D::RECEIVES && conn.readable && self.outbox.len() >= OUTBOX_LEN_MAX {
                self.readers_waiting.push(slot);
            } else if !D::RECEIVES && conn.readable {
                let mut scratch = std::mem::take(&mut self.scratch);
                let read = recv(fd, &mut scratch);
                let conn = &mut self.conns[slot];
                let end = match read {
                    Ok(0) => Some(ConnEnd::PeerClosed),
                    Ok(len) => {
                        // A read that did not fill the buffer took all the
                        // socket held (TCP returns early only once its
                        // queue is empty, or at urgent data, which only
                        // stalls the client that sends it), and epoll
                        // reports the next data: no second read to learn
                        // that it would block.
                        if len < scratch.len() {
                            conn.readable = false;
                        }
                        self.handle_input(slot, &mut scratch[..len], now);
                        progressed = true;
                        None
                    }
                    Err(error) if would_block(&error) => {
                        conn.readable = false;
                        None
                    }
                    Err(_) => Some(ConnEnd::Io),
                };
                self.scratch = scratch;
                if end.is_some() {
                    return end;
                }
            }

            if !progressed {
                return None;
            }
        }
        enqueue(&mut self.run_queue, &mut self.conns[slot], slot);
        None
    }

    /// Sends what the connection logic produced, in four steps: encode its
    /// frames, send them or queue them, forward its events, start its
    /// close.
    fn apply(&mut self, slot: usize, now: Instant) {
        // Counted before the answer goes out, so that a client that saw it
        // finds it in the metric.
        if let Some((network, interval)) = self.out.heartbeat_set.take() {
            self.counters()
                .heartbeat_set(network, interval.as_secs_f64());
        }
        let encoded = self.encoded.take();
        let (sent, ready) = self.encode_output(slot, encoded.as_ref());
        self.send_or_queue(slot, sent, ready);
        self.forward_events(slot);
        if let Some(reason) = self.out.close.take() {
            self.start_close(slot, ConnEnd::Closed(reason), now);
        }
    }

    /// Encodes the connection logic's frames (and a broadcast's shared
    /// one) for the connection's transport, within its queue's limits.
    /// Returns what to hand the driver now, if nothing waits ahead of it;
    /// otherwise they join the connection's queue.
    ///
    /// With nothing waiting, they are encoded into a pooled buffer that
    /// goes back to the pool when the send is done, and a broadcast's frame
    /// alone on plain TCP is sent from the shared bytes: a push to every
    /// connection copies nothing per connection.
    fn encode_output(
        &mut self,
        slot: usize,
        encoded: Option<&Bytes>,
    ) -> (Sent, Option<SendBuffer>) {
        let id = self.conn_id(slot);
        let Shard {
            settings,
            driver,
            conns,
            out,
            tls_plain,
            write_pool,
            ..
        } = self;
        let conn = &mut conns[slot];
        // Frames wait for a TLS handshake or WebSocket upgrade to finish;
        // none are made before one does, but a timeout's GOAWAY.
        let transport_open = conn.transport.as_ref().is_none_or(|t| t.is_open());
        if conn.closing.is_some() || !transport_open {
            out.transmit.clear();
            return (Sent::default(), None);
        }
        if out.transmit.is_empty() && encoded.is_none() && out.close.is_none() {
            return (Sent::default(), None);
        }
        let direct = conn.queue.is_none() && !conn.sending;
        if direct
            && conn.transport.is_none()
            && out.transmit.is_empty()
            && out.close.is_none()
            && let Some(frame) = encoded
            && frame.len() <= settings.send_queue_bytes_max
        {
            let sent = Sent {
                frames: 1,
                pushes: 1,
                overflow: false,
            };
            return (sent, Some(SendBuffer::Shared(frame.clone())));
        }
        let token = conn_token(slot, conn.generation);
        let unsent = if conn.sending {
            driver.unsent_len(token)
        } else {
            0
        };
        let mut fresh: Option<Box<BytesMut>> = None;
        let buffer: &mut BytesMut = if direct {
            fresh.insert(write_pool.take())
        } else {
            conn.queue.get_or_insert_with(|| write_pool.take())
        };
        // What waits counts against the limits only behind a send the
        // socket is not taking (a slow consumer). Going straight to the
        // socket, or behind a send on its way (io_uring completes it in the
        // next system call), a batch of any number of frames is fine, and
        // its bytes alone count.
        let limited = !direct && driver.send_blocked(token);
        let frames_room = if limited {
            settings
                .send_queue_frames_max
                .saturating_sub(usize::from(conn.queued_frames))
        } else {
            usize::MAX
        };
        // On TLS the frames are staged as plaintext, then sealed into
        // `buffer`; on WebSocket each is one binary message.
        let messages = conn.transport.as_ref().is_some_and(|t| t.frames_messages());
        let sealing = conn.transport.as_ref().is_some_and(|t| t.tls.is_some());
        let waiting = if limited {
            unsent + if sealing { buffer.len() } else { 0 }
        } else {
            0
        };
        tls_plain.clear();
        let staged: &mut BytesMut = if sealing {
            &mut *tls_plain
        } else {
            &mut *buffer
        };
        let room = Room {
            waiting,
            staged_before: if limited { 0 } else { staged.len() },
            bytes_max: settings.send_queue_bytes_max,
            frames_max: frames_room,
            messages,
        };
        let mut sent = stage_batch(id, encoded, &mut out.transmit, staged, &room);
        let closing = out.close.filter(|_| !sent.overflow);
        if let Some(transport) = conn.transport.as_deref_mut()
            && seal_for_transport(transport, closing, tls_plain, buffer).is_err()
        {
            sent.overflow = true;
        }
        let added = u16::try_from(sent.frames).unwrap_or(u16::MAX);
        match fresh {
            Some(buffer) if !sent.overflow && !buffer.is_empty() => {
                return (sent, Some(SendBuffer::Pooled(buffer)));
            }
            // What did not fit is dropped (the slow consumer is cut off).
            Some(buffer) => write_pool.give(buffer),
            None => conn.queued_frames = conn.queued_frames.saturating_add(added),
        }
        (sent, None)
    }

    /// Hands a batch encoded with nothing waiting ahead of it to the
    /// driver (one that had to wait joined the queue as it was encoded),
    /// counts it, cuts off a slow consumer whose batch did not fit, and
    /// keeps a connection with output or a close to finish in the run
    /// queue.
    fn send_or_queue(&mut self, slot: usize, sent: Sent, ready: Option<SendBuffer>) {
        if let Some(buffer) = ready {
            self.transmit(slot, buffer);
        }
        let counters = self.counters();
        counters.frames_out(sent.frames);
        counters.pushes_out(sent.pushes);
        if sent.overflow {
            self.cut_off_slow_consumer(slot);
        }
        let conn = &mut self.conns[slot];
        if conn.queue.is_some() || conn.closing.is_some() || conn.io_failed {
            enqueue(&mut self.run_queue, conn, slot);
        }
    }

    /// A slow consumer: what did not fit is dropped, and it is told why
    /// after what it has queued (whole frames only, so the stream stays
    /// readable). It is closed once that is flushed, or at the flush
    /// deadline if it does not read: its queue stays bounded by the limit
    /// plus this one small frame.
    fn cut_off_slow_consumer(&mut self, slot: usize) {
        let Shard {
            conns,
            out,
            tls_plain,
            write_pool,
            ..
        } = self;
        let conn = &mut conns[slot];
        let queue = conn.queue.get_or_insert_with(|| write_pool.take());
        let goaway = Frame::GoAway {
            reason: GoAwayReason::SLOW_CONSUMER,
            reconnect_delay_ms: None,
        };
        match conn.transport.as_deref_mut() {
            None => encode(&goaway, queue).expect("a GOAWAY encodes"),
            Some(transport) => {
                tls_plain.clear();
                let staged: &mut BytesMut = if transport.tls.is_some() {
                    &mut *tls_plain
                } else {
                    queue
                };
                stage_frame(&goaway, transport.frames_messages(), staged)
                    .expect("a GOAWAY encodes");
                let _ = seal_for_transport(
                    transport,
                    Some(CloseReason::SlowConsumer),
                    tls_plain,
                    queue,
                );
            }
        }
        conn.server.close_slow_consumer(out);
    }

    /// Hands the connection logic's events to the control plane, naming
    /// the connection.
    fn forward_events(&mut self, slot: usize) {
        let conn = self.conn_id(slot);
        let counters = self.settings.metrics.shard(usize::from(self.settings.id));
        for event in self.out.events.drain(..) {
            match &event {
                ConnEvent::Ack { .. } => counters.acks_in(1),
                ConnEvent::Unbound { app, .. } => self.settings.auth.released(app),
                _ => {}
            }
            self.outbox.push_back(ShardEvent::Conn { conn, event });
        }
    }

    /// Decodes the bytes just read (after any partial frame held from
    /// before) and runs them through the connection logic.
    fn handle_input(&mut self, slot: usize, input: &mut [u8], now: Instant) {
        let frames = if self.conns[slot].transport.is_some() {
            self.handle_transport_input(slot, input, now)
        } else {
            self.handle_stream_input(slot, input, now)
        };
        self.watch_stall(slot, frames > 0, now);
    }

    /// Plain TCP: the bytes are Herald frames. Returns the frames decoded.
    fn handle_stream_input(&mut self, slot: usize, input: &mut [u8], now: Instant) -> u64 {
        let Shard {
            settings,
            conns,
            out,
            read_pool,
            ..
        } = self;
        let Conn {
            server, partial, ..
        } = &mut conns[slot];
        let frames = decode_stream(server, partial, input, settings, out, read_pool, now);
        self.counters().frames_in(frames);
        self.apply(slot, now);
        frames
    }

    /// After a read: starts the connection's frame deadline when the read
    /// left part of a frame held, moves it when the read finished a frame
    /// and began another, and lets it go when nothing is held.
    fn watch_stall(&mut self, slot: usize, finished_frames: bool, now: Instant) {
        let conn = &self.conns[slot];
        if conn.closing.is_some() {
            return;
        }
        let held = held_input(conn).is_some();
        match self.stalls.get_mut(&slot) {
            Some(stall) if !held => stall.since = None,
            Some(stall) if stall.since.is_none() || finished_frames => stall.since = Some(now),
            Some(_) => {}
            None if held => {
                self.stalls.insert(slot, Stall { since: Some(now) });
                let deadline = self.stall_deadline(slot, now);
                self.stall_wheel.insert(
                    deadline,
                    TimerKey {
                        slot: slot as u32,
                        generation: conn.generation,
                    },
                );
            }
            None => {}
        }
    }

    /// When the frame a connection holds part of must be whole: its
    /// network's base time, plus its length (announced, or held so far
    /// where the layers do not say) at the slowest rate allowed.
    fn stall_deadline(&self, slot: usize, since: Instant) -> Instant {
        let conn = &self.conns[slot];
        let len = held_input(conn).unwrap_or(0);
        since
            + self
                .settings
                .read_deadlines
                .for_frame(conn.server.network(), len)
    }

    /// Fires the frame deadlines: a connection whose frame is still not
    /// whole is cut; one that moved on is looked at again later.
    fn handle_stalls(&mut self, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired);
        self.stall_wheel.advance(now, &mut expired);
        for key in expired.drain(..) {
            let slot = key.slot as usize;
            if self
                .conns
                .get(slot)
                .is_none_or(|conn| conn.generation != key.generation)
            {
                continue;
            }
            let since = match self.stalls.get(&slot) {
                Some(Stall { since: Some(since) }) if self.conns[slot].closing.is_none() => *since,
                _ => {
                    self.stalls.remove(&slot);
                    continue;
                }
            };
            // While the shard itself holds input back (the outbox is full,
            // or the ring has no buffer to receive into), a frame may be
            // whole in the socket: the deadline waits for reading to resume.
            let held_back = self.outbox.len() >= OUTBOX_LEN_MAX
                || !self.held_input.is_empty()
                || !self.recv_rearm.is_empty();
            let deadline = self.stall_deadline(slot, since);
            if now < deadline {
                self.stall_wheel.insert(deadline, key);
            } else if held_back {
                self.stall_wheel.insert(now + TICK, key);
            } else {
                tracing::debug!(slot, "closing a connection whose frame stalled");
                self.remove_conn(slot, ConnEnd::ReadTimeout);
            }
        }
        self.expired = expired;
    }

    /// Runs the bytes just read through the connection's TLS and
    /// WebSocket layers and the Herald frames they carry through the
    /// connection logic, then sends what each layer answers, in order: the
    /// TLS handshake flight, the upgrade response, pongs and echoes, the
    /// connection logic's frames.
    fn handle_transport_input(&mut self, slot: usize, input: &mut [u8], now: Instant) -> u64 {
        let mut transport = self.conns[slot].transport.take().expect("a transport");
        let mut plain = std::mem::take(&mut self.plain_in);
        let mut handshake_out = std::mem::take(&mut self.handshake_out);
        let mut reply = std::mem::take(&mut self.transport_reply);
        let (frames, ended) = self.run_layers(
            slot,
            &mut transport,
            input,
            Layered {
                plain: &mut plain,
                handshake_out: &mut handshake_out,
                reply: &mut reply,
            },
            now,
        );
        self.write_raw(slot, &handshake_out);
        if let Some(LayerEnd::WebSocket(error)) = &ended {
            transport::write_close(error.code, error.reason, &mut reply);
        }
        if !reply.is_empty() {
            match transport.tls.as_mut() {
                Some(tls) if tls.is_established() => {
                    let mut sealed = std::mem::take(&mut self.tls_plain);
                    sealed.clear();
                    if tls.encrypt(&reply, &mut sealed).is_ok() {
                        self.write_raw(slot, &sealed);
                    }
                    self.tls_plain = sealed;
                }
                _ => self.write_raw(slot, &reply),
            }
        }
        self.conns[slot].transport = Some(transport);
        for buffer in [&mut plain, &mut handshake_out, &mut reply] {
            buffer.clear();
        }
        self.plain_in = plain;
        self.handshake_out = handshake_out;
        self.transport_reply = reply;
        match ended {
            None => self.apply(slot, now),
            Some(end) => {
                let end = match end {
                    LayerEnd::Tls => ConnEnd::Transport(TransportEnd::Tls),
                    LayerEnd::Refused => ConnEnd::Transport(TransportEnd::UpgradeRefused),
                    LayerEnd::WebSocket(_) => ConnEnd::Transport(TransportEnd::WebSocket),
                    LayerEnd::PeerClosed => ConnEnd::PeerClosed,
                };
                self.out.clear();
                self.conns[slot].server.abandon();
                self.start_close(slot, end, now);
            }
        }
        frames
    }

    /// The TLS layer, then the WebSocket layer or the Herald byte stream.
    /// Returns the Herald frames decoded, and why the connection must end,
    /// if it must.
    fn run_layers(
        &mut self,
        slot: usize,
        transport: &mut Transport,
        input: &mut [u8],
        layered: Layered<'_>,
        now: Instant,
    ) -> (u64, Option<LayerEnd>) {
        let Layered {
            plain,
            handshake_out,
            reply,
        } = layered;
        let Shard {
            settings,
            conns,
            out,
            read_pool,
            ..
        } = self;
        let Transport {
            tls,
            ws,
            tls_pending,
            ws_pending,
            ..
        } = transport;
        let mut peer_closed = false;
        // What the layers above TLS read: its plaintext, or on plain
        // WebSocket the bytes just read, where they lie.
        let stream: &mut [u8] = match tls {
            Some(tls) => {
                let read = with_pending(tls_pending, input, read_pool, |input| {
                    tls.read(input, handshake_out, &mut |bytes| {
                        plain.extend_from_slice(bytes)
                    })
                    .map(|read| {
                        peer_closed |= read.peer_closed;
                        read.consumed
                    })
                });
                if let Err(error) = read {
                    tracing::debug!(%error, "closing a TLS connection");
                    return (0, Some(LayerEnd::Tls));
                }
                plain
            }
            None => input,
        };
        let Conn {
            server, partial, ..
        } = &mut conns[slot];
        let mut frames = 0;
        let result = match ws {
            None => {
                frames = decode_stream(server, partial, stream, settings, out, read_pool, now);
                Ok(())
            }
            Some(ws) => with_pending(ws_pending, stream, read_pool, |input| {
                let mut consumed = 0;
                if let Ws::Upgrading = ws {
                    match transport::ws_upgrade(input, &settings.websocket.allowed_origins) {
                        Upgrade::Incomplete => return Ok(0),
                        Upgrade::Refuse { response, .. } => {
                            reply.extend_from_slice(&response);
                            return Err(LayerEnd::Refused);
                        }
                        Upgrade::Accept { response, head_len } => {
                            reply.extend_from_slice(&response);
                            *ws = Ws::Open(WsState::default());
                            consumed = head_len;
                        }
                    }
                }
                let Ws::Open(state) = ws else {
                    unreachable!("opened above")
                };
                let echo = settings.websocket.test_echo;
                let read = transport::ws_read(
                    state,
                    &mut input[consumed..],
                    partial,
                    &mut || Box::new(BytesMut::with_capacity(READ_BUFFER_CAPACITY)),
                    reply,
                    &mut |message, reply| {
                        if echo {
                            // In order with the pongs and the close echo,
                            // and before a close for a violation after it.
                            transport::write_message(&message, reply);
                            return Ok(());
                        }
                        frames += 1;
                        handle_message(server, message, settings, out, now)
                    },
                )
                .map_err(LayerEnd::WebSocket)?;
                peer_closed |= read.closed;
                Ok(consumed + read.consumed)
            }),
        };
        self.counters().frames_in(frames);
        if let Err(end) = result {
            return (frames, Some(end));
        }
        (frames, peer_closed.then_some(LayerEnd::PeerClosed))
    }

    /// Hands `bytes` to the driver now if nothing waits ahead of them;
    /// otherwise they join the queue.
    fn write_raw(&mut self, slot: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let conn = &mut self.conns[slot];
        if conn.queue.is_none() && !conn.sending {
            let mut buffer = self.write_pool.take();
            buffer.extend_from_slice(bytes);
            self.transmit(slot, SendBuffer::Pooled(buffer));
        } else {
            conn.queue
                .get_or_insert_with(|| self.write_pool.take())
                .extend_from_slice(bytes);
        }
    }

    /// Begins closing a connection from the gateway's side: it leaves the
    /// register now (from here on it takes no more pushes), and goes once
    /// its output is flushed and the client closed its side, or at the
    /// flush deadline.
    fn start_close(&mut self, slot: usize, end: ConnEnd, now: Instant) {
        let id = self.conn_id(slot);
        let conn = &mut self.conns[slot];
        if conn.closing.is_some() {
            return;
        }
        if let Some(event) = closed_event(id, &conn.server, end, &self.settings.auth) {
            self.outbox.push_back(event);
        }
        if conn.receiving && D::RECEIVES {
            // Like epoll's shard, which reads nothing more until the last
            // frames are out: a client that keeps sending meets TCP's flow
            // control, not a gateway that reads and discards.
            conn.receiving = false;
            self.driver.stop_recv(conn_token(slot, conn.generation));
        }
        let deadline = now + CLOSE_FLUSH_TIMEOUT;
        conn.closing = Some(end);
        conn.flush_deadline = Some(deadline);
        self.wheel.insert(
            deadline,
            TimerKey {
                slot: id.slot,
                generation: id.generation,
            },
        );
        enqueue(&mut self.run_queue, conn, slot);
    }

    fn handle_command(&mut self, command: ShardCommand, now: Instant) {
        match command {
            ShardCommand::Conn { conn, command } => self.handle_conn_command(conn, command, now),
            ShardCommand::Broadcast {
                app,
                seq,
                required_tags,
                frame,
                progress,
                mode,
            } => {
                if self.recent.len() == RECENT_BROADCASTS_MAX {
                    self.recent.pop_front();
                }
                self.recent
                    .push_back(((app.clone(), seq), progress.clone()));
                if mode.rate_per_sec.is_some() {
                    let planned = self
                        .conns
                        .iter()
                        .filter(|(_, conn)| conn.server.is_for_broadcast(&app, &required_tags))
                        .count();
                    progress
                        .planned
                        .fetch_add(planned as u64, Ordering::Relaxed);
                }
                let mut broadcast = Fanout {
                    app,
                    seq,
                    required_tags,
                    frame,
                    progress,
                    next_slot: 0,
                    started: now,
                    mode,
                    sent: 0,
                };
                self.advance(&mut broadcast, now);
                if broadcast.next_slot < self.conns.capacity() {
                    self.paced.push(broadcast);
                }
            }
            ShardCommand::Drain {
                reconnect_delay_ms,
                spread,
            } => self.drain(reconnect_delay_ms, spread, now),
            ShardCommand::SetApps(apps) => self.set_apps(&apps, now),
        }
    }

    /// Checks BINDs against `apps` from now on; ends the bindings of apps
    /// that left (deleted), visiting every connection once per change.
    fn set_apps(&mut self, apps: &[GatewayApp], now: Instant) {
        let deleted = self.settings.auth.replace(apps);
        for app in &deleted {
            self.write_seconds.remove(app);
        }
        if deleted.is_empty() {
            return;
        }
        let slots: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| {
                conn.server
                    .bindings()
                    .any(|(app, _)| deleted.iter().any(|gone| gone == app))
            })
            .map(|(slot, _)| slot)
            .collect();
        for slot in slots {
            for app in &deleted {
                self.conns[slot]
                    .server
                    .unbind_deleted_app(app, &mut self.out);
            }
            self.apply(slot, now);
        }
    }

    /// Runs a command on a live connection's logic and sends what it made;
    /// a command for a connection gone since (an old generation) is dropped.
    fn handle_conn_command(&mut self, conn: ConnId, command: ConnCommand, now: Instant) {
        let Some(slot) = self.live_slot(conn) else {
            return;
        };
        let server = &mut self.conns[slot].server;
        let config = &self.settings.server;
        let out = &mut self.out;
        // Broadcasts a fill sent that their fan-out found this connection
        // not ready for.
        let mut owed_sent = None;
        match command {
            ConnCommand::Deliver {
                app,
                message,
                stored_at,
            } => {
                server.deliver(&app, &message, config, out);
                // The frame is written this turn (or queued behind what the
                // connection has waiting).
                self.write_seconds
                    .entry(app)
                    .or_insert_with_key(|app| self.settings.metrics.write_seconds(app))
                    .observe(now.saturating_duration_since(stored_at).as_secs_f64());
            }
            ConnCommand::Fill {
                app,
                after,
                messages,
                more,
                broadcasts_from,
            } => {
                let fill = InboxFill {
                    after,
                    messages: &messages,
                    more,
                    broadcasts_from,
                };
                server.fill(&app, fill, config, out);
            }
            ConnCommand::BroadcastFill {
                app,
                after,
                broadcasts,
                next,
            } => {
                let owed = server.broadcast_fill(&app, after, &broadcasts, next, out);
                owed_sent = Some((app, owed));
            }
            ConnCommand::Resync { app } => server.resync(&app, config, out),
            ConnCommand::Transient { app, payload } => server.transient(&app, &payload, out),
            ConnCommand::UpstreamAck {
                app,
                request_id,
                status,
            } => server.upstream_ack(&app, request_id, status, out),
            ConnCommand::PullReply { app, seq, answer } => {
                server.pull_reply(&app, seq, answer, out)
            }
            ConnCommand::SessionTimedOut {
                app,
                network,
                interval_ms,
                closed_ago_ms,
            } => server.session_timed_out(&app, network, interval_ms, closed_ago_ms, out),
            ConnCommand::Kick { reason } => server.kick(reason, out),
        }
        self.apply(slot, now);
        if let Some((app, seqs)) = owed_sent {
            self.count_owed_sent(&app, &seqs);
        }
    }

    /// Counts as sent, in their progress, broadcasts that reached a
    /// connection by a fill after their fan-out counted it as a target.
    fn count_owed_sent(&self, app: &AppId, seqs: &[u64]) {
        for seq in seqs {
            let fanned_out = self.recent.iter().find(|((a, s), _)| a == app && s == seq);
            if let Some((_, progress)) = fanned_out {
                progress.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Moves a broadcast's fan-out on: to every connection it is for, or,
    /// when paced, to as many as its rate allows by `now`. Each gets the
    /// frame the control plane encoded once; counts go into its progress.
    fn advance(&mut self, fanout: &mut Fanout, now: Instant) {
        let allowed = fanout.mode.rate_per_sec.map_or(u64::MAX, |per_sec| {
            let elapsed = now.saturating_duration_since(fanout.started).as_secs_f64();
            let due = (elapsed * per_sec) as u64 + 1;
            due.saturating_sub(fanout.sent)
        });
        let (mut target, mut sent, mut dropped) = (0, 0, 0);
        // By index, not by a collected list of slots: a push to a million
        // connections allocates nothing per connection.
        while fanout.next_slot < self.conns.capacity() && sent < allowed {
            let slot = fanout.next_slot;
            fanout.next_slot += 1;
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            match conn
                .server
                .broadcast(&fanout.app, fanout.seq, &fanout.required_tags)
            {
                BroadcastFate::NotFor => {}
                BroadcastFate::Later => target += 1,
                BroadcastFate::Send => {
                    target += 1;
                    let blocked =
                        conn.sending && self.driver.send_blocked(conn_token(slot, conn.generation));
                    if fanout.mode.low_priority && (conn.queue.is_some() || blocked) {
                        // Behind already: a low-priority frame is the first
                        // thing given up, before the client is cut off.
                        dropped += 1;
                        continue;
                    }
                    sent += 1;
                    self.encoded = Some(fanout.frame.clone());
                    self.apply(slot, now);
                }
            }
        }
        fanout.sent += sent;
        fanout.progress.target.fetch_add(target, Ordering::Relaxed);
        fanout.progress.sent.fetch_add(sent, Ordering::Relaxed);
        fanout
            .progress
            .dropped
            .fetch_add(dropped, Ordering::Relaxed);
        if fanout.next_slot >= self.conns.capacity() {
            // The last call for this fan-out: it is dropped now.
            fanout
                .progress
                .shards_finished
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Moves every paced broadcast on; drops the finished ones.
    fn advance_paced(&mut self, now: Instant) {
        let mut paced = std::mem::take(&mut self.paced);
        for fanout in &mut paced {
            self.advance(fanout, now);
        }
        paced.retain(|fanout| fanout.next_slot < self.conns.capacity());
        paced.append(&mut self.paced);
        self.paced = paced;
    }

    /// Stops accepting and closes every connection with GOAWAY, in batches
    /// over `spread` (`advance_drain`). `Drained` is reported when the last
    /// one is gone (at once if there are none).
    fn drain(&mut self, reconnect_delay_ms: u32, spread: Duration, now: Instant) {
        if self.drain.is_some() {
            return;
        }
        for (index, listener) in std::mem::take(&mut self.listeners).into_iter().enumerate() {
            self.driver.remove_listener(listener.socket, index);
        }
        self.drain = Some(DrainProgress {
            reconnect_delay_ms,
            started: now,
            spread,
            total: self.conns.len(),
            told: 0,
            next_slot: 0,
        });
        self.advance_drain(now);
        if self.conns.is_empty() {
            self.push_event(ShardEvent::Drained {
                shard: self.settings.id,
            });
        }
    }

    /// Sends GOAWAY to the connections a drain owes it by `now`.
    fn advance_drain(&mut self, now: Instant) {
        let Some(due) = self.drain.as_ref().map(|drain| drain.due(now)) else {
            return;
        };
        let capacity = self.conns.capacity();
        while let Some(drain) = self.drain.as_mut()
            && drain.told < due
            && drain.next_slot < capacity
        {
            let slot = drain.next_slot;
            drain.next_slot += 1;
            if !self.conns.contains(slot) {
                continue;
            }
            drain.told += 1;
            let reconnect_delay_ms = drain.reconnect_delay_ms;
            let delay_ms = self.drain_delay_ms(reconnect_delay_ms);
            self.conns[slot].server.drain(delay_ms, &mut self.out);
            self.apply(slot, now);
        }
    }

    /// Fires the wheel: deadlines that moved are put back, closing
    /// connections past their flush deadline are cut, the rest time out.
    pub(crate) fn handle_tick(&mut self, now: Instant) {
        if !self.paced.is_empty() {
            self.advance_paced(now);
        }
        self.advance_drain(now);
        if let Some(limits) = &self.settings.per_ip {
            limits.sweep(now);
        }
        self.handle_stalls(now);
        shrink_sparse(&mut self.stalls);
        shrink_sparse(&mut self.counted);
        if now >= self.pools_shed_at {
            self.read_pool.shed_unused();
            self.write_pool.shed_unused();
            self.pools_shed_at = now + POOL_SHED_INTERVAL;
        }
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
                    enqueue(&mut self.run_queue, conn, slot);
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

/// What `encode_output` staged.
#[derive(Debug, Default)]
struct Sent {
    frames: u64,
    pushes: u64,
    /// Not all fit the connection's queue limits: a slow consumer.
    overflow: bool,
}

/// What a batch of frames may add to a connection's output: the bytes and
/// frames its queue limits leave.
struct Room {
    /// Bytes counted against the limit before the batch: what waits behind
    /// a send the socket is not taking.
    waiting: usize,
    /// Bytes staged before the batch that do not count (they go straight
    /// to the socket, or behind a send on its way).
    staged_before: usize,
    bytes_max: usize,
    /// Frames the batch may hold.
    frames_max: usize,
    /// WebSocket: each frame goes as a message, behind a header.
    messages: bool,
}

impl Room {
    /// Whether a frame of `len` bytes fits after `frames` of the batch.
    fn fits(&self, staged: &BytesMut, len: usize, frames: u64) -> bool {
        let framing = if self.messages {
            transport::ws_header_len(len)
        } else {
            0
        };
        self.waiting + (staged.len() - self.staged_before) + framing + len <= self.bytes_max
            && (frames as usize) < self.frames_max
    }
}

/// Stages a broadcast's shared frame, then the connection logic's
/// `frames`, into `staged` while they fit `room`. The first that does not
/// fit, and every frame after it, is dropped, and the batch overflows.
fn stage_batch(
    id: ConnId,
    shared: Option<&Bytes>,
    frames: &mut Vec<Frame>,
    staged: &mut BytesMut,
    room: &Room,
) -> Sent {
    let mut sent = Sent::default();
    if let Some(frame) = shared {
        if room.fits(staged, frame.len(), 0) {
            if room.messages {
                transport::write_binary_header(frame.len(), staged);
            }
            staged.extend_from_slice(frame);
            sent.frames += 1;
            sent.pushes += 1;
        } else {
            sent.overflow = true;
        }
    }
    // Draining drops whatever a break leaves behind.
    for frame in frames.drain(..) {
        if sent.overflow {
            break;
        }
        if !room.fits(staged, encoded_len(&frame), sent.frames) {
            sent.overflow = true;
            break;
        }
        if let Err(error) = stage_frame(&frame, room.messages, staged) {
            // The connection logic only builds frames from checked
            // input, so this is a bug: close this one connection.
            debug_assert!(false, "unencodable frame {frame:?}: {error}");
            tracing::error!(conn.id = %id, %error, "unencodable frame");
            sent.overflow = true;
            break;
        }
        sent.frames += 1;
        if matches!(frame, Frame::Push { .. }) {
            sent.pushes += 1;
        }
    }
    sent
}

/// Encodes one frame into `staged`, as one WebSocket message when
/// `messages`.
fn stage_frame(
    frame: &Frame,
    messages: bool,
    staged: &mut BytesMut,
) -> Result<(), herald_proto::EncodeError> {
    if messages {
        transport::write_binary_header(encoded_len(frame), staged);
    }
    encode(frame, staged)
}

/// Finishes a batch for the connection's transport: a WebSocket close
/// frame when the connection closes after it, then, on TLS, the staged
/// plaintext sealed into `out` (and close_notify when closing).
fn seal_for_transport(
    transport: &mut Transport,
    closing: Option<CloseReason>,
    tls_plain: &mut BytesMut,
    out: &mut BytesMut,
) -> Result<(), ()> {
    let staged: &mut BytesMut = if transport.tls.is_some() {
        &mut *tls_plain
    } else {
        &mut *out
    };
    if let (Some(reason), true) = (closing, transport.frames_messages()) {
        transport::write_close(ws_close_code(reason), reason.as_str(), staged);
    }
    if let Some(tls) = transport.tls.as_mut() {
        tls.encrypt(tls_plain, out).map_err(|_| ())?;
        if closing.is_some() {
            tls.close_notify(out);
        }
    }
    Ok(())
}

/// The buffers a transport's layers fill on one read.
struct Layered<'a> {
    plain: &'a mut BytesMut,
    handshake_out: &'a mut BytesMut,
    reply: &'a mut BytesMut,
}

/// Why a transport's layers end a connection.
enum LayerEnd {
    Tls,
    Refused,
    WebSocket(WsError),
    PeerClosed,
}

/// The WebSocket close code that follows a close for `reason`.
fn ws_close_code(reason: CloseReason) -> CloseCode {
    match reason {
        CloseReason::ProtocolError(_) => CloseCode::PROTOCOL_ERROR,
        CloseReason::Drained | CloseReason::Overloaded => CloseCode::GOING_AWAY,
        _ => CloseCode::NORMAL,
    }
}

/// One WebSocket message: exactly one Herald frame.
fn handle_message(
    server: &mut ServerConn,
    message: Message<'_>,
    settings: &ShardSettings,
    out: &mut Output,
    now: Instant,
) -> Result<(), WsError> {
    if message.text {
        return Err(WsError {
            code: CloseCode::UNSUPPORTED_DATA,
            reason: "Herald messages are binary",
        });
    }
    if server.is_closing() {
        return Ok(());
    }
    match decode_slice(message.payload) {
        Ok(Some((frame, used))) if used == message.payload.len() => {
            server.handle_frame(now, frame, &settings.server, &settings.auth, out);
        }
        Ok(_) => server.handle_decode_error(
            herald_proto::ErrorCode::MALFORMED_FRAME,
            "a WebSocket message must hold exactly one whole frame".to_owned(),
            out,
        ),
        Err(error) => server.handle_decode_error(error.error_code(), error.to_string(), out),
    }
    Ok(())
}

/// Decodes Herald frames from a byte stream (after any partial frame held
/// from before) into the connection logic; keeps the tail of an incomplete
/// frame. Returns the frames decoded.
fn decode_stream(
    server: &mut ServerConn,
    partial: &mut Option<Box<BytesMut>>,
    bytes: &[u8],
    settings: &ShardSettings,
    out: &mut Output,
    read_pool: &mut BufferPool,
    now: Instant,
) -> u64 {
    if let Some(partial) = partial.as_mut() {
        partial.extend_from_slice(bytes);
    }
    let input: &[u8] = match partial {
        Some(partial) => partial,
        None => bytes,
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
            buffer.extend_from_slice(&bytes[consumed..]);
            *partial = Some(buffer);
        }
        None => {}
    }
    frames
}

/// Runs `process` over `fresh`, after what an earlier read left `pending`,
/// and keeps what it did not consume (an incomplete unit: a record, a
/// frame, a request head) in a pooled buffer until the next read.
fn with_pending<E>(
    pending: &mut Option<Box<BytesMut>>,
    fresh: &mut [u8],
    pool: &mut BufferPool,
    process: impl FnOnce(&mut [u8]) -> Result<usize, E>,
) -> Result<(), E> {
    match pending {
        Some(buffer) => {
            buffer.extend_from_slice(fresh);
            let consumed = process(&mut buffer[..])?;
            buffer.advance(consumed);
            if buffer.is_empty() {
                pool.give(pending.take().expect("pending is some"));
            }
        }
        None => {
            let consumed = process(fresh)?;
            if consumed < fresh.len() {
                let mut buffer = pool.take();
                buffer.extend_from_slice(&fresh[consumed..]);
                *pending = Some(buffer);
            }
        }
    }
    Ok(())
}

/// Gives back most of a map's room once it is less than a quarter full.
fn shrink_sparse<V>(map: &mut HashMap<usize, V>) {
    if map.capacity() > SIDE_MAP_KEPT_CAPACITY && map.len() * 4 < map.capacity() {
        map.shrink_to((map.len() * 2).max(SIDE_MAP_KEPT_CAPACITY));
    }
}

/// How much input a connection holds short of a whole unit (a Herald
/// frame, or on TLS and WebSocket also a record, a frame or the upgrade
/// request), as the length that unit will have where the Herald frame's
/// prefix says it and the bytes held otherwise; `None` if nothing is held.
fn held_input(conn: &Conn) -> Option<usize> {
    let partial = conn.partial.as_deref();
    let mut held = partial.map(|partial| {
        match (conn.transport.is_none(), partial.first_chunk::<4>()) {
            // Plain TCP: `partial` begins with a frame's length prefix.
            (true, Some(prefix)) => (4 + u32::from_be_bytes(*prefix) as usize).max(partial.len()),
            _ => partial.len(),
        }
    });
    if let Some(transport) = &conn.transport {
        for pending in [&transport.tls_pending, &transport.ws_pending]
            .into_iter()
            .flatten()
        {
            held = Some(held.unwrap_or(0) + pending.len());
        }
    }
    held
}

/// The event that unregisters a connection's bindings, if it has any;
/// their apps count them no more. A heartbeat timeout is reported with
/// them, for the device's next binds.
fn closed_event(
    conn: ConnId,
    server: &ServerConn,
    end: ConnEnd,
    auth: &AppSecrets,
) -> Option<ShardEvent> {
    let bindings: Vec<(AppId, UserId)> = server
        .bindings()
        .map(|(app, user)| {
            auth.released(app);
            (app.clone(), UserId::from(user))
        })
        .collect();
    let timed_out =
        (end == ConnEnd::Closed(CloseReason::HeartbeatTimeout)).then(|| server.timed_out());
    (!bindings.is_empty()).then_some(ShardEvent::Conn {
        conn,
        event: ConnEvent::Closed {
            bindings,
            timed_out,
        },
    })
}

fn set_nodelay(socket: &OwnedFd) {
    let one: libc::c_int = 1;
    // Small frames both ways: don't hold them back for coalescing.
    // SAFETY: setsockopt(2) reads one c_int we own.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;
