//! Containers, a lighter instance kind: what an OCI runtime (Debian's
//! `crun`) is told to run for a container instance, written through the
//! `oci-spec` crate.
//!
//! A container gets its own pid, mount, network, UTS, IPC, cgroup and
//! **user** namespaces: root inside is an unprivileged range of ids on the
//! host. Its type becomes cgroup limits (vCPUs as a CPU quota, memory with
//! no swap beyond it, a pids limit, an I/O weight), which a runtime can
//! change live. It runs with no new privileges, a reduced capability set,
//! the kernel's interfaces masked or read-only, and a seccomp filter that
//! refuses the system calls a container has no business making.

pub mod seccomp;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder, get_default_maskedpaths,
    get_default_mounts, get_default_readonly_paths,
};

/// The period of the CPU quota: a vCPU is this much CPU time per period.
pub const CPU_PERIOD_US: u64 = 100_000;
/// How many host ids a container's user namespace maps (container ids 0
/// to 65535).
pub const ID_RANGE: u32 = 65_536;

/// Errors of making a container's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// A limit is out of range.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// Why, and what is allowed.
        reason: String,
    },
    /// oci-spec refused a value.
    #[error("building the OCI runtime configuration: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
}

/// A container's resource limits, from its instance type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// vCPUs, as CPU time: `vcpus` periods of CPU per period.
    pub vcpus: u32,
    /// Memory in MiB; no swap beyond it.
    pub memory_mib: u64,
    /// Processes and threads at most.
    pub pids: u32,
    /// Relative block I/O weight, 10 to 1000 (cgroup v2 `io.weight`);
    /// none where the host's kernel offers no weight (cgroup v1 without
    /// `blkio.weight`, where the runtime would fail on it).
    pub io_weight: Option<u16>,
}

/// What to run, and how it is confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// The root file system (an overlay of the image and the container's
    /// own writable layer), as the runtime sees it.
    pub rootfs: PathBuf,
    /// The container's hostname.
    pub hostname: String,
    /// The command and its arguments.
    pub args: Vec<String>,
    /// Its environment, `NAME=value`.
    pub env: Vec<String>,
    /// Its working directory (`/` if none).
    pub cwd: Option<String>,
    /// A file the host writes, bound read-only on `/etc/resolv.conf` (for
    /// images whose own init does not write it).
    pub resolv_conf: Option<PathBuf>,
    /// The first host id of the range its user namespace maps to; root
    /// inside is this id outside.
    pub host_id_base: u32,
    /// Its limits.
    pub limits: Limits,
    /// Its cgroup, relative to the runtime's root (`skyvisor/ID`).
    pub cgroup: String,
    /// Run in the runtime's namespace once the container's namespaces
    /// exist and before its process starts (OCI `createRuntime`): where
    /// the host moves the container's network device into its network
    /// namespace. Given the container's state (with its pid) on stdin.
    pub network_hook: Option<Hook>,
}

/// A program the runtime runs at a point of the container's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The executable (absolute).
    pub path: PathBuf,
    /// Its arguments, `argv[0]` included.
    pub args: Vec<String>,
    /// How long it may take.
    pub timeout_secs: i64,
}

