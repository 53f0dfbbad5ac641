//! Instance operations: validate a request, place it, write desired state.

use skyvisor_core::ProjectName;
use skyvisor_core::auth::Usage;
use skyvisor_core::{Event, EventKind, InstanceKind};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use skyvisor_core::api::{CreateInstanceRequest, ResizeInstanceRequest, StopInstanceRequest};
use skyvisor_core::cluster::AllocMark;
use skyvisor_core::group::GroupMembership;
use skyvisor_core::image::ImageState;
use skyvisor_core::resources::{builtin_types, find_type};
use skyvisor_core::{
    GroupName, HaPolicy, HostName, Image, ImageName, Instance, InstanceId, InstanceName,
    InstancePhase, InstanceRef, InstanceSpec, InstanceStatus, InstanceType, MacAddr,
    NetworkAttachment, PowerState, Resources, Scoped, ValidationError, VolumeName, keys,
};
use skyvisor_store::{Compare, Op, StoreExt, put_json};
use tracing::{debug, info};

use crate::error::{ApiError, ApiResult};
use crate::inventory::HostEntry;
use crate::scheduler::{self, PlacementRequest, SpreadConstraint};
use crate::volumes::ResolvedVolume;
use crate::{ControlPlane, READ_YOUR_WRITES};

/// How many times a change to one instance (update, resize, delete) is
/// retried after another writer changed it or its host in between.
const MAX_ATTEMPTS: usize = 16;
/// How long a create keeps deciding again while other writers win the
/// race for the hosts it chose. A time, not a count of tries: a server
/// whose view lags another's can lose dozens of races in a few
/// milliseconds, and each lost race means another create made progress.
const PLACEMENT_PATIENCE: Duration = Duration::from_secs(15);
/// The longest pause after a lost race (the pause is random up to a bound
/// that doubles with each loss), so that two servers stop colliding.
const MAX_PLACEMENT_BACKOFF: Duration = Duration::from_millis(64);

/// The writes that store `spec`: the spec and its copy under its host.
pub fn spec_ops(spec: &InstanceSpec) -> Vec<Op> {
    vec![
        put_json(keys::instance_spec(&spec.instance_ref()), spec),
        put_json(keys::binding(&spec.host, &spec.instance_ref()), spec),
    ]
}

/// Refuses changes to an instance that is migrating.
pub(crate) fn refuse_while_migrating(spec: &InstanceSpec) -> ApiResult<()> {
    match &spec.migration {
        Some(m) => Err(ApiError::conflict(format!(
            "instance \"{}\" is migrating to {} (migration {}); wait for it to finish or cancel it with `skyvisor vm migrate {} --cancel`",
            spec.name, m.destination, m.id, spec.name
        ))),
        None => Ok(()),
    }
}

/// Highest HA restart priority.
pub const MAX_HA_PRIORITY: u32 = 1000;

/// Default graceful stop timeout.
pub const DEFAULT_STOP_TIMEOUT_SECS: u32 = 30;
/// Longest graceful stop timeout accepted.
pub const MAX_STOP_TIMEOUT_SECS: u32 = 3600;

/// Resolves a type name and per-field overrides to a size.
pub(crate) fn resolve_size(
    instance_type: Option<&str>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    disk_gib: Option<u64>,
) -> Result<(Option<InstanceType>, Resources), ValidationError> {
    let base = match instance_type {
        Some(t) => Some(find_type(t)?),
        None => None,
    };
    let resources = match &base {
        Some(t) => Resources {
            vcpus: vcpus.unwrap_or(t.resources.vcpus),
            memory_mib: memory_mib.unwrap_or(t.resources.memory_mib),
            disk_gib: disk_gib.unwrap_or(t.resources.disk_gib),
        },
        None => match (vcpus, memory_mib) {
            (Some(vcpus), Some(memory_mib)) => Resources {
                vcpus,
                memory_mib,
                disk_gib: disk_gib.unwrap_or(2),
            },
            _ => {
                let names: Vec<String> =
                    builtin_types().iter().map(|t| t.name.to_string()).collect();
                return Err(ValidationError::new(
                    "instance type",
                    format!(
                        "give a type ({}) or both vcpus and memory_mib for a custom size",
                        names.join(", ")
                    ),
                ));
            }
        },
    };
    resources.validate_vm()?;
    Ok((base, resources))
}

/// A random pause after the `lost`-th lost placement race: up to 1 ms,
/// doubling with each loss, at most [`MAX_PLACEMENT_BACKOFF`].
fn placement_backoff(lost: u32) -> Duration {
    let bound =
        Duration::from_millis(1u64 << lost.saturating_sub(1).min(16)).min(MAX_PLACEMENT_BACKOFF);
    bound.mul_f64(rand::random::<f64>())
}

pub(crate) fn validate_stop_timeout(v: u32) -> Result<u32, ValidationError> {
    if v == 0 || v > MAX_STOP_TIMEOUT_SECS {
        return Err(ValidationError::new(
            "stop_timeout_secs",
            format!("{v} is out of range; allowed: 1 to {MAX_STOP_TIMEOUT_SECS}"),
        ));
    }
    Ok(v)
}

