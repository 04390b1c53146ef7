//! What carries Herald frames on a connection: plain TCP, TLS, WebSocket,
//! or WebSocket over TLS. A plain TCP connection has no transport state at
//! all; the others keep one small box, whose layers the shard runs bytes
//! through (`Transport`): TLS below, WebSocket above it, Herald frames on
//! top.

mod tls;
mod ws;

use bytes::BytesMut;

pub(crate) use tls::Tls;
pub use tls::{CertificateError, TlsAcceptor};
pub(crate) use ws::{CloseCode, Message, Upgrade, WsError, WsState};
pub(crate) use ws::{header_len as ws_header_len, read as ws_read, upgrade as ws_upgrade};
pub(crate) use ws::{write_binary_header, write_close, write_message};

/// A listener's transport.
pub use herald_proto::Transport as TransportKind;

/// WebSocket settings shared by a gateway's ws and wss listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebSocketSettings {
    /// `Origin`s allowed to upgrade; empty: any.
    pub allowed_origins: Vec<String>,
    /// Test only: echo every message back instead of speaking Herald, so a
    /// conformance suite can drive the WebSocket code path.
    pub test_echo: bool,
}

/// The WebSocket layer's state.
pub(crate) enum Ws {
    /// Reading the upgrade request.
    Upgrading,
    Open(WsState),
}

/// A TLS or WebSocket connection's transport state. Only what is not
/// whole yet is buffered, in pooled buffers, and only while it is not.
pub(crate) struct Transport {
    pub tls: Option<Tls>,
    pub ws: Option<Ws>,
    /// The start of a TLS record whose end has not arrived.
    pub tls_pending: Option<Box<BytesMut>>,
    /// The start of an upgrade request or a WebSocket frame whose end has
    /// not arrived.
    pub ws_pending: Option<Box<BytesMut>>,
}

impl Transport {
    pub(crate) fn new(kind: TransportKind, tls: Option<Tls>) -> Transport {
        Transport {
            tls,
            ws: kind.uses_websocket().then_some(Ws::Upgrading),
            tls_pending: None,
            ws_pending: None,
        }
    }

    /// Herald frames can flow: the handshake and the upgrade are done.
    pub(crate) fn is_open(&self) -> bool {
        self.tls.as_ref().is_none_or(Tls::is_established) && !matches!(self.ws, Some(Ws::Upgrading))
    }

    /// WebSocket frames wrap each Herald frame.
    pub(crate) fn frames_messages(&self) -> bool {
        matches!(self.ws, Some(Ws::Open(_)))
    }
}

/// Why a transport ended a connection, for the close metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportEnd {
    /// A failed TLS handshake or a bad TLS record.
    Tls,
    /// A refused WebSocket upgrade.
    UpgradeRefused,
    /// A WebSocket protocol violation.
    WebSocket,
}

impl TransportEnd {
    pub fn label(self) -> &'static str {
        match self {
            TransportEnd::Tls => "tls_error",
            TransportEnd::UpgradeRefused => "websocket_upgrade_refused",
            TransportEnd::WebSocket => "websocket_error",
        }
    }
}
