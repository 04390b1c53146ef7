//! The API's HTTP edges: slow clients are cut at their deadlines while
//! everyone else is served, a body past the limit is refused from its
//! headers, and the connection bound holds.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::{API_KEY, Server, WAIT, read_response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const PUSH_PATH: &str = "/v1/apps/chat/users/alice/messages";

/// A request head for a push, without its final blank line.
fn push_head_lines(extra: &str) -> String {
    format!(
        "POST {PUSH_PATH} HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {API_KEY}\r\n{extra}"
    )
}

/// What a slow client does before it goes quiet.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slow {
    /// Connects and sends nothing.
    Silent,
    /// Sends part of a request head.
    PartialHead,
    /// Sends a whole head and part of the body it announced.
    PartialBody,
    /// Announces a body far past the limit and sends one byte of it.
    HugeLength,
    /// Makes one request, reads the answer, and keeps the connection.
    IdleKeepAlive,
}

const KINDS: [Slow; 5] = [
    Slow::Silent,
    Slow::PartialHead,
    Slow::PartialBody,
    Slow::HugeLength,
    Slow::IdleKeepAlive,
];

/// The test server's deadlines (`[api]` below), each different, so a
/// connection closed by the wrong one shows.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(3);
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// How much later than its deadline a connection may close (the server
/// is handling a thousand of them on two cores shared with this test).
const CLOSE_SLACK: Duration = Duration::from_secs(1);
/// How much earlier: the server's clock starts at its accept, which may
/// come a moment before this side's `since`.
const EARLY_SLACK: Duration = Duration::from_millis(300);

impl Slow {
    /// When the server should close it, counted from `since` in `hold`.
    fn deadline(self) -> Duration {
        match self {
            Slow::Silent | Slow::PartialHead => HEADER_READ_TIMEOUT,
            Slow::PartialBody => BODY_READ_TIMEOUT,
            Slow::HugeLength => Duration::ZERO,
            Slow::IdleKeepAlive => IDLE_TIMEOUT,
        }
    }

    /// The answer the server gives before it closes, if any.
    fn answer(self) -> Option<(u16, &'static str)> {
        match self {
            Slow::PartialBody => Some((408, "request_timeout")),
            Slow::HugeLength => Some((413, "payload_too_large")),
            Slow::Silent | Slow::PartialHead | Slow::IdleKeepAlive => None,
        }
    }
}

struct Held {
    kind: Slow,
    /// From `since` to the server's close; `None`: not closed in time.
    closed_after: Option<Duration>,
    /// What came before the close.
    answer: Option<(u16, Value)>,
    /// Bytes after the answer (or instead of one).
    trailing: Vec<u8>,
}

