//! The failover controller (leader only): restarts the HA-protected VMs of
//! a dead host on other hosts, and records every failover and every refusal
//! with its reason.
//!
//! A host is declared dead when all of these hold (see the agent's
//! `fencing` module for the other half of the rule):
//! - its liveness key (bound to its lease) has been gone for the safety
//!   margin — its agent fenced itself a quarter TTL before the lease could
//!   expire, so its protected QEMUs are dead by now;
//! - no live host reports hearing it (a host cut off from the store only,
//!   still talking to its peers, keeps its VMs and is not failed over);
//! - the live hosts that report, plus the store as a witness, are at least
//!   half of the voters (the registered hosts and the store): a minority
//!   side of a partition never fails anything over.
//!
//! Each rebind is one store transaction that also checks that the dead
//! host's liveness key is still absent, so a host that came back meanwhile
//! keeps its VMs. The new host's agent takes the VM's volumes over, which
//! bumps their epoch: even a QEMU that somehow still ran on the old host
//! could no longer write. Level-triggered and idempotent: a new leader
//! finishes whatever the old one left.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use skyvisor_core::{
    Event, EventKind, FailoverOutcome, FailoverRecord, HaPolicy, HearingReport, HostName,
    HostState, Instance, InstanceRef, ObjectKind, PowerState, keys,
};
use skyvisor_store::{Compare, Op, StoreExt, put_json};
use tracing::{info, warn};

use crate::ControlPlane;
use crate::error::ApiResult;
use crate::instances::spec_ops;
use crate::inventory::HostEntry;
use crate::scheduler::{self, PlacementRequest};

/// How often the controller looks.
const TICK: Duration = Duration::from_millis(250);
/// A hearing report older than this is not counted (its host stopped
/// writing: it is going down itself).
const REPORT_FRESH: Duration = Duration::from_secs(30);

/// What the controller remembers between ticks (a new leader starts empty,
/// which only delays a failover by the margin).
#[derive(Default)]
struct State {
    /// Dead hosts: when this leader first saw each one's lease gone.
    lost: HashMap<HostName, (Instant, DateTime<Utc>)>,
    /// Refusals already recorded, by (instance, dead host, reason).
    refused: HashSet<(InstanceRef, HostName, String)>,
    /// Hosts held back (still heard, or no quorum), with the reason logged.
    held: HashMap<HostName, String>,
}

/// The controller's loop; acts only while this server leads.
pub(crate) async fn run(cp: ControlPlane) {
    let mut state = State::default();
    let mut pruned_at = Instant::now();
    loop {
        tokio::time::sleep(TICK).await;
        if !cp.leads_now() {
            state = State::default();
            continue;
        }
        if let Err(e) = step(&cp, &mut state).await {
            warn!(error = %e.message, "failover step failed");
        }
        if pruned_at.elapsed() > PRUNE_EVERY {
            pruned_at = Instant::now();
            if let Err(e) = prune_records(&cp).await {
                warn!(error = %e.message, "cannot prune old failover records");
            }
        }
    }
}

/// How often the leader prunes failover records.
const PRUNE_EVERY: Duration = Duration::from_secs(300);
/// Failover records kept at most (the newest).
const KEEP_RECORDS: usize = 1000;

/// Keeps the newest [`KEEP_RECORDS`] failover records (their ids are
/// time-ordered); older ones are deleted.
async fn prune_records(cp: &ControlPlane) -> ApiResult<usize> {
    let mut all = cp.failovers().await?;
    if all.len() <= KEEP_RECORDS {
        return Ok(0);
    }
    let old = all.len() - KEEP_RECORDS;
    let mut deleted = 0;
    for r in all.drain(..old) {
        cp.store.delete(&keys::failover(&r.id)).await?;
        deleted += 1;
    }
    info!(deleted, "pruned old failover records");
    Ok(deleted)
}

