//! The host agent: one per host. It registers the host and holds its lease,
//! sets up the host's VM network, and runs one supervisor task per VM bound
//! to the host, converging each to its spec and reporting status.
//!
//! VMs outlive the agent: stopping or crashing the agent leaves them
//! running, and the next agent re-attaches to them.

pub mod checkpoints;
pub mod cluster;
pub mod console;
pub mod containers;
pub mod credentials;
pub mod disks;
pub mod dns;
pub mod egress;
pub mod fake_hv;
pub mod fencing;
pub mod firewall;
mod guest_report;
mod health;
pub mod host;
pub mod http;
pub mod hypervisor;
pub mod images;
mod launch;
pub mod lb;
pub mod metadata;
pub mod metrics;
pub mod migration;
pub mod private_nets;
pub mod qemu_hv;
pub mod supervisor;
pub mod tunnel;
pub mod volumes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use skyvisor_core::{
    Accel, Capacity, Host, HostName, InstanceId, InstanceRef, InstanceSpec, Network, Overcommit,
    keys,
};
use skyvisor_net::{BridgeConfig, HostNetwork};
use skyvisor_store::{
    Compare, LeaseId, Op, Store, StoreError, StoreExt, WatchEvent, decode, encode,
};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::hypervisor::Hypervisor;
use crate::images::ImageCache;
use crate::supervisor::Supervisor;
use crate::volumes::{VolumeService, VolumeServiceConfig};

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's name in the pool.
    pub host: HostName,
    /// Where VM disks, sockets and logs live.
    pub data_dir: PathBuf,
    /// The address other hosts reach this one at.
    pub address: String,
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// The bridge VMs attach to.
    pub bridge: String,
    /// Masquerade VM traffic to the outside.
    pub nat: bool,
    /// Overcommit ratios.
    pub overcommit: Overcommit,
    /// Memory kept for the host itself.
    pub reserved_memory_mib: u64,
    /// Where the agent's HTTP service listens (port 0: any).
    pub listen: SocketAddr,
    /// Lease time-to-live: the host is declared dead this long after its
    /// agent stops renewing.
    pub lease_ttl: Duration,
    /// Check that guests' web services answer after boot.
    pub probe_guests: bool,
    /// Join the cluster's VXLAN overlay (hosts of a cluster); none for a
    /// single host.
    pub overlay: Option<cluster::OverlaySettings>,
    /// Where this host's volume replica server listens; `None`: the host
    /// holds no replicas and serves no volumes.
    pub replica_listen: Option<SocketAddr>,
    /// Self-fencing of HA-protected VMs (hosts of a cluster); none for a
    /// single host, where nothing fails over.
    pub fencing: Option<FencingConfig>,
    /// Turn on the default guest's test hooks (power, `/fetch`, raw `/blk`
    /// on its public port) in the VMs this host starts: for test beds and
    /// benchmarks, never for tenants.
    pub guest_test_hooks: bool,
    /// Run containers with this runtime, if the host can; none: this
    /// host runs VMs only.
    pub containers: Option<containers::ContainerSettings>,
}

/// An HTTP client for calls to other parts of the cluster: each request
/// carries the cluster's key.
pub fn internal_client(
    key: &skyvisor_auth::ClusterKey,
    ca_pem: Option<&str>,
    identity_pem: Option<&str>,
) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&key.header()) {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let b = reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy();
    credentials::cluster_client(b, ca_pem, identity_pem)
        .build()
        .unwrap_or_default()
}

/// What went wrong starting an agent.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another live agent uses this host name.
    #[error(
        "host name {0:?} is already used by a live agent; choose another name or stop that agent"
    )]
    NameTaken(String),
    /// The host's network could not be set up.
    #[error("setting up the VM network: {0}")]
    Network(String),
    /// The HTTP service could not listen.
    #[error("agent HTTP service cannot listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// No network is defined in the store.
    #[error("no network is defined in the store; start a server first")]
    NoNetwork,
    /// The cluster runs another version.
    #[error(
        "this agent is version {agent} but the cluster runs version {cluster}; install skyvisor {cluster} on this host"
    )]
    VersionMismatch {
        /// The agent's version.
        agent: String,
        /// The cluster's.
        cluster: String,
    },
    /// The volume service could not start.
    #[error("starting the volume service: {0}")]
    Volumes(#[from] volumes::VolumeServiceError),
}