/// Opens one slow connection, reports when it has done its part, then
/// waits for the server to close it.
async fn hold(
    api: String,
    kind: Slow,
    ready: tokio::sync::mpsc::Sender<()>,
    closed_early: Arc<AtomicUsize>,
) -> Held {
    let mut stream = TcpStream::connect(&api).await.unwrap();
    match kind {
        Slow::Silent => {}
        Slow::PartialHead => {
            stream
                .write_all(push_head_lines("Content-Type: appl").as_bytes())
                .await
                .unwrap();
        }
        Slow::PartialBody => {
            let head = push_head_lines("Content-Length: 100\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(br#"{"payload": "#).await.unwrap();
        }
        Slow::HugeLength => {
            let head = push_head_lines("Content-Length: 9999999999999\r\n\r\n{");
            stream.write_all(head.as_bytes()).await.unwrap();
        }
        Slow::IdleKeepAlive => {
            stream
                .write_all(b"GET /livez HTTP/1.1\r\nHost: herald\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(read_response(&mut stream).await.status, 200);
        }
    }
    let since = Instant::now();
    ready.send(()).await.unwrap();
    let give_up = kind.deadline() + CLOSE_SLACK + Duration::from_secs(2);
    let answer = match kind.answer() {
        Some(_) => match tokio::time::timeout(give_up, read_response(&mut stream)).await {
            Ok(response) => Some((response.status, response.body)),
            Err(_) => None,
        },
        None => None,
    };
    let mut trailing = Vec::new();
    let closed = tokio::time::timeout(give_up.saturating_sub(since.elapsed()), async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => trailing.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let closed_after = closed.ok().map(|()| since.elapsed());
    if closed_after.is_some() && kind != Slow::HugeLength {
        closed_early.fetch_add(1, Ordering::Relaxed);
    }
    Held {
        kind,
        closed_after,
        answer,
        trailing,
    }
}

/// Pushes once on a new connection and returns how long the answer took.
async fn timed_push(server: &Server, payload: &str) -> Duration {
    let started = Instant::now();
    let (status, body) = server
        .post(
            PUSH_PATH,
            API_KEY,
            serde_json::json!({ "payload": payload }).to_string(),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_clients_are_cut_at_their_deadlines_while_pushes_are_answered() {
    const SLOW_CLIENTS: usize = 1_000;
    let server = Server::start_with_api_settings(&format!(
        "header_read_timeout_secs = {}\nbody_read_timeout_secs = {}\nidle_timeout_secs = {}",
        HEADER_READ_TIMEOUT.as_secs(),
        BODY_READ_TIMEOUT.as_secs(),
        IDLE_TIMEOUT.as_secs()
    ));
    let baseline = timed_push(&server, "before").await;

    let started = Instant::now();
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(SLOW_CLIENTS);
    let closed = Arc::new(AtomicUsize::new(0));
    let held: Vec<_> = (0..SLOW_CLIENTS)
        .map(|i| {
            tokio::spawn(hold(
                server.api.clone(),
                KINDS[i % KINDS.len()],
                ready_tx.clone(),
                closed.clone(),
            ))
        })
        .collect();
    for _ in 0..SLOW_CLIENTS {
        ready.recv().await.unwrap();
    }
    let set_up = started.elapsed();

    let mut pushes = Vec::new();
    for i in 0..5 {
        pushes.push(timed_push(&server, &format!("during {i}")).await);
    }
    let closed_during_pushes = closed.load(Ordering::Relaxed);
    let pushed_by = started.elapsed();

    let mut held_results = Vec::new();
    for task in held {
        held_results.push(task.await.unwrap());
    }
    println!(
        "{SLOW_CLIENTS} slow connections open and in place after {set_up:?}; \
         push latency before them {baseline:?}, while they were held {pushes:?} \
         (all done {pushed_by:?} after the first connect)"
    );
    for kind in KINDS {
        let times: Vec<Duration> = held_results
            .iter()
            .filter(|held| held.kind == kind)
            .filter_map(|held| held.closed_after)
            .collect();
        let count = held_results.iter().filter(|held| held.kind == kind).count();
        println!(
            "{kind:?}: {} of {count} closed by the server, deadline {:?}, closed after {:?} to {:?}",
            times.len(),
            kind.deadline(),
            times.iter().min(),
            times.iter().max(),
        );
    }

    assert_eq!(
        closed_during_pushes, 0,
        "slow connections were closed before the pushes were measured"
    );
    for (i, took) in pushes.iter().enumerate() {
        assert!(
            *took < Duration::from_millis(100),
            "push {i} took {took:?} while {SLOW_CLIENTS} slow connections were held"
        );
    }
    for held in &held_results {
        let kind = held.kind;
        let closed_after = held
            .closed_after
            .unwrap_or_else(|| panic!("a {kind:?} connection was not closed by its deadline"));
        assert!(
            closed_after <= kind.deadline() + CLOSE_SLACK,
            "a {kind:?} connection closed after {closed_after:?}, deadline {:?}",
            kind.deadline()
        );
        assert!(
            closed_after + EARLY_SLACK >= kind.deadline(),
            "a {kind:?} connection closed after {closed_after:?}, before its deadline {:?}",
            kind.deadline()
        );
        let answer = held
            .answer
            .as_ref()
            .map(|(status, body)| (*status, body["error"]["code"].as_str().unwrap_or("")));
        assert_eq!(answer, kind.answer(), "{kind:?}");
        assert!(
            held.trailing.is_empty(),
            "a {kind:?} connection got more than its answer: {:?}",
            String::from_utf8_lossy(&held.trailing)
        );
    }
    // The server still serves.
    assert!(timed_push(&server, "after").await < Duration::from_millis(100));
}

#[tokio::test]
async fn a_body_past_the_limit_is_refused_from_its_headers() {
    let server = Server::start();
    // The default body timeout is 30 s: an answer within 2 s did not wait
    // for the body.
    let quick = Duration::from_secs(2);
    for extra in ["", "Expect: 100-continue\r\n"] {
        let mut stream = TcpStream::connect(&server.api).await.unwrap();
        let head = push_head_lines(&format!("{extra}Content-Length: 9999999999999\r\n\r\n{{"));
        stream.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let response = tokio::time::timeout(quick, read_response(&mut stream))
            .await
            .expect("no answer from the headers alone");
        println!(
            "413 for Content-Length: 9999999999999 ({extra:?}) after {:?}",
            started.elapsed()
        );
        assert_eq!(response.status, 413, "{response:?}");
        assert_eq!(response.body["error"]["code"], "payload_too_large");
        assert_eq!(response.header("connection"), Some("close"));
        let mut rest = Vec::new();
        tokio::time::timeout(quick, stream.read_to_end(&mut rest))
            .await
            .expect("the connection stayed open after the 413")
            .unwrap();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }

    // A chunked body is refused once it passes the limit (65,024 x 2 + 64
    // KiB: twice the larger payload limit, notify's, and room for the rest),
    // without its last chunk.
    let mut stream = TcpStream::connect(&server.api).await.unwrap();
    let head = push_head_lines("Transfer-Encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
    for _ in 0..13 {
        stream.write_all(chunk.as_bytes()).await.unwrap();
    }
    let response = tokio::time::timeout(quick, read_response(&mut stream))
        .await
        .expect("no answer to a chunked body past the limit");
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.body["error"]["code"], "payload_too_large");

    // Nothing was stored, and a push goes through.
    assert_eq!(server.push("alice", "fine").await["seq"], 1);
}

#[tokio::test]
async fn past_connections_max_a_connection_waits_in_the_backlog_until_one_closes() {
    const CONNECTIONS_MAX: usize = 8;
    let server = Server::start_with_api_settings(&format!("connections_max = {CONNECTIONS_MAX}"));
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS_MAX {
        held.push(TcpStream::connect(&server.api).await.unwrap());
    }
    // The kernel completes the handshake; the server does not accept it.
    let mut waiting = TcpStream::connect(&server.api).await.unwrap();
    waiting
        .write_all(b"GET /livez HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.peek(&mut byte)).await;
    assert!(
        early.is_err(),
        "connection {} was answered while {CONNECTIONS_MAX} were open",
        CONNECTIONS_MAX + 1
    );

    drop(held.pop());
    let freed = Instant::now();
    let response = tokio::time::timeout(WAIT, read_response(&mut waiting))
        .await
        .expect("the waiting connection was not served after one closed");
    println!(
        "connection {} served {:?} after one of {CONNECTIONS_MAX} closed",
        CONNECTIONS_MAX + 1,
        freed.elapsed()
    );
    assert_eq!(response.status, 200);
    assert!(freed.elapsed() < Duration::from_secs(1));

    // The held ones are still open (their header deadline is 10 s away):
    // the bound made the ninth wait, not a closed connection.
    for stream in &mut held {
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: herald\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(stream).await.status, 200);
    }
}

#[tokio::test]
async fn a_kept_alive_connection_gets_the_idle_timeout_then_the_header_timeout() {
    // Idle longer than the header timeout: a connection between requests
    // is not held to the head's deadline, and the next head is.
    let server =
        Server::start_with_api_settings("header_read_timeout_secs = 1\nidle_timeout_secs = 3");
    let mut stream = TcpStream::connect(&server.api).await.unwrap();
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.status, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: her")
        .await
        .unwrap();
    let sent = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the slow head was not cut off")
        .unwrap();
    let closed_after = sent.elapsed();
    println!("a head begun after 2 s idle was cut off {closed_after:?} after its first byte");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        (Duration::from_millis(700)..Duration::from_secs(2)).contains(&closed_after),
        "closed {closed_after:?} after the head began; the header timeout is 1 s"
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_its_answers_is_cut_off() {
    let server = Server::start_with_api_settings("idle_timeout_secs = 2");
    // A hundred 1,000-byte messages: each pull answers about 250 KB.
    let payload = "p".repeat(1000);
    for _ in 0..100 {
        server.push("reader", &payload).await;
    }
    const PULLS: usize = 200;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.api.parse().unwrap()).await.unwrap();
    let pull = format!(
        "GET /v1/apps/chat/users/reader/messages?limit=100 HTTP/1.1\r\nHost: herald\r\n\
         Authorization: Bearer {API_KEY}\r\n\r\n"
    );
    stream
        .write_all(pull.repeat(PULLS).as_bytes())
        .await
        .unwrap();
    // 50 MB of answers are far more than the socket buffers hold: the
    // server's writes stall, and the deadline passes while this sleeps.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let answers = received
        .windows(15)
        .filter(|window| *window == b"HTTP/1.1 200 OK")
        .count();
    println!(
        "a client that stopped reading got {answers} of {PULLS} answers ({} bytes) before the cut",
        received.len()
    );
    assert!(closed.is_ok(), "the connection was not closed");
    assert!(
        answers < PULLS,
        "every answer was written: the client was never cut off"
    );
}
