//! Containers, the agent's second instance driver: a container instance is
//! an OCI bundle run by Debian's `crun`, on the host's kernel.
//!
//! Its root is an overlay: the image's root file system, unpacked once per
//! image with its owners shifted into the containers' id range (root inside
//! is [`ID_BASE`] outside), under the container's own writable layer, which
//! lives in the instance's directory and so survives stop and start. Its
//! network device is a veth pair: the host's end on the instance's bridge,
//! guarded like a VM's tap; the other end moved into the container's
//! network namespace, and given its address, by the runtime's
//! `createRuntime` hook (this binary's `container-net-hook`), so that the
//! namespace is the container's own (its sysfs shows its devices only) and
//! the container, with no `NET_ADMIN`, cannot change its address.
//!
//! `crun run` stays in the foreground as the container's monitor, in its
//! own process group so that it outlives the agent: the agent learns the
//! container's exit status from it, and an agent that restarted finds the
//! container again by the runtime's state and watches its init's pidfd.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use skyvisor_core::{
    ExitReason, InstanceId, InstanceSpec, MigrationPhase, MigrationProgress, Resources,
    SnapshotProgress,
};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::info;

use crate::hypervisor::{
    CheckpointOutcome, CheckpointPlan, HvError, IncomingPlan, LaunchVolume, OutgoingControl,
    OutgoingOutcome, OutgoingPlan, Vm, VmEvent, VmExit,
};

/// Root inside a container is this host id; ids 0 to 65535 inside map to
/// this id and the next 65535. One range for all containers, as Incus does
/// by default, so that an image is unpacked once for all its containers.
pub const ID_BASE: u32 = 1_000_000;
/// The container's init writes its pid here (the runtime's `--pid-file`).
pub const PIDFILE: &str = "container.pid";
/// The OCI bundle (its `config.json`) in the instance's directory.
const BUNDLE_DIR: &str = "bundle";
/// The overlay's mount point: the container's root.
const ROOTFS_DIR: &str = "rootfs";
/// The container's writable layer and the overlay's work directory.
const UPPER_DIR: &str = "layer/upper";
const WORK_DIR: &str = "layer/work";
/// How long the runtime may take to make the container.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Processes and threads a container may have, whatever its type.
const PIDS_LIMIT: u32 = 4096;

/// How the agent runs containers, when it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSettings {
    /// The OCI runtime (`crun`).
    pub runtime: PathBuf,
    /// The executable the runtime calls back as the network hook (this
    /// binary, with `container-net-hook`).
    pub hook_exe: PathBuf,
}

/// The image a container's root is made of: its root file system tarball
/// and the tarball's SHA-256 (which names its unpacked copy).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImageRoot<'a> {
    /// The tarball.
    pub(crate) rootfs: &'a Path,
    /// Its SHA-256.
    pub(crate) sha256: &'a str,
}

/// What a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Process {
    /// The command and its arguments.
    pub(crate) args: Vec<String>,
    /// Its environment.
    pub(crate) env: Vec<String>,
    /// Its working directory.
    pub(crate) cwd: Option<String>,
    /// The `/etc/resolv.conf` to bind into it, if its init does not write
    /// one.
    pub(crate) resolv_conf: Option<String>,
}

/// The container driver of a host whose runtime and kernel can run them.
pub struct ContainerDriver {
    runtime: PathBuf,
    hook_exe: PathBuf,
    /// The runtime's state directory (`crun --root`).
    state_root: PathBuf,
    /// Unpacked images, by their file's SHA-256.
    layers: PathBuf,
    /// What the host record says: `crun 1.8.1, cgroup v1`.
    description: String,
    /// The cgroup hierarchy offers an I/O weight.
    io_weight: bool,
    /// The host's cgroups are v2 (else v1).
    cgroup_v2: bool,
    unpacking: tokio::sync::Mutex<()>,
}

