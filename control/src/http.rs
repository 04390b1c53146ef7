//! The API's HTTP/1.1 server: hyper under the axum router, with the bounds a
//! server facing the network needs. (`axum::serve` has none: a client that
//! sends half a request, or nothing, keeps its connection and its file
//! descriptor for as long as it likes.)
//!
//! - At most `connections_max` connections at once. While that many are
//!   open the server stops accepting: new ones wait in the kernel's backlog
//!   (`listen` makes it 1,024) rather than take descriptors the gateway
//!   needs.
//! - A request's head must be complete within `header_read_timeout`,
//!   counted from the accept for a connection's first request, and from the
//!   first byte of the next one on a kept-alive connection.
//! - A connection with no request in flight is closed after `idle_timeout`.
//! - A response the client does not take (no write progress) for
//!   `idle_timeout` ends the connection.
//! - The body deadline, `body_read_timeout`, is kept by the router, which
//!   reads every body whole before routing it (`input::read_body`).
//!
//! hyper's own `header_read_timeout` is off: it also runs between requests
//! on a kept-alive connection, with the same duration, so it cannot give an
//! idle connection longer than a slow head. The deadlines are kept by the
//! connection's socket wrapper (`DeadlineIo`) instead.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::header;
use futures_util::TryFutureExt;
use hyper::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// The bounds of the API's connections (`[api]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub connections_max: usize,
}

/// Largest request head (request line and headers). A head past it gets
/// hyper's bodiless 431. The API's heads are a few hundred bytes; hyper's
/// default (its whole read buffer, about 400 KiB) would let each slow
/// client pin that much.
const HEAD_BYTES_MAX: usize = 16 * 1024;

/// How long a closing connection keeps reading (and dropping) what the
/// client still sends, and how much of it. Closing with input unread makes
/// the kernel reset the connection, and the client could lose the answer
/// just written: a 413 or 408 is sent before the body was read.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES_MAX: usize = 1 << 20;

/// Connections the kernel holds completed for the API until it accepts
/// them (capped by `net.core.somaxconn`). tokio's default is std's 128: a
/// burst of clients past it (a load balancer opening its pool, business
/// servers reconnecting at once) has handshakes dropped, which the kernel
/// retries only after a second or more.
const LISTEN_BACKLOG: u32 = 1024;

/// A failed accept other than the client's own (out of descriptors or
/// memory) is retried after this, rather than in a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How often the server logs that it is at `connections_max`.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// A listener for the API on `addr`, with room in its backlog for bursts
/// and for the connections waiting past `connections_max`.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted server can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting and waits for the connections: requests in flight finish,
/// idle connections close.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(HEAD_BYTES_MAX)
        .keep_alive(true);
    let mut warned_full_at: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        if slots.available_permits() == 0
            && warned_full_at.is_none_or(|at| at.elapsed() >= FULL_WARNING_INTERVAL)
        {
            warned_full_at = Some(Instant::now());
            tracing::warn!(
                connections_max = limits.connections_max,
                "the API holds api.connections_max connections; new ones wait in the backlog"
            );
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer),
                Err(error) => {
                    if !is_client_error(&error) {
                        tracing::warn!(%error, "accepting an API connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are one write each: no reason to let Nagle hold them.
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new(limits));
        let io = TokioIo::new(DeadlineIo::new(
            stream,
            activity.clone(),
            limits.idle_timeout,
        ));
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            // What `allowed_cidrs` is checked against.
            request.extensions_mut().insert(ConnectInfo(peer));
            let done = ResponseDone::start(activity.clone());
            router.clone().oneshot(request).map_ok(move |response| {
                if response
                    .headers()
                    .get(header::CONNECTION)
                    .is_some_and(|value| value == "close")
                {
                    done.0.answered_before_reading();
                }
                response.map(|body| TrackedBody { body, _done: done })
            })
        });
        let connection = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "API connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A failed accept that concerns only that one client.
fn is_client_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Where a connection stands between requests, which decides its read
/// deadline. Shared by its socket (which keeps the deadline), its service
/// (a request's head has arrived) and its response bodies (an answer is
/// written).
struct Activity {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    state: Mutex<ActivityState>,
}

struct ActivityState {
    phase: Phase,
    /// The connection's task, as its socket last saw it waiting. Going idle
    /// wakes it: hyper polls a read again only when the socket wakes it,
    /// and the wait it is in began with no deadline.
    waiting: Option<Waker>,
    /// An answer was given before its request was read whole (the router
    /// marks those `Connection: close`: a 413 or 408), so closing lingers.
    lingers: bool,
}

enum Phase {
    /// A request's head is on its way and must be complete by `deadline`.
    Head { deadline: Instant },
    /// Requests are being handled or answered; the router keeps the body's
    /// deadline and a stalled answer is the write deadline's.
    Busy { requests: usize },
    /// Nothing in flight, and no byte of another request yet.
    Idle { deadline: Instant },
}

