//! Load balancers: the API's side (a balancer takes an address of its
//! group's network, claimed like an instance's) and the leader-side
//! controller that writes each balancer's backends — its group's members
//! that serve, and those draining — for every agent's datapath (see the
//! agent's `lb` module), whenever they change.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use skyvisor_core::group::{GroupSpec, GroupStatus};
use skyvisor_core::lb::{
    Backend, BackendState, CreateLoadBalancerRequest, LbBackends, LoadBalancer, LoadBalancerSpec,
    MAX_DRAIN_SECS, RESERVED_HOST_PORTS, validate_listeners,
};
use skyvisor_core::{Event, EventKind, GroupName, ObjectKind, ProjectName, ValidationError, keys};
use skyvisor_store::{Compare, Op, StoreExt, encode, put_json};
use tracing::{info, warn};

use crate::error::{ApiError, ApiResult};
use crate::groups::plan::MemberView;
use crate::{ControlPlane, READ_YOUR_WRITES};

/// Default connection draining of a member leaving a balanced group.
pub const DEFAULT_DRAIN_SECS: u32 = 10;
/// How often the leader recomputes the backends.
const TICK: Duration = Duration::from_millis(250);

impl ControlPlane {
    /// Makes a load balancer for a group, on the group's network.
    pub async fn create_load_balancer(
        &self,
        project: &ProjectName,
        req: CreateLoadBalancerRequest,
    ) -> ApiResult<LoadBalancer> {
        skyvisor_core::names::validate_name("name", &req.name)?;
        validate_listeners(&req.listeners)?;
        if req.external {
            for (i, l) in req.listeners.iter().enumerate() {
                if RESERVED_HOST_PORTS.contains(&l.port) {
                    return Err(ValidationError::new(
                        format!("listeners[{i}].port"),
                        format!(
                            "{} is Skyvisor's or the host's own on the hosts' addresses; \
                             an external balancer may use any other port",
                            l.port
                        ),
                    )
                    .into());
                }
            }
        }
        let drain_secs = req.drain_secs.unwrap_or(DEFAULT_DRAIN_SECS);
        if drain_secs > MAX_DRAIN_SECS {
            return Err(ValidationError::new(
                "drain_secs",
                format!("{drain_secs}; allowed: 0 to {MAX_DRAIN_SECS}"),
            )
            .into());
        }
        let group_name = GroupName::new(req.group.clone())
            .map_err(|e| ApiError::from(ValidationError::new("group", e.message)))?;
        let Some((group, _)) = self
            .store
            .get_json::<GroupSpec>(&keys::group(project, &group_name))
            .await?
        else {
            return Err(ApiError::not_found(format!(
                "group \"{group_name}\" not found in project {project}"
            ))
            .with_field("group"));
        };
        if group.deleting {
            return Err(
                ApiError::conflict(format!("group \"{group_name}\" is being deleted"))
                    .with_field("group"),
            );
        }
        let network = self
            .network_for_instance(project, group.template.network.as_deref())
            .await?;
        let scope = skyvisor_core::network::ipam_scope(network.private_vni());
        let key = keys::load_balancer(project, &req.name);
        for _ in 0..8 {
            let address = self
                .inventory
                .next_free_ip(&scope, &network.subnet, &HashSet::new())
                .await
                .ok_or_else(|| {
                    ApiError::insufficient_capacity(format!(
                        "network {} ({}) has no free addresses",
                        network.name, network.subnet
                    ))
                })?;
            let spec = LoadBalancerSpec {
                project: project.clone(),
                name: req.name.clone(),
                group: group_name.clone(),
                listeners: req.listeners.clone(),
                algorithm: req.algorithm,
                drain_secs,
                address,
                network: network.name.clone(),
                vni: network.private_vni(),
                external: req.external,
                created_at: Utc::now(),
            };
            let claim = keys::ipam_claim(&scope, address);
            let owner = format!("load-balancer {project}/{}", req.name);
            let port_claims: Vec<String> = if req.external {
                req.listeners
                    .iter()
                    .map(|l| keys::lb_host_port(l.port))
                    .collect()
            } else {
                Vec::new()
            };
            let mut compares = vec![Compare::Absent(key.clone()), Compare::Absent(claim.clone())];
            let mut ops = vec![
                put_json(key.clone(), &spec),
                put_json(claim, &owner),
                crate::events::op(event_of(project, &req.name, address, &group_name)),
            ];
            for c in &port_claims {
                compares.push(Compare::Absent(c.clone()));
                ops.push(put_json(c.clone(), &owner));
            }
            let out = self.store.txn(compares, ops).await?;
            if out.succeeded {
                info!(project = %project, balancer = %req.name, %address, "load balancer created");
                self.inventory
                    .wait_for(out.revision, READ_YOUR_WRITES)
                    .await;
                return self.with_backends(spec).await;
            }
            if self.store.get(&key).await?.is_some() {
                return Err(ApiError::already_exists(format!(
                    "load balancer \"{}\" already exists",
                    req.name
                )));
            }
            for (i, c) in port_claims.iter().enumerate() {
                if self.store.get(c).await?.is_some() {
                    // Another project's balancer may hold it: not named.
                    return Err(ApiError::conflict(format!(
                        "port {} of the hosts' addresses is taken by another external load balancer",
                        req.listeners[i].port
                    ))
                    .with_field(format!("listeners[{i}].port")));
                }
            }
            // The address was taken meanwhile: the view catches up first.
            self.inventory
                .wait_for(out.revision, READ_YOUR_WRITES)
                .await;
        }
        Err(ApiError::unavailable(
            "addresses are being taken too fast; retry",
        ))
    }

