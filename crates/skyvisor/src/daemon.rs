//! What `up`, `server` and `agent` share: logs, checks, the host agent's
//! start (accelerator choice included) and waiting for a stop.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use skyvisor_agent::cluster::OverlaySettings;
use skyvisor_agent::images::ImageCache;
use skyvisor_agent::qemu_hv::QemuHypervisor;
use skyvisor_agent::{AgentConfig, AgentHandle, host};
use skyvisor_core::image::{FileRole, ImageState};
use skyvisor_core::{AccelMode, HostName, Image, ImageName, Overcommit, keys};
use skyvisor_net::LinuxNetwork;
use skyvisor_store::{Store, StoreExt};
use tokio::task::JoinHandle;
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Libraries kept at warnings whatever `RUST_LOG` asks, unless it names
/// them (hickory logs every DNS query at info).
const QUIET_LIBRARIES: &[&str] = &[
    "tower_http",
    "h2",
    "hyper",
    "hickory_server",
    "hickory_proto",
    "hickory_resolver",
];

/// The log filter for `RUST_LOG` (none: our own information): what it
/// says, with the quiet libraries it does not name at warnings.
fn log_filter(rust_log: Option<&str>) -> String {
    let asked = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    let mut filter = asked.to_string();
    for lib in QUIET_LIBRARIES.iter().filter(|l| !asked.contains(*l)) {
        filter.push_str(&format!(",{lib}=warn"));
    }
    filter
}

