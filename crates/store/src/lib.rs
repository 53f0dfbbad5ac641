//! The state store: every piece of authoritative state in Skyvisor lives
//! behind the [`Store`] trait.
//!
//! Two implementations pass the same conformance suite ([`conformance`]):
//! an embedded one for a single host (zero setup) and etcd for a cluster.
//! The model is etcd's: a flat ordered key space, a global revision that
//! every write bumps, per-key create/mod revisions, transactions guarded by
//! comparisons, watches from a revision, and leases that delete their keys
//! when they expire.
//!
//! This crate must never know what the keys mean; the layout lives in
//! `skyvisor_core::keys`.
//!
//! Modules:
//! - [`embedded`]: the single-host store on a redb file (or in memory);
//! - [`etcd`]: the cluster store on etcd;
//! - [`conformance`]: the checks every [`Store`] must pass;
//! - [`testing`]: a real etcd server started for tests.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod observed;
pub mod testing;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use observed::{ObservedStore, Observer};

/// A point in the store's history. Every successful write bumps it by one.
pub type Revision = i64;

/// The id of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key is bound to, if any.
    pub lease: Option<LeaseId>,
}

/// A consistent listing of a prefix.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The keys under the prefix, in key order.
    pub items: Vec<KeyValue>,
    /// The store revision the listing was read at; watch from `revision + 1`
    /// to see every later change.
    pub revision: Revision,
}

/// A condition a transaction checks before it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals the given one (0: the key is absent).
    ModRevision(String, Revision),
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Absent(String),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set a key, bound to a lease or not.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// Lease to bind it to.
        lease: Option<LeaseId>,
    },
    /// Delete a key (no error when absent).
    Delete(String),
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether all comparisons held and the writes were applied.
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or updated.
    Put(KeyValue),
    /// A key was deleted (directly or by lease expiry).
    Delete {
        /// The key.
        key: String,
        /// Revision of the deletion.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// A stream of changes under a prefix, in revision order.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// What can go wrong talking to a store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time; retry later.
    ///
    /// A write that fails with this error may or may not have been applied
    /// (the request can time out after the server committed it): read again
    /// before deciding what to do.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for history the store no longer keeps; list again.
    #[error("revision {requested} was compacted (oldest kept: {oldest})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available.
        oldest: Revision,
    },
    /// The lease does not exist or has expired.
    #[error("lease {0} not found or expired")]
    LeaseNotFound(i64),
    /// A value could not be decoded.
    #[error("corrupt value at {key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What was wrong.
        message: String,
    },
    /// The store's files could not be read or written (disk full, ...).
    /// A write that fails with this error applied nothing.
    #[error("store I/O error: {0}")]
    Io(String),
    /// The store refused the request itself (empty key, a key twice in one
    /// transaction, too large, too many operations, ...); sending the same
    /// request again will fail again.
    #[error("request rejected by the store: {0}")]
    Rejected(String),
    /// The store was written by a newer or unknown schema.
    #[error("store schema version {found} is not supported (this build reads {supported})")]
    Schema {
        /// Version found on disk.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
}

/// The store. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value at `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// All keys under `prefix`, read at one revision.
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;

    /// Applies `ops` atomically if every comparison holds.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError>;

    /// Changes under `prefix` with revision `>= start_revision`, then live
    /// changes as they happen. A `start_revision` of 0 means "from now".
    ///
    /// Events of one transaction share its revision and arrive in the order
    /// of its operations. When `start_revision` is older than the history the
    /// store keeps, the error [`StoreError::Compacted`] comes either from this
    /// call or as the stream's first item (etcd only says so once the watch
    /// exists). A stream that later falls too far behind, or loses its
    /// connection, yields one error item (`Compacted` or `Unavailable`) and
    /// ends: list again and watch from the listing's revision + 1. A stream
    /// also ends (without an error) when the embedded store is dropped.
    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError>;

    /// A new lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease; fails with [`StoreError::LeaseNotFound`] once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Discards the change history before `revision`: a later watch from an
    /// older revision fails with [`StoreError::Compacted`]. The current
    /// values are untouched; a revision beyond the current one is clamped to
    /// it. The default keeps all history.
    ///
    /// etcd keeps every old version until compacted, so a long-running
    /// cluster should call this periodically (or run etcd with
    /// `--auto-compaction-retention`).
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let _ = revision;
        Ok(())
    }

    /// The backend's name: `embedded` or `etcd`.
    fn backend(&self) -> &'static str;
}

/// Convenience operations on top of [`Store`], with JSON values.
#[async_trait]
pub trait StoreExt: Store {
    /// Sets `key` unconditionally.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        let out = self
            .txn(
                vec![],
                vec![Op::Put {
                    key: key.into(),
                    value,
                    lease: None,
                }],
            )
            .await?;
        Ok(out.revision)
    }

    /// Deletes `key` unconditionally.
    async fn delete(&self, key: &str) -> Result<Revision, StoreError> {
        let out = self.txn(vec![], vec![Op::Delete(key.into())]).await?;
        Ok(out.revision)
    }

    /// Creates `key` only if absent; `Ok(false)` if it already existed.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool, StoreError> {
        let out = self
            .txn(
                vec![Compare::Absent(key.into())],
                vec![Op::Put {
                    key: key.into(),
                    value,
                    lease: None,
                }],
            )
            .await?;
        Ok(out.succeeded)
    }

    /// Replaces `key` only if its mod revision is still `expected`
    /// (0: only if absent); `Ok(false)` if someone wrote it in between.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let out = self
            .txn(
                vec![Compare::ModRevision(key.into(), expected)],
                vec![Op::Put {
                    key: key.into(),
                    value,
                    lease: None,
                }],
            )
            .await?;
        Ok(out.succeeded)
    }

    /// Reads and decodes the JSON value at `key`, with its mod revision.
    async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, Revision)>, StoreError> {
        match self.get(key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
        }
    }

    /// Lists and decodes the JSON values under `prefix`.
    async fn list_json<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(T, Revision)>, Revision), StoreError> {
        let listing = self.list(prefix).await?;
        let mut out = Vec::with_capacity(listing.items.len());
        for kv in &listing.items {
            out.push((decode(kv)?, kv.mod_revision));
        }
        Ok((out, listing.revision))
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Decodes a JSON value, naming the key when it is corrupt.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
        key: kv.key.clone(),
        message: e.to_string(),
    })
}

/// Encodes a value as JSON for the store.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain data types to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Builds a put operation with a JSON value.
pub fn put_json<T: Serialize>(key: impl Into<String>, value: &T) -> Op {
    Op::Put {
        key: key.into(),
        value: encode(value),
        lease: None,
    }
}