    /// The load balancers of `project`.
    pub async fn load_balancers(&self, project: &ProjectName) -> ApiResult<Vec<LoadBalancer>> {
        let (list, _) = self
            .store
            .list_json::<LoadBalancerSpec>(&keys::in_project(keys::LOAD_BALANCERS, project))
            .await?;
        let mut out = Vec::new();
        for (spec, _) in list {
            out.push(self.with_backends(spec).await?);
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    /// Load balancer `name` of `project`, or 404.
    pub async fn load_balancer(
        &self,
        project: &ProjectName,
        name: &str,
    ) -> ApiResult<LoadBalancer> {
        skyvisor_core::names::validate_name("name", name)?;
        let (spec, _) = self
            .store
            .get_json::<LoadBalancerSpec>(&keys::load_balancer(project, name))
            .await?
            .ok_or_else(|| ApiError::not_found(format!("load balancer \"{name}\" not found")))?;
        self.with_backends(spec).await
    }

    async fn with_backends(&self, spec: LoadBalancerSpec) -> ApiResult<LoadBalancer> {
        let backends = self
            .store
            .get_json::<LbBackends>(&keys::lb_backends(&spec.project, &spec.name))
            .await?
            .map(|(d, _)| d.backends)
            .unwrap_or_default();
        let mut external_endpoints = Vec::new();
        if spec.external {
            for h in self.inventory.hosts().await.iter().filter(|h| h.alive) {
                for l in &spec.listeners {
                    external_endpoints.push(format!("{}:{}", h.host.address, l.port));
                }
            }
        }
        Ok(LoadBalancer {
            spec,
            backends,
            external_endpoints,
        })
    }

    /// Deletes a load balancer: its address is freed and every host stops
    /// serving it.
    pub async fn delete_load_balancer(&self, project: &ProjectName, name: &str) -> ApiResult<()> {
        let lb = self.load_balancer(project, name).await?;
        let scope = skyvisor_core::network::ipam_scope(lb.spec.vni);
        let event = Event::new(
            EventKind::Deleted,
            ObjectKind::LoadBalancer,
            Some(project.clone()),
            name.to_string(),
            format!("load balancer at {} deleted", lb.spec.address),
        );
        let out = self
            .store
            .txn(
                vec![],
                vec![
                    Op::Delete(keys::load_balancer(project, name)),
                    Op::Delete(keys::lb_backends(project, name)),
                    Op::Delete(keys::ipam_claim(&scope, lb.spec.address)),
                    crate::events::op(event),
                ]
                .into_iter()
                .chain(
                    lb.spec
                        .listeners
                        .iter()
                        .filter(|_| lb.spec.external)
                        .map(|l| Op::Delete(keys::lb_host_port(l.port))),
                )
                .collect(),
            )
            .await?;
        self.inventory
            .wait_for(out.revision, READ_YOUR_WRITES)
            .await;
        info!(project = %project, balancer = %name, "load balancer deleted");
        Ok(())
    }

    /// The load balancers of `project` that send to group `group`.
    pub(crate) async fn balancers_of(
        &self,
        project: &ProjectName,
        group: &GroupName,
    ) -> ApiResult<Vec<LoadBalancerSpec>> {
        let (list, _) = self
            .store
            .list_json::<LoadBalancerSpec>(&keys::in_project(keys::LOAD_BALANCERS, project))
            .await?;
        Ok(list
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| &s.group == group)
            .collect())
    }
}

/// The event of a balancer's creation.
fn event_of(
    project: &ProjectName,
    name: &str,
    address: std::net::Ipv4Addr,
    group: &GroupName,
) -> Event {
    Event::new(
        EventKind::Created,
        ObjectKind::LoadBalancer,
        Some(project.clone()),
        name.to_string(),
        format!("load balancer at {address} for group {group}"),
    )
}

/// The backends of a balancer of `group`: its members that serve and are
/// not draining, then those draining that still run.
pub fn backends(
    group: &GroupSpec,
    status: &GroupStatus,
    members: &[(MemberView, std::net::Ipv4Addr)],
) -> Vec<Backend> {
    let mut out: Vec<Backend> = members
        .iter()
        .filter(|(m, _)| !m.leaving && m.phase == skyvisor_core::InstancePhase::Running)
        .filter_map(|(m, ip)| {
            let state = if status.draining.contains_key(&m.name) {
                BackendState::Draining
            } else if m.serving() && !group.deleting {
                BackendState::Active
            } else {
                return None;
            };
            Some(Backend {
                member: m.name.clone(),
                ip: *ip,
                state,
            })
        })
        .collect();
    out.sort_by(|a, b| a.member.cmp(&b.member));
    out
}

/// The leader's loop writing every balancer's backends.
pub(crate) async fn run(cp: ControlPlane) {
    loop {
        tokio::time::sleep(TICK).await;
        if !cp.leads_now() {
            continue;
        }
        if let Err(e) = step(&cp).await {
            warn!(error = %e.message, "load balancer step failed");
        }
    }
}

async fn step(cp: &ControlPlane) -> ApiResult<()> {
    let (specs, _) = cp
        .store
        .list_json::<LoadBalancerSpec>(keys::LOAD_BALANCERS)
        .await?;
    let (docs, _) = cp.store.list_json::<LbBackends>(keys::LB_BACKENDS).await?;
    let mut written: BTreeMap<String, LbBackends> = docs
        .into_iter()
        .map(|(d, _)| (keys::lb_backends(&d.spec.project, &d.spec.name), d))
        .collect();
    if specs.is_empty() && written.is_empty() {
        return Ok(());
    }
    // Every group and its status once a tick, not once per balancer.
    let (groups, _) = cp.store.list_json::<GroupSpec>(keys::GROUPS).await?;
    let groups: BTreeMap<String, GroupSpec> = groups
        .into_iter()
        .map(|(g, _)| (keys::group(&g.project, &g.name), g))
        .collect();
    let statuses = cp.group_statuses().await?;
    for (spec, _) in specs {
        let key = keys::lb_backends(&spec.project, &spec.name);
        let Some(group) = groups.get(&keys::group(&spec.project, &spec.group)) else {
            continue;
        };
        let status = statuses
            .get(&keys::group_status(&spec.project, &spec.group))
            .cloned()
            .unwrap_or_default();
        let checked = group.health_check.is_some();
        let members: Vec<(MemberView, std::net::Ipv4Addr)> = cp
            .group_instances(&spec.project, &spec.group)
            .await
            .iter()
            .map(|i| {
                (
                    MemberView::of(&i.spec, &i.status, checked),
                    i.spec.network.ip,
                )
            })
            .collect();
        let doc = LbBackends {
            backends: backends(group, &status, &members),
            spec,
        };
        if written.remove(&key).as_ref() != Some(&doc) {
            cp.store.put(&key, encode(&doc)).await?;
        }
    }
    // Backends of balancers that are gone.
    for key in written.keys() {
        cp.store.delete(key).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::InstancePhase;
    use skyvisor_core::group::HealthState;

    fn member(name: &str, phase: InstancePhase, health: HealthState) -> MemberView {
        MemberView {
            name: name.into(),
            phase,
            health,
            template_generation: 1,
            leaving: false,
            lost: false,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn only_serving_members_are_active_and_draining_ones_keep_their_connections() {
        let group: GroupSpec = serde_json::from_value(serde_json::json!({
            "project": "p", "name": "web", "template": {"image": "img"},
            "template_generation": 1, "min": 0, "max": 5, "desired": 3,
            "created_at": Utc::now(),
        }))
        .expect("group");
        let mut status = GroupStatus::default();
        status.draining.insert("d".into(), Utc::now());
        let ip = |n| std::net::Ipv4Addr::new(10, 0, 0, n);
        let mut leaving = member("e", InstancePhase::Running, HealthState::Healthy);
        leaving.leaving = true;
        let members = vec![
            (
                member("a", InstancePhase::Running, HealthState::Healthy),
                ip(1),
            ),
            (
                member("b", InstancePhase::Running, HealthState::Unknown),
                ip(2),
            ),
            (
                member("c", InstancePhase::Starting, HealthState::Unknown),
                ip(3),
            ),
            (
                member("d", InstancePhase::Running, HealthState::Healthy),
                ip(4),
            ),
            (leaving, ip(5)),
        ];
        let b = backends(&group, &status, &members);
        let got: Vec<(&str, BackendState)> =
            b.iter().map(|b| (b.member.as_str(), b.state)).collect();
        assert_eq!(
            got,
            [("a", BackendState::Active), ("d", BackendState::Draining)]
        );
    }
}
