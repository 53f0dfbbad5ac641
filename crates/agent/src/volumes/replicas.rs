//! Converging a volume's replicas to the hosts its spec wants.
//!
//! The control plane only rewrites `VolumeSpec::hosts` (an operator's
//! `volume replica add|remove|move`, or re-replication after a host has
//! been gone too long). The data path follows here, through the volume's
//! primary, the only node allowed to change its membership:
//! - a wanted host that is not a member is added: its replica is copied in
//!   full in the background and then joins the in-sync set;
//! - a member no longer wanted is removed, but only once every wanted
//!   replica is in sync, so that no change ever lowers the number of
//!   complete copies.
//!
//! A volume this host serves is converged through its device. A volume no
//! one serves (a stopped VM's disk, a detached volume) is opened here for
//! the copy by its controller (see `controller`), unless a dead host is
//! still its primary: the host failover takes it over first.

use std::sync::Arc;
use std::time::Duration;

use skyvisor_core::{HostName, VolumeSpec};
use skyvisor_volume::{Membership, MembershipStore, NodeId, ReplicatedDevice};
use tracing::{info, warn};

use super::{VolumeService, data_id};

/// How long an unserved volume is held open here waiting for its new
/// replicas to be in sync before it is let go (and taken up again later).
const UNSERVED_COPY_LIMIT: Duration = Duration::from_secs(1800);

/// What converging needs to do for a membership.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReplicaPlan {
    /// Wanted nodes that are not members yet.
    pub add: Vec<NodeId>,
    /// Members no longer wanted that may go now (every wanted one is in
    /// sync).
    pub remove: Vec<NodeId>,
    /// Everything wanted is in sync and nothing else is left.
    pub done: bool,
}

/// The plan for membership `m` towards `wanted`.
pub(crate) fn plan(m: &Membership, wanted: &[NodeId]) -> ReplicaPlan {
    let add: Vec<NodeId> = wanted
        .iter()
        .filter(|w| m.member(w).is_none())
        .cloned()
        .collect();
    let in_sync = m.in_sync();
    let all_wanted_in_sync = wanted.iter().all(|w| in_sync.contains(w));
    let surplus: Vec<NodeId> = m
        .replicas
        .iter()
        .map(|r| r.node.clone())
        .filter(|n| !wanted.contains(n))
        .collect();
    let remove = if all_wanted_in_sync {
        surplus.clone()
    } else {
        Vec::new()
    };
    ReplicaPlan {
        done: add.is_empty() && all_wanted_in_sync && surplus.is_empty(),
        add,
        remove,
    }
}

fn wanted_nodes(spec: &VolumeSpec) -> Vec<NodeId> {
    spec.hosts
        .iter()
        .filter_map(|h| NodeId::new(h.as_str()).ok())
        .collect()
}

impl VolumeService {
    /// One step of converging `device` (served here) to `spec`'s hosts;
    /// true once nothing is left to do.
    pub(crate) async fn converge_device(
        &self,
        spec: &VolumeSpec,
        device: &ReplicatedDevice,
    ) -> Result<bool, String> {
        let p = plan(&device.membership(), &wanted_nodes(spec));
        for node in &p.add {
            let host = HostName::new(node.as_str()).map_err(|e| e.to_string())?;
            let addr = self.replica_addr_of(&host).await?;
            device
                .add_replica(node, &addr)
                .await
                .map_err(|e| format!("adding a replica on {host}: {e}"))?;
            info!(volume = %spec.name, %host, "new replica added; copying");
        }
        for node in &p.remove {
            device
                .remove_replica(node)
                .await
                .map_err(|e| format!("removing the replica on {node}: {e}"))?;
            info!(volume = %spec.name, host = %node, "replica no longer wanted: removed");
        }
        Ok(p.done)
    }

