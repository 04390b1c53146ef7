//! A load-generator process: holds its share of the client connections.
//!
//! The coordinator starts one worker per ~15,000 connections (a process may
//! hold at most 20,000 files here) and talks to it with JSON lines: the
//! worker's spec as its argument, commands on stdin (`drop F`, `report`),
//! progress and the final report on stdout. Each worker is one thread with
//! a tokio current-thread runtime: shared-nothing, one process per core's
//! worth of load, and epoll rather than io_uring so that the generator runs
//! on hosts where io_uring is blocked and never competes with the gateway
//! for the same kind of kernel resource.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer as _, V2Serializer};
use herald_proto::{
    Features, Frame, GoAwayReason, NetworkType, TokenClaims, decode, encode, sign_token,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::conn::Conn;
use crate::transport::Transport;

/// How long a connect or a handshake may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a failed client waits before it tries again.
const RETRY_DELAY: Duration = Duration::from_secs(1);
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// What the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Herald's protocol: HELLO, BIND, PING, ACK.
    Herald,
    /// A plain TCP connection that sends nothing: the kernel's own cost.
    Bare,
    /// MQTT 3.1.1: CONNECT, PINGREQ.
    Mqtt,
    /// NATS: CONNECT, PING/PONG.
    Nats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub target: Target,
    /// User `u` connects to `servers[u % servers.len()]`.
    pub servers: Vec<SocketAddr>,
    pub first_user: u64,
    pub connections: u64,
    /// Source addresses, used in turn.
    pub sources: Vec<Ipv4Addr>,
    /// New connections per second; 0 is as fast as they go.
    pub rate_per_sec: u64,
    pub heartbeat_secs: u64,
    pub app: String,
    pub token_secret: String,
    /// MQTT topic or NATS subject to subscribe to after connecting (the
    /// broadcast scenario); idle peers subscribe to nothing.
    #[serde(default)]
    pub subscribe: Option<String>,
    /// Herald clients ack each broadcast.
    pub ack_broadcasts: bool,
    /// What the clients speak under their protocol: tcp, tls (NATS: TLS
    /// after the server's INFO), ws or wss (Herald only).
    #[serde(default = "tcp")]
    pub transport: Transport,
    /// The CA certificate (PEM) the clients trust, for tls and wss.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Clients connecting and handshaking at once, at most (none: all of
    /// them). A storm's reconnects are not held back.
    #[serde(default)]
    pub handshakes_in_flight: Option<usize>,
    /// Herald clients told to leave by a drain (GOAWAY(server_shutdown))
    /// wait out its reconnect hint and come back here, as the SDK goes to
    /// the next gateway the dispatcher names; none: a GOAWAY is a failure.
    #[serde(default)]
    pub drain_to: Option<SocketAddr>,
    /// Herald clients keep every push and broadcast seq they receive (for
    /// the report's `deliveries`) and resume from the last one on each
    /// reconnect, as the SDK resumes from its last ack (`soak`).
    #[serde(default)]
    pub track_deliveries: bool,
}

fn tcp() -> Transport {
    Transport::Tcp
}

/// The user id of user number `u`, as clients bind and the API addresses it.
pub fn user_id(u: u64) -> String {
    format!("u{u}")
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Connections bound (or connected, for the peers) now.
    pub connected: u64,
    /// Sessions that ever completed their handshake.
    pub sessions: u64,
    pub failures: BTreeMap<String, u64>,
    pub pushes_received: u64,
    /// Unix ms when the worker started connecting, and when all of its
    /// connections were first up at once.
    pub started_at_ms: u64,
    pub all_up_at_ms: Option<u64>,
    /// Unix ms when the last storm's dropped connections were all back.
    pub storm_back_at_ms: Option<u64>,
    /// Clients back (bound on `drain_to`) after a drain sent them away,
    /// by the unix 100 ms slot they were back in.
    #[serde(default)]
    pub drain_returns: BTreeMap<u64, u64>,
}

/// The length of a `Progress::drain_returns` slot.
pub const DRAIN_RETURN_SLOT_MS: u64 = 100;

