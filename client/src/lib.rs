//! herald-client: the Rust client SDK for Herald.
//!
//! It drives `herald_proto::client::ClientConn` (handshake, binds,
//! heartbeats, de-duplication, cumulative acks) over a tokio connection in a
//! background task, and reconnects with exponential backoff and full
//! jitter, resuming every app from its last acked sequence. It does not
//! persist anything: a process that restarts resumes from the server's ack
//! cursor for its device id.
//!
//! A gateway address names its transport ([`GatewayAddress`]): `host:port`
//! or `tcp://host:port` (plain TCP), `tls://host:port`,
//! `ws://host:port/v1/connect` or `wss://host:port/v1/connect`. tls and wss
//! check the server's certificate against the system's roots, or against
//! [`ClientOptions::ca_file`]; a refused certificate is a lost connection
//! like any other (`Event::Disconnected`), never a reason to fall back to
//! plain TCP.
//!
//! With a [`Dispatch`], it asks the dispatcher (`GET /v1/dispatch`) which
//! gateways to use and tries them in order, moving to the next at once when
//! one cannot be reached; it remembers the last gateway that worked for each
//! network type and tries that one first next time.
//!
//! ```no_run
//! # async fn example() {
//! use herald_client::{AckMode, AppToken, Backoff, Client, ClientOptions, Event};
//! use std::time::Duration;
//!
//! let mut client = Client::start(ClientOptions {
//!     gateway: "tls://push.example.com:7443".into(),
//!     dispatch: None,
//!     ca_file: None,
//!     device_id: "phone-1".into(),
//!     network: herald_proto::NetworkType::Wifi,
//!     client_version: "my-app/1.0".into(),
//!     apps: vec![AppToken { app: "chat".into(), token: "<token>".into(), tags: vec![] }],
//!     ack_mode: AckMode::Auto,
//!     reconnect: Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(30) },
//!     connect_timeout: Duration::from_secs(10),
//!     heartbeat_probe: None,
//! });
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         // Acked automatically when next_event is called again.
//!         Event::Push(push) => println!("{} #{}", push.app, push.seq),
//!         Event::Closed(why) => eprintln!("closed: {why}"),
//!         _ => {}
//!     }
//! }
//! # }
//! ```

mod address;
mod heartbeat;
mod pull;
mod transport;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_proto::client::{
    AppCredentials, ClientConfig, ClientConn, ClientError as ConnError, ClientEvent,
};
use herald_proto::limits::ROUTE_LEN_MAX;
use herald_proto::{BindErrorCode, GoAwayReason, UpstreamStatus, encode};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use heartbeat::HeartbeatLearner;
use pull::Puller;
use transport::{FrameTransport, TlsTrust};

pub use address::{GatewayAddress, GatewayAddressError, Transport};
pub use heartbeat::HeartbeatProbe;
pub use herald_proto::client::Push;
pub use herald_proto::{MessageId, NetworkType, ResetSequence, UnbindReason};

/// Events the driver holds for the application before it stops reading the
/// socket: a slow application slows the connection, it never grows memory.
const EVENT_QUEUE_LEN: usize = 64;

/// Requests (acks, upstream sends) queued from the application.
const COMMAND_QUEUE_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppToken {
    pub app: String,
    pub token: String,
    /// What broadcasts may target this client by, e.g. `platform=ios`.
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// A push returned by `next_event` is acked when `next_event` is called
    /// again, that is, after the application's handler for it ran.
    Auto,
    /// The application calls `ack`.
    Manual,
}

