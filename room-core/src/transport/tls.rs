//! TLS on a gateway connection, driven inside the shard loop.
//!
//! The handshake runs on rustls's sans-I/O unbuffered connection. Once it is
//! done, the connection keeps no rustls connection and no buffer: only the
//! negotiated suite, each direction's key, IV and sequence number, and (for
//! TLS 1.3) the two application traffic secrets, from which a KeyUpdate's
//! next keys are derived here (RFC 8446 §7.2). Records are sealed and
//! opened here with `ring`, in the shard's buffers, building each
//! direction's key when a batch of records needs it: an idle encrypted
//! connection costs its key material, not the expanded key schedules (over
//! 500 bytes per direction for AES-GCM) nor rustls's buffers (about 3 KB per
//! connection, measured). This is the design rustls's `kernel` module exists
//! for (kTLS), with the record layer in user space because kTLS is not
//! available everywhere. rustls's `KernelConnection`, which could derive
//! the next keys itself, is not kept: with it an idle TLS connection held
//! 932 heap bytes more than a TCP one, 244 without (mostly QUIC state a
//! TCP connection never uses; tests/conn_memory.rs counts it). The
//! secrets are taken from rustls's key log while the connection's own
//! handshake step runs (`SecretCapture`), and checked against the keys
//! rustls hands over.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::{BufMut, BytesMut};
use ring::{aead, hkdf};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, ServerConfig};

/// Record content types (RFC 8446 §5.1).
const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;

const RECORD_HEADER_LEN: usize = 5;
/// Largest plaintext in one record.
const PLAINTEXT_LEN_MAX: usize = 1 << 14;
/// Largest ciphertext a peer may send: TLS 1.2 allows 2,048 bytes of
/// expansion (TLS 1.3 only 256).
const CIPHERTEXT_LEN_MAX: usize = PLAINTEXT_LEN_MAX + 2048;
const TAG_LEN: usize = 16;
/// TLS 1.2 AES-GCM sends the last 8 bytes of each record's nonce.
const EXPLICIT_NONCE_LEN: usize = 8;

/// TLS 1.3 KeyUpdate (RFC 8446 §4.6.3).
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const KEY_UPDATE_NOT_REQUESTED: u8 = 0;
const KEY_UPDATE_REQUESTED: u8 = 1;

/// The largest handshake flight rustls asks to send in one piece; a
/// certificate chain larger than this grows the buffer.
const HANDSHAKE_CHUNK_LEN: usize = 16 * 1024;

/// Why a TLS connection cannot go on.
#[derive(Debug)]
pub(crate) enum TlsError {
    /// The handshake failed (garbage instead of a ClientHello, a client
    /// that speaks no suite or version we take, a bad Finished).
    Handshake(rustls::Error),
    /// A record that does not decrypt, or a record or message the
    /// protocol does not allow here.
    Record(&'static str),
    /// The peer sent a fatal alert.
    Alert(u8),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Handshake(error) => write!(f, "TLS handshake failed: {error}"),
            TlsError::Record(what) => write!(f, "bad TLS record: {what}"),
            TlsError::Alert(code) => write!(f, "the peer sent TLS alert {code}"),
        }
    }
}

/// What a read did besides passing plaintext on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TlsRead {
    /// Input bytes used; the rest is a record not complete yet.
    pub consumed: usize,
    /// The peer sent close_notify: no more data comes from it.
    pub peer_closed: bool,
}

/// The server side of TLS for every connection of a gateway: the rustls
/// configuration and the certificate, which SIGHUP may replace.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    certificate: Arc<ReloadableCertificate>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("cert_file", &self.certificate.cert_file)
            .finish_non_exhaustive()
    }
}

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read the certificate chain {path}: {message}")]
    Chain { path: PathBuf, message: String },
    #[error("cannot read the private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the certificate and key in {cert} and {key} do not go together: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

