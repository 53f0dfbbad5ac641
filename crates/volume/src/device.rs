//! [`ReplicatedDevice`]: the primary side of a replicated volume, a
//! [`BlockDevice`] that an agent exports to QEMU through the NBD server.
//!
//! Rules it keeps (DRBD protocol C):
//! - a write is acknowledged only when every in-sync replica has it (FUA and
//!   FLUSH: durably);
//! - a replica that fails or does not answer in time leaves the in-sync set,
//!   and the new set with a bumped epoch is stored in the membership record
//!   (compare-and-swap) *before* any write is acknowledged without it; the
//!   regions of the writes it missed are marked dirty on the remaining
//!   replicas, which track every later write for it too;
//! - below `min_in_sync` writes fail with EIO;
//! - a returning (or new) replica gets only its dirty regions copied while
//!   I/O goes on, then rejoins with another epoch bump;
//! - reads come from one in-sync replica, the local one when it is in sync;
//! - opening the device takes the volume over: the epoch is bumped and set
//!   on the replicas, which then refuse the old primary.
//!
//! Membership changes are serialised by `transition` and quiesce I/O with
//! the `gate` write lock. Lock order: range lock, then gate, then
//! transition (writes release the gate before they wait for a transition).
//! This module must never acknowledge a write that an in-sync replica of the
//! recorded membership does not have.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;
use skyvisor_nbd::{BlockDevice, BlockSizeConstraints, DeviceError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::bitmap::Bitmap;
use crate::client::{Link, LinkError, RemoteReplica};
use crate::ids::{NodeId, VolumeId};
use crate::locks::{RangeLocks, Watermark};
use crate::membership::{
    Membership, MembershipError, MembershipStore, ReplicaMember, TransitionError,
};
use crate::replica::ReplicaStore;
use crate::stats::{IoKind, IoSnapshot, IoStats};
use crate::wire::{DiskState, Request, Response, Role, WireError};

/// Settings of a [`ReplicatedDevice`].
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// A replica that does not answer a request within this is dropped.
    pub request_timeout: Duration,
    /// Deadline for connecting to a replica.
    pub connect_timeout: Duration,
    /// How often out-of-sync replicas are retried.
    pub reconnect_interval: Duration,
    /// How often the activity log is checkpointed.
    pub checkpoint_interval: Duration,
    /// How often the membership record is re-read to detect a takeover.
    pub membership_check_interval: Duration,
    /// Take the volume over even if the record names another primary
    /// (the caller knows that primary is dead or fenced).
    pub takeover: bool,
    /// Replicas the caller knows are down (their host's lease is gone):
    /// not waited for at open; they resync when they return.
    pub known_down: Vec<NodeId>,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            reconnect_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(2),
            membership_check_interval: Duration::from_secs(2),
            takeover: false,
            known_down: Vec::new(),
        }
    }
}

/// Errors of volume operations.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No membership record.
    #[error("volume {volume} does not exist")]
    NotFound {
        /// The volume.
        volume: VolumeId,
    },
    /// Another node is primary and takeover was not asked for.
    #[error("volume {volume} is served by {primary}; open with takeover to replace it")]
    PrimaryElsewhere {
        /// The volume.
        volume: VolumeId,
        /// The current primary.
        primary: NodeId,
    },
    /// No in-sync replica could be reached: promoting a stale one would lose writes.
    #[error("volume {volume}: no in-sync replica is reachable")]
    NoInSyncReplica {
        /// The volume.
        volume: VolumeId,
    },
    /// The membership record changed concurrently.
    #[error("volume {volume}: the membership record changed concurrently")]
    ConcurrentChange {
        /// The volume.
        volume: VolumeId,
    },
    /// This primary has been replaced.
    #[error("volume {volume}: this primary is fenced: {reason}")]
    Fenced {
        /// The volume.
        volume: VolumeId,
        /// Why.
        reason: String,
    },
    /// The membership store failed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// The change is not allowed.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// A replica failed.
    #[error(transparent)]
    Replica(#[from] LinkError),
    /// Invalid arguments.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// The state of one replica as the primary sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReplicaSyncState {
    /// Has every acknowledged write.
    InSync,
    /// Being resynced: `done` of `total` bytes copied.
    Resyncing {
        /// Bytes copied.
        done: u64,
        /// Bytes to copy.
        total: u64,
    },
    /// Out of sync, reachable, waiting for (or failed) a resync.
    Stale {
        /// The last error, if any.
        error: Option<String>,
    },
    /// Out of sync and unreachable.
    Degraded {
        /// The last error.
        error: Option<String>,
    },
}

/// One replica in a [`VolumeStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    /// The node.
    pub node: NodeId,
    /// Its replica server address.
    pub addr: String,
    /// Accessed in process.
    pub local: bool,
    /// Reads are served from it.
    pub read_source: bool,
    /// Sync state.
    pub state: ReplicaSyncState,
}

/// What a primary knows about its volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    /// The volume.
    pub volume: VolumeId,
    /// This primary's node.
    pub primary: NodeId,
    /// Current epoch.
    pub epoch: u64,
    /// Size in bytes.
    pub size: u64,
    /// Minimum in-sync replicas for writes.
    pub min_in_sync: u32,
    /// Set when this primary was replaced; all I/O fails.
    pub fenced: Option<String>,
    /// Writes can currently be acknowledged.
    pub writable: bool,
    /// The replicas.
    pub replicas: Vec<ReplicaStatus>,
    /// Bytes copied by completed resyncs of returning or new replicas.
    pub resynced_bytes: u64,
    /// Regions with writes in flight at the last crash still being reconciled.
    pub activity_resync_pending: bool,
}

#[derive(Clone)]
struct Topology {
    version: u64,
    membership: Membership,
    links: HashMap<NodeId, Link>,
    in_sync: Vec<NodeId>,
    resync: Vec<(NodeId, Arc<AtomicBool>)>,
    read_source: Option<NodeId>,
    fenced: Option<String>,
}

impl Topology {
    fn choose_read_source(&mut self, local: Option<&NodeId>) {
        self.read_source = match local {
            Some(l) if self.in_sync.contains(l) => Some(l.clone()),
            _ => self.in_sync.first().cloned(),
        };
    }
}

struct Failure {
    node: NodeId,
    range: Option<(u64, u64)>,
}

enum WriteOp {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    Flush,
}

impl WriteOp {
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            WriteOp::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            WriteOp::Trim { offset, len, .. } | WriteOp::Zeroes { offset, len, .. } => {
                Some((*offset, *len))
            }
            WriteOp::Flush => None,
        }
    }

    fn request(&self, seq: u64) -> Request {
        match self {
            WriteOp::Write { offset, data, fua } => Request::Write {
                offset: *offset,
                seq,
                fua: *fua,
                data: data.clone(),
            },
            WriteOp::Trim { offset, len, fua } => Request::Trim {
                offset: *offset,
                len: *len,
                seq,
                fua: *fua,
            },
            WriteOp::Zeroes {
                offset,
                len,
                may_trim,
                fua,
            } => Request::WriteZeroes {
                offset: *offset,
                len: *len,
                seq,
                may_trim: *may_trim,
                fua: *fua,
            },
            WriteOp::Flush => Request::Flush,
        }
    }
}

