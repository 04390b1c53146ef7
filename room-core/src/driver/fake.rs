//! A driver for tests: no kernel, the test plays it.
//!
//! The test scripts what the kernel would report: connections arriving,
//! input in the chunks it chooses, a peer's end, a failed socket, or any
//! [`Event`] as it is (a completion for a connection gone since). It also
//! sets how much of what is sent each connection's socket takes (its
//! room), so a short send or a client that stops reading is made on
//! purpose, and it may fail a connection's next send. What each socket took
//! is kept per connection, after its removal too, for the test to decode.
//! Nothing here touches the network or reads the clock.
//!
//! It plays either kind of driver:
//!
//! - `FakeDriver<true>` completes like io_uring: input comes in receive
//!   buffers this driver lends and the shard gives back; a receive stopped
//!   by the shard (or by the end of its input) delivers nothing until
//!   armed again, and the input waits, in order, as it would in the
//!   socket; a send is held until the next `wait`, which takes what the
//!   socket has room for, and one still held after a wait is blocked.
//! - `FakeDriver<false>` reports readiness like epoll. The shard reads
//!   with recv(2) itself, so each connection's socket is one end of a Unix
//!   socket pair and the fake writes the scripted input into the other;
//!   a send writes what the socket has room for at once and is held only
//!   if the rest would block.
//!
//! In both, connections arrive as [`Event::Accepted`] (an epoll shard takes
//! that event like io_uring's; its own accept loop finds its listener, an
//! unconnected Unix socket, empty), with sockets the fake made: an eventfd
//! for io_uring's shard, which never reads or writes it itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::time::Duration;

use super::{Driver, Event, Input, RecvBuffer, SendBuffer, TOKEN_BITS_MAX, send_now};

/// Receive buffers the fake lends at once unless told otherwise: more than
/// any test holds, so the ring runs dry only when a test makes it.
const RECV_BUFFERS_DEFAULT: usize = 64;

/// What the kernel reports at a coming `wait`, in the order scripted.
#[derive(Debug)]
enum Kernel {
    Connect {
        listener: usize,
        socket: OwnedFd,
        peer: Option<IpAddr>,
    },
    Bytes {
        token: u64,
        bytes: Vec<u8>,
    },
    End {
        token: u64,
    },
    Failed {
        token: u64,
    },
    Event(Event),
}

impl Kernel {
    /// The connection whose input this is.
    fn input_of(&self) -> Option<u64> {
        match self {
            Kernel::Bytes { token, .. } | Kernel::End { token } | Kernel::Failed { token } => {
                Some(*token)
            }
            Kernel::Connect { .. } | Kernel::Event(_) => None,
        }
    }
}

/// A send the driver holds.
#[derive(Debug)]
struct Held {
    buffer: SendBuffer,
    /// The `waits` count when it was handed over.
    submitted_at: u64,
}

/// A connection the shard added and has not removed.
#[derive(Debug)]
struct FakeConn {
    fd: RawFd,
    /// epoll: the client's end of the socket pair, written with its input.
    peer: Option<OwnedFd>,
    /// io_uring: a receive is armed.
    receiving: bool,
    /// Bytes the socket takes from now on; `None`: all it is given.
    room: Option<usize>,
    /// The next send, or the held one, fails with this errno.
    send_error: Option<i32>,
    held: Option<Held>,
}

pub(crate) struct FakeDriver<const RECEIVES: bool> {
    script: VecDeque<Kernel>,
    /// By token, so that completions come in an order that does not
    /// change from run to run.
    conns: BTreeMap<u64, FakeConn>,
    /// epoll: the client ends of connections not yet added, by the raw
    /// descriptor of the shard's end.
    peers: HashMap<RawFd, OwnedFd>,
    /// What each connection's socket took, by token.
    wire: HashMap<u64, Vec<u8>>,
    /// Tokens of the connections the shard removed, in order.
    removed: Vec<u64>,
    /// io_uring: sends of removed connections; they complete, cancelled,
    /// at the next wait.
    cancelled: Vec<(u64, SendBuffer)>,
    /// io_uring: receive buffers lent to the shard, by id.
    lent: HashMap<u16, Box<[u8]>>,
    lent_max: usize,
    next_buffer_id: u16,
    wake: Option<RawFd>,
    /// Listeners the shard has this driver accept on.
    accepting: Vec<usize>,
    removed_listeners: Vec<usize>,
    waits: u64,
    last_timeout: Option<Duration>,
    last_events: usize,
}

