//! `skyvisor server`: a control-plane server of a cluster (API, scheduler,
//! controllers) on etcd. Several may run at once; one leads at a time.
//!
//! Stopping it cleanly revokes its lease, so another server leads at once;
//! a crash is noticed when its lease expires.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use skyvisor_control::images::{CONTAINER_IMAGE, CONTAINER_RECIPE, DEFAULT_IMAGE, DEFAULT_RECIPE};
use skyvisor_control::{ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::{Ipv4Net, ServerName};
use skyvisor_store::{EtcdOptions, EtcdStore, Store};
use tracing::{info, warn};

use crate::config::{self, FileConfig};
use crate::daemon;

/// The default key prefix of a cluster in etcd.
pub const DEFAULT_NAMESPACE: &str = "/skyvisor/";
/// The default API port.
pub const DEFAULT_PORT: u16 = 7780;
/// How long a starting server or agent waits for etcd to answer.
pub const ETCD_WAIT: Duration = Duration::from_secs(60);

/// Options of `skyvisor server`; each overrides the config file.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// A TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// etcd client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', env = "SKYVISOR_ETCD")]
    etcd: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long)]
    etcd_namespace: Option<String>,
    /// TLS to etcd (`https://` endpoints).
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// This server's unique name (default: the machine's host name).
    #[arg(long)]
    name: Option<String>,
    /// API listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The URL agents, other servers and users reach this API at
    /// (default: http://LISTEN).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Where images live.
    #[arg(long, env = "SKYVISOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The bootstrap admin's token file (default: DATA_DIR/admin.token),
    /// written at first start if missing, readable by root only. Servers
    /// of one cluster may share one file.
    #[arg(long)]
    bootstrap_token_file: Option<PathBuf>,
    /// Cache of downloaded packages and built images.
    #[arg(long, env = "SKYVISOR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// The VM subnet (used when the cluster is first created).
    #[arg(long)]
    subnet: Option<Ipv4Net>,
    /// The first VXLAN id of projects' private networks (default 65536;
    /// 65520 ids from there).
    #[arg(long)]
    private_vni_base: Option<u32>,
    /// Serve the API over plain HTTP instead of TLS: API tokens and
    /// everything else then cross the network in the clear. Only for a
    /// test bed, or behind a proxy that terminates TLS. (By default the
    /// API is served over TLS with a certificate of the cluster's CA, which
    /// clients pin at `skyvisor remote add`.)
    #[arg(long, conflicts_with = "tls")]
    plain_http: bool,
    /// Serve the API over TLS: the default, kept for scripts that say it.
    #[arg(long, hide = true)]
    tls: bool,
    /// How many days the audit trail keeps a record (default 90).
    #[arg(long)]
    audit_retention_days: Option<u32>,
    /// How many days the event record keeps an event (default 90); usage
    /// is metered from events, so keep them past your billing periods.
    #[arg(long)]
    event_retention_days: Option<u32>,
    /// MTU of VMs (the default leaves room for the overlay's VXLAN headers
    /// on a 1500-byte underlay).
    #[arg(long)]
    mtu: Option<u32>,
    /// How placement chooses among hosts that fit: spread or pack.
    #[arg(long)]
    weigher: Option<Weigher>,
    /// Seconds a crashed leader keeps leadership before another takes over.
    #[arg(long)]
    lease_ttl: Option<u64>,
    /// Seconds a host holding volume replicas may be gone before its
    /// replicas are made again on other hosts (default 600; set the same
    /// on every server).
    #[arg(long)]
    replica_grace: Option<u64>,
    /// Admission control: refuse a new HA-protected VM unless every
    /// protected VM could restart after this many hosts fail (default 0:
    /// off; set the same on every server).
    #[arg(long)]
    ha_reserve_hosts: Option<u32>,
    /// The most an image import may upload, e.g. 20G (default 64G).
    #[arg(long, value_parser = skyvisor_cli::parse_bytes)]
    max_upload: Option<u64>,
    /// Don't build the default image at start.
    #[arg(long)]
    no_default_image: bool,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

