//! Whether HA-protected VMs can be restarted when a host dies: each VM's
//! protection as it stands (shown by `vm show`), and admission control,
//! which refuses a new protected VM that the cluster could not restart
//! after the failure of `ha_reserve_hosts` hosts.
//!
//! Admission follows vSphere's "host failures cluster tolerates" with a
//! capacity-percentage reckoning rather than slots: the protected VMs'
//! vCPUs and memory (the new one included) must fit in what the ready
//! hosts offer without the largest `ha_reserve_hosts` of them. It is an
//! aggregate check (it does not solve the packing), so it is necessary
//! rather than sufficient; placement at failover time has the last word.

use skyvisor_core::{
    HaPolicy, HostState, InstanceSpec, PowerState, Protection, ProtectionState, Resources,
};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};
use crate::scheduler::{self, PlacementRequest};

impl ControlPlane {
    /// The protection of the instance `spec` right now.
    pub async fn protection(&self, spec: &InstanceSpec) -> Protection {
        let mut reasons = Vec::new();
        if spec.ha == HaPolicy::Off {
            reasons.push(match spec.root_volume() {
                None => format!(
                    "its root disk is local to host {} (a local disk cannot follow it)",
                    spec.host
                ),
                Some(_) => "ha is off".to_string(),
            });
            return Protection {
                state: ProtectionState::Unprotected,
                reasons,
            };
        }
        if let Some(root) = spec.root_volume() {
            match self.volume(&spec.project, root.name.as_str()).await {
                Ok(v) if v.redundancy.in_sync < 2 => reasons.push(format!(
                    "its root disk {} has {} of {} replicas in sync{}: losing one more host could lose it",
                    root.name,
                    v.redundancy.in_sync,
                    v.redundancy.wanted,
                    if v.redundancy.pending.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (not yet: {})",
                            v.redundancy
                                .pending
                                .iter()
                                .map(|h| h.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                )),
                Ok(_) => {}
                Err(e) => reasons.push(format!(
                    "its root disk {} cannot be checked: {}",
                    root.name, e.message
                )),
            }
        }
        let others: Vec<_> = self
            .inventory
            .hosts()
            .await
            .into_iter()
            .filter(|h| h.host.name != spec.host && h.alive)
            .collect();
        let fits = scheduler::place(
            &others,
            &PlacementRequest {
                resources: spec.resources,
                accel: spec.accel,
                ..Default::default()
            },
            self.config.weigher,
        );
        if let Err(e) = fits {
            reasons.push(format!(
                "no other host could take it now: {}",
                e.to_string().trim_start_matches("no host can fit it: ")
            ));
        }
        Protection {
            state: if reasons.is_empty() {
                ProtectionState::Protected
            } else {
                ProtectionState::Weakened
            },
            reasons,
        }
    }

    /// Admission control: refuses a new protected VM of `resources` that
    /// would leave too little room to restart the protected VMs after the
    /// failure of the cluster's `ha_reserve_hosts` largest hosts.
    pub(crate) async fn admit_protected(&self, resources: Resources) -> ApiResult<()> {
        let reserve = self.config.cluster.ha_reserve_hosts as usize;
        if reserve == 0 {
            return Ok(());
        }
        let hosts: Vec<_> = self
            .inventory
            .hosts()
            .await
            .into_iter()
            .filter(|h| h.alive && h.state() == HostState::Ready)
            .collect();
        if hosts.len() <= reserve {
            return Err(ApiError::insufficient_capacity(format!(
                "admission control keeps room for {reserve} host failure(s) (--ha-reserve-hosts {reserve}) but the cluster has {} ready host(s); add hosts, or create the VM with --ha off",
                hosts.len()
            )));
        }
        let capacities: Vec<Resources> =
            hosts.iter().map(|h| h.host.capacity.allocatable).collect();
        let protected: Vec<Resources> = self
            .inventory
            .instances_full()
            .await
            .into_iter()
            .map(|i| i.spec)
            .filter(|s| s.ha == HaPolicy::Restart && s.power == PowerState::Running)
            .map(|s| s.resources)
            .collect();
        if let Err(s) = fits_after_failures(&capacities, &protected, resources, reserve) {
            return Err(ApiError::insufficient_capacity(format!(
                "admission control (--ha-reserve-hosts {reserve}): after losing the {reserve} largest host(s) the cluster offers {} vCPU / {} MiB, and its protected VMs with this one need {} vCPU / {} MiB; \
                 add capacity, make the VM smaller, or create it with --ha off",
                s.offered_vcpus, s.offered_memory_mib, s.needed_vcpus, s.needed_memory_mib
            )));
        }
        Ok(())
    }
}

/// What [`fits_after_failures`] found short.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Shortfall {
    offered_vcpus: u64,
    offered_memory_mib: u64,
    needed_vcpus: u64,
    needed_memory_mib: u64,
}

/// Whether the protected VMs (`protected` and `new`) fit, in total, in the
/// hosts of `capacities` without the `reserve` largest.
pub(crate) fn fits_after_failures(
    capacities: &[Resources],
    protected: &[Resources],
    new: Resources,
    reserve: usize,
) -> Result<(), Shortfall> {
    let mut caps = capacities.to_vec();
    // The largest hosts are the ones whose loss hurts most.
    caps.sort_by_key(|c| std::cmp::Reverse((c.memory_mib, c.vcpus)));
    let kept = caps.get(reserve..).unwrap_or(&[]);
    let offered_vcpus: u64 = kept.iter().map(|c| u64::from(c.vcpus)).sum();
    let offered_memory_mib: u64 = kept.iter().map(|c| c.memory_mib).sum();
    let needed_vcpus: u64 = protected
        .iter()
        .chain(std::iter::once(&new))
        .map(|r| u64::from(r.vcpus))
        .sum();
    let needed_memory_mib: u64 = protected
        .iter()
        .chain(std::iter::once(&new))
        .map(|r| r.memory_mib)
        .sum();
    if needed_vcpus > offered_vcpus || needed_memory_mib > offered_memory_mib {
        return Err(Shortfall {
            offered_vcpus,
            offered_memory_mib,
            needed_vcpus,
            needed_memory_mib,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(vcpus: u32, memory_mib: u64) -> Resources {
        Resources {
            vcpus,
            memory_mib,
            disk_gib: 1,
        }
    }

    #[test]
    fn room_is_kept_for_the_largest_hosts_failures() {
        let hosts = [r(8, 16384), r(4, 8192), r(4, 8192)];
        // Without the largest host: 8 vCPU / 16 GiB for protected VMs.
        assert!(fits_after_failures(&hosts, &[r(4, 8192)], r(4, 8192), 1).is_ok());
        let short = fits_after_failures(&hosts, &[r(3, 8192), r(3, 8192)], r(1, 1024), 1)
            .expect_err("17 GiB do not fit in 16");
        assert_eq!(short.offered_memory_mib, 16384);
        assert_eq!(short.needed_memory_mib, 17408);
        // vCPUs count too.
        assert!(fits_after_failures(&hosts, &[], r(9, 512), 1).is_err());
        // Two failures: only the smallest host is left.
        assert!(fits_after_failures(&hosts, &[], r(4, 8192), 2).is_ok());
        assert!(fits_after_failures(&hosts, &[], r(5, 512), 2).is_err());
        // Reserving every host leaves nothing.
        assert!(fits_after_failures(&hosts, &[], r(1, 1), 3).is_err());
    }
}
