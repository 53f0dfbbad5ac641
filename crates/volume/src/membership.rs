//! The authoritative membership record of a volume: its replicas, which of
//! them are in sync, the epoch and the primary; and the [`MembershipStore`]
//! it lives in, changed only by compare-and-swap.
//!
//! The record is the single source of truth about which replicas hold every
//! acknowledged write. A primary records a change here *before* it
//! acknowledges any write that relied on it. Transitions are pure functions
//! on [`Membership`] so they can be tested without I/O; this module must
//! never talk to replicas.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, VolumeId};

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMember {
    /// The node holding it.
    pub node: NodeId,
    /// Where that node's replica server listens (`host:port`).
    pub addr: String,
    /// Whether it has every acknowledged write (may serve reads, may be promoted).
    pub in_sync: bool,
    /// It left the in-sync set while a primary was down, so writes that
    /// were in flight then may be on it alone: its own activity log must be
    /// resynced too.
    #[serde(default)]
    pub activity_suspect: bool,
}

/// The membership record of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The volume.
    pub volume: VolumeId,
    /// Size in bytes.
    pub size: u64,
    /// Granularity of dirty tracking, bytes (a power of two).
    pub region_size: u32,
    /// Granularity of the activity log, bytes (a multiple of `region_size`).
    pub extent_size: u32,
    /// Generation number; bumped by every change of the in-sync set or primary.
    pub epoch: u64,
    /// The node serving the volume, if any.
    pub primary: Option<NodeId>,
    /// Writes fail instead of being acknowledged by fewer in-sync replicas.
    pub min_in_sync: u32,
    /// The replicas.
    pub replicas: Vec<ReplicaMember>,
}

/// A value with the version the store holds it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// Store version, for compare-and-swap.
    pub version: u64,
    /// The value.
    pub value: T,
}

/// Why a transition is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The node is not a member.
    #[error("node {0} is not a replica of this volume")]
    NotMember(NodeId),
    /// The node already is a member.
    #[error("node {0} already holds a replica of this volume")]
    AlreadyMember(NodeId),
    /// The change would leave no in-sync replica.
    #[error("the change would leave no in-sync replica")]
    NoInSyncLeft,
}

impl Membership {
    /// The in-sync members.
    pub fn in_sync(&self) -> Vec<NodeId> {
        self.replicas
            .iter()
            .filter(|r| r.in_sync)
            .map(|r| r.node.clone())
            .collect()
    }

    /// The out-of-sync members.
    pub fn out_of_sync(&self) -> Vec<NodeId> {
        self.replicas
            .iter()
            .filter(|r| !r.in_sync)
            .map(|r| r.node.clone())
            .collect()
    }

    /// The member on `node`.
    pub fn member(&self, node: &NodeId) -> Option<&ReplicaMember> {
        self.replicas.iter().find(|r| &r.node == node)
    }

    /// Number of regions of the volume.
    pub fn regions(&self) -> u64 {
        self.size.div_ceil(u64::from(self.region_size.max(1)))
    }

    /// `nodes` leave the in-sync set; the epoch is bumped.
    pub fn drop_from_sync(&self, nodes: &[NodeId]) -> Membership {
        let mut m = self.clone();
        for r in &mut m.replicas {
            if nodes.contains(&r.node) {
                r.in_sync = false;
            }
        }
        m.epoch += 1;
        m
    }

    /// `node` rejoins the in-sync set after a resync; the epoch is bumped.
    pub fn rejoin(&self, node: &NodeId) -> Result<Membership, TransitionError> {
        let mut m = self.clone();
        let r = m
            .replicas
            .iter_mut()
            .find(|r| &r.node == node)
            .ok_or_else(|| TransitionError::NotMember(node.clone()))?;
        r.in_sync = true;
        r.activity_suspect = false;
        m.epoch += 1;
        Ok(m)
    }