/// Replicas of a VM's root disk in a cluster unless the request says.
pub const DEFAULT_DISK_REPLICAS: u32 = 2;

impl ControlPlane {
    /// Image `name` as `project` finds it (its own, else a public one; see
    /// [`skyvisor_core::image::resolve`]), or a 404 that lists the images
    /// the project may use.
    pub async fn image(&self, project: &ProjectName, name: &ImageName) -> ApiResult<Image> {
        // The project's own image is one read; only a public one (or a
        // 404) needs the listing.
        let own = skyvisor_core::ImageRef::new(project.clone(), name.clone());
        if let Some((image, _)) = self.store.get_json::<Image>(&keys::image(&own)).await? {
            return Ok(image);
        }
        let all = self.images().await?;
        match skyvisor_core::image::resolve(&all, project, name) {
            Some(image) => Ok(image.clone()),
            None => {
                let names: Vec<String> = all
                    .iter()
                    .filter(|i| i.public || &i.project == project)
                    .map(|i| i.name.to_string())
                    .collect();
                Err(ApiError::not_found(format!(
                    "image \"{name}\" not found; images: {}",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )))
            }
        }
    }

    /// Creates an instance: validates, places, allocates an address and
    /// writes spec, status and address claim in one transaction.
    pub async fn create_instance(
        &self,
        project: &ProjectName,
        req: CreateInstanceRequest,
    ) -> ApiResult<Instance> {
        self.create_instance_as(project, req, None).await
    }

    /// [`Self::create_instance`], for a member of an instance group when
    /// `membership` is given (placed apart from the group's other members
    /// where it can be).
    pub(crate) async fn create_instance_as(
        &self,
        project: &ProjectName,
        mut req: CreateInstanceRequest,
        membership: Option<GroupMembership>,
    ) -> ApiResult<Instance> {
        skyvisor_core::labels::validate_labels("labels", &req.labels)?;
        crate::containers::check_request(&req)?;
        // Refused before anything is made (the create checks it again).
        self.guest_config(project, &req).await?;
        // In a cluster the root disk can be a replicated volume made for the
        // VM, so that it can run elsewhere when its host dies (a
        // container's root is its image under a writable layer).
        let made = if req.kind == Some(InstanceKind::Container) {
            None
        } else {
            self.make_root_volume(project, &mut req).await?
        };
        let created = self.create_instance_with(project, req, membership).await;
        if created.is_err()
            && let Some(volume) = made
        {
            // Nothing half-created: the volume made for it goes too.
            if let Err(e) = self.delete_volume(project, volume.as_str()).await {
                tracing::warn!(volume = %volume, error = %e.message, "cannot remove the root volume of a refused create");
            }
        }
        created
    }

