//! Placement: which host runs a VM. Filters drop hosts that cannot take it
//! (each saying why: state, agent version, accelerator, spread group,
//! capacity with overcommit), then a weigher orders the rest.
//!
//! Pure functions over an inventory snapshot; no I/O, so placement costs
//! microseconds and is tested without hosts.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use skyvisor_core::{
    Accel, GroupName, HostName, HostState, InstanceName, Resources, ValidationError,
};
use thiserror::Error;
use utoipa::ToSchema;

use crate::inventory::HostEntry;

/// How the remaining hosts are ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Weigher {
    /// Prefer the host with the most free memory: even load, small blast radius.
    #[default]
    Spread,
    /// Prefer the fullest host that fits: keeps whole hosts free.
    Pack,
}

/// What a VM needs from a host.
#[derive(Debug, Clone, Default)]
pub struct PlacementRequest {
    /// Its size.
    pub resources: Resources,
    /// Only this host, if set (e.g. a resize in place).
    pub only: Option<HostName>,
    /// Resources already counted on `only` that the request replaces (a
    /// resize frees the old size as it takes the new one).
    pub replacing: Resources,
    /// The accelerator the VM must run with, if any.
    pub accel: Option<Accel>,
    /// What runs the instance: a container needs a host that runs them.
    pub kind: skyvisor_core::InstanceKind,
    /// The VM's spread group and where its members already run.
    pub spread: Option<SpreadConstraint>,
    /// A soft spread (an instance group's): how many of the group's
    /// members each host runs; the weigher prefers the hosts with fewest,
    /// but a host with some is not ruled out.
    pub prefer_apart: HashMap<HostName, u32>,
}

/// Anti-affinity: hosts that already run a member of the group are out.
#[derive(Debug, Clone)]
pub struct SpreadConstraint {
    /// The group.
    pub group: GroupName,
    /// One member per host that runs any (the host's reason names it).
    pub members: HashMap<HostName, InstanceName>,
}

/// No host can take the VM; says why, host by host.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PlacementError {
    /// The pool has no hosts.
    #[error("no hosts are registered")]
    NoHosts,
    /// Every host was filtered out.
    #[error("no host can fit it: {}", format_reasons(.0))]
    NoFit(Vec<(HostName, String)>),
}

