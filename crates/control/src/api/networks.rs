//! `/v1/networks` and `/v1/security-groups`: a project's private networks
//! and the groups whose rules say what reaches its instances.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use skyvisor_core::api::{
    CreateNetworkRequest, CreateSecurityGroupRequest, ErrorBody, SecurityRulesRequest,
};
use skyvisor_core::{Network, SecurityGroup};

use super::ApiJson;
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::{ApiError, ApiResult};

/// The project's networks, by name (the `default` network appears once an
/// instance used it, or once created).
#[utoipa::path(get, path = "/v1/networks", tag = "networks",
    responses((status = 200, body = Vec<Network>)))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<Network>>> {
    Ok(Json(cp.networks(&caller.project).await?))
}

/// Creates a private network: its own VXLAN segment and subnet (default
/// 10.0.0.0/24; other projects may use the same range), reachable from no
/// other project.
#[utoipa::path(post, path = "/v1/networks", tag = "networks",
    request_body = CreateNetworkRequest,
    responses(
        (status = 201, body = Network),
        (status = 400, body = ErrorBody, description = "invalid name or subnet"),
        (status = 409, body = ErrorBody, description = "duplicate name; the cluster has no free network id"),
    ))]
pub(super) async fn create(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateNetworkRequest>,
) -> ApiResult<(StatusCode, Json<Network>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.create_network(&caller.project, req).await?),
    ))
}

/// One network.
#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "network name")),
    responses((status = 200, body = Network), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Network>> {
    cp.find_network(&caller.project, &name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("network \"{name}\" not found")))
}

/// Deletes a network no instance uses; refused, naming them, otherwise.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "network name")),
    responses(
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "instances use it; the cluster network"),
    ))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.delete_network(&caller.project, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The project's security groups, by name.
#[utoipa::path(get, path = "/v1/security-groups", tag = "networks",
    responses((status = 200, body = Vec<SecurityGroup>)))]
pub(super) async fn list_groups(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<SecurityGroup>>> {
    Ok(Json(cp.security_groups(&caller.project).await?))
}

/// Creates a security group. Without rules it lets in everything from its
/// own members and nothing else.
#[utoipa::path(post, path = "/v1/security-groups", tag = "networks",
    request_body = CreateSecurityGroupRequest,
    responses(
        (status = 201, body = SecurityGroup),
        (status = 400, body = ErrorBody, description = "invalid name or rule (the field is named)"),
        (status = 409, body = ErrorBody, description = "duplicate name; a rule names a group the project does not have"),
    ))]
pub(super) async fn create_group(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateSecurityGroupRequest>,
) -> ApiResult<(StatusCode, Json<SecurityGroup>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.create_security_group(&caller.project, req).await?),
    ))
}

/// One security group with its rules.
#[utoipa::path(get, path = "/v1/security-groups/{name}", tag = "networks",
    params(("name" = String, Path, description = "security group name")),
    responses((status = 200, body = SecurityGroup), (status = 404, body = ErrorBody)))]
pub(super) async fn show_group(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<SecurityGroup>> {
    Ok(Json(cp.security_group(&caller.project, &name).await?))
}

/// Replaces a group's rules; hosts apply them to the running members
/// within a second.
#[utoipa::path(put, path = "/v1/security-groups/{name}/rules", tag = "networks",
    params(("name" = String, Path, description = "security group name")),
    request_body = SecurityRulesRequest,
    responses(
        (status = 200, body = SecurityGroup),
        (status = 400, body = ErrorBody, description = "an invalid rule (the field is named)"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "a rule names a group the project does not have"),
    ))]
pub(super) async fn set_rules(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SecurityRulesRequest>,
) -> ApiResult<Json<SecurityGroup>> {
    Ok(Json(
        cp.set_security_rules(&caller.project, &name, req.rules)
            .await?,
    ))
}

/// Deletes a group no instance is in and no other group's rule names.
#[utoipa::path(delete, path = "/v1/security-groups/{name}", tag = "networks",
    params(("name" = String, Path, description = "security group name")),
    responses(
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "instances are in it, or rules name it"),
    ))]
pub(super) async fn delete_group(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.delete_security_group(&caller.project, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
