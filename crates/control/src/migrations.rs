//! Live migration requests, host maintenance (drain) and rebalancing.
//!
//! A request is validated here and becomes desired state in one
//! transaction: the migration's record, the instance's spec carrying the
//! request (the source's agent acts on it) and the destination's allocation
//! (its resources are held there while the VM moves). The agents do the
//! moving and finish the record. The leader's maintenance loop turns a
//! draining host or a rebalance plan into migrations, one at a time.
//!
//! This module never talks to an agent or QEMU.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use skyvisor_core::api::{MigrateInstanceRequest, PlannedMove, RebalancePlan, RebalanceRequest};
use skyvisor_core::{
    HostName, HostState, InstanceName, InstancePhase, InstanceRef, InstanceSpec, InstanceStatus,
    Migration, MigrationId, MigrationPhase, MigrationProgress, MigrationReason, MigrationRequest,
    PowerState, ProjectName, VolumeSpec, keys,
};
use skyvisor_store::{Compare, StoreExt, decode, encode, put_json};
use tracing::{info, warn};

use crate::error::{ApiError, ApiResult};
use crate::instances::spec_ops;
use crate::inventory::HostEntry;
use crate::scheduler::{self, PlacementRequest, SpreadConstraint};
use crate::{ControlPlane, READ_YOUR_WRITES};

