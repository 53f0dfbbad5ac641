//! The group controller (leader only): each tick, for every group, it
//! compares the group's desired state with its members and carries out
//! [`plan`](super::plan::plan): makes members from the launch template,
//! removes failed, unhealthy and extra ones, rolls template changes
//! through, and deletes a deleted group's members and then the group.
//!
//! Level-triggered and idempotent: it keeps nothing between ticks but
//! back-off times, so a new leader carries on where the last one stopped.
//! Every member made or removed is an event naming why.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use skyvisor_core::group::{GroupMembership, GroupSpec, GroupStatus};
use skyvisor_core::{Event, EventKind, GroupName, ObjectKind, ProjectName, keys};
use skyvisor_store::{Compare, Op, StoreExt, put_json};
use tracing::{info, warn};

use super::plan::{self, MemberView, RemoveReason};
use crate::ControlPlane;
use crate::error::ApiResult;

/// How often the controller looks.
const TICK: Duration = Duration::from_secs(1);
/// After a member could not be made, how long before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The controller's loop; acts only while this server leads.
pub(crate) async fn run(cp: ControlPlane) {
    let mut retry_at: HashMap<(ProjectName, GroupName), Instant> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        if !cp.leads_now() {
            retry_at.clear();
            continue;
        }
        if let Err(e) = step(&cp, &mut retry_at).await {
            warn!(error = %e.message, "group controller step failed");
        }
    }
}

async fn step(
    cp: &ControlPlane,
    retry_at: &mut HashMap<(ProjectName, GroupName), Instant>,
) -> ApiResult<()> {
    let (groups, _) = cp.store.list_json::<GroupSpec>(keys::GROUPS).await?;
    retry_at.retain(|(p, g), _| groups.iter().any(|(s, _)| &s.project == p && &s.name == g));
    // How long each balanced group's leaving members drain: the longest
    // of its balancers' (all balancers read once a tick).
    let (balancers, _) = cp
        .store
        .list_json::<skyvisor_core::lb::LoadBalancerSpec>(keys::LOAD_BALANCERS)
        .await?;
    let mut drains: HashMap<(ProjectName, GroupName), u32> = HashMap::new();
    for (b, _) in balancers {
        let d = drains.entry((b.project, b.group)).or_insert(0);
        *d = (*d).max(b.drain_secs);
    }
    for (spec, rev) in groups {
        let id = (spec.project.clone(), spec.name.clone());
        if retry_at.get(&id).is_some_and(|t| Instant::now() < *t) {
            continue;
        }
        let status_key = keys::group_status(&spec.project, &spec.name);
        let before = cp
            .store
            .get_json::<GroupStatus>(&status_key)
            .await?
            .map(|(s, _)| s)
            .unwrap_or_default();
        let mut status = before.clone();
        let drain = drains
            .get(&(spec.project.clone(), spec.name.clone()))
            .copied()
            .unwrap_or(0);
        match reconcile(cp, &spec, rev, drain, &mut status).await {
            Ok(Outcome::Forgotten) => continue,
            Ok(Outcome::Done) => {
                retry_at.remove(&id);
                status.message = None;
            }
            Err(e) => {
                warn!(project = %spec.project, group = %spec.name, error = %e.message, "group cannot reach its desired state; retrying");
                status.message = Some(e.message);
                retry_at.insert(id, Instant::now() + RETRY_AFTER);
            }
        }
        if status != before {
            status.updated_at = Some(Utc::now());
            if let Err(e) = cp
                .store
                .txn(vec![], vec![put_json(status_key, &status)])
                .await
            {
                warn!(group = %spec.name, error = %e, "cannot write the group's status");
            }
        }
    }
    Ok(())
}

/// How a group's step ended.
enum Outcome {
    /// Converging (or converged).
    Done,
    /// The group was deleted with its last member.
    Forgotten,
}

/// Carries out one group's plan. Members leaving a group behind load
/// balancers are drained first (see [`GroupStatus::draining`]); a broken
/// one goes at once, it serves nobody.
async fn reconcile(
    cp: &ControlPlane,
    spec: &GroupSpec,
    rev: i64,
    drain: u32,
    status: &mut GroupStatus,
) -> ApiResult<Outcome> {
    let checked = spec.health_check.is_some();
    let alive: std::collections::HashSet<skyvisor_core::HostName> = cp
        .inventory
        .hosts()
        .await
        .into_iter()
        .filter(|h| h.alive)
        .map(|h| h.host.name.clone())
        .collect();
    let members: Vec<MemberView> = cp
        .group_instances(&spec.project, &spec.name)
        .await
        .iter()
        .map(|i| {
            let mut m = MemberView::of(&i.spec, &i.status, checked);
            // A dead host fenced its instances; HA restarts the protected
            // ones elsewhere, the group replaces the others.
            m.lost = !alive.contains(&i.spec.host) && i.spec.ha == skyvisor_core::HaPolicy::Off;
            m
        })
        .collect();
    let plan = plan::plan(spec, &members);
    // A member no longer to be removed (scaled back out) serves again.
    status
        .draining
        .retain(|name, _| plan.remove.iter().any(|(n, _)| n == name));
    for (name, why) in &plan.remove {
        if drain > 0 && *why != RemoveReason::Replace {
            let since = *status.draining.entry(name.clone()).or_insert_with(|| {
                info!(project = %spec.project, group = %spec.name, member = %name, reason = %why, drain, "draining a member");
                Utc::now()
            });
            if (Utc::now() - since).num_milliseconds() < i64::from(drain) * 1000 {
                continue;
            }
        }
        info!(project = %spec.project, group = %spec.name, member = %name, reason = %why, "removing a member");
        match cp.delete_instance(&spec.project, name, true, true).await {
            Ok(_) => record(cp, spec, EventKind::MemberRemoved, format!("{name}: {why}")),
            // Gone or going already: what the plan wanted.
            Err(e) if e.code == "not_found" || e.code == "conflict" => {}
            Err(e) => return Err(e),
        }
        status.draining.remove(name);
    }
    if plan.forget_group {
        let key = keys::group(&spec.project, &spec.name);
        let out = cp
            .store
            .txn(
                vec![Compare::ModRevision(key.clone(), rev)],
                vec![
                    Op::Delete(key),
                    Op::Delete(keys::group_status(&spec.project, &spec.name)),
                ],
            )
            .await?;
        if out.succeeded {
            info!(project = %spec.project, group = %spec.name, "group deleted with its last member");
            return Ok(Outcome::Forgotten);
        }
        return Ok(Outcome::Done);
    }
    for _ in 0..plan.add {
        let name = member_name(&spec.name);
        let mut req = spec.template.clone();
        req.name = name.clone();
        let membership = GroupMembership {
            group: spec.name.clone(),
            template_generation: spec.template_generation,
            health_check: spec.health_check.clone(),
        };
        cp.create_instance_as(&spec.project, req, Some(membership))
            .await?;
        info!(project = %spec.project, group = %spec.name, member = %name, "made a member");
        record(cp, spec, EventKind::MemberAdded, name);
    }
    Ok(Outcome::Done)
}

/// A new member's name: the group's and five random characters.
fn member_name(group: &GroupName) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{group}-{suffix}")
}

fn record(cp: &ControlPlane, spec: &GroupSpec, kind: EventKind, message: String) {
    cp.events.record(Event::new(
        kind,
        ObjectKind::Group,
        Some(spec.project.clone()),
        spec.name.to_string(),
        message,
    ));
}