    /// Converges a volume of this host's control that no host serves: opens
    /// it here until the new replicas are in sync (bounded), then lets go.
    pub(crate) async fn converge_unserved(self: &Arc<Self>, spec: &VolumeSpec) {
        let Ok(id) = data_id(&spec.name, &spec.id) else {
            return;
        };
        let Ok(Some(record)) = self.membership.load(&id).await else {
            return;
        };
        if record.value.primary.is_some() || plan(&record.value, &wanted_nodes(spec)).done {
            return;
        }
        let lock = self.lock_for(&spec.id);
        let _g = lock.lock().await;
        if self.is_serving(&spec.id) {
            return;
        }
        let device = match self.open_device(&spec.name, &spec.id).await {
            Ok(d) => d,
            Err(e) => {
                warn!(volume = %spec.name, error = %e, "cannot open the volume to move its replicas; retrying");
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + UNSERVED_COPY_LIMIT;
        loop {
            // A fenced device copies nothing more: let go, and the next
            // pass opens the volume afresh.
            if let Some(why) = device.status().fenced {
                warn!(volume = %spec.name, reason = %why, "the volume was fenced while its replicas moved; opening it again");
                break;
            }
            // The spec may change meanwhile (another move): follow it.
            let spec = match self
                .store_spec(&spec.volume_ref())
                .await
                .filter(|s| !s.deleting && s.id == spec.id)
            {
                Some(s) => s,
                None => break,
            };
            match self.converge_device(&spec, &device).await {
                Ok(true) => {
                    info!(volume = %spec.name, hosts = ?spec.hosts, "replicas where wanted");
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(volume = %spec.name, error = %e, "moving replicas failed; retrying");
                }
            }
            if tokio::time::Instant::now() > deadline {
                warn!(volume = %spec.name, "the new replicas are not in sync yet; letting the volume go and trying again later");
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Err(e) = device.close().await {
            warn!(volume = %spec.name, error = %e, "closing the volume after moving replicas failed");
        }
    }

    async fn store_spec(&self, name: &skyvisor_core::VolumeRef) -> Option<VolumeSpec> {
        use skyvisor_store::StoreExt;
        self.store
            .get_json::<VolumeSpec>(&skyvisor_core::keys::volume_spec(name))
            .await
            .ok()
            .flatten()
            .map(|(s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use skyvisor_volume::{ReplicaMember, VolumeId};

    use super::*;

    fn member(n: &str, in_sync: bool) -> ReplicaMember {
        ReplicaMember {
            node: NodeId::new(n).expect("node"),
            addr: format!("{n}:7782"),
            in_sync,
            activity_suspect: false,
        }
    }

    fn membership(replicas: Vec<ReplicaMember>) -> Membership {
        Membership {
            volume: VolumeId::new("v1").expect("id"),
            size: 1 << 30,
            region_size: 1 << 20,
            extent_size: 4 << 20,
            epoch: 3,
            primary: None,
            min_in_sync: 1,
            replicas,
        }
    }

    fn nodes(l: &[&str]) -> Vec<NodeId> {
        l.iter().map(|n| NodeId::new(*n).expect("node")).collect()
    }

    #[test]
    fn a_move_adds_first_and_drops_the_old_replica_only_once_the_new_is_in_sync() {
        let wanted = nodes(&["h1", "h3"]);
        // Asked: h2 -> h3. First h3 is added, nothing removed.
        let p = plan(
            &membership(vec![member("h1", true), member("h2", true)]),
            &wanted,
        );
        assert_eq!(p.add, nodes(&["h3"]));
        assert!(p.remove.is_empty());
        assert!(!p.done);
        // h3 is copying: h2 stays.
        let p = plan(
            &membership(vec![
                member("h1", true),
                member("h2", true),
                member("h3", false),
            ]),
            &wanted,
        );
        assert!(p.add.is_empty() && p.remove.is_empty() && !p.done);
        // h3 in sync: h2 goes.
        let p = plan(
            &membership(vec![
                member("h1", true),
                member("h2", true),
                member("h3", true),
            ]),
            &wanted,
        );
        assert_eq!(p.remove, nodes(&["h2"]));
        assert!(!p.done);
        let p = plan(
            &membership(vec![member("h1", true), member("h3", true)]),
            &wanted,
        );
        assert!(p.done);
    }
}
