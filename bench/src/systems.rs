//! The servers under test, as child processes this benchmark starts: Herald
//! gateways (`herald serve`), Mosquitto, the NATS server, and bare acceptors
//! (`herald-bench hold`) that measure the kernel's own cost of a socket.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::transport::{Pki, Transport};

pub const APP: &str = "bench";
pub const API_KEY: &str = "bench-api-key-0123456789";
pub const TOKEN_SECRET: &str = "bench-token-secret-0123456789";

/// Connections one server process is given: below the 20,000 open files a
/// process may hold here, with room for its own descriptors.
pub const CONNECTIONS_PER_PROCESS: u64 = 15_000;

/// A server under test: a child process killed when dropped, or a gateway
/// someone else started (`--gateway`), left alone.
pub struct Server {
    child: Option<Child>,
    pid: u32,
    pub addr: SocketAddr,
    /// The HTTP API, for Herald.
    pub api: Option<SocketAddr>,
    /// A bare acceptor's stdin: each line written to it goes to every
    /// socket it holds.
    pub lines: Option<ChildStdin>,
}

impl Server {
    pub fn child(child: Child, addr: SocketAddr, api: Option<SocketAddr>) -> Server {
        crate::interrupt::register(child.id());
        Server {
            pid: child.id(),
            child: Some(child),
            addr,
            api,
            lines: None,
        }
    }