fn format_reasons(reasons: &[(HostName, String)]) -> String {
    reasons
        .iter()
        .map(|(h, r)| format!("{h}: {r}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A host with less free space than this on its data file system takes no
/// new VMs: their disks would fill it at once.
pub const MIN_FREE_DISK_BYTES: u64 = 256 * 1024 * 1024;

/// Why `host` cannot take `need`, or `None` if it can.
pub fn filter(host: &HostEntry, req: &PlacementRequest) -> Option<String> {
    if let Some(only) = &req.only
        && only != &host.host.name
    {
        return Some("not the requested host".into());
    }
    match host.state() {
        HostState::Ready => {}
        other => return Some(other.to_string()),
    }
    let version = &host.host.agent_version;
    if version != skyvisor_core::VERSION {
        return Some(format!(
            "its agent runs version {version}, the server {}",
            skyvisor_core::VERSION
        ));
    }
    if let Some(accel) = req.accel
        && host.host.accel != accel
    {
        return Some(format!("runs VMs with {}, needs {accel}", host.host.accel));
    }
    if req.kind == skyvisor_core::InstanceKind::Container && host.host.container_runtime.is_none() {
        return Some(match &host.host.containers_unavailable {
            Some(why) => format!("runs no containers: {why}"),
            None => "runs no containers".to_string(),
        });
    }
    if let Some(spread) = &req.spread
        && let Some(member) = spread.members.get(&host.host.name)
    {
        return Some(format!(
            "already runs {member} of spread group {}",
            spread.group
        ));
    }
    let allocatable = host.host.capacity.allocatable;
    let free = allocatable.minus(host.allocated.minus(req.replacing));
    let need = req.resources;
    let mut short = Vec::new();
    if need.vcpus > free.vcpus {
        short.push(format!("{} vCPU free, needs {}", free.vcpus, need.vcpus));
    }
    if need.memory_mib > free.memory_mib {
        short.push(format!(
            "{} MiB memory free, needs {}",
            free.memory_mib, need.memory_mib
        ));
    }
    if need.disk_gib > free.disk_gib {
        short.push(format!(
            "{} GiB disk free, needs {}",
            free.disk_gib, need.disk_gib
        ));
    }
    if req.replacing == Resources::default() && host.host.disk_free_bytes < MIN_FREE_DISK_BYTES {
        short.push(format!(
            "{} MiB free on its data disk, needs at least {} MiB",
            host.host.disk_free_bytes / (1024 * 1024),
            MIN_FREE_DISK_BYTES / (1024 * 1024)
        ));
    }
    (!short.is_empty()).then(|| short.join(", "))
}

/// Picks a host for `req` among `hosts`.
pub fn place(
    hosts: &[HostEntry],
    req: &PlacementRequest,
    weigher: Weigher,
) -> Result<HostName, PlacementError> {
    if hosts.is_empty() {
        return Err(PlacementError::NoHosts);
    }
    let mut reasons = Vec::new();
    let mut fits: Vec<&HostEntry> = Vec::new();
    for h in hosts {
        match filter(h, req) {
            Some(why) => {
                // Hosts the user did not ask for are noise in the message.
                if req.only.is_none() || req.only.as_ref() == Some(&h.host.name) {
                    reasons.push((h.host.name.clone(), why));
                }
            }
            None => fits.push(h),
        }
    }
    let free_mem = |h: &HostEntry| {
        h.host
            .capacity
            .allocatable
            .memory_mib
            .saturating_sub(h.allocated.memory_mib)
    };
    // Group members first go where the group has fewest.
    let fewest = fits
        .iter()
        .map(|h| req.prefer_apart.get(&h.host.name).copied().unwrap_or(0))
        .min()
        .unwrap_or(0);
    fits.retain(|h| req.prefer_apart.get(&h.host.name).copied().unwrap_or(0) == fewest);
    let best = match weigher {
        Weigher::Spread => fits.iter().max_by(|a, b| {
            free_mem(a)
                .cmp(&free_mem(b))
                .then(b.host.name.cmp(&a.host.name))
        }),
        Weigher::Pack => fits.iter().min_by(|a, b| {
            free_mem(a)
                .cmp(&free_mem(b))
                .then(a.host.name.cmp(&b.host.name))
        }),
    };
    match best {
        Some(h) => Ok(h.host.name.clone()),
        None if reasons.is_empty() => Err(PlacementError::NoHosts),
        None => Err(PlacementError::NoFit(reasons)),
    }
}

impl FromStr for Weigher {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spread" => Ok(Self::Spread),
            "pack" => Ok(Self::Pack),
            other => Err(ValidationError::new(
                "weigher",
                format!("unknown weigher {other:?}; allowed: spread, pack"),
            )),
        }
    }
}

impl fmt::Display for Weigher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Spread => "spread",
            Self::Pack => "pack",
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Utc;
    use skyvisor_core::{Accel, Capacity, Host, Overcommit};

    pub(crate) fn host(name: &str, vcpus: u32, memory_mib: u64) -> HostEntry {
        HostEntry {
            host: std::sync::Arc::new(Host {
                name: HostName::new(name).expect("name"),
                address: "127.0.0.1".into(),
                capacity: Capacity::new(
                    Resources {
                        vcpus,
                        memory_mib,
                        disk_gib: 100,
                    },
                    Overcommit {
                        cpu: 1.0,
                        memory: 1.0,
                        disk: 1.0,
                    },
                ),
                accel: Accel::Tcg,
                accel_reason: String::new(),
                qemu_version: String::new(),
                container_runtime: None,
                containers_unavailable: None,
                agent_version: skyvisor_core::VERSION.to_string(),
                subnet: "10.0.0.0/24".parse().expect("subnet"),
                bridge_address: None,
                agent_url: None,
                disk_free_bytes: u64::MAX,
                replica_addr: None,
                started_at: Utc::now(),
            }),
            alive: true,
            admin_state: None,
            allocated: Resources::default(),
            instances: 0,
            alloc_revision: 0,
            state_revision: 0,
        }
    }

    fn need(vcpus: u32, memory_mib: u64) -> PlacementRequest {
        PlacementRequest {
            resources: Resources {
                vcpus,
                memory_mib,
                disk_gib: 1,
            },
            ..Default::default()
        }
    }

    #[test]
    fn spread_and_pack_pick_opposite_ends() {
        let mut a = host("a", 8, 4096);
        a.allocated.memory_mib = 3000;
        let b = host("b", 8, 4096);
        let hosts = vec![a, b];
        assert_eq!(
            place(&hosts, &need(1, 512), Weigher::Spread)
                .expect("fit")
                .as_str(),
            "b"
        );
        assert_eq!(
            place(&hosts, &need(1, 512), Weigher::Pack)
                .expect("fit")
                .as_str(),
            "a"
        );
    }

    #[test]
    fn no_fit_names_reason_per_host() {
        let mut a = host("host-a", 2, 4096);
        a.allocated.vcpus = 1;
        let mut b = host("host-b", 8, 4096);
        b.admin_state = Some(HostState::Cordoned);
        let mut c = host("host-c", 8, 4096);
        c.alive = false;
        let err = place(&[a, b, c], &need(2, 512), Weigher::Spread).expect_err("no fit");
        assert_eq!(
            err.to_string(),
            "no host can fit it: host-a: 1 vCPU free, needs 2; host-b: cordoned; host-c: unreachable"
        );
    }

    #[test]
    fn resize_counts_the_old_size_as_free() {
        let mut a = host("a", 2, 1024);
        a.allocated = Resources {
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: 1,
        };
        let mut req = need(1, 1024);
        req.only = Some(a.host.name.clone());
        assert!(place(std::slice::from_ref(&a), &req, Weigher::Spread).is_err());
        req.replacing = a.allocated;
        assert!(place(&[a], &req, Weigher::Spread).is_ok());
    }

    #[test]
    fn spread_group_keeps_members_apart() {
        let hosts = vec![host("a", 8, 4096), host("b", 8, 4096), host("c", 8, 4096)];
        let group = GroupName::new("web").expect("group");
        let mut members = HashMap::new();
        members.insert(
            hosts[0].host.name.clone(),
            InstanceName::new("web-1").expect("n"),
        );
        members.insert(
            hosts[2].host.name.clone(),
            InstanceName::new("web-3").expect("n"),
        );
        let mut req = need(1, 128);
        req.spread = Some(SpreadConstraint {
            group: group.clone(),
            members: members.clone(),
        });
        // b is the only host without a member, whatever the weigher prefers.
        for w in [Weigher::Spread, Weigher::Pack] {
            assert_eq!(place(&hosts, &req, w).expect("fit").as_str(), "b");
        }
        members.insert(
            hosts[1].host.name.clone(),
            InstanceName::new("web-2").expect("n"),
        );
        req.spread = Some(SpreadConstraint { group, members });
        let err = place(&hosts, &req, Weigher::Spread).expect_err("all taken");
        assert_eq!(
            err.to_string(),
            "no host can fit it: a: already runs web-1 of spread group web; \
             b: already runs web-2 of spread group web; c: already runs web-3 of spread group web"
        );
    }

    #[test]
    fn accelerator_and_agent_version_filter_hosts() {
        let mut a = host("a", 8, 4096);
        std::sync::Arc::make_mut(&mut a.host).agent_version = "0.0.1".into();
        let b = host("b", 8, 4096);
        let mut req = need(1, 128);
        req.accel = Some(Accel::Kvm);
        let err = place(&[a.clone(), b.clone()], &req, Weigher::Spread).expect_err("no kvm");
        assert_eq!(
            err.to_string(),
            format!(
                "no host can fit it: a: its agent runs version 0.0.1, the server {}; \
                 b: runs VMs with tcg, needs kvm",
                skyvisor_core::VERSION
            )
        );
        req.accel = Some(Accel::Tcg);
        assert_eq!(
            place(&[a, b], &req, Weigher::Spread).expect("tcg").as_str(),
            "b"
        );
    }

    #[test]
    fn containers_go_only_to_hosts_that_run_them() {
        let mut a = host("a", 8, 4096);
        std::sync::Arc::make_mut(&mut a.host).containers_unavailable =
            Some("crun is not installed".into());
        let mut b = host("b", 8, 4096);
        let mut req = need(1, 128);
        req.kind = skyvisor_core::InstanceKind::Container;
        let err = place(&[a.clone(), b.clone()], &req, Weigher::Spread).expect_err("none");
        assert_eq!(
            err.to_string(),
            "no host can fit it: a: runs no containers: crun is not installed; b: runs no containers"
        );
        std::sync::Arc::make_mut(&mut b.host).container_runtime = Some("crun 1.8.1".into());
        assert_eq!(
            place(&[a.clone(), b], &req, Weigher::Spread)
                .expect("b")
                .as_str(),
            "b"
        );
        req.kind = skyvisor_core::InstanceKind::Vm;
        assert!(
            place(&[a], &req, Weigher::Spread).is_ok(),
            "VMs go anywhere"
        );
    }

    #[test]
    fn overcommit_scales_what_fits() {
        let mut a = host("a", 2, 1024);
        std::sync::Arc::make_mut(&mut a.host).capacity = skyvisor_core::Capacity::new(
            a.host.capacity.physical,
            Overcommit {
                cpu: 4.0,
                memory: 1.5,
                disk: 1.0,
            },
        );
        a.allocated = Resources {
            vcpus: 7,
            memory_mib: 1000,
            disk_gib: 1,
        };
        assert!(place(std::slice::from_ref(&a), &need(1, 536), Weigher::Pack).is_ok());
        let err = place(&[a], &need(2, 537), Weigher::Pack).expect_err("full");
        assert_eq!(
            err.to_string(),
            "no host can fit it: a: 1 vCPU free, needs 2, 536 MiB memory free, needs 537"
        );
    }

    #[test]
    fn weigher_names_parse() {
        assert_eq!("pack".parse::<Weigher>().expect("pack"), Weigher::Pack);
        assert_eq!(
            Weigher::Spread
                .to_string()
                .parse::<Weigher>()
                .expect("spread"),
            Weigher::Spread
        );
        let e = "random".parse::<Weigher>().expect_err("unknown");
        assert!(e.message.contains("allowed: spread, pack"), "{e}");
    }

    #[test]
    fn empty_pool() {
        assert_eq!(
            place(&[], &need(1, 128), Weigher::Spread),
            Err(PlacementError::NoHosts)
        );
    }
}