impl<const RECEIVES: bool> FakeDriver<RECEIVES> {
    pub fn new() -> FakeDriver<RECEIVES> {
        FakeDriver {
            script: VecDeque::new(),
            conns: BTreeMap::new(),
            peers: HashMap::new(),
            wire: HashMap::new(),
            removed: Vec::new(),
            cancelled: Vec::new(),
            lent: HashMap::new(),
            lent_max: RECV_BUFFERS_DEFAULT,
            next_buffer_id: 0,
            wake: None,
            accepting: Vec::new(),
            removed_listeners: Vec::new(),
            waits: 0,
            last_timeout: None,
            last_events: 0,
        }
    }

    /// A socket to pass the shard as a listener: a listening Unix socket
    /// bound to an address nobody knows, so epoll's accept loop finds
    /// nothing there (io_uring's shard never touches it).
    pub fn listener() -> std::net::TcpListener {
        // SAFETY: socket(2), bind(2) and listen(2) on a descriptor made
        // here; bind reads only the family field, which asks the kernel
        // for an unused abstract address.
        unsafe {
            let fd = libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let socket = OwnedFd::from_raw_fd(fd);
            let mut address: libc::sockaddr_un = std::mem::zeroed();
            address.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let family_len = size_of::<libc::sa_family_t>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, (&raw const address).cast(), family_len), 0);
            assert_eq!(libc::listen(fd, 1), 0);
            // The shard keeps only the descriptor.
            std::net::TcpListener::from(socket)
        }
    }

    /// A client connects on `listener`: the shard accepts at the next
    /// wait. Returns the raw descriptor of the shard's socket, which
    /// [`token_of`](Self::token_of) finds once the shard added it.
    pub fn connect(&mut self, listener: usize) -> RawFd {
        self.connect_from(listener, None)
    }

    /// A client at `peer` connects on `listener`, as [`connect`](Self::connect).
    pub fn connect_from(&mut self, listener: usize, peer: Option<IpAddr>) -> RawFd {
        let socket = if RECEIVES {
            // SAFETY: eventfd(2) takes no pointers; a negative result is an
            // error.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
            // SAFETY: a new descriptor nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        } else {
            let (shard_end, client_end) = UnixStream::pair().expect("a Unix socket pair");
            shard_end.set_nonblocking(true).unwrap();
            client_end.set_nonblocking(true).unwrap();
            let shard_end = OwnedFd::from(shard_end);
            // A connection the shard refuses never gets here, and its
            // descriptor number may come back: the newest entry wins.
            self.peers
                .insert(shard_end.as_raw_fd(), OwnedFd::from(client_end));
            shard_end
        };
        let fd = socket.as_raw_fd();
        self.script.push_back(Kernel::Connect {
            listener,
            socket,
            peer,
        });
        fd
    }

    /// The token of the live connection whose socket is `fd`.
    pub fn token_of(&self, fd: RawFd) -> Option<u64> {
        self.conns
            .iter()
            .find_map(|(&token, conn)| (conn.fd == fd).then_some(token))
    }

    /// The client sends `bytes`: one receive's worth.
    pub fn input(&mut self, token: u64, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "a receive with no bytes is an end");
        self.script.push_back(Kernel::Bytes {
            token,
            bytes: bytes.to_vec(),
        });
    }

    /// The client closes its side.
    pub fn end(&mut self, token: u64) {
        self.script.push_back(Kernel::End { token });
    }

    /// The connection fails (a reset).
    pub fn fail(&mut self, token: u64) {
        self.script.push_back(Kernel::Failed { token });
    }

    /// Reports `event` at the next wait, as it is.
    pub fn event(&mut self, event: Event) {
        self.script.push_back(Kernel::Event(event));
    }

    /// A receive buffer holding `bytes`, lent like one the kernel filled,
    /// for an event the test makes itself.
    pub fn recv_buffer(&mut self, bytes: &[u8]) -> RecvBuffer {
        assert!(RECEIVES, "the epoll shard reads into its own buffer");
        let mut memory: Box<[u8]> = bytes.into();
        let id = loop {
            let id = self.next_buffer_id;
            self.next_buffer_id = self.next_buffer_id.wrapping_add(1);
            if !self.lent.contains_key(&id) {
                break id;
            }
        };
        let start = NonNull::new(memory.as_mut_ptr()).expect("a box is never null");
        // The box's memory does not move when the box does.
        self.lent.insert(id, memory);
        RecvBuffer {
            start,
            len: bytes.len(),
            id,
        }
    }

    /// From now on the connection's socket takes `room` more bytes of what
    /// is sent (`None`: everything).
    pub fn set_room(&mut self, token: u64, room: Option<usize>) {
        self.conns.get_mut(&token).expect("a live connection").room = room;
    }

    /// The connection's next send (or the one held) fails with `errno`.
    pub fn fail_send(&mut self, token: u64, errno: i32) {
        self.conns
            .get_mut(&token)
            .expect("a live connection")
            .send_error = Some(errno);
    }

    /// At most `max` receive buffers lent at once; past that a receive
    /// ends with no buffer, as when the ring runs dry.
    pub fn set_recv_buffers(&mut self, max: usize) {
        self.lent_max = max;
    }

    /// Everything the connection's socket took, in order.
    pub fn wire(&self, token: u64) -> &[u8] {
        self.wire.get(&token).map_or(&[], Vec::as_slice)
    }

    /// The shard removed the connection.
    pub fn is_removed(&self, token: u64) -> bool {
        self.removed.contains(&token)
    }

    pub fn is_live(&self, token: u64) -> bool {
        self.conns.contains_key(&token)
    }

    /// io_uring: the connection has a receive armed.
    pub fn is_receiving(&self, token: u64) -> bool {
        self.conns.get(&token).is_some_and(|conn| conn.receiving)
    }

    /// Bytes of the connection's held send the socket has not taken.
    pub fn held_len(&self, token: u64) -> usize {
        self.unsent_len(token)
    }

    /// Receive buffers the shard has not given back.
    pub fn recv_buffers_lent(&self) -> usize {
        self.lent.len()
    }

    pub fn is_accepting(&self, listener: usize) -> bool {
        self.accepting.contains(&listener)
    }

    pub fn listener_removed(&self, listener: usize) -> bool {
        self.removed_listeners.contains(&listener)
    }

    /// The timeout of the last wait: zero while the shard has work.
    pub fn last_timeout(&self) -> Option<Duration> {
        self.last_timeout
    }

    /// Events the last wait reported.
    pub fn last_events(&self) -> usize {
        self.last_events
    }

    /// Puts up to the socket's room of `buffer` on the wire.
    fn take(wire: &mut Vec<u8>, room: &mut Option<usize>, buffer: &mut SendBuffer) {
        let len = buffer.bytes().len();
        let len = room.map_or(len, |room| room.min(len));
        wire.extend_from_slice(&buffer.bytes()[..len]);
        buffer.advance(len);
        if let Some(room) = room {
            *room -= len;
        }
    }

    /// Held sends move on as far as their sockets take them; the finished
    /// and the failed complete.
    fn complete_sends(&mut self, events: &mut Vec<Event>) {
        for (&token, conn) in &mut self.conns {
            let Some(held) = conn.held.as_mut() else {
                continue;
            };
            let result = match conn.send_error.take() {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => {
                    let wire = self.wire.entry(token).or_default();
                    Self::take(wire, &mut conn.room, &mut held.buffer);
                    if !held.buffer.bytes().is_empty() {
                        continue;
                    }
                    Ok(())
                }
            };
            let held = conn.held.take().expect("held above");
            events.push(Event::Sent {
                token,
                buffer: held.buffer,
                result,
            });
        }
        for (token, buffer) in self.cancelled.drain(..) {
            events.push(Event::Sent {
                token,
                buffer,
                result: Err(io::Error::from_raw_os_error(libc::ECANCELED)),
            });
        }
    }

    /// Reports what the script holds for this wait. Input for a connection
    /// whose receive is stopped (io_uring) waits, with everything after it
    /// for that connection; input for a removed one is dropped, as its
    /// cancelled receive would be.
    fn deliver_script(&mut self, events: &mut Vec<Event>) {
        let mut waiting = VecDeque::new();
        while let Some(entry) = self.script.pop_front() {
            let Some(token) = entry.input_of() else {
                events.push(match entry {
                    Kernel::Connect {
                        listener,
                        socket,
                        peer,
                    } => Event::Accepted {
                        listener,
                        socket,
                        peer,
                    },
                    Kernel::Event(event) => event,
                    _ => unreachable!("input is handled below"),
                });
                continue;
            };
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            if !RECEIVES {
                let peer = conn.peer.as_ref().expect("an epoll connection has a peer");
                match entry {
                    Kernel::Bytes { bytes, .. } => {
                        let written = send_now(peer.as_raw_fd(), &bytes).expect("room in a pair");
                        assert_eq!(written, bytes.len(), "a Unix socket takes a test's chunk");
                    }
                    // SAFETY: shutdown(2) on a socket the fake owns.
                    Kernel::End { .. } => unsafe {
                        libc::shutdown(peer.as_raw_fd(), libc::SHUT_WR);
                    },
                    Kernel::Failed { .. } => {
                        // A Unix socket closed with input unread resets its
                        // peer: the shard's next read fails.
                        send_now(conn.fd, b"x").expect("room in a pair");
                        conn.peer = None;
                    }
                    _ => unreachable!("input only"),
                }
                events.push(Event::Readable { token });
                continue;
            }
            let behind = waiting
                .iter()
                .any(|earlier: &Kernel| earlier.input_of() == Some(token));
            if !conn.receiving || behind {
                waiting.push_back(entry);
                continue;
            }
            let dry = self.lent.len() >= self.lent_max;
            if matches!(entry, Kernel::Bytes { .. }) && dry {
                // The ring ran dry: the receive ends, the bytes stay in
                // the socket.
                conn.receiving = false;
                events.push(Event::Received {
                    token,
                    input: Input::NoBuffer,
                    rearm: true,
                });
                waiting.push_back(entry);
                continue;
            }
            // The kernel ends a multishot receive at the end of its input.
            let ends = !matches!(entry, Kernel::Bytes { .. });
            if ends {
                conn.receiving = false;
            }
            let input = match entry {
                Kernel::Bytes { bytes, .. } => Input::Bytes(self.recv_buffer(&bytes)),
                Kernel::End { .. } => Input::End,
                Kernel::Failed { .. } => Input::Failed,
                _ => unreachable!("input only"),
            };
            events.push(Event::Received {
                token,
                input,
                rearm: ends,
            });
        }
        self.script = waiting;
    }
}

