//! What carries the frames between a client and a gateway
//! (docs/protocol.md, "Transports"): the one list of transports every part
//! of Herald names them by.

use std::fmt;
use std::str::FromStr;

/// The path WebSocket clients upgrade on.
pub const WEBSOCKET_PATH: &str = "/v1/connect";

/// RFC 6455's constants, for the gateway's WebSocket server and the
/// clients that test it.
pub mod websocket {
    /// Appended to `Sec-WebSocket-Key` before hashing it into
    /// `Sec-WebSocket-Accept` (RFC 6455 §1.3).
    pub const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    pub const OP_CONTINUATION: u8 = 0x0;
    pub const OP_TEXT: u8 = 0x1;
    pub const OP_BINARY: u8 = 0x2;
    pub const OP_CLOSE: u8 = 0x8;
    pub const OP_PING: u8 = 0x9;
    pub const OP_PONG: u8 = 0xA;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Transport {
    /// The TCP byte stream.
    Tcp,
    /// TLS over TCP; the decrypted stream is the TCP one.
    Tls,
    /// WebSocket over TCP, one frame per binary message.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl Transport {
    pub const ALL: [Transport; 4] = [
        Transport::Tcp,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
    ];

    /// Its name: in configs, URL schemes and the dispatcher's `transport=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    pub fn uses_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }

    /// How a client names a gateway of this transport at `addr`
    /// (`host:port`): as it is for plain TCP, a URL for the others.
    pub fn url(self, addr: &str) -> String {
        match self {
            Transport::Tcp => addr.to_owned(),
            Transport::Tls => format!("tls://{addr}"),
            Transport::Ws | Transport::Wss => {
                format!("{}://{addr}{WEBSOCKET_PATH}", self.as_str())
            }
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Transport::ALL
            .into_iter()
            .find(|transport| transport.as_str() == text)
            .ok_or_else(|| format!("unknown transport {text:?} (expected tcp, tls, ws or wss)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_urls_have_their_scheme() {
        for transport in Transport::ALL {
            assert_eq!(transport.as_str().parse(), Ok(transport));
        }
        assert!("udp".parse::<Transport>().is_err());
        assert_eq!(Transport::Tcp.url("h:1"), "h:1");
        assert_eq!(Transport::Tls.url("h:1"), "tls://h:1");
        assert_eq!(Transport::Wss.url("h:1"), "wss://h:1/v1/connect");
    }
}
