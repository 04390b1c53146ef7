//! herald-control: the control plane, on tokio.
//!
//! It owns the center (the HTTP API business servers call), the register
//! (which connections each user has), delivery (store first, then send;
//! answer the shards' requests for stored messages; batch ack cursors),
//! broadcasts, the dispatcher, flow control, and the coordinator (upstream
//! data and user state to the apps' webhooks).
//! It reaches the gateway only through `herald_proto::plane` commands and
//! events over bounded channels, and storage only through `herald-storage`.
//!
//! In a cluster (`cluster`) the register lives on Redis, and deliveries for
//! other room nodes travel over Redis pub/sub.
//!
//! It does not hold client connections and does not know about the
//! gateway's sockets; its own HTTP server (`http`) bounds the API's.

pub mod broadcast;
pub mod center;
pub mod cluster;
pub mod coordinator;
pub mod delivery;
pub mod dispatcher;
pub mod flow;
pub mod http;
mod input;
pub mod register;

use std::time::Duration;

pub use center::{MetricsRenderer, router};
pub use delivery::{Delivery, NodeName, Remote};
pub use http::HttpLimits;
pub use register::{Change, MemoryRegister, Register, Session};

/// An app as the control plane sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    pub id: String,
    pub api_key: String,
    pub default_ttl_secs: u64,
    /// Pushes per second (a multicast counts each user), if limited.
    pub push_rate: Option<flow::Rate>,
    /// Broadcasts per second, if limited.
    pub broadcast_rate: Option<flow::Rate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    pub apps: Vec<AppConfig>,
    /// Largest push payload, in bytes.
    pub payload_bytes_max: usize,
    pub multicast_users_max: usize,
    pub pull_limit_max: u32,
    pub ttl_secs_max: u64,
    /// The API's connection bounds; the router keeps the body deadline.
    pub http: HttpLimits,
    pub ack_flush_interval: Duration,
    pub purge_interval: Duration,
}
