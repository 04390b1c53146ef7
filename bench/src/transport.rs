//! What the clients' bytes travel over (`--transport`), and the certificate
//! the benchmark makes for the servers it starts: a CA and a leaf for
//! 127.0.0.1 and localhost, in a temporary directory, that the load
//! generator trusts and Herald, Mosquitto and the NATS server present.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::RootCertStore;
use rustls::client::Resumption;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

pub use herald_proto::Transport;

/// A row's name in the tables: the system, with the transport unless it
/// is plain TCP (`herald`, `herald-tls`, `mosquitto-tls`).
pub fn row_name(transport: Transport, system: &str) -> String {
    match transport {
        Transport::Tcp => system.to_owned(),
        other => format!("{system}-{}", other.as_str()),
    }
}

/// The certificate files of one run: a CA the clients trust, and the
/// servers' chain (leaf, then CA) and key, signed by it. Removed with the
/// temporary directory when dropped.
pub struct Pki {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pki {
    /// Makes a fresh CA and a server certificate for 127.0.0.1 and
    /// localhost (ECDSA P-256, rcgen's default, as a server would use).
    pub fn generate() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "herald-bench CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "herald-bench server");
        let key = KeyPair::generate()?;
        let leaf = params.signed_by(&key, &ca)?;

        let ca_file = dir.path().join("ca.pem");
        let cert_file = dir.path().join("server-chain.pem");
        let key_file = dir.path().join("server-key.pem");
        std::fs::write(&ca_file, ca.pem())?;
        std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca.pem()))?;
        write_private(&key_file, key.serialize_pem().as_bytes())?;
        Ok(Pki {
            ca_file,
            cert_file,
            key_file,
            _dir: dir,
        })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

/// The load generator's TLS configuration: ring, TLS 1.2 and 1.3, trusting
/// only the certificates in `ca_file`. Resumption is off, so that every
/// connection (a storm's reconnects too) costs the servers a full
/// handshake, as a fleet of fresh devices would: the accept rates compare
/// handshakes, not ticket checks.
pub fn client_config(ca_file: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("cannot read {}", ca_file.display()))?
    {
        let certificate =
            certificate.with_context(|| format!("a bad certificate in {}", ca_file.display()))?;
        roots.add(certificate)?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in {}", ca_file.display());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_names_carry_the_transport_unless_tcp() {
        assert_eq!(row_name(Transport::Tcp, "herald"), "herald");
        assert_eq!(row_name(Transport::Wss, "herald"), "herald-wss");
        assert_eq!(row_name(Transport::Tls, "nats"), "nats-tls");
    }

    #[test]
    fn the_generated_certificate_is_trusted_by_the_client_config() {
        let pki = Pki::generate().unwrap();
        client_config(&pki.ca_file).unwrap();
        let chain = std::fs::read_to_string(&pki.cert_file).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        let key = std::fs::metadata(&pki.key_file).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
    }
}
