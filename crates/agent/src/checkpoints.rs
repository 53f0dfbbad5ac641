//! Checkpoints on this host: taking them (for the VM's supervisor, which
//! owns the QEMU process), keeping their files, deleting them, and finding
//! the requests meant for this host.
//!
//! Files live under `<agent data>/snapshots/<instance id>/<snapshot>/`
//! (`memory`, `disk.qcow2`, `meta.json`), outside the VM's own directory so
//! that deleting a VM can keep its snapshots. A snapshot is written under a
//! temporary name (`.tmp-<snapshot>`), verified, made durable and renamed;
//! only then is its record marked ready. So a crash, a full disk or a QEMU
//! that dies mid-save never leaves a listed partial snapshot, and never
//! touches the snapshots taken before.
//!
//! The store record is the authority on what exists; this module never
//! decides anything a record does not say, and never deletes a VM's disk.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use skyvisor_core::{
    Event, EventKind, InstanceId, InstanceRef, InstanceSpec, InstanceVolume, Snapshot,
    SnapshotKind, SnapshotName, SnapshotOrigin, SnapshotProgress, SnapshotState, keys,
};
use skyvisor_store::{Compare, Store, StoreError, StoreExt, WatchEvent, decode, put_json};
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::AgentContext;
use crate::hypervisor::{CheckpointPlan, Vm};
use crate::volumes::VolumeService;
use skyvisor_core::VolumeId;

/// The memory file of a snapshot.
pub const MEMORY_FILE: &str = "memory";
/// The disk file of a snapshot.
pub const DISK_FILE: &str = "disk.qcow2";
/// The snapshot's record as it was published, for people and recovery.
pub const META_FILE: &str = "meta.json";
/// Progress is written to the store at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The directory holding all snapshots of instance `id` on this host.
pub fn instance_dir(data_dir: &Path, id: &InstanceId) -> PathBuf {
    data_dir.join("snapshots").join(id.0.simple().to_string())
}

/// The published directory of a snapshot.
pub fn snapshot_dir(data_dir: &Path, snap: &Snapshot) -> PathBuf {
    instance_dir(data_dir, &snap.instance_id).join(snap.name.as_str())
}

fn tmp_dir(data_dir: &Path, snap: &Snapshot) -> PathBuf {
    instance_dir(data_dir, &snap.instance_id).join(format!(".tmp-{}", snap.name))
}

/// Where a VM's root disk is, for taking, restoring and cloning
/// checkpoints.
pub enum RootDisk {
    /// A local qcow2 file (with the image's base as backing file).
    Local(PathBuf),
    /// A root volume.
    Volume(VolumeRoot),
}

/// A VM's root volume, served on this host for the VM while it is used.
pub struct VolumeRoot {
    /// This host's volume service.
    pub service: Arc<VolumeService>,
    /// The volume.
    pub volume: InstanceVolume,
    /// The VM it is served for.
    pub instance: InstanceRef,
}

impl VolumeRoot {
    /// Serves the volume here for its VM (a no-op if it already is);
    /// returns its id.
    pub async fn serve(&self) -> Result<&VolumeId, String> {
        self.service
            .serve(&self.volume, &self.instance)
            .await
            .map_err(|e| format!("volume {}: {e}", self.volume.name))?;
        Ok(&self.volume.id)
    }
}