impl TlsAcceptor {
    /// Loads the PEM certificate chain and key (PKCS#8, RSA or EC) and
    /// makes the configuration: TLS 1.2 and 1.3 with rustls's safe
    /// defaults, no client certificates, stateless resumption tickets.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, CertificateError> {
        let provider = Arc::new(provider());
        let key = load_certified_key(cert_file, key_file, &provider)?;
        let certificate = Arc::new(ReloadableCertificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider: provider.clone(),
            current: RwLock::new(Arc::new(key)),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| CertificateError::Config(error.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        // The record layer is ours once the handshake is done.
        config.enable_secret_extraction = true;
        // Resumption without a session cache: the state travels in the
        // ticket, so a reconnect storm resumes without server memory.
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|error| CertificateError::Config(error.to_string()))?;
        // ChaCha20-Poly1305 first (see `provider`).
        config.ignore_client_order = true;
        // The TLS 1.3 traffic secrets, for KeyUpdate (see the module docs).
        config.key_log = Arc::new(SecretCapture);
        Ok(TlsAcceptor {
            config: Arc::new(config),
            certificate,
        })
    }

    /// Reads the PEM files again; new handshakes use what they hold,
    /// established connections are untouched. On error the certificate in
    /// use stays.
    pub fn reload(&self) -> Result<(), CertificateError> {
        let certificate = &self.certificate;
        let key = load_certified_key(
            &certificate.cert_file,
            &certificate.key_file,
            &certificate.provider,
        )?;
        *certificate.current.write().expect("certificate lock") = Arc::new(key);
        Ok(())
    }

    /// A connection's TLS, before its handshake.
    pub(crate) fn accept(&self) -> Result<Tls, TlsError> {
        UnbufferedServerConnection::new(self.config.clone())
            .map(|conn| {
                Tls::Handshaking(Box::new(Handshaking {
                    conn,
                    client_secret: None,
                    server_secret: None,
                }))
            })
            .map_err(TlsError::Handshake)
    }
}

/// ring's suites, ChaCha20-Poly1305 before AES-GCM in each version: its key
/// is used as it is, while AES-GCM expands its key (and GHASH table) each
/// time a connection's batch of records is sealed or opened. Every TLS 1.2
/// and 1.3 client offers it.
fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        )
    });
    provider
}

fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertificateError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|error| CertificateError::Chain {
            path: cert_file.to_owned(),
            message: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertificateError::Chain {
            path: cert_file.to_owned(),
            message: "no CERTIFICATE block".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| CertificateError::Key {
        path: key_file.to_owned(),
        message: error.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|error| CertificateError::Mismatch {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        message: error.to_string(),
    })
}

/// The certificate new handshakes get; SIGHUP swaps it.
#[derive(Debug)]
struct ReloadableCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadableCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

/// A connection during its handshake: rustls's connection, and the TLS 1.3
/// application traffic secrets once its key schedule has logged them.
pub(crate) struct Handshaking {
    conn: UnbufferedServerConnection,
    client_secret: Option<TrafficSecret>,
    server_secret: Option<TrafficSecret>,
}

/// A connection's TLS.
pub(crate) enum Tls {
    Handshaking(Box<Handshaking>),
    Established(Box<Session>),
    /// The handshake could not be turned into a session; the connection
    /// is closing.
    Failed,
}

impl Tls {
    pub(crate) fn is_established(&self) -> bool {
        matches!(self, Tls::Established(_))
    }

    /// Takes the ciphertext at the start of `input` (decrypting in place),
    /// passes each piece of application data to `on_plain`, and appends to
    /// `reply` what must be sent back (the handshake flight, a KeyUpdate).
    /// A record not complete yet stays: `consumed` says where it begins.
    pub(crate) fn read(
        &mut self,
        input: &mut [u8],
        reply: &mut BytesMut,
        on_plain: &mut dyn FnMut(&[u8]),
    ) -> Result<TlsRead, TlsError> {
        let mut consumed = 0;
        if let Tls::Handshaking(handshaking) = self {
            // Whatever the key log gets while this step runs belongs to
            // this connection: the shard runs one step at a time.
            CAPTURED.with(|captured| *captured.borrow_mut() = Some(Captured::default()));
            let step = handshake(&mut handshaking.conn, input, reply, on_plain);
            if let Some(captured) = CAPTURED.with(|captured| captured.borrow_mut().take()) {
                if captured.client.is_some() {
                    handshaking.client_secret = captured.client;
                }
                if captured.server.is_some() {
                    handshaking.server_secret = captured.server;
                }
            }
            match step? {
                Handshake::Blocked { consumed: used } => {
                    return Ok(TlsRead {
                        consumed: used,
                        peer_closed: false,
                    });
                }
                Handshake::Done { consumed: used } => {
                    consumed = used;
                    let Tls::Handshaking(handshaking) = std::mem::replace(self, Tls::Failed) else {
                        unreachable!("matched above")
                    };
                    *self = Tls::Established(Box::new(Session::from_handshake(*handshaking)?));
                }
            }
        }
        let Tls::Established(session) = self else {
            return Err(TlsError::Record("the handshake failed"));
        };
        let mut read = session.read(&mut input[consumed..], reply, on_plain)?;
        read.consumed += consumed;
        Ok(read)
    }

    /// Encrypts `plain` into records appended to `out`.
    pub(crate) fn encrypt(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<(), TlsError> {
        match self {
            Tls::Established(session) => session.seal(CONTENT_APPLICATION_DATA, plain, out),
            Tls::Handshaking(_) | Tls::Failed => {
                Err(TlsError::Record("application data before the handshake"))
            }
        }
    }

    /// A close_notify alert, after the last data.
    pub(crate) fn close_notify(&mut self, out: &mut BytesMut) {
        if let Tls::Established(session) = self {
            // Warning level, close_notify.
            let _ = session.seal(CONTENT_ALERT, &[1, 0], out);
        }
    }
}

enum Handshake {
    /// More input is needed; `consumed` bytes of it were used.
    Blocked { consumed: usize },
    /// Application data may flow from here on.
    Done { consumed: usize },
}

/// Drives rustls's handshake over `input` until it needs more or is done.
fn handshake(
    conn: &mut UnbufferedServerConnection,
    input: &mut [u8],
    reply: &mut BytesMut,
    on_plain: &mut dyn FnMut(&[u8]),
) -> Result<Handshake, TlsError> {
    let mut consumed = 0;
    loop {
        let status = conn.process_tls_records(&mut input[consumed..]);
        let discard = status.discard;
        let state = status.state.map_err(TlsError::Handshake)?;
        let outcome = match state {
            ConnectionState::EncodeTlsData(mut data) => {
                let mut chunk = vec![0; HANDSHAKE_CHUNK_LEN];
                loop {
                    match data.encode(&mut chunk) {
                        Ok(len) => {
                            reply.extend_from_slice(&chunk[..len]);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(needed)) => {
                            chunk.resize(needed.required_size, 0);
                        }
                        Err(EncodeError::AlreadyEncoded) => break,
                    }
                }
                None
            }
            // The shard sends `reply` once this read returns.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::ReadTraffic(mut traffic) => {
                // Data that came with the client's Finished.
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(TlsError::Handshake)?;
                    on_plain(record.payload);
                }
                None
            }
            ConnectionState::BlockedHandshake => Some(Handshake::Blocked {
                consumed: consumed + discard,
            }),
            ConnectionState::WriteTraffic(_) => Some(Handshake::Done {
                consumed: consumed + discard,
            }),
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(TlsError::Record("the peer closed during the handshake"));
            }
            _ => return Err(TlsError::Record("early data is not accepted")),
        };
        consumed += discard;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
}

/// The AEADs of rustls's safe default suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Aead {
    fn key_len(self) -> usize {
        match self {
            Aead::Aes128Gcm => 16,
            Aead::Aes256Gcm | Aead::Chacha20Poly1305 => 32,
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Aead::Aes128Gcm => &aead::AES_128_GCM,
            Aead::Aes256Gcm => &aead::AES_256_GCM,
            Aead::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// One direction's key material. The key is expanded only while a batch of
/// records is sealed or opened.
struct DirectionKeys {
    key: [u8; 32],
    key_len: u8,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl DirectionKeys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<(Aead, DirectionKeys), TlsError> {
        let (aead, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Aead::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Aead::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Aead::Chacha20Poly1305, key, iv)
            }
            _ => return Err(TlsError::Record("an AEAD this gateway does not implement")),
        };
        Ok((
            aead,
            DirectionKeys::from_parts(seq, key.as_ref(), iv.as_ref())?,
        ))
    }

    fn from_parts(seq: u64, key: &[u8], iv: &[u8]) -> Result<DirectionKeys, TlsError> {
        if key.len() > 32 || iv.len() != aead::NONCE_LEN {
            return Err(TlsError::Record("a key or IV of an unexpected length"));
        }
        let mut keys = DirectionKeys {
            key: [0; 32],
            key_len: key.len() as u8,
            iv: [0; aead::NONCE_LEN],
            seq,
        };
        keys.key[..key.len()].copy_from_slice(key);
        keys.iv.copy_from_slice(iv);
        Ok(keys)
    }

    /// The keys of a TLS 1.3 traffic secret (RFC 8446 §7.3), sequence 0.
    fn derive(aead: Aead, secret: &TrafficSecret) -> DirectionKeys {
        let mut key = [0u8; 32];
        let key = &mut key[..aead.key_len()];
        let mut iv = [0u8; aead::NONCE_LEN];
        secret.expand_label(b"key", key);
        secret.expand_label(b"iv", &mut iv);
        let keys = DirectionKeys::from_parts(0, key, &iv).expect("lengths of the suite");
        key.fill(0);
        iv.fill(0);
        keys
    }

    /// The same key and IV (not the sequence number).
    fn same_key(&self, other: &DirectionKeys) -> bool {
        self.key_len == other.key_len && self.key == other.key && self.iv == other.iv
    }

    fn expand(&self, aead: Aead) -> aead::LessSafeKey {
        let key = aead::UnboundKey::new(aead.algorithm(), &self.key[..usize::from(self.key_len)])
            .expect("a key of the negotiated suite's length");
        aead::LessSafeKey::new(key)
    }

    /// The next record's nonce: the IV XOR the sequence number (TLS 1.3,
    /// and TLS 1.2 ChaCha20; TLS 1.2 AES-GCM sends its last 8 bytes).
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        nonce
    }
}

