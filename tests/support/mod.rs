//! Test support: a real `herald serve` process on loopback, a raw protocol
//! client, and API helpers.

#![allow(dead_code)] // each test file uses its own subset

pub mod cluster;
pub mod nat;
pub mod webhook;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use herald_proto::{Features, Frame, NetworkType, TokenClaims, decode, encode, sign_token};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const APP: &str = "chat";
pub const API_KEY: &str = "test-api-key-0123456789";
pub const TOKEN_SECRET: &str = "test-token-secret-0123456789";
pub const OTHER_APP: &str = "news";
pub const OTHER_API_KEY: &str = "other-api-key-0123456789";
pub const OTHER_TOKEN_SECRET: &str = "other-secret-0123456789";

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

/// The gateway driver a test server runs (`herald serve --io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    Uring,
    Epoll,
}

impl Io {
    fn as_arg(self) -> &'static str {
        match self {
            Io::Uring => "uring",
            Io::Epoll => "epoll",
        }
    }
}

/// Defines a test module `$name` that runs the async fn `$name(io: Io)`
/// once on each gateway driver.
#[macro_export]
macro_rules! on_both_drivers {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn uring() {
                super::$name($crate::support::Io::Uring).await
            }
            #[tokio::test]
            async fn epoll() {
                super::$name($crate::support::Io::Epoll).await
            }
        }
    )+};
}

/// A `herald serve` child process with its own data dir and ephemeral ports.
pub struct Server {
    pub child: Child,
    pub io: Io,
    /// The plain TCP gateway (`host:port`).
    pub gateway: String,
    /// Every listener's address as clients name it, by transport (`tcp`,
    /// `tls`, `ws`, `wss`).
    pub gateways: std::collections::HashMap<String, String>,
    pub api: String,
    pub data_dir: PathBuf,
    /// `None`: the no-config `demo` mode.
    pub config_path: Option<PathBuf>,
    /// The lines it wrote to standard output after its listening lines
    /// (the JSON log goes there).
    pub stdout: std::sync::mpsc::Receiver<String>,
    /// The demo app's API key, as `serve` printed it.
    pub demo_api_key: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

pub fn write_config(dir: &Path, heartbeat_secs: u64, extra: &str) -> PathBuf {
    let path = dir.join("herald.toml");
    let text = format!(
        r#"
node_id = "test-node"
{extra}
[gateway]
shards = 2
auth_timeout_secs = 3
drain_timeout_secs = 5
drain_spread_secs = 0
[gateway.heartbeat_secs]
unknown = {heartbeat_secs}
wifi = {heartbeat_secs}
cellular = {heartbeat_secs}
wired = {heartbeat_secs}
[api]
payload_bytes_max = 1024
[storage]
ack_flush_interval_ms = 50
[[apps]]
id = "{APP}"
api_key = "{API_KEY}"
token_secret = "{TOKEN_SECRET}"
[[apps]]
id = "{OTHER_APP}"
api_key = "{OTHER_API_KEY}"
token_secret = "{OTHER_TOKEN_SECRET}"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(60, "")
    }

    pub fn start_on(io: Io) -> Server {
        Server::start_with_on(60, "", io)
    }

    pub fn start_with(heartbeat_secs: u64, extra: &str) -> Server {
        Server::start_with_on(heartbeat_secs, extra, Io::Uring)
    }

    pub fn start_with_on(heartbeat_secs: u64, extra: &str, io: Io) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_config(dir.path(), heartbeat_secs, extra);
        let data_dir = dir.path().join("data");
        let mut server = Server::spawn(Some(&config_path), &data_dir, "127.0.0.1:0", io);
        server._dir = Some(dir);
        server
    }

    /// `herald serve` whose test app has the extra settings `app_extra`
    /// (lines of its `[[apps]]` table).
    pub fn start_with_app_settings(app_extra: &str) -> Server {
        let anchor = format!("token_secret = \"{TOKEN_SECRET}\"\n");
        Server::start_with_edited_config(|text| {
            text.replacen(&anchor, &format!("{anchor}{app_extra}\n"), 1)
        })
    }

    /// `herald serve` with these lines added to the test config's `[api]`.
    pub fn start_with_api_settings(settings: &str) -> Server {
        Server::start_with_edited_config(|text| {
            text.replacen("[api]\n", &format!("[api]\n{settings}\n"), 1)
        })
    }

