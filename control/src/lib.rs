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
//! In a cluster (`cluster`, driven by `link`) the register lives on Redis,
//! and deliveries for other room nodes travel over Redis pub/sub.
//!
//! It does not hold client connections and does not know about the
//! gateway's sockets; its own HTTP server (`http`) bounds the API's.

pub mod admin;
mod admin_page;
mod api_error;
pub mod apps;
pub mod broadcast;
pub mod center;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod delivery;
pub mod dispatcher;
pub mod flow;
pub mod http;
mod input;
pub mod link;
pub mod metrics;
pub mod openapi;
pub mod overview;
pub mod pace;
pub mod progress;
pub mod register;
pub mod router;
pub mod trace;

pub use center::{MetricsRenderer, router};
pub use config::ControlConfig;
pub use delivery::{Delivery, DeliveryLimits};
pub use http::HttpLimits;
pub use register::{Change, MemoryRegister, Register, Session};
pub use router::{NodeName, Remote};
