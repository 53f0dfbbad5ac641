//! [`Hypervisor`] on QEMU, through the `skyvisor-qemu` driver.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use skyvisor_core::image::DiskFormat;
use skyvisor_core::{ExitReason, SnapshotProgress};
use skyvisor_core::{MigrationPhase, MigrationProgress};
use skyvisor_qemu::Qmp;
use skyvisor_qemu::checkpoint::{self, DiskCapture, SavePlan};
use skyvisor_qemu::qmp::{
    AnnounceParameters, BlockJobInfo, BlockdevMirror, EventKind, EventStreamError,
    MigrationCapability, MigrationInfo, MigrationParameters, MigrationStatus, MirrorSync,
    NbdListen, RunState, ShutdownCause,
};
use skyvisor_qemu::{
    Boot, CacheMode, DiskConfig, DiskSource, ExitInfo, Incoming, NbdServer, NicConfig, ProcessExit,
    QemuVm, VmConfig, files,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::hypervisor::{
    CheckpointOutcome, CheckpointPlan, HvError, Hypervisor, IncomingPlan, LaunchBoot, LaunchVolume,
    MIGRATION_EXPORT, OutgoingControl, OutgoingOutcome, OutgoingPlan, StreamAddr, TapFile, Vm,
    VmEvent, VmExit, VmLaunch,
};

/// The block node of the root disk (its disk id in [`QemuHypervisor::config`]).
const ROOT_NODE: &str = "root";
/// Caps the write rate of checkpoints (bytes per second), to leave the
/// host's disk to its VMs; unset, checkpoints write as fast as they can.
pub const MAX_BANDWIDTH_ENV: &str = "SKYVISOR_CHECKPOINT_MAX_BANDWIDTH";
/// The NIC's id.
const NIC_ID: &str = "net0";
/// How long loading a saved memory file may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the guest gets to answer on its control channel.
const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long QEMU keeps retrying a lost connection to the agent's NBD server
/// (an agent restart) before failing the guest's I/O.
const NBD_RECONNECT_SECS: u32 = 60;

/// QEMU's disk for a volume served by the agent's NBD server.
pub fn volume_disk(v: &LaunchVolume) -> DiskConfig {
    DiskConfig {
        id: v.disk_id.clone(),
        source: DiskSource::Nbd {
            server: NbdServer::Unix {
                path: v.socket.clone(),
            },
            export: v.export.clone(),
            reconnect_delay_secs: Some(NBD_RECONNECT_SECS),
        },
        read_only: false,
        // The guest sees a write cache and flushes it: FLUSH and FUA reach
        // every in-sync replica.
        cache: CacheMode::Writeback,
    }
}

/// Runs VMs as QEMU processes.
pub struct QemuHypervisor {
    /// The QEMU binary.
    pub binary: PathBuf,
}

impl QemuHypervisor {
    /// QEMU's configuration for a launch.
    pub fn config(&self, l: &VmLaunch) -> VmConfig {
        let mut cfg = VmConfig::new(&l.name, l.instance.0, &l.run_dir, l.accel);
        cfg.qemu_binary = self.binary.clone();
        cfg.vcpus = l.resources.vcpus;
        cfg.memory_mib = l.resources.memory_mib;
        cfg.boot = match &l.boot {
            LaunchBoot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => Boot::Kernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            },
            LaunchBoot::Firmware => Boot::Firmware,
        };
        // Data volumes are hot-plugged before the guest runs (see
        // `launch`), with their serial numbers.
        cfg.disks = vec![match l.root_volume() {
            Some(v) => volume_disk(v),
            None => DiskConfig {
                id: "root".into(),
                source: DiskSource::File {
                    path: l.root_disk.clone(),
                    format: DiskFormat::Qcow2,
                },
                read_only: false,
                // Host page cache with guest flushes honoured: safe, and works
                // on file systems without O_DIRECT (tmpfs).
                cache: CacheMode::Writeback,
            },
        }];
        cfg.nics = vec![NicConfig {
            id: NIC_ID.into(),
            ifname: l.tap.clone(),
            mac: l.mac,
            vhost: l.accel == skyvisor_core::Accel::Kvm && Path::new("/dev/vhost-net").exists(),
            fd: l.tap_file.as_ref().map(TapFile::raw_fd),
        }];
        cfg.guest_channel = l.guest_channel;
        cfg.guest_agent = l.guest_agent;
        cfg.seed = l.seed.clone();
        if l.incoming.is_some() || l.migration_target {
            cfg.incoming = Some(Incoming::Defer);
        }
        cfg.export_disks = l.migration_target;
        cfg
    }
}