/// The seqs one user's client received, in order of receipt, duplicates
/// included.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Delivered {
    pub pushes: Vec<u64>,
    pub broadcasts: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum WorkerMessage {
    Progress(Progress),
    /// Receipt latency histogram (microseconds), hdrhistogram V2, base64;
    /// with `track_deliveries`, what each user received.
    Report {
        progress: Progress,
        latency_us_v2: String,
        #[serde(default)]
        deliveries: BTreeMap<u64, Delivered>,
    },
}

struct State {
    spec: WorkerSpec,
    /// The clients' TLS configuration, for tls and wss.
    tls: Option<TlsConnector>,
    progress: RefCell<Progress>,
    latency_us: RefCell<Histogram<u64>>,
    /// At the next epoch, `drop_count` connections are dropped from index
    /// `drop_from` on (wrapping around).
    drop_from: Cell<u64>,
    drop_count: Cell<u64>,
    storming: Cell<bool>,
    /// Permits to connect and handshake (`handshakes_in_flight`).
    handshakes: Option<tokio::sync::Semaphore>,
    /// By user, with `track_deliveries`.
    deliveries: RefCell<BTreeMap<u64, Delivered>>,
}

impl State {
    /// Whether the next epoch drops connection `index`.
    fn dropped(&self, index: u64) -> bool {
        let connections = self.spec.connections.max(1);
        (index + connections - self.drop_from.get() % connections) % connections
            < self.drop_count.get()
    }

    /// Where user `user` resumes: the last push and broadcast seqs it
    /// received (and acked), when deliveries are tracked.
    fn resume_point(&self, user: u64) -> (Option<u64>, Option<u64>) {
        if !self.spec.track_deliveries {
            return (None, None);
        }
        let deliveries = self.deliveries.borrow();
        let Some(delivered) = deliveries.get(&user) else {
            return (None, None);
        };
        (
            delivered.pushes.iter().copied().max(),
            delivered.broadcasts.iter().copied().max(),
        )
    }

    fn record_seq(&self, user: u64, seq: u64, broadcast: bool) {
        if self.spec.track_deliveries {
            let mut deliveries = self.deliveries.borrow_mut();
            let delivered = deliveries.entry(user).or_default();
            if broadcast {
                delivered.broadcasts.push(seq);
            } else {
                delivered.pushes.push(seq);
            }
        }
    }
}

enum Ended {
    Dropped,
    /// A drain sent the client away; it may come back after this many ms.
    Drained(u32),
    Failed(&'static str),
}

/// What a client's next session is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// The first, or a retry after a failure: it waits for a handshake
    /// permit.
    Gated,
    /// A storm's reconnect: not held back (that is the storm).
    Storm,
    /// The way back after a drain, counted in `drain_returns` once bound.
    DrainReturn,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Runs a worker until its stdin closes.
pub fn run(spec: WorkerSpec) -> anyhow::Result<()> {
    anyhow::ensure!(!spec.servers.is_empty() && !spec.sources.is_empty());
    anyhow::ensure!(
        !spec.transport.uses_websocket() || spec.target == Target::Herald,
        "only Herald's clients speak WebSocket here"
    );
    anyhow::ensure!(
        spec.transport == Transport::Tcp || spec.target != Target::Bare,
        "bare sockets are plain TCP"
    );
    let tls = match (&spec.ca_file, spec.transport.uses_tls()) {
        (Some(ca_file), true) => Some(crate::conn::tls_connector(ca_file)?),
        (None, true) => anyhow::bail!("{} needs a CA file", spec.transport),
        (_, false) => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let state = Rc::new(State {
            progress: RefCell::new(Progress {
                started_at_ms: unix_ms(),
                ..Progress::default()
            }),
            latency_us: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            drop_from: Cell::new(0),
            drop_count: Cell::new(0),
            storming: Cell::new(false),
            handshakes: spec.handshakes_in_flight.map(tokio::sync::Semaphore::new),
            deliveries: RefCell::new(BTreeMap::new()),
            spec,
            tls,
        });
        let (drop_tx, drop_rx) = watch::channel(0u64);
        tokio::task::spawn_local(spawn_clients(state.clone(), drop_rx));
        tokio::task::spawn_local(report_progress(state.clone()));

        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await? {
            let line = line.trim();
            if let Some(args) = line.strip_prefix("drop ") {
                // `drop FRACTION [FROM]`: FROM, a fraction too, is where in
                // the worker's connections the dropped ones start.
                let mut args = args.split(' ');
                let mut fraction = || -> anyhow::Result<f64> {
                    let arg = args.next().unwrap_or("0");
                    let value: f64 = arg.parse().context("drop takes fractions")?;
                    Ok(value.clamp(0.0, 1.0))
                };
                let connections = state.spec.connections as f64;
                let n = (connections * fraction()?) as u64;
                state.drop_from.set((connections * fraction()?) as u64);
                state.drop_count.set(n);
                // With nobody to drop, the storm is over at once.
                state.storming.set(n > 0);
                state.progress.borrow_mut().storm_back_at_ms = (n == 0).then(unix_ms);
                drop_tx.send_modify(|epoch| *epoch += 1);
            } else if line == "report" {
                let mut bytes = Vec::new();
                V2Serializer::new()
                    .serialize(&state.latency_us.borrow(), &mut bytes)
                    .map_err(|error| anyhow::anyhow!("histogram: {error:?}"))?;
                emit(&WorkerMessage::Report {
                    progress: state.progress.borrow().clone(),
                    latency_us_v2: base64::engine::general_purpose::STANDARD.encode(bytes),
                    deliveries: state.deliveries.borrow().clone(),
                });
            }
        }
        anyhow::Ok(())
    })
}