    /// `herald serve` on the test config with `extra` lines at its top
    /// and more command-line arguments (listeners, `--tls-self-signed`).
    pub fn start_with_args(extra: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_config(dir.path(), 60, extra);
        let data_dir = dir.path().join("data");
        let mut command = Command::new(herald_bin());
        command
            .args(["serve", "--io", Io::Uring.as_arg(), "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--gateway-listen", "127.0.0.1:0"])
            .args(args);
        let mut server = Server::launch(command, Io::Uring);
        server.data_dir = data_dir;
        server.config_path = Some(config_path);
        server._dir = Some(dir);
        server
    }

    /// `herald serve` on the test config as `edit` rewrites it.
    pub fn start_with_edited_config(edit: impl FnOnce(String) -> String) -> Server {
        Server::start_with_edited_config_on(Io::Uring, edit)
    }

    /// `start_with_edited_config` on the gateway driver `io`.
    pub fn start_with_edited_config_on(io: Io, edit: impl FnOnce(String) -> String) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_config(dir.path(), 60, "");
        let text = std::fs::read_to_string(&config_path).unwrap();
        std::fs::write(&config_path, edit(text)).unwrap();
        let data_dir = dir.path().join("data");
        let mut server = Server::spawn(Some(&config_path), &data_dir, "127.0.0.1:0", io);
        server._dir = Some(dir);
        server
    }

    /// `herald serve` with no config: the generated `demo` app.
    pub fn start_demo() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::spawn(None, &dir.path().join("data"), "127.0.0.1:0", Io::Uring);
        server._dir = Some(dir);
        server
    }

    fn spawn(config_path: Option<&Path>, data_dir: &Path, gateway_listen: &str, io: Io) -> Server {
        let mut command = Command::new(herald_bin());
        command.args(["serve", "--io", io.as_arg()]);
        if let Some(path) = config_path {
            command.arg("--config").arg(path);
        }
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--gateway-listen", gateway_listen]);
        let mut server = Server::launch(command, io);
        server.data_dir = data_dir.to_owned();
        server.config_path = config_path.map(Path::to_owned);
        server
    }

    /// `herald room` or `herald control` on `config`, on ephemeral ports
    /// (unless the config's gateway listen is fixed and `gateway_listen`
    /// names it). A control node has no gateway: `gateway` is empty.
    pub fn spawn_node(role: &str, config: &Path, gateway_listen: Option<&str>) -> Server {
        let mut command = Command::new(herald_bin());
        command.arg(role).arg("--config").arg(config);
        if role == "room" {
            command.args(["--io", "uring", "--gateway-listen"]);
            command.arg(gateway_listen.unwrap_or("127.0.0.1:0"));
        }
        let mut server = Server::launch(command, Io::Uring);
        server.config_path = Some(config.to_owned());
        server
    }

    /// Starts `command` with an ephemeral API port and reads the addresses
    /// it prints.
    fn launch(mut command: Command, io: Io) -> Server {
        let mut child = command
            .args(["--api-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn herald");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut gateways, mut api, mut demo_api_key) =
            (std::collections::HashMap::new(), None, None);
        // The API line comes last on every role.
        while api.is_none() {
            let line = lines
                .next()
                .expect("herald exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("herald: gateway listening on ") {
                // `ADDRESS (TRANSPORT, N shards, IO)`
                let mut words = rest.split([' ', '(', ',']).filter(|word| !word.is_empty());
                let address = words.next().unwrap_or_default().to_owned();
                let transport = words.next().unwrap_or_default().to_owned();
                gateways.insert(transport, address);
            } else if let Some(rest) = line.strip_prefix("herald: api listening on ") {
                api = Some(rest.trim().to_owned());
            } else if let Some(rest) = line.strip_prefix("herald:   API key:") {
                demo_api_key = Some(rest.trim().to_owned());
            }
        }
        // Keep reading stdout so the child never blocks on a full pipe.
        let (stdout_tx, stdout) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = stdout_tx.send(line);
            }
        });
        Server {
            child,
            io,
            gateway: gateways.get("tcp").cloned().unwrap_or_default(),
            gateways,
            api: api.unwrap(),
            data_dir: PathBuf::new(),
            config_path: None,
            stdout,
            demo_api_key,
            _dir: None,
        }
    }

    /// Kills the process hard (no drain) and starts it again on the same
    /// data dir, config and gateway address, so clients can reconnect.
    pub fn kill_and_restart(self) -> Server {
        self.kill_edit_and_restart(|_| {})
    }

    /// `kill_and_restart`, with `edit` run on the data dir while nothing
    /// runs (to wipe or change the stored data, as a restore would).
    pub fn kill_edit_and_restart(mut self, edit: impl FnOnce(&Path)) -> Server {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        wait_until_nothing_listens(&self.gateway);
        edit(&self.data_dir);
        let mut next = Server::spawn(
            self.config_path.as_deref(),
            &self.data_dir,
            &self.gateway,
            self.io,
        );
        next._dir = self._dir.take();
        next
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub async fn push(&self, user: &str, payload: &str) -> Value {
        let (status, body) = self
            .post(
                &format!("/v1/apps/{APP}/users/{user}/messages"),
                API_KEY,
                serde_json::json!({ "payload": payload }).to_string(),
            )
            .await;
        assert_eq!(status, 200, "push failed: {body}");
        body
    }

    pub async fn post(&self, path: &str, api_key: &str, body: String) -> (u16, Value) {
        let request = reqwest::Client::new().post(self.url(path)).body(body);
        send(request.bearer_auth(api_key)).await
    }

    pub async fn get(&self, path: &str, api_key: &str) -> (u16, Value) {
        let request = reqwest::Client::new().get(self.url(path));
        send(request.bearer_auth(api_key)).await
    }

    /// Waits until the counter `name` reaches `at_least` (the control plane
    /// applies shard events asynchronously).
    pub async fn wait_for_metric(&self, name: &str, at_least: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let metrics = self.metrics().await;
            let value = metrics.lines().find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<u64>()
                    .ok()
            });
            if value.is_some_and(|v| v >= at_least) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never reached {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the register lists exactly `connections` connections of
    /// `user`: BIND_OK reaches the client before the control plane has
    /// registered the connection.
    pub async fn wait_connections(&self, user: &str, connections: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let path = format!("/v1/apps/{APP}/users/{user}/presence");
        loop {
            let (_, presence) = self.get(&path, API_KEY).await;
            if presence["connections"].as_array().map(Vec::len) == Some(connections) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user} never had {connections} connections: {presence}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the counter series `series` (name and labels), 0 if
    /// absent.
    pub async fn counter(&self, series: &str) -> u64 {
        self.metrics()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }
}

/// The status and the JSON body (or the raw text if it is not JSON).
async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// An HTTP/1.1 response as it came off the socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The head, header names lowercased.
    pub head: String,
    /// The body as JSON, or as a JSON string if it is not JSON.
    pub body: Value,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key == name).then(|| value.trim())
        })
    }
}