    /// Makes the replicated root volume of a new VM in a cluster when asked
    /// (`disk_replicas`, for an image that boots a kernel), and points
    /// `req` at it. Returns its name.
    async fn make_root_volume(
        &self,
        project: &ProjectName,
        req: &mut CreateInstanceRequest,
    ) -> ApiResult<Option<VolumeName>> {
        let clustered = !self.config.cluster.etcd_endpoints.is_empty();
        let local = req.local_disk.unwrap_or(false);
        if let Some(n) = req.disk_replicas {
            if !clustered {
                // Valid input this server cannot serve: a conflict with
                // what it is, not a malformed request.
                let mut e = ApiError::conflict(
                    "a single host keeps VM disks local; disk_replicas needs a cluster",
                );
                e.field = Some("disk_replicas".into());
                return Err(e);
            }
            if local || req.root_volume.is_some() {
                return Err(ApiError::from(ValidationError::new(
                    "disk_replicas",
                    "disk_replicas sizes the root volume made for the VM; leave it out with local_disk or root_volume",
                )));
            }
            if !(1..=3).contains(&n) {
                return Err(ApiError::from(ValidationError::new(
                    "disk_replicas",
                    format!("{n} replicas; allowed: 1 to 3"),
                )));
            }
        }
        if local && req.root_volume.is_some() {
            return Err(ApiError::from(ValidationError::new(
                "local_disk",
                "a VM has either a local disk or a root volume, not both",
            )));
        }
        if local && req.ha == Some(HaPolicy::Restart) {
            return Err(ApiError::from(ValidationError::new(
                "ha",
                "ha restart needs a replicated root disk: a local disk cannot follow its VM to another host; leave out local_disk (the root disk then has 2 replicas)",
            )));
        }
        if !clustered || local || req.root_volume.is_some() {
            return Ok(None);
        }
        // A clone's disk is its snapshot's, on the snapshot's host.
        let clone = self.clone_source(project, req).await?.map(|(_, snap)| snap);
        // In a cluster the root disk is a replicated volume by default: 2
        // replicas when two hosts can hold them.
        let replicas = match req.disk_replicas {
            Some(n) => n,
            None => {
                let hosts = self.inventory.hosts().await;
                let ready = hosts
                    .iter()
                    .filter(|h| h.alive && h.state() == skyvisor_core::HostState::Ready)
                    .count();
                if ready < DEFAULT_DISK_REPLICAS as usize {
                    return Ok(None);
                }
                DEFAULT_DISK_REPLICAS
            }
        };
        let name = InstanceName::new(req.name.clone())?;
        if self
            .inventory
            .instance(&InstanceRef::new(project.clone(), name.clone()))
            .await
            .is_some()
        {
            return Err(ApiError::already_exists(format!(
                "instance \"{name}\" already exists"
            )));
        }
        let image_name = match &clone {
            Some(snap) => snap.image.clone(),
            None => ImageName::new(req.image.clone())?,
        };
        let image = self.image(project, &image_name).await?;
        let mut resources = match &clone {
            Some(snap) => {
                let mut r = snap.resources;
                if let Some(d) = req.disk_gib {
                    if d < r.disk_gib {
                        return Err(ApiError::from(ValidationError::new(
                            "disk_gib",
                            format!(
                                "{d} GiB cannot hold snapshot {}'s {} GiB disk; allowed: at least {} GiB",
                                snap.name, r.disk_gib, r.disk_gib
                            ),
                        )));
                    }
                    r.disk_gib = d;
                }
                r
            }
            None => {
                resolve_size(
                    req.instance_type.as_deref(),
                    req.vcpus,
                    req.memory_mib,
                    req.disk_gib,
                )?
                .1
            }
        };
        // An image that boots its own disk fills the volume, which must
        // hold it.
        if let Some(disk) = image.file(skyvisor_core::image::FileRole::Disk)
            && image.kind == skyvisor_core::ImageKind::Disk
        {
            let need = disk.virtual_size_bytes.unwrap_or(0).div_ceil(1 << 30);
            if req.disk_gib.is_some_and(|d| d < need) {
                return Err(ApiError::from(ValidationError::new(
                    "disk_gib",
                    format!(
                        "{} GiB is smaller than image {}'s disk; allowed: at least {need} GiB",
                        resources.disk_gib, image.name
                    ),
                )));
            }
            resources.disk_gib = resources.disk_gib.max(need);
        }
        // A VM that fits on no host, or that admission control would
        // refuse, is refused before its disk is made.
        if replicas >= 2 && req.ha != Some(HaPolicy::Off) && req.start.unwrap_or(true) {
            self.admit_protected(resources).await?;
        }
        let hosts = self.inventory.hosts().await;
        crate::scheduler::place(
            &hosts,
            &crate::scheduler::PlacementRequest {
                resources,
                accel: req.accel,
                only: clone.as_ref().map(|s| s.host.clone()),
                ..Default::default()
            },
            self.config.weigher,
        )?;
        let volume = VolumeName::new(format!("{name}-disk")).map_err(|_| {
            ApiError::from(ValidationError::new(
                "name",
                format!("the name is too long to name its root volume {name}-disk; give a shorter name, or a root volume"),
            ))
        })?;
        self.create_volume_owned(
            project,
            skyvisor_core::volume::CreateVolumeRequest {
                name: volume.to_string(),
                size_bytes: resources.disk_gib << 30,
                replicas: Some(replicas),
                min_in_sync: Some(1),
            },
            Some(name),
        )
        .await?;
        req.root_volume = Some(volume.to_string());
        req.disk_gib = None;
        Ok(Some(volume))
    }

    /// The snapshot a create clones (`from_snapshot`), if any, ready to use.
    async fn clone_source(
        &self,
        project: &ProjectName,
        req: &CreateInstanceRequest,
    ) -> ApiResult<Option<(skyvisor_core::CloneSource, skyvisor_core::Snapshot)>> {
        let Some(r) = &req.from_snapshot else {
            return Ok(None);
        };
        let src = skyvisor_core::snapshot::parse_snapshot_ref(r)?;
        let snap = self
            .snapshot(project, src.instance.as_str(), src.snapshot.as_str())
            .await?;
        crate::snapshots::check_ready(&snap)?;
        Ok(Some((src, snap)))
    }

