//! Replicated volumes on this host: one [`VolumeService`] per agent.
//!
//! It runs the host's replica store (`<data dir>/replicas`) and replica
//! server (other hosts' primaries write to it), and one NBD server on a
//! unix socket (`<data dir>/nbd.sock`) through which the volumes of the VMs
//! running here are served to their QEMUs. Serving a volume means being its
//! primary: [`VolumeService::serve`] opens a `ReplicatedDevice` (using the
//! local replica in process when this host holds one) and exports it;
//! [`VolumeService::release`] removes the export and closes the device.
//!
//! The takeover rule lives here, in [`may_take_over`], and nowhere else: a
//! host serves a volume that the membership record says another host
//! serves only once that host's lease has expired.
//!
//! Submodules: [`membership`] (records in the store), [`controller`]
//! (create, grow, delete, status, clean-up), [`http`] (snapshots on
//! request of the API), [`copy`] (whole-volume copies for checkpoints). This module must never decide placement or touch
//! instance specs: the API owns those.

pub mod controller;
pub mod copy;
pub mod format;
mod freeze;
pub mod http;
pub mod membership;
pub mod pending;
pub mod replicas;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use skyvisor_core::{
    Event, EventKind, HostName, InstanceRef, InstanceVolume, ReplicaState, ReplicaView, VolumeId,
    VolumeName, VolumeRef, VolumeRuntime, VolumeSnapshot, keys,
};
use skyvisor_nbd::{Export, NbdServer, ServerConfig, ServerError};
use skyvisor_store::{Compare, Op, Store, StoreError, StoreExt, encode};
use skyvisor_volume::{
    DeviceOptions, MembershipStore, NodeId, ReplicaServer, ReplicaServerError, ReplicaStore,
    ReplicaStoreOptions, ReplicaSyncState, ReplicatedDevice, VolumeError,
};
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use membership::StoreMembership;
use pending::PendingDevice;

/// How long [`VolumeService::serve`] waits for another live host to stop
/// serving a volume (e.g. to finish a snapshot) before giving up.
const SERVE_WAIT: Duration = Duration::from_secs(30);
/// How often a served volume's runtime record is refreshed.
const RUNTIME_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of controller calls to replica servers.
pub(crate) const REPLICA_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a host's volume service is set up.
#[derive(Debug, Clone)]
pub struct VolumeServiceConfig {
    /// This host.
    pub host: HostName,
    /// The agent's data directory (replicas and the NBD socket go in it).
    pub data_dir: PathBuf,
    /// Where the replica server listens.
    pub replica_listen: SocketAddr,
    /// The address other hosts reach this one at (the port is the replica
    /// server's).
    pub advertise_host: String,
    /// Settings of the devices this host serves.
    pub device: DeviceOptions,
}

/// What can go wrong serving volumes.
#[derive(Debug, Error)]
pub enum VolumeServiceError {
    /// The replica store could not be opened.
    #[error("cannot open the volume replicas in {path}: {message}")]
    Replicas {
        /// Its directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The replica server could not listen.
    #[error(transparent)]
    ReplicaServer(#[from] ReplicaServerError),
    /// The NBD server failed.
    #[error("NBD server: {0}")]
    Nbd(#[from] ServerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The volume has no membership record.
    #[error("volume {name} has no replicas: it is being created or deleted")]
    NoRecord {
        /// The volume.
        name: VolumeName,
    },
    /// A live host serves the volume.
    #[error(
        "volume {name} is served by host {host}, which is alive; it must stop serving it first"
    )]
    ServedElsewhere {
        /// The volume.
        name: VolumeName,
        /// The host serving it.
        host: String,
    },
    /// Another VM on this host uses the volume.
    #[error("volume {name} is already used by VM {instance} on this host")]
    InUse {
        /// The volume.
        name: VolumeName,
        /// The VM using it.
        instance: String,
    },
    /// The data path failed.
    #[error("volume {name}: {source}")]
    Volume {
        /// The volume.
        name: VolumeName,
        /// What failed.
        #[source]
        source: VolumeError,
    },
    /// A snapshot request cannot be carried out.
    #[error("volume {name}: {message}")]
    Snapshot {
        /// The volume.
        name: VolumeName,
        /// Why.
        message: String,
    },
}

/// Where QEMU finds a served volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    /// The NBD server's unix socket.
    pub socket: PathBuf,
    /// The export's name.
    pub export: String,
}