/// How a host fences itself.
#[derive(Debug, Clone)]
pub struct FencingConfig {
    /// The watchdog process to run beside the agent (program and
    /// arguments); none: the agent alone fences (tests with in-process
    /// agents).
    pub watchdog: Option<(PathBuf, Vec<String>)>,
}

/// What every supervisor shares.
pub struct AgentContext {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The cluster's internal key (its agent API admits only callers that
    /// present it; its own calls to peers carry it).
    pub cluster_key: skyvisor_auth::ClusterKey,
    /// Whether VMs get the default guest's test hooks.
    pub guest_test_hooks: bool,
    /// The container driver, if this host runs containers.
    pub containers: Option<Arc<containers::ContainerDriver>>,
    /// Why this host runs no containers, if it does not.
    pub containers_unavailable: Option<String>,
    /// The hypervisor.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The host network.
    pub network: Arc<dyn HostNetwork>,
    /// Image files.
    pub images: ImageCache,
    /// This host.
    pub host: HostName,
    /// The accelerator VMs run with.
    pub accel: Accel,
    /// The cluster network's bridge.
    pub bridge: String,
    /// The private networks this host carries.
    pub private_nets: Arc<private_nets::PrivateNets>,
    /// The instance firewall.
    pub firewall: firewall::Firewall,
    /// This host's part of the load balancers' datapath.
    pub load_balancers: lb::LoadBalancers,
    /// The internal zone's records and upstream resolvers, for every
    /// network's DNS server.
    pub dns: Arc<dns::DnsService>,
    /// The instance metadata service.
    pub metadata: Arc<metadata::MetadataService>,
    /// The host's and its VMs' metrics.
    pub metrics: Arc<metrics::AgentMetrics>,
    /// MTU for guests.
    pub mtu: u32,
    /// Probe guest services after boot.
    pub probe_guests: bool,
    /// HTTP client for guest probes.
    pub http: reqwest::Client,
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// Where snapshot requests reach each VM's supervisor, by instance id.
    pub checkpoint_inboxes: std::sync::Mutex<
        HashMap<InstanceId, tokio::sync::mpsc::UnboundedSender<skyvisor_core::Snapshot>>,
    >,
    /// Replicated volumes on this host, if it serves them.
    pub volumes: Option<Arc<VolumeService>>,
    /// The address other hosts reach this one at (migration streams).
    pub address: String,
    /// Mutual TLS with other members, for the tunnels of migration
    /// streams; `None` sends them in the clear.
    pub member_tls: Option<skyvisor_volume::link_tls::LinkTls>,
    /// VMs prepared here as live migrations' destinations.
    pub incoming: migration::IncomingVms,
    /// VMs leaving this host by live migration right now (their source
    /// copy is not gone yet).
    pub outgoing: migration::OutgoingVms,
    /// Self-fencing, in a cluster.
    pub fence: Option<Arc<fencing::Fence>>,
    /// Network egress metering.
    pub egress: egress::Egress,
}

impl AgentContext {
    /// Removes instance `spec`'s tap here, reporting what the VM sent
    /// through it first (its last network egress).
    pub async fn remove_tap(&self, spec: &InstanceSpec) {
        let tap = skyvisor_net::tap_name(&spec.id);
        self.egress
            .final_report(
                self.store.as_ref(),
                &self.host,
                &spec.instance_ref(),
                spec.id,
                &tap,
                async {
                    if let Err(e) = self.network.delete_tap(&tap).await {
                        tracing::warn!(instance = %spec.name, error = %e, "could not delete a tap");
                    }
                },
            )
            .await;
    }

    /// Guards instance `spec`'s tap `tap` (on `bridge`) before its VM
    /// sends a frame, then serves it metadata: the service knows a caller
    /// by its source address only because the guard pins it to the tap.
    pub async fn attach_tap(
        &self,
        tap: &str,
        spec: &InstanceSpec,
        bridge: &str,
    ) -> Result<(), skyvisor_net::NetError> {
        self.firewall.add_tap(tap, spec, &self.private_nets).await?;
        self.metadata.attach(tap, spec, bridge).await;
        Ok(())
    }

    /// The directory of a VM's disk, sockets and logs.
    pub fn vm_dir(&self, id: &InstanceId) -> PathBuf {
        self.data_dir.join("vms").join(id.0.simple().to_string())
    }
}

