//! Live migration on a host agent.
//!
//! The source's agent drives a migration from the VM's supervisor (which
//! owns the QEMU process): it asks the destination's agent to prepare an
//! empty VM waiting for the state, has QEMU mirror the disk and copy memory
//! straight to it until QEMU pauses the guest for the last pages, redirects
//! the VM's traffic, commits the handover to the store, asks the
//! destination to resume and sends on the frames that reached the old tap
//! during the pause. The destination's side is a few HTTP endpoints.
//!
//! The VM runs in exactly one place: the destination resumes only after
//! the store says the VM is bound to it (the handover's transaction), and
//! the source resumes only when that transaction surely did not happen.

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use skyvisor_core::{
    Host, InstanceRef, InstanceSpec, MacAddr, Migration, MigrationId, MigrationPhase,
    MigrationProgress, MigrationRequest, MigrationResult, Resources, keys,
};
use skyvisor_store::{Compare, Op, StoreExt, decode, put_json};
use tracing::{debug, info, warn};

use crate::AgentContext;
use crate::hypervisor::{
    HvError, IncomingPlan, MIGRATION_EXPORT, NbdTarget, OutgoingControl, OutgoingPlan, StreamAddr,
    TapFile, Vm,
};
use crate::launch::{Launcher, ServeMode};
use crate::tunnel::{self, Tunnel};

/// The source switches over (network first, then the pause) once the
/// memory left would take this long to send. It must leave room for the
/// network switch before QEMU could finish on its own; the pause itself is
/// shorter, since the network switch and the drain of the tap come first.
pub const SWITCHOVER_BUDGET: Duration = Duration::from_millis(50);
/// A migration fails when nothing moved for this long.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// A migration fails when it has not converged in this long (override in
/// seconds with `SKYVISOR_MIGRATION_MAX_SECS`).
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Environment override of [`MAX_DURATION`], seconds.
pub const MAX_DURATION_ENV: &str = "SKYVISOR_MIGRATION_MAX_SECS";
/// How long the source keeps sending the VM's traffic to the destination
/// after the switchover (until every host learned its new place).
const REDIRECT_HOLD: Duration = Duration::from_secs(10);
/// How long a prepared destination VM waits for its handover.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the switchover waits for the other hosts to steer traffic.
const STEER_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the source waits for the destination to discard its VM.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Agent-to-agent request timeout.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// A VM prepared here as a migration's destination.
pub struct IncomingVm {
    /// The migration.
    pub migration: MigrationId,
    /// The paused VM waiting for its state.
    pub vm: Box<dyn Vm>,
    /// Its size.
    pub resources: Resources,
    /// What its image says about its guest.
    pub(crate) guest: crate::launch::GuestFacts,
    /// It was resumed after the handover.
    pub resumed: bool,
    /// Its volumes, exported here waiting for the handover.
    pub volumes: Vec<crate::hypervisor::LaunchVolume>,
    /// The TLS ends of its streams' tunnels (closed when it is dropped).
    pub tunnels: Vec<Tunnel>,
}

/// QEMU's sockets for a migration's tunnelled streams, in the VM's
/// directory: the destination's listeners, the source's targets.
const MEMORY_IN_SOCKET: &str = "migration-in.sock";
const NBD_IN_SOCKET: &str = "migration-nbd-in.sock";
const MEMORY_OUT_SOCKET: &str = "migration-out.sock";
const NBD_OUT_SOCKET: &str = "migration-nbd-out.sock";

/// `host:port`, with brackets around an IPv6 host.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The destination VMs of this host, by instance.
pub type IncomingVms = tokio::sync::Mutex<HashMap<InstanceRef, IncomingVm>>;

/// The VMs whose source side runs here, so that a migration straight back
/// waits until the old copy (its QEMU, tap and files) is gone.
#[derive(Default)]
pub struct OutgoingVms {
    leaving: std::sync::Mutex<std::collections::HashSet<InstanceRef>>,
    changed: tokio::sync::Notify,
}

impl OutgoingVms {
    fn enter(&self, name: &InstanceRef) -> LeavingGuard<'_> {
        self.leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone());
        LeavingGuard {
            set: self,
            name: name.clone(),
        }
    }

    /// Whether `name` is migrating out of this host right now.
    pub(crate) fn is_leaving(&self, name: &InstanceRef) -> bool {
        self.leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Waits up to `timeout` until `name`'s source side here has ended;
    /// false if it has not.
    async fn wait_gone(&self, name: &InstanceRef, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if !self.is_leaving(name) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return !self.is_leaving(name);
            }
        }
    }
}

struct LeavingGuard<'a> {
    set: &'a OutgoingVms,
    name: InstanceRef,
}

impl Drop for LeavingGuard<'_> {
    fn drop(&mut self) {
        self.set
            .leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
        self.set.changed.notify_waiters();
    }
}

/// How long a destination waits for the VM's previous copy here to go (a
/// migration straight back to where it just left).
const PREVIOUS_COPY_WAIT: Duration = Duration::from_secs(30);

/// What the source asks the destination to prepare.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// The VM.
    pub instance: InstanceRef,
    /// The streams go without TLS (the migration asked for it).
    #[serde(default)]
    pub insecure: bool,
}

/// Where the overlay must send a MAC for a while (every host but a
/// migration's source and destination, at its switchover).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SteerRequest {
    /// The migrating VM's MAC.
    pub mac: MacAddr,
    /// The destination host's overlay address.
    pub to: Ipv4Addr,
    /// The VM's private network (none: the cluster network).
    #[serde(default)]
    pub vni: Option<u32>,
}

/// Where the prepared destination listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareAnswer {
    /// Its address.
    pub host: String,
    /// The migration stream's port.
    pub migration_port: u16,
    /// The root disk's NBD export port, if the VM has a local root disk.
    pub nbd_port: Option<u16>,
    /// Whether its listeners take only mutual TLS with a certificate of the
    /// cluster's CA (the source must then present one).
    #[serde(default)]
    pub tls: bool,
}

