//! Configuration of `herald serve`, `herald room` and `herald control`: one
//! TOML format, defaults for everything but the apps (and, for the cluster
//! commands, the `[cluster]` section), and command-line overrides.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use herald_control::apps::SECRET_LEN_MIN;
use herald_control::coordinator::{AppWebhooks, WebhookEvent, WebhookPolicy, WebhookRoute};
use herald_proto::NetworkType;
use herald_proto::limits::{APPS_PER_CONN_MAX, PAYLOAD_LEN_MAX};
use herald_storage::GroupCommit;
use serde::{Deserialize, Serialize};

pub const DEFAULT_NODE_ID: &str = "node-1";
pub const DEFAULT_DATA_DIR: &str = "herald-data";
pub const DEFAULT_GATEWAY_LISTEN: &str = "0.0.0.0:7070";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8080";
/// 0 = one shard per core.
pub const DEFAULT_SHARDS: usize = 0;
/// 256 KiB: room for a full delivery window of 4 KiB pushes, several times.
pub const DEFAULT_SEND_QUEUE_BYTES_MAX: usize = 256 * 1024;
/// Each shard's io_uring receive buffer ring: 512 buffers of 2 KiB (1 MiB
/// a shard). Most frames (pings, acks, binds) are tens of bytes; a larger
/// one spans buffers and is put together in its connection's partial-frame
/// buffer.
pub const DEFAULT_RECV_BUFFERS: u32 = 512;
pub const DEFAULT_RECV_BUFFER_BYTES: u32 = 2048;
/// Bounds of `gateway.recv_buffer_bytes`.
const RECV_BUFFER_BYTES_MIN: u32 = 256;
const RECV_BUFFER_BYTES_MAX: u32 = 1 << 20;
/// Frames waiting per connection: many full delivery windows, far more
/// than a client that reads ever has queued.
pub const DEFAULT_SEND_QUEUE_FRAMES_MAX: usize = 1_024;
pub const DEFAULT_AUTH_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_BIND_FAILURES_MAX: u32 = 3;
pub const DEFAULT_INFLIGHT_PUSHES_MAX: u32 = 32;
/// Commands waiting for one shard. A push to every connection fills it, and
/// every slot touched stays resident, so it is a few turns of the shard's
/// loop (256 commands each), not a buffer for the whole fan-out: the control
/// plane waits when it is full.
pub const DEFAULT_COMMAND_QUEUE_LEN: usize = 4 * 1024;
/// The heartbeat a network type gets without `[gateway.heartbeat.<type>]`:
/// (start, min, max) seconds. Carriers' NATs drop idle mappings sooner than
/// home routers, and older radio generations' sooner still; the ranges
/// leave room for a probing client to find its own NAT's limit.
pub fn default_heartbeat(network: NetworkType) -> (u64, u64, u64) {
    match network {
        NetworkType::Unknown => (60, 20, 300),
        NetworkType::Wifi => (120, 30, 600),
        NetworkType::Wired => (240, 60, 1800),
        NetworkType::Cellular2g | NetworkType::Cellular3g => (30, 15, 240),
        NetworkType::Cellular4g | NetworkType::Cellular5g => (45, 20, 420),
    }
}
/// The longest heartbeat interval any setting may name.
pub const HEARTBEAT_SECS_MAX: u64 = 3600;
/// 4 KiB, the customary push payload limit of mobile push services.
pub const DEFAULT_PAYLOAD_BYTES_MAX: usize = 4 * 1024;
/// A push with `"delivery": "notify"` may carry what a frame can.
pub const DEFAULT_NOTIFY_PAYLOAD_BYTES_MAX: usize = PAYLOAD_LEN_MAX;
/// A multicast's clients pull over (users / this) seconds by default.
pub const DEFAULT_NOTIFY_PULLS_PER_SEC: u32 = 1_000;
pub const DEFAULT_MULTICAST_USERS_MAX: usize = 1_000;
pub const DEFAULT_PULL_LIMIT_MAX: u32 = 100;
/// 30 days.
pub const DEFAULT_TTL_SECS_MAX: u64 = 30 * 24 * 3600;
/// 1 day.
pub const DEFAULT_APP_TTL_SECS: u64 = 24 * 3600;
/// A request head is a few hundred bytes: even a slow link sends it in a
/// second or two.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// A body is at most a few hundred KiB.
pub const DEFAULT_BODY_READ_TIMEOUT_SECS: u64 = 30;
/// Long enough for a business server's connection pool to reuse a
/// connection between bursts of calls.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// API connections at once; a business server needs a handful, a load
/// balancer some dozens.
pub const DEFAULT_API_CONNECTIONS_MAX: usize = 1024;
/// Longest API timeout a config may set.
const API_TIMEOUT_SECS_MAX: u64 = 3600;
pub const DEFAULT_ACK_FLUSH_INTERVAL_MS: u64 = 200;
/// A client that crashes on a message before acking it gets it on every
/// bind; after this many binds in a row it is parked for that device.
pub const DEFAULT_REDELIVERIES_MAX: u32 = 10;
/// Past this a stuck device reconnects for hours before parking helps.
const REDELIVERIES_MAX_MAX: u32 = 1_000;
pub const DEFAULT_PURGE_INTERVAL_SECS: u64 = 60;
/// Bounds of the `storage.group_commit_*` settings: a transaction of more
/// calls or recipients holds the write lock (SQLite) or the inbox heads'
/// row locks (MySQL, PostgreSQL) for long, and a push
/// should not wait long for company.
const GROUP_COMMIT_STORES_MAX: usize = 4_096;
const GROUP_COMMIT_RECIPIENTS_MAX: usize = 100_000;
const GROUP_COMMIT_WAIT_MS_MAX: u64 = 100;
pub const DEFAULT_DRAIN_RECONNECT_DELAY_MS: u32 = 1_000;
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_DRAIN_SPREAD_SECS: u64 = 30;
/// A drain longer than an hour is a stuck shutdown, not a gentle one.
const DRAIN_SPREAD_SECS_MAX: u64 = 3_600;
/// The time a frame that has begun to arrive may take, before its length
/// counts: more where the network is slow or lossy.
pub const DEFAULT_FRAME_READ_UNKNOWN_MS: u64 = 10_000;
pub const DEFAULT_FRAME_READ_WIFI_MS: u64 = 5_000;
pub const DEFAULT_FRAME_READ_CELLULAR_MS: u64 = 15_000;
pub const DEFAULT_FRAME_READ_WIRED_MS: u64 = 5_000;
/// ... and the slowest a frame may arrive: a 64 KiB frame gets another
/// minute.
pub const DEFAULT_FRAME_READ_BYTES_PER_SEC_MIN: u32 = 1_024;
const FRAME_READ_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=600_000;
/// How long one webhook attempt may take.
pub const DEFAULT_WEBHOOK_TIMEOUT_SECS: u64 = 10;
/// How long an upstream is retried; its client waits for the answer.
pub const DEFAULT_WEBHOOK_UPSTREAM_DEADLINE_SECS: u64 = 10;
/// How long an online/offline event is retried.
pub const DEFAULT_WEBHOOK_RETRY_DEADLINE_SECS: u64 = 30;
/// The least a webhook secret may be: 32 characters, a 256-bit key's worth
/// of hex would be 64, but a shorter random string still resists guessing.
pub const WEBHOOK_SECRET_LEN_MIN: usize = 32;
/// The route name of an app configured with the older `webhook_url`.
pub const LEGACY_WEBHOOK_ROUTE: &str = "default";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub gateway: GatewaySection,
    pub api: ApiSection,
    pub storage: StorageSection,
    pub delivery: DeliverySection,
    pub webhooks: WebhooksSection,
    pub log: LogSection,
    /// Only for `herald room` and `herald control`.
    pub cluster: Option<ClusterSection>,
    /// The admin API (`/v1/admin`); none: off.
    pub admin: Option<AdminSection>,
    /// Apps created, or updated to what this says, at startup; more come
    /// through the admin API.
    pub apps: Vec<AppSection>,
}