/// Whether the wake eventfd is signalled, without clearing it (the shard
/// does, on [`Event::Wake`]).
fn signalled(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) of one pollfd we own, without waiting.
    unsafe { libc::poll(&raw mut poll, 1, 0) == 1 }
}

impl<const RECEIVES: bool> Driver for FakeDriver<RECEIVES> {
    const RECEIVES: bool = RECEIVES;

    fn add_wake(&mut self, fd: RawFd) -> io::Result<()> {
        self.wake = Some(fd);
        Ok(())
    }

    fn accept(&mut self, _fd: RawFd, listener: usize) -> io::Result<()> {
        if !self.accepting.contains(&listener) {
            self.accepting.push(listener);
        }
        Ok(())
    }

    fn remove_listener(&mut self, socket: OwnedFd, listener: usize) {
        self.accepting.retain(|&l| l != listener);
        self.removed_listeners.push(listener);
        drop(socket);
    }

    fn add_conn(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        assert_eq!(token >> TOKEN_BITS_MAX, 0);
        let conn = FakeConn {
            fd,
            peer: self.peers.remove(&fd),
            receiving: RECEIVES,
            room: None,
            send_error: None,
            held: None,
        };
        let previous = self.conns.insert(token, conn);
        assert!(previous.is_none(), "token {token:#x} added twice");
        Ok(())
    }

