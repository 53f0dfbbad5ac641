//! Where a volume's replicas live: operator changes (`volume replica
//! add|remove|move`) and automatic re-replication (leader only).
//!
//! Both only rewrite the volume spec's `hosts` (the wanted replica set);
//! the volume's agents converge the data path to it (see the agent's
//! `volumes::replicas`): a new replica is copied in full, a replica no
//! longer wanted is dropped once every wanted one is in sync, so a change
//! never lowers the number of complete copies.
//!
//! Re-replication, like Ceph marking an OSD "out": a host that holds a
//! replica and has been gone (no lease) for longer than the grace period
//! is replaced, in every volume that wants it, by another live host with
//! room; the data is copied there from the in-sync replicas. The grace
//! period keeps a host that reboots from causing full copies.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use skyvisor_core::volume::ChangeReplicasRequest;
use skyvisor_core::{HostName, HostState, Volume, VolumeName, VolumeSpec, keys};
use skyvisor_store::{Compare, StoreExt, put_json};
use tracing::{info, warn};

use crate::error::{ApiError, ApiResult};
use crate::volumes::{place_replicas, replica_filter_for};
use crate::{ControlPlane, inventory::HostEntry};

/// How often the leader looks for replicas on hosts gone too long.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// The most replicas a volume may have.
const MAX_REPLICAS: usize = 3;

impl ControlPlane {
    /// Adds, removes or moves a replica of volume `name` (see
    /// [`ChangeReplicasRequest`]); returns the volume as it is now (the
    /// copy goes on in the background).
    pub async fn change_replicas(
        &self,
        name: &str,
        req: ChangeReplicasRequest,
    ) -> ApiResult<Volume> {
        let name = VolumeName::new(name)?;
        if req.to.is_none() && req.from.is_none() {
            return Err(ApiError::invalid(
                "say what to change: \"to\" (a host, or \"auto\") adds a replica, \"from\" removes one, both move one",
            ));
        }
        let _placing = self.placement.lock().await;
        let (spec, rev) = self.volume_spec(&name).await?;
        if spec.deleting {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is being deleted"
            )));
        }
        let hosts = self.inventory.hosts().await;
        let mut next = spec.clone();
        if let Some(from) = &req.from {
            let from = HostName::new(from.as_str())?;
            if !spec.hosts.contains(&from) {
                return Err(ApiError::conflict(format!(
                    "volume \"{name}\" has no replica on host {from}; its replicas: {}",
                    host_list(&spec.hosts)
                )));
            }
            next.hosts.retain(|h| h != &from);
        }
        if let Some(to) = &req.to {
            let to = if to == "auto" {
                self.pick_replica_host(&spec, &hosts).await?
            } else {
                let to = HostName::new(to.as_str())?;
                let Some(entry) = hosts.iter().find(|h| h.host.name == to) else {
                    return Err(ApiError::not_found(format!("host \"{to}\" not found")));
                };
                if spec.hosts.contains(&to) {
                    return Err(ApiError::conflict(format!(
                        "host {to} already holds a replica of volume \"{name}\""
                    )));
                }
                if !entry.alive || entry.state() != HostState::Ready {
                    return Err(ApiError::conflict(format!(
                        "host {to} is {}; a new replica needs a ready host",
                        entry.state()
                    )));
                }
                let promised = self.promised_replica_disk(Some(&name)).await?;
                if let Some(why) = replica_filter_for(entry, &spec, &promised) {
                    return Err(ApiError::insufficient_capacity(format!(
                        "host {to} cannot hold a replica of volume \"{name}\": {why}"
                    )));
                }
                to
            };
            next.hosts.push(to);
        }
        if next.hosts.is_empty() {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" would have no replica left; delete the volume instead"
            )));
        }
        if next.hosts.len() > MAX_REPLICAS {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" would have {} replicas; allowed: 1 to {MAX_REPLICAS}",
                next.hosts.len()
            )));
        }
        next.replicas = next.hosts.len() as u32;
        next.min_in_sync = next.min_in_sync.min(next.replicas);
        next.generation += 1;
        let out = self
            .store
            .txn(
                vec![Compare::ModRevision(keys::volume_spec(&name), rev)],
                vec![put_json(keys::volume_spec(&name), &next)],
            )
            .await?;
        if !out.succeeded {
            return Err(ApiError::unavailable(format!(
                "volume \"{name}\" changed meanwhile; retry"
            )));
        }
        info!(volume = %name, from = ?spec.hosts, to = ?next.hosts, "replica set changed");
        self.volume(name.as_str()).await
    }

    /// A ready, live host with room for another replica of `spec`, not
    /// holding one: the one with the most free disk.
    async fn pick_replica_host(
        &self,
        spec: &VolumeSpec,
        hosts: &[HostEntry],
    ) -> ApiResult<HostName> {
        let candidates: Vec<HostEntry> = hosts
            .iter()
            .filter(|h| h.alive && !spec.hosts.contains(&h.host.name))
            .cloned()
            .collect();
        let promised = self.promised_replica_disk(Some(&spec.name)).await?;
        let mut picked = place_replicas(&candidates, 1, spec.size_bytes, &promised)?;
        picked.pop().ok_or_else(|| {
            ApiError::insufficient_capacity(format!(
                "no other host can hold a replica of volume \"{}\"",
                spec.name
            ))
        })
    }
}

