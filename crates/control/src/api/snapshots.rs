//! `/v1/instances/{name}/snapshots`, `/v1/snapshots`, restore and the
//! checkpoint schedule.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use skyvisor_core::api::{
    CreateSnapshotRequest, ErrorBody, RestoreInstanceRequest, ScheduleRequest,
};
use skyvisor_core::{Instance, Snapshot};

use super::ApiJson;
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// Asks for a snapshot: live (memory, devices and disk) of a running VM,
/// of the disk of a stopped one. Poll the snapshot until it is ready.
#[utoipa::path(post, path = "/v1/instances/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "instance name")),
    request_body(content = CreateSnapshotRequest, description = "optional"),
    responses(
        (status = 202, body = Snapshot),
        (status = 400, body = ErrorBody, description = "invalid name"),
        (status = 404, body = ErrorBody, description = "unknown instance"),
        (status = 409, body = ErrorBody, description = "name taken, instance being deleted"),
    ))]
pub(super) async fn create(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    // The body is optional: an empty one means the defaults.
    let req: CreateSnapshotRequest = super::extract::optional_body(&body)?;
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.create_snapshot(&caller.project, &name, req).await?),
    ))
}

/// The instance's snapshots, oldest first (also those of a deleted VM of
/// that name that were kept).
#[utoipa::path(get, path = "/v1/instances/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "instance name")),
    responses((status = 200, body = Vec<Snapshot>), (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Snapshot>>> {
    let mut all = cp.snapshots(&caller.project, Some(&name)).await?;
    all.retain(|s| s.project == caller.project);
    Ok(Json(all))
}

/// Every snapshot.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, body = Vec<Snapshot>)))]
pub(super) async fn list_all(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<Snapshot>>> {
    let mut all = cp.snapshots(&caller.project, None).await?;
    all.retain(|s| s.project == caller.project);
    Ok(Json(all))
}

/// One snapshot.
#[utoipa::path(get, path = "/v1/instances/{name}/snapshots/{snapshot}", tag = "snapshots",
    params(("name" = String, Path, description = "instance name"),
           ("snapshot" = String, Path, description = "snapshot name")),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<Json<Snapshot>> {
    Ok(Json(cp.visible_snapshot(&caller, &name, &snapshot).await?))
}

/// Deletes a snapshot: its host's agent removes the files, then the
/// record. Poll until 404 to see it gone.
#[utoipa::path(delete, path = "/v1/instances/{name}/snapshots/{snapshot}", tag = "snapshots",
    params(("name" = String, Path, description = "instance name"),
           ("snapshot" = String, Path, description = "snapshot name")),
    responses(
        (status = 202, body = Snapshot),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "still being taken"),
    ))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    cp.visible_snapshot(&caller, &name, &snapshot).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            cp.delete_snapshot(&caller.project, &name, &snapshot)
                .await?,
        ),
    ))
}

/// Puts the instance back to one of its snapshots: memory, processes and
/// disk as they were (a full snapshot continues running), or the disk of
/// a disk-only one. What was written after the snapshot is lost.
#[utoipa::path(post, path = "/v1/instances/{name}/restore", tag = "snapshots",
    params(("name" = String, Path, description = "instance name")),
    request_body = RestoreInstanceRequest,
    responses(
        (status = 202, body = Instance),
        (status = 404, body = ErrorBody, description = "unknown instance or snapshot"),
        (status = 409, body = ErrorBody, description = "snapshot not ready, of another VM, or of another size, image or host"),
    ))]
pub(super) async fn restore(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<RestoreInstanceRequest>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.restore_instance(&caller.project, &name, req).await?),
    ))
}

/// Sets (or, with a null schedule, clears) the instance's periodic
/// checkpoints.
#[utoipa::path(put, path = "/v1/instances/{name}/checkpoint-schedule", tag = "snapshots",
    params(("name" = String, Path, description = "instance name")),
    request_body = ScheduleRequest,
    responses(
        (status = 200, body = Instance),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn schedule(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ScheduleRequest>,
) -> ApiResult<Json<Instance>> {
    cp.visible_instance(&caller, &name).await?;
    Ok(Json(
        cp.set_checkpoint_schedule(&caller.project, &name, req.schedule)
            .await?,
    ))
}
