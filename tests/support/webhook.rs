//! A business server's webhook for tests: HTTP/1.1 over plain TCP or TLS,
//! written by hand so a test decides every answer (a status, or none at
//! all). It checks every call's `Herald-Signature` the way the README tells
//! a receiver to, and records the calls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How far a signature's timestamp may be from the receiver's clock.
const TOLERANCE_SECS: u64 = 300;

/// One call as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    /// `Herald-Event`.
    pub event: String,
    /// `Herald-Route`.
    pub route: String,
    pub body: Value,
}

/// What the receiver answers a call.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Status(u16),
    /// Nothing: the connection stays open and silent.
    Never,
}

type Decide = dyn Fn(&Received, usize) -> Answer + Send + Sync;

#[derive(Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:port` or `https://localhost:port`.
    pub base: String,
    calls: Arc<Mutex<Vec<Received>>>,
    bad_signatures: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    /// A plain-HTTP receiver. `decide` gets each call and how many calls
    /// came before it.
    pub async fn start(
        secret: &str,
        decide: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::listen(secret, None, Arc::new(decide)).await
    }

    /// An HTTPS receiver with `tls`'s certificate, for `localhost`.
    pub async fn start_tls(
        secret: &str,
        tls: Arc<rustls::ServerConfig>,
        decide: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::listen(secret, Some(tls), Arc::new(decide)).await
    }

    async fn listen(
        secret: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
        decide: Arc<Decide>,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let base = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let receiver = Receiver {
            base,
            calls: Arc::default(),
            bad_signatures: Arc::default(),
        };
        let served = receiver.clone();
        let secret = secret.to_owned();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let count = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (served, secret, decide, count) = (
                    served.clone(),
                    secret.clone(),
                    decide.clone(),
                    count.clone(),
                );
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                served.serve(stream, &secret, &*decide, &count).await;
                            }
                        }
                        None => served.serve(stream, &secret, &*decide, &count).await,
                    }
                });
            }
        });
        receiver
    }

    /// Answers the requests of one connection, one after another.
    async fn serve(
        &self,
        mut stream: impl AsyncRead + AsyncWrite + Unpin,
        secret: &str,
        decide: &Decide,
        count: &AtomicUsize,
    ) {
        let mut buffer = Vec::new();
        loop {
            let Some((head, body)) = read_request(&mut stream, &mut buffer).await else {
                return;
            };
            let header = |name: &str| {
                head.lines()
                    .skip(1)
                    .filter_map(|line| line.split_once(':'))
                    .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
                    .map(|(_, value)| value.trim().to_owned())
                    .unwrap_or_default()
            };
            if let Err(why) = verify(secret, &header("herald-signature"), &body) {
                self.bad_signatures.lock().unwrap().push(why);
            }
            let call = Received {
                at: Instant::now(),
                path: head.split(' ').nth(1).unwrap_or_default().to_owned(),
                event: header("herald-event"),
                route: header("herald-route"),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            };
            let answer = decide(&call, count.fetch_add(1, Ordering::SeqCst));
            self.calls.lock().unwrap().push(call);
            match answer {
                Answer::Status(status) => {
                    let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Answer::Never => std::future::pending::<()>().await,
            }
        }
    }

    pub fn calls(&self) -> Vec<Received> {
        self.calls.lock().unwrap().clone()
    }

    /// Fails the test if any call came with a signature that does not
    /// verify.
    pub fn assert_all_signed(&self) {
        let bad = self.bad_signatures.lock().unwrap();
        assert!(bad.is_empty(), "calls with bad signatures: {bad:?}");
    }
}

/// Checks `Herald-Signature` as a receiver should: the timestamp within
/// the tolerance, and one `v1` equal to HMAC-SHA256(secret, "<t>.<body>")
/// (`verify_slice` compares in constant time).
pub fn verify(secret: &str, header: &str, body: &[u8]) -> Result<(), String> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some(("v1", value)) => signatures.push(value),
            _ => return Err(format!("unexpected part {part:?} in {header:?}")),
        }
    }
    let timestamp = timestamp.ok_or_else(|| format!("no t= in {header:?}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(timestamp) > TOLERANCE_SECS {
        return Err(format!(
            "timestamp {timestamp} is {now} +- more than 5 minutes"
        ));
    }
    let valid = signatures.iter().any(|signature| {
        let Ok(signature) = hex::decode(signature) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&signature).is_ok()
    });
    if valid {
        Ok(())
    } else {
        Err(format!("no v1 signature matches in {header:?}"))
    }
}

/// Reads one request: its head as text and its body (by Content-Length).
/// `None` once the peer closed.
async fn read_request(
    stream: &mut (impl AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let length: usize = head
                .lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, value)| value.trim().parse().ok())
                .unwrap_or(0);
            let start = end + 4;
            while buffer.len() < start + length {
                read_more(stream, buffer).await?;
            }
            let body = buffer[start..start + length].to_vec();
            buffer.drain(..start + length);
            return Some((head, body));
        }
        read_more(stream, buffer).await?;
    }
}

async fn read_more(stream: &mut (impl AsyncRead + Unpin), buffer: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// A CA and a certificate for `localhost` it signed: the CA's PEM (for
/// `[webhooks] ca_file`) and a server config presenting the certificate.
pub fn tls_with_private_ca() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certificate.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.as_ref().pem(), Arc::new(config))
}
