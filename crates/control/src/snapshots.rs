//! Snapshot operations: validate a request and write desired state — a
//! pending snapshot record, a deletion mark, a restore request in the
//! instance's spec, a schedule. The agent of the host that keeps the VM
//! (and the snapshot's files) carries them out and reports back in the
//! records. Nothing here touches files or QEMU.

use chrono::Utc;
use skyvisor_core::api::{CreateSnapshotRequest, RestoreInstanceRequest};
use skyvisor_core::auth::Usage;
use skyvisor_core::{
    CheckpointSchedule, Event, EventKind, Instance, InstanceName, InstanceRef, InstanceSpec,
    PowerState, ProjectName, RestoreRequest, Snapshot, SnapshotKind, SnapshotName, SnapshotOrigin,
    SnapshotState, keys,
};
use skyvisor_store::{Compare, StoreExt, put_json};
use tracing::info;

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// Whether `snap` may go onto the VM of `spec` (restore or clone), or why not.
pub fn check_fits(snap: &Snapshot, spec: &InstanceSpec) -> ApiResult<()> {
    if snap.image != spec.image {
        return Err(ApiError::conflict(format!(
            "snapshot {} was taken of image {}; VM {} runs image {}",
            snap.name, snap.image, spec.name, spec.image
        )));
    }
    if snap.resources.vcpus != spec.resources.vcpus
        || snap.resources.memory_mib != spec.resources.memory_mib
    {
        let want = snap
            .instance_type
            .as_ref()
            .map(|t| format!("instance type {t} ("))
            .unwrap_or_else(|| "(".into());
        return Err(ApiError::conflict(format!(
            "snapshot {} needs {want}{} vCPU, {} MiB); VM {} has {} vCPU, {} MiB: resize it first",
            snap.name,
            snap.resources.vcpus,
            snap.resources.memory_mib,
            spec.name,
            spec.resources.vcpus,
            spec.resources.memory_mib
        )));
    }
    if snap.host != spec.host {
        return Err(ApiError::conflict(format!(
            "snapshot {} is kept on host {}; VM {} runs on host {}",
            snap.name, snap.host, spec.name, spec.host
        )));
    }
    Ok(())
}

/// A snapshot that can be used (ready, not being deleted), or why not.
pub fn check_ready(snap: &Snapshot) -> ApiResult<()> {
    if snap.deleting {
        return Err(ApiError::conflict(format!(
            "snapshot {} is being deleted",
            snap.name
        )));
    }
    match snap.state {
        SnapshotState::Ready => Ok(()),
        SnapshotState::Failed => Err(ApiError::conflict(format!(
            "snapshot {} failed ({}); it cannot be used",
            snap.name,
            snap.message.clone().unwrap_or_default()
        ))),
        s => Err(ApiError::conflict(format!(
            "snapshot {} is {s}; wait until it is ready",
            snap.name
        ))),
    }
}

/// How many times a snapshot request retries when another create of its
/// project committed between its quota count and its transaction.
const QUOTA_ATTEMPTS: usize = 20;

impl ControlPlane {
    async fn spec_of(&self, iref: &InstanceRef) -> ApiResult<InstanceSpec> {
        let name = &iref.name;
        match self
            .store
            .get_json::<InstanceSpec>(&keys::instance_spec(iref))
            .await?
        {
            Some((spec, _)) => Ok(spec),
            None => Err(ApiError::not_found(format!(
                "instance \"{name}\" not found"
            ))),
        }
    }

