//! Facts about the host's QEMU and accelerators.
//!
//! The probe boots a throwaway guest to learn whether an accelerator really
//! works: `/dev/kvm` can exist and open fine while KVM guests hang (broken
//! nested virtualization). This module must never leave a probe QEMU
//! running, nor touch any VM's run directory.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use skyvisor_core::Accel;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::default_cpu_model;
use crate::error::QemuError;
use crate::process::{ProcessExit, tail_lines};

/// What the probe guest prints on its serial console once it runs with
/// `sv.probe=1` on its command line.
pub const PROBE_MARKER: &str = "SKYVISOR-PROBE-OK";

/// Serial and stderr bytes kept for the outcome.
const KEEP_BYTES: usize = 16 * 1024;
/// Lines of serial output or stderr in an outcome.
const OUTCOME_LINES: usize = 30;

/// The version of a QEMU binary from `BINARY --version`, e.g. `10.0.2`.
pub async fn qemu_version(binary: &Path) -> Result<String, QemuError> {
    let run = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(30), run).await {
        Err(_) => {
            return Err(QemuError::Version {
                path: binary.to_owned(),
                reason: "--version did not answer within 30s".into(),
            });
        }
        Ok(Err(source)) => return Err(spawn_error(binary, source)),
        Ok(Ok(out)) => out,
    };
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| QemuError::Version {
        path: binary.to_owned(),
        reason: format!(
            "--version printed {:?} ({})",
            text.trim(),
            ProcessExit::from(out.status)
        ),
    })
}

fn parse_version(text: &str) -> Option<String> {
    let rest = text.lines().next()?.split("version ").nth(1)?;
    let v = rest.split_whitespace().next()?;
    v.split('.')
        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        .then(|| v.to_owned())
}

/// `/dev/kvm` can be opened for reading and writing. Necessary for KVM, not
/// sufficient: use [`probe_accel_boot`] to know.
pub fn kvm_device_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// What a probe boot showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The guest printed [`PROBE_MARKER`] this long after QEMU started.
    Booted {
        /// Time from starting QEMU to the marker.
        after: Duration,
    },
    /// No marker before the deadline (e.g. KVM guests hang).
    TimedOut {
        /// The last serial console lines.
        serial_tail: String,
    },
    /// QEMU exited without the marker (e.g. KVM unusable, a bad kernel).
    Failed {
        /// How QEMU exited.
        status: ProcessExit,
        /// QEMU's stderr.
        stderr: String,
        /// The last serial console lines.
        serial_tail: String,
    },
}

/// Boots a throwaway VM (no disk, no network, serial console on a pipe) with
/// `accel` and waits up to `deadline` for [`PROBE_MARKER`] on its console.
/// The guest's command line gets `console=ttyS0 sv.probe=1 panic=-1` and
/// then `cmdline_extra`. The probe QEMU is always killed before returning.
pub async fn probe_accel_boot(
    binary: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline_extra: &str,
    accel: Accel,
    deadline: Duration,
) -> Result<ProbeOutcome, QemuError> {
    let mut cmd = Command::new(binary);
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-accel", accel.qemu_name(), "-machine", "pc"])
        .args(["-cpu", default_cpu_model(accel), "-m", "256M", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel);
    if let Some(initrd) = initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.arg("-append")
        .arg(format!("console=ttyS0 sv.probe=1 panic=-1 {cmdline_extra}").trim_end())
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Unlike VMs, a probe must not outlive its caller.
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| spawn_error(binary, e))?;
    debug!(?accel, pid = child.id(), "probe QEMU started");

    let stderr = child.stderr.take().map(|s| tokio::spawn(read_tail(s)));
    let outcome = match child.stdout.take() {
        Some(stdout) => watch_serial(stdout, &mut child, started, started + deadline).await,
        None => Watched::Exited(ProcessExit::Unknown, Vec::new()),
    };
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let stderr = match stderr {
        Some(task) => match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(bytes)) => tail_lines(&String::from_utf8_lossy(&bytes), OUTCOME_LINES),
            _ => String::new(),
        },
        None => String::new(),
    };
    let serial = |bytes: &[u8]| tail_lines(&String::from_utf8_lossy(bytes), OUTCOME_LINES);
    let outcome = match outcome {
        Watched::Booted(after) => ProbeOutcome::Booted { after },
        Watched::Deadline(bytes) => ProbeOutcome::TimedOut {
            serial_tail: serial(&bytes),
        },
        Watched::Exited(status, bytes) => ProbeOutcome::Failed {
            status,
            stderr,
            serial_tail: serial(&bytes),
        },
    };
    info!(?accel, ?outcome, "accelerator probe done");
    Ok(outcome)
}

/// How watching the probe's console ended.
enum Watched {
    Booted(Duration),
    Deadline(Vec<u8>),
    Exited(ProcessExit, Vec<u8>),
}

async fn watch_serial(
    mut stdout: impl AsyncRead + Unpin,
    child: &mut Child,
    started: Instant,
    deadline: Instant,
) -> Watched {
    let marker = PROBE_MARKER.as_bytes();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, stdout.read(&mut chunk)).await {
            Err(_) => return Watched::Deadline(seen),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        // Only the new bytes and a marker's length before them can hold a
        // marker that was not there before.
        let from = seen.len().saturating_sub(marker.len());
        seen.extend_from_slice(&chunk[..n]);
        if seen[from..].windows(marker.len()).any(|w| w == marker) {
            return Watched::Booted(started.elapsed());
        }
        if seen.len() > 2 * KEEP_BYTES {
            seen.drain(..seen.len() - KEEP_BYTES);
        }
    }
    // The console closed: QEMU is exiting.
    let status = match tokio::time::timeout_at(
        deadline.max(Instant::now() + Duration::from_secs(5)),
        child.wait(),
    )
    .await
    {
        Ok(Ok(s)) => s.into(),
        _ => ProcessExit::Unknown,
    };
    Watched::Exited(status, seen)
}

async fn read_tail(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() > 2 * KEEP_BYTES {
            out.drain(..out.len() - KEEP_BYTES);
        }
    }
    out
}

fn spawn_error(binary: &Path, source: io::Error) -> QemuError {
    if source.kind() == io::ErrorKind::NotFound {
        QemuError::BinaryNotFound {
            path: PathBuf::from(binary),
        }
    } else {
        QemuError::Spawn {
            path: binary.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_parsed() {
        let out = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) ...\n";
        assert_eq!(parse_version(out).as_deref(), Some("10.0.2"));
        assert_eq!(
            parse_version("QEMU emulator version 9.2.0\n").as_deref(),
            Some("9.2.0")
        );
        assert_eq!(parse_version("something else"), None);
        assert_eq!(parse_version("version x.y"), None);
    }
}
