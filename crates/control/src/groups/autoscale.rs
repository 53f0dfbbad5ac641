//! The autoscaler (leader only): every few seconds it samples the members
//! of each group with a policy (their vCPU time, from their hosts' agents)
//! and the group's load balancers (new connections, counted by every
//! host's datapath), keeps a window of samples, and sets the group's
//! desired size to what the policy asks for. The group controller then
//! makes or drains members. Every change is an event with its numbers.
//!
//! What each metric proposes is the pure [`propose`], unit-tested.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{Timelike, Utc};
use skyvisor_core::group::{AutoscaleDecision, AutoscalePolicy, GroupSpec, GroupStatus};
use skyvisor_core::{EventKind, GroupName, InstancePhase, ProjectName, keys};
use skyvisor_store::{StoreExt, put_json};
use tracing::{debug, info, warn};

use crate::ControlPlane;
use crate::error::ApiResult;

/// How often the autoscaler samples.
const TICK: Duration = Duration::from_secs(5);

/// One sample of a group.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Per member: vCPU seconds used so far, and its vCPUs.
    vcpu: HashMap<String, (f64, u32)>,
    /// New connections its balancers sent so far, per host.
    connections: HashMap<String, u64>,
}

/// What the metrics measured over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Busy vCPUs (vCPU seconds per second) over the serving members.
    pub busy_vcpus: f64,
    /// vCPUs of one member.
    pub member_vcpus: u32,
    /// New connections per second through the group's balancers.
    pub connections_per_sec: f64,
    /// Seconds measured over.
    pub span_secs: f64,
}

/// The size each metric of `policy` asks for, and why (for the event);
/// none if no metric has a target.
pub fn propose(policy: &AutoscalePolicy, m: &Measured) -> Option<(u32, String)> {
    let mut best: Option<(u32, String)> = None;
    let mut offer = |n: u32, why: String| {
        if best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, why));
        }
    };
    if let Some(target) = policy.target_cpu_percent {
        let per_member = f64::from(target) / 100.0 * f64::from(m.member_vcpus.max(1));
        let n = (m.busy_vcpus / per_member).ceil().max(1.0) as u32;
        offer(
            n,
            format!(
                "{:.2} busy vCPUs over {:.0} s against a target of {target}% of {} vCPU per member",
                m.busy_vcpus, m.span_secs, m.member_vcpus
            ),
        );
    }
    if let Some(target) = policy.target_requests_per_member {
        let n = (m.connections_per_sec / f64::from(target)).ceil().max(1.0) as u32;
        offer(
            n,
            format!(
                "{:.1} new connections/s over {:.0} s against a target of {target} per member",
                m.connections_per_sec, m.span_secs
            ),
        );
    }
    best
}

/// What the autoscaler keeps per group.
#[derive(Default)]
struct Track {
    samples: VecDeque<(Instant, Sample)>,
    last_change: Option<Instant>,
    last_minute: Option<u32>,
}

/// The autoscaler's loop; acts only while this server leads.
pub(crate) async fn run(cp: ControlPlane) {
    let mut tracks: HashMap<(ProjectName, GroupName), Track> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        if !cp.leads_now() {
            tracks.clear();
            continue;
        }
        if let Err(e) = step(&cp, &mut tracks).await {
            warn!(error = %e.message, "autoscaler step failed");
        }
    }
}

