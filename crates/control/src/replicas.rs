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
use skyvisor_core::{
    HostName, HostState, InstanceRef, InstanceSpec, ProjectName, Volume, VolumeAttachment,
    VolumeName, VolumeRef, VolumeSpec, keys,
};
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
        project: &ProjectName,
        name: &str,
        req: ChangeReplicasRequest,
    ) -> ApiResult<Volume> {
        let name = VolumeName::new(name)?;
        let vref = VolumeRef::new(project.clone(), name.clone());
        if req.to.is_none() && req.from.is_none() {
            return Err(ApiError::invalid(
                "say what to change: \"to\" (a host, or \"auto\") adds a replica, \"from\" removes one, both move one",
            ));
        }
        let _placing = self.placement.lock().await;
        let (spec, rev) = self.volume_spec(&vref).await?;
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
                    return Err(ApiError::conflict(format!(
                        "no host \"{to}\" in the pool; see `skyvisor host list`"
                    )));
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
                let promised = self.promised_replica_disk(Some(&vref)).await?;
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
                vec![Compare::ModRevision(keys::volume_spec(&vref), rev)],
                vec![
                    put_json(keys::volume_spec(&vref), &next),
                    crate::events::op(skyvisor_core::Event::volume(
                        skyvisor_core::EventKind::Resized,
                        &next,
                        format!("replicas now on {}", host_list(&next.hosts)),
                    )),
                ],
            )
            .await?;
        if !out.succeeded {
            return Err(ApiError::unavailable(format!(
                "volume \"{name}\" changed meanwhile; retry"
            )));
        }
        info!(volume = %name, from = ?spec.hosts, to = ?next.hosts, "replica set changed");
        self.volume(project, name.as_str()).await
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
        let promised = self.promised_replica_disk(Some(&spec.volume_ref())).await?;
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
        if !cp.leads_now() {
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
            let user = user_of(cp, spec).await;
            let mut changed = Err(ApiError::conflict("no target tried"));
            for to in replacement_targets(spec, user.as_ref(), &hosts) {
                let req = ChangeReplicasRequest {
                    to: Some(to),
                    from: Some(h.to_string()),
                };
                changed = cp
                    .change_replicas(&spec.project, spec.name.as_str(), req)
                    .await;
                if changed.is_ok() {
                    break;
                }
            }
            match changed {
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

/// The VM using volume `spec` (the one its attachment names), if any.
async fn user_of(cp: &ControlPlane, spec: &VolumeSpec) -> Option<InstanceSpec> {
    let (claim, _) = cp
        .store
        .get_json::<VolumeAttachment>(&keys::volume_attachment(&spec.volume_ref()))
        .await
        .ok()??;
    let (vm, _) = cp
        .store
        .get_json::<InstanceSpec>(&keys::instance_spec(&InstanceRef::new(
            spec.project.clone(),
            claim.instance.clone(),
        )))
        .await
        .ok()??;
    (vm.id == claim.instance_id).then_some(vm)
}

/// Where to put a replica that replaces one on a gone host, in the order
/// to try: first the host running the VM that uses the volume, when it is
/// live and ready and holds no replica (a failover that found no room on
/// the replica hosts put the VM there: its reads become local again);
/// then any host with room (`auto`).
fn replacement_targets(
    spec: &VolumeSpec,
    user: Option<&InstanceSpec>,
    hosts: &[HostEntry],
) -> Vec<String> {
    let near = user
        .map(|vm| &vm.host)
        .filter(|h| !spec.hosts.contains(h))
        .filter(|h| {
            hosts
                .iter()
                .any(|e| &e.host.name == *h && e.state() == HostState::Ready)
        });
    near.map(|h| h.to_string())
        .into_iter()
        .chain(["auto".to_string()])
        .collect()
}

#[cfg(test)]
mod tests {
    use skyvisor_core::VolumeId;

    use super::*;
    use crate::scheduler::tests::host;

    fn volume(hosts: &[&str]) -> VolumeSpec {
        serde_json::from_value(serde_json::json!({
            "name": "web-disk",
            "id": VolumeId::random(),
            "size_bytes": 1u64 << 30,
            "replicas": 2,
            "min_in_sync": 1,
            "hosts": hosts,
            "deleting": false,
            "generation": 1,
            "created_at": chrono::Utc::now(),
        }))
        .expect("volume spec")
    }

    fn vm_on(h: &str) -> InstanceSpec {
        let mut vm: InstanceSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "id": skyvisor_core::InstanceId::random(),
            "image": "debian-busybox",
            "resources": {"vcpus": 1, "memory_mib": 128, "disk_gib": 1},
            "power": "running",
            "restart_policy": "on-failure",
            "host": h,
            "network": {"network": "default", "ip": "10.0.0.2", "prefix_len": 24,
                        "gateway": "10.0.0.1", "mac": "52:54:00:00:00:01"},
            "reboot_generation": 0,
            "stop_timeout_secs": 30,
            "force_stop": false,
            "deleting": false,
            "generation": 1,
            "created_at": chrono::Utc::now(),
        }))
        .expect("instance spec");
        vm.host = HostName::new(h).expect("host");
        vm
    }

    #[test]
    fn a_replica_goes_to_its_vms_host_first_when_that_host_holds_none() {
        let hosts = vec![
            host("h1", 4, 4096),
            host("h3", 4, 4096),
            host("h4", 4, 4096),
        ];
        // The VM failed over to h1, which holds no replica: h1 first.
        let spec = volume(&["h2", "h3"]);
        assert_eq!(
            replacement_targets(&spec, Some(&vm_on("h1")), &hosts),
            vec!["h1".to_string(), "auto".into()]
        );
        // Its host holds one already, or there is no VM: anywhere.
        let spec = volume(&["h1", "h2"]);
        assert_eq!(
            replacement_targets(&spec, Some(&vm_on("h1")), &hosts),
            vec!["auto".to_string()]
        );
        assert_eq!(
            replacement_targets(&spec, None, &hosts),
            vec!["auto".to_string()]
        );
        // Its host is cordoned (or gone): anywhere.
        let mut cordoned = hosts.clone();
        cordoned[0].admin_state = Some(HostState::Cordoned);
        let spec = volume(&["h2", "h3"]);
        assert_eq!(
            replacement_targets(&spec, Some(&vm_on("h1")), &cordoned),
            vec!["auto".to_string()]
        );
        let mut dead = hosts.clone();
        dead[0].alive = false;
        assert_eq!(
            replacement_targets(&spec, Some(&vm_on("h1")), &dead),
            vec!["auto".to_string()]
        );
    }
}