/// What the process logs, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A `tracing` filter (`info`, `warn,herald_control=debug`). None: the
    /// `RUST_LOG` environment variable, else `info`. SIGHUP applies a new
    /// one.
    pub level: Option<String>,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people, on standard error.
    #[default]
    Text,
    /// One JSON object a line on standard output, with each event's spans
    /// (an API call's `request_id`) as fields, for a log shipper.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// What `/v1/admin` calls send as `Authorization: Bearer`; at least 32
    /// characters.
    pub api_key: String,
    /// The networks the admin API and page answer; others get 403.
    /// Empty: any.
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
}

impl ClusterSection {
    /// Where Redis is: exactly one of `redis_url` and `redis_cluster_urls`.
    pub fn redis_target(&self) -> anyhow::Result<herald_control::cluster::connection::RedisTarget> {
        use herald_control::cluster::connection::RedisTarget;
        let target = match (&self.redis_url, self.redis_cluster_urls.as_slice()) {
            (Some(url), []) => RedisTarget::Single(url.clone()),
            (None, [_, ..]) => RedisTarget::Cluster(self.redis_cluster_urls.clone()),
            _ => bail!(
                "[cluster] needs exactly one of redis_url (one Redis server) and \
                 redis_cluster_urls (the seed nodes of a Redis Cluster)"
            ),
        };
        let urls = match &target {
            RedisTarget::Single(url) => std::slice::from_ref(url),
            RedisTarget::Cluster(urls) => urls.as_slice(),
        };
        if let Some(bad) = urls.iter().find(|url| !url.starts_with("redis://")) {
            bail!("Redis URL {bad:?} must start with redis://");
        }
        Ok(target)
    }
}

/// `[cluster]`: the shared engines and this node's place among the nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The register and the channel between nodes: one Redis server (or a
    /// proxy), e.g. redis://127.0.0.1:6379 ...
    pub redis_url: Option<String>,
    /// ... or the seed nodes of a Redis Cluster.
    #[serde(default)]
    pub redis_cluster_urls: Vec<String>,
    /// The messages: mysql://user:password@host/db or postgres://user@host/db.
    pub database_url: String,
    /// Overrides the top-level `node_id`; unique per node.
    pub node_id: Option<String>,
    /// Room nodes: the gateway address the dispatcher gives clients
    /// (host:port). Default: the gateway's listening address.
    pub advertise: Option<String>,
    /// Room nodes: the region the dispatcher matches `region=` against.
    #[serde(default)]
    pub region: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// `None`: io_uring where the kernel allows it, else epoll.
    pub io: Option<IoSetting>,
    /// The plain TCP listener. Absent: 0.0.0.0:7070 unless `listeners`
    /// names others.
    pub listen: Option<SocketAddr>,
    /// More listeners, each with its transport.
    pub listeners: Vec<ListenerSection>,
    /// The certificate of tls and wss listeners.
    pub tls: Option<TlsSection>,
    pub websocket: WebSocketSection,
    pub shards: usize,
    /// None: as many as the open-file limit allows, resolved at startup.
    pub connections_per_shard_max: Option<usize>,
    pub send_queue_bytes_max: usize,
    pub send_queue_frames_max: usize,
    /// io_uring: buffers in each shard's receive ring (a power of two, at
    /// most 32,768), shared by all its connections ...
    pub recv_buffers: u32,
    /// ... and the bytes of each.
    pub recv_buffer_bytes: u32,
    pub auth_timeout_secs: u64,
    pub bind_failures_max: u32,
    pub apps_per_connection_max: usize,
    pub inflight_pushes_max: u32,
    pub command_queue_len: usize,
    /// New connections per second the gateway takes before it turns the
    /// rest away with a retry delay; none: no limit.
    pub accept_rate: Option<RateSection>,
    /// The reconnect hint of a drain's GOAWAYs: each is drawn uniformly
    /// from half of it to one and a half times it.
    pub drain_reconnect_delay_ms: u32,
    /// How long a drain waits for its clients' connections to close once
    /// the last GOAWAY is sent; the whole drain takes at most
    /// `drain_spread_secs + drain_timeout_secs`.
    pub drain_timeout_secs: u64,
    /// The window a drain's GOAWAYs are spread over, in even batches, so
    /// its clients come back to the other nodes at a steady rate; 0 sends
    /// them all at once.
    pub drain_spread_secs: u64,
    /// `[gateway.heartbeat.<network type>]`: start interval and negotiable
    /// range per type; types left out keep `default_heartbeat`.
    pub heartbeat: BTreeMap<String, HeartbeatRangeSection>,
    /// The older form, `[gateway.heartbeat_secs]` with `unknown`, `wifi`,
    /// `cellular` and `wired`: each value is the type's start interval
    /// (`cellular` that of 2g to 5g), its range widened to include it.
    pub heartbeat_secs: Option<LegacyHeartbeatSection>,
    /// Limits per client address; none: no limit.
    pub per_ip: Option<PerIpSection>,
    /// How long a frame that has begun to arrive may take to finish.
    pub frame_read: FrameReadSection,
    /// Pin each shard to its own CPU (of those the process may use); turn
    /// off when several processes share the CPUs.
    pub pin_shards: bool,
}

/// `[[gateway.listeners]]`: an address and what clients speak there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub address: SocketAddr,
    pub transport: herald_proto::Transport,
}

/// `[gateway.tls]`: PEM files; SIGHUP reads them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key: PKCS#8, RSA or EC.
    pub key_file: PathBuf,
}

/// `[gateway.websocket]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketSection {
    /// `Origin`s that may upgrade (`https://app.example.com`); empty: any.
    pub allowed_origins: Vec<String>,
    /// Test only: every WebSocket message is echoed back and nothing speaks
    /// Herald, so a conformance suite can drive the WebSocket code.
    pub test_echo: bool,
}

/// `gateway.io`: how the gateway waits for its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoSetting {
    /// io_uring: the default.
    #[default]
    Uring,
    /// epoll (tokio): for hosts where io_uring is blocked.
    Epoll,
}

impl Config {
    /// The gateway's driver, once `resolve_io` has settled it.
    pub fn io_driver(&self) -> herald_room::IoDriver {
        self.gateway.io.unwrap_or_default().driver()
    }

    /// Each shard's receive buffer ring (checked by `validate`).
    pub fn recv_buffers(&self) -> herald_room::RecvBuffers {
        herald_room::RecvBuffers {
            count: u16::try_from(self.gateway.recv_buffers).expect("validated"),
            len: self.gateway.recv_buffer_bytes,
        }
    }
}

impl IoSetting {
    pub fn driver(self) -> herald_room::IoDriver {
        match self {
            IoSetting::Uring => herald_room::IoDriver::Uring,
            IoSetting::Epoll => herald_room::IoDriver::Epoll,
        }
    }
}

/// `[gateway.per_ip]`: what one client address may open. A connection
/// past a limit is turned away with GOAWAY(overloaded) and a retry hint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerIpSection {
    /// Connections open at once from one address (an IPv6 /64).
    pub connections_max: Option<u32>,
    /// New connections a second from one address ...
    pub new_per_sec: Option<f64>,
    /// ... and how many may come at once above that rate (default: one
    /// second's worth).
    pub new_burst: Option<u32>,
    /// Networks exempt from both limits (a carrier's NAT): CIDRs like
    /// "10.0.0.0/8" or "2001:db8::/32", or single addresses.
    pub allow_cidrs: Vec<String>,
}

impl PerIpSection {
    /// The gateway's limits (checked by `validate`).
    pub fn limits(&self) -> herald_room::PerIpConfig {
        herald_room::PerIpConfig {
            connections_max: self.connections_max,
            new_per_sec: self.new_per_sec.map(|per_sec| herald_proto::rate::Rate {
                per_sec,
                burst: self.new_burst.unwrap_or((per_sec.ceil() as u32).max(1)),
            }),
            allowed: parse_cidrs(&self.allow_cidrs).expect("validated"),
        }
    }