    /// Asks for a snapshot of `instance`: a pending record its agent
    /// takes — live (memory, devices and disk) if the VM runs, of the disk
    /// if it is stopped.
    pub async fn create_snapshot(
        &self,
        project: &ProjectName,
        instance: &str,
        req: CreateSnapshotRequest,
    ) -> ApiResult<Snapshot> {
        let instance = InstanceName::new(instance)?;
        let iref = InstanceRef::new(project.clone(), instance.clone());
        let now = Utc::now();
        let name = match req.name {
            Some(n) => SnapshotName::new(n)?,
            None => SnapshotName::at("snap", now)?,
        };
        let spec = self.spec_of(&iref).await?;
        crate::containers::refuse_for_container(&spec)?;
        if spec.deleting {
            return Err(ApiError::conflict(format!(
                "instance \"{instance}\" is being deleted"
            )));
        }
        crate::instances::refuse_while_migrating(&spec)?;
        // The root disk (local or a root volume) is part of a checkpoint;
        // data volumes are not yet.
        let data: Vec<String> = spec
            .volumes
            .iter()
            .filter(|v| !v.root)
            .map(|v| v.name.to_string())
            .collect();
        if !data.is_empty() {
            return Err(ApiError::conflict(format!(
                "instance \"{instance}\" has data volumes attached ({}); a checkpoint holds the root disk and memory only: detach them first (`skyvisor vm detach-volume VM VOLUME`), or snapshot them with `skyvisor volume snapshot create`",
                data.join(", ")
            )));
        }
        let snap = Snapshot {
            name: name.clone(),
            project: spec.project.clone(),
            instance: instance.clone(),
            instance_id: spec.id,
            host: spec.host.clone(),
            state: SnapshotState::Pending,
            kind: None,
            origin: SnapshotOrigin::Manual,
            image: spec.image.clone(),
            instance_type: spec.instance_type.clone(),
            resources: spec.resources,
            created_at: now,
            taken_at: None,
            paused_ms: None,
            duration_ms: None,
            memory_bytes: 0,
            disk_bytes: 0,
            progress: None,
            deleting: false,
            message: None,
            updated_at: now,
        };
        let key = keys::snapshot(&iref, &name);
        let more = Usage {
            snapshots: 1,
            ..Usage::default()
        };
        let mut created = false;
        for _ in 0..QUOTA_ATTEMPTS {
            let mut compares = vec![Compare::Absent(key.clone())];
            let mut ops = vec![put_json(key.clone(), &snap)];
            self.quota_guard(&spec.project, &more)
                .await?
                .add_to(&mut compares, &mut ops);
            if self.store.txn(compares, ops).await?.succeeded {
                created = true;
                break;
            }
            if self.store.get(&key).await?.is_some() {
                return Err(ApiError::already_exists(format!(
                    "instance \"{instance}\" already has a snapshot named \"{name}\""
                )));
            }
        }
        if !created {
            return Err(ApiError::unavailable(
                "too many concurrent creates in this project; retry",
            ));
        }
        info!(%instance, snapshot = %name, "snapshot requested");
        Ok(snap)
    }

    /// The snapshots of `project`'s `instance` (also after it was
    /// deleted), oldest first; of every instance of the project when `None`.
    pub async fn snapshots(
        &self,
        project: &ProjectName,
        instance: Option<&str>,
    ) -> ApiResult<Vec<Snapshot>> {
        let prefix = match instance {
            Some(i) => {
                keys::snapshots_of(&InstanceRef::new(project.clone(), InstanceName::new(i)?))
            }
            None => keys::in_project(keys::SNAPSHOTS, project),
        };
        let (all, _) = self.store.list_json::<Snapshot>(&prefix).await?;
        let mut list: Vec<Snapshot> = all.into_iter().map(|(s, _)| s).collect();
        list.sort_by(|a, b| {
            (a.instance.as_str(), a.created_at).cmp(&(b.instance.as_str(), b.created_at))
        });
        Ok(list)
    }

    /// One snapshot, or 404.
    pub async fn snapshot(
        &self,
        project: &ProjectName,
        instance: &str,
        name: &str,
    ) -> ApiResult<Snapshot> {
        let instance = InstanceName::new(instance)?;
        let iref = InstanceRef::new(project.clone(), instance.clone());
        let name = SnapshotName::new(name)?;
        match self
            .store
            .get_json::<Snapshot>(&keys::snapshot(&iref, &name))
            .await?
        {
            Some((s, _)) => Ok(s),
            None => Err(ApiError::not_found(format!(
                "instance \"{instance}\" has no snapshot \"{name}\""
            ))),
        }
    }

    /// Marks a snapshot for deletion; its host's agent removes the files,
    /// then the record.
    pub async fn delete_snapshot(
        &self,
        project: &ProjectName,
        instance: &str,
        name: &str,
    ) -> ApiResult<Snapshot> {
        let instance = InstanceName::new(instance)?;
        let name = SnapshotName::new(name)?;
        let key = keys::snapshot(&InstanceRef::new(project.clone(), instance.clone()), &name);
        for _ in 0..16 {
            let Some((mut snap, rev)) = self.store.get_json::<Snapshot>(&key).await? else {
                return Err(ApiError::not_found(format!(
                    "instance \"{instance}\" has no snapshot \"{name}\""
                )));
            };
            if snap.deleting {
                return Ok(snap);
            }
            if matches!(snap.state, SnapshotState::Pending | SnapshotState::Saving) {
                return Err(ApiError::conflict(format!(
                    "snapshot \"{name}\" is being taken; delete it once it is ready or failed"
                )));
            }
            snap.deleting = true;
            snap.updated_at = Utc::now();
            let out = self
                .store
                .txn(
                    vec![Compare::ModRevision(key.clone(), rev)],
                    vec![
                        put_json(key.clone(), &snap),
                        crate::events::op(Event::snapshot(
                            EventKind::Deleted,
                            &snap,
                            "deletion requested",
                        )),
                    ],
                )
                .await?;
            if out.succeeded {
                info!(%instance, snapshot = %name, "snapshot deletion requested");
                return Ok(snap);
            }
        }
        Err(ApiError::unavailable(format!(
            "snapshot \"{name}\" is changing too fast; retry"
        )))
    }

