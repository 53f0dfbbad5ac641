//! Trust on first use for `https` APIs (like ssh and Incus): `remote add`
//! fetches the certificate chain the server presents, shows the cluster
//! CA's fingerprint, and, once the user accepts it (or it matches the one
//! given), keeps the CA in the config file as the only one the remote is
//! trusted with.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Accepts any chain: used only to read it, never to send anything.
#[derive(Debug)]
struct ReadOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for ReadOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The fingerprint of a DER certificate, `sha256:AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    let hexes: Vec<String> = Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    format!("sha256:{}", hexes.join(":"))
}

/// The CA certificate (PEM) at the end of the chain the `https` server at
/// `url` presents, and its fingerprint.
pub async fn server_ca(url: &str) -> Result<(String, String)> {
    let authority = url
        .strip_prefix("https://")
        .context("not an https URL")?
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => {
            (h.to_string(), p.parse::<u16>().context("port")?)
        }
        _ => (authority.clone(), 443),
    };
    let host = host.trim_matches(['[', ']']).to_string();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReadOnly(provider)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(host.clone()).context("server name")?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .with_context(|| format!("connecting to {authority} timed out"))?
    .with_context(|| format!("cannot connect to {authority}"))?;
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .with_context(|| format!("the TLS handshake with {authority} timed out"))?
        .with_context(|| format!("no TLS handshake with {authority}: is it an https API?"))?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let Some(ca) = chain.last() else {
        bail!("{authority} presented no certificate");
    };
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", ca.to_vec()));
    Ok((pem, fingerprint(ca)))
}

/// Normalizes a fingerprint for comparison: upper case, no `sha256:`, no
/// colons.
pub fn normalized(fp: &str) -> String {
    fp.trim()
        .trim_start_matches("sha256:")
        .trim_start_matches("SHA256:")
        .replace(':', "")
        .to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_however_written() {
        assert_eq!(normalized("sha256:ab:CD:01"), normalized("ABCD01"));
        assert_ne!(normalized("sha256:ab:CD:02"), normalized("ABCD01"));
        assert!(fingerprint(b"x").starts_with("sha256:"));
    }
}