/// How to reach an etcd that serves TLS (and asks for client certificates).
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdTlsArgs {
    /// The CA etcd's certificate chains to (PEM).
    #[arg(long, env = "SKYVISOR_ETCD_CACERT")]
    etcd_cacert: Option<PathBuf>,
    /// This process's client certificate for etcd (PEM).
    #[arg(long, env = "SKYVISOR_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, env = "SKYVISOR_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The TLS settings, read from the files; none without a CA.
    pub fn load(&self) -> Result<Option<skyvisor_store::EtcdTls>> {
        let Some(ca) = &self.etcd_cacert else {
            if self.etcd_cert.is_some() {
                bail!("--etcd-cert needs --etcd-cacert (the CA etcd's certificate chains to)");
            }
            return Ok(None);
        };
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(skyvisor_store::EtcdTls {
            ca_pem: read(ca)?,
            identity,
        }))
    }
}

/// Connects to etcd, waiting up to [`ETCD_WAIT`] for it to answer.
pub async fn connect_etcd(
    endpoints: &[String],
    namespace: &str,
    tls: Option<&skyvisor_store::EtcdTls>,
) -> Result<EtcdStore> {
    if endpoints.is_empty() {
        bail!("no etcd endpoints: give --etcd http://HOST:2379 (or [cluster] etcd in the config)");
    }
    if !namespace.starts_with('/') || !namespace.ends_with('/') {
        bail!("etcd namespace {namespace:?} must start and end with '/', e.g. /skyvisor/");
    }
    let started = Instant::now();
    let mut told = false;
    loop {
        match EtcdStore::connect_with_tls(endpoints, namespace, EtcdOptions::default(), tls).await {
            Ok(s) => return Ok(s),
            Err(e) if started.elapsed() < ETCD_WAIT => {
                if !told {
                    eprintln!("Waiting for etcd at {}: {e}", endpoints.join(","));
                    told = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot reach etcd at {} within {ETCD_WAIT:?}",
                        endpoints.join(",")
                    )
                });
            }
        }
    }
}

