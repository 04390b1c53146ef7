//! The control plane's configuration, as the `herald` binary builds it
//! from its TOML.

use std::time::Duration;

use ipnet::IpNet;

use crate::http::HttpLimits;

#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// `[admin] api_key`; none: the admin API is off.
    pub admin_api_key: Option<String>,
    /// Largest push payload, in bytes.
    pub payload_bytes_max: usize,
    /// Largest payload of a push with `"delivery": "notify"`, in bytes.
    pub notify_payload_bytes_max: usize,
    /// The pulls a second a multicast's default pull spread aims at: its
    /// users' clients pull over `users / notify_pulls_per_sec` seconds.
    pub notify_pulls_per_sec: u32,
    pub multicast_users_max: usize,
    pub pull_limit_max: u32,
    pub ttl_secs_max: u64,
    /// The API's connection bounds; the router keeps the body deadline.
    pub http: HttpLimits,
    pub ack_flush_interval: Duration,
    pub purge_interval: Duration,
    /// `[api] allowed_cidrs`: the networks the app routes (`/v1/apps/`)
    /// answer; empty: any.
    pub api_allowed: Vec<IpNet>,
    /// `[admin] allowed_cidrs`: the networks the admin API and page
    /// answer; empty: any.
    pub admin_allowed: Vec<IpNet>,
}
