//! The HTTP floor of `push --with-http-floor`: a server that takes the
//! same push calls as Herald's API (`POST
//! /v1/apps/{app}/users/{user}/messages`, a bearer token, a JSON body with
//! the payload), checks the app and the token, parses the body and answers
//! 200 with a body shaped as Herald's answer, and does nothing else: no
//! storage, no delivery. It runs on Herald's API stack (axum on hyper 1's
//! HTTP/1.1 server, a tokio multi-thread runtime of as many workers as
//! Herald's control plane has), in a process of its own (`herald-bench
//! http-floor-server`, hidden), so its row is what an API call in and an
//! answer out cost on the machine with this load generator.

use std::io::{BufRead as _, BufReader, ErrorKind};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Json, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt as _;

use crate::systems::{AppCreds, Server};

/// The row's name in the tables and the JSON.
pub const ROW: &str = "http-floor";

/// What the row is, printed with it and in its JSON (`label`).
pub const LABEL: &str = "HTTP floor: the same requests answered by a bare axum handler, nothing \
                         stored or delivered (latency from the request to its answer; Herald's \
                         rows time the push to the client's receipt)";

/// As Herald's API listener (control/src/http.rs): the load generator's
/// pool opens up to its in-flight limit of connections at once.
const LISTEN_BACKLOG: u32 = 1024;

/// As Herald's API: how long a failed accept that is not the client's own
/// waits before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Starts `herald-bench http-floor-server` on a free loopback port, taking
/// calls for `creds`' app and API key.
pub fn start(creds: &AppCreds) -> anyhow::Result<Server> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["http-floor-server", "--listen", "127.0.0.1:0"])
        .args(["--app", &creds.app, "--api-key", &creds.api_key])
        // Its end is how the server learns the benchmark is gone.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the http-floor server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = match line.trim().parse() {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the http-floor server did not say its address (said {line:?})");
        }
    };
    Ok(Server::child(child, addr, None))
}

/// `herald-bench http-floor-server`: serves the floor on `listen` and
/// prints the address it listens on; exits when its stdin ends.
pub fn serve(listen: SocketAddr, app: String, api_key: String) -> anyhow::Result<()> {
    // The same runtime as `herald`'s control plane (src/main.rs): tokio's
    // default worker count, one per CPU.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http-floor")
        .build()
        .context("cannot start the http-floor runtime")?;
    runtime.block_on(async move {
        let listener = bind(listen)?;
        println!("{}", listener.local_addr()?);
        // The benchmark kills the floor when its run ends; should the
        // benchmark itself be killed, the floor's stdin ends and it exits
        // rather than stay behind.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
        let floor = Arc::new(Floor {
            app,
            authorization: format!("Bearer {api_key}"),
            next_seq: AtomicU64::new(1),
        });
        accept(listener, router(floor)).await;
        Ok(())
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves each connection as Herald's API does (control/src/http.rs):
/// hyper's HTTP/1.1 connection with keep-alive, the router called once per
/// request, Nagle off; without its connection bounds and deadlines.
async fn accept(listener: TcpListener, router: Router) {
    let builder = http1::Builder::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            // As Herald's API: a failed accept is skipped, and one that is
            // not the client's (out of descriptors) retried after a pause
            // rather than in a busy loop.
            Err(error) => {
                if !matches!(
                    error.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionRefused
                ) {
                    eprintln!("herald-bench http-floor-server: accept: {error}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            router.clone().oneshot(request)
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            // A connection the load generator closes ends here.
            let _ = connection.await;
        });
    }
}

/// The one app the floor takes calls for, and its answers' sequence.
struct Floor {
    app: String,
    /// `Bearer <api key>`, as the calls must send it.
    authorization: String,
    /// One sequence for all users: keeping one per user would be storage.
    next_seq: AtomicU64,
}

fn router(floor: Arc<Floor>) -> Router {
    Router::new()
        .route("/v1/apps/{app}/users/{user}/messages", post(push))
        .with_state(floor)
}

/// The push call's body, as Herald's API takes it (other fields ignored).
#[derive(Deserialize)]
struct PushBody {
    payload: String,
}

/// Checks the app and the token, parses the body (axum's `Json`: the whole
/// body read, then serde_json), and answers as Herald's API answers a push
/// to an online user.
async fn push(
    State(floor): State<Arc<Floor>>,
    Path((app, _user)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<PushBody>,
) -> Result<Json<Value>, StatusCode> {
    if app != floor.app {
        return Err(StatusCode::NOT_FOUND);
    }
    if headers
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes())
        != Some(floor.authorization.as_bytes())
    {
        return Err(StatusCode::UNAUTHORIZED);
    }
    // A push must carry something; what it carries is dropped here.
    if body.payload.is_empty() {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(Json(json!({
        "seq": floor.next_seq.fetch_add(1, Ordering::Relaxed),
        "message_id": format!("{:032x}", rand::random::<u128>()),
        "online": true,
        "replayed": false,
    })))
}