    fn check(&self, problems: &mut Vec<String>) {
        if self.connections_max.is_none() && self.new_per_sec.is_none() {
            problems
                .push("[gateway.per_ip] needs connections_max or new_per_sec (or both)".to_owned());
        }
        if self.connections_max == Some(0) {
            problems.push("gateway.per_ip.connections_max must be at least 1".to_owned());
        }
        if let Some(per_sec) = self.new_per_sec
            && !(per_sec.is_finite() && per_sec > 0.0)
        {
            problems.push(format!(
                "gateway.per_ip.new_per_sec must be above 0, not {per_sec}"
            ));
        }
        if self.new_burst == Some(0) {
            problems.push("gateway.per_ip.new_burst must be at least 1".to_owned());
        }
        if self.new_burst.is_some() && self.new_per_sec.is_none() {
            problems.push("gateway.per_ip.new_burst needs new_per_sec".to_owned());
        }
        if let Err(problem) = parse_cidrs(&self.allow_cidrs) {
            problems.push(format!("gateway.per_ip.allow_cidrs: {problem}"));
        }
    }
}

/// Parses a list of networks: CIDRs ("10.0.0.0/8", "2001:db8::/32") or
/// single addresses.
pub fn parse_cidrs(list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    list.iter()
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    format!(
                        "{text:?} is not a network: write a CIDR like \"10.0.0.0/8\" or \"2001:db8::/32\", or an address"
                    )
                })
        })
        .collect()
}

/// `[gateway.frame_read]`: a frame that has begun to arrive must be whole
/// within its network's time plus its length at `bytes_per_sec_min`, or
/// the connection is closed (`read_timeout`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrameReadSection {
    /// Before HELLO, and for clients that do not say.
    pub unknown_ms: u64,
    pub wifi_ms: u64,
    pub cellular_ms: u64,
    pub wired_ms: u64,
    pub bytes_per_sec_min: u32,
}

impl Default for FrameReadSection {
    fn default() -> Self {
        FrameReadSection {
            unknown_ms: DEFAULT_FRAME_READ_UNKNOWN_MS,
            wifi_ms: DEFAULT_FRAME_READ_WIFI_MS,
            cellular_ms: DEFAULT_FRAME_READ_CELLULAR_MS,
            wired_ms: DEFAULT_FRAME_READ_WIRED_MS,
            bytes_per_sec_min: DEFAULT_FRAME_READ_BYTES_PER_SEC_MIN,
        }
    }
}

impl FrameReadSection {
    pub fn deadlines(&self) -> herald_room::ReadDeadlines {
        herald_room::ReadDeadlines {
            unknown: Duration::from_millis(self.unknown_ms),
            wifi: Duration::from_millis(self.wifi_ms),
            cellular: Duration::from_millis(self.cellular_ms),
            wired: Duration::from_millis(self.wired_ms),
            bytes_per_sec_min: self.bytes_per_sec_min,
        }
    }

    fn check(&self, problems: &mut Vec<String>) {
        for (name, ms) in [
            ("unknown_ms", self.unknown_ms),
            ("wifi_ms", self.wifi_ms),
            ("cellular_ms", self.cellular_ms),
            ("wired_ms", self.wired_ms),
        ] {
            if !FRAME_READ_MS_RANGE.contains(&ms) {
                problems.push(format!(
                    "gateway.frame_read.{name} must be {} to {}, not {ms}",
                    FRAME_READ_MS_RANGE.start(),
                    FRAME_READ_MS_RANGE.end()
                ));
            }
        }
        if self.bytes_per_sec_min == 0 {
            problems.push("gateway.frame_read.bytes_per_sec_min must be at least 1".to_owned());
        }
    }
}

/// `[gateway.heartbeat.<network type>]`; a key left out keeps the type's
/// default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRangeSection {
    /// The interval HELLO_OK hands out.
    pub start_secs: Option<u64>,
    /// The range a client's HEARTBEAT proposal is clamped to.
    pub min_secs: Option<u64>,
    pub max_secs: Option<u64>,
}

/// `[gateway.heartbeat_secs]`, the form before negotiation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyHeartbeatSection {
    pub unknown: Option<u64>,
    pub wifi: Option<u64>,
    pub cellular: Option<u64>,
    pub wired: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    pub listen: SocketAddr,
    pub payload_bytes_max: usize,
    /// Largest payload of a push with `"delivery": "notify"`.
    pub notify_payload_bytes_max: usize,
    /// The pulls a second a multicast's default pull spread aims at.
    pub notify_pulls_per_sec: u32,
    pub multicast_users_max: usize,
    pub pull_limit_max: u32,
    pub ttl_secs_max: u64,
    /// A request's head must be complete within this, from the accept or
    /// from its first byte on a kept-alive connection.
    pub header_read_timeout_secs: u64,
    /// A request's body must be complete within this, from its head.
    pub body_read_timeout_secs: u64,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout_secs: u64,
    /// API connections at once; past it new ones wait in the backlog.
    pub connections_max: usize,
    /// The networks the app routes (`/v1/apps/...`) answer; others get
    /// 403. Empty: any.
    pub allowed_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    pub ack_flush_interval_ms: u64,
    pub purge_interval_secs: u64,
    /// Group commit: calls one transaction takes at most.
    pub group_commit_stores_max: usize,
    /// Group commit: recipients one transaction takes at most.
    pub group_commit_recipients_max: usize,
    /// Group commit: how long the first call waits for company.
    pub group_commit_wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSection {
    pub id: String,
    pub api_key: String,
    pub token_secret: String,
    #[serde(default = "default_app_ttl")]
    pub default_ttl_secs: u64,
    /// Connections that may bind the app at once on each gateway node;
    /// none: no limit but the gateway's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Pushes per second (a multicast counts each user); none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_rate: Option<RateSection>,
    /// Broadcasts per second; none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast_rate: Option<RateSection>,
    /// Where clients' upstream data and users' online/offline events go:
    /// `[{ route = "orders", url = "https://...", events = ["upstream"] }]`.
    /// Upstream naming no route goes to the first route that takes
    /// upstream data; none: upstream is answered `no_endpoint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookRoute>,
    /// The older form of `webhooks`: one route, `default`, for every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// The key every webhook call is signed with (`Herald-Signature`);
    /// needed with webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// Webhook calls per second; none: as fast as they come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_rate: Option<RateSection>,
}

impl AppSection {
    /// The app's webhook routes, secret and rate; none without webhooks.
    pub fn webhooks(&self) -> Option<AppWebhooks> {
        let routes = match &self.webhook_url {
            Some(url) => vec![WebhookRoute {
                route: LEGACY_WEBHOOK_ROUTE.to_owned(),
                url: url.clone(),
                events: vec![
                    WebhookEvent::Upstream,
                    WebhookEvent::Online,
                    WebhookEvent::Offline,
                ],
            }],
            None if self.webhooks.is_empty() => return None,
            None => self.webhooks.clone(),
        };
        Some(AppWebhooks {
            routes,
            secrets: self.webhook_secret.iter().cloned().collect(),
            rate: self.webhook_rate.map(RateSection::rate),
        })
    }

    /// Refuses webhook settings that cannot work, with the reason.
    fn check_webhooks(&self) -> anyhow::Result<()> {
        let id = &self.id;
        if self.webhook_url.is_some() && !self.webhooks.is_empty() {
            bail!("app {id:?}: set webhooks or the older webhook_url, not both");
        }
        let Some(webhooks) = self.webhooks() else {
            return Ok(());
        };
        if self
            .webhook_secret
            .as_ref()
            .is_none_or(|secret| secret.len() < WEBHOOK_SECRET_LEN_MIN)
        {
            bail!(
                "app {id:?}: webhook_secret must be at least {WEBHOOK_SECRET_LEN_MIN} characters \
                 (every webhook call is signed with it)"
            );
        }
        herald_control::apps::check_webhook_routes(&webhooks.routes)
            .map_err(|error| anyhow::anyhow!("app {id:?}: {error}"))?;
        Ok(())
    }
}