/// Applies `change` to a snapshot record with compare-and-swap, retrying
/// on concurrent writes. `change` returns false to leave the record alone.
/// Returns the record as written (or as found, if left alone); `None` if
/// it does not exist.
pub async fn update(
    store: &dyn Store,
    instance: &InstanceRef,
    name: &SnapshotName,
    mut change: impl FnMut(&mut Snapshot) -> bool,
) -> Result<Option<Snapshot>, StoreError> {
    let key = keys::snapshot(instance, name);
    loop {
        let Some(kv) = store.get(&key).await? else {
            return Ok(None);
        };
        let mut snap: Snapshot = decode(&kv)?;
        let was_ready = snap.state == SnapshotState::Ready;
        let was_deleting = snap.deleting;
        if !change(&mut snap) {
            return Ok(Some(snap));
        }
        snap.updated_at = Utc::now();
        let mut ops = vec![put_json(key.clone(), &snap)];
        // Its storage is metered from the moment it is ready.
        if !was_ready && snap.state == SnapshotState::Ready {
            ops.push(crate::event_op(&Event::snapshot(
                EventKind::Ready,
                &snap,
                format!(
                    "ready: {} bytes of memory, {} bytes of disk",
                    snap.memory_bytes, snap.disk_bytes
                ),
            )));
        }
        if !was_deleting && snap.deleting {
            ops.push(crate::event_op(&Event::snapshot(
                EventKind::Deleted,
                &snap,
                "deleted by its VM's checkpoint schedule",
            )));
        }
        let out = store
            .txn(
                vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                ops,
            )
            .await?;
        if out.succeeded {
            return Ok(Some(snap));
        }
    }
}

/// A snapshot record, if it exists.
pub async fn get(
    store: &dyn Store,
    instance: &InstanceRef,
    name: &SnapshotName,
) -> Result<Option<Snapshot>, StoreError> {
    Ok(store
        .get_json::<Snapshot>(&keys::snapshot(instance, name))
        .await?
        .map(|(s, _)| s))
}

/// All snapshot records of instance `name` (of any id).
pub async fn list_of(store: &dyn Store, name: &InstanceRef) -> Result<Vec<Snapshot>, StoreError> {
    Ok(store
        .list_json::<Snapshot>(&keys::snapshots_of(name))
        .await?
        .0
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

/// Bytes a file takes on disk (holes excluded); 0 if it is missing.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .unwrap_or(0)
}

async fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates an empty qcow2 at `target` shaped like `root`: same virtual
/// size and backing file, so a `sync=top` copy of `root` reads the same.
async fn create_disk_target(root: &Path, target: &Path) -> Result<(), String> {
    let info = run(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(root),
        "reading the root disk's layout",
    )
    .await?;
    let v: serde_json::Value = serde_json::from_slice(&info)
        .map_err(|e| format!("reading the root disk's layout: {e}"))?;
    let size = v["virtual-size"]
        .as_u64()
        .ok_or("reading the root disk's layout: no virtual size")?;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(backing) = v["full-backing-filename"]
        .as_str()
        .or_else(|| v["backing-filename"].as_str())
    {
        cmd.arg("-b").arg(backing);
        if let Some(fmt) = v["backing-filename-format"].as_str() {
            cmd.args(["-F", fmt]);
        }
    }
    cmd.arg(target).arg(size.to_string());
    run(&mut cmd, "creating the snapshot's disk")
        .await
        .map(drop)
}

/// Copies a (sparse) file.
async fn copy_file(from: &Path, to: &Path, what: &str) -> Result<(), String> {
    run(
        Command::new("cp").arg("--sparse=always").arg(from).arg(to),
        what,
    )
    .await
    .map(drop)
}

async fn fsync(path: &Path) -> Result<(), String> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&p).and_then(|f| f.sync_all()))
        .await
        .map_err(|e| format!("syncing {}: {e}", path.display()))?
        .map_err(|e| format!("syncing {}: {e}", path.display()))
}