    /// Marks every snapshot of the instance with id `spec.id` for deletion
    /// (one being taken is deleted by its agent once it settles).
    pub(crate) async fn delete_snapshots_of(&self, spec: &InstanceSpec) -> ApiResult<()> {
        let (all, _) = self
            .store
            .list_json::<Snapshot>(&keys::snapshots_of(&spec.instance_ref()))
            .await?;
        for (snap, _) in all {
            if snap.instance_id != spec.id {
                continue;
            }
            let key = keys::snapshot(&snap.instance_ref(), &snap.name);
            // The agent may be writing the record (progress, outcome):
            // retry until the mark lands.
            for _ in 0..32 {
                let Some((mut s, rev)) = self.store.get_json::<Snapshot>(&key).await? else {
                    break;
                };
                if s.deleting {
                    break;
                }
                s.deleting = true;
                s.updated_at = Utc::now();
                let out = self
                    .store
                    .txn(
                        vec![Compare::ModRevision(key.clone(), rev)],
                        vec![
                            put_json(key.clone(), &s),
                            crate::events::op(Event::snapshot(
                                EventKind::Deleted,
                                &s,
                                "deleted with its VM",
                            )),
                        ],
                    )
                    .await?;
                if out.succeeded {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Asks the instance to go back to one of its snapshots. Refused (and
    /// the VM left as it is) when the snapshot is not ready, belongs to
    /// another VM, or needs another size, image or host.
    pub async fn restore_instance(
        &self,
        project: &ProjectName,
        instance: &str,
        req: RestoreInstanceRequest,
    ) -> ApiResult<Instance> {
        let name = InstanceName::new(instance)?;
        let iref = InstanceRef::new(project.clone(), name.clone());
        let snap_name = SnapshotName::new(req.snapshot.clone())?;
        let spec = self.spec_of(&iref).await?;
        crate::containers::refuse_for_container(&spec)?;
        let snap = match self
            .store
            .get_json::<Snapshot>(&keys::snapshot(&iref, &snap_name))
            .await?
        {
            Some((s, _)) => s,
            None => {
                return Err(ApiError::not_found(format!(
                    "instance \"{name}\" has no snapshot \"{snap_name}\"; see `skyvisor vm snapshot list {name}`"
                )));
            }
        };
        check_ready(&snap)?;
        if snap.instance_id != spec.id {
            return Err(ApiError::conflict(format!(
                "snapshot \"{snap_name}\" belongs to another VM that was also named \"{name}\" (id {}); clone it instead: skyvisor vm create NEW --from-snapshot {name}/{snap_name}",
                snap.instance_id
            )));
        }
        check_fits(&snap, &spec)?;
        if snap.host != spec.host {
            return Err(ApiError::conflict(format!(
                "snapshot \"{snap_name}\" is stored on host {}, but instance \"{name}\" now runs on host {} (it migrated); snapshots do not move between hosts yet: migrate it back with `skyvisor vm migrate {name} --to {}`",
                snap.host, spec.host, snap.host
            )));
        }
        let full = snap.kind == Some(SnapshotKind::Full);
        let inst = self
            .update_spec(project, name.as_str(), None, |spec, _| {
                let generation = spec.restore.as_ref().map_or(0, |r| r.generation) + 1;
                spec.restore = Some(RestoreRequest {
                    snapshot: snap_name.clone(),
                    generation,
                });
                if full {
                    // Continuing from a running checkpoint means running.
                    spec.power = PowerState::Running;
                    spec.force_stop = false;
                }
                Ok(())
            })
            .await?;
        info!(instance = %name, snapshot = %snap_name, "restore requested");
        Ok(inst)
    }

    /// Sets or clears the instance's checkpoint schedule.
    pub async fn set_checkpoint_schedule(
        &self,
        project: &ProjectName,
        instance: &str,
        schedule: Option<CheckpointSchedule>,
    ) -> ApiResult<Instance> {
        if let Some(s) = &schedule {
            s.validate()?;
            // The schedule keeps `keep` snapshots: they must fit the
            // project's snapshot quota beside what it holds already (this
            // VM's own scheduled ones make room for their successors).
            let n = InstanceRef::new(project.clone(), InstanceName::new(instance)?);
            if let Some(spec) = self.inventory.instance(&n).await {
                let (mine, _) = self
                    .store
                    .list_json::<Snapshot>(&keys::snapshots_of(&n))
                    .await?;
                let scheduled = mine
                    .iter()
                    .filter(|(s, _)| {
                        s.origin == SnapshotOrigin::Scheduled && s.instance_id == spec.id
                    })
                    .count();
                let more = Usage {
                    snapshots: s
                        .keep
                        .saturating_sub(u32::try_from(scheduled).unwrap_or(u32::MAX)),
                    ..Usage::default()
                };
                self.quota_guard(&spec.project, &more).await?;
            }
        }
        self.update_spec(project, instance, None, |spec, _| {
            spec.checkpoint_schedule = schedule;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use skyvisor_core::{
        HostName, ImageName, InstanceId, MacAddr, NetworkAttachment, Resources, RestartPolicy,
        TypeName,
    };

    use super::*;

    /// An instance spec for tests.
    pub(crate) fn spec() -> InstanceSpec {
        InstanceSpec {
            kind: Default::default(),
            security_groups: Vec::new(),
            labels: Default::default(),
            project: skyvisor_core::auth::default_project(),
            name: InstanceName::new("web").expect("name"),
            id: InstanceId::random(),
            image: ImageName::new("debian").expect("image"),
            instance_type: Some(TypeName::new("nano").expect("type")),
            resources: Resources {
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 1,
            },
            power: PowerState::Running,
            restart_policy: RestartPolicy::OnFailure,
            host: HostName::new("h1").expect("host"),
            network: NetworkAttachment {
                vni: None,
                network: "default".into(),
                ip: "10.0.0.2".parse().expect("ip"),
                prefix_len: 24,
                gateway: "10.0.0.1".parse().expect("gw"),
                mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            },
            reboot_generation: 0,
            stop_timeout_secs: 30,
            force_stop: false,
            deleting: false,
            generation: 1,
            created_at: Utc::now(),
            restore: None,
            migration: None,
            clone_of: None,
            checkpoint_schedule: None,
            spread_group: None,
            group: None,
            accel: None,
            volumes: vec![],
            ha: Default::default(),
            ha_priority: 0,
            guest: Default::default(),
        }
    }

    fn snap_of(spec: &InstanceSpec) -> Snapshot {
        Snapshot {
            project: skyvisor_core::auth::default_project(),
            name: SnapshotName::new("s1").expect("name"),
            instance: spec.name.clone(),
            instance_id: spec.id,
            host: spec.host.clone(),
            state: SnapshotState::Ready,
            kind: Some(SnapshotKind::Full),
            origin: SnapshotOrigin::Manual,
            image: spec.image.clone(),
            instance_type: spec.instance_type.clone(),
            resources: spec.resources,
            created_at: Utc::now(),
            taken_at: None,
            paused_ms: Some(5),
            duration_ms: None,
            memory_bytes: 1,
            disk_bytes: 1,
            progress: None,
            deleting: false,
            message: None,
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn snapshots_fit_only_their_image_size_and_host() {
        let s = spec();
        let snap = snap_of(&s);
        check_fits(&snap, &s).expect("fits");
        check_ready(&snap).expect("ready");

        let mut other = s.clone();
        other.image = ImageName::new("alpine").expect("image");
        let e = check_fits(&snap, &other).expect_err("image");
        assert!(e.message.contains("image debian"), "{}", e.message);

        let mut bigger = s.clone();
        bigger.resources.memory_mib = 256;
        let e = check_fits(&snap, &bigger).expect_err("size");
        assert!(
            e.message.contains("instance type nano") && e.message.contains("resize it first"),
            "{}",
            e.message
        );

        let mut elsewhere = s.clone();
        elsewhere.host = HostName::new("h2").expect("host");
        let e = check_fits(&snap, &elsewhere).expect_err("host");
        assert!(e.message.contains("kept on host h1"), "{}", e.message);
    }

    #[test]
    fn only_ready_snapshots_are_usable() {
        let s = spec();
        for (state, want) in [
            (SnapshotState::Pending, "wait until it is ready"),
            (SnapshotState::Saving, "wait until it is ready"),
            (SnapshotState::Failed, "cannot be used"),
        ] {
            let mut snap = snap_of(&s);
            snap.state = state;
            let e = check_ready(&snap).expect_err("not ready");
            assert!(e.message.contains(want), "{}", e.message);
        }
        let mut snap = snap_of(&s);
        snap.deleting = true;
        assert!(check_ready(&snap).is_err());
    }
}