/// Reads one response with a `Content-Length` body (every answer of the
/// API has one); panics if the connection ends first.
pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut bytes = Vec::new();
    let head_end = loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("reading a response");
        assert!(
            n > 0,
            "the connection ended before a response head: {bytes:?}"
        );
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head: String = String::from_utf8_lossy(&bytes[..head_end])
        .lines()
        .map(|line| match line.split_once(':') {
            Some((key, value)) => format!("{}:{value}\n", key.to_ascii_lowercase()),
            None => format!("{line}\n"),
        })
        .collect();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut response = RawResponse {
        status,
        head,
        body: Value::Null,
    };
    let length: usize = response
        .header("content-length")
        .map_or(0, |len| len.parse().unwrap());
    let mut body = bytes.split_off(head_end + 4);
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream
            .read(&mut chunk)
            .await
            .expect("reading a response body");
        assert!(n > 0, "the connection ended inside a response body");
        body.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&body[..length]).into_owned();
    response.body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    response
}

/// Sends `request` (bytes as they go on the wire) on a new connection and
/// reads the answer.
pub async fn raw_request(api: &str, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(api).await.unwrap();
    stream.write_all(request).await.unwrap();
    tokio::time::timeout(WAIT, read_response(&mut stream))
        .await
        .expect("no answer in time")
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SDK's options for a test client: `token` on `gateway`, automatic
/// acks, reconnects within half a second. Tests change what they need
/// with struct update syntax.
pub fn sdk_options(gateway: &str, token: String) -> herald_client::ClientOptions {
    herald_client::ClientOptions {
        gateway: gateway.to_owned(),
        dispatch: None,
        ca_file: None,
        device_id: "sdk".to_owned(),
        network: NetworkType::Wifi,
        client_version: "test".to_owned(),
        apps: vec![herald_client::AppToken {
            app: APP.to_owned(),
            token,
            tags: Vec::new(),
        }],
        ack_mode: herald_client::AckMode::Auto,
        reconnect: herald_client::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        connect_timeout: Duration::from_secs(2),
        heartbeat_probe: None,
    }
}

/// A token for `user` of `app`, signed with `secret`, valid for an hour:
/// for apps made through the admin API.
pub fn app_token(secret: &str, app: &str, user: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    sign_token(
        secret.as_bytes(),
        &TokenClaims {
            app: app.to_owned(),
            user: user.to_owned(),
            expires_at_unix_secs: now + 3600,
        },
    )
    .unwrap()
}

pub fn token(user: &str, ttl_secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    sign_token(
        TOKEN_SECRET.as_bytes(),
        &TokenClaims {
            app: APP.to_owned(),
            user: user.to_owned(),
            expires_at_unix_secs: (now + ttl_secs).max(0) as u64,
        },
    )
    .unwrap()
}

/// A client that says HELLO (and binds `user`, if given), then never reads:
/// its tiny receive buffer makes the server's output back up soon.
pub async fn unread_client(addr: &str, device: &str, user: Option<&str>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let mut frames = BytesMut::new();
    let hello = Frame::Hello {
        device_id: device.to_owned(),
        client_version: "test".to_owned(),
        network: NetworkType::Wired,
        features: Features::ALL,
    };
    encode(&hello, &mut frames).unwrap();
    if let Some(user) = user {
        let bind = Frame::Bind {
            app: APP.to_owned(),
            token: token(user, 3600),
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        };
        encode(&bind, &mut frames).unwrap();
    }
    stream.write_all(&frames).await.unwrap();
    stream
}

/// Sends PINGs whose PONGs are never read, 60 KB at a time, until the
/// server cuts the connection off (true) or 120 MB went unanswered (false).
pub async fn ping_until_cut_off(stream: &mut TcpStream) -> bool {
    let mut pings = BytesMut::new();
    for _ in 0..10_000 {
        encode(&Frame::Ping, &mut pings).unwrap();
    }
    for _ in 0..2_000 {
        if stream.write_all(&pings).await.is_err() {
            return true;
        }
    }
    false
}

/// A client that speaks the wire protocol frame by frame, so tests control
/// exactly what is sent and when (or that nothing is acked).
pub struct RawClient {
    stream: TcpStream,
    buffer: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: &str) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.unwrap(),
            buffer: BytesMut::new(),
        }
    }

    /// Connects from the loopback address `source` (127.0.0.2, ...), as a
    /// client at another address would.
    pub async fn connect_from(addr: &str, source: std::net::IpAddr) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        RawClient {
            stream: socket.connect(addr.parse().unwrap()).await.unwrap(),
            buffer: BytesMut::new(),
        }
    }

    /// Connects, says HELLO as `device` and binds `user` to the test app.
    pub async fn bound(addr: &str, device: &str, user: &str, last_seq: Option<u64>) -> RawClient {
        RawClient::bound_tagged(addr, device, user, last_seq, None, &[]).await
    }

    /// `bound`, also saying the last broadcast held and the client's tags.
    pub async fn bound_tagged(
        addr: &str,
        device: &str,
        user: &str,
        last_seq: Option<u64>,
        last_broadcast_seq: Option<u64>,
        tags: &[&str],
    ) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client.hello(device).await;
        client
            .bind_user(user, last_seq, last_broadcast_seq, tags)
            .await;
        client
    }

    /// `bound`, for a client whose HELLO names `features` (NONE: a client
    /// from before TRANSIENT and NOTIFY).
    pub async fn bound_with(addr: &str, device: &str, user: &str, features: Features) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client.hello_with(device, features).await;
        client.bind_user(user, None, None, &[]).await;
        client
    }

    async fn bind_user(
        &mut self,
        user: &str,
        last_seq: Option<u64>,
        last_broadcast_seq: Option<u64>,
        tags: &[&str],
    ) {
        let client = self;
        client
            .send(Frame::Bind {
                app: APP.to_owned(),
                token: token(user, 3600),
                last_seq,
                last_broadcast_seq,
                tags: tags.iter().map(|tag| tag.to_string()).collect(),
            })
            .await;
        match client.recv().await {
            Some(Frame::BindOk { user: bound, .. }) => assert_eq!(bound, user),
            other => panic!("expected BIND_OK, got {other:?}"),
        }
    }

    /// Sends BIND of `app` with `token` and returns the answer.
    pub async fn bind_app(&mut self, app: &str, token: String) -> Frame {
        self.send(Frame::Bind {
            app: app.to_owned(),
            token,
            last_seq: None,
            last_broadcast_seq: None,
            tags: Vec::new(),
        })
        .await;
        self.recv()
            .await
            .expect("the server closed instead of answering BIND")
    }

    /// The next BROADCAST's (seq, payload).
    pub async fn recv_broadcast(&mut self) -> (u64, String) {
        match self.recv().await {
            Some(Frame::Broadcast { seq, payload, .. }) => {
                (seq, String::from_utf8(payload.to_vec()).unwrap())
            }
            other => panic!("expected BROADCAST, got {other:?}"),
        }
    }

    pub async fn hello(&mut self, device: &str) -> u32 {
        self.hello_with(device, Features::ALL).await
    }

    pub async fn hello_with(&mut self, device: &str, features: Features) -> u32 {
        self.send(Frame::Hello {
            device_id: device.to_owned(),
            client_version: "test".to_owned(),
            network: NetworkType::Wifi,
            features,
        })
        .await;
        match self.recv().await {
            Some(Frame::HelloOk {
                heartbeat_interval_ms,
                ..
            }) => heartbeat_interval_ms,
            other => panic!("expected HELLO_OK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut bytes = BytesMut::new();
        encode(&frame, &mut bytes).unwrap();
        self.send_raw(&bytes).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// `send_raw` that reports a connection the server closed.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, self.recv_inner())
            .await
            .expect("timed out waiting for a frame")
    }

    async fn recv_inner(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = decode(&mut self.buffer).expect("server sent a bad frame") {
                return Some(frame);
            }
            match self.stream.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next PUSH's (seq, payload), skipping nothing else silently.
    pub async fn recv_push(&mut self) -> (u64, String) {
        match self.recv().await {
            Some(Frame::Push { seq, payload, .. }) => {
                (seq, String::from_utf8(payload.to_vec()).unwrap())
            }
            other => panic!("expected PUSH, got {other:?}"),
        }
    }

    pub async fn ack(&mut self, seq: u64) {
        self.send(Frame::Ack {
            app: APP.to_owned(),
            seq,
        })
        .await;
    }

    /// Asserts nothing arrives within `quiet` (used only to check that
    /// something does NOT happen; a round trip bounds it first).
    pub async fn expect_silence(&mut self, quiet: Duration) {
        self.send(Frame::Ping).await;
        assert_eq!(
            self.recv().await,
            Some(Frame::Pong),
            "expected nothing but PONG"
        );
        if let Ok(frame) = tokio::time::timeout(quiet, self.recv_inner()).await {
            panic!("expected silence, got {frame:?}");
        }
    }
}

/// The JS SDK's folder, built (`npm run build`), when node and the SDK's
/// npm packages are installed; else `None` after saying which is missing
/// (under CI=true a missing one fails).
pub async fn js_sdk_built(test: &str) -> Option<PathBuf> {
    let sdk_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/js");
    let node_missing = Command::new("node").arg("--version").output().is_err();
    if node_missing || !sdk_dir.join("node_modules/ws").exists() {
        let never = cluster::service_missing(
            test,
            "node or sdk/js/node_modules is missing: run scripts/install-test-tools.sh".to_owned(),
        )?;
        match never {}
    }
    let build = tokio::process::Command::new("npm")
        .args(["run", "build"])
        .current_dir(&sdk_dir)
        .output()
        .await
        .expect("run npm run build");
    assert!(
        build.status.success(),
        "the JS SDK does not build:\n{}",
        String::from_utf8_lossy(&build.stdout)
    );
    Some(sdk_dir)
}

/// Takes the SDK client's events until its first app is bound.
pub async fn until_bound(client: &mut herald_client::Client) {
    loop {
        match tokio::time::timeout(WAIT, client.next_event())
            .await
            .expect("bound in time")
        {
            Some(herald_client::Event::Bound { .. }) => return,
            Some(herald_client::Event::Closed(terminal)) => panic!("closed: {terminal:?}"),
            _ => {}
        }
    }
}

/// The JS SDK's folder and chromium's path, when node, the SDK's npm
/// packages (playwright-core) and chromium are all installed; else `None`
/// after saying which is missing (under CI=true a missing one fails).
pub fn browser_tools(test: &str) -> Option<(PathBuf, String)> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/js");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let missing = [
        (
            Command::new("node").arg("--version").output().is_err(),
            "node",
        ),
        (
            !sdk.join("node_modules/playwright-core").exists(),
            "sdk/js/node_modules (npm ci)",
        ),
        (!Path::new(&chromium).exists(), "chromium"),
    ];
    if let Some((_, what)) = missing.iter().find(|(missing, _)| *missing) {
        let never = cluster::service_missing(
            test,
            format!("{what} is not installed: run scripts/install-test-tools.sh"),
        )?;
        match never {}
    }
    Some((sdk, chromium))
}