fn emit(message: &WorkerMessage) {
    let mut stdout = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut stdout, message);
    let _ = stdout.write_all(b"\n");
    let _ = stdout.flush();
}

async fn report_progress(state: Rc<State>) {
    loop {
        tokio::time::sleep(PROGRESS_INTERVAL).await;
        emit(&WorkerMessage::Progress(state.progress.borrow().clone()));
    }
}

async fn spawn_clients(state: Rc<State>, drop_rx: watch::Receiver<u64>) {
    let start = Instant::now();
    let rate = state.spec.rate_per_sec;
    for index in 0..state.spec.connections {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(index as f64 / rate as f64);
            if due > Instant::now() + Duration::from_millis(1) {
                tokio::time::sleep_until(due.into()).await;
            }
        } else if index % 64 == 0 {
            // Let the first handshakes run while the rest are spawned.
            tokio::task::yield_now().await;
        }
        tokio::task::spawn_local(client(state.clone(), index, drop_rx.clone()));
    }
}

/// One client: connects, holds, and reconnects after a drop or a failure.
async fn client(state: Rc<State>, index: u64, mut drop_rx: watch::Receiver<u64>) {
    let spec = &state.spec;
    let user = spec.first_user + index;
    let mut server = spec.servers[(user % spec.servers.len() as u64) as usize];
    let source = spec.sources[(index % spec.sources.len() as u64) as usize];
    drop_rx.mark_unchanged();
    let mut attempt = Attempt::Gated;
    loop {
        let ended = session(
            &state,
            index,
            user,
            server,
            source,
            &mut attempt,
            &mut drop_rx,
        )
        .await;
        match ended {
            Ended::Dropped => attempt = Attempt::Storm,
            Ended::Drained(hint_ms) => {
                server = spec.drain_to.unwrap_or(server);
                tokio::time::sleep(Duration::from_millis(u64::from(hint_ms))).await;
                attempt = Attempt::DrainReturn;
            }
            Ended::Failed(kind) => {
                *state
                    .progress
                    .borrow_mut()
                    .failures
                    .entry(kind.to_owned())
                    .or_default() += 1;
                // A way back that failed is still the way back.
                if attempt != Attempt::DrainReturn {
                    attempt = Attempt::Gated;
                }
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    }
}

fn connect_error_kind(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect_refused",
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse => "no_source_port",
        std::io::ErrorKind::TimedOut => "connect_timeout",
        _ => "connect_error",
    }
}

/// A socket bound to `source` whose port is picked at connect time, so the
/// same source port can serve several destinations.
async fn connect_from(source: Ipv4Addr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) reads one c_int we own.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn session(
    state: &State,
    index: u64,
    user: u64,
    server: SocketAddr,
    source: Ipv4Addr,
    attempt: &mut Attempt,
    drop_rx: &mut watch::Receiver<u64>,
) -> Ended {
    let spec = &state.spec;
    // Boxed: the handshake's state (timers, a TLS handshake, frames being
    // written) is the largest part of the future; inline, every client
    // would carry that much for as long as it holds its connection.
    let established = Box::pin(async {
        // Connections past what the servers get through within the
        // handshake timeout would only wait in their accept queues and
        // time out, so the ramp keeps at most `handshakes_in_flight` going.
        let _permit = match (&state.handshakes, *attempt == Attempt::Gated) {
            (Some(handshakes), true) => Some(handshakes.acquire().await.expect("never closed")),
            _ => None,
        };
        establish(state, user, server, source).await
    })
    .await;
    let (mut conn, mut input) = match established {
        Ok(established) => established,
        Err(kind) => return Ended::Failed(kind),
    };
    let mut first_all_up = false;
    {
        let mut progress = state.progress.borrow_mut();
        progress.connected += 1;
        progress.sessions += 1;
        if *attempt == Attempt::DrainReturn {
            *progress
                .drain_returns
                .entry(unix_ms() / DRAIN_RETURN_SLOT_MS)
                .or_default() += 1;
        }
        // Should this session fail, the next one is a retry.
        *attempt = Attempt::Gated;
        if progress.connected == spec.connections {
            if progress.all_up_at_ms.is_none() {
                progress.all_up_at_ms = Some(unix_ms());
                first_all_up = true;
            }
            if state.storming.replace(false) {
                progress.storm_back_at_ms = Some(unix_ms());
            }
        }
    }
    if first_all_up {
        return_freed_memory();
    }
    let ended = hold(state, index, &mut conn, &mut input, drop_rx).await;
    state.progress.borrow_mut().connected -= 1;
    ended
}

/// Connects and gets through every handshake: the connection, and the
/// input read past the server's last handshake reply.
async fn establish(
    state: &State,
    user: u64,
    server: SocketAddr,
    source: Ipv4Addr,
) -> Result<(Conn, BytesMut), &'static str> {
    let spec = &state.spec;
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_from(source, server)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(connect_error_kind(&error)),
        Err(_) => return Err("connect_timeout"),
    };
    let mut conn = Conn::new(stream);
    let mut input = BytesMut::with_capacity(256);
    // TLS, the WebSocket upgrade and the protocol's own handshake, within
    // one deadline: what a server must get through to accept a client.
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        // NATS starts TLS after its INFO, in `handshake`.
        if spec.transport.uses_tls() && spec.target != Target::Nats {
            conn.start_tls(tls(state)?, server.ip()).await?;
        }
        if spec.transport.uses_websocket() {
            conn.upgrade_websocket(&server.to_string()).await?;
        }
        handshake(state, user, server, &mut conn, &mut input).await
    })
    .await;
    match handshake {
        Ok(Ok(())) => Ok((conn, input)),
        Ok(Err(kind)) => Err(kind),
        Err(_) => Err("handshake_timeout"),
    }
}

