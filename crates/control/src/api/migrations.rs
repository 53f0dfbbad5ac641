//! `/v1/migrations`, `/v1/instances/{name}/migrate` and host maintenance:
//! live migration, drain and rebalance.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use skyvisor_core::api::{ErrorBody, MigrateInstanceRequest, RebalancePlan, RebalanceRequest};
use skyvisor_core::{HostView, Migration, MigrationReason};

use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// Live-migrates a running instance to another host (the scheduler picks
/// one unless `to` names it). Poll the returned migration for progress.
#[utoipa::path(post, path = "/v1/instances/{name}/migrate", tag = "migrations",
    params(("name" = String, Path, description = "instance name")),
    request_body(content = MigrateInstanceRequest, description = "optional"),
    responses((status = 202, body = Migration), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn migrate(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Migration>)> {
    let req: MigrateInstanceRequest = super::extract::optional_body(&body)?;
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            cp.migrate_instance(&caller.project, &name, req, MigrationReason::Manual)
                .await?,
        ),
    ))
}

/// Cancels an instance's migration in flight; it stays on its source.
#[utoipa::path(post, path = "/v1/instances/{name}/migrate/cancel", tag = "migrations",
    params(("name" = String, Path, description = "instance name")),
    responses((status = 202, body = Migration), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn cancel(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Migration>)> {
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.cancel_migration(&caller.project, &name).await?),
    ))
}

/// All migrations, newest first.
#[utoipa::path(get, path = "/v1/migrations", tag = "migrations",
    responses((status = 200, body = Vec<Migration>)))]
pub(super) async fn list(State(cp): State<ControlPlane>) -> ApiResult<Json<Vec<Migration>>> {
    Ok(Json(cp.migrations().await?))
}

/// One migration.
#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "migration id")),
    responses((status = 200, body = Migration), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<Migration>> {
    Ok(Json(cp.migration(&id).await?))
}

/// Puts a host in maintenance: no new VMs land there and its running VMs
/// are live-migrated away, one at a time.
#[utoipa::path(post, path = "/v1/hosts/{name}/drain", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses((status = 202, body = HostView), (status = 404, body = ErrorBody)))]
pub(super) async fn drain(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<HostView>)> {
    cp.drain_host(&name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(super::hosts::view_of(&cp, &name).await?),
    ))
}

/// Returns a drained host to service.
#[utoipa::path(post, path = "/v1/hosts/{name}/undrain", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)))]
pub(super) async fn undrain(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> ApiResult<Json<HostView>> {
    cp.undrain_host(&name).await?;
    Ok(Json(super::hosts::view_of(&cp, &name).await?))
}

/// Plans migrations that even out memory allocation across ready hosts;
/// the leader runs them one at a time.
#[utoipa::path(post, path = "/v1/hosts/rebalance", tag = "hosts",
    request_body(content = RebalanceRequest, description = "optional"),
    responses((status = 202, body = RebalancePlan), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn rebalance(
    State(cp): State<ControlPlane>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<RebalancePlan>)> {
    let req: RebalanceRequest = super::extract::optional_body(&body)?;
    Ok((StatusCode::ACCEPTED, Json(cp.rebalance(req).await?)))
}