async fn step(
    cp: &ControlPlane,
    tracks: &mut HashMap<(ProjectName, GroupName), Track>,
) -> ApiResult<()> {
    let (groups, _) = cp.store.list_json::<GroupSpec>(keys::GROUPS).await?;
    let scaled: Vec<(GroupSpec, i64)> = groups
        .into_iter()
        .filter(|(g, _)| g.autoscale.is_some() && !g.deleting)
        .collect();
    tracks.retain(|(p, n), _| scaled.iter().any(|(g, _)| &g.project == p && &g.name == n));
    if scaled.is_empty() {
        return Ok(());
    }
    let hosts: Vec<_> = cp
        .inventory
        .hosts()
        .await
        .into_iter()
        .filter(|h| h.alive)
        .map(|h| h.host.name.clone())
        .collect();
    let (samples, unreachable) = cp.ask_agents(hosts).await;
    if !unreachable.is_empty() {
        debug!(?unreachable, "autoscaler: hosts without samples");
    }
    let now = Instant::now();
    for (spec, rev) in scaled {
        let Some(policy) = spec.autoscale.clone() else {
            continue;
        };
        let members: Vec<_> = cp
            .group_instances(&spec.project, &spec.name)
            .await
            .into_iter()
            .filter(|i| !i.spec.deleting && i.status.phase == InstancePhase::Running)
            .collect();
        let mut sample = Sample::default();
        for s in &samples {
            for vm in &s.vms {
                if vm.project == spec.project
                    && members.iter().any(|m| m.spec.name.as_str() == vm.name)
                    && let Some(v) = vm.vcpu_seconds
                {
                    sample.vcpu.insert(vm.name.clone(), (v, vm.vcpus));
                }
            }
        }
        let balancers: Vec<String> = cp
            .balancers_of(&spec.project, &spec.name)
            .await?
            .iter()
            .map(|b| format!("{}/{}", b.project, b.name))
            .collect();
        for s in &samples {
            let n: u64 = balancers
                .iter()
                .filter_map(|b| s.lb_connections.get(b))
                .sum();
            sample.connections.insert(s.host.host.to_string(), n);
        }
        let track = tracks
            .entry((spec.project.clone(), spec.name.clone()))
            .or_default();
        track.samples.push_back((now, sample));
        let window = Duration::from_secs(u64::from(policy.window_secs));
        // Keep the newest sample at least a window old: rates span the
        // whole window.
        while track
            .samples
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= window)
        {
            track.samples.pop_front();
        }
        let minute = Utc::now().hour() * 60 + Utc::now().minute();
        let scheduled = scheduled_size(&policy, track.last_minute, minute);
        track.last_minute = Some(minute);
        let decision = match scheduled {
            Some(n) => Some((n, format!("scheduled size {n}"), true)),
            None => {
                measure(track).and_then(|m| propose(&policy, &m).map(|(n, why)| (n, why, false)))
            }
        };
        debug!(group = %spec.name, samples = track.samples.len(), decision = ?decision, "autoscaler looked");
        let Some((want, why, forced)) = decision else {
            continue;
        };
        let want = want.clamp(spec.min, spec.max);
        if want == spec.desired {
            continue;
        }
        let since_change = track.last_change.map(|t| now.duration_since(t));
        let cooldown = if want > spec.desired {
            policy.scale_out_cooldown_secs
        } else {
            policy.scale_in_cooldown_secs
        };
        let cooled = since_change.is_none_or(|d| d >= Duration::from_secs(u64::from(cooldown)));
        // In only once every member serves: a booting one is not idle.
        let settled = members.len() as u32 >= spec.desired;
        if !forced && (!cooled || (want < spec.desired && !settled)) {
            continue;
        }
        if apply(cp, &spec, rev, want, &why).await? {
            track.last_change = Some(now);
            // Decisions start from what happens from now on.
            track.samples.clear();
        }
    }
    Ok(())
}

/// The scheduled size whose time came since `last` (minutes of the day).
fn scheduled_size(policy: &AutoscalePolicy, last: Option<u32>, now: u32) -> Option<u32> {
    let last = last?;
    policy
        .schedule
        .iter()
        .filter_map(|s| Some((s.minute_of_day().ok()?, s.desired)))
        .filter(|(m, _)| {
            if last <= now {
                *m > last && *m <= now
            } else {
                // Past midnight.
                *m > last || *m <= now
            }
        })
        .map(|(_, d)| d)
        .next_back()
}

/// The rates between the oldest and newest sample of the window.
fn measure(track: &Track) -> Option<Measured> {
    let (t0, first) = track.samples.front()?;
    let (t1, last) = track.samples.back()?;
    let span = t1.duration_since(*t0).as_secs_f64();
    if span < TICK.as_secs_f64() * 1.5 {
        return None;
    }
    let mut busy = 0.0;
    let mut member_vcpus = 0;
    for (name, (v1, vcpus)) in &last.vcpu {
        if let Some((v0, _)) = first.vcpu.get(name)
            && v1 >= v0
        {
            busy += (v1 - v0) / span;
            member_vcpus = member_vcpus.max(*vcpus);
        }
    }
    let mut connections = 0u64;
    for (host, n1) in &last.connections {
        if let Some(n0) = first.connections.get(host) {
            // A restarted agent counts from zero again: its part is lost.
            connections += n1.saturating_sub(*n0);
        }
    }
    Some(Measured {
        busy_vcpus: busy,
        member_vcpus,
        connections_per_sec: connections as f64 / span,
        span_secs: span,
    })
}

