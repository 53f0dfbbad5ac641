//! `/v1/load-balancers`: load balancers of the request's project.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::lb::{CreateLoadBalancerRequest, LoadBalancer};

use super::ApiJson;
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// The project's load balancers, with their backends.
#[utoipa::path(get, path = "/v1/load-balancers", tag = "load-balancers",
    responses((status = 200, body = Vec<LoadBalancer>)))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<LoadBalancer>>> {
    Ok(Json(cp.load_balancers(&caller.project).await?))
}

/// Makes a load balancer for an instance group: an address on the group's
/// network whose listeners spread connections over the group's serving
/// members, served by every host.
#[utoipa::path(post, path = "/v1/load-balancers", tag = "load-balancers",
    request_body = CreateLoadBalancerRequest,
    responses(
        (status = 201, body = LoadBalancer),
        (status = 400, body = ErrorBody, description = "invalid name, listeners or drain time (the field is named)"),
        (status = 404, body = ErrorBody, description = "no such group"),
        (status = 409, body = ErrorBody, description = "duplicate name, or the group is being deleted"),
    ))]
pub(super) async fn create(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateLoadBalancerRequest>,
) -> ApiResult<(StatusCode, Json<LoadBalancer>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.create_load_balancer(&caller.project, req).await?),
    ))
}

/// One load balancer and its backends (active or draining).
#[utoipa::path(get, path = "/v1/load-balancers/{name}", tag = "load-balancers",
    params(("name" = String, Path, description = "load balancer name")),
    responses((status = 200, body = LoadBalancer), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<LoadBalancer>> {
    Ok(Json(cp.load_balancer(&caller.project, &name).await?))
}

/// Deletes a load balancer; its address is freed.
#[utoipa::path(delete, path = "/v1/load-balancers/{name}", tag = "load-balancers",
    params(("name" = String, Path, description = "load balancer name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.delete_load_balancer(&caller.project, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
