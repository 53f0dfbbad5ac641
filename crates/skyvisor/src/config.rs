//! Settings of `skyvisor up`, `server` and `agent`: defaults, overridden by
//! an optional TOML file, overridden by command-line flags. One file format
//! serves all three; each command reads the keys it needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use skyvisor_control::Weigher;
use skyvisor_core::{AccelMode, HostName, Ipv4Net, Overcommit};

/// Everything `up` can be told. Every field is optional in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Cache of downloaded packages and built images.
    pub cache_dir: Option<PathBuf>,
    /// API listen address.
    pub listen: Option<SocketAddr>,
    /// Accelerator: auto, kvm, tcg.
    pub accel: Option<AccelMode>,
    /// This host's name.
    pub host_name: Option<String>,
    /// QEMU binary.
    pub qemu: Option<PathBuf>,
    /// VM network.
    pub network: NetworkConfig,
    /// Overcommit ratios.
    pub overcommit: Option<Overcommit>,
    /// Memory kept for the host, MiB.
    pub reserved_memory_mib: Option<u64>,
    /// Build the default image at start.
    pub default_image: Option<bool>,
    /// The cluster store (`server`, `agent`).
    pub cluster: ClusterFileConfig,
    /// Control-plane server settings (`server`).
    pub server: ServerFileConfig,
    /// Host agent settings (`agent`).
    pub agent: AgentFileConfig,
    /// Where the volume replica server listens (default 127.0.0.1:7781).
    pub replica_listen: Option<SocketAddr>,
}

/// The VM network's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Bridge name.
    pub bridge: Option<String>,
    /// VM subnet.
    pub subnet: Option<Ipv4Net>,
    /// Masquerade VM traffic to the outside.
    pub nat: Option<bool>,
    /// MTU of VMs (a cluster's default leaves room for VXLAN headers).
    pub mtu: Option<u32>,
    /// VXLAN network identifier of the overlay.
    pub vni: Option<u32>,
    /// The first VXLAN id of projects' private networks.
    pub private_vni_base: Option<u32>,
    /// VXLAN UDP port.
    pub vxlan_port: Option<u16>,
}

/// Where the cluster keeps its state.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterFileConfig {
    /// etcd client URLs.
    pub etcd: Option<Vec<String>>,
    /// Key prefix in etcd.
    pub namespace: Option<String>,
}

/// `[server]`: a control-plane server of a cluster.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFileConfig {
    /// The server's unique name.
    pub name: Option<String>,
    /// The URL others reach its API at.
    pub advertise_url: Option<String>,
    /// Placement weigher: spread or pack.
    pub weigher: Option<Weigher>,
    /// Seconds a replica's host may be gone before re-replication.
    pub replica_grace_secs: Option<u64>,
    /// Admission control: host failures to keep room for.
    pub ha_reserve_hosts: Option<u32>,
    /// The most bytes an image import may upload (`--max-upload`).
    pub max_upload_bytes: Option<u64>,
    /// Lease TTL of its registration and leadership, seconds.
    pub lease_ttl_secs: Option<u64>,
}

/// `[agent]`: the host agent of a cluster host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentFileConfig {
    /// Servers to join through (the agent asks them for the store).
    pub servers: Option<Vec<String>>,
    /// A cluster admin's API token to join through them.
    pub join_token: Option<String>,
    /// The cluster CA's certificate (a server's `cluster-ca.pem`), to trust
    /// `https` servers with.
    pub ca_file: Option<PathBuf>,
    /// This host's address other hosts reach it at.
    pub address: Option<std::net::Ipv4Addr>,
    /// The agent's HTTP listen address.
    pub listen: Option<SocketAddr>,
    /// Lease TTL of the host, seconds.
    pub lease_ttl_secs: Option<u64>,
}

/// The settings `up` runs with.
#[derive(Debug, Clone)]
pub struct UpSettings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// API listen address.
    pub listen: SocketAddr,
    /// Accelerator mode.
    pub accel: AccelMode,
    /// This host's name.
    pub host_name: HostName,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Bridge name.
    pub bridge: String,
    /// VM subnet.
    pub subnet: Ipv4Net,
    /// The first VXLAN id of projects' private networks.
    pub private_vni_base: u32,
    /// NAT on.
    pub nat: bool,
    /// Overcommit ratios.
    pub overcommit: Overcommit,
    /// Memory kept for the host.
    pub reserved_memory_mib: u64,
    /// Build the default image at start.
    pub default_image: bool,
    /// Where the volume replica server listens.
    pub replica_listen: SocketAddr,
    /// The default guest's test hooks in this host's VMs.
    pub guest_test_hooks: bool,
}

/// Reads a TOML config file, naming the file in errors.
pub fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// The default data directory: `$XDG_DATA_HOME/skyvisor` (root:
/// `/var/lib/skyvisor`).
/// The bootstrap admin's token file, in the data directory of `skyvisor
/// up` and `skyvisor server`; the CLI reads it when no token is configured.
pub const BOOTSTRAP_TOKEN_FILE: &str = "admin.token";

/// Where state lives by default: `/var/lib/skyvisor` for root.
pub fn default_data_dir() -> PathBuf {
    if nix_is_root() {
        PathBuf::from("/var/lib/skyvisor")
    } else {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("skyvisor")
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/skyvisor`.
pub fn default_cache_dir() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("skyvisor")
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The machine's host name as a valid Skyvisor host name, or `host-1`.
pub fn default_host_name() -> HostName {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    HostName::new(cleaned.trim_matches('-'))
        .or_else(|_| HostName::new(format!("host-{}", cleaned.trim_matches('-'))))
        .unwrap_or_else(|_| HostName::new("host-1").expect("\"host-1\" is a valid host name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_rejects_unknown_keys() {
        let err = toml::from_str::<FileConfig>("listn = \"127.0.0.1:1\"").expect_err("typo");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let ok: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\naccel = \"tcg\"\n[network]\nsubnet = \"10.9.0.0/24\"\n",
        )
        .expect("valid");
        let cluster: FileConfig = toml::from_str(
            "[cluster]\netcd = [\"http://10.0.0.1:2379\"]\n[server]\nname = \"s1\"\nweigher = \"pack\"\n\
             [agent]\naddress = \"10.0.0.11\"\nservers = [\"http://10.0.0.1:7780\"]\n",
        )
        .expect("cluster config");
        assert_eq!(cluster.server.weigher, Some(Weigher::Pack));
        assert_eq!(
            cluster.agent.address,
            Some("10.0.0.11".parse().expect("ip"))
        );
        let err = toml::from_str::<FileConfig>("[server]\nwiegher = \"pack\"\n").expect_err("typo");
        assert!(err.to_string().contains("unknown field"), "{err}");
        assert_eq!(ok.accel, Some(AccelMode::Tcg));
        assert_eq!(
            ok.network.subnet.map(|s| s.to_string()).as_deref(),
            Some("10.9.0.0/24")
        );
    }

    #[test]
    fn host_name_is_valid() {
        let h = default_host_name();
        assert!(HostName::new(h.as_str()).is_ok());
    }
}