    /// A running gateway, found by the port it listens on: its memory and
    /// CPU are read from /proc like those of a gateway started here.
    pub fn external(addr: SocketAddr, api: SocketAddr) -> anyhow::Result<Server> {
        let pid = crate::procfs::listener_pid(addr)?;
        Ok(Server {
            child: None,
            pid,
            addr,
            api: Some(api),
            lines: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            crate::interrupt::kill_and_forget(child);
        }
    }
}

/// The app the clients bind and the API is called for, with its secrets.
#[derive(Debug, Clone)]
pub struct AppCreds {
    pub app: String,
    pub token_secret: String,
    pub api_key: String,
}

impl Default for AppCreds {
    /// The app of the gateways this benchmark starts itself.
    fn default() -> AppCreds {
        AppCreds {
            app: APP.to_owned(),
            token_secret: TOKEN_SECRET.to_owned(),
            api_key: API_KEY.to_owned(),
        }
    }
}

impl AppCreds {
    /// `app` (or the only app) of a Herald config file.
    pub fn from_config(path: &Path, app: Option<&str>) -> anyhow::Result<AppCreds> {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            apps: Vec<App>,
        }
        #[derive(serde::Deserialize)]
        struct App {
            id: String,
            api_key: String,
            token_secret: String,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Config =
            toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
        let found = match app {
            Some(app) => config.apps.into_iter().find(|a| a.id == app),
            None if config.apps.len() == 1 => config.apps.into_iter().next(),
            None => bail!(
                "{} has {} apps: say which with --app",
                path.display(),
                config.apps.len()
            ),
        };
        let found = found
            .with_context(|| format!("no app {:?} in {}", app.unwrap_or(""), path.display()))?;
        Ok(AppCreds {
            app: found.id,
            token_secret: found.token_secret,
            api_key: found.api_key,
        })
    }
}

/// The `herald` binary: `HERALD_BIN`, or the one beside this executable
/// (both are built into the same target directory).
pub fn herald_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os("HERALD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("no parent directory")?;
    // Tests run from target/<profile>/deps.
    for candidate in [dir.join("herald"), dir.join("../herald")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the herald binary next to {}: build it (cargo build --release --bin herald) \
         or pass --herald PATH",
        me.display()
    )
}

/// A `herald serve` config for the benchmark: one shard, one listener of
/// `transport` on a free loopback port (with `pki`'s certificate for tls
/// and wss), the API on another, and the one app `creds`.
pub fn herald_config(
    data_dir: &Path,
    heartbeat_secs: u64,
    io: &str,
    transport: Transport,
    pki: Option<&Pki>,
    creds: &AppCreds,
) -> anyhow::Result<String> {
    // `listen` is the plain TCP listener; the others are listener tables.
    let (listen, listeners) = match transport {
        Transport::Tcp => ("listen = \"127.0.0.1:0\"\n", String::new()),
        other => (
            "",
            format!("[[gateway.listeners]]\naddress = \"127.0.0.1:0\"\ntransport = \"{other}\"\n"),
        ),
    };
    let tls = match (transport.uses_tls(), pki) {
        (false, _) => String::new(),
        (true, Some(pki)) => format!(
            "[gateway.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            toml_path(&pki.cert_file)?,
            toml_path(&pki.key_file)?
        ),
        (true, None) => bail!("a {transport} gateway needs a certificate"),
    };
    Ok(format!(
        r#"node_id = "bench"
data_dir = {data_dir:?}
[gateway]
io = "{io}"
{listen}shards = 1
# Several gateways and the load generator share the CPUs: pinned, every
# gateway's one shard would sit on the first CPU.
pin_shards = false
[gateway.heartbeat_secs]
unknown = {heartbeat_secs}
wifi = {heartbeat_secs}
cellular = {heartbeat_secs}
wired = {heartbeat_secs}
{listeners}{tls}[api]
listen = "127.0.0.1:0"
[[apps]]
id = "{app}"
api_key = "{api_key}"
token_secret = "{token_secret}"
"#,
        data_dir = toml_path(data_dir)?,
        app = creds.app,
        api_key = creds.api_key,
        token_secret = creds.token_secret,
    ))
}

/// A path as UTF-8, for a config file.
pub fn toml_path(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The address of a `herald: gateway listening on ADDR-or-URL (...)` line:
/// `127.0.0.1:7100`, `tls://127.0.0.1:7100`, `wss://127.0.0.1:7100/v1/connect`.
fn listening_addr(rest: &str) -> anyhow::Result<SocketAddr> {
    let word = rest.split_whitespace().next().context("no address")?;
    let authority = word.split_once("://").map_or(word, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or(authority);
    authority
        .parse()
        .with_context(|| format!("{word:?} is not a gateway address"))
}

/// Starts a `herald serve` and waits until it listens.
pub fn start_herald(
    herald: &Path,
    dir: &Path,
    index: usize,
    heartbeat_secs: u64,
    io: &str,
    transport: Transport,
    pki: Option<&Pki>,
) -> anyhow::Result<Server> {
    let data_dir = dir.join(format!("gateway-{index}"));
    std::fs::create_dir_all(&data_dir)?;
    let config = data_dir.join("herald.toml");
    std::fs::write(
        &config,
        herald_config(
            &data_dir,
            heartbeat_secs,
            io,
            transport,
            pki,
            &AppCreds::default(),
        )?,
    )?;
    start_herald_node(herald, "serve", &config, &data_dir.join("herald.log"))
}

/// Runs `herald <command> --config <config>` (serve, room or control),
/// its log in `log`, and waits until its API listens and, for serve and
/// room, its gateway: the server's address is the gateway's, or for a
/// control node its API's.
pub fn start_herald_node(
    herald: &Path,
    command: &str,
    config: &Path,
    log: &Path,
) -> anyhow::Result<Server> {
    let mut herald_command = Command::new(herald);
    herald_command
        .arg(command)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?);
    // `storm --drain` drains a gateway with SIGTERM.
    crate::interrupt::unblock_signals_in(&mut herald_command);
    let mut child = herald_command
        .spawn()
        .with_context(|| format!("cannot run {}", herald.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let has_gateway = command != "control";
    let (mut gateway, mut api) = (None, None);
    while (has_gateway && gateway.is_none()) || api.is_none() {
        let Some(line) = lines.next() else {
            let _ = child.wait();
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "herald {command} exited before listening: {}",
                log_text.trim()
            );
        };
        let line = line?;
        if let Some(rest) = line.strip_prefix("herald: gateway listening on ") {
            gateway = Some(listening_addr(rest)?);
        } else if let Some(rest) = line.strip_prefix("herald: api listening on ") {
            api = Some(rest.trim().parse()?);
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let addr = gateway.or(api).context("no address")?;
    Ok(Server::child(child, addr, api))
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn wait_listening(child: &mut Child, addr: SocketAddr, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited with {status} before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("{name} did not listen on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts a Mosquitto broker on a free loopback port; with `tls`, its one
/// listener speaks MQTT over TLS with that certificate.
pub fn start_mosquitto(dir: &Path, index: usize, tls: Option<&Pki>) -> anyhow::Result<Server> {
    let port = free_port()?;
    let config = dir.join(format!("mosquitto-{index}.conf"));
    let certificate = match tls {
        Some(pki) => format!(
            "certfile {}\nkeyfile {}\n{}",
            toml_path(&pki.cert_file)?,
            toml_path(&pki.key_file)?,
            // Started as root, Mosquitto becomes the `mosquitto` user before
            // it reads the key, which only this process's user may read:
            // it stays root then (the setting does nothing for other users).
            // SAFETY: geteuid(2) has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                "user root\n"
            } else {
                ""
            }
        ),
        None => String::new(),
    };
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\n{certificate}allow_anonymous true\nmax_connections -1\n\
             persistence false\nlog_dest none\n"
        ),
    )?;
    let mut child = Command::new("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run mosquitto (Debian package `mosquitto`)")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(&mut child, addr, "mosquitto")?;
    Ok(Server::child(child, addr, None))
}

/// How long the NATS server gives a client for its TLS handshake: Herald's
/// auth timeout (10 s by default), which its handshake counts against, so
/// that neither server drops slow handshakes the other would wait for
/// during a connect storm on two cores (NATS's own default is 2 s).
const NATS_TLS_TIMEOUT_SECS: u64 = 10;

/// Starts a NATS server (core NATS, no JetStream) on a free loopback port;
/// with `tls`, it requires TLS (after its INFO, as NATS does) with that
/// certificate.
pub fn start_nats(dir: &Path, index: usize, tls: Option<&Pki>) -> anyhow::Result<Server> {
    let port = free_port()?;
    let mut command = Command::new("nats-server");
    command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(pki) = tls {
        let config = dir.join(format!("nats-{index}.conf"));
        std::fs::write(
            &config,
            format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: {NATS_TLS_TIMEOUT_SECS}\n}}\n",
                toml_path(&pki.cert_file)?,
                toml_path(&pki.key_file)?
            ),
        )?;
        command.arg("-c").arg(&config);
    }
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run nats-server")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(&mut child, addr, "nats-server")?;
    Ok(Server::child(child, addr, None))
}

/// Starts `herald-bench hold`: accepts and keeps sockets, and writes each
/// line given to it to all of them.
pub fn start_holder(uring: bool, read_replies: bool) -> anyhow::Result<Server> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("hold");
    if uring {
        command.arg("--uring");
    }
    if read_replies {
        command.arg("--read-replies");
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stdin = child.stdin.take().context("no stdin")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = lines.next().context("hold exited")??.trim().parse()?;
    let mut server = Server::child(child, addr, None);
    server.lines = Some(stdin);
    Ok(server)
}

/// `herald-bench hold`: the bare acceptor, and the kernel's floor for a
/// fan-out: each line read from stdin is written to every socket held, one
/// plain send(2) each (with `uring`, one io_uring send each, submitted in
/// batches), with nothing else done per socket. With `read_replies`, it
/// then reads each client's [`BARE_REPLY`] (or gives up on a client after
/// [`BARE_REPLY_TIMEOUT`]). It exits when stdin closes.
pub fn hold(uring: bool, read_replies: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    // std listens with a backlog of 128: a connect storm past it leaves
    // clients that think they are connected waiting in SYN-ACK retries.
    // SAFETY: listen(2) again on our listener only raises its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 65_535) };
    println!("{}", listener.local_addr()?);
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    std::thread::spawn({
        let held = held.clone();
        move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let _ = stream.set_read_timeout(Some(BARE_REPLY_TIMEOUT));
                        held.lock().expect("not poisoned").push(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    });
    let mut ring = if uring {
        Some(io_uring::IoUring::new(HOLD_RING_ENTRIES)?)
    } else {
        None
    };
    for line in std::io::stdin().lines() {
        let mut line = line?.into_bytes();
        line.push(b'\n');
        let held = held.lock().expect("not poisoned");
        match ring.as_mut() {
            Some(ring) => send_to_all(ring, &held, &line)?,
            None => {
                for mut stream in held.iter() {
                    // A reset client only loses its own copy.
                    let _ = stream.write_all(&line);
                }
            }
        }
        if read_replies {
            let mut reply = [0u8; BARE_REPLY.len()];
            for mut stream in held.iter() {
                // A client that does not answer costs the timeout, once.
                let _ = std::io::Read::read_exact(&mut stream, &mut reply);
            }
        }
    }
    Ok(())
}

/// What a `bare-acked` client sends back for each line: as long as a
/// Herald client's BROADCAST_ACK for the benchmark's app.
pub const BARE_REPLY: &[u8] = b"broadcast-ack:bench\n";

/// How long `hold --read-replies` waits for one client's reply.
const BARE_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Submission queue entries of `hold --uring`'s ring: its batch.
const HOLD_RING_ENTRIES: u32 = 4096;

/// Sends `bytes` to every stream as io_uring submissions, a queue's worth
/// per system call, and waits for them all.
fn send_to_all(
    ring: &mut io_uring::IoUring,
    streams: &[std::net::TcpStream],
    bytes: &[u8],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut pending = 0usize;
    for stream in streams {
        let entry = io_uring::opcode::Send::new(
            io_uring::types::Fd(stream.as_raw_fd()),
            bytes.as_ptr(),
            bytes.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build();
        // SAFETY: `bytes` outlives every send: this function returns only
        // after the completion of each.
        while unsafe { ring.submission().push(&entry) }.is_err() {
            ring.submit()?;
            pending -= ring.completion().count();
        }
        pending += 1;
    }
    while pending > 0 {
        ring.submit_and_wait(1)?;
        // A reset client only loses its own copy: results are not checked.
        pending -= ring.completion().count();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_reply_is_as_long_as_a_herald_broadcast_ack() {
        let mut ack = bytes::BytesMut::new();
        let frame = herald_proto::Frame::BroadcastAck {
            app: APP.to_owned(),
            seq: 1,
        };
        herald_proto::encode(&frame, &mut ack).unwrap();
        assert_eq!(BARE_REPLY.len(), ack.len());
        assert_eq!(
            BARE_REPLY.last(),
            Some(&b'\n'),
            "one line, as the acceptor reads it"
        );
    }

    #[test]
    fn the_herald_config_is_complete_toml() {
        let text = herald_config(
            Path::new("data"),
            60,
            "epoll",
            Transport::Tcp,
            None,
            &AppCreds::default(),
        )
        .unwrap();
        let value: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(value["gateway"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(value["gateway"]["io"].as_str(), Some("epoll"));
        assert_eq!(value["gateway"]["shards"].as_integer(), Some(1));
        assert_eq!(value["gateway"]["pin_shards"].as_bool(), Some(false));
        assert_eq!(
            value["apps"][0]["token_secret"].as_str(),
            Some(TOKEN_SECRET)
        );
    }

    #[test]
    fn a_tls_gateway_listens_with_the_certificate_and_no_plain_tcp() {
        let pki = Pki::generate().unwrap();
        let text = herald_config(
            Path::new("data"),
            60,
            "uring",
            Transport::Wss,
            Some(&pki),
            &AppCreds::default(),
        )
        .unwrap();
        let value: toml::Value = toml::from_str(&text).unwrap();
        let gateway = &value["gateway"];
        assert!(gateway.get("listen").is_none());
        assert_eq!(gateway["listeners"][0]["transport"].as_str(), Some("wss"));
        assert_eq!(gateway["tls"]["key_file"].as_str(), pki.key_file.to_str());
        assert!(
            herald_config(
                Path::new("data"),
                60,
                "uring",
                Transport::Tls,
                None,
                &AppCreds::default()
            )
            .is_err()
        );
    }

    #[test]
    fn listening_lines_give_the_address_of_every_transport() {
        for line in [
            "127.0.0.1:7100 (tcp, 1 shards, uring)",
            "tls://127.0.0.1:7100 (tls, 1 shards, uring)",
            "wss://127.0.0.1:7100/v1/connect (wss, 1 shards, epoll)",
        ] {
            assert_eq!(
                listening_addr(line).unwrap(),
                "127.0.0.1:7100".parse().unwrap()
            );
        }
    }
}
