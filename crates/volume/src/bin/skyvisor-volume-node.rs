//! A "host" for tests and benchmarks: one process running a node's replica
//! server and, on request, the primary of volumes served over NBD. Driven
//! through a line-based control socket so tests can kill it like a host.
//!
//! Control commands (one per line, answer is one JSON line):
//! `ping`, `create VOLUME SIZE MIN_IN_SYNC NODE=ADDR...`,
//! `open VOLUME NBD_ADDR TAKEOVER(0|1)`, `status VOLUME`,
//! `snapshot VOLUME NAME`, `add-replica VOLUME NODE ADDR`,
//! `remove-replica VOLUME NODE`, `close VOLUME`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use skyvisor_nbd::{Export, NbdServer, ServerConfig};
use skyvisor_volume::{
    DeviceOptions, FileMembershipStore, MembershipStore, NodeId, ReplicaServer, ReplicaStore,
    ReplicaStoreOptions, ReplicatedDevice, VolumeId, VolumeSpec, create_volume,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Mutex;

#[derive(Parser, Debug)]
#[command(about = "Skyvisor volume node (replica server + primary) for tests and benchmarks")]
struct Args {
    /// This node's id.
    #[arg(long)]
    node: String,
    /// Replica data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Replica server address.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Shared membership directory (FileMembershipStore).
    #[arg(long)]
    membership_dir: PathBuf,
    /// Control socket path.
    #[arg(long)]
    control: PathBuf,
    /// Replica request timeout, milliseconds.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// Retry interval for out-of-sync replicas, milliseconds.
    #[arg(long, default_value_t = 500)]
    reconnect_ms: u64,
    /// Mutual TLS on replica links, from `ca.pem`, `chain.pem` (this
    /// node's certificate, then the CA's) and `key.pem` in this directory.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
}

struct Host {
    args: Args,
    store: Arc<ReplicaStore>,
    membership: Arc<dyn MembershipStore>,
    nbd: NbdServer,
    listeners: Mutex<HashMap<String, std::net::SocketAddr>>,
    devices: Mutex<HashMap<VolumeId, Arc<ReplicatedDevice>>>,
}

impl Host {
    fn options(&self, takeover: bool) -> DeviceOptions {
        DeviceOptions {
            request_timeout: Duration::from_millis(self.args.request_timeout_ms),
            connect_timeout: Duration::from_millis(self.args.request_timeout_ms.min(2000)),
            reconnect_interval: Duration::from_millis(self.args.reconnect_ms),
            checkpoint_interval: Duration::from_secs(1),
            membership_check_interval: Duration::from_millis(500),
            takeover,
            known_down: Vec::new(),
        }
    }

    async fn device(&self, v: &VolumeId) -> anyhow::Result<Arc<ReplicatedDevice>> {
        self.devices
            .lock()
            .await
            .get(v)
            .cloned()
            .context("volume not open here")
    }

    async fn command(&self, line: &str) -> anyhow::Result<serde_json::Value> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ping"] => Ok(serde_json::json!({"node": self.args.node})),
            ["create", volume, size, min, replicas @ ..] => {
                let mut spec = VolumeSpec::new(
                    VolumeId::new(*volume)?,
                    size.parse()?,
                    replicas
                        .iter()
                        .map(|r| {
                            let (n, a) = r.split_once('=').context("NODE=ADDR")?;
                            Ok((NodeId::new(n)?, a.to_owned()))
                        })
                        .collect::<anyhow::Result<_>>()?,
                );
                spec.min_in_sync = min.parse()?;
                let m = create_volume(
                    &*self.membership,
                    &spec,
                    Some(&self.store),
                    Duration::from_secs(10),
                )
                .await?;
                Ok(serde_json::to_value(m)?)
            }
            ["open", volume, nbd_addr, takeover] => {
                let v = VolumeId::new(*volume)?;
                let dev = ReplicatedDevice::open(
                    v.clone(),
                    NodeId::new(&self.args.node)?,
                    self.membership.clone(),
                    Some(self.store.clone()),
                    self.options(*takeover == "1"),
                )
                .await?;
                let addr = {
                    let mut l = self.listeners.lock().await;
                    match l.get(*nbd_addr) {
                        Some(a) => *a,
                        None => {
                            let a = self.nbd.listen_tcp(nbd_addr.parse()?).await?;
                            l.insert((*nbd_addr).to_owned(), a);
                            a
                        }
                    }
                };
                self.nbd.remove_export(volume).await;
                self.nbd.add_export(Export::new(*volume, dev.clone()))?;
                self.devices.lock().await.insert(v, dev);
                Ok(serde_json::json!({"nbd": addr.to_string()}))
            }
            ["status", volume] => Ok(serde_json::to_value(
                self.device(&VolumeId::new(*volume)?).await?.status(),
            )?),
            ["snapshot", volume, name] => {
                let nodes = self
                    .device(&VolumeId::new(*volume)?)
                    .await?
                    .snapshot(name)
                    .await?;
                Ok(serde_json::to_value(nodes)?)
            }
            ["add-replica", volume, node, addr] => {
                self.device(&VolumeId::new(*volume)?)
                    .await?
                    .add_replica(&NodeId::new(*node)?, addr)
                    .await?;
                Ok(serde_json::json!({}))
            }
            ["remove-replica", volume, node] => {
                self.device(&VolumeId::new(*volume)?)
                    .await?
                    .remove_replica(&NodeId::new(*node)?)
                    .await?;
                Ok(serde_json::json!({}))
            }
            ["close", volume] => {
                let v = VolumeId::new(*volume)?;
                self.nbd.remove_export(volume).await;
                let dev = self
                    .devices
                    .lock()
                    .await
                    .remove(&v)
                    .context("volume not open here")?;
                dev.close().await?;
                Ok(serde_json::json!({}))
            }
            _ => bail!("unknown command {line:?}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(dir) = &args.tls_dir {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("reading {}", dir.join(f).display()))
        };
        let tls = skyvisor_volume::link_tls::LinkTls::from_pem(
            &read("chain.pem")?,
            &read("key.pem")?,
            &read("ca.pem")?,
        )?;
        skyvisor_volume::link_tls::set_process_tls(tls);
    }
    let store = ReplicaStore::open(
        &args.data_dir,
        NodeId::new(&args.node)?,
        ReplicaStoreOptions::default(),
    )?;
    let server = ReplicaServer::start(store.clone(), args.listen).await?;
    let membership: Arc<dyn MembershipStore> =
        Arc::new(FileMembershipStore::new(&args.membership_dir)?);
    let _ = std::fs::remove_file(&args.control);
    let control = UnixListener::bind(&args.control).context("control socket")?;
    let host = Arc::new(Host {
        args,
        store,
        membership,
        nbd: NbdServer::new(ServerConfig::default()),
        listeners: Mutex::new(HashMap::new()),
        devices: Mutex::new(HashMap::new()),
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            c = control.accept() => {
                let Ok((stream, _)) = c else { continue };
                let host = host.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let answer = match host.command(&line).await {
                            Ok(v) => serde_json::json!({"ok": v}),
                            Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                        };
                        if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
    let devices: Vec<_> = host.devices.lock().await.drain().collect();
    host.nbd.shutdown().await;
    for (_, d) in devices {
        let _ = d.close().await;
    }
    server.shutdown().await;
    Ok(())
}
