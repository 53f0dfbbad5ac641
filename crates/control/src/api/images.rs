//! `/v1/images` and `/v1/recipes`: list, show, build, import, delete, and
//! file downloads for agents.

use std::path::PathBuf;

use axum::Json;
use axum::body::Body;
use axum::extract::{Multipart, Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use skyvisor_core::api::{BuildImageRequest, ErrorBody};
use skyvisor_core::image::{FileRole, ImageKind, ImageSource, ImageState};
use skyvisor_core::{Image, ImageName, keys};
use skyvisor_store::{StoreExt, encode};
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};

use super::{ApiJson, ApiQuery};
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::{ApiError, ApiResult};
use crate::images::{TempDirGuard, describe_file, publish_import, storage_error};

/// All images.
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, body = Vec<Image>)))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<Image>>> {
    Ok(Json(cp.visible_images(&caller).await?))
}

/// One image.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(cp.visible_image(&caller, &name).await?))
}

/// Deletes an image no instance uses.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "image name")),
    responses(
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "in use"),
    ))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let image = cp.writable_image(&caller, &name).await?;
    cp.delete_image(&image).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts building an image from a built-in recipe; poll the image until
/// it is `ready`.
#[utoipa::path(post, path = "/v1/images/build", tag = "images",
    request_body = BuildImageRequest,
    responses(
        (status = 202, body = Image),
        (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name taken"),
    ))]
pub(super) async fn build(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<BuildImageRequest>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(
            cp.build_image(&req.name, &req.recipe, &caller.project, false)
                .await?,
        ),
    ))
}

/// A built-in image recipe.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Recipe {
    /// Its name.
    pub name: String,
    /// What it builds.
    pub description: String,
}

/// The built-in image recipes.
#[utoipa::path(get, path = "/v1/recipes", tag = "images",
    responses((status = 200, body = Vec<Recipe>)))]
pub(super) async fn list_recipes() -> Json<Vec<Recipe>> {
    Json(
        skyvisor_image::recipes()
            .into_iter()
            .map(|r| Recipe {
                name: r.name.to_string(),
                description: r.description.to_string(),
            })
            .collect(),
    )
}

/// Options of an import.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ImportQuery {
    /// Name of the new image.
    name: String,
    /// One line for people.
    #[serde(default)]
    description: Option<String>,
    /// Kernel command line (kernel+initrd images).
    #[serde(default)]
    cmdline: Option<String>,
    /// Whether the guest runs Skyvisor's guest service on port 80.
    #[serde(default)]
    guest_service: bool,
    /// The user cloud-init gives the VM's SSH keys (for the `ssh` command
    /// `vm show` prints; e.g. `debian`, `ubuntu`, `fedora`).
    #[serde(default)]
    ssh_user: Option<String>,
    /// The image runs cloud-init and the QEMU guest agent: a VM is ready
    /// once cloud-init reports it has finished.
    #[serde(default)]
    cloud_init: bool,
    /// Share it with every project (cluster admins only).
    #[serde(default)]
    public: bool,
}

/// Imports an image from a multipart upload: a part `disk` (qcow2 or raw,
/// booted by firmware), or parts `kernel` and optionally `initrd`, or a
/// part `oci` (an OCI image layout or docker-archive tarball, for
/// containers).
#[utoipa::path(post, path = "/v1/images/import", tag = "images",
    params(ImportQuery),
    request_body(content_type = "multipart/form-data", description = "parts: disk | kernel, initrd | oci"),
    responses(
        (status = 201, body = Image),
        (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name taken"),
        (status = 413, body = ErrorBody, description = "no room in the image store, or larger than the server accepts (`skyvisor server --max-upload`)"),
    ))]
