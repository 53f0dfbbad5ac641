//! Upgrades of the store's key layout.
//!
//! Instance, volume and image names became unique per project: their
//! records (specs, statuses, host bindings, snapshots, attachments, image
//! records) moved from `<prefix><name>` to `<prefix><project>/<name>`, and
//! a server's image files from `<data>/images/<name>` to
//! `<data>/images/<project>/<name>`. A store written before is moved over
//! once, when a server starts and before it reads anything.
//!
//! Every move is one transaction guarded by the old key's revision and the
//! new key's absence, so servers starting together move each record once
//! and a record changed meanwhile is moved on the next start. This module
//! must never rewrite a record's value: it only renames keys.

use std::collections::HashMap;
use std::path::Path;

use skyvisor_core::{
    Image, InstanceSpec, ProjectName, Snapshot, VolumeName, VolumeRef, VolumeSpec, keys,
};
use skyvisor_store::{Compare, KeyValue, Op, Store, StoreError, StoreExt, decode};
use tracing::{info, warn};

/// How many `/` separate the parts of a key after `prefix`: a record of
/// the layout before projects named their objects has one fewer than one
/// of today's.
fn depth(prefix: &str, key: &str) -> Option<usize> {
    Some(key.strip_prefix(prefix)?.matches('/').count())
}

/// Where the store's layout is recorded once every old record has moved,
/// so that later starts skip the scan.
const LAYOUT_KEY: &str = "cluster/store-layout";
/// The layout with per-project names.
const PROJECT_NAMES_LAYOUT: &str = "project-names";

/// One pass of moves: what it found of the old layout and what it moved.
struct Mover<'a> {
    store: &'a dyn Store,
    found: usize,
    moved: usize,
}

impl Mover<'_> {
    /// The records under `prefix` written with the old layout (`old_depth`
    /// slashes after the prefix).
    async fn legacy(
        &mut self,
        prefix: &str,
        old_depth: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let old: Vec<KeyValue> = self
            .store
            .list(prefix)
            .await?
            .items
            .into_iter()
            .filter(|kv| depth(prefix, &kv.key) == Some(old_depth))
            .collect();
        self.found += old.len();
        Ok(old)
    }

    /// Renames `kv` to `to`, keeping its value and lease; not if the key
    /// changed meanwhile or `to` exists (the next start tries again).
    async fn rename(&mut self, kv: &KeyValue, to: String) -> Result<(), StoreError> {
        let out = self
            .store
            .txn(
                vec![
                    Compare::ModRevision(kv.key.clone(), kv.mod_revision),
                    Compare::Absent(to.clone()),
                ],
                vec![
                    Op::Put {
                        key: to,
                        value: kv.value.clone(),
                        lease: kv.lease,
                    },
                    Op::Delete(kv.key.clone()),
                ],
            )
            .await?;
        self.moved += usize::from(out.succeeded);
        Ok(())
    }
}

