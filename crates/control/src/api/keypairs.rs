//! `/v1/keypairs`: a project's SSH public keys, for its VMs' users.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::keypair::{CreateKeyPairRequest, CreatedKeyPair, KeyPair};

use super::ApiJson;
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::ApiResult;

/// The project's key pairs, by name.
#[utoipa::path(get, path = "/v1/keypairs", tag = "keypairs",
    responses((status = 200, body = Vec<KeyPair>)))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<KeyPair>>> {
    Ok(Json(cp.key_pairs(&caller.project).await?))
}

/// Imports a public key, or (without `public_key`) makes an Ed25519 pair
/// and returns its private key: once, in this answer only.
#[utoipa::path(post, path = "/v1/keypairs", tag = "keypairs",
    request_body = CreateKeyPairRequest,
    responses(
        (status = 201, body = CreatedKeyPair),
        (status = 400, body = ErrorBody, description = "invalid name or public key (why is said)"),
        (status = 409, body = ErrorBody, description = "duplicate name"),
    ))]
pub(super) async fn create(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateKeyPairRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKeyPair>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.create_key_pair(&caller.project, req).await?),
    ))
}

/// One key pair (its public key and fingerprint).
#[utoipa::path(get, path = "/v1/keypairs/{name}", tag = "keypairs",
    params(("name" = String, Path, description = "key pair name")),
    responses((status = 200, body = KeyPair), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<KeyPair>> {
    Ok(Json(cp.key_pair(&caller.project, &name).await?))
}

/// Deletes a key pair; VMs that were given it keep it.
#[utoipa::path(delete, path = "/v1/keypairs/{name}", tag = "keypairs",
    params(("name" = String, Path, description = "key pair name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cp.delete_key_pair(&caller.project, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
