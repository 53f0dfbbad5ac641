//! What a primary counts of the I/O it serves: requests, bytes, errors and
//! a latency histogram per kind of request, kept in atomics so that the
//! data path pays a few relaxed additions per request and a metrics
//! scrape reads them without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the latency buckets, in seconds: 50 µs doubling to
/// about 3.3 s (the slowest acknowledged write on a loaded host is well
/// under that; slower ones land in the last, unbounded bucket).
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_2, 0.000_4, 0.000_8, 0.001_6, 0.003_2, 0.006_4, 0.012_8, 0.025_6,
    0.051_2, 0.102_4, 0.204_8, 0.409_6, 0.819_2, 1.638_4, 3.276_8,
];

/// A kind of request a guest makes of its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoKind {
    /// Reads.
    Read,
    /// Writes of data.
    Write,
    /// Flushes (write barriers).
    Flush,
    /// Discards (trim) and writes of zeroes.
    Discard,
}

impl IoKind {
    /// Every kind, in a fixed order.
    pub const ALL: [IoKind; 4] = [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Discard];

    /// Its name in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Discard => "discard",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The counters of one kind.
#[derive(Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
    /// Per bucket (not cumulative); the last one is unbounded.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

/// The I/O counters of one served volume.
#[derive(Default)]
pub struct IoStats {
    kinds: [KindCounters; 4],
    epoch_changes: AtomicU64,
}

impl std::fmt::Debug for IoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoStats").finish_non_exhaustive()
    }
}

/// One kind's counters as read at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IoKindSnapshot {
    /// The kind.
    pub kind: IoKind,
    /// Requests completed (with or without error).
    pub ops: u64,
    /// Bytes read, written or discarded by the successful ones.
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Their latencies summed, in seconds.
    pub seconds: f64,
    /// Requests per latency bucket (bounds [`LATENCY_BUCKETS`], then one
    /// unbounded), not cumulative.
    pub buckets: Vec<u64>,
}

/// A volume's counters as read at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IoSnapshot {
    /// Per kind, in [`IoKind::ALL`]'s order.
    pub kinds: Vec<IoKindSnapshot>,
    /// Times this primary saw the volume's epoch change (a replica left or
    /// rejoined the in-sync set, or a takeover).
    pub epoch_changes: u64,
}

impl IoStats {
    /// Counts one completed request of `kind` that moved `bytes` (only
    /// counted when it succeeded) and took `took`.
    pub fn record(&self, kind: IoKind, bytes: u64, took: Duration, ok: bool) {
        let k = &self.kinds[kind.index()];
        k.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            k.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            k.errors.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        k.nanos.fetch_add(nanos, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        k.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a change of the volume's epoch.
    pub fn epoch_changed(&self) {
        self.epoch_changes.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> IoSnapshot {
        IoSnapshot {
            kinds: IoKind::ALL
                .iter()
                .map(|kind| {
                    let k = &self.kinds[kind.index()];
                    IoKindSnapshot {
                        kind: *kind,
                        ops: k.ops.load(Ordering::Relaxed),
                        bytes: k.bytes.load(Ordering::Relaxed),
                        errors: k.errors.load(Ordering::Relaxed),
                        seconds: k.nanos.load(Ordering::Relaxed) as f64 / 1e9,
                        buckets: k
                            .buckets
                            .iter()
                            .map(|b| b.load(Ordering::Relaxed))
                            .collect(),
                    }
                })
                .collect(),
            epoch_changes: self.epoch_changes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_kind_and_bucket() {
        let s = IoStats::default();
        s.record(IoKind::Write, 4096, Duration::from_micros(30), true);
        s.record(IoKind::Write, 4096, Duration::from_micros(150), true);
        s.record(IoKind::Write, 4096, Duration::from_secs(10), false);
        s.record(IoKind::Read, 512, Duration::from_millis(1), true);
        s.epoch_changed();
        let snap = s.snapshot();
        let w = &snap.kinds[1];
        assert_eq!(w.kind, IoKind::Write);
        assert_eq!((w.ops, w.bytes, w.errors), (3, 8192, 1));
        // 30 µs is in the first bucket, 150 µs in the third (≤ 200 µs),
        // 10 s in the unbounded one.
        assert_eq!(w.buckets[0], 1);
        assert_eq!(w.buckets[2], 1);
        assert_eq!(w.buckets[LATENCY_BUCKETS.len()], 1);
        assert_eq!(w.buckets.iter().sum::<u64>(), 3);
        assert!((w.seconds - 10.000_18).abs() < 1e-9);
        let r = &snap.kinds[0];
        assert_eq!((r.ops, r.bytes), (1, 512));
        // 1 ms: ≤ 1.6 ms.
        assert_eq!(r.buckets[5], 1);
        assert_eq!(snap.epoch_changes, 1);
    }
}
