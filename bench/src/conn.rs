//! One load-generator client's connection, over any transport: plain TCP,
//! TLS (tokio-rustls), and a minimal client side of WebSocket (RFC 6455)
//! over either, the framing Herald's protocol uses (one binary message per
//! frame). The WebSocket layer is a few bytes of state and one small buffer
//! rather than a WebSocket library's per-connection buffers, so a worker
//! holds its tens of thousands of connections in little memory.

use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Buf as _, BufMut as _, BytesMut};
use herald_proto::transport::WEBSOCKET_PATH;
use herald_proto::transport::websocket::{
    ACCEPT_GUID, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};
use rustls::pki_types::ServerName;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The largest upgrade response head taken.
const WS_HEAD_MAX: usize = 8 * 1024;
/// Reads are made into at least this much free space.
const READ_SPACE: usize = 512;

/// The byte stream under a connection.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TCP stream is moved into a TLS handshake.
    Gone,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// A client connection. What the protocols above see is a byte stream:
/// `send` takes protocol bytes (over WebSocket, one message's worth: one
/// Herald frame) and `read_more` appends what the server sent.
pub struct Conn {
    stream: Stream,
    /// WebSocket: the bytes read and not yet unwrapped into the input.
    ws: Option<BytesMut>,
    /// WebSocket control frames owed to the server (pong, close reply),
    /// sent by `flush_replies` or before the next message.
    replies: Vec<u8>,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream: Stream::Tcp(stream),
            ws: None,
            replies: Vec::new(),
        }
    }

    /// The TLS handshake, as the client, verifying the server's
    /// certificate for `server` (an IP address here).
    pub async fn start_tls(
        &mut self,
        connector: &TlsConnector,
        server: std::net::IpAddr,
    ) -> Result<(), &'static str> {
        let Stream::Tcp(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err("tls_twice");
        };
        let tls = connector
            .connect(ServerName::from(server), tcp)
            .await
            .map_err(|error| {
                // A certificate refused is a setup error, not load: say so once.
                if error
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
                {
                    "tls_certificate_refused"
                } else {
                    "tls_handshake"
                }
            })?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// The WebSocket upgrade on Herald's path; after it, every `send` is
    /// one masked binary message and `read_more` unwraps messages.
    pub async fn upgrade_websocket(&mut self, host: &str) -> Result<(), &'static str> {
        let key = BASE64.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET {WEBSOCKET_PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.write_all(request.as_bytes()).await?;
        let mut raw = BytesMut::with_capacity(READ_SPACE);
        let head_len = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if raw.len() > WS_HEAD_MAX {
                return Err("upgrade_refused");
            }
            raw.reserve(READ_SPACE);
            match self.stream.read_buf(&mut raw).await {
                Ok(0) => return Err("closed_by_server"),
                Ok(_) => {}
                Err(_) => return Err("reset"),
            }
        };
        let head = std::str::from_utf8(&raw[..head_len]).map_err(|_| "upgrade_refused")?;
        if !head.starts_with("HTTP/1.1 101") || !accepts(head, &key) {
            return Err("upgrade_refused");
        }
        raw.advance(head_len);
        self.ws = Some(raw);
        Ok(())
    }

    /// Sends `bytes`: as they are over a byte stream, as one binary
    /// message over WebSocket.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        if self.ws.is_none() {
            return self.write_all(bytes).await;
        }
        let mut out = std::mem::take(&mut self.replies);
        write_client_frame(&mut out, OP_BINARY, bytes);
        self.write_all(&out).await
    }

    /// Sends the control frames owed to the server, if any.
    pub async fn flush_replies(&mut self) -> Result<(), &'static str> {
        if self.replies.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.replies);
        self.write_all(&out).await
    }

    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        self.stream.write_all(bytes).await.map_err(|_| "reset")?;
        // TLS may keep records back until flushed.
        self.stream.flush().await.map_err(|_| "reset")
    }

    /// Appends to `input` what the server sent next: the bytes of a byte
    /// stream, the payloads of binary messages over WebSocket. Cancel-safe:
    /// its only await is a read, and what was read stays buffered.
    pub async fn read_more(&mut self, input: &mut BytesMut) -> Result<(), &'static str> {
        let Some(raw) = self.ws.as_mut() else {
            return read_some(&mut self.stream, input).await;
        };
        loop {
            let before = input.len();
            unwrap_messages(raw, input, &mut self.replies)?;
            if input.len() > before || !self.replies.is_empty() {
                return Ok(());
            }
            read_some(&mut self.stream, raw).await?;
        }
    }
}

async fn read_some(stream: &mut Stream, buf: &mut BytesMut) -> Result<(), &'static str> {
    if let Stream::Tcp(tcp) = stream {
        return read_tcp(tcp, buf).await;
    }
    if buf.capacity() - buf.len() < READ_SPACE / 2 {
        buf.reserve(READ_SPACE);
    }
    match stream.read_buf(buf).await {
        Ok(0) => Err("closed_by_server"),
        Ok(_) => Ok(()),
        Err(_) => Err("reset"),
    }
}

