//! The control plane's configuration, as the `herald` binary builds it
//! from its TOML.

use std::time::Duration;

use crate::flow;
use crate::http::HttpLimits;

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