/// Moves every record of the layout before per-project names to its
/// project's place; returns how many it moved. Idempotent.
pub async fn upgrade(store: &dyn Store) -> Result<usize, StoreError> {
    if store
        .get(LAYOUT_KEY)
        .await?
        .is_some_and(|kv| kv.value == PROJECT_NAMES_LAYOUT.as_bytes())
    {
        return Ok(0);
    }
    let mut m = Mover {
        store,
        found: 0,
        moved: 0,
    };
    let default = skyvisor_core::auth::default_project();

    // Instances: the spec says the project; the rest follows the name.
    let mut instance_projects: HashMap<String, ProjectName> = HashMap::new();
    for kv in m.legacy(keys::INSTANCE_SPECS, 0).await? {
        let Ok(spec) = decode::<InstanceSpec>(&kv) else {
            warn!(key = %kv.key, "cannot move an undecodable instance spec");
            continue;
        };
        instance_projects.insert(spec.name.to_string(), spec.project.clone());
        m.rename(&kv, keys::instance_spec(&spec.instance_ref()))
            .await?;
    }
    for kv in m.legacy(keys::INSTANCE_STATUSES, 0).await? {
        let name = keys::name_of(&kv.key);
        let project = instance_projects.get(name).unwrap_or(&default).clone();
        let to = format!("{}{project}/{name}", keys::INSTANCE_STATUSES);
        m.rename(&kv, to).await?;
    }
    for kv in m.legacy(keys::BINDINGS, 1).await? {
        let (Ok(spec), Some(host)) = (
            decode::<InstanceSpec>(&kv),
            kv.key
                .strip_prefix(keys::BINDINGS)
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(host, _)| skyvisor_core::HostName::new(host).ok()),
        ) else {
            continue;
        };
        m.rename(&kv, keys::binding(&host, &spec.instance_ref()))
            .await?;
    }
    for kv in m.legacy(keys::SNAPSHOTS, 1).await? {
        let Ok(snap) = decode::<Snapshot>(&kv) else {
            continue;
        };
        m.rename(&kv, keys::snapshot(&snap.instance_ref(), &snap.name))
            .await?;
    }

    // Volumes: the spec says the project.
    let mut volume_projects: HashMap<String, ProjectName> = HashMap::new();
    for kv in m.legacy(keys::VOLUME_SPECS, 0).await? {
        let Ok(spec) = decode::<VolumeSpec>(&kv) else {
            warn!(key = %kv.key, "cannot move an undecodable volume spec");
            continue;
        };
        volume_projects.insert(spec.name.to_string(), spec.project.clone());
        m.rename(&kv, keys::volume_spec(&spec.volume_ref())).await?;
    }
    let volume_of = |name: &str| -> Option<VolumeRef> {
        let project = volume_projects.get(name).unwrap_or(&default).clone();
        Some(VolumeRef::new(project, VolumeName::new(name).ok()?))
    };
    for prefix in [
        keys::VOLUME_STATUSES,
        keys::VOLUME_ATTACHMENTS,
        keys::VOLUME_RUNTIMES,
    ] {
        for kv in m.legacy(prefix, 0).await? {
            let Some(v) = volume_of(keys::name_of(&kv.key)) else {
                continue;
            };
            m.rename(&kv, format!("{prefix}{v}")).await?;
        }
    }
    for kv in m.legacy(keys::VOLUME_SNAPSHOTS, 1).await? {
        let Some((volume, snapshot)) = kv
            .key
            .strip_prefix(keys::VOLUME_SNAPSHOTS)
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        let Some(v) = volume_of(volume) else { continue };
        m.rename(&kv, keys::volume_snapshot(&v, snapshot)).await?;
    }

    // Images: the record says the project.
    for kv in m.legacy(keys::IMAGES, 0).await? {
        let Ok(image) = decode::<Image>(&kv) else {
            warn!(key = %kv.key, "cannot move an undecodable image record");
            continue;
        };
        m.rename(&kv, keys::image(&image.image_ref())).await?;
    }
    if m.moved > 0 {
        info!(
            moved = m.moved,
            "store layout upgraded: instances, volumes and images are named within their projects"
        );
    }
    // Everything moved (or nothing was old): later starts need not look.
    if m.moved == m.found {
        store
            .put(LAYOUT_KEY, PROJECT_NAMES_LAYOUT.as_bytes().to_vec())
            .await?;
    }
    Ok(m.moved)
}