impl Activity {
    /// A new connection waits for its first request's head.
    fn new(limits: HttpLimits) -> Activity {
        Activity {
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            state: Mutex::new(ActivityState {
                phase: Phase::Head {
                    deadline: Instant::now() + limits.header_read_timeout,
                },
                waiting: None,
                lingers: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().expect("connection activity lock")
    }

    /// Bytes came in: on an idle connection, they start a request's head.
    fn bytes_arrived(&self) {
        let mut state = self.state();
        if let Phase::Idle { .. } = state.phase {
            state.phase = Phase::Head {
                deadline: Instant::now() + self.header_read_timeout,
            };
        }
    }

    fn request_started(&self) {
        let mut state = self.state();
        state.phase = match state.phase {
            Phase::Busy { requests } => Phase::Busy {
                requests: requests + 1,
            },
            Phase::Head { .. } | Phase::Idle { .. } => Phase::Busy { requests: 1 },
        };
    }

    fn response_finished(&self) {
        let waiting = {
            let mut state = self.state();
            match state.phase {
                Phase::Busy { requests } if requests > 1 => {
                    state.phase = Phase::Busy {
                        requests: requests - 1,
                    };
                    None
                }
                Phase::Busy { .. } => {
                    state.phase = Phase::Idle {
                        deadline: Instant::now() + self.idle_timeout,
                    };
                    state.waiting.take()
                }
                Phase::Head { .. } | Phase::Idle { .. } => None,
            }
        };
        if let Some(task) = waiting {
            task.wake();
        }
    }

    fn answered_before_reading(&self) {
        self.state().lingers = true;
    }

    fn lingers(&self) -> bool {
        self.state().lingers
    }

    /// The read deadline, if reads have one now; notes the task that waits.
    fn read_deadline(&self, waiting: &Waker) -> Option<Instant> {
        let mut state = self.state();
        if !state
            .waiting
            .as_ref()
            .is_some_and(|task| task.will_wake(waiting))
        {
            state.waiting = Some(waiting.clone());
        }
        match state.phase {
            Phase::Head { deadline } | Phase::Idle { deadline } => Some(deadline),
            Phase::Busy { .. } => None,
        }
    }
}

/// Marks a request in flight from its head until its answer is written (or
/// dropped with the connection).
struct ResponseDone(Arc<Activity>);

impl ResponseDone {
    fn start(activity: Arc<Activity>) -> ResponseDone {
        activity.request_started();
        ResponseDone(activity)
    }
}

impl Drop for ResponseDone {
    fn drop(&mut self) {
        self.0.response_finished();
    }
}

/// A response body that holds its request in flight: hyper drops it once
/// the body is written.
struct TrackedBody {
    body: Body,
    _done: ResponseDone,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket with its deadlines: a read or a write still
/// waiting when its deadline passes fails with `TimedOut`, which ends the
/// connection. Shutting it down lingers (`LINGER`) after an answer given
/// before its request was read whole.
struct DeadlineIo {
    stream: TcpStream,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    /// Since when writes have found the socket full, while they do.
    write_blocked_since: Option<Instant>,
    /// Wakes the connection's task at the nearest deadline.
    timer: Pin<Box<Sleep>>,
    /// Set once the write side is shut: the end of the linger.
    linger: Option<Linger>,
}

struct Linger {
    until: Instant,
    bytes_dropped: usize,
}

impl DeadlineIo {
    fn new(stream: TcpStream, activity: Arc<Activity>, idle_timeout: Duration) -> DeadlineIo {
        DeadlineIo {
            stream,
            activity,
            idle_timeout,
            write_blocked_since: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            linger: None,
        }
    }

    /// For a read or write that found the socket not ready: an error once
    /// the nearest deadline passed, else the task is woken at it.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let write_deadline = self
            .write_blocked_since
            .map(|since| since + self.idle_timeout);
        let Some(deadline) = [self.activity.read_deadline(cx.waker()), write_deadline]
            .into_iter()
            .flatten()
            .min()
        else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client missed the connection's deadline",
            ));
        }
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        // Only registers the waker: the deadline is still ahead.
        let _ = self.timer.as_mut().poll(cx);
        Ok(())
    }

    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if written.is_pending() {
            self.write_blocked_since.get_or_insert_with(Instant::now);
            self.check_deadline(cx)?;
        } else {
            self.write_blocked_since = None;
        }
        written
    }
}

impl AsyncRead for DeadlineIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let filled_before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > filled_before => {
                this.activity.bytes_arrived();
            }
            Poll::Pending => this.check_deadline(cx)?,
            Poll::Ready(_) => {}
        }
        read
    }
}

impl AsyncWrite for DeadlineIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    /// Shuts the write side (the client sees the end of the answer), then,
    /// if the answer came before the request was read whole, reads and drops
    /// the client's input until its EOF, `LINGER` or `LINGER_BYTES_MAX`,
    /// whichever comes first.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            if !this.activity.lingers() {
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Linger {
                until: Instant::now() + LINGER,
                bytes_dropped: 0,
            });
        }
        let linger = this.linger.as_mut().expect("set above");
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.bytes_dropped += buf.filled().len();
                    if linger.bytes_dropped >= LINGER_BYTES_MAX {
                        return Poll::Ready(Ok(()));
                    }
                }
                // EOF, or the client is gone: nothing left to protect.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        if this.timer.deadline() != linger.until {
            this.timer.as_mut().reset(linger.until);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}