    async fn create_instance_with(
        &self,
        project: &ProjectName,
        req: CreateInstanceRequest,
        membership: Option<GroupMembership>,
    ) -> ApiResult<Instance> {
        let name = InstanceName::new(req.name.clone())?;
        let iref = InstanceRef::new(project.clone(), name.clone());
        if let Some(s) = &req.checkpoint_schedule {
            s.validate()?;
        }
        // A clone takes its image, size and host from its snapshot.
        let clone = self.clone_source(project, &req).await?;
        let (image_name, (itype, resources)) = match &clone {
            Some((_, snap)) => {
                if !req.image.is_empty() {
                    return Err(ApiError::from(ValidationError::new(
                        "image",
                        format!(
                            "a clone runs its snapshot's image ({}); leave the image out",
                            snap.image
                        ),
                    )));
                }
                if req.instance_type.is_some() || req.vcpus.is_some() || req.memory_mib.is_some() {
                    return Err(ApiError::from(ValidationError::new(
                        "instance type",
                        "a clone has its snapshot's size; leave type, vcpus and memory out",
                    )));
                }
                let mut r = snap.resources;
                if let Some(d) = req.disk_gib {
                    r.disk_gib = d;
                }
                let t = snap
                    .instance_type
                    .as_ref()
                    .and_then(|t| find_type(t.as_str()).ok());
                (snap.image.clone(), (t, r))
            }
            None if req.image.is_empty() => {
                return Err(ApiError::from(ValidationError::new(
                    "image",
                    "missing field `image`: give the image to boot (or from_snapshot to clone)",
                )));
            }
            None => (
                ImageName::new(req.image.clone())?,
                resolve_size(
                    req.instance_type.as_deref(),
                    req.vcpus,
                    req.memory_mib,
                    req.disk_gib,
                )?,
            ),
        };
        let stop_timeout_secs =
            validate_stop_timeout(req.stop_timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS))?;
        let image = self.image(project, &image_name).await?;
        match image.state {
            ImageState::Ready => {}
            ImageState::Building => {
                return Err(ApiError::conflict(format!(
                    "image \"{image_name}\" is still being built; wait until `skyvisor image show {image_name}` says ready"
                )));
            }
            ImageState::Failed => {
                return Err(ApiError::conflict(format!(
                    "image \"{image_name}\" failed to build: {}",
                    image.message.unwrap_or_default()
                )));
            }
        }
        let kind = req.kind.unwrap_or_default();
        crate::containers::check_image(kind, &image)?;
        if let Some(disk) = image.file(skyvisor_core::image::FileRole::Disk)
            && req.root_volume.is_none()
        {
            let need = disk.virtual_size_bytes.unwrap_or(0).div_ceil(1 << 30);
            if resources.disk_gib < need {
                return Err(ApiError::from(ValidationError::new(
                    "disk_gib",
                    format!(
                        "{} GiB is smaller than image {image_name}'s disk; allowed: at least {need} GiB",
                        resources.disk_gib
                    ),
                )));
            }
        }
        let volumes = self.instance_volumes(project, &req, &image).await?;
        let mut resources = resources;
        if let Some(root) = volumes.iter().find(|v| v.volume.root) {
            // No local disk: the VM's disk is its root volume.
            resources.disk_gib = root.spec.size_bytes.div_ceil(1 << 30).max(1);
        }
        let (ha, ha_priority) = self.ha_settings(&req, &volumes, kind)?;
        if ha == HaPolicy::Restart && req.start.unwrap_or(true) {
            self.admit_protected(resources).await?;
        }
        self.check_security_groups(project, &req.security_groups)
            .await?;
        let mut guest = self.guest_config(project, &req).await?;
        guest.ssh_user = image.ssh_user.clone();
        let network = self
            .network_for_instance(project, req.network.as_deref())
            .await?;
        let ipam_scope = skyvisor_core::network::ipam_scope(network.private_vni());
        let spread_group = req
            .spread_group
            .as_deref()
            .map(GroupName::new)
            .transpose()?;

