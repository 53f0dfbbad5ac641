//! The embedded store's single writer thread.
//!
//! Every write (transactions, lease revocation and expiry) goes through one
//! thread, which applies all requests waiting at that moment in one redb
//! write transaction and commits them with one fsync ("group commit"). Each
//! request stays its own logical transaction with its own revision; only the
//! fsync is shared. That is how many writers get hundreds of durable writes
//! per second from a disk that does a few hundred fsyncs per second.
//!
//! This module must never acknowledge a write before its commit returned,
//! and never change in-memory state (leases, history) for a commit that
//! failed: a failed batch applies nothing anywhere.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::db::DbSlot;
use super::history::{Batch, Hub, lock};
use super::schema::{KV, LEASE_KEYS, META, REVISION_KEY};
use super::{record, storage_error};
use crate::{Compare, KeyValue, LeaseId, Op, Revision, StoreError, TxnOutcome, WatchEvent};

/// The most requests committed together.
const MAX_BATCH: usize = 1024;
/// How long to wait before retrying lease expiry after a failed commit.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// A live lease.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseEntry {
    pub(crate) ttl: Duration,
    pub(crate) deadline: Instant,
}

/// The leases of this process, by id.
pub(crate) type Leases = Arc<Mutex<HashMap<i64, LeaseEntry>>>;

/// Work for the writer.
pub(crate) enum Request {
    /// A transaction.
    Txn {
        compares: Vec<Compare>,
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
    },
    /// End a lease now and delete its keys.
    Revoke {
        lease: LeaseId,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A lease was granted: recompute when the next one expires.
    Wake,
}

/// The writer thread's state.
pub(crate) struct Writer {
    pub(crate) db: Arc<DbSlot>,
    pub(crate) location: Arc<str>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) leases: Leases,
    pub(crate) requests: Receiver<Request>,
}

/// What one request came to, before the batch commits.
enum Outcome {
    Txn(Result<TxnOutcome, StoreError>),
    Revoke(Result<(), StoreError>),
    Nothing,
}

/// What a batch did, applied to memory only after its commit succeeded.
#[derive(Default)]
struct Done {
    outcomes: Vec<Outcome>,
    batches: Vec<Batch>,
    ended_leases: HashSet<i64>,
}

/// The tables of one write transaction, and its running revision.
struct Tables<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    lease_keys: Table<'t, (i64, &'static str), ()>,
    meta: Table<'t, &'static str, i64>,
    revision: Revision,
}

/// A storage failure: fails the whole batch.
type Fatal = String;

impl Writer {
    /// Serves requests until every sender is gone.
    pub(crate) fn run(self) {
        let mut retry_expiry_at: Option<Instant> = None;
        loop {
            let wait = self.next_wake(retry_expiry_at);
            let first = match wait {
                None => match self.requests.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
                Some(wait) => match self.requests.recv_timeout(wait) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut batch: Vec<Request> = first.into_iter().collect();
            while batch.len() < MAX_BATCH {
                match self.requests.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            batch.retain(|r| !matches!(r, Request::Wake));
            let now = Instant::now();
            let expired = if retry_expiry_at.is_some_and(|t| now < t) {
                Vec::new()
            } else {
                self.expired(now)
            };
            if batch.is_empty() && expired.is_empty() {
                continue;
            }
            let committed = self.apply(batch, &expired, now);
            if !expired.is_empty() {
                retry_expiry_at = (!committed).then(|| now + EXPIRY_RETRY);
            }
        }
        tracing::debug!(location = %self.location, "embedded store writer stopped");
    }

    /// How long to sleep before the next lease expires (`None`: no lease).
    fn next_wake(&self, retry_expiry_at: Option<Instant>) -> Option<Duration> {
        let next = lock(&self.leases).values().map(|l| l.deadline).min()?;
        let next = match retry_expiry_at {
            Some(retry) => next.max(retry),
            None => next,
        };
        Some(next.saturating_duration_since(Instant::now()))
    }

    /// The leases whose deadline has passed, oldest first.
    fn expired(&self, now: Instant) -> Vec<i64> {
        let leases = lock(&self.leases);
        let mut ids: Vec<(Instant, i64)> = leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, l)| (l.deadline, *id))
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    }

