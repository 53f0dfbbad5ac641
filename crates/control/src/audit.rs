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

/// Most records written in one transaction.
const BATCH: usize = 256;

/// The writer of the trail: records queue in memory and a task writes
/// whatever has queued in one store transaction, so a burst of requests
/// costs a few writes, not one each.
#[derive(Clone)]
pub struct AuditLog {
    queue: tokio::sync::mpsc::UnboundedSender<AuditRecord>,
}

impl AuditLog {
    /// A trail written to `store` by a task of its own, which ends when
    /// every `AuditLog` handle is gone.
    pub fn start(store: std::sync::Arc<dyn Store>) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<AuditRecord>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let ops = batch
                    .iter()
                    .map(|rec| {
                        // Time-ordered keys; the random tail keeps two
                        // records of one nanosecond apart.
                        let key = format!(
                            "{}{:020}-{:08x}",
                            keys::audit_prefix(rec.project.as_ref()),
                            rec.at.timestamp_nanos_opt().unwrap_or_default(),
                            rand::random::<u32>()
                        );
                        skyvisor_store::Op::Put {
                            key,
                            value: encode(rec),
                            lease: None,
                        }
                    })
                    .collect();
                if let Err(e) = store.txn(vec![], ops).await {
                    tracing::warn!(error = %e, records = batch.len(), "cannot record audit entries");
                }
            }
        });
        Self { queue }
    }

    /// Records one request.
    pub fn record(
        &self,
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
        let _ = self.queue.send(rec);
    }
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
