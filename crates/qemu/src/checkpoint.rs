//! Checkpoints of a running VM through QMP: its RAM and device state saved
//! to a file while the guest runs, and a point-in-time copy of a disk taken
//! at the instant the guest is paused; and loading such a file into a QEMU
//! started with `-incoming defer`.
//!
//! Saving is QEMU's live migration to a `file:` URI with the `mapped-ram`
//! capability: RAM is copied while the guest runs (pages dirtied meanwhile
//! are copied again, in place), then the guest is paused for the last dirty
//! pages and the device state. After the migration completes the guest is
//! still paused (`postmigrate`); the disk's block nodes are re-activated and
//! a `blockdev-backup` job with `sync=top` starts — from then on it copies
//! the disk as it was at that instant (copy-before-write), while the guest
//! already runs again. The pause is measured from QEMU's `STOP` to its
//! `RESUME` event.
//!
//! This module must never leave a VM paused that it found running: every
//! failure path resumes the guest before it returns. It does not know where
//! files live or what a snapshot is; the caller names the files.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::error::QmpError;
use crate::qmp::{
    BlockdevBackup, EventKind, EventStream, EventStreamError, JobStatus, MigrationCapability,
    MigrationInfo, MigrationParameters, MigrationStatus, MirrorSync, Qmp, RunState,
};

/// How often progress is reported while RAM is copied.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long QEMU may take to settle into `postmigrate` after `completed`.
const SETTLE: Duration = Duration::from_secs(5);
/// How long to wait for the `RESUME` event after `cont`.
const RESUME_WAIT: Duration = Duration::from_secs(5);
/// A local file takes whatever QEMU can write: no bandwidth cap (1 TiB/s).
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// The migration capabilities a checkpoint file is written and read with;
/// both ends must agree on `mapped-ram`.
pub fn file_capabilities() -> Vec<(MigrationCapability, bool)> {
    vec![
        (MigrationCapability::Events, true),
        (MigrationCapability::MappedRam, true),
        (MigrationCapability::PauseBeforeSwitchover, false),
        (MigrationCapability::Multifd, false),
    ]
}

/// A disk to copy at the checkpoint's instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCapture {
    /// The block node to copy (the disk's format node, e.g. `root`).
    pub node: String,
    /// An existing, empty qcow2 file to copy into, of the node's size. For
    /// `sync=top` it must have the same backing file as the node's image.
    pub target_file: PathBuf,
    /// The node name to give the target while copying.
    pub target_node: String,
    /// The block job's id.
    pub job_id: String,
    /// Copy the whole disk (`sync=full`: a disk with no backing image,
    /// such as a volume over NBD) instead of only its top layer
    /// (`sync=top`).
    pub full: bool,
}

/// What to save and how hard to try to keep the pause short.
#[derive(Debug, Clone, PartialEq)]
pub struct SavePlan {
    /// The file RAM and device state are written to (created by QEMU).
    pub memory_file: PathBuf,
    /// The disk to copy, if any.
    pub disk: Option<DiskCapture>,
    /// The longest pause QEMU aims for at first.
    pub downtime_limit: Duration,
    /// A guest that dirties RAM faster than it is copied never gets under
    /// the downtime limit; after this long, the limit is raised step by
    /// step (×4 each time) so the save finishes with a longer pause.
    pub converge_within: Duration,
    /// The whole save gives up (and the guest runs on) after this long.
    pub timeout: Duration,
    /// Cap on the write rate, bytes per second; `None` writes as fast as
    /// QEMU can (the default: a local file).
    pub max_bandwidth: Option<u64>,
}

