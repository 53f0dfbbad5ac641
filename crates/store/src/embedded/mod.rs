//! The embedded store: a [`Store`] on one redb file, for a single host with
//! zero setup (or fully in memory, for tests and benchmarks).
//!
//! - Reads run on tokio's blocking pool in redb read transactions, so a
//!   listing is one consistent snapshot with its revision.
//! - Writes go to one writer thread that commits everything queued at that
//!   moment in one redb transaction with one fsync (group commit), with
//!   redb's default `Durability::Immediate`: a write is acknowledged only
//!   after it is on disk, so it survives a crash of the process (SIGKILL) or
//!   the host. Throughput comes from batching concurrent writers, not from
//!   weaker durability.
//! - Watches are fed from an in-memory history of recent revisions
//!   ([`EmbeddedOptions::history_events`]); history does not survive a
//!   restart, so after reopening, a watch must start after the revision the
//!   store reopened at.
//! - Leases live in memory with deadlines; the writer thread expires them
//!   and deletes their keys in one transaction. Keys bound to leases of a
//!   previous process are deleted when the store is opened.
//!
//! This module must never acknowledge a write that is not durable, and never
//! be opened by two processes at once (redb locks the file).

mod db;
mod history;
mod record;
mod schema;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::backends::InMemoryBackend;
use redb::{Database, ReadableDatabase};
use tokio::sync::oneshot;

use self::db::DbSlot;
use self::history::{Hub, Limits, lock};
use self::schema::{KV, META, REVISION_KEY};
use self::writer::{LeaseEntry, Leases, Request, Writer};
use crate::{
    Compare, KeyValue, LeaseId, Listing, Op, Revision, Store, StoreError, TxnOutcome, WatchStream,
};

#[cfg(test)]
mod tests;

/// Tuning of an [`EmbeddedStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// How many recent events a watch can start from or catch up from.
    /// Older history answers [`StoreError::Compacted`].
    pub history_events: usize,
    /// Upper bound on the memory the history holds, in bytes (roughly: keys
    /// plus values).
    pub history_bytes: usize,
    /// How many revisions a live watcher may fall behind before it has to
    /// catch up from the history.
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_events: 100_000,
            history_bytes: 256 << 20,
            watch_buffer: 4096,
        }
    }
}

