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
use std::path::PathBuf;

use skyvisor_core::volume::SnapshotConsistency;
use skyvisor_core::{InstanceId, ProjectName, VolumeId, VolumeName, VolumeRef};

use super::{VolumeService, VolumeServiceError, freeze};

/// Body of `POST /agent/v1/volumes/{project}/{name}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSnapshotRequest {
    /// The volume's id.
    pub id: VolumeId,
    /// The snapshot's name.
    pub snapshot: String,
    /// The VM using the volume, if one does: its file systems are frozen
    /// for the snapshot if it runs here with a guest agent.
    #[serde(default)]
    pub instance: Option<InstanceId>,
}

/// What the volume routes need.
#[derive(Clone)]
struct Routes {
    svc: Arc<VolumeService>,
    /// Where each local VM's run directory is (its guest agent's socket
    /// is in it), by instance id.
    vm_dir: Arc<dyn Fn(&InstanceId) -> PathBuf + Send + Sync>,
}

/// The volume routes; `vm_dir` gives a local VM's run directory.
pub fn router(
    svc: Arc<VolumeService>,
    vm_dir: Arc<dyn Fn(&InstanceId) -> PathBuf + Send + Sync>,
) -> Router {
    let routes = Routes { svc, vm_dir };
    Router::new()
        .route(
            "/agent/v1/volumes/{project}/{name}/snapshots",
            axum::routing::post(create_snapshot),
        )
        .route(
            "/agent/v1/volumes/{project}/{name}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .with_state(routes)
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
    State(routes): State<Routes>,
    Path((project, name)): Path<(String, String)>,
    Json(req): Json<AgentSnapshotRequest>,
) -> Response {
    let Some(name) = volume_ref(&project, &name) else {
        return error(StatusCode::BAD_REQUEST, "invalid", "bad volume name".into());
    };
    let frozen = match req.instance {
        Some(id) => freeze::FrozenGuest::freeze(&(routes.vm_dir)(&id), &name).await,
        None => None,
    };
    let consistency = if frozen.is_some() {
        SnapshotConsistency::FileSystem
    } else {
        SnapshotConsistency::Crash
    };
    let taken = routes
        .svc
        .snapshot(&name, &req.id, &req.snapshot, consistency)
        .await;
    if let Some(f) = frozen {
        f.thaw().await;
    }
    match taken {
        Ok(s) => (StatusCode::CREATED, Json(s)).into_response(),
        Err(e) => map_error(e),
    }
}

async fn delete_snapshot(
    State(Routes { svc, .. }): State<Routes>,
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