/// One served volume as `/metrics` shows it.
#[derive(Debug, Clone)]
pub struct ServedSample {
    /// The volume.
    pub name: VolumeRef,
    /// Its size in bytes.
    pub size: u64,
    /// Its replicas, epoch and writability, as its runtime record says.
    pub runtime: VolumeRuntime,
    /// The I/O served since this host became its primary.
    pub io: skyvisor_volume::IoSnapshot,
}

/// A volume exported to a migration's destination VM, waiting for the
/// handover (see [`pending`]).
struct Pending {
    export: Arc<PendingDevice>,
    instance: InstanceRef,
}

struct Served {
    device: Arc<ReplicatedDevice>,
    name: VolumeRef,
    instance: Option<InstanceRef>,
    stop_report: CancellationToken,
    reporter: JoinHandle<()>,
}

/// The takeover rule: may this host serve a volume whose membership record
/// names `primary` (another host) as its primary?
///
/// Only once `primary`'s lease has expired (its `hosts/alive/` key is
/// gone). An agent that cannot renew its lease stops its VMs before the
/// lease runs out (it fences itself), so by then nothing writes through the
/// old primary; and even if it did, the replicas refuse its stale epoch.
/// Host failover (restarting a dead host's VMs elsewhere) builds on exactly
/// this: it is the only place where a takeover is decided.
pub async fn may_take_over(store: &dyn Store, primary: &NodeId) -> Result<bool, StoreError> {
    let Ok(host) = HostName::new(primary.as_str()) else {
        // Not one of our hosts: nothing tells us it is gone.
        return Ok(false);
    };
    Ok(store.get(&keys::host_alive(&host)).await?.is_none())
}

/// The error for volume `v` being used by `user` (a VM, or `-` for none:
/// a snapshot or a replica copy).
fn in_use(v: &InstanceVolume, user: Option<&InstanceRef>) -> VolumeServiceError {
    VolumeServiceError::InUse {
        name: v.name.clone(),
        instance: user.map_or_else(|| "-".into(), |i| i.to_string()),
    }
}

/// The disk id (QEMU block node and device id) of a volume in a VM.
pub fn disk_id(v: &InstanceVolume) -> String {
    if v.root {
        "root".into()
    } else {
        let id = v.id.data_id();
        format!("vol{}", &id[..12])
    }
}

/// The serial number the guest sees (`/dev/disk/by-id/virtio-<serial>`,
/// `/sys/block/vdX/serial`): the volume's name, cut to virtio's 20 bytes.
pub fn serial(v: &InstanceVolume) -> String {
    v.name.as_str().chars().take(20).collect()
}

/// This host's volumes: replica store and server, NBD server, the devices
/// it serves.
pub struct VolumeService {
    host: HostName,
    node: NodeId,
    store: Arc<dyn Store>,
    membership: Arc<StoreMembership>,
    replicas: Arc<ReplicaStore>,
    server: ReplicaServer,
    replica_addr: String,
    nbd: NbdServer,
    nbd_socket: PathBuf,
    device: DeviceOptions,
    served: Mutex<HashMap<VolumeId, Served>>,
    pending: Mutex<HashMap<VolumeId, Pending>>,
    /// Exports whose device was closed at a migration's handover; they go
    /// when the old QEMU has exited (see [`VolumeService::hand_off`]).
    handed_off: Mutex<HashMap<VolumeId, InstanceRef>>,
    /// Unserved volumes being converged to their wanted replicas here.
    converging: Mutex<std::collections::HashSet<VolumeId>>,
    locks: Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Scratch space for formatting blank root volumes.
    scratch_dir: PathBuf,
}