/// Sets up logging to stderr, as text or JSON.
pub fn init_logs(format: &str) {
    let asked = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(log_filter(asked.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new(log_filter(None)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a log file gets plain lines.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// QEMU's version line, or an error saying how to install it.
pub async fn qemu_version(qemu: &Path) -> Result<String> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .with_context(|| {
            format!(
                "cannot run QEMU ({}); install it (apt-get install qemu-system-x86) or set --qemu",
                qemu.display()
            )
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Unix socket paths are limited to 107 bytes; a deep data directory would
/// make every VM fail to start, so refuse it up front. `agent_dir` is where
/// the agent keeps its `vms/`.
pub fn check_socket_paths(agent_dir: &Path) -> Result<()> {
    let longest = agent_dir.join("vms/0123456789abcdef0123456789abcdef/console.sock");
    let len = longest.as_os_str().len();
    if len > 107 {
        bail!(
            "data directory {} is too deep: VM socket paths would be {len} bytes, over the 107 unix sockets allow; choose a shorter --data-dir",
            agent_dir.display()
        );
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM; fails if the API stops by itself first.
pub async fn wait_for_stop(api: Option<&mut JoinHandle<std::io::Result<()>>>) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let api_done = async {
        match api {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        r = api_done => match r {
            Ok(Ok(())) => bail!("the API server stopped"),
            Ok(Err(e)) => bail!("the API server failed: {e}"),
            Err(e) => bail!("the API server task failed: {e}"),
        },
    }
}

/// What a host agent runs with.
pub struct HostAgentSettings {
    /// The host's name.
    pub host_name: HostName,
    /// The agent's data directory (its `vms/`, image cache, probe record).
    pub dir: PathBuf,
    /// The address other hosts reach this one at.
    pub address: String,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The VM bridge.
    pub bridge: String,
    /// Masquerade VM traffic to the outside.
    pub nat: bool,
    /// Overcommit ratios.
    pub overcommit: Overcommit,
    /// Memory kept for the host.
    pub reserved_memory_mib: u64,
    /// The agent's HTTP listen address.
    pub listen: SocketAddr,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// The cluster overlay, if any.
    pub overlay: Option<OverlaySettings>,
    /// How to choose the accelerator.
    pub accel: AccelMode,
    /// Image directories shared with a server on the same host.
    pub image_dirs: Vec<PathBuf>,
    /// The server images are downloaded from first.
    pub server_url: Option<String>,
    /// A kernel (and initrd) to probe KVM with, when known locally.
    pub probe_files: Option<(PathBuf, Option<PathBuf>)>,
    /// Where the volume replica server listens; none: no volumes here.
    pub replica_listen: Option<SocketAddr>,
    /// Self-fencing of HA-protected VMs (cluster agents).
    pub fencing: Option<skyvisor_agent::FencingConfig>,
    /// The default guest's test hooks in this host's VMs.
    pub guest_test_hooks: bool,
}

/// Chooses the accelerator and starts the host agent with QEMU and the
/// host's real network.
pub async fn start_host_agent(s: HostAgentSettings, store: Arc<dyn Store>) -> Result<AgentHandle> {
    let images = ImageCache::new(
        s.image_dirs.clone(),
        s.dir.join("image-cache"),
        s.server_url.clone(),
    );
    // The agent fetches image files from the servers' API with a token of
    // its own.
    let token = skyvisor_auth::bootstrap::service_token(
        &skyvisor_auth::Directory::new(store.clone()),
        "skyvisor-hosts",
        &format!("host {}", s.host_name),
    )
    .await
    .context("cannot make the agent's API token")?;
    images.set_token(token);
    let mut probe_files = s.probe_files.clone();
    if probe_files.is_none() && s.accel == AccelMode::Auto {
        probe_files = default_image_files(store.as_ref(), &images).await;
    }
    tokio::fs::create_dir_all(&s.dir)
        .await
        .with_context(|| format!("cannot create {}", s.dir.display()))?;
    let accel = host::choose_accel(
        s.accel,
        &s.qemu,
        probe_files
            .as_ref()
            .map(|(k, i)| (k.as_path(), i.as_deref())),
        &s.dir.join("accel-probe.json"),
    )
    .await;
    eprintln!("Accelerator: {} ({})", accel.0, accel.1);
    let agent = skyvisor_agent::start(
        AgentConfig {
            host: s.host_name.clone(),
            data_dir: s.dir.clone(),
            address: s.address.clone(),
            qemu_binary: s.qemu.clone(),
            bridge: s.bridge.clone(),
            nat: s.nat,
            overcommit: s.overcommit,
            reserved_memory_mib: s.reserved_memory_mib,
            listen: s.listen,
            lease_ttl: s.lease_ttl,
            probe_guests: true,
            overlay: s.overlay.clone(),
            replica_listen: s.replica_listen,
            fencing: s.fencing.clone(),
            guest_test_hooks: s.guest_test_hooks,
            containers: Some(skyvisor_agent::containers::ContainerSettings {
                runtime: PathBuf::from("crun"),
                hook_exe: std::env::current_exe()
                    .context("finding this executable (the containers' network hook)")?,
            }),
        },
        store,
        Arc::new(QemuHypervisor {
            binary: s.qemu.clone(),
        }),
        Arc::new(LinuxNetwork::new()),
        images,
        accel,
    )
    .await
    .context("cannot start the host agent")?;
    info!(host = %s.host_name, url = %agent.url, "host agent running");
    Ok(agent)
}

/// The default image's kernel and initrd, fetched into the agent's cache,
/// to probe KVM with; none if the image is not ready.
async fn default_image_files(
    store: &dyn Store,
    images: &ImageCache,
) -> Option<(PathBuf, Option<PathBuf>)> {
    let name = skyvisor_core::ImageRef::new(
        skyvisor_core::auth::default_project(),
        ImageName::new(skyvisor_control::images::DEFAULT_IMAGE).ok()?,
    );
    let (image, _) = store.get_json::<Image>(&keys::image(&name)).await.ok()??;
    if image.state != ImageState::Ready {
        return None;
    }
    let kernel = images
        .file(&image, image.file(FileRole::Kernel)?)
        .await
        .ok()?;
    let initrd = match image.file(FileRole::Initrd) {
        Some(f) => Some(images.file(&image, f).await.ok()?),
        None => None,
    };
    Some((kernel, initrd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_libraries_stay_at_warnings_unless_named() {
        assert_eq!(
            log_filter(None),
            "info,tower_http=warn,h2=warn,hyper=warn,hickory_server=warn,hickory_proto=warn,hickory_resolver=warn"
        );
        let f = log_filter(Some("info,skyvisor_agent=debug,hickory_server=debug"));
        assert!(
            f.starts_with("info,skyvisor_agent=debug,hickory_server=debug,"),
            "{f}"
        );
        assert!(!f.contains("hickory_server=warn"), "{f}");
        assert!(f.ends_with("hickory_resolver=warn"), "{f}");
        assert_eq!(log_filter(Some(" ")), log_filter(None));
    }
}
