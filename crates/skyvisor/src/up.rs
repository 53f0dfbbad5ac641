//! `skyvisor up`: API, host agent and embedded store in one process.
//!
//! Stopping it (Ctrl-C, SIGTERM, or a crash) leaves VMs running; the next
//! `up` on the same data directory re-attaches to them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use skyvisor_agent::images::ImageCache;
use skyvisor_agent::qemu_hv::QemuHypervisor;
use skyvisor_agent::{AgentConfig, host};
use skyvisor_control::images::{DEFAULT_IMAGE, DEFAULT_RECIPE};
use skyvisor_control::{ControlPlane, ServerConfig, Weigher};
use skyvisor_core::HostName;
use skyvisor_core::image::FileRole;
use skyvisor_net::LinuxNetwork;
use skyvisor_store::Store;
use skyvisor_store::embedded::EmbeddedStore;
use tracing::info;
use tracing_subscriber::EnvFilter;

use crate::UpArgs;
use crate::config::{self, FileConfig, UpSettings};

fn settings(args: &UpArgs) -> Result<UpSettings> {
    let file = match &args.config {
        Some(p) => config::load_file(p)?,
        None => FileConfig::default(),
    };
    let host_name = match args.host_name.clone().or(file.host_name.clone()) {
        Some(n) => HostName::new(n).context("--host-name")?,
        None => config::default_host_name(),
    };
    let overcommit = file.overcommit.unwrap_or_default();
    overcommit.validate().context("config file")?;
    Ok(UpSettings {
        data_dir: args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(config::default_data_dir),
        cache_dir: args
            .cache_dir
            .clone()
            .or(file.cache_dir)
            .unwrap_or_else(config::default_cache_dir),
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| ([127, 0, 0, 1], 7780).into()),
        accel: args.accel.or(file.accel).unwrap_or_default(),
        host_name,
        qemu: args
            .qemu
            .clone()
            .or(file.qemu)
            .unwrap_or_else(|| "qemu-system-x86_64".into()),
        bridge: args
            .bridge
            .clone()
            .or(file.network.bridge)
            .unwrap_or_else(|| "svbr0".into()),
        subnet: match args.subnet.or(file.network.subnet) {
            Some(s) => s,
            None => "10.213.0.0/24".parse().context("default subnet")?,
        },
        nat: file.network.nat.unwrap_or(true),
        overcommit,
        reserved_memory_mib: file.reserved_memory_mib.unwrap_or(1024),
        default_image: !args.no_default_image && file.default_image.unwrap_or(true),
        replica_listen: args
            .replica_listen
            .or(file.replica_listen)
            .unwrap_or_else(|| ([127, 0, 0, 1], 7781).into()),
    })
}

fn init_logs(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn,h2=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs the all-in-one host until SIGINT or SIGTERM.
pub async fn run(args: UpArgs) -> Result<()> {
    init_logs(&args.log_format);
    let s = settings(&args)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("skyvisor up needs root: it creates a bridge, taps and NAT rules for VMs");
    }
    check_socket_paths(&s)?;
    std::fs::create_dir_all(&s.data_dir)
        .with_context(|| format!("cannot create data directory {}", s.data_dir.display()))?;
    std::fs::create_dir_all(&s.cache_dir)
        .with_context(|| format!("cannot create cache directory {}", s.cache_dir.display()))?;
    let qemu_version = skyvisor_qemu_version(&s.qemu).await?;
    info!(data_dir = %s.data_dir.display(), qemu = %qemu_version, "starting");

    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(&s.data_dir.join("store.redb"))
            .with_context(|| format!("cannot open the store in {}", s.data_dir.display()))?,
    );
    let cp = ControlPlane::start(
        store.clone(),
        ServerConfig {
            data_dir: s.data_dir.clone(),
            cache_dir: s.cache_dir.clone(),
            guest_binary: None,
            subnet: s.subnet,
            vni: 4213,
            mtu: 1500,
            weigher: Weigher::Spread,
        },
    )
    .await
    .context("cannot start the control plane")?;

    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another skyvisor up running?)",
                s.listen
            )
        })?;
    let api_url = format!("http://{}", listener.local_addr()?);
    let router = skyvisor_control::api::router(cp.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    eprintln!("API listening on {api_url}");

    let mut probe_files = None;
    if s.default_image {
        eprintln!("Ensuring image {DEFAULT_IMAGE} (built from Debian packages on first start)...");
        let image = cp
            .ensure_image(DEFAULT_IMAGE, DEFAULT_RECIPE, |m| eprintln!("  image: {m}"))
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let dir = cp.image_dir(DEFAULT_IMAGE);
        let kernel = image.file(FileRole::Kernel).map(|f| dir.join(&f.file_name));
        let initrd = image.file(FileRole::Initrd).map(|f| dir.join(&f.file_name));
        probe_files = kernel.map(|k| (k, initrd));
    }
    let accel = host::choose_accel(
        s.accel,
        &s.qemu,
        probe_files
            .as_ref()
            .map(|(k, i)| (k.as_path(), i.as_deref())),
        &s.data_dir.join("accel-probe.json"),
    )
    .await;
    eprintln!("Accelerator: {} ({})", accel.0, accel.1);

    let agent = skyvisor_agent::start(
        AgentConfig {
            host: s.host_name.clone(),
            data_dir: s.data_dir.join("agent"),
            address: "127.0.0.1".into(),
            qemu_binary: s.qemu.clone(),
            bridge: s.bridge.clone(),
            nat: s.nat,
            overcommit: s.overcommit,
            reserved_memory_mib: s.reserved_memory_mib,
            listen: ([127, 0, 0, 1], 0).into(),
            lease_ttl: Duration::from_secs(10),
            probe_guests: true,
            replica_listen: Some(s.replica_listen),
        },
        store.clone(),
        Arc::new(QemuHypervisor {
            binary: s.qemu.clone(),
        }),
        Arc::new(LinuxNetwork::new()),
        ImageCache::new(
            vec![s.data_dir.join("images")],
            s.data_dir.join("agent").join("image-cache"),
            Some(api_url.clone()),
        ),
        accel,
    )
    .await
    .context("cannot start the host agent")?;
    eprintln!(
        "Skyvisor is up: host {} ready, API {api_url} (Ctrl-C stops Skyvisor; VMs keep running)",
        s.host_name
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = server => {
            match r {
                Ok(Ok(())) => bail!("the API server stopped"),
                Ok(Err(e)) => bail!("the API server failed: {e}"),
                Err(e) => bail!("the API server task failed: {e}"),
            }
        }
    }
    eprintln!("Stopping Skyvisor; VMs keep running and are re-attached at the next start");
    agent.shutdown().await;
    Ok(())
}

async fn skyvisor_qemu_version(qemu: &std::path::Path) -> Result<String> {
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
/// make every VM fail to start, so refuse it up front.
fn check_socket_paths(s: &UpSettings) -> Result<()> {
    let longest = s
        .data_dir
        .join("agent/vms/0123456789abcdef0123456789abcdef/console.sock");
    let len = longest.as_os_str().len();
    if len > 107 {
        bail!(
            "data directory {} is too deep: VM socket paths would be {len} bytes, over the 107 unix sockets allow; choose a shorter --data-dir",
            s.data_dir.display()
        );
    }
    Ok(())
}