async fn step(cp: &ControlPlane, state: &mut State) -> ApiResult<()> {
    let hosts = cp.inventory.hosts().await;
    let alive: HashSet<&HostName> = hosts
        .iter()
        .filter(|h| h.alive)
        .map(|h| &h.host.name)
        .collect();
    state
        .lost
        .retain(|h, _| hosts.iter().any(|e| &e.host.name == h && !e.alive));
    state.held.retain(|h, _| state.lost.contains_key(h));
    for h in hosts.iter().filter(|h| !h.alive) {
        state
            .lost
            .entry(h.host.name.clone())
            .or_insert_with(|| (Instant::now(), Utc::now()));
    }
    let margin = cp.config.cluster.ha_margin;
    let due: Vec<(HostName, DateTime<Utc>)> = state
        .lost
        .iter()
        .filter(|(_, (since, _))| since.elapsed() >= margin)
        .map(|(h, (_, at))| (h.clone(), *at))
        .collect();
    if due.is_empty() {
        return Ok(());
    }
    let (reports, _) = cp
        .store
        .list_json::<HearingReport>(keys::HOST_HEARING)
        .await?;
    let now = Utc::now();
    let fresh: Vec<HearingReport> = reports
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r| alive.contains(&r.host))
        .filter(|r| (now - r.at).to_std().is_ok_and(|age| age < REPORT_FRESH))
        .collect();
    let voters = hosts.len() + 1;
    let instances = cp.inventory.instances_full().await;
    for (dead, lost_at) in due {
        if let Some(r) = fresh.iter().find(|r| r.heard.contains(&dead)) {
            hold(
                state,
                &dead,
                format!(
                    "host {dead} lost its lease but host {} still hears it: not failing it over (cut off from the store only)",
                    r.host
                ),
            );
            continue;
        }
        let reporters = fresh.iter().filter(|r| r.host != dead).count();
        if (reporters + 1) * 2 < voters {
            hold(
                state,
                &dead,
                format!(
                    "host {dead} lost its lease, but only {reporters} of {} hosts report (with the store, no half of the voters): this side of a partition does not fail over",
                    hosts.len()
                ),
            );
            continue;
        }
        state.held.remove(&dead);
        let declared = Utc::now();
        let mut victims: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.spec.host == dead && !i.spec.deleting)
            .filter(|i| i.spec.power == PowerState::Running)
            .collect();
        victims.sort_by(|a, b| {
            b.spec
                .ha_priority
                .cmp(&a.spec.ha_priority)
                .then(a.spec.name.cmp(&b.spec.name))
        });
        for vm in victims {
            let refusal = match (vm.spec.ha, vm.spec.root_volume()) {
                (HaPolicy::Off, _) => Some(format!(
                    "not protected (ha off): it stays down until host {dead} returns"
                )),
                // A container starts again elsewhere from its image.
                (HaPolicy::Restart, None)
                    if vm.spec.kind == skyvisor_core::InstanceKind::Container =>
                {
                    None
                }
                (HaPolicy::Restart, None) => Some(format!(
                    "its disk is local to host {dead}: it stays down until that host returns"
                )),
                (HaPolicy::Restart, Some(_)) => None,
            };
            let result = match refusal {
                Some(r) => Err(r),
                None => fail_over(cp, vm, &dead, &hosts, lost_at, declared).await,
            };
            if let Err(reason) = result {
                refuse(cp, state, vm, &dead, reason, lost_at, declared).await;
            }
        }
    }
    Ok(())
}

fn hold(state: &mut State, dead: &HostName, reason: String) {
    if state.held.get(dead) != Some(&reason) {
        warn!(host = %dead, "{reason}");
        state.held.insert(dead.clone(), reason);
    }
}

/// Records a refusal once per (instance, host, reason).
async fn refuse(
    cp: &ControlPlane,
    state: &mut State,
    vm: &Instance,
    dead: &HostName,
    reason: String,
    lost_at: DateTime<Utc>,
    declared: DateTime<Utc>,
) {
    let key = (vm.spec.instance_ref(), dead.clone(), reason.clone());
    if state.refused.contains(&key) {
        return;
    }
    warn!(instance = %vm.spec.name, host = %dead, %reason, "not failing over");
    let record = FailoverRecord {
        id: record_id(&vm.spec.instance_ref()),
        instance: vm.spec.name.clone(),
        project: vm.spec.project.clone(),
        from_host: dead.clone(),
        to_host: None,
        outcome: FailoverOutcome::Refused,
        reason,
        lease_lost_at: lost_at,
        declared_dead_at: declared,
        rebound_at: None,
    };
    match cp
        .store
        .put(&keys::failover(&record.id), skyvisor_store::encode(&record))
        .await
    {
        Ok(_) => {
            state.refused.insert(key);
            cp.metrics
                .failovers
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: "refused".into(),
                })
                .inc();
        }
        Err(e) => warn!(error = %e, "cannot record a failover refusal"),
    }
}

