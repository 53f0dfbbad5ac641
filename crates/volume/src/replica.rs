//! Replicas on one node: [`ReplicaStore`] holds the node's replicas (one
//! sparse data file per volume plus durable metadata and bitmaps) and
//! executes replica protocol requests against them.
//!
//! Fencing lives here: every data request must carry the replica's current
//! epoch, and [`Request::SetEpoch`] only ever raises it (durably, before it
//! answers). The epoch check and the data write happen under one read lock
//! that `SetEpoch` takes exclusively, so no write of an older epoch can land
//! after a newer epoch was accepted. Dirty and activity bits are durable
//! before the data they protect is written. This module must never serve a
//! read from a replica that is not consistent.
//!
//! Layout of a data directory:
//! `node.json`, `volumes/<volume>/{meta.json, data.img, activity.bitmap,
//! dirty-<peer>.bitmap, snapshots/<name>.img}`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use skyvisor_nbd::{BlockDevice, BlockSizeConstraints, DeviceError, FileDevice, FileDeviceOptions};
use tracing::{debug, info, warn};

use crate::bitmap::{Bitmap, PendingPages, PersistentBitmap};
use crate::fsutil;
use crate::ids::{NodeId, VolumeId};
use crate::wire::{DiskState, ReplicaState, Request, RequestFrame, Response, Role, WireError};

/// Errors opening a node's data directory.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaStoreError {
    /// The directory or a file in it could not be used.
    #[error("replica data directory {path}: {message}")]
    DataDir {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The directory belongs to another node.
    #[error("data directory {path} belongs to node {found}, not {expected}")]
    WrongNode {
        /// The path.
        path: PathBuf,
        /// The node recorded in it.
        found: NodeId,
        /// The node that tried to open it.
        expected: NodeId,
    },
}

/// Settings of a replica store.
#[derive(Debug, Clone)]
pub struct ReplicaStoreOptions {
    /// Activity-log extents idle for this long may be forgotten at a checkpoint.
    pub activity_idle: Duration,
}

