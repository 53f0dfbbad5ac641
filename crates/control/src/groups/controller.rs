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

use super::plan::{self, MemberView};
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
    for (spec, rev) in groups {
        let id = (spec.project.clone(), spec.name.clone());
        if retry_at.get(&id).is_some_and(|t| Instant::now() < *t) {
            continue;
        }
        match reconcile(cp, &spec, rev).await {
            Ok(()) => {
                retry_at.remove(&id);
            }
            Err(e) => {
                warn!(project = %spec.project, group = %spec.name, error = %e.message, "group cannot reach its desired state; retrying");
                note(cp, &spec, Some(e.message)).await;
                retry_at.insert(id, Instant::now() + RETRY_AFTER);
            }
        }
    }
    Ok(())
}

/// Carries out one group's plan.
async fn reconcile(cp: &ControlPlane, spec: &GroupSpec, rev: i64) -> ApiResult<()> {
    let checked = spec.health_check.is_some();
    let members: Vec<MemberView> = cp
        .group_instances(&spec.project, &spec.name)
        .await
        .iter()
        .map(|i| MemberView::of(&i.spec, &i.status, checked))
        .collect();
    let plan = plan::plan(spec, &members);
    for (name, why) in &plan.remove {
        info!(project = %spec.project, group = %spec.name, member = %name, reason = %why, "removing a member");
        match cp.delete_instance(&spec.project, name, true, true).await {
            Ok(_) => record(cp, spec, EventKind::MemberRemoved, format!("{name}: {why}")),
            // Gone or going already: what the plan wanted.
            Err(e) if e.code == "not_found" || e.code == "conflict" => {}
            Err(e) => return Err(e),
        }
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
        }
        return Ok(());
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
    note(cp, spec, None).await;
    Ok(())
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

/// Writes why the group is short (or that it is not), when that changed.
async fn note(cp: &ControlPlane, spec: &GroupSpec, message: Option<String>) {
    let key = keys::group_status(&spec.project, &spec.name);
    let old = cp
        .store
        .get_json::<GroupStatus>(&key)
        .await
        .ok()
        .flatten()
        .map(|(s, _)| s);
    if old.as_ref().map(|s| &s.message) == Some(&message) || (old.is_none() && message.is_none()) {
        return;
    }
    let status = GroupStatus {
        message,
        updated_at: Some(Utc::now()),
    };
    if let Err(e) = cp.store.txn(vec![], vec![put_json(key, &status)]).await {
        warn!(group = %spec.name, error = %e, "cannot write the group's status");
    }
}
