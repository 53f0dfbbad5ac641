//! `/v1/servers`, `/v1/cluster/join` and `/v1/cluster/join-tokens`: the
//! cluster's servers, what an agent needs to join and the one-time tokens
//! it joins with; and the guard that answers 503 at once while the
//! store is unreachable.

use axum::Json;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::cluster::{
    CreateJoinTokenRequest, JoinInfo, JoinToken, MAX_JOIN_TOKEN_SECS, ServerRecord,
    versions_compatible,
};
use skyvisor_core::keys;
use skyvisor_store::StoreExt;
use utoipa::IntoParams;

use super::ApiQuery;
use crate::ControlPlane;
use crate::access::Caller;
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
/// endpoints and the servers. Needs a join token (spent by this call) or a
/// cluster admin. Refused for an agent of another version, and by a server
/// with an embedded store (`skyvisor up`).
#[utoipa::path(get, path = "/v1/cluster/join", tag = "system",
    params(JoinQuery),
    responses(
        (status = 200, body = JoinInfo),
        (status = 401, body = ErrorBody, description = "a join token that was used or expired"),
        (status = 409, body = ErrorBody, description = "another version, or no cluster store"),
    ))]
pub(super) async fn join(
    State(cp): State<ControlPlane>,
    caller: Caller,
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
    // A join token serves this one join.
    cp.directory.spend_join_token(&caller.principal).await?;
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

/// Makes a join token: one host may join with it, within its lifetime
/// (`skyvisor agent --server URL --join-token TOKEN`). Shown once.
#[utoipa::path(post, path = "/v1/cluster/join-tokens", tag = "system",
    request_body = CreateJoinTokenRequest,
    responses(
        (status = 201, body = JoinToken),
        (status = 400, body = ErrorBody, description = "a lifetime out of range"),
    ))]
pub(super) async fn create_join_token(
    State(cp): State<ControlPlane>,
    caller: Caller,
    body: axum::body::Bytes,
) -> ApiResult<(axum::http::StatusCode, Json<JoinToken>)> {
    let req: CreateJoinTokenRequest = super::extract::optional_body(&body)?;
    let ttl = req.ttl_secs.unwrap_or(3600);
    if !(1..=MAX_JOIN_TOKEN_SECS).contains(&ttl) {
        return Err(skyvisor_core::ValidationError::new(
            "ttl_secs",
            format!("{ttl} is out of range; allowed: 1 to {MAX_JOIN_TOKEN_SECS} seconds"),
        )
        .into());
    }
    let issued = cp
        .directory
        .create_join_token(
            chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(3600)),
            &caller.principal.identity.name,
        )
        .await?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(JoinToken {
            token: issued.bearer,
            id: issued.record.id,
            expires_at: issued.record.expires_at.unwrap_or_else(chrono::Utc::now),
        }),
    ))
}