/// `[delivery]`: how stored messages reach devices that do not ack them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Binds in a row a device's first fill may start at one message it
    /// never acks; on the next, the message is parked for the device (its
    /// cursor moves past it, a `parked` webhook event goes out). 0: never
    /// parked.
    pub redeliveries_max: u32,
}

impl Default for DeliverySection {
    fn default() -> Self {
        DeliverySection {
            redeliveries_max: DEFAULT_REDELIVERIES_MAX,
        }
    }
}

/// `[webhooks]`: how every app's webhook calls are made and retried.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksSection {
    /// PEM CA certificates that https:// webhooks must chain to, instead
    /// of the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How long one attempt may take.
    pub timeout_secs: u64,
    /// How long an upstream is retried after it arrived; its client gets
    /// `unavailable` then. At most `retry_deadline_secs`.
    pub upstream_deadline_secs: u64,
    /// How long an online/offline event is retried after it happened.
    pub retry_deadline_secs: u64,
}

impl Default for WebhooksSection {
    fn default() -> Self {
        WebhooksSection {
            ca_file: None,
            timeout_secs: DEFAULT_WEBHOOK_TIMEOUT_SECS,
            upstream_deadline_secs: DEFAULT_WEBHOOK_UPSTREAM_DEADLINE_SECS,
            retry_deadline_secs: DEFAULT_WEBHOOK_RETRY_DEADLINE_SECS,
        }
    }
}

impl WebhooksSection {
    /// The most any of the section's durations may be: an hour of retries
    /// holds a call's place in its app's queue that long.
    const SECS_MAX: u64 = 3600;

    fn check(&self) -> anyhow::Result<()> {
        let max = Self::SECS_MAX;
        if !(1..=max).contains(&self.timeout_secs) {
            bail!("webhooks.timeout_secs must be 1 to {max}");
        }
        if !(1..=max).contains(&self.retry_deadline_secs) {
            bail!("webhooks.retry_deadline_secs must be 1 to {max}");
        }
        if !(1..=self.retry_deadline_secs).contains(&self.upstream_deadline_secs) {
            bail!(
                "webhooks.upstream_deadline_secs must be 1 to webhooks.retry_deadline_secs ({})",
                self.retry_deadline_secs
            );
        }
        Ok(())
    }

    pub fn policy(&self) -> WebhookPolicy {
        WebhookPolicy {
            ca_file: self.ca_file.clone(),
            call_timeout: Duration::from_secs(self.timeout_secs),
            upstream_deadline: Duration::from_secs(self.upstream_deadline_secs),
            state_deadline: Duration::from_secs(self.retry_deadline_secs),
        }
    }
}

/// `{ per_sec = 100, burst = 200 }`: a token bucket.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSection {
    pub per_sec: f64,
    pub burst: u32,
}

impl RateSection {
    pub fn rate(self) -> herald_control::flow::Rate {
        herald_control::flow::Rate {
            per_sec: self.per_sec,
            burst: self.burst,
        }
    }
}

fn default_app_ttl() -> u64 {
    DEFAULT_APP_TTL_SECS
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: DEFAULT_NODE_ID.to_owned(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            gateway: GatewaySection::default(),
            api: ApiSection::default(),
            storage: StorageSection::default(),
            delivery: DeliverySection::default(),
            webhooks: WebhooksSection::default(),
            log: LogSection::default(),
            cluster: None,
            admin: None,
            apps: Vec::new(),
        }
    }
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            io: None,
            listen: None,
            listeners: Vec::new(),
            tls: None,
            websocket: WebSocketSection::default(),
            shards: DEFAULT_SHARDS,
            connections_per_shard_max: None,
            send_queue_bytes_max: DEFAULT_SEND_QUEUE_BYTES_MAX,
            send_queue_frames_max: DEFAULT_SEND_QUEUE_FRAMES_MAX,
            recv_buffers: DEFAULT_RECV_BUFFERS,
            recv_buffer_bytes: DEFAULT_RECV_BUFFER_BYTES,
            auth_timeout_secs: DEFAULT_AUTH_TIMEOUT_SECS,
            bind_failures_max: DEFAULT_BIND_FAILURES_MAX,
            apps_per_connection_max: APPS_PER_CONN_MAX,
            inflight_pushes_max: DEFAULT_INFLIGHT_PUSHES_MAX,
            command_queue_len: DEFAULT_COMMAND_QUEUE_LEN,
            accept_rate: None,
            drain_reconnect_delay_ms: DEFAULT_DRAIN_RECONNECT_DELAY_MS,
            drain_timeout_secs: DEFAULT_DRAIN_TIMEOUT_SECS,
            drain_spread_secs: DEFAULT_DRAIN_SPREAD_SECS,
            heartbeat: BTreeMap::new(),
            heartbeat_secs: None,
            per_ip: None,
            frame_read: FrameReadSection::default(),
            pin_shards: true,
        }
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: DEFAULT_API_LISTEN.parse().expect("valid default"),
            payload_bytes_max: DEFAULT_PAYLOAD_BYTES_MAX,
            notify_payload_bytes_max: DEFAULT_NOTIFY_PAYLOAD_BYTES_MAX,
            notify_pulls_per_sec: DEFAULT_NOTIFY_PULLS_PER_SEC,
            multicast_users_max: DEFAULT_MULTICAST_USERS_MAX,
            pull_limit_max: DEFAULT_PULL_LIMIT_MAX,
            ttl_secs_max: DEFAULT_TTL_SECS_MAX,
            header_read_timeout_secs: DEFAULT_HEADER_READ_TIMEOUT_SECS,
            body_read_timeout_secs: DEFAULT_BODY_READ_TIMEOUT_SECS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            connections_max: DEFAULT_API_CONNECTIONS_MAX,
            allowed_cidrs: Vec::new(),
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            ack_flush_interval_ms: DEFAULT_ACK_FLUSH_INTERVAL_MS,
            purge_interval_secs: DEFAULT_PURGE_INTERVAL_SECS,
            group_commit_stores_max: GroupCommit::default().stores_max,
            group_commit_recipients_max: GroupCommit::default().recipients_max,
            group_commit_wait_ms: GroupCommit::default().wait.as_millis() as u64,
        }
    }
}