/// A running agent. Dropping it (or [`AgentHandle::shutdown`]) stops the
/// agent but leaves its VMs running.
pub struct AgentHandle {
    /// Where the agent's HTTP service listens.
    pub url: String,
    /// The shared context.
    pub ctx: Arc<AgentContext>,
    tasks: Vec<JoinHandle<()>>,
    lease: Arc<std::sync::Mutex<LeaseId>>,
}

impl AgentHandle {
    /// Stops the agent, releasing its lease; VMs keep running.
    pub async fn shutdown(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(v) = &self.ctx.volumes {
            v.shutdown().await;
        }
        // A fencing host keeps its lease: its protected VMs run on, and the
        // next agent takes the lease up (or the host is fenced and failed
        // over if none comes in time).
        if self.ctx.fence.is_none() {
            let lease = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self.ctx.store.revoke_lease(lease).await;
        }
    }

    /// Stops the agent as if its host died: tasks and servers end, the
    /// lease is left to expire. For tests of host failure.
    pub async fn crash(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(v) = &self.ctx.volumes {
            v.shutdown().await;
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts an agent: liveness (refusing a name a live agent holds, before
/// touching anything), network, HTTP service, registration, supervisors.
pub async fn start(
    cfg: AgentConfig,
    store: Arc<dyn Store>,
    hypervisor: Arc<dyn Hypervisor>,
    network: Arc<dyn HostNetwork>,
    images: ImageCache,
    accel: (Accel, String),
) -> Result<AgentHandle, AgentError> {
    cluster::check_version(store.as_ref()).await?;
    let net = wait_for_network(store.as_ref()).await?;
    let adopted = match &cfg.fencing {
        Some(_) => adopt_lease(store.as_ref(), &cfg.host, &cfg.data_dir).await,
        None => None,
    };
    let lease = match adopted {
        Some(l) => l,
        None => take_liveness(store.as_ref(), &cfg.host, cfg.lease_ttl).await?,
    };
    match bring_up(
        cfg,
        store.clone(),
        hypervisor,
        network,
        images,
        accel,
        net,
        lease,
    )
    .await
    {
        Ok(handle) => Ok(handle),
        Err(e) => {
            let _ = store.revoke_lease(lease).await;
            Err(e)
        }
    }
}

/// Aborts the tasks it holds when dropped, unless taken out.
struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn bring_up(
    cfg: AgentConfig,
    store: Arc<dyn Store>,
    hypervisor: Arc<dyn Hypervisor>,
    network: Arc<dyn HostNetwork>,
    images: ImageCache,
    accel: (Accel, String),
    net: Network,
    lease: LeaseId,
) -> Result<AgentHandle, AgentError> {
    let host_address = match &cfg.overlay {
        Some(_) => Some(cluster::claim_host_address(store.as_ref(), &cfg.host, &net).await?),
        None => None,
    };
    network
        .ensure_bridge(&BridgeConfig {
            name: cfg.bridge.clone(),
            subnet: net.subnet,
            nat: cfg.nat,
            host_address,
        })
        .await
        .map_err(|e| AgentError::Network(e.to_string()))?;
    tokio::fs::create_dir_all(cfg.data_dir.join("vms"))
        .await
        .map_err(|e| AgentError::Network(format!("creating {}: {e}", cfg.data_dir.display())))?;
    // Everything this agent serves to, or asks of, other parts of the
    // cluster carries the cluster's key.
    let cluster_key = skyvisor_auth::cluster_key(store.as_ref())
        .await
        .map_err(|e| AgentError::Store(e.into_store_error()))?;
    skyvisor_volume::link_key::set_process_key(skyvisor_volume::link_key::LinkKey::new(
        cluster_key.bytes(),
    ));
    images.set_peer_auth(cluster_key.header());
    // The agent's certificate of the cluster's CA: its API is served over
    // TLS, replica links and migration streams are mutual TLS, and it
    // trusts the CA in its calls to servers and other agents.
    let mut names = vec![cfg.address.clone()];
    if !cfg.listen.ip().is_unspecified() {
        names.push(cfg.listen.ip().to_string());
    }
    names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
    let credentials = credentials::Credentials::establish(store.as_ref(), &names).await?;
    images.trust_cluster(&credentials.ca.cert_pem, &credentials.identity_pem());
    let volumes = match cfg.replica_listen {
        Some(listen) => Some(
            VolumeService::start(
                VolumeServiceConfig {
                    host: cfg.host.clone(),
                    data_dir: cfg.data_dir.clone(),
                    replica_listen: listen,
                    advertise_host: cfg.address.clone(),
                    device: skyvisor_volume::DeviceOptions::default(),
                },
                store.clone(),
            )
            .await?,
        ),
        None => None,
    };

    let private_nets = Arc::new(private_nets::PrivateNets::new(
        network.clone(),
        cfg.overlay.clone(),
        cfg.bridge.clone(),
    ));
    let firewall = firewall::Firewall::new(network.clone());
    let dns = dns::DnsService::new();
    let metadata = metadata::MetadataService::new(network.clone(), dns.clone());
    // Containers where the runtime and the kernel allow; VMs either way.
    let (container_driver, containers_unavailable) = match &cfg.containers {
        Some(settings) => match containers::ContainerDriver::probe(settings, &cfg.data_dir).await {
            Ok(d) => {
                info!(runtime = %d.description(), "this host runs containers");
                (Some(Arc::new(d)), None)
            }
            Err(why) => {
                warn!(reason = %why, "this host runs no containers");
                (None, Some(why))
            }
        },
        None => (
            None,
            Some("its agent runs without a container runtime".to_string()),
        ),
    };
    let physical = host::physical_resources(&cfg.data_dir, cfg.reserved_memory_mib);
    let capacity = Capacity::new(physical, cfg.overcommit);
    let metrics = Arc::new(metrics::AgentMetrics::new(
        cfg.host.as_str(),
        cfg.data_dir.clone(),
        capacity.allocatable.vcpus,
        capacity.allocatable.memory_mib * 1024 * 1024,
    ));
    if let Some(v) = &volumes {
        metrics.set_volumes(v);
    }
    // From here on every store call of the agent is timed for /metrics.
    let store: Arc<dyn Store> = Arc::new(skyvisor_store::ObservedStore::new(
        store,
        metrics.store_observer(),
    ));
    let ctx = Arc::new(AgentContext {
        store: store.clone(),
        hypervisor,
        network,
        images,
        host: cfg.host.clone(),
        accel: accel.0,
        bridge: cfg.bridge.clone(),
        private_nets: private_nets.clone(),
        firewall,
        load_balancers: lb::LoadBalancers::default(),
        dns,
        metadata,
        metrics: metrics.clone(),
        mtu: net.mtu,
        probe_guests: cfg.probe_guests,
        http: internal_client(
            &cluster_key,
            Some(&credentials.ca.cert_pem),
            Some(&credentials.identity_pem()),
        ),
        member_tls: Some(credentials.links.clone()),
        cluster_key: cluster_key.clone(),
        guest_test_hooks: cfg.guest_test_hooks,
        containers: container_driver.clone(),
        containers_unavailable: containers_unavailable.clone(),
        data_dir: cfg.data_dir.clone(),
        checkpoint_inboxes: std::sync::Mutex::new(HashMap::new()),
        volumes: volumes.clone(),
        address: cfg.address.clone(),
        incoming: tokio::sync::Mutex::new(HashMap::new()),
        outgoing: migration::OutgoingVms::default(),
        fence: cfg
            .fencing
            .as_ref()
            .map(|_| Arc::new(fencing::Fence::new(cfg.lease_ttl))),
        egress: egress::Egress::default(),
    });

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| AgentError::Listen {
            addr: cfg.listen,
            message: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| AgentError::Listen {
        addr: cfg.listen,
        message: e.to_string(),
    })?;
    let tls = credentials.api_tls()?;
    let url = format!("https://{local}");
    let mut guard = TaskGuard(Vec::new());
    let mut router = http::router(ctx.clone()).merge(migration::router(ctx.clone()));
    if let Some(v) = &volumes {
        let vms = ctx.clone();
        router = router.merge(volumes::http::router(
            v.clone(),
            Arc::new(move |id| vms.vm_dir(id)),
        ));
    }
    // Metrics are for Prometheus, with an API token: outside the
    // members-only layer.
    let router = http::members_only(router, cluster_key.clone()).merge(metrics::router(
        metrics,
        Arc::new(skyvisor_auth::Directory::new(store.clone())),
    ));
    guard.0.push(tokio::spawn(async move {
        if let Err(e) = skyvisor_auth::tls::serve_members(listener, tls, router).await {
            error!(error = %e, "agent HTTP service failed");
        }
    }));

    let registration = Host {
        name: cfg.host.clone(),
        address: cfg.address.clone(),
        capacity,
        accel: accel.0,
        accel_reason: accel.1.clone(),
        qemu_version: skyvisor_qemu::qemu_version(&cfg.qemu_binary)
            .await
            .unwrap_or_else(|e| format!("unknown ({e})")),
        agent_version: skyvisor_core::VERSION.to_string(),
        subnet: net.subnet,
        bridge_address: host_address,
        agent_url: Some(url.clone()),
        disk_free_bytes: host::disk_space(&cfg.data_dir).1,
        replica_addr: volumes.as_ref().map(|v| v.replica_addr().to_owned()),
        started_at: Utc::now(),
        container_runtime: container_driver
            .as_ref()
            .map(|d| d.description().to_string()),
        containers_unavailable,
    };
    store
        .put(&keys::host(&cfg.host), encode(&registration))
        .await?;
    info!(host = %cfg.host, accel = %accel.0, reason = %accel.1, %url, "agent registered");

    guard.0.push(tokio::spawn(metrics::history::run(
        ctx.metrics.clone(),
        std::time::Duration::from_secs(skyvisor_core::top::HISTORY_STEP_SECONDS),
    )));
    let lease = Arc::new(std::sync::Mutex::new(lease));
    if let Some(f) = &ctx.fence {
        ctx.metrics.set_fence(f.clone());
    }
    guard.0.push(tokio::spawn(keep_lease(
        store.clone(),
        lease.clone(),
        cfg.lease_ttl,
        cfg.host.clone(),
        ctx.fence.clone(),
        ctx.metrics.clone(),
        cfg.fencing.is_some().then(|| cfg.data_dir.join(LEASE_FILE)),
    )));
    if let (Some(fence), Some(fencing)) = (&ctx.fence, &cfg.fencing) {
        if let Some((exe, args)) = &fencing.watchdog
            && let Err(e) = fencing::ensure_watchdog(exe, args, &cfg.data_dir)
        {
            return Err(AgentError::Network(format!(
                "cannot start the fence watchdog {}: {e}",
                exe.display()
            )));
        }
        guard.0.push(tokio::spawn(fencing::run(
            fence.clone(),
            store.clone(),
            cfg.host.clone(),
            cfg.data_dir.clone(),
            lease.clone(),
            ctx.http.clone(),
        )));
    }
    if let Some(overlay) = &cfg.overlay {
        guard.0.push(tokio::spawn(cluster::follow_peers(
            store.clone(),
            ctx.network.clone(),
            cfg.bridge.clone(),
            cfg.host.clone(),
            overlay.clone(),
            net.clone(),
            private_nets.clone(),
        )));
    }
    guard
        .0
        .push(tokio::spawn(cluster::follow_image_sources(ctx.clone())));
    guard.0.push(tokio::spawn(refresh_disk(
        store.clone(),
        registration,
        cfg.data_dir.clone(),
    )));
    guard
        .0
        .push(tokio::spawn(migration::sweep_orphans(ctx.clone())));
    guard.0.push(tokio::spawn(dispatch(ctx.clone())));
    guard.0.push(tokio::spawn(firewall::follow(ctx.clone())));
    guard.0.push(tokio::spawn(lb::follow(ctx.clone())));
    guard.0.push(tokio::spawn(dns::follow(
        ctx.store.clone(),
        ctx.dns.clone(),
    )));
    guard.0.push(tokio::spawn(checkpoints::follow(ctx.clone())));
    guard.0.push(tokio::spawn(egress::run(ctx.clone())));
    if let Some(v) = volumes {
        guard.0.push(tokio::spawn(volumes::controller::run(v)));
    }
    let tasks = std::mem::take(&mut guard.0);
    Ok(AgentHandle {
        url,
        ctx,
        tasks,
        lease,
    })
}

async fn wait_for_network(store: &dyn Store) -> Result<Network, AgentError> {
    let key = keys::cluster_network();
    for _ in 0..100 {
        if let Some((n, _)) = store.get_json::<Network>(&key).await? {
            return Ok(n);
        }
        // Servers of the previous release keep it at its old key.
        if let Some((n, _)) = store
            .get_json::<Network>(keys::LEGACY_CLUSTER_NETWORK)
            .await?
        {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(AgentError::NoNetwork)
}

/// Takes the host's liveness key under a new lease; fails if a live agent
/// holds the name.
async fn take_liveness(
    store: &dyn Store,
    host: &HostName,
    ttl: Duration,
) -> Result<LeaseId, AgentError> {
    let lease = store.grant_lease(ttl).await?;
    let alive_key = keys::host_alive(host);
    let taken = store
        .txn(
            vec![Compare::Absent(alive_key.clone())],
            vec![Op::Put {
                key: alive_key,
                value: encode(&Utc::now()),
                lease: Some(lease),
            }],
        )
        .await;
    match taken {
        Ok(t) if t.succeeded => Ok(lease),
        Ok(_) => {
            let _ = store.revoke_lease(lease).await;
            Err(AgentError::NameTaken(host.to_string()))
        }
        Err(e) => {
            let _ = store.revoke_lease(lease).await;
            Err(e.into())
        }
    }
}

/// Renews the lease at a third of its TTL. When the store expired it (it
/// could not be reached for longer than the TTL), takes a new one, so the
/// host is live again as soon as the store is back.
async fn keep_lease(
    store: Arc<dyn Store>,
    lease: Arc<std::sync::Mutex<LeaseId>>,
    ttl: Duration,
    host: HostName,
    fence: Option<Arc<fencing::Fence>>,
    metrics: Arc<metrics::AgentMetrics>,
    lease_file: Option<PathBuf>,
) {
    if let Some(f) = &lease_file {
        let current = *lease.lock().unwrap_or_else(|e| e.into_inner());
        remember_lease(f, current).await;
    }
    loop {
        tokio::time::sleep(ttl / 3).await;
        let current = *lease.lock().unwrap_or_else(|e| e.into_inner());
        // The lease runs at least a TTL from when the renewal was sent.
        let sent = std::time::Instant::now();
        // A renewal that hangs must not hold up the next one.
        let renewed = tokio::time::timeout(ttl / 3, store.keep_alive(current)).await;
        match renewed {
            Ok(Ok(())) => {
                metrics.lease_renewal("ok");
                if let Some(f) = &fence {
                    f.renewed(sent);
                }
            }
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                metrics.lease_renewal("expired");
                warn!(%host, "the host lease expired; taking a new one");
                match take_liveness(store.as_ref(), &host, ttl).await {
                    Ok(new) => {
                        *lease.lock().unwrap_or_else(|e| e.into_inner()) = new;
                        if let Some(f) = &lease_file {
                            remember_lease(f, new).await;
                        }
                        if let Some(f) = &fence {
                            f.renewed(sent);
                        }
                        info!(%host, "the host is live again");
                    }
                    Err(e) => error!(%host, error = %e, "cannot take a new host lease"),
                }
            }
            // The fencing module decides what this means for the VMs.
            Ok(Err(e)) => {
                metrics.lease_renewal("failed");
                error!(error = %e, "could not renew the host lease");
            }
            Err(_) => {
                metrics.lease_renewal("failed");
                error!("renewing the host lease timed out");
            }
        }
    }
}

/// Where a fencing agent keeps its lease id, so a restarted agent takes
/// the same lease up instead of waiting for it to expire (which would
/// fence its VMs).
const LEASE_FILE: &str = "host-lease";

async fn remember_lease(file: &std::path::Path, lease: LeaseId) {
    if let Err(e) = tokio::fs::write(file, lease.0.to_string()).await {
        warn!(error = %e, "cannot record the host lease id");
    }
}

/// The lease an earlier agent of this host held, if it is still alive and
/// still holds the host's liveness key: the new agent renews it at once.
async fn adopt_lease(
    store: &dyn Store,
    host: &HostName,
    data_dir: &std::path::Path,
) -> Option<LeaseId> {
    let text = tokio::fs::read_to_string(data_dir.join(LEASE_FILE))
        .await
        .ok()?;
    let lease = LeaseId(text.trim().parse().ok()?);
    let kv = store.get(&keys::host_alive(host)).await.ok()??;
    if kv.lease != Some(lease) {
        return None;
    }
    store.keep_alive(lease).await.ok()?;
    info!(%host, "took up the lease of the previous agent of this host");
    Some(lease)
}

/// Keeps the registration's free-disk figure current for placement.
async fn refresh_disk(store: Arc<dyn Store>, mut reg: Host, data_dir: PathBuf) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let free = host::disk_space(&data_dir).1;
        // Only write when it moved by more than 16 MiB.
        if free.abs_diff(reg.disk_free_bytes) > 16 << 20 {
            reg.disk_free_bytes = free;
            if let Err(e) = store.put(&keys::host(&reg.name), encode(&reg)).await {
                debug!(error = %e, "could not refresh free disk");
            }
        }
    }
}

struct Supervised {
    id: InstanceId,
    spec: watch::Sender<InstanceSpec>,
    task: JoinHandle<()>,
}

/// The write that records `event`, to put in the transaction of the
/// change it records.
pub(crate) fn event_op(event: &skyvisor_core::Event) -> Op {
    Op::Put {
        key: keys::event(event),
        value: skyvisor_store::encode(event),
        lease: None,
    }
}

/// The writes that store `spec`: the spec and its copy under its host.
pub(crate) fn spec_ops(spec: &InstanceSpec) -> Vec<Op> {
    vec![
        skyvisor_store::put_json(keys::instance_spec(&spec.instance_ref()), spec),
        skyvisor_store::put_json(keys::binding(&spec.host, &spec.instance_ref()), spec),
    ]
}

/// Follows the instance specs bound to this host and keeps one supervisor
/// per instance fed with its latest spec.
async fn dispatch(ctx: Arc<AgentContext>) {
    let mut running: HashMap<InstanceRef, Supervised> = HashMap::new();
    loop {
        // Only this host's copies of the specs: an agent follows its own
        // instances, not the whole cluster's.
        let prefix = keys::bindings_of(&ctx.host);
        let listing = match ctx.store.list(&prefix).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot list instances; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut seen = Vec::new();
        for kv in &listing.items {
            if let Ok(spec) = decode::<InstanceSpec>(kv) {
                seen.push(spec.instance_ref());
                offer(&ctx, &mut running, spec);
            }
        }
        running.retain(|name, s| seen.contains(name) || !s.task.is_finished());
        let mut stream = match ctx.store.watch(&prefix, listing.revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot watch instances; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Put(kv)) => match decode::<InstanceSpec>(&kv) {
                    Ok(spec) => offer(&ctx, &mut running, spec),
                    Err(e) => warn!(error = %e, "skipping undecodable instance spec"),
                },
                Ok(WatchEvent::Delete { key, .. }) => {
                    if let Some(name) = keys::instance_of(&keys::bindings_of(&ctx.host), &key)
                        && let Some(s) = running.remove(&name)
                        && !s.task.is_finished()
                    {
                        // Bound elsewhere now (a failover while this host
                        // was away): its supervisor must neither start it
                        // nor report for it any more. Dropping the spec
                        // sender ends it; volumes it held are let go.
                        info!(instance = %name, "no longer bound here; dropping its supervisor");
                        drop(s);
                        // A VM migrating out lets go of its volumes itself,
                        // once its QEMU has quit.
                        if let Some(v) = ctx.volumes.clone()
                            && !ctx.outgoing.is_leaving(&name)
                        {
                            tokio::spawn(async move { v.release_instance(&name).await });
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "instance watch broke; relisting");
                    break;
                }
            }
            running.retain(|_, s| !s.task.is_finished() || !s.spec.is_closed());
        }
    }
}

/// Hands `spec` to its supervisor, starting one if needed.
fn offer(
    ctx: &Arc<AgentContext>,
    running: &mut HashMap<InstanceRef, Supervised>,
    spec: InstanceSpec,
) {
    if spec.host != ctx.host {
        return;
    }
    if let Some(s) = running.get(&spec.instance_ref())
        && s.id == spec.id
        && !s.task.is_finished()
    {
        s.spec.send_replace(spec);
        return;
    }
    let (tx, rx) = watch::channel(spec.clone());
    let ctx = ctx.clone();
    let task = tokio::spawn(async move {
        Supervisor::new(ctx, rx).await.run().await;
    });
    running.insert(
        spec.instance_ref(),
        Supervised {
            id: spec.id,
            spec: tx,
            task,
        },
    );
}