impl ContainerDriver {
    /// Checks that this host can run containers and prepares it: the
    /// runtime runs, the kernel has overlayfs and user namespaces, and the
    /// cgroup hierarchy is one the runtime uses (on a hybrid v1 host, the
    /// controllers left on the v2 hierarchy are given v1 hierarchies of
    /// their own, which crun needs). Says why not, if it cannot.
    pub async fn probe(settings: &ContainerSettings, data_dir: &Path) -> Result<Self, String> {
        let out = Command::new(&settings.runtime)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                format!(
                    "the container runtime {} cannot run ({e}); install crun (apt-get install crun)",
                    settings.runtime.display()
                )
            })?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("crun")
            .trim()
            .replace(" version", "");
        let filesystems = tokio::fs::read_to_string("/proc/filesystems")
            .await
            .unwrap_or_default();
        if !filesystems.contains("overlay") {
            return Err(
                "the kernel has no overlay file system (container roots are overlays)".into(),
            );
        }
        if tokio::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .await
            .is_ok_and(|v| v.trim() == "0")
        {
            return Err("user namespaces are turned off (user.max_user_namespaces = 0)".into());
        }
        // A container's root process (an unprivileged host id) must reach
        // its root directory, under the agent's data directory.
        let vms = data_dir.join("vms");
        if let Some(closed) = vms.ancestors().find(|d| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 == 0)
        }) {
            return Err(format!(
                "{} is not searchable by other users (mode o-x), so a container's root there is out of its own reach; allow it with chmod o+x {}",
                closed.display(),
                closed.display()
            ));
        }
        let (cgroups, io_weight) = tokio::task::spawn_blocking(prepare_cgroups)
            .await
            .map_err(|e| format!("checking cgroups: {e}"))??;
        let state_root = data_dir.join("crun");
        let layers = data_dir.join("container-images");
        for d in [&state_root, &layers] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        Ok(Self {
            runtime: settings.runtime.clone(),
            hook_exe: settings.hook_exe.clone(),
            state_root,
            layers,
            description: format!("{version}, {cgroups}"),
            io_weight,
            cgroup_v2: cgroups == "cgroup v2",
            unpacking: tokio::sync::Mutex::new(()),
        })
    }

    /// What the host record says about it.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The runtime's name of instance `id`'s container.
    fn container_id(id: &InstanceId) -> String {
        format!("sv-{}", id.0.simple())
    }

    /// The image's root file system unpacked with shifted owners: the
    /// overlay's read-only lower layer, shared by the image's containers.
    async fn lower(&self, rootfs: &Path, sha256: &str) -> Result<PathBuf, String> {
        let dir = self.layers.join(sha256);
        if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            return Ok(dir);
        }
        let _one_at_a_time = self.unpacking.lock().await;
        if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            return Ok(dir);
        }
        let stage = self.layers.join(format!(".stage-{sha256}"));
        let _ = tokio::fs::remove_dir_all(&stage).await;
        let (src, dst) = (rootfs.to_path_buf(), stage.clone());
        let unpacked =
            tokio::task::spawn_blocking(move || skyvisor_image::unpack_rootfs(&src, &dst, ID_BASE))
                .await
                .map_err(|e| format!("unpacking the image: {e}"))?;
        if let Err(e) = unpacked {
            let _ = tokio::fs::remove_dir_all(&stage).await;
            return Err(format!("unpacking the image's root file system: {e}"));
        }
        tokio::fs::rename(&stage, &dir)
            .await
            .map_err(|e| format!("renaming {} into place: {e}", stage.display()))?;
        info!(image = %sha256, "unpacked a container image");
        Ok(dir)
    }

    /// Starts instance `spec`'s container from the root file system
    /// `rootfs` (its SHA-256 `sha256`) with environment `env`, its network
    /// device's host end `veth` already on its bridge. Undoes what it did
    /// on failure (the caller removes the veth).
    pub(crate) async fn launch(
        &self,
        spec: &InstanceSpec,
        dir: &Path,
        image: ImageRoot<'_>,
        veth_peer: &str,
        mtu: u32,
        process: Process,
    ) -> Result<ContainerVm, String> {
        let lower = self.lower(image.rootfs, image.sha256).await?;
        let merged = dir.join(ROOTFS_DIR);
        mount_root(&lower, dir, &merged).await?;
        let cid = Self::container_id(&spec.id);
        // A container of an earlier start that was never deleted (the
        // host went down with it) would make the name taken.
        self.runtime_cmd(&["delete", "--force", &cid]).await.ok();
        let n = &spec.network;
        let resolv_conf = match &process.resolv_conf {
            Some(text) => {
                let path = dir.join("resolv.conf");
                tokio::fs::write(&path, text)
                    .await
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let config = skyvisor_container::ContainerConfig {
            rootfs: merged.clone(),
            hostname: spec.guest_hostname(),
            args: process.args,
            env: process.env,
            cwd: process.cwd,
            resolv_conf,
            host_id_base: ID_BASE,
            limits: self.limits(spec.resources),
            cgroup: format!("skyvisor/{cid}"),
            network_hook: Some(skyvisor_container::Hook {
                path: self.hook_exe.clone(),
                args: vec![
                    "skyvisor".into(),
                    "container-net-hook".into(),
                    veth_peer.into(),
                    n.mac.to_string(),
                    format!("{}/{}", n.ip, n.prefix_len),
                    n.gateway.to_string(),
                    mtu.to_string(),
                ],
                timeout_secs: 20,
            }),
        };
        let bundle = dir.join(BUNDLE_DIR);
        let written = async {
            tokio::fs::create_dir_all(&bundle)
                .await
                .map_err(|e| format!("creating {}: {e}", bundle.display()))?;
            let (b, c) = (bundle.clone(), config);
            tokio::task::spawn_blocking(move || skyvisor_container::write_bundle(&b, &c))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = written {
            unmount_root(&merged).await;
            return Err(format!("writing the container's configuration: {e}"));
        }
        let pidfile = dir.join(PIDFILE);
        let _ = tokio::fs::remove_file(&pidfile).await;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(skyvisor_qemu::files::SERIAL_LOG))
            .map_err(|e| format!("opening the console log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("opening the console log: {e}"))?;
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root")
            .arg(&self.state_root)
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg("--pid-file")
            .arg(&pidfile)
            .arg(&cid)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: it outlives the agent, as QEMU does.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                unmount_root(&merged).await;
                return Err(format!("starting {}: {e}", self.runtime.display()));
            }
        };
        let deadline = tokio::time::Instant::now() + CREATE_TIMEOUT;
        let pid = loop {
            if let Ok(text) = tokio::fs::read_to_string(&pidfile).await
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                break pid;
            }
            if let Ok(Some(status)) = child.try_wait() {
                unmount_root(&merged).await;
                let tail = log_tail(dir).await;
                return Err(format!("the container runtime failed ({status}): {tail}"));
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.start_kill();
                unmount_root(&merged).await;
                return Err(format!(
                    "the container runtime did not start the container within {}s",
                    CREATE_TIMEOUT.as_secs()
                ));
            }
            // The poll interval of a readiness check (the runtime writes
            // the pidfile once the container exists).
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        info!(instance = %spec.name, pid, container = %cid, "container started");
        Ok(ContainerVm::watch(
            self.handle(cid, pid, merged),
            Watched::Child(child),
        ))
    }

    /// Finds instance `id`'s container left running by an earlier agent.
    pub(crate) async fn attach(&self, id: &InstanceId, dir: &Path) -> Option<ContainerVm> {
        let cid = Self::container_id(id);
        let state = self.runtime_cmd(&["state", &cid]).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&state).ok()?;
        if v["status"] != "running" {
            // Exited, or never started: clean it up; the supervisor starts
            // it again if it should run.
            self.runtime_cmd(&["delete", "--force", &cid]).await.ok();
            unmount_root(&dir.join(ROOTFS_DIR)).await;
            return None;
        }
        let pid = i32::try_from(v["pid"].as_i64()?).ok()?;
        let fd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid)?,
            rustix::process::PidfdFlags::empty(),
        )
        .ok()?;
        info!(container = %cid, pid, "re-attached to a running container");
        Some(ContainerVm::watch(
            self.handle(cid, pid, dir.join(ROOTFS_DIR)),
            Watched::Pidfd(fd),
        ))
    }

    /// Removes what is left of instance `id`'s container (its runtime
    /// state and root mount), whether it ran or not.
    pub(crate) async fn forget(&self, id: &InstanceId, dir: &Path) {
        let cid = Self::container_id(id);
        self.runtime_cmd(&["delete", "--force", &cid]).await.ok();
        unmount_root(&dir.join(ROOTFS_DIR)).await;
    }

    /// Runs `req` in instance `id`'s running container, as its root, with
    /// the container's environment; gives what it did.
    pub async fn exec(
        &self,
        id: &InstanceId,
        req: &skyvisor_core::api::ExecRequest,
    ) -> Result<skyvisor_core::api::ExecResult, ExecError> {
        let timeout = req
            .validate()
            .map_err(|e| ExecError::Invalid(e.to_string()))?;
        let cid = Self::container_id(id);
        let state = self
            .runtime_cmd(&["state", &cid])
            .await
            .map_err(|_| ExecError::NotRunning)?;
        if !state.contains("\"running\"") {
            return Err(ExecError::NotRunning);
        }
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root")
            .arg(&self.state_root)
            .arg("exec")
            .arg(&cid)
            .args(&req.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| ExecError::Failed(format!("starting {}: {e}", self.runtime.display())))?;
        let stdin = req.stdin.clone().unwrap_or_default();
        let mut input = child.stdin.take();
        let feed = async move {
            if let Some(w) = input.as_mut() {
                let _ = tokio::io::AsyncWriteExt::write_all(w, stdin.as_bytes()).await;
            }
            // Closed: the command sees the end of its input.
            drop(input);
        };
        let out = read_capped(child.stdout.take());
        let err = read_capped(child.stderr.take());
        let waited = tokio::time::timeout(Duration::from_secs(u64::from(timeout)), async {
            let ((), o, e, status) = tokio::join!(feed, out, err, child.wait());
            (o, e, status)
        })
        .await;
        match waited {
            Ok(((stdout, t1), (stderr, t2), status)) => {
                let code = status.ok().and_then(|s| s.code()).unwrap_or(-1);
                Ok(skyvisor_core::api::ExecResult {
                    exit_code: code,
                    stdout,
                    stderr,
                    timed_out: false,
                    truncated: t1 || t2,
                })
            }
            Err(_) => {
                // The runtime's exec and what it started, as one group.
                if let Some(pid) = child.id() {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait().await;
                Ok(skyvisor_core::api::ExecResult {
                    exit_code: 137,
                    timed_out: true,
                    ..Default::default()
                })
            }
        }
    }

    /// Checks that `req` can run with a terminal in instance `id`'s
    /// container: valid and the container running.
    pub async fn check_tty(
        &self,
        id: &InstanceId,
        req: &skyvisor_core::api::ExecRequest,
    ) -> Result<(), ExecError> {
        req.validate()
            .map_err(|e| ExecError::Invalid(e.to_string()))?;
        if req.stdin.is_some() {
            return Err(ExecError::Invalid(
                "stdin: a terminal session reads its input from the terminal".into(),
            ));
        }
        let state = self
            .runtime_cmd(&["state", &Self::container_id(id)])
            .await
            .map_err(|_| ExecError::NotRunning)?;
        if !state.contains("\"running\"") {
            return Err(ExecError::NotRunning);
        }
        Ok(())
    }

    /// Runs `req` in instance `id`'s container on a terminal, relaying it
    /// over `stream` as [`skyvisor_core::exec_stream`] frames until the
    /// command ends (then its exit status) or the stream closes (then the
    /// command is killed).
    pub async fn tty_session<S>(
        &self,
        id: &InstanceId,
        req: &skyvisor_core::api::ExecRequest,
        stream: S,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        use skyvisor_core::exec_stream::{Decoder, Frame};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut from_client, mut to_client) = tokio::io::split(stream);
        let fail = |e: String| Frame::Data(format!("skyvisor: {e}\r\n").into_bytes());
        let pty = match nix::pty::openpty(None, None) {
            Ok(p) => p,
            Err(e) => {
                let _ = to_client
                    .write_all(&fail(format!("no terminal: {e}")).encode())
                    .await;
                let _ = to_client.write_all(&Frame::Exit(-1).encode()).await;
                return;
            }
        };
        let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
        let (Ok(i), Ok(o), Ok(e)) = (stdio(&pty.slave), stdio(&pty.slave), stdio(&pty.slave))
        else {
            let _ = to_client.write_all(&Frame::Exit(-1).encode()).await;
            return;
        };
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root")
            .arg(&self.state_root)
            .arg("exec")
            .arg("--tty")
            .arg(Self::container_id(id))
            .args(&req.command)
            .stdin(i)
            .stdout(o)
            .stderr(e)
            .kill_on_drop(true);
        // The terminal is the runtime's controlling terminal, in a session
        // of its own.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = to_client
                    .write_all(&fail(format!("starting the runtime: {e}")).encode())
                    .await;
                let _ = to_client.write_all(&Frame::Exit(-1).encode()).await;
                return;
            }
        };
        // Only the command may hold the terminal's other end (the command
        // builder keeps copies until dropped): its end is the master's EOF.
        drop(cmd);
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        let Ok(master_in) = master.try_clone() else {
            let _ = child.start_kill();
            return;
        };
        let mut master_out = tokio::fs::File::from_std(master);
        let mut master_in = tokio::fs::File::from_std(master_in);
        // Keystrokes to the terminal.
        let input = tokio::spawn(async move {
            let mut decoder = Decoder::default();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(Frame::Data(d))) => {
                            if master_in.write_all(&d).await.is_err() {
                                return true;
                            }
                            let _ = master_in.flush().await;
                        }
                        Ok(Some(Frame::Exit(_))) | Ok(None) => break,
                        Err(_) => return false,
                    }
                }
            }
        });
        // Its output to the client, until the terminal closes (EIO once
        // the command and the runtime are gone).
        let mut buf = vec![0u8; 16 * 1024];
        let mut client_gone = false;
        loop {
            tokio::select! {
                read = master_out.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_client.write_all(&Frame::Data(buf[..n].to_vec()).encode()).await.is_err() {
                            client_gone = true;
                            break;
                        }
                    }
                },
                // The client hung up: the command goes with the session.
                _ = async { while !input.is_finished() { tokio::time::sleep(Duration::from_millis(50)).await; } } => {
                    if !matches!(child.try_wait(), Ok(Some(_))) {
                        client_gone = true;
                        break;
                    }
                }
            }
        }
        input.abort();
        if client_gone {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return;
        }
        let code = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
        let _ = to_client.write_all(&Frame::Exit(code).encode()).await;
        let _ = to_client.shutdown().await;
    }

    fn handle(&self, cid: String, pid: i32, merged: PathBuf) -> Arc<Handle> {
        let oom_counter = if self.cgroup_v2 {
            PathBuf::from(format!("/sys/fs/cgroup/skyvisor/{cid}/memory.events"))
        } else {
            PathBuf::from(format!(
                "/sys/fs/cgroup/memory/skyvisor/{cid}/memory.oom_control"
            ))
        };
        Arc::new(Handle {
            oom_counter,
            cgroup_v2: self.cgroup_v2,
            runtime: self.runtime.clone(),
            state_root: self.state_root.clone(),
            cid,
            pid,
            merged,
            io_weight: self.io_weight,
            term_sent: AtomicBool::new(false),
        })
    }

    fn limits(&self, r: Resources) -> skyvisor_container::Limits {
        limits(r, self.io_weight)
    }

    async fn runtime_cmd(&self, args: &[&str]) -> Result<String, String> {
        runtime_cmd(&self.runtime, &self.state_root, args).await
    }
}

