//! Skyvisor's control plane: the REST API, placement, the image service and
//! the controllers.
//!
//! The API validates a request and writes desired state to the store; it
//! never drives a hypervisor. Host agents converge reality and report
//! status back.

pub mod access;
pub mod api;
pub mod audit;
pub mod billing;
pub mod cluster;
pub mod console;
mod containers;
pub mod dns;
pub mod election;
pub mod error;
pub mod events;
pub mod firewall;
pub mod groups;
pub mod guest_config;
pub mod ha;
pub mod image_sync;
pub mod images;
mod inflight;
pub mod instances;
pub mod inventory;
pub mod ipam;
pub mod keypairs;
pub mod layout;
pub mod lbs;
pub mod metrics;
pub mod migrations;
pub mod networks;
pub mod protection;
mod queued;
pub mod replicas;
pub mod scheduler;
pub mod snapshots;
pub mod tenancy;
pub mod top;
pub mod volumes;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use skyvisor_core::{Ipv4Net, Network, keys};
use skyvisor_store::{Store, StoreError, StoreExt};
use tokio::sync::Mutex;

pub use cluster::{ClusterError, ClusterSettings, ClusterView, Membership};
pub use error::{ApiError, ApiResult};
pub use inventory::Inventory;
pub use scheduler::Weigher;

/// The name of the network every VM joins today.
pub const DEFAULT_NETWORK: &str = "default";

/// How the control plane is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the server keeps images.
    pub data_dir: PathBuf,
    /// Where image builds cache downloaded packages and finished builds.
    pub cache_dir: PathBuf,
    /// The guest service binary baked into built images; found next to the
    /// running executable when not set.
    pub guest_binary: Option<PathBuf>,
    /// The subnet of the default network (used when it is first created).
    pub subnet: Ipv4Net,
    /// VXLAN id of the default network.
    pub vni: u32,
    /// MTU of the default network.
    pub mtu: u32,
    /// The first VXLAN id of projects' private networks (a cluster's ids
    /// must not meet another cluster's on a shared underlay).
    pub private_vni_base: u32,
    /// How long the audit trail keeps a record.
    pub audit_retention: Duration,
    /// How long the event record keeps an event.
    pub event_retention: Duration,
    /// How placement orders hosts.
    pub weigher: Weigher,
    /// This server's identity and part in a cluster.
    pub cluster: ClusterSettings,
    /// The most bytes an image import may upload (all its parts).
    pub max_upload_bytes: u64,
    /// Where the bootstrap admin's token is (written at first start when
    /// missing); none: no bootstrap token, only the built-in project and
    /// identity.
    pub bootstrap_token_file: Option<PathBuf>,
}

/// Default of [`ServerConfig::max_upload_bytes`]: 64 GiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 64 << 30;

/// The control plane's shared state; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Cached view of hosts and instances.
    pub inventory: Arc<Inventory>,
    /// Configuration.
    pub config: Arc<ServerConfig>,
    /// Serializes placement decisions so two creates never take the same room.
    pub(crate) placement: Arc<Mutex<()>>,
    /// Placements decided and not yet committed.
    pub(crate) inflight: inflight::InFlight,
    /// Request metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// HTTP client for talking to agents.
    pub(crate) http: reqwest::Client,
    /// The membership as the API shows it, once joined.
    pub(crate) cluster: Arc<OnceLock<ClusterView>>,
    /// One image copy from a peer at a time.
    pub(crate) image_sync_lock: Arc<Mutex<()>>,
    /// Projects, identities and tokens.
    pub directory: Arc<skyvisor_auth::Directory>,
    /// This server's own API token, for calling its peers.
    pub(crate) service_token: Arc<String>,
    /// The audit trail's writer.
    pub(crate) audit: audit::AuditLog,
    /// The writer of events that go with no transaction of their own.
    pub(crate) events: events::EventLog,
}

/// How long a writer waits for the inventory to show its own write.
pub(crate) const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

