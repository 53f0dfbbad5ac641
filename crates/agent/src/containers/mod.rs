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

mod cgroups;
mod exec;
mod net;
mod running;

pub use exec::ExecError;
pub(crate) use net::make_veth;
pub use net::run_net_hook;
pub(crate) use running::ContainerVm;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use skyvisor_core::{InstanceId, InstanceSpec, Resources};
use tokio::process::Command;
use tracing::info;

use self::cgroups::prepare_cgroups;
use self::running::{Handle, Watched};

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

/// Whether a process `pid` is the init of instance `id`'s container (its
/// cgroup names the container): what fencing may kill.
pub fn is_container_init(pid: i32, id_simple: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.contains(&format!("sv-{id_simple}")))
}

#[cfg(test)]
mod tests {
    use super::*;

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