/// Reconnect delays: doubling from `initial` up to `max`, each drawn at
/// random below the current bound (full jitter), reset after a connection
/// that completed its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// Where to ask which gateways to use, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// The API base URL, e.g. `http://api.example.com:8080`.
    pub url: String,
    pub app: String,
    pub user: String,
    pub region: Option<String>,
    /// The transport to ask gateways for (`&transport=` for all but tcp).
    /// An answer that names another transport is refused, so a dispatcher
    /// cannot turn a tls client into a plain TCP one.
    pub transport: Transport,
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// A gateway's address (see [`GatewayAddress`]): the one used without
    /// `dispatch`, and the last resort when the dispatcher cannot be
    /// reached and no gateway has worked yet. May be empty with `dispatch`:
    /// then, until the dispatcher answers, the client waits out its backoff
    /// and asks again. An address that does not parse fails like one that
    /// cannot be reached (`Event::Disconnected`).
    pub gateway: String,
    pub dispatch: Option<Dispatch>,
    /// A PEM file of the CA certificates that tls and wss gateways'
    /// certificates must chain to, instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    pub device_id: String,
    pub network: NetworkType,
    pub client_version: String,
    pub apps: Vec<AppToken>,
    pub ack_mode: AckMode,
    pub reconnect: Backoff,
    pub connect_timeout: Duration,
    /// Probe for a longer heartbeat interval and negotiate it with the
    /// server (see [`HeartbeatProbe`]); `None` pings at the interval the
    /// server hands out. Needs a server that negotiates (HEARTBEAT): one
    /// that refuses the first proposal turns probing off for the client.
    pub heartbeat_probe: Option<HeartbeatProbe>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connected {
        /// The gateway this connection reached.
        gateway: String,
        heartbeat_interval: Duration,
    },
    Bound {
        app: String,
        user: String,
    },
    BindFailed {
        app: String,
        code: BindErrorCode,
        message: String,
    },
    Push(Push),
    /// A message pushed with `"delivery": "notify"` arrived as a notice:
    /// its `size` and `hint` now, its body as an `Event::Push` once the
    /// client pulled it (after a random delay the server chose, so that
    /// many clients do not pull at once). Pushes of the app that come after
    /// it wait for that body, so every app's messages arrive in seq order.
    /// Nothing to ack: the `Push` that follows is acked as any.
    Notified {
        app: String,
        seq: u64,
        message_id: MessageId,
        size: u32,
        hint: String,
    },
    /// The body of a message announced by `Notified` is gone (it expired
    /// before the pull): there is nothing to show. Acked like a push, so
    /// the messages after it go on.
    NotifyGone {
        app: String,
        seq: u64,
        message_id: MessageId,
    },
    /// The server answered a heartbeat proposal: the client pings at
    /// `interval` from now on (only with `heartbeat_probe`).
    HeartbeatSet {
        interval: Duration,
    },
    /// A broadcast to the app's users (its `seq` counts the app's
    /// broadcasts). Acked like a push, with `ack_broadcast` in manual mode.
    Broadcast(Push),
    /// A message the app pushed with `"store": false` (typing indicators,
    /// live presence): it reached this client because it was bound then;
    /// it is not acked, has no seq, and is never delivered again.
    Transient {
        app: String,
        payload: Bytes,
    },
    UpstreamAck {
        app: String,
        request_id: u64,
        status: UpstreamStatus,
    },
    /// The server unbound `app` (it was deleted); the client keeps its
    /// other apps and never binds this one again.
    Unbound {
        app: String,
        reason: UnbindReason,
    },
    /// The server resumed `app`'s inbox (or its broadcasts) after `after`,
    /// below what this client held: the server's data was reset or
    /// restored. The client's resume point is now `after`, and the seqs
    /// that follow arrive as new messages; forget any record of seqs above
    /// `after` that the application keeps itself.
    Reset {
        app: String,
        sequence: ResetSequence,
        after: u64,
    },
    /// The dispatcher could not be asked; the client tries the gateway that
    /// last worked, or `ClientOptions::gateway`.
    DispatchFailed {
        error: String,
    },
    /// The connection was lost; the client reconnects by itself.
    Disconnected {
        error: String,
        reconnect_in: Duration,
    },
    /// The last event: the client stopped and will not reconnect.
    Closed(Terminal),
}

/// Why a client stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminal {
    /// The business server kicked the user (GOAWAY kicked).
    Kicked,
    /// The connection's only app was deleted (GOAWAY app_deleted).
    AppDeleted,
    /// Every app's BIND failed; retrying the same tokens cannot help.
    AuthFailed {
        app: String,
        code: BindErrorCode,
        message: String,
    },
    /// The application closed the client.
    ClosedByClient,
}