/// An error answer of the migration endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PeerError {
    error: String,
}

fn peer_error(status: StatusCode, error: impl Into<String>) -> Response {
    (
        status,
        Json(PeerError {
            error: error.into(),
        }),
    )
        .into_response()
}

/// The destination's routes.
pub fn router(ctx: Arc<AgentContext>) -> Router {
    Router::new()
        .route(
            "/agent/v1/migrations/{id}/prepare",
            axum::routing::post(prepare),
        )
        .route("/agent/v1/migrations/{id}/pin", axum::routing::post(pin))
        .route(
            "/agent/v1/migrations/{id}/resume",
            axum::routing::post(resume),
        )
        .route(
            "/agent/v1/migrations/{id}/abort",
            axum::routing::post(abort),
        )
        .route("/agent/v1/overlay/steer", axum::routing::post(steer))
        .with_state(ctx)
}

/// The spec of `instance`, if its migration `id` comes here.
async fn incoming_spec(
    ctx: &AgentContext,
    id: MigrationId,
    instance: &InstanceRef,
) -> Result<InstanceSpec, Response> {
    let spec = match ctx
        .store
        .get_json::<InstanceSpec>(&keys::instance_spec(instance))
        .await
    {
        Ok(Some((s, _))) => s,
        Ok(None) => {
            return Err(peer_error(
                StatusCode::NOT_FOUND,
                format!("instance {instance} not found"),
            ));
        }
        Err(e) => return Err(peer_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    };
    let here = spec
        .migration
        .as_ref()
        .is_some_and(|m| m.id == id && m.destination == ctx.host);
    if here || spec.host == ctx.host {
        Ok(spec)
    } else {
        Err(peer_error(
            StatusCode::CONFLICT,
            format!(
                "instance {instance} has no migration {id} to host {}",
                ctx.host
            ),
        ))
    }
}

/// A free TCP port on `host` (it is released again; QEMU binds it next).
fn free_port(host: &str) -> Result<u16, String> {
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on {host}: {e}"))
}

async fn prepare(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<MigrationId>,
    Json(req): Json<PrepareRequest>,
) -> Response {
    let spec = match incoming_spec(&ctx, id, &req.instance).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if spec.host == ctx.host {
        return peer_error(
            StatusCode::CONFLICT,
            format!("instance {} already runs on this host", spec.name),
        );
    }
    // Straight back to where it just left: that copy must go first (it
    // holds the tap, the directory and the volumes' exports).
    if !ctx
        .outgoing
        .wait_gone(&spec.instance_ref(), PREVIOUS_COPY_WAIT)
        .await
    {
        return peer_error(
            StatusCode::CONFLICT,
            format!(
                "instance {}'s previous copy on this host is still shutting down; retry",
                spec.name
            ),
        );
    }
    let mut incoming = ctx.incoming.lock().await;
    if let Some(old) = incoming.remove(&spec.instance_ref()) {
        warn!(instance = %spec.name, migration = %old.migration, "replacing an earlier destination VM");
        discard(&ctx, &spec, old).await;
    }
    // A disk left from an earlier stay here would mix with the mirror.
    let dir = ctx.vm_dir(&spec.id);
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return peer_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("clearing {}: {e}", dir.display()),
        );
    }
    // A redirect or steering left from when the VM last left this host
    // (or passed by) would send its frames away again.
    if let Some(overlay) = ctx.private_nets.overlay_device(spec.network.vni)
        && let Err(e) = ctx.network.clear_redirect(spec.network.mac, &overlay).await
    {
        return peer_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let launcher = Launcher { ctx: ctx.clone() };
    let (running, guest) = match launcher.launch(&spec, None, false, true, None).await {
        Ok(r) => r,
        Err(e) => {
            return peer_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("starting the destination VM: {e}"),
            );
        }
    };
    let host = ctx.address.clone();
    let copies_disk = spec.root_volume().is_none();
    // With the cluster's certificates, QEMU listens on unix sockets and
    // the streams arrive through this agent's TLS tunnels; otherwise on
    // TCP ports of its own.
    let tls = ctx.member_tls.clone().filter(|_| !req.insecure);
    let plan = match &tls {
        Some(_) => Ok(IncomingPlan {
            memory: StreamAddr::Unix(dir.join(MEMORY_IN_SOCKET)),
            nbd: copies_disk.then(|| StreamAddr::Unix(dir.join(NBD_IN_SOCKET))),
        }),
        None => free_port(&host).and_then(|m| {
            let nbd = match copies_disk {
                true => Some(StreamAddr::Tcp {
                    host: host.clone(),
                    port: free_port(&host)?,
                }),
                false => None,
            };
            Ok(IncomingPlan {
                memory: StreamAddr::Tcp {
                    host: host.clone(),
                    port: m,
                },
                nbd,
            })
        }),
    };
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            running.vm.kill();
            cleanup_files(&ctx, &spec).await;
            return peer_error(StatusCode::INTERNAL_SERVER_ERROR, e);
        }
    };
    if let Err(e) = running.vm.prepare_incoming(&plan).await {
        running.vm.kill();
        cleanup_files(&ctx, &spec).await;
        return peer_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("preparing the destination VM: {e}"),
        );
    }
    let (tunnels, migration_port, nbd_port) = match listen_ports(tls.as_ref(), &host, &plan).await {
        Ok(l) => l,
        Err(e) => {
            running.vm.kill();
            cleanup_files(&ctx, &spec).await;
            return peer_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the migration's TLS tunnel cannot listen: {e}"),
            );
        }
    };
    info!(instance = %spec.name, migration = %id, port = migration_port, tls = tls.is_some(), "destination VM waits for its state");
    incoming.insert(
        spec.instance_ref(),
        IncomingVm {
            migration: id,
            vm: running.vm,
            resources: spec.resources,
            guest,
            resumed: false,
            volumes: running.volumes,
            tunnels,
        },
    );
    drop(incoming);
    tokio::spawn(watch_incoming(ctx.clone(), spec.clone(), id));
    Json(PrepareAnswer {
        host,
        migration_port,
        nbd_port,
        tls: tls.is_some(),
    })
    .into_response()
}

