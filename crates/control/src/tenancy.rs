//! Objects as a project sees them: lookups that answer 404 for another
//! project's object exactly as for a missing one, what a project uses, and
//! its quota, enforced in the same store transaction as a create.

use skyvisor_core::auth::Usage;
use skyvisor_core::snapshot::parse_snapshot_ref;
use skyvisor_core::{
    Image, ImageName, InstanceName, InstanceRef, InstanceSpec, ProjectName, Snapshot, VolumeName,
    VolumeRef, VolumeSpec, keys,
};
use skyvisor_store::{Compare, Op, StoreExt};

use crate::ControlPlane;
use crate::access::Caller;
use crate::error::{ApiError, ApiResult};

/// The part of a create's transaction that holds its project's quota: the
/// create commits only if no other create of the project committed since
/// the usage was counted.
/// A project without limits needs no guard, so its creates do not
/// contend on it.
#[derive(Debug, Clone)]
pub struct QuotaGuard(Option<(Compare, Op)>);

impl QuotaGuard {
    /// Adds the guard to a transaction's comparisons and writes.
    pub fn add_to(&self, compares: &mut Vec<Compare>, ops: &mut Vec<Op>) {
        if let Some((c, o)) = &self.0 {
            compares.push(c.clone());
            ops.push(o.clone());
        }
    }
}

fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("{kind} \"{name}\" not found"))
}

impl ControlPlane {
    /// The spec of instance `name` if it belongs to the caller's project.
    pub async fn visible_instance(&self, caller: &Caller, name: &str) -> ApiResult<InstanceSpec> {
        let n = InstanceRef::new(caller.project.clone(), InstanceName::new(name)?);
        // The inventory first (memory); the store when it does not know
        // the name yet (made a moment ago through another server).
        let spec = match self.inventory.instance(&n).await {
            Some(spec) => Some(spec),
            None => self
                .store
                .get_json::<InstanceSpec>(&keys::instance_spec(&n))
                .await?
                .map(|(s, _)| s),
        };
        match spec {
            Some(spec) if spec.project == caller.project => Ok(spec),
            _ => Err(not_found("instance", name)),
        }
    }

    /// The spec of volume `name` if it belongs to the caller's project.
    pub async fn visible_volume(&self, caller: &Caller, name: &str) -> ApiResult<VolumeSpec> {
        let n = VolumeRef::new(caller.project.clone(), VolumeName::new(name)?);
        match self
            .store
            .get_json::<VolumeSpec>(&keys::volume_spec(&n))
            .await?
        {
            Some((spec, _)) => Ok(spec),
            None => Err(not_found("volume", name)),
        }
    }

    /// Image `name` if the caller's project owns it or it is public.
    pub async fn visible_image(&self, caller: &Caller, name: &str) -> ApiResult<Image> {
        self.image(&caller.project, &ImageName::new(name)?).await
    }

    /// Image `name` if the caller may change or delete it: its project's
    /// members may, and a cluster admin for a public image.
    pub async fn writable_image(&self, caller: &Caller, name: &str) -> ApiResult<Image> {
        let image = self.visible_image(caller, name).await?;
        if image.project != caller.project && !caller.is_cluster_admin() {
            return Err(ApiError::forbidden(format!(
                "image \"{name}\" is a public image of another project; only a cluster admin may change it"
            )));
        }
        Ok(image)
    }

    /// The images the caller's project may use.
    pub async fn visible_images(&self, caller: &Caller) -> ApiResult<Vec<Image>> {
        Ok(self
            .images()
            .await?
            .into_iter()
            .filter(|i| i.public || i.project == caller.project)
            .collect())
    }

    /// Checks a `VM/SNAPSHOT` reference (a clone's source) against the
    /// caller's project: the snapshot record, which outlives its VM, says.
    pub async fn visible_snapshot_ref(&self, caller: &Caller, r: &str) -> ApiResult<()> {
        let src = parse_snapshot_ref(r)?;
        match self
            .store
            .get_json::<Snapshot>(&keys::snapshot(
                &InstanceRef::new(caller.project.clone(), src.instance.clone()),
                &src.snapshot,
            ))
            .await?
        {
            Some((snap, _)) if snap.project == caller.project => Ok(()),
            _ => Err(ApiError::not_found(format!(
                "instance \"{}\" has no snapshot \"{}\"",
                src.instance, src.snapshot
            ))),
        }
    }

    /// Snapshot `snapshot` of instance `instance` if it belongs to the
    /// caller's project.
    pub async fn visible_snapshot(
        &self,
        caller: &Caller,
        instance: &str,
        snapshot: &str,
    ) -> ApiResult<Snapshot> {
        match self.snapshot(&caller.project, instance, snapshot).await {
            Ok(s) if s.project == caller.project => Ok(s),
            Ok(_) => Err(ApiError::not_found(format!(
                "instance \"{instance}\" has no snapshot \"{snapshot}\""
            ))),
            Err(e) => Err(e),
        }
    }

