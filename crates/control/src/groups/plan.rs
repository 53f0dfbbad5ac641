//! What the group controller does next for one group: a pure function of
//! the group's spec and its members, so every rule is unit-tested.
//!
//! Rules:
//! - a member that failed or stopped, whose health check judged it
//!   unhealthy, or whose host died when HA will not restart it, is
//!   removed (and so replaced);
//! - members are added until the group has `desired` that are not leaving;
//! - extra members are removed: made from an older template first, then
//!   not serving, then the newest;
//! - a rolling update (members from an older template) keeps at most
//!   `desired + max_surge` members and removes an old one only while at
//!   least `desired - max_unavailable` members serve without it (the
//!   default, surge 1 and unavailable 0, never drops below what serves);
//! - a group being deleted removes every member, then itself.

use chrono::{DateTime, Utc};
use skyvisor_core::group::{GroupSpec, HealthState};
use skyvisor_core::{InstancePhase, InstanceSpec, InstanceStatus};

/// A member as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    /// The instance's name.
    pub name: String,
    /// Its phase.
    pub phase: InstancePhase,
    /// Its health as its agent reported (Healthy for a running member of a
    /// group without a check).
    pub health: HealthState,
    /// The template generation it was made from.
    pub template_generation: u64,
    /// Already being deleted.
    pub leaving: bool,
    /// Its host is gone and HA will not restart it elsewhere (a local
    /// disk, or HA off): its host fenced it, it serves nobody.
    pub lost: bool,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

impl MemberView {
    /// The planner's view of an instance of `group`.
    pub fn of(spec: &InstanceSpec, status: &InstanceStatus, checked: bool) -> Self {
        let health = if !checked {
            if status.phase == InstancePhase::Running {
                HealthState::Healthy
            } else {
                HealthState::Unknown
            }
        } else {
            status
                .health
                .as_ref()
                .map_or(HealthState::Unknown, |h| h.state)
        };
        Self {
            name: spec.name.to_string(),
            phase: status.phase,
            health,
            template_generation: spec.group.as_ref().map_or(0, |m| m.template_generation),
            leaving: spec.deleting,
            lost: false,
            created_at: spec.created_at,
        }
    }

    /// Whether it serves: it runs and passes its checks.
    pub fn serving(&self) -> bool {
        self.phase == InstancePhase::Running && self.health == HealthState::Healthy
    }

    /// Whether it must be replaced: it failed, stopped (a member that
    /// powered itself off serves nobody; as EC2 Auto Scaling does, the
    /// group replaces it), or its health check judged it unhealthy.
    pub fn broken(&self) -> bool {
        matches!(self.phase, InstancePhase::Failed | InstancePhase::Stopped)
            || self.health == HealthState::Unhealthy
            || self.lost
    }
}

/// Why a member is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// It failed or is unhealthy: a new one replaces it.
    Replace,
    /// The group has more than it wants.
    ScaleIn,
    /// A rolling update: a member from the new template serves instead.
    Update,
    /// The group is being deleted.
    GroupDeleted,
}

impl std::fmt::Display for RemoveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Replace => "replaced: failed or unhealthy",
            Self::ScaleIn => "scale-in",
            Self::Update => "rolling update",
            Self::GroupDeleted => "group deleted",
        })
    }
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Members to remove, and why.
    pub remove: Vec<(String, RemoveReason)>,
    /// How many members to add.
    pub add: u32,
    /// The group record can go (deleted, no members left).
    pub forget_group: bool,
}