/// Moves this server's image files of the old layout
/// (`<root>/<name>/<file>`) to `<root>/<project>/<name>/`; returns how
/// many images it moved. Call after [`upgrade`]. Old directories go aside
/// (`.legacy-<name>`) before any moves in, since a project may be named
/// like an old image; a start interrupted in between finishes the moves.
pub async fn move_image_dirs(store: &dyn Store, root: &Path) -> Result<usize, StoreError> {
    let images: Vec<Image> = store
        .list(keys::IMAGES)
        .await?
        .items
        .iter()
        .filter_map(|kv| decode::<Image>(kv).ok())
        .collect();
    let aside = |image: &Image| root.join(format!(".legacy-{}", image.name));
    for image in &images {
        let old = root.join(image.name.as_str());
        let mut is_old_layout = false;
        for f in &image.files {
            is_old_layout |= tokio::fs::metadata(old.join(&f.file_name))
                .await
                .is_ok_and(|m| m.is_file());
        }
        if is_old_layout && let Err(e) = tokio::fs::rename(&old, aside(image)).await {
            warn!(image = %image.name, error = %e, "cannot move an image's files aside");
        }
    }
    let mut moved = 0;
    for image in &images {
        let from = aside(image);
        if !tokio::fs::try_exists(&from).await.unwrap_or(false) {
            continue;
        }
        let to = root.join(image.project.as_str()).join(image.name.as_str());
        if tokio::fs::try_exists(&to).await.unwrap_or(true) {
            continue;
        }
        let parent = root.join(image.project.as_str());
        let done = match tokio::fs::create_dir_all(&parent).await {
            Ok(()) => tokio::fs::rename(&from, &to).await,
            Err(e) => Err(e),
        };
        match done {
            Ok(()) => moved += 1,
            Err(e) => warn!(image = %image.name, error = %e, "cannot move an image's files"),
        }
    }
    if moved > 0 {
        info!(moved, "image files moved under their projects");
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_store::encode;

    #[tokio::test]
    async fn moves_old_records_under_their_projects_once() {
        let store = skyvisor_store::embedded::EmbeddedStore::in_memory().expect("store");
        let web = ProjectName::new("web").expect("project");
        let mut spec = crate::snapshots::tests::spec();
        spec.project = web.clone();
        let name = spec.name.to_string();
        let host = spec.host.clone();
        for (k, v) in [
            (format!("{}{name}", keys::INSTANCE_SPECS), encode(&spec)),
            (format!("{}{name}", keys::INSTANCE_STATUSES), b"{}".to_vec()),
            (format!("{}{host}/{name}", keys::BINDINGS), encode(&spec)),
            // An unrelated volume record of the default project.
            (format!("{}data", keys::VOLUME_ATTACHMENTS), b"{}".to_vec()),
            (format!("{}data/s1", keys::VOLUME_SNAPSHOTS), b"{}".to_vec()),
        ] {
            store.put(&k, v).await.expect("put");
        }
        assert_eq!(upgrade(&store).await.expect("upgrade"), 5);
        let r = spec.instance_ref();
        let moved: InstanceSpec = store
            .get_json(&keys::instance_spec(&r))
            .await
            .expect("get")
            .expect("moved")
            .0;
        assert_eq!(moved, spec);
        for k in [
            keys::instance_status(&r),
            keys::binding(&host, &r),
            "volumes/attachment/default/data".to_string(),
            "volumes/snapshot/default/data/s1".to_string(),
        ] {
            assert!(store.get(&k).await.expect("get").is_some(), "{k}");
        }
        for old in [
            format!("{}{name}", keys::INSTANCE_SPECS),
            format!("{}{host}/{name}", keys::BINDINGS),
        ] {
            assert!(store.get(&old).await.expect("get").is_none(), "{old}");
        }
        // Run again: nothing left to move, nothing moved twice.
        assert_eq!(upgrade(&store).await.expect("again"), 0);
    }

    #[tokio::test]
    async fn moves_old_image_records_and_files_under_their_projects() {
        use skyvisor_core::image::{FileRole, ImageKind, ImageSource, ImageState};
        let store = skyvisor_store::embedded::EmbeddedStore::in_memory().expect("store");
        let root = tempfile::tempdir().expect("tmp");
        // A project named like an image must not catch the image's files.
        let image = |name: &str, project: &str| Image {
            name: skyvisor_core::ImageName::new(name).expect("name"),
            project: ProjectName::new(project).expect("project"),
            public: false,
            kind: ImageKind::KernelInitrd,
            description: String::new(),
            files: vec![skyvisor_core::ImageFile {
                role: FileRole::Kernel,
                file_name: "vmlinuz".into(),
                size_bytes: 4,
                sha256: String::new(),
                format: None,
                virtual_size_bytes: None,
            }],
            cmdline: None,
            guest_service: false,
            ssh_user: None,
            cloud_init: false,
            process: None,
            source: ImageSource::Import,
            state: ImageState::Ready,
            message: None,
            builder: None,
            created_at: chrono::Utc::now(),
        };
        let images = [image("web", "default"), image("tool", "web")];
        for i in &images {
            store
                .put(&format!("{}{}", keys::IMAGES, i.name), encode(i))
                .await
                .expect("put");
            let dir = root.path().join(i.name.as_str());
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("vmlinuz"), i.name.as_str()).expect("file");
        }
        assert_eq!(upgrade(&store).await.expect("upgrade"), 2);
        assert_eq!(move_image_dirs(&store, root.path()).await.expect("move"), 2);
        for i in &images {
            assert!(
                store
                    .get(&keys::image(&i.image_ref()))
                    .await
                    .expect("get")
                    .is_some()
            );
            let file = root
                .path()
                .join(i.project.as_str())
                .join(i.name.as_str())
                .join("vmlinuz");
            assert_eq!(
                std::fs::read_to_string(&file).expect("moved file"),
                i.name.as_str()
            );
        }
        assert_eq!(
            move_image_dirs(&store, root.path()).await.expect("again"),
            0
        );
    }
}