/// Default and largest number of moves of one rebalance.
const DEFAULT_MOVES: u32 = 3;
pub(crate) const MAX_REBALANCE_MOVES: u32 = 50;
/// How often the leader looks at draining hosts and the rebalance plan.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);
/// A VM whose drain migration failed is not tried again for this long.
const DRAIN_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The rebalance moves still to make (`cluster/rebalance`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RebalanceQueue {
    moves: Vec<PlannedMove>,
    current: Option<MigrationId>,
}

impl ControlPlane {
    /// Starts a live migration of a running instance.
    pub async fn migrate_instance(
        &self,
        project: &ProjectName,
        name: &str,
        req: MigrateInstanceRequest,
        reason: MigrationReason,
    ) -> ApiResult<Migration> {
        let name = InstanceName::new(name)?;
        let iref = InstanceRef::new(project.clone(), name.clone());
        let to = req.to.as_deref().map(HostName::new).transpose()?;
        if req.max_bandwidth_mib_s == Some(0) || req.max_bandwidth_mib_s > Some(1 << 20) {
            return Err(ApiError::invalid(format!(
                "max_bandwidth_mib_s {} is out of range; allowed: 1 to {} (or leave it out for no cap)",
                req.max_bandwidth_mib_s.unwrap_or(0),
                1u64 << 20
            )));
        }
        let key = keys::instance_spec(&iref);
        let placing = self.placement.lock().await;
        let mut committed = None;
        for _ in 0..8 {
            let Some((spec, rev)) = self.store.get_json::<InstanceSpec>(&key).await? else {
                return Err(ApiError::not_found(format!(
                    "instance \"{name}\" not found"
                )));
            };
            crate::containers::refuse_for_container(&spec)?;
            let status = self.instance_status(&iref).await?;
            check_migratable(&spec, &status)?;
            let hosts = self.inventory.hosts().await;
            let Some(source) = hosts.iter().find(|h| h.host.name == spec.host) else {
                return Err(ApiError::conflict(format!(
                    "instance \"{name}\" is on host {}, which is not registered",
                    spec.host
                )));
            };
            if !source.alive {
                return Err(ApiError::conflict(format!(
                    "instance \"{name}\" is on host {}, which is unreachable: a live migration needs its source running",
                    spec.host
                )));
            }
            if let Some(to) = &to {
                if *to == spec.host {
                    return Err(ApiError::conflict(format!(
                        "instance \"{name}\" already runs on host {to}; name another host"
                    )));
                }
                // The path's instance exists; a destination that does not
                // is a conflict with the pool, not a missing resource.
                if !hosts.iter().any(|h| &h.host.name == to) {
                    return Err(ApiError::conflict(format!(
                        "no host \"{to}\" in the pool; see `skyvisor host list`"
                    )));
                }
            }
            let candidates: Vec<_> = hosts
                .iter()
                .filter(|h| h.host.name != spec.host)
                .cloned()
                .collect();
            let spread = self.spread_for(&spec).await;
            let request = PlacementRequest {
                resources: spec.resources,
                only: to.clone(),
                // Memory and CPU state only move between hosts with the
                // same accelerator.
                accel: Some(source.host.accel),
                spread,
                ..Default::default()
            };
            // A volume-backed VM goes where a replica of its root disk is
            // when it can: its reads stay on the host.
            let placed = if to.is_none() {
                let replica_hosts = self.root_replica_hosts(&spec).await;
                self.place_near(&candidates, &replica_hosts, &request)
            } else {
                scheduler::place(&candidates, &request, self.config.weigher)
            };
            let dest = match placed {
                Ok(h) => h,
                Err(scheduler::PlacementError::NoHosts) => {
                    return Err(ApiError::insufficient_capacity(format!(
                        "instance \"{name}\" has nowhere to go: no other host is registered"
                    )));
                }
                Err(e) => {
                    let reasons = e.to_string();
                    let reasons = reasons.trim_start_matches("no host can fit it: ");
                    return Err(ApiError::insufficient_capacity(match &to {
                        Some(to) => format!(
                            "host {to} cannot take instance \"{name}\": {}",
                            reasons
                                .split("; ")
                                .find_map(|r| r.strip_prefix(&format!("{to}: ")))
                                .unwrap_or(reasons)
                        ),
                        None => format!("no host can take instance \"{name}\": {reasons}"),
                    }));
                }
            };
            let Some(entry) = hosts.iter().find(|h| h.host.name == dest) else {
                return Err(ApiError::internal(format!(
                    "placement chose host {dest}, which is not in the inventory"
                )));
            };
            let now = Utc::now();
            let record = Migration {
                id: MigrationId::random(),
                instance: name.clone(),
                project: project.clone(),
                instance_id: spec.id,
                source: spec.host.clone(),
                destination: dest.clone(),
                reason,
                phase: MigrationPhase::Pending,
                progress: MigrationProgress::default(),
                result: None,
                error: None,
                created_at: now,
                updated_at: now,
                finished_at: None,
            };
            let mut next = spec.clone();
            next.migration = Some(MigrationRequest {
                id: record.id,
                destination: dest.clone(),
                max_bandwidth_mib_s: req.max_bandwidth_mib_s,
                insecure: req.insecure,
            });
            next.generation += 1;
            let mut compares = vec![Compare::ModRevision(key.clone(), rev)];
            compares.extend(self.host_guard(entry));
            let mut ops = spec_ops(&next);
            ops.push(put_json(keys::migration(&record.id), &record));
            ops.push(self.alloc_mark(&dest, &iref));
            let out = self.store.txn(compares, ops.clone()).await?;
            if out.succeeded {
                self.inventory.apply_committed(&ops, out.revision).await;
                info!(instance = %name, from = %spec.host, to = %dest, migration = %record.id, %reason, "migration requested");
                committed = Some((record, spec));
                break;
            }
            self.inventory
                .wait_for(out.revision, READ_YOUR_WRITES)
                .await;
        }
        drop(placing);
        if let Some((record, spec)) = committed {
            self.follow_with_replica(&spec, &record.destination).await;
            return Ok(record);
        }
        Err(ApiError::unavailable(format!(
            "instance \"{name}\" or the hosts are changing too fast; retry"
        )))
    }

    /// Asks the source to cancel the instance's migration in flight.
    pub async fn cancel_migration(
        &self,
        project: &ProjectName,
        name: &str,
    ) -> ApiResult<Migration> {
        let name = InstanceName::new(name)?;
        let Some((spec, _)) = self
            .store
            .get_json::<InstanceSpec>(&keys::instance_spec(&InstanceRef::new(
                project.clone(),
                name.clone(),
            )))
            .await?
        else {
            return Err(ApiError::not_found(format!(
                "instance \"{name}\" not found"
            )));
        };
        let Some(req) = spec.migration else {
            return Err(ApiError::conflict(format!(
                "instance \"{name}\" is not migrating"
            )));
        };
        let record = self.migration(&req.id.to_string()).await?;
        if record.phase == MigrationPhase::SwitchingOver {
            return Err(ApiError::conflict(format!(
                "migration {} of \"{name}\" is switching over; it is too late to cancel",
                req.id
            )));
        }
        self.store
            .put(&keys::migration_cancel(&req.id), encode(&Utc::now()))
            .await?;
        info!(instance = %name, migration = %req.id, "migration cancel requested");
        Ok(record)
    }

    /// All migration records, newest first.
    pub async fn migrations(&self) -> ApiResult<Vec<Migration>> {
        let listing = self.store.list(keys::MIGRATIONS).await?;
        let mut out: Vec<Migration> = listing
            .items
            .iter()
            .filter_map(|kv| decode::<Migration>(kv).ok())
            .collect();
        out.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        Ok(out)
    }

    /// One migration record.
    pub async fn migration(&self, id: &str) -> ApiResult<Migration> {
        let Some(mid) = MigrationId::parse(id) else {
            return Err(ApiError::invalid(format!(
                "invalid migration id {id:?}: expected a UUID as `skyvisor migration list` shows"
            )));
        };
        self.store
            .get_json::<Migration>(&keys::migration(&mid))
            .await?
            .map(|(m, _)| m)
            .ok_or_else(|| ApiError::not_found(format!("migration {id} not found")))
    }

    /// Puts a host in maintenance: no new VMs, and the leader live-migrates
    /// its running VMs away one at a time.
    pub async fn drain_host(&self, name: &str) -> ApiResult<()> {
        let host = HostName::new(name)?;
        if self.inventory.host(&host).await.is_none() {
            return Err(ApiError::not_found(format!("host \"{host}\" not found")));
        }
        let rev = self
            .store
            .put(&keys::host_state(&host), encode(&HostState::Draining))
            .await?;
        self.inventory.wait_for(rev, READ_YOUR_WRITES).await;
        info!(%host, "host draining");
        Ok(())
    }

    /// Returns a host to service (new VMs may land there again).
    pub async fn undrain_host(&self, name: &str) -> ApiResult<()> {
        let host = HostName::new(name)?;
        if self.inventory.host(&host).await.is_none() {
            return Err(ApiError::not_found(format!("host \"{host}\" not found")));
        }
        let rev = self.store.delete(&keys::host_state(&host)).await?;
        self.inventory.wait_for(rev, READ_YOUR_WRITES).await;
        info!(%host, "host back in service");
        Ok(())
    }

    /// Plans moves that even out memory allocation across ready hosts and
    /// queues them for the leader, which runs them one at a time.
    pub async fn rebalance(&self, req: RebalanceRequest) -> ApiResult<RebalancePlan> {
        let max = req.max_moves.unwrap_or(DEFAULT_MOVES);
        if max == 0 || max > MAX_REBALANCE_MOVES {
            return Err(ApiError::invalid(format!(
                "max_moves {max} is out of range; allowed: 1 to {MAX_REBALANCE_MOVES}"
            )));
        }
        if let Some((q, _)) = self
            .store
            .get_json::<RebalanceQueue>(keys::REBALANCE)
            .await?
            && (!q.moves.is_empty() || q.current.is_some())
        {
            return Err(ApiError::conflict(format!(
                "a rebalance is running ({} moves left); wait until `skyvisor migration list` shows it done",
                q.moves.len()
            )));
        }
        let hosts = self.inventory.hosts().await;
        let instances = self.inventory.instances_full().await;
        let mut load: HashMap<HostName, (u64, u64)> = hosts
            .iter()
            .filter(|h| h.state() == HostState::Ready)
            .map(|h| {
                (
                    h.host.name.clone(),
                    (
                        h.allocated.memory_mib,
                        h.host.capacity.allocatable.memory_mib.max(1),
                    ),
                )
            })
            .collect();
        let spread = |load: &HashMap<HostName, (u64, u64)>| -> f64 {
            let ratios: Vec<f64> = load.values().map(|(a, t)| *a as f64 / *t as f64).collect();
            let max = ratios.iter().copied().fold(f64::MIN, f64::max);
            let min = ratios.iter().copied().fold(f64::MAX, f64::min);
            if ratios.is_empty() {
                0.0
            } else {
                (max - min) * 100.0
            }
        };
        let before = spread(&load);
        let mut placed: HashMap<InstanceRef, HostName> = instances
            .iter()
            .map(|i| (i.spec.instance_ref(), i.spec.host.clone()))
            .collect();
        let mut moves = vec![];
        while moves.len() < max as usize && load.len() >= 2 {
            let ratio = |h: &HostName, l: &HashMap<HostName, (u64, u64)>| {
                let (a, t) = l[h];
                a as f64 / t as f64
            };
            let mut names: Vec<HostName> = load.keys().cloned().collect();
            names.sort_by(|a, b| ratio(a, &load).total_cmp(&ratio(b, &load)));
            let (least, most) = (names[0].clone(), names[names.len() - 1].clone());
            let current = spread(&load);
            let mut best: Option<(f64, InstanceRef, u64)> = None;
            for i in &instances {
                if placed.get(&i.spec.instance_ref()) != Some(&most)
                    || check_migratable(&i.spec, &i.status).is_err()
                    || moves.iter().any(|m: &PlannedMove| {
                        m.instance == i.spec.name.as_str() && m.project == i.spec.project
                    })
                {
                    continue;
                }
                let mem = i.spec.resources.memory_mib;
                let (la, lt) = load[&least];
                if la + mem > lt {
                    continue;
                }
                let mut trial = load.clone();
                if let Some(e) = trial.get_mut(&most) {
                    e.0 -= mem.min(e.0);
                }
                if let Some(e) = trial.get_mut(&least) {
                    e.0 += mem;
                }
                let after = spread(&trial);
                if after + 0.5 < current && best.as_ref().is_none_or(|(b, _, _)| after < *b) {
                    best = Some((after, i.spec.instance_ref(), mem));
                }
            }
            let Some((_, name, mem)) = best else { break };
            if let Some(e) = load.get_mut(&most) {
                e.0 -= mem.min(e.0);
            }
            if let Some(e) = load.get_mut(&least) {
                e.0 += mem;
            }
            moves.push(PlannedMove {
                instance: name.name.to_string(),
                project: name.project.clone(),
                from: most.to_string(),
                to: least.to_string(),
            });
            placed.insert(name, least.clone());
        }
        let plan = RebalancePlan {
            spread_after_percent: spread(&load),
            spread_before_percent: before,
            moves: moves.clone(),
        };
        if !moves.is_empty() {
            self.store
                .put(
                    keys::REBALANCE,
                    encode(&RebalanceQueue {
                        moves,
                        current: None,
                    }),
                )
                .await?;
            info!(moves = plan.moves.len(), "rebalance planned");
        }
        Ok(plan)
    }
}

impl ControlPlane {
    /// The spread constraint of `spec`'s group, the instance itself left
    /// out (it is the one being placed).
    pub(crate) async fn spread_for(&self, spec: &InstanceSpec) -> Option<SpreadConstraint> {
        let group = spec.spread_group.as_ref()?;
        let mut members = self
            .inventory
            .spread_members(&skyvisor_core::Scoped::new(
                spec.project.clone(),
                group.clone(),
            ))
            .await;
        members.retain(|_, m| *m != spec.name);
        Some(SpreadConstraint {
            group: group.clone(),
            members,
        })
    }

    /// Places `request` on one of `candidates`, a host in `near` (holding
    /// a replica of the VM's root disk) first.
    pub(crate) fn place_near(
        &self,
        candidates: &[HostEntry],
        near: &[HostName],
        request: &PlacementRequest,
    ) -> Result<HostName, scheduler::PlacementError> {
        let preferred: Vec<HostEntry> = candidates
            .iter()
            .filter(|h| near.contains(&h.host.name))
            .cloned()
            .collect();
        scheduler::place(&preferred, request, self.config.weigher)
            .or_else(|_| scheduler::place(candidates, request, self.config.weigher))
    }

    /// The disk follows its VM: when a volume-backed VM migrates to a host
    /// without a replica of its root disk, one of its replicas moves there
    /// (the source's if it holds one). The source's agent waits for the new
    /// replica to be in sync before the switchover; the old one is dropped
    /// once it is. Best effort: without it the VM reads its disk from the
    /// other hosts.
    async fn follow_with_replica(&self, spec: &InstanceSpec, dest: &HostName) {
        let Some(root) = spec.root_volume() else {
            return;
        };
        let hosts = self.root_replica_hosts(spec).await;
        if hosts.is_empty() || hosts.contains(dest) {
            return;
        }
        let from = if hosts.contains(&spec.host) {
            spec.host.clone()
        } else {
            hosts[hosts.len() - 1].clone()
        };
        let req = skyvisor_core::volume::ChangeReplicasRequest {
            to: Some(dest.to_string()),
            from: Some(from.to_string()),
        };
        match self
            .change_replicas(&spec.project, root.name.as_str(), req)
            .await
        {
            Ok(_) => {
                info!(instance = %spec.name, volume = %root.name, %from, to = %dest, "the disk follows its VM: a replica moves to the destination")
            }
            Err(e) => {
                warn!(instance = %spec.name, volume = %root.name, error = %e.message, "cannot move a replica to the destination; the VM will read its disk remotely")
            }
        }
    }

    /// The hosts holding a replica of `spec`'s root volume (none for a
    /// local disk).
    pub(crate) async fn root_replica_hosts(&self, spec: &InstanceSpec) -> Vec<HostName> {
        let Some(v) = spec.root_volume() else {
            return Vec::new();
        };
        match self
            .store
            .get_json::<VolumeSpec>(&keys::volume_spec(&spec.volume_ref(&v.name)))
            .await
        {
            Ok(Some((s, _))) => s.hosts,
            _ => Vec::new(),
        }
    }

    /// Moves a stopped VM whose disks are all replicated volumes off a
    /// draining host: nothing is copied, its spec is bound to another host
    /// (one holding a replica of its root disk first), where it starts
    /// when asked to. Returns the new host.
    async fn relocate_stopped(&self, iref: &InstanceRef, from: &HostName) -> ApiResult<HostName> {
        let name = &iref.name;
        let key = keys::instance_spec(iref);
        let _placing = self.placement.lock().await;
        let Some((spec, rev)) = self.store.get_json::<InstanceSpec>(&key).await? else {
            return Err(ApiError::not_found(format!(
                "instance \"{name}\" not found"
            )));
        };
        let status = self.instance_status(iref).await?;
        if !is_relocatable(&spec, &status) || &spec.host != from {
            return Err(ApiError::conflict(format!(
                "instance \"{name}\" is no longer a stopped volume-backed VM on host {from}"
            )));
        }
        let hosts = self.inventory.hosts().await;
        let candidates: Vec<_> = hosts
            .iter()
            .filter(|h| &h.host.name != from && h.alive)
            .cloned()
            .collect();
        let request = PlacementRequest {
            resources: spec.resources,
            accel: spec.accel,
            spread: self.spread_for(&spec).await,
            ..Default::default()
        };
        let replica_hosts = self.root_replica_hosts(&spec).await;
        let dest = self
            .place_near(&candidates, &replica_hosts, &request)
            .map_err(|e| {
                ApiError::insufficient_capacity(format!(
                    "no host can take stopped instance \"{name}\": {e}"
                ))
            })?;
        let Some(entry) = hosts.iter().find(|h| h.host.name == dest) else {
            return Err(ApiError::internal(format!(
                "placement chose host {dest}, which is not in the inventory"
            )));
        };
        let mut next = spec.clone();
        next.host = dest.clone();
        next.generation += 1;
        let mut compares = vec![Compare::ModRevision(key, rev)];
        compares.extend(self.host_guard(entry));
        let mut ops = spec_ops(&next);
        ops.push(skyvisor_store::Op::Delete(keys::binding(from, iref)));
        ops.push(self.alloc_mark(&dest, iref));
        let out = self.store.txn(compares, ops.clone()).await?;
        if !out.succeeded {
            return Err(ApiError::unavailable(format!(
                "instance \"{name}\" or the hosts changed meanwhile; retrying"
            )));
        }
        self.inventory.apply_committed(&ops, out.revision).await;
        Ok(dest)
    }
}

/// Whether a VM can leave its host without a live migration: stopped (and
/// seen stopped by its agent, which has let go of its volumes), every disk
/// a replicated volume, nothing in flight.
fn is_relocatable(spec: &InstanceSpec, status: &InstanceStatus) -> bool {
    spec.power == PowerState::Stopped
        && status.phase == InstancePhase::Stopped
        && spec.root_volume().is_some()
        && spec.migration.is_none()
        && !spec.deleting
        && spec
            .restore
            .as_ref()
            .is_none_or(|r| r.generation <= status.observed_restore_generation)
}

/// Refuses instances that cannot migrate live now, saying why.
fn check_migratable(spec: &InstanceSpec, status: &InstanceStatus) -> ApiResult<()> {
    let name = &spec.name;
    if spec.deleting {
        return Err(ApiError::conflict(format!(
            "instance \"{name}\" is being deleted"
        )));
    }
    if let Some(m) = &spec.migration {
        return Err(ApiError::conflict(format!(
            "instance \"{name}\" is already migrating to {} (migration {}); wait for it or cancel it with `skyvisor vm migrate {name} --cancel`",
            m.destination, m.id
        )));
    }
    if spec.power != PowerState::Running || status.phase != InstancePhase::Running {
        return Err(ApiError::conflict(format!(
            "instance \"{name}\" is {}; only a running VM migrates live",
            status.phase
        )));
    }
    if spec
        .restore
        .as_ref()
        .is_some_and(|r| r.generation > status.observed_restore_generation)
    {
        return Err(ApiError::conflict(format!(
            "instance \"{name}\" is being restored from a snapshot; migrate it afterwards"
        )));
    }
    Ok(())
}

/// The leader's maintenance loop: settles image builds whose server died,
/// deletes root volumes of deleted VMs, drains hosts and runs rebalance
/// plans.
pub(crate) async fn run(cp: ControlPlane) {
    let mut failed: HashMap<InstanceRef, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(MAINTENANCE_EVERY).await;
        if !cp.leads_now() {
            continue;
        }
        failed.retain(|_, at| at.elapsed() < DRAIN_RETRY_AFTER);
        if let Err(e) = cp.recover_interrupted_builds(false).await {
            warn!(error = %e.message, "cannot check for interrupted image builds");
        }
        if let Err(e) = cp.delete_orphaned_root_volumes().await {
            warn!(error = %e.message, "cannot check for root volumes of deleted VMs");
        }
        drain_step(&cp, &mut failed).await;
        if let Err(e) = rebalance_step(&cp).await {
            warn!(error = %e.message, "rebalance step failed");
        }
    }
}

