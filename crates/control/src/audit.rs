//! The audit trail: every request that may change something, with who sent
//! it, in which project, and its answer — refusals included. Written after
//! the answer, off the request's path, so it adds no latency; a write that
//! fails is logged, never fails the request. The leader prunes records
//! older than the retention (`--audit-retention-days`, default 90) and
//! beyond the newest [`MAX_KEPT`] of each project.

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

/// The writer of the trail (see [`crate::queued`]).
#[derive(Clone)]
pub struct AuditLog {
    writer: crate::queued::QueuedWriter,
}

impl AuditLog {
    /// A trail written to `store` by a task of its own, which ends when
    /// every `AuditLog` handle is gone.
    pub fn start(store: std::sync::Arc<dyn Store>) -> Self {
        Self {
            writer: crate::queued::QueuedWriter::start(store, "audit entries"),
        }
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
        // Time-ordered keys; the random tail keeps two records of one
        // nanosecond apart.
        let key = format!(
            "{}{:020}-{:08x}",
            keys::audit_prefix(rec.project.as_ref()),
            rec.at.timestamp_nanos_opt().unwrap_or_default(),
            rand::random::<u32>()
        );
        self.writer.write(skyvisor_store::Op::Put {
            key,
            value: encode(&rec),
            lease: None,
        });
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

/// How long the trail keeps a record by default.
pub const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// Most records the trail keeps per project (and cluster-wide), newest.
pub const MAX_KEPT: usize = 100_000;

/// How often the leader prunes the trail (and the event record).
pub(crate) const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Prunes the trail on the leader, forever.
pub(crate) async fn run_retention(cp: crate::ControlPlane) {
    loop {
        tokio::time::sleep(PRUNE_EVERY).await;
        if !cp.leads_now() {
            continue;
        }
        match prune(
            cp.store.as_ref(),
            cp.config.audit_retention,
            MAX_KEPT,
            Utc::now(),
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "pruned the audit trail"),
            Err(e) => tracing::warn!(error = %e.message, "cannot prune the audit trail"),
        }
    }
}

/// Deletes the records older than `retention` before `now`, and beyond the
/// newest `keep` of each project (and of the cluster-wide trail). Returns
/// how many it deleted.
pub async fn prune(
    store: &dyn Store,
    retention: std::time::Duration,
    keep: usize,
    now: chrono::DateTime<Utc>,
) -> ApiResult<usize> {
    prune_prefix(store, keys::AUDIT, retention, keep, now).await
}

/// [`prune`] for a record laid out as `<prefix><scope>/<nanos>-<random>`.
async fn prune_prefix(
    store: &dyn Store,
    prefix: &str,
    retention: std::time::Duration,
    keep: usize,
    now: chrono::DateTime<Utc>,
) -> ApiResult<usize> {
    let listing = store.list(prefix).await?;
    let oldest = now
        - chrono::Duration::from_std(retention).unwrap_or_else(|_| chrono::Duration::days(36500));
    let oldest_nanos = oldest.timestamp_nanos_opt().unwrap_or(i64::MIN);
    // Keys are `<prefix><scope>/<nanos>-<random>`, in time order per scope.
    let mut by_scope: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for kv in &listing.items {
        let rest = kv.key.strip_prefix(prefix).unwrap_or(&kv.key);
        let scope = rest.split('/').next().unwrap_or_default();
        by_scope.entry(scope).or_default().push(&kv.key);
    }
    let mut doomed = Vec::new();
    for keys_of_scope in by_scope.values() {
        let over = keys_of_scope.len().saturating_sub(keep);
        for (i, key) in keys_of_scope.iter().enumerate() {
            let nanos = key
                .rsplit('/')
                .next()
                .and_then(|tail| tail.split('-').next())
                .and_then(|n| n.parse::<i64>().ok());
            let expired = nanos.is_some_and(|n| n < oldest_nanos);
            if i < over || expired {
                doomed.push(skyvisor_store::Op::Delete((*key).to_string()));
            }
        }
    }
    let deleted = doomed.len();
    for chunk in doomed.chunks(BATCH) {
        store.txn(vec![], chunk.to_vec()).await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_store::EmbeddedStore;

    async fn put(store: &dyn Store, scope: &str, at: chrono::DateTime<Utc>, n: u32) {
        let key = format!(
            "{}{scope}/{:020}-{n:08x}",
            keys::AUDIT,
            at.timestamp_nanos_opt().unwrap_or_default()
        );
        store.put(&key, b"{}".to_vec()).await.expect("put");
    }

    #[tokio::test]
    async fn pruning_drops_what_is_too_old_and_beyond_the_newest_kept() {
        let store = EmbeddedStore::in_memory().expect("store");
        let now = Utc::now();
        // Project web: 3 old records and 5 recent; the cluster: 2 recent.
        for i in 0..3 {
            put(
                &store,
                "web",
                now - chrono::Duration::days(100) + chrono::Duration::seconds(i),
                i as u32,
            )
            .await;
        }
        for i in 0..5 {
            put(
                &store,
                "web",
                now - chrono::Duration::minutes(10 - i),
                10 + i as u32,
            )
            .await;
        }
        for i in 0..2 {
            put(
                &store,
                "_cluster",
                now - chrono::Duration::minutes(i),
                i as u32,
            )
            .await;
        }
        let retention = std::time::Duration::from_secs(90 * 24 * 3600);
        let deleted = prune(&store, retention, 4, now).await.expect("prune");
        // The 3 old ones, and the oldest recent one beyond 4 kept.
        assert_eq!(deleted, 4);
        let left = store
            .list(&format!("{}web/", keys::AUDIT))
            .await
            .expect("list");
        assert_eq!(left.items.len(), 4);
        // What is left is the newest four of web's recent records.
        let first_kept = format!(
            "{:020}",
            (now - chrono::Duration::minutes(9))
                .timestamp_nanos_opt()
                .unwrap_or_default()
        );
        assert!(
            left.items
                .iter()
                .all(|kv| kv.key.rsplit('/').next().unwrap_or_default() >= first_kept.as_str()),
            "an older record was kept: {:?}",
            left.items.iter().map(|kv| &kv.key).collect::<Vec<_>>()
        );
        let cluster = store
            .list(&format!("{}_cluster/", keys::AUDIT))
            .await
            .expect("list");
        assert_eq!(cluster.items.len(), 2, "the cluster trail is kept apart");
        // Nothing more to do the second time.
        assert_eq!(prune(&store, retention, 4, now).await.expect("prune"), 0);
    }
}