pub(super) async fn import(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ImportQuery>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let name = ImageName::new(q.name)?;
    if q.public && !caller.is_cluster_admin() {
        return Err(ApiError::forbidden(
            "only a cluster admin may import a public image; import it into your project instead",
        ));
    }
    let mut multipart = multipart.map_err(|e| {
        ApiError::invalid(format!(
            "the body must be multipart/form-data with parts disk, or kernel and initrd, or oci: {}",
            e.body_text()
        ))
    })?;
    let placeholder = Image {
        name: name.clone(),
        project: caller.project.clone(),
        public: q.public,
        kind: ImageKind::Disk,
        description: q.description.clone().unwrap_or_default(),
        files: vec![],
        cmdline: q.cmdline.clone(),
        guest_service: q.guest_service,
        ssh_user: q.ssh_user.clone(),
        cloud_init: q.cloud_init,
        process: None,
        source: ImageSource::Import,
        state: ImageState::Building,
        message: Some("uploading".into()),
        builder: Some(cp.config.cluster.name.clone()),
        created_at: Utc::now(),
    };
    cp.refuse_public_name_taken(&placeholder).await?;
    let key = keys::image(&placeholder.image_ref());
    if !cp.store.create(&key, encode(&placeholder)).await? {
        return Err(ApiError::already_exists(format!(
            "image \"{name}\" already exists"
        )));
    }
    let tmp: PathBuf = cp
        .config
        .data_dir
        .join("images")
        .join(format!(".import-{name}-{}", uuid::Uuid::new_v4().simple()));
    let mut guard = TempDirGuard(Some(tmp.clone()));
    let result = receive(&cp, &mut multipart, &tmp, placeholder).await;
    match result {
        Ok(image) => {
            publish_import(&cp, &image, &tmp).await.inspect_err(|_| {
                let store = cp.store.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let _ = store.delete(&key).await;
                });
            })?;
            guard.0 = None;
            Ok((StatusCode::CREATED, Json(image)))
        }
        Err(e) => {
            // Nothing half-created: no record, no files.
            cp.store.delete(&key).await?;
            Err(e)
        }
    }
}

async fn receive(
    cp: &ControlPlane,
    multipart: &mut Multipart,
    tmp: &std::path::Path,
    mut image: Image,
) -> ApiResult<Image> {
    tokio::fs::create_dir_all(tmp)
        .await
        .map_err(|e| storage_error("creating the upload directory", &e))?;
    let max = cp.config.max_upload_bytes;
    let mut received = 0u64;
    let mut roles = Vec::new();
    let mut oci = false;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("bad multipart body: {}", e.body_text())))?
    {
        let role = match field.name() {
            Some("disk") => FileRole::Disk,
            Some("kernel") => FileRole::Kernel,
            Some("initrd") => FileRole::Initrd,
            // An OCI image (layout or docker-archive), flattened below into
            // a container's root file system.
            Some("oci") => FileRole::Rootfs,
            other => {
                return Err(ApiError::invalid(format!(
                    "unexpected part {other:?}; allowed parts: disk, kernel, initrd, oci"
                )));
            }
        };
        if roles.contains(&role) {
            return Err(ApiError::invalid(format!("part {role:?} given twice")));
        }
        let file_name = match role {
            FileRole::Disk => "disk.img",
            FileRole::Kernel => "vmlinuz",
            FileRole::Initrd => "initrd.img",
            FileRole::Rootfs => OCI_UPLOAD,
        };
        let path = tmp.join(file_name);
        let mut f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| storage_error("storing the upload", &e))?;
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| ApiError::invalid(format!("upload interrupted: {}", e.body_text())))?
        {
            received += chunk.len() as u64;
            if received > max {
                return Err(ApiError::too_large(format!(
                    "the upload is larger than this server accepts: at most {max} bytes (all parts together; set with `skyvisor server --max-upload`)"
                )));
            }
            f.write_all(&chunk)
                .await
                .map_err(|e| storage_error("storing the upload", &e))?;
        }
        f.sync_all()
            .await
            .map_err(|e| storage_error("storing the upload", &e))?;
        if role == FileRole::Rootfs {
            roles.push(role);
            oci = true;
            continue;
        }
        let described = describe_file(tmp, role, file_name)
            .await
            .map_err(|m| ApiError::invalid(format!("part {file_name}: {m}")))?;
        if described.size_bytes == 0 {
            return Err(ApiError::invalid(format!("part {file_name} is empty")));
        }
        roles.push(role);
        image.files.push(described);
    }
    if oci {
        if roles.len() > 1 {
            return Err(ApiError::invalid(
                "an oci part comes alone: a container image has no disk, kernel or initrd",
            ));
        }
        return flatten_oci(tmp, image).await;
    }
    let has = |r| roles.contains(&r);
    image.kind = match (
        has(FileRole::Disk),
        has(FileRole::Kernel),
        has(FileRole::Initrd),
    ) {
        (true, false, false) => ImageKind::Disk,
        (_, true, _) => ImageKind::KernelInitrd,
        (false, false, true) => {
            return Err(ApiError::invalid("an initrd needs a kernel part too"));
        }
        (true, false, true) => {
            return Err(ApiError::invalid("an initrd needs a kernel part too"));
        }
        (false, false, false) => {
            return Err(ApiError::invalid(
                "no image given; upload a part disk, or kernel (and initrd)",
            ));
        }
    };
    if image.kind == ImageKind::KernelInitrd && image.cmdline.is_none() {
        image.cmdline = Some("console=ttyS0".into());
    }
    image.state = ImageState::Ready;
    image.builder = None;
    image.message = None;
    Ok(image)
}

