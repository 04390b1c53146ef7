//! The SDK over tcp, tls, ws and wss, against a gateway in this test that
//! speaks just enough Herald (HELLO_OK, BIND_OK, PUSH), with certificates
//! made here: trusted, self-signed, expired and for another host.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use herald_client::{
    AckMode, AppToken, Backoff, Client, ClientOptions, Dispatch, Event, Transport,
};
use herald_proto::{Frame, MessageId, NetworkType, decode, encode};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::NamedTempFile;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, http};

const APP: &str = "chat";
const USER: &str = "alice";
const WAIT: Duration = Duration::from_secs(10);

/// A test CA, and the PEM file a client is told to trust.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: NamedTempFile,
}

/// A certificate chain and its key, for the test gateway.
struct ServerCertificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Herald test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let mut ca_file = NamedTempFile::new().unwrap();
        ca_file.write_all(ca.pem().as_bytes()).unwrap();
        Pki { ca, ca_file }
    }

    /// A certificate for `names`, signed by the CA.
    fn issue(&self, names: &[&str]) -> ServerCertificate {
        self.issue_with(names, |_| {})
    }

    fn issue_with(
        &self,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> ServerCertificate {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        adjust(&mut params);
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.ca).unwrap();
        ServerCertificate {
            chain: vec![certificate.der().clone(), self.ca.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }
}

/// A certificate that signs itself: no CA file the client has vouches for it.
fn self_signed(names: &[&str]) -> ServerCertificate {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let key = KeyPair::generate().unwrap();
    let certificate = CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    ServerCertificate {
        chain: vec![certificate.der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

fn acceptor(certificate: ServerCertificate) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certificate.chain, certificate.key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// What the test gateway does once the client is bound.
#[derive(Clone, Copy)]
enum Script {
    /// PUSH seq 1, then report the client's ACK.
    PushAndAwaitAck,
    /// A text WebSocket message.
    SendText,
    /// Two PUSH frames in one binary WebSocket message.
    SendTwoFramesInOneMessage,
    /// A WebSocket close 1001 (going away), without GOAWAY first.
    CloseGoingAway,
}

trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// The gateway's side of one connection.
enum Peer {
    Stream(Box<dyn ByteStream>, BytesMut),
    WebSocket(Box<WebSocketStream<Box<dyn ByteStream>>>),
}

impl Peer {
    async fn receive(&mut self) -> Option<Frame> {
        match self {
            Peer::Stream(stream, input) => loop {
                if let Some(frame) = decode(input).unwrap() {
                    return Some(frame);
                }
                if stream.read_buf(input).await.ok()? == 0 {
                    return None;
                }
            },
            Peer::WebSocket(websocket) => loop {
                match websocket.next().await?.ok()? {
                    Message::Binary(message) => {
                        let mut message = BytesMut::from(&message[..]);
                        let frame = decode(&mut message).unwrap().expect("a whole frame");
                        assert!(message.is_empty(), "one frame per message");
                        return Some(frame);
                    }
                    Message::Close(_) => return None,
                    _ => {}
                }
            },
        }
    }

    async fn send(&mut self, frames: &[Frame]) {
        let mut bytes = BytesMut::new();
        for frame in frames {
            encode(frame, &mut bytes).unwrap();
        }
        match self {
            Peer::Stream(stream, _) => stream.write_all(&bytes).await.unwrap(),
            // All in one message: two frames make a bad one.
            Peer::WebSocket(_) => self.send_message(Message::Binary(bytes.freeze())).await,
        }
    }

    async fn send_message(&mut self, message: Message) {
        let Peer::WebSocket(websocket) = self else {
            panic!("a WebSocket message on a byte stream");
        };
        websocket.send(message).await.unwrap();
    }
}

fn push(seq: u64) -> Frame {
    Frame::Push {
        app: APP.to_owned(),
        message_id: MessageId(*b"0123456789abcdef"),
        seq,
        payload: format!("hello {seq}").into(),
    }
}

/// A test gateway on a loopback port: TLS when it has an acceptor, and
/// WebSocket (path `/v1/connect` only) when `websocket` is set. Each ACK
/// it gets is sent on `acks`.
struct TestGateway {
    port: u16,
    acks: mpsc::UnboundedReceiver<u64>,
}

impl TestGateway {
    async fn start(tls: Option<TlsAcceptor>, websocket: bool, script: Script) -> TestGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let tls = tls.clone();
                let acks = acks_tx.clone();
                tokio::spawn(async move {
                    let stream: Box<dyn ByteStream> = match tls {
                        // A client that refuses the certificate ends here.
                        Some(tls) => match tls.accept(tcp).await {
                            Ok(stream) => Box::new(stream),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    let peer = if websocket {
                        match tokio_tungstenite::accept_hdr_async(stream, only_connect_path).await {
                            Ok(websocket) => Peer::WebSocket(Box::new(websocket)),
                            Err(_) => return,
                        }
                    } else {
                        Peer::Stream(stream, BytesMut::new())
                    };
                    serve(peer, script, acks).await;
                });
            }
        });
        TestGateway { port, acks }
    }

    async fn next_ack(&mut self) -> u64 {
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .expect("timed out waiting for an ACK")
            .expect("the gateway stopped")
    }
}

/// The upgrade's check: the gateway's WebSocket path is `/v1/connect`.
#[expect(
    clippy::result_large_err,
    reason = "the signature of tungstenite's Callback"
)]
fn only_connect_path(request: &Request, response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() == "/v1/connect" {
        Ok(response)
    } else {
        let mut refusal = ErrorResponse::new(None);
        *refusal.status_mut() = http::StatusCode::NOT_FOUND;
        Err(refusal)
    }
}