/// What a QEMU exit means for the restart policy.
fn classify(info: &ExitInfo) -> VmExit {
    let reason = match (&info.shutdown, info.status) {
        (Some(s), _) if s.reason == ShutdownCause::HostQmpQuit => ExitReason::Requested,
        (Some(s), _) if s.reason == ShutdownCause::GuestShutdown => ExitReason::GuestShutdown,
        (Some(s), _) if s.reason == ShutdownCause::HostSignal => ExitReason::Killed,
        (_, ProcessExit::Signal(_)) => ExitReason::Killed,
        (_, ProcessExit::Code(_)) => ExitReason::Crashed,
        (_, ProcessExit::Unknown) => ExitReason::Vanished,
    };
    VmExit {
        reason,
        detail: info.to_string(),
    }
}

/// A QEMU VM's counters, through QMP.
struct QemuCounters {
    qmp: Qmp,
}

/// The guest device id in a QOM path such as
/// `/machine/peripheral/vd0/virtio-backend`.
fn device_id(qdev: &str) -> &str {
    let path = qdev.strip_prefix("/machine/peripheral/").unwrap_or(qdev);
    path.split('/').next().unwrap_or(path)
}

#[async_trait]
impl crate::hypervisor::VmCounters for QemuCounters {
    async fn disks(&self) -> Result<Vec<(String, crate::hypervisor::DiskCounters)>, HvError> {
        let list = self.qmp.query_blockstats().await.map_err(control)?;
        Ok(list
            .into_iter()
            // Only what a guest device uses (not the nodes below it).
            .filter_map(|b| {
                let id = device_id(b.qdev.as_deref().filter(|q| !q.is_empty())?).to_string();
                let s = b.stats;
                Some((
                    id,
                    crate::hypervisor::DiskCounters {
                        read_bytes: s.rd_bytes,
                        write_bytes: s.wr_bytes,
                        reads: s.rd_operations,
                        writes: s.wr_operations,
                        flushes: s.flush_operations,
                        read_ns: s.rd_total_time_ns,
                        write_ns: s.wr_total_time_ns,
                        flush_ns: s.flush_total_time_ns,
                    },
                ))
            })
            .collect())
    }

    async fn vcpu_threads(&self) -> Result<Vec<u32>, HvError> {
        let cpus = self.qmp.query_cpus_fast().await.map_err(control)?;
        Ok(cpus.into_iter().map(|c| c.thread_id).collect())
    }
}

struct QemuVmHandle {
    vm: QemuVm,
    rx: mpsc::UnboundedReceiver<VmEvent>,
    exited: Option<VmExit>,
    forwarder: tokio::task::JoinHandle<()>,
}

impl QemuVmHandle {
    fn new(vm: QemuVm) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut events = vm.qmp().events();
        let mut exit = vm.exit_watch();
        let forwarder = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(e) => match e.kind() {
                            EventKind::Shutdown(s) if s.guest => {
                                let _ = tx.send(VmEvent::GuestShutdown);
                            }
                            EventKind::Reset(_) => {
                                let _ = tx.send(VmEvent::Reset);
                            }
                            _ => {}
                        },
                        Err(EventStreamError::Lagged { missed }) => {
                            debug!(missed, "QMP events missed");
                        }
                        // QMP closed: the exit watch tells how it ended.
                        Err(EventStreamError::Closed) => {
                            let info = exit.wait_for(Option::is_some).await.ok().and_then(|i| i.clone());
                            if let Some(info) = info {
                                let _ = tx.send(VmEvent::Exited(classify(&info)));
                            }
                            return;
                        }
                    },
                    changed = exit.changed() => {
                        let info = exit.borrow().clone();
                        if let Some(info) = info {
                            let _ = tx.send(VmEvent::Exited(classify(&info)));
                            return;
                        }
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            vm,
            rx,
            exited: None,
            forwarder,
        }
    }
}