fn host_list(hosts: &[HostName]) -> String {
    hosts
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The leader's re-replication loop: replaces replicas on hosts gone for
/// longer than `grace`.
pub(crate) async fn run(cp: ControlPlane, grace: Duration) {
    let mut gone_since: HashMap<HostName, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let leads = cp
            .cluster_view()
            .is_some_and(|v| v.leadership.borrow().is_leader);
        if !leads || cp.store_unavailable().is_some() {
            gone_since.clear();
            continue;
        }
        if let Err(e) = step(&cp, grace, &mut gone_since).await {
            warn!(error = %e.message, "re-replication check failed; retrying");
        }
    }
}

async fn step(
    cp: &ControlPlane,
    grace: Duration,
    gone_since: &mut HashMap<HostName, Instant>,
) -> ApiResult<()> {
    let hosts = cp.inventory.hosts().await;
    let alive: Vec<&HostName> = hosts
        .iter()
        .filter(|h| h.alive)
        .map(|h| &h.host.name)
        .collect();
    let (specs, _) = cp.store.list_json::<VolumeSpec>(keys::VOLUME_SPECS).await?;
    let now = Instant::now();
    let mut wanted_gone: Vec<HostName> = specs
        .iter()
        .flat_map(|(s, _)| s.hosts.iter())
        .filter(|h| !alive.contains(h))
        .cloned()
        .collect();
    wanted_gone.sort();
    wanted_gone.dedup();
    gone_since.retain(|h, _| wanted_gone.contains(h));
    for h in &wanted_gone {
        gone_since.entry(h.clone()).or_insert(now);
    }
    for (spec, _) in &specs {
        if spec.deleting {
            continue;
        }
        for h in &spec.hosts {
            let Some(since) = gone_since.get(h) else {
                continue;
            };
            if now.duration_since(*since) < grace {
                continue;
            }
            let req = ChangeReplicasRequest {
                to: Some("auto".into()),
                from: Some(h.to_string()),
            };
            match cp.change_replicas(spec.name.as_str(), req).await {
                Ok(v) => {
                    info!(volume = %spec.name, gone = %h, hosts = ?v.spec.hosts,
                        "re-replicating: a replica's host has been gone longer than the grace period");
                }
                Err(e) => {
                    warn!(volume = %spec.name, gone = %h, error = %e.message,
                        "cannot re-replicate yet; retrying");
                }
            }
            // One change per volume and pass: the next pass sees the new spec.
            break;
        }
    }
    Ok(())
}