/// HELLO_OK and BIND_OK, then the script.
async fn serve(mut peer: Peer, script: Script, acks: mpsc::UnboundedSender<u64>) {
    let Some(Frame::Hello { .. }) = peer.receive().await else {
        return;
    };
    let hello_ok = Frame::HelloOk {
        heartbeat_interval_ms: 30_000,
        storage_epoch: None,
    };
    peer.send(&[hello_ok]).await;
    let Some(Frame::Bind { app, .. }) = peer.receive().await else {
        return;
    };
    let bind_ok = Frame::BindOk {
        app,
        user: USER.to_owned(),
    };
    peer.send(&[bind_ok]).await;
    match script {
        Script::PushAndAwaitAck => peer.send(&[push(1)]).await,
        Script::SendText => {
            let text = "a PUSH as text".to_owned();
            peer.send_message(Message::Text(text.into())).await;
        }
        Script::SendTwoFramesInOneMessage => peer.send(&[push(1), push(2)]).await,
        Script::CloseGoingAway => {
            let close = CloseFrame {
                code: CloseCode::Away,
                reason: "server_shutdown".into(),
            };
            peer.send_message(Message::Close(Some(close))).await;
        }
    }
    while let Some(frame) = peer.receive().await {
        if let Frame::Ack { seq, .. } = frame {
            let _ = acks.send(seq);
        }
    }
}

fn options(gateway: String, ca_file: Option<&NamedTempFile>) -> ClientOptions {
    ClientOptions {
        gateway,
        dispatch: None,
        ca_file: ca_file.map(|file| file.path().to_owned()),
        device_id: "transport-test".to_owned(),
        network: NetworkType::Wifi,
        client_version: "test".to_owned(),
        apps: vec![AppToken {
            app: APP.to_owned(),
            token: "any: the test gateway takes every token".to_owned(),
            tags: Vec::new(),
        }],
        ack_mode: AckMode::Manual,
        reconnect: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        connect_timeout: Duration::from_secs(5),
        heartbeat_probe: None,
    }
}

async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("timed out waiting for an event")
        .expect("the client stopped")
}

