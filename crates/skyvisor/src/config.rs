//! Settings of `skyvisor up`: defaults, overridden by an optional TOML file,
//! overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
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
}

/// Reads a TOML config file, naming the file in errors.
pub fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// The default data directory: `$XDG_DATA_HOME/skyvisor` (root:
/// `/var/lib/skyvisor`).
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