    /// `primary` takes the volume over: in-sync members it cannot reach
    /// leave the in-sync set, the epoch is bumped. Only in-sync members
    /// may remain in sync, so a stale replica is never promoted.
    pub fn take_over(
        &self,
        primary: &NodeId,
        reachable: &[NodeId],
    ) -> Result<Membership, TransitionError> {
        let mut m = self.clone();
        for r in &mut m.replicas {
            if r.in_sync && !reachable.contains(&r.node) {
                r.in_sync = false;
                r.activity_suspect = true;
            }
        }
        if m.in_sync().is_empty() {
            return Err(TransitionError::NoInSyncLeft);
        }
        m.primary = Some(primary.clone());
        m.epoch += 1;
        Ok(m)
    }

    /// Adds a new, out-of-sync replica; the epoch is bumped.
    pub fn add_replica(&self, node: &NodeId, addr: &str) -> Result<Membership, TransitionError> {
        if self.member(node).is_some() {
            return Err(TransitionError::AlreadyMember(node.clone()));
        }
        let mut m = self.clone();
        m.replicas.push(ReplicaMember {
            node: node.clone(),
            addr: addr.to_owned(),
            in_sync: false,
            activity_suspect: false,
        });
        m.epoch += 1;
        Ok(m)
    }

    /// Removes a replica; the epoch is bumped. The last in-sync replica
    /// cannot be removed.
    pub fn remove_replica(&self, node: &NodeId) -> Result<Membership, TransitionError> {
        if self.member(node).is_none() {
            return Err(TransitionError::NotMember(node.clone()));
        }
        let mut m = self.clone();
        m.replicas.retain(|r| &r.node != node);
        if m.in_sync().is_empty() {
            return Err(TransitionError::NoInSyncLeft);
        }
        m.epoch += 1;
        Ok(m)
    }
}

/// Errors of a membership store.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The backing storage failed.
    #[error("membership store failed on volume {volume}: {message}")]
    Backend {
        /// The volume.
        volume: VolumeId,
        /// What failed.
        message: String,
    },
}

/// Where membership records live. `cas` must be atomic across every process
/// and host that can serve the volume (the cluster store in production).
#[async_trait]
pub trait MembershipStore: Send + Sync + 'static {
    /// The record of `volume`, if any.
    async fn load(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<Versioned<Membership>>, MembershipError>;

    /// Stores `new` if the current version is `expected` (`None`: only if
    /// absent). Returns the new version, or `None` on a conflict.
    async fn cas(
        &self,
        volume: &VolumeId,
        expected: Option<u64>,
        new: &Membership,
    ) -> Result<Option<u64>, MembershipError>;
}

/// An in-process membership store, for tests and single-process setups.
#[derive(Debug, Default)]
pub struct MemoryMembershipStore {
    records: Mutex<HashMap<VolumeId, Versioned<Membership>>>,
}

impl MemoryMembershipStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl MembershipStore for MemoryMembershipStore {
    async fn load(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<Versioned<Membership>>, MembershipError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned())
    }

    async fn cas(
        &self,
        volume: &VolumeId,
        expected: Option<u64>,
        new: &Membership,
    ) -> Result<Option<u64>, MembershipError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let current = records.get(volume).map(|v| v.version);
        if current != expected {
            return Ok(None);
        }
        let version = current.unwrap_or(0) + 1;
        records.insert(
            volume.clone(),
            Versioned {
                version,
                value: new.clone(),
            },
        );
        Ok(Some(version))
    }
}

/// A membership store in a directory shared by the processes of one host
/// (one JSON file per volume, `flock` for atomicity). For tests, benchmarks
/// and single-host setups; a cluster needs the cluster store.
#[derive(Debug, Clone)]
pub struct FileMembershipStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct FileRecord {
    version: u64,
    membership: Membership,
}

impl FileMembershipStore {
    /// A store in `dir` (created if missing).
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    async fn locked<T: Send + 'static>(
        &self,
        volume: &VolumeId,
        f: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, MembershipError> {
        let lock_path = self.dir.join(format!("{volume}.lock"));
        let path = self.dir.join(format!("{volume}.json"));
        let volume = volume.clone();
        {
            let r = tokio::task::spawn_blocking(move || {
                let lock = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)?;
                lock.lock()?;
                let r = f(&path);
                let _ = lock.unlock();
                r
            })
            .await;
            match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(MembershipError::Backend {
                    volume,
                    message: e.to_string(),
                }),
                Err(e) => Err(MembershipError::Backend {
                    volume,
                    message: e.to_string(),
                }),
            }
        }
    }
}