impl StorageSection {
    /// How the saver groups stores, on every engine.
    pub fn group_commit(&self) -> GroupCommit {
        GroupCommit {
            stores_max: self.group_commit_stores_max,
            recipients_max: self.group_commit_recipients_max,
            wait: Duration::from_millis(self.group_commit_wait_ms),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        Ok(config)
    }

    /// Refuses settings that cannot work, with the reason.
    /// Every problem of the config, for people: empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(level) = &self.log.level
            && let Err(error) = tracing_subscriber::EnvFilter::builder().parse(level)
        {
            problems.push(format!(
                "[log] level {level:?} is not a tracing filter: {error}"
            ));
        }
        if let Some(admin) = &self.admin
            && admin.api_key.len() < herald_control::admin::ADMIN_KEY_LEN_MIN
        {
            problems.push(format!(
                "[admin] api_key must be at least {} characters",
                herald_control::admin::ADMIN_KEY_LEN_MIN
            ));
        }
        if let Some(admin) = &self.admin
            && let Err(problem) = parse_cidrs(&admin.allowed_cidrs)
        {
            problems.push(format!("[admin] allowed_cidrs: {problem}"));
        }
        if let Err(problem) = parse_cidrs(&self.api.allowed_cidrs) {
            problems.push(format!("[api] allowed_cidrs: {problem}"));
        }
        if self.apps.is_empty() && self.admin.is_none() {
            problems.push(
                "the config defines no [[apps]], and no [admin] api_key to create them with"
                    .to_owned(),
            );
        }
        let mut ids = std::collections::HashSet::new();
        for app in &self.apps {
            if let Err(problem) = herald_control::apps::check_app_id(&app.id) {
                problems.push(problem);
            }
            if !ids.insert(&app.id) {
                problems.push(format!("app {:?} is defined twice", app.id));
            }
            for (name, secret) in [
                ("api_key", &app.api_key),
                ("token_secret", &app.token_secret),
            ] {
                if secret.len() < SECRET_LEN_MIN {
                    problems.push(format!(
                        "app {:?}: {name} must be at least {SECRET_LEN_MIN} characters",
                        app.id
                    ));
                }
            }
            if let Err(problem) = app.check_webhooks() {
                problems.push(problem.to_string());
            }
            for (name, rate) in [
                ("push_rate", app.push_rate),
                ("broadcast_rate", app.broadcast_rate),
                ("webhook_rate", app.webhook_rate),
            ] {
                if let Some(rate) = rate
                    && !(rate.per_sec > 0.0 && rate.per_sec.is_finite() && rate.burst >= 1)
                {
                    problems.push(format!(
                        "app {:?}: {name} needs per_sec above 0 and burst of at least 1",
                        app.id
                    ));
                }
            }
            if app.default_ttl_secs == 0 || app.default_ttl_secs > self.api.ttl_secs_max {
                problems.push(format!(
                    "app {:?}: default_ttl_secs must be 1 to api.ttl_secs_max ({})",
                    app.id, self.api.ttl_secs_max
                ));
            }
        }
        if let Err(problem) = self.webhooks.check() {
            problems.push(problem.to_string());
        }
        if self.delivery.redeliveries_max > REDELIVERIES_MAX_MAX {
            problems.push(format!(
                "delivery.redeliveries_max must be 0 (never park) to {REDELIVERIES_MAX_MAX}"
            ));
        }
        let gateway = &self.gateway;
        if gateway.apps_per_connection_max == 0
            || gateway.apps_per_connection_max > APPS_PER_CONN_MAX
        {
            problems.push(format!(
                "gateway.apps_per_connection_max must be 1 to {APPS_PER_CONN_MAX}"
            ));
        }
        if gateway.inflight_pushes_max == 0 {
            problems.push("gateway.inflight_pushes_max must be at least 1".to_owned());
        }
        if self.api.payload_bytes_max == 0 || self.api.payload_bytes_max > PAYLOAD_LEN_MAX {
            problems.push(format!(
                "api.payload_bytes_max must be 1 to {PAYLOAD_LEN_MAX} (the protocol's limit)"
            ));
        }
        if self.api.notify_payload_bytes_max == 0
            || self.api.notify_payload_bytes_max > PAYLOAD_LEN_MAX
        {
            problems.push(format!(
                "api.notify_payload_bytes_max must be 1 to {PAYLOAD_LEN_MAX} (the protocol's limit)"
            ));
        }
        if self.api.notify_pulls_per_sec == 0 {
            problems.push("api.notify_pulls_per_sec must be at least 1".to_owned());
        }
        // A full window of the largest pushes must fit in a connection's
        // queue, or a client that reads normally could be cut as slow; and
        // with it the one notify message a client that cannot pull gets
        // whole at a time.
        let window_bytes = gateway.inflight_pushes_max as usize
            * (self.api.payload_bytes_max + 128)
            + self.api.notify_payload_bytes_max
            + 128;
        if gateway.send_queue_bytes_max < window_bytes {
            problems.push(format!(
                "gateway.send_queue_bytes_max ({}) must hold a full delivery window and one \
                 notify message: inflight_pushes_max x (payload_bytes_max + 128) + \
                 notify_payload_bytes_max + 128 = {window_bytes}",
                gateway.send_queue_bytes_max
            ));
        }
        let frames_min = gateway.inflight_pushes_max as usize * gateway.apps_per_connection_max;
        if gateway.send_queue_frames_max < frames_min || gateway.send_queue_frames_max > 65_535 {
            problems.push(format!(
                "gateway.send_queue_frames_max ({}) must hold a full delivery window of every app \
                 (inflight_pushes_max x apps_per_connection_max = {frames_min}) and be at most 65535",
                gateway.send_queue_frames_max
            ));
        }
        if let Some(per_ip) = &gateway.per_ip {
            per_ip.check(&mut problems);
        }
        gateway.frame_read.check(&mut problems);
        if gateway.drain_spread_secs > DRAIN_SPREAD_SECS_MAX {
            problems.push(format!(
                "gateway.drain_spread_secs must be at most {DRAIN_SPREAD_SECS_MAX}, not {}",
                gateway.drain_spread_secs
            ));
        }
        if gateway.heartbeat_secs.is_some() && !gateway.heartbeat.is_empty() {
            problems.push(
                "gateway.heartbeat_secs is the older form of gateway.heartbeat.<type>: \
                 use one of them"
                    .to_owned(),
            );
        }
        if let Some(legacy) = &gateway.heartbeat_secs {
            for (name, secs) in [
                ("unknown", legacy.unknown),
                ("wifi", legacy.wifi),
                ("cellular", legacy.cellular),
                ("wired", legacy.wired),
            ] {
                if secs.is_some_and(|secs| secs == 0 || secs > HEARTBEAT_SECS_MAX) {
                    problems.push(format!(
                        "gateway.heartbeat_secs.{name} must be 1 to {HEARTBEAT_SECS_MAX}"
                    ));
                }
            }
        }
        for name in gateway.heartbeat.keys() {
            // `cellular` parses (as 4g) for old HELLOs, not as a section.
            if name == "cellular" || name.parse::<NetworkType>().is_err() {
                problems.push(format!(
                    "gateway.heartbeat.{name}: unknown network type (expected 2g, 3g, 4g, \
                     5g, wifi, wired or unknown)"
                ));
            }
        }
        for (network, range) in self.heartbeat_settings() {
            let (start, min, max) = range;
            let name = network.as_str();
            if !(1 <= min && min <= start && start <= max && max <= HEARTBEAT_SECS_MAX) {
                problems.push(format!(
                    "gateway.heartbeat.{name} needs 1 <= min_secs <= start_secs <= max_secs \
                     <= {HEARTBEAT_SECS_MAX}, not min {min}, start {start}, max {max}"
                ));
            }
        }
        if let Some(rate) = gateway.accept_rate
            && !(rate.per_sec >= self.shards() as f64
                && rate.per_sec.is_finite()
                && rate.burst >= 1)
        {
            problems.push(format!(
                "gateway.accept_rate needs per_sec of at least one per shard ({}) and a burst of at least 1",
                self.shards()
            ));
        }
        if !gateway.recv_buffers.is_power_of_two()
            || gateway.recv_buffers > u32::from(herald_room::RecvBuffers::COUNT_MAX)
        {
            problems.push(format!(
                "gateway.recv_buffers must be a power of two from 1 to {}, not {}",
                herald_room::RecvBuffers::COUNT_MAX,
                gateway.recv_buffers
            ));
        }
        if !(RECV_BUFFER_BYTES_MIN..=RECV_BUFFER_BYTES_MAX).contains(&gateway.recv_buffer_bytes) {
            problems.push(format!(
                "gateway.recv_buffer_bytes must be from {RECV_BUFFER_BYTES_MIN} to {RECV_BUFFER_BYTES_MAX}, not {}",
                gateway.recv_buffer_bytes
            ));
        }
        if gateway.command_queue_len == 0 || gateway.connections_per_shard_max == Some(0) {
            problems.push(
                "gateway.command_queue_len and connections_per_shard_max must be positive"
                    .to_owned(),
            );
        }
        if self.api.multicast_users_max == 0 || self.api.pull_limit_max == 0 {
            problems
                .push("api.multicast_users_max and api.pull_limit_max must be positive".to_owned());
        }
        for (name, secs) in [
            (
                "header_read_timeout_secs",
                self.api.header_read_timeout_secs,
            ),
            ("body_read_timeout_secs", self.api.body_read_timeout_secs),
            ("idle_timeout_secs", self.api.idle_timeout_secs),
        ] {
            if secs == 0 || secs > API_TIMEOUT_SECS_MAX {
                problems.push(format!("api.{name} must be 1 to {API_TIMEOUT_SECS_MAX}"));
            }
        }
        if self.api.connections_max == 0 {
            problems.push("api.connections_max must be positive".to_owned());
        }
        let storage = &self.storage;
        if !(1..=GROUP_COMMIT_STORES_MAX).contains(&storage.group_commit_stores_max) {
            problems.push(format!(
                "storage.group_commit_stores_max must be 1 to {GROUP_COMMIT_STORES_MAX}"
            ));
        }
        if !(1..=GROUP_COMMIT_RECIPIENTS_MAX).contains(&storage.group_commit_recipients_max) {
            problems.push(format!(
                "storage.group_commit_recipients_max must be 1 to {GROUP_COMMIT_RECIPIENTS_MAX}"
            ));
        }
        if storage.group_commit_wait_ms > GROUP_COMMIT_WAIT_MS_MAX {
            problems.push(format!(
                "storage.group_commit_wait_ms must be 0 to {GROUP_COMMIT_WAIT_MS_MAX}"
            ));
        }
        let listeners = self.gateway_listeners();
        if listeners.len() > herald_room::LISTENERS_MAX {
            problems.push(format!(
                "the gateway may have at most {} listeners",
                herald_room::LISTENERS_MAX
            ));
        }
        if let Some(listener) = listeners
            .iter()
            .find(|listener| listener.transport.uses_tls() && gateway.tls.is_none())
        {
            problems.push(format!(
                "gateway listener {} ({}) needs a certificate: add [gateway.tls] with cert_file \
                 and key_file",
                listener.addr, listener.transport
            ));
        }
        problems
    }