/// The ports the source sends a destination's streams to (memory, NBD):
/// QEMU's own TCP ports, or those of TLS tunnels opened here to QEMU's
/// unix sockets (returned too: they close when dropped).
async fn listen_ports(
    tls: Option<&skyvisor_volume::link_tls::LinkTls>,
    host: &str,
    plan: &IncomingPlan,
) -> std::io::Result<(Vec<Tunnel>, u16, Option<u16>)> {
    let mut tunnels = Vec::new();
    let mut port_of = async |addr: &StreamAddr| -> std::io::Result<u16> {
        match (addr, tls) {
            (StreamAddr::Tcp { port, .. }, _) => Ok(*port),
            (StreamAddr::Unix(path), Some(tls)) => {
                let (port, t) = tunnel::listen(tls.clone(), host, path.clone()).await?;
                tunnels.push(t);
                Ok(port)
            }
            (StreamAddr::Unix(path), None) => Err(std::io::Error::other(format!(
                "{} is a unix socket and there is no TLS to carry it",
                path.display()
            ))),
        }
    };
    let memory = port_of(&plan.memory).await?;
    let nbd = match &plan.nbd {
        Some(a) => Some(port_of(a).await?),
        None => None,
    };
    Ok((tunnels, memory, nbd))
}

async fn pin(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<MigrationId>,
    Json(req): Json<PrepareRequest>,
) -> Response {
    let spec = match incoming_spec(&ctx, id, &req.instance).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    // `prepare` already cleared what an earlier stay here left on the
    // overlay; this step is on the switchover's path, so only the pin.
    let tap = skyvisor_net::tap_name(&spec.id);
    match ctx.network.pin_mac(spec.network.mac, &tap).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => peer_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn steer(State(ctx): State<Arc<AgentContext>>, Json(req): Json<SteerRequest>) -> Response {
    let Some(overlay) = ctx.private_nets.overlay_device(req.vni) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    // A host that carries none of a private network's instances has no
    // device for it, and nothing to steer.
    if req.vni.is_some()
        && !std::path::Path::new("/sys/class/net")
            .join(&overlay)
            .exists()
    {
        return StatusCode::NO_CONTENT.into_response();
    }
    if let Err(e) = ctx.network.steer_mac(req.mac, &overlay, req.to).await {
        return peer_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    // Until every host learned the VM's new place from its announcements.
    tokio::spawn(async move {
        tokio::time::sleep(REDIRECT_HOLD).await;
        if let Err(e) = ctx.network.clear_redirect(req.mac, &overlay).await {
            warn!(mac = %req.mac, error = %e, "could not end a migration's steering");
        }
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn resume(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<MigrationId>,
    Json(req): Json<PrepareRequest>,
) -> Response {
    let spec = match incoming_spec(&ctx, id, &req.instance).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    // Only once the handover is committed: until then the source may
    // still resume its copy.
    if spec.host != ctx.host {
        return peer_error(
            StatusCode::CONFLICT,
            format!(
                "instance {} is not bound to host {} yet",
                spec.name, ctx.host
            ),
        );
    }
    let mut incoming = ctx.incoming.lock().await;
    match incoming.get_mut(&spec.instance_ref()) {
        Some(v) if v.migration == id => {
            if !v.resumed {
                // Become the volumes' primary (once the source let go of
                // them: it does so while this request travels) while the
                // last of the state arrives, then run.
                let activating = Instant::now();
                let launcher = Launcher { ctx: ctx.clone() };
                let volumes = async {
                    let r = launcher
                        .serve_volumes_as(&spec, ServeMode::HandedOver)
                        .await;
                    (r, activating.elapsed())
                };
                let ((served, activated), arrived) =
                    tokio::join!(volumes, v.vm.incoming_arrived(Duration::from_secs(30)));
                if let Err(e) = served {
                    return peer_error(StatusCode::INTERNAL_SERVER_ERROR, e);
                }
                if let Err(e) = arrived {
                    return peer_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                }
                if let Err(e) = v.vm.finish_incoming(Duration::from_secs(30)).await {
                    return peer_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                }
                debug!(instance = %spec.name, volumes_ms = activated.as_millis() as u64,
                    resumed_ms = activating.elapsed().as_millis() as u64, "resume steps");
                v.resumed = true;
                info!(instance = %spec.name, migration = %id, "migrated VM resumed here");
            }
            StatusCode::NO_CONTENT.into_response()
        }
        // Its supervisor took it over already (and resumed it).
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn abort(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<MigrationId>,
    Json(req): Json<PrepareRequest>,
) -> Response {
    let spec = match ctx
        .store
        .get_json::<InstanceSpec>(&keys::instance_spec(&req.instance))
        .await
    {
        Ok(Some((s, _))) => s,
        Ok(None) => return StatusCode::NO_CONTENT.into_response(),
        Err(e) => return peer_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    if spec.host == ctx.host {
        return peer_error(
            StatusCode::CONFLICT,
            format!(
                "instance {} is bound to this host: the migration completed",
                spec.name
            ),
        );
    }
    let mut incoming = ctx.incoming.lock().await;
    if incoming
        .get(&spec.instance_ref())
        .is_some_and(|v| v.migration == id)
        && let Some(v) = incoming.remove(&spec.instance_ref())
    {
        discard(&ctx, &spec, v).await;
        info!(instance = %spec.name, migration = %id, "destination VM discarded");
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Kills a destination VM that will not get its handover and removes its
/// tap and files.
async fn discard(ctx: &AgentContext, spec: &InstanceSpec, v: IncomingVm) {
    v.vm.kill();
    cleanup_files(ctx, spec).await;
}

/// Removes a VM's tap, files and volume exports here (a destination VM
/// that will not run, or the source's copy after the handover).
async fn cleanup_files(ctx: &AgentContext, spec: &InstanceSpec) {
    if let Some(v) = &ctx.volumes {
        v.release_instance(&spec.instance_ref()).await;
    }
    ctx.remove_tap(spec).await;
    let dir = ctx.vm_dir(&spec.id);
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(instance = %spec.name, error = %e, "could not remove a VM's files");
    }
}

/// Discards a destination VM whose migration ended without a handover
/// (the source failed, rolled back or died), or that waited too long.
async fn watch_incoming(ctx: Arc<AgentContext>, spec: InstanceSpec, id: MigrationId) {
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        {
            let incoming = ctx.incoming.lock().await;
            match incoming.get(&spec.instance_ref()) {
                Some(v) if v.migration == id => {}
                // Taken over by its supervisor, or discarded.
                _ => return,
            }
        }
        let record = ctx.store.get_json::<Migration>(&keys::migration(&id)).await;
        let ended = match &record {
            Ok(Some((m, _))) => {
                matches!(m.phase, MigrationPhase::Failed | MigrationPhase::Cancelled)
            }
            Ok(None) => true,
            Err(_) => false,
        };
        if ended || started.elapsed() > INCOMING_TIMEOUT {
            // Only if the VM did not become ours meanwhile.
            let bound_here = matches!(
                ctx.store.get_json::<InstanceSpec>(&keys::instance_spec(&spec.instance_ref())).await,
                Ok(Some((s, _))) if s.host == ctx.host
            );
            if bound_here {
                continue;
            }
            let mut incoming = ctx.incoming.lock().await;
            if incoming
                .get(&spec.instance_ref())
                .is_some_and(|v| v.migration == id)
                && let Some(v) = incoming.remove(&spec.instance_ref())
            {
                warn!(instance = %spec.name, migration = %id, "discarding a destination VM whose migration ended without a handover");
                discard(&ctx, &spec, v).await;
            }
            return;
        }
    }
}

/// After an agent restart: QEMUs of VMs that are not bound to this host
/// any more are orphans — a migration's destination VM whose handover nobody
/// will ask for, a migration's source whose agent died after the handover,
/// a VM deleted while the agent was down. Discards them (VMs bound here are
/// left to their supervisors, which adopt them).
pub(crate) async fn sweep_orphans(ctx: Arc<AgentContext>) {
    let Ok(mut dir) = tokio::fs::read_dir(ctx.data_dir.join("vms")).await else {
        return;
    };
    // What is bound here, by id: a launch file names its VM by id, which
    // no other VM of any project shares.
    let bound: std::collections::HashSet<skyvisor_core::InstanceId> =
        match ctx.store.list(&keys::bindings_of(&ctx.host)).await {
            Ok(l) => l
                .items
                .iter()
                .filter_map(|kv| decode::<InstanceSpec>(kv).ok())
                .map(|s| s.id)
                .collect(),
            // Unknown: leave everything for the next start.
            Err(_) => return,
        };
    while let Ok(Some(entry)) = dir.next_entry().await {
        let launch = match tokio::fs::read(entry.path().join(crate::supervisor::LAUNCH_FILE)).await
        {
            Ok(b) => serde_json::from_slice::<crate::hypervisor::VmLaunch>(&b).ok(),
            Err(_) => None,
        };
        let Some(launch) = launch else {
            continue;
        };
        if bound.contains(&launch.instance) {
            continue;
        }
        let name = launch.name.as_str();
        // A migration's destination VM being prepared now is not bound
        // here yet (names only: conservative across projects).
        if ctx
            .incoming
            .lock()
            .await
            .keys()
            .any(|k| k.name.as_str() == name)
        {
            continue;
        }
        warn!(instance = %name, id = %launch.instance, "discarding a VM that is not bound to this host");
        if let Some(vm) = ctx.hypervisor.attach(&launch.run_dir).await {
            vm.kill();
        }
        let tap = skyvisor_net::tap_name(&launch.instance);
        let _ = ctx.network.delete_tap(&tap).await;
        let _ = tokio::fs::remove_dir_all(entry.path()).await;
    }
}

/// Opens the source's ends of the tunnels to the destination's: QEMU's
/// addresses (memory, NBD) and the tunnels.
async fn forward_tunnels(
    ctx: &AgentContext,
    spec: &InstanceSpec,
    tls: &skyvisor_volume::link_tls::LinkTls,
    answer: &PrepareAnswer,
) -> std::io::Result<(StreamAddr, Option<StreamAddr>, Vec<Tunnel>)> {
    let dir = ctx.vm_dir(&spec.id);
    let memory = dir.join(MEMORY_OUT_SOCKET);
    let mut tunnels = vec![
        tunnel::forward(
            tls.clone(),
            &memory,
            host_port(&answer.host, answer.migration_port),
        )
        .await?,
    ];
    let nbd = match answer.nbd_port {
        Some(port) => {
            let path = dir.join(NBD_OUT_SOCKET);
            tunnels.push(tunnel::forward(tls.clone(), &path, host_port(&answer.host, port)).await?);
            Some(StreamAddr::Unix(path))
        }
        None => None,
    };
    Ok((StreamAddr::Unix(memory), nbd, tunnels))
}

/// How the source's side of a migration ended.
pub(crate) enum SourceOutcome {
    /// The VM runs on the destination now; the local copy is gone.
    Moved,
    /// The VM runs here still.
    Stayed,
}

/// The source's view of the destination.
struct Peer {
    http: reqwest::Client,
    url: String,
    id: MigrationId,
    instance: InstanceRef,
    insecure: bool,
}

impl Peer {
    async fn call<T: serde::de::DeserializeOwned>(&self, step: &str) -> Result<Option<T>, String> {
        self.call_with(
            step,
            &PrepareRequest {
                instance: self.instance.clone(),
                insecure: self.insecure,
            },
        )
        .await
    }

    async fn call_with<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        step: &str,
        body: &B,
    ) -> Result<Option<T>, String> {
        let url = format!("{}/agent/v1/migrations/{}/{step}", self.url, self.id);
        let resp = self
            .http
            .post(&url)
            // Cleanup steps must not hang on a dead or cut-off peer.
            .timeout(if step == "abort" {
                ABORT_TIMEOUT
            } else {
                PEER_TIMEOUT
            })
            .json(body)
            .send()
            .await
            .map_err(|e| format!("destination agent at {}: {e}", self.url))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !status.is_success() {
            let msg = resp
                .json::<PeerError>()
                .await
                .map(|e| e.error)
                .unwrap_or_else(|_| status.to_string());
            return Err(format!("destination agent ({step}): {msg}"));
        }
        resp.json::<T>()
            .await
            .map(Some)
            .map_err(|e| format!("destination agent ({step}): bad answer: {e}"))
    }
}

/// Progress reports and the network switch, for the hypervisor's driver.
struct SourceControl<'a> {
    ctx: &'a AgentContext,
    peer: &'a Peer,
    record: Migration,
    spec: &'a InstanceSpec,
    dest_address: Option<Ipv4Addr>,
    /// The agents of the other hosts (neither source nor destination).
    others: Vec<String>,
    /// The destination's stream endpoints (migration, disk export).
    streams: Vec<(Ipv4Addr, u16)>,
    redirected: bool,
    cancelled: bool,
    /// The spec as read during the last copy, so that the handover's
    /// commit needs no read of its own after it (a stale one only costs a
    /// retry).
    prefetched: Option<(InstanceSpec, skyvisor_store::Revision)>,
}

impl SourceControl<'_> {
    async fn save(&self) {
        if let Err(e) = self
            .ctx
            .store
            .put(
                &keys::migration(&self.record.id),
                skyvisor_store::encode(&self.record),
            )
            .await
        {
            warn!(migration = %self.record.id, error = %e, "could not record migration progress");
        }
    }
}

#[async_trait]
impl OutgoingControl for SourceControl<'_> {
    async fn progress(&mut self, phase: MigrationPhase, progress: &MigrationProgress) -> bool {
        if matches!(
            self.ctx
                .store
                .get(&keys::migration_cancel(&self.record.id))
                .await,
            Ok(Some(_))
        ) {
            self.cancelled = true;
            return false;
        }
        self.record.progress = progress.clone();
        if self.record.phase != phase {
            info!(instance = %self.spec.name, migration = %self.record.id, %phase, "migration phase");
            self.record.set_phase(phase);
        } else {
            self.record.updated_at = Utc::now();
        }
        self.save().await;
        true
    }

    async fn unblock(&mut self) {
        for (ip, port) in &self.streams {
            if let Err(e) = self.ctx.network.kill_connections(*ip, *port).await {
                warn!(destination = %ip, port, error = %e, "could not break a migration stream");
            }
        }
    }

    async fn switch_network(&mut self) -> Result<(), String> {
        self.record.set_phase(MigrationPhase::SwitchingOver);
        // Frames for the VM queue at the destination's tap from now on
        // (first, so that none sent there meanwhile bounces back here).
        self.peer.call::<()>("pin").await?;
        let Some(to) = self.dest_address else {
            return Ok(());
        };
        // Every other host sends the VM's frames straight there too, and
        // so does this one.
        let others = steer_others(
            self.ctx,
            &self.others,
            self.spec.network.mac,
            self.spec.network.vni,
            to,
        );
        let here = async {
            match self.ctx.private_nets.overlay_device(self.spec.network.vni) {
                Some(overlay) => self
                    .ctx
                    .network
                    .redirect_mac(self.spec.network.mac, &overlay, to)
                    .await
                    .map(|()| true)
                    .map_err(|e| e.to_string()),
                None => Ok(false),
            }
        };
        let ((), redirected) = tokio::join!(others, here);
        self.redirected = redirected?;
        // Read while QEMU still sends the last of the memory, after the
        // switch: the handover's commit then needs no read of its own.
        self.prefetched = self
            .ctx
            .store
            .get_json::<InstanceSpec>(&keys::instance_spec(&self.spec.instance_ref()))
            .await
            .ok()
            .flatten();
        Ok(())
    }
}

/// The agents of every registered host but this one and `dest`.
async fn other_agents(ctx: &AgentContext, dest: &skyvisor_core::HostName) -> Vec<String> {
    let Ok(listing) = ctx.store.list(keys::HOSTS).await else {
        return vec![];
    };
    listing
        .items
        .iter()
        .filter_map(|kv| skyvisor_store::decode::<Host>(kv).ok())
        .filter(|h| h.name != ctx.host && &h.name != dest)
        .filter_map(|h| h.agent_url)
        .collect()
}

/// Asks every other host to send `mac`'s frames to `to`, all at once; a
/// host that does not answer in time learns it from the VM's announcements.
async fn steer_others(
    ctx: &AgentContext,
    agents: &[String],
    mac: MacAddr,
    vni: Option<u32>,
    to: Ipv4Addr,
) {
    let calls = agents.iter().map(|url| {
        let req = ctx
            .http
            .post(format!("{url}/agent/v1/overlay/steer"))
            .timeout(STEER_TIMEOUT)
            .json(&SteerRequest { mac, to, vni });
        async move {
            if let Err(e) = req.send().await.and_then(|r| r.error_for_status()) {
                warn!(agent = %url, error = %e, "could not steer a migrating VM's traffic on a host");
            }
        }
    });
    futures::future::join_all(calls).await;
}

fn max_duration() -> Duration {
    std::env::var(MAX_DURATION_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(MAX_DURATION, Duration::from_secs)
}

/// Runs migration `req` of the VM `vm` (running here under `spec`).
pub(crate) async fn migrate_out(
    ctx: &Arc<AgentContext>,
    spec: &InstanceSpec,
    req: &MigrationRequest,
    vm: &dyn Vm,
) -> SourceOutcome {
    let started = Instant::now();
    let _leaving = ctx.outgoing.enter(&spec.instance_ref());
    let record = match ctx
        .store
        .get_json::<Migration>(&keys::migration(&req.id))
        .await
    {
        Ok(Some((m, _))) if !m.phase.is_finished() => m,
        Ok(_) => {
            // Nothing (left) to do: the request is stale.
            clear_request(ctx, spec, req.id).await;
            return SourceOutcome::Stayed;
        }
        Err(e) => {
            warn!(instance = %spec.name, error = %e, "cannot read the migration record; retrying later");
            return SourceOutcome::Stayed;
        }
    };
    info!(instance = %spec.name, migration = %req.id, to = %req.destination, "migration starts");
    let dest_host = match ctx
        .store
        .get_json::<Host>(&keys::host(&req.destination))
        .await
    {
        Ok(Some((h, _))) => h,
        Ok(None) => {
            fail(
                ctx,
                spec,
                record,
                "the destination host is not registered".into(),
                false,
            )
            .await;
            return SourceOutcome::Stayed;
        }
        Err(e) => {
            fail(
                ctx,
                spec,
                record,
                format!("reading the destination: {e}"),
                false,
            )
            .await;
            return SourceOutcome::Stayed;
        }
    };
    let Some(url) = dest_host.agent_url.clone() else {
        fail(
            ctx,
            spec,
            record,
            "the destination agent has no address".into(),
            false,
        )
        .await;
        return SourceOutcome::Stayed;
    };
    let peer = Peer {
        http: ctx.http.clone(),
        url,
        id: req.id,
        instance: spec.instance_ref(),
        insecure: req.insecure,
    };
    let mut control = SourceControl {
        ctx,
        peer: &peer,
        record,
        spec,
        dest_address: dest_host.address.parse().ok(),
        others: other_agents(ctx, &req.destination).await,
        streams: vec![],
        redirected: false,
        cancelled: false,
        prefetched: None,
    };
    // The disk follows: a replica moved to the destination is in sync
    // before the destination VM is even prepared.
    if let Err(e) = wait_for_destination_replica(ctx, spec, &req.destination, &mut control).await {
        let cancelled = control.cancelled;
        fail(ctx, spec, control.record, e, cancelled).await;
        return SourceOutcome::Stayed;
    }
    control.record.set_phase(MigrationPhase::Preparing);
    control.save().await;
    let answer = match peer.call::<PrepareAnswer>("prepare").await {
        Ok(Some(a)) => a,
        Ok(None) => {
            fail(
                ctx,
                spec,
                control.record,
                "the destination did not answer".into(),
                false,
            )
            .await;
            return SourceOutcome::Stayed;
        }
        Err(e) => {
            let _ = peer.call::<()>("abort").await;
            fail(ctx, spec, control.record, e, false).await;
            return SourceOutcome::Stayed;
        }
    };
    if let Ok(ip) = answer.host.parse::<Ipv4Addr>() {
        control.streams.push((ip, answer.migration_port));
        if let Some(p) = answer.nbd_port {
            control.streams.push((ip, p));
        }
    }
    // Through this agent's TLS tunnels when the destination listens so;
    // they live until this function ends, after the handover, since the
    // stream's tail may still be on its way when QEMU reports completion.
    let (memory, nbd, _tunnels) = match (answer.tls, &ctx.member_tls) {
        (false, _) => (
            StreamAddr::Tcp {
                host: answer.host.clone(),
                port: answer.migration_port,
            },
            answer.nbd_port.map(|port| StreamAddr::Tcp {
                host: answer.host.clone(),
                port,
            }),
            Vec::new(),
        ),
        (true, Some(tls)) => match forward_tunnels(ctx, spec, tls, &answer).await {
            Ok(t) => t,
            Err(e) => {
                let _ = peer.call::<()>("abort").await;
                let e = format!("the migration's TLS tunnel: {e}");
                fail(ctx, spec, control.record, e, false).await;
                return SourceOutcome::Stayed;
            }
        },
        (true, None) => {
            let _ = peer.call::<()>("abort").await;
            let e = "the destination takes the VM's state only over TLS, and this host has no certificate of the cluster's CA".to_string();
            fail(ctx, spec, control.record, e, false).await;
            return SourceOutcome::Stayed;
        }
    };
    let encrypted = answer.tls;
    let plan = OutgoingPlan {
        disk: nbd.map(|server| NbdTarget {
            server,
            export: MIGRATION_EXPORT.into(),
        }),
        memory,
        switchover_budget: SWITCHOVER_BUDGET,
        stall_timeout: STALL_TIMEOUT,
        max_duration: max_duration(),
        max_bandwidth: req.max_bandwidth_mib_s.map(|m| m << 20),
    };
    // Held through the pause: frames for the guest that reach its tap then
    // wait there for the handover, to be sent on, instead of dying with
    // this QEMU.
    let tap = vm.tap_file(&skyvisor_net::tap_name(&spec.id));
    let outcome = vm.migrate_out(&plan, &mut control).await;
    let (redirected, cancelled) = (control.redirected, control.cancelled);
    let prefetched = control.prefetched.take();
    let mut record = control.record;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            undo_redirect(ctx, spec, redirected).await;
            let _ = peer.call::<()>("abort").await;
            let message = match e {
                HvError::Control(m) | HvError::StartFailed(m) => m,
                e @ HvError::Unsupported { .. } => e.to_string(),
            };
            fail(ctx, spec, record, message, cancelled).await;
            return SourceOutcome::Stayed;
        }
    };
    // The guest is paused here and whole at the destination: hand over.
    // Committed as completed without figures: the pause is only known once
    // the destination runs the guest (the record gets them then).
    record.set_phase(MigrationPhase::Completed);
    record.result = None;
    let completed_after = outcome.stopped_at.elapsed();
    if !hand_over(ctx, spec, req, &record, prefetched).await {
        warn!(instance = %spec.name, migration = %req.id, "handover not committed; the VM resumes here");
        let resumed = vm.resume_after_migration().await;
        undo_redirect(ctx, spec, redirected).await;
        let _ = peer.call::<()>("abort").await;
        if let Err(e) = resumed {
            warn!(instance = %spec.name, error = %e, "could not resume the VM after a failed handover");
        }
        fail(
            ctx,
            spec,
            record,
            "the handover could not be recorded in the store".into(),
            false,
        )
        .await;
        return SourceOutcome::Stayed;
    }
    let committed_at = outcome.stopped_at.elapsed();
    // The paused guest's volumes are flushed (QEMU inactivated them when
    // the migration completed): let go of them, so that the destination
    // becomes their primary without waiting for this host's lease.
    let handed_off = async {
        if let Some(v) = &ctx.volumes {
            v.hand_off(&spec.instance_ref(), &req.destination).await;
        }
    };
    // Committed: the destination may run it now (it waits for the volumes
    // to be let go of). If this call fails its supervisor resumes it when
    // it sees the binding.
    let resumed = async {
        if let Err(e) = peer.call::<()>("resume").await {
            warn!(instance = %spec.name, error = %e, "the destination did not confirm the resume; its agent resumes the VM on its own");
        }
    };
    // Meanwhile, what reached the old tap during the pause goes on: it
    // waits in the destination's tap until the guest runs there.
    let (held_frames, (), ()) = tokio::join!(
        forward_queued(ctx, spec, tap.as_ref(), redirected),
        handed_off,
        resumed
    );
    let pause = outcome.stopped_at.elapsed();
    debug!(instance = %spec.name, migration = %req.id,
        copied_ms = completed_after.as_millis() as u64,
        committed_ms = committed_at.as_millis() as u64,
        resumed_ms = pause.as_millis() as u64,
        held_frames,
        "switchover steps (from the pause)");
    // After the redirect nothing but floods reaches the old tap.
    drop(tap);
    record.result = Some(MigrationResult {
        total_ms: started.elapsed().as_millis() as u64,
        qemu_downtime_ms: outcome.qemu_downtime_ms,
        pause_ms: pause.as_millis() as u64,
        ram_transferred: outcome.ram_transferred,
        disk_copied: outcome.disk_copied,
        encrypted,
        held_frames: held_frames as u64,
    });
    info!(instance = %spec.name, migration = %req.id, to = %req.destination,
        pause_ms = pause.as_millis() as u64, total_ms = started.elapsed().as_millis() as u64,
        held_frames, "migration completed");
    ctx.metrics.migration(record.result.as_ref());
    if let Err(e) = ctx
        .store
        .put(
            &keys::migration(&record.id),
            skyvisor_store::encode(&record),
        )
        .await
    {
        warn!(migration = %record.id, error = %e, "could not record the migration's figures");
    }
    // The local copy: gone, but the redirect stays until the rest of the
    // network has learned the new place.
    if vm.quit().await.is_err() {
        vm.kill();
    }
    // Its tap, files and exports go only with the process.
    if let Some(pid) = vm.pid()
        && !process_gone(pid, QUIT_TIMEOUT).await
    {
        warn!(instance = %spec.name, pid, "the source QEMU did not quit; killing it");
        vm.kill();
        process_gone(pid, QUIT_TIMEOUT).await;
    }
    {
        // The VM may be on its way back here already: its new destination
        // VM owns the tap and the directory then.
        let incoming = ctx.incoming.lock().await;
        if !incoming.contains_key(&spec.instance_ref()) {
            cleanup_files(ctx, spec).await;
        }
    }
    if redirected {
        let ctx = ctx.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REDIRECT_HOLD).await;
            undo_redirect(&ctx, &spec, true).await;
        });
    }
    SourceOutcome::Moved
}

