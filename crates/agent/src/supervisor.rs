//! One task per VM: it owns the VM's hypervisor process and converges it to
//! the instance's spec — start, stop, reboot, resize, restart after a
//! crash, delete — writing the instance's status as it goes.
//!
//! The task is level-triggered: each turn compares the latest spec with
//! what runs, acts, then waits for the spec, the VM or a timer to change.
//! A restarted agent starts a new task that re-attaches to the running VM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use skyvisor_core::{
    CheckpointSchedule, CloneSource, ExitReason, ExitRecord, HaPolicy, InstancePhase, InstanceRef,
    InstanceSpec, InstanceStatus, InstanceVolume, PowerState, Resources, RestartPolicy,
    RestoreRequest, Snapshot, SnapshotKind, SnapshotOrigin, VolumeAttachment, VolumeName, keys,
};
use skyvisor_store::{Compare, Op, StoreExt, decode, encode};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::AgentContext;
use crate::checkpoints;
use crate::hypervisor::{LaunchVolume, TapFile, Vm, VmEvent, VmExit, VmLaunch};
use crate::launch::Launcher;

/// The file in a VM's directory recording how its running process was launched.
pub(crate) const LAUNCH_FILE: &str = "launch.json";
/// The root disk's file name.
pub const ROOT_DISK: &str = "root.qcow2";
/// How long QEMU gets to exit after `quit` before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each exchange with a guest agent may take.
const GUEST_AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Restart delays after unrequested exits grow up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A VM that ran this long before failing restarts without delay.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How long the guest gets to release a volume being detached.
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);

/// A running VM and what it was launched with.
pub(crate) struct Running {
    pub(crate) vm: Box<dyn Vm>,
    pub(crate) resources: Resources,
    pub(crate) since: Instant,
    /// The volume disks plugged into it.
    pub(crate) volumes: Vec<LaunchVolume>,
}

/// The state of one VM's supervisor task.
pub struct Supervisor {
    ctx: Arc<AgentContext>,
    spec_rx: watch::Receiver<InstanceSpec>,
    status: InstanceStatus,
    written: Option<InstanceStatus>,
    running: Option<Running>,
    /// Don't start again until the spec's generation moves past this
    /// (after the guest shut down, or a failure with no restart).
    hold: Option<u64>,
    restart_at: Option<Instant>,
    backoff: Duration,
    probe: Option<(oneshot::Receiver<GuestReady>, tokio::task::JoinHandle<()>)>,
    /// A group member's health check, while it runs.
    health: Option<crate::health::HealthChecker>,
    /// Snapshot requests for this VM (see [`crate::checkpoints::follow`]).
    snap_tx: mpsc::UnboundedSender<Snapshot>,
    snap_rx: mpsc::UnboundedReceiver<Snapshot>,
    /// The schedule in force and when it next asks for a checkpoint.
    schedule: Option<CheckpointSchedule>,
    next_checkpoint: Option<Instant>,
    /// The spec's volume list whose stale claims were last cleaned up.
    claims_checked: Option<Vec<InstanceVolume>>,
    /// A hot-plug that failed at this spec generation: not retried until
    /// the spec changes.
    volume_error: Option<u64>,
    /// The last migration this supervisor ran (not retried).
    migration_done: Option<skyvisor_core::MigrationId>,
    /// The VM moved to another host: this supervisor is done.
    moved: bool,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let id = self.spec_rx.borrow().id;
        let mut inboxes = self
            .ctx
            .checkpoint_inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if inboxes
            .get(&id)
            .is_some_and(|tx| tx.same_channel(&self.snap_tx))
        {
            inboxes.remove(&id);
        }
    }
}