impl Drop for QemuVmHandle {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

fn control(e: impl std::fmt::Display) -> HvError {
    HvError::Control(e.to_string())
}

#[async_trait]
impl Vm for QemuVmHandle {
    fn pid(&self) -> Option<u32> {
        u32::try_from(self.vm.pid()).ok()
    }

    fn tap_file(&self, tap: &str) -> Option<TapFile> {
        match self.vm.tap_file(tap) {
            Ok(file) => file.map(|f| TapFile(std::sync::Arc::new(f))),
            Err(e) => {
                debug!(tap, error = %e, "cannot share QEMU's tap file");
                None
            }
        }
    }

    fn counters(&self) -> Option<std::sync::Arc<dyn crate::hypervisor::VmCounters>> {
        Some(std::sync::Arc::new(QemuCounters {
            qmp: self.vm.qmp().clone(),
        }))
    }

    async fn next_event(&mut self) -> VmEvent {
        if let Some(e) = &self.exited {
            return VmEvent::Exited(e.clone());
        }
        let event = match self.rx.recv().await {
            Some(e) => e,
            None => VmEvent::Exited(match self.vm.exited() {
                Some(info) => classify(&info),
                None => VmExit {
                    reason: ExitReason::Vanished,
                    detail: "lost track of the QEMU process".into(),
                },
            }),
        };
        if let VmEvent::Exited(e) = &event {
            self.exited = Some(e.clone());
        }
        event
    }

    async fn powerdown(&self) -> Result<(), HvError> {
        self.vm.qmp().system_powerdown().await.map_err(control)
    }

    async fn reset_and_resume(&self) -> Result<(), HvError> {
        self.vm.qmp().system_reset().await.map_err(control)?;
        self.vm.qmp().cont().await.map_err(control)
    }

    async fn quit(&self) -> Result<(), HvError> {
        self.vm.qmp().quit().await.map_err(control)
    }

    fn kill(&self) {
        let _ = self.vm.kill();
    }