impl SavePlan {
    /// A plan with the defaults: 50 ms pause target, raised after 5 s,
    /// given up after 10 minutes.
    pub fn new(memory_file: impl Into<PathBuf>) -> Self {
        Self {
            memory_file: memory_file.into(),
            disk: None,
            downtime_limit: Duration::from_millis(50),
            converge_within: Duration::from_secs(5),
            timeout: Duration::from_secs(600),
            max_bandwidth: None,
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    /// How long the guest's CPUs were stopped (`STOP` to `RESUME`).
    pub paused: Duration,
    /// The whole save, from `migrate` to the disk copy's end.
    pub total: Duration,
    /// QEMU's own figure of the switchover downtime, ms.
    pub qemu_downtime_ms: Option<u64>,
    /// When the guest was paused: the checkpoint's instant.
    pub paused_at: SystemTime,
    /// RAM bytes QEMU wrote (pages written more than once count each time).
    pub ram_transferred: u64,
    /// Bytes the disk copy copied.
    pub disk_copied: u64,
}

/// Why a checkpoint could not be saved or loaded.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The VM is not running, so there is nothing live to save.
    #[error("the VM is {state}, not running")]
    NotRunning {
        /// Its run state.
        state: String,
    },
    /// The file path cannot be put in a migration URI.
    #[error("checkpoint file {path} has a comma or is not UTF-8")]
    BadPath {
        /// The path.
        path: PathBuf,
    },
    /// QEMU's migration failed, e.g. the file system filled up.
    #[error("saving memory failed: {reason}")]
    MigrationFailed {
        /// QEMU's explanation.
        reason: String,
    },
    /// The disk copy failed.
    #[error("copying the disk failed: {reason}")]
    DiskCopyFailed {
        /// QEMU's explanation.
        reason: String,
    },
    /// Loading the saved state failed.
    #[error("loading memory failed: {reason}")]
    LoadFailed {
        /// QEMU's explanation (or that it exited).
        reason: String,
    },
    /// It took too long.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
}

fn file_uri(path: &Path) -> Result<String, CheckpointError> {
    match path.to_str() {
        Some(p) if !p.contains(',') => Ok(format!("file:{p}")),
        _ => Err(CheckpointError::BadPath {
            path: path.to_owned(),
        }),
    }
}

/// Follows the migration through its events and `query-migrate`.
struct Watch {
    events: EventStream,
    stop_at: Option<SystemTime>,
    resume_at: Option<SystemTime>,
}

impl Watch {
    fn note(&mut self, kind: &EventKind, at: SystemTime) {
        match kind {
            EventKind::Stop => self.stop_at = Some(at),
            EventKind::Resume => self.resume_at = Some(at),
            _ => {}
        }
    }

    /// The next migration status event within `within`; `None` on timeout.
    async fn next_status(
        &mut self,
        within: Duration,
    ) -> Result<Option<MigrationStatus>, CheckpointError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Ok(None),
                Ok(Ok(ev)) => {
                    let kind = ev.kind();
                    self.note(&kind, ev.timestamp);
                    if let EventKind::Migration { status } = kind {
                        return Ok(Some(status));
                    }
                }
                Ok(Err(EventStreamError::Lagged { .. })) => {}
                Ok(Err(EventStreamError::Closed)) => {
                    return Err(QmpError::Disconnected {
                        command: Some("migrate".into()),
                    }
                    .into());
                }
            }
        }
    }

    /// Waits for `RESUME` (at most `within`).
    async fn resumed(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.resume_at.is_none() {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(ev)) => self.note(&ev.kind(), ev.timestamp),
                Ok(Err(EventStreamError::Lagged { .. })) => {}
                Ok(Err(EventStreamError::Closed)) | Err(_) => return,
            }
        }
    }
}

/// Saves a running VM's RAM and device state to `plan.memory_file` and,
/// if asked, copies a disk as it was at the same instant. Calls `progress`
/// with `query-migrate`'s answer about every 250 ms while RAM is copied.
///
/// On success the guest runs again and the files are complete. On failure
/// the guest runs on as before (QEMU resumes it after a failed migration;
/// this function resumes it after a failed disk step) and the caller must
/// remove the files.
pub async fn save(
    qmp: &Qmp,
    plan: &SavePlan,
    progress: impl FnMut(&MigrationInfo) + Send,
) -> Result<SaveReport, CheckpointError> {
    let status = qmp.query_status().await?;
    if status.status != RunState::Running {
        return Err(CheckpointError::NotRunning {
            state: status.status.to_string(),
        });
    }
    // The file is opened here and handed to QEMU as an fd set: QEMU then
    // only drops a reference when the migration ends. Closing a file it had
    // opened itself (after writing ~100 MiB) takes tens of milliseconds on
    // ext4, in QEMU's main loop, while the guest is still paused.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&plan.memory_file)
        .map_err(|e| CheckpointError::MigrationFailed {
            reason: format!("creating {}: {e}", plan.memory_file.display()),
        })?;
    let fdset = qmp.add_fd(file.into()).await?;
    let result = save_to(qmp, plan, &format!("file:/dev/fdset/{fdset}"), progress).await;
    if let Err(e) = qmp.remove_fd(fdset).await {
        debug!(error = %e, fdset, "checkpoint: fd set not removed");
    }
    result
}

