//! A store that reports how long each operation took, for metrics: it
//! wraps another and calls an observer after every call. It changes
//! nothing else: the same answers, the same errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{
    Compare, KeyValue, LeaseId, Listing, Op, Revision, Store, StoreError, TxnOutcome, WatchStream,
};

/// Called after each operation with its name (`get`, `list`, `txn`,
/// `watch`, `grant_lease`, `keep_alive`, `revoke_lease`, `compact`), how
/// long it took, and whether it succeeded.
pub type Observer = Arc<dyn Fn(&'static str, Duration, bool) + Send + Sync>;

/// A store whose operations are timed (see the module's documentation).
pub struct ObservedStore {
    inner: Arc<dyn Store>,
    observe: Observer,
}

impl ObservedStore {
    /// `inner`, reporting to `observe`.
    pub fn new(inner: Arc<dyn Store>, observe: Observer) -> Self {
        Self { inner, observe }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let out = call.await;
        (self.observe)(op, started.elapsed(), out.is_ok());
        out
    }
}

#[async_trait]
impl Store for ObservedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.timed("get", self.inner.get(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        self.timed("list", self.inner.list(prefix)).await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        self.timed("txn", self.inner.txn(compares, ops)).await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        self.timed("watch", self.inner.watch(prefix, start_revision))
            .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.timed("grant_lease", self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.timed("keep_alive", self.inner.keep_alive(lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.timed("revoke_lease", self.inner.revoke_lease(lease))
            .await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.timed("compact", self.inner.compact(revision)).await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EmbeddedStore, StoreExt};
    use std::sync::Mutex;

    #[tokio::test]
    async fn every_operation_is_reported_and_answers_are_unchanged() {
        let seen: Arc<Mutex<Vec<(&'static str, bool)>>> = Arc::default();
        let log = seen.clone();
        let store = ObservedStore::new(
            Arc::new(EmbeddedStore::in_memory().expect("store")),
            Arc::new(move |op, _, ok| log.lock().expect("log").push((op, ok))),
        );
        store.put("a", b"1".to_vec()).await.expect("put");
        assert_eq!(store.get("a").await.expect("get").expect("a").value, b"1");
        assert_eq!(store.list("").await.expect("list").items.len(), 1);
        assert!(store.keep_alive(LeaseId(12345)).await.is_err());
        assert_eq!(store.backend(), "embedded");
        assert_eq!(
            *seen.lock().expect("log"),
            [
                ("txn", true),
                ("get", true),
                ("list", true),
                ("keep_alive", false)
            ]
        );
    }
}
