//! Volume operations: validate a request, place replicas, write desired
//! state; attach and detach volumes to VMs; route snapshots to the agent
//! that can take them.
//!
//! Placement puts each replica on its own host, using the scheduler's host
//! filters (ready, alive, room on the data disk) plus "runs a replica
//! server". A refused request writes nothing. The API never talks to
//! replicas: the volume's controller agent creates, grows and deletes them
//! (see the agent's `volumes::controller`); this module only reads the
//! data path's membership record, as `MembershipView`.

use skyvisor_core::auth::Usage;
use skyvisor_core::{Event, EventKind, ProjectName};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use reqwest::StatusCode;
use skyvisor_core::api::{CreateInstanceRequest, ErrorBody};
use skyvisor_core::image::ImageKind;
use skyvisor_core::volume::{
    CreateVolumeRequest, CreateVolumeSnapshotRequest, DEFAULT_REPLICAS, GrowVolumeRequest,
    MAX_VOLUMES_PER_INSTANCE, MemberView, validate_replicas, validate_size, validate_snapshot_name,
};
use skyvisor_core::{
    HostName, Image, Instance, InstanceName, InstancePhase, InstanceRef, InstanceSpec,
    InstanceStatus, InstanceVolume, MembershipView, PowerState, ReplicaState, ReplicaView,
    Resources, Volume, VolumeAttachment, VolumeHealth, VolumeId, VolumeName, VolumePhase,
    VolumeRedundancy, VolumeRef, VolumeRuntime, VolumeSnapshot, VolumeSpec, VolumeStatus, keys,
};
use skyvisor_store::{Compare, Op, StoreExt, put_json};
use tracing::{debug, info};

use crate::error::{ApiError, ApiResult};
use crate::inventory::HostEntry;
use crate::scheduler::{self, PlacementError, PlacementRequest};
use crate::{ControlPlane, READ_YOUR_WRITES};

/// How long a create or grow request waits for the controller agent.
const AGENT_WAIT: Duration = Duration::from_secs(60);
/// How old an owned root volume must be before it counts as orphaned
/// when its VM does not exist: longer than a create waits for it
/// ([`AGENT_WAIT`]) before the VM's record is written.
const ORPHAN_GRACE: Duration = Duration::from_secs(90);
const GIB: u64 = 1 << 30;
/// How many times a create retries when another create of its project
/// committed between its quota count and its transaction.
const QUOTA_ATTEMPTS: usize = 20;

/// A volume an instance create or attach resolved: its spec and the
/// revisions the write must still find.
#[derive(Debug, Clone)]
pub struct ResolvedVolume {
    /// The volume as the instance will list it.
    pub volume: InstanceVolume,
    /// Its spec.
    pub spec: VolumeSpec,
    /// The spec's mod revision.
    pub rev: i64,
}

impl ResolvedVolume {
    /// The compare-and-write that claims the volume for `spec`'s VM.
    pub fn claim(&self, instance: &InstanceSpec) -> (Vec<Compare>, Vec<Op>) {
        let vref = instance.volume_ref(&self.volume.name);
        let claim_key = keys::volume_attachment(&vref);
        (
            vec![
                Compare::ModRevision(keys::volume_spec(&vref), self.rev),
                Compare::Absent(claim_key.clone()),
            ],
            vec![put_json(
                claim_key,
                &VolumeAttachment {
                    instance: instance.name.clone(),
                    instance_id: instance.id,
                    root: self.volume.root,
                    since: Utc::now(),
                },
            )],
        )
    }
}

fn gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