impl Supervisor {
    /// A supervisor for the instance whose spec `spec_rx` follows.
    pub async fn new(ctx: Arc<AgentContext>, spec_rx: watch::Receiver<InstanceSpec>) -> Self {
        let name = spec_rx.borrow().instance_ref();
        let status = match ctx
            .store
            .get_json::<InstanceStatus>(&keys::instance_status(&name))
            .await
        {
            Ok(Some((s, _))) => s,
            _ => InstanceStatus::pending(),
        };
        let (snap_tx, snap_rx) = mpsc::unbounded_channel();
        let id = spec_rx.borrow().id;
        ctx.checkpoint_inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, snap_tx.clone());
        Self {
            ctx,
            spec_rx,
            written: Some(status.clone()),
            status,
            running: None,
            hold: None,
            restart_at: None,
            backoff: Duration::ZERO,
            probe: None,
            health: None,
            snap_tx,
            snap_rx,
            schedule: None,
            next_checkpoint: None,
            claims_checked: None,
            volume_error: None,
            migration_done: None,
            moved: false,
        }
    }

    fn vm_dir(&self, spec: &InstanceSpec) -> PathBuf {
        self.ctx.vm_dir(&spec.id)
    }

    /// Runs until the instance is deleted or the agent drops its spec sender.
    pub async fn run(mut self) {
        let spec = self.spec_rx.borrow().clone();
        self.adopt(&spec).await;
        for snap in checkpoints::recover(&self.ctx, &spec).await {
            let _ = self.snap_tx.send(snap);
        }
        loop {
            let spec = self.spec_rx.borrow_and_update().clone();
            if spec.deleting {
                self.teardown(&spec).await;
                self.ctx.metrics.forget(&spec.id);
                return;
            }
            if self.converge(&spec).await {
                if self.moved {
                    self.cancel_probe();
                    self.ctx.metrics.forget(&spec.id);
                    return;
                }
                continue;
            }
            self.status.observed_generation = spec.generation;
            self.publish(&spec).await;
            self.plan_checkpoint(&spec);
            let restart_at = self.restart_at;
            let checkpoint_at = self.next_checkpoint;
            tokio::select! {
                changed = self.spec_rx.changed() => {
                    if changed.is_err() {
                        // The agent is shutting down: leave the VM running.
                        self.cancel_probe();
                        return;
                    }
                }
                event = next_event(&mut self.running) => self.on_event(&spec, event).await,
                ready = probe_done(&mut self.probe) => {
                    self.probe = None;
                    self.status.guest_ready = true;
                    self.status.ready_at = Some(Utc::now());
                    match ready {
                        GuestReady::Service => info!(instance = %spec.name, "guest service answers"),
                        GuestReady::CloudInit { report, addresses } => {
                            info!(instance = %spec.name, datasource = %report.datasource, errors = report.errors.len(), "cloud-init finished");
                            self.status.cloud_init = Some(report);
                            self.status.guest_addresses = addresses;
                        }
                    }
                }
                report = health_changed(&mut self.health) => {
                    self.status.health = Some(report);
                }
                () = sleep_until(restart_at) => { self.restart_at = None; }
                Some(snap) = self.snap_rx.recv() => self.snapshot(&spec, snap).await,
                () = sleep_until(checkpoint_at) => {
                    self.next_checkpoint = None;
                    if let Err(e) = checkpoints::request_scheduled(&self.ctx, &spec).await {
                        warn!(instance = %spec.name, error = %e, "cannot request a scheduled checkpoint");
                    }
                }
            }
        }
    }

    /// Takes over a VM that migrated here (prepared by the migration's
    /// destination endpoint); resumes it if the source could not ask.
    async fn adopt_incoming(&mut self, spec: &InstanceSpec) -> bool {
        let ctx = self.ctx.clone();
        let mut incoming = ctx.incoming.lock().await;
        let Some(v) = incoming.remove(&spec.instance_ref()) else {
            return false;
        };
        if !v.resumed {
            let activating = Instant::now();
            let resumed = match self
                .launcher()
                .serve_volumes_as(spec, crate::launch::ServeMode::HandedOver)
                .await
            {
                Ok(_) => {
                    debug!(instance = %spec.name,
                        volumes_ms = activating.elapsed().as_millis() as u64,
                        "a migrated VM's volumes are served here");
                    v.vm.finish_incoming(Duration::from_secs(30))
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = resumed {
                warn!(instance = %spec.name, error = %e, "a migrated VM could not be resumed; discarding it");
                v.vm.kill();
                self.launcher().release_volumes(spec).await;
                return false;
            }
        }
        info!(instance = %spec.name, pid = ?v.vm.pid(), "took over a migrated VM");
        self.start_health_check(spec, self.status.health.clone());
        self.status.pid = v.vm.pid();
        self.status.phase = InstancePhase::Running;
        self.status.host = Some(self.ctx.host.clone());
        self.status.accel = Some(self.ctx.accel);
        v.guest.apply(&mut self.status);
        self.status.message = None;
        self.status.attached_volumes = v.volumes.iter().map(|v| v.name.clone()).collect();
        self.running = Some(Running {
            vm: v.vm,
            resources: v.resources,
            since: Instant::now(),
            volumes: v.volumes,
        });
        true
    }

    /// Takes over a VM an earlier agent left running.
    async fn adopt(&mut self, spec: &InstanceSpec) {
        if self.adopt_incoming(spec).await {
            return;
        }
        let dir = self.vm_dir(spec);
        let found = match (spec.kind, &self.ctx.containers) {
            (skyvisor_core::InstanceKind::Vm, _) => self.ctx.hypervisor.attach(&dir).await,
            (skyvisor_core::InstanceKind::Container, Some(c)) => c
                .attach(&spec.id, &dir)
                .await
                .map(|c| Box::new(c) as Box<dyn Vm>),
            (skyvisor_core::InstanceKind::Container, None) => None,
        };
        let Some(vm) = found else {
            return;
        };
        let launched = match tokio::fs::read(dir.join(LAUNCH_FILE)).await {
            Ok(b) => serde_json::from_slice::<VmLaunch>(&b).ok(),
            Err(_) => None,
        };
        let resources = launched.as_ref().map_or(spec.resources, |l| l.resources);
        let migration_target = launched.as_ref().is_some_and(|l| l.migration_target);
        let volumes = launched.map(|l| l.volumes).unwrap_or_default();
        // Serve its volumes again: QEMU reconnects to the NBD socket. (A
        // migration's destination VM needs them before it may run.)
        for v in &volumes {
            let iv = InstanceVolume {
                name: v.name.clone(),
                id: v.id,
                root: v.root,
            };
            let served = match &self.ctx.volumes {
                Some(svc) => svc
                    .serve(&iv, &spec.instance_ref())
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("this host serves no volumes".to_string()),
            };
            if let Err(e) = served {
                warn!(instance = %spec.name, volume = %v.name, error = %e, "cannot serve a volume of a re-attached VM");
                self.status.message = Some(format!("volume {}: {e}", v.name));
            }
        }
        if migration_target && let Err(e) = vm.finish_incoming(Duration::from_secs(30)).await {
            // A destination VM an earlier agent prepared: it runs only if
            // its migration completed (the binding says it did).
            warn!(instance = %spec.name, error = %e, "a migrated VM left by an earlier agent cannot run; discarding it");
            vm.kill();
            self.launcher().release_volumes(spec).await;
            return;
        }
        info!(instance = %spec.name, pid = ?vm.pid(), "re-attached to running VM");
        // Its network and guard, as this agent's launch would have made them.
        let tap = skyvisor_net::tap_name(&spec.id);
        let guarded = match self.ctx.private_nets.bridge_for(&spec.network).await {
            Ok(bridge) => self
                .ctx
                .attach_tap(&tap, spec, &bridge)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = guarded {
            warn!(instance = %spec.name, error = %e, "cannot set up a re-attached VM's network guard");
        }
        if let Err(e) = vm.recover_checkpoint().await {
            warn!(instance = %spec.name, error = %e, "cannot check for an interrupted checkpoint");
        }
        self.status.attached_volumes = volumes.iter().map(|v| v.name.clone()).collect();
        self.status.pid = vm.pid();
        self.status.phase = InstancePhase::Running;
        self.status.host = Some(self.ctx.host.clone());
        self.running = Some(Running {
            vm,
            resources,
            since: Instant::now(),
            volumes,
        });
        if !self.status.guest_ready {
            self.start_probe(spec);
        } else {
            self.start_health_check(spec, self.status.health.clone());
        }
    }

    /// One step towards the spec. Returns true if it acted (look again).
    async fn converge(&mut self, spec: &InstanceSpec) -> bool {
        let want_running = spec.power == PowerState::Running;
        if self.hold.is_some_and(|g| g != spec.generation) {
            self.hold = None;
            self.restart_at = None;
            self.backoff = Duration::ZERO;
        }
        if let Some(r) = &spec.restore
            && r.generation > self.status.observed_restore_generation
        {
            let r = r.clone();
            self.restore(spec, &r).await;
            return true;
        }
        match &self.running {
            None => {
                if want_running && self.hold.is_none() {
                    if self.restart_at.is_some_and(|t| Instant::now() < t) {
                        return false;
                    }
                    self.restart_at = None;
                    if let Some(why) = self.may_not_start_here(spec).await {
                        // It may be starting elsewhere right now.
                        if self.status.message.as_ref() != Some(&why) {
                            warn!(instance = %spec.name, reason = %why, "not starting a protected VM");
                        }
                        self.status.message = Some(why);
                        self.restart_at = Some(Instant::now() + Duration::from_secs(1));
                        return false;
                    }
                    self.start(spec).await;
                    return true;
                }
                if !want_running
                    && matches!(
                        self.status.phase,
                        InstancePhase::Pending | InstancePhase::Starting | InstancePhase::Stopping
                    )
                {
                    self.status.phase = InstancePhase::Stopped;
                    self.restart_at = None;
                }
                // Not running and not about to: its volumes are free for
                // any host to serve.
                if let Some(svc) = &self.ctx.volumes {
                    svc.release_instance(&spec.instance_ref()).await;
                }
                self.status.attached_volumes.clear();
                self.release_claims(spec).await;
                false
            }
            Some(running) => {
                if !want_running {
                    self.stop(spec, spec.force_stop).await;
                    return true;
                }
                if running.resources.vcpus != spec.resources.vcpus
                    || running.resources.memory_mib != spec.resources.memory_mib
                {
                    match running.vm.resize_live(spec.resources).await {
                        Ok(true) => {
                            info!(instance = %spec.name, vcpus = spec.resources.vcpus, memory_mib = spec.resources.memory_mib, "resized live");
                            if let Some(r) = self.running.as_mut() {
                                r.resources = spec.resources;
                            }
                            return true;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(instance = %spec.name, error = %e, "live resize failed; restarting with the new size");
                        }
                    }
                    info!(instance = %spec.name, "resizing: restarting with the new size");
                    self.stop(spec, false).await;
                    return true;
                }
                if spec.reboot_generation > self.status.observed_reboot_generation {
                    self.reboot(spec).await;
                    return true;
                }
                if let Some(req) = &spec.migration
                    && self.migration_done != Some(req.id)
                {
                    let outcome =
                        crate::migration::migrate_out(&self.ctx, spec, req, &*running.vm).await;
                    self.migration_done = Some(req.id);
                    match outcome {
                        crate::migration::SourceOutcome::Moved => {
                            self.running = None;
                            self.moved = true;
                        }
                        crate::migration::SourceOutcome::Stayed => {
                            self.ctx.metrics.migration(None);
                            if !self.status.guest_ready {
                                self.start_probe(spec);
                            }
                        }
                    }
                    return true;
                }
                let changed = self.sync_volumes(spec).await;
                self.release_claims(spec).await;
                changed
            }
        }
    }

    /// Writes the status if it changed since the last write.
    async fn publish(&mut self, spec: &InstanceSpec) {
        self.ctx.metrics.observe(
            spec,
            &self.status,
            self.running.as_ref().and_then(|r| r.vm.counters()),
        );
        if self.written.as_ref() == Some(&self.status) {
            return;
        }
        self.status.updated_at = Utc::now();
        // What changed is recorded with the status that shows it: both are
        // written, or neither (and the next write tries both again).
        let mut ops = vec![Op::Put {
            key: keys::instance_status(&spec.instance_ref()),
            value: encode(&self.status),
            lease: None,
        }];
        for event in
            skyvisor_core::event::status_transitions(spec, self.written.as_ref(), &self.status)
        {
            info!(instance = %spec.name, kind = %event.kind, "{}", event.message);
            ops.push(crate::event_op(&event));
        }
        match self.ctx.store.txn(vec![], ops).await {
            Ok(_) => self.written = Some(self.status.clone()),
            Err(e) => warn!(instance = %spec.name, error = %e, "could not write status"),
        }
    }

    async fn set_phase(&mut self, spec: &InstanceSpec, phase: InstancePhase) {
        self.status.phase = phase;
        self.publish(spec).await;
    }

    async fn start(&mut self, spec: &InstanceSpec) {
        self.set_phase(spec, InstancePhase::Starting).await;
        let root = self.vm_dir(spec).join(ROOT_DISK);
        let mut incoming = None;
        if let Some(src) = &spec.clone_of
            && (spec.root_volume().is_some()
                || !tokio::fs::try_exists(&root).await.unwrap_or(false))
        {
            match self.prepare_clone(spec, src).await {
                Ok(memory) => incoming = memory,
                Err(message) => {
                    self.release_if_stopped(spec).await;
                    self.start_failed(
                        spec,
                        format!("cloning from {}/{}: {message}", src.instance, src.snapshot),
                    )
                    .await;
                    return;
                }
            }
        }
        if let Err(message) = self.fetch_image_files(spec).await {
            self.start_failed(spec, message).await;
            return;
        }
        let cloned = incoming.is_some();
        let launched = self.launch(spec, incoming, cloned, None).await;
        match launched {
            Ok(running) => {
                self.status.attached_volumes =
                    running.volumes.iter().map(|v| v.name.clone()).collect();
                self.launched(spec, running, true);
                if let Some(src) = spec.clone_of.as_ref().filter(|_| cloned) {
                    self.status.restored_from = Some(format!("{}/{}", src.instance, src.snapshot));
                    if let Err(e) = self.give_identity(spec).await {
                        // Running on with the parent's address would take it over.
                        warn!(instance = %spec.name, error = %e, "the clone did not take its identity; stopping it");
                        self.terminate().await;
                        self.start_failed(
                            spec,
                            format!("the clone did not take its own identity: {e}"),
                        )
                        .await;
                        return;
                    }
                    if let Some(r) = &self.running
                        && let Err(e) = r.vm.set_link(true).await
                    {
                        warn!(instance = %spec.name, error = %e, "cannot plug the clone's NIC");
                    }
                    info!(instance = %spec.name, "clone took its own identity");
                }
                self.publish(spec).await;
            }
            Err(message) => {
                if cloned && spec.root_volume().is_none() {
                    // The next start clones again rather than boot the copy
                    // (a root volume keeps the copy: the next start boots it).
                    let _ = tokio::fs::remove_file(&root).await;
                }
                self.start_failed(spec, message).await;
            }
        }
    }

    /// Why a protected VM must not start here now, if it must not: the host
    /// is fenced or its lease is not fresh, or the VM is no longer bound
    /// here (read from the store after the lease was renewed, so a failover
    /// that happened while this host was away is always seen).
    async fn may_not_start_here(&self, spec: &InstanceSpec) -> Option<String> {
        let fence = self.ctx.fence.as_ref()?;
        if spec.ha != HaPolicy::Restart {
            return None;
        }
        if !fence.may_start() {
            return Some(
                "this host is fenced or has not renewed its lease lately; the VM waits until the host is live again, or is restarted elsewhere"
                    .into(),
            );
        }
        match self
            .ctx
            .store
            .get_json::<InstanceSpec>(&keys::binding(&self.ctx.host, &spec.instance_ref()))
            .await
        {
            Ok(Some((bound, _))) if bound.id == spec.id => None,
            Ok(_) => Some("the VM is bound to another host now".into()),
            Err(e) => Some(format!("cannot confirm the VM is still bound here: {e}")),
        }
    }

    /// Fetches the image files this host lacks before a launch, showing in
    /// the VM's status which file comes from where (the fetch retries every
    /// source it knows for a bounded time).
    async fn fetch_image_files(&mut self, spec: &InstanceSpec) -> Result<(), String> {
        let (image, missing) = self.launcher().missing_image_files(spec).await?;
        if missing.is_empty() {
            return Ok(());
        }
        let (tx, mut rx) = watch::channel(String::new());
        let ctx = self.ctx.clone();
        let fetch = async move {
            for f in &missing {
                ctx.images
                    .fetch(&image, f, &|m| {
                        let _ = tx.send(m);
                    })
                    .await?;
            }
            Ok::<(), String>(())
        };
        tokio::pin!(fetch);
        loop {
            tokio::select! {
                biased;
                done = &mut fetch => {
                    self.status.message = None;
                    return done;
                }
                changed = rx.changed() => {
                    if changed.is_ok() {
                        self.status.message = Some(rx.borrow_and_update().clone());
                        self.publish(spec).await;
                    }
                }
            }
        }
    }

    /// Records a launched VM; `boot` counts it as a boot (a restore is not).
    fn launched(&mut self, spec: &InstanceSpec, running: Running, boot: bool) {
        self.status.pid = running.vm.pid();
        self.status.accel = Some(self.ctx.accel);
        self.status.host = Some(self.ctx.host.clone());
        if boot {
            self.status.boot_count += 1;
            self.status.restored_from = None;
        }
        self.status.started_at = Some(Utc::now());
        self.status.ready_at = None;
        self.status.guest_ready = false;
        self.status.message = None;
        self.status.phase = InstancePhase::Running;
        self.status.observed_reboot_generation = spec.reboot_generation;
        self.running = Some(running);
        info!(instance = %spec.name, pid = ?self.status.pid, boot, "VM started");
        self.start_probe(spec);
    }

    /// Records a start that failed and holds until the spec changes.
    async fn start_failed(&mut self, spec: &InstanceSpec, message: String) {
        warn!(instance = %spec.name, error = %message, "VM failed to start");
        self.status.phase = InstancePhase::Failed;
        self.status.pid = None;
        self.status.guest_ready = false;
        self.status.message = Some(message.clone());
        self.status.last_exit = Some(ExitRecord {
            at: Utc::now(),
            reason: ExitReason::StartFailed,
            detail: message,
        });
        self.hold = Some(spec.generation);
        self.publish(spec).await;
    }

    /// Plans the next scheduled checkpoint: one interval after the VM
    /// started running or the last one was asked for.
    fn plan_checkpoint(&mut self, spec: &InstanceSpec) {
        if spec.checkpoint_schedule != self.schedule {
            self.schedule = spec.checkpoint_schedule;
            self.next_checkpoint = None;
        }
        match (self.schedule, self.running.is_some()) {
            (Some(s), true) => {
                if self.next_checkpoint.is_none() {
                    self.next_checkpoint = Some(Instant::now() + Duration::from_secs(s.every_secs));
                }
            }
            _ => self.next_checkpoint = None,
        }
    }

    /// The VM's root disk: its root volume, or its local file.
    fn root_disk(&self, spec: &InstanceSpec) -> checkpoints::RootDisk {
        match (spec.root_volume(), &self.ctx.volumes) {
            (Some(v), Some(service)) => checkpoints::RootDisk::Volume(checkpoints::VolumeRoot {
                service: service.clone(),
                volume: v.clone(),
                instance: spec.instance_ref(),
            }),
            _ => checkpoints::RootDisk::Local(self.vm_dir(spec).join(ROOT_DISK)),
        }
    }

    /// Stops serving the volumes of a VM that does not run (served for a
    /// checkpoint, restore or clone).
    async fn release_if_stopped(&self, spec: &InstanceSpec) {
        if self.running.is_none() && !spec.volumes.is_empty() {
            self.launcher().release_volumes(spec).await;
        }
    }

    /// Takes a requested snapshot: live if the VM runs, of the disk if not.
    async fn snapshot(&mut self, spec: &InstanceSpec, snap: Snapshot) {
        let root = self.root_disk(spec);
        let origin = snap.origin;
        let vm = self.running.as_ref().map(|r| r.vm.as_ref());
        checkpoints::take(&self.ctx, spec, vm, &root, snap).await;
        self.release_if_stopped(spec).await;
        if origin == SnapshotOrigin::Scheduled {
            checkpoints::prune(&self.ctx, spec).await;
        }
    }

    /// Puts the VM back to a snapshot: its disk, and for a full snapshot
    /// its memory and devices, continuing where the snapshot left off. A
    /// snapshot that does not fit leaves the VM as it is.
    async fn restore(&mut self, spec: &InstanceSpec, r: &RestoreRequest) {
        self.status.observed_restore_generation = r.generation;
        let snap = match checkpoints::get(
            self.ctx.store.as_ref(),
            &spec.instance_ref(),
            &r.snapshot,
        )
        .await
        {
            Ok(Some(s)) if s.instance_id == spec.id => Ok(s),
            Ok(Some(_)) => Err("it belongs to an earlier VM of this name".to_string()),
            Ok(None) => Err("it no longer exists".to_string()),
            Err(e) => Err(format!("reading it: {e}")),
        };
        let snap = match snap
            .and_then(|s| checkpoints::check_usable(&self.ctx, &s, spec).map(|()| s))
        {
            Ok(s) => s,
            Err(m) => {
                warn!(instance = %spec.name, snapshot = %r.snapshot, error = %m, "restore refused");
                self.status.message = Some(format!("restore from {} failed: {m}", r.snapshot));
                self.publish(spec).await;
                return;
            }
        };
        info!(instance = %spec.name, snapshot = %snap.name, kind = ?snap.kind, "restoring");
        self.cancel_probe();
        self.set_phase(spec, InstancePhase::Starting).await;
        let began = Instant::now();
        // Held across the swap, the tap stays attached: frames for the
        // guest wait for the restored QEMU instead of being dropped.
        let held_tap = self
            .running
            .as_ref()
            .and_then(|r| r.vm.tap_file(&skyvisor_net::tap_name(&spec.id)));
        if self.running.is_some() {
            self.terminate().await;
        }
        let stopped = began.elapsed();
        self.status.pid = None;
        self.status.guest_ready = false;
        self.restart_at = None;
        self.hold = None;
        let root = self.root_disk(spec);
        let disk = checkpoints::restore_disk(&self.ctx, &snap, &root).await;
        debug!(
            instance = %spec.name,
            stop_ms = stopped.as_millis() as u64,
            disk_ms = (began.elapsed() - stopped).as_millis() as u64,
            "restore: old QEMU stopped, disk restored"
        );
        if let Err(m) = disk {
            self.release_if_stopped(spec).await;
            self.start_failed(spec, format!("restore from {} failed: {m}", snap.name))
                .await;
            return;
        }
        let from = Some(snap.name.to_string());
        if snap.kind == Some(SnapshotKind::Full) && spec.power == PowerState::Running {
            match self
                .launch(
                    spec,
                    Some(checkpoints::memory_file(&self.ctx, &snap)),
                    false,
                    held_tap,
                )
                .await
            {
                Ok(running) => {
                    self.launched(spec, running, false);
                    self.status.restored_from = from;
                    info!(instance = %spec.name, snapshot = %snap.name, "restored");
                }
                Err(m) => {
                    self.start_failed(spec, format!("restore from {} failed: {m}", snap.name))
                        .await;
                    return;
                }
            }
        } else {
            // Disk only (or the VM is to stay stopped): the next turn boots
            // it from the restored disk if it should run.
            self.release_if_stopped(spec).await;
            self.status.phase = InstancePhase::Stopped;
            self.status.restored_from = from;
            self.status.message = None;
        }
        self.publish(spec).await;
    }

    /// Copies a clone's first disk from its snapshot; returns the memory
    /// file to continue from, for a full snapshot. A root volume that is no
    /// longer blank was copied by an earlier start: the clone then boots
    /// from it.
    async fn prepare_clone(
        &self,
        spec: &InstanceSpec,
        src: &CloneSource,
    ) -> Result<Option<PathBuf>, String> {
        let disk = self.root_disk(spec);
        if let checkpoints::RootDisk::Volume(v) = &disk
            && !v.service.is_blank(v.serve().await?).await?
        {
            return Ok(None);
        }
        let snap = checkpoints::get(
            self.ctx.store.as_ref(),
            &InstanceRef::new(spec.project.clone(), src.instance.clone()),
            &src.snapshot,
        )
        .await
        .map_err(|e| format!("reading the snapshot: {e}"))?
        .ok_or("the snapshot no longer exists")?;
        checkpoints::check_usable(&self.ctx, &snap, spec)?;
        let dir = self.vm_dir(spec);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        checkpoints::restore_disk(&self.ctx, &snap, &disk).await?;
        Ok((snap.kind == Some(SnapshotKind::Full))
            .then(|| checkpoints::memory_file(&self.ctx, &snap)))
    }

    /// Tells a clone's guest (which woke up as its parent) who it is now:
    /// name, id, address and MAC, over the guest channel.
    async fn give_identity(&self, spec: &InstanceSpec) -> Result<(), String> {
        let Some(running) = &self.running else {
            return Err("the VM is not running".into());
        };
        let n = &spec.network;
        let line = serde_json::json!({
            "op": "set-identity",
            "name": spec.name.as_str(),
            "id": spec.id.to_string(),
            "ip": format!("{}/{}", n.ip, n.prefix_len),
            "gw": n.gateway.to_string(),
            "mac": n.mac.to_string(),
        })
        .to_string();
        let mut last = String::new();
        for _ in 0..3 {
            match running.vm.guest_request(&line).await {
                Ok(answer) => {
                    let v: serde_json::Value = serde_json::from_str(&answer)
                        .map_err(|e| format!("the guest answered {answer:?}: {e}"))?;
                    if v["ok"] == true {
                        return Ok(());
                    }
                    return Err(format!("the guest refused: {}", v["error"]));
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    fn launcher(&self) -> Launcher {
        Launcher {
            ctx: self.ctx.clone(),
        }
    }

    /// Prepares disk and network and launches the VM (see [`Launcher::launch`]).
    async fn launch(
        &mut self,
        spec: &InstanceSpec,
        incoming: Option<PathBuf>,
        link_down: bool,
        tap_file: Option<TapFile>,
    ) -> Result<Running, String> {
        let (running, guest) = self
            .launcher()
            .launch(spec, incoming, link_down, false, tap_file)
            .await?;
        guest.apply(&mut self.status);
        Ok(running)
    }

    /// Hot-plugs volumes added to the spec of the running VM and unplugs
    /// the ones removed. Returns true if it changed anything.
    async fn sync_volumes(&mut self, spec: &InstanceSpec) -> bool {
        let Some(running) = self.running.as_ref() else {
            return false;
        };
        let detach: Vec<LaunchVolume> = running
            .volumes
            .iter()
            .filter(|p| !p.root && !spec.volumes.iter().any(|w| w.id == p.id))
            .cloned()
            .collect();
        let attach: Vec<InstanceVolume> = spec
            .volumes
            .iter()
            .filter(|w| !w.root && !running.volumes.iter().any(|p| p.id == w.id))
            .cloned()
            .collect();
        if (detach.is_empty() && attach.is_empty()) || self.volume_error == Some(spec.generation) {
            return false;
        }
        let mut errors = vec![];
        let mut changed = false;
        let svc = self.ctx.volumes.clone();
        for d in detach {
            let Some(running) = self.running.as_mut() else {
                break;
            };
            match running.vm.detach_disk(&d.disk_id, DETACH_TIMEOUT).await {
                Ok(()) => {
                    running.volumes.retain(|v| v.id != d.id);
                    if let Some(svc) = &svc {
                        svc.release(&d.id).await;
                    }
                    info!(instance = %spec.name, volume = %d.name, "volume detached");
                    changed = true;
                }
                Err(e) => errors.push(format!("detaching volume {}: {e}", d.name)),
            }
        }
        for a in attach {
            let Some(svc) = &svc else {
                errors.push(format!(
                    "attaching volume {}: host {} serves no volumes",
                    a.name, self.ctx.host
                ));
                continue;
            };
            let target = match svc.serve(&a, &spec.instance_ref()).await {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("attaching volume {}: {e}", a.name));
                    continue;
                }
            };
            let lv = launch_volume(&a, target);
            let Some(running) = self.running.as_mut() else {
                break;
            };
            match running.vm.attach_disk(&lv).await {
                Ok(()) => {
                    info!(instance = %spec.name, volume = %a.name, "volume attached");
                    running.volumes.push(lv);
                    changed = true;
                }
                Err(e) => {
                    svc.release(&a.id).await;
                    errors.push(format!("attaching volume {}: {e}", a.name));
                }
            }
        }
        if let Some(running) = &self.running {
            self.status.attached_volumes = running.volumes.iter().map(|v| v.name.clone()).collect();
            let volumes = running.volumes.clone();
            self.record_volumes(spec, volumes).await;
        }
        if errors.is_empty() {
            self.volume_error = None;
        } else {
            let message = errors.join("; ");
            warn!(instance = %spec.name, error = %message, "volume hot-plug failed");
            self.status.message = Some(message);
            self.volume_error = Some(spec.generation);
        }
        changed
    }

    /// Rewrites the launch record with the VM's current volumes, so that a
    /// restarted agent serves them again.
    async fn record_volumes(&self, spec: &InstanceSpec, volumes: Vec<LaunchVolume>) {
        let path = self.vm_dir(spec).join(LAUNCH_FILE);
        let Ok(bytes) = tokio::fs::read(&path).await else {
            return;
        };
        let Ok(mut launch) = serde_json::from_slice::<VmLaunch>(&bytes) else {
            return;
        };
        launch.volumes = volumes;
        if let Err(e) = tokio::fs::write(&path, encode(&launch)).await {
            warn!(instance = %spec.name, error = %e, "could not record the VM's volumes");
        }
    }

    /// Removes this VM's claims on volumes it no longer lists and no longer
    /// uses, so that other VMs may attach them.
    async fn release_claims(&mut self, spec: &InstanceSpec) {
        if self.claims_checked.as_ref() == Some(&spec.volumes) {
            return;
        }
        let Ok(listing) = self.ctx.store.list(keys::VOLUME_ATTACHMENTS).await else {
            return;
        };
        let plugged: Vec<VolumeName> = self
            .running
            .as_ref()
            .map(|r| r.volumes.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default();
        let mut done = true;
        for kv in listing.items {
            let Ok(claim) = decode::<VolumeAttachment>(&kv) else {
                continue;
            };
            let Ok(name) = VolumeName::new(keys::name_of(&kv.key)) else {
                continue;
            };
            if claim.instance_id != spec.id || spec.volumes.iter().any(|v| v.name == name) {
                continue;
            }
            if plugged.contains(&name) {
                done = false;
                continue;
            }
            // Only if the spec still does not list it (no re-attach raced).
            let spec_key = keys::instance_spec(&spec.instance_ref());
            let Ok(Some((fresh, rev))) = self.ctx.store.get_json::<InstanceSpec>(&spec_key).await
            else {
                done = false;
                continue;
            };
            if fresh.id != spec.id || fresh.volumes.iter().any(|v| v.name == name) {
                done = false;
                continue;
            }
            match self
                .ctx
                .store
                .txn(
                    vec![
                        Compare::ModRevision(spec_key, rev),
                        Compare::ModRevision(kv.key.clone(), kv.mod_revision),
                    ],
                    vec![Op::Delete(kv.key.clone())],
                )
                .await
            {
                Ok(out) if out.succeeded => {
                    info!(instance = %spec.name, volume = %name, "volume released");
                }
                _ => done = false,
            }
        }
        if done {
            self.claims_checked = Some(spec.volumes.clone());
        }
    }

    fn start_probe(&mut self, spec: &InstanceSpec) {
        self.cancel_probe();
        // A new boot: what the guest reported belongs to the last one.
        self.status.cloud_init = None;
        self.status.guest_addresses.clear();
        if !self.ctx.probe_guests {
            return;
        }
        self.start_health_check(spec, None);
        if !self.status.guest_service {
            if self.status.guest_agent_channel {
                let (tx, rx) = oneshot::channel();
                let socket = self
                    .ctx
                    .vm_dir(&spec.id)
                    .join(skyvisor_qemu::files::GUEST_AGENT_SOCKET);
                let handle = tokio::spawn(async move {
                    let ready = crate::guest_report::await_cloud_init(&socket).await;
                    let _ = tx.send(ready);
                });
                self.probe = Some((rx, handle));
            }
            return;
        }
        let (tx, rx) = oneshot::channel();
        let url = format!("http://{}/health", spec.network.ip);
        // A private network's instances are reachable from its router only.
        let router = spec
            .network
            .vni
            .map(|v| skyvisor_net::private_devices(v).namespace);
        let ip = spec.network.ip;
        let http = self.ctx.http.clone();
        let handle = tokio::spawn(async move {
            loop {
                let ok = match &router {
                    None => http
                        .get(&url)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    Some(ns) => healthy_in_namespace(ns, ip).await,
                };
                if ok {
                    let _ = tx.send(GuestReady::Service);
                    return;
                }
                // Poll interval of the readiness check, not a readiness wait.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        self.probe = Some((rx, handle));
    }

    /// Starts a group member's health check: judged anew after a boot,
    /// or going on from `from` for a VM taken over running (an agent
    /// restart, a migration), which served all along.
    fn start_health_check(
        &mut self,
        spec: &InstanceSpec,
        from: Option<skyvisor_core::group::HealthReport>,
    ) {
        self.health = None;
        if !self.ctx.probe_guests {
            return;
        }
        let Some(check) = spec.group.as_ref().and_then(|g| g.health_check.clone()) else {
            return;
        };
        let router = spec
            .network
            .vni
            .map(|v| skyvisor_net::private_devices(v).namespace);
        let checker = crate::health::HealthChecker::start(check, spec.network.ip, router, from);
        self.status.health = Some(checker.reports.borrow().clone());
        self.health = Some(checker);
    }

    fn cancel_probe(&mut self) {
        if let Some((_, h)) = self.probe.take() {
            h.abort();
        }
        // Not running: no health to judge.
        self.health = None;
        if self.status.health.is_some() {
            self.status.health = None;
        }
    }

    /// Waits up to `timeout` for the guest to power itself off; false if it
    /// did not (or the process exited, which is recorded as the exit).
    async fn await_guest_shutdown(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(running) = self.running.as_mut() else {
                return false;
            };
            match tokio::time::timeout_at(deadline, running.vm.next_event()).await {
                Ok(VmEvent::GuestShutdown) => return true,
                Ok(VmEvent::Reset | VmEvent::OutOfMemory { .. }) => continue,
                Ok(VmEvent::Exited(_)) => {
                    self.running = None;
                    return false;
                }
                Err(_) => return false,
            }
        }
    }

    /// Makes the process exit: quit, then kill. Returns how it ended.
    async fn terminate(&mut self) -> Option<VmExit> {
        let mut running = self.running.take()?;
        let _ = running.vm.quit().await;
        let wait = async {
            loop {
                if let VmEvent::Exited(e) = running.vm.next_event().await {
                    return e;
                }
            }
        };
        match tokio::time::timeout(QUIT_TIMEOUT, wait).await {
            Ok(e) => Some(e),
            Err(_) => {
                running.vm.kill();
                loop {
                    if let VmEvent::Exited(e) = running.vm.next_event().await {
                        return Some(e);
                    }
                }
            }
        }
    }

    /// Asks the guest to shut itself down: through its guest agent where
    /// it has one (the guest's own shutdown, whatever it makes of the
    /// power button), else, or if the agent does not take it, by pressing
    /// the ACPI power button. Gives how it was asked, or None if it could
    /// not be.
    async fn request_shutdown(&self, spec: &InstanceSpec) -> Option<&'static str> {
        let running = self.running.as_ref()?;
        if self.status.guest_agent_channel {
            let socket = self
                .ctx
                .vm_dir(&spec.id)
                .join(skyvisor_qemu::files::GUEST_AGENT_SOCKET);
            let asked = async {
                let mut agent =
                    skyvisor_qemu::GuestAgent::connect(&socket, GUEST_AGENT_TIMEOUT).await?;
                agent.shutdown(GUEST_AGENT_TIMEOUT).await
            };
            match asked.await {
                Ok(()) => return Some("guest agent"),
                Err(e) => {
                    debug!(instance = %spec.name, error = %e, "the guest agent did not take the shutdown; pressing the power button");
                }
            }
        }
        running
            .vm
            .powerdown()
            .await
            .is_ok()
            .then_some(match spec.kind {
                skyvisor_core::InstanceKind::Vm => "ACPI power button",
                skyvisor_core::InstanceKind::Container => "stop signal (SIGTERM to its init)",
            })
    }

    async fn stop(&mut self, spec: &InstanceSpec, force: bool) {
        self.set_phase(spec, InstancePhase::Stopping).await;
        self.cancel_probe();
        let asked = if force {
            None
        } else {
            self.request_shutdown(spec).await
        };
        let graceful = asked.is_some()
            && self
                .await_guest_shutdown(Duration::from_secs(u64::from(spec.stop_timeout_secs)))
                .await;
        self.terminate().await;
        info!(instance = %spec.name, graceful, "VM stopped");
        self.status.phase = InstancePhase::Stopped;
        self.status.pid = None;
        self.status.guest_ready = false;
        self.status.last_exit = Some(ExitRecord {
            at: Utc::now(),
            reason: ExitReason::Requested,
            detail: if let (true, Some(how)) = (graceful, asked) {
                format!("shut down gracefully (asked through the {how})")
            } else if force {
                "powered off (forced)".into()
            } else {
                format!(
                    "powered off: the guest did not shut down within {}s",
                    spec.stop_timeout_secs
                )
            },
        });
        self.publish(spec).await;
    }

    async fn reboot(&mut self, spec: &InstanceSpec) {
        self.cancel_probe();
        self.status.guest_ready = false;
        self.publish(spec).await;
        let graceful = self.request_shutdown(spec).await.is_some()
            && self
                .await_guest_shutdown(Duration::from_secs(u64::from(spec.stop_timeout_secs)))
                .await;
        self.status.observed_reboot_generation = spec.reboot_generation;
        let Some(running) = &self.running else {
            // It exited instead; the main loop restarts it if wanted.
            self.status.phase = InstancePhase::Stopped;
            self.status.pid = None;
            return;
        };
        match running.vm.reset_and_resume().await {
            Ok(()) => {
                info!(instance = %spec.name, graceful, "VM rebooted");
                self.status.boot_count += 1;
                self.status.started_at = Some(Utc::now());
                self.status.ready_at = None;
                self.start_probe(spec);
            }
            Err(e) => {
                warn!(instance = %spec.name, error = %e, "reboot failed; restarting the VM");
                self.terminate().await;
                self.status.phase = InstancePhase::Stopped;
                self.status.pid = None;
            }
        }
        self.publish(spec).await;
    }

    async fn on_event(&mut self, spec: &InstanceSpec, event: VmEvent) {
        match event {
            VmEvent::OutOfMemory { kills } => {
                let message = format!(
                    "the kernel killed a process inside for want of memory (limit {} MiB; {kills} so far in this run)",
                    spec.resources.memory_mib
                );
                warn!(instance = %spec.name, kills, "{message}");
                let event = skyvisor_core::Event::instance(
                    skyvisor_core::EventKind::OutOfMemory,
                    spec,
                    message,
                );
                if let Err(e) = self
                    .ctx
                    .store
                    .txn(vec![], vec![crate::event_op(&event)])
                    .await
                {
                    warn!(instance = %spec.name, error = %e, "could not record an out-of-memory event");
                }
            }
            VmEvent::Reset => {
                self.status.boot_count += 1;
                self.status.guest_ready = false;
                self.status.ready_at = None;
                self.status.started_at = Some(Utc::now());
                self.start_probe(spec);
            }
            VmEvent::GuestShutdown => {
                info!(instance = %spec.name, "the guest shut itself down");
                self.cancel_probe();
                self.terminate().await;
                self.after_exit(
                    spec,
                    VmExit {
                        reason: ExitReason::GuestShutdown,
                        detail: "the guest powered itself off".into(),
                    },
                    None,
                );
            }
            VmEvent::Exited(exit) => {
                let ran_for = self.running.take().map(|r| r.since.elapsed());
                warn!(instance = %spec.name, reason = ?exit.reason, detail = %exit.detail, "VM exited unexpectedly");
                self.cancel_probe();
                self.after_exit(spec, exit, ran_for);
            }
        }
    }

    /// Records an exit nobody asked for and applies the restart policy.
    fn after_exit(&mut self, spec: &InstanceSpec, exit: VmExit, ran_for: Option<Duration>) {
        self.status.pid = None;
        self.status.guest_ready = false;
        let restart = match spec.restart_policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit.reason.is_failure(),
            RestartPolicy::Never => false,
        };
        self.status.last_exit = Some(ExitRecord {
            at: Utc::now(),
            reason: exit.reason,
            detail: exit.detail.clone(),
        });
        if restart {
            if ran_for.is_some_and(|d| d >= STABLE_RUN) {
                self.backoff = Duration::ZERO;
            }
            self.restart_at = Some(Instant::now() + self.backoff);
            self.status.message = Some(format!(
                "{}; restarting (restart policy {}) in {}s",
                exit.detail,
                spec.restart_policy,
                self.backoff.as_secs()
            ));
            self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
            self.status.restart_count += 1;
            self.status.phase = InstancePhase::Starting;
        } else {
            self.hold = Some(spec.generation);
            self.status.phase = if exit.reason.is_failure() {
                InstancePhase::Failed
            } else {
                InstancePhase::Stopped
            };
            self.status.message = Some(exit.detail);
        }
    }

    /// Deletes the VM: power off, remove tap and disk, then the records.
    async fn teardown(&mut self, spec: &InstanceSpec) {
        self.set_phase(spec, InstancePhase::Deleting).await;
        checkpoints::abandon(&self.ctx, spec).await;
        self.cancel_probe();
        if self.running.is_some() {
            self.stop(spec, true).await;
        }
        self.ctx.remove_tap(spec).await;
        let dir = self.vm_dir(spec);
        if let Some(c) = &self.ctx.containers {
            // Its root is unmounted before its files go.
            c.forget(&spec.id, &dir).await;
        }
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(instance = %spec.name, error = %e, "could not remove the VM's files");
        }
        self.launcher().release_volumes(spec).await;
        let mut ops = vec![
            Op::Delete(keys::instance_spec(&spec.instance_ref())),
            Op::Delete(keys::binding(&spec.host, &spec.instance_ref())),
            Op::Delete(keys::instance_status(&spec.instance_ref())),
            Op::Delete(keys::ipam_claim(
                &spec.network.ipam_scope(),
                spec.network.ip,
            )),
        ];
        // Its volumes stay; its claims on them go with it.
        if let Ok(listing) = self.ctx.store.list(keys::VOLUME_ATTACHMENTS).await {
            for kv in listing.items {
                if decode::<VolumeAttachment>(&kv).is_ok_and(|c| c.instance_id == spec.id) {
                    ops.push(Op::Delete(kv.key));
                }
            }
        }
        // Keep trying: the records must go once the resources are gone.
        let mut delay = Duration::from_millis(200);
        loop {
            match self.ctx.store.txn(vec![], ops.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    warn!(instance = %spec.name, error = %e, "could not delete records; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        info!(instance = %spec.name, "instance deleted");
    }
}

/// The launch description of a volume served at `target`.
pub(crate) fn launch_volume(v: &InstanceVolume, target: crate::volumes::NbdTarget) -> LaunchVolume {
    LaunchVolume {
        name: v.name.clone(),
        id: v.id,
        disk_id: crate::volumes::disk_id(v),
        root: v.root,
        serial: crate::volumes::serial(v),
        socket: target.socket,
        export: target.export,
    }
}

async fn next_event(running: &mut Option<Running>) -> VmEvent {
    match running {
        Some(r) => r.vm.next_event().await,
        None => std::future::pending().await,
    }
}

/// What a readiness probe found.
pub(crate) enum GuestReady {
    /// Skyvisor's guest service answers.
    Service,
    /// cloud-init has finished (reported through the guest agent).
    CloudInit {
        /// Its report.
        report: skyvisor_core::CloudInitReport,
        /// The guest's addresses as it sees them.
        addresses: Vec<String>,
    },
}

async fn probe_done(
    probe: &mut Option<(oneshot::Receiver<GuestReady>, tokio::task::JoinHandle<()>)>,
) -> GuestReady {
    match probe {
        Some((rx, _)) => match rx.await {
            Ok(r) => r,
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The next health judgement of a member whose check runs.
async fn health_changed(
    health: &mut Option<crate::health::HealthChecker>,
) -> skyvisor_core::group::HealthReport {
    match health {
        Some(h) => match h.reports.changed().await {
            Ok(()) => h.reports.borrow_and_update().clone(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Whether the guest service at `ip` answers `/health` with 200, asked from
/// inside network namespace `ns` (a private network's router).
async fn healthy_in_namespace(ns: &str, ip: std::net::Ipv4Addr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = std::net::SocketAddr::from((ip, 80));
    let attempt = async {
        let mut stream = skyvisor_net::connect_in_namespace(ns, addr, Duration::from_secs(2))
            .await
            .ok()?;
        stream
            .write_all(format!("GET /health HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut head = [0u8; 16];
        let n = stream.read(&mut head).await.ok()?;
        Some(head[..n].starts_with(b"HTTP/1.1 200") || head[..n].starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