    /// Fails with every problem of the config, one a line.
    pub fn validate(&self) -> anyhow::Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("\n"))
        }
    }

    /// Every address the gateway listens on: `gateway.listen` as a tcp
    /// listener (by default 0.0.0.0:7070 when nothing else is set), then
    /// `[[gateway.listeners]]`.
    pub fn gateway_listeners(&self) -> Vec<herald_room::ListenerConfig> {
        let gateway = &self.gateway;
        let tcp = match gateway.listen {
            Some(addr) => Some(addr),
            None if gateway.listeners.is_empty() => {
                Some(DEFAULT_GATEWAY_LISTEN.parse().expect("valid default"))
            }
            None => None,
        };
        tcp.map(|addr| herald_room::ListenerConfig {
            addr,
            transport: herald_room::TransportKind::Tcp,
        })
        .into_iter()
        .chain(
            gateway
                .listeners
                .iter()
                .map(|listener| herald_room::ListenerConfig {
                    addr: listener.address,
                    transport: listener.transport,
                }),
        )
        .collect()
    }

    /// The `[cluster]` section the cluster commands need, checked.
    pub fn cluster(&self) -> anyhow::Result<&ClusterSection> {
        let cluster = self.cluster.as_ref().context(
            "the config has no [cluster] section (redis_url, database_url): \
             `herald room` and `herald control` need one",
        )?;
        check_node_id(self.node_id())?;
        cluster.redis_target()?;
        if cluster.database_url.starts_with("sqlite:") {
            bail!(
                "cluster.database_url must name a database every node reaches \
                 (mysql://... or postgres://...), not a SQLite file"
            );
        }
        Ok(cluster)
    }

    /// This node's id: `cluster.node_id`, else the top-level `node_id`.
    pub fn node_id(&self) -> &str {
        self.cluster
            .as_ref()
            .and_then(|cluster| cluster.node_id.as_deref())
            .unwrap_or(&self.node_id)
    }

    pub fn app(&self, id: &str) -> anyhow::Result<&AppSection> {
        self.apps
            .iter()
            .find(|app| app.id == id)
            .with_context(|| format!("no app {id:?} in the configuration"))
    }

    pub fn shards(&self) -> usize {
        match self.gateway.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    pub fn http_limits(&self) -> herald_control::HttpLimits {
        herald_control::HttpLimits {
            header_read_timeout: Duration::from_secs(self.api.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(self.api.body_read_timeout_secs),
            idle_timeout: Duration::from_secs(self.api.idle_timeout_secs),
            connections_max: self.api.connections_max,
        }
    }

    /// (start, min, max) seconds per network type, from the defaults and
    /// either form of the section.
    fn heartbeat_settings(&self) -> impl Iterator<Item = (NetworkType, (u64, u64, u64))> + '_ {
        NetworkType::ALL.into_iter().map(|network| {
            let (mut start, mut min, mut max) = default_heartbeat(network);
            if let Some(section) = self.gateway.heartbeat.get(network.as_str()) {
                start = section.start_secs.unwrap_or(start);
                min = section.min_secs.unwrap_or(min);
                max = section.max_secs.unwrap_or(max);
            }
            if let Some(legacy) = &self.gateway.heartbeat_secs {
                let secs = match network {
                    NetworkType::Unknown => legacy.unknown,
                    NetworkType::Wifi => legacy.wifi,
                    NetworkType::Wired => legacy.wired,
                    NetworkType::Cellular2g
                    | NetworkType::Cellular3g
                    | NetworkType::Cellular4g
                    | NetworkType::Cellular5g => legacy.cellular,
                };
                if let Some(secs) = secs {
                    start = secs;
                    min = min.min(secs);
                    max = max.max(secs);
                }
            }
            (network, (start, min, max))
        })
    }

    /// The gateway's heartbeat ranges; call after `validate`, which keeps
    /// every figure within `HEARTBEAT_SECS_MAX`.
    pub fn heartbeat(&self) -> herald_proto::server::HeartbeatRanges {
        let mut ranges = herald_proto::server::HeartbeatRanges::fixed(Duration::ZERO);
        for (network, (start, min, max)) in self.heartbeat_settings() {
            let secs = |value: u64| u16::try_from(value).unwrap_or(u16::MAX);
            ranges.0[network.index()] = herald_proto::server::HeartbeatRange {
                start_secs: secs(start),
                min_secs: secs(min),
                max_secs: secs(max),
            };
        }
        ranges
    }
}

/// Node ids name Redis keys and channels: keep them to a safe alphabet.
fn check_node_id(id: &str) -> anyhow::Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !valid {
        bail!("node id {id:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'");
    }
    Ok(())
}

/// The file that keeps the generated `demo` app's keys across restarts.
pub fn demo_app_path(data_dir: &Path) -> PathBuf {
    data_dir.join("demo-app.toml")
}

/// Loads the `demo` app from the data dir, creating it with fresh random
/// keys on first use. Returns the app and whether it was just created.
pub fn demo_app(data_dir: &Path) -> anyhow::Result<(AppSection, bool)> {
    let path = demo_app_path(data_dir);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let app: AppSection =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        return Ok((app, false));
    }
    let app = AppSection {
        id: "demo".to_owned(),
        api_key: random_hex(16),
        token_secret: random_hex(32),
        default_ttl_secs: DEFAULT_APP_TTL_SECS,
        max_connections: None,
        push_rate: None,
        broadcast_rate: None,
        webhooks: Vec::new(),
        webhook_url: None,
        webhook_secret: None,
        webhook_rate: None,
    };
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    std::fs::write(&path, toml::to_string(&app)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((app, true))
}