/// Gives the memory the connect storm freed back to the system, so that
/// the worker's RSS (the load generator's memory in the report) says what
/// holding the connections costs, not the storm's high-water mark.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn tls(state: &State) -> Result<&TlsConnector, &'static str> {
    state.tls.as_ref().ok_or("no_tls_config")
}

/// Sends one Herald frame (over WebSocket, as one message).
async fn send_frame(conn: &mut Conn, frame: &Frame) -> Result<(), &'static str> {
    let mut buffer = BytesMut::new();
    encode(frame, &mut buffer).map_err(|_| "encode")?;
    conn.send(&buffer).await
}

async fn next_frame(conn: &mut Conn, input: &mut BytesMut) -> Result<Frame, &'static str> {
    loop {
        if let Some(frame) = decode(input).map_err(|_| "bad_frame")? {
            return Ok(frame);
        }
        conn.read_more(input).await?;
    }
}

/// Reads until `input` holds `needle`, and drops everything up to its end.
async fn read_until(
    conn: &mut Conn,
    input: &mut BytesMut,
    needle: &[u8],
) -> Result<(), &'static str> {
    loop {
        if let Some(at) = input.windows(needle.len()).position(|w| w == needle) {
            input.advance(at + needle.len());
            return Ok(());
        }
        conn.read_more(input).await?;
    }
}