/// Connects, takes the push and acks it; the gateway must see the ACK.
async fn receives_and_acks_a_push(gateway: &mut TestGateway, options: ClientOptions) {
    let expected_gateway = options.gateway.clone();
    let mut client = Client::start(options);
    match next(&mut client).await {
        Event::Connected { gateway, .. } => assert_eq!(gateway, expected_gateway),
        other => panic!("expected Connected, got {other:?}"),
    }
    assert_eq!(
        next(&mut client).await,
        Event::Bound {
            app: APP.to_owned(),
            user: USER.to_owned()
        }
    );
    match next(&mut client).await {
        Event::Push(push) => {
            assert_eq!((push.seq, &push.payload[..]), (1, &b"hello 1"[..]));
        }
        other => panic!("expected a push, got {other:?}"),
    }
    client.ack(APP, 1).await.unwrap();
    assert_eq!(gateway.next_ack().await, 1);
    client.close().await;
}

/// The first event must be a lost connection; returns its error.
async fn first_disconnect(options: ClientOptions) -> String {
    let mut client = Client::start(options);
    let event = next(&mut client).await;
    client.close().await;
    match event {
        Event::Disconnected { error, .. } => error,
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

/// The events up to the first lost connection, and its error.
async fn events_until_disconnect(options: ClientOptions) -> (Vec<Event>, String) {
    let mut client = Client::start(options);
    let mut seen = Vec::new();
    loop {
        match next(&mut client).await {
            Event::Disconnected { error, .. } => {
                client.close().await;
                return (seen, error);
            }
            event => seen.push(event),
        }
    }
}

#[tokio::test]
async fn tcp_url_receives_and_acks_a_push() {
    let mut gateway = TestGateway::start(None, false, Script::PushAndAwaitAck).await;
    let address = format!("tcp://127.0.0.1:{}", gateway.port);
    receives_and_acks_a_push(&mut gateway, options(address, None)).await;
}

#[tokio::test]
async fn tls_with_a_trusted_ca_file_receives_and_acks_a_push() {
    let pki = Pki::new();
    let tls = acceptor(pki.issue(&["127.0.0.1"]));
    let mut gateway = TestGateway::start(Some(tls), false, Script::PushAndAwaitAck).await;
    let address = format!("tls://127.0.0.1:{}", gateway.port);
    receives_and_acks_a_push(&mut gateway, options(address, Some(&pki.ca_file))).await;
}

#[tokio::test]
async fn ws_receives_and_acks_a_push() {
    let mut gateway = TestGateway::start(None, true, Script::PushAndAwaitAck).await;
    let address = format!("ws://127.0.0.1:{}/v1/connect", gateway.port);
    receives_and_acks_a_push(&mut gateway, options(address, None)).await;
}

#[tokio::test]
async fn ws_without_a_path_asks_for_v1_connect() {
    let mut gateway = TestGateway::start(None, true, Script::PushAndAwaitAck).await;
    let address = format!("ws://127.0.0.1:{}", gateway.port);
    receives_and_acks_a_push(&mut gateway, options(address, None)).await;
}

#[tokio::test]
async fn wss_with_a_trusted_ca_file_receives_and_acks_a_push() {
    let pki = Pki::new();
    let tls = acceptor(pki.issue(&["localhost"]));
    let mut gateway = TestGateway::start(Some(tls), true, Script::PushAndAwaitAck).await;
    let address = format!("wss://localhost:{}/v1/connect", gateway.port);
    receives_and_acks_a_push(&mut gateway, options(address, Some(&pki.ca_file))).await;
}

/// The error of a client's first connection, which must be lost, to a tls
/// (or wss) gateway at `host` with `certificate`; the client trusts `pki`.
async fn refusal(pki: &Pki, certificate: ServerCertificate, websocket: bool, host: &str) -> String {
    let gateway = TestGateway::start(
        Some(acceptor(certificate)),
        websocket,
        Script::PushAndAwaitAck,
    )
    .await;
    let address = if websocket {
        format!("wss://{host}:{}/v1/connect", gateway.port)
    } else {
        format!("tls://{host}:{}", gateway.port)
    };
    first_disconnect(options(address, Some(&pki.ca_file))).await
}

#[tokio::test]
async fn an_untrusted_self_signed_certificate_is_refused() {
    let pki = Pki::new();
    for websocket in [false, true] {
        let error = refusal(&pki, self_signed(&["127.0.0.1"]), websocket, "127.0.0.1").await;
        assert!(
            error.contains("certificate is refused: it is self-signed or from a CA not in"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let pki = Pki::new();
    for websocket in [false, true] {
        // Signed by the CA the client trusts: only the dates are wrong.
        let expired = pki.issue_with(&["127.0.0.1"], |params| {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
        let error = refusal(&pki, expired, websocket, "127.0.0.1").await;
        assert!(
            error.contains("certificate is refused: it has expired"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let pki = Pki::new();
    for (websocket, host) in [(false, "127.0.0.1"), (true, "localhost")] {
        let error = refusal(&pki, pki.issue(&["push.example.com"]), websocket, host).await;
        assert!(
            error.contains(&format!(
                "certificate is refused: it is not valid for the host name \"{host}\""
            )),
            "{error}"
        );
    }
}

#[tokio::test]
async fn an_unreadable_ca_file_is_reported() {
    let pki = Pki::new();
    let gateway = TestGateway::start(
        Some(acceptor(pki.issue(&["127.0.0.1"]))),
        false,
        Script::PushAndAwaitAck,
    )
    .await;
    let mut options = options(format!("tls://127.0.0.1:{}", gateway.port), None);
    let missing = pki.ca_file.path().with_extension("missing");
    options.ca_file = Some(missing.clone());
    let error = first_disconnect(options).await;
    assert!(
        error.starts_with(&format!("reading the CA file {}: ", missing.display())),
        "{error}"
    );
}

#[tokio::test]
async fn a_refused_websocket_upgrade_says_its_status() {
    let gateway = TestGateway::start(None, true, Script::PushAndAwaitAck).await;
    let address = format!("ws://127.0.0.1:{}/elsewhere", gateway.port);
    let error = first_disconnect(options(address, None)).await;
    assert_eq!(
        error,
        "the gateway refused the WebSocket upgrade: 404 Not Found"
    );
}

#[tokio::test]
async fn a_refused_certificate_is_retried_with_backoff_never_over_plain_tcp() {
    let pki = Pki::new();
    let gateway = TestGateway::start(
        Some(acceptor(self_signed(&["127.0.0.1"]))),
        false,
        Script::PushAndAwaitAck,
    )
    .await;
    let address = format!("tls://127.0.0.1:{}", gateway.port);
    let mut client = Client::start(options(address, Some(&pki.ca_file)));
    for _ in 0..3 {
        match next(&mut client).await {
            Event::Disconnected {
                error,
                reconnect_in,
            } => {
                assert!(error.contains("certificate is refused"), "{error}");
                assert!(reconnect_in <= Duration::from_millis(200));
            }
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    client.close().await;
}

#[tokio::test]
async fn a_text_message_is_a_protocol_error() {
    let gateway = TestGateway::start(None, true, Script::SendText).await;
    let address = format!("ws://127.0.0.1:{}/v1/connect", gateway.port);
    let (seen, error) = events_until_disconnect(options(address, None)).await;
    assert!(
        error.contains("bad frame from the server: a text WebSocket message"),
        "{error}"
    );
    assert!(!seen.iter().any(|event| matches!(event, Event::Push(_))));
}

#[tokio::test]
async fn a_message_with_two_frames_is_a_protocol_error() {
    let pki = Pki::new();
    let tls = acceptor(pki.issue(&["127.0.0.1"]));
    let gateway = TestGateway::start(Some(tls), true, Script::SendTwoFramesInOneMessage).await;
    let address = format!("wss://127.0.0.1:{}/v1/connect", gateway.port);
    let (seen, error) = events_until_disconnect(options(address, Some(&pki.ca_file))).await;
    assert!(
        error.contains("bytes after its frame (a message carries exactly one frame)"),
        "{error}"
    );
    // Neither frame of the bad message is taken.
    assert!(!seen.iter().any(|event| matches!(event, Event::Push(_))));
}

#[tokio::test]
async fn a_websocket_close_says_its_code() {
    let gateway = TestGateway::start(None, true, Script::CloseGoingAway).await;
    let address = format!("ws://127.0.0.1:{}/v1/connect", gateway.port);
    let (seen, error) = events_until_disconnect(options(address, None)).await;
    assert!(matches!(seen.last(), Some(Event::Bound { .. })), "{seen:?}");
    assert_eq!(
        error,
        "the server closed the WebSocket: 1001 going away: the server is shutting down \
         or overloaded (server_shutdown)"
    );
}

/// A dispatcher that answers every request with `gateways`, and sends each
/// request's target (path and query) on the returned channel.
async fn dispatcher(gateways: Vec<String>) -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let body = gateways_json(&gateways);
    let (targets_tx, targets) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0; 1];
                if stream.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
            let _ = targets_tx.send(target);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (url, targets)
}

fn gateways_json(gateways: &[String]) -> String {
    let quoted: Vec<String> = gateways.iter().map(|g| format!("{g:?}")).collect();
    format!("{{\"gateways\": [{}]}}", quoted.join(", "))
}

fn dispatch(url: String, transport: Transport) -> Option<Dispatch> {
    Some(Dispatch {
        url,
        app: APP.to_owned(),
        user: USER.to_owned(),
        region: None,
        transport,
    })
}

#[tokio::test]
async fn dispatch_asks_for_the_clients_transport() {
    let pki = Pki::new();
    let tls = acceptor(pki.issue(&["127.0.0.1"]));
    let mut gateway = TestGateway::start(Some(tls), true, Script::PushAndAwaitAck).await;
    let address = format!("wss://127.0.0.1:{}/v1/connect", gateway.port);
    let (url, mut targets) = dispatcher(vec![address.clone()]).await;
    let mut options = options(address, Some(&pki.ca_file));
    options.dispatch = dispatch(url, Transport::Wss);
    receives_and_acks_a_push(&mut gateway, options).await;
    let target = targets.recv().await.unwrap();
    assert!(
        target.starts_with("/v1/dispatch?") && target.ends_with("&transport=wss"),
        "{target}"
    );
}

#[tokio::test]
async fn a_dispatcher_answer_of_another_transport_is_refused() {
    // Asked for tls, this dispatcher names a plain TCP gateway.
    let tcp_gateway = TestGateway::start(None, false, Script::PushAndAwaitAck).await;
    let plain = format!("127.0.0.1:{}", tcp_gateway.port);
    let (url, _targets) = dispatcher(vec![plain]).await;
    let pki = Pki::new();
    let tls = acceptor(pki.issue(&["127.0.0.1"]));
    let mut tls_gateway = TestGateway::start(Some(tls), false, Script::PushAndAwaitAck).await;
    let fallback = format!("tls://127.0.0.1:{}", tls_gateway.port);
    let mut options = options(fallback, Some(&pki.ca_file));
    options.dispatch = dispatch(url, Transport::Tls);
    let mut client = Client::start(options);
    match next(&mut client).await {
        Event::DispatchFailed { error } => assert!(
            error.contains("answered a tcp gateway") && error.contains("when asked for tls"),
            "{error}"
        ),
        other => panic!("expected DispatchFailed, got {other:?}"),
    }
    // The client falls back to its own gateway, over TLS.
    assert!(matches!(next(&mut client).await, Event::Connected { .. }));
    assert!(matches!(next(&mut client).await, Event::Bound { .. }));
    assert!(matches!(next(&mut client).await, Event::Push(_)));
    client.ack(APP, 1).await.unwrap();
    assert_eq!(tls_gateway.next_ack().await, 1);
    client.close().await;
}
