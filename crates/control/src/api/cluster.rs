//! `/v1/servers` and `/v1/cluster/join`: the cluster's servers and what an
//! agent needs to join; and the guard that answers 503 at once while the
//! store is unreachable.

use axum::Json;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::cluster::{JoinInfo, ServerRecord, versions_compatible};
use skyvisor_core::keys;
use skyvisor_store::StoreExt;
use utoipa::IntoParams;

use super::ApiQuery;
use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// The live servers of the cluster.
#[utoipa::path(get, path = "/v1/servers", tag = "system",
    responses((status = 200, body = Vec<ServerRecord>), (status = 503, body = ErrorBody)))]
pub(super) async fn servers(State(cp): State<ControlPlane>) -> ApiResult<Json<Vec<ServerRecord>>> {
    Ok(Json(live_servers(&cp).await?))
}

/// The live servers, read from the store.
pub(super) async fn live_servers(cp: &ControlPlane) -> ApiResult<Vec<ServerRecord>> {
    let (list, _) = cp.store.list_json::<ServerRecord>(keys::SERVERS).await?;
    Ok(list.into_iter().map(|(s, _)| s).collect())
}

/// Who asks to join.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinQuery {
    /// The joining agent's Skyvisor version.
    version: String,
}

/// What an agent on another host needs to join the cluster: the store's
/// endpoints and the servers. Refused for an agent of another version, and
/// by a server with an embedded store (`skyvisor up`).
#[utoipa::path(get, path = "/v1/cluster/join", tag = "system",
    params(JoinQuery),
    responses(
        (status = 200, body = JoinInfo),
        (status = 409, body = ErrorBody, description = "another version, or no cluster store"),
    ))]
pub(super) async fn join(
    State(cp): State<ControlPlane>,
    ApiQuery(q): ApiQuery<JoinQuery>,
) -> ApiResult<Json<JoinInfo>> {
    let cluster = &cp.config.cluster;
    if cluster.etcd_endpoints.is_empty() {
        return Err(ApiError::conflict(format!(
            "this server keeps its state in an embedded {} store (skyvisor up): agents on other hosts \
             cannot join it; run `skyvisor server --etcd URL` for a cluster",
            cp.store.backend()
        )));
    }
    let version = skyvisor_core::VERSION;
    if !versions_compatible(&q.version, version) {
        return Err(ApiError::conflict(format!(
            "agent version {} cannot join: the cluster runs version {version}; install skyvisor {version} on the host",
            q.version
        )));
    }
    let servers = live_servers(&cp)
        .await?
        .into_iter()
        .map(|s| s.url)
        .collect();
    Ok(Json(JoinInfo {
        version: version.to_string(),
        etcd_endpoints: cluster.etcd_endpoints.clone(),
        etcd_namespace: cluster.etcd_namespace.clone(),
        servers,
    }))
}

/// Paths answered even while the store is unreachable: they say what this
/// server is and how it is doing, from memory.
fn served_without_store(path: &str) -> bool {
    matches!(
        path,
        "/v1/info" | "/v1/openapi.json" | "/v1/types" | "/healthz" | "/metrics"
    ) || !path.starts_with("/v1/")
}

/// Answers 503 at once while the store is unreachable, rather than letting
/// each request wait for its own timeout or serve a view that stopped
/// following the store.
pub(super) async fn require_store(
    State(cp): State<ControlPlane>,
    req: Request,
    next: Next,
) -> Response {
    if !served_without_store(req.uri().path())
        && let Some(why) = cp.store_unavailable()
    {
        return ApiError::unavailable(format!(
            "the state store is unreachable ({why}); the API answers again as soon as it is back. \
             Running VMs are not affected"
        ))
        .into_response();
    }
    next.run(req).await
}

/// `/healthz`: 200 while the store answers, 503 otherwise.
pub(super) async fn healthz(State(cp): State<ControlPlane>) -> Response {
    match cp.store_unavailable() {
        None => "ok".into_response(),
        Some(why) => {
            ApiError::unavailable(format!("the state store is unreachable: {why}")).into_response()
        }
    }
}
