//! Range locks between client writes (shared) and resync copies
//! (exclusive), plus the write-sequence watermark.
//!
//! A resync copy of a region must not interleave with a write to the same
//! region, or the target could end up with the old data. Writes never
//! exclude each other here; ordering between overlapping writes is the
//! client's business, as on any disk. A waiting exclusive lock blocks new
//! shared ones so a busy region cannot starve the resync.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
struct LockState {
    next_id: u64,
    shared: HashMap<u64, (u64, u64)>,
    /// (start, end, held)
    exclusive: HashMap<u64, (u64, u64, bool)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Shared/exclusive locks on byte ranges.
#[derive(Default)]
pub(crate) struct RangeLocks {
    state: Mutex<LockState>,
    notify: Notify,
}

/// A held range lock; released on drop.
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
    exclusive: bool,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        {
            let mut s = self.locks.lock();
            if self.exclusive {
                s.exclusive.remove(&self.id);
            } else {
                s.shared.remove(&self.id);
            }
        }
        self.locks.notify.notify_waiters();
    }
}

impl RangeLocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, LockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `[offset, offset+len)` shared.
    pub(crate) async fn shared(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let r = (offset, offset.saturating_add(len.max(1)));
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if !s.exclusive.values().any(|e| overlaps((e.0, e.1), r)) {
                    let id = s.next_id;
                    s.next_id += 1;
                    s.shared.insert(id, r);
                    return RangeGuard {
                        locks: self,
                        id,
                        exclusive: false,
                    };
                }
            }
            notified.await;
        }
    }

    /// Takes `[offset, offset+len)` exclusive.
    pub(crate) async fn exclusive(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let r = (offset, offset.saturating_add(len.max(1)));
        let id = {
            let mut s = self.lock();
            let id = s.next_id;
            s.next_id += 1;
            s.exclusive.insert(id, (r.0, r.1, false));
            id
        };
        // From here the guard exists, so a cancelled wait cleans up.
        let guard = RangeGuard {
            locks: self,
            id,
            exclusive: true,
        };
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                let busy = s.shared.values().any(|x| overlaps(*x, r))
                    || s.exclusive
                        .iter()
                        .any(|(other, e)| *other != id && e.2 && overlaps((e.0, e.1), r));
                if !busy {
                    if let Some(e) = s.exclusive.get_mut(&id) {
                        e.2 = true;
                    }
                    return guard;
                }
            }
            notified.await;
        }
    }
}

/// Tracks write sequence numbers in flight to compute "every write up to
/// here is complete".
#[derive(Default)]
pub(crate) struct Watermark {
    state: Mutex<(u64, BTreeSet<u64>)>,
}

impl Watermark {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeSet<u64>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new sequence number, now in flight.
    pub(crate) fn begin(&self) -> u64 {
        let mut s = self.lock();
        s.0 += 1;
        let seq = s.0;
        s.1.insert(seq);
        seq
    }

    /// `seq` is complete.
    pub(crate) fn end(&self, seq: u64) {
        self.lock().1.remove(&seq);
    }

    /// Every write with a sequence number at most this is complete.
    pub(crate) fn low(&self) -> u64 {
        let s = self.lock();
        match s.1.first() {
            Some(first) => first - 1,
            None => s.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_shared_and_blocks_new_shared() {
        let locks = Arc::new(RangeLocks::default());
        let w1 = locks.shared(0, 4096).await;
        let l2 = locks.clone();
        let ex = tokio::spawn(async move {
            let _g = l2.exclusive(0, 1 << 20).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        // The exclusive lock is now waiting; give it time to register.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while locks.lock().exclusive.is_empty() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        // A new overlapping shared lock must wait; a disjoint one need not.
        let _far = locks.shared(2 << 20, 4096).await;
        let l3 = locks.clone();
        let blocked = tokio::spawn(async move {
            let _g = l3.shared(8192, 4096).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !blocked.is_finished(),
            "shared lock must wait for the exclusive one"
        );
        assert!(!ex.is_finished(), "exclusive lock must wait for the writer");
        drop(w1);
        ex.await.expect("exclusive");
        blocked.await.expect("shared after exclusive");
    }

    #[test]
    fn watermark_is_lowest_incomplete_minus_one() {
        let w = Watermark::default();
        let a = w.begin();
        let b = w.begin();
        let c = w.begin();
        assert_eq!(w.low(), 0);
        w.end(b);
        assert_eq!(w.low(), a - 1);
        w.end(a);
        assert_eq!(w.low(), c - 1);
        w.end(c);
        assert_eq!(w.low(), c);
    }
}
