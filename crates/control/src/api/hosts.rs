//! `/v1/hosts`: the pool's hosts, their capacity and allocation; cordon.

use axum::Json;
use axum::extract::{Path, State};
use skyvisor_core::api::ErrorBody;
use skyvisor_core::{HostName, HostState, HostView, keys};
use skyvisor_store::{StoreExt, encode};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};
use crate::inventory::HostEntry;

fn view(e: HostEntry) -> HostView {
    let state = e.state();
    HostView {
        free: e.host.capacity.allocatable.minus(e.allocated),
        host: std::sync::Arc::unwrap_or_clone(e.host),
        state,
        allocated: e.allocated,
        instances: e.instances,
    }
}

/// The view of host `name`, or 404.
pub(super) async fn view_of(cp: &ControlPlane, name: &str) -> ApiResult<HostView> {
    Ok(view(find(cp, name.to_string()).await?))
}

/// All hosts.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, body = Vec<HostView>)))]
pub(super) async fn list(State(cp): State<ControlPlane>) -> Json<Vec<HostView>> {
    Json(cp.inventory.hosts().await.into_iter().map(view).collect())
}

async fn find(cp: &ControlPlane, name: String) -> ApiResult<HostEntry> {
    let name = HostName::new(name)?;
    cp.inventory
        .host(&name)
        .await
        .ok_or_else(|| ApiError::not_found(format!("host \"{name}\" not found")))
}

/// One host.
#[utoipa::path(get, path = "/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> ApiResult<Json<HostView>> {
    Ok(Json(view(find(&cp, name).await?)))
}

/// Stops new VMs from landing on a host.
#[utoipa::path(post, path = "/v1/hosts/{name}/cordon", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)))]
pub(super) async fn cordon(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> ApiResult<Json<HostView>> {
    let host = find(&cp, name).await?;
    let rev = cp
        .store
        .put(
            &keys::host_state(&host.host.name),
            encode(&HostState::Cordoned),
        )
        .await?;
    cp.inventory.wait_for(rev, crate::READ_YOUR_WRITES).await;
    Ok(Json(view(find(&cp, host.host.name.to_string()).await?)))
}

/// Lets new VMs land on a host again.
#[utoipa::path(post, path = "/v1/hosts/{name}/uncordon", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)))]
pub(super) async fn uncordon(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> ApiResult<Json<HostView>> {
    let host = find(&cp, name).await?;
    let rev = cp.store.delete(&keys::host_state(&host.host.name)).await?;
    cp.inventory.wait_for(rev, crate::READ_YOUR_WRITES).await;
    Ok(Json(view(find(&cp, host.host.name.to_string()).await?)))
}
