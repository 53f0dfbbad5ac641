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
    /// The first host id of the range its user namespace maps to; root
    /// inside is this id outside.
    pub host_id_base: u32,
    /// Its limits.
    pub limits: Limits,
    /// Its cgroup, relative to the runtime's root (`skyvisor/ID`).
    pub cgroup: String,
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
        .cwd("/")
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
    spec.set_mounts(Some(get_default_mounts()));
    spec.set_linux(Some(linux));
    Ok(spec)
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
