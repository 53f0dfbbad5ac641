//! Serving the API over TLS: a certificate from the cluster's CA for the
//! names clients reach this server by, and the CA written beside the
//! bootstrap token so that the local CLI trusts it by itself.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use skyvisor_auth::pki::{ClusterCa, fingerprint};
use skyvisor_store::Store;

/// The CA certificate's file in the data directory (the CLI reads it like
/// the bootstrap token).
pub const CA_FILE: &str = "cluster-ca.pem";

/// The names a server's certificate covers: the advertised URL's host,
/// the bound address, the machine's name and the loopback names.
pub fn names_for(bound: SocketAddr, url: &str) -> Vec<String> {
    let mut names = Vec::new();
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    names.push(host.trim_matches(['[', ']']).to_string());
    if !bound.ip().is_unspecified() {
        names.push(bound.ip().to_string());
    }
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
    {
        names.push(h.to_string());
    }
    names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
    names.dedup();
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
}

/// Writes the cluster CA's certificate to `data_dir` (making the CA if
/// there is none yet): what clients of the agents' TLS endpoints (their
/// metrics, for Prometheus) trust, even when the API itself is plain HTTP.
pub async fn write_ca_file(store: &dyn Store, data_dir: &Path) -> Result<std::path::PathBuf> {
    let ca = ClusterCa::load_or_create(store)
        .await
        .context("cannot load or make the cluster's CA")?;
    let ca_file = data_dir.join(CA_FILE);
    std::fs::write(&ca_file, &ca.cert_pem)
        .with_context(|| format!("cannot write {}", ca_file.display()))?;
    Ok(ca_file)
}

/// The server's TLS configuration for `names`; writes the CA's certificate
/// to `data_dir`.
pub async fn server_config(
    store: &dyn Store,
    data_dir: &Path,
    names: &[String],
) -> Result<rustls::ServerConfig> {
    let ca = ClusterCa::load_or_create(store)
        .await
        .context("cannot load or make the cluster's CA")?;
    let issued = ca
        .issue_server(names)
        .context("cannot make the server's certificate")?;
    let ca_file = data_dir.join(CA_FILE);
    std::fs::write(&ca_file, &ca.cert_pem)
        .with_context(|| format!("cannot write {}", ca_file.display()))?;
    tracing::info!(names = ?names, ca = %fingerprint(&ca.cert_pem), "serving the API over TLS");
    eprintln!(
        "TLS: the cluster CA's fingerprint is {} (in {}); clients pin it at `skyvisor remote add`",
        fingerprint(&ca.cert_pem),
        ca_file.display()
    );
    skyvisor_auth::tls::server_config(&issued.chain_pem, &issued.key_pem)
        .map_err(|e| anyhow::anyhow!("cannot serve TLS: {e}"))
}
