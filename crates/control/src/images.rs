//! The image service: builds images from built-in recipes, imports uploaded
//! ones, serves their files to agents and deletes unused ones.
//!
//! An image becomes visible as `ready` only after all its files are in
//! place and verified; a failed build or upload leaves no files behind.

use skyvisor_core::ProjectName;
use skyvisor_core::auth::default_project;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use skyvisor_core::image::{DiskFormat, FileRole, ImageKind, ImageSource, ImageState};
use skyvisor_core::{
    Event, EventKind, Image, ImageFile, ImageName, ImageRef, ValidationError, keys,
};
use skyvisor_store::{Op, StoreError, StoreExt, encode};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tracing::{info, warn};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// The recipe built by `skyvisor up` when no image exists.
pub const DEFAULT_RECIPE: &str = "debian-busybox";
/// The name of the image `skyvisor up` builds.
pub const DEFAULT_IMAGE: &str = "debian-busybox";
/// The public container image every server makes at start.
pub const CONTAINER_IMAGE: &str = "debian-rootfs";
/// Its recipe.
pub const CONTAINER_RECIPE: &str = skyvisor_image::ROOTFS_RECIPE;

/// SHA-256 of a file, hex.
pub async fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Format and virtual size of a disk image, from `qemu-img info`.
pub async fn disk_info(path: &Path) -> Result<(String, u64, Option<String>), String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img (install qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "not a disk image qemu-img can read: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img info gave unreadable output: {e}"))?;
    let format = v["format"].as_str().unwrap_or("").to_string();
    let size = v["virtual-size"].as_u64().unwrap_or(0);
    let backing = v["backing-filename"].as_str().map(str::to_string);
    Ok((format, size, backing))
}