/// Sends the frames for the VM that queued in its old tap (held in `tap`)
/// on through the overlay, whose entry for the VM points at its new host
/// once `redirected`. Returns how many; failures are only logged, as the
/// senders retransmit.
async fn forward_queued(
    ctx: &AgentContext,
    spec: &InstanceSpec,
    tap: Option<&TapFile>,
    redirected: bool,
) -> usize {
    let (Some(tap), true) = (tap, redirected) else {
        return 0;
    };
    let Some(overlay) = ctx.private_nets.overlay_device(spec.network.vni) else {
        return 0;
    };
    match ctx
        .network
        .forward_queued_frames(tap.0.clone(), spec.network.mac, &overlay)
        .await
    {
        Ok(n) => n,
        Err(e) => {
            warn!(instance = %spec.name, error = %e, "could not send on the frames queued during the pause");
            0
        }
    }
}

/// How long a migration waits for its destination's new replica.
const REPLICA_COPY_TIMEOUT: Duration = Duration::from_secs(1800);

/// Waits until the destination's replica of the VM's root volume is in
/// sync, when the volume wants one there (see the control plane's
/// `follow_with_replica`), reporting the copy as the `copying-disk` phase.
/// Nothing to wait for without a root volume or a replica wanted there.
async fn wait_for_destination_replica(
    ctx: &AgentContext,
    spec: &InstanceSpec,
    dest: &skyvisor_core::HostName,
    control: &mut SourceControl<'_>,
) -> Result<(), String> {
    let Some(root) = spec.root_volume() else {
        return Ok(());
    };
    let deadline = Instant::now() + REPLICA_COPY_TIMEOUT;
    loop {
        let wanted = match ctx
            .store
            .get_json::<skyvisor_core::VolumeSpec>(&keys::volume_spec(&spec.volume_ref(&root.name)))
            .await
        {
            Ok(Some((v, _))) => v.hosts.contains(dest),
            Ok(None) => false,
            Err(e) => {
                warn!(volume = %root.name, error = %e, "cannot read the volume; not waiting for its copy");
                false
            }
        };
        if !wanted {
            return Ok(());
        }
        let in_sync = matches!(
            ctx.store
                .get_json::<skyvisor_core::MembershipView>(&keys::volume_membership(&root.id.data_id()))
                .await,
            Ok(Some((m, _))) if m.replicas.iter().any(|r| r.node == dest.as_str() && r.in_sync)
        );
        if in_sync {
            return Ok(());
        }
        let (done, total) = match ctx
            .store
            .get_json::<skyvisor_core::VolumeRuntime>(&keys::volume_runtime(
                &spec.volume_ref(&root.name),
            ))
            .await
        {
            Ok(Some((r, _))) => r
                .replicas
                .iter()
                .find(|x| &x.host == dest)
                .map(|x| {
                    (
                        x.resync_done_bytes.unwrap_or(0),
                        x.resync_total_bytes.unwrap_or(0),
                    )
                })
                .unwrap_or((0, 0)),
            _ => (0, 0),
        };
        let progress = MigrationProgress {
            disk_copied: done,
            disk_total: total,
            ..Default::default()
        };
        if !control
            .progress(MigrationPhase::CopyingDisk, &progress)
            .await
        {
            return Err("cancelled while the disk was copied to the destination".into());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the destination's replica of {} was not in sync within {REPLICA_COPY_TIMEOUT:?}",
                root.name
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long the source's QEMU gets to quit after the handover.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until process `pid` has ended (gone, or a zombie: its files are
/// closed); false if it still runs after `timeout`.
async fn process_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // The state is the field after the parenthesised command name.
        let running = state
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X");
        if !running {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Commits the handover: the VM bound to the destination, its request
/// cleared, the record completed. True once it surely happened; false once
/// it surely did not. While the store cannot tell, it keeps asking (the
/// guest stays paused: running it in two places would be worse).
async fn hand_over(
    ctx: &AgentContext,
    spec: &InstanceSpec,
    req: &MigrationRequest,
    record: &Migration,
    mut prefetched: Option<(InstanceSpec, skyvisor_store::Revision)>,
) -> bool {
    let key = keys::instance_spec(&spec.instance_ref());
    let mut delay = Duration::from_millis(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        // The first attempt commits against the spec read before the
        // pause; a change since then fails the compare and reads again.
        let current = match prefetched.take() {
            Some(p) => Ok(Some(p)),
            None => ctx.store.get_json::<InstanceSpec>(&key).await,
        };
        let (mut next, rev) = match current {
            Ok(Some((s, rev))) => (s, rev),
            Ok(None) => return false,
            Err(e) => {
                warn!(instance = %spec.name, error = %e, "cannot read the spec for the handover; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if next.host == req.destination && next.migration.is_none() {
            // An earlier attempt committed (its answer was lost).
            return true;
        }
        if next.migration.as_ref().map(|m| m.id) != Some(req.id) || next.deleting {
            return false;
        }
        if attempts > 50 {
            return false;
        }
        let old_host = next.host.clone();
        next.host = req.destination.clone();
        next.migration = None;
        next.generation += 1;
        let mut ops = crate::spec_ops(&next);
        ops.push(Op::Delete(keys::binding(&old_host, &next.instance_ref())));
        ops.push(put_json(keys::migration(&record.id), record));
        let event = skyvisor_core::Event::instance(
            skyvisor_core::EventKind::Migrated,
            &next,
            format!("moved from {old_host} to {} while running", next.host),
        );
        ops.push(crate::event_op(&event));
        match ctx
            .store
            .txn(vec![Compare::ModRevision(key.clone(), rev)], ops)
            .await
        {
            Ok(t) if t.succeeded => return true,
            // The spec changed meanwhile: look again.
            Ok(_) => {}
            Err(e) => {
                warn!(instance = %spec.name, error = %e, "the handover's commit failed; checking whether it happened");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn undo_redirect(ctx: &AgentContext, spec: &InstanceSpec, redirected: bool) {
    if let (true, Some(overlay)) = (
        redirected,
        ctx.private_nets.overlay_device(spec.network.vni),
    ) && let Err(e) = ctx.network.clear_redirect(spec.network.mac, &overlay).await
    {
        warn!(instance = %spec.name, error = %e, "could not remove a migration's traffic redirect");
    }
}

/// Records a migration that ended with the VM still here, and clears the
/// instance's request.
async fn fail(
    ctx: &AgentContext,
    spec: &InstanceSpec,
    mut record: Migration,
    error: String,
    cancelled: bool,
) {
    warn!(instance = %spec.name, migration = %record.id, %error, "migration did not complete; the VM stays on {}", ctx.host);
    record.set_phase(if cancelled {
        MigrationPhase::Cancelled
    } else {
        MigrationPhase::Failed
    });
    record.error = Some(error);
    // The record says it failed and the spec stops asking for it in one
    // write: whoever sees the failure never sees the VM still migrating.
    let record_op = Op::Put {
        key: keys::migration(&record.id),
        value: skyvisor_store::encode(&record),
        lease: None,
    };
    clear_request_with(ctx, spec, record.id, vec![record_op]).await;
}

/// Removes migration `id`'s request from the instance's spec.
async fn clear_request(ctx: &AgentContext, spec: &InstanceSpec, id: MigrationId) {
    clear_request_with(ctx, spec, id, vec![]).await;
}

/// Removes migration `id`'s request from the instance's spec, writing
/// `with` in the same transaction (or alone, if the spec no longer asks
/// for it).
async fn clear_request_with(
    ctx: &AgentContext,
    spec: &InstanceSpec,
    id: MigrationId,
    with: Vec<Op>,
) {
    let key = keys::instance_spec(&spec.instance_ref());
    let mut delay = Duration::from_millis(50);
    for _ in 0..20 {
        let (compares, mut ops) = match ctx.store.get_json::<InstanceSpec>(&key).await {
            Ok(Some((mut s, rev))) if s.migration.as_ref().map(|m| m.id) == Some(id) => {
                s.migration = None;
                s.generation += 1;
                (
                    vec![Compare::ModRevision(key.clone(), rev)],
                    crate::spec_ops(&s),
                )
            }
            Ok(_) if with.is_empty() => return,
            Ok(_) => (vec![], vec![]),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        ops.extend(with.iter().cloned());
        match ctx.store.txn(compares, ops).await {
            Ok(t) if t.succeeded => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                warn!(migration = %id, error = %e, "could not record the end of the migration; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    warn!(instance = %spec.name, migration = %id, "could not clear the migration request");
}
