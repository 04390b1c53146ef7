//! Gateway addresses: `host:port` (plain TCP), or a URL that names the
//! transport: `tcp://host:port`, `tls://host:port`,
//! `ws://host:port/v1/connect`, `wss://host:port/v1/connect`.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

pub use herald_proto::Transport;
use herald_proto::transport::WEBSOCKET_PATH;

/// The transport a URL scheme names (any case).
fn transport_of_scheme(scheme: &str) -> Option<Transport> {
    scheme.to_ascii_lowercase().parse().ok()
}

/// The port a URL without one means; tcp and tls have no usual port.
fn default_port(transport: Transport) -> Option<u16> {
    match transport {
        Transport::Tcp | Transport::Tls => None,
        Transport::Ws => Some(80),
        Transport::Wss => Some(443),
    }
}

/// A parsed gateway address. Displays in its full form: `host:port` for
/// tcp, a URL for the others.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayAddress {
    transport: Transport,
    /// A DNS name or an IP address; an IPv6 address without its brackets.
    host: String,
    port: u16,
    /// ws and wss: the upgrade request's path (and query); empty otherwise.
    path: String,
}

impl GatewayAddress {
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The host to connect to and, for tls and wss, the name the server's
    /// certificate must hold (an IP address is checked as one).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// ws and wss: the path the upgrade request asks for; empty for tcp and
    /// tls.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `host:port`, with an IPv6 host in brackets.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Transport::Tcp => f.write_str(&self.authority()),
            transport => write!(f, "{transport}://{}{}", self.authority(), self.path),
        }
    }
}

/// Why a string is not a gateway address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayAddressError {
    #[error("unknown transport {0:?}: expected host:port or a tcp://, tls://, ws:// or wss:// URL")]
    UnknownTransport(String),
    #[error("no port: a {0} address needs host:port")]
    MissingPort(Transport),
    #[error("invalid port {0:?}: expected 1 to 65535")]
    InvalidPort(String),
    #[error(
        "invalid host {0:?}: expected a DNS name, an IPv4 address or an IPv6 address in brackets"
    )]
    InvalidHost(String),
    #[error("a {0} address has no path")]
    UnexpectedPath(Transport),
    #[error("invalid path {0:?}: no spaces, control characters or fragment")]
    InvalidPath(String),
}

impl FromStr for GatewayAddress {
    type Err = GatewayAddressError;

    fn from_str(text: &str) -> Result<GatewayAddress, GatewayAddressError> {
        let (transport, rest) = match text.split_once("://") {
            Some((scheme, rest)) => (
                transport_of_scheme(scheme)
                    .ok_or_else(|| GatewayAddressError::UnknownTransport(scheme.to_owned()))?,
                rest,
            ),
            None => (Transport::Tcp, text),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(GatewayAddressError::InvalidPort(port.to_owned())),
            },
            None => default_port(transport).ok_or(GatewayAddressError::MissingPort(transport))?,
        };
        let path = if transport.uses_websocket() {
            if path.is_empty() {
                WEBSOCKET_PATH.to_owned()
            } else if path
                .chars()
                .any(|c| c == '#' || c.is_whitespace() || c.is_control())
            {
                return Err(GatewayAddressError::InvalidPath(path.to_owned()));
            } else {
                path.to_owned()
            }
        } else if path.is_empty() {
            String::new()
        } else {
            return Err(GatewayAddressError::UnexpectedPath(transport));
        };
        Ok(GatewayAddress {
            transport,
            host,
            port,
            path,
        })
    }
}