/// Takes snapshot `snap` of the VM whose spec is `spec`: live (memory and
/// disk) when `vm` runs, of the disk only otherwise. Marks the record
/// saving, then ready or failed. Does nothing if the record is no longer
/// pending (another turn took it).
pub async fn take(
    ctx: &Arc<AgentContext>,
    spec: &InstanceSpec,
    vm: Option<&dyn Vm>,
    root_disk: &RootDisk,
    snap: Snapshot,
) -> Option<Snapshot> {
    let kind = if vm.is_some() {
        SnapshotKind::Full
    } else {
        SnapshotKind::DiskOnly
    };
    let claimed = update(ctx.store.as_ref(), &snap.instance_ref(), &snap.name, |s| {
        if s.state != SnapshotState::Pending || s.deleting || s.instance_id != spec.id {
            return false;
        }
        s.state = SnapshotState::Saving;
        s.kind = Some(kind);
        s.message = None;
        true
    })
    .await;
    let snap = match claimed {
        Ok(Some(s)) if s.state == SnapshotState::Saving && s.kind == Some(kind) => s,
        Ok(_) => return None,
        Err(e) => {
            warn!(snapshot = %snap.name, error = %e, "cannot claim the snapshot request");
            return None;
        }
    };
    info!(instance = %spec.name, snapshot = %snap.name, ?kind, "taking a snapshot");
    let started = Instant::now();
    let tmp = tmp_dir(&ctx.data_dir, &snap);
    let result = save(ctx, &snap, vm, root_disk, &tmp, kind).await;
    let outcome = match result {
        Ok(done) => {
            let final_dir = snapshot_dir(&ctx.data_dir, &snap);
            match publish(&tmp, &final_dir, &snap, &done).await {
                Ok(()) => Ok(done),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        let _ = tokio::fs::remove_dir_all(&tmp).await;
    }
    let written = update(ctx.store.as_ref(), &snap.instance_ref(), &snap.name, |s| {
        if s.state != SnapshotState::Saving {
            return false;
        }
        s.progress = None;
        match &outcome {
            Ok(done) => {
                s.state = SnapshotState::Ready;
                s.taken_at = Some(done.taken_at);
                s.paused_ms = Some(done.paused_ms);
                s.duration_ms = Some(started.elapsed().as_millis() as u64);
                s.memory_bytes = done.memory_bytes;
                s.disk_bytes = done.disk_bytes;
            }
            Err(e) => {
                s.state = SnapshotState::Failed;
                s.message = Some(e.clone());
            }
        }
        true
    })
    .await;
    match (&outcome, &written) {
        (Ok(done), _) => info!(
            instance = %spec.name, snapshot = %snap.name, paused_ms = done.paused_ms,
            memory_bytes = done.memory_bytes, disk_bytes = done.disk_bytes,
            took_ms = started.elapsed().as_millis() as u64, "snapshot ready"
        ),
        (Err(e), _) => {
            warn!(instance = %spec.name, snapshot = %snap.name, error = %e, "snapshot failed")
        }
    }
    match written {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            // The record went away meanwhile: its files must not linger.
            let _ = tokio::fs::remove_dir_all(snapshot_dir(&ctx.data_dir, &snap)).await;
            None
        }
        Err(e) => {
            warn!(snapshot = %snap.name, error = %e, "cannot record the snapshot's outcome");
            None
        }
    }
}

/// What a save produced, before it is published.
struct Saved {
    taken_at: DateTime<Utc>,
    paused_ms: u64,
    memory_bytes: u64,
    disk_bytes: u64,
}

async fn save(
    ctx: &Arc<AgentContext>,
    snap: &Snapshot,
    vm: Option<&dyn Vm>,
    root_disk: &RootDisk,
    tmp: &Path,
    kind: SnapshotKind,
) -> Result<Saved, String> {
    let _ = tokio::fs::remove_dir_all(tmp).await;
    tokio::fs::create_dir_all(tmp)
        .await
        .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let memory = tmp.join(MEMORY_FILE);
    let disk = tmp.join(DISK_FILE);
    let (taken_at, paused_ms) = match (kind, vm) {
        (SnapshotKind::Full, Some(vm)) => {
            let whole_disk = match root_disk {
                RootDisk::Local(root) => {
                    create_disk_target(root, &disk).await?;
                    false
                }
                RootDisk::Volume(v) => {
                    let size = v.service.served_size(v.serve().await?)?;
                    run(
                        Command::new("qemu-img")
                            .args(["create", "-q", "-f", "qcow2"])
                            .arg(&disk)
                            .arg(size.to_string()),
                        "creating the snapshot's disk",
                    )
                    .await?;
                    true
                }
            };
            let (tx, rx) = watch::channel(None::<SnapshotProgress>);
            let reporter = tokio::spawn(report_progress(
                ctx.store.clone(),
                snap.instance_ref(),
                snap.name.clone(),
                rx,
            ));
            let mut progress = |p: SnapshotProgress| {
                tx.send_replace(Some(p));
            };
            let result = vm
                .checkpoint(
                    &CheckpointPlan {
                        memory_file: memory.clone(),
                        disk_target: disk.clone(),
                        whole_disk,
                    },
                    &mut progress,
                )
                .await;
            reporter.abort();
            let done = result.map_err(|e| e.to_string().replace("VM control failed: ", ""))?;
            (
                DateTime::<Utc>::from(done.paused_at),
                done.paused.as_millis() as u64,
            )
        }
        _ => match root_disk {
            RootDisk::Local(root) => {
                if !tokio::fs::try_exists(root).await.unwrap_or(false) {
                    return Err("the VM has no disk yet (it never started)".into());
                }
                let at = Utc::now();
                copy_file(root, &disk, "copying the disk").await?;
                (at, 0)
            }
            RootDisk::Volume(v) => {
                let id = v.serve().await?;
                let at = Utc::now();
                let raw = tmp.join("disk.raw");
                v.service.copy_to_file(id, &raw).await?;
                crate::disks::convert(&raw, "raw", &disk, "qcow2").await?;
                let _ = tokio::fs::remove_file(&raw).await;
                (at, 0)
            }
        },
    };
    // Verify before publishing: the disk must be a sound qcow2, the memory
    // file must exist and hold something.
    run(
        Command::new("qemu-img").args(["check", "-q"]).arg(&disk),
        "checking the saved disk",
    )
    .await?;
    let memory_bytes = if kind == SnapshotKind::Full {
        let len = tokio::fs::metadata(&memory)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if len == 0 {
            return Err("the memory file is missing or empty".into());
        }
        fsync(&memory).await?;
        allocated_bytes(&memory)
    } else {
        0
    };
    fsync(&disk).await?;
    Ok(Saved {
        taken_at,
        paused_ms,
        memory_bytes,
        disk_bytes: allocated_bytes(&disk),
    })
}

/// Writes the metadata, makes everything durable and renames the
/// temporary directory to its published name.
async fn publish(
    tmp: &Path,
    final_dir: &Path,
    snap: &Snapshot,
    done: &Saved,
) -> Result<(), String> {
    let mut meta = snap.clone();
    meta.state = SnapshotState::Ready;
    meta.taken_at = Some(done.taken_at);
    meta.paused_ms = Some(done.paused_ms);
    meta.memory_bytes = done.memory_bytes;
    meta.disk_bytes = done.disk_bytes;
    meta.progress = None;
    let meta_path = tmp.join(META_FILE);
    tokio::fs::write(&meta_path, skyvisor_store::encode(&meta))
        .await
        .map_err(|e| format!("writing {}: {e}", meta_path.display()))?;
    fsync(&meta_path).await?;
    fsync(tmp).await?;
    if tokio::fs::try_exists(final_dir).await.unwrap_or(false) {
        // Leftovers of an earlier snapshot of this name whose record is gone.
        tokio::fs::remove_dir_all(final_dir)
            .await
            .map_err(|e| format!("removing stale {}: {e}", final_dir.display()))?;
    }
    tokio::fs::rename(tmp, final_dir)
        .await
        .map_err(|e| format!("publishing {}: {e}", final_dir.display()))?;
    if let Some(parent) = final_dir.parent() {
        fsync(parent).await?;
    }
    Ok(())
}

async fn report_progress(
    store: Arc<dyn Store>,
    instance: InstanceRef,
    name: SnapshotName,
    mut rx: watch::Receiver<Option<SnapshotProgress>>,
) {
    while rx.changed().await.is_ok() {
        let p = rx.borrow_and_update().clone();
        if let Some(p) = p {
            let _ = update(store.as_ref(), &instance, &name, |s| {
                if s.state != SnapshotState::Saving {
                    return false;
                }
                s.progress = Some(p.clone());
                true
            })
            .await;
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    }
}

/// Copies a snapshot's disk over a VM's root disk. A local disk is
/// replaced through a temporary name, so a failure leaves the old disk; a
/// volume is written in place, its first chunk last (see
/// [`crate::volumes::copy`]), so a failure leaves it partly restored: the
/// caller says so, and restoring again finishes the job.
pub async fn restore_disk(
    ctx: &AgentContext,
    snap: &Snapshot,
    root: &RootDisk,
) -> Result<(), String> {
    let from = snapshot_dir(&ctx.data_dir, snap).join(DISK_FILE);
    let root = match root {
        RootDisk::Local(root) => root,
        RootDisk::Volume(v) => {
            return v
                .service
                .fill_from_image(v.serve().await?, &from, "qcow2")
                .await
                .map(drop)
                .map_err(|e| {
                    format!("{e} (the volume is partly restored: restore again to finish)")
                });
        }
    };
    let tmp = root.with_extension("qcow2.restore");
    if let Err(e) = copy_file(&from, &tmp, "copying the snapshot's disk").await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, root)
        .await
        .map_err(|e| format!("replacing {}: {e}", root.display()))
}

/// The memory file of a full snapshot.
pub fn memory_file(ctx: &AgentContext, snap: &Snapshot) -> PathBuf {
    snapshot_dir(&ctx.data_dir, snap).join(MEMORY_FILE)
}

/// Whether snapshot `snap` can go onto the VM of `spec` here; why not.
pub fn check_usable(
    ctx: &AgentContext,
    snap: &Snapshot,
    spec: &InstanceSpec,
) -> Result<(), String> {
    if snap.state != SnapshotState::Ready || snap.deleting {
        return Err(format!(
            "snapshot {} is {}, not ready",
            snap.name, snap.state
        ));
    }
    if snap.host != ctx.host {
        return Err(format!(
            "snapshot {} is kept on host {}, not on {}",
            snap.name, snap.host, ctx.host
        ));
    }
    if snap.image != spec.image {
        return Err(format!(
            "snapshot {} was taken of image {}; this VM runs {}",
            snap.name, snap.image, spec.image
        ));
    }
    if snap.resources.vcpus != spec.resources.vcpus
        || snap.resources.memory_mib != spec.resources.memory_mib
    {
        return Err(format!(
            "snapshot {} needs {} vCPU and {} MiB; this VM has {} vCPU and {} MiB",
            snap.name,
            snap.resources.vcpus,
            snap.resources.memory_mib,
            spec.resources.vcpus,
            spec.resources.memory_mib
        ));
    }
    Ok(())
}

/// At a supervisor's start: a save this agent's predecessor left half done
/// is marked failed and its temporary files removed; pending requests are
/// returned to be carried out.
pub async fn recover(ctx: &AgentContext, spec: &InstanceSpec) -> Vec<Snapshot> {
    let all = match list_of(ctx.store.as_ref(), &spec.instance_ref()).await {
        Ok(l) => l,
        Err(e) => {
            warn!(instance = %spec.name, error = %e, "cannot list snapshots");
            return Vec::new();
        }
    };
    let mut pending = Vec::new();
    for snap in all {
        if snap.instance_id != spec.id || snap.host != ctx.host || snap.deleting {
            continue;
        }
        match snap.state {
            SnapshotState::Saving => {
                let _ = tokio::fs::remove_dir_all(tmp_dir(&ctx.data_dir, &snap)).await;
                let _ = update(ctx.store.as_ref(), &snap.instance_ref(), &snap.name, |s| {
                    if s.state != SnapshotState::Saving {
                        return false;
                    }
                    s.state = SnapshotState::Failed;
                    s.progress = None;
                    s.message = Some("the agent restarted while saving it".into());
                    true
                })
                .await;
                info!(instance = %spec.name, snapshot = %snap.name, "marked an interrupted snapshot failed");
            }
            SnapshotState::Pending => pending.push(snap),
            _ => {}
        }
    }
    pending
}

/// Marks the pending and saving snapshots of a VM being deleted failed.
pub async fn abandon(ctx: &AgentContext, spec: &InstanceSpec) {
    let Ok(all) = list_of(ctx.store.as_ref(), &spec.instance_ref()).await else {
        return;
    };
    for snap in all {
        if snap.instance_id != spec.id
            || !matches!(snap.state, SnapshotState::Pending | SnapshotState::Saving)
        {
            continue;
        }
        let _ = tokio::fs::remove_dir_all(tmp_dir(&ctx.data_dir, &snap)).await;
        let _ = update(ctx.store.as_ref(), &snap.instance_ref(), &snap.name, |s| {
            if !matches!(s.state, SnapshotState::Pending | SnapshotState::Saving) {
                return false;
            }
            s.state = SnapshotState::Failed;
            s.message = Some("the VM was deleted".into());
            true
        })
        .await;
    }
}

/// Writes a scheduled snapshot request for the VM (its supervisor then
/// takes it like any other).
pub async fn request_scheduled(ctx: &AgentContext, spec: &InstanceSpec) -> Result<(), String> {
    // The oldest goes first, so the VM never holds more than `keep`: the
    // schedule was admitted against the project's quota for that many.
    if let Some(schedule) = spec.checkpoint_schedule {
        prune_to(ctx, spec, schedule.keep.saturating_sub(1)).await;
    }
    let now = Utc::now();
    let name = SnapshotName::at("auto", now).map_err(|e| e.to_string())?;
    let snap = Snapshot {
        name: name.clone(),
        project: spec.project.clone(),
        instance: spec.name.clone(),
        instance_id: spec.id,
        host: ctx.host.clone(),
        state: SnapshotState::Pending,
        kind: None,
        origin: SnapshotOrigin::Scheduled,
        image: spec.image.clone(),
        instance_type: spec.instance_type.clone(),
        resources: spec.resources,
        created_at: now,
        taken_at: None,
        paused_ms: None,
        duration_ms: None,
        memory_bytes: 0,
        disk_bytes: 0,
        progress: None,
        deleting: false,
        message: None,
        updated_at: now,
    };
    ctx.store
        .create(
            &keys::snapshot(&spec.instance_ref(), &name),
            skyvisor_store::encode(&snap),
        )
        .await
        .map_err(|e| e.to_string())
        .map(drop)
}

/// Deletes the oldest scheduled snapshots beyond the schedule's `keep`
/// (ready ones), and all but the newest failed scheduled one. Manual
/// snapshots are never pruned.
pub async fn prune(ctx: &AgentContext, spec: &InstanceSpec) {
    if let Some(schedule) = spec.checkpoint_schedule {
        prune_to(ctx, spec, schedule.keep).await;
    }
}

/// Deletes the oldest ready scheduled snapshots beyond `keep`, and all but
/// the newest failed one.
async fn prune_to(ctx: &AgentContext, spec: &InstanceSpec, keep: u32) {
    let Ok(all) = list_of(ctx.store.as_ref(), &spec.instance_ref()).await else {
        return;
    };
    let mut ready: Vec<&Snapshot> = Vec::new();
    let mut failed: Vec<&Snapshot> = Vec::new();
    for s in &all {
        if s.instance_id != spec.id || s.origin != SnapshotOrigin::Scheduled || s.deleting {
            continue;
        }
        match s.state {
            SnapshotState::Ready => ready.push(s),
            SnapshotState::Failed => failed.push(s),
            _ => {}
        }
    }
    ready.sort_by_key(|s| std::cmp::Reverse(s.created_at));
    failed.sort_by_key(|s| std::cmp::Reverse(s.created_at));
    let doomed = ready
        .iter()
        .skip(keep as usize)
        .chain(failed.iter().skip(1));
    for s in doomed {
        debug!(instance = %spec.name, snapshot = %s.name, "pruning a scheduled snapshot");
        let _ = update(ctx.store.as_ref(), &s.instance_ref(), &s.name, |r| {
            if r.deleting || matches!(r.state, SnapshotState::Pending | SnapshotState::Saving) {
                return false;
            }
            r.deleting = true;
            true
        })
        .await;
    }
}

/// Removes a snapshot's files, then its record.
async fn delete(ctx: &AgentContext, snap: &Snapshot) {
    let dir = snapshot_dir(&ctx.data_dir, snap);
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(snapshot = %snap.name, error = %e, "cannot remove the snapshot's files");
        let _ = update(ctx.store.as_ref(), &snap.instance_ref(), &snap.name, |s| {
            s.message = Some(format!("cannot remove its files: {e}"));
            true
        })
        .await;
        return;
    }
    let _ = tokio::fs::remove_dir_all(tmp_dir(&ctx.data_dir, snap)).await;
    // Remove the instance's directory once it holds nothing.
    let _ = tokio::fs::remove_dir(instance_dir(&ctx.data_dir, &snap.instance_id)).await;
    match ctx
        .store
        .delete(&keys::snapshot(&snap.instance_ref(), &snap.name))
        .await
    {
        Ok(_) => info!(instance = %snap.instance, snapshot = %snap.name, "snapshot deleted"),
        Err(e) => warn!(snapshot = %snap.name, error = %e, "cannot delete the snapshot's record"),
    }
}