    async fn checkpoint(
        &self,
        plan: &CheckpointPlan,
        progress: &mut (dyn FnMut(SnapshotProgress) + Send),
    ) -> Result<CheckpointOutcome, HvError> {
        let mut save = SavePlan::new(&plan.memory_file);
        save.max_bandwidth = std::env::var(MAX_BANDWIDTH_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        save.disk = Some(DiskCapture {
            node: ROOT_NODE.into(),
            target_file: plan.disk_target.clone(),
            target_node: "svckpt".into(),
            job_id: "svckpt".into(),
            full: plan.whole_disk,
        });
        let report = checkpoint::save(self.vm.qmp(), &save, |info| {
            if let Some(ram) = &info.ram {
                progress(SnapshotProgress {
                    ram_transferred: ram.transferred,
                    ram_remaining: ram.remaining,
                    ram_total: ram.total,
                });
            }
        })
        .await
        .map_err(control)?;
        Ok(CheckpointOutcome {
            paused: report.paused,
            paused_at: report.paused_at,
            total: report.total,
        })
    }

    async fn recover_checkpoint(&self) -> Result<(), HvError> {
        let qmp = self.vm.qmp();
        let info = qmp.query_migrate().await.map_err(control)?;
        if matches!(
            info.status,
            Some(MigrationStatus::Active | MigrationStatus::Setup | MigrationStatus::Device)
        ) {
            info!(
                pid = self.vm.pid(),
                "cancelling a checkpoint the previous agent left running"
            );
            qmp.migrate_cancel().await.map_err(control)?;
            // The cancel completes asynchronously; wait a little for it.
            for _ in 0..100 {
                match qmp.query_migrate().await.map_err(control)?.status {
                    Some(s) if s.is_finished() => break,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        if let Ok(jobs) = qmp.query_jobs().await {
            for j in jobs.iter().filter(|j| j.id == "svckpt") {
                let _ = qmp.job_cancel(&j.id).await;
                let _ = qmp.job_dismiss(&j.id).await;
            }
        }
        let _ = qmp.blockdev_del("svckpt").await;
        // A live migration's disk mirror an earlier agent left running.
        if drop_mirror(qmp).await.unwrap_or(false) {
            info!(
                pid = self.vm.pid(),
                "cancelled a migration's disk mirror the previous agent left running"
            );
        }
        let status = qmp.query_status().await.map_err(control)?;
        if status.status == RunState::Postmigrate {
            info!(
                pid = self.vm.pid(),
                "resuming a guest a checkpoint left paused"
            );
            qmp.cont().await.map_err(control)?;
        }
        Ok(())
    }

    async fn set_link(&self, up: bool) -> Result<(), HvError> {
        self.vm.qmp().set_link(NIC_ID, up).await.map_err(control)
    }

    async fn guest_request(&self, line: &str) -> Result<String, HvError> {
        let path = self.vm.run_dir().join(files::GUEST_SOCKET);
        let exchange = async {
            let mut stream = tokio::net::UnixStream::connect(&path).await?;
            stream.write_all(format!("{line}\n").as_bytes()).await?;
            let mut reader = BufReader::new(stream);
            let mut answer = String::new();
            reader.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer.trim().to_string())
        };
        match tokio::time::timeout(GUEST_TIMEOUT, exchange).await {
            Ok(Ok(a)) if !a.is_empty() => Ok(a),
            Ok(Ok(_)) => Err(HvError::Control(
                "the guest closed its control channel without answering".into(),
            )),
            Ok(Err(e)) => Err(HvError::Control(format!(
                "guest control channel {}: {e}",
                path.display()
            ))),
            Err(_) => Err(HvError::Control(format!(
                "the guest did not answer on its control channel within {GUEST_TIMEOUT:?}"
            ))),
        }
    }
    async fn attach_disk(&self, disk: &LaunchVolume) -> Result<(), HvError> {
        plug(&self.vm, disk).await
    }

    async fn migrate_out(
        &self,
        plan: &OutgoingPlan,
        control: &mut dyn OutgoingControl,
    ) -> Result<OutgoingOutcome, HvError> {
        let qmp = self.vm.qmp();
        match migrate_out(qmp, plan, control).await {
            Ok(o) => Ok(o),
            Err(e) => {
                control.unblock().await;
                if let Err(undo) = abort_outgoing(qmp).await {
                    warn!(error = %undo, "could not undo a failed migration cleanly");
                }
                Err(e)
            }
        }
    }

    async fn resume_after_migration(&self) -> Result<(), HvError> {
        abort_outgoing(self.vm.qmp()).await
    }

    async fn prepare_incoming(&self, plan: &IncomingPlan) -> Result<(), HvError> {
        let qmp = self.vm.qmp();
        qmp.migrate_set_capabilities(&[
            (MigrationCapability::Events, true),
            // Activate the disk only at `cont`, after the export is gone:
            // the export holds write access until then.
            (MigrationCapability::LateBlockActivate, true),
        ])
        .await
        .map_err(control)?;
        if let Some(nbd) = &plan.nbd {
            let listen = match nbd {
                StreamAddr::Tcp { host, port } => NbdListen::Inet {
                    host: host.clone(),
                    port: *port,
                },
                StreamAddr::Unix(path) => NbdListen::Unix { path: path.clone() },
            };
            qmp.nbd_server_start(&listen).await.map_err(control)?;
            qmp.nbd_server_add(ROOT_NODE, MIGRATION_EXPORT, true)
                .await
                .map_err(control)?;
        }
        qmp.migrate_incoming(&plan.memory.migration_uri())
            .await
            .map_err(control)
    }

    async fn incoming_arrived(&self, timeout: Duration) -> Result<(), HvError> {
        let qmp = self.vm.qmp();
        let deadline = Instant::now() + timeout;
        loop {
            let info = qmp.query_migrate().await.map_err(control)?;
            match info.status {
                Some(MigrationStatus::Completed) => return Ok(()),
                Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                    return Err(HvError::Control(format!(
                        "the incoming migration failed: {}",
                        info.error_desc.unwrap_or_default()
                    )));
                }
                _ if Instant::now() > deadline => {
                    return Err(HvError::Control(format!(
                        "the incoming migration did not complete within {timeout:?}"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    async fn finish_incoming(&self, timeout: Duration) -> Result<(), HvError> {
        let qmp = self.vm.qmp();
        let started = Instant::now();
        self.incoming_arrived(timeout).await?;
        // The guest's clients wait from here: run it and announce it first
        // (`cont` of a running VM does nothing), tidy up after.
        let completed = started.elapsed();
        qmp.cont().await.map_err(control)?;
        let running = started.elapsed();
        let announced = qmp
            .announce_self(&AnnounceParameters::default())
            .await
            .map_err(control);
        tracing::debug!(
            completed_ms = completed.as_millis() as u64,
            running_ms = running.as_millis() as u64,
            announced_ms = started.elapsed().as_millis() as u64,
            "incoming VM resumed"
        );
        // Gone already after an earlier attempt, or never started: fine.
        let _ = qmp.nbd_server_stop().await;
        announced
    }

    async fn detach_disk(&self, disk_id: &str, timeout: Duration) -> Result<(), HvError> {
        let qmp = self.vm.qmp();
        // Subscribe first so the event cannot slip by.
        let mut events = qmp.events();
        match qmp.device_del(disk_id).await {
            Ok(()) => {
                let gone = events.wait_for(|e| {
                    matches!(e.kind(), EventKind::DeviceDeleted { device: Some(d), .. } if d == disk_id)
                });
                if tokio::time::timeout(timeout, gone).await.is_err() {
                    return Err(HvError::Control(format!(
                        "the guest did not release disk {disk_id} within {}s",
                        timeout.as_secs()
                    )));
                }
            }
            // Already gone (an earlier attempt got this far).
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(control(e)),
        }
        match qmp.blockdev_del(disk_id).await {
            Err(e) if !e.to_string().contains("not found") => Err(control(e)),
            _ => Ok(()),
        }
    }
}

/// The mirror job and target node of a migrating root disk.
const MIRROR_JOB: &str = "svmig-root";
/// How often the source looks at the memory transfer (the pause for the
/// switchover is seen at once, as QEMU's event).
const MIGRATION_POLL: Duration = Duration::from_millis(50);
/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long a `query-migrate` may take during a migration.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest the last stop-and-copy may take before it counts as failed.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(60);

fn mirror_progress(job: Option<&BlockJobInfo>) -> (u64, u64) {
    job.map_or((0, 0), |j| (j.offset, j.len))
}

fn ram_progress(info: &MigrationInfo, disk: (u64, u64)) -> MigrationProgress {
    let ram = info.ram.clone().unwrap_or_default();
    MigrationProgress {
        disk_copied: disk.0,
        disk_total: disk.1,
        ram_transferred: ram.transferred,
        ram_remaining: ram.remaining,
        ram_total: ram.total,
        dirty_rate: ram.dirty_pages_rate.saturating_mul(ram.page_size.max(4096)),
        mbps: ram.mbps,
        iteration: ram.dirty_sync_count,
        expected_downtime_ms: info.expected_downtime.unwrap_or(0),
        throttle_percent: info.cpu_throttle_percentage.unwrap_or(0),
    }
}

/// Whether `event` says QEMU paused the guest to switch a migration over.
fn guest_paused_for_switchover(event: &EventKind) -> bool {
    matches!(
        event,
        EventKind::Stop
            | EventKind::Migration {
                status: MigrationStatus::Completed
            }
    )
}

/// Tracks whether bytes still move.
struct StallWatch {
    last: u64,
    since: Instant,
    limit: Duration,
}

impl StallWatch {
    fn new(limit: Duration) -> Self {
        Self {
            last: 0,
            since: Instant::now(),
            limit,
        }
    }

    fn check(&mut self, moved: u64, what: &str) -> Result<(), HvError> {
        if moved != self.last {
            self.last = moved;
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() > self.limit {
            return Err(HvError::Control(format!(
                "{what} stalled: nothing moved for {}s (is the destination reachable?)",
                self.limit.as_secs()
            )));
        }
        Ok(())
    }
}

/// `query-migrate` with a short deadline: while a send to an unreachable
/// destination blocks QEMU, its monitor does not answer, and that is a
/// stall too.
async fn query_migrate(qmp: &Qmp) -> Result<MigrationInfo, HvError> {
    let v = qmp
        .execute_with_timeout("query-migrate", serde_json::Value::Null, QUERY_TIMEOUT)
        .await
        .map_err(|e| {
            HvError::Control(format!(
                "QEMU stopped answering while migrating (is the destination reachable?): {e}"
            ))
        })?;
    serde_json::from_value(v).map_err(control)
}

async fn mirror_job(qmp: &Qmp) -> Result<Option<BlockJobInfo>, HvError> {
    Ok(qmp
        .query_block_jobs()
        .await
        .map_err(control)?
        .into_iter()
        .find(|j| j.device == MIRROR_JOB))
}

/// The source's steps; the caller undoes them on failure.
async fn migrate_out(
    qmp: &Qmp,
    plan: &OutgoingPlan,
    ctl: &mut dyn OutgoingControl,
) -> Result<OutgoingOutcome, HvError> {
    let started = Instant::now();
    let cancelled = || HvError::Control("the migration was cancelled".into());
    let timed_out = || {
        HvError::Control(format!(
            "the migration did not converge within {}s",
            plan.max_duration.as_secs()
        ))
    };
    // 1. The disk: mirror it into the destination's export; from `ready` on,
    // every guest write reaches both (write-blocking), so it stays in sync.
    if let Some(disk) = &plan.disk {
        qmp.blockdev_add(serde_json::json!({
            "driver": "nbd",
            "node-name": MIRROR_JOB,
            "server": disk.server.socket_json(),
            "export": disk.export,
        }))
        .await
        .map_err(control)?;
        qmp.blockdev_mirror(&BlockdevMirror {
            job_id: MIRROR_JOB.into(),
            device: ROOT_NODE.into(),
            target: MIRROR_JOB.into(),
            // The destination's disk has the same base: only this VM's own
            // layer moves.
            sync: MirrorSync::Top,
            speed: plan.max_bandwidth,
            copy_mode: Some("write-blocking".into()),
        })
        .await
        .map_err(control)?;
        let mut stall = StallWatch::new(plan.stall_timeout);
        let mut reported = Instant::now() - PROGRESS_EVERY;
        loop {
            let job = mirror_job(qmp).await?;
            let Some(job) = job else {
                return Err(HvError::Control(
                    "the disk mirror ended before it was in sync".into(),
                ));
            };
            if let Some(e) = &job.error {
                return Err(HvError::Control(format!("the disk mirror failed: {e}")));
            }
            if reported.elapsed() >= PROGRESS_EVERY || job.ready {
                reported = Instant::now();
                let p = MigrationProgress {
                    disk_copied: job.offset,
                    disk_total: job.len,
                    ..Default::default()
                };
                if !ctl.progress(MigrationPhase::CopyingDisk, &p).await {
                    return Err(cancelled());
                }
            }
            if job.ready {
                break;
            }
            stall.check(job.offset, "the disk copy")?;
            if started.elapsed() > plan.max_duration {
                return Err(timed_out());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // 2. Memory, while the guest runs, until QEMU finds that what is left
    // fits the budget and pauses the guest itself, as plain QEMU does (it
    // judges by what crosses the wire, and counts untouched pages at full
    // size). Frames that reach the tap while the guest is paused wait in
    // the tap, since QEMU stops reading a paused guest's (after at most one
    // frame, kept in its own queue): the agent holds the tap's file and
    // sends them on after the handover.
    qmp.migrate_set_capabilities(&[
        (MigrationCapability::Events, true),
        (MigrationCapability::AutoConverge, true),
        (MigrationCapability::PauseBeforeSwitchover, false),
        (MigrationCapability::PostcopyRam, false),
    ])
    .await
    .map_err(control)?;
    qmp.migrate_set_parameters(&MigrationParameters {
        downtime_limit: Some(plan.switchover_budget.as_millis() as u64),
        max_bandwidth: Some(plan.max_bandwidth.unwrap_or(u64::MAX >> 8)),
        ..Default::default()
    })
    .await
    .map_err(control)?;
    let mut events = qmp.events();
    qmp.migrate(&plan.memory.migration_uri())
        .await
        .map_err(control)?;
    let mut stall = StallWatch::new(plan.stall_timeout);
    let mut reported = Instant::now() - PROGRESS_EVERY;
    let mut disk = (0, 0);
    let mut events_open = true;
    let stopped_at = loop {
        let paused = tokio::select! {
            e = events.wait_for(|e| guest_paused_for_switchover(&e.kind())), if events_open => {
                // None: no more events; the polls below still see the end.
                events_open = e.is_some();
                events_open
            }
            () = tokio::time::sleep(MIGRATION_POLL) => false,
        };
        if paused {
            break Instant::now();
        }
        let info = query_migrate(qmp).await?;
        match info.status {
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                return Err(HvError::Control(format!(
                    "the memory transfer failed: {}",
                    info.error_desc
                        .unwrap_or_else(|| "QEMU gave no reason".into())
                )));
            }
            // Paused meanwhile (the event stream lagged or closed).
            Some(MigrationStatus::Completed) => {
                let paused = Duration::from_millis(info.downtime.unwrap_or(0));
                break Instant::now()
                    .checked_sub(paused)
                    .unwrap_or_else(Instant::now);
            }
            _ => {}
        }
        let ram = info.ram.clone().unwrap_or_default();
        if reported.elapsed() >= PROGRESS_EVERY {
            reported = Instant::now();
            if plan.disk.is_some() {
                disk = mirror_progress(mirror_job(qmp).await?.as_ref());
            }
            if !ctl
                .progress(MigrationPhase::Transferring, &ram_progress(&info, disk))
                .await
            {
                return Err(cancelled());
            }
        }
        stall.check(ram.transferred, "the memory transfer")?;
        if started.elapsed() > plan.max_duration {
            return Err(timed_out());
        }
    };
    // 3. Switchover: the guest is paused and QEMU sends the rest; move its
    // traffic to the destination meanwhile.
    debug!("the guest is paused for the switchover");
    let switched = async {
        let r = ctl
            .switch_network()
            .await
            .map_err(|e| HvError::Control(format!("switching the network: {e}")));
        debug!(
            switched_ms = stopped_at.elapsed().as_millis() as u64,
            "network switched"
        );
        r
    };
    let (switched, info) = tokio::join!(switched, last_copy(qmp));
    switched?;
    finish_outgoing(qmp, plan, stopped_at, &info?).await
}

/// Waits until QEMU sent the last of the memory (the guest is paused).
async fn last_copy(qmp: &Qmp) -> Result<MigrationInfo, HvError> {
    let deadline = Instant::now() + COMPLETION_TIMEOUT;
    loop {
        let info = query_migrate(qmp).await?;
        match info.status {
            Some(MigrationStatus::Completed) => return Ok(info),
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                return Err(HvError::Control(format!(
                    "the last copy failed: {}",
                    info.error_desc
                        .unwrap_or_else(|| "QEMU gave no reason".into())
                )));
            }
            _ if Instant::now() > deadline => {
                return Err(HvError::Control(format!(
                    "the last copy did not finish within {}s",
                    COMPLETION_TIMEOUT.as_secs()
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Ends the disk mirror after the memory arrived (the guest is paused):
/// cancelling a job in sync completes it, leaving the copy in place.
async fn finish_outgoing(
    qmp: &Qmp,
    plan: &OutgoingPlan,
    stopped_at: Instant,
    info: &MigrationInfo,
) -> Result<OutgoingOutcome, HvError> {
    let mut disk_copied = 0;
    if plan.disk.is_some() {
        let mut events = qmp.events();
        qmp.block_job_cancel(MIRROR_JOB, false)
            .await
            .map_err(control)?;
        let done = events.wait_for(|e| {
            matches!(e.kind(), EventKind::BlockJobCompleted(j) | EventKind::BlockJobCancelled(j) if j.device == MIRROR_JOB)
        });
        match tokio::time::timeout(COMPLETION_TIMEOUT, done).await {
            Ok(Some(e)) => {
                if let EventKind::BlockJobCompleted(j) = e.kind() {
                    disk_copied = j.offset;
                    if let Some(err) = j.error {
                        return Err(HvError::Control(format!(
                            "the disk mirror failed at the end: {err}"
                        )));
                    }
                } else {
                    return Err(HvError::Control(
                        "the disk mirror was cancelled before it completed".into(),
                    ));
                }
            }
            _ => {
                return Err(HvError::Control("the disk mirror did not complete".into()));
            }
        }
        let _ = qmp.blockdev_del(MIRROR_JOB).await;
    }
    Ok(OutgoingOutcome {
        stopped_at: stopped_at.into_std(),
        qemu_downtime_ms: info.downtime.unwrap_or(0),
        ram_transferred: info.ram.as_ref().map_or(0, |r| r.transferred),
        disk_copied,
    })
}

/// Cancels a migration's disk mirror if one runs, waits (a few seconds at
/// most) until it is gone and removes its target node. Returns whether there
/// was one.
async fn drop_mirror(qmp: &Qmp) -> Result<bool, HvError> {
    let found = mirror_job(qmp).await?.is_some();
    if found {
        let _ = qmp.block_job_cancel(MIRROR_JOB, true).await;
        for _ in 0..500 {
            if mirror_job(qmp).await?.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = qmp.blockdev_del(MIRROR_JOB).await;
    Ok(found)
}

/// Undoes the source's side: cancels the transfer and the mirror, drops
/// the target node and lets the guest run.
async fn abort_outgoing(qmp: &Qmp) -> Result<(), HvError> {
    let info = qmp.query_migrate().await.map_err(control)?;
    if info.status.as_ref().is_some_and(|s| !s.is_finished()) {
        qmp.migrate_cancel().await.map_err(control)?;
        for _ in 0..500 {
            match qmp.query_migrate().await.map_err(control)?.status {
                Some(s) if s.is_finished() => break,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
    drop_mirror(qmp).await?;
    let status = qmp.query_status().await.map_err(control)?;
    if !status.running
        && matches!(
            status.status,
            RunState::Paused | RunState::Postmigrate | RunState::FinishMigrate
        )
    {
        qmp.cont().await.map_err(control)?;
    }
    Ok(())
}

/// Adds a volume disk to a running or paused VM: its NBD block node, then
/// the virtio-blk device; undoes the node if the device fails.
async fn plug(vm: &QemuVm, disk: &LaunchVolume) -> Result<(), HvError> {
    let cfg = volume_disk(disk);
    let node = cfg.blockdev_json().map_err(control)?;
    vm.qmp().blockdev_add(node).await.map_err(control)?;
    let mut device = cfg.device_json(false);
    if let Some(obj) = device.as_object_mut() {
        obj.insert(
            "serial".into(),
            serde_json::Value::from(disk.serial.clone()),
        );
    }
    if let Err(e) = vm.qmp().device_add(device).await {
        let _ = vm.qmp().blockdev_del(&disk.disk_id).await;
        return Err(control(e));
    }
    Ok(())
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    async fn launch(&self, launch: &VmLaunch) -> Result<Box<dyn Vm>, HvError> {
        let cfg = self.config(launch);
        let began = std::time::Instant::now();
        let vm = skyvisor_qemu::launch(&cfg)
            .await
            .map_err(|e| HvError::StartFailed(e.to_string()))?;
        debug!(
            pid = vm.pid(),
            ms = began.elapsed().as_millis() as u64,
            "QEMU started, QMP connected"
        );
        // Subscribe before the guest runs so no event is missed.
        let handle = QemuVmHandle::new(vm);
        if launch.migration_target {
            // It stays paused until the migration brings its state.
            return Ok(Box::new(handle));
        }
        if let Some(memory) = &launch.incoming {
            match checkpoint::load(handle.vm.qmp(), memory, LOAD_TIMEOUT).await {
                Ok(took) => {
                    debug!(took_ms = took.as_millis() as u64, "memory loaded");
                }
                Err(e) => {
                    let _ = handle.vm.kill();
                    return Err(HvError::StartFailed(format!(
                        "restoring memory from {}: {e}",
                        memory.display()
                    )));
                }
            }
        }
        if launch.link_down
            && let Err(e) = handle.vm.qmp().set_link(NIC_ID, false).await
        {
            let _ = handle.vm.kill();
            return Err(HvError::StartFailed(format!(
                "could not unplug the NIC: {e}"
            )));
        }
        for v in launch.volumes.iter().filter(|v| !v.root) {
            if let Err(e) = plug(&handle.vm, v).await {
                let _ = handle.vm.kill();
                return Err(HvError::StartFailed(format!(
                    "could not attach volume {}: {e}",
                    v.name
                )));
            }
        }
        if let Err(e) = handle.vm.qmp().cont().await {
            let _ = handle.vm.kill();
            return Err(HvError::StartFailed(format!(
                "could not start the guest: {e}"
            )));
        }
        Ok(Box::new(handle))
    }

    async fn attach(&self, run_dir: &Path) -> Option<Box<dyn Vm>> {
        match skyvisor_qemu::attach(run_dir).await {
            Ok(vm) => Some(Box::new(QemuVmHandle::new(vm))),
            Err(e) => {
                debug!(run_dir = %run_dir.display(), error = %e, "no VM to re-attach to");
                None
            }
        }
    }
}