/// Splits `host[:port]`; an IPv6 host is in brackets, which are dropped.
fn split_host_port(authority: &str) -> Result<(String, Option<&str>), GatewayAddressError> {
    let invalid_host = || GatewayAddressError::InvalidHost(authority.to_owned());
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(invalid_host)?;
        host.parse::<Ipv6Addr>().map_err(|_| invalid_host())?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':').ok_or_else(invalid_host)?),
        };
        return Ok((host.to_owned(), port));
    }
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if host.is_empty() || !host.chars().all(name_char) {
        return Err(invalid_host());
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> GatewayAddress {
        text.parse()
            .unwrap_or_else(|error| panic!("{text:?}: {error}"))
    }

    fn parts(address: &GatewayAddress) -> (Transport, &str, u16, &str) {
        (
            address.transport(),
            address.host(),
            address.port(),
            address.path(),
        )
    }

    #[test]
    fn host_port_is_plain_tcp() {
        let address = parse("127.0.0.1:7070");
        assert_eq!(parts(&address), (Transport::Tcp, "127.0.0.1", 7070, ""));
        assert_eq!(address.to_string(), "127.0.0.1:7070");
        let address = parse("push.example.com:7070");
        assert_eq!(
            parts(&address),
            (Transport::Tcp, "push.example.com", 7070, "")
        );
    }

    #[test]
    fn urls_name_their_transport() {
        assert_eq!(
            parts(&parse("tcp://gw-1:7070")),
            (Transport::Tcp, "gw-1", 7070, "")
        );
        assert_eq!(
            parts(&parse("tls://push.example.com:7443")),
            (Transport::Tls, "push.example.com", 7443, "")
        );
        assert_eq!(
            parts(&parse("ws://10.0.0.1:8080/v1/connect")),
            (Transport::Ws, "10.0.0.1", 8080, "/v1/connect")
        );
        assert_eq!(
            parts(&parse("wss://push.example.com:443/v1/connect")),
            (Transport::Wss, "push.example.com", 443, "/v1/connect")
        );
        // Schemes are case-insensitive, as in any URL.
        assert_eq!(parse("TLS://h:1").transport(), Transport::Tls);
    }

    #[test]
    fn websocket_urls_default_their_port_and_path() {
        assert_eq!(
            parts(&parse("ws://push.example.com")),
            (Transport::Ws, "push.example.com", 80, WEBSOCKET_PATH)
        );
        assert_eq!(
            parts(&parse("wss://push.example.com/edge?region=eu")),
            (Transport::Wss, "push.example.com", 443, "/edge?region=eu")
        );
        assert_eq!(
            parse("wss://push.example.com").to_string(),
            "wss://push.example.com:443/v1/connect"
        );
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let address = parse("[::1]:7070");
        assert_eq!(parts(&address), (Transport::Tcp, "::1", 7070, ""));
        assert_eq!(address.to_string(), "[::1]:7070");
        let address = parse("wss://[2001:db8::2]:8443/v1/connect");
        assert_eq!(address.host(), "2001:db8::2");
        assert_eq!(address.to_string(), "wss://[2001:db8::2]:8443/v1/connect");
    }

    #[test]
    fn full_forms_display_as_they_parse() {
        for text in [
            "127.0.0.1:7070",
            "tls://push.example.com:7443",
            "ws://127.0.0.1:7071/v1/connect",
            "wss://[::1]:7443/v1/connect",
        ] {
            assert_eq!(parse(text).to_string(), text);
        }
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        use GatewayAddressError as E;
        let cases = [
            ("http://h:80", E::UnknownTransport("http".into())),
            ("127.0.0.1", E::MissingPort(Transport::Tcp)),
            ("tls://h", E::MissingPort(Transport::Tls)),
            ("h:", E::InvalidPort(String::new())),
            ("h:0", E::InvalidPort("0".into())),
            ("h:70000", E::InvalidPort("70000".into())),
            ("h:7070:1", E::InvalidPort("7070:1".into())),
            (":7070", E::InvalidHost(":7070".into())),
            ("", E::InvalidHost(String::new())),
            ("::1:7070", E::InvalidHost("::1:7070".into())),
            ("[::1]7070", E::InvalidHost("[::1]7070".into())),
            ("[nope]:7070", E::InvalidHost("[nope]:7070".into())),
            ("user@h:7070", E::InvalidHost("user@h:7070".into())),
            ("ws://h:1?x", E::InvalidPort("1?x".into())),
            ("tls://h:7443/v1/connect", E::UnexpectedPath(Transport::Tls)),
            ("h:7070/", E::UnexpectedPath(Transport::Tcp)),
            ("ws://h:1/a b", E::InvalidPath("/a b".into())),
            ("ws://h:1/a#top", E::InvalidPath("/a#top".into())),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<GatewayAddress>(), Err(expected), "{text:?}");
        }
    }
}