fn random_hex(bytes: usize) -> String {
    let key: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppSection {
        AppSection {
            id: "chat".to_owned(),
            api_key: "k".repeat(16),
            token_secret: "s".repeat(16),
            default_ttl_secs: 60,
            max_connections: None,
            push_rate: None,
            broadcast_rate: None,
            webhooks: Vec::new(),
            webhook_url: None,
            webhook_secret: None,
            webhook_rate: None,
        }
    }

    #[test]
    fn defaults_with_one_app_are_valid() {
        let config = Config {
            apps: vec![app()],
            ..Config::default()
        };
        config.validate().unwrap();
    }

    #[test]
    fn a_drain_spread_past_an_hour_is_refused() {
        let mut config = Config {
            apps: vec![app()],
            ..Config::default()
        };
        config.gateway.drain_spread_secs = 0;
        config.validate().unwrap();
        config.gateway.drain_spread_secs = 3_601;
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("gateway.drain_spread_secs must be at most 3600"),
            "{error}"
        );
    }

    #[test]
    fn redeliveries_max_is_0_to_1000() {
        let mut config = Config {
            apps: vec![app()],
            ..Config::default()
        };
        assert_eq!(config.delivery.redeliveries_max, DEFAULT_REDELIVERIES_MAX);
        for valid in [0, 1_000] {
            config.delivery.redeliveries_max = valid;
            config.validate().unwrap();
        }
        config.delivery.redeliveries_max = 1_001;
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("delivery.redeliveries_max must be 0 (never park) to 1000"),
            "{error}"
        );
    }

    /// `validate`'s error for one app as `toml` (lines of its table) sets
    /// it, after `[webhooks]` lines `section`; `None` when it is valid.
    fn webhook_error(toml: &str, section: &str) -> Option<String> {
        let text = format!(
            "[webhooks]\n{section}\n[[apps]]\nid = \"chat\"\napi_key = \"{}\"\n\
             token_secret = \"{}\"\n{toml}",
            "k".repeat(16),
            "s".repeat(16)
        );
        let config: Config = toml::from_str(&text).unwrap();
        config.validate().err().map(|error| error.to_string())
    }

    #[test]
    fn webhook_routes_need_a_long_secret_and_http_urls() {
        let secret = format!("webhook_secret = \"{}\"", "w".repeat(32));
        let routes = "webhooks = [{ route = \"orders\", url = \"https://biz.example/h\", \
                      events = [\"upstream\"] }, { route = \"presence\", \
                      url = \"http://127.0.0.1:9000/p\", events = [\"online\", \"offline\"] }]";
        assert_eq!(webhook_error(&format!("{routes}\n{secret}"), ""), None);
        let legacy = "webhook_url = \"http://127.0.0.1:9000/h\"";
        assert_eq!(webhook_error(&format!("{legacy}\n{secret}"), ""), None);

        for (toml, expected) in [
            (routes.to_owned(), "webhook_secret must be at least 32"),
            (
                format!("{routes}\nwebhook_secret = \"short\""),
                "webhook_secret must be at least 32",
            ),
            (format!("{legacy}\n{routes}\n{secret}"), "not both"),
            (
                format!(
                    "webhooks = [{{ route = \"r\", url = \"ftp://biz.example/h\", \
                     events = [\"upstream\"] }}]\n{secret}"
                ),
                "a webhook URL must be http://host[:port]/path or https://",
            ),
            (
                format!("webhook_url = \"biz.example/h\"\n{secret}"),
                "a webhook URL must be",
            ),
            (
                format!(
                    "webhooks = [{{ route = \"a b\", url = \"http://h/\", \
                     events = [\"upstream\"] }}]\n{secret}"
                ),
                "webhook route \"a b\" must be 1 to 64",
            ),
            (
                format!(
                    "webhooks = [{{ route = \"r\", url = \"http://h/\", events = [] }}]\n{secret}"
                ),
                "takes no events",
            ),
        ] {
            let error = webhook_error(&toml, "").unwrap_or_default();
            assert!(error.contains(expected), "{toml}: {error}");
        }
        let error = webhook_error("", "upstream_deadline_secs = 40").unwrap();
        assert!(
            error.contains("upstream_deadline_secs must be 1 to"),
            "{error}"
        );
        let error = webhook_error("", "timeout_secs = 0").unwrap();
        assert!(error.contains("timeout_secs must be 1 to"), "{error}");
    }

    /// The problems of the default config with one app and `toml` added.
    fn problems_with(toml: &str) -> Vec<String> {
        let mut config: Config = toml::from_str(toml).unwrap();
        config.apps = vec![app()];
        config.problems()
    }

    #[test]
    fn per_ip_limits_and_allowed_networks_are_checked() {
        let config: Config = toml::from_str(
            "[gateway.per_ip]\nconnections_max = 5\nnew_per_sec = 2.5\n\
             allow_cidrs = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\n",
        )
        .unwrap();
        let limits = config.gateway.per_ip.as_ref().unwrap().limits();
        assert_eq!(limits.connections_max, Some(5));
        let rate = limits.new_per_sec.unwrap();
        assert_eq!((rate.per_sec, rate.burst), (2.5, 3));
        assert_eq!(limits.allowed.len(), 3);
        assert!(limits.allowed[2].contains(&"192.0.2.7".parse::<std::net::IpAddr>().unwrap()));

        for (toml, expected) in [
            (
                "[gateway.per_ip]\nconnections_max = 5\nallow_cidrs = [\"10.0.0.0/33\"]",
                "gateway.per_ip.allow_cidrs: \"10.0.0.0/33\" is not a network",
            ),
            (
                "[gateway.per_ip]\nallow_cidrs = []",
                "needs connections_max or new_per_sec",
            ),
            (
                "[gateway.per_ip]\nconnections_max = 0",
                "connections_max must be at least 1",
            ),
            (
                "[gateway.per_ip]\nnew_per_sec = 0.0",
                "new_per_sec must be above 0",
            ),
            (
                "[gateway.per_ip]\nconnections_max = 1\nnew_burst = 2",
                "new_burst needs new_per_sec",
            ),
            (
                "[api]\nallowed_cidrs = [\"localhost\"]",
                "[api] allowed_cidrs: \"localhost\"",
            ),
            (
                "[admin]\napi_key = \"0123456789012345678901234567890123\"\n\
                 allowed_cidrs = [\"10.0.0.1/8/8\"]",
                "[admin] allowed_cidrs",
            ),
            (
                "[gateway.frame_read]\nwifi_ms = 0",
                "gateway.frame_read.wifi_ms must be 100 to",
            ),
            (
                "[gateway.frame_read]\nbytes_per_sec_min = 0",
                "bytes_per_sec_min must be at least 1",
            ),
        ] {
            let problems = problems_with(toml);
            assert!(
                problems.iter().any(|problem| problem.contains(expected)),
                "{toml}: {problems:?}"
            );
        }
        assert!(problems_with("[api]\nallowed_cidrs = [\"127.0.0.1/32\", \"::1\"]").is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = toml::from_str::<Config>("nod_id = \"x\"").unwrap_err();
        assert!(error.to_string().contains("unknown field"), "{error}");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let mut config = Config {
            apps: vec![app()],
            ..Config::default()
        };
        config.gateway.send_queue_bytes_max = 1024;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("send_queue_bytes_max"), "{error}");

        let mut config = Config {
            apps: vec![app()],
            ..Config::default()
        };
        config.apps[0].id = "bad id".to_owned();
        assert!(config.validate().is_err());

        for edit in [
            |api: &mut ApiSection| api.header_read_timeout_secs = 0,
            |api: &mut ApiSection| api.body_read_timeout_secs = 0,
            |api: &mut ApiSection| api.idle_timeout_secs = API_TIMEOUT_SECS_MAX + 1,
            |api: &mut ApiSection| api.connections_max = 0,
        ] {
            let mut config = Config {
                apps: vec![app()],
                ..Config::default()
            };
            edit(&mut config.api);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.starts_with("api."), "{error}");
        }

        for (edit, name) in [
            (
                (|storage: &mut StorageSection| storage.group_commit_stores_max = 0)
                    as fn(&mut StorageSection),
                "storage.group_commit_stores_max",
            ),
            (
                |storage| storage.group_commit_recipients_max = GROUP_COMMIT_RECIPIENTS_MAX + 1,
                "storage.group_commit_recipients_max",
            ),
            (
                |storage| storage.group_commit_wait_ms = GROUP_COMMIT_WAIT_MS_MAX + 1,
                "storage.group_commit_wait_ms",
            ),
        ] {
            let mut config = Config {
                apps: vec![app()],
                ..Config::default()
            };
            edit(&mut config.storage);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.starts_with(name), "{error}");
        }
    }

    /// The config with `gateway` lines (TOML under `[gateway]`) and one app.
    fn with_gateway(lines: &str) -> anyhow::Result<Config> {
        let text = format!(
            "[gateway]\n{lines}\n[[apps]]\nid = \"chat\"\napi_key = \"0123456789abcdef\"\n\
             token_secret = \"0123456789abcdef0123\"\n"
        );
        let config: Config = toml::from_str(&text)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn heartbeat_ranges_per_network_type_with_defaults_for_the_rest() {
        let config = with_gateway(
            "[gateway.heartbeat.3g]\nstart_secs = 20\nmin_secs = 10\nmax_secs = 90\n\
             [gateway.heartbeat.wifi]\nmax_secs = 900\n",
        )
        .unwrap();
        let heartbeat = config.heartbeat();
        let range = |network| *heartbeat.for_network(network);
        assert_eq!(
            range(NetworkType::Cellular3g),
            herald_proto::server::HeartbeatRange {
                start_secs: 20,
                min_secs: 10,
                max_secs: 90,
            }
        );
        let (wifi_start, wifi_min, _) = default_heartbeat(NetworkType::Wifi);
        assert_eq!(u64::from(range(NetworkType::Wifi).start_secs), wifi_start);
        assert_eq!(u64::from(range(NetworkType::Wifi).min_secs), wifi_min);
        assert_eq!(range(NetworkType::Wifi).max_secs, 900);
        for network in NetworkType::ALL {
            let (start, min, max) = default_heartbeat(network);
            assert!(min <= start && start <= max, "{network:?}");
        }
    }

    #[test]
    fn the_older_heartbeat_section_still_works_and_not_with_the_new_one() {
        let config = with_gateway("[gateway.heartbeat_secs]\ncellular = 10\nwired = 4000\n");
        let error = config.unwrap_err().to_string();
        assert!(
            error.contains("gateway.heartbeat_secs.wired must be 1 to 3600"),
            "{error}"
        );

        let config = with_gateway("[gateway.heartbeat_secs]\ncellular = 10\n").unwrap();
        let heartbeat = config.heartbeat();
        for network in [NetworkType::Cellular2g, NetworkType::Cellular5g] {
            let range = heartbeat.for_network(network);
            assert_eq!((range.start_secs, range.min_secs), (10, 10), "{network:?}");
        }

        let error = with_gateway(
            "[gateway.heartbeat_secs]\nwifi = 10\n[gateway.heartbeat.wifi]\nstart_secs = 10\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("use one of them"), "{error}");
    }

    #[test]
    fn bad_heartbeat_ranges_are_refused_with_the_reason() {
        for (lines, expected) in [
            (
                "[gateway.heartbeat.6g]\nstart_secs = 10\n",
                "gateway.heartbeat.6g: unknown network type",
            ),
            (
                "[gateway.heartbeat.cellular]\nstart_secs = 10\n",
                "gateway.heartbeat.cellular: unknown network type",
            ),
            (
                "[gateway.heartbeat.4g]\nstart_secs = 10\nmin_secs = 20\n",
                "gateway.heartbeat.4g needs 1 <= min_secs <= start_secs",
            ),
            (
                "[gateway.heartbeat.wired]\nmax_secs = 4000\n",
                "gateway.heartbeat.wired needs",
            ),
            (
                "[gateway.heartbeat.wifi]\nmin_secs = 0\n",
                "gateway.heartbeat.wifi needs",
            ),
            (
                "[gateway.heartbeat.wifi]\nstart = 5\n",
                "unknown field `start`",
            ),
        ] {
            let error = format!("{:#}", with_gateway(lines).unwrap_err());
            assert!(error.contains(expected), "{lines}: {error}");
        }
    }

    #[test]
    fn the_cluster_section_is_checked() {
        let mut config = Config {
            apps: vec![app()],
            ..Config::default()
        };
        let error = config.cluster().unwrap_err().to_string();
        assert!(error.contains("[cluster]"), "{error}");
        config.cluster = Some(ClusterSection {
            redis_url: Some("redis://127.0.0.1:6379".to_owned()),
            redis_cluster_urls: Vec::new(),
            database_url: "sqlite:herald.db".to_owned(),
            node_id: Some("room-1".to_owned()),
            advertise: None,
            region: String::new(),
        });
        let error = config.cluster().unwrap_err().to_string();
        assert!(error.contains("database_url"), "{error}");
        config.cluster.as_mut().unwrap().database_url = "mysql://root@db/herald".to_owned();
        config.cluster().unwrap();
        assert_eq!(config.node_id(), "room-1");
        config.cluster.as_mut().unwrap().redis_cluster_urls = vec!["redis://r1:7000".to_owned()];
        let error = config.cluster().unwrap_err().to_string();
        assert!(error.contains("exactly one"), "{error}");
        config.cluster.as_mut().unwrap().redis_url = None;
        config.cluster().unwrap();
        config.cluster.as_mut().unwrap().node_id = Some("room 1".to_owned());
        assert!(config.cluster().is_err());
    }

    #[test]
    fn a_full_file_parses() {
        let text = r#"
            node_id = "edge-7"
            data_dir = "/var/lib/herald"
            [gateway]
            listen = "0.0.0.0:7000"
            shards = 4
            connections_per_shard_max = 1000
            [gateway.heartbeat_secs]
            cellular = 30
            [api]
            listen = "127.0.0.1:9000"
            payload_bytes_max = 2048
            header_read_timeout_secs = 5
            connections_max = 64
            [[apps]]
            id = "chat"
            api_key = "0123456789abcdef"
            token_secret = "0123456789abcdef0123"
        "#;
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        let heartbeat = config.heartbeat();
        let range = |network| *heartbeat.for_network(network);
        assert_eq!(range(NetworkType::Cellular3g).start_secs, 30);
        assert_eq!(range(NetworkType::Cellular4g).start_secs, 30);
        let wifi = default_heartbeat(NetworkType::Wifi);
        assert_eq!(u64::from(range(NetworkType::Wifi).start_secs), wifi.0);
        assert_eq!(config.apps[0].default_ttl_secs, DEFAULT_APP_TTL_SECS);
        // Set here; left out, it is resolved from the open-file limit.
        assert_eq!(config.gateway.connections_per_shard_max, Some(1000));
        assert_eq!(Config::default().gateway.connections_per_shard_max, None);
        let http = config.http_limits();
        assert_eq!(http.header_read_timeout, Duration::from_secs(5));
        assert_eq!(
            http.idle_timeout,
            Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS)
        );
        assert_eq!(http.connections_max, 64);
    }

    #[test]
    fn listeners_come_after_the_tcp_listen_and_tls_ones_need_a_certificate() {
        let text = |tls: &str, listen: &str| {
            format!(
                r#"
                [gateway]
                {listen}
                [[gateway.listeners]]
                address = "0.0.0.0:443"
                transport = "wss"
                [[gateway.listeners]]
                address = "0.0.0.0:8081"
                transport = "ws"
                {tls}
                [[apps]]
                id = "chat"
                api_key = "0123456789abcdef"
                token_secret = "0123456789abcdef0123"
            "#
            )
        };
        let tls = "[gateway.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"";
        let config: Config = toml::from_str(&text(tls, "listen = \"0.0.0.0:7070\"")).unwrap();
        config.validate().unwrap();
        let listeners: Vec<String> = config
            .gateway_listeners()
            .iter()
            .map(|l| format!("{} {}", l.transport, l.addr))
            .collect();
        assert_eq!(
            listeners,
            ["tcp 0.0.0.0:7070", "wss 0.0.0.0:443", "ws 0.0.0.0:8081"]
        );
        // Without `listen`, only the listeners named.
        let config: Config = toml::from_str(&text(tls, "")).unwrap();
        assert_eq!(config.gateway_listeners().len(), 2);
        // A wss listener and no certificate: refused, naming the listener.
        let config: Config = toml::from_str(&text("", "")).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("0.0.0.0:443 (wss)"), "{error}");
        // An unknown transport is a parse error.
        let bad = text(tls, "").replace("\"ws\"", "\"udp\"");
        assert!(toml::from_str::<Config>(&bad).is_err());
    }
}