impl fmt::Display for Terminal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Terminal::Kicked => f.write_str("kicked by the server (GOAWAY kicked)"),
            Terminal::AppDeleted => f.write_str("the app was deleted (GOAWAY app_deleted)"),
            Terminal::AuthFailed { app, code, message } => {
                write!(f, "binding app {app:?} failed: {code} ({message})")
            }
            Terminal::ClosedByClient => f.write_str("closed by the client"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the client is closed")]
    Closed,
    #[error("not connected, or the app is not bound")]
    NotBound,
    #[error("a route name is 1 to {ROUTE_LEN_MAX} bytes")]
    InvalidRoute,
}

enum Command {
    Ack {
        app: String,
        seq: u64,
    },
    AckBroadcast {
        app: String,
        seq: u64,
    },
    Upstream {
        app: String,
        route: Option<String>,
        payload: Bytes,
        reply: oneshot::Sender<Result<u64, ClientError>>,
    },
    Close,
}

/// A Herald client. Its connection runs in a background task on the tokio
/// runtime it was started on.
pub struct Client {
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
    ack_mode: AckMode,
    /// Auto mode: the last push or broadcast handed out, acked on the next
    /// call.
    unacked: Option<Command>,
}

impl Client {
    pub fn start(options: ClientOptions) -> Client {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE_LEN);
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE_LEN);
        let ack_mode = options.ack_mode;
        tokio::spawn(drive(options, events_tx, commands_rx));
        Client {
            events,
            commands,
            ack_mode,
            unacked: None,
        }
    }

    /// The next event; `None` after `Event::Closed`.
    pub async fn next_event(&mut self) -> Option<Event> {
        if let Some(ack) = self.unacked.take() {
            let _ = self.commands.send(ack).await;
        }
        let event = self.events.recv().await?;
        if self.ack_mode == AckMode::Auto {
            self.unacked = match &event {
                Event::Push(push) => Some(Command::Ack {
                    app: push.app.clone(),
                    seq: push.seq,
                }),
                Event::NotifyGone { app, seq, .. } => Some(Command::Ack {
                    app: app.clone(),
                    seq: *seq,
                }),
                Event::Broadcast(broadcast) => Some(Command::AckBroadcast {
                    app: broadcast.app.clone(),
                    seq: broadcast.seq,
                }),
                _ => None,
            };
        }
        Some(event)
    }

    /// Acks every push of `app` up to `seq`.
    pub async fn ack(&self, app: &str, seq: u64) -> Result<(), ClientError> {
        self.commands
            .send(Command::Ack {
                app: app.to_owned(),
                seq,
            })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Acks every broadcast of `app` up to `seq`.
    pub async fn ack_broadcast(&self, app: &str, seq: u64) -> Result<(), ClientError> {
        self.commands
            .send(Command::AckBroadcast {
                app: app.to_owned(),
                seq,
            })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Sends data for the app's business server, to the app's default
    /// webhook route; the returned request id comes back in
    /// `Event::UpstreamAck`.
    pub async fn upstream(&self, app: &str, payload: Bytes) -> Result<u64, ClientError> {
        self.send_upstream(app, None, payload).await
    }

    /// Sends data for the app's business server to its webhook `route`
    /// (UPSTREAM_ACK `unknown_route` if the app has no such route for
    /// upstream data); the returned request id comes back in
    /// `Event::UpstreamAck`.
    pub async fn upstream_to_route(
        &self,
        app: &str,
        route: &str,
        payload: Bytes,
    ) -> Result<u64, ClientError> {
        self.send_upstream(app, Some(route), payload).await
    }

    async fn send_upstream(
        &self,
        app: &str,
        route: Option<&str>,
        payload: Bytes,
    ) -> Result<u64, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Upstream {
                app: app.to_owned(),
                route: route.map(str::to_owned),
                payload,
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
    }

    /// Closes the connection and waits for the driver to stop.
    pub async fn close(mut self) {
        let _ = self.commands.send(Command::Close).await;
        while self.events.recv().await.is_some() {}
    }
}

/// How one connection ended.
enum Ended {
    Terminal(Terminal),
    Lost {
        error: String,
        handshake_done: bool,
        /// The server's reconnect hint (GOAWAY server_shutdown).
        hint: Option<Duration>,
    },
}

async fn drive(
    options: ClientOptions,
    events: mpsc::Sender<Event>,
    mut commands: mpsc::Receiver<Command>,
) {
    // Per app: the last acked seq and broadcast seq, to resume from, and
    // the server storage epoch they belong to.
    let mut resume = ResumePoints::default();
    let mut delay = options.reconnect.initial;
    let mut gateways = Gateways::default();
    let mut tls = TlsTrust::new(options.ca_file.clone());
    let mut learner = options
        .heartbeat_probe
        .clone()
        .map(|probe| HeartbeatLearner::new(probe, options.network));
    loop {
        let (gateway, dispatch_error) = gateways.next(&options).await;
        if let Some(error) = dispatch_error
            && events.send(Event::DispatchFailed { error }).await.is_err()
        {
            return;
        }
        let ended = if gateway.is_empty() {
            // Only the dispatcher knows the gateways, and it did not answer.
            lost("no gateway to try", false)
        } else {
            connect_and_run(
                &gateway,
                &options,
                &mut tls,
                &mut resume,
                &mut learner,
                &events,
                &mut commands,
            )
            .await
        };
        let (error, hint) = match ended {
            Ended::Terminal(terminal) => {
                let _ = events.send(Event::Closed(terminal)).await;
                return;
            }
            Ended::Lost {
                error,
                handshake_done,
                hint,
            } => {
                if handshake_done {
                    delay = options.reconnect.initial;
                    gateways.worked(options.network, gateway);
                } else if gateways.has_next() {
                    // Unreachable: fail over to the next gateway at once.
                    continue;
                }
                (error, hint)
            }
        };
        let wait = match hint {
            Some(hint) => hint + jitter(hint / 2),
            None => jitter(delay),
        };
        delay = (delay * 2).min(options.reconnect.max);
        let disconnected = Event::Disconnected {
            error,
            reconnect_in: wait,
        };
        if events.send(disconnected).await.is_err() {
            return;
        }
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                command = commands.recv() => match command {
                    None | Some(Command::Close) => {
                        let _ = events.send(Event::Closed(Terminal::ClosedByClient)).await;
                        return;
                    }
                    Some(Command::Upstream { reply, .. }) => {
                        let _ = reply.send(Err(ClientError::NotBound));
                    }
                    // Unsent acks are not lost: the server redelivers and
                    // the application sees the push again.
                    Some(Command::Ack { .. } | Command::AckBroadcast { .. }) => {}
                },
            }
        }
    }
}

