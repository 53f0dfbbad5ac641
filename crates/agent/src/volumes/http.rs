//! The agent's volume endpoints, called by the control plane: snapshots
//! must be taken by the host serving the volume (or, when none does, by
//! one that can open it), so the API routes them here.
//!
//! Errors come back as the API's `ErrorBody` so the server can pass them
//! on. This module must never decide which host acts: the caller chose it.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use skyvisor_core::api::{ErrorBody, ErrorDetail};
use skyvisor_core::{ProjectName, VolumeId, VolumeName, VolumeRef};

use super::{VolumeService, VolumeServiceError};

/// Body of `POST /agent/v1/volumes/{project}/{name}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSnapshotRequest {
    /// The volume's id.
    pub id: VolumeId,
    /// The snapshot's name.
    pub snapshot: String,
}

/// The volume routes.
pub fn router(svc: Arc<VolumeService>) -> Router {
    Router::new()
        .route(
            "/agent/v1/volumes/{project}/{name}/snapshots",
            axum::routing::post(create_snapshot),
        )
        .route(
            "/agent/v1/volumes/{project}/{name}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .with_state(svc)
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message,
                field: None,
            },
        }),
    )
        .into_response()
}

fn map_error(e: VolumeServiceError) -> Response {
    let message = e.to_string();
    match e {
        VolumeServiceError::Snapshot { .. }
        | VolumeServiceError::ServedElsewhere { .. }
        | VolumeServiceError::InUse { .. }
        | VolumeServiceError::NoRecord { .. } => error(StatusCode::CONFLICT, "conflict", message),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
    }
}

fn volume_ref(project: &str, name: &str) -> Option<VolumeRef> {
    Some(VolumeRef::new(
        ProjectName::new(project).ok()?,
        VolumeName::new(name).ok()?,
    ))
}

async fn create_snapshot(
    State(svc): State<Arc<VolumeService>>,
    Path((project, name)): Path<(String, String)>,
    Json(req): Json<AgentSnapshotRequest>,
) -> Response {
    let Some(name) = volume_ref(&project, &name) else {
        return error(StatusCode::BAD_REQUEST, "invalid", "bad volume name".into());
    };
    match svc.snapshot(&name, &req.id, &req.snapshot).await {
        Ok(s) => (StatusCode::CREATED, Json(s)).into_response(),
        Err(e) => map_error(e),
    }
}

async fn delete_snapshot(
    State(svc): State<Arc<VolumeService>>,
    Path((project, name, snapshot)): Path<(String, String, String)>,
) -> Response {
    let Some(name) = volume_ref(&project, &name) else {
        return error(StatusCode::BAD_REQUEST, "invalid", "bad volume name".into());
    };
    match svc.delete_snapshot(&name, &snapshot).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => map_error(e),
    }
}