pub fn mqtt_connect(client_id: &str, keepalive_secs: u16) -> Vec<u8> {
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    variable.extend_from_slice(&keepalive_secs.to_be_bytes());
    variable.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    variable.extend_from_slice(client_id.as_bytes());
    // Remaining length fits one byte for the short ids used here.
    assert!(variable.len() < 128);
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend_from_slice(&variable);
    packet
}

/// An MQTT 3.1.1 SUBSCRIBE to `topic` at QoS 0, packet id 1.
fn mqtt_subscribe(topic: &str) -> Vec<u8> {
    let mut variable = vec![0, 1];
    variable.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    variable.extend_from_slice(topic.as_bytes());
    variable.push(0);
    assert!(variable.len() < 128);
    let mut packet = vec![0x82, variable.len() as u8];
    packet.extend_from_slice(&variable);
    packet
}

/// The send time a payload starts with: unix nanoseconds, in decimal,
/// then a space or the end (`crate::payload::timestamped`).
fn sent_nanos(payload: &[u8]) -> Option<u128> {
    let digits = payload.split(|&b| b == b' ').next().unwrap_or_default();
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Records one receipt, timed from the send time in its payload.
fn record_receipt(state: &State, payload: &[u8]) {
    if let Some(sent) = sent_nanos(payload) {
        let micros = (unix_nanos().saturating_sub(sent) / 1000) as u64;
        let _ = state.latency_us.borrow_mut().record(micros.max(1));
    }
    state.progress.borrow_mut().pushes_received += 1;
}

async fn handshake(
    state: &State,
    user: u64,
    server: SocketAddr,
    stream: &mut Conn,
    input: &mut BytesMut,
) -> Result<(), &'static str> {
    let spec = &state.spec;
    match spec.target {
        Target::Bare => Ok(()),
        Target::Herald => {
            let (last_seq, last_broadcast_seq) = state.resume_point(user);
            let expires = unix_ms() / 1000 + 24 * 3600;
            let token = sign_token(
                spec.token_secret.as_bytes(),
                &TokenClaims {
                    app: spec.app.clone(),
                    user: user_id(user),
                    expires_at_unix_secs: expires,
                },
            )
            .map_err(|_| "token")?;
            send_frame(
                stream,
                &Frame::Hello {
                    device_id: format!("d{user}"),
                    client_version: "herald-bench/1".to_owned(),
                    network: NetworkType::Wifi,
                    features: Features::NONE,
                },
            )
            .await?;
            send_frame(
                stream,
                &Frame::Bind {
                    app: spec.app.clone(),
                    token,
                    last_seq,
                    last_broadcast_seq,
                    tags: Vec::new(),
                },
            )
            .await?;
            let Frame::HelloOk { .. } = next_frame(stream, input).await? else {
                return Err("unexpected_frame");
            };
            match next_frame(stream, input).await? {
                Frame::BindOk { .. } => Ok(()),
                Frame::BindErr { .. } => Err("bind_rejected"),
                _ => Err("unexpected_frame"),
            }
        }
        Target::Mqtt => {
            let keepalive = u16::try_from(spec.heartbeat_secs).unwrap_or(u16::MAX);
            let connect = mqtt_connect(&format!("b{user}"), keepalive);
            stream.send(&connect).await?;
            while input.len() < 4 {
                stream.read_more(input).await?;
            }
            // CONNACK: 0x20, length 2, session present, return code 0.
            if input[0] != 0x20 || input[3] != 0 {
                return Err("connect_rejected");
            }
            input.advance(4);
            if let Some(topic) = &spec.subscribe {
                stream.send(&mqtt_subscribe(topic)).await?;
                while input.len() < 5 {
                    stream.read_more(input).await?;
                }
                // SUBACK: 0x90, length 3, packet id, granted QoS 0.
                if input[0] != 0x90 || input[4] != 0 {
                    return Err("subscribe_rejected");
                }
                input.advance(5);
            }
            Ok(())
        }
        Target::Nats => {
            // INFO, in plain text; with TLS required, the client's
            // handshake follows it, as the NATS clients do.
            read_until(stream, input, b"\r\n").await?;
            let tls_required = spec.transport.uses_tls();
            if tls_required {
                stream.start_tls(tls(state)?, server.ip()).await?;
            }
            let subscribe = spec
                .subscribe
                .as_ref()
                .map_or_else(String::new, |subject| format!("SUB {subject} 1\r\n"));
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":{tls_required}}}\
                 \r\n{subscribe}PING\r\n"
            );
            stream.send(hello.as_bytes()).await?;
            // The PONG also says the subscription is in place.
            read_until(stream, input, b"PONG\r\n").await
        }
    }
}