impl Drop for DirectionKeys {
    fn drop(&mut self) {
        // Key material does not outlive the connection in freed memory.
        for byte in self.key.iter_mut().chain(self.iv.iter_mut()) {
            // SAFETY: a plain write to a byte we own; volatile so that the
            // compiler keeps it although the memory is freed next.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

/// An established TLS connection: key material and sequence numbers.
pub(crate) struct Session {
    version: ProtocolVersion,
    aead: Aead,
    tx: DirectionKeys,
    rx: DirectionKeys,
    /// TLS 1.3: the current application traffic secrets, client's (rx)
    /// and ours (tx), from which a KeyUpdate derives the next keys.
    secrets: Option<[TrafficSecret; 2]>,
}

impl Session {
    fn from_handshake(handshaking: Handshaking) -> Result<Session, TlsError> {
        let Handshaking {
            conn,
            client_secret,
            server_secret,
        } = handshaking;
        let (secrets, kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(TlsError::Handshake)?;
        let version = kernel.protocol_version();
        // Only the secrets are kept: not rustls's connection.
        drop(kernel);
        let (aead, tx) = DirectionKeys::new(secrets.tx.0, secrets.tx.1)?;
        let (_, rx) = DirectionKeys::new(secrets.rx.0, secrets.rx.1)?;
        let secrets = if version == ProtocolVersion::TLSv1_3 {
            let (Some(client), Some(server)) = (client_secret, server_secret) else {
                return Err(TlsError::Record(
                    "the TLS 1.3 traffic secrets were not logged",
                ));
            };
            // They must give the keys rustls negotiated, or a KeyUpdate
            // would derive wrong ones.
            if !DirectionKeys::derive(aead, &client).same_key(&rx)
                || !DirectionKeys::derive(aead, &server).same_key(&tx)
            {
                return Err(TlsError::Record(
                    "the logged traffic secrets do not give the negotiated keys",
                ));
            }
            Some([client, server])
        } else {
            None
        };
        Ok(Session {
            version,
            aead,
            tx,
            rx,
            secrets,
        })
    }

    fn is_tls13(&self) -> bool {
        self.version == ProtocolVersion::TLSv1_3
    }

    /// Seals `plain` as records of `content_type` into `out`.
    fn seal(&mut self, content_type: u8, plain: &[u8], out: &mut BytesMut) -> Result<(), TlsError> {
        let key = self.tx.expand(self.aead);
        let tls13 = self.is_tls13();
        let explicit_nonce = !tls13 && self.aead != Aead::Chacha20Poly1305;
        for chunk in plain.chunks(PLAINTEXT_LEN_MAX) {
            let nonce = self.tx.nonce();
            let inner_len = chunk.len() + usize::from(tls13);
            let body_len = inner_len
                + TAG_LEN
                + if explicit_nonce {
                    EXPLICIT_NONCE_LEN
                } else {
                    0
                };
            let outer_type = if tls13 {
                CONTENT_APPLICATION_DATA
            } else {
                content_type
            };
            let header = [outer_type, 3, 3, (body_len >> 8) as u8, body_len as u8];
            out.reserve(RECORD_HEADER_LEN + body_len);
            out.put_slice(&header);
            if explicit_nonce {
                out.put_slice(&nonce[4..]);
            }
            let start = out.len();
            out.put_slice(chunk);
            if tls13 {
                out.put_u8(content_type);
            }
            let aad = additional_data(tls13, &header, self.tx.seq, content_type, chunk.len());
            let tag = key
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(aad.as_slice()),
                    &mut out[start..],
                )
                .map_err(|_| TlsError::Record("sealing failed"))?;
            out.put_slice(tag.as_ref());
            self.tx.seq += 1;
        }
        Ok(())
    }

    /// Opens every whole record at the start of `input`.
    fn read(
        &mut self,
        input: &mut [u8],
        reply: &mut BytesMut,
        on_plain: &mut dyn FnMut(&[u8]),
    ) -> Result<TlsRead, TlsError> {
        let mut read = TlsRead::default();
        let mut key = None;
        while let Some(header) = input.get(read.consumed..read.consumed + RECORD_HEADER_LEN) {
            let content_type = header[0];
            let body_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if body_len > CIPHERTEXT_LEN_MAX {
                return Err(TlsError::Record("a record over the size limit"));
            }
            let header: [u8; RECORD_HEADER_LEN] = header.try_into().expect("5 bytes");
            let end = read.consumed + RECORD_HEADER_LEN + body_len;
            if input.len() < end {
                break;
            }
            let body = &mut input[read.consumed + RECORD_HEADER_LEN..end];
            read.consumed = end;
            if content_type == CONTENT_CHANGE_CIPHER_SPEC && self.is_tls13() {
                continue; // middlebox compatibility (RFC 8446 §5): ignored
            }
            let key = key.get_or_insert_with(|| self.rx.expand(self.aead));
            let (inner_type, plain) = self.open(key, content_type, &header, body)?;
            match inner_type {
                CONTENT_APPLICATION_DATA => on_plain(plain),
                CONTENT_ALERT => match plain {
                    [_, 0] => {
                        read.peer_closed = true;
                        return Ok(read);
                    }
                    [_, description] => return Err(TlsError::Alert(*description)),
                    _ => return Err(TlsError::Record("a malformed alert")),
                },
                CONTENT_HANDSHAKE if self.is_tls13() => {
                    let requested = key_update_request(plain)?;
                    self.update_rx()?;
                    *key = self.rx.expand(self.aead);
                    if requested {
                        self.seal(
                            CONTENT_HANDSHAKE,
                            &key_update(KEY_UPDATE_NOT_REQUESTED),
                            reply,
                        )?;
                        self.update_tx()?;
                    }
                }
                // TLS 1.2 renegotiation is not offered.
                CONTENT_HANDSHAKE => {
                    return Err(TlsError::Record("a handshake after the handshake"));
                }
                _ => return Err(TlsError::Record("an unexpected content type")),
            }
        }
        Ok(read)
    }

    /// Opens one record in place: its content type and plaintext.
    fn open<'b>(
        &mut self,
        key: &aead::LessSafeKey,
        content_type: u8,
        header: &[u8; RECORD_HEADER_LEN],
        body: &'b mut [u8],
    ) -> Result<(u8, &'b [u8]), TlsError> {
        let tls13 = self.is_tls13();
        let explicit_nonce = !tls13 && self.aead != Aead::Chacha20Poly1305;
        let (nonce, sealed) = if explicit_nonce {
            if body.len() < EXPLICIT_NONCE_LEN + TAG_LEN {
                return Err(TlsError::Record("a record too short to be sealed"));
            }
            let mut nonce = self.rx.iv;
            nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE_LEN]);
            (nonce, &mut body[EXPLICIT_NONCE_LEN..])
        } else {
            (self.rx.nonce(), body)
        };
        if sealed.len() < TAG_LEN {
            return Err(TlsError::Record("a record too short to be sealed"));
        }
        if tls13 && content_type != CONTENT_APPLICATION_DATA {
            return Err(TlsError::Record(
                "an unprotected record after the handshake",
            ));
        }
        let aad = additional_data(
            tls13,
            header,
            self.rx.seq,
            content_type,
            sealed.len() - TAG_LEN,
        );
        let plain = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad.as_slice()),
                sealed,
            )
            .map_err(|_| TlsError::Record("a record that does not decrypt"))?;
        self.rx.seq += 1;
        if !tls13 {
            return Ok((content_type, plain));
        }
        // TLSInnerPlaintext: content, the real type, then zero padding.
        let Some(type_at) = plain.iter().rposition(|&byte| byte != 0) else {
            return Err(TlsError::Record("a record with no content type"));
        };
        Ok((plain[type_at], &plain[..type_at]))
    }

    fn update_rx(&mut self) -> Result<(), TlsError> {
        let [client, _] = self
            .secrets
            .as_mut()
            .ok_or(TlsError::Record("KeyUpdate in TLS 1.2"))?;
        client.update();
        self.rx = DirectionKeys::derive(self.aead, client);
        Ok(())
    }

    fn update_tx(&mut self) -> Result<(), TlsError> {
        let [_, server] = self
            .secrets
            .as_mut()
            .ok_or(TlsError::Record("KeyUpdate in TLS 1.2"))?;
        server.update();
        self.tx = DirectionKeys::derive(self.aead, server);
        Ok(())
    }
}