/// Follows the snapshot records of this host: deletes those marked for
/// deletion and hands pending requests to the supervisor of their VM.
pub async fn follow(ctx: Arc<AgentContext>) {
    loop {
        let listing = match ctx.store.list(keys::SNAPSHOTS).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot list snapshots; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for kv in &listing.items {
            if let Ok(snap) = decode::<Snapshot>(kv) {
                handle(&ctx, snap).await;
            }
        }
        let mut stream = match ctx.store.watch(keys::SNAPSHOTS, listing.revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot watch snapshots; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Put(kv)) => match decode::<Snapshot>(&kv) {
                    Ok(snap) => handle(&ctx, snap).await,
                    Err(e) => warn!(error = %e, "skipping undecodable snapshot"),
                },
                Ok(WatchEvent::Delete { .. }) => {}
                Err(e) => {
                    warn!(error = %e, "snapshot watch broke; relisting");
                    break;
                }
            }
        }
    }
}

async fn handle(ctx: &Arc<AgentContext>, snap: Snapshot) {
    if snap.host != ctx.host {
        return;
    }
    if snap.deleting {
        if !matches!(snap.state, SnapshotState::Pending | SnapshotState::Saving) {
            let ctx = ctx.clone();
            tokio::spawn(async move { delete(&ctx, &snap).await });
        }
        return;
    }
    if snap.state != SnapshotState::Pending {
        return;
    }
    let sent = ctx
        .checkpoint_inboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&snap.instance_id)
        .is_some_and(|tx| tx.send(snap.clone()).is_ok());
    if sent {
        return;
    }
    // No supervisor here: the VM is gone (or not started yet, and its
    // supervisor will pick the request up when it starts).
    let spec = ctx
        .store
        .get_json::<InstanceSpec>(&keys::instance_spec(&snap.instance_ref()))
        .await;
    if let Ok(spec) = spec
        && spec
            .as_ref()
            .is_none_or(|(s, _)| s.id != snap.instance_id || s.deleting)
    {
        let _ = update(ctx.store.as_ref(), &snap.instance_ref(), &snap.name, |s| {
            if s.state != SnapshotState::Pending {
                return false;
            }
            s.state = SnapshotState::Failed;
            s.message = Some(format!("instance {} no longer exists", snap.instance));
            true
        })
        .await;
    }
}