/// Starts the next migration off each draining host that has none running.
async fn drain_step(cp: &ControlPlane, failed: &mut HashMap<InstanceRef, Instant>) {
    let hosts = cp.inventory.hosts().await;
    let instances = cp.inventory.instances_full().await;
    for h in hosts.iter().filter(|h| h.state() == HostState::Draining) {
        let on_host: Vec<_> = instances
            .iter()
            .filter(|i| i.spec.host == h.host.name)
            .collect();
        // Stopped volume-backed VMs just change hosts: nothing to copy.
        let stopped: Vec<_> = on_host
            .iter()
            .filter(|i| {
                is_relocatable(&i.spec, &i.status) && !failed.contains_key(&i.spec.instance_ref())
            })
            .collect();
        for i in stopped {
            match cp
                .relocate_stopped(&i.spec.instance_ref(), &h.host.name)
                .await
            {
                Ok(to) => {
                    info!(host = %h.host.name, instance = %i.spec.name, %to, "draining: stopped VM moved")
                }
                Err(e) => {
                    warn!(host = %h.host.name, instance = %i.spec.name, error = %e.message, "draining: cannot move a stopped VM; retrying later");
                    failed.insert(i.spec.instance_ref(), Instant::now());
                }
            }
        }
        if on_host.iter().any(|i| i.spec.migration.is_some()) {
            continue;
        }
        let next = on_host.iter().find(|i| {
            !failed.contains_key(&i.spec.instance_ref())
                && check_migratable(&i.spec, &i.status).is_ok()
        });
        let Some(next) = next else { continue };
        match cp
            .migrate_instance(
                &next.spec.project,
                next.spec.name.as_str(),
                MigrateInstanceRequest::default(),
                MigrationReason::Drain,
            )
            .await
        {
            Ok(m) => {
                info!(host = %h.host.name, instance = %next.spec.name, to = %m.destination, "draining: migration started")
            }
            Err(e) => {
                warn!(host = %h.host.name, instance = %next.spec.name, error = %e.message, "draining: cannot migrate; retrying later");
                failed.insert(next.spec.instance_ref(), Instant::now());
            }
        }
    }
}