    /// What `project` uses now, counted from the store (not a cache, so a
    /// create on another server a moment ago counts).
    pub async fn usage(&self, project: &ProjectName) -> ApiResult<Usage> {
        let mut u = Usage::default();
        let (instances, _) = self
            .store
            .list_json::<InstanceSpec>(&keys::in_project(keys::INSTANCE_SPECS, project))
            .await?;
        for (spec, _) in instances.iter().filter(|(s, _)| &s.project == project) {
            u.instances += 1;
            u.vcpus += spec.resources.vcpus;
            u.memory_mib += spec.resources.memory_mib;
        }
        let (volumes, _) = self
            .store
            .list_json::<VolumeSpec>(&keys::in_project(keys::VOLUME_SPECS, project))
            .await?;
        for (spec, _) in &volumes {
            u.volumes += 1;
            u.volume_gib += spec.size_bytes.div_ceil(1 << 30);
        }
        // The store's layout puts a project's records under its name:
        // counting them needs no decoding.
        u.snapshots += self
            .store
            .list(&keys::in_project(keys::SNAPSHOTS, project))
            .await?
            .items
            .len() as u32;
        u.snapshots += self
            .store
            .list(&keys::in_project(keys::VOLUME_SNAPSHOTS, project))
            .await?
            .items
            .len() as u32;
        Ok(u)
    }

    /// Checks that `more` fits `project`'s quota and returns the guard the
    /// create's transaction must carry; refused (403) naming the resource,
    /// the usage, the request and the limit.
    pub async fn quota_guard(&self, project: &ProjectName, more: &Usage) -> ApiResult<QuotaGuard> {
        // The quota from memory first: a project without limits costs no
        // store read, so creates in it race no longer than before.
        let quota = self
            .directory
            .project(project)
            .await?
            .map(|p| p.quota)
            .unwrap_or_default();
        if quota == Default::default() {
            return Ok(QuotaGuard(None));
        }
        let key = keys::quota_guard(project);
        let rev = self.store.get(&key).await?.map_or(0, |kv| kv.mod_revision);
        let now = self.usage(project).await?;
        if let Some((what, used, asked, limit)) = now.exceeds(more, &quota) {
            let message = format!(
                "project {project} quota exceeded for {what}: {used} used + {asked} requested > limit {limit}"
            );
            let mut event = skyvisor_core::Event::new(
                skyvisor_core::EventKind::QuotaRefused,
                skyvisor_core::ObjectKind::Project,
                Some(project.clone()),
                project.to_string(),
                message.clone(),
            );
            event.result = skyvisor_core::EventResult::Refused;
            self.events.record(event);
            return Err(ApiError::quota_exceeded(message));
        }
        Ok(QuotaGuard(Some((
            Compare::ModRevision(key.clone(), rev),
            Op::Put {
                key,
                value: chrono::Utc::now().to_rfc3339().into_bytes(),
                lease: None,
            },
        ))))
    }

    /// Everything `project` holds, named, for refusing its deletion.
    pub async fn project_contents(&self, project: &ProjectName) -> ApiResult<Vec<String>> {
        let mut out = Vec::new();
        let (instances, _) = self
            .store
            .list_json::<InstanceSpec>(&keys::in_project(keys::INSTANCE_SPECS, project))
            .await?;
        out.extend(
            instances
                .iter()
                .filter(|(s, _)| &s.project == project)
                .map(|(s, _)| format!("instance {}", s.name)),
        );
        let (volumes, _) = self
            .store
            .list_json::<VolumeSpec>(&keys::in_project(keys::VOLUME_SPECS, project))
            .await?;
        out.extend(
            volumes
                .iter()
                .filter(|(s, _)| &s.project == project)
                .map(|(s, _)| format!("volume {}", s.name)),
        );
        let (snapshots, _) = self
            .store
            .list_json::<Snapshot>(&keys::in_project(keys::SNAPSHOTS, project))
            .await?;
        out.extend(
            snapshots
                .iter()
                .filter(|(s, _)| &s.project == project)
                .map(|(s, _)| format!("snapshot {}/{}", s.instance, s.name)),
        );
        out.extend(
            self.images()
                .await?
                .iter()
                .filter(|i| &i.project == project)
                .map(|i| format!("image {}", i.name)),
        );
        out.extend(
            self.key_pairs(project)
                .await?
                .iter()
                .map(|k| format!("key pair {}", k.name)),
        );
        Ok(out)
    }
}