/// Sets the group's desired size to `to` with the reason in an event and
/// in the group's status. False if the group changed meanwhile.
async fn apply(
    cp: &ControlPlane,
    spec: &GroupSpec,
    rev: i64,
    to: u32,
    why: &str,
) -> ApiResult<bool> {
    let mut changed = spec.clone();
    changed.desired = to;
    let message = format!("desired {} -> {to} by autoscaling: {why}", spec.desired);
    if !cp
        .put_group(&changed, rev, EventKind::Scaled, message)
        .await?
    {
        return Ok(false);
    }
    info!(project = %spec.project, group = %spec.name, from = spec.desired, to, %why, "autoscaled");
    let status_key = keys::group_status(&spec.project, &spec.name);
    let mut status = cp
        .store
        .get_json::<GroupStatus>(&status_key)
        .await?
        .map(|(s, _)| s)
        .unwrap_or_default();
    status.autoscale = Some(AutoscaleDecision {
        at: Utc::now(),
        from: spec.desired,
        to,
        reason: why.to_string(),
    });
    cp.store
        .txn(vec![], vec![put_json(status_key, &status)])
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::group::ScheduledSize;

    fn policy(cpu: Option<u32>, rps: Option<u32>) -> AutoscalePolicy {
        AutoscalePolicy {
            target_cpu_percent: cpu,
            target_requests_per_member: rps,
            schedule: vec![],
            window_secs: 60,
            scale_out_cooldown_secs: 60,
            scale_in_cooldown_secs: 300,
        }
    }

    fn measured(busy: f64, rps: f64) -> Measured {
        Measured {
            busy_vcpus: busy,
            member_vcpus: 2,
            connections_per_sec: rps,
            span_secs: 60.0,
        }
    }

    #[test]
    fn each_metric_asks_for_what_brings_it_to_target_and_the_largest_wins() {
        // 3 busy vCPUs at 50% of 2 vCPUs per member: 3 members.
        let (n, why) = propose(&policy(Some(50), None), &measured(3.0, 0.0)).expect("cpu");
        assert_eq!(n, 3);
        assert!(why.contains("3.00 busy vCPUs"), "{why}");
        // 95 connections/s at 20 per member: 5 members.
        assert_eq!(
            propose(&policy(None, Some(20)), &measured(0.0, 95.0))
                .expect("rps")
                .0,
            5
        );
        // Both: the larger.
        let (n, why) = propose(&policy(Some(50), Some(20)), &measured(3.0, 95.0)).expect("both");
        assert_eq!(n, 5);
        assert!(why.contains("connections"), "{why}");
        // Idle: never below one.
        assert_eq!(
            propose(&policy(Some(50), Some(20)), &measured(0.0, 0.0))
                .expect("idle")
                .0,
            1
        );
        assert!(propose(&policy(None, None), &measured(3.0, 95.0)).is_none());
    }

    #[test]
    fn a_scheduled_size_applies_once_when_its_minute_comes() {
        let mut p = policy(None, None);
        p.schedule = vec![
            ScheduledSize {
                at: "08:00".into(),
                desired: 4,
            },
            ScheduledSize {
                at: "23:59".into(),
                desired: 1,
            },
        ];
        assert_eq!(scheduled_size(&p, None, 480), None, "no earlier tick");
        assert_eq!(scheduled_size(&p, Some(479), 480), Some(4));
        assert_eq!(scheduled_size(&p, Some(480), 480), None, "once");
        assert_eq!(scheduled_size(&p, Some(1438), 1), Some(1), "past midnight");
    }

    #[test]
    fn rates_come_from_the_window_and_a_restarted_counter_counts_nothing() {
        let mut t = Track::default();
        let t0 = Instant::now();
        let mut a = Sample::default();
        a.vcpu.insert("m1".into(), (100.0, 1));
        a.connections.insert("h1".into(), 1000);
        a.connections.insert("h2".into(), 500);
        let mut b = Sample::default();
        b.vcpu.insert("m1".into(), (110.0, 1));
        b.vcpu.insert("m2".into(), (5.0, 1));
        b.connections.insert("h1".into(), 1200);
        b.connections.insert("h2".into(), 10);
        t.samples.push_back((t0, a));
        t.samples.push_back((t0 + Duration::from_secs(20), b));
        let m = measure(&t).expect("measured");
        assert!((m.busy_vcpus - 0.5).abs() < 1e-9, "{m:?}");
        assert!((m.connections_per_sec - 10.0).abs() < 1e-9, "{m:?}");
    }
}