/// Waits until no socket listens on `addr` any more. A killed process's
/// io_uring is torn down by the kernel after the process is gone, and its
/// poll requests hold the listeners open until then: a successor that joins
/// the port's SO_REUSEPORT group before that would see some connections land
/// on a dying listener and be reset.
pub fn wait_until_nothing_listens(addr: &str) {
    let port: u16 = addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let listening = || {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            const LISTEN: &str = "0A";
            fields[3] == LISTEN
                && fields[1]
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| u16::from_str_radix(p, 16) == Ok(port))
        })
    };
    let deadline = std::time::Instant::now() + WAIT;
    while listening() {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} still listens {WAIT:?} after its server was killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lines a child process writes to one of its pipes, read on a
/// thread of their own.
pub fn lines_of(
    pipe: impl std::io::Read + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next line `wanted` accepts, skipping others.
pub async fn line_where(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let found = async {
        while let Some(line) = lines.recv().await {
            if wanted(&line) {
                return line;
            }
        }
        panic!("the process ended before it printed {what}");
    };
    tokio::time::timeout(WAIT, found)
        .await
        .unwrap_or_else(|_| panic!("no line {what} within {WAIT:?}"))
}

/// The part after `prefix` of the next line that starts with it, skipping
/// other lines.
pub async fn line_after(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    prefix: &str,
) -> String {
    let what = format!("starting {prefix:?}");
    let line = line_where(lines, &what, |line| line.starts_with(prefix)).await;
    line[prefix.len()..].to_owned()
}

/// A child process killed when the test ends, passed or failed.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pushes from 32 callers, each to its own user (`user-0`, ...), through
/// `server`'s API as fast as they are answered; once 400 are answered,
/// `kill_and_restart` kills the node hard in the middle of its group
/// commits and starts it again. Checks that every push answered 200, before
/// or during the kill, is in its inbox under the seq it was answered with
/// (one not answered may or may not be stored). Returns the restarted node.
pub async fn answered_pushes_survive_a_kill(
    server: Server,
    kill_and_restart: impl FnOnce(Server) -> Server,
) -> Server {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    const CALLERS: usize = 32;
    const ANSWERED_BEFORE_KILL: usize = 400;
    let answered = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::new();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let url = server.url(&format!("/v1/apps/{APP}/users/user-{caller}/messages"));
        let (client, answered, stop) = (client.clone(), answered.clone(), stop.clone());
        callers.spawn(async move {
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let payload = format!("{caller}-{n}");
                let sent = client
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .body(format!(r#"{{"payload": "{payload}"}}"#))
                    .send()
                    .await;
                let Ok(response) = sent else { return };
                if response.status().as_u16() != 200 {
                    return;
                }
                let Ok(body) = response.json::<Value>().await else {
                    return;
                };
                let seq = body["seq"].as_u64().expect("a seq");
                answered.lock().unwrap().push((caller, seq, payload));
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while answered.lock().unwrap().len() < ANSWERED_BEFORE_KILL {
        assert!(
            std::time::Instant::now() < deadline,
            "pushes are not answered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let server = kill_and_restart(server);
    stop.store(true, Ordering::Relaxed);
    while callers.join_next().await.is_some() {}
    let answered = std::mem::take(&mut *answered.lock().unwrap());
    let mut found = std::collections::HashMap::new();
    for caller in 0..CALLERS {
        let mut after = 0;
        loop {
            let (status, body) = server
                .get(
                    &format!("/v1/apps/{APP}/users/user-{caller}/messages?after={after}"),
                    API_KEY,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            for message in body["messages"].as_array().unwrap() {
                after = message["seq"].as_u64().unwrap();
                found.insert(
                    (caller, after),
                    message["payload"].as_str().unwrap().to_owned(),
                );
            }
            if body["more"] != true {
                break;
            }
        }
    }
    println!(
        "{} pushes answered before and while the kill, {} stored after the restart",
        answered.len(),
        found.len()
    );
    for (caller, seq, payload) in &answered {
        assert_eq!(
            found.get(&(*caller, *seq)),
            Some(payload),
            "push {payload} was answered with seq {seq} and is not stored under it"
        );
    }
    server
}
