//! The agent's certificate of the cluster's CA and where it is used: the
//! agent's own API, mutual TLS on replica links, and QEMU's TLS for the
//! migration streams (memory and disk mirror), whose credentials QEMU
//! reads from files.
//!
//! The certificate is issued afresh at every start (the CA is in the
//! store the agent reads anyway), so nothing here needs renewing or
//! revoking beyond the agent's own life.

use std::path::{Path, PathBuf};

use skyvisor_auth::pki::{ClusterCa, Issued};

use crate::AgentError;

/// What the agent presents to the rest of the cluster.
#[derive(Debug)]
pub struct Credentials {
    /// The cluster's CA.
    pub ca: ClusterCa,
    /// This agent's certificate (chain) and key.
    pub member: Issued,
    /// The directory of QEMU's `tls-creds-x509` files.
    pub qemu_dir: PathBuf,
}

fn fail(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Network(format!("{what}: {e}"))
}

impl Credentials {
    /// Issues this agent's certificate for `names` (its addresses) from the
    /// cluster's CA, made first if no server has yet; sets the process's
    /// replica-link TLS; writes QEMU's credentials under `data_dir`.
    pub async fn establish(
        store: &dyn skyvisor_store::Store,
        names: &[String],
        data_dir: &Path,
    ) -> Result<Self, AgentError> {
        let ca = ClusterCa::load_or_create(store)
            .await
            .map_err(|e| AgentError::Store(e.into_store_error()))?;
        let member = ca
            .issue_member(names)
            .map_err(|e| fail("cannot make the agent's certificate", e))?;
        let links = skyvisor_volume::link_tls::LinkTls::from_pem(
            &member.chain_pem,
            &member.key_pem,
            &ca.cert_pem,
        )
        .map_err(|e| fail("replica links", e))?;
        skyvisor_volume::link_tls::set_process_tls(links);
        let qemu_dir = data_dir.join("agent").join("tls");
        write_qemu_credentials(&qemu_dir, &ca.cert_pem, &member)
            .map_err(|e| fail(&format!("writing {}", qemu_dir.display()), e))?;
        Ok(Self {
            ca,
            member,
            qemu_dir,
        })
    }

    /// The TLS configuration of the agent's API.
    pub fn api_tls(&self) -> Result<rustls::ServerConfig, AgentError> {
        skyvisor_auth::tls::server_config(&self.member.chain_pem, &self.member.key_pem)
            .map_err(|e| fail("cannot serve TLS", e))
    }
}

/// QEMU's file names: the same certificate serves as the destination's
/// (server) and the source's (client), keys readable by root only.
fn write_qemu_credentials(dir: &Path, ca_pem: &str, member: &Issued) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let files = [
        ("ca-cert.pem", ca_pem, 0o644),
        ("server-cert.pem", member.cert_pem.as_str(), 0o644),
        ("client-cert.pem", member.cert_pem.as_str(), 0o644),
        ("server-key.pem", member.key_pem.as_str(), 0o600),
        ("client-key.pem", member.key_pem.as_str(), 0o600),
    ];
    for (name, pem, mode) in files {
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_agent_gets_a_member_certificate_and_qemu_its_files() {
        let store = skyvisor_store::EmbeddedStore::in_memory().expect("store");
        let dir = tempfile::tempdir().expect("dir");
        let c = Credentials::establish(&store, &["10.0.0.7".into()], dir.path())
            .await
            .expect("credentials");
        let ca = ClusterCa::load_or_create(&store).await.expect("ca");
        assert_eq!(c.ca.cert_pem, ca.cert_pem, "the CA made is the stored one");
        for f in ["ca-cert.pem", "server-cert.pem", "client-key.pem"] {
            assert!(c.qemu_dir.join(f).exists(), "{f}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.qemu_dir.join("server-key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is root's only");
        assert!(c.api_tls().is_ok());
        assert!(skyvisor_volume::link_tls::process_tls().is_some());
    }
}
