//! `skyvisor agent`: joins this host to a cluster's pool. It finds the
//! cluster's store through a server (`--server`) or directly (`--etcd`),
//! registers the host, holds its lease, joins the VXLAN overlay and runs
//! the VMs placed on it.
//!
//! Stopping it (or a crash) leaves VMs running; the next agent on the same
//! data directory re-attaches to them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use skyvisor_agent::cluster::OverlaySettings;
use skyvisor_cli::client::{Client, ClientError};
use skyvisor_core::cluster::JoinInfo;
use skyvisor_core::{AccelMode, HostName};
use skyvisor_store::Store;

use crate::config::{self, FileConfig};
use crate::daemon::{self, HostAgentSettings};
use crate::server::{DEFAULT_NAMESPACE, connect_etcd};

/// The agent's lease TTL when none is configured: short enough that a dead
/// host's protected VMs run again elsewhere within 15 s (lease expiry, the
/// 1 s margin and a boot), long enough that a slow store does not matter
/// (a host that reaches its peers never fences).
const DEFAULT_LEASE_TTL_SECS: u64 = 8;
/// The agent's default HTTP port.
pub const DEFAULT_AGENT_PORT: u16 = 7781;
/// The volume replica server's default port.
pub const DEFAULT_REPLICA_PORT: u16 = 7782;
/// The overlay's default VXLAN UDP port (IANA's).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// Options of `skyvisor agent`; each overrides the config file.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Servers to join through, comma-separated (they tell the agent where
    /// the store is); the first that answers is used.
    #[arg(long, value_delimiter = ',', conflicts_with = "etcd")]
    server: Vec<String>,
    /// A join token (`skyvisor host join-token`), to join through a server;
    /// spent by the join. A cluster admin's API token works too.
    #[arg(long, env = "SKYVISOR_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The cluster CA's certificate (a server's `DATA_DIR/cluster-ca.pem`),
    /// to trust the servers' TLS with when joining through them.
    #[arg(long, env = "SKYVISOR_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// etcd client URLs, comma-separated, to join without asking a server.
    #[arg(long, value_delimiter = ',', env = "SKYVISOR_ETCD")]
    etcd: Vec<String>,
    /// Key prefix of the cluster in etcd (with --etcd).
    #[arg(long)]
    etcd_namespace: Option<String>,
    /// TLS to etcd (`https://` endpoints).
    #[command(flatten)]
    etcd_tls: crate::server::EtcdTlsArgs,
    /// This host's name in the pool (default: the machine's host name).
    #[arg(long)]
    host_name: Option<String>,
    /// This host's IPv4 address other hosts reach it at (default: the
    /// address this host reaches the store from).
    #[arg(long)]
    address: Option<Ipv4Addr>,
    /// The agent's HTTP listen address (default: ADDRESS:7781).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where VM disks, sockets and logs live.
    #[arg(long, env = "SKYVISOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Accelerator: auto (KVM if it really boots a guest), kvm, tcg.
    #[arg(long)]
    accel: Option<AccelMode>,
    /// The VM bridge's name.
    #[arg(long)]
    bridge: Option<String>,
    /// The QEMU binary.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Seconds after the agent stops renewing its lease that the host is
    /// declared unreachable (default 8; its HA-protected VMs are fenced
    /// at three quarters of it).
    #[arg(long)]
    lease_ttl: Option<u64>,
    /// VXLAN UDP port of the overlay.
    #[arg(long)]
    vxlan_port: Option<u16>,
    /// Where the volume replica server listens (default: this host's address, port 7781).
    #[arg(long)]
    replica_listen: Option<SocketAddr>,
    /// Turn on the default guest's test hooks (power off, reboot, /fetch,
    /// raw /blk on its public port) in the VMs of this host. For test beds
    /// and benchmarks only: a VM with them is an open proxy.
    #[arg(long)]
    guest_test_hooks: bool,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

/// Where an agent that joined through a server keeps what it learned, so
/// that it restarts without a new join token (delete it to join anew).
const JOINED_FILE: &str = "joined.json";

