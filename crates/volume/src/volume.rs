//! Volume lifecycle outside a primary: creating a replicated volume (its
//! replicas and its membership record).
//!
//! Creation either completes (every replica created, consistent at epoch 1,
//! record stored) or removes what it created; it never leaves a record
//! naming replicas that do not exist.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tracing::{info, warn};

use crate::client::Link;
use crate::device::VolumeError;
use crate::ids::{NodeId, VolumeId};
use crate::membership::{Membership, MembershipStore, ReplicaMember};
use crate::replica::ReplicaStore;
use crate::wire::{Request, Role};

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
