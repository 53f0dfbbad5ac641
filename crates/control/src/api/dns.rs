//! `/v1/dns`: the request's project's names in the internal zone.

use axum::Json;
use axum::extract::State;
use skyvisor_core::dns::DnsZone;

use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// The project's names as its guests resolve them: each instance, group
/// (its serving members) and load balancer, by name and fully qualified.
#[utoipa::path(get, path = "/v1/dns", tag = "dns",
    responses((status = 200, body = DnsZone)))]
pub(super) async fn zone(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<DnsZone>> {
    Ok(Json(cp.dns_zone(&caller.project).await?))
}