/// Runs a server until SIGINT or SIGTERM.
pub async fn run(args: ServerArgs) -> Result<()> {
    daemon::init_logs(&args.log_format);
    let file = match &args.config {
        Some(p) => config::load_file(p)?,
        None => FileConfig::default(),
    };
    let etcd = if args.etcd.is_empty() {
        file.cluster.etcd.clone().unwrap_or_default()
    } else {
        args.etcd.clone()
    };
    let namespace = args
        .etcd_namespace
        .clone()
        .or(file.cluster.namespace.clone())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let name = match args.name.clone().or(file.server.name.clone()) {
        Some(n) => ServerName::new(n).context("--name")?,
        None => ServerName::new(config::default_host_name().as_str()).context("server name")?,
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| ([0, 0, 0, 0], DEFAULT_PORT).into());
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(config::default_data_dir);
    let cache_dir = args
        .cache_dir
        .clone()
        .or(file.cache_dir.clone())
        .unwrap_or_else(config::default_cache_dir);
    let subnet = match args.subnet.or(file.network.subnet) {
        Some(s) => s,
        None => "10.213.0.0/24".parse().context("default subnet")?,
    };
    let lease_ttl = Duration::from_secs(
        args.lease_ttl
            .or(file.server.lease_ttl_secs)
            .unwrap_or(10)
            .clamp(2, 600),
    );
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    std::fs::create_dir_all(&cache_dir)
        .with_context(|| format!("cannot create cache directory {}", cache_dir.display()))?;

    let etcd_tls = args.etcd_tls.load()?;
    let store: Arc<dyn Store> = Arc::new(connect_etcd(&etcd, &namespace, etcd_tls.as_ref()).await?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    let url = match args
        .advertise_url
        .clone()
        .or(file.server.advertise_url.clone())
    {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if bound.ip().is_unspecified() => bail!(
            "listening on {bound}: give --advertise-url with the address agents and other servers reach this server at"
        ),
        None if !args.plain_http => format!("https://{bound}"),
        None => format!("http://{bound}"),
    };
    match (args.plain_http, url.starts_with("https://")) {
        (false, false) => bail!(
            "--advertise-url {url} is plain HTTP, but the API is served over TLS: give an https:// URL (or serve plain HTTP with --plain-http)"
        ),
        (true, true) => bail!(
            "--advertise-url {url} is https, but --plain-http serves plain HTTP: give an http:// URL"
        ),
        (true, false) => eprintln!(
            "warning: the API is served over plain HTTP (--plain-http): API tokens cross the network in the clear"
        ),
        (false, true) => {}
    }
    // The CA first: the control plane's own client trusts it.
    let tls = match !args.plain_http {
        true => Some(
            crate::tls::server_config(
                store.as_ref(),
                &data_dir,
                &crate::tls::names_for(bound, &url),
            )
            .await?,
        ),
        false => None,
    };
    let mut cluster = ClusterSettings::single(name.clone(), url.clone());
    cluster.lease_ttl = lease_ttl;
    cluster.ha_reserve_hosts = args
        .ha_reserve_hosts
        .or(file.server.ha_reserve_hosts)
        .unwrap_or(0);
    if let Some(secs) = args.replica_grace.or(file.server.replica_grace_secs) {
        cluster.replica_grace = Duration::from_secs(secs.clamp(1, 86_400));
    }
    cluster.etcd_endpoints = etcd.clone();
    cluster.etcd_namespace = namespace.clone();
    let cp = ControlPlane::start(
        store.clone(),
        ServerConfig {
            data_dir: data_dir.clone(),
            cache_dir,
            guest_binary: None,
            subnet,
            vni: file.network.vni.unwrap_or(4213),
            audit_retention: args
                .audit_retention_days
                .map_or(skyvisor_control::audit::DEFAULT_RETENTION, |d| {
                    Duration::from_secs(u64::from(d.max(1)) * 24 * 3600)
                }),
            event_retention: args
                .event_retention_days
                .map_or(skyvisor_control::events::DEFAULT_RETENTION, |d| {
                    Duration::from_secs(u64::from(d.max(1)) * 24 * 3600)
                }),
            private_vni_base: args
                .private_vni_base
                .or(file.network.private_vni_base)
                .unwrap_or(skyvisor_core::network::PRIVATE_VNI_BASE),
            mtu: args.mtu.or(file.network.mtu).unwrap_or(1450),
            weigher: args
                .weigher
                .or(file.server.weigher)
                .unwrap_or(Weigher::Spread),
            cluster,
            max_upload_bytes: args
                .max_upload
                .or(file.server.max_upload_bytes)
                .unwrap_or(skyvisor_control::DEFAULT_MAX_UPLOAD_BYTES),
            bootstrap_token_file: Some(
                args.bootstrap_token_file
                    .clone()
                    .unwrap_or_else(|| data_dir.join(config::BOOTSTRAP_TOKEN_FILE)),
            ),
        },
    )
    .await
    .context("cannot start the control plane")?;
    let membership = cp.join_cluster().await?;
    let router = skyvisor_control::api::router(cp.clone()).merge(skyvisor_webui::router());
    let mut api = tokio::spawn(skyvisor_auth::tls::serve(listener, tls, router));
    info!(server = %name, %url, etcd = %etcd.join(","), "server running");
    eprintln!(
        "Server {name} serving the API at {url} (etcd {})",
        etcd.join(",")
    );

    if !args.no_default_image {
        let cp = cp.clone();
        // In the background: the API serves (and another server may be
        // building it) meanwhile.
        tokio::spawn(async move {
            match cp
                .ensure_image(DEFAULT_IMAGE, DEFAULT_RECIPE, |m| {
                    info!(image = DEFAULT_IMAGE, "{m}")
                })
                .await
            {
                Ok(_) => info!(image = DEFAULT_IMAGE, "default image ready"),
                Err(e) => {
                    warn!(image = DEFAULT_IMAGE, error = %e.message, "default image not ready")
                }
            }
            if let Err(e) = cp
                .ensure_image(CONTAINER_IMAGE, CONTAINER_RECIPE, |_| {})
                .await
            {
                warn!(image = CONTAINER_IMAGE, error = %e.message, "container image not ready");
            }
        });
    }
    eprintln!("Skyvisor server {name} is up");

    daemon::wait_for_stop(Some(&mut api)).await?;
    eprintln!("Stopping server {name}; another server takes over");
    membership.leave().await;
    Ok(())
}