/// The capabilities a container's processes keep: what a service needs
/// (bind low ports, change owners and ids, chroot, kill its own), and
/// nothing that administers the host (no `SYS_ADMIN`, `SYS_MODULE`,
/// `NET_ADMIN`, `SYS_TIME`, ...). In its user namespace even these reach
/// only what the namespace owns.
pub fn capabilities() -> HashSet<Capability> {
    [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect()
}

impl Limits {
    /// Checks the limits against what a runtime accepts.
    pub fn validate(&self) -> Result<(), ContainerError> {
        let invalid = |what, reason: String| Err(ContainerError::Invalid { what, reason });
        if self.vcpus == 0 {
            return invalid("vcpus", "0; allowed: 1 or more".into());
        }
        if self.memory_mib < 4 {
            return invalid(
                "memory_mib",
                format!("{}; allowed: 4 MiB or more", self.memory_mib),
            );
        }
        if self.pids == 0 {
            return invalid("pids", "0; allowed: 1 or more".into());
        }
        if let Some(w) = self.io_weight
            && !(10..=1000).contains(&w)
        {
            return invalid("io_weight", format!("{w}; allowed: 10 to 1000"));
        }
        Ok(())
    }

    /// The CPU quota per [`CPU_PERIOD_US`], in microseconds.
    pub fn cpu_quota_us(&self) -> i64 {
        i64::from(self.vcpus) * CPU_PERIOD_US as i64
    }

    /// The memory limit in bytes.
    pub fn memory_bytes(&self) -> i64 {
        i64::try_from(self.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX)
    }
}

/// The OCI runtime configuration of `config`.
pub fn runtime_spec(config: &ContainerConfig) -> Result<Spec, ContainerError> {
    config.limits.validate()?;
    if config.args.is_empty() {
        return Err(ContainerError::Invalid {
            what: "args",
            reason: "no command; allowed: a command and its arguments".into(),
        });
    }
    let caps = capabilities();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(config.args.clone())
        .env(config.env.clone())
        .cwd(config.cwd.clone().unwrap_or_else(|| "/".to_string()))
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()?,
        )
        .build()?;
    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::User,
        LinuxNamespaceType::Cgroup,
        // Made by the runtime inside the user namespace, which so owns it:
        // sysfs there shows the container's own devices only. The agent
        // moves the container's veth in between create and start.
        LinuxNamespaceType::Network,
    ] {
        namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
    }
    let ids = vec![
        LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(config.host_id_base)
            .size(ID_RANGE)
            .build()?,
    ];
    let l = &config.limits;
    let mut resources = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .quota(l.cpu_quota_us())
                .period(CPU_PERIOD_US)
                .build()?,
        )
        .memory(
            LinuxMemoryBuilder::default()
                .limit(l.memory_bytes())
                // Memory plus swap: no swap beyond the memory limit.
                .swap(l.memory_bytes())
                .build()?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(l.pids))
                .build()?,
        );
    if let Some(w) = l.io_weight {
        resources = resources.block_io(
            oci_spec::runtime::LinuxBlockIoBuilder::default()
                .weight(w)
                .build()?,
        );
    }
    let resources = resources.build()?;
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .uid_mappings(ids.clone())
        .gid_mappings(ids)
        .resources(resources)
        .cgroups_path(PathBuf::from(format!("/{}", config.cgroup)))
        .masked_paths(get_default_maskedpaths())
        .readonly_paths(get_default_readonly_paths())
        .seccomp(seccomp::profile()?)
        .build()?;
    let mut spec = Spec::default();
    spec.set_hostname(Some(config.hostname.clone()));
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(config.rootfs.clone())
            .readonly(false)
            .build()?,
    ));
    // proc, a private /dev, devpts, shm, mqueue, and sysfs and the cgroup
    // file system read-only: each a new mount of the container's own.
    let mut all = mounts()?;
    if let Some(resolv) = &config.resolv_conf {
        all.push(
            oci_spec::runtime::MountBuilder::default()
                .destination("/etc/resolv.conf")
                .typ("bind")
                .source(resolv.clone())
                .options(vec![
                    "bind".to_string(),
                    "ro".to_string(),
                    "nosuid".to_string(),
                    "nodev".to_string(),
                ])
                .build()?,
        );
    }
    spec.set_mounts(Some(all));
    spec.set_linux(Some(linux));
    if let Some(h) = &config.network_hook {
        let hook = oci_spec::runtime::HookBuilder::default()
            .path(h.path.clone())
            .args(h.args.clone())
            .timeout(h.timeout_secs)
            .build()?;
        spec.set_hooks(Some(
            oci_spec::runtime::HooksBuilder::default()
                .create_runtime(vec![hook])
                .build()?,
        ));
    }
    Ok(spec)
}

/// The runtime's default mounts, plus a private `/run` and `/tmp`: the
/// container cannot mount (no `SYS_ADMIN`), so its init finds them made.
fn mounts() -> Result<Vec<oci_spec::runtime::Mount>, ContainerError> {
    let mut all = get_default_mounts();
    for (dest, mode) in [("/run", "mode=755"), ("/tmp", "mode=1777")] {
        all.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(dest)
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec![
                    "nosuid".to_string(),
                    "nodev".to_string(),
                    mode.to_string(),
                    "size=64m".to_string(),
                ])
                .build()?,
        );
    }
    Ok(all)
}

/// The limits of `limits` as the runtime's `update --resources` file
/// (OCI `LinuxResources`): what a live resize writes.
pub fn resources_json(limits: &Limits) -> Result<String, ContainerError> {
    limits.validate()?;
    let mut v = serde_json::json!({
        "cpu": {"quota": limits.cpu_quota_us(), "period": CPU_PERIOD_US},
        "memory": {"limit": limits.memory_bytes(), "swap": limits.memory_bytes()},
        "pids": {"limit": i64::from(limits.pids)},
    });
    if let Some(w) = limits.io_weight {
        v["blockIO"] = serde_json::json!({"weight": w});
    }
    Ok(v.to_string())
}

/// Writes `config`'s runtime configuration as `config.json` in bundle
/// directory `bundle`.
pub fn write_bundle(bundle: &Path, config: &ContainerConfig) -> Result<PathBuf, ContainerError> {
    let spec = runtime_spec(config)?;
    let path = bundle.join("config.json");
    spec.save(&path)?;
    Ok(path)
}

#[cfg(test)]
mod tests;