impl ControlPlane {
    /// Starts the control plane on `store`: creates the default network if
    /// missing and starts following the store.
    pub async fn start(store: Arc<dyn Store>, config: ServerConfig) -> Result<Self, StoreError> {
        let metrics = Arc::new(metrics::Metrics::new());
        // Every store call of the server is timed for /metrics.
        let store: Arc<dyn Store> = Arc::new(skyvisor_store::ObservedStore::new(
            store,
            metrics::store_observer(metrics.store_op_seconds.clone()),
        ));
        let network = Network {
            name: DEFAULT_NETWORK.to_string(),
            project: skyvisor_core::auth::default_project(),
            subnet: config.subnet,
            vni: config.vni,
            mtu: config.mtu,
        };
        let directory = Arc::new(skyvisor_auth::Directory::new(store.clone()));
        skyvisor_auth::bootstrap::ensure(&directory, config.bootstrap_token_file.as_deref())
            .await
            .map_err(skyvisor_auth::AuthError::into_store_error)?;
        let service_token = skyvisor_auth::bootstrap::service_token(
            &directory,
            "skyvisor-servers",
            &format!("server {}", config.cluster.name),
        )
        .await
        .map_err(skyvisor_auth::AuthError::into_store_error)?;
        tokio::spawn(directory.follow());
        let store_for_audit = store.clone();
        // Records of an older key layout move first: everything below reads today's.
        layout::upgrade(store.as_ref()).await?;
        layout::move_image_dirs(store.as_ref(), &config.data_dir.join("images")).await?;
        let inventory = Inventory::start(store.clone()).await?;
        // Agents admit only callers with the cluster's key.
        let cluster_key = skyvisor_auth::cluster_key(store.as_ref())
            .await
            .map_err(skyvisor_auth::AuthError::into_store_error)?;
        let mut internal = reqwest::header::HeaderMap::new();
        if let Ok(v) = reqwest::header::HeaderValue::from_str(&cluster_key.header()) {
            internal.insert(reqwest::header::AUTHORIZATION, v);
        }
        let mut http = reqwest::Client::builder();
        // Every cluster has a CA, made by its first server (or agent):
        // agents, and servers that serve TLS, carry certificates of it.
        let ca = skyvisor_auth::pki::ClusterCa::load_or_create(store.as_ref())
            .await
            .map_err(skyvisor_auth::AuthError::into_store_error)?;
        if let Ok(cert) = reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()) {
            http = http.add_root_certificate(cert);
        }
        // Agents admit only members presenting a certificate of the CA.
        let member = ca
            .issue_member(&["skyvisor-server".to_string()])
            .map_err(skyvisor_auth::AuthError::into_store_error)?;
        if let Ok(id) = reqwest::Identity::from_pem(
            format!("{}{}", member.key_pem, member.chain_pem).as_bytes(),
        ) {
            http = http.identity(id);
        }
        let http = http
            .default_headers(internal)
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("http client: {e}")))?;
        let cp = Self {
            store,
            inventory,
            config: Arc::new(config),
            placement: Arc::new(Mutex::new(())),
            inflight: inflight::InFlight::default(),
            metrics,
            http,
            cluster: Arc::new(OnceLock::new()),
            image_sync_lock: Arc::new(Mutex::new(())),
            directory,
            service_token: Arc::new(service_token),
            events: events::EventLog::start(store_for_audit.clone()),
            audit: audit::AuditLog::start(store_for_audit),
        };
        cp.ensure_cluster_network(&network)
            .await
            .map_err(|e| StoreError::Unavailable(e.message))?;
        Ok(cp)
    }

    /// Joins the cluster (version check, registration, election, leader-only
    /// work) and starts replicating images from the other servers. The
    /// caller owns the membership; [`Membership::leave`] hands leadership
    /// over at once on a clean stop.
    pub async fn join_cluster(&self) -> Result<Membership, ClusterError> {
        let membership = Membership::join(
            self.store.clone(),
            self.inventory.clone(),
            &self.config.cluster,
        )
        .await?;
        let _ = self.cluster.set(membership.view());
        // Whatever this server was building before it restarted is no
        // longer being built: resume or fail it now.
        if let Err(e) = self.recover_interrupted_builds(true).await {
            tracing::warn!(error = %e.message, "cannot check for interrupted image builds");
        }
        tokio::spawn(image_sync::run(self.clone()));
        tokio::spawn(migrations::run(self.clone()));
        tokio::spawn(ha::run(self.clone()));
        tokio::spawn(groups::controller::run(self.clone()));
        tokio::spawn(lbs::run(self.clone()));
        tokio::spawn(dns::run(self.clone()));
        tokio::spawn(groups::autoscale::run(self.clone()));
        tokio::spawn(firewall::run(self.clone()));
        tokio::spawn(audit::run_retention(self.clone()));
        tokio::spawn(events::run_retention(self.clone()));
        tokio::spawn(replicas::run(
            self.clone(),
            self.config.cluster.replica_grace,
        ));
        Ok(membership)
    }

    /// The membership, once joined.
    pub fn cluster_view(&self) -> Option<&ClusterView> {
        self.cluster.get()
    }

    /// Whether leader-only controllers may act now: this server leads and
    /// the store answers.
    pub(crate) fn leads_now(&self) -> bool {
        self.cluster_view()
            .is_some_and(|v| v.leadership.borrow().is_leader)
            && self.store_unavailable().is_none()
    }

    /// Why the store cannot be relied on now, if it cannot: its last probe
    /// failed, or the inventory lost its watch and has not relisted yet.
    pub fn store_unavailable(&self) -> Option<String> {
        if let Some(view) = self.cluster.get() {
            let health = view.health.borrow();
            if !health.ok {
                return Some(health.error.clone().unwrap_or_else(|| "no answer".into()));
            }
        }
        if !self.inventory.connected() {
            let endpoints = &self.config.cluster.etcd_endpoints;
            let at = if endpoints.is_empty() {
                String::new()
            } else {
                format!(" at {}", endpoints.join(","))
            };
            return Some(format!(
                "lost the watch on the {} store{at}; reconnecting",
                self.store.backend()
            ));
        }
        None
    }

    /// The default network as stored.
    pub async fn default_network(&self) -> ApiResult<Network> {
        match self
            .store
            .get_json::<Network>(&keys::cluster_network())
            .await?
        {
            Some((n, _)) => Ok(n),
            None => Err(ApiError::internal(
                "the default network is missing from the store",
            )),
        }
    }

    /// The directory holding image `image`'s files:
    /// `<data>/images/<project>/<name>`.
    pub fn image_dir(&self, image: &skyvisor_core::ImageRef) -> PathBuf {
        self.config
            .data_dir
            .join("images")
            .join(image.project.as_str())
            .join(image.name.as_str())
    }
}