/// The next step for `spec` with `members` (see the module documentation).
pub fn plan(spec: &GroupSpec, members: &[MemberView]) -> Plan {
    let mut out = Plan::default();
    if spec.deleting {
        for m in members.iter().filter(|m| !m.leaving) {
            out.remove
                .push((m.name.clone(), RemoveReason::GroupDeleted));
        }
        out.forget_group = members.is_empty();
        return out;
    }
    let mut active: Vec<&MemberView> = Vec::new();
    for m in members.iter().filter(|m| !m.leaving) {
        if m.broken() {
            out.remove.push((m.name.clone(), RemoveReason::Replace));
        } else {
            active.push(m);
        }
    }
    let desired = spec.desired as usize;
    let generation = spec.template_generation;
    let (current, outdated): (Vec<&MemberView>, Vec<&MemberView>) = active
        .iter()
        .partition(|m| m.template_generation >= generation);
    if active.len() < desired {
        out.add = (desired - active.len()) as u32;
        return out;
    }
    if current.len() >= desired {
        // Enough from the current template: every outdated one goes, and
        // current ones beyond `desired` (not serving first, then newest).
        for m in &outdated {
            out.remove.push((m.name.clone(), RemoveReason::Update));
        }
        let mut extra: Vec<&&MemberView> = current.iter().collect();
        extra.sort_by(|a, b| {
            a.serving()
                .cmp(&b.serving())
                .then(b.created_at.cmp(&a.created_at))
        });
        for m in extra.into_iter().take(current.len() - desired) {
            out.remove.push((m.name.clone(), RemoveReason::ScaleIn));
        }
        return out;
    }
    // A rolling update: fewer current members than wanted, so outdated
    // ones stay while new ones come. Outdated members go (not serving
    // first, then the oldest) while the group keeps at least
    // `desired - max_unavailable` members, all serving; new ones come
    // while it has at most `desired + max_surge`.
    let floor = desired.saturating_sub(spec.rollout.max_unavailable as usize);
    let ceiling = desired + spec.rollout.max_surge as usize;
    let mut serving = active.iter().filter(|m| m.serving()).count();
    let mut total = active.len();
    let mut old: Vec<&&MemberView> = outdated.iter().collect();
    old.sort_by(|a, b| {
        a.serving()
            .cmp(&b.serving())
            .then(a.created_at.cmp(&b.created_at))
    });
    for m in old {
        let serving_after = serving - usize::from(m.serving());
        if total - 1 < floor || serving_after < floor {
            break;
        }
        out.remove.push((m.name.clone(), RemoveReason::Update));
        serving = serving_after;
        total -= 1;
    }
    // New ones, in a step that removes nothing (a leaving member still
    // runs while it drains): as many as the ceiling allows, up to what is
    // missing.
    if out.remove.is_empty() {
        let missing = desired - current.len();
        out.add = ceiling.saturating_sub(total).min(missing) as u32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::GroupName;
    use skyvisor_core::api::CreateInstanceRequest;

    fn spec(desired: u32, generation: u64) -> GroupSpec {
        GroupSpec {
            project: skyvisor_core::ProjectName::new("p").expect("project"),
            name: GroupName::new("web").expect("name"),
            template: CreateInstanceRequest::default(),
            template_generation: generation,
            min: 0,
            max: 10,
            desired,
            health_check: None,
            deleting: false,
            autoscale: None,
            rollout: skyvisor_core::group::Rollout::default(),
            created_at: Utc::now(),
        }
    }

    fn member(name: &str, generation: u64, serving: bool, age_secs: i64) -> MemberView {
        MemberView {
            name: name.into(),
            phase: if serving {
                InstancePhase::Running
            } else {
                InstancePhase::Starting
            },
            health: if serving {
                HealthState::Healthy
            } else {
                HealthState::Unknown
            },
            template_generation: generation,
            leaving: false,
            lost: false,
            created_at: Utc::now() - chrono::Duration::seconds(age_secs),
        }
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.remove.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn a_new_group_gets_all_its_members() {
        assert_eq!(plan(&spec(3, 1), &[]).add, 3);
    }

    #[test]
    fn a_failed_or_unhealthy_member_is_replaced_and_a_leaving_one_not_counted() {
        let mut failed = member("a", 1, true, 30);
        failed.phase = InstancePhase::Failed;
        let mut sick = member("b", 1, true, 20);
        sick.health = HealthState::Unhealthy;
        let mut leaving = member("c", 1, true, 10);
        leaving.leaving = true;
        let ok = member("d", 1, true, 5);
        let p = plan(&spec(3, 1), &[failed, sick, leaving, ok]);
        assert_eq!(names(&p), ["a", "b"]);
        assert!(p.remove.iter().all(|(_, r)| *r == RemoveReason::Replace));
        assert_eq!(p.add, 2, "two replacements for three wanted");
    }

    #[test]
    fn a_member_lost_with_its_host_is_replaced() {
        let mut lost = member("a", 1, true, 30);
        lost.lost = true;
        let p = plan(&spec(2, 1), &[lost, member("b", 1, true, 20)]);
        assert_eq!(names(&p), ["a"]);
        assert_eq!(p.add, 1);
    }

    #[test]
    fn scale_in_removes_members_not_serving_then_the_newest() {
        let ms = [
            member("old", 1, true, 300),
            member("mid", 1, true, 200),
            member("booting", 1, false, 100),
            member("new", 1, true, 10),
        ];
        let p = plan(&spec(2, 1), &ms);
        assert_eq!(names(&p), ["booting", "new"]);
        assert_eq!(p.add, 0);
    }

    #[test]
    fn a_rolling_update_surges_one_and_never_drops_below_desired() {
        let s = spec(2, 2);
        // Both old and serving: one new member is added first.
        let step1 = [member("a", 1, true, 300), member("b", 1, true, 200)];
        let p = plan(&s, &step1);
        assert_eq!((p.add, p.remove.len()), (1, 0));
        // The new one boots: nothing more happens.
        let step2 = [
            member("a", 1, true, 300),
            member("b", 1, true, 200),
            member("c", 2, false, 5),
        ];
        assert_eq!(plan(&s, &step2), Plan::default());
        // It serves: the oldest old one goes.
        let step3 = [
            member("a", 1, true, 300),
            member("b", 1, true, 200),
            member("c", 2, true, 5),
        ];
        let p = plan(&s, &step3);
        assert_eq!(names(&p), ["a"]);
        assert_eq!(p.add, 0);
        // One old left with one new serving: surge again.
        let step4 = [member("b", 1, true, 200), member("c", 2, true, 5)];
        assert_eq!(plan(&s, &step4).add, 1);
        // Two new serving: the last old one goes.
        let step5 = [
            member("b", 1, true, 200),
            member("c", 2, true, 5),
            member("d", 2, true, 1),
        ];
        let p = plan(&s, &step5);
        assert_eq!(names(&p), ["b"]);
        assert_eq!(p.remove[0].1, RemoveReason::Update);
    }

    #[test]
    fn a_rollout_with_more_surge_adds_more_at_once_and_unavailable_ones_go_first() {
        let old = |n: &str, age| member(n, 1, true, age);
        let three_old = [old("a", 300), old("b", 200), old("c", 100)];
        // Surge 2: two new members at once, nothing old goes yet.
        let mut s = spec(3, 2);
        s.rollout = skyvisor_core::group::Rollout {
            max_surge: 2,
            max_unavailable: 0,
        };
        let p = plan(&s, &three_old);
        assert_eq!((p.add, p.remove.len()), (2, 0));
        // Both serve: the two oldest go together.
        let five = [
            old("a", 300),
            old("b", 200),
            old("c", 100),
            member("d", 2, true, 5),
            member("e", 2, true, 4),
        ];
        assert_eq!(names(&plan(&s, &five)), ["a", "b"]);
        // No surge, one unavailable: an old one goes first, then a new
        // one comes, and the next old one waits until it serves.
        s.rollout = skyvisor_core::group::Rollout {
            max_surge: 0,
            max_unavailable: 1,
        };
        let p = plan(&s, &three_old);
        assert_eq!((names(&p), p.add), (vec!["a"], 0));
        let p = plan(&s, &[old("b", 200), old("c", 100)]);
        assert_eq!((p.add, p.remove.len()), (1, 0));
        let booting = [old("b", 200), old("c", 100), member("d", 2, false, 5)];
        assert_eq!(plan(&s, &booting), Plan::default());
        let served = [old("b", 200), old("c", 100), member("d", 2, true, 5)];
        assert_eq!(names(&plan(&s, &served)), ["b"]);
    }

    #[test]
    fn an_old_member_not_serving_goes_first_in_an_update() {
        let s = spec(2, 2);
        let ms = [
            member("a", 1, false, 300),
            member("b", 1, true, 200),
            member("c", 2, true, 5),
        ];
        assert_eq!(names(&plan(&s, &ms)), ["a"]);
    }

    #[test]
    fn a_deleted_group_removes_every_member_then_itself() {
        let mut s = spec(2, 1);
        s.deleting = true;
        let mut leaving = member("b", 1, true, 5);
        leaving.leaving = true;
        let p = plan(&s, &[member("a", 1, true, 10), leaving.clone()]);
        assert_eq!(names(&p), ["a"]);
        assert!(!p.forget_group);
        assert!(plan(&s, &[]).forget_group);
        assert_eq!(plan(&s, &[leaving]).remove.len(), 0);
    }
}
