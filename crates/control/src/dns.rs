//! The internal DNS zone: the leader-side controller that publishes each
//! project's names (`keys::dns`) for every agent's DNS server whenever
//! they change — an instance's address, a group's healthy members, a load
//! balancer's address.
//!
//! The three kinds share one name space per project; where a name is
//! taken twice, a load balancer's wins over a group's, and a group's over
//! an instance's (a balancer is what clients of a service are meant to
//! find).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use skyvisor_core::dns::{DnsRecords, DnsZone};
use skyvisor_core::group::{GroupSpec, GroupStatus};
use skyvisor_core::lb::{BackendState, LoadBalancerSpec};
use skyvisor_core::{InstanceSpec, ProjectName, keys};
use skyvisor_store::{StoreExt, encode};
use tracing::warn;

use crate::ControlPlane;
use crate::error::ApiResult;
use crate::groups::plan::MemberView;

/// How often the leader recomputes the names.
const TICK: Duration = Duration::from_millis(500);

impl ControlPlane {
    /// `project`'s names as last published.
    pub async fn dns_zone(&self, project: &ProjectName) -> ApiResult<DnsZone> {
        let records = self
            .store
            .get_json::<DnsRecords>(&keys::dns(project))
            .await?
            .map(|(r, _)| r);
        Ok(DnsZone::of(project, records.as_ref()))
    }
}

/// The leader's loop publishing every project's names.
pub(crate) async fn run(cp: ControlPlane) {
    loop {
        tokio::time::sleep(TICK).await;
        if !cp.leads_now() {
            continue;
        }
        if let Err(e) = step(&cp).await {
            warn!(error = %e.message, "DNS step failed");
        }
    }
}

async fn step(cp: &ControlPlane) -> ApiResult<()> {
    let (written, _) = cp.store.list_json::<DnsRecords>(keys::DNS).await?;
    let mut written: BTreeMap<ProjectName, DnsRecords> = written
        .into_iter()
        .map(|(d, _)| (d.project.clone(), d))
        .collect();
    let (groups, _) = cp.store.list_json::<GroupSpec>(keys::GROUPS).await?;
    let (balancers, _) = cp
        .store
        .list_json::<LoadBalancerSpec>(keys::LOAD_BALANCERS)
        .await?;
    let statuses = cp.group_statuses().await?;
    let instances = cp.inventory.instances().await;
    let mut members: BTreeMap<(ProjectName, String), Vec<(MemberView, Ipv4Addr)>> = BTreeMap::new();
    let checked: BTreeMap<(ProjectName, String), bool> = groups
        .iter()
        .map(|(g, _)| {
            (
                (g.project.clone(), g.name.to_string()),
                g.health_check.is_some(),
            )
        })
        .collect();
    for i in cp
        .inventory
        .instances_full_where(|s| s.group.is_some())
        .await
    {
        let Some(m) = &i.spec.group else { continue };
        let key = (i.spec.project.clone(), m.group.to_string());
        let check = checked.get(&key).copied().unwrap_or(false);
        members
            .entry(key)
            .or_default()
            .push((MemberView::of(&i.spec, &i.status, check), i.spec.network.ip));
    }
    let groups: Vec<(GroupSpec, GroupStatus)> = groups
        .into_iter()
        .map(|(g, _)| {
            let status = statuses
                .get(&keys::group_status(&g.project, &g.name))
                .cloned()
                .unwrap_or_default();
            (g, status)
        })
        .collect();
    let balancers: Vec<LoadBalancerSpec> = balancers.into_iter().map(|(b, _)| b).collect();
    for doc in zone(&instances, &groups, &members, &balancers) {
        if written.remove(&doc.project).as_ref() != Some(&doc) {
            cp.store.put(&keys::dns(&doc.project), encode(&doc)).await?;
        }
    }
    // Projects with no names left.
    for project in written.keys() {
        cp.store.delete(&keys::dns(project)).await?;
    }
    Ok(())
}

/// Every project's names: instances first, then groups (their members
/// that serve), then load balancers, each overriding the one before on a
/// name taken twice.
pub fn zone(
    instances: &[InstanceSpec],
    groups: &[(GroupSpec, GroupStatus)],
    members: &BTreeMap<(ProjectName, String), Vec<(MemberView, Ipv4Addr)>>,
    balancers: &[LoadBalancerSpec],
) -> Vec<DnsRecords> {
    let mut projects: BTreeMap<ProjectName, BTreeMap<String, Vec<Ipv4Addr>>> = BTreeMap::new();
    for i in instances.iter().filter(|i| !i.deleting) {
        projects
            .entry(i.project.clone())
            .or_default()
            .insert(i.name.to_string(), vec![i.network.ip]);
    }
    for (g, status) in groups {
        let key = (g.project.clone(), g.name.to_string());
        let of_group = members.get(&key).map(Vec::as_slice).unwrap_or_default();
        let mut addrs: Vec<Ipv4Addr> = crate::lbs::backends(g, status, of_group)
            .into_iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| b.ip)
            .collect();
        addrs.sort();
        projects
            .entry(g.project.clone())
            .or_default()
            .insert(g.name.to_string(), addrs);
    }
    for b in balancers {
        projects
            .entry(b.project.clone())
            .or_default()
            .insert(b.name.clone(), vec![b.address]);
    }
    projects
        .into_iter()
        .map(|(project, names)| DnsRecords { project, names })
        .collect()
}
