//! `skyvisor up`: API, host agent and embedded store in one process.
//!
//! Stopping it (Ctrl-C, SIGTERM, or a crash) leaves VMs running; the next
//! `up` on the same data directory re-attaches to them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use skyvisor_control::images::{CONTAINER_IMAGE, CONTAINER_RECIPE, DEFAULT_IMAGE, DEFAULT_RECIPE};
use skyvisor_control::{ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::image::FileRole;
use skyvisor_core::{HostName, ServerName};
use skyvisor_store::Store;
use skyvisor_store::embedded::EmbeddedStore;
use tracing::info;

use crate::UpArgs;
use crate::config::{self, FileConfig, UpSettings};
use crate::daemon::{self, HostAgentSettings};

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
        private_vni_base: args
            .private_vni_base
            .or(file.network.private_vni_base)
            .unwrap_or(skyvisor_core::network::PRIVATE_VNI_BASE),
        nat: file.network.nat.unwrap_or(true),
        overcommit,
        reserved_memory_mib: file.reserved_memory_mib.unwrap_or(1024),
        default_image: !args.no_default_image && file.default_image.unwrap_or(true),
        replica_listen: args
            .replica_listen
            .or(file.replica_listen)
            .unwrap_or_else(|| ([127, 0, 0, 1], 7781).into()),
        guest_test_hooks: args.guest_test_hooks,
    })
}

/// Runs the all-in-one host until SIGINT or SIGTERM.
pub async fn run(args: UpArgs) -> Result<()> {
    daemon::init_logs(&args.log_format);
    let s = settings(&args)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("skyvisor up needs root: it creates a bridge, taps and NAT rules for VMs");
    }
    daemon::check_socket_paths(&s.data_dir.join("agent"))?;
    std::fs::create_dir_all(&s.data_dir)
        .with_context(|| format!("cannot create data directory {}", s.data_dir.display()))?;
    std::fs::create_dir_all(&s.cache_dir)
        .with_context(|| format!("cannot create cache directory {}", s.cache_dir.display()))?;
    let qemu_version = daemon::qemu_version(&s.qemu).await?;
    info!(data_dir = %s.data_dir.display(), qemu = %qemu_version, "starting");

    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(&s.data_dir.join("store.redb"))
            .with_context(|| format!("cannot open the store in {}", s.data_dir.display()))?,
    );
    // The listener first: the cluster records carry its URL.
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another skyvisor up running?)",
                s.listen
            )
        })?;
    let bound = listener.local_addr()?;
    let scheme = if args.tls { "https" } else { "http" };
    let api_url = format!("{scheme}://{bound}");
    // The CA first: the control plane's and the agent's clients trust it.
    let tls = match args.tls {
        true => Some(
            crate::tls::server_config(
                store.as_ref(),
                &s.data_dir,
                &crate::tls::names_for(bound, &api_url),
            )
            .await?,
        ),
        false => {
            crate::tls::write_ca_file(store.as_ref(), &s.data_dir).await?;
            None
        }
    };
    let server_name = ServerName::new(s.host_name.as_str()).context("server name")?;
    let cp = ControlPlane::start(
        store.clone(),
        ServerConfig {
            data_dir: s.data_dir.clone(),
            cache_dir: s.cache_dir.clone(),
            guest_binary: None,
            subnet: s.subnet,
            vni: 4213,
            mtu: 1500,
            private_vni_base: s.private_vni_base,
            audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
            event_retention: skyvisor_control::events::DEFAULT_RETENTION,
            weigher: Weigher::Spread,
            cluster: ClusterSettings::single(server_name, api_url.clone()),
            max_upload_bytes: skyvisor_control::DEFAULT_MAX_UPLOAD_BYTES,
            bootstrap_token_file: Some(s.data_dir.join(config::BOOTSTRAP_TOKEN_FILE)),
        },
    )
    .await
    .context("cannot start the control plane")?;
    let membership = cp
        .join_cluster()
        .await
        .context("cannot start the control plane")?;

    let router = skyvisor_control::api::router(cp.clone()).merge(skyvisor_webui::router());
    let mut server = tokio::spawn(skyvisor_auth::tls::serve(listener, tls, router));
    eprintln!("API listening on {api_url}");

    let mut probe_files = None;
    if s.default_image {
        eprintln!("Ensuring image {DEFAULT_IMAGE} (built from Debian packages on first start)...");
        let image = cp
            .ensure_image(DEFAULT_IMAGE, DEFAULT_RECIPE, |m| eprintln!("  image: {m}"))
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let dir = cp.image_dir(&image.image_ref());
        let kernel = image.file(FileRole::Kernel).map(|f| dir.join(&f.file_name));
        let initrd = image.file(FileRole::Initrd).map(|f| dir.join(&f.file_name));
        probe_files = kernel.map(|k| (k, initrd));
        // The container image, from the same packages: in the background.
        let cp = cp.clone();
        tokio::spawn(async move {
            if let Err(e) = cp
                .ensure_image(CONTAINER_IMAGE, CONTAINER_RECIPE, |_| {})
                .await
            {
                tracing::warn!(image = CONTAINER_IMAGE, error = %e.message, "container image not ready");
            }
        });
    }

    let agent = daemon::start_host_agent(
        HostAgentSettings {
            host_name: s.host_name.clone(),
            dir: s.data_dir.join("agent"),
            address: "127.0.0.1".into(),
            qemu: s.qemu.clone(),
            bridge: s.bridge.clone(),
            nat: s.nat,
            overcommit: s.overcommit,
            reserved_memory_mib: s.reserved_memory_mib,
            listen: ([127, 0, 0, 1], 0).into(),
            lease_ttl: Duration::from_secs(10),
            overlay: None,
            accel: s.accel,
            image_dirs: vec![s.data_dir.join("images")],
            server_url: Some(api_url.clone()),
            probe_files,
            replica_listen: Some(s.replica_listen),
            // One host: nothing fails over, so nothing needs fencing.
            fencing: None,
            guest_test_hooks: s.guest_test_hooks,
        },
        store.clone(),
    )
    .await?;
    eprintln!(
        "Skyvisor is up: host {} ready, API {api_url} (Ctrl-C stops Skyvisor; VMs keep running)",
        s.host_name
    );

    daemon::wait_for_stop(Some(&mut server)).await?;
    eprintln!("Stopping Skyvisor; VMs keep running and are re-attached at the next start");
    agent.shutdown().await;
    membership.leave().await;
    Ok(())
}