        let id = InstanceId::random();
        let mut raced = HashSet::new();
        // A transaction fails when another writer (another server, or an
        // agent) changed what the decision was based on: the name, the
        // address, or the chosen host's allocation or state. Each retry
        // first lets the view catch up with that write.
        let deadline = Instant::now() + PLACEMENT_PATIENCE;
        let mut lost: u32 = 0;
        while Instant::now() < deadline {
            // Decisions are taken one at a time, on the view plus what this
            // server is still committing; the commits themselves overlap.
            let placing = self.placement.lock().await;
            if self.inventory.instance(&iref).await.is_some() || self.inflight.has_name(&iref) {
                return Err(ApiError::already_exists(format!(
                    "instance \"{name}\" already exists"
                )));
            }
            let started = Instant::now();
            // What is in flight first, then the view: see `inflight`.
            let flight = self.inflight.snapshot();
            let mut hosts = self.inventory.hosts().await;
            flight.adjust(&mut hosts);
            let spread = match &spread_group {
                Some(group) => {
                    let scoped = Scoped::new(project.clone(), group.clone());
                    let mut members = self.inventory.spread_members(&scoped).await;
                    flight.add_members(&scoped, &mut members);
                    Some(SpreadConstraint {
                        group: group.clone(),
                        members,
                    })
                }
                None => None,
            };
            let prefer_apart = match &membership {
                Some(m) => self.group_members_by_host(project, &m.group).await,
                None => HashMap::new(),
            };
            let host = self.place_with_volumes(
                &hosts,
                PlacementRequest {
                    resources,
                    accel: req.accel,
                    kind,
                    spread,
                    // A clone starts where its snapshot's files are.
                    only: clone.as_ref().map(|(_, s)| s.host.clone()),
                    prefer_apart,
                    ..Default::default()
                },
                &volumes,
            )?;
            self.metrics
                .placement_seconds
                .observe(started.elapsed().as_secs_f64());
            let Some(entry) = hosts.iter().find(|h| h.host.name == host) else {
                return Err(ApiError::internal(format!(
                    "placement chose host {host}, which is not in the inventory"
                )));
            };
            let (based_on, state_revision) = (entry.alloc_revision, entry.state_revision);
            let mut skip = flight.ips().clone();
            skip.extend(raced.iter().copied());
            let ip = self
                .inventory
                .next_free_ip(&ipam_scope, &network.subnet, &skip)
                .await
                .ok_or_else(|| {
                    ApiError::insufficient_capacity(format!(
                        "network {} ({}) has no free addresses",
                        network.name, network.subnet
                    ))
                })?;
            let (reservation, predecessor) =
                self.inflight
                    .reserve(&host, &iref, ip, resources, spread_group.clone());
            drop(placing);

            // The marker revision to compare with: the view's, or the one an
            // earlier commit to the same host from this server leaves.
            let (alloc_revision, chain) = match predecessor {
                None => (based_on, None),
                Some(p) => match p.committed(based_on).await {
                    Ok((r, chain)) => (r, Some(chain)),
                    Err(seen) => {
                        // An earlier commit to the host failed or saw more
                        // than this decision did: decide again on a view
                        // that has caught up.
                        reservation.failed(seen);
                        self.inflight.drained(&host).await;
                        self.inventory.wait_for(seen, READ_YOUR_WRITES).await;
                        continue;
                    }
                },
            };
            let spec = InstanceSpec {
                name: name.clone(),
                project: project.clone(),
                id,
                kind,
                image: image_name.clone(),
                instance_type: itype.as_ref().map(|t| t.name.clone()),
                resources,
                power: if req.start.unwrap_or(true) {
                    PowerState::Running
                } else {
                    PowerState::Stopped
                },
                restart_policy: req.restart_policy.unwrap_or_default(),
                host: host.clone(),
                network: NetworkAttachment {
                    network: network.name.clone(),
                    vni: network.private_vni(),
                    ip,
                    prefix_len: network.subnet.prefix_len,
                    gateway: network.subnet.gateway(),
                    mac: MacAddr::derived_from(id.0.as_bytes()),
                },
                reboot_generation: 0,
                stop_timeout_secs,
                force_stop: false,
                deleting: false,
                generation: 1,
                created_at: Utc::now(),
                restore: None,
                migration: None,
                clone_of: clone.as_ref().map(|(src, _)| src.clone()),
                checkpoint_schedule: req.checkpoint_schedule,
                spread_group: spread_group.clone(),
                group: membership.clone(),
                accel: req.accel,
                security_groups: req.security_groups.clone(),
                labels: req.labels.clone(),
                volumes: volumes.iter().map(|v| v.volume.clone()).collect(),
                ha,
                ha_priority,
                guest: guest.clone(),
            };
            let spec_key = keys::instance_spec(&iref);
            let claim_key = keys::ipam_claim(&ipam_scope, ip);
            let mut compares = vec![
                Compare::Absent(spec_key.clone()),
                Compare::Absent(claim_key.clone()),
                Compare::ModRevision(keys::host_alloc(&host), alloc_revision),
                Compare::ModRevision(keys::host_state(&host), state_revision),
            ];
            let mut ops = spec_ops(&spec);
            ops.push(put_json(
                keys::instance_status(&iref),
                &InstanceStatus::pending(),
            ));
            ops.push(put_json(claim_key.clone(), &iref));
            ops.push(self.alloc_mark(&host, &iref));
            ops.push(crate::events::op(Event::instance(
                EventKind::Created,
                &spec,
                format!("created on {host} with address {ip}"),
            )));
            for v in &volumes {
                let (c, o) = v.claim(&spec);
                compares.extend(c);
                ops.extend(o);
            }
            self.quota_guard(
                project,
                &Usage {
                    instances: 1,
                    vcpus: resources.vcpus,
                    memory_mib: resources.memory_mib,
                    ..Usage::default()
                },
            )
            .await?
            .add_to(&mut compares, &mut ops);
            let committing = Instant::now();
            let out = self.store.txn(compares, ops.clone()).await?;
            self.metrics
                .create_commit_seconds
                .observe(committing.elapsed().as_secs_f64());
            if out.succeeded {
                self.inventory.apply_committed(&ops, out.revision).await;
                reservation.committed(out.revision, based_on, chain.as_ref().map(|c| c.as_slice()));
                info!(instance = %name, %host, %ip, "instance created");
                return Ok(Instance {
                    spec,
                    status: InstanceStatus::pending(),
                    protection: None,
                });
            }
            reservation.failed(out.revision);
            if self.store.get(&spec_key).await?.is_some() {
                return Err(ApiError::already_exists(format!(
                    "instance \"{name}\" already exists"
                )));
            }
            // A volume claimed meanwhile refuses with its own reason.
            for v in &volumes {
                self.instance_volumes_still_free(v).await?;
            }
            if self.store.get(&claim_key).await?.is_some() {
                raced.insert(ip);
            }
            debug!(instance = %name, %host, "placement raced another writer; retrying");
            self.inventory
                .wait_for(out.revision, READ_YOUR_WRITES)
                .await;
            lost += 1;
            tokio::time::sleep(placement_backoff(lost)).await;
        }
        Err(ApiError::unavailable(
            "could not place the instance: the pool is changing too fast (too many concurrent creates); retry",
        ))
    }

    /// The HA policy and priority of a new instance: `restart` needs a
    /// replicated root disk (a local disk cannot follow its VM); in a
    /// cluster, a VM with one is protected unless asked otherwise.
    fn ha_settings(
        &self,
        req: &CreateInstanceRequest,
        volumes: &[ResolvedVolume],
        kind: InstanceKind,
    ) -> ApiResult<(HaPolicy, u32)> {
        let root = volumes.iter().find(|v| v.volume.root);
        let clustered = !self.config.cluster.etcd_endpoints.is_empty();
        let ha = match (req.ha, root) {
            // A container restarts elsewhere from its image (cold: its
            // writable layer stays with its host): protected in a cluster
            // unless asked otherwise.
            (ha, _) if kind == InstanceKind::Container => ha.unwrap_or(if clustered {
                HaPolicy::Restart
            } else {
                HaPolicy::Off
            }),
            // Whether the VM can be protected depends on the pool and its
            // volumes, not on the request's form: a conflict, not a 400.
            (Some(HaPolicy::Restart), None) => {
                let mut e = ApiError::conflict(
                    "ha restart needs a replicated root disk: a local disk cannot follow its VM to another host; \
                     give a root volume with 2 or more replicas (`skyvisor volume create NAME --size 4G --replicas 2`, then --root-volume NAME), or use --ha off",
                );
                e.field = Some("ha".into());
                return Err(e);
            }
            (Some(HaPolicy::Restart), Some(r)) if r.spec.replicas < 2 => {
                let mut e = ApiError::conflict(format!(
                    "ha restart needs a root volume with 2 or more replicas (on different hosts); volume {} has {}",
                    r.volume.name, r.spec.replicas
                ));
                e.field = Some("ha".into());
                return Err(e);
            }
            (Some(p), _) => p,
            (None, Some(r)) if clustered && r.spec.replicas >= 2 => HaPolicy::Restart,
            (None, _) => HaPolicy::Off,
        };
        let priority = req.ha_priority.unwrap_or(0);
        if priority > MAX_HA_PRIORITY {
            return Err(ApiError::from(ValidationError::new(
                "ha_priority",
                format!("{priority} is too high; allowed: 0 to {MAX_HA_PRIORITY}"),
            )));
        }
        Ok((ha, priority))
    }

    /// Comparisons that hold only while `host`'s allocation and state are
    /// what the view showed when it was chosen.
    pub(crate) fn host_guard(&self, host: &HostEntry) -> Vec<Compare> {
        vec![
            Compare::ModRevision(keys::host_alloc(&host.host.name), host.alloc_revision),
            Compare::ModRevision(keys::host_state(&host.host.name), host.state_revision),
        ]
    }

    /// Rewrites `host`'s allocation marker (see [`keys::host_alloc`]).
    pub(crate) fn alloc_mark(&self, host: &HostName, instance: &InstanceRef) -> Op {
        put_json(
            keys::host_alloc(host),
            &AllocMark {
                instance: instance.to_string(),
                server: self.config.cluster.name.to_string(),
            },
        )
    }

    /// One instance of `project`, or 404.
    pub async fn instance(&self, project: &ProjectName, name: &str) -> ApiResult<Instance> {
        let name = InstanceName::new(name)?;
        let mut inst = self
            .inventory
            .instance_full(&InstanceRef::new(project.clone(), name.clone()))
            .await
            .ok_or_else(|| ApiError::not_found(format!("instance \"{name}\" not found")))?;
        inst.protection = Some(self.protection(&inst.spec).await);
        Ok(inst)
    }

    /// All instances.
    pub async fn instances(&self) -> Vec<Instance> {
        self.inventory.instances_full().await
    }

    /// Applies `change` to the stored spec with compare-and-swap, retrying
    /// when an agent or another request wrote in between.
    pub(crate) async fn update_spec(
        &self,
        project: &ProjectName,
        name: &str,
        record: Option<EventKind>,
        change: impl Fn(&mut InstanceSpec, &InstanceStatus) -> ApiResult<()>,
    ) -> ApiResult<Instance> {
        let name = InstanceName::new(name)?;
        let iref = InstanceRef::new(project.clone(), name.clone());
        let key = keys::instance_spec(&iref);
        for _ in 0..16 {
            let Some((mut spec, rev)) = self.store.get_json::<InstanceSpec>(&key).await? else {
                return Err(ApiError::not_found(format!(
                    "instance \"{name}\" not found"
                )));
            };
            if spec.deleting {
                return Err(ApiError::conflict(format!(
                    "instance \"{name}\" is being deleted"
                )));
            }
            refuse_while_migrating(&spec)?;
            let status = self.instance_status(&iref).await?;
            change(&mut spec, &status)?;
            spec.generation += 1;
            let mut ops = spec_ops(&spec);
            if let Some(kind) = record {
                ops.push(crate::events::op(Event::instance(
                    kind,
                    &spec,
                    kind.to_string().replace('-', " "),
                )));
            }
            let out = self
                .store
                .txn(vec![Compare::ModRevision(key.clone(), rev)], ops)
                .await?;
            if out.succeeded {
                self.inventory
                    .wait_for(out.revision, READ_YOUR_WRITES)
                    .await;
                return Ok(Instance {
                    spec,
                    status,
                    protection: None,
                });
            }
        }
        Err(ApiError::unavailable(format!(
            "instance \"{name}\" is changing too fast; retry"
        )))
    }

    /// Asks for the instance to run.
    pub async fn start_instance(&self, project: &ProjectName, name: &str) -> ApiResult<Instance> {
        // A stopped protected VM counts against admission control again.
        if let Some(i) = self
            .inventory
            .instance(&InstanceRef::new(project.clone(), InstanceName::new(name)?))
            .await
            && i.ha == HaPolicy::Restart
            && i.power == PowerState::Stopped
        {
            self.admit_protected(i.resources).await?;
        }
        self.update_spec(project, name, Some(EventKind::StartRequested), |spec, _| {
            spec.power = PowerState::Running;
            spec.force_stop = false;
            Ok(())
        })
        .await
    }

    /// Asks for the instance to stop, gracefully unless forced.
    pub async fn stop_instance(
        &self,
        project: &ProjectName,
        name: &str,
        req: StopInstanceRequest,
    ) -> ApiResult<Instance> {
        let timeout = req.timeout_secs.map(validate_stop_timeout).transpose()?;
        self.update_spec(project, name, Some(EventKind::StopRequested), |spec, _| {
            spec.power = PowerState::Stopped;
            spec.force_stop = req.force;
            if let Some(t) = timeout {
                spec.stop_timeout_secs = t;
            }
            Ok(())
        })
        .await
    }

    /// Asks for a graceful reboot of a running instance.
    pub async fn reboot_instance(&self, project: &ProjectName, name: &str) -> ApiResult<Instance> {
        self.update_spec(
            project,
            name,
            Some(EventKind::RebootRequested),
            |spec, status| {
                if spec.power != PowerState::Running || status.phase != InstancePhase::Running {
                    return Err(ApiError::conflict(format!(
                        "instance \"{}\" is {}, not running; start it instead",
                        spec.name, status.phase
                    )));
                }
                spec.reboot_generation += 1;
                Ok(())
            },
        )
        .await
    }

    /// Changes vCPUs and memory; a running instance is restarted by its agent
    /// (stop, reconfigure, start). Refused when its host cannot fit the new size.
    pub async fn resize_instance(
        &self,
        project: &ProjectName,
        name: &str,
        req: ResizeInstanceRequest,
    ) -> ApiResult<Instance> {
        let current = self.instance(project, name).await?;
        let (itype, mut resources) = match (&req.instance_type, req.vcpus, req.memory_mib) {
            (None, None, None) => {
                return Err(ApiError::invalid(
                    "give a new instance type, or vcpus and/or memory_mib",
                ));
            }
            (Some(t), v, m) => resolve_size(Some(t), v, m, None)?,
            (None, v, m) => {
                let r = Resources {
                    vcpus: v.unwrap_or(current.spec.resources.vcpus),
                    memory_mib: m.unwrap_or(current.spec.resources.memory_mib),
                    disk_gib: current.spec.resources.disk_gib,
                };
                r.validate_vm()?;
                (None, r)
            }
        };
        // Disks keep their size: a resize never shrinks or copies a disk.
        resources.disk_gib = current.spec.resources.disk_gib;
        let name_v = InstanceRef::new(project.clone(), InstanceName::new(name)?);
        let key = keys::instance_spec(&name_v);
        let _placing = self.placement.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let Some((mut spec, rev)) = self.store.get_json::<InstanceSpec>(&key).await? else {
                return Err(ApiError::not_found(format!(
                    "instance \"{name}\" not found"
                )));
            };
            if spec.deleting {
                return Err(ApiError::conflict(format!(
                    "instance \"{name}\" is being deleted"
                )));
            }
            refuse_while_migrating(&spec)?;
            let host = spec.host.clone();
            let flight = self.inflight.snapshot();
            let mut hosts = self.inventory.hosts().await;
            flight.adjust(&mut hosts);
            let placed = scheduler::place(
                &hosts,
                &PlacementRequest {
                    resources,
                    only: Some(host.clone()),
                    replacing: spec.resources,
                    ..Default::default()
                },
                self.config.weigher,
            );
            if let Err(e) = placed {
                return Err(ApiError::insufficient_capacity(format!(
                    "host {host} cannot fit instance \"{name}\" at {} vCPU / {} MiB: {}",
                    resources.vcpus,
                    resources.memory_mib,
                    e.to_string().trim_start_matches("no host can fit it: ")
                )));
            }
            let Some(entry) = hosts.iter().find(|h| h.host.name == host) else {
                return Err(ApiError::internal(format!(
                    "host {host} vanished from the inventory"
                )));
            };
            let before = spec.resources;
            spec.resources = resources;
            spec.instance_type = itype.as_ref().map(|t| t.name.clone());
            spec.generation += 1;
            let mut compares = vec![Compare::ModRevision(key.clone(), rev)];
            compares.extend(self.host_guard(entry));
            let mut ops = spec_ops(&spec);
            ops.push(self.alloc_mark(&host, &name_v));
            ops.push(crate::events::op(Event::instance(
                EventKind::Resized,
                &spec,
                format!(
                    "resized from {} vCPU / {} MiB to {} vCPU / {} MiB",
                    before.vcpus, before.memory_mib, resources.vcpus, resources.memory_mib
                ),
            )));
            let out = self.store.txn(compares, ops.clone()).await?;
            if out.succeeded {
                self.inventory.apply_committed(&ops, out.revision).await;
                let status = self
                    .inventory
                    .instance_full(&name_v)
                    .await
                    .map(|i| i.status)
                    .unwrap_or_else(InstanceStatus::pending);
                return Ok(Instance {
                    spec,
                    status,
                    protection: None,
                });
            }
            self.inventory
                .wait_for(out.revision, READ_YOUR_WRITES)
                .await;
        }
        Err(ApiError::unavailable(format!(
            "instance \"{name}\" or its host is changing too fast; retry"
        )))
    }

    /// Marks the instance for deletion; its agent cleans up and removes the
    /// records. A running instance needs `force`.
    pub async fn delete_instance(
        &self,
        project: &ProjectName,
        name: &str,
        force: bool,
        with_snapshots: bool,
    ) -> ApiResult<Instance> {
        let name_v = InstanceRef::new(project.clone(), InstanceName::new(name)?);
        let key = keys::instance_spec(&name_v);
        for _ in 0..16 {
            let Some((mut spec, rev)) = self.store.get_json::<InstanceSpec>(&key).await? else {
                return Err(ApiError::not_found(format!(
                    "instance \"{name}\" not found"
                )));
            };
            let status = self.instance_status(&name_v).await?;
            if spec.deleting {
                if with_snapshots {
                    self.delete_snapshots_of(&spec).await?;
                }
                return Ok(Instance {
                    spec,
                    status,
                    protection: None,
                });
            }
            let running = matches!(
                status.phase,
                InstancePhase::Running | InstancePhase::Starting | InstancePhase::Stopping
            ) || (spec.power == PowerState::Running
                && status.phase == InstancePhase::Pending);
            refuse_while_migrating(&spec)?;
            if running && !force {
                return Err(ApiError::conflict(format!(
                    "instance \"{name}\" is {}; stop it first or delete with force",
                    status.phase
                )));
            }
            spec.deleting = true;
            spec.force_stop = true;
            spec.generation += 1;
            let mut ops = spec_ops(&spec);
            ops.push(crate::events::op(Event::instance(
                EventKind::Deleted,
                &spec,
                if running {
                    "deleted while running (forced)"
                } else {
                    "deleted"
                },
            )));
            let out = self
                .store
                .txn(vec![Compare::ModRevision(key.clone(), rev)], ops)
                .await?;
            if out.succeeded {
                self.inventory
                    .wait_for(out.revision, READ_YOUR_WRITES)
                    .await;
                if with_snapshots {
                    self.delete_snapshots_of(&spec).await?;
                }
                info!(instance = %name, with_snapshots, "instance deletion requested");
                return Ok(Instance {
                    spec,
                    status,
                    protection: None,
                });
            }
        }
        Err(ApiError::unavailable(format!(
            "instance \"{name}\" is changing too fast; retry"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_from_type_with_overrides() {
        let (t, r) = resolve_size(Some("small"), None, Some(640), None).expect("ok");
        assert_eq!(t.expect("type").name.as_str(), "small");
        assert_eq!(r.memory_mib, 640);
        assert_eq!(r.vcpus, 1);
    }

    #[test]
    fn custom_size_needs_cpu_and_memory() {
        let e = resolve_size(None, Some(1), None, None).expect_err("incomplete");
        assert!(e.message.contains("nano, micro"), "{e}");
        let (_, r) = resolve_size(None, Some(2), Some(300), None).expect("custom");
        assert_eq!((r.vcpus, r.memory_mib), (2, 300));
    }

    #[test]
    fn stop_timeout_bounds() {
        assert!(validate_stop_timeout(0).is_err());
        assert!(validate_stop_timeout(30).is_ok());
        assert!(validate_stop_timeout(MAX_STOP_TIMEOUT_SECS + 1).is_err());
    }
}