/// Describes a file of an image from its contents.
pub async fn describe_file(
    dir: &Path,
    role: FileRole,
    file_name: &str,
) -> Result<ImageFile, String> {
    let path = dir.join(file_name);
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let sha256 = sha256_file(&path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (format, virtual_size_bytes) = if role == FileRole::Disk {
        let (fmt, size, backing) = disk_info(&path).await?;
        if backing.is_some() {
            return Err("disk images with a backing file are not accepted; flatten it with `qemu-img convert`".into());
        }
        let fmt = match fmt.as_str() {
            "qcow2" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            other => {
                return Err(format!(
                    "disk format {other:?} is not supported; allowed: qcow2, raw"
                ));
            }
        };
        (Some(fmt), Some(size))
    } else {
        (None, None)
    };
    Ok(ImageFile {
        role,
        file_name: file_name.to_string(),
        size_bytes: meta.len(),
        sha256,
        format,
        virtual_size_bytes,
    })
}

/// Turns an I/O error while storing an image into an API error; a full disk
/// is the client's to know about (413), not a fault of ours.
pub fn storage_error(what: &str, e: &std::io::Error) -> ApiError {
    if e.raw_os_error() == Some(28) {
        ApiError::too_large(format!(
            "no space left on the server's image store while {what}"
        ))
    } else {
        ApiError::internal(format!("{what}: {e}"))
    }
}

impl ControlPlane {
    /// All images.
    pub async fn images(&self) -> ApiResult<Vec<Image>> {
        let (all, _) = self.store.list_json::<Image>(keys::IMAGES).await?;
        Ok(all.into_iter().map(|(i, _)| i).collect())
    }

    /// Starts building image `name` of `project` from `recipe` in the
    /// background; the record shows `building` with progress, then `ready`
    /// or `failed`. A public image is shared with every project.
    pub async fn build_image(
        &self,
        name: &str,
        recipe: &str,
        project: &ProjectName,
        public: bool,
    ) -> ApiResult<Image> {
        let name = ImageName::new(name)?;
        let recipes = skyvisor_image::recipes();
        let Some(info) = recipes.iter().find(|r| r.name == recipe) else {
            let known: Vec<&str> = recipes.iter().map(|r| r.name).collect();
            return Err(ValidationError::new(
                "recipe",
                format!("unknown recipe {recipe:?}; known: {}", known.join(", ")),
            )
            .into());
        };
        let full_os = info.kind == skyvisor_image::RecipeKind::Disk;
        let image = Image {
            name: name.clone(),
            project: project.clone(),
            public,
            kind: match info.kind {
                skyvisor_image::RecipeKind::Disk => ImageKind::Disk,
                skyvisor_image::RecipeKind::KernelInitrd => ImageKind::KernelInitrd,
                skyvisor_image::RecipeKind::Rootfs => ImageKind::Rootfs,
            },
            description: format!("built from recipe {recipe}"),
            files: vec![],
            cmdline: None,
            guest_service: !full_os,
            ssh_user: full_os.then(|| skyvisor_image::CLOUD_USER.to_string()),
            cloud_init: full_os,
            process: None,
            source: ImageSource::Recipe {
                recipe: recipe.to_string(),
                packages: vec![],
            },
            state: ImageState::Building,
            message: Some("queued".into()),
            builder: Some(self.config.cluster.name.clone()),
            created_at: Utc::now(),
        };
        self.refuse_public_name_taken(&image).await?;
        if !self
            .store
            .create(&keys::image(&image.image_ref()), encode(&image))
            .await?
        {
            return Err(ApiError::already_exists(format!(
                "image \"{name}\" already exists"
            )));
        }
        let cp = self.clone();
        let recipe = recipe.to_string();
        let task_image = image.clone();
        tokio::spawn(async move {
            cp.run_build(task_image, &recipe).await;
        });
        Ok(image)
    }

    /// Refuses a public image whose name another public image has: every
    /// project finds public images by name alone. (Public images are
    /// visible to all, so the refusal tells nothing new.)
    pub(crate) async fn refuse_public_name_taken(&self, image: &Image) -> ApiResult<()> {
        if !image.public {
            return Ok(());
        }
        if let Some(other) = self
            .images()
            .await?
            .into_iter()
            .find(|i| i.public && i.name == image.name && i.project != image.project)
        {
            return Err(ApiError::already_exists(format!(
                "a public image \"{}\" already exists (project {}); public images need names of their own",
                other.name, other.project
            )));
        }
        Ok(())
    }

    /// Finds images left `building` by a server that no longer works on
    /// them — one that is gone from the cluster, or this server itself
    /// before it restarted (`at_start`) — and settles each: a recipe build
    /// is resumed here; an upload, whose bytes died with its server, fails
    /// with the reason. Each change is a compare-and-swap on the record, so
    /// two servers never both take one. Returns how many it settled.
    pub async fn recover_interrupted_builds(&self, at_start: bool) -> ApiResult<usize> {
        let me = &self.config.cluster.name;
        let (servers, _) = self
            .store
            .list_json::<skyvisor_core::cluster::ServerRecord>(keys::SERVERS)
            .await?;
        let live: std::collections::HashSet<_> = servers.into_iter().map(|(s, _)| s.name).collect();
        let (images, _) = self.store.list_json::<Image>(keys::IMAGES).await?;
        let mut settled = 0;
        for (image, rev) in images {
            let Some(builder) = image.builder.clone() else {
                continue;
            };
            let orphaned = if &builder == me {
                at_start
            } else {
                !live.contains(&builder)
            };
            if image.state != ImageState::Building || !orphaned {
                continue;
            }
            let mut next = image.clone();
            let resume = match &image.source {
                ImageSource::Recipe { recipe, .. } => {
                    next.builder = Some(me.clone());
                    next.message = Some(format!(
                        "resumed on server {me} (server {builder} stopped while building it)"
                    ));
                    Some(recipe.clone())
                }
                _ => {
                    next.state = ImageState::Failed;
                    next.builder = None;
                    next.files.clear();
                    next.message = Some(format!(
                        "the upload to server {builder} was interrupted when that server stopped; delete the image and import it again"
                    ));
                    None
                }
            };
            let key = keys::image(&image.image_ref());
            let out = self
                .store
                .txn(
                    vec![skyvisor_store::Compare::ModRevision(key.clone(), rev)],
                    vec![skyvisor_store::put_json(key, &next)],
                )
                .await?;
            if !out.succeeded {
                continue;
            }
            settled += 1;
            match resume {
                Some(recipe) => {
                    info!(image = %image.name, %builder, "resuming an image build its server left");
                    let cp = self.clone();
                    tokio::spawn(async move { cp.run_build(next, &recipe).await });
                }
                None => {
                    warn!(image = %image.name, %builder, "an image upload was interrupted by its server's death");
                }
            }
        }
        Ok(settled)
    }

    async fn run_build(&self, mut image: Image, recipe: &str) {
        let name = image.name.clone();
        let final_dir = self.image_dir(&image.image_ref());
        let tmp_dir = self
            .config
            .data_dir
            .join("images")
            .join(format!(".build-{name}-{}", uuid::Uuid::new_v4().simple()));
        let result = self
            .build_into(&mut image, recipe, &tmp_dir, &final_dir)
            .await;
        image.builder = None;
        match result {
            Ok(()) => {
                image.state = ImageState::Ready;
                image.message = None;
                info!(image = %name, "image built");
            }
            Err(msg) => {
                let _ = tokio::fs::remove_dir_all(&tmp_dir).await;
                warn!(image = %name, error = %msg, "image build failed");
                image.state = ImageState::Failed;
                image.message = Some(msg);
                image.files.clear();
            }
        }
        if let Err(e) = self.record_image(&image).await {
            warn!(image = %name, error = %e, "could not record image build result");
        }
    }

    async fn build_into(
        &self,
        image: &mut Image,
        recipe: &str,
        tmp_dir: &Path,
        final_dir: &Path,
    ) -> Result<(), String> {
        let guest_binary = self
            .config
            .guest_binary
            .clone()
            .or_else(skyvisor_image::guest_binary_near_current_exe)
            .ok_or("cannot find the skyvisor-guest binary next to skyvisor; build the workspace (cargo build) or set guest_binary in the config")?;
        tokio::fs::create_dir_all(tmp_dir)
            .await
            .map_err(|e| format!("creating {}: {e}", tmp_dir.display()))?;
        let opts = skyvisor_image::BuildOptions {
            cache_dir: self.config.cache_dir.clone(),
            guest_binary,
            disk_size_bytes: 1 << 30,
        };
        // Progress goes to the record, at most every 500 ms.
        let (tx, mut rx) = tokio::sync::watch::channel(String::from("starting"));
        let store = self.store.clone();
        let progress_image = image.clone();
        let reporter = tokio::spawn(async move {
            let mut img = progress_image;
            let mut last = Instant::now() - Duration::from_secs(1);
            while rx.changed().await.is_ok() {
                let msg = rx.borrow_and_update().clone();
                if last.elapsed() >= Duration::from_millis(500) {
                    img.message = Some(msg);
                    let _ = store
                        .put(&keys::image(&img.image_ref()), encode(&img))
                        .await;
                    last = Instant::now();
                }
            }
        });
        let progress = move |p: skyvisor_image::BuildProgress| {
            let _ = tx.send(p.to_string());
        };
        let built = if recipe == skyvisor_image::CLOUD_RECIPE {
            let built = skyvisor_image::build_cloud_disk(tmp_dir, &opts, &progress).await;
            built.map(|b| (vec![(FileRole::Disk, b.disk)], b.packages, None))
        } else if recipe == skyvisor_image::ROOTFS_RECIPE {
            let built = skyvisor_image::build_rootfs(tmp_dir, &opts, &progress).await;
            built.map(|b| (vec![(FileRole::Rootfs, b.rootfs)], b.packages, None))
        } else {
            let built = skyvisor_image::build(recipe, tmp_dir, &opts, &progress).await;
            built.map(|b| {
                (
                    vec![
                        (FileRole::Kernel, b.kernel),
                        (FileRole::Initrd, b.initrd),
                        (FileRole::Disk, b.disk),
                    ],
                    b.packages,
                    Some(b.cmdline),
                )
            })
        };
        drop(progress);
        let _ = reporter.await;
        let (built, packages, cmdline) = built.map_err(|e| format!("build failed: {e}"))?;
        let mut files = Vec::new();
        for (role, path) in &built {
            let role = *role;
            let file_name = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .ok_or_else(|| format!("build produced no file for {role:?}"))?;
            // Builds may leave files anywhere under out_dir; gather them.
            let dest = tmp_dir.join(&file_name);
            if path != &dest {
                tokio::fs::rename(path, &dest)
                    .await
                    .map_err(|e| format!("moving {}: {e}", path.display()))?;
            }
            files.push(describe_file(tmp_dir, role, &file_name).await?);
        }
        let _ = tokio::fs::remove_dir_all(final_dir).await;
        if let Some(parent) = final_dir.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        tokio::fs::rename(tmp_dir, final_dir)
            .await
            .map_err(|e| format!("publishing image: {e}"))?;
        image.files = files;
        image.cmdline = cmdline;
        image.source = ImageSource::Recipe {
            recipe: recipe.to_string(),
            packages,
        };
        Ok(())
    }

    /// Ensures public image `name` exists, building it from `recipe` if
    /// not; waits until it is ready, calling `progress` with build messages.
    pub async fn ensure_image(
        &self,
        name: &str,
        recipe: &str,
        progress: impl Fn(&str),
    ) -> ApiResult<Image> {
        let image_name = ImageRef::new(default_project(), ImageName::new(name)?);
        match self
            .store
            .get_json::<Image>(&keys::image(&image_name))
            .await?
        {
            Some((img, _)) if img.state == ImageState::Failed => {
                self.store.delete(&keys::image(&image_name)).await?;
                self.build_image(name, recipe, &default_project(), true)
                    .await?;
            }
            Some(_) => {}
            None => {
                self.build_image(name, recipe, &default_project(), true)
                    .await?;
            }
        }
        let mut last = String::new();
        loop {
            let Some((img, _)) = self
                .store
                .get_json::<Image>(&keys::image(&image_name))
                .await?
            else {
                return Err(ApiError::internal(format!(
                    "image {name} vanished while building"
                )));
            };
            match img.state {
                ImageState::Ready => return Ok(img),
                ImageState::Failed => {
                    return Err(ApiError::internal(format!(
                        "image {name} failed to build: {}",
                        img.message.unwrap_or_default()
                    )));
                }
                ImageState::Building => {
                    let msg = img.message.unwrap_or_default();
                    if msg != last {
                        progress(&msg);
                        last = msg;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes `image`'s record; one that is ready is recorded as an event
    /// too (its storage is metered from then).
    pub(crate) async fn record_image(&self, image: &Image) -> Result<(), StoreError> {
        let mut ops = vec![Op::Put {
            key: keys::image(&image.image_ref()),
            value: encode(image),
            lease: None,
        }];
        if image.state == ImageState::Ready {
            ops.push(crate::events::op(Event::image(
                EventKind::Ready,
                image,
                format!("ready: {} file(s)", image.files.len()),
            )));
        }
        self.store.txn(vec![], ops).await.map(drop)
    }

    /// Deletes an image no instance uses.
    pub async fn delete_image(&self, image: &Image) -> ApiResult<()> {
        let name = &image.name;
        if image.state == ImageState::Building {
            return Err(ApiError::conflict(format!(
                "image \"{name}\" is still being built"
            )));
        }
        let users: Vec<String> = self
            .inventory
            .instances()
            .await
            .into_iter()
            // Its own project's VMs, and for a public one any VM of that
            // image name (conservative where a project's own image of the
            // name shadows it).
            .filter(|s| &s.image == name && (s.project == image.project || image.public))
            .map(|s| s.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "image \"{name}\" is used by instances {}; delete them first",
                users.join(", ")
            )));
        }
        let mut ops = vec![Op::Delete(keys::image(&image.image_ref()))];
        if image.state == ImageState::Ready {
            ops.push(crate::events::op(Event::image(
                EventKind::Deleted,
                image,
                "deleted",
            )));
        }
        self.store.txn(vec![], ops).await?;
        let dir = self.image_dir(&image.image_ref());
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(image = %name, error = %e, "could not remove image files");
        }
        Ok(())
    }

    /// The path of one file of a ready image, for serving it to agents.
    /// A file this server lacks (the image was made on another server and
    /// not copied yet) is copied from a peer first, unless `from_peers` is
    /// false (the request comes from a peer).
    pub async fn image_file_path(
        &self,
        image: &Image,
        file_name: &str,
        from_peers: bool,
    ) -> ApiResult<PathBuf> {
        let name = &image.name;
        if image.state != ImageState::Ready {
            return Err(ApiError::conflict(format!("image \"{name}\" is not ready")));
        }
        let Some(file) = image.files.iter().find(|f| f.file_name == file_name) else {
            return Err(ApiError::not_found(format!(
                "image \"{name}\" has no file {file_name:?}"
            )));
        };
        let path = self.image_dir(&image.image_ref()).join(file_name);
        let here = tokio::fs::metadata(&path)
            .await
            .is_ok_and(|m| m.len() == file.size_bytes);
        if !here {
            if !from_peers {
                return Err(ApiError::not_found(format!(
                    "this server has no copy of file {file_name:?} of image \"{name}\" yet"
                )));
            }
            crate::image_sync::ensure_local(self, image)
                .await
                .map_err(ApiError::unavailable)?;
        }
        Ok(path)
    }
}

/// Shared handle used by the import endpoint to publish a finished upload.
pub(crate) async fn publish_import(
    cp: &ControlPlane,
    image: &Image,
    tmp_dir: &Path,
) -> ApiResult<()> {
    let final_dir = cp.image_dir(&image.image_ref());
    let _ = tokio::fs::remove_dir_all(&final_dir).await;
    if let Some(parent) = final_dir.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| storage_error("publishing the image", &e))?;
    }
    tokio::fs::rename(tmp_dir, &final_dir)
        .await
        .map_err(|e| storage_error("publishing the image", &e))?;
    cp.record_image(image).await?;
    Ok(())
}

/// Removes a temporary directory when dropped unless disarmed: an upload or
/// build that fails half-way leaves nothing behind.
pub(crate) struct TempDirGuard(pub Option<PathBuf>);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
