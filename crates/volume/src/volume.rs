//! Volume lifecycle outside a primary: creating a replicated volume (its
//! replicas and its membership record), growing it, deleting its replicas,
//! and calling one replica directly (snapshot listing and deletion).
//!
//! Creation either completes (every replica created, consistent at epoch 1,
//! record stored) or removes what it created; it never leaves a record
//! naming replicas that do not exist. Growing claims the volume (the record
//! names the grower as primary) so that nobody opens it while replicas
//! change size; it never runs while another node serves the volume.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tracing::{info, warn};

use crate::client::Link;
use crate::device::VolumeError;
use crate::ids::{NodeId, VolumeId};
use crate::membership::{Membership, MembershipStore, ReplicaMember};
use crate::replica::ReplicaStore;
use crate::wire::{Request, Response, Role};

/// Default dirty-tracking granularity (1 MiB).
pub const DEFAULT_REGION_SIZE: u32 = 1 << 20;
/// Default activity-log granularity (4 MiB).
pub const DEFAULT_EXTENT_SIZE: u32 = 4 << 20;

/// What to create.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// The volume.
    pub volume: VolumeId,
    /// Size in bytes (a multiple of 4096).
    pub size: u64,
    /// Dirty-tracking granularity.
    pub region_size: u32,
    /// Activity-log granularity.
    pub extent_size: u32,
    /// Writes fail below this many in-sync replicas.
    pub min_in_sync: u32,
    /// The replicas: node and replica server address.
    pub replicas: Vec<(NodeId, String)>,
}

impl VolumeSpec {
    /// A spec with default granularities and `min_in_sync` 1.
    pub fn new(volume: VolumeId, size: u64, replicas: Vec<(NodeId, String)>) -> Self {
        Self {
            volume,
            size,
            region_size: DEFAULT_REGION_SIZE,
            extent_size: DEFAULT_EXTENT_SIZE,
            min_in_sync: 1,
            replicas,
        }
    }
}

async fn link_to(
    volume: &VolumeId,
    node: &NodeId,
    addr: &str,
    local: Option<&Arc<ReplicaStore>>,
    timeout: Duration,
) -> Result<Link, VolumeError> {
    let link = match local {
        Some(s) if s.node() == node => Link::Local {
            node: node.clone(),
            store: s.clone(),
        },
        _ => Link::Remote(crate::client::RemoteReplica::connect(node, addr, timeout).await?),
    };
    link.call(volume, 0, Request::Hello { node: node.clone() }, timeout)
        .await?;
    Ok(link)
}

/// Calls the replica of `volume` on `node` (at `addr`) once: in process
/// when `local` is that node's store, else over a fresh connection.
pub async fn call_replica(
    volume: &VolumeId,
    node: &NodeId,
    addr: &str,
    epoch: u64,
    request: Request,
    local: Option<&Arc<ReplicaStore>>,
    timeout: Duration,
) -> Result<Response, VolumeError> {
    let link = link_to(volume, node, addr, local, timeout).await?;
    let r = link.call(volume, epoch, request, timeout).await;
    link.close();
    Ok(r?)
}

/// Grows a volume that no node serves to `new_size` bytes (never call it
/// while `node` itself serves the volume): every
/// replica (in sync or not) must be reachable. `node` claims the volume as
/// primary for the duration (so that no one opens it half grown), resizes
/// every replica (idempotent), then stores the new size and releases the
/// claim. A failure releases the claim; replicas already grown stay grown
/// and a retry finishes the job.
pub async fn grow_volume(
    store: &dyn MembershipStore,
    volume: &VolumeId,
    node: &NodeId,
    new_size: u64,
    local: Option<&Arc<ReplicaStore>>,
    timeout: Duration,
) -> Result<Membership, VolumeError> {
    let record = store
        .load(volume)
        .await?
        .ok_or_else(|| VolumeError::NotFound {
            volume: volume.clone(),
        })?;
    let m = record.value;
    if let Some(p) = &m.primary
        && p != node
    {
        return Err(VolumeError::PrimaryElsewhere {
            volume: volume.clone(),
            primary: p.clone(),
        });
    }
    if new_size == m.size {
        return Ok(m);
    }
    if new_size < m.size || !new_size.is_multiple_of(4096) {
        return Err(VolumeError::Invalid(format!(
            "cannot resize volume {volume} from {} to {new_size} bytes: volumes only grow, in multiples of 4096",
            m.size
        )));
    }
    let mut claimed = m.clone();
    claimed.primary = Some(node.clone());
    let version = store
        .cas(volume, Some(record.version), &claimed)
        .await?
        .ok_or_else(|| VolumeError::ConcurrentChange {
            volume: volume.clone(),
        })?;
    let results = join_all(m.replicas.iter().map(|r| {
        call_replica(
            volume,
            &r.node,
            &r.addr,
            m.epoch,
            Request::Resize { size: new_size },
            local,
            timeout,
        )
    }))
    .await;
    let failed = results.into_iter().find_map(Result::err);
    let mut done = claimed.clone();
    // A claim of ours left by an earlier, interrupted grow ends here too.
    done.primary = None;
    if failed.is_none() {
        done.size = new_size;
    }
    let stored = store.cas(volume, Some(version), &done).await?;
    if let Some(e) = failed {
        warn!(volume = %volume, "growing failed: {e}");
        return Err(e);
    }
    if stored.is_none() {
        return Err(VolumeError::ConcurrentChange {
            volume: volume.clone(),
        });
    }
    info!(volume = %volume, size = new_size, "volume grown");
    Ok(done)
}

