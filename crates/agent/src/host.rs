//! What this host has: CPUs, memory, disk, and which accelerator works.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skyvisor_core::{Accel, AccelMode, Resources};
use tracing::info;

/// Physical CPUs, memory (less `reserved_mib`) and the data directory's
/// file-system size.
pub fn physical_resources(data_dir: &Path, reserved_mib: u64) -> Resources {
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
        .saturating_sub(reserved_mib);
    let (total, _) = disk_space(data_dir);
    Resources {
        vcpus,
        memory_mib,
        disk_gib: total >> 30,
    }
}

/// Total and available bytes of the file system holding `path`.
pub fn disk_space(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = s.fragment_size();
            (s.blocks() * frag, s.blocks_available() * frag)
        }
        Err(_) => (0, 0),
    }
}

/// A remembered probe result, so a host probes once, not at every start.
#[derive(Debug, Serialize, Deserialize)]
struct ProbeRecord {
    key: String,
    kvm_boots: bool,
    reason: String,
}

/// Chooses the accelerator: forced by `mode`, or KVM if a probe guest
/// really boots with it (the result is cached in `cache_file`, keyed by
/// QEMU's version and the host kernel), else TCG. Returns it with the reason.
pub async fn choose_accel(
    mode: AccelMode,
    qemu: &Path,
    probe_kernel: Option<(&Path, Option<&Path>)>,
    cache_file: &Path,
) -> (Accel, String) {
    match mode {
        AccelMode::Kvm => return (Accel::Kvm, "forced by configuration (--accel kvm)".into()),
        AccelMode::Tcg => return (Accel::Tcg, "forced by configuration (--accel tcg)".into()),
        AccelMode::Auto => {}
    }
    if !skyvisor_qemu::kvm_device_usable() {
        return (
            Accel::Tcg,
            "/dev/kvm is missing or not usable; using TCG".into(),
        );
    }
    let Some((kernel, initrd)) = probe_kernel else {
        return (
            Accel::Tcg,
            "no probe image to test KVM with; using TCG".into(),
        );
    };
    let version = skyvisor_qemu::qemu_version(qemu).await.unwrap_or_default();
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = format!("{version}|{kernel_release}|{}", kernel.display());
    if let Ok(bytes) = tokio::fs::read(cache_file).await
        && let Ok(rec) = serde_json::from_slice::<ProbeRecord>(&bytes)
        && rec.key == key
    {
        let accel = if rec.kvm_boots {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        return (accel, format!("{} (cached probe)", rec.reason));
    }
    info!("probing whether KVM really boots a guest (up to 20 s)");
    let outcome = skyvisor_qemu::probe_accel_boot(
        qemu,
        kernel,
        initrd,
        "",
        Accel::Kvm,
        Duration::from_secs(20),
    )
    .await;
    let (kvm_boots, reason) = match outcome {
        Ok(skyvisor_qemu::ProbeOutcome::Booted { after }) => (
            true,
            format!("KVM booted a probe guest in {} ms", after.as_millis()),
        ),
        Ok(skyvisor_qemu::ProbeOutcome::TimedOut { .. }) => (
            false,
            "a KVM probe guest did not boot within 20 s (nested or broken KVM); using TCG".into(),
        ),
        Ok(skyvisor_qemu::ProbeOutcome::Failed { status, .. }) => (
            false,
            format!("a KVM probe guest failed ({status}); using TCG"),
        ),
        Err(e) => (false, format!("could not run a KVM probe ({e}); using TCG")),
    };
    let rec = ProbeRecord {
        key,
        kvm_boots,
        reason: reason.clone(),
    };
    let _ = tokio::fs::write(cache_file, serde_json::to_vec(&rec).unwrap_or_default()).await;
    (if kvm_boots { Accel::Kvm } else { Accel::Tcg }, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_measured() {
        let r = physical_resources(Path::new("/"), 0);
        assert!(r.vcpus >= 1);
        assert!(r.memory_mib > 0);
        assert!(r.disk_gib > 0);
        let less = physical_resources(Path::new("/"), 64);
        assert_eq!(less.memory_mib + 64, r.memory_mib);
    }

    #[tokio::test]
    async fn forced_modes_skip_the_probe() {
        let f = Path::new("/nonexistent/cache.json");
        let (a, why) = choose_accel(AccelMode::Tcg, Path::new("/nonexistent"), None, f).await;
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("forced"));
        let (a, _) = choose_accel(AccelMode::Kvm, Path::new("/nonexistent"), None, f).await;
        assert_eq!(a, Accel::Kvm);
    }
}