impl Default for ReplicaStoreOptions {
    fn default() -> Self {
        Self {
            activity_idle: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeFile {
    node: NodeId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format: u32,
    volume: VolumeId,
    node: NodeId,
    size: u64,
    region_size: u32,
    extent_size: u32,
    epoch: u64,
    disk: DiskState,
    out_of_sync: Vec<NodeId>,
    track_activity: bool,
}

#[derive(Debug)]
struct Tracking {
    peers: BTreeMap<NodeId, PersistentBitmap>,
    activity: PersistentBitmap,
    /// Last write per activity extent in this process: (epoch, seq, when).
    last: HashMap<u64, (u64, u64, Instant)>,
}

/// One replica of one volume on this node.
#[derive(Debug)]
pub struct Replica {
    dir: PathBuf,
    volume: VolumeId,
    node: NodeId,
    size: u64,
    region_size: u32,
    extent_size: u32,
    data: FileDevice,
    meta: Mutex<Meta>,
    gate: tokio::sync::RwLock<()>,
    tracking: tokio::sync::Mutex<Tracking>,
    activity_idle: Duration,
    /// Replaced by a reopened replica (after a resize): refuses everything
    /// so that no request still holding this copy writes stale metadata.
    retired: AtomicBool,
}

fn io_err(e: impl std::fmt::Display) -> WireError {
    WireError::Io(e.to_string())
}

fn dev_err(e: DeviceError) -> WireError {
    match e {
        DeviceError::NoSpace { .. } => WireError::NoSpace,
        DeviceError::Invalid(m) => WireError::Invalid(m),
        other => WireError::Io(other.to_string()),
    }
}

fn valid_snapshot_name(name: &str) -> Result<(), WireError> {
    VolumeId::new(name)
        .map(drop)
        .map_err(|e| WireError::Invalid(e.to_string()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, WireError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOSPC) => Err(WireError::NoSpace),
        Ok(Err(e)) => Err(io_err(e)),
        Err(e) => Err(io_err(e)),
    }
}

impl Replica {
    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The volume.
    pub fn volume(&self) -> &VolumeId {
        &self.volume
    }

    /// The path of the data file.
    pub fn data_path(&self) -> PathBuf {
        self.dir.join("data.img")
    }

    /// The path of a snapshot's image.
    pub fn snapshot_path(&self, name: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{name}.img"))
    }

    /// The replica's description.
    pub fn state(&self) -> ReplicaState {
        let m = self.meta();
        ReplicaState {
            node: self.node.clone(),
            size: self.size,
            region_size: self.region_size,
            extent_size: self.extent_size,
            epoch: m.epoch,
            disk: m.disk,
            tracking: m.out_of_sync.clone(),
        }
    }

    fn regions(&self) -> u64 {
        self.size.div_ceil(u64::from(self.region_size))
    }

    fn check_retired(&self) -> Result<(), WireError> {
        if self.retired.load(Ordering::Acquire) {
            return Err(WireError::Io("the replica was reopened; retry".into()));
        }
        Ok(())
    }

    fn check_epoch(&self, epoch: u64) -> Result<(), WireError> {
        self.check_retired()?;
        let current = self.meta().epoch;
        if epoch != current {
            return Err(WireError::StaleEpoch {
                request: epoch,
                current,
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), WireError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(WireError::Invalid(format!(
                "range {offset}+{len} beyond {}",
                self.size
            ))),
        }
    }

    async fn persist_meta(&self) -> Result<(), WireError> {
        let bytes = serde_json::to_vec_pretty(&*self.meta()).map_err(io_err)?;
        let path = self.dir.join("meta.json");
        blocking(move || fsutil::write_atomic(&path, &bytes)).await
    }

    /// Marks the regions of a write in every tracked bitmap, durably.
    async fn mark_write(
        &self,
        offset: u64,
        len: u64,
        epoch: u64,
        seq: u64,
    ) -> Result<(), WireError> {
        if len == 0 {
            return Ok(());
        }
        let track = {
            let m = self.meta();
            if m.out_of_sync.is_empty() && !m.track_activity {
                return Ok(());
            }
            m.track_activity
        };
        let mut t = self.tracking.lock().await;
        let rs = u64::from(self.region_size);
        let (r0, r1) = (offset / rs, (offset + len - 1) / rs + 1);
        for bm in t.peers.values_mut() {
            bm.set_range(r0, r1);
        }
        if track {
            let es = u64::from(self.extent_size);
            let (e0, e1) = (offset / es, (offset + len - 1) / es + 1);
            t.activity.set_range(e0, e1);
            let now = Instant::now();
            for e in e0..e1 {
                t.last.insert(e, (epoch, seq, now));
            }
        }
        let mut pending: Vec<PendingPages> =
            t.peers.values_mut().map(|b| b.take_dirty_pages()).collect();
        pending.push(t.activity.take_dirty_pages());
        pending.retain(|p| !p.is_empty());
        if !pending.is_empty() {
            // Durable before the data write; other writers wait on the lock,
            // so nobody relies on bits that are only in memory.
            blocking(move || pending.into_iter().try_for_each(|p| p.write(true))).await?;
        }
        Ok(())
    }

    async fn set_epoch(
        &self,
        epoch: u64,
        role: Role,
        out_of_sync: Vec<NodeId>,
        track_activity: bool,
    ) -> Result<(), WireError> {
        let _g = self.gate.write().await;
        self.check_retired()?;
        let mut t = self.tracking.lock().await;
        {
            let mut m = self.meta();
            if epoch < m.epoch {
                return Err(WireError::StaleEpoch {
                    request: epoch,
                    current: m.epoch,
                });
            }
            m.epoch = epoch;
            m.disk = match (role, m.disk) {
                (Role::InSync, _) => DiskState::Consistent,
                (Role::ResyncTarget, _) => DiskState::Inconsistent,
                (Role::OutOfSync, DiskState::Consistent) => DiskState::Outdated,
                (Role::OutOfSync, d) => d,
            };
            m.out_of_sync = out_of_sync
                .iter()
                .filter(|n| **n != self.node)
                .cloned()
                .collect();
            m.track_activity = track_activity;
        }
        self.persist_meta().await?;
        let wanted: Vec<NodeId> = self.meta().out_of_sync.clone();
        let stale: Vec<NodeId> = t
            .peers
            .keys()
            .filter(|p| !wanted.contains(p))
            .cloned()
            .collect();
        for p in stale {
            if let Some(bm) = t.peers.remove(&p) {
                let path = bm.path().to_owned();
                let _ = blocking(move || std::fs::remove_file(path)).await;
            }
        }
        for p in wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = t.peers.entry(p.clone()) {
                let path = self.dir.join(format!("dirty-{p}.bitmap"));
                let len = self.regions();
                let bm = blocking(move || PersistentBitmap::open(&path, len)).await?;
                slot.insert(bm);
            }
        }
        debug!(volume = %self.volume, epoch, ?role, "epoch set");
        Ok(())
    }

    async fn checkpoint(
        &self,
        epoch: u64,
        watermark: u64,
        clear_legacy: bool,
    ) -> Result<(), WireError> {
        let mut t = self.tracking.lock().await;
        let idle = self.activity_idle;
        let now = Instant::now();
        let set: Vec<u64> = t.activity.bits().iter_set().collect();
        for e in set {
            let clear = match t.last.get(&e) {
                Some((ep, seq, when)) if *ep == epoch => {
                    *seq <= watermark && now.duration_since(*when) >= idle
                }
                _ => clear_legacy,
            };
            if clear {
                t.activity.clear(e);
                t.last.remove(&e);
            }
        }
        let pages = t.activity.take_dirty_pages();
        // Cleared bits may reach the disk late: that only widens a resync.
        blocking(move || pages.write(false)).await
    }

    async fn snapshot(&self, name: &str) -> Result<(), WireError> {
        valid_snapshot_name(name)?;
        // Quiesce writes on this replica so the copy is one point in time.
        let _g = self.gate.write().await;
        if self.meta().disk != DiskState::Consistent {
            return Err(WireError::NotConsistent(format!("{:?}", self.meta().disk)));
        }
        self.data.flush().await.map_err(dev_err)?;
        let dir = self.dir.join("snapshots");
        let dst = self.snapshot_path(name);
        let file = self.data.file().clone();
        let epoch = self.meta().epoch;
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            if dst.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "snapshot exists",
                ));
            }
            fsutil::sparse_copy(&file, &dst)?;
            fsutil::write_atomic(
                &dst.with_extension("json"),
                format!("{{\"epoch\":{epoch}}}").as_bytes(),
            )
        })
        .await
    }

    async fn list_snapshots(&self) -> Result<Vec<String>, WireError> {
        let dir = self.dir.join("snapshots");
        blocking(move || {
            let mut names = Vec::new();
            match std::fs::read_dir(&dir) {
                Ok(rd) => {
                    for e in rd.flatten() {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if let Some(s) = n.strip_suffix(".img") {
                            names.push(s.to_owned());
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    /// Executes one request against this replica.
    pub async fn handle(&self, epoch: u64, request: Request) -> Result<Response, WireError> {
        match request {
            Request::Hello { .. }
            | Request::Create { .. }
            | Request::Delete
            | Request::Resize { .. } => Err(WireError::Invalid("handled by the store".into())),
            Request::GetState => Ok(Response::State(self.state())),
            Request::SetEpoch {
                role,
                out_of_sync,
                track_activity,
            } => {
                self.set_epoch(epoch, role, out_of_sync, track_activity)
                    .await?;
                Ok(Response::Ok)
            }
            Request::MarkDirty { peer, bitmap } => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                let mut t = self.tracking.lock().await;
                let Some(bm) = t.peers.get_mut(&peer) else {
                    return Err(WireError::Invalid(format!("not tracking {peer}")));
                };
                bm.union_with(&Bitmap::from_bytes(self.regions(), &bitmap));
                let pages = bm.take_dirty_pages();
                blocking(move || pages.write(true)).await?;
                Ok(Response::Ok)
            }
            Request::GetDirty { peer } => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                let t = self.tracking.lock().await;
                Ok(Response::Bitmap(
                    t.peers.get(&peer).map(|b| Bytes::from(b.bits().to_bytes())),
                ))
            }
            Request::GetActivity => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                let t = self.tracking.lock().await;
                Ok(Response::Bitmap(Some(Bytes::from(
                    t.activity.bits().to_bytes(),
                ))))
            }
            Request::Checkpoint {
                watermark,
                clear_legacy,
            } => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                self.checkpoint(epoch, watermark, clear_legacy).await?;
                Ok(Response::Ok)
            }
            Request::Write {
                offset,
                seq,
                fua,
                data,
            } => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                self.check_range(offset, data.len() as u64)?;
                self.mark_write(offset, data.len() as u64, epoch, seq)
                    .await?;
                self.data.write(offset, data, fua).await.map_err(dev_err)?;
                Ok(Response::Ok)
            }
            Request::Read { offset, len } => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                let disk = self.meta().disk;
                if disk != DiskState::Consistent {
                    return Err(WireError::NotConsistent(format!("{disk:?}")));
                }
                self.check_range(offset, u64::from(len))?;
                let data = self
                    .data
                    .read(offset, len as usize)
                    .await
                    .map_err(dev_err)?;
                Ok(Response::Data(data))
            }
            Request::Flush => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                self.data.flush().await.map_err(dev_err)?;
                Ok(Response::Ok)
            }
            Request::Trim {
                offset,
                len,
                seq,
                fua,
            } => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                self.check_range(offset, len)?;
                self.mark_write(offset, len, epoch, seq).await?;
                self.data.trim(offset, len, fua).await.map_err(dev_err)?;
                Ok(Response::Ok)
            }
            Request::WriteZeroes {
                offset,
                len,
                seq,
                may_trim,
                fua,
            } => {
                let _g = self.gate.read().await;
                self.check_epoch(epoch)?;
                self.check_range(offset, len)?;
                self.mark_write(offset, len, epoch, seq).await?;
                self.data
                    .write_zeroes(offset, len, may_trim, fua)
                    .await
                    .map_err(dev_err)?;
                Ok(Response::Ok)
            }
            Request::Snapshot { name } => {
                self.check_epoch(epoch)?;
                self.snapshot(&name).await?;
                Ok(Response::Ok)
            }
            Request::DeleteSnapshot { name } => {
                valid_snapshot_name(&name)?;
                let img = self.snapshot_path(&name);
                blocking(move || {
                    let _ = std::fs::remove_file(img.with_extension("json"));
                    match std::fs::remove_file(&img) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    }
                })
                .await?;
                Ok(Response::Ok)
            }
            Request::ListSnapshots => Ok(Response::Snapshots(self.list_snapshots().await?)),
        }
    }
}

