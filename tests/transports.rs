//! The gateway over TLS, WebSocket and WebSocket over TLS, against the
//! real `herald serve --tls-self-signed`: the SDK and `herald listen` on
//! each, and bad input at each layer getting its documented answer, being
//! counted, and leaving other clients served.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use herald_client::{Client, ClientOptions, Event};
use herald_proto::{Frame, GoAwayReason, NetworkType, decode_slice, encode};
use support::{API_KEY, APP, RawClient, Reaped, Server, WAIT, herald_bin, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALLOWED_ORIGIN: &str = "https://app.example.com";

/// `herald serve` with tls, ws and wss listeners beside plain TCP, on the
/// self-signed certificate, and one allowed origin.
fn server() -> Server {
    Server::start_with_args(
        &format!("[gateway.websocket]\nallowed_origins = [\"{ALLOWED_ORIGIN}\"]\n"),
        &[
            "--tls-self-signed",
            "--listener",
            "tls=127.0.0.1:0",
            "--listener",
            "ws=127.0.0.1:0",
            "--listener",
            "wss=127.0.0.1:0",
        ],
    )
}

fn ca_file(server: &Server) -> PathBuf {
    server.data_dir.join("tls/self-signed-cert.pem")
}

fn address(server: &Server, transport: &str) -> String {
    server
        .gateways
        .get(transport)
        .unwrap_or_else(|| panic!("no {transport} listener in {:?}", server.gateways))
        .clone()
}

fn sdk(server: &Server, transport: &str, user: &str) -> Client {
    Client::start(ClientOptions {
        ca_file: Some(ca_file(server)),
        device_id: format!("{transport}-device"),
        ..support::sdk_options(&address(server, transport), token(user, 3600))
    })
}

async fn next_push(client: &mut Client) -> (u64, String) {
    let wanted = async {
        loop {
            match client.next_event().await.expect("client stopped") {
                Event::Push(push) => {
                    return (push.seq, String::from_utf8(push.payload.to_vec()).unwrap());
                }
                Event::Closed(why) => panic!("closed: {why}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, wanted)
        .await
        .expect("timed out waiting for a push")
}

async fn wait_bound(client: &mut Client) {
    let bound = async {
        loop {
            match client.next_event().await.expect("client stopped") {
                Event::Bound { .. } => return,
                Event::Disconnected { error, .. } => panic!("disconnected: {error}"),
                Event::Closed(why) => panic!("closed: {why}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, bound)
        .await
        .expect("timed out binding");
}

#[tokio::test]
async fn the_sdk_receives_pushes_over_tls_ws_and_wss() {
    let server = server();
    for transport in ["tls", "ws", "wss"] {
        let user = format!("user-{transport}");
        let mut client = sdk(&server, transport, &user);
        wait_bound(&mut client).await;
        for n in 1..=3u64 {
            server.push(&user, &format!("{transport} {n}")).await;
            assert_eq!(
                next_push(&mut client).await,
                (n, format!("{transport} {n}"))
            );
        }
        // A payload of many TLS records and WebSocket's longest length form.
        let big = "x".repeat(1000);
        server.push(&user, &big).await;
        assert_eq!(next_push(&mut client).await, (4, big));
        client.close().await;
    }
}

#[tokio::test]
async fn listen_follows_a_push_over_wss() {
    let server = server();
    let ca = ca_file(&server);
    let mut listen = Reaped(
        Command::new(herald_bin())
            .args(["listen", "--gateway", &address(&server, "wss")])
            .arg("--ca")
            .arg(&ca)
            .args([
                "--app",
                APP,
                "--user",
                "wendy",
                "--token",
                &token("wendy", 3600),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(listen.0.stdout.take().unwrap()).lines();
    server.wait_connections("wendy", 1).await;
    server.push("wendy", "over wss").await;
    let line = tokio::task::spawn_blocking(move || lines.next().unwrap().unwrap())
        .await
        .unwrap();
    let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(printed["payload"], "over wss");
    assert_eq!(printed["seq"], 1);
}

/// A raw WebSocket client on plain TCP, for what the SDK never sends.
struct RawWs {
    stream: TcpStream,
    input: Vec<u8>,
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(path: &str, headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{headers}\r\n"
    )
}

fn good_headers() -> String {
    format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nOrigin: {ALLOWED_ORIGIN}\r\n")
}

impl RawWs {
    /// Sends `request`; returns the client and the response head.
    async fn upgrade(addr: &str, request: &str) -> (RawWs, String) {
        let addr = addr
            .trim_start_matches("ws://")
            .trim_end_matches("/v1/connect");
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut input = Vec::new();
        let head_end = loop {
            if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("no answer to the upgrade")
                .unwrap();
            assert!(
                n > 0,
                "closed without an answer: {:?}",
                String::from_utf8_lossy(&input)
            );
            input.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(input[..head_end].to_vec()).unwrap();
        input.drain(..head_end);
        (RawWs { stream, input }, head)
    }

    async fn opened(addr: &str) -> RawWs {
        let (ws, head) =
            RawWs::upgrade(addr, &upgrade_request("/v1/connect", &good_headers())).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        ws
    }

    /// Sends one masked frame.
    async fn send_frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut bytes = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            0..=125 => bytes.push(mask_bit | payload.len() as u8),
            126..=0xFFFF => {
                bytes.push(mask_bit | 126);
                bytes.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                bytes.push(mask_bit | 127);
                bytes.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        let mask = [9, 8, 7, 6];
        if masked {
            bytes.extend_from_slice(&mask);
        }
        bytes.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| if masked { b ^ mask[i % 4] } else { *b }),
        );
        self.stream.write_all(&bytes).await.unwrap();
    }

    async fn send_herald(&mut self, frame: Frame) {
        let mut bytes = bytes::BytesMut::new();
        encode(&frame, &mut bytes).unwrap();
        self.send_frame(0x82, &bytes, true).await;
    }

    /// The next server frame: (opcode, payload); `None` once closed.
    async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.input.len() >= 2 {
                let opcode = self.input[0] & 0x0F;
                let (len, at) = match self.input[1] & 0x7F {
                    126 if self.input.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.input[2], self.input[3]])),
                        4,
                    ),
                    127 if self.input.len() >= 10 => (
                        u64::from_be_bytes(self.input[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    len @ 0..=125 => (usize::from(len), 2),
                    _ => (usize::MAX, 0),
                };
                if at > 0 && self.input.len() >= at + len {
                    let payload = self.input[at..at + len].to_vec();
                    self.input.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            let mut chunk = [0; 4096];
            let n = match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => panic!("timed out waiting for a frame"),
            };
            if n == 0 {
                return None;
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }

    async fn recv_herald(&mut self) -> Frame {
        let (opcode, payload) = self.recv().await.expect("closed");
        assert_eq!(opcode, 2, "a binary message");
        let (frame, used) = decode_slice(&payload).unwrap().unwrap();
        assert_eq!(used, payload.len(), "one frame per message");
        frame
    }

    /// The close frame's code, then the end of the connection.
    async fn expect_close(&mut self, code: u16) -> String {
        loop {
            match self.recv().await {
                Some((8, payload)) => {
                    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
                    let reason = String::from_utf8(payload[2..].to_vec()).unwrap();
                    // Our side of the close; then the server ends the TCP connection.
                    self.send_frame(0x88, &payload[..2], true).await;
                    while self.recv().await.is_some() {}
                    return reason;
                }
                Some(_) => continue,
                None => panic!("closed without a close frame (expected {code})"),
            }
        }
    }

    async fn hello_and_bind(&mut self, user: &str) {
        self.send_herald(Frame::Hello {
            device_id: "raw".to_owned(),
            client_version: "test".to_owned(),
            network: NetworkType::Wifi,
            features: herald_proto::Features::ALL,
        })
        .await;
        assert!(matches!(self.recv_herald().await, Frame::HelloOk { .. }));
        self.send_herald(Frame::Bind {
            app: APP.to_owned(),
            token: token(user, 3600),
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        })
        .await;
        assert!(matches!(self.recv_herald().await, Frame::BindOk { .. }));
    }
}

#[tokio::test]
async fn a_websocket_client_speaks_herald_in_binary_messages() {
    let server = server();
    let ws = address(&server, "ws");
    let mut client = RawWs::opened(&ws).await;
    client.hello_and_bind("walt").await;
    // A WebSocket ping gets a pong; a Herald PING gets a PONG.
    client.send_frame(0x89, b"are you there", true).await;
    assert_eq!(client.recv().await, Some((0xA, b"are you there".to_vec())));
    client.send_herald(Frame::Ping).await;
    assert_eq!(client.recv_herald().await, Frame::Pong);
    // A message fragmented over three frames is one Herald frame.
    let mut ping = bytes::BytesMut::new();
    encode(&Frame::Ping, &mut ping).unwrap();
    client.send_frame(0x02, &ping[..2], true).await;
    client.send_frame(0x00, &ping[2..4], true).await;
    client.send_frame(0x80, &ping[4..], true).await;
    assert_eq!(client.recv_herald().await, Frame::Pong);
    server.push("walt", "hello over ws").await;
    assert!(matches!(
        client.recv_herald().await,
        Frame::Push { seq: 1, .. }
    ));
    // A kick: GOAWAY(kicked), then close 1000 with the reason's name.
    let (status, _) = server
        .post(
            &format!("/v1/apps/{APP}/users/walt/kick"),
            API_KEY,
            String::new(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        client.recv_herald().await,
        Frame::GoAway {
            reason: GoAwayReason::KICKED,
            reconnect_delay_ms: None
        }
    );
    assert_eq!(client.expect_close(1000).await, "kicked");
}

#[tokio::test]
async fn bad_upgrades_get_their_status_and_are_counted() {
    let server = server();
    let ws = address(&server, "ws");
    let mut bystander = RawWs::opened(&ws).await;
    bystander.hello_and_bind("betty").await;
    let no_key = "Sec-WebSocket-Version: 13\r\n".to_owned();
    let cases = [
        (upgrade_request("/elsewhere", &good_headers()), "404"),
        (upgrade_request("/v1/connect", &no_key), "400"),
        (
            upgrade_request(
                "/v1/connect",
                &good_headers().replace("Version: 13", "Version: 8"),
            ),
            "426",
        ),
        (
            upgrade_request(
                "/v1/connect",
                &good_headers().replace(ALLOWED_ORIGIN, "https://evil.example"),
            ),
            "403",
        ),
    ];
    for (request, status) in &cases {
        let (mut client, head) = RawWs::upgrade(&ws, request).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert_eq!(client.recv().await, None, "closed after the refusal");
    }
    server
        .wait_for_metric(
            "herald_connections_closed_total{reason=\"websocket_upgrade_refused\"}",
            cases.len() as u64,
        )
        .await;
    server.push("betty", "still here").await;
    assert!(matches!(
        bystander.recv_herald().await,
        Frame::Push { seq: 1, .. }
    ));
}

#[tokio::test]
async fn websocket_violations_get_their_close_codes_and_are_counted() {
    let server = server();
    let ws = address(&server, "ws");
    let mut bystander = RawWs::opened(&ws).await;
    bystander.hello_and_bind("betty").await;

    let mut unmasked = RawWs::opened(&ws).await;
    unmasked
        .send_frame(0x82, b"\x00\x00\x00\x02\x01\x06", false)
        .await;
    unmasked.expect_close(1002).await;

    let mut text = RawWs::opened(&ws).await;
    text.send_frame(0x81, b"hello", true).await;
    text.expect_close(1003).await;

    // 16 MiB announced: refused from the header, before any of it is read.
    let mut huge = RawWs::opened(&ws).await;
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(16u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    huge.stream.write_all(&header).await.unwrap();
    huge.expect_close(1009).await;

    // Two frames in one message is a Herald protocol error: ERROR, GOAWAY,
    // then close 1002.
    let mut two = RawWs::opened(&ws).await;
    let mut bytes = bytes::BytesMut::new();
    encode(
        &Frame::Hello {
            device_id: "two".to_owned(),
            client_version: String::new(),
            network: NetworkType::Wifi,
            features: herald_proto::Features::ALL,
        },
        &mut bytes,
    )
    .unwrap();
    encode(&Frame::Ping, &mut bytes).unwrap();
    two.send_frame(0x82, &bytes, true).await;
    assert!(matches!(two.recv_herald().await, Frame::Error { .. }));
    assert!(matches!(
        two.recv_herald().await,
        Frame::GoAway {
            reason: GoAwayReason::PROTOCOL_ERROR,
            ..
        }
    ));
    two.expect_close(1002).await;

    server
        .wait_for_metric(
            "herald_connections_closed_total{reason=\"websocket_error\"}",
            3,
        )
        .await;
    server.push("betty", "still here").await;
    assert!(matches!(
        bystander.recv_herald().await,
        Frame::Push { seq: 1, .. }
    ));
}

/// A TLS client trusting `ca` (PEM).
fn tls_connector(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_handshake(
    server: &Server,
    ca: &std::path::Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let addr = address(server, "tls");
    let stream = TcpStream::connect(addr.trim_start_matches("tls://")).await?;
    tls_connector(ca)
        .connect("localhost".try_into().unwrap(), stream)
        .await
}

#[tokio::test]
async fn bad_tls_input_is_closed_and_counted_and_others_are_served() {
    let server = server();
    let mut bystander = RawClient::bound(&server.gateway, "phone", "betty", None).await;
    let tls = address(&server, "tls");
    let tls = tls.trim_start_matches("tls://");

    // Garbage instead of a ClientHello.
    let mut garbage = TcpStream::connect(tls).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, garbage.read_to_end(&mut rest))
        .await
        .expect("the server closes");
    server
        .wait_for_metric("herald_connections_closed_total{reason=\"tls_error\"}", 1)
        .await;

    // A handshake that stops halfway is closed at the auth timeout (3 s in
    // the test config).
    let mut stalled = TcpStream::connect(tls).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stalled.read_to_end(&mut rest))
        .await
        .expect("the server closes a stalled handshake");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A proper handshake still works, and the plain client was served.
    let mut good = tls_handshake(&server, &ca_file(&server)).await.unwrap();
    let mut hello = bytes::BytesMut::new();
    encode(
        &Frame::Hello {
            device_id: "tls".to_owned(),
            client_version: String::new(),
            network: NetworkType::Wifi,
            features: herald_proto::Features::ALL,
        },
        &mut hello,
    )
    .unwrap();
    good.write_all(&hello).await.unwrap();
    let mut answer = [0; 18];
    good.read_exact(&mut answer).await.unwrap();
    assert!(matches!(
        decode_slice(&answer).unwrap(),
        Some((Frame::HelloOk { .. }, 18))
    ));
    server.push("betty", "still here").await;
    assert_eq!(bystander.recv_push().await, (1, "still here".to_owned()));
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_handshakes_only() {
    let server = server();
    let ca = ca_file(&server);
    let old_ca = server.data_dir.join("old-ca.pem");
    std::fs::copy(&ca, &old_ca).unwrap();
    let mut established = sdk(&server, "wss", "ruth");
    wait_bound(&mut established).await;

    // A new certificate in the same files, then SIGHUP.
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(&ca, made.cert.pem()).unwrap();
    std::fs::write(
        server.data_dir.join("tls/self-signed-key.pem"),
        made.signing_key.serialize_pem(),
    )
    .unwrap();
    let hangup = || {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    };
    hangup();
    let new_trusted = async {
        loop {
            if tls_handshake(&server, &ca).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, new_trusted)
        .await
        .expect("new handshakes use the new certificate");
    assert!(
        tls_handshake(&server, &old_ca).await.is_err(),
        "the old certificate is gone for new handshakes"
    );
    // The established connection goes on.
    server.push("ruth", "after the reload").await;
    assert_eq!(
        next_push(&mut established).await,
        (1, "after the reload".to_owned())
    );

    // A broken key file: the certificate in use stays.
    std::fs::write(server.data_dir.join("tls/self-signed-key.pem"), "not a key").unwrap();
    hangup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tls_handshake(&server, &ca).await.is_ok());
    established.close().await;
}

#[tokio::test]
async fn a_websocket_client_that_never_reads_is_cut_off_as_a_slow_consumer() {
    let server = server();
    let mut client = RawWs::opened(&address(&server, "ws")).await;
    client.hello_and_bind("sam").await;
    // A burst of PING messages whose PONGs are never read.
    let mut ping = bytes::BytesMut::new();
    encode(&Frame::Ping, &mut ping).unwrap();
    let mask = [1, 2, 3, 4];
    let mut message = vec![0x82, 0x80 | ping.len() as u8];
    message.extend_from_slice(&mask);
    message.extend(ping.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let burst: Vec<u8> = message.repeat(60_000 / message.len());
    let writer = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if client.stream.write_all(&burst).await.is_err() {
                return;
            }
        }
    });
    server
        .wait_for_metric(
            "herald_connections_closed_total{reason=\"slow_consumer\"}",
            1,
        )
        .await;
    writer.abort();
}