    /// Applies a batch and answers its requests. Returns whether it committed.
    fn apply(&self, requests: Vec<Request>, expired: &[i64], now: Instant) -> bool {
        match self.apply_in_txn(&requests, expired, now) {
            Ok(done) => {
                {
                    let mut leases = lock(&self.leases);
                    for id in &done.ended_leases {
                        leases.remove(id);
                    }
                }
                for batch in done.batches {
                    self.hub.publish(batch);
                }
                for (request, outcome) in requests.into_iter().zip(done.outcomes) {
                    // A send error means the caller stopped waiting; the write stands.
                    match (request, outcome) {
                        (Request::Txn { reply, .. }, Outcome::Txn(result)) => {
                            let _ = reply.send(result);
                        }
                        (Request::Revoke { reply, .. }, Outcome::Revoke(result)) => {
                            let _ = reply.send(result);
                        }
                        _ => {}
                    }
                }
                true
            }
            Err(message) => {
                self.db.mark_failed();
                tracing::error!(location = %self.location, error = %message, requests = requests.len(), "embedded store commit failed; nothing applied");
                for request in requests {
                    match request {
                        Request::Txn { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Io(message.clone())));
                        }
                        Request::Revoke { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Io(message.clone())));
                        }
                        Request::Wake => {}
                    }
                }
                false
            }
        }
    }

    fn fatal(&self, e: &dyn std::fmt::Display) -> Fatal {
        match storage_error(&self.location, e) {
            StoreError::Io(m) => m,
            other => other.to_string(),
        }
    }

    fn apply_in_txn(
        &self,
        requests: &[Request],
        expired: &[i64],
        now: Instant,
    ) -> Result<Done, Fatal> {
        let db = self.db.get().map_err(|e| match e {
            StoreError::Io(m) => m,
            other => other.to_string(),
        })?;
        let txn = db.begin_write().map_err(|e| self.fatal(&e))?;
        let mut done = Done::default();
        let changed = {
            let mut t = self.open_tables(&txn)?;
            let start = t.revision;
            // Expired leases first: a request in this batch must not use them.
            for id in expired {
                self.end_lease(&mut t, *id, &mut done)?;
            }
            for request in requests {
                let outcome = match request {
                    Request::Txn { compares, ops, .. } => {
                        Outcome::Txn(self.txn(&mut t, compares, ops, now, &mut done)?)
                    }
                    Request::Revoke { lease, .. } => {
                        let known = !done.ended_leases.contains(&lease.0)
                            && lock(&self.leases).contains_key(&lease.0);
                        if known {
                            self.end_lease(&mut t, lease.0, &mut done)?;
                            Outcome::Revoke(Ok(()))
                        } else {
                            Outcome::Revoke(Err(StoreError::LeaseNotFound(lease.0)))
                        }
                    }
                    Request::Wake => Outcome::Nothing,
                };
                done.outcomes.push(outcome);
            }
            if t.revision != start {
                t.meta
                    .insert(REVISION_KEY, t.revision)
                    .map_err(|e| self.fatal(&e))?;
            }
            t.revision != start
        };
        if changed {
            txn.commit().map_err(|e| self.fatal(&e))?;
        } else {
            // Nothing to make durable: skip the fsync.
            txn.abort().map_err(|e| self.fatal(&e))?;
        }
        Ok(done)
    }

    fn open_tables<'t>(&self, txn: &'t WriteTransaction) -> Result<Tables<'t>, Fatal> {
        let meta = txn.open_table(META).map_err(|e| self.fatal(&e))?;
        let revision = meta
            .get(REVISION_KEY)
            .map_err(|e| self.fatal(&e))?
            .map_or(0, |v| v.value());
        Ok(Tables {
            kv: txn.open_table(KV).map_err(|e| self.fatal(&e))?,
            lease_keys: txn.open_table(LEASE_KEYS).map_err(|e| self.fatal(&e))?,
            meta,
            revision,
        })
    }

    /// Reads and decodes the record at `key` inside the batch.
    fn read(
        &self,
        t: &Tables<'_>,
        key: &str,
    ) -> Result<Result<Option<KeyValue>, StoreError>, Fatal> {
        match t.kv.get(key).map_err(|e| self.fatal(&e))? {
            None => Ok(Ok(None)),
            Some(v) => Ok(record::decode(key, v.value()).map(Some)),
        }
    }

    /// Deletes the keys of lease `id` (one revision) and ends it.
    fn end_lease(&self, t: &mut Tables<'_>, id: i64, done: &mut Done) -> Result<(), Fatal> {
        let mut keys = Vec::new();
        for entry in t
            .lease_keys
            .range::<(i64, &str)>((id, "")..)
            .map_err(|e| self.fatal(&e))?
        {
            let (k, _) = entry.map_err(|e| self.fatal(&e))?;
            let (lease, key) = k.value();
            if lease != id {
                break;
            }
            keys.push(key.to_owned());
        }
        let next = t.revision + 1;
        let mut events = Vec::new();
        for key in &keys {
            t.lease_keys
                .remove((id, key.as_str()))
                .map_err(|e| self.fatal(&e))?;
            // The index may lag a key rebound to another lease; check the record.
            let bound = match t.kv.get(key.as_str()).map_err(|e| self.fatal(&e))? {
                Some(v) => record::lease_of(key, v.value()).ok().flatten() == Some(LeaseId(id)),
                None => false,
            };
            if bound {
                t.kv.remove(key.as_str()).map_err(|e| self.fatal(&e))?;
                events.push(WatchEvent::Delete {
                    key: key.clone(),
                    mod_revision: next,
                });
            }
        }
        done.ended_leases.insert(id);
        tracing::debug!(lease = id, keys = events.len(), "lease ended");
        if !events.is_empty() {
            t.revision = next;
            done.batches.push(Batch {
                revision: next,
                events,
            });
        }
        Ok(())
    }

    /// Whether lease `id` may still take keys.
    fn lease_alive(&self, id: i64, now: Instant, done: &Done) -> bool {
        !done.ended_leases.contains(&id)
            && lock(&self.leases)
                .get(&id)
                .is_some_and(|l| l.deadline > now)
    }

    /// One transaction. The inner error fails only this request, which then
    /// has changed nothing: every check runs before the first write.
    fn txn(
        &self,
        t: &mut Tables<'_>,
        compares: &[Compare],
        ops: &[Op],
        now: Instant,
        done: &mut Done,
    ) -> Result<Result<TxnOutcome, StoreError>, Fatal> {
        // Checks that do not depend on the data.
        let mut seen = HashSet::new();
        for op in ops {
            let key = match op {
                Op::Put { key, .. } | Op::Delete(key) => key,
            };
            if key.is_empty() {
                return Ok(Err(StoreError::Rejected("empty key".into())));
            }
            if !seen.insert(key.as_str()) {
                return Ok(Err(StoreError::Rejected(format!(
                    "key {key} appears twice in one transaction"
                ))));
            }
        }

        for compare in compares {
            let key = match compare {
                Compare::ModRevision(k, _) | Compare::Exists(k) | Compare::Absent(k) => k,
            };
            let current = match self.read(t, key)? {
                Ok(kv) => kv,
                Err(e) => return Ok(Err(e)),
            };
            let holds = match compare {
                Compare::ModRevision(_, expected) => {
                    current.as_ref().map_or(0, |kv| kv.mod_revision) == *expected
                }
                Compare::Exists(_) => current.is_some(),
                Compare::Absent(_) => current.is_none(),
            };
            if !holds {
                return Ok(Ok(TxnOutcome {
                    succeeded: false,
                    revision: t.revision,
                }));
            }
        }

        for op in ops {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
                && !self.lease_alive(lease.0, now, done)
            {
                return Ok(Err(StoreError::LeaseNotFound(lease.0)));
            }
        }

        // Read what the operations replace before writing anything.
        let mut previous = Vec::with_capacity(ops.len());
        for op in ops {
            let key = match op {
                Op::Put { key, .. } | Op::Delete(key) => key,
            };
            match self.read(t, key)? {
                Ok(kv) => previous.push(kv),
                Err(e) => return Ok(Err(e)),
            }
        }

        let next = t.revision + 1;
        let mut events = Vec::with_capacity(ops.len());
        for (op, old) in ops.iter().zip(previous) {
            let old_lease = old.as_ref().and_then(|kv| kv.lease);
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = old.as_ref().map_or(next, |kv| kv.create_revision);
                    let bytes = record::encode(create_revision, next, *lease, value);
                    t.kv.insert(key.as_str(), bytes.as_slice())
                        .map_err(|e| self.fatal(&e))?;
                    if old_lease != *lease {
                        if let Some(old_lease) = old_lease {
                            t.lease_keys
                                .remove((old_lease.0, key.as_str()))
                                .map_err(|e| self.fatal(&e))?;
                        }
                        if let Some(lease) = lease {
                            t.lease_keys
                                .insert((lease.0, key.as_str()), ())
                                .map_err(|e| self.fatal(&e))?;
                        }
                    }
                    events.push(WatchEvent::Put(KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision,
                        mod_revision: next,
                        lease: *lease,
                    }));
                }
                Op::Delete(key) => {
                    if old.is_none() {
                        continue;
                    }
                    t.kv.remove(key.as_str()).map_err(|e| self.fatal(&e))?;
                    if let Some(old_lease) = old_lease {
                        t.lease_keys
                            .remove((old_lease.0, key.as_str()))
                            .map_err(|e| self.fatal(&e))?;
                    }
                    events.push(WatchEvent::Delete {
                        key: key.clone(),
                        mod_revision: next,
                    });
                }
            }
        }
        if !events.is_empty() {
            t.revision = next;
            done.batches.push(Batch {
                revision: next,
                events,
            });
        }
        Ok(Ok(TxnOutcome {
            succeeded: true,
            revision: t.revision,
        }))
    }
}