/// A TLS 1.3 application traffic secret: the length of the suite's hash,
/// SHA-256 (32 bytes) or SHA-384 (48).
pub(crate) struct TrafficSecret {
    bytes: [u8; 48],
    len: u8,
}

impl TrafficSecret {
    fn new(secret: &[u8]) -> Option<TrafficSecret> {
        if !matches!(secret.len(), 32 | 48) {
            return None;
        }
        let mut bytes = [0; 48];
        bytes[..secret.len()].copy_from_slice(secret);
        Some(TrafficSecret {
            bytes,
            len: secret.len() as u8,
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446 §7.1).
    fn expand_label(&self, label: &[u8], out: &mut [u8]) {
        let algorithm = if self.len == 48 {
            hkdf::HKDF_SHA384
        } else {
            hkdf::HKDF_SHA256
        };
        let prk = hkdf::Prk::new_less_safe(algorithm, self.as_slice());
        let out_len = (out.len() as u16).to_be_bytes();
        let label_len = [(b"tls13 ".len() + label.len()) as u8];
        let info: [&[u8]; 5] = [&out_len, &label_len, b"tls13 ", label, &[0]];
        prk.expand(&info, OutputLen(out.len()))
            .and_then(|okm| okm.fill(out))
            .expect("HKDF output of a key's, IV's or secret's length");
    }

    /// The next generation: application_traffic_secret_N+1 (RFC 8446 §7.2).
    fn update(&mut self) {
        let mut next = [0u8; 48];
        let len = usize::from(self.len);
        self.expand_label(b"traffic upd", &mut next[..len]);
        self.bytes = next;
        next.fill(0);
    }
}

impl Drop for TrafficSecret {
    fn drop(&mut self) {
        for byte in &mut self.bytes {
            // SAFETY: as in DirectionKeys' drop.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

struct OutputLen(usize);

impl hkdf::KeyType for OutputLen {
    fn len(&self) -> usize {
        self.0
    }
}

const CLIENT_TRAFFIC_SECRET_0: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET_0: &str = "SERVER_TRAFFIC_SECRET_0";

/// The secrets logged while one connection's handshake step runs.
#[derive(Default)]
struct Captured {
    client: Option<TrafficSecret>,
    server: Option<TrafficSecret>,
}

thread_local! {
    /// Set by `Tls::read` around a handshake step, on the shard's thread:
    /// rustls logs the connection's secrets from inside that step.
    static CAPTURED: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// rustls's key log, kept to the two TLS 1.3 application traffic secrets
/// and handed to the connection whose handshake step is running on this
/// thread (nothing is written anywhere).
#[derive(Debug)]
struct SecretCapture;

impl rustls::KeyLog for SecretCapture {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, CLIENT_TRAFFIC_SECRET_0 | SERVER_TRAFFIC_SECRET_0)
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAPTURED.with(|captured| {
            let mut captured = captured.borrow_mut();
            let Some(captured) = captured.as_mut() else {
                return;
            };
            match label {
                CLIENT_TRAFFIC_SECRET_0 => captured.client = TrafficSecret::new(secret),
                SERVER_TRAFFIC_SECRET_0 => captured.server = TrafficSecret::new(secret),
                _ => {}
            }
        });
    }
}

/// A record's additional data: in TLS 1.3 its header; in TLS 1.2 the
/// sequence number, type, version and plaintext length.
fn additional_data(
    tls13: bool,
    header: &[u8; RECORD_HEADER_LEN],
    seq: u64,
    content_type: u8,
    plain_len: usize,
) -> AdditionalData {
    let mut bytes = [0; 13];
    if tls13 {
        bytes[..RECORD_HEADER_LEN].copy_from_slice(header);
        return AdditionalData {
            bytes,
            len: RECORD_HEADER_LEN,
        };
    }
    bytes[..8].copy_from_slice(&seq.to_be_bytes());
    bytes[8] = content_type;
    bytes[9] = 3;
    bytes[10] = 3;
    bytes[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
    AdditionalData { bytes, len: 13 }
}

struct AdditionalData {
    bytes: [u8; 13],
    len: usize,
}

impl AdditionalData {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A KeyUpdate handshake message.
fn key_update(request: u8) -> [u8; 5] {
    [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request]
}

/// The only handshake message a TLS 1.3 client may send after the
/// handshake (as server, we take no post-handshake authentication): a
/// KeyUpdate, whole in its record. Returns whether it asks for ours.
fn key_update_request(message: &[u8]) -> Result<bool, TlsError> {
    match message {
        [HANDSHAKE_KEY_UPDATE, 0, 0, 1, KEY_UPDATE_NOT_REQUESTED] => Ok(false),
        [HANDSHAKE_KEY_UPDATE, 0, 0, 1, KEY_UPDATE_REQUESTED] => Ok(true),
        _ => Err(TlsError::Record("a handshake message other than KeyUpdate")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    struct Pair {
        client: rustls::ClientConnection,
        server: Tls,
        /// Plaintext the server received.
        received: Vec<u8>,
        /// Plaintext the client received.
        client_received: Vec<u8>,
        _dir: tempfile::TempDir,
    }

    fn acceptor_and_roots() -> (TlsAcceptor, rustls::RootCertStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert_file = dir.path().join("cert.pem");
        let key_file = dir.path().join("key.pem");
        std::fs::write(&cert_file, cert.cert.pem()).unwrap();
        std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
        let acceptor = TlsAcceptor::load(&cert_file, &key_file).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        (acceptor, roots, dir)
    }

    fn pair(
        version: &'static rustls::SupportedProtocolVersion,
        suite: rustls::CipherSuite,
    ) -> Pair {
        let (acceptor, roots, dir) = acceptor_and_roots();
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client =
            rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
                .unwrap();
        let mut pair = Pair {
            client,
            server: acceptor.accept().unwrap(),
            received: Vec::new(),
            client_received: Vec::new(),
            _dir: dir,
        };
        for _ in 0..10 {
            pair.client_to_server().unwrap();
            if !pair.client.is_handshaking() && pair.server.is_established() {
                break;
            }
        }
        assert!(pair.server.is_established() && !pair.client.is_handshaking());
        assert_eq!(
            pair.client.negotiated_cipher_suite().unwrap().suite(),
            suite
        );
        pair
    }

    impl Pair {
        /// Moves what the client wrote through the server, and what the
        /// server answered back to the client.
        fn client_to_server(&mut self) -> Result<TlsRead, TlsError> {
            let mut wire = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut wire).unwrap();
            }
            let mut reply = BytesMut::new();
            let received = &mut self.received;
            let read = self.server.read(&mut wire, &mut reply, &mut |plain| {
                received.extend_from_slice(plain)
            })?;
            assert_eq!(read.consumed, wire.len(), "whole records");
            self.server_to_client(&reply);
            Ok(read)
        }

        fn server_to_client(&mut self, bytes: &[u8]) {
            let mut bytes = bytes;
            while !bytes.is_empty() {
                self.client.read_tls(&mut bytes).unwrap();
                self.client.process_new_packets().unwrap();
                let _ = self.client.reader().read_to_end(&mut self.client_received);
            }
        }

        fn client_reads(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.client_received)
        }
    }

    fn exchange(version: &'static rustls::SupportedProtocolVersion, suite: rustls::CipherSuite) {
        let mut pair = pair(version, suite);
        // Client to server, in records the server opens.
        pair.client.writer().write_all(b"hello server").unwrap();
        pair.client_to_server().unwrap();
        assert_eq!(pair.received, b"hello server");
        // Server to client, several records' worth.
        let big = vec![7u8; 40_000];
        let mut sealed = BytesMut::new();
        pair.server.encrypt(b"hello client", &mut sealed).unwrap();
        pair.server.encrypt(&big, &mut sealed).unwrap();
        pair.server_to_client(&sealed);
        let plain = pair.client_reads();
        assert_eq!(&plain[..12], b"hello client");
        assert_eq!(&plain[12..], &big[..]);
        // Closing: the client sees close_notify; the server sees the client's.
        let mut close = BytesMut::new();
        pair.server.close_notify(&mut close);
        pair.server_to_client(&close);
        assert!(pair.client_reads().is_empty());
        assert_eq!(
            pair.client.reader().read(&mut [0; 1]).unwrap(),
            0,
            "a clean EOF"
        );
        pair.client.send_close_notify();
        assert!(pair.client_to_server().unwrap().peer_closed);
    }

    #[test]
    fn tls13_with_each_suite() {
        for suite in [
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        ] {
            exchange(&rustls::version::TLS13, suite);
        }
    }

    #[test]
    fn tls12_with_each_suite() {
        for suite in [
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ] {
            exchange(&rustls::version::TLS12, suite);
        }
    }

    #[test]
    fn a_client_key_update_is_followed_in_both_directions() {
        // Each hash (SHA-384 for AES-256), and again: every generation of
        // the secrets derives the keys rustls's client derives.
        for suite in [
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        ] {
            let mut pair = pair(&rustls::version::TLS13, suite);
            for round in 0..3 {
                // rustls asks for our update too.
                pair.client.refresh_traffic_keys().unwrap();
                let text = format!("after update {round}");
                pair.client.writer().write_all(text.as_bytes()).unwrap();
                pair.client_to_server().unwrap();
                assert_eq!(std::mem::take(&mut pair.received), text.as_bytes());
                let mut sealed = BytesMut::new();
                pair.server.encrypt(b"with new keys", &mut sealed).unwrap();
                pair.server_to_client(&sealed);
                assert_eq!(pair.client_reads(), b"with new keys", "{suite:?}");
            }
        }
    }

    #[test]
    fn an_established_session_keeps_only_key_material() {
        // Keys, IVs, sequence numbers and two traffic secrets; rustls's
        // KernelConnection (hundreds of bytes, with a boxed state) is not
        // kept.
        assert!(
            std::mem::size_of::<Session>() <= 256,
            "{}",
            std::mem::size_of::<Session>()
        );
        let pair = pair(
            &rustls::version::TLS13,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        );
        let Tls::Established(session) = &pair.server else {
            panic!("established");
        };
        assert!(session.secrets.is_some());
    }

    #[test]
    fn garbage_and_tampering_fail_the_connection() {
        let (acceptor, _, _dir) = acceptor_and_roots();
        let mut server = acceptor.accept().unwrap();
        let mut garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let result = server.read(&mut garbage, &mut BytesMut::new(), &mut |_| {});
        assert!(matches!(result, Err(TlsError::Handshake(_))), "{result:?}");

        let mut pair = pair(
            &rustls::version::TLS13,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        );
        pair.client.writer().write_all(b"tampered").unwrap();
        let mut wire = Vec::new();
        pair.client.write_tls(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let result = pair
            .server
            .read(&mut wire, &mut BytesMut::new(), &mut |_| {});
        assert!(matches!(result, Err(TlsError::Record(_))), "{result:?}");
    }

    #[test]
    fn a_record_split_anywhere_waits_for_the_rest() {
        let mut pair = pair(
            &rustls::version::TLS13,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        );
        pair.client.writer().write_all(b"split").unwrap();
        let mut wire = Vec::new();
        pair.client.write_tls(&mut wire).unwrap();
        for cut in 0..wire.len() {
            let mut head = wire[..cut].to_vec();
            let read = pair.server.read(&mut head, &mut BytesMut::new(), &mut |_| {
                panic!("nothing whole yet")
            });
            assert_eq!(read.unwrap().consumed, 0, "cut at {cut}");
        }
    }

    #[test]
    fn reload_takes_a_new_certificate_and_keeps_the_old_one_on_error() {
        let (acceptor, _, dir) = acceptor_and_roots();
        let before = acceptor.certificate.current.read().unwrap().clone();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        acceptor.reload().unwrap();
        let after = acceptor.certificate.current.read().unwrap().clone();
        assert_ne!(before.cert, after.cert);
        std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
        assert!(acceptor.reload().is_err());
        let kept = acceptor.certificate.current.read().unwrap().clone();
        assert_eq!(kept.cert, after.cert);
    }
}