impl VolumeService {
    /// Opens the replicas, starts the replica and NBD servers.
    pub async fn start(
        cfg: VolumeServiceConfig,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, VolumeServiceError> {
        let node = NodeId::new(cfg.host.as_str()).map_err(|e| VolumeServiceError::Replicas {
            path: cfg.data_dir.clone(),
            message: e.to_string(),
        })?;
        let dir = cfg.data_dir.join("replicas");
        let replicas = ReplicaStore::open(&dir, node.clone(), ReplicaStoreOptions::default())
            .map_err(|e| VolumeServiceError::Replicas {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        let server = ReplicaServer::start(replicas.clone(), cfg.replica_listen).await?;
        let replica_addr = format!("{}:{}", cfg.advertise_host, server.local_addr().port());
        let nbd = NbdServer::new(ServerConfig::default());
        let nbd_socket = nbd.listen_unix(&cfg.data_dir.join("nbd.sock")).await?;
        info!(host = %cfg.host, %replica_addr, nbd = %nbd_socket.display(), "volume service started");
        Ok(Arc::new(Self {
            host: cfg.host,
            node,
            membership: Arc::new(StoreMembership::new(store.clone())),
            store,
            replicas,
            server,
            replica_addr,
            nbd,
            nbd_socket,
            device: cfg.device,
            served: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            handed_off: Mutex::new(HashMap::new()),
            converging: Mutex::new(std::collections::HashSet::new()),
            locks: Mutex::new(HashMap::new()),
            scratch_dir: cfg.data_dir.join("tmp"),
        }))
    }

    /// What each volume this host serves looks like now, for `/metrics`:
    /// its replicas as the primary sees them and the I/O it served.
    pub fn served_samples(&self) -> Vec<ServedSample> {
        let served: Vec<(VolumeRef, Arc<ReplicatedDevice>)> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| (s.name.clone(), s.device.clone()))
            .collect();
        served
            .into_iter()
            .map(|(name, device)| ServedSample {
                runtime: runtime_of(&self.host, None, &device),
                size: skyvisor_nbd::BlockDevice::size(device.as_ref()),
                io: device.io_stats(),
                name,
            })
            .collect()
    }

    /// Where other hosts reach this host's replica server (`host:port`).
    pub fn replica_addr(&self) -> &str {
        &self.replica_addr
    }

    /// This host's replicas.
    pub fn replicas(&self) -> &Arc<ReplicaStore> {
        &self.replicas
    }

    /// The NBD server's socket.
    pub fn nbd_socket(&self) -> &std::path::Path {
        &self.nbd_socket
    }

    /// Stops the servers. Devices are not closed: VMs keep running and the
    /// next agent serves their volumes again (QEMU reconnects).
    pub async fn shutdown(&self) {
        // Reports stop with the agent; their records stay (a crashed agent
        // leaves them too) until the next primary writes its own.
        for s in self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            s.reporter.abort();
        }
        self.server.shutdown().await;
        self.nbd.shutdown().await;
    }

    fn lock_for(&self, id: &VolumeId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*id)
            .or_default()
            .clone()
    }