fn limits(r: Resources, io_weight: bool) -> skyvisor_container::Limits {
    skyvisor_container::Limits {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        pids: PIDS_LIMIT,
        io_weight: io_weight.then_some(100),
    }
}

async fn runtime_cmd(runtime: &Path, state_root: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(runtime)
        .arg("--root")
        .arg(state_root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running {}: {e}", runtime.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {}: {}",
            runtime.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why an exec did not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The container is not running here.
    #[error("the container is not running")]
    NotRunning,
    /// The runtime failed.
    #[error("{0}")]
    Failed(String),
}

/// Reads a stream to its end, keeping the first
/// [`skyvisor_core::api::EXEC_MAX_IO_BYTES`]; says whether it cut.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let Some(mut r) = r else {
        return (String::new(), false);
    };
    let max = skyvisor_core::api::EXEC_MAX_IO_BYTES;
    let mut kept = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut cut = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                if n > room {
                    cut = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), cut)
}

/// The last lines of the container's console log (the runtime's errors
/// go there too).
async fn log_tail(dir: &Path) -> String {
    let text = tokio::fs::read_to_string(dir.join(skyvisor_qemu::files::SERIAL_LOG))
        .await
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Mounts the overlay of `lower` and the container's writable layer (in
/// `dir`, made on the first start and kept) on `merged`.
async fn mount_root(lower: &Path, dir: &Path, merged: &Path) -> Result<(), String> {
    let upper = dir.join(UPPER_DIR);
    let work = dir.join(WORK_DIR);
    for d in [&upper, &work, &merged.to_path_buf()] {
        tokio::fs::create_dir_all(d)
            .await
            .map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    // The overlay's root takes the upper layer's owner: the container's root.
    let _ = nix::unistd::chown(
        &upper,
        Some(nix::unistd::Uid::from_raw(ID_BASE)),
        Some(nix::unistd::Gid::from_raw(ID_BASE)),
    );
    // A mount an earlier agent left (the container is not running).
    unmount_root(merged).await;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let target = merged.to_path_buf();
    tokio::task::spawn_blocking(move || {
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("mounting the container's root on {}: {e}", merged.display()))
}

async fn unmount_root(merged: &Path) {
    let target = merged.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH)
    })
    .await;
}

