//! The host's cgroups as containers need them, and what a container's
//! cgroup counts (CPU time, memory, out-of-memory kills).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tracing::info;

use crate::hypervisor::{DiskCounters, HvError, VmCounters};

/// Makes the cgroup hierarchy one crun uses; gives its name and whether it
/// has an I/O weight.
pub(super) fn prepare_cgroups() -> Result<(&'static str, bool), String> {
    const CGROUP2_MAGIC: i64 = 0x6367_7270;
    let root = Path::new("/sys/fs/cgroup");
    mount_cgroups_if_missing(root)?;
    let st =
        nix::sys::statfs::statfs(root).map_err(|e| format!("statfs {}: {e}", root.display()))?;
    // f_type's integer type differs between architectures.
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

/// The out-of-memory kills a cgroup's file counts (`oom_kill N`, in v1's
/// `memory.oom_control` and v2's `memory.events`).
pub(super) async fn read_oom_kills(file: &Path) -> Option<u64> {
    let text = tokio::fs::read_to_string(file).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// A container's counters, from its cgroup.
pub(super) struct ContainerCounters {
    /// Its CPU time file (v1 `cpuacct.usage`, nanoseconds; v2 `cpu.stat`).
    pub(super) cpu: PathBuf,
    /// Its memory statistics (`memory.stat`).
    pub(super) memory: PathBuf,
    pub(super) v2: bool,
}

#[async_trait]
impl VmCounters for ContainerCounters {
    async fn disks(&self) -> Result<Vec<(String, DiskCounters)>, HvError> {
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