/// The primary of a replicated volume.
pub struct ReplicatedDevice {
    volume: VolumeId,
    node: NodeId,
    store: Arc<dyn MembershipStore>,
    local: Option<Arc<ReplicaStore>>,
    options: DeviceOptions,
    size: u64,
    region_size: u64,
    extent_size: u64,
    topo: RwLock<Arc<Topology>>,
    gate: tokio::sync::RwLock<()>,
    transition: tokio::sync::Mutex<()>,
    failures: Mutex<Vec<Failure>>,
    locks: RangeLocks,
    watermark: Watermark,
    runtime: Mutex<HashMap<NodeId, ReplicaSyncState>>,
    resyncing: Mutex<HashSet<NodeId>>,
    resynced_bytes: AtomicU64,
    activity_pending: AtomicBool,
    stats: IoStats,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for ReplicatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedDevice")
            .field("volume", &self.volume)
            .field("node", &self.node)
            .finish()
    }
}

/// Connects to one member: in process for our own node, else over TCP.
async fn connect_member(
    volume: &VolumeId,
    member: &ReplicaMember,
    local: Option<&Arc<ReplicaStore>>,
    timeout: Duration,
) -> Result<Link, LinkError> {
    let link = match local {
        Some(store) if store.node() == &member.node => Link::Local {
            node: member.node.clone(),
            store: store.clone(),
        },
        _ => Link::Remote(RemoteReplica::connect(&member.node, &member.addr, timeout).await?),
    };
    link.call(
        volume,
        0,
        Request::Hello {
            node: member.node.clone(),
        },
        timeout,
    )
    .await?;
    Ok(link)
}

fn unavailable(m: impl Into<String>) -> DeviceError {
    DeviceError::Unavailable(m.into())
}