/// Makes the cgroup hierarchy one crun uses; gives its name and whether it
/// has an I/O weight.
fn prepare_cgroups() -> Result<(&'static str, bool), String> {
    const CGROUP2_MAGIC: i64 = 0x6367_7270;
    let root = Path::new("/sys/fs/cgroup");
    mount_cgroups_if_missing(root)?;
    let st =
        nix::sys::statfs::statfs(root).map_err(|e| format!("statfs {}: {e}", root.display()))?;
    #[allow(clippy::unnecessary_cast)]
    if st.filesystem_type().0 as i64 == CGROUP2_MAGIC {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        for need in ["cpu", "memory", "pids"] {
            if !controllers.split_whitespace().any(|c| c == need) {
                return Err(format!("the cgroup v2 hierarchy has no {need} controller"));
            }
        }
        return Ok((
            "cgroup v2",
            controllers.split_whitespace().any(|c| c == "io"),
        ));
    }
    // cgroup v1. Controllers bound to the v2 hierarchy beside it (a hybrid
    // host) make crun refuse to run: give each a v1 hierarchy of its own.
    let unified = root.join("unified/cgroup.controllers");
    let on_v2 = std::fs::read_to_string(&unified).unwrap_or_default();
    for c in on_v2.split_whitespace() {
        let dir = root.join(c);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(format!("creating {}: {e}", dir.display()));
        }
        nix::mount::mount(
            Some("cgroup"),
            &dir,
            Some("cgroup"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some(c),
        )
        .map_err(|e| {
            format!(
                "mounting the {c} cgroup controller on {}: {e}",
                dir.display()
            )
        })?;
        info!(
            controller = c,
            "moved a cgroup controller from the v2 hierarchy to a v1 one of its own (crun runs no containers on a hybrid hierarchy)"
        );
    }
    let left = std::fs::read_to_string(&unified).unwrap_or_default();
    if !left.trim().is_empty() {
        return Err(format!(
            "cgroup controllers {} stay on the v2 hierarchy of a v1 host (hybrid mode), which crun cannot use",
            left.trim()
        ));
    }
    // Each a hierarchy of its own (the root cgroup has no limit files).
    for (ctl, file) in [
        ("memory", "memory.limit_in_bytes"),
        ("pids", "cgroup.procs"),
        ("cpu", "cpu.cfs_quota_us"),
    ] {
        if !root.join(ctl).join(file).exists() {
            return Err(format!(
                "the cgroup v1 {ctl} controller is not mounted at {}",
                root.join(ctl).display()
            ));
        }
    }
    Ok(("cgroup v1", root.join("blkio/blkio.weight").exists()))
}