/// The embedded store. Share it as `Arc<EmbeddedStore>` or `Arc<dyn Store>`;
/// dropping it stops its writer thread, ends its watch streams and closes
/// the file.
pub struct EmbeddedStore {
    db: Arc<DbSlot>,
    location: Arc<str>,
    hub: Arc<Hub>,
    leases: Leases,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Turns a redb error into [`StoreError::Io`], naming the store.
pub(crate) fn storage_error(location: &str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Io(format!("embedded store {location}: {e}"))
}

impl EmbeddedStore {
    /// Opens (or creates) the store in the redb file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    /// Opens (or creates) the store at `path` with non-default tuning.
    pub fn open_with(path: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        let location: Arc<str> = path.display().to_string().into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Io(format!("creating directory {}: {e}", parent.display()))
            })?;
        }
        let db = Database::builder().create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Io(format!(
                "embedded store {location} is already open (by this or another process)"
            )),
            e => storage_error(&location, &e),
        })?;
        Self::start(db, Some(path.to_owned()), location, options)
    }

    /// A store that lives only in memory and is gone when dropped.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::in_memory_with(EmbeddedOptions::default())
    }

    /// An in-memory store with non-default tuning.
    pub fn in_memory_with(options: EmbeddedOptions) -> Result<Self, StoreError> {
        let location: Arc<str> = "(in memory)".into();
        let db = Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .map_err(|e| storage_error(&location, &e))?;
        Self::start(db, None, location, options)
    }

    fn start(
        db: Database,
        path: Option<PathBuf>,
        location: Arc<str>,
        options: EmbeddedOptions,
    ) -> Result<Self, StoreError> {
        let revision = schema::prepare(&db, &location)?;
        let db = Arc::new(DbSlot::new(db, path, location.clone()));
        let hub = Arc::new(Hub::new(
            revision,
            Limits {
                events: options.history_events.max(1),
                bytes: options.history_bytes,
                live_buffer: options.watch_buffer,
            },
        ));
        let leases: Leases = Arc::new(Mutex::new(HashMap::new()));
        let (requests, receiver) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            location: location.clone(),
            hub: hub.clone(),
            leases: leases.clone(),
            requests: receiver,
        };
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| {
                StoreError::Io(format!("starting the writer thread of {location}: {e}"))
            })?;
        tracing::info!(%location, revision, "embedded store open");
        Ok(EmbeddedStore {
            db,
            location,
            hub,
            leases,
            requests: Some(requests),
            writer: Some(writer),
        })
    }

    /// The revision of the last change the store has published.
    pub fn revision(&self) -> Revision {
        self.hub.head()
    }

    fn closed(&self) -> StoreError {
        StoreError::Unavailable(format!("embedded store {} is closed", self.location))
    }

    /// Hands a request to the writer and waits for its answer.
    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let sender = self.requests.as_ref().ok_or_else(|| self.closed())?;
        sender.send(make(reply)).map_err(|_| self.closed())?;
        answer.await.map_err(|_| self.closed())?
    }

    /// Runs a read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = self.db.clone();
        let location = self.location.clone();
        tokio::task::spawn_blocking(move || f(&*slot.get()?, &location))
            .await
            .map_err(|e| {
                StoreError::Io(format!(
                    "embedded store {}: read task failed: {e}",
                    self.location
                ))
            })?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel stops the writer after its current batch; its
        // end drops the history's sender, which ends every watch stream.
        self.requests.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(location = %self.location, "embedded store writer thread panicked");
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.read(move |db, location| {
            let err = |e: &dyn std::fmt::Display| storage_error(location, e);
            let txn = db.begin_read().map_err(|e| err(&e))?;
            let kv = txn.open_table(KV).map_err(|e| err(&e))?;
            match kv.get(key.as_str()).map_err(|e| err(&e))? {
                Some(v) => record::decode(&key, v.value()).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let prefix = prefix.to_owned();
        self.read(move |db, location| {
            let err = |e: &dyn std::fmt::Display| storage_error(location, e);
            let txn = db.begin_read().map_err(|e| err(&e))?;
            let meta = txn.open_table(META).map_err(|e| err(&e))?;
            let revision = meta
                .get(REVISION_KEY)
                .map_err(|e| err(&e))?
                .map_or(0, |v| v.value());
            let kv = txn.open_table(KV).map_err(|e| err(&e))?;
            let mut items = Vec::new();
            for entry in kv.range::<&str>(prefix.as_str()..).map_err(|e| err(&e))? {
                let (k, v) = entry.map_err(|e| err(&e))?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                items.push(record::decode(key, v.value())?);
            }
            Ok(Listing { items, revision })
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        self.submit(|reply| Request::Txn {
            compares,
            ops,
            reply,
        })
        .await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        history::watch(&self.hub, prefix, start_revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let id = {
            let mut leases = lock(&self.leases);
            let id = loop {
                let id = rand::random::<i64>() & i64::MAX;
                if id != 0 && !leases.contains_key(&id) {
                    break id;
                }
            };
            leases.insert(
                id,
                LeaseEntry {
                    ttl,
                    deadline: Instant::now() + ttl,
                },
            );
            id
        };
        let sender = self.requests.as_ref().ok_or_else(|| self.closed())?;
        sender.send(Request::Wake).map_err(|_| self.closed())?;
        Ok(LeaseId(id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut leases = lock(&self.leases);
        let now = Instant::now();
        match leases.get_mut(&lease.0) {
            Some(entry) if entry.deadline > now => {
                entry.deadline = now + entry.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease.0)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.submit(|reply| Request::Revoke { lease, reply }).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.hub.compact(revision);
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}
