//! Mutual TLS on replica links: in a cluster with a CA, every replica
//! connection is TLS in which both ends present a certificate of the
//! cluster's CA and check the other's. So only cluster members can write
//! replica data or pose as a replica, and nobody on the wire can read or
//! change a block. The link-key handshake ([`crate::link_key`]) still runs
//! inside the TLS session.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How much of the socket a TLS link reads at once. rustls reads records
/// 4 KiB at a time; below it, this buffer makes a 1 MiB write cost a few
/// `read` calls instead of hundreds.
const SOCKET_READ_BUFFER: usize = 256 * 1024;

/// The socket under a TLS link: reads buffered, writes straight through.
pub type LinkSocket = BufReader<TcpStream>;
/// A link's TLS stream, the connecting side.
pub type ClientLink = tokio_rustls::client::TlsStream<LinkSocket>;
/// A link's TLS stream, the accepting side.
pub type ServerLink = tokio_rustls::server::TlsStream<LinkSocket>;

/// Why the TLS configuration of links could not be made.
#[derive(Debug, thiserror::Error)]
#[error("replica link TLS: {0}")]
pub struct LinkTlsError(String);

/// The TLS ends of this process's replica links.
#[derive(Clone)]
pub struct LinkTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkTls")
    }
}

/// TLS 1.3 with AES-128-GCM only: both ends are ours, and it is the
/// cheapest strong suite with AES instructions (a third less CPU per byte
/// than AES-256 on the data paths).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(p)
}

impl LinkTls {
    /// Links that present `chain_pem` (this member's certificate, then the
    /// CA's) with `key_pem`, and admit only peers with a certificate of
    /// `ca_pem`.
    pub fn from_pem(chain_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, LinkTlsError> {
        let e = |what: &str, err: &dyn std::fmt::Display| LinkTlsError(format!("{what}: {err}"));
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|err| e("reading the certificate chain", &err))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| e("reading the private key", &err))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|err| e("reading the CA certificate", &err))?;
            roots
                .add(cert)
                .map_err(|err| e("the CA certificate is not usable", &err))?;
        }
        if roots.is_empty() {
            return Err(LinkTlsError("no CA certificate given".into()));
        }
        let roots = Arc::new(roots);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|err| e("cannot verify peers", &err))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| e("protocol versions", &err))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|err| e("the certificate and key do not go together", &err))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| e("protocol versions", &err))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|err| e("the certificate and key do not go together", &err))?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Completes a peer's handshake on an accepted connection.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<ServerLink> {
        self.acceptor
            .accept(BufReader::with_capacity(SOCKET_READ_BUFFER, tcp))
            .await
    }

    /// Opens TLS to the replica server at `addr` (`host:port`), whose
    /// certificate must name `host`.
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> std::io::Result<ClientLink> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host} is not a host name or address: {e}"),
            )
        })?;
        self.connector
            .connect(name, BufReader::with_capacity(SOCKET_READ_BUFFER, tcp))
            .await
    }
}

/// This process's link TLS, set once by the host agent before it serves or
/// opens a volume (like the link key: configuration of the process's
/// cluster).
static PROCESS_TLS: OnceLock<LinkTls> = OnceLock::new();

/// Sets this process's link TLS; later calls keep the first.
pub fn set_process_tls(tls: LinkTls) {
    let _ = PROCESS_TLS.set(tls);
}

/// This process's link TLS, if set.
pub fn process_tls() -> Option<&'static LinkTls> {
    PROCESS_TLS.get()
}