/// The replicas held by one node, in one data directory.
#[derive(Debug)]
pub struct ReplicaStore {
    dir: PathBuf,
    node: NodeId,
    options: ReplicaStoreOptions,
    replicas: Mutex<HashMap<VolumeId, Arc<Replica>>>,
    /// Serialises creation and deletion.
    admin: tokio::sync::Mutex<()>,
}

fn open_replica(
    dir: &Path,
    node: &NodeId,
    options: &ReplicaStoreOptions,
) -> Result<Replica, String> {
    let meta: Meta = serde_json::from_slice(
        &std::fs::read(dir.join("meta.json")).map_err(|e| format!("meta.json: {e}"))?,
    )
    .map_err(|e| format!("meta.json: {e}"))?;
    if &meta.node != node {
        return Err(format!("replica belongs to node {}", meta.node));
    }
    let data = FileDevice::open(
        &dir.join("data.img"),
        FileDeviceOptions {
            create_size: Some(meta.size),
            read_only: false,
            block_size: BlockSizeConstraints::default(),
        },
    )
    .map_err(|e| e.to_string())?;
    let regions = meta.size.div_ceil(u64::from(meta.region_size.max(1)));
    let extents = meta.size.div_ceil(u64::from(meta.extent_size.max(1)));
    let mut peers = BTreeMap::new();
    for p in &meta.out_of_sync {
        let bm = PersistentBitmap::open(&dir.join(format!("dirty-{p}.bitmap")), regions)
            .map_err(|e| format!("dirty bitmap of {p}: {e}"))?;
        peers.insert(p.clone(), bm);
    }
    let activity = PersistentBitmap::open(&dir.join("activity.bitmap"), extents)
        .map_err(|e| format!("activity bitmap: {e}"))?;
    Ok(Replica {
        dir: dir.to_owned(),
        volume: meta.volume.clone(),
        node: node.clone(),
        size: meta.size,
        region_size: meta.region_size,
        extent_size: meta.extent_size,
        data,
        meta: Mutex::new(meta),
        gate: tokio::sync::RwLock::new(()),
        tracking: tokio::sync::Mutex::new(Tracking {
            peers,
            activity,
            last: HashMap::new(),
        }),
        activity_idle: options.activity_idle,
        retired: AtomicBool::new(false),
    })
}

