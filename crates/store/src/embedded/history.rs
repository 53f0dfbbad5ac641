//! Recent changes of the embedded store, and the watch streams fed from them.
//!
//! The writer publishes every committed revision here, after the commit. A
//! bounded ring keeps recent revisions so a watch can start in the past; a
//! broadcast channel carries live ones. A watcher that falls behind the
//! broadcast catches up from the ring, and when the ring no longer holds what
//! it missed it gets [`StoreError::Compacted`]. This module must never drop
//! an event silently: a watcher either sees every change after its start, in
//! order, or an error.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::broadcast;

use crate::{Revision, StoreError, WatchEvent, WatchStream};

/// The events of one committed revision.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The revision every event carries.
    pub(crate) revision: Revision,
    /// The changes, in the order the transaction made them.
    pub(crate) events: Vec<WatchEvent>,
}

impl Batch {
    /// Rough memory held by the batch, for the ring's byte budget.
    fn weight(&self) -> usize {
        self.events
            .iter()
            .map(|e| match e {
                WatchEvent::Put(kv) => 64 + kv.key.len() + kv.value.len(),
                WatchEvent::Delete { key, .. } => 32 + key.len(),
            })
            .sum()
    }
}

/// How much history to keep, and how far a live watcher may lag.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) events: usize,
    pub(crate) bytes: usize,
    pub(crate) live_buffer: usize,
}

struct Ring {
    batches: VecDeque<(Arc<Batch>, usize)>,
    events: usize,
    bytes: usize,
    /// Every revision up to this one is gone from the ring.
    compacted_through: Revision,
    /// The last revision published.
    head: Revision,
}

/// The ring plus the live channel.
pub(crate) struct Hub {
    ring: Mutex<Ring>,
    live: broadcast::Sender<Arc<Batch>>,
    limits: Limits,
}

/// Locks a mutex, taking over a poisoned one: every critical section in this
/// crate leaves its data consistent before anything that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where a new or resumed subscription starts.
struct Subscription {
    backlog: VecDeque<WatchEvent>,
    live: broadcast::Receiver<Arc<Batch>>,
    next: Revision,
}

impl Hub {
    /// A hub whose history starts after `head` (older history is not kept).
    pub(crate) fn new(head: Revision, limits: Limits) -> Self {
        let (live, _) = broadcast::channel(limits.live_buffer.max(1));
        Hub {
            ring: Mutex::new(Ring {
                batches: VecDeque::new(),
                events: 0,
                bytes: 0,
                compacted_through: head,
                head,
            }),
            live,
            limits,
        }
    }

    /// The last revision published.
    pub(crate) fn head(&self) -> Revision {
        lock(&self.ring).head
    }

    /// Records a committed revision and hands it to live watchers.
    pub(crate) fn publish(&self, batch: Batch) {
        let weight = batch.weight();
        let count = batch.events.len();
        let batch = Arc::new(batch);
        let mut ring = lock(&self.ring);
        ring.head = ring.head.max(batch.revision);
        ring.batches.push_back((batch.clone(), weight));
        ring.events += count;
        ring.bytes += weight;
        while ring.batches.len() > 1
            && (ring.events > self.limits.events || ring.bytes > self.limits.bytes)
        {
            if let Some((old, w)) = ring.batches.pop_front() {
                ring.events -= old.events.len();
                ring.bytes -= w;
                ring.compacted_through = old.revision;
            }
        }
        // Sent under the ring lock, so a subscriber that read the ring before
        // this batch is already subscribed and sees it live: no gap, no double.
        // An error only means nobody is watching.
        let _ = self.live.send(batch);
    }

    /// Forgets the history before `revision`.
    pub(crate) fn compact(&self, revision: Revision) {
        let mut ring = lock(&self.ring);
        let through = (revision - 1).min(ring.head);
        while ring
            .batches
            .front()
            .is_some_and(|(b, _)| b.revision <= through)
        {
            if let Some((old, w)) = ring.batches.pop_front() {
                ring.events -= old.events.len();
                ring.bytes -= w;
            }
        }
        ring.compacted_through = ring.compacted_through.max(through);
    }

    /// Subscribes to changes under `prefix` from revision `start` (0: now).
    fn subscribe(&self, prefix: &str, start: Revision) -> Result<Subscription, StoreError> {
        let ring = lock(&self.ring);
        if start == 0 {
            return Ok(Subscription {
                backlog: VecDeque::new(),
                live: self.live.subscribe(),
                next: ring.head + 1,
            });
        }
        if start <= ring.compacted_through {
            return Err(StoreError::Compacted {
                requested: start,
                oldest: ring.compacted_through + 1,
            });
        }
        let backlog = ring
            .batches
            .iter()
            .filter(|(b, _)| b.revision >= start)
            .flat_map(|(b, _)| b.events.iter())
            .filter(|e| e.key().starts_with(prefix))
            .cloned()
            .collect();
        Ok(Subscription {
            backlog,
            live: self.live.subscribe(),
            next: start.max(ring.head + 1),
        })
    }
}

/// The state a watch stream carries between items.
struct Watcher {
    hub: Weak<Hub>,
    prefix: String,
    pending: VecDeque<WatchEvent>,
    live: broadcast::Receiver<Arc<Batch>>,
    /// The first revision not yet taken from the ring or the channel.
    next: Revision,
    finished: bool,
}

impl Watcher {
    async fn next_item(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            match self.live.recv().await {
                Ok(batch) => {
                    if batch.revision < self.next {
                        continue;
                    }
                    self.next = batch.revision + 1;
                    let prefix = &self.prefix;
                    self.pending.extend(
                        batch
                            .events
                            .iter()
                            .filter(|e| e.key().starts_with(prefix.as_str()))
                            .cloned(),
                    );
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // The channel dropped batches for us; take them from the ring.
                    let Some(hub) = self.hub.upgrade() else {
                        self.finished = true;
                        return None;
                    };
                    tracing::debug!(
                        prefix = %self.prefix,
                        missed,
                        next = self.next,
                        "watcher lagged; catching up from history"
                    );
                    match hub.subscribe(&self.prefix, self.next) {
                        Ok(sub) => {
                            self.pending = sub.backlog;
                            self.live = sub.live;
                            self.next = sub.next;
                        }
                        Err(e) => {
                            tracing::info!(prefix = %self.prefix, error = %e, "watcher fell behind the kept history");
                            self.finished = true;
                            return Some(Err(e));
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // The store was dropped.
                    self.finished = true;
                    return None;
                }
            }
        }
    }
}

/// A watch stream over `hub` for `prefix` from `start` (0: from now).
pub(crate) fn watch(
    hub: &Arc<Hub>,
    prefix: &str,
    start: Revision,
) -> Result<WatchStream, StoreError> {
    let sub = hub.subscribe(prefix, start)?;
    let watcher = Watcher {
        hub: Arc::downgrade(hub),
        prefix: prefix.to_owned(),
        pending: sub.backlog,
        live: sub.live,
        next: sub.next,
        finished: false,
    };
    Ok(Box::pin(futures::stream::unfold(
        watcher,
        |mut w| async move {
            let item = w.next_item().await?;
            Some((item, w))
        },
    )))
}
