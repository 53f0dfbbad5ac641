//! `/v1/groups`: instance groups of the request's project (scale-out).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::group::{
    AutoscalePolicy, CreateGroupRequest, Group, ScaleGroupRequest, UpdateGroupRequest,
};

use super::ApiJson;
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// The project's instance groups, by name, with their members.
#[utoipa::path(get, path = "/v1/groups", tag = "groups",
    responses((status = 200, body = Vec<Group>)))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<Group>>> {
    Ok(Json(cp.groups(&caller.project).await?))
}

/// Makes an instance group; its controller then makes `desired` members
/// from the launch template, spread across hosts. Poll the group (or
/// follow the event stream) to see them run.
#[utoipa::path(post, path = "/v1/groups", tag = "groups",
    request_body = CreateGroupRequest,
    responses(
        (status = 201, body = Group),
        (status = 400, body = ErrorBody, description = "invalid name, sizes, template or health check (the field is named)"),
        (status = 404, body = ErrorBody, description = "the template names an image or network that does not exist"),
        (status = 409, body = ErrorBody, description = "duplicate name"),
    ))]
pub(super) async fn create(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateGroupRequest>,
) -> ApiResult<(StatusCode, Json<Group>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.create_group(&caller.project, req).await?),
    ))
}

/// One group with its members and their health.
#[utoipa::path(get, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "group name")),
    responses((status = 200, body = Group), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Group>> {
    Ok(Json(cp.group(&caller.project, &name).await?))
}

/// Changes the launch template or health check; members are replaced one
/// at a time (a new one serves before an old one goes).
#[utoipa::path(patch, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "group name")),
    request_body = UpdateGroupRequest,
    responses((status = 200, body = Group), (status = 404, body = ErrorBody)))]
pub(super) async fn update(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateGroupRequest>,
) -> ApiResult<Json<Group>> {
    Ok(Json(cp.update_group(&caller.project, &name, req).await?))
}

/// Sets the number of members wanted (and optionally new bounds).
#[utoipa::path(post, path = "/v1/groups/{name}/scale", tag = "groups",
    params(("name" = String, Path, description = "group name")),
    request_body = ScaleGroupRequest,
    responses((status = 200, body = Group), (status = 404, body = ErrorBody)))]
pub(super) async fn scale(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ScaleGroupRequest>,
) -> ApiResult<Json<Group>> {
    Ok(Json(cp.scale_group(&caller.project, &name, req).await?))
}

/// Sets the group's autoscaling policy (it replaces the one it had).
#[utoipa::path(put, path = "/v1/groups/{name}/autoscale", tag = "groups",
    params(("name" = String, Path, description = "group name")),
    request_body = AutoscalePolicy,
    responses((status = 200, body = Group), (status = 404, body = ErrorBody)))]
pub(super) async fn set_autoscale(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(policy): ApiJson<AutoscalePolicy>,
) -> ApiResult<Json<Group>> {
    Ok(Json(
        cp.set_group_autoscale(&caller.project, &name, Some(policy))
            .await?,
    ))
}

/// Removes the group's autoscaling policy: it keeps its desired size.
#[utoipa::path(delete, path = "/v1/groups/{name}/autoscale", tag = "groups",
    params(("name" = String, Path, description = "group name")),
    responses((status = 200, body = Group), (status = 404, body = ErrorBody)))]
pub(super) async fn remove_autoscale(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Group>> {
    Ok(Json(
        cp.set_group_autoscale(&caller.project, &name, None).await?,
    ))
}

/// Deletes a group: its members are deleted, then the group. Poll until
/// 404 to see it gone.
#[utoipa::path(delete, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "group name")),
    responses((status = 202, body = Group), (status = 404, body = ErrorBody)))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Group>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.delete_group(&caller.project, &name).await?),
    ))
}
