//! NATS JetStream beside Herald in `push --with-jetstream`: publishes with
//! ack of the same payloads to a file-backed stream, on a NATS server
//! started for the run (its store in a temporary directory on the same
//! file system as Herald's SQLite data), once with `sync_interval: always`
//! (an fsync per message before the ack, as Herald syncs each group
//! commit before its API answers) and once with the default sync interval
//! (acked once written, fsynced every 2 minutes).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;

use crate::systems::{self, Server};

/// How the stream's server makes a message durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// `jetstream { sync_interval: always }`: fsync per message.
    Always,
    /// The server's default: fsync every 2 minutes.
    Default,
}

impl Sync {
    pub const ALL: [Sync; 2] = [Sync::Always, Sync::Default];

    pub fn row_name(self) -> &'static str {
        match self {
            Sync::Always => "jetstream-sync-always",
            Sync::Default => "jetstream-sync-default",
        }
    }

    pub fn durability(self) -> &'static str {
        match self {
            Sync::Always => "JetStream file store, sync_interval=always (fsync per message)",
            Sync::Default => {
                "JetStream file store, default 2 min sync (acked before fsync; fsync every 2 min)"
            }
        }
    }

    /// The server config's `jetstream` block, storing in `store_dir`.
    fn jetstream_block(self, store_dir: &str) -> String {
        let sync = match self {
            Sync::Always => "  sync_interval: always\n",
            Sync::Default => "",
        };
        format!("jetstream {{\n  store_dir: {store_dir:?}\n{sync}}}\n")
    }
}

/// The stream publishes go to, and its subject.
const STREAM: &str = "HERALD_BENCH";
const SUBJECT: &str = "herald-bench.push";
/// The stream keeps at most this much (the oldest messages go first), so
/// that a long search does not fill the disk.
const STREAM_BYTES_MAX: i64 = 1 << 30;

/// A NATS server with JetStream started for one run, and a stream on it.
pub struct JetStream {
    pub context: async_nats::jetstream::Context,
    /// The server's version, as it says in its INFO.
    pub version: String,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl JetStream {
    /// Starts `nats_server` on a free loopback port with `sync`, connects
    /// and makes the stream. A server that refuses the config (before
    /// 2.10, `sync_interval` is unknown) is an error saying why.
    pub async fn start(nats_server: &Path, sync: Sync) -> anyhow::Result<JetStream> {
        let dir = tempfile::tempdir()?;
        let port = systems::free_port()?;
        let store = dir.path().join("store");
        let config = dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{port}\"\n{}",
                sync.jetstream_block(systems::toml_path(&store)?)
            ),
        )?;
        let log = dir.path().join("nats.log");
        let mut child = Command::new(nats_server)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot run {}", nats_server.display()))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(error) = systems::wait_listening(&mut child, addr, "nats-server") {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{error:#}: {}", said.trim());
        }
        let server = Server::child(child, addr, None);
        let client = async_nats::connect(format!("nats://{addr}")).await?;
        let version = client.server_info().version;
        let context = async_nats::jetstream::new(client);
        context
            .create_stream(async_nats::jetstream::stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![SUBJECT.to_owned()],
                storage: async_nats::jetstream::stream::StorageType::File,
                max_bytes: STREAM_BYTES_MAX,
                ..Default::default()
            })
            .await
            .context("cannot create the stream")?;
        Ok(JetStream {
            context,
            version,
            _server: server,
            _dir: dir,
        })
    }
}

/// Publishes `payload` to the stream and waits for the server's ack.
pub async fn publish(
    context: async_nats::jetstream::Context,
    payload: Vec<u8>,
) -> Result<(), String> {
    let ack = context
        .publish(SUBJECT, payload.into())
        .await
        .map_err(|error| error.to_string())?;
    ack.await.map(|_| ()).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_always_row_asks_for_an_fsync_per_message() {
        let always = Sync::Always.jetstream_block("/tmp/s");
        assert!(always.contains("sync_interval: always"));
        assert!(always.contains("store_dir: \"/tmp/s\""));
        assert!(
            !Sync::Default
                .jetstream_block("/tmp/s")
                .contains("sync_interval")
        );
    }
}