impl ReplicaStore {
    /// Opens (creating if needed) the data directory of `node` and loads its
    /// replicas. A replica whose files are unreadable is skipped with a
    /// warning (the primary will treat it as missing and resync it fully).
    pub fn open(
        dir: &Path,
        node: NodeId,
        options: ReplicaStoreOptions,
    ) -> Result<Arc<Self>, ReplicaStoreError> {
        let err = |m: String| ReplicaStoreError::DataDir {
            path: dir.to_owned(),
            message: m,
        };
        std::fs::create_dir_all(dir.join("volumes")).map_err(|e| err(e.to_string()))?;
        let node_file = dir.join("node.json");
        match std::fs::read(&node_file) {
            Ok(b) => {
                let f: NodeFile = serde_json::from_slice(&b).map_err(|e| err(e.to_string()))?;
                if f.node != node {
                    return Err(ReplicaStoreError::WrongNode {
                        path: dir.to_owned(),
                        found: f.node,
                        expected: node,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let b = serde_json::to_vec(&NodeFile { node: node.clone() })
                    .map_err(|e| err(e.to_string()))?;
                fsutil::write_atomic(&node_file, &b).map_err(|e| err(e.to_string()))?;
            }
            Err(e) => return Err(err(e.to_string())),
        }
        let mut replicas = HashMap::new();
        for entry in std::fs::read_dir(dir.join("volumes"))
            .map_err(|e| err(e.to_string()))?
            .flatten()
        {
            let path = entry.path();
            match open_replica(&path, &node, &options) {
                Ok(r) => {
                    replicas.insert(r.volume.clone(), Arc::new(r));
                }
                Err(e) => warn!(path = %path.display(), "skipping unreadable replica: {e}"),
            }
        }
        info!(node = %node, dir = %dir.display(), replicas = replicas.len(), "replica store open");
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            node,
            options,
            replicas: Mutex::new(replicas),
            admin: tokio::sync::Mutex::new(()),
        }))
    }