/// How long the dispatcher may take to answer before the client falls
/// back to the gateways it knows.
const DISPATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateways to try, in order, and the last that worked per network.
#[derive(Debug, Default)]
struct Gateways {
    queue: std::collections::VecDeque<String>,
    last_good: HashMap<NetworkType, String>,
}

impl Gateways {
    fn has_next(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The next gateway to try. When the list is used up it is made again:
    /// the last gateway that worked on this network first, then the
    /// dispatcher's answer (or `options.gateway` without one).
    /// Also returns why the dispatcher could not be asked, if it could not.
    async fn next(&mut self, options: &ClientOptions) -> (String, Option<String>) {
        let mut dispatch_error = None;
        if self.queue.is_empty() {
            let last_good = self.last_good.get(&options.network).cloned();
            let mut list: Vec<String> = last_good.iter().cloned().collect();
            match &options.dispatch {
                Some(dispatch) => match dispatched(dispatch, options.network).await {
                    Ok(gateways) => list.extend(gateways),
                    Err(error) => {
                        dispatch_error = Some(error);
                        if list.is_empty() {
                            list.push(options.gateway.clone());
                        }
                    }
                },
                None => list.push(options.gateway.clone()),
            }
            for gateway in list {
                if !self.queue.contains(&gateway) {
                    self.queue.push_back(gateway);
                }
            }
        }
        let gateway = self
            .queue
            .pop_front()
            .unwrap_or_else(|| options.gateway.clone());
        (gateway, dispatch_error)
    }

    /// `gateway` completed a handshake: try it first next time, after the
    /// dispatcher's fresh list once this connection ends.
    fn worked(&mut self, network: NetworkType, gateway: String) {
        self.last_good.insert(network, gateway);
        self.queue.clear();
    }
}

/// Asks the dispatcher for the gateways of (app, user), best first.
async fn dispatched(dispatch: &Dispatch, network: NetworkType) -> Result<Vec<String>, String> {
    let mut query = vec![
        ("app", dispatch.app.as_str()),
        ("user", dispatch.user.as_str()),
    ];
    match network {
        NetworkType::Wifi | NetworkType::Wired => query.push(("net", "wifi")),
        // Dispatchers before `wired` and `5g` refuse them; both are served
        // as wifi and 4g are, so those are what the client asks for.
        NetworkType::Cellular4g | NetworkType::Cellular5g => query.push(("net", "4g")),
        NetworkType::Cellular3g => query.push(("net", "3g")),
        NetworkType::Cellular2g => query.push(("net", "2g")),
        NetworkType::Unknown => {}
    }
    if let Some(region) = &dispatch.region {
        query.push(("region", region));
    }
    // Left out for tcp: dispatchers that predate the other transports
    // answer tcp gateways.
    if dispatch.transport != Transport::Tcp {
        query.push(("transport", dispatch.transport.as_str()));
    }
    let url = format!("{}/v1/dispatch", dispatch.url.trim_end_matches('/'));
    let request = reqwest::Client::new()
        .get(url)
        .query(&query)
        .timeout(DISPATCH_TIMEOUT);
    let response = request.send().await.map_err(|error| error.to_string())?;
    if !response.status().is_success() {
        return Err(format!("dispatcher answered {}", response.status()));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        gateways: Vec<String>,
    }
    let answer: Answer = response.json().await.map_err(|error| error.to_string())?;
    for gateway in &answer.gateways {
        let address = gateway
            .parse::<GatewayAddress>()
            .map_err(|error| format!("the dispatcher answered gateway {gateway:?}: {error}"))?;
        if address.transport() != dispatch.transport {
            return Err(format!(
                "the dispatcher answered a {} gateway ({gateway}) when asked for {}",
                address.transport(),
                dispatch.transport
            ));
        }
    }
    Ok(answer.gateways)
}

/// A connection lost without GOAWAY while its PING was unanswered died
/// idle at the interval in force: the heartbeat was too long for the NAT
/// (one that resets the flow rather than dropping it silently).
fn heartbeat_failed(
    conn: &ClientConn,
    learner: &mut Option<HeartbeatLearner>,
    handshake_done: bool,
) {
    if handshake_done
        && conn.ping_unanswered()
        && let Some(learner) = learner.as_mut()
    {
        learner.failed();
    }
}

/// A random duration in [0, bound].
fn jitter(bound: Duration) -> Duration {
    bound.mul_f64(rand::random::<f64>())
}

fn lost(error: impl fmt::Display, handshake_done: bool) -> Ended {
    Ended::Lost {
        error: error.to_string(),
        handshake_done,
        hint: None,
    }
}

/// Where the client resumes each app on its next connection.
#[derive(Debug, Default)]
struct ResumePoints {
    /// Per app: the last acked seq and broadcast seq.
    by_app: HashMap<String, (Option<u64>, Option<u64>)>,
    /// The server storage epoch the seqs belong to.
    storage_epoch: Option<u64>,
    /// Apps the server deleted: never bound again.
    deleted: HashSet<String>,
}

async fn connect_and_run(
    gateway: &str,
    options: &ClientOptions,
    tls: &mut TlsTrust,
    resume: &mut ResumePoints,
    learner: &mut Option<HeartbeatLearner>,
    events: &mpsc::Sender<Event>,
    commands: &mut mpsc::Receiver<Command>,
) -> Ended {
    let address = match gateway.parse::<GatewayAddress>() {
        Ok(address) => address,
        Err(error) => return lost(format!("gateway {gateway:?}: {error}"), false),
    };
    let connect = FrameTransport::connect(&address, tls);
    let mut transport = match tokio::time::timeout(options.connect_timeout, connect).await {
        Ok(Ok(transport)) => transport,
        Ok(Err(error)) => return lost(error, false),
        Err(_) => return lost("connect: timed out", false),
    };
    let apps = options
        .apps
        .iter()
        .filter(|a| !resume.deleted.contains(&a.app))
        .map(|a| {
            let (last_seq, last_broadcast_seq) =
                resume.by_app.get(&a.app).copied().unwrap_or_default();
            AppCredentials {
                app: a.app.clone(),
                token: a.token.clone(),
                last_seq,
                last_broadcast_seq,
                tags: a.tags.clone(),
            }
        })
        .collect();
    let mut conn = ClientConn::new(
        Instant::now().into_std(),
        ClientConfig {
            device_id: options.device_id.clone(),
            client_version: options.client_version.clone(),
            network: options.network,
            apps,
            storage_epoch: resume.storage_epoch,
        },
    );
    let mut output = BytesMut::new();
    let mut handshake_done = false;
    let mut bind_failures = 0;
    let mut puller = Puller::default();
    loop {
        for (app, seq) in puller.due(Instant::now().into_std()) {
            // Not bound any more: the binding's end drops its notices too.
            let _ = conn.pull(&app, seq);
        }
        while let Some(frame) = conn.poll_transmit() {
            if let Err(error) = encode(&frame, &mut output) {
                return lost(
                    format!("cannot encode {:?}: {error}", frame.op()),
                    handshake_done,
                );
            }
        }
        if !output.is_empty()
            && let Err(error) = transport.send(&mut output).await
        {
            heartbeat_failed(&conn, learner, handshake_done);
            return lost(error, handshake_done);
        }
        for (app, acked, broadcast_acked) in conn.resume_points() {
            resume
                .by_app
                .insert(app.to_owned(), (acked, broadcast_acked));
        }
        resume.storage_epoch = conn.storage_epoch();
        let mut released = Vec::new();
        while let Some(event) = conn.poll_event() {
            let event = match event {
                ClientEvent::Ready { heartbeat_interval } => {
                    handshake_done = true;
                    if let Some(proposal) = learner
                        .as_mut()
                        .and_then(|learner| learner.connected(heartbeat_interval))
                    {
                        let _ = conn.propose_heartbeat(proposal);
                    }
                    Event::Connected {
                        gateway: gateway.to_owned(),
                        heartbeat_interval,
                    }
                }
                ClientEvent::Bound { app, user } => Event::Bound { app, user },
                ClientEvent::BindFailed { app, code, message } => {
                    bind_failures += 1;
                    if bind_failures >= options.apps.len() {
                        return Ended::Terminal(Terminal::AuthFailed { app, code, message });
                    }
                    Event::BindFailed { app, code, message }
                }
                ClientEvent::Push(push) => match puller.push(push) {
                    Some(event) => event,
                    None => continue,
                },
                ClientEvent::Notify(notification) => {
                    puller.notify(notification, Instant::now().into_std())
                }
                ClientEvent::Pulled {
                    app,
                    seq,
                    status,
                    message_id,
                    payload,
                } => {
                    let now = Instant::now().into_std();
                    released.extend(puller.pulled(&app, seq, status, message_id, payload, now));
                    continue;
                }
                ClientEvent::Broadcast(broadcast) => Event::Broadcast(broadcast),
                ClientEvent::Transient { app, payload } => Event::Transient { app, payload },
                ClientEvent::UpstreamAck {
                    app,
                    request_id,
                    status,
                } => Event::UpstreamAck {
                    app,
                    request_id,
                    status,
                },
                ClientEvent::Reset {
                    app,
                    sequence,
                    after,
                } => Event::Reset {
                    app,
                    sequence,
                    after,
                },
                ClientEvent::GoAway { reason, .. } if reason == GoAwayReason::KICKED => {
                    return Ended::Terminal(Terminal::Kicked);
                }
                ClientEvent::GoAway { reason, .. } if reason == GoAwayReason::APP_DELETED => {
                    return Ended::Terminal(Terminal::AppDeleted);
                }
                ClientEvent::Unbound { app, reason } => {
                    resume.deleted.insert(app.clone());
                    Event::Unbound { app, reason }
                }
                ClientEvent::GoAway {
                    reason,
                    reconnect_delay_ms,
                } => {
                    if let Some(learner) = learner.as_mut() {
                        learner.explained();
                    }
                    return Ended::Lost {
                        error: format!("server sent GOAWAY ({reason})"),
                        handshake_done,
                        hint: reconnect_delay_ms.map(|ms| Duration::from_millis(u64::from(ms))),
                    };
                }
                ClientEvent::ServerError { code, message } => {
                    // A server that predates HEARTBEAT refuses it: stop
                    // proposing, or every connection would end the same.
                    if learner.as_ref().is_some_and(|l| l.awaiting_answer()) {
                        *learner = None;
                    }
                    return lost(format!("protocol error {code}: {message}"), handshake_done);
                }
                ClientEvent::TimedOut => {
                    // Silent past twice the interval: the PING went unanswered.
                    if handshake_done && let Some(learner) = learner.as_mut() {
                        learner.failed();
                    }
                    return lost("server went silent", handshake_done);
                }
                ClientEvent::PingAnswered => {
                    if let Some(proposal) = learner.as_mut().and_then(|l| l.ping_answered()) {
                        let _ = conn.propose_heartbeat(proposal);
                    }
                    continue;
                }
                ClientEvent::HeartbeatSet { interval } => {
                    if let Some(learner) = learner.as_mut() {
                        learner.set(interval);
                    }
                    Event::HeartbeatSet { interval }
                }
                ClientEvent::PreviousTimedOut {
                    network,
                    interval,
                    closed_ago,
                } => {
                    // The last connection's pings stopped arriving: if it
                    // was lost without a known cause, its interval failed.
                    if let Some(proposal) = learner
                        .as_mut()
                        .and_then(|l| l.previous_timed_out(network, interval, closed_ago))
                    {
                        let _ = conn.propose_heartbeat(proposal);
                    }
                    continue;
                }
            };
            if events.send(event).await.is_err() {
                return Ended::Terminal(Terminal::ClosedByClient);
            }
        }
        for event in released {
            if events.send(event).await.is_err() {
                return Ended::Terminal(Terminal::ClosedByClient);
            }
        }
        let Some(deadline) = conn.poll_timeout() else {
            return lost("connection closed", handshake_done);
        };
        let deadline = puller.next_due().map_or(deadline, |due| due.min(deadline));
        tokio::select! {
            received = transport.receive() => match received {
                Ok(frame) => conn.handle_frame(Instant::now().into_std(), frame),
                Err(error) => {
                    heartbeat_failed(&conn, learner, handshake_done);
                    return lost(error, handshake_done);
                }
            },
            () = tokio::time::sleep_until(Instant::from_std(deadline)) => {
                conn.handle_timeout(Instant::now().into_std());
            }
            command = commands.recv() => match command {
                Some(Command::Ack { app, seq }) => {
                    conn.ack(&app, seq);
                }
                Some(Command::AckBroadcast { app, seq }) => {
                    conn.ack_broadcast(&app, seq);
                }
                Some(Command::Upstream {
                    app,
                    route,
                    payload,
                    reply,
                }) => {
                    let result =
                        conn.upstream(&app, route.as_deref(), payload)
                            .map_err(|error| match error {
                                ConnError::InvalidRoute => ClientError::InvalidRoute,
                                ConnError::NotBound | ConnError::Closed => ClientError::NotBound,
                            });
                    let _ = reply.send(result);
                }
                None | Some(Command::Close) => {
                    transport.close().await;
                    return Ended::Terminal(Terminal::ClosedByClient);
                }
            },
        }
    }
}