/// Asks the servers how to join, trusting `ca` (PEM) for `https` ones; the
/// first that answers decides.
async fn join_info(servers: &[String], token: Option<&str>, ca: Option<&str>) -> Result<JoinInfo> {
    let Some(token) = token else {
        bail!(
            "joining through a server needs a join token: make one with `skyvisor host join-token` and give it with --join-token or SKYVISOR_JOIN_TOKEN (a cluster admin's API token works too)"
        );
    };
    let mut errors = Vec::new();
    for url in servers {
        let client = Client::new(url)
            .with_token(Some(token.to_string()))
            .with_ca(ca);
        let path = format!("/v1/cluster/join?version={}", skyvisor_core::VERSION);
        match client.get::<JoinInfo>(&path).await {
            Ok(info) => return Ok(info),
            // The server answered with a refusal: that is the cluster's word.
            Err(e @ ClientError::Api { .. }) => {
                return Err(anyhow::anyhow!("server {url} refused this agent: {e}"));
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    bail!("no server answered: {}", errors.join("; "))
}

/// The local address this host uses to reach `url`'s host: the address the
/// rest of the cluster most likely reaches it at.
fn local_address_towards(url: &str) -> Option<Ipv4Addr> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next()?;
    let target: SocketAddr = if authority.contains(':') {
        authority.parse().ok()?
    } else {
        format!("{authority}:80").parse().ok()?
    };
    // Connecting a UDP socket sends nothing; it only picks a route.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(target).ok()?;
    match sock.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
        _ => None,
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: AgentArgs) -> Result<()> {
    daemon::init_logs(&args.log_format);
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "skyvisor agent needs root: it creates a bridge, taps, a VXLAN device and NAT rules for VMs"
        );
    }
    let file = match &args.config {
        Some(p) => config::load_file(p)?,
        None => FileConfig::default(),
    };
    let servers = if args.server.is_empty() {
        file.agent.servers.clone().unwrap_or_default()
    } else {
        args.server.clone()
    };
    let etcd_arg = if args.etcd.is_empty() {
        file.cluster.etcd.clone().unwrap_or_default()
    } else {
        args.etcd.clone()
    };
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(config::default_data_dir);
    let agent_dir = data_dir.join("agent");
    let (endpoints, namespace, server_urls) = if !servers.is_empty() && args.etcd.is_empty() {
        // A join token serves one join: what it got is kept for restarts.
        let joined = agent_dir.join(JOINED_FILE);
        let info = match std::fs::read(&joined)
            .ok()
            .and_then(|b| serde_json::from_slice::<JoinInfo>(&b).ok())
        {
            Some(info) => info,
            None => {
                let token = args.join_token.clone().or(file.agent.join_token.clone());
                let ca = match args.ca_file.clone().or(file.agent.ca_file.clone()) {
                    Some(f) => Some(std::fs::read_to_string(&f).with_context(|| {
                        format!("cannot read the cluster CA's certificate {}", f.display())
                    })?),
                    None => None,
                };
                let info = join_info(&servers, token.as_deref(), ca.as_deref()).await?;
                std::fs::create_dir_all(&agent_dir)
                    .and_then(|()| std::fs::write(&joined, serde_json::to_vec(&info)?))
                    .with_context(|| format!("cannot keep the join in {}", joined.display()))?;
                info
            }
        };
        (info.etcd_endpoints, info.etcd_namespace, info.servers)
    } else if !etcd_arg.is_empty() {
        let ns = args
            .etcd_namespace
            .clone()
            .or(file.cluster.namespace.clone())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        (etcd_arg, ns, Vec::new())
    } else {
        bail!("give --server URL (a server of the cluster) or --etcd URL (its store)");
    };
    let host_name = match args.host_name.clone().or(file.host_name.clone()) {
        Some(n) => HostName::new(n).context("--host-name")?,
        None => config::default_host_name(),
    };
    let address = match args.address.or(file.agent.address) {
        Some(a) => a,
        None => endpoints
            .iter()
            .find_map(|e| local_address_towards(e))
            .context("cannot tell this host's address; give --address")?,
    };
    daemon::check_socket_paths(&agent_dir)?;
    let qemu = args
        .qemu
        .clone()
        .or(file.qemu.clone())
        .unwrap_or_else(|| "qemu-system-x86_64".into());
    daemon::qemu_version(&qemu).await?;
    let overcommit = file.overcommit.unwrap_or_default();
    overcommit.validate().context("config file")?;

    let lease_ttl = Duration::from_secs(
        args.lease_ttl
            .or(file.agent.lease_ttl_secs)
            .unwrap_or(DEFAULT_LEASE_TTL_SECS)
            .clamp(2, 600),
    );
    let etcd_tls = args.etcd_tls.load()?;
    let store: Arc<dyn Store> =
        Arc::new(connect_etcd(&endpoints, &namespace, etcd_tls.as_ref()).await?);
    let agent = daemon::start_host_agent(
        HostAgentSettings {
            host_name: host_name.clone(),
            dir: agent_dir.clone(),
            address: address.to_string(),
            qemu,
            bridge: args
                .bridge
                .clone()
                .or(file.network.bridge.clone())
                .unwrap_or_else(|| "svbr0".into()),
            nat: file.network.nat.unwrap_or(true),
            overcommit,
            reserved_memory_mib: file.reserved_memory_mib.unwrap_or(1024),
            listen: args
                .listen
                .or(file.agent.listen)
                .unwrap_or_else(|| (address, DEFAULT_AGENT_PORT).into()),
            lease_ttl,
            overlay: Some(OverlaySettings {
                device: "svvx0".into(),
                port: args
                    .vxlan_port
                    .or(file.network.vxlan_port)
                    .unwrap_or(DEFAULT_VXLAN_PORT),
                local: address,
            }),
            accel: args.accel.or(file.accel).unwrap_or_default(),
            replica_listen: Some(
                args.replica_listen
                    .or(file.replica_listen)
                    .unwrap_or_else(|| (address, DEFAULT_REPLICA_PORT).into()),
            ),
            image_dirs: Vec::new(),
            server_url: server_urls.first().cloned().or(servers.first().cloned()),
            probe_files: None,
            guest_test_hooks: args.guest_test_hooks,
            fencing: Some(skyvisor_agent::FencingConfig {
                watchdog: Some((
                    std::env::current_exe().context("cannot find the skyvisor executable")?,
                    vec![
                        "fence-watchdog".into(),
                        "--data-dir".into(),
                        agent_dir.display().to_string(),
                        "--deadline-ms".into(),
                        // The agent's own fence deadline (see Fence::deadline).
                        (lease_ttl - lease_ttl / 4).as_millis().to_string(),
                    ],
                )),
            }),
        },
        store,
    )
    .await?;
    eprintln!(
        "Skyvisor agent is up: host {host_name} ({address}) joined the pool (agent API {})",
        agent.url
    );
    daemon::wait_for_stop(None).await?;
    eprintln!("Stopping the agent; VMs keep running and are re-attached at the next start");
    agent.shutdown().await;
    Ok(())
}