impl ReplicatedDevice {
    /// Opens the volume as its primary on `node`, taking it over from any
    /// previous primary (which is fenced: the replicas refuse its epoch).
    ///
    /// Only replicas in the record's in-sync set that are reachable and
    /// consistent stay in sync; if there is none, opening fails rather than
    /// serve stale data. `local` is this node's replica store, used in
    /// process when the node holds a replica.
    pub async fn open(
        volume: VolumeId,
        node: NodeId,
        store: Arc<dyn MembershipStore>,
        local: Option<Arc<ReplicaStore>>,
        options: DeviceOptions,
    ) -> Result<Arc<Self>, VolumeError> {
        let record = store
            .load(&volume)
            .await?
            .ok_or_else(|| VolumeError::NotFound {
                volume: volume.clone(),
            })?;
        let m = record.value;
        if let Some(p) = &m.primary
            && p != &node
            && !options.takeover
        {
            return Err(VolumeError::PrimaryElsewhere {
                volume,
                primary: p.clone(),
            });
        }
        // Reach the in-sync members and check their data is really there
        // (those known to be down are not waited for).
        let in_sync_members: Vec<&ReplicaMember> = m
            .replicas
            .iter()
            .filter(|r| r.in_sync && !options.known_down.contains(&r.node))
            .collect();
        let attempts = join_all(in_sync_members.iter().map(|mem| {
            let (volume, local) = (&volume, local.as_ref());
            async move {
                let link = connect_member(volume, mem, local, options.connect_timeout).await?;
                match link
                    .call(volume, 0, Request::GetState, options.request_timeout)
                    .await?
                {
                    Response::State(s) if s.disk == DiskState::Consistent && s.size == m.size => {
                        Ok(link)
                    }
                    other => Err(LinkError::Replica {
                        node: mem.node.clone(),
                        error: WireError::NotConsistent(format!("{other:?}")),
                    }),
                }
            }
        }))
        .await;
        let mut links = HashMap::new();
        for (mem, a) in in_sync_members.iter().zip(attempts) {
            match a {
                Ok(l) => {
                    links.insert(mem.node.clone(), l);
                }
                Err(e) => {
                    warn!(volume = %volume, node = %mem.node, "in-sync replica not usable at open: {e}")
                }
            }
        }
        let reachable: Vec<NodeId> = links.keys().cloned().collect();
        let new_m = m.take_over(&node, &reachable).map_err(|e| match e {
            TransitionError::NoInSyncLeft => VolumeError::NoInSyncReplica {
                volume: volume.clone(),
            },
            other => other.into(),
        })?;
        let version = store
            .cas(&volume, Some(record.version), &new_m)
            .await?
            .ok_or_else(|| VolumeError::ConcurrentChange {
                volume: volume.clone(),
            })?;
        let lost: Vec<NodeId> = m
            .in_sync()
            .into_iter()
            .filter(|n| !reachable.contains(n))
            .collect();
        info!(volume = %volume, node = %node, epoch = new_m.epoch, in_sync = ?new_m.in_sync(), "volume opened as primary");
        let mut topo = Topology {
            version,
            in_sync: new_m.in_sync(),
            membership: new_m.clone(),
            links,
            resync: vec![],
            read_source: None,
            fenced: None,
        };
        let local_node = local.as_ref().map(|s| s.node().clone());
        topo.choose_read_source(local_node.as_ref());
        let mut runtime = HashMap::new();
        for r in &new_m.replicas {
            runtime.insert(
                r.node.clone(),
                if r.in_sync {
                    ReplicaSyncState::InSync
                } else {
                    ReplicaSyncState::Stale { error: None }
                },
            );
        }
        let dev = Arc::new(Self {
            volume,
            node,
            store,
            local,
            size: new_m.size,
            region_size: u64::from(new_m.region_size.max(4096)),
            extent_size: u64::from(new_m.extent_size.max(new_m.region_size).max(4096)),
            options,
            topo: RwLock::new(Arc::new(topo)),
            gate: tokio::sync::RwLock::new(()),
            transition: tokio::sync::Mutex::new(()),
            failures: Mutex::new(vec![]),
            locks: RangeLocks::default(),
            watermark: Watermark::default(),
            runtime: Mutex::new(runtime),
            resyncing: Mutex::new(HashSet::new()),
            resynced_bytes: AtomicU64::new(0),
            activity_pending: AtomicBool::new(false),
            stats: IoStats::default(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        dev.fence_replicas_at_open(&lost).await;
        dev.start_background();
        Ok(dev)
    }

    /// Sets the new epoch everywhere reachable, gathers the activity log
    /// and schedules its reconciliation.
    async fn fence_replicas_at_open(self: &Arc<Self>, lost: &[NodeId]) {
        let _t = self.transition.lock().await;
        let _g = self.gate.write().await;
        let failed = self.broadcast_epoch(&HashMap::new()).await;
        // Out-of-sync members learn the epoch too, so an old primary cannot
        // keep writing to them.
        let topo = self.topo();
        for mem in topo
            .membership
            .replicas
            .iter()
            .filter(|r| !r.in_sync && !self.options.known_down.contains(&r.node))
        {
            let (volume, local, o) = (&self.volume, self.local.as_ref(), &self.options);
            if let Ok(link) = connect_member(volume, mem, local, o.connect_timeout).await {
                let _ = link
                    .call(
                        volume,
                        topo.membership.epoch,
                        Request::SetEpoch {
                            role: Role::OutOfSync,
                            out_of_sync: topo.membership.out_of_sync(),
                            track_activity: false,
                        },
                        o.request_timeout,
                    )
                    .await;
                link.close();
            }
        }
        let mut dirty: HashMap<NodeId, Bitmap> = failed
            .into_iter()
            .map(|n| (n, Bitmap::new(self.regions())))
            .collect();
        // Writes in flight when the old primary stopped may differ between
        // replicas: the union of their activity logs says where.
        let activity = self.gather_activity().await;
        if activity.count() > 0 {
            for n in lost {
                dirty
                    .entry(n.clone())
                    .or_insert_with(|| Bitmap::new(self.regions()));
            }
            let marks: HashMap<NodeId, Bitmap> =
                lost.iter().map(|n| (n.clone(), activity.clone())).collect();
            let more = self.broadcast_marks(&marks).await;
            for n in more {
                dirty
                    .entry(n)
                    .or_insert_with(|| Bitmap::new(self.regions()));
            }
        }
        if !dirty.is_empty() {
            self.drop_members(dirty).await;
        }
        if activity.count() > 0 && self.topo().in_sync.len() > 1 {
            self.activity_pending.store(true, Ordering::Release);
            let weak = Arc::downgrade(self);
            self.tasks.spawn(activity_resync(weak, activity));
        }
    }

    fn regions(&self) -> u64 {
        self.size.div_ceil(self.region_size)
    }

    fn topo(&self) -> Arc<Topology> {
        self.topo.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update_topo(&self, f: impl FnOnce(&mut Topology)) {
        let mut guard = self.topo.write().unwrap_or_else(|p| p.into_inner());
        let mut t = (**guard).clone();
        f(&mut t);
        if t.membership.epoch != guard.membership.epoch {
            self.stats.epoch_changed();
        }
        let local = self.local.as_ref().map(|s| s.node().clone());
        t.choose_read_source(local.as_ref());
        *guard = Arc::new(t);
    }

    fn set_runtime(&self, node: &NodeId, state: ReplicaSyncState) {
        self.runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.clone(), state);
    }

    fn fence(&self, reason: &str) {
        warn!(volume = %self.volume, node = %self.node, "primary fenced: {reason}");
        let links: Vec<Link> = self.topo().links.values().cloned().collect();
        self.update_topo(|t| {
            t.fenced = Some(reason.to_owned());
            t.links.clear();
            t.resync.clear();
        });
        for l in links {
            l.close();
        }
        self.cancel.cancel();
    }

    fn usable(&self, topo: &Topology, writing: bool) -> Result<(), DeviceError> {
        if let Some(r) = &topo.fenced {
            return Err(unavailable(format!("primary fenced: {r}")));
        }
        if writing && (topo.in_sync.len() as u32) < topo.membership.min_in_sync.max(1) {
            return Err(unavailable(format!(
                "{} in-sync replicas, {} required",
                topo.in_sync.len(),
                topo.membership.min_in_sync
            )));
        }
        Ok(())
    }

    /// Stores `new` over `version`; on a conflict re-reads the record and
    /// fences this primary if someone else took the volume.
    async fn cas(&self, version: u64, new: &Membership) -> Result<u64, ()> {
        match self.store.cas(&self.volume, Some(version), new).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => {
                self.fence("the membership record was changed by another primary");
                Err(())
            }
            Err(e) => {
                // Unrecorded: nothing may be acknowledged; callers retry later.
                warn!(volume = %self.volume, "membership store unavailable: {e}");
                Err(())
            }
        }
    }

    /// Tells every in-sync replica (and resync target) the current epoch and
    /// tracking set; returns the in-sync replicas that failed.
    async fn broadcast_epoch(&self, marks: &HashMap<NodeId, Bitmap>) -> Vec<NodeId> {
        let topo = self.topo();
        let epoch = topo.membership.epoch;
        let out = topo.membership.out_of_sync();
        let track = topo.in_sync.len() > 1;
        let timeout = self.options.request_timeout;
        let calls = topo
            .in_sync
            .iter()
            .filter_map(|n| topo.links.get(n).map(|l| (n, l)))
            .map(|(n, l)| {
                let out = out.clone();
                async move {
                    let r = l
                        .call(
                            &self.volume,
                            epoch,
                            Request::SetEpoch {
                                role: Role::InSync,
                                out_of_sync: out,
                                track_activity: track,
                            },
                            timeout,
                        )
                        .await;
                    (n.clone(), r)
                }
            });
        let mut failed: Vec<NodeId> = join_all(calls)
            .await
            .into_iter()
            .filter_map(|(n, r)| {
                r.err().map(|e| {
                    warn!(volume = %self.volume, node = %n, "set epoch failed: {e}");
                    n
                })
            })
            .collect();
        for n in &topo.in_sync {
            if !topo.links.contains_key(n) {
                failed.push(n.clone());
            }
        }
        for (n, abort) in &topo.resync {
            if let Some(l) = topo.links.get(n) {
                let r = l
                    .call(
                        &self.volume,
                        epoch,
                        Request::SetEpoch {
                            role: Role::ResyncTarget,
                            out_of_sync: out.clone(),
                            track_activity: false,
                        },
                        timeout,
                    )
                    .await;
                if r.is_err() {
                    abort.store(true, Ordering::Release);
                }
            }
        }
        if !marks.is_empty() {
            for n in self.broadcast_marks(marks).await {
                if !failed.contains(&n) {
                    failed.push(n);
                }
            }
        }
        failed
    }

    /// ORs dirty regions for peers into every in-sync replica; returns failures.
    async fn broadcast_marks(&self, marks: &HashMap<NodeId, Bitmap>) -> Vec<NodeId> {
        let topo = self.topo();
        let epoch = topo.membership.epoch;
        let mut failed = vec![];
        for n in &topo.in_sync {
            let Some(l) = topo.links.get(n) else { continue };
            for (peer, bm) in marks {
                if bm.count() == 0 || peer == n {
                    continue;
                }
                let r = l
                    .call(
                        &self.volume,
                        epoch,
                        Request::MarkDirty {
                            peer: peer.clone(),
                            bitmap: Bytes::from(bm.to_bytes()),
                        },
                        self.options.request_timeout,
                    )
                    .await;
                if let Err(e) = r {
                    warn!(volume = %self.volume, node = %n, "mark dirty failed: {e}");
                    failed.push(n.clone());
                    break;
                }
            }
        }
        failed
    }

    /// Union of the in-sync replicas' activity logs, as regions.
    async fn gather_activity(&self) -> Bitmap {
        let topo = self.topo();
        let extents = self.size.div_ceil(self.extent_size);
        let per = self.extent_size / self.region_size;
        let mut regions = Bitmap::new(self.regions());
        for n in &topo.in_sync {
            let Some(l) = topo.links.get(n) else { continue };
            match l
                .call(
                    &self.volume,
                    topo.membership.epoch,
                    Request::GetActivity,
                    self.options.request_timeout,
                )
                .await
            {
                Ok(Response::Bitmap(Some(b))) => {
                    for e in Bitmap::from_bytes(extents, &b).iter_set() {
                        regions.set_range(e * per, (e + 1) * per);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(volume = %self.volume, node = %n, "activity log unreadable: {e}");
                    self.push_failure(n, None);
                }
            }
        }
        regions
    }

    fn push_failure(&self, node: &NodeId, range: Option<(u64, u64)>) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Failure {
                node: node.clone(),
                range,
            });
    }

    /// Drops the replicas that failed, with their dirty regions, recording
    /// the change before anything relies on it.
    async fn process_failures(&self) {
        let _t = self.transition.lock().await;
        if self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return;
        }
        let _g = self.gate.write().await;
        let failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()));
        let topo = self.topo();
        let mut dirty: HashMap<NodeId, Bitmap> = HashMap::new();
        for f in failures {
            if !topo.in_sync.contains(&f.node) {
                continue;
            }
            let bm = dirty
                .entry(f.node)
                .or_insert_with(|| Bitmap::new(self.regions()));
            if let Some((o, l)) = f.range
                && l > 0
            {
                bm.set_range(o / self.region_size, (o + l - 1) / self.region_size + 1);
            }
        }
        if !dirty.is_empty() {
            self.drop_members(dirty).await;
        }
    }

    /// Never drop the last in-sync replica: it holds every acknowledged
    /// write and is the only source a resync may copy from. It stays in the
    /// set, unreachable, and writes fail until it answers again.
    fn spare_authority(&self, to_drop: &mut HashMap<NodeId, Bitmap>) {
        let topo = self.topo();
        if to_drop.is_empty() || topo.in_sync.iter().any(|n| !to_drop.contains_key(n)) {
            return;
        }
        let keep = topo
            .read_source
            .clone()
            .filter(|n| to_drop.contains_key(n))
            .or_else(|| topo.in_sync.first().cloned());
        if let Some(k) = keep {
            warn!(volume = %self.volume, node = %k, "every in-sync replica failed; keeping this one as the authority");
            to_drop.remove(&k);
            if topo.links.get(&k).is_some_and(|l| l.is_broken()) {
                self.update_topo(|t| {
                    t.links.remove(&k);
                });
            }
        }
    }

    /// Called with `transition` and the gate held.
    async fn drop_members(&self, mut to_drop: HashMap<NodeId, Bitmap>) {
        loop {
            self.spare_authority(&mut to_drop);
            if to_drop.is_empty() {
                return;
            }
            let topo = self.topo();
            if topo.fenced.is_some() {
                return;
            }
            let nodes: Vec<NodeId> = to_drop.keys().cloned().collect();
            let new_m = topo.membership.drop_from_sync(&nodes);
            let Ok(version) = self.cas(topo.version, &new_m).await else {
                return;
            };
            warn!(volume = %self.volume, dropped = ?nodes, epoch = new_m.epoch, "replicas dropped from the in-sync set");
            for n in &nodes {
                if let Some(l) = topo.links.get(n) {
                    l.close();
                }
                self.set_runtime(
                    n,
                    ReplicaSyncState::Degraded {
                        error: Some("failed or timed out".into()),
                    },
                );
            }
            self.update_topo(|t| {
                t.version = version;
                t.in_sync = new_m.in_sync();
                t.membership = new_m;
                for n in &nodes {
                    t.links.remove(n);
                }
            });
            let failed = self.broadcast_epoch(&to_drop).await;
            to_drop = failed
                .into_iter()
                .map(|n| (n, Bitmap::new(self.regions())))
                .collect();
        }
    }

    async fn replicate(&self, op: WriteOp) -> Result<(), DeviceError> {
        let _range = match op.range() {
            Some((o, l)) => Some(self.locks.shared(o, l).await),
            None => None,
        };
        let seq = self.watermark.begin();
        let r = self.replicate_inner(&op, seq).await;
        self.watermark.end(seq);
        r
    }

    async fn replicate_inner(&self, op: &WriteOp, seq: u64) -> Result<(), DeviceError> {
        let guard = self.gate.read().await;
        let topo = self.topo();
        self.usable(&topo, true)?;
        let epoch = topo.membership.epoch;
        let req = op.request(seq);
        let timeout = self.options.request_timeout;
        let mut targets: Vec<(&NodeId, &Link, Option<&Arc<AtomicBool>>)> = Vec::new();
        for n in &topo.in_sync {
            match topo.links.get(n) {
                Some(l) => targets.push((n, l, None)),
                None => return Err(unavailable(format!("no link to in-sync replica {n}"))),
            }
        }
        for (n, abort) in &topo.resync {
            if let Some(l) = topo.links.get(n) {
                targets.push((n, l, Some(abort)));
            }
        }
        // Remote replicas first: each call's first step sends its frame,
        // so the network works while the local replica writes in place.
        targets.sort_by_key(|(_, l, _)| matches!(l, Link::Local { .. }));
        let results = join_all(
            targets
                .iter()
                .map(|(_, l, _)| l.call(&self.volume, epoch, req.clone(), timeout)),
        )
        .await;
        let mut failed = vec![];
        let mut fenced = false;
        for ((n, _, abort), r) in targets.iter().zip(results) {
            if let Err(e) = r {
                fenced |= e.is_fenced();
                match abort {
                    None => {
                        warn!(volume = %self.volume, node = %n, "write failed on in-sync replica: {e}");
                        failed.push((*n).clone());
                        self.push_failure(n, op.range());
                    }
                    Some(a) => {
                        debug!(volume = %self.volume, node = %n, "write failed on resync target: {e}");
                        a.store(true, Ordering::Release);
                    }
                }
            }
        }
        drop(guard);
        if fenced {
            self.fence("a replica has seen a newer epoch");
            return Err(unavailable("primary fenced"));
        }
        if failed.is_empty() {
            return Ok(());
        }
        self.process_failures().await;
        let topo = self.topo();
        self.usable(&topo, true)?;
        if failed.iter().any(|n| topo.in_sync.contains(n)) {
            return Err(unavailable("could not record the failure of a replica"));
        }
        Ok(())
    }

    /// Copies one region from the read source to `targets` under the
    /// region's exclusive lock.
    async fn copy_region(&self, region: u64, targets: &[(NodeId, Link)]) -> Result<u64, String> {
        let off = region * self.region_size;
        let len = self.region_size.min(self.size - off);
        let _x = self.locks.exclusive(off, len).await;
        let _g = self.gate.read().await;
        let topo = self.topo();
        if let Some(r) = &topo.fenced {
            return Err(r.clone());
        }
        let source = topo
            .read_source
            .as_ref()
            .and_then(|n| topo.links.get(n).map(|l| (n, l)))
            .ok_or("no in-sync replica to copy from")?;
        let epoch = topo.membership.epoch;
        let t = self.options.request_timeout;
        let data = match source
            .1
            .call(
                &self.volume,
                epoch,
                Request::Read {
                    offset: off,
                    len: len as u32,
                },
                t,
            )
            .await
        {
            Ok(Response::Data(d)) if d.len() as u64 == len => d,
            Ok(_) => return Err("bad read answer".into()),
            Err(e) => {
                self.push_failure(source.0, None);
                return Err(format!("reading the source: {e}"));
            }
        };
        let req = if data.iter().all(|b| *b == 0) {
            Request::WriteZeroes {
                offset: off,
                len,
                seq: 0,
                may_trim: true,
                fua: false,
            }
        } else {
            Request::Write {
                offset: off,
                seq: 0,
                fua: false,
                data,
            }
        };
        for (n, l) in targets {
            if let Err(e) = l.call(&self.volume, epoch, req.clone(), t).await {
                return Err(format!("writing to {n}: {e}"));
            }
        }
        Ok(len)
    }

    fn start_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let cancel = self.cancel.clone();
        let o = self.options.clone();
        self.tasks.spawn(async move {
            let mut resync_tick = tokio::time::interval(o.reconnect_interval);
            let mut checkpoint_tick = tokio::time::interval(o.checkpoint_interval);
            let mut membership_tick = tokio::time::interval(o.membership_check_interval);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = resync_tick.tick() => {
                        let Some(dev) = weak.upgrade() else { break };
                        dev.start_resyncs();
                    }
                    _ = checkpoint_tick.tick() => {
                        let Some(dev) = weak.upgrade() else { break };
                        dev.checkpoint().await;
                    }
                    _ = membership_tick.tick() => {
                        let Some(dev) = weak.upgrade() else { break };
                        dev.check_membership().await;
                    }
                }
            }
        });
    }

    fn start_resyncs(self: &Arc<Self>) {
        let topo = self.topo();
        if topo.fenced.is_some() || self.cancel.is_cancelled() {
            return;
        }
        // In-sync members whose connection broke (kept as the authority).
        for n in &topo.in_sync {
            if topo.links.get(n).is_some_and(|l| !l.is_broken()) {
                continue;
            }
            let Some(mem) = topo.membership.member(n).cloned() else {
                continue;
            };
            if !self
                .resyncing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(n.clone())
            {
                continue;
            }
            let dev = self.clone();
            self.tasks.spawn(async move {
                if let Err(e) = dev.reconnect_in_sync(&mem).await {
                    debug!(volume = %dev.volume, node = %mem.node, "in-sync replica still unreachable: {e}");
                }
                dev.resyncing.lock().unwrap_or_else(|p| p.into_inner()).remove(&mem.node);
            });
        }
        for mem in topo.membership.replicas.iter().filter(|r| !r.in_sync) {
            let mut running = self.resyncing.lock().unwrap_or_else(|p| p.into_inner());
            if !running.insert(mem.node.clone()) {
                continue;
            }
            drop(running);
            let dev = self.clone();
            let mem = mem.clone();
            self.tasks.spawn(async move {
                let node = mem.node.clone();
                if let Err(e) = dev.resync_member(&mem).await {
                    debug!(volume = %dev.volume, node = %node, "resync not done: {e}");
                    dev.abandon_resync(&node, e).await;
                }
                dev.resyncing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node);
            });
        }
    }

    async fn reconnect_in_sync(&self, mem: &ReplicaMember) -> Result<(), String> {
        let link = connect_member(
            &self.volume,
            mem,
            self.local.as_ref(),
            self.options.connect_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        let _t = self.transition.lock().await;
        let _g = self.gate.write().await;
        let topo = self.topo();
        if topo.fenced.is_some() || !topo.in_sync.contains(&mem.node) {
            return Err("membership changed".into());
        }
        link.call(
            &self.volume,
            topo.membership.epoch,
            Request::SetEpoch {
                role: Role::InSync,
                out_of_sync: topo.membership.out_of_sync(),
                track_activity: topo.in_sync.len() > 1,
            },
            self.options.request_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        info!(volume = %self.volume, node = %mem.node, "in-sync replica reachable again");
        self.update_topo(|t| {
            t.links.insert(mem.node.clone(), link);
        });
        Ok(())
    }

    async fn abandon_resync(&self, node: &NodeId, error: String) {
        let _t = self.transition.lock().await;
        let topo = self.topo();
        if topo.in_sync.contains(node) {
            return;
        }
        if let Some(l) = topo.links.get(node) {
            l.close();
        }
        self.update_topo(|t| {
            t.resync.retain(|(n, _)| n != node);
            t.links.remove(node);
        });
        let state = if error.contains("unreachable") {
            ReplicaSyncState::Degraded { error: Some(error) }
        } else {
            ReplicaSyncState::Stale { error: Some(error) }
        };
        self.set_runtime(node, state);
    }

    /// Brings one out-of-sync member back: connect, become a resync target,
    /// copy its dirty regions, rejoin.
    async fn resync_member(&self, mem: &ReplicaMember) -> Result<(), String> {
        let node = &mem.node;
        let o = &self.options;
        let link = connect_member(&self.volume, mem, self.local.as_ref(), o.connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let full = match link
            .call(&self.volume, 0, Request::GetState, o.request_timeout)
            .await
        {
            Ok(Response::State(s))
                if s.size == self.size && u64::from(s.region_size) == self.region_size =>
            {
                s.disk == DiskState::New
            }
            Ok(Response::State(_)) => {
                // Wrong geometry: start over.
                link.call(&self.volume, u64::MAX, Request::Delete, o.request_timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                self.create_on(&link).await?;
                true
            }
            Err(LinkError::Replica {
                error: WireError::NotFound,
                ..
            }) => {
                self.create_on(&link).await?;
                true
            }
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        let abort = Arc::new(AtomicBool::new(false));
        {
            let _t = self.transition.lock().await;
            let _g = self.gate.write().await;
            let topo = self.topo();
            if topo.fenced.is_some()
                || topo.in_sync.contains(node)
                || topo.membership.member(node).is_none()
            {
                return Err("membership changed".into());
            }
            link.call(
                &self.volume,
                topo.membership.epoch,
                Request::SetEpoch {
                    role: Role::ResyncTarget,
                    out_of_sync: topo.membership.out_of_sync(),
                    track_activity: false,
                },
                o.request_timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
            if full {
                let marks = HashMap::from([(node.clone(), Bitmap::full(self.regions()))]);
                let failed = self.broadcast_marks(&marks).await;
                if !failed.is_empty() {
                    for f in &failed {
                        self.push_failure(f, None);
                    }
                    return Err("could not mark a full resync".into());
                }
            }
            self.update_topo(|t| {
                t.links.insert(node.clone(), link.clone());
                t.resync.push((node.clone(), abort.clone()));
            });
        }
        // Every write before this point is in the bitmaps; every later one
        // also goes to the target.
        let topo = self.topo();
        let mut plan = Bitmap::new(self.regions());
        let mut tracked = false;
        for n in &topo.in_sync {
            let Some(l) = topo.links.get(n) else { continue };
            match l
                .call(
                    &self.volume,
                    topo.membership.epoch,
                    Request::GetDirty { peer: node.clone() },
                    o.request_timeout,
                )
                .await
            {
                Ok(Response::Bitmap(Some(b))) => {
                    plan.union_with(&Bitmap::from_bytes(self.regions(), &b));
                    tracked = true;
                }
                Ok(_) => {}
                Err(e) => return Err(format!("reading dirty bitmap from {n}: {e}")),
            }
        }
        if !tracked {
            plan = Bitmap::full(self.regions());
        }
        // What the target itself had in flight when a primary crashed may
        // be on it alone.
        if mem.activity_suspect
            && let Ok(Response::Bitmap(Some(b))) = link
                .call(
                    &self.volume,
                    topo.membership.epoch,
                    Request::GetActivity,
                    o.request_timeout,
                )
                .await
        {
            let per = self.extent_size / self.region_size;
            for e in Bitmap::from_bytes(self.size.div_ceil(self.extent_size), &b).iter_set() {
                plan.set_range(e * per, (e + 1) * per);
            }
        }
        let total = (plan.count() * self.region_size).min(self.size);
        info!(volume = %self.volume, node = %node, bytes = total, full, "resync starts");
        let mut done = 0u64;
        self.set_runtime(node, ReplicaSyncState::Resyncing { done, total });
        let targets = [(node.clone(), link.clone())];
        for r in plan.iter_set() {
            if abort.load(Ordering::Acquire) || self.cancel.is_cancelled() {
                return Err("resync aborted".into());
            }
            done += self.copy_region(r, &targets).await?;
            self.set_runtime(node, ReplicaSyncState::Resyncing { done, total });
        }
        let epoch = self.topo().membership.epoch;
        link.call(&self.volume, epoch, Request::Flush, o.request_timeout)
            .await
            .map_err(|e| e.to_string())?;
        // Counted before the replica shows as in sync, so that nobody sees
        // it back in sync with its resync not counted yet.
        self.resynced_bytes.fetch_add(done, Ordering::Relaxed);
        if let Err(e) = self.rejoin(node, &link, &abort).await {
            self.resynced_bytes.fetch_sub(done, Ordering::Relaxed);
            return Err(e);
        }
        info!(volume = %self.volume, node = %node, bytes = done, "resync done; replica back in sync");
        Ok(())
    }

    async fn create_on(&self, link: &Link) -> Result<(), String> {
        link.call(
            &self.volume,
            0,
            Request::Create {
                size: self.size,
                region_size: self.region_size as u32,
                extent_size: self.extent_size as u32,
            },
            self.options.request_timeout,
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
    }

    async fn rejoin(&self, node: &NodeId, link: &Link, abort: &AtomicBool) -> Result<(), String> {
        let _t = self.transition.lock().await;
        let _g = self.gate.write().await;
        if abort.load(Ordering::Acquire) {
            return Err("a write to the target failed during the resync".into());
        }
        let topo = self.topo();
        if topo.fenced.is_some() {
            return Err("fenced".into());
        }
        let new_m = topo.membership.rejoin(node).map_err(|e| e.to_string())?;
        // The target must track the peers still out, with everything the
        // in-sync replicas have for them (it missed those writes too).
        let mut merges: HashMap<NodeId, Bitmap> = HashMap::new();
        for q in new_m.out_of_sync() {
            let mut bm = Bitmap::new(self.regions());
            for n in &topo.in_sync {
                if let Some(l) = topo.links.get(n)
                    && let Ok(Response::Bitmap(Some(b))) = l
                        .call(
                            &self.volume,
                            topo.membership.epoch,
                            Request::GetDirty { peer: q.clone() },
                            self.options.request_timeout,
                        )
                        .await
                {
                    bm.union_with(&Bitmap::from_bytes(self.regions(), &b));
                }
            }
            merges.insert(q, bm);
        }
        let version = self
            .cas(topo.version, &new_m)
            .await
            .map_err(|()| "membership update failed".to_string())?;
        self.update_topo(|t| {
            t.version = version;
            t.in_sync = new_m.in_sync();
            t.membership = new_m.clone();
            t.resync.retain(|(n, _)| n != node);
            t.links.insert(node.clone(), link.clone());
        });
        self.set_runtime(node, ReplicaSyncState::InSync);
        let mut failed = self.broadcast_epoch(&HashMap::new()).await;
        for (q, bm) in &merges {
            if bm.count() == 0 {
                continue;
            }
            let r = link
                .call(
                    &self.volume,
                    new_m.epoch,
                    Request::MarkDirty {
                        peer: q.clone(),
                        bitmap: Bytes::from(bm.to_bytes()),
                    },
                    self.options.request_timeout,
                )
                .await;
            if r.is_err() && !failed.contains(node) {
                failed.push(node.clone());
            }
        }
        if !failed.is_empty() {
            let dirty = failed
                .into_iter()
                .map(|n| (n, Bitmap::new(self.regions())))
                .collect();
            self.drop_members(dirty).await;
        }
        Ok(())
    }

    async fn checkpoint(&self) {
        let _g = self.gate.read().await;
        let topo = self.topo();
        if topo.fenced.is_some() || topo.in_sync.len() < 2 {
            return;
        }
        let watermark = self.watermark.low();
        let clear_legacy = !self.activity_pending.load(Ordering::Acquire);
        for n in &topo.in_sync {
            if let Some(l) = topo.links.get(n)
                && let Err(e) = l
                    .call(
                        &self.volume,
                        topo.membership.epoch,
                        Request::Checkpoint {
                            watermark,
                            clear_legacy,
                        },
                        self.options.request_timeout,
                    )
                    .await
            {
                warn!(volume = %self.volume, node = %n, "checkpoint failed: {e}");
                self.push_failure(n, None);
            }
        }
        drop(_g);
        self.process_failures().await;
    }

    async fn check_membership(&self) {
        // A membership change of this device writes the record first and
        // its own view a moment later: read between the two, the record
        // would look like another primary's. Skip the check while one is
        // under way (a takeover by another host makes its CAS fail).
        let Ok(_t) = self.transition.try_lock() else {
            return;
        };
        let topo = self.topo();
        if topo.fenced.is_some() {
            return;
        }
        match self.store.load(&self.volume).await {
            Ok(Some(r))
                if r.value.epoch > topo.membership.epoch
                    || r.value.primary.as_ref() != Some(&self.node) =>
            {
                self.fence("the membership record names a newer primary");
            }
            Ok(None) => self.fence("the membership record is gone"),
            _ => {}
        }
    }

    /// What this primary knows about the volume.
    pub fn status(&self) -> VolumeStatus {
        let topo = self.topo();
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let local = self.local.as_ref().map(|s| s.node().clone());
        let replicas = topo
            .membership
            .replicas
            .iter()
            .map(|r| ReplicaStatus {
                node: r.node.clone(),
                addr: r.addr.clone(),
                local: local.as_ref() == Some(&r.node),
                read_source: topo.read_source.as_ref() == Some(&r.node),
                state: if topo.in_sync.contains(&r.node) {
                    ReplicaSyncState::InSync
                } else {
                    match runtime.get(&r.node) {
                        Some(ReplicaSyncState::InSync) | None => {
                            ReplicaSyncState::Stale { error: None }
                        }
                        Some(s) => s.clone(),
                    }
                },
            })
            .collect();
        VolumeStatus {
            volume: self.volume.clone(),
            primary: self.node.clone(),
            epoch: topo.membership.epoch,
            size: self.size,
            min_in_sync: topo.membership.min_in_sync,
            fenced: topo.fenced.clone(),
            writable: self.usable(&topo, true).is_ok(),
            replicas,
            resynced_bytes: self.resynced_bytes.load(Ordering::Relaxed),
            activity_resync_pending: self.activity_pending.load(Ordering::Acquire),
        }
    }

    /// The I/O this primary has served, counted since it opened.
    pub fn io_stats(&self) -> IoSnapshot {
        self.stats.snapshot()
    }

    /// The current membership record as this primary last wrote it.
    pub fn membership(&self) -> Membership {
        self.topo().membership.clone()
    }

    /// Adds a replica on `node` (its replica server at `addr`); it is
    /// fully copied in the background and then joins the in-sync set.
    pub async fn add_replica(&self, node: &NodeId, addr: &str) -> Result<(), VolumeError> {
        let _t = self.transition.lock().await;
        let _g = self.gate.write().await;
        let topo = self.topo();
        self.check_not_fenced(&topo)?;
        let new_m = topo.membership.add_replica(node, addr)?;
        let version = self
            .cas(topo.version, &new_m)
            .await
            .map_err(|()| self.change_failed())?;
        self.update_topo(|t| {
            t.version = version;
            t.membership = new_m;
        });
        self.set_runtime(node, ReplicaSyncState::Stale { error: None });
        let failed = self.broadcast_epoch(&HashMap::new()).await;
        if !failed.is_empty() {
            self.drop_members(
                failed
                    .into_iter()
                    .map(|n| (n, Bitmap::new(self.regions())))
                    .collect(),
            )
            .await;
        }
        info!(volume = %self.volume, node = %node, "replica added");
        Ok(())
    }

    /// Removes the replica on `node` and deletes its data (best effort).
    pub async fn remove_replica(&self, node: &NodeId) -> Result<(), VolumeError> {
        let addr;
        {
            let _t = self.transition.lock().await;
            let _g = self.gate.write().await;
            let topo = self.topo();
            self.check_not_fenced(&topo)?;
            addr = topo.membership.member(node).map(|m| m.addr.clone());
            let new_m = topo.membership.remove_replica(node)?;
            let version = self
                .cas(topo.version, &new_m)
                .await
                .map_err(|()| self.change_failed())?;
            if let Some(l) = topo.links.get(node) {
                l.close();
            }
            self.update_topo(|t| {
                t.version = version;
                t.in_sync = new_m.in_sync();
                t.membership = new_m;
                t.links.remove(node);
                t.resync.retain(|(n, _)| n != node);
            });
            let failed = self.broadcast_epoch(&HashMap::new()).await;
            if !failed.is_empty() {
                self.drop_members(
                    failed
                        .into_iter()
                        .map(|n| (n, Bitmap::new(self.regions())))
                        .collect(),
                )
                .await;
            }
        }
        self.runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        if let Some(addr) = addr {
            let mem = ReplicaMember {
                node: node.clone(),
                addr,
                in_sync: false,
                activity_suspect: false,
            };
            if let Ok(l) = connect_member(
                &self.volume,
                &mem,
                self.local.as_ref(),
                self.options.connect_timeout,
            )
            .await
            {
                if let Err(e) = l
                    .call(
                        &self.volume,
                        u64::MAX,
                        Request::Delete,
                        self.options.request_timeout,
                    )
                    .await
                {
                    warn!(volume = %self.volume, node = %node, "could not delete removed replica: {e}");
                }
                l.close();
            }
        }
        info!(volume = %self.volume, node = %node, "replica removed");
        Ok(())
    }

    /// Takes a crash-consistent snapshot named `name` on every in-sync
    /// replica: I/O is paused, every replica flushed and copied at the same
    /// point. Returns the nodes that hold the snapshot.
    pub async fn snapshot(&self, name: &str) -> Result<Vec<NodeId>, VolumeError> {
        VolumeId::new(name).map_err(|e| VolumeError::Invalid(e.to_string()))?;
        let _t = self.transition.lock().await;
        let _g = self.gate.write().await;
        let topo = self.topo();
        self.check_not_fenced(&topo)?;
        let epoch = topo.membership.epoch;
        let calls = topo
            .in_sync
            .iter()
            .filter_map(|n| topo.links.get(n).map(|l| (n, l)))
            .map(|(n, l)| async move {
                let r = l
                    .call(
                        &self.volume,
                        epoch,
                        Request::Snapshot {
                            name: name.to_owned(),
                        },
                        self.options.request_timeout.max(Duration::from_secs(600)),
                    )
                    .await;
                (n.clone(), r)
            });
        let mut holders = vec![];
        let mut last_err = None;
        for (n, r) in join_all(calls).await {
            match r {
                Ok(_) => holders.push(n),
                Err(e) => {
                    warn!(volume = %self.volume, node = %n, "snapshot failed: {e}");
                    last_err = Some(e);
                }
            }
        }
        match (holders.is_empty(), last_err) {
            (true, Some(e)) => Err(e.into()),
            _ => {
                info!(volume = %self.volume, name, nodes = ?holders, "snapshot taken");
                Ok(holders)
            }
        }
    }

    fn check_not_fenced(&self, topo: &Topology) -> Result<(), VolumeError> {
        match &topo.fenced {
            Some(r) => Err(VolumeError::Fenced {
                volume: self.volume.clone(),
                reason: r.clone(),
            }),
            None => Ok(()),
        }
    }

    fn change_failed(&self) -> VolumeError {
        match &self.topo().fenced {
            Some(r) => VolumeError::Fenced {
                volume: self.volume.clone(),
                reason: r.clone(),
            },
            None => VolumeError::ConcurrentChange {
                volume: self.volume.clone(),
            },
        }
    }

    /// Stops serving: background work ends, replicas are flushed, the
    /// record no longer names this node as primary. I/O fails afterwards.
    pub async fn close(&self) -> Result<(), VolumeError> {
        self.close_to(None).await
    }

    /// Closes the device like [`ReplicatedDevice::close`], but names `next`
    /// the volume's primary in the record instead of none: a live
    /// migration's handover, whose destination may then open the volume at
    /// once (it needs no takeover, and waits for no one to let go).
    pub async fn close_to(&self, next: Option<&NodeId>) -> Result<(), VolumeError> {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let _t = self.transition.lock().await;
        let _g = self.gate.write().await;
        let topo = self.topo();
        let mut result = Ok(());
        if topo.fenced.is_none() {
            // Every in-sync replica at once: a handover waits for this.
            join_all(
                topo.in_sync
                    .iter()
                    .filter_map(|n| topo.links.get(n))
                    .map(|l| {
                        l.call(
                            &self.volume,
                            topo.membership.epoch,
                            Request::Flush,
                            self.options.request_timeout,
                        )
                    }),
            )
            .await;
            let mut m = topo.membership.clone();
            m.primary = next.cloned();
            if self
                .store
                .cas(&self.volume, Some(topo.version), &m)
                .await?
                .is_none()
            {
                result = Err(VolumeError::ConcurrentChange {
                    volume: self.volume.clone(),
                });
            }
        }
        for l in topo.links.values() {
            l.close();
        }
        self.update_topo(|t| {
            t.fenced = Some("closed".into());
            t.links.clear();
        });
        info!(volume = %self.volume, "volume closed");
        result
    }
}

/// Copies the regions that had writes in flight at the last crash from the
/// read source to every other in-sync replica, then lets the replicas
/// forget that activity.
async fn activity_resync(weak: Weak<ReplicatedDevice>, regions: Bitmap) {
    let Some(dev) = weak.upgrade() else { return };
    info!(volume = %dev.volume, regions = regions.count(), "reconciling regions with writes in flight at the last stop");
    for r in regions.iter_set() {
        if dev.cancel.is_cancelled() {
            return;
        }
        loop {
            let topo = dev.topo();
            if topo.fenced.is_some() {
                return;
            }
            let targets: Vec<(NodeId, Link)> = topo
                .in_sync
                .iter()
                .filter(|n| Some(*n) != topo.read_source.as_ref())
                .filter_map(|n| topo.links.get(n).map(|l| (n.clone(), l.clone())))
                .collect();
            if targets.is_empty() {
                break;
            }
            match dev.copy_region(r, &targets).await {
                Ok(_) => break,
                Err(e) => {
                    warn!(volume = %dev.volume, region = r, "activity resync: {e}");
                    // Whoever failed leaves the in-sync set with this region dirty.
                    for (n, _) in &targets {
                        dev.push_failure(
                            n,
                            Some((
                                r * dev.region_size,
                                dev.region_size.min(dev.size - r * dev.region_size),
                            )),
                        );
                    }
                    dev.process_failures().await;
                    if dev.topo().in_sync == topo.in_sync {
                        // Nothing changed (store down?): retry later.
                        tokio::time::sleep(dev.options.reconnect_interval).await;
                    }
                }
            }
        }
    }
    dev.activity_pending.store(false, Ordering::Release);
    info!(volume = %dev.volume, "activity reconciled");
}

#[async_trait]
impl BlockDevice for ReplicatedDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> BlockSizeConstraints {
        BlockSizeConstraints::default()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        skyvisor_nbd::device::check_range(offset, len as u64, self.size)?;
        let started = Instant::now();
        let r = self.read_inner(offset, len).await;
        self.stats
            .record(IoKind::Read, len as u64, started.elapsed(), r.is_ok());
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        skyvisor_nbd::device::check_range(offset, data.len() as u64, self.size)?;
        let len = data.len() as u64;
        self.measured(IoKind::Write, len, WriteOp::Write { offset, data, fua })
            .await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.measured(IoKind::Flush, 0, WriteOp::Flush).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        skyvisor_nbd::device::check_range(offset, len, self.size)?;
        self.measured(IoKind::Discard, len, WriteOp::Trim { offset, len, fua })
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        skyvisor_nbd::device::check_range(offset, len, self.size)?;
        self.measured(
            IoKind::Discard,
            len,
            WriteOp::Zeroes {
                offset,
                len,
                may_trim,
                fua,
            },
        )
        .await
    }
}

impl ReplicatedDevice {
    /// Replicates `op` and counts it as `len` bytes of `kind`.
    async fn measured(&self, kind: IoKind, len: u64, op: WriteOp) -> Result<(), DeviceError> {
        let started = Instant::now();
        let r = self.replicate(op).await;
        self.stats.record(kind, len, started.elapsed(), r.is_ok());
        r
    }

    async fn read_inner(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        for _ in 0..4 {
            let guard = self.gate.read().await;
            let topo = self.topo();
            self.usable(&topo, false)?;
            let Some((node, link)) = topo
                .read_source
                .as_ref()
                .and_then(|n| topo.links.get(n).map(|l| (n, l)))
            else {
                return Err(unavailable("no in-sync replica to read from"));
            };
            let r = link
                .call(
                    &self.volume,
                    topo.membership.epoch,
                    Request::Read {
                        offset,
                        len: len as u32,
                    },
                    self.options.request_timeout,
                )
                .await;
            match r {
                Ok(Response::Data(d)) if d.len() == len => return Ok(d),
                Ok(_) => return Err(unavailable("malformed read answer")),
                Err(e) if e.is_fenced() => {
                    drop(guard);
                    self.fence("a replica has seen a newer epoch");
                    return Err(unavailable("primary fenced"));
                }
                Err(e) => {
                    warn!(volume = %self.volume, node = %node, "read failed: {e}");
                    self.push_failure(node, None);
                    drop(guard);
                    self.process_failures().await;
                }
            }
        }
        Err(unavailable("reads keep failing"))
    }
}