fn read_record(path: &Path) -> std::io::Result<Option<FileRecord>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl MembershipStore for FileMembershipStore {
    async fn load(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<Versioned<Membership>>, MembershipError> {
        self.locked(volume, |path| {
            Ok(read_record(path)?.map(|r| Versioned {
                version: r.version,
                value: r.membership,
            }))
        })
        .await
    }

    async fn cas(
        &self,
        volume: &VolumeId,
        expected: Option<u64>,
        new: &Membership,
    ) -> Result<Option<u64>, MembershipError> {
        let new = new.clone();
        self.locked(volume, move |path| {
            let current = read_record(path)?.map(|r| r.version);
            if current != expected {
                return Ok(None);
            }
            let version = current.unwrap_or(0) + 1;
            let bytes = serde_json::to_vec_pretty(&FileRecord {
                version,
                membership: new,
            })
            .map_err(std::io::Error::other)?;
            crate::fsutil::write_atomic(path, &bytes)?;
            Ok(Some(version))
        })
        .await
    }
}

/// The contract every [`MembershipStore`] must meet, checked against a
/// fresh (empty) store: absent records load as `None`, `cas` with `None`
/// only creates, a stale version never wins, the version returned is the
/// one `load` reports, and of many concurrent swaps from one version
/// exactly one wins. Panics naming what differed: call it from tests of
/// every implementation (the in-memory and file stores here, the cluster
/// store in the agent).
pub async fn check_store_contract(store: &dyn MembershipStore) {
    let n = |s: &str| NodeId::new(s).expect("node id");
    let volume = VolumeId::new("contract-check").expect("volume id");
    let m = Membership {
        volume: volume.clone(),
        size: 1 << 30,
        region_size: 1 << 20,
        extent_size: 4 << 20,
        epoch: 1,
        primary: None,
        min_in_sync: 1,
        replicas: ["a", "b"]
            .iter()
            .map(|x| ReplicaMember {
                node: n(x),
                addr: format!("{x}:1"),
                in_sync: true,
                activity_suspect: false,
            })
            .collect(),
    };
    assert!(
        store.load(&volume).await.expect("load").is_none(),
        "a fresh store has no record"
    );
    let v1 = store
        .cas(&volume, None, &m)
        .await
        .expect("cas")
        .expect("creating an absent record succeeds");
    assert_eq!(
        store.cas(&volume, None, &m).await.expect("cas"),
        None,
        "expected None only creates"
    );
    let loaded = store.load(&volume).await.expect("load").expect("present");
    assert_eq!(loaded.version, v1, "load reports the version cas returned");
    assert_eq!(loaded.value, m);
    let m2 = m.drop_from_sync(&[n("a")]);
    assert_eq!(
        store.cas(&volume, Some(v1 + 7), &m2).await.expect("cas"),
        None,
        "a wrong version never wins"
    );
    let v2 = store
        .cas(&volume, Some(v1), &m2)
        .await
        .expect("cas")
        .expect("the current version wins");
    assert_ne!(v1, v2, "a swap changes the version");
    assert_eq!(
        store.cas(&volume, Some(v1), &m).await.expect("cas"),
        None,
        "an old version never wins again"
    );
    let got = store.load(&volume).await.expect("load").expect("present");
    assert_eq!((got.version, &got.value), (v2, &m2));
    // Concurrent swaps from one version: exactly one wins.
    let volume_ref = &volume;
    let tries = futures::future::join_all((0..8u64).map(|i| {
        let mut next = m2.clone();
        next.epoch += 1 + i;
        async move { store.cas(volume_ref, Some(v2), &next).await.expect("cas") }
    }))
    .await;
    let winners: Vec<u64> = tries.into_iter().flatten().collect();
    assert_eq!(winners.len(), 1, "exactly one concurrent swap wins");
    let got = store.load(&volume).await.expect("load").expect("present");
    assert_eq!(got.version, winners[0]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).expect("id")
    }

    fn three() -> Membership {
        Membership {
            volume: VolumeId::new("v").expect("id"),
            size: 1 << 30,
            region_size: 1 << 20,
            extent_size: 4 << 20,
            epoch: 1,
            primary: None,
            min_in_sync: 1,
            replicas: ["a", "b", "c"]
                .iter()
                .map(|x| ReplicaMember {
                    node: n(x),
                    addr: format!("{x}:1"),
                    in_sync: true,
                    activity_suspect: false,
                })
                .collect(),
        }
    }

    #[test]
    fn takeover_only_keeps_reachable_in_sync_replicas() {
        let m = three().drop_from_sync(&[n("c")]);
        // c is stale; even if it is the only one reachable, it cannot be promoted.
        assert_eq!(
            m.take_over(&n("c"), &[n("c")]),
            Err(TransitionError::NoInSyncLeft)
        );
        let t = m.take_over(&n("b"), &[n("b"), n("c")]).expect("takeover");
        assert_eq!(t.in_sync(), vec![n("b")]);
        assert_eq!(t.primary, Some(n("b")));
        assert_eq!(t.epoch, m.epoch + 1);
    }

    #[test]
    fn add_remove_rejoin() {
        let m = three();
        let m2 = m.add_replica(&n("d"), "d:1").expect("add");
        assert_eq!(m2.out_of_sync(), vec![n("d")]);
        assert!(m2.add_replica(&n("d"), "d:1").is_err());
        let m3 = m2.rejoin(&n("d")).expect("rejoin");
        assert_eq!(m3.in_sync().len(), 4);
        let only = m3.drop_from_sync(&[n("a"), n("b"), n("c")]);
        assert_eq!(
            only.remove_replica(&n("d")),
            Err(TransitionError::NoInSyncLeft)
        );
        assert!(only.remove_replica(&n("x")).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Drop(usize),
        Rejoin(usize),
        Takeover(usize, Vec<bool>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..3).prop_map(Op::Drop),
            (0usize..3).prop_map(Op::Rejoin),
            ((0usize..3), proptest::collection::vec(any::<bool>(), 3))
                .prop_map(|(p, r)| Op::Takeover(p, r)),
        ]
    }

    proptest! {
        /// Epochs only grow, and a takeover never adds a replica to the
        /// in-sync set: whoever serves after a takeover was in sync before.
        #[test]
        fn transitions_keep_invariants(ops in proptest::collection::vec(op(), 1..40)) {
            let nodes = [n("a"), n("b"), n("c")];
            let mut m = three();
            for o in ops {
                let before = m.clone();
                let next = match o {
                    Op::Drop(i) => Ok(m.drop_from_sync(&[nodes[i].clone()])),
                    Op::Rejoin(i) => m.rejoin(&nodes[i]),
                    Op::Takeover(p, reach) => {
                        let reachable: Vec<NodeId> = nodes.iter().zip(&reach).filter(|(_, r)| **r).map(|(x, _)| x.clone()).collect();
                        let r = m.take_over(&nodes[p], &reachable);
                        if let Ok(t) = &r {
                            for x in t.in_sync() {
                                prop_assert!(before.in_sync().contains(&x));
                                prop_assert!(reachable.contains(&x));
                            }
                            prop_assert!(!t.in_sync().is_empty());
                        }
                        r
                    }
                };
                if let Ok(next) = next {
                    prop_assert!(next.epoch > before.epoch);
                    m = next;
                }
            }
        }
    }

    #[tokio::test]
    async fn stores_compare_and_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stores: Vec<Box<dyn MembershipStore>> = vec![
            Box::new(MemoryMembershipStore::new()),
            Box::new(FileMembershipStore::new(dir.path()).expect("store")),
        ];
        for s in stores {
            check_store_contract(s.as_ref()).await;
        }
    }
}
