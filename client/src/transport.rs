//! The transports under a connection: each carries whole Herald frames, so
//! the frame loop does not know which one it drives.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use herald_proto::limits::{FRAME_BODY_LEN_MAX, LENGTH_PREFIX_LEN};
use herald_proto::{Frame, decode, decode_slice};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::address::GatewayAddress;

/// The largest message a frame fills: a bigger one is refused before it is
/// buffered whole.
const MESSAGE_LEN_MAX: usize = LENGTH_PREFIX_LEN + FRAME_BODY_LEN_MAX;

/// A TCP or TLS stream: what a WebSocket runs over, and what carries the
/// frames of tcp and tls.
pub(crate) trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// A connection to a gateway, over any transport.
pub(crate) enum FrameTransport {
    /// tcp and tls: frames back to back in a byte stream.
    Stream {
        stream: Box<dyn ByteStream>,
        /// Bytes read but not yet decoded.
        input: BytesMut,
    },
    /// ws and wss: one frame per binary message.
    WebSocket(Box<WebSocketStream<Box<dyn ByteStream>>>),
}

impl FrameTransport {
    /// Connects and, as the address says, completes the TLS handshake and
    /// the WebSocket upgrade. The error says which step failed.
    pub(crate) async fn connect(
        address: &GatewayAddress,
        tls: &mut TlsTrust,
    ) -> Result<FrameTransport, String> {
        // Before connecting: without a configuration there is nothing to try.
        let tls_config = if address.transport().uses_tls() {
            Some(tls.config().await?)
        } else {
            None
        };
        let tcp = TcpStream::connect((address.host(), address.port()))
            .await
            .map_err(|error| format!("connect: {error}"))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn ByteStream> = match tls_config {
            Some(config) => {
                let server_name = ServerName::try_from(address.host().to_owned())
                    .map_err(|_| format!("{:?} is not a valid TLS server name", address.host()))?;
                let stream = TlsConnector::from(config)
                    .connect(server_name, tcp)
                    .await
                    .map_err(|error| tls_handshake_error(&error, address, tls.ca_file()))?;
                Box::new(stream)
            }
            None => Box::new(tcp),
        };
        if !address.transport().uses_websocket() {
            return Ok(FrameTransport::Stream {
                stream,
                input: BytesMut::with_capacity(4 * 1024),
            });
        }
        let request = format!(
            "{}://{}{}",
            address.transport(),
            address.authority(),
            address.path()
        )
        .into_client_request()
        .map_err(|error| format!("WebSocket upgrade request: {error}"))?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MESSAGE_LEN_MAX))
            .max_frame_size(Some(MESSAGE_LEN_MAX));
        let (websocket, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .map_err(|error| match error {
                    tungstenite::Error::Http(response) => format!(
                        "the gateway refused the WebSocket upgrade: {}",
                        response.status()
                    ),
                    error => format!("WebSocket upgrade: {error}"),
                })?;
        Ok(FrameTransport::WebSocket(Box::new(websocket)))
    }

    /// Sends `frames`, whole encoded frames back to back, and empties it.
    pub(crate) async fn send(&mut self, frames: &mut BytesMut) -> Result<(), String> {
        match self {
            FrameTransport::Stream { stream, .. } => {
                stream
                    .write_all(frames)
                    .await
                    .map_err(|error| format!("write: {error}"))?;
                frames.clear();
            }
            FrameTransport::WebSocket(websocket) => {
                while !frames.is_empty() {
                    let prefix = frames[..LENGTH_PREFIX_LEN].try_into().expect("4 bytes");
                    let len = LENGTH_PREFIX_LEN + u32::from_be_bytes(prefix) as usize;
                    let frame = frames.split_to(len).freeze();
                    websocket
                        .feed(Message::Binary(frame))
                        .await
                        .map_err(|error| format!("write: {error}"))?;
                }
                websocket
                    .flush()
                    .await
                    .map_err(|error| format!("write: {error}"))?;
            }
        }
        Ok(())
    }

    /// The next frame from the server. Cancel-safe: a partly received frame
    /// stays buffered. The error says why the connection cannot go on.
    pub(crate) async fn receive(&mut self) -> Result<Frame, String> {
        match self {
            FrameTransport::Stream { stream, input } => loop {
                match decode(input) {
                    Ok(Some(frame)) => return Ok(frame),
                    Ok(None) => {}
                    Err(error) => return Err(format!("bad frame from the server: {error}")),
                }
                match stream.read_buf(input).await {
                    Ok(0) => return Err("connection closed by the server".to_owned()),
                    Ok(_) => {}
                    Err(error) => return Err(format!("read: {error}")),
                }
            },
            FrameTransport::WebSocket(websocket) => loop {
                let message = match websocket.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => return Err(format!("read: {error}")),
                    None => return Err("connection closed by the server".to_owned()),
                };
                match message {
                    Message::Binary(message) => return frame_of_message(&message),
                    Message::Text(_) => {
                        return Err(
                            "bad frame from the server: a text WebSocket message (Herald messages are binary)"
                                .to_owned(),
                        );
                    }
                    Message::Close(close) => {
                        // Sends the close reply tungstenite queued; the
                        // server closes the TCP connection after it.
                        let _ = websocket.flush().await;
                        return Err(describe_close(close.as_ref()));
                    }
                    // tungstenite answers pings itself.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            },
        }
    }

    /// Closes cleanly: TLS close_notify, or a WebSocket close (1000).
    pub(crate) async fn close(&mut self) {
        match self {
            FrameTransport::Stream { stream, .. } => {
                let _ = stream.shutdown().await;
            }
            FrameTransport::WebSocket(websocket) => {
                let _ = WebSocketStream::close(websocket, None).await;
            }
        }
    }
}

