//! The memory tester: a buffer of N MiB that a background thread rewrites page by
//! page with a known pattern, verifying before each rewrite that the page still
//! holds the previous pass's pattern. It proves that guest RAM survives migration
//! and snapshot/restore bit for bit, and dirties memory at a controllable rate.
//!
//! It must never allocate more than the guest can spare (the caller checks
//! `MemAvailable`, and the allocation itself is fallible), and never panic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Bytes per page the tester works in.
pub const PAGE_BYTES: usize = 4096;
/// 64-bit words per page.
pub const PAGE_WORDS: usize = PAGE_BYTES / 8;
const MIB: u64 = 1024 * 1024;
/// Memory left to the rest of the guest when sizing a test.
pub const RESERVE_BYTES: u64 = 24 * MIB;
/// How far behind its schedule the pacer may fall before it forgets the debt (so a
/// guest paused for a migration does not burst afterwards).
const MAX_PACING_DEBT: Duration = Duration::from_millis(100);

/// The expected value of word `word` after pass `pass` (splitmix64 of both).
pub fn pattern(pass: u64, word: u64) -> u64 {
    let mut z = pass
        .wrapping_mul(0xA076_1D64_78BD_642F)
        .wrapping_add(word)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes pass `pass`'s pattern into `page`, whose first word has index `first_word`.
pub fn fill_page(page: &mut [u64], pass: u64, first_word: u64) {
    for (i, w) in page.iter_mut().enumerate() {
        *w = pattern(pass, first_word + i as u64);
    }
}

/// Counts the words of `page` that do not hold pass `pass`'s pattern.
pub fn verify_page(page: &[u64], pass: u64, first_word: u64) -> u64 {
    page.iter()
        .enumerate()
        .filter(|(i, w)| **w != pattern(pass, first_word + *i as u64))
        .count() as u64
}

/// Counters shared between the worker and readers.
#[derive(Default)]
struct Stats {
    running: AtomicBool,
    passes: AtomicU64,
    pages_checked: AtomicU64,
    mismatches: AtomicU64,
    bytes_written: AtomicU64,
    rate_bits: AtomicU64,
    target_rate_bits: AtomicU64,
    error: Mutex<Option<String>>,
}

struct Run {
    mib: u64,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// Why a test could not start.
#[derive(Debug, PartialEq)]
pub enum StartError {
    /// A test is already running.
    AlreadyRunning,
    /// Not enough memory is available.
    TooBig {
        /// What was asked for.
        requested_mib: u64,
        /// What could be granted.
        max_mib: u64,
    },
    /// Invalid parameters.
    Invalid(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::AlreadyRunning => {
                write!(f, "a memtest is already running; POST /memtest/stop first")
            }
            StartError::TooBig {
                requested_mib,
                max_mib,
            } => write!(
                f,
                "{requested_mib} MiB requested but only {max_mib} MiB can be spared"
            ),
            StartError::Invalid(why) => f.write_str(why),
        }
    }
}

/// The tester: at most one run at a time; the last run's figures stay readable.
#[derive(Default)]
pub struct MemTest {
    run: Mutex<Option<Run>>,
}

/// Largest test (MiB) that fits in `available_bytes` while leaving a reserve.
pub fn max_mib(available_bytes: u64) -> u64 {
    available_bytes.saturating_sub(RESERVE_BYTES) / MIB
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// Extracts `MemAvailable` (bytes) from meminfo text.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl MemTest {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a test over `mib` MiB writing at `rate_mib_s` (0 = unthrottled), given
    /// `available_bytes` of free memory.
    pub fn start(&self, mib: u64, rate_mib_s: f64, available_bytes: u64) -> Result<(), StartError> {
        if mib == 0 {
            return Err(StartError::Invalid("mib must be at least 1".to_string()));
        }
        if !rate_mib_s.is_finite() || rate_mib_s < 0.0 {
            return Err(StartError::Invalid(
                "rate_mib_s must be a number >= 0".to_string(),
            ));
        }
        let mut slot = self.lock();
        if slot
            .as_ref()
            .is_some_and(|r| r.stats.running.load(Ordering::SeqCst))
        {
            return Err(StartError::AlreadyRunning);
        }
        let max = max_mib(available_bytes);
        if mib > max {
            return Err(StartError::TooBig {
                requested_mib: mib,
                max_mib: max,
            });
        }
        if let Some(mut old) = slot.take()
            && let Some(h) = old.handle.take()
        {
            let _ = h.join();
        }
        let stats = Arc::new(Stats::default());
        stats
            .target_rate_bits
            .store(rate_mib_s.to_bits(), Ordering::SeqCst);
        stats.running.store(true, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (Arc::clone(&stats), Arc::clone(&stop));
        let handle = thread::Builder::new()
            .name("memtest".to_string())
            .spawn(move || {
                worker(mib, &s2, &stop2);
                s2.running.store(false, Ordering::SeqCst);
            })
            .map_err(|e| StartError::Invalid(format!("cannot start the memtest thread: {e}")))?;
        *slot = Some(Run {
            mib,
            stats,
            stop,
            handle: Some(handle),
        });
        Ok(())
    }

    /// Stops the running test (frees its memory); false if none was running.
    pub fn stop(&self) -> bool {
        let mut slot = self.lock();
        let Some(run) = slot.as_mut() else {
            return false;
        };
        let was_running = run.stats.running.load(Ordering::SeqCst);
        run.stop.store(true, Ordering::SeqCst);
        if let Some(h) = run.handle.take() {
            let _ = h.join();
        }
        was_running
    }

    /// Changes the write rate of the running test; false if none is running.
    pub fn set_rate(&self, rate_mib_s: f64) -> bool {
        let slot = self.lock();
        match slot.as_ref() {
            Some(r) if r.stats.running.load(Ordering::SeqCst) => {
                r.stats
                    .target_rate_bits
                    .store(rate_mib_s.to_bits(), Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// The status as a JSON object.
    pub fn status_json(&self) -> String {
        let slot = self.lock();
        let Some(r) = slot.as_ref() else {
            return r#"{"running":false,"mib":0,"passes":0,"pages_checked":0,"mismatches":0,"bytes_written":0,"rate_mib_s":0,"target_rate_mib_s":0,"error":null}"#.to_string();
        };
        let s = &r.stats;
        let error = s.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        format!(
            r#"{{"running":{},"mib":{},"passes":{},"pages_checked":{},"mismatches":{},"bytes_written":{},"rate_mib_s":{},"target_rate_mib_s":{},"error":{}}}"#,
            s.running.load(Ordering::SeqCst),
            r.mib,
            s.passes.load(Ordering::SeqCst),
            s.pages_checked.load(Ordering::SeqCst),
            s.mismatches.load(Ordering::SeqCst),
            s.bytes_written.load(Ordering::SeqCst),
            crate::json::number(f64::from_bits(s.rate_bits.load(Ordering::SeqCst))),
            crate::json::number(f64::from_bits(s.target_rate_bits.load(Ordering::SeqCst))),
            crate::json::quote_opt(error.as_deref()),
        )
    }
}

/// Keeps the writer on schedule for a target rate, and measures the actual rate.
struct Pacer {
    next: Instant,
    window_start: Instant,
    window_bytes: u64,
}

impl Pacer {
    fn new() -> Self {
        let now = Instant::now();
        Pacer {
            next: now,
            window_start: now,
            window_bytes: 0,
        }
    }

    /// Accounts one page written; sleeps as needed to hold `stats`' target rate.
    fn page_done(&mut self, stats: &Stats, stop: &AtomicBool) {
        self.window_bytes += PAGE_BYTES as u64;
        let now = Instant::now();
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= Duration::from_millis(500) {
            let rate = self.window_bytes as f64 / MIB as f64 / elapsed.as_secs_f64();
            stats.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
            self.window_start = now;
            self.window_bytes = 0;
        }
        let target = f64::from_bits(stats.target_rate_bits.load(Ordering::Relaxed));
        if target <= 0.0 || !target.is_finite() {
            self.next = now;
            return;
        }
        if now > self.next + MAX_PACING_DEBT {
            self.next = now - MAX_PACING_DEBT;
        }
        self.next += Duration::from_secs_f64(PAGE_BYTES as f64 / (target * MIB as f64));
        // Sleep only in chunks worth it; small debts accumulate until they are.
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if self.next <= now + Duration::from_millis(2) {
                break;
            }
            thread::sleep((self.next - now).min(Duration::from_millis(50)));
        }
    }
}

fn worker(mib: u64, stats: &Stats, stop: &AtomicBool) {
    let words = (mib * MIB / 8) as usize;
    let mut buf: Vec<u64> = Vec::new();
    if let Err(e) = buf.try_reserve_exact(words) {
        *stats.error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("allocating {mib} MiB failed: {e}"));
        return;
    }
    buf.resize(words, 0);
    let mut pacer = Pacer::new();
    let mut pass: u64 = 0;
    loop {
        for (p, page) in buf.chunks_mut(PAGE_WORDS).enumerate() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let first = (p * PAGE_WORDS) as u64;
            if pass > 0 {
                let bad = verify_page(page, pass - 1, first);
                if bad > 0 {
                    stats.mismatches.fetch_add(bad, Ordering::Relaxed);
                }
                stats.pages_checked.fetch_add(1, Ordering::Relaxed);
            }
            fill_page(page, pass, first);
            stats
                .bytes_written
                .fetch_add(PAGE_BYTES as u64, Ordering::Relaxed);
            pacer.page_done(stats, stop);
        }
        pass += 1;
        stats.passes.store(pass, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(json: &str, key: &str) -> f64 {
        let needle = format!("\"{key}\":");
        let start = json.find(&needle).expect("key present") + needle.len();
        let rest = &json[start..];
        let end = rest.find([',', '}']).expect("terminated");
        rest[..end].parse().expect("number")
    }

    #[test]
    fn pattern_differs_between_passes_and_words() {
        assert_ne!(pattern(0, 0), pattern(1, 0));
        assert_ne!(pattern(0, 0), pattern(0, 1));
        assert_eq!(pattern(7, 42), pattern(7, 42));
    }

    #[test]
    fn verify_detects_every_corrupted_word() {
        let mut page = vec![0u64; PAGE_WORDS];
        fill_page(&mut page, 3, 1024);
        assert_eq!(verify_page(&page, 3, 1024), 0);
        assert_eq!(verify_page(&page, 2, 1024), PAGE_WORDS as u64);
        assert_eq!(verify_page(&page, 3, 0), PAGE_WORDS as u64);
        page[5] ^= 1;
        page[500] = 0;
        assert_eq!(verify_page(&page, 3, 1024), 2);
    }

    #[test]
    fn parses_mem_available() {
        let text = "MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(max_mib(RESERVE_BYTES + 10 * MIB + 5), 10);
        assert_eq!(max_mib(1), 0);
    }

    #[test]
    fn rejects_too_big_and_invalid_requests() {
        let t = MemTest::default();
        assert_eq!(
            t.start(100, 0.0, RESERVE_BYTES + 10 * MIB),
            Err(StartError::TooBig {
                requested_mib: 100,
                max_mib: 10
            })
        );
        assert!(matches!(
            t.start(0, 0.0, u64::MAX),
            Err(StartError::Invalid(_))
        ));
        assert!(matches!(
            t.start(1, -1.0, u64::MAX),
            Err(StartError::Invalid(_))
        ));
        assert!(!t.stop());
    }

    #[test]
    fn runs_passes_without_mismatches_and_stops() {
        let t = MemTest::default();
        t.start(2, 0.0, u64::MAX).expect("start");
        assert_eq!(t.start(2, 0.0, u64::MAX), Err(StartError::AlreadyRunning));
        let deadline = Instant::now() + Duration::from_secs(30);
        while field(&t.status_json(), "passes") < 3.0 {
            assert!(Instant::now() < deadline, "memtest made no progress");
            thread::sleep(Duration::from_millis(10));
        }
        assert!(t.stop());
        let s = t.status_json();
        assert!(s.contains("\"running\":false"), "{s}");
        assert_eq!(field(&s, "mismatches"), 0.0);
        assert!(field(&s, "pages_checked") >= 2.0 * 512.0);
        assert!(field(&s, "bytes_written") >= 3.0 * 2.0 * MIB as f64);
    }

    #[test]
    fn throttled_run_holds_its_rate() {
        let t = MemTest::default();
        t.start(1, 4.0, u64::MAX).expect("start");
        let started = Instant::now();
        // 1 MiB at 4 MiB/s: the first 2 MiB cannot finish in much under half a second.
        let deadline = started + Duration::from_secs(30);
        while field(&t.status_json(), "bytes_written") < 2.0 * MIB as f64 {
            assert!(
                Instant::now() < deadline,
                "throttled memtest made no progress"
            );
            thread::sleep(Duration::from_millis(10));
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(350), "too fast: {took:?}");
        assert!(t.set_rate(0.0));
        assert!(t.stop());
        assert!(!t.set_rate(1.0));
    }
}