/// Keeps a session alive with heartbeats, acks pushes, until it is dropped
/// or fails.
async fn hold(
    state: &State,
    index: u64,
    stream: &mut Conn,
    input: &mut BytesMut,
    drop_rx: &mut watch::Receiver<u64>,
) -> Ended {
    let spec = &state.spec;
    let interval = Duration::from_secs(spec.heartbeat_secs.max(1));
    // Spread heartbeats over the interval instead of sending them in waves.
    let phase = interval.mul_f64((index % 1000) as f64 / 1000.0);
    let mut heartbeat = tokio::time::interval_at((Instant::now() + phase).into(), interval);
    // The server's first pushes may have come in the same read as its last
    // handshake reply: left there, they would wait for the next read,
    // which the server (waiting for their acks) sends only as a PONG.
    if !input.is_empty() {
        match take_input(state, index, stream, input).await {
            Ok(Some(hint_ms)) => return Ended::Drained(hint_ms),
            Ok(None) => {}
            Err(kind) => return Ended::Failed(kind),
        }
    }
    loop {
        tokio::select! {
            changed = drop_rx.changed() => {
                if changed.is_err() || state.dropped(index) {
                    return Ended::Dropped;
                }
            }
            _ = heartbeat.tick() => {
                // Boxed, as the input's handling (`take_input`): what runs once a
                // minute need not take room in every idle client's future.
                let sent = Box::pin(async {
                    match spec.target {
                        Target::Bare => Ok(()),
                        Target::Herald => send_frame(stream, &Frame::Ping).await,
                        Target::Mqtt => stream.send(&[0xC0, 0]).await,
                        Target::Nats => stream.send(b"PING\r\n").await,
                    }
                })
                .await;
                if let Err(kind) = sent {
                    return Ended::Failed(kind);
                }
            }
            read = stream.read_more(input) => {
                if let Err(kind) = read {
                    return Ended::Failed(kind);
                }
                match take_input(state, index, stream, input).await {
                    Ok(Some(hint_ms)) => return Ended::Drained(hint_ms),
                    Ok(None) => {}
                    Err(kind) => return Ended::Failed(kind),
                }
            }
        }
    }
}

/// Handles the frames `input` holds and sends the replies; boxed, as
/// what runs per read need not take room in every idle client's future.
async fn take_input(
    state: &State,
    index: u64,
    stream: &mut Conn,
    input: &mut BytesMut,
) -> Result<Option<u32>, &'static str> {
    Box::pin(async {
        let drained = handle_input(state, state.spec.first_user + index, stream, input).await?;
        stream.flush_replies().await?;
        Ok(drained)
    })
    .await
}