    /// This node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The replica of `volume`, if held here.
    pub fn get(&self, volume: &VolumeId) -> Option<Arc<Replica>> {
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned()
    }

    /// The volumes held here.
    pub fn volumes(&self) -> Vec<VolumeId> {
        let mut v: Vec<VolumeId> = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    async fn create(
        &self,
        volume: &VolumeId,
        size: u64,
        region_size: u32,
        extent_size: u32,
    ) -> Result<Response, WireError> {
        let _a = self.admin.lock().await;
        if let Some(r) = self.get(volume) {
            if r.size == size && r.region_size == region_size && r.extent_size == extent_size {
                return Ok(Response::Ok);
            }
            return Err(WireError::Invalid("exists with another geometry".into()));
        }
        if size == 0
            || !region_size.is_power_of_two()
            || region_size < 4096
            || extent_size < region_size
            || !extent_size.is_multiple_of(region_size)
        {
            return Err(WireError::Invalid("bad geometry".into()));
        }
        let dir = self.dir.join("volumes").join(volume.as_str());
        let meta = Meta {
            format: 1,
            volume: volume.clone(),
            node: self.node.clone(),
            size,
            region_size,
            extent_size,
            epoch: 0,
            disk: DiskState::New,
            out_of_sync: vec![],
            track_activity: false,
        };
        let node = self.node.clone();
        let options = self.options.clone();
        let replica = blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let b = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
            fsutil::write_atomic(&dir.join("meta.json"), &b)?;
            open_replica(&dir, &node, &options).map_err(std::io::Error::other)
        })
        .await?;
        info!(volume = %volume, node = %self.node, size, "replica created");
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume.clone(), Arc::new(replica));
        Ok(Response::Ok)
    }

    async fn delete(&self, volume: &VolumeId, epoch: u64) -> Result<Response, WireError> {
        let _a = self.admin.lock().await;
        let Some(r) = self.get(volume) else {
            return Ok(Response::Ok);
        };
        let current = r.meta().epoch;
        if epoch < current {
            return Err(WireError::StaleEpoch {
                request: epoch,
                current,
            });
        }
        // Wait for requests in flight, then drop the replica.
        let _g = r.gate.write().await;
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume);
        let dir = r.dir.clone();
        blocking(move || std::fs::remove_dir_all(dir)).await?;
        info!(volume = %volume, node = %self.node, "replica deleted");
        Ok(Response::Ok)
    }

    async fn resize(
        &self,
        volume: &VolumeId,
        epoch: u64,
        size: u64,
    ) -> Result<Response, WireError> {
        let _a = self.admin.lock().await;
        let r = self.get(volume).ok_or(WireError::NotFound)?;
        // No request may run on the old copy while the files change.
        let _g = r.gate.write().await;
        let current = r.meta().epoch;
        if epoch < current {
            return Err(WireError::StaleEpoch {
                request: epoch,
                current,
            });
        }
        if size == r.size {
            return Ok(Response::Ok);
        }
        if size < r.size || !size.is_multiple_of(4096) {
            return Err(WireError::Invalid(format!(
                "cannot resize from {} to {size} bytes: volumes only grow, in multiples of 4096",
                r.size
            )));
        }
        let mut meta = r.meta().clone();
        meta.size = size;
        let (dir, node, options) = (r.dir.clone(), self.node.clone(), self.options.clone());
        let replica = blocking(move || {
            let b = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
            fsutil::write_atomic(&dir.join("meta.json"), &b)?;
            // Reopening sizes the data file and the bitmaps to the new size.
            open_replica(&dir, &node, &options).map_err(std::io::Error::other)
        })
        .await?;
        r.retired.store(true, Ordering::Release);
        info!(volume = %volume, node = %self.node, size, "replica resized");
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume.clone(), Arc::new(replica));
        Ok(Response::Ok)
    }

    /// Executes one request.
    pub async fn handle(&self, frame: RequestFrame) -> Result<Response, WireError> {
        match frame.request {
            Request::Hello { node } => {
                if node != self.node {
                    return Err(WireError::WrongNode(self.node.to_string()));
                }
                Ok(Response::Hello {
                    node: self.node.clone(),
                })
            }
            Request::Create {
                size,
                region_size,
                extent_size,
            } => {
                self.create(&frame.volume, size, region_size, extent_size)
                    .await
            }
            Request::Delete => self.delete(&frame.volume, frame.epoch).await,
            Request::Resize { size } => self.resize(&frame.volume, frame.epoch, size).await,
            request => {
                let r = self.get(&frame.volume).ok_or(WireError::NotFound)?;
                r.handle(frame.epoch, request).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(epoch: u64, request: Request) -> RequestFrame {
        RequestFrame {
            id: 1,
            epoch,
            volume: VolumeId::new("v").expect("id"),
            request,
        }
    }

    fn n(s: &str) -> NodeId {
        NodeId::new(s).expect("id")
    }

    #[tokio::test]
    async fn epochs_fence_and_bitmaps_track_and_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            ReplicaStore::open(dir.path(), n("a"), ReplicaStoreOptions::default()).expect("open");
        store
            .handle(frame(
                0,
                Request::Create {
                    size: 8 << 20,
                    region_size: 1 << 20,
                    extent_size: 4 << 20,
                },
            ))
            .await
            .expect("create");
        // New replicas refuse reads until they are in sync.
        assert!(matches!(
            store
                .handle(frame(
                    0,
                    Request::Read {
                        offset: 0,
                        len: 512
                    }
                ))
                .await,
            Err(WireError::NotConsistent(_))
        ));
        store
            .handle(frame(
                3,
                Request::SetEpoch {
                    role: Role::InSync,
                    out_of_sync: vec![n("b")],
                    track_activity: true,
                },
            ))
            .await
            .expect("set epoch");
        let w = |epoch, offset| {
            frame(
                epoch,
                Request::Write {
                    offset,
                    seq: 1,
                    fua: false,
                    data: Bytes::from(vec![1u8; 4096]),
                },
            )
        };
        assert!(matches!(
            store.handle(w(2, 0)).await,
            Err(WireError::StaleEpoch { current: 3, .. })
        ));
        assert!(matches!(
            store.handle(w(4, 0)).await,
            Err(WireError::StaleEpoch { current: 3, .. })
        ));
        store.handle(w(3, 3 << 20)).await.expect("write");
        // Lowering the epoch is refused.
        assert!(
            store
                .handle(frame(
                    2,
                    Request::SetEpoch {
                        role: Role::InSync,
                        out_of_sync: vec![],
                        track_activity: false
                    }
                ))
                .await
                .is_err()
        );
        let Ok(Response::Bitmap(Some(b))) = store
            .handle(frame(3, Request::GetDirty { peer: n("b") }))
            .await
        else {
            panic!("bitmap expected");
        };
        let bits: Vec<u64> = Bitmap::from_bytes(8, &b).iter_set().collect();
        assert_eq!(bits, vec![3]);
        drop(store);
        // After a restart the epoch, the bitmap and the activity log are still there.
        let store =
            ReplicaStore::open(dir.path(), n("a"), ReplicaStoreOptions::default()).expect("reopen");
        let Ok(Response::State(s)) = store.handle(frame(0, Request::GetState)).await else {
            panic!("state")
        };
        assert_eq!(s.epoch, 3);
        assert_eq!(s.disk, DiskState::Consistent);
        let Ok(Response::Bitmap(Some(b))) = store
            .handle(frame(3, Request::GetDirty { peer: n("b") }))
            .await
        else {
            panic!("bitmap expected");
        };
        assert_eq!(
            Bitmap::from_bytes(8, &b).iter_set().collect::<Vec<_>>(),
            vec![3]
        );
        let Ok(Response::Bitmap(Some(a))) = store.handle(frame(3, Request::GetActivity)).await
        else {
            panic!("activity")
        };
        assert_eq!(
            Bitmap::from_bytes(2, &a).iter_set().collect::<Vec<_>>(),
            vec![0]
        );
        // Legacy activity is cleared only when the primary says so.
        store
            .handle(frame(
                3,
                Request::Checkpoint {
                    watermark: 10,
                    clear_legacy: false,
                },
            ))
            .await
            .expect("cp");
        let Ok(Response::Bitmap(Some(a))) = store.handle(frame(3, Request::GetActivity)).await
        else {
            panic!("activity")
        };
        assert_eq!(Bitmap::from_bytes(2, &a).count(), 1);
        store
            .handle(frame(
                3,
                Request::Checkpoint {
                    watermark: 10,
                    clear_legacy: true,
                },
            ))
            .await
            .expect("cp");
        let Ok(Response::Bitmap(Some(a))) = store.handle(frame(3, Request::GetActivity)).await
        else {
            panic!("activity")
        };
        assert_eq!(Bitmap::from_bytes(2, &a).count(), 0);
        // Dropping b from the tracking list deletes its bitmap.
        store
            .handle(frame(
                4,
                Request::SetEpoch {
                    role: Role::InSync,
                    out_of_sync: vec![],
                    track_activity: false,
                },
            ))
            .await
            .expect("set epoch");
        assert!(matches!(
            store
                .handle(frame(4, Request::GetDirty { peer: n("b") }))
                .await,
            Ok(Response::Bitmap(None))
        ));
        // Snapshots copy the data.
        store
            .handle(frame(4, Request::Snapshot { name: "s1".into() }))
            .await
            .expect("snapshot");
        let snap = std::fs::read(
            store
                .get(&VolumeId::new("v").expect("id"))
                .expect("replica")
                .snapshot_path("s1"),
        )
        .expect("read");
        assert_eq!(&snap[3 << 20..(3 << 20) + 4096], &[1u8; 4096][..]);
        assert!(
            store
                .handle(frame(4, Request::Snapshot { name: "s1".into() }))
                .await
                .is_err(),
            "names are unique"
        );
        let Ok(Response::Snapshots(list)) = store.handle(frame(4, Request::ListSnapshots)).await
        else {
            panic!("list")
        };
        assert_eq!(list, vec!["s1".to_string()]);
        // Another node may not open this directory.
        assert!(matches!(
            ReplicaStore::open(dir.path(), n("other"), ReplicaStoreOptions::default()),
            Err(ReplicaStoreError::WrongNode { .. })
        ));
    }
}