fn size_text(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Why `host` cannot hold one more replica of `spec`, or `None`;
/// `promised` is disk (GiB) promised to other volumes' replicas per host.
pub(crate) fn replica_filter_for(
    host: &HostEntry,
    spec: &VolumeSpec,
    promised: &HashMap<HostName, u64>,
) -> Option<String> {
    let extra = promised.get(&host.host.name).copied().unwrap_or(0);
    replica_filter(host, spec.size_bytes, extra)
}

/// Why `host` cannot hold a replica of `size` bytes, or `None`. `extra`
/// is disk already promised to volume replicas on it.
fn replica_filter(host: &HostEntry, size: u64, extra_gib: u64) -> Option<String> {
    if host.host.replica_addr.is_none() {
        return Some("runs no replica server".into());
    }
    let mut h = host.clone();
    h.allocated.disk_gib = h.allocated.disk_gib.saturating_add(extra_gib);
    scheduler::filter(
        &h,
        &PlacementRequest {
            resources: Resources {
                vcpus: 0,
                memory_mib: 0,
                disk_gib: gib(size),
            },
            ..Default::default()
        },
    )
}

/// Chooses `replicas` distinct hosts for a replica of `size` bytes: those
/// with the most free disk first.
pub fn place_replicas(
    hosts: &[HostEntry],
    replicas: u32,
    size: u64,
    promised: &HashMap<HostName, u64>,
) -> Result<Vec<HostName>, ApiError> {
    let n = replicas as usize;
    if hosts.len() < n {
        let names: Vec<String> = hosts.iter().map(|h| h.host.name.to_string()).collect();
        return Err(ApiError::insufficient_capacity(format!(
            "{replicas} replicas need {replicas} hosts (one replica per host); the pool has {} ({})",
            hosts.len(),
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        )));
    }
    let mut fits = vec![];
    let mut reasons = vec![];
    for h in hosts {
        let extra = promised.get(&h.host.name).copied().unwrap_or(0);
        match replica_filter(h, size, extra) {
            None => {
                let free = h
                    .host
                    .capacity
                    .allocatable
                    .disk_gib
                    .saturating_sub(h.allocated.disk_gib.saturating_add(extra));
                fits.push((free, h.host.name.clone()));
            }
            Some(why) => reasons.push(format!("{}: {why}", h.host.name)),
        }
    }
    if fits.len() < n {
        return Err(ApiError::insufficient_capacity(format!(
            "a {} volume with {replicas} replicas needs {replicas} hosts with room; {} of {} can hold a replica ({})",
            size_text(size),
            fits.len(),
            hosts.len(),
            reasons.join("; ")
        )));
    }
    fits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(fits.into_iter().take(n).map(|(_, h)| h).collect())
}

/// What the store holds about every volume, read at once.
struct VolumeRecords {
    specs: Vec<(VolumeSpec, i64)>,
    statuses: HashMap<String, VolumeStatus>,
    claims: HashMap<String, VolumeAttachment>,
    runtimes: HashMap<String, VolumeRuntime>,
    memberships: HashMap<String, MembershipView>,
}

/// Decodes values by what their keys hold after `prefix` (a volume's
/// `project/name`, or a data id), skipping bad ones.
fn decode_named<T: serde::de::DeserializeOwned>(
    prefix: &str,
    items: Vec<skyvisor_store::KeyValue>,
) -> HashMap<String, T> {
    items
        .into_iter()
        .filter_map(|kv| {
            let name = kv.key.strip_prefix(prefix)?.to_owned();
            Some((name, skyvisor_store::decode(&kv).ok()?))
        })
        .collect()
}

/// The volume as the API shows it, from its records.
fn view(
    spec: VolumeSpec,
    status: Option<VolumeStatus>,
    claim: Option<VolumeAttachment>,
    membership: Option<MembershipView>,
    runtime: Option<VolumeRuntime>,
    alive: &HashSet<HostName>,
) -> Volume {
    let status = status.unwrap_or_else(VolumeStatus::creating);
    let primary = membership
        .as_ref()
        .and_then(|m| m.primary.as_ref())
        .and_then(|p| HostName::new(p.as_str()).ok());
    // The serving agent's report is fresher, if it is the primary and alive.
    let runtime = runtime.filter(|r| Some(&r.host) == primary.as_ref() && alive.contains(&r.host));
    let (replicas, epoch, resynced) = match (&runtime, &membership) {
        (Some(r), _) => (r.replicas.clone(), r.epoch, r.resynced_bytes),
        (None, Some(m)) => (
            m.replicas
                .iter()
                .filter_map(|r: &MemberView| {
                    let host = HostName::new(r.node.as_str()).ok()?;
                    let state = if !alive.contains(&host) {
                        ReplicaState::Unreachable
                    } else if r.in_sync {
                        ReplicaState::InSync
                    } else {
                        ReplicaState::OutOfSync
                    };
                    Some(ReplicaView {
                        host,
                        address: r.addr.clone(),
                        state,
                        resync_done_bytes: None,
                        resync_total_bytes: None,
                        read_source: false,
                        message: None,
                    })
                })
                .collect(),
            m.epoch,
            0,
        ),
        (None, None) => (vec![], 0, 0),
    };
    let in_sync_on = |h: &HostName| {
        replicas
            .iter()
            .any(|r| &r.host == h && r.state == ReplicaState::InSync)
    };
    let redundancy = VolumeRedundancy {
        wanted: spec.hosts.len() as u32,
        in_sync: spec.hosts.iter().filter(|h| in_sync_on(h)).count() as u32,
        pending: spec
            .hosts
            .iter()
            .filter(|h| !in_sync_on(h))
            .cloned()
            .collect(),
        surplus: replicas
            .iter()
            .filter(|r| !spec.hosts.contains(&r.host))
            .map(|r| r.host.clone())
            .collect(),
    };
    let health = match &membership {
        None => VolumeHealth::None,
        Some(m) => {
            let in_sync = replicas
                .iter()
                .filter(|r| r.state == ReplicaState::InSync)
                .count() as u32;
            if in_sync < m.min_in_sync.max(1) {
                VolumeHealth::Unavailable
            } else if replicas.iter().all(|r| r.state == ReplicaState::InSync)
                && redundancy.pending.is_empty()
            {
                VolumeHealth::Healthy
            } else {
                VolumeHealth::Degraded
            }
        }
    };
    Volume {
        spec,
        status,
        attached_to: claim,
        health,
        epoch,
        primary,
        replicas,
        resynced_bytes: resynced,
        redundancy,
    }
}

fn running_or_starting(status: &InstanceStatus, spec: &InstanceSpec) -> bool {
    matches!(
        status.phase,
        InstancePhase::Running | InstancePhase::Starting | InstancePhase::Stopping
    ) || (spec.power == PowerState::Running && status.phase == InstancePhase::Pending)
}

impl ControlPlane {
    /// The records under `prefix` of `project`, by `project/name`.
    async fn project_records<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
        project: &ProjectName,
    ) -> ApiResult<HashMap<String, T>> {
        let items = self
            .store
            .list(&keys::in_project(prefix, project))
            .await?
            .items;
        Ok(decode_named(prefix, items))
    }

    /// The records of `project`'s volumes (and the memberships, keyed by
    /// data id, of every volume).
    async fn volume_records(&self, project: &ProjectName) -> ApiResult<VolumeRecords> {
        let (specs, _) = self
            .store
            .list_json::<VolumeSpec>(&keys::in_project(keys::VOLUME_SPECS, project))
            .await?;
        Ok(VolumeRecords {
            specs,
            statuses: self.project_records(keys::VOLUME_STATUSES, project).await?,
            claims: self
                .project_records(keys::VOLUME_ATTACHMENTS, project)
                .await?,
            runtimes: self.project_records(keys::VOLUME_RUNTIMES, project).await?,
            memberships: decode_named(
                keys::VOLUME_MEMBERSHIP,
                self.store.list(keys::VOLUME_MEMBERSHIP).await?.items,
            ),
        })
    }

    async fn alive_hosts(&self) -> HashSet<HostName> {
        self.inventory
            .hosts()
            .await
            .into_iter()
            .filter(|h| h.alive)
            .map(|h| h.host.name.clone())
            .collect()
    }

    /// The volumes of `project`.
    pub async fn volumes(&self, project: &ProjectName) -> ApiResult<Vec<Volume>> {
        let mut r = self.volume_records(project).await?;
        let alive = self.alive_hosts().await;
        Ok(r.specs
            .into_iter()
            .map(|(spec, _)| {
                let name = spec.volume_ref().to_string();
                let data_id = spec.id.data_id();
                view(
                    spec,
                    r.statuses.remove(&name),
                    r.claims.remove(&name),
                    r.memberships.remove(&data_id),
                    r.runtimes.remove(&name),
                    &alive,
                )
            })
            .collect())
    }

    /// The spec of volume `name` with its revision, or 404 (naming the
    /// project's volumes, and no other project's).
    pub(crate) async fn volume_spec(&self, vref: &VolumeRef) -> ApiResult<(VolumeSpec, i64)> {
        let name = &vref.name;
        match self
            .store
            .get_json::<VolumeSpec>(&keys::volume_spec(vref))
            .await?
        {
            Some(s) => Ok(s),
            None => {
                let (all, _) = self
                    .store
                    .list_json::<VolumeSpec>(&keys::in_project(keys::VOLUME_SPECS, &vref.project))
                    .await?;
                let names: Vec<String> = all.iter().map(|(s, _)| s.name.to_string()).collect();
                Err(ApiError::not_found(format!(
                    "volume \"{name}\" not found; volumes: {}",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                )))
            }
        }
    }

    async fn volume_view(&self, spec: VolumeSpec) -> ApiResult<Volume> {
        let name = spec.volume_ref();
        let status = self
            .store
            .get_json::<VolumeStatus>(&keys::volume_status(&name))
            .await?
            .map(|(s, _)| s);
        let claim = self
            .store
            .get_json::<VolumeAttachment>(&keys::volume_attachment(&name))
            .await?
            .map(|(s, _)| s);
        let membership = self
            .store
            .get_json::<MembershipView>(&keys::volume_membership(&spec.id.data_id()))
            .await?
            .map(|(s, _)| s);
        let runtime = self
            .store
            .get_json::<VolumeRuntime>(&keys::volume_runtime(&name))
            .await?
            .map(|(s, _)| s);
        let alive = self.alive_hosts().await;
        Ok(view(spec, status, claim, membership, runtime, &alive))
    }

    /// One volume of `project`, or 404.
    pub async fn volume(&self, project: &ProjectName, name: &str) -> ApiResult<Volume> {
        let vref = VolumeRef::new(project.clone(), VolumeName::new(name)?);
        let (spec, _) = self.volume_spec(&vref).await?;
        self.volume_view(spec).await
    }

    /// Disk promised to volume replicas, per host, in GiB; without `except`.
    pub(crate) async fn promised_replica_disk(
        &self,
        except: Option<&VolumeRef>,
    ) -> ApiResult<HashMap<HostName, u64>> {
        let (specs, _) = self
            .store
            .list_json::<VolumeSpec>(keys::VOLUME_SPECS)
            .await?;
        let mut out: HashMap<HostName, u64> = HashMap::new();
        for (s, _) in specs {
            if except.is_some_and(|e| *e == s.volume_ref()) {
                continue;
            }
            for h in &s.hosts {
                *out.entry(h.clone()).or_default() += gib(s.size_bytes);
            }
        }
        Ok(out)
    }

    /// Waits until the volume's controller reports `done` (or a failure).
    async fn wait_for_status(
        &self,
        name: &VolumeRef,
        done: impl Fn(&VolumeStatus) -> bool,
    ) -> ApiResult<Option<VolumeStatus>> {
        let deadline = tokio::time::Instant::now() + AGENT_WAIT;
        loop {
            let status = self
                .store
                .get_json::<VolumeStatus>(&keys::volume_status(name))
                .await?
                .map(|(s, _)| s);
            if let Some(s) = &status
                && (done(s) || s.phase == VolumePhase::Failed)
            {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(status);
            }
            // Poll interval of a wait for an agent's report, not a readiness guess.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a volume: validates, places its replicas, writes its spec
    /// and waits (up to a minute) for its controller to create them. A
    /// failed creation removes the records again.
    pub async fn create_volume(
        &self,
        project: &ProjectName,
        req: CreateVolumeRequest,
    ) -> ApiResult<Volume> {
        self.create_volume_owned(project, req, None).await
    }

    /// Deletes the root volumes made for VMs that no longer exist (a VM's
    /// deletion finishes on its agent; its volume goes after). Returns how
    /// many deletions it requested.
    /// (Root volumes younger than [`ORPHAN_GRACE`] are left alone: their
    /// VM may still be being created.)
    pub async fn delete_orphaned_root_volumes(&self) -> ApiResult<usize> {
        let (specs, _) = self
            .store
            .list_json::<VolumeSpec>(keys::VOLUME_SPECS)
            .await?;
        let mut deleted = 0;
        for (spec, _) in specs {
            let Some(owner) = &spec.owner else { continue };
            // A VM being created makes its root volume first and waits for
            // it: that is not an orphan yet.
            let young = (chrono::Utc::now() - spec.created_at)
                .to_std()
                .map_or(true, |age| age < ORPHAN_GRACE);
            if spec.deleting
                || young
                || self
                    .store
                    .get(&keys::instance_spec(&InstanceRef::new(
                        spec.project.clone(),
                        owner.clone(),
                    )))
                    .await?
                    .is_some()
            {
                continue;
            }
            match self.delete_volume(&spec.project, spec.name.as_str()).await {
                Ok(_) => {
                    info!(volume = %spec.name, vm = %owner, "deleting the root volume of a deleted VM");
                    deleted += 1;
                }
                Err(e) => {
                    debug!(volume = %spec.name, error = %e.message, "cannot delete an orphaned root volume yet")
                }
            }
        }
        Ok(deleted)
    }

    /// Creates a volume, owned by instance `owner` if given (deleted with
    /// it), and waits until it is available.
    pub(crate) async fn create_volume_owned(
        &self,
        project: &ProjectName,
        req: CreateVolumeRequest,
        owner: Option<InstanceName>,
    ) -> ApiResult<Volume> {
        let name = VolumeName::new(req.name.clone())?;
        let vref = VolumeRef::new(project.clone(), name.clone());
        let size = validate_size("size_bytes", req.size_bytes)?;
        let replicas = req.replicas.unwrap_or(DEFAULT_REPLICAS);
        let min_in_sync = req.min_in_sync.unwrap_or(1);
        validate_replicas(replicas, min_in_sync)?;
        let spec = {
            let _placing = self.placement.lock().await;
            if self.store.get(&keys::volume_spec(&vref)).await?.is_some() {
                return Err(ApiError::already_exists(format!(
                    "volume \"{name}\" already exists"
                )));
            }
            let promised = self.promised_replica_disk(None).await?;
            let hosts = place_replicas(&self.inventory.hosts().await, replicas, size, &promised)?;
            let spec = VolumeSpec {
                name: name.clone(),
                project: project.clone(),
                id: VolumeId::random(),
                size_bytes: size,
                replicas,
                min_in_sync,
                hosts,
                deleting: false,
                generation: 1,
                created_at: Utc::now(),
                owner,
            };
            let compares = vec![Compare::Absent(keys::volume_spec(&vref))];
            let ops = vec![
                put_json(keys::volume_spec(&vref), &spec),
                put_json(keys::volume_status(&vref), &VolumeStatus::creating()),
                crate::events::op(Event::volume(
                    EventKind::Created,
                    &spec,
                    format!(
                        "created: {}, {} replica(s)",
                        size_text(spec.size_bytes),
                        spec.replicas
                    ),
                )),
            ];
            let more = Usage {
                volumes: 1,
                volume_gib: size.div_ceil(1 << 30),
                ..Usage::default()
            };
            // Placement is serialized on this server; another server's
            // create in the same project makes the guard fail: count again.
            let mut committed = false;
            for _ in 0..QUOTA_ATTEMPTS {
                let mut c = compares.clone();
                let mut o = ops.clone();
                self.quota_guard(project, &more)
                    .await?
                    .add_to(&mut c, &mut o);
                if self.store.txn(c, o).await?.succeeded {
                    committed = true;
                    break;
                }
                if self.store.get(&keys::volume_spec(&vref)).await?.is_some() {
                    return Err(ApiError::already_exists(format!(
                        "volume \"{name}\" already exists"
                    )));
                }
            }
            if !committed {
                return Err(ApiError::unavailable(
                    "too many concurrent creates in this project; retry",
                ));
            }
            spec
        };
        info!(volume = %name, size, replicas, hosts = ?spec.hosts, "volume requested");
        let status = self
            .wait_for_status(&vref, |s| s.phase == VolumePhase::Available)
            .await?;
        if let Some(s) = status
            && s.phase == VolumePhase::Failed
        {
            // Nothing half-created: the controller removed the replicas it made.
            if let Some((failed, rev)) = self
                .store
                .get_json::<VolumeSpec>(&keys::volume_spec(&vref))
                .await?
            {
                self.store
                    .txn(
                        vec![Compare::ModRevision(keys::volume_spec(&vref), rev)],
                        vec![
                            Op::Delete(keys::volume_spec(&vref)),
                            Op::Delete(keys::volume_status(&vref)),
                            crate::events::op(Event::volume(
                                EventKind::Deleted,
                                &failed,
                                "removed: it could not be created",
                            )),
                        ],
                    )
                    .await?;
            }
            return Err(ApiError::unavailable(format!(
                "volume \"{name}\" could not be created: {}",
                s.message.unwrap_or_else(|| "no reason given".into())
            )));
        }
        self.volume_view(spec).await
    }

    /// Grows a volume that no running VM uses.
    pub async fn grow_volume(
        &self,
        project: &ProjectName,
        name: &str,
        req: GrowVolumeRequest,
    ) -> ApiResult<Volume> {
        let name = VolumeName::new(name)?;
        let vref = VolumeRef::new(project.clone(), name.clone());
        let size = validate_size("size_bytes", req.size_bytes)?;
        let _placing = self.placement.lock().await;
        let (spec, rev) = self.volume_spec(&vref).await?;
        if spec.deleting {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is being deleted"
            )));
        }
        if size <= spec.size_bytes {
            // A valid size that the volume's present size rules out: a
            // conflict with its state, not a malformed request.
            let mut e = ApiError::conflict(format!(
                "size_bytes {} is not larger than the volume's {}; volumes only grow",
                size_text(size),
                size_text(spec.size_bytes)
            ));
            e.field = Some("size_bytes".into());
            return Err(e);
        }
        let status = self
            .store
            .get_json::<VolumeStatus>(&keys::volume_status(&vref))
            .await?
            .map(|(s, _)| s);
        if !status
            .as_ref()
            .is_some_and(|s| matches!(s.phase, VolumePhase::Available | VolumePhase::Growing))
        {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is {}; it can grow once available",
                status.map_or("creating".into(), |s| s.phase.to_string())
            )));
        }
        if let Some((claim, _)) = self
            .store
            .get_json::<VolumeAttachment>(&keys::volume_attachment(&vref))
            .await?
            && let Some(inst) = self
                .inventory
                .instance_full(&InstanceRef::new(project.clone(), claim.instance.clone()))
                .await
            && running_or_starting(&inst.status, &inst.spec)
        {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is attached to VM \"{}\", which is {}; stop it first (a running VM cannot see its disk grow)",
                claim.instance, inst.status.phase
            )));
        }
        let promised = self.promised_replica_disk(Some(&vref)).await?;
        let hosts = self.inventory.hosts().await;
        for h in &spec.hosts {
            let Some(entry) = hosts.iter().find(|e| &e.host.name == h) else {
                return Err(ApiError::unavailable(format!(
                    "host {h} holding a replica of volume \"{name}\" is not registered"
                )));
            };
            if !entry.alive {
                return Err(ApiError::unavailable(format!(
                    "host {h} holding a replica of volume \"{name}\" is unreachable; a volume grows only with every replica reachable"
                )));
            }
            let extra = promised.get(h).copied().unwrap_or(0);
            // Cordoned hosts keep their replicas; only room matters here.
            let mut ready = entry.clone();
            ready.admin_state = None;
            if let Some(why) = replica_filter(&ready, size, extra) {
                return Err(ApiError::insufficient_capacity(format!(
                    "host {h} cannot hold volume \"{name}\" at {}: {why}",
                    size_text(size)
                )));
            }
        }
        let mut grown = spec.clone();
        grown.size_bytes = size;
        grown.generation += 1;
        let out = self
            .store
            .txn(
                vec![Compare::ModRevision(keys::volume_spec(&vref), rev)],
                vec![
                    put_json(keys::volume_spec(&vref), &grown),
                    crate::events::op(Event::volume(
                        EventKind::Resized,
                        &grown,
                        format!(
                            "grown from {} to {}",
                            size_text(spec.size_bytes),
                            size_text(size)
                        ),
                    )),
                ],
            )
            .await?;
        if !out.succeeded {
            return Err(ApiError::unavailable(format!(
                "volume \"{name}\" changed meanwhile; retry"
            )));
        }
        drop(_placing);
        self.wait_for_status(&vref, |s| {
            s.phase == VolumePhase::Available && s.size_bytes >= size
        })
        .await?;
        self.volume_view(grown).await
    }

    /// Marks a volume for deletion (its controller removes the replicas,
    /// its snapshots and the records). Refused while a VM uses it.
    pub async fn delete_volume(&self, project: &ProjectName, name: &str) -> ApiResult<Volume> {
        let name = VolumeName::new(name)?;
        let vref = VolumeRef::new(project.clone(), name.clone());
        for _ in 0..16 {
            let (mut spec, rev) = self.volume_spec(&vref).await?;
            let claim_key = keys::volume_attachment(&vref);
            if let Some((claim, _)) = self.store.get_json::<VolumeAttachment>(&claim_key).await? {
                return Err(ApiError::conflict(format!(
                    "volume \"{name}\" is attached to VM \"{}\"; detach it (or delete the VM) first",
                    claim.instance
                )));
            }
            if spec.deleting {
                return self.volume_view(spec).await;
            }
            let has_replicas = self
                .store
                .get(&keys::volume_membership(&spec.id.data_id()))
                .await?
                .is_some();
            let status = self
                .store
                .get_json::<VolumeStatus>(&keys::volume_status(&vref))
                .await?
                .map(|(s, _)| s);
            let view_before = spec.clone();
            let deleted = crate::events::op(Event::volume(
                EventKind::Deleted,
                &spec,
                "deletion requested",
            ));
            let ops = if !has_replicas && status.is_some_and(|s| s.phase == VolumePhase::Failed) {
                // Never created: nothing on any host to remove.
                vec![
                    Op::Delete(keys::volume_spec(&vref)),
                    Op::Delete(keys::volume_status(&vref)),
                    deleted,
                ]
            } else {
                spec.deleting = true;
                spec.generation += 1;
                vec![put_json(keys::volume_spec(&vref), &spec), deleted]
            };
            let out = self
                .store
                .txn(
                    vec![
                        Compare::ModRevision(keys::volume_spec(&vref), rev),
                        Compare::Absent(claim_key),
                    ],
                    ops,
                )
                .await?;
            if out.succeeded {
                info!(volume = %name, "volume deletion requested");
                let mut v = self.volume_view(view_before).await?;
                v.spec.deleting = true;
                return Ok(v);
            }
        }
        Err(ApiError::unavailable(format!(
            "volume \"{name}\" is changing too fast; retry"
        )))
    }

    /// Resolves and checks the volumes of an instance create request.
    pub(crate) async fn instance_volumes(
        &self,
        project: &ProjectName,
        req: &CreateInstanceRequest,
        image: &Image,
    ) -> ApiResult<Vec<ResolvedVolume>> {
        let mut wanted: Vec<(String, bool)> = vec![];
        if let Some(r) = &req.root_volume {
            if req.disk_gib.is_some() {
                return Err(ApiError::from(skyvisor_core::ValidationError::new(
                    "disk_gib",
                    "a VM booting from a root volume has no local disk; omit disk_gib",
                )));
            }
            wanted.push((r.clone(), true));
        }
        wanted.extend(req.volumes.iter().map(|v| (v.clone(), false)));
        if wanted.len() > MAX_VOLUMES_PER_INSTANCE {
            return Err(ApiError::from(skyvisor_core::ValidationError::new(
                "volumes",
                format!("a VM may use at most {MAX_VOLUMES_PER_INSTANCE} volumes"),
            )));
        }
        let mut out: Vec<ResolvedVolume> = vec![];
        for (v, root) in wanted {
            let name = VolumeName::new(v)?;
            if out.iter().any(|r| r.volume.name == name) {
                return Err(ApiError::from(skyvisor_core::ValidationError::new(
                    "volumes",
                    format!("volume {name} is given twice"),
                )));
            }
            let (spec, rev) = self
                .usable_volume(&VolumeRef::new(project.clone(), name.clone()))
                .await?;
            // A blank root volume is filled with an image's disk on the
            // first start: it must hold it.
            if root
                && image.kind == ImageKind::Disk
                && let Some(disk) = image.file(skyvisor_core::image::FileRole::Disk)
                && let Some(need) = disk.virtual_size_bytes
                && spec.size_bytes < need
            {
                return Err(ApiError::from(skyvisor_core::ValidationError::new(
                    "root_volume",
                    format!(
                        "volume {name} holds {} bytes; image {}'s disk needs {need}: grow it (`skyvisor volume grow`) or use a bigger one",
                        spec.size_bytes, image.name
                    ),
                )));
            }
            out.push(ResolvedVolume {
                volume: InstanceVolume {
                    name,
                    id: spec.id,
                    root,
                },
                spec,
                rev,
            });
        }
        Ok(out)
    }

    /// Fails if `v` was claimed or changed since it was resolved.
    pub(crate) async fn instance_volumes_still_free(&self, v: &ResolvedVolume) -> ApiResult<()> {
        let (_, rev) = self.usable_volume(&v.spec.volume_ref()).await?;
        if rev != v.rev {
            return Err(ApiError::unavailable(format!(
                "volume \"{}\" changed meanwhile; retry",
                v.volume.name
            )));
        }
        Ok(())
    }

    /// A volume that exists, is available and no VM uses.
    async fn usable_volume(&self, vref: &VolumeRef) -> ApiResult<(VolumeSpec, i64)> {
        let (spec, rev) = self.volume_spec(vref).await?;
        let name = &vref.name;
        if spec.deleting {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is being deleted"
            )));
        }
        let phase = self
            .store
            .get_json::<VolumeStatus>(&keys::volume_status(vref))
            .await?
            .map(|(s, _)| s.phase);
        if phase != Some(VolumePhase::Available) {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is {}; wait until it is available",
                phase.map_or("creating".into(), |p| p.to_string())
            )));
        }
        if let Some((claim, _)) = self
            .store
            .get_json::<VolumeAttachment>(&keys::volume_attachment(vref))
            .await?
        {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is already attached to VM \"{}\"; a volume is used read-write by one VM at a time",
                claim.instance
            )));
        }
        Ok((spec, rev))
    }

    /// The host for a new VM using `volumes`: among hosts that serve
    /// volumes, one holding a replica of its first volume if one fits (its
    /// reads stay local), else any.
    pub(crate) fn place_with_volumes(
        &self,
        hosts: &[HostEntry],
        req: PlacementRequest,
        volumes: &[ResolvedVolume],
    ) -> Result<HostName, PlacementError> {
        if volumes.is_empty() {
            return scheduler::place(hosts, &req, self.config.weigher);
        }
        let serving: Vec<HostEntry> = hosts
            .iter()
            .filter(|h| h.host.replica_addr.is_some())
            .cloned()
            .collect();
        if serving.is_empty() {
            return Err(PlacementError::NoFit(
                hosts
                    .iter()
                    .map(|h| (h.host.name.clone(), "serves no volumes".into()))
                    .collect(),
            ));
        }
        // Prefer a host that holds a replica of the first volume (reads
        // stay local), in the volume's host order.
        for preferred in &volumes[0].spec.hosts {
            if req.only.as_ref().is_some_and(|o| o != preferred) {
                continue;
            }
            let mut r = req.clone();
            r.only = Some(preferred.clone());
            if let Ok(h) = scheduler::place(&serving, &r, self.config.weigher) {
                return Ok(h);
            }
        }
        scheduler::place(&serving, &req, self.config.weigher)
    }

    async fn instance_spec_rev(&self, iref: &InstanceRef) -> ApiResult<(InstanceSpec, i64)> {
        let name = &iref.name;
        let Some((spec, rev)) = self
            .store
            .get_json::<InstanceSpec>(&keys::instance_spec(iref))
            .await?
        else {
            return Err(ApiError::not_found(format!(
                "instance \"{name}\" not found"
            )));
        };
        if spec.deleting {
            return Err(ApiError::conflict(format!(
                "instance \"{name}\" is being deleted"
            )));
        }
        Ok((spec, rev))
    }

    /// The instance's stored status (pending if it has none yet).
    pub(crate) async fn instance_status(&self, name: &InstanceRef) -> ApiResult<InstanceStatus> {
        Ok(self
            .store
            .get_json::<InstanceStatus>(&keys::instance_status(name))
            .await?
            .map(|(s, _)| s)
            .unwrap_or_else(InstanceStatus::pending))
    }

    /// Attaches a volume to a VM; a running VM gets it hot-plugged.
    pub async fn attach_volume(
        &self,
        project: &ProjectName,
        instance: &str,
        volume: &str,
    ) -> ApiResult<Instance> {
        let iname = InstanceName::new(instance)?;
        let iref = InstanceRef::new(project.clone(), iname.clone());
        let vname = VolumeName::new(volume)?;
        let vref = VolumeRef::new(project.clone(), vname.clone());
        for _ in 0..16 {
            let (mut spec, rev) = self.instance_spec_rev(&iref).await?;
            if spec.volumes.iter().any(|v| v.name == vname) {
                return Err(ApiError::conflict(format!(
                    "volume \"{vname}\" is already attached to VM \"{iname}\""
                )));
            }
            if spec.volumes.len() >= MAX_VOLUMES_PER_INSTANCE {
                return Err(ApiError::from(skyvisor_core::ValidationError::new(
                    "volume",
                    format!(
                        "VM {iname} already uses {MAX_VOLUMES_PER_INSTANCE} volumes, the most a VM may"
                    ),
                )));
            }
            let host_serves = self
                .inventory
                .host(&spec.host)
                .await
                .is_some_and(|h| h.host.replica_addr.is_some());
            if !host_serves {
                return Err(ApiError::conflict(format!(
                    "host {} of VM \"{iname}\" serves no volumes",
                    spec.host
                )));
            }
            // A claim of this same VM still being released (a detach just
            // before) may be taken over; any other claim refuses.
            let claim_key = keys::volume_attachment(&vref);
            let own_claim = match self.store.get_json::<VolumeAttachment>(&claim_key).await? {
                Some((c, crev)) if c.instance_id == spec.id => Some(crev),
                _ => None,
            };
            let (vspec, vrev) = match own_claim {
                Some(_) => self.volume_spec(&vref).await?,
                None => self.usable_volume(&vref).await?,
            };
            let resolved = ResolvedVolume {
                volume: InstanceVolume {
                    name: vname.clone(),
                    id: vspec.id,
                    root: false,
                },
                spec: vspec,
                rev: vrev,
            };
            spec.volumes.push(resolved.volume.clone());
            spec.generation += 1;
            let (mut compares, ops) = match own_claim {
                Some(crev) => (
                    vec![
                        Compare::ModRevision(keys::volume_spec(&vref), vrev),
                        Compare::ModRevision(claim_key.clone(), crev),
                    ],
                    vec![],
                ),
                None => resolved.claim(&spec),
            };
            compares.push(Compare::ModRevision(keys::instance_spec(&iref), rev));
            let mut ops = ops;
            ops.extend(crate::instances::spec_ops(&spec));
            let out = self.store.txn(compares, ops).await?;
            if out.succeeded {
                self.inventory
                    .wait_for(out.revision, READ_YOUR_WRITES)
                    .await;
                info!(instance = %iname, volume = %vname, "volume attached");
                let status = self.instance_status(&iref).await?;
                return Ok(Instance {
                    spec,
                    status,
                    protection: None,
                });
            }
        }
        Err(ApiError::unavailable(format!(
            "instance \"{iname}\" is changing too fast; retry"
        )))
    }

    /// Detaches a data volume from a VM. A running VM's agent unplugs it
    /// (the guest must release it) and then frees the volume; a stopped
    /// VM's agent frees it at once.
    pub async fn detach_volume(
        &self,
        project: &ProjectName,
        instance: &str,
        volume: &str,
    ) -> ApiResult<Instance> {
        let iname = InstanceName::new(instance)?;
        let iref = InstanceRef::new(project.clone(), iname.clone());
        let vname = VolumeName::new(volume)?;
        for _ in 0..16 {
            let (mut spec, rev) = self.instance_spec_rev(&iref).await?;
            let Some(v) = spec.volumes.iter().find(|v| v.name == vname).cloned() else {
                return Err(ApiError::not_found(format!(
                    "volume \"{vname}\" is not attached to VM \"{iname}\""
                )));
            };
            if v.root {
                let status = self.instance_status(&iref).await?;
                let state = if running_or_starting(&status, &spec) {
                    format!(", which is {}", status.phase)
                } else {
                    String::new()
                };
                return Err(ApiError::conflict(format!(
                    "volume \"{vname}\" is the root disk of VM \"{iname}\"{state}; a VM cannot lose its root disk: delete the VM (its volumes are kept) to free it"
                )));
            }
            spec.volumes.retain(|x| x.name != vname);
            spec.generation += 1;
            let out = self
                .store
                .txn(
                    vec![Compare::ModRevision(keys::instance_spec(&iref), rev)],
                    crate::instances::spec_ops(&spec),
                )
                .await?;
            if out.succeeded {
                self.inventory
                    .wait_for(out.revision, READ_YOUR_WRITES)
                    .await;
                info!(instance = %iname, volume = %vname, "volume detach requested");
                let status = self.instance_status(&iref).await?;
                return Ok(Instance {
                    spec,
                    status,
                    protection: None,
                });
            }
        }
        Err(ApiError::unavailable(format!(
            "instance \"{iname}\" is changing too fast; retry"
        )))
    }

    /// The snapshots of a volume.
    pub async fn volume_snapshots(
        &self,
        project: &ProjectName,
        name: &str,
    ) -> ApiResult<Vec<VolumeSnapshot>> {
        let vref = VolumeRef::new(project.clone(), VolumeName::new(name)?);
        self.volume_spec(&vref).await?;
        let (list, _) = self
            .store
            .list_json::<VolumeSnapshot>(&keys::volume_snapshots(&vref))
            .await?;
        Ok(list.into_iter().map(|(s, _)| s).collect())
    }

    /// The agent URL of the host that should act on a volume: the one
    /// serving it if any, else its controller (first live replica host).
    async fn acting_agent(&self, spec: &VolumeSpec) -> ApiResult<(HostName, String)> {
        let alive = self.alive_hosts().await;
        let serving = self
            .store
            .get_json::<MembershipView>(&keys::volume_membership(&spec.id.data_id()))
            .await?
            .and_then(|(m, _)| m.primary)
            .and_then(|p| HostName::new(p).ok())
            .filter(|h| alive.contains(h));
        let host = match serving.or_else(|| spec.controller(|h| alive.contains(h)).cloned()) {
            Some(h) => h,
            None => {
                return Err(ApiError::unavailable(format!(
                    "no host holding volume \"{}\" is reachable",
                    spec.name
                )));
            }
        };
        let url = self
            .inventory
            .host(&host)
            .await
            .and_then(|h| h.host.agent_url.clone())
            .ok_or_else(|| ApiError::unavailable(format!("host {host} has no agent endpoint")))?;
        Ok((host, url))
    }

    async fn agent_error(host: &HostName, resp: reqwest::Response) -> ApiError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        match status {
            StatusCode::CONFLICT => ApiError::conflict(message),
            StatusCode::BAD_REQUEST => ApiError::invalid(message),
            StatusCode::SERVICE_UNAVAILABLE => ApiError::unavailable(message),
            _ => ApiError::bad_gateway(format!("host {host} answered {status}: {message}")),
        }
    }

    /// Takes a snapshot of a volume: file-system consistent when the VM
    /// using it runs with a guest agent, else crash-consistent.
    pub async fn create_volume_snapshot(
        &self,
        project: &ProjectName,
        name: &str,
        req: CreateVolumeSnapshotRequest,
    ) -> ApiResult<VolumeSnapshot> {
        let name = VolumeName::new(name)?;
        let vref = VolumeRef::new(project.clone(), name.clone());
        validate_snapshot_name(&req.name)?;
        let (spec, _) = self.volume_spec(&vref).await?;
        if spec.deleting {
            return Err(ApiError::conflict(format!(
                "volume \"{name}\" is being deleted"
            )));
        }
        if self
            .store
            .get(&keys::volume_snapshot(&vref, &req.name))
            .await?
            .is_some()
        {
            return Err(ApiError::already_exists(format!(
                "volume \"{name}\" already has a snapshot \"{}\"",
                req.name
            )));
        }
        let (host, url) = self.acting_agent(&spec).await?;
        // The VM using it, whose file systems its host freezes if it can.
        let instance = self
            .store
            .get_json::<VolumeAttachment>(&keys::volume_attachment(&vref))
            .await?
            .map(|(claim, _)| claim.instance_id);
        let resp = self
            .http
            .post(format!("{url}/agent/v1/volumes/{project}/{name}/snapshots"))
            .json(&serde_json::json!({"id": spec.id, "snapshot": req.name, "instance": instance}))
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("host {host} unreachable: {e}")))?;
        if !resp.status().is_success() {
            return Err(Self::agent_error(&host, resp).await);
        }
        resp.json::<VolumeSnapshot>()
            .await
            .map_err(|e| ApiError::bad_gateway(format!("host {host} sent a bad snapshot: {e}")))
    }

    /// Deletes a snapshot of a volume.
    pub async fn delete_volume_snapshot(
        &self,
        project: &ProjectName,
        name: &str,
        snapshot: &str,
    ) -> ApiResult<()> {
        let name = VolumeName::new(name)?;
        let vref = VolumeRef::new(project.clone(), name.clone());
        validate_snapshot_name(snapshot)?;
        let (spec, _) = self.volume_spec(&vref).await?;
        if self
            .store
            .get(&keys::volume_snapshot(&vref, snapshot))
            .await?
            .is_none()
        {
            return Err(ApiError::not_found(format!(
                "volume \"{name}\" has no snapshot \"{snapshot}\""
            )));
        }
        let (host, url) = self.acting_agent(&spec).await?;
        let resp = self
            .http
            .delete(format!(
                "{url}/agent/v1/volumes/{project}/{name}/snapshots/{snapshot}"
            ))
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("host {host} unreachable: {e}")))?;
        if !resp.status().is_success() {
            return Err(Self::agent_error(&host, resp).await);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::host;

    fn with_replicas(mut h: HostEntry) -> HostEntry {
        std::sync::Arc::make_mut(&mut h.host).replica_addr = Some("127.0.0.1:7781".into());
        h
    }

    #[test]
    fn replicas_go_to_distinct_hosts_with_room() {
        let hosts = vec![
            with_replicas(host("a", 4, 4096)),
            with_replicas(host("b", 4, 4096)),
            with_replicas(host("c", 4, 4096)),
        ];
        let mut promised = HashMap::new();
        promised.insert(HostName::new("a").expect("host"), 90);
        let chosen = place_replicas(&hosts, 2, 10 * GIB, &promised).expect("fits");
        assert_eq!(chosen.len(), 2);
        assert!(!chosen.iter().any(|h| h.as_str() == "a"), "{chosen:?}");
        assert_ne!(chosen[0], chosen[1]);
    }

    #[test]
    fn refusals_say_why() {
        let one = vec![with_replicas(host("a", 4, 4096))];
        let e = place_replicas(&one, 3, GIB, &HashMap::new()).expect_err("too few hosts");
        assert!(
            e.message.contains("3 replicas need 3 hosts"),
            "{}",
            e.message
        );
        assert!(e.message.contains("the pool has 1 (a)"), "{}", e.message);
        let e = place_replicas(&one, 1, 1 << 40, &HashMap::new()).expect_err("too large");
        assert!(e.message.contains("GiB disk free"), "{}", e.message);
        let bare = vec![host("a", 4, 4096)];
        let e = place_replicas(&bare, 1, GIB, &HashMap::new()).expect_err("no server");
        assert!(
            e.message.contains("runs no replica server"),
            "{}",
            e.message
        );
    }
}