/// Where an uploaded OCI image is kept until it is flattened.
const OCI_UPLOAD: &str = "oci-upload.tar";

/// Flattens the uploaded OCI image in `tmp` into a container's root file
/// system (`rootfs.tar.gz`), checking it on the way, and makes `image` a
/// container image that runs the process its configuration names.
async fn flatten_oci(tmp: &std::path::Path, mut image: Image) -> ApiResult<Image> {
    let src = tmp.join(OCI_UPLOAD);
    let dst = tmp.join(skyvisor_image::ROOTFS_FILE);
    let (s, d) = (src.clone(), dst.clone());
    let imported = tokio::task::spawn_blocking(move || skyvisor_image::import_oci(&s, &d))
        .await
        .map_err(|e| ApiError::internal(format!("flattening the OCI image: {e}")))?;
    let _ = tokio::fs::remove_file(&src).await;
    let imported = imported.map_err(|e| match e {
        skyvisor_image::ImageError::Io { ref source, .. } if source.raw_os_error() == Some(28) => {
            storage_error("flattening the OCI image", source)
        }
        e => ApiError::invalid(format!("part oci: {e}")),
    })?;
    let args: Vec<String> = imported
        .entrypoint
        .iter()
        .chain(imported.cmd.iter())
        .cloned()
        .collect();
    if args.is_empty() && !image.guest_service {
        return Err(ApiError::invalid(
            "part oci: the image's configuration names no command (no Entrypoint and no Cmd); a container would have nothing to run",
        ));
    }
    let described =
        crate::images::describe_file(tmp, FileRole::Rootfs, skyvisor_image::ROOTFS_FILE)
            .await
            .map_err(|m| ApiError::invalid(format!("part oci: {m}")))?;
    image.files.push(described);
    image.kind = ImageKind::Rootfs;
    // An image with Skyvisor's guest service runs its `/init`.
    image.process = (!image.guest_service).then_some(skyvisor_core::image::ContainerProcess {
        args,
        env: imported.env,
        working_dir: imported.working_dir,
    });
    image.description = if image.description.is_empty() {
        format!(
            "imported {} image ({} layers, {})",
            imported.format, imported.layers, imported.architecture
        )
    } else {
        image.description
    };
    image.state = ImageState::Ready;
    image.builder = None;
    image.message = None;
    Ok(image)
}

/// Downloads one file of a ready image (agents fetch images this way).
#[utoipa::path(get, path = "/v1/images/{name}/files/{file}", tag = "images",
    params(("name" = String, Path, description = "image name"), ("file" = String, Path, description = "file name")),
    responses((status = 200, content_type = "application/octet-stream"), (status = 404, body = ErrorBody)))]
pub(super) async fn file(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path((name, file)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let image = cp.visible_image(&caller, &name).await?;
    let from_peers = !headers.contains_key(crate::image_sync::NO_PEER_FETCH_HEADER);
    let path = cp.image_file_path(&image, &file, from_peers).await?;
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("opening {}: {e}", path.display())))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    ))
}
