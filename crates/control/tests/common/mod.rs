//! A control plane over real HTTP for the integration tests of this crate.

use std::sync::Arc;

use skyvisor_control::{ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::ServerName;
use skyvisor_store::{EmbeddedStore, Store};

/// A server on the embedded store: its URL, a cluster admin's token, and
/// its cluster membership (held for as long as the server serves).
pub async fn server(dir: &std::path::Path, max_upload_bytes: u64) -> (String, String, impl Sized) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let cp = ControlPlane::start(
        store,
        ServerConfig {
            data_dir: dir.join("server"),
            cache_dir: dir.join("cache"),
            guest_binary: None,
            subnet: "10.97.0.0/16".parse().expect("subnet"),
            vni: 4214,
            private_vni_base: skyvisor_core::network::PRIVATE_VNI_BASE,
            audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
            event_retention: skyvisor_control::events::DEFAULT_RETENTION,
            mtu: 1450,
            weigher: Weigher::Spread,
            cluster: ClusterSettings::single(ServerName::new("test").expect("name"), base.clone()),
            max_upload_bytes,
            bootstrap_token_file: None,
        },
    )
    .await
    .expect("control plane");
    let membership = cp.join_cluster().await.expect("join");
    tokio::spawn(axum::serve(listener, skyvisor_control::api::router(cp.clone())).into_future());
    let token = cp
        .directory
        .create_token(
            &skyvisor_core::IdentityName::new(skyvisor_core::auth::BOOTSTRAP_IDENTITY)
                .expect("name"),
            "test",
            None,
        )
        .await
        .expect("token")
        .bearer;
    (base, token, membership)
}
