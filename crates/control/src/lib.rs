//! Skyvisor's control plane: the REST API, placement, the image service and
//! the controllers.
//!
//! The API validates a request and writes desired state to the store; it
//! never drives a hypervisor. Host agents converge reality and report
//! status back.

pub mod api;
pub mod error;
pub mod images;
pub mod instances;
pub mod inventory;
pub mod ipam;
pub mod metrics;
pub mod scheduler;
pub mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skyvisor_core::{Ipv4Net, Network, keys};
use skyvisor_store::{Store, StoreError, StoreExt, encode};
use tokio::sync::Mutex;

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
    /// How placement orders hosts.
    pub weigher: Weigher,
}

/// The control plane's shared state; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Cached view of hosts and instances.
    pub inventory: Arc<Inventory>,
    /// Configuration.
    pub config: Arc<ServerConfig>,
    /// Serializes placement so two creates never take the same room.
    pub(crate) placement: Arc<Mutex<()>>,
    /// Request metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// HTTP client for talking to agents.
    pub(crate) http: reqwest::Client,
}

/// How long a writer waits for the inventory to show its own write.
pub(crate) const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

impl ControlPlane {
    /// Starts the control plane on `store`: creates the default network if
    /// missing and starts following the store.
    pub async fn start(store: Arc<dyn Store>, config: ServerConfig) -> Result<Self, StoreError> {
        let network = Network {
            name: DEFAULT_NETWORK.to_string(),
            subnet: config.subnet,
            vni: config.vni,
            mtu: config.mtu,
        };
        // First writer wins; later servers adopt what is there.
        store
            .create(&keys::network(DEFAULT_NETWORK), encode(&network))
            .await?;
        let inventory = Inventory::start(store.clone()).await?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("http client: {e}")))?;
        Ok(Self {
            store,
            inventory,
            config: Arc::new(config),
            placement: Arc::new(Mutex::new(())),
            metrics: Arc::new(metrics::Metrics::new()),
            http,
        })
    }

    /// The default network as stored.
    pub async fn default_network(&self) -> ApiResult<Network> {
        match self
            .store
            .get_json::<Network>(&keys::network(DEFAULT_NETWORK))
            .await?
        {
            Some((n, _)) => Ok(n),
            None => Err(ApiError::internal(
                "the default network is missing from the store",
            )),
        }
    }

    /// The directory holding image `name`'s files.
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.config.data_dir.join("images").join(name)
    }
}