/// Advances the rebalance plan by at most one migration.
async fn rebalance_step(cp: &ControlPlane) -> ApiResult<()> {
    let Some((mut q, rev)) = cp.store.get_json::<RebalanceQueue>(keys::REBALANCE).await? else {
        return Ok(());
    };
    if let Some(id) = q.current {
        match cp.migration(&id.to_string()).await {
            Ok(m) if !m.phase.is_finished() => return Ok(()),
            _ => q.current = None,
        }
    }
    if q.moves.is_empty() {
        cp.store
            .txn(
                vec![Compare::ModRevision(keys::REBALANCE.into(), rev)],
                vec![skyvisor_store::Op::Delete(keys::REBALANCE.into())],
            )
            .await?;
        return Ok(());
    }
    let mv = q.moves.remove(0);
    match cp
        .migrate_instance(
            &mv.project,
            &mv.instance,
            MigrateInstanceRequest {
                to: Some(mv.to.clone()),
                max_bandwidth_mib_s: None,
                insecure: false,
            },
            MigrationReason::Rebalance,
        )
        .await
    {
        Ok(m) => {
            info!(instance = %mv.instance, to = %mv.to, "rebalance: migration started");
            q.current = Some(m.id);
        }
        Err(e) => {
            warn!(instance = %mv.instance, to = %mv.to, error = %e.message, "rebalance: move skipped")
        }
    }
    cp.store
        .txn(
            vec![Compare::ModRevision(keys::REBALANCE.into(), rev)],
            vec![put_json(keys::REBALANCE.to_string(), &q)],
        )
        .await?;
    Ok(())
}
