//! The firewall controller: resolves security groups into one document per
//! host (`firewalls/<host>`) listing, for each instance bound to the host
//! (or arriving there by live migration), whether it is filtered and what
//! may reach it, with
//! group sources turned into their members' addresses. The host's agent
//! applies its document; this controller never touches a host.
//!
//! Level-triggered on the leader: every tick it computes every host's
//! document from the inventory and the stored groups and writes those that
//! differ from what it last wrote (or from what is stored, after a
//! leadership change).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use skyvisor_core::firewall::{
    AllowRule, HostFirewall, InstanceFirewall, RuleSource, SecurityGroup,
};
use skyvisor_core::{HostName, InstanceSpec, Ipv4Net, ProjectName, keys};
use skyvisor_store::{StoreExt, put_json};
use tracing::{debug, warn};

use crate::ControlPlane;
use crate::error::ApiResult;

/// How often the leader recomputes the documents: the longest a rule
/// change or a new member waits before its hosts hear of it.
const TICK: Duration = Duration::from_millis(300);

/// Runs the controller (on the leader only) until the process ends.
pub(crate) async fn run(cp: ControlPlane) {
    let mut written: HashMap<HostName, HostFirewall> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        if !cp.leads_now() {
            written.clear();
            continue;
        }
        if let Err(e) = step(&cp, &mut written).await {
            warn!(error = %e.message, "firewall step failed");
        }
    }
}

async fn step(cp: &ControlPlane, written: &mut HashMap<HostName, HostFirewall>) -> ApiResult<()> {
    let (groups, _) = cp
        .store
        .list_json::<SecurityGroup>(keys::SECURITY_GROUPS)
        .await?;
    let groups: Vec<SecurityGroup> = groups.into_iter().map(|(g, _)| g).collect();
    let instances = cp.inventory.instances().await;
    let hosts: Vec<HostName> = cp
        .inventory
        .hosts()
        .await
        .into_iter()
        .map(|h| h.host.name.clone())
        .collect();
    let docs = resolve(&instances, &groups, &hosts);
    for (host, doc) in docs {
        if written.get(&host) == Some(&doc) {
            continue;
        }
        let key = keys::firewall(&host);
        // After a leadership change, skip what is stored already.
        if !written.contains_key(&host)
            && let Some((stored, _)) = cp.store.get_json::<HostFirewall>(&key).await?
            && stored == doc
        {
            written.insert(host, doc);
            continue;
        }
        cp.store.txn(vec![], vec![put_json(key, &doc)]).await?;
        debug!(%host, instances = doc.instances.len(), "firewall document written");
        written.insert(host, doc);
    }
    Ok(())
}

/// Every host's document, from the instances and the groups.
pub fn resolve(
    instances: &[InstanceSpec],
    groups: &[SecurityGroup],
    hosts: &[HostName],
) -> BTreeMap<HostName, HostFirewall> {
    let by_name: HashMap<(&ProjectName, &str), &SecurityGroup> = groups
        .iter()
        .map(|g| ((&g.project, g.name.as_str()), g))
        .collect();
    // The addresses of each group's members, per network (a member on
    // another network is not reachable, and its address may repeat).
    let mut members: HashMap<(&ProjectName, &str, Option<u32>), Vec<Ipv4Net>> = HashMap::new();
    for spec in instances.iter().filter(|s| !s.deleting) {
        for g in &spec.security_groups {
            members
                .entry((&spec.project, g.as_str(), spec.network.vni))
                .or_default()
                .push(Ipv4Net {
                    network: spec.network.ip,
                    prefix_len: 32,
                });
        }
    }
    let mut docs: BTreeMap<HostName, HostFirewall> = hosts
        .iter()
        .map(|h| (h.clone(), HostFirewall::default()))
        .collect();
    for spec in instances {
        let mut allow = Vec::new();
        for g in &spec.security_groups {
            // A group deleted under a member allows nothing.
            let Some(group) = by_name.get(&(&spec.project, g.as_str())) else {
                continue;
            };
            for rule in &group.rules {
                let Ok((source, ports)) = rule.check() else {
                    continue;
                };
                let sources = match source {
                    RuleSource::Cidr(net) => vec![net],
                    RuleSource::Group(src) => members
                        .get(&(&spec.project, src.as_str(), spec.network.vni))
                        .cloned()
                        .unwrap_or_default(),
                };
                if sources.is_empty() {
                    continue;
                }
                allow.push(AllowRule {
                    protocol: rule.protocol,
                    ports,
                    sources,
                });
            }
        }
        let entry = InstanceFirewall {
            filtered: crate::networks::is_filtered(spec),
            ip: spec.network.ip,
            mac: spec.network.mac,
            vni: spec.network.vni,
            gateway: spec.network.gateway,
            allow,
        };
        let mut places = vec![&spec.host];
        if let Some(m) = &spec.migration {
            places.push(&m.destination);
        }
        for host in places {
            docs.entry(host.clone())
                .or_default()
                .instances
                .insert(spec.instance_ref().to_string(), entry.clone());
        }
    }
    docs
}