    fn served_device(&self, id: &VolumeId) -> Option<(Arc<ReplicatedDevice>, Option<InstanceRef>)> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|s| (s.device.clone(), s.instance.clone()))
    }

    /// The volumes served (or exported, waiting for a migration's
    /// handover) for `instance`.
    pub fn served_for(&self, instance: &InstanceRef) -> Vec<VolumeId> {
        let mut ids: Vec<VolumeId> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, s)| s.instance.as_ref() == Some(instance))
            .map(|(id, _)| *id)
            .collect();
        ids.extend(
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, p)| &p.instance == instance)
                .map(|(id, _)| *id),
        );
        ids.extend(
            self.handed_off
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, i)| *i == instance)
                .map(|(id, _)| *id),
        );
        ids
    }

    /// At a live migration's handover to host `to`: closes the devices of
    /// `instance`'s volumes (flushing every replica and naming `to` their
    /// primary, so that the destination opens them at once) but keeps their exports until
    /// [`VolumeService::release_instance`]: the paused source QEMU stays
    /// connected and quits at once, instead of trying to reconnect to a
    /// vanished export first.
    pub async fn hand_off(&self, instance: &InstanceRef, to: &HostName) {
        let next = NodeId::new(to.as_str()).ok();
        let ids: Vec<VolumeId> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, s)| s.instance.as_ref() == Some(instance))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let lock = self.lock_for(&id);
            let _g = lock.lock().await;
            let Some(served) = self
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id)
            else {
                continue;
            };
            self.handed_off
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, instance.clone());
            served.stop_report.cancel();
            let _ = served.reporter.await;
            if let Err(e) = served.device.close_to(next.as_ref()).await {
                warn!(volume = %id, error = %e, "closing the volume at the handover failed");
            }
            info!(volume = %id, "handed the volume over");
        }
    }

    /// Removes the export an earlier copy of the VM left at its handover
    /// (normally gone already: the source removes it once its QEMU quit).
    async fn drop_handed_off(&self, id: &VolumeId) {
        let was = self
            .handed_off
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if was.is_some() {
            self.nbd.remove_export(&id.data_id()).await;
        }
    }

    fn pending_export(&self, id: &VolumeId) -> Option<(Arc<PendingDevice>, InstanceRef)> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|p| (p.export.clone(), p.instance.clone()))
    }

    /// Exports volume `v` for a migration's destination VM of `instance`
    /// without becoming its primary: the source still is. QEMU can connect
    /// at once; its requests wait until [`VolumeService::serve`] is called
    /// for the same VM after the handover. Idempotent.
    pub async fn serve_incoming(
        self: &Arc<Self>,
        v: &InstanceVolume,
        instance: &InstanceRef,
    ) -> Result<NbdTarget, VolumeServiceError> {
        let lock = self.lock_for(&v.id);
        let _g = lock.lock().await;
        let target = NbdTarget {
            socket: self.nbd_socket.clone(),
            export: v.id.data_id(),
        };
        self.drop_handed_off(&v.id).await;
        if let Some((_, user)) = self.served_device(&v.id) {
            return Err(in_use(v, user.as_ref()));
        }
        if let Some((_, user)) = self.pending_export(&v.id) {
            return if &user == instance {
                Ok(target)
            } else {
                Err(in_use(v, Some(&user)))
            };
        }
        let data_id = data_id(&v.name, &v.id)?;
        let record = self
            .membership
            .load(&data_id)
            .await
            .map_err(|e| VolumeServiceError::Volume {
                name: v.name.clone(),
                source: e.into(),
            })?
            .ok_or_else(|| VolumeServiceError::NoRecord {
                name: v.name.clone(),
            })?;
        let export = PendingDevice::new(
            record.value.size,
            pending::EarlyReads {
                volume: data_id,
                membership: self.membership.clone() as Arc<dyn MembershipStore>,
                local: self.replicas.clone(),
                node: self.node.clone(),
            },
        );
        self.nbd.add_export(
            Export::new(target.export.clone(), export.clone())
                .with_description(format!("volume {} (waiting for its handover)", v.name)),
        )?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                v.id,
                Pending {
                    export,
                    instance: instance.clone(),
                },
            );
        info!(volume = %v.name, %instance, "volume exported for an incoming migration");
        Ok(target)
    }

    /// Whether this host serves volume `id`.
    pub fn is_serving(&self, id: &VolumeId) -> bool {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// Opens the volume as its primary on this host, following the
    /// takeover rule; waits a while for another live host to let go.
    /// Call with the volume's lock held.
    async fn open_device(
        &self,
        name: &VolumeName,
        id: &VolumeId,
    ) -> Result<Arc<ReplicatedDevice>, VolumeServiceError> {
        let data_id = data_id(name, id)?;
        let started = tokio::time::Instant::now();
        let deadline = started + SERVE_WAIT;
        // A live migration's source lets go within milliseconds of the
        // handover (which the destination may see first, and the guest's
        // clients wait on): look again very soon at first, then less often.
        let pause = || {
            if started.elapsed() < Duration::from_secs(1) {
                Duration::from_millis(2)
            } else if started.elapsed() < Duration::from_secs(2) {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(300)
            }
        };
        loop {
            let record = self
                .membership
                .load(&data_id)
                .await
                .map_err(|e| VolumeServiceError::Volume {
                    name: name.clone(),
                    source: e.into(),
                })?
                .ok_or_else(|| VolumeServiceError::NoRecord { name: name.clone() })?;
            let takeover = match &record.value.primary {
                None => false,
                Some(p) if p == &self.node => false,
                Some(p) => {
                    if may_take_over(self.store.as_ref(), p).await? {
                        info!(volume = %name, old_primary = %p, "taking the volume over: its primary's lease expired");
                        true
                    } else if tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(pause()).await;
                        continue;
                    } else {
                        return Err(VolumeServiceError::ServedElsewhere {
                            name: name.clone(),
                            host: p.to_string(),
                        });
                    }
                }
            };
            // Replicas on hosts whose lease is gone are not waited for.
            let mut known_down = Vec::new();
            for r in &record.value.replicas {
                if may_take_over(self.store.as_ref(), &r.node).await? {
                    known_down.push(r.node.clone());
                }
            }
            let options = DeviceOptions {
                takeover,
                known_down,
                ..self.device.clone()
            };
            let opening = tokio::time::Instant::now();
            match ReplicatedDevice::open(
                data_id.clone(),
                self.node.clone(),
                self.membership.clone() as Arc<dyn MembershipStore>,
                Some(self.replicas.clone()),
                options,
            )
            .await
            {
                Ok(dev) => {
                    tracing::debug!(volume = %name,
                        waited_ms = (opening - started).as_millis() as u64,
                        open_ms = opening.elapsed().as_millis() as u64,
                        "opened the volume as its primary");
                    return Ok(dev);
                }
                Err(
                    VolumeError::PrimaryElsewhere { .. } | VolumeError::ConcurrentChange { .. },
                ) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(pause()).await;
                }
                Err(source) => {
                    return Err(VolumeServiceError::Volume {
                        name: name.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Serves volume `v` for `instance`: becomes its primary and exports it
    /// on the NBD socket. Idempotent for the same VM.
    pub async fn serve(
        self: &Arc<Self>,
        v: &InstanceVolume,
        instance: &InstanceRef,
    ) -> Result<NbdTarget, VolumeServiceError> {
        let lock = self.lock_for(&v.id);
        let _g = lock.lock().await;
        let target = NbdTarget {
            socket: self.nbd_socket.clone(),
            export: v.id.data_id(),
        };
        self.drop_handed_off(&v.id).await;
        if let Some((device, user)) = self.served_device(&v.id) {
            if let Some(why) = device.status().fenced {
                // Another host took the volume over since (this host was
                // fenced or cut off): this device can serve nothing more.
                // Drop it and open the volume again.
                info!(volume = %v.name, reason = %why, "discarding a fenced device before serving again");
                self.release_locked(&v.id).await;
            } else {
                return match user {
                    Some(u) if &u == instance => Ok(target),
                    other => Err(in_use(v, other.as_ref())),
                };
            }
        }
        let pending = self.pending_export(&v.id);
        if let Some((_, user)) = &pending
            && user != instance
        {
            return Err(in_use(v, Some(user)));
        }
        let device = self.open_device(&v.name, &v.id).await?;
        match pending {
            // A migrated VM's export: its requests go to the device now.
            Some((export, _)) => {
                export.activate(device.clone());
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&v.id);
            }
            None => {
                let export = Export::new(target.export.clone(), device.clone())
                    .with_description(format!("volume {}", v.name));
                if let Err(e) = self.nbd.add_export(export) {
                    let _ = device.close().await;
                    return Err(e.into());
                }
            }
        }
        let stop_report = CancellationToken::new();
        let reporter = tokio::spawn(report_runtime(
            self.store.clone(),
            self.host.clone(),
            VolumeRef::new(instance.project.clone(), v.name.clone()),
            Some(instance.clone()),
            device.clone(),
            stop_report.clone(),
        ));
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                v.id,
                Served {
                    device,
                    name: VolumeRef::new(instance.project.clone(), v.name.clone()),
                    instance: Some(instance.clone()),
                    stop_report,
                    reporter,
                },
            );
        info!(volume = %v.name, %instance, "serving volume");
        Ok(target)
    }

    /// Stops serving volume `v`: removes its export (QEMU must no longer
    /// use it), closes the device (flushing every replica and clearing the
    /// record's primary) and removes its runtime record.
    pub async fn release(&self, id: &VolumeId) {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        self.release_locked(id).await;
    }

    /// [`VolumeService::release`], with the volume's lock held.
    async fn release_locked(&self, id: &VolumeId) {
        let handed_off = self
            .handed_off
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if handed_off.is_some() {
            self.nbd.remove_export(&id.data_id()).await;
        }
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(p) = pending {
            p.export.close();
            self.nbd.remove_export(&id.data_id()).await;
            info!(volume = %id, "dropped the export of an incoming migration");
        }
        let Some(served) = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        else {
            return;
        };
        self.nbd.remove_export(&id.data_id()).await;
        served.stop_report.cancel();
        let _ = served.reporter.await;
        if let Err(e) = served.device.close().await {
            warn!(volume = %id, error = %e, "closing the volume failed");
        }
        info!(volume = %id, "stopped serving volume");
    }

    /// Gives a blank volume this host serves an ext4 file system (see
    /// [`format`]); returns whether it did.
    pub async fn format_if_blank(&self, id: &VolumeId) -> Result<bool, String> {
        let device = self.served_or_err(id)?;
        format::format_if_blank(device.as_ref(), &self.scratch_dir).await
    }

    /// The device of a volume served here, or an error saying it is not.
    fn served_or_err(&self, id: &VolumeId) -> Result<Arc<ReplicatedDevice>, String> {
        self.served_device(id)
            .map(|(d, _)| d)
            .ok_or_else(|| format!("volume {id} is not served here"))
    }

    /// The size of a volume served here.
    pub fn served_size(&self, id: &VolumeId) -> Result<u64, String> {
        Ok(skyvisor_nbd::device::BlockDevice::size(
            self.served_or_err(id)?.as_ref(),
        ))
    }

    /// Copies a volume served here into `file`, a new sparse raw file (see
    /// [`copy::read_to_file`]).
    pub async fn copy_to_file(&self, id: &VolumeId, file: &std::path::Path) -> Result<u64, String> {
        copy::read_to_file(self.served_or_err(id)?.as_ref(), file).await
    }

    /// Makes a volume served here read as raw `file` (see
    /// [`copy::write_from_file`]).
    pub async fn copy_from_file(
        &self,
        id: &VolumeId,
        file: &std::path::Path,
    ) -> Result<u64, String> {
        copy::write_from_file(self.served_or_err(id)?.as_ref(), file).await
    }

    /// Makes a volume served here read as disk image `image` (of QEMU
    /// format `format`, e.g. `qcow2`, following its backing files): the
    /// image is converted to a sparse raw scratch file, which is then
    /// written over the volume (see [`copy::write_from_file`]).
    pub async fn fill_from_image(
        &self,
        id: &VolumeId,
        image: &std::path::Path,
        format: &str,
    ) -> Result<u64, String> {
        let scratch = copy::scratch_file(&self.scratch_dir, ".fill-").await?;
        crate::disks::convert(image, format, scratch.path(), "raw").await?;
        self.copy_from_file(id, scratch.path()).await
    }

    /// Whether the start of a volume served here reads as zeroes.
    pub async fn is_blank(&self, id: &VolumeId) -> Result<bool, String> {
        copy::is_blank(self.served_or_err(id)?.as_ref()).await
    }

    /// Stops serving every volume served for `instance`.
    pub async fn release_instance(&self, instance: &InstanceRef) {
        for id in self.served_for(instance) {
            self.release(&id).await;
        }
    }

    /// Takes a snapshot named `snapshot` of a volume and records it with
    /// its `consistency` (the caller froze the guest, or not). If this host serves the volume, through its device;
    /// else the volume is opened here for the snapshot (under the takeover
    /// rule) and closed again.
    pub async fn snapshot(
        &self,
        name: &VolumeRef,
        id: &VolumeId,
        snapshot: &str,
        consistency: skyvisor_core::volume::SnapshotConsistency,
    ) -> Result<VolumeSnapshot, VolumeServiceError> {
        let vref = name;
        let name = &vref.name;
        let snap_err = |m: String| VolumeServiceError::Snapshot {
            name: name.clone(),
            message: m,
        };
        skyvisor_core::volume::validate_snapshot_name(snapshot)
            .map_err(|e| snap_err(e.to_string()))?;
        let key = keys::volume_snapshot(vref, snapshot);
        if self.store.get(&key).await?.is_some() {
            return Err(snap_err(format!("snapshot {snapshot} exists")));
        }
        let (holders, epoch, size) = match self.served_device(id) {
            Some((dev, _)) => {
                let holders =
                    dev.snapshot(snapshot)
                        .await
                        .map_err(|source| VolumeServiceError::Volume {
                            name: name.clone(),
                            source,
                        })?;
                let m = dev.membership();
                (holders, m.epoch, m.size)
            }
            None => {
                let lock = self.lock_for(id);
                let _g = lock.lock().await;
                let dev = self.open_device(name, id).await?;
                let r = dev.snapshot(snapshot).await;
                let m = dev.membership();
                if let Err(e) = dev.close().await {
                    warn!(volume = %name, error = %e, "closing after a snapshot failed");
                }
                let holders = r.map_err(|source| VolumeServiceError::Volume {
                    name: name.clone(),
                    source,
                })?;
                (holders, m.epoch, m.size)
            }
        };
        let record = VolumeSnapshot {
            volume: name.clone(),
            volume_id: *id,
            name: snapshot.to_owned(),
            size_bytes: size,
            epoch,
            hosts: holders
                .iter()
                .filter_map(|n| HostName::new(n.as_str()).ok())
                .collect(),
            created_at: Utc::now(),
            consistency,
        };
        let event = Event::volume_snapshot(
            EventKind::Created,
            vref,
            snapshot,
            format!("taken on {}", host_list(&record.hosts)),
        )
        .stored(record.size_bytes, record.hosts.len() as u32);
        let out = self
            .store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![
                    Op::Put {
                        key,
                        value: encode(&record),
                        lease: None,
                    },
                    crate::event_op(&event),
                ],
            )
            .await?;
        if !out.succeeded {
            return Err(snap_err(format!("snapshot {snapshot} exists")));
        }
        info!(volume = %name, snapshot, hosts = ?record.hosts, "volume snapshot taken");
        Ok(record)
    }

    /// Deletes a snapshot from every replica holding it, then its record.
    /// Fails, keeping the record, if a holder cannot be reached.
    pub async fn delete_snapshot(
        &self,
        name: &VolumeRef,
        snapshot: &str,
    ) -> Result<(), VolumeServiceError> {
        let vref = name;
        let name = &vref.name;
        let snap_err = |m: String| VolumeServiceError::Snapshot {
            name: name.clone(),
            message: m,
        };
        let key = keys::volume_snapshot(vref, snapshot);
        let Some((record, rev)) = self.store.get_json::<VolumeSnapshot>(&key).await? else {
            return Err(snap_err(format!("snapshot {snapshot} not found")));
        };
        let data_id = data_id(name, &record.volume_id)?;
        let membership =
            self.membership
                .load(&data_id)
                .await
                .map_err(|e| VolumeServiceError::Volume {
                    name: name.clone(),
                    source: e.into(),
                })?;
        let mut failed = vec![];
        if let Some(m) = membership {
            for host in &record.hosts {
                let Some(member) = m
                    .value
                    .replicas
                    .iter()
                    .find(|r| r.node.as_str() == host.as_str())
                else {
                    continue;
                };
                if let Err(e) = skyvisor_volume::call_replica(
                    &data_id,
                    &member.node,
                    &member.addr,
                    m.value.epoch,
                    skyvisor_volume::wire::Request::DeleteSnapshot {
                        name: snapshot.to_owned(),
                    },
                    Some(&self.replicas),
                    REPLICA_CALL_TIMEOUT,
                )
                .await
                {
                    failed.push(format!("{host}: {e}"));
                }
            }
        }
        if !failed.is_empty() {
            return Err(snap_err(format!(
                "could not delete snapshot {snapshot} everywhere ({}); retry",
                failed.join("; ")
            )));
        }
        let event = Event::volume_snapshot(EventKind::Deleted, vref, snapshot, "deleted");
        self.store
            .txn(
                vec![Compare::ModRevision(key.clone(), rev)],
                vec![Op::Delete(key), crate::event_op(&event)],
            )
            .await?;
        info!(volume = %name, snapshot, "volume snapshot deleted");
        Ok(())
    }
}

/// Hosts as a comma-separated list, for messages.
fn host_list(hosts: &[HostName]) -> String {
    hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn data_id(
    name: &VolumeName,
    id: &VolumeId,
) -> Result<skyvisor_volume::VolumeId, VolumeServiceError> {
    skyvisor_volume::VolumeId::new(id.data_id()).map_err(|e| VolumeServiceError::Snapshot {
        name: name.clone(),
        message: e.to_string(),
    })
}

/// The runtime record of a served volume, from its device's status.
fn runtime_of(
    host: &HostName,
    instance: Option<&InstanceRef>,
    dev: &ReplicatedDevice,
) -> VolumeRuntime {
    let st = dev.status();
    let replicas = st
        .replicas
        .iter()
        .filter_map(|r| {
            let host = HostName::new(r.node.as_str()).ok()?;
            let (state, done, total, message) = match &r.state {
                ReplicaSyncState::InSync => (ReplicaState::InSync, None, None, None),
                ReplicaSyncState::Resyncing { done, total } => {
                    (ReplicaState::Resyncing, Some(*done), Some(*total), None)
                }
                ReplicaSyncState::Stale { error } => {
                    (ReplicaState::OutOfSync, None, None, error.clone())
                }
                ReplicaSyncState::Degraded { error } => {
                    (ReplicaState::Unreachable, None, None, error.clone())
                }
            };
            Some(ReplicaView {
                host,
                address: r.addr.clone(),
                state,
                resync_done_bytes: done,
                resync_total_bytes: total,
                read_source: r.read_source,
                message,
            })
        })
        .collect();
    VolumeRuntime {
        host: host.clone(),
        instance: instance.map(|i| i.name.clone()),
        epoch: st.epoch,
        writable: st.writable && st.fenced.is_none(),
        replicas,
        resynced_bytes: st.resynced_bytes,
        updated_at: Utc::now(),
    }
}

/// Publishes a served volume's runtime record while it is served, then
/// removes it.
async fn report_runtime(
    store: Arc<dyn Store>,
    host: HostName,
    name: VolumeRef,
    instance: Option<InstanceRef>,
    dev: Arc<ReplicatedDevice>,
    stop: CancellationToken,
) {
    let key = keys::volume_runtime(&name);
    let mut last: Option<VolumeRuntime> = None;
    loop {
        let mut now = runtime_of(&host, instance.as_ref(), &dev);
        let changed = match &last {
            Some(l) => {
                now.updated_at = l.updated_at;
                *l != now
            }
            None => true,
        };
        if changed {
            now.updated_at = Utc::now();
            match store.put(&key, encode(&now)).await {
                Ok(_) => last = Some(now),
                Err(e) => warn!(volume = %name, error = %e, "could not write the volume's runtime"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(RUNTIME_INTERVAL) => {}
        }
    }
    if let Err(e) = store.delete(&key).await {
        warn!(volume = %name, error = %e, "could not remove the volume's runtime");
    }
}