/// Mounts the host's cgroup hierarchies on `root` when this mount
/// namespace has none there (an agent started by `ip netns exec`, which
/// mounts a fresh sysfs): the hierarchies this process belongs to, as
/// `/proc/self/cgroup` lists them (v1 controllers each on their own, or
/// the v2 hierarchy alone).
fn mount_cgroups_if_missing(root: &Path) -> Result<(), String> {
    let empty = std::fs::read_dir(root).map_or(true, |mut d| d.next().is_none());
    if !empty {
        return Ok(());
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let v1: Vec<&str> = own
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .filter(|c| !c.is_empty())
        .collect();
    let flags = nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC;
    let mount = |what: &str, dir: &Path, fstype: &str, data: Option<&str>| {
        nix::mount::mount(Some(what), dir, Some(fstype), flags, data).map_err(|e| {
            format!(
                "mounting {fstype} {} on {}: {e}",
                data.unwrap_or(""),
                dir.display()
            )
        })
    };
    if v1.is_empty() {
        mount("cgroup2", root, "cgroup2", None)?;
        info!("mounted the cgroup v2 hierarchy (this mount namespace had none)");
        return Ok(());
    }
    mount("tmpfs", root, "tmpfs", Some("mode=755"))?;
    for controllers in v1 {
        let (dir, options) = match controllers.strip_prefix("name=") {
            Some(name) => (name.to_string(), format!("none,name={name}")),
            None => (controllers.to_string(), controllers.to_string()),
        };
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        mount("cgroup", &dir, "cgroup", Some(&options))?;
    }
    info!("mounted the host's cgroup v1 hierarchies (this mount namespace had none)");
    Ok(())
}

/// What a running container is known by.
struct Handle {
    runtime: PathBuf,
    state_root: PathBuf,
    cid: String,
    pid: i32,
    merged: PathBuf,
    io_weight: bool,
    /// The agent asked it to stop: its exit is a shutdown, not a failure.
    term_sent: AtomicBool,
    /// The cgroup file counting its out-of-memory kills.
    oom_counter: PathBuf,
    /// The host's cgroups are v2.
    cgroup_v2: bool,
}

/// The out-of-memory kills a cgroup's file counts (`oom_kill N`, in v1's
/// `memory.oom_control` and v2's `memory.events`).
async fn read_oom_kills(file: &Path) -> Option<u64> {
    let text = tokio::fs::read_to_string(file).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// How the container's end is learnt.
enum Watched {
    /// The runtime's monitor process, this agent's child: gives the status.
    Child(Child),
    /// The container's init, left by an earlier agent: only that it ended.
    Pidfd(OwnedFd),
}

/// How a container ended, as the watcher saw it.
#[derive(Debug, Clone)]
struct Ended {
    /// The exit status, when known.
    code: Option<i32>,
}

/// A running container, as the supervisor drives it.
pub(crate) struct ContainerVm {
    handle: Arc<Handle>,
    ended: watch::Receiver<Option<Ended>>,
    /// Out-of-memory kills in its cgroup, as counted so far.
    oom: tokio::sync::mpsc::UnboundedReceiver<u64>,
    /// The shutdown event was given; next comes the exit.
    shutdown_given: bool,
}

/// How often a container's out-of-memory kill count is read.
const OOM_POLL: Duration = Duration::from_secs(1);

impl ContainerVm {
    fn watch(handle: Arc<Handle>, watched: Watched) -> Self {
        let (tx, rx) = watch::channel(None);
        let (oom_tx, oom) = tokio::sync::mpsc::unbounded_channel();
        let counter = handle.oom_counter.clone();
        let mut alive = rx.clone();
        tokio::spawn(async move {
            let mut seen = read_oom_kills(&counter).await.unwrap_or(0);
            loop {
                tokio::select! {
                    _ = alive.changed() => return,
                    () = tokio::time::sleep(OOM_POLL) => {}
                }
                if let Some(n) = read_oom_kills(&counter).await
                    && n > seen
                {
                    seen = n;
                    if oom_tx.send(n).is_err() {
                        return;
                    }
                }
            }
        });
        let h = handle.clone();
        tokio::spawn(async move {
            let code = match watched {
                Watched::Child(mut child) => child.wait().await.ok().and_then(|s| s.code()),
                Watched::Pidfd(fd) => {
                    // A pidfd turns readable when its process ends: one
                    // blocking wait per container an earlier agent left.
                    let _ = tokio::task::spawn_blocking(move || {
                        use std::os::fd::AsFd;
                        let mut fds = [nix::poll::PollFd::new(
                            fd.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        while let Err(nix::errno::Errno::EINTR) =
                            nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE)
                        {
                        }
                    })
                    .await;
                    None
                }
            };
            // Its runtime state and root mount go with it; the writable
            // layer stays for the next start.
            let _ = runtime_cmd(&h.runtime, &h.state_root, &["delete", "--force", &h.cid]).await;
            unmount_root(&h.merged).await;
            let _ = tx.send(Some(Ended { code }));
        });
        Self {
            handle,
            ended: rx,
            oom,
            shutdown_given: false,
        }
    }

    async fn kill_with(&self, signal: &str) -> Result<(), HvError> {
        runtime_cmd(
            &self.handle.runtime,
            &self.handle.state_root,
            &["kill", &self.handle.cid, signal],
        )
        .await
        .map(drop)
        .map_err(HvError::Control)
    }
}

fn unsupported(op: &'static str) -> HvError {
    HvError::Unsupported {
        op,
        kind: "containers",
    }
}

/// A container's counters, from its cgroup.
struct ContainerCounters {
    /// Its CPU time file (v1 `cpuacct.usage`, nanoseconds; v2 `cpu.stat`).
    cpu: PathBuf,
    /// Its memory statistics (`memory.stat`).
    memory: PathBuf,
    v2: bool,
}

#[async_trait]
impl crate::hypervisor::VmCounters for ContainerCounters {
    async fn disks(&self) -> Result<Vec<(String, crate::hypervisor::DiskCounters)>, HvError> {
        Ok(vec![])
    }

    async fn vcpu_threads(&self) -> Result<Vec<u32>, HvError> {
        Ok(vec![])
    }

    async fn cpu_seconds(&self) -> Option<f64> {
        let text = tokio::fs::read_to_string(&self.cpu).await.ok()?;
        if self.v2 {
            let us: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            Some(us as f64 / 1e6)
        } else {
            let ns: u64 = text.trim().parse().ok()?;
            Some(ns as f64 / 1e9)
        }
    }

    async fn memory_bytes(&self) -> Option<u64> {
        // Its resident memory: anonymous plus mapped files.
        let text = tokio::fs::read_to_string(&self.memory).await.ok()?;
        let keys: [&str; 2] = if self.v2 {
            ["anon ", "file_mapped "]
        } else {
            ["total_rss ", "total_mapped_file "]
        };
        let value = |key: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(key))?
                .trim()
                .parse()
                .ok()
        };
        Some(value(keys[0])? + value(keys[1]).unwrap_or(0))
    }
}

#[async_trait]
impl Vm for ContainerVm {
    fn pid(&self) -> Option<u32> {
        u32::try_from(self.handle.pid).ok()
    }

    fn counters(&self) -> Option<Arc<dyn crate::hypervisor::VmCounters>> {
        let cid = &self.handle.cid;
        let (cpu, memory) = if self.handle.cgroup_v2 {
            let dir = format!("/sys/fs/cgroup/skyvisor/{cid}");
            (format!("{dir}/cpu.stat"), format!("{dir}/memory.stat"))
        } else {
            (
                format!("/sys/fs/cgroup/cpuacct/skyvisor/{cid}/cpuacct.usage"),
                format!("/sys/fs/cgroup/memory/skyvisor/{cid}/memory.stat"),
            )
        };
        Some(Arc::new(ContainerCounters {
            cpu: PathBuf::from(cpu),
            memory: PathBuf::from(memory),
            v2: self.handle.cgroup_v2,
        }))
    }

    async fn next_event(&mut self) -> VmEvent {
        let ended = loop {
            if let Some(e) = self.ended.borrow_and_update().clone() {
                break e;
            }
            tokio::select! {
                changed = self.ended.changed() => {
                    if changed.is_err() {
                        break Ended { code: None };
                    }
                }
                Some(kills) = self.oom.recv() => return VmEvent::OutOfMemory { kills },
            }
        };
        let asked = self.handle.term_sent.load(Ordering::SeqCst);
        // Its init ended by itself with success, or as asked: the guest's
        // own shutdown, which the supervisor sees first, as for a VM.
        if !self.shutdown_given && (asked || ended.code == Some(0)) {
            self.shutdown_given = true;
            return VmEvent::GuestShutdown;
        }
        let (reason, detail) = match ended.code {
            Some(0) => (ExitReason::GuestShutdown, "its init exited".to_string()),
            _ if asked => (ExitReason::Requested, "stopped".to_string()),
            // crun gives 128 + N for a container killed by signal N.
            Some(c) if c > 128 => (ExitReason::Killed, format!("killed by signal {}", c - 128)),
            Some(c) => (
                ExitReason::Crashed,
                format!("its init exited with status {c}"),
            ),
            None => (
                ExitReason::Vanished,
                "its init ended while an earlier agent watched it".to_string(),
            ),
        };
        VmEvent::Exited(VmExit { reason, detail })
    }

    async fn powerdown(&self) -> Result<(), HvError> {
        self.handle.term_sent.store(true, Ordering::SeqCst);
        self.kill_with("TERM").await
    }

    async fn resize_live(&self, resources: Resources) -> Result<bool, HvError> {
        let json = skyvisor_container::resources_json(&limits(resources, self.handle.io_weight))
            .map_err(|e| HvError::Control(e.to_string()))?;
        let file = tempfile::NamedTempFile::new()
            .map_err(|e| HvError::Control(format!("writing the new limits: {e}")))?;
        std::fs::write(file.path(), json)
            .map_err(|e| HvError::Control(format!("writing the new limits: {e}")))?;
        let path = file.path().to_string_lossy().into_owned();
        runtime_cmd(
            &self.handle.runtime,
            &self.handle.state_root,
            &["update", "--resources", &path, &self.handle.cid],
        )
        .await
        .map_err(HvError::Control)?;
        Ok(true)
    }

    async fn reset_and_resume(&self) -> Result<(), HvError> {
        Err(unsupported("reset"))
    }

    async fn quit(&self) -> Result<(), HvError> {
        self.handle.term_sent.store(true, Ordering::SeqCst);
        self.kill_with("KILL").await
    }

    fn kill(&self) {
        self.handle.term_sent.store(true, Ordering::SeqCst);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.handle.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    async fn checkpoint(
        &self,
        _plan: &CheckpointPlan,
        _progress: &mut (dyn FnMut(SnapshotProgress) + Send),
    ) -> Result<CheckpointOutcome, HvError> {
        Err(unsupported("a checkpoint"))
    }

    async fn recover_checkpoint(&self) -> Result<(), HvError> {
        Ok(())
    }

    async fn set_link(&self, _up: bool) -> Result<(), HvError> {
        Err(unsupported("unplugging the network"))
    }

    async fn guest_request(&self, _line: &str) -> Result<String, HvError> {
        Err(unsupported("the guest channel"))
    }

    async fn attach_disk(&self, _disk: &LaunchVolume) -> Result<(), HvError> {
        Err(unsupported("attaching a volume"))
    }

    async fn detach_disk(&self, _disk_id: &str, _timeout: Duration) -> Result<(), HvError> {
        Err(unsupported("detaching a volume"))
    }

    async fn migrate_out(
        &self,
        _plan: &OutgoingPlan,
        control: &mut dyn OutgoingControl,
    ) -> Result<OutgoingOutcome, HvError> {
        let _ = control
            .progress(MigrationPhase::Preparing, &MigrationProgress::default())
            .await;
        Err(unsupported("live migration"))
    }

    async fn resume_after_migration(&self) -> Result<(), HvError> {
        Ok(())
    }

    async fn prepare_incoming(&self, _plan: &IncomingPlan) -> Result<(), HvError> {
        Err(unsupported("live migration"))
    }

    async fn finish_incoming(&self, _timeout: Duration) -> Result<(), HvError> {
        Err(unsupported("live migration"))
    }
}

/// The runtime's `createRuntime` hook (`skyvisor container-net-hook PEER
/// MAC ADDRESS/PREFIX GATEWAY MTU`, the container's state on stdin): moves
/// the container's end of its veth pair into its network namespace and
/// sets it up there as `eth0`. Runs as the host's root, in the host's
/// namespaces, before the container's process starts.
pub fn run_net_hook(args: &[String], state: &str) -> Result<(), String> {
    let [peer, mac, address, gateway, mtu] = args else {
        return Err(format!(
            "usage: container-net-hook PEER MAC ADDRESS/PREFIX GATEWAY MTU (got {} arguments)",
            args.len()
        ));
    };
    let v: serde_json::Value =
        serde_json::from_str(state).map_err(|e| format!("the runtime's state is not JSON: {e}"))?;
    let pid = v["pid"]
        .as_i64()
        .filter(|p| *p > 0)
        .ok_or("the runtime's state has no pid")?
        .to_string();
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("running ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    ip(&["link", "set", peer, "netns", &pid])?;
    // In the container's namespace, from here: `nsenter` enters it for
    // each command.
    let inside = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("nsenter")
            .args(["--target", &pid, "--net", "ip"])
            .args(args)
            .output()
            .map_err(|e| format!("running nsenter: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {} in the container: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    inside(&["link", "set", peer, "name", "eth0"])?;
    inside(&["link", "set", "eth0", "address", mac, "mtu", mtu])?;
    inside(&["addr", "add", address, "dev", "eth0"])?;
    inside(&["link", "set", "eth0", "up"])?;
    inside(&["link", "set", "lo", "up"])?;
    inside(&["route", "add", "default", "via", gateway, "dev", "eth0"])?;
    Ok(())
}

/// Makes the host's end of a container's veth pair on `bridge` (replacing
/// one left by an earlier start) and gives the container's end's name.
pub(crate) async fn make_veth(host_end: &str, bridge: &str, mtu: u32) -> Result<String, String> {
    let peer = format!("svp{}", host_end.trim_start_matches("svt"));
    let ip = |args: Vec<String>| async move {
        let out = Command::new("ip")
            .args(&args)
            .output()
            .await
            .map_err(|e| format!("running ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    // An earlier pair goes with its container's namespace, asynchronously:
    // remove what is left of it first.
    let _ = ip(vec!["link".into(), "del".into(), host_end.into()]).await;
    let _ = ip(vec!["link".into(), "del".into(), peer.clone()]).await;
    let mtu = mtu.to_string();
    ip([
        "link", "add", host_end, "mtu", &mtu, "type", "veth", "peer", "name", &peer, "mtu", &mtu,
    ]
    .map(String::from)
    .to_vec())
    .await?;
    let attached = ip(["link", "set", host_end, "master", bridge, "up"]
        .map(String::from)
        .to_vec())
    .await;
    if let Err(e) = attached {
        let _ = ip(vec!["link".into(), "del".into(), host_end.into()]).await;
        return Err(e);
    }
    Ok(peer)
}

/// Whether a process `pid` is the init of instance `id`'s container (its
/// cgroup names the container): what fencing may kill.
pub fn is_container_init(pid: i32, id_simple: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.contains(&format!("sv-{id_simple}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_refuses_what_it_cannot_use() {
        let e = run_net_hook(&["a".into()], "{}").expect_err("usage");
        assert!(e.contains("usage"), "{e}");
        let args: Vec<String> = [
            "svp1",
            "02:00:00:00:00:01",
            "10.0.0.2/24",
            "10.0.0.1",
            "1450",
        ]
        .map(String::from)
        .to_vec();
        assert!(
            run_net_hook(&args, "not json")
                .expect_err("json")
                .contains("not JSON")
        );
        assert!(
            run_net_hook(&args, r#"{"pid":0}"#)
                .expect_err("pid")
                .contains("no pid")
        );
    }

    #[tokio::test]
    async fn a_host_without_the_runtime_says_so() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = ContainerSettings {
            runtime: PathBuf::from("/nonexistent/crun"),
            hook_exe: PathBuf::from("/nonexistent/skyvisor"),
        };
        let why = ContainerDriver::probe(&settings, dir.path())
            .await
            .err()
            .expect("no runtime, no containers");
        assert!(
            why.contains("/nonexistent/crun") && why.contains("apt-get install crun"),
            "{why}"
        );
    }

    #[test]
    fn limits_follow_the_type() {
        let l = limits(
            Resources {
                vcpus: 2,
                memory_mib: 256,
                disk_gib: 1,
            },
            false,
        );
        assert_eq!((l.vcpus, l.memory_mib, l.io_weight), (2, 256, None));
        assert_eq!(
            limits(
                Resources {
                    vcpus: 1,
                    memory_mib: 64,
                    disk_gib: 1
                },
                true
            )
            .io_weight,
            Some(100)
        );
    }
}
