//! The agent's certificate of the cluster's CA and where it is used: the
//! agent's own API, and mutual TLS on replica links and on the tunnels of
//! migration streams.
//!
//! The certificate is issued afresh at every start (the CA is in the
//! store the agent reads anyway), so nothing here needs renewing or
//! revoking beyond the agent's own life.

use skyvisor_auth::pki::{ClusterCa, Issued};
use skyvisor_volume::link_tls::LinkTls;

use crate::AgentError;

/// Sets `builder` up for calls to other parts of the cluster: it trusts the
/// cluster's CA (`ca_pem`) and presents this member's certificate
/// (`identity_pem`: key, then chain), which agents require.
pub fn cluster_client(
    mut builder: reqwest::ClientBuilder,
    ca_pem: Option<&str>,
    identity_pem: Option<&str>,
) -> reqwest::ClientBuilder {
    if let Some(cert) = ca_pem.and_then(|p| reqwest::Certificate::from_pem(p.as_bytes()).ok()) {
        builder = builder.add_root_certificate(cert);
    }
    if let Some(id) = identity_pem.and_then(|p| reqwest::Identity::from_pem(p.as_bytes()).ok()) {
        builder = builder.identity(id);
    }
    builder
}

/// What the agent presents to the rest of the cluster.
#[derive(Debug)]
pub struct Credentials {
    /// The cluster's CA.
    pub ca: ClusterCa,
    /// This agent's certificate (chain) and key.
    pub member: Issued,
    /// Mutual TLS with other members (replica links, migration tunnels).
    pub links: LinkTls,
}

fn fail(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Network(format!("{what}: {e}"))
}

impl Credentials {
    /// Issues this agent's certificate for `names` (its addresses) from the
    /// cluster's CA, made first if no server has yet; sets the process's
    /// replica-link TLS.
    pub async fn establish(
        store: &dyn skyvisor_store::Store,
        names: &[String],
    ) -> Result<Self, AgentError> {
        let ca = ClusterCa::load_or_create(store)
            .await
            .map_err(|e| AgentError::Store(e.into_store_error()))?;
        let member = ca
            .issue_member(names)
            .map_err(|e| fail("cannot make the agent's certificate", e))?;
        let links = LinkTls::from_pem(&member.chain_pem, &member.key_pem, &ca.cert_pem)
            .map_err(|e| fail("member TLS", e))?;
        skyvisor_volume::link_tls::set_process_tls(links.clone());
        Ok(Self { ca, member, links })
    }

    /// The TLS configuration of the agent's API: clients that are members
    /// present their certificate.
    pub fn api_tls(&self) -> Result<rustls::ServerConfig, AgentError> {
        skyvisor_auth::tls::member_server_config(
            &self.member.chain_pem,
            &self.member.key_pem,
            &self.ca.cert_pem,
        )
        .map_err(|e| fail("cannot serve TLS", e))
    }

    /// This agent's certificate and key as one PEM (a client identity).
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.member.key_pem, self.member.chain_pem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_agent_gets_a_member_certificate_of_the_cluster_ca() {
        let store = skyvisor_store::EmbeddedStore::in_memory().expect("store");
        let c = Credentials::establish(&store, &["10.0.0.7".into()])
            .await
            .expect("credentials");
        let ca = ClusterCa::load_or_create(&store).await.expect("ca");
        assert_eq!(c.ca.cert_pem, ca.cert_pem, "the CA made is the stored one");
        assert!(c.member.chain_pem.ends_with(&ca.cert_pem));
        assert!(c.api_tls().is_ok());
        assert!(skyvisor_volume::link_tls::process_tls().is_some());
    }

    #[tokio::test]
    async fn the_agent_api_admits_only_callers_with_a_member_certificate_and_the_key() {
        let store = skyvisor_store::EmbeddedStore::in_memory().expect("store");
        let c = Credentials::establish(&store, &["127.0.0.1".into()])
            .await
            .expect("credentials");
        let key = skyvisor_auth::cluster_key(&store).await.expect("key");
        let ok = || async { "ok" };
        let router = crate::http::members_only(
            axum::Router::new()
                .route("/agent/v1/thing", axum::routing::get(ok))
                .route("/agent/v1/health", axum::routing::get(ok)),
            key.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let tls = c.api_tls().expect("tls");
        tokio::spawn(skyvisor_auth::tls::serve_members(listener, tls, router));
        let ca = c.ca.cert_pem.clone();
        let status = |client: reqwest::Client, path: &'static str| async move {
            client
                .get(format!("https://127.0.0.1:{port}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        };
        let member = crate::internal_client(&key, Some(&ca), Some(&c.identity_pem()));
        assert_eq!(status(member, "/agent/v1/thing").await, 200);
        // The key without a certificate: refused.
        let keyed = crate::internal_client(&key, Some(&ca), None);
        assert_eq!(status(keyed.clone(), "/agent/v1/thing").await, 401);
        assert_eq!(
            status(keyed, "/agent/v1/health").await,
            200,
            "health stays open"
        );
        // A certificate of another CA does not get through the handshake.
        let other = skyvisor_store::EmbeddedStore::in_memory().expect("store");
        let theirs = ClusterCa::load_or_create(&other)
            .await
            .expect("ca")
            .issue_member(&["127.0.0.1".into()])
            .expect("member");
        let stranger = crate::internal_client(
            &key,
            Some(&ca),
            Some(&format!("{}{}", theirs.key_pem, theirs.chain_pem)),
        );
        assert_ne!(status(stranger, "/agent/v1/thing").await, 200);
    }
}