/// Takes what the server sent; returns the reconnect hint of a drain's
/// GOAWAY when the clients follow drains (`drain_to`).
async fn handle_input(
    state: &State,
    user: u64,
    stream: &mut Conn,
    input: &mut BytesMut,
) -> Result<Option<u32>, &'static str> {
    match state.spec.target {
        Target::Herald => {
            while let Some(frame) = decode(input).map_err(|_| "bad_frame")? {
                match frame {
                    Frame::Push {
                        app, seq, payload, ..
                    } => {
                        record_receipt(state, &payload);
                        state.record_seq(user, seq, false);
                        send_frame(stream, &Frame::Ack { app, seq }).await?;
                    }
                    Frame::Broadcast {
                        app, seq, payload, ..
                    } => {
                        record_receipt(state, &payload);
                        state.record_seq(user, seq, true);
                        if state.spec.ack_broadcasts {
                            send_frame(stream, &Frame::BroadcastAck { app, seq }).await?;
                        }
                    }
                    Frame::GoAway {
                        reason: GoAwayReason::SERVER_SHUTDOWN,
                        reconnect_delay_ms,
                    } if state.spec.drain_to.is_some() => {
                        return Ok(Some(reconnect_delay_ms.unwrap_or(0)));
                    }
                    Frame::GoAway { .. } | Frame::Error { .. } => return Err("closed_by_server"),
                    _ => {}
                }
            }
        }
        Target::Nats => {
            // Answer the server's pings, take MSGs; the rest is PONG or INFO.
            while let Some(at) = input.windows(2).position(|w| w == b"\r\n") {
                if input.starts_with(b"MSG ") {
                    // MSG <subject> <sid> [reply] <bytes>\r\n<payload>\r\n
                    let line = std::str::from_utf8(&input[..at]).map_err(|_| "bad_msg")?;
                    let len: usize = line
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .ok_or("bad_msg")?;
                    if input.len() < at + 2 + len + 2 {
                        break; // the payload is still on its way
                    }
                    input.advance(at + 2);
                    let payload = input.split_to(len);
                    input.advance(2);
                    record_receipt(state, &payload);
                    continue;
                }
                let line = input.split_to(at + 2);
                if line.starts_with(b"PING") {
                    stream.send(b"PONG\r\n").await?;
                }
            }
        }
        Target::Mqtt => {
            // Take whole packets: PUBLISH (QoS 0) records a receipt,
            // anything else (PINGRESP) is dropped.
            while let Some((header, body_len)) = mqtt_packet_len(input) {
                if input.len() < header + body_len {
                    break;
                }
                let kind = input[0] & 0xF0;
                input.advance(header);
                let body = input.split_to(body_len);
                if kind == 0x30 && body.len() >= 2 {
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    if body.len() >= 2 + topic_len {
                        record_receipt(state, &body[2 + topic_len..]);
                    }
                }
            }
        }
        Target::Bare => {
            // Lines from `herald-bench hold`, each a payload.
            while let Some(end) = input.iter().position(|&b| b == b'\n') {
                let line = input.split_to(end + 1);
                record_receipt(state, &line[..end]);
                if state.spec.ack_broadcasts {
                    stream.send(crate::systems::BARE_REPLY).await?;
                }
            }
        }
    }
    Ok(None)
}

/// An MQTT packet's fixed-header length and remaining length, once the
/// header is all there.
fn mqtt_packet_len(input: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for (i, &byte) in input.iter().enumerate().skip(1).take(4) {
        len |= usize::from(byte & 0x7F) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Some((i + 1, len));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_connect_is_a_valid_3_1_1_packet() {
        let packet = mqtt_connect("b7", 60);
        assert_eq!(packet[0], 0x10);
        assert_eq!(packet[1] as usize, packet.len() - 2);
        assert_eq!(&packet[2..8], &[0, 4, b'M', b'Q', b'T', b'T']);
        assert_eq!(packet[8], 4, "protocol level 4 is MQTT 3.1.1");
        assert_eq!(packet[9], 0x02, "clean session");
        assert_eq!(u16::from_be_bytes([packet[10], packet[11]]), 60);
        assert_eq!(&packet[12..], &[0, 2, b'b', b'7']);
    }

    #[test]
    fn the_send_time_is_read_back_from_a_padded_payload_of_any_length() {
        let sent = 1_764_571_234_567_890_123u128;
        for len in [crate::payload::PAYLOAD_BYTES_MIN, 256, 65_536] {
            assert_eq!(
                sent_nanos(&crate::payload::timestamped(sent, len)),
                Some(sent)
            );
        }
        assert_eq!(sent_nanos(b"1234"), Some(1234));
        assert_eq!(sent_nanos(b"hello world"), None);
    }
}