/// Deletes every replica of `m` that can be reached (with their
/// snapshots); returns the nodes whose replica could not be deleted, with
/// why. The membership record is the caller's to remove.
pub async fn delete_replicas(
    m: &Membership,
    local: Option<&Arc<ReplicaStore>>,
    timeout: Duration,
) -> Vec<(NodeId, VolumeError)> {
    let results = join_all(m.replicas.iter().map(|r| async move {
        let res = call_replica(
            &m.volume,
            &r.node,
            &r.addr,
            u64::MAX,
            Request::Delete,
            local,
            timeout,
        )
        .await;
        (r.node.clone(), res)
    }))
    .await;
    results
        .into_iter()
        .filter_map(|(n, r)| r.err().map(|e| (n, e)))
        .collect()
}

/// Creates the volume's replicas (empty, hence identical and in sync) and
/// its membership record at epoch 1.
pub async fn create_volume(
    store: &dyn MembershipStore,
    spec: &VolumeSpec,
    local: Option<&Arc<ReplicaStore>>,
    timeout: Duration,
) -> Result<Membership, VolumeError> {
    if spec.size == 0 || !spec.size.is_multiple_of(4096) {
        return Err(VolumeError::Invalid(
            "size must be a positive multiple of 4096".into(),
        ));
    }
    if !spec.region_size.is_power_of_two()
        || spec.region_size < 4096
        || !spec.extent_size.is_multiple_of(spec.region_size)
    {
        return Err(VolumeError::Invalid(
            "region size must be a power of two >= 4096 dividing the extent size".into(),
        ));
    }
    if spec.replicas.is_empty() || spec.min_in_sync as usize > spec.replicas.len() {
        return Err(VolumeError::Invalid(
            "need at least min_in_sync replicas".into(),
        ));
    }
    let mut nodes: Vec<&NodeId> = spec.replicas.iter().map(|(n, _)| n).collect();
    nodes.sort();
    nodes.dedup();
    if nodes.len() != spec.replicas.len() {
        return Err(VolumeError::Invalid("one replica per node".into()));
    }
    if store.load(&spec.volume).await?.is_some() {
        return Err(VolumeError::Invalid(format!(
            "volume {} exists",
            spec.volume
        )));
    }
    let track = spec.replicas.len() > 1;
    let results = join_all(spec.replicas.iter().map(|(node, addr)| async move {
        let link = link_to(&spec.volume, node, addr, local, timeout).await?;
        let r: Result<(), VolumeError> = async {
            link.call(
                &spec.volume,
                0,
                Request::Create {
                    size: spec.size,
                    region_size: spec.region_size,
                    extent_size: spec.extent_size,
                },
                timeout,
            )
            .await?;
            link.call(
                &spec.volume,
                1,
                Request::SetEpoch {
                    role: Role::InSync,
                    out_of_sync: vec![],
                    track_activity: track,
                },
                timeout,
            )
            .await?;
            Ok(())
        }
        .await;
        Ok::<_, VolumeError>((link, r))
    }))
    .await;
    let mut created = vec![];
    let mut error = None;
    for r in results {
        match r {
            Ok((link, Ok(()))) => created.push(link),
            Ok((link, Err(e))) => {
                created.push(link);
                error.get_or_insert(e);
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    let m = Membership {
        volume: spec.volume.clone(),
        size: spec.size,
        region_size: spec.region_size,
        extent_size: spec.extent_size,
        epoch: 1,
        primary: None,
        min_in_sync: spec.min_in_sync,
        replicas: spec
            .replicas
            .iter()
            .map(|(node, addr)| ReplicaMember {
                node: node.clone(),
                addr: addr.clone(),
                in_sync: true,
                activity_suspect: false,
            })
            .collect(),
    };
    if error.is_none() {
        match store.cas(&spec.volume, None, &m).await {
            Ok(Some(_)) => {
                info!(volume = %spec.volume, size = spec.size, replicas = spec.replicas.len(), "volume created");
                return Ok(m);
            }
            Ok(None) => {
                error = Some(VolumeError::ConcurrentChange {
                    volume: spec.volume.clone(),
                })
            }
            Err(e) => error = Some(e.into()),
        }
    }
    // Undo: remove what was created.
    for link in created {
        if let Err(e) = link
            .call(&spec.volume, u64::MAX, Request::Delete, timeout)
            .await
        {
            warn!(volume = %spec.volume, node = %link.node(), "cleanup after failed create: {e}");
        }
        link.close();
    }
    Err(error.unwrap_or(VolumeError::Invalid("creation failed".into())))
}