async fn save_to(
    qmp: &Qmp,
    plan: &SavePlan,
    uri: &str,
    mut progress: impl FnMut(&MigrationInfo) + Send,
) -> Result<SaveReport, CheckpointError> {
    let started = Instant::now();
    let mut watch = Watch {
        events: qmp.events(),
        stop_at: None,
        resume_at: None,
    };
    qmp.migrate_set_capabilities(&file_capabilities()).await?;
    let mut limit = plan.downtime_limit;
    qmp.migrate_set_parameters(&MigrationParameters {
        max_bandwidth: Some(plan.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH)),
        downtime_limit: Some(millis(limit)),
        ..Default::default()
    })
    .await?;
    qmp.migrate(uri).await?;
    debug!(file = %plan.memory_file.display(), "checkpoint: saving memory");

    let mut raise_at = started + plan.converge_within;
    let mut last_progress = Instant::now();
    loop {
        if started.elapsed() > plan.timeout {
            let _ = qmp.migrate_cancel().await;
            resume_if_paused(qmp).await;
            return Err(CheckpointError::Timeout {
                what: "saving memory",
                after: plan.timeout,
            });
        }
        if Instant::now() >= raise_at {
            limit = (limit * 4).min(Duration::from_secs(60));
            raise_at = Instant::now() + plan.converge_within;
            info!(
                limit_ms = millis(limit),
                "checkpoint: RAM is dirtied faster than it is saved; allowing a longer pause"
            );
            qmp.migrate_set_parameters(&MigrationParameters {
                downtime_limit: Some(millis(limit)),
                ..Default::default()
            })
            .await?;
        }
        let status = match watch.next_status(PROGRESS_EVERY).await? {
            Some(s) => s,
            None => {
                let info = qmp.query_migrate().await?;
                progress(&info);
                last_progress = Instant::now();
                match info.status {
                    Some(s) => s,
                    None => continue,
                }
            }
        };
        match status {
            MigrationStatus::Completed => break,
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                let info = qmp.query_migrate().await.unwrap_or_default();
                resume_if_paused(qmp).await;
                return Err(CheckpointError::MigrationFailed {
                    reason: info
                        .error_desc
                        .unwrap_or_else(|| format!("the migration ended {status}")),
                });
            }
            _ => {
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    let info = qmp.query_migrate().await?;
                    progress(&info);
                    last_progress = Instant::now();
                }
            }
        }
    }

    // Completed: the guest is paused and RAM is on file. Settle, start the
    // disk copy from this very state, and let the guest run.
    let completed_at = Instant::now();
    let settle_deadline = Instant::now() + SETTLE;
    loop {
        let s = qmp.query_status().await?;
        if s.status == RunState::Postmigrate || s.running {
            break;
        }
        if Instant::now() >= settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let settled = completed_at.elapsed();
    let disk_started = match &plan.disk {
        Some(d) => start_disk_copy(qmp, d).await,
        None => Ok(()),
    };
    let disk_step = completed_at.elapsed();
    qmp.cont().await?;
    debug!(
        settle_us = settled.as_micros() as u64,
        disk_us = disk_step.as_micros() as u64,
        cont_us = completed_at.elapsed().as_micros() as u64,
        "checkpoint: switchover steps after completion"
    );
    watch.resumed(RESUME_WAIT).await;
    let info = qmp.query_migrate().await.unwrap_or_default();
    progress(&info);
    let paused = match (watch.stop_at, watch.resume_at) {
        (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default(),
        _ => Duration::from_millis(info.downtime.unwrap_or(0)),
    };
    let paused_at = watch.stop_at.unwrap_or_else(SystemTime::now);
    info!(
        paused_ms = paused.as_millis() as u64,
        qemu_downtime_ms = ?info.downtime,
        "checkpoint: memory saved; the guest runs again"
    );
    if let Err(e) = disk_started {
        if let Some(d) = &plan.disk {
            cleanup_disk_copy(qmp, d).await;
        }
        return Err(e);
    }
    let disk_copied = match &plan.disk {
        Some(d) => {
            let r = finish_disk_copy(qmp, d, plan.timeout).await;
            cleanup_disk_copy(qmp, d).await;
            r?
        }
        None => 0,
    };
    Ok(SaveReport {
        paused,
        total: started.elapsed(),
        qemu_downtime_ms: info.downtime,
        paused_at,
        ram_transferred: info.ram.map(|r| r.transferred).unwrap_or(0),
        disk_copied,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Resumes a guest that a failed save left paused.
async fn resume_if_paused(qmp: &Qmp) {
    match qmp.query_status().await {
        Ok(s)
            if !s.running
                && matches!(
                    s.status,
                    RunState::Postmigrate | RunState::FinishMigrate | RunState::Paused
                ) =>
        {
            if let Err(e) = qmp.cont().await {
                warn!(error = %e, "checkpoint: could not resume the guest after a failed save");
            }
        }
        _ => {}
    }
}

async fn start_disk_copy(qmp: &Qmp, d: &DiskCapture) -> Result<(), CheckpointError> {
    let fail = |e: QmpError| CheckpointError::DiskCopyFailed {
        reason: e.to_string(),
    };
    qmp.blockdev_set_active(true).await.map_err(fail)?;
    let target = d
        .target_file
        .to_str()
        .ok_or_else(|| CheckpointError::BadPath {
            path: d.target_file.clone(),
        })?;
    qmp.blockdev_add(json!({
        "driver": "qcow2",
        "node-name": d.target_node,
        "file": {"driver": "file", "filename": target},
    }))
    .await
    .map_err(fail)?;
    qmp.blockdev_backup(&BlockdevBackup {
        job_id: d.job_id.clone(),
        device: d.node.clone(),
        target: d.target_node.clone(),
        sync: if d.full {
            MirrorSync::Full
        } else {
            MirrorSync::Top
        },
        auto_dismiss: false,
    })
    .await
    .map_err(fail)
}

async fn finish_disk_copy(
    qmp: &Qmp,
    d: &DiskCapture,
    timeout: Duration,
) -> Result<u64, CheckpointError> {
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = qmp.query_jobs().await?;
        let Some(job) = jobs.iter().find(|j| j.id == d.job_id) else {
            return Err(CheckpointError::DiskCopyFailed {
                reason: format!("job {} vanished", d.job_id),
            });
        };
        if job.status == JobStatus::Concluded {
            return match &job.error {
                Some(e) => Err(CheckpointError::DiskCopyFailed { reason: e.clone() }),
                None => Ok(job.current_progress),
            };
        }
        if Instant::now() >= deadline {
            let _ = qmp.job_cancel(&d.job_id).await;
            return Err(CheckpointError::Timeout {
                what: "copying the disk",
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Dismisses the job and removes the target node, whatever state they are in.
async fn cleanup_disk_copy(qmp: &Qmp, d: &DiskCapture) {
    if let Ok(jobs) = qmp.query_jobs().await
        && let Some(job) = jobs.iter().find(|j| j.id == d.job_id)
    {
        if job.status != JobStatus::Concluded {
            let _ = qmp.job_cancel(&d.job_id).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match qmp.query_jobs().await {
                    Ok(jobs)
                        if jobs
                            .iter()
                            .any(|j| j.id == d.job_id && j.status != JobStatus::Concluded) =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
        }
        let _ = qmp.job_dismiss(&d.job_id).await;
    }
    if let Err(e) = qmp.blockdev_del(&d.target_node).await {
        debug!(error = %e, node = %d.target_node, "checkpoint: target node not removed");
    }
}

/// Loads RAM and device state from `memory_file` into a QEMU started with
/// `-incoming defer` and still paused. The caller then `cont`s. If loading
/// fails QEMU exits (its `exit-on-error` default), which shows here as a
/// load failure.
pub async fn load(
    qmp: &Qmp,
    memory_file: &Path,
    timeout: Duration,
) -> Result<Duration, CheckpointError> {
    let uri = file_uri(memory_file)?;
    let started = Instant::now();
    let mut watch = Watch {
        events: qmp.events(),
        stop_at: None,
        resume_at: None,
    };
    qmp.migrate_set_capabilities(&file_capabilities()).await?;
    qmp.migrate_incoming(&uri).await?;
    loop {
        if started.elapsed() > timeout {
            return Err(CheckpointError::Timeout {
                what: "loading memory",
                after: timeout,
            });
        }
        let status = match watch.next_status(Duration::from_millis(200)).await {
            Ok(Some(s)) => s,
            Ok(None) => match qmp.query_migrate().await {
                Ok(info) => match info.status {
                    Some(s) => s,
                    None => continue,
                },
                Err(e) => {
                    return Err(CheckpointError::LoadFailed {
                        reason: e.to_string(),
                    });
                }
            },
            Err(e) => {
                return Err(CheckpointError::LoadFailed {
                    reason: format!("QEMU exited while loading ({e})"),
                });
            }
        };
        match status {
            MigrationStatus::Completed => return Ok(started.elapsed()),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                let info = qmp.query_migrate().await.unwrap_or_default();
                return Err(CheckpointError::LoadFailed {
                    reason: info
                        .error_desc
                        .unwrap_or_else(|| format!("the incoming migration ended {status}")),
                });
            }
            _ => {}
        }
    }
}