/// Rebinds `vm` to another host in one transaction guarded by the dead
/// host's liveness key being absent; returns why not, if it could not.
async fn fail_over(
    cp: &ControlPlane,
    vm: &Instance,
    dead: &HostName,
    hosts: &[HostEntry],
    lost_at: DateTime<Utc>,
    declared: DateTime<Utc>,
) -> Result<(), String> {
    let iref = vm.spec.instance_ref();
    let name = &vm.spec.name;
    let key = keys::instance_spec(&iref);
    let Some((spec, rev)) = cp
        .store
        .get_json::<skyvisor_core::InstanceSpec>(&key)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    if &spec.host != dead {
        return Ok(());
    }
    // Hosts holding a replica of its root volume first: no data to fetch.
    let replica_hosts = cp.root_replica_hosts(&spec).await;
    let usable: Vec<HostEntry> = hosts
        .iter()
        .filter(|h| h.alive && &h.host.name != dead && h.state() == HostState::Ready)
        .cloned()
        .collect();
    let request = PlacementRequest {
        resources: spec.resources,
        accel: spec.accel,
        kind: spec.kind,
        spread: cp.spread_for(&spec).await,
        ..Default::default()
    };
    let target = cp
        .place_near(&usable, &replica_hosts, &request)
        .map_err(|e| match e {
            scheduler::PlacementError::NoHosts => "no other host is ready to take it".to_string(),
            e => e.to_string(),
        })?;
    let Some(entry) = usable.iter().find(|h| h.host.name == target) else {
        return Err(format!(
            "placement chose host {target}, which is not usable"
        ));
    };
    let mut next = spec.clone();
    next.host = target.clone();
    next.generation += 1;
    // A migration from the dead host ended with it.
    next.migration = None;
    let rebound = Utc::now();
    let record = FailoverRecord {
        id: record_id(&iref),
        instance: name.clone(),
        project: vm.spec.project.clone(),
        from_host: dead.clone(),
        to_host: Some(target.clone()),
        outcome: FailoverOutcome::Restarted,
        reason: if replica_hosts.contains(&target) {
            format!(
                "host {dead} died; restarted on {target}, which holds a replica of its root disk"
            )
        } else {
            format!("host {dead} died; restarted on {target}")
        },
        lease_lost_at: lost_at,
        declared_dead_at: declared,
        rebound_at: Some(rebound),
    };
    let mut compares = vec![
        Compare::Absent(keys::host_alive(dead)),
        Compare::ModRevision(key, rev),
    ];
    compares.extend(cp.host_guard(entry));
    let mut ops = spec_ops(&next);
    ops.push(Op::Delete(keys::binding(dead, &iref)));
    ops.push(cp.alloc_mark(&target, &iref));
    ops.push(put_json(keys::failover(&record.id), &record));
    // Down since its agent fenced itself, a quarter TTL before its lease
    // could expire: not billed from then until it runs again.
    let mut event = Event::instance(
        EventKind::FailedOver,
        &next,
        format!("{}; down since its host's lease was lost", record.reason),
    );
    let fenced_at =
        lost_at - chrono::Duration::from_std(cp.config.cluster.lease_ttl / 4).unwrap_or_default();
    event.at = fenced_at;
    ops.push(crate::events::op(event));
    // The host's own event: the same key for each of its VMs' rebinds
    // (same host, kind and time), so it is recorded once.
    let mut fenced = Event::new(
        EventKind::Fenced,
        ObjectKind::Host,
        None,
        dead.to_string(),
        format!(
            "host {dead} lost its lease at {} and fenced itself; its protected VMs are restarted elsewhere",
            lost_at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    )
    .on(dead);
    fenced.at = fenced_at;
    ops.push(crate::events::op(fenced));
    let out = cp
        .store
        .txn(compares, ops.clone())
        .await
        .map_err(|e| e.to_string())?;
    if out.succeeded {
        cp.inventory.apply_committed(&ops, out.revision).await;
        cp.metrics
            .failovers
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: "restarted".into(),
            })
            .inc();
        cp.metrics
            .failover_seconds
            .observe((rebound - lost_at).num_milliseconds().max(0) as f64 / 1000.0);
        info!(instance = %name, from = %dead, to = %target, "failed over");
        Ok(())
    } else {
        // Something moved (the host returned, the spec changed, the target
        // took another VM): the next tick decides again.
        Ok(())
    }
}

/// A failover record id: time-ordered, unique per instance.
fn record_id(name: &InstanceRef) -> String {
    format!(
        "{}-{}-{}",
        Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        name.project,
        name.name
    )
}

impl ControlPlane {
    /// Every failover and refusal, oldest first.
    pub async fn failovers(&self) -> ApiResult<Vec<FailoverRecord>> {
        let (all, _) = self
            .store
            .list_json::<FailoverRecord>(keys::FAILOVERS)
            .await?;
        let mut v: Vec<FailoverRecord> = all.into_iter().map(|(r, _)| r).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }
}
