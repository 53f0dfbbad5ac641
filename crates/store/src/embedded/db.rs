//! The redb handle shared by readers and the writer, and its recovery after
//! an I/O error.
//!
//! After a failed commit (disk full, I/O error) redb refuses every later
//! write until the database is closed and opened again; the data on disk is
//! the last successful commit. A file-backed store therefore reopens its
//! file before the next write, so writes work again once there is room,
//! without restarting the process. Reads after a failed write also use a
//! fresh handle, since redb may refuse them too. Opening again is cheap and
//! works on a full disk; only failed reopens are rate-limited.
//!
//! This module must never reopen an in-memory database (that would lose
//! it), and never open the file twice at once (redb locks it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::Database;

use super::history::lock;
use super::storage_error;
use crate::StoreError;

/// How soon a failed reopen may be tried again.
const REOPEN_RETRY: Duration = Duration::from_secs(1);
/// How long a reopen waits for in-flight reads to let go of the old handle.
const READERS_GRACE: Duration = Duration::from_secs(5);

struct State {
    db: Option<Arc<Database>>,
    /// When a reopen last failed.
    failed_at: Option<Instant>,
    last_error: String,
}

/// The current database handle.
pub(crate) struct DbSlot {
    /// The file, or `None` for an in-memory database.
    path: Option<PathBuf>,
    location: Arc<str>,
    state: Mutex<State>,
    /// A write failed on the current handle: reopen before the next one.
    poisoned: AtomicBool,
}

impl DbSlot {
    pub(crate) fn new(db: Database, path: Option<PathBuf>, location: Arc<str>) -> Self {
        DbSlot {
            path,
            location,
            state: Mutex::new(State {
                db: Some(Arc::new(db)),
                failed_at: None,
                last_error: String::new(),
            }),
            poisoned: AtomicBool::new(false),
        }
    }

    /// The handle for a read or a write: a fresh one after a failed write.
    pub(crate) fn get(&self) -> Result<Arc<Database>, StoreError> {
        if !self.poisoned.load(Ordering::SeqCst)
            && let Some(db) = lock(&self.state).db.clone()
        {
            return Ok(db);
        }
        self.reopen()
    }

    /// Notes that a write failed on the current handle.
    pub(crate) fn mark_failed(&self) {
        if self.path.is_some() {
            self.poisoned.store(true, Ordering::SeqCst);
        }
    }

    /// Closes and reopens the file (rate-limited).
    fn reopen(&self) -> Result<Arc<Database>, StoreError> {
        let Some(path) = &self.path else {
            return lock(&self.state).db.clone().ok_or_else(|| {
                StoreError::Io(format!("embedded store {} is gone", self.location))
            });
        };
        let mut state = lock(&self.state);
        if !self.poisoned.load(Ordering::SeqCst)
            && let Some(db) = &state.db
        {
            return Ok(db.clone());
        }
        if state.failed_at.is_some_and(|t| t.elapsed() < REOPEN_RETRY) {
            return Err(StoreError::Io(format!(
                "embedded store {} is recovering from an I/O error: {}",
                self.location, state.last_error
            )));
        }
        if let Some(old) = state.db.take() {
            // redb locks the file: the old handle must be closed first. Reads
            // hold it for microseconds; wait for them, briefly.
            let deadline = Instant::now() + READERS_GRACE;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if Arc::strong_count(&old) > 1 {
                state.db = Some(old);
                state.failed_at = Some(Instant::now());
                state.last_error = "the old handle is still in use".into();
                return Err(StoreError::Io(format!(
                    "embedded store {}: cannot reopen after an I/O error: {}",
                    self.location, state.last_error
                )));
            }
            drop(old);
        }
        match Database::builder().create(path) {
            Ok(db) => {
                let db = Arc::new(db);
                state.db = Some(db.clone());
                state.last_error.clear();
                state.failed_at = None;
                self.poisoned.store(false, Ordering::SeqCst);
                tracing::info!(location = %self.location, "embedded store reopened after an I/O error");
                Ok(db)
            }
            Err(e) => {
                let error = storage_error(&self.location, &e);
                state.last_error = error.to_string();
                state.failed_at = Some(Instant::now());
                tracing::warn!(location = %self.location, %error, "reopening the embedded store failed");
                Err(error)
            }
        }
    }
}