/// `read_some` over plain TCP: an empty buffer is let go while the
/// connection waits, and space is taken only once there is something to
/// read, so an idle client holds no input buffer (256 to 768 bytes each,
/// otherwise, times a million clients).
async fn read_tcp(tcp: &mut TcpStream, buf: &mut BytesMut) -> Result<(), &'static str> {
    loop {
        if buf.is_empty() && buf.capacity() > 0 {
            *buf = BytesMut::new();
        }
        tcp.readable().await.map_err(|_| "reset")?;
        if buf.capacity() - buf.len() < READ_SPACE / 2 {
            buf.reserve(READ_SPACE);
        }
        match tcp.try_read_buf(buf) {
            Ok(0) => return Err("closed_by_server"),
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err("reset"),
        }
    }
}

/// Whether the 101's `Sec-WebSocket-Accept` answers `key` (RFC 6455 §4.2.2).
fn accepts(head: &str, key: &str) -> bool {
    let expected = BASE64.encode(Sha1::digest(format!("{key}{ACCEPT_GUID}").as_bytes()));
    head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == expected
        })
    })
}

/// A client frame (FIN set, masked, as RFC 6455 requires of clients).
fn write_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let mask: [u8; 4] = rand::random();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// Takes the whole server frames at the start of `raw`: data payloads go to
/// `input`, a ping is owed a pong; a close or a text message ends the
/// connection.
fn unwrap_messages(
    raw: &mut BytesMut,
    input: &mut BytesMut,
    replies: &mut Vec<u8>,
) -> Result<(), &'static str> {
    loop {
        if raw.len() < 2 {
            return Ok(());
        }
        let opcode = raw[0] & 0x0F;
        if raw[1] & 0x80 != 0 {
            return Err("bad_frame"); // servers do not mask
        }
        let (header, len) = match raw[1] & 0x7F {
            126 if raw.len() >= 4 => (4, usize::from(u16::from_be_bytes([raw[2], raw[3]]))),
            127 if raw.len() >= 10 => {
                let len = u64::from_be_bytes(raw[2..10].try_into().expect("8 bytes"));
                (10, usize::try_from(len).map_err(|_| "bad_frame")?)
            }
            126 | 127 => return Ok(()),
            len => (2, usize::from(len)),
        };
        if raw.len() < header + len {
            return Ok(());
        }
        raw.advance(header);
        let payload = raw.split_to(len);
        match opcode {
            OP_BINARY | OP_CONTINUATION => input.put_slice(&payload),
            OP_PING => write_client_frame(replies, OP_PONG, &payload),
            OP_PONG => {}
            OP_CLOSE => return Err("closed_by_server"),
            OP_TEXT => return Err("bad_frame"),
            _ => return Err("bad_frame"),
        }
    }
}

/// The TLS connector of a worker, trusting the run's CA file.
pub fn tls_connector(ca_file: &std::path::Path) -> anyhow::Result<TlsConnector> {
    Ok(TlsConnector::from(crate::transport::client_config(
        ca_file,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        if payload.len() < 126 {
            frame.push(payload.len() as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            write_client_frame(&mut out, OP_BINARY, &payload);
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1] & 0x80, 0x80, "masked");
            let (header, got_len) = match out[1] & 0x7F {
                126 => (4, usize::from(u16::from_be_bytes([out[2], out[3]]))),
                127 => (
                    10,
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, usize::from(n)),
            };
            assert_eq!(got_len, len);
            let mask = &out[header..header + 4];
            let unmasked: Vec<u8> = out[header + 4..]
                .iter()
                .zip(mask.iter().cycle())
                .map(|(b, m)| b ^ m)
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn server_messages_unwrap_into_the_byte_stream_across_reads() {
        let mut stream = server_frame(OP_BINARY, b"first");
        stream.extend(server_frame(OP_PING, b"p"));
        stream.extend(server_frame(OP_BINARY, &[7u8; 300]));
        let mut raw = BytesMut::new();
        let mut input = BytesMut::new();
        let mut replies = Vec::new();
        // One byte at a time: whole frames only come out.
        for byte in &stream {
            raw.put_u8(*byte);
            unwrap_messages(&mut raw, &mut input, &mut replies).unwrap();
        }
        assert!(raw.is_empty());
        assert_eq!(&input[..5], b"first");
        assert_eq!(input.len(), 305);
        assert_eq!(replies[0], 0x80 | OP_PONG);

        let mut raw = BytesMut::from(&server_frame(OP_CLOSE, &[0x03, 0xE8])[..]);
        assert_eq!(
            unwrap_messages(&mut raw, &mut input, &mut replies),
            Err("closed_by_server")
        );
    }

    #[test]
    fn the_accept_key_is_checked() {
        // The example of RFC 6455 §1.3.
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(accepts(head, "dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!accepts(head, "AAAAAAAAAAAAAAAAAAAAAA=="));
    }
}
