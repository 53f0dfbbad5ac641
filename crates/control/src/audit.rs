//! The audit trail: every request that may change something, with who sent
//! it, in which project, and its answer — refusals included. Written after
//! the answer, off the request's path, so it adds no latency; a write that
//! fails is logged, never fails the request.

use chrono::Utc;
use skyvisor_core::auth::AuditRecord;
use skyvisor_core::{ProjectName, keys};
use skyvisor_store::{Store, StoreExt, encode};

use crate::access::Caller;
use crate::error::ApiResult;

/// Most records one listing returns.
pub const MAX_LIST: usize = 1000;

/// Records one request, in the background.
pub fn record(
    store: std::sync::Arc<dyn Store>,
    caller: &Caller,
    project_scoped: bool,
    method: &str,
    path: &str,
    status: u16,
) {
    let rec = AuditRecord {
        at: Utc::now(),
        identity: caller.principal.identity.name.clone(),
        token_id: caller.principal.token_id.clone(),
        project: project_scoped.then(|| caller.project.clone()),
        method: method.to_string(),
        path: path.to_string(),
        status,
    };
    tracing::info!(
        identity = %rec.identity,
        project = ?rec.project.as_ref().map(|p| p.to_string()),
        method = %rec.method,
        path = %rec.path,
        status = rec.status,
        "audit"
    );
    tokio::spawn(async move {
        // Time-ordered keys; the random tail keeps two records of one
        // nanosecond apart.
        let key = format!(
            "{}{:020}-{:08x}",
            keys::audit_prefix(rec.project.as_ref()),
            rec.at.timestamp_nanos_opt().unwrap_or_default(),
            rand::random::<u32>()
        );
        if let Err(e) = store.put(&key, encode(&rec)).await {
            tracing::warn!(error = %e, "cannot record an audit entry");
        }
    });
}

/// The newest `limit` records of `project` (none: cluster-wide), newest
/// first.
pub async fn list(
    store: &dyn Store,
    project: Option<&ProjectName>,
    limit: usize,
) -> ApiResult<Vec<AuditRecord>> {
    let (items, _) = store
        .list_json::<AuditRecord>(&keys::audit_prefix(project))
        .await?;
    Ok(items
        .into_iter()
        .rev()
        .take(limit.min(MAX_LIST))
        .map(|(r, _)| r)
        .collect())
}
