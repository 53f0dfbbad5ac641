//! `/v1/volumes`: create, list, show, grow, delete, replicas, snapshots; and
//! `/v1/instances/{name}/volumes`: attach and detach.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::volume::{
    AttachVolumeRequest, ChangeReplicasRequest, CreateVolumeRequest, CreateVolumeSnapshotRequest,
    GrowVolumeRequest,
};
use skyvisor_core::{Instance, Volume, VolumeSnapshot};

use super::ApiJson;
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// A page of the volume list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// At most this many, in name order; the `x-skyvisor-continue` answer
    /// header then holds the token of the next page.
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The token from the previous page's `x-skyvisor-continue` header.
    #[serde(default, rename = "continue")]
    after: Option<String>,
}

/// The project's volumes, in name order; paged on request.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    params(ListQuery),
    responses(
        (status = 200, body = Vec<Volume>, headers(
            ("x-skyvisor-continue" = String, description = "present when more remain: the next page's token"))),
        (status = 400, body = ErrorBody),
    ))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
    super::ApiQuery(q): super::ApiQuery<ListQuery>,
) -> ApiResult<(axum::http::HeaderMap, Json<Vec<Volume>>)> {
    let all = cp.volumes(&caller.project).await?;
    let (items, headers) =
        super::page::page(all, |v| v.spec.name.as_str(), q.limit, q.after.as_deref())?;
    Ok((headers, Json(items)))
}

/// Creates a replicated volume: one replica on each of `replicas` distinct
/// hosts. Waits until the replicas exist.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes",
    request_body = CreateVolumeRequest,
    responses(
        (status = 201, body = Volume),
        (status = 400, body = ErrorBody, description = "invalid name, size or replica count"),
        (status = 409, body = ErrorBody, description = "duplicate name; not enough hosts with room"),
        (status = 503, body = ErrorBody, description = "the replicas could not be created"),
    ))]
pub(super) async fn create(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.create_volume(&caller.project, req).await?),
    ))
}

/// One volume: replicas, their hosts and states, epoch, primary, VM.
#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    cp.visible_volume(&caller, &name).await?;
    Ok(Json(cp.volume(&caller.project, &name).await?))
}

/// Deletes a volume no VM uses, with its snapshots. Poll until 404.
#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses(
        (status = 202, body = Volume),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "attached to a VM"),
    ))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    cp.visible_volume(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.delete_volume(&caller.project, &name).await?),
    ))
}

/// Grows a volume no running VM uses.
#[utoipa::path(post, path = "/v1/volumes/{name}/grow", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body = GrowVolumeRequest,
    responses(
        (status = 202, body = Volume),
        (status = 400, body = ErrorBody, description = "not larger, or not whole MiB"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "used by a running VM; no room on a replica host"),
    ))]
pub(super) async fn grow(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<GrowVolumeRequest>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    cp.visible_volume(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.grow_volume(&caller.project, &name, req).await?),
    ))
}

/// Adds (`to`), removes (`from`) or moves (both) a replica of a volume.
/// The copy runs in the background: `GET /v1/volumes/{name}` shows its
/// redundancy.
#[utoipa::path(post, path = "/v1/volumes/{name}/replicas", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body = ChangeReplicasRequest,
    responses(
        (status = 202, body = Volume),
        (status = 400, body = ErrorBody, description = "nothing to change, or a bad host name"),
        (status = 404, body = ErrorBody, description = "no such volume or host"),
        (status = 409, body = ErrorBody, description = "no replica there, already one there, host not ready, no room, too many or too few replicas"),
        (status = 503, body = ErrorBody, description = "the volume changed meanwhile"),
    ))]
pub(super) async fn change_replicas(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ChangeReplicasRequest>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    cp.visible_volume(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.change_replicas(&caller.project, &name, req).await?),
    ))
}

/// The snapshots of a volume.
#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = Vec<VolumeSnapshot>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_snapshots(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<VolumeSnapshot>>> {
    cp.visible_volume(&caller, &name).await?;
    Ok(Json(cp.volume_snapshots(&caller.project, &name).await?))
}

/// Takes a crash-consistent snapshot of a volume (I/O paused, every in-sync
/// replica copied at one instant).
#[utoipa::path(post, path = "/v1/volumes/{name}/snapshots", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body = CreateVolumeSnapshotRequest,
    responses(
        (status = 201, body = VolumeSnapshot),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the name is taken"),
    ))]
pub(super) async fn create_snapshot(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<CreateVolumeSnapshotRequest>,
) -> ApiResult<(StatusCode, Json<VolumeSnapshot>)> {
    cp.visible_volume(&caller, &name).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            cp.create_volume_snapshot(&caller.project, &name, req)
                .await?,
        ),
    ))
}

/// Deletes a snapshot of a volume.
#[utoipa::path(delete, path = "/v1/volumes/{name}/snapshots/{snapshot}", tag = "volumes",
    params(
        ("name" = String, Path, description = "volume name"),
        ("snapshot" = String, Path, description = "snapshot name"),
    ),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_snapshot(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    cp.visible_volume(&caller, &name).await?;
    cp.delete_volume_snapshot(&caller.project, &name, &snapshot)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attaches a volume to a VM; a running VM gets it hot-plugged (`vdb`...).
#[utoipa::path(post, path = "/v1/instances/{name}/volumes", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    request_body = AttachVolumeRequest,
    responses(
        (status = 202, body = Instance),
        (status = 404, body = ErrorBody, description = "unknown VM or volume"),
        (status = 409, body = ErrorBody, description = "the volume is attached elsewhere or not available"),
    ))]
pub(super) async fn attach(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AttachVolumeRequest>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    cp.visible_instance(&caller, &name).await?;
    cp.visible_volume(&caller, &req.volume).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            cp.attach_volume(&caller.project, &name, &req.volume)
                .await?,
        ),
    ))
}

/// Detaches a data volume from a VM. A running VM's guest must release the
/// disk; the volume is free once `GET /v1/volumes/{volume}` shows no VM.
#[utoipa::path(delete, path = "/v1/instances/{name}/volumes/{volume}", tag = "instances",
    params(
        ("name" = String, Path, description = "instance name"),
        ("volume" = String, Path, description = "volume name"),
    ),
    responses(
        (status = 202, body = Instance),
        (status = 404, body = ErrorBody, description = "not attached"),
        (status = 409, body = ErrorBody, description = "the VM's root volume"),
    ))]
pub(super) async fn detach(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path((name, volume)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    // Only a volume attached to this VM can be detached, and attaching
    // took one of its own project.
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.detach_volume(&caller.project, &name, &volume).await?),
    ))
}