/// The one frame a WebSocket message must hold, its length prefix included.
fn frame_of_message(message: &[u8]) -> Result<Frame, String> {
    match decode_slice(message) {
        Ok(Some((frame, used))) if used == message.len() => Ok(frame),
        Ok(Some((_, used))) => Err(format!(
            "bad frame from the server: a WebSocket message holds {} bytes after its frame \
             (a message carries exactly one frame)",
            message.len() - used
        )),
        Ok(None) => Err(format!(
            "bad frame from the server: a WebSocket message of {} bytes ends inside its frame",
            message.len()
        )),
        Err(error) => Err(format!("bad frame from the server: {error}")),
    }
}

/// What the server's close code means, as docs/protocol.md lists them.
fn describe_close(close: Option<&CloseFrame>) -> String {
    let Some(close) = close else {
        return "the server closed the WebSocket (no close code)".to_owned();
    };
    let code = u16::from(close.code);
    let meaning = match code {
        1000 => "normal closure",
        1001 => "going away: the server is shutting down or overloaded",
        1002 => "protocol error",
        1003 => "the server does not take text messages",
        1007 => "invalid data",
        1009 => "message too large",
        _ => "unexpected code",
    };
    if close.reason.is_empty() {
        format!("the server closed the WebSocket: {code} {meaning}")
    } else {
        format!(
            "the server closed the WebSocket: {code} {meaning} ({})",
            close.reason.as_str()
        )
    }
}

/// Which certificates the client trusts for tls and wss, and the rustls
/// configuration made from them on the first such connection (loading the
/// system's roots reads many files, so it is done once).
pub(crate) struct TlsTrust {
    ca_file: Option<PathBuf>,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl TlsTrust {
    pub(crate) fn new(ca_file: Option<PathBuf>) -> TlsTrust {
        TlsTrust {
            ca_file,
            config: None,
        }
    }

    fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    async fn config(&mut self) -> Result<Arc<rustls::ClientConfig>, String> {
        if let Some(config) = &self.config {
            return Ok(config.clone());
        }
        let ca_file = self.ca_file.clone();
        // File reads: off the runtime's threads.
        let config = tokio::task::spawn_blocking(move || tls_config(ca_file.as_deref()))
            .await
            .map_err(|error| format!("loading the TLS roots: {error}"))??;
        let config = Arc::new(config);
        self.config = Some(config.clone());
        Ok(config)
    }
}

/// A rustls client configuration (ring, TLS 1.2 and 1.3) trusting the CA
/// file's certificates, or the system's roots without one.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
                .map_err(|error| format!("reading the CA file {}: {error}", path.display()))?;
            for certificate in certificates {
                roots.add(certificate).map_err(|error| {
                    format!("a certificate in the CA file {}: {error}", path.display())
                })?;
            }
            if roots.is_empty() {
                return Err(format!("no certificate in the CA file {}", path.display()));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                let errors: Vec<String> = native.errors.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "no system root certificates found ({}); give a CA file",
                    errors.join("; ")
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS configuration: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Says plainly when the handshake failed on the server's certificate.
fn tls_handshake_error(
    error: &io::Error,
    address: &GatewayAddress,
    ca_file: Option<&Path>,
) -> String {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(rustls::Error::InvalidCertificate(certificate_error)) = rustls_error else {
        return format!("TLS handshake: {error}");
    };
    let why = match certificate_error {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "it has expired".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet".to_owned()
        }
        CertificateError::UnknownIssuer => match ca_file {
            Some(path) => format!("it is self-signed or from a CA not in {}", path.display()),
            None => "it is self-signed or from a CA the system does not trust".to_owned(),
        },
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("it is not valid for the host name {:?}", address.host())
        }
        _ => "it failed verification".to_owned(),
    };
    format!("the gateway's TLS certificate is refused: {why} ({certificate_error})")
}
