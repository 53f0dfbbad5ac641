//! The cluster's certificate authority: made once by the first server that
//! serves TLS and kept in the store (`cluster/ca`), it signs each server's
//! API certificate. Clients trust the CA, pinned at their first login.
//!
//! The CA's key lives in the store beside the cluster's internal key: who
//! can read the store can already act as any part of the cluster.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skyvisor_store::{Store, StoreExt, encode};

use crate::AuthError;

/// Where the CA is kept.
pub const CA_KEY: &str = "cluster/ca";

/// The name the CA's certificate carries.
const CA_NAME: &str = "Skyvisor cluster CA";

/// The cluster's CA: its certificate and private key, PEM.
#[derive(Clone, Serialize, Deserialize)]
pub struct ClusterCa {
    /// The CA certificate (what clients trust).
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &fingerprint(&self.cert_pem))
            .finish_non_exhaustive()
    }
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate followed by the CA's (the chain a server sends).
    pub chain_pem: String,
    /// The certificate alone.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

fn pki_error(what: &str, e: impl std::fmt::Display) -> AuthError {
    AuthError::Store(skyvisor_store::StoreError::Unavailable(format!(
        "{what}: {e}"
    )))
}

/// The CA's own parameters: the same every time, so an issuer rebuilt from
/// them signs as the stored certificate says.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    params
}

impl ClusterCa {
    /// The cluster's CA, made and stored first if there is none (the first
    /// writer wins; every server then uses the stored one).
    pub async fn load_or_create(store: &dyn Store) -> Result<Self, AuthError> {
        if let Some((ca, _)) = store.get_json::<ClusterCa>(CA_KEY).await? {
            return Ok(ca);
        }
        let key = KeyPair::generate().map_err(|e| pki_error("generating the CA key", e))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| pki_error("making the CA certificate", e))?;
        let ca = ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        store.create(CA_KEY, encode(&ca)).await?;
        match store.get_json::<ClusterCa>(CA_KEY).await? {
            Some((stored, _)) => Ok(stored),
            None => Err(pki_error("the CA", "vanished from the store")),
        }
    }

    /// Signs a server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, AuthError> {
        self.issue(names, &[rcgen::ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// Signs a cluster member's certificate for `names`: it serves TLS and
    /// authenticates its member as a client (replica links, migration
    /// streams), so it carries both purposes.
    pub fn issue_member(&self, names: &[String]) -> Result<Issued, AuthError> {
        self.issue(
            names,
            &[
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn issue(
        &self,
        names: &[String],
        purposes: &[rcgen::ExtendedKeyUsagePurpose],
    ) -> Result<Issued, AuthError> {
        let ca_key =
            KeyPair::from_pem(&self.key_pem).map_err(|e| pki_error("reading the CA key", e))?;
        let issuer = Issuer::new(ca_params(), ca_key);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("skyvisor", String::as_str),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .filter_map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Some(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().ok().map(SanType::DnsName),
            })
            .collect();
        params.extended_key_usages = purposes.to_vec();
        // What QEMU's GnuTLS checks insist on for a leaf it serves with.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let key = KeyPair::generate().map_err(|e| pki_error("generating a server key", e))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| pki_error("signing a server certificate", e))?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The SHA-256 fingerprint of the first certificate in `pem`, as
/// `sha256:AB:CD:...` (empty if there is none).
pub fn fingerprint(pem: &str) -> String {
    match first_der(pem) {
        Some(der) => fingerprint_der(&der),
        None => String::new(),
    }
}

/// The fingerprint of a DER certificate.
fn fingerprint_der(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let hexes: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    format!("sha256:{}", hexes.join(":"))
}

/// The DER bytes of the first certificate in `pem`.
fn first_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_store::EmbeddedStore;

    #[tokio::test]
    async fn one_ca_per_cluster_signs_server_certificates() {
        let store = EmbeddedStore::in_memory().expect("store");
        let a = ClusterCa::load_or_create(&store).await.expect("ca");
        let b = ClusterCa::load_or_create(&store).await.expect("ca again");
        assert_eq!(a.cert_pem, b.cert_pem, "a second server adopts the CA");
        let issued = a
            .issue_server(&["10.0.0.5".into(), "api.example".into()])
            .expect("issue");
        assert!(
            issued.chain_pem.ends_with(&a.cert_pem),
            "the chain ends with the CA"
        );
        assert_ne!(fingerprint(&issued.chain_pem), fingerprint(&a.cert_pem));
        assert!(fingerprint(&a.cert_pem).starts_with("sha256:"));
        assert_eq!(fingerprint(&a.cert_pem).len(), "sha256:".len() + 32 * 3 - 1);
    }
}