    fn rearm_recv(&mut self, _fd: RawFd, token: u64) -> io::Result<()> {
        if RECEIVES {
            let conn = self.conns.get_mut(&token).expect("a live connection");
            assert!(!conn.receiving, "a second receive armed");
            conn.receiving = true;
        }
        Ok(())
    }

    fn stop_recv(&mut self, token: u64) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.receiving = false;
        }
    }

    fn has_recv_buffers(&self) -> bool {
        !RECEIVES || self.lent.len() < self.lent_max
    }

    fn give_back(&mut self, buffer: RecvBuffer) {
        assert!(
            self.lent.remove(&buffer.id).is_some(),
            "buffer {} given back but not lent",
            buffer.id
        );
    }

    fn send(
        &mut self,
        _fd: RawFd,
        token: u64,
        mut buffer: SendBuffer,
    ) -> Option<(SendBuffer, io::Result<()>)> {
        let conn = self
            .conns
            .get_mut(&token)
            .expect("a send on a live connection");
        assert!(conn.held.is_none(), "one send per connection at a time");
        if buffer.bytes().is_empty() {
            return Some((buffer, Ok(())));
        }
        let submitted_at = self.waits;
        if !RECEIVES {
            if let Some(errno) = conn.send_error.take() {
                return Some((buffer, Err(io::Error::from_raw_os_error(errno))));
            }
            Self::take(
                self.wire.entry(token).or_default(),
                &mut conn.room,
                &mut buffer,
            );
            if buffer.bytes().is_empty() {
                return Some((buffer, Ok(())));
            }
        }
        conn.held = Some(Held {
            buffer,
            submitted_at,
        });
        None
    }

    fn unsent_len(&self, token: u64) -> usize {
        self.conns
            .get(&token)
            .and_then(|conn| conn.held.as_ref())
            .map_or(0, |held| held.buffer.bytes().len())
    }

    fn send_blocked(&self, token: u64) -> bool {
        let held = self.conns.get(&token).and_then(|conn| conn.held.as_ref());
        if RECEIVES {
            // As io_uring: handed over before the last wait and not done.
            held.is_some_and(|held| held.submitted_at < self.waits)
        } else {
            held.is_some()
        }
    }

    fn remove_conn(&mut self, socket: OwnedFd, token: u64, _receiving: bool) {
        let conn = self.conns.remove(&token).expect("a live connection");
        assert_eq!(conn.fd, socket.as_raw_fd());
        if RECEIVES && let Some(held) = conn.held {
            self.cancelled.push((token, held.buffer));
        }
        self.removed.push(token);
    }

    fn wait(&mut self, timeout: Duration, events: &mut Vec<Event>) -> io::Result<()> {
        let before = events.len();
        self.last_timeout = Some(timeout);
        self.waits += 1;
        if self.wake.is_some_and(signalled) {
            events.push(Event::Wake);
        }
        self.complete_sends(events);
        self.deliver_script(events);
        self.last_events = events.len() - before;
        Ok(())
    }
}
