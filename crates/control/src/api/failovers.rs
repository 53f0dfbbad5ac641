//! `/v1/failovers`: every failover of an instance after its host died, and
//! every refusal to fail one over, with the reason.

use axum::Json;
use axum::extract::State;
use skyvisor_core::FailoverRecord;

use crate::ControlPlane;
use crate::error::ApiResult;

/// Every failover and refusal, oldest first.
#[utoipa::path(get, path = "/v1/failovers", tag = "failovers",
    responses((status = 200, body = Vec<FailoverRecord>),
        (status = 503, body = skyvisor_core::api::ErrorBody, description = "the state store is unreachable")))]
pub(super) async fn list(State(cp): State<ControlPlane>) -> ApiResult<Json<Vec<FailoverRecord>>> {
    Ok(Json(cp.failovers().await?))
}
