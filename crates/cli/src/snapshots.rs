//! `skyvisor vm snapshot ...`, `vm restore` and `vm update`: checkpoints
//! of VMs, going back to them, and their schedules.

use std::time::Duration;

use anyhow::{Result, bail};
use chrono::Utc;
use clap::Subcommand;
use reqwest::Method;
use skyvisor_core::api::{CreateSnapshotRequest, RestoreInstanceRequest, ScheduleRequest};
use skyvisor_core::{
    CheckpointSchedule, Instance, InstancePhase, PowerState, Snapshot, SnapshotKind, SnapshotState,
};

use crate::client::Client;
use crate::output::{self, OutputFormat, ago, kv, table};
use crate::progress::Progress;

/// `skyvisor vm snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot: memory, devices and disk of a running VM (paused
    /// only for a moment), the disk of a stopped one.
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's name (default snap-<UTC time>).
        name: Option<String>,
        /// Return without waiting for it to be ready.
        #[arg(long)]
        no_wait: bool,
    },
    /// List snapshots (of one VM, or all).
    #[command(alias = "ls")]
    List {
        /// The VM.
        vm: Option<String>,
    },
    /// Show one snapshot.
    Show {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// Delete a snapshot and its files.
    #[command(alias = "rm")]
    Delete {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
        /// Return without waiting until it is gone.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Parses `10m`, `1h30m`, `45s` (or `off`, as `None`) for schedules.
pub fn parse_every(s: &str) -> Result<Option<u64>, String> {
    if s == "off" || s == "never" {
        return Ok(None);
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 10m or 1h: {e}"))?;
    Ok(Some(d.as_secs()))
}

/// A schedule from `--checkpoint-every` and `--keep` (default 5).
pub fn schedule(every: Option<&str>, keep: Option<u32>) -> Result<Option<CheckpointSchedule>> {
    let every = match every {
        Some(e) => parse_every(e).map_err(anyhow::Error::msg)?,
        None if keep.is_some() => bail!("--keep needs --checkpoint-every"),
        None => return Ok(None),
    };
    Ok(every.map(|every_secs| CheckpointSchedule {
        every_secs,
        keep: keep.unwrap_or(5),
    }))
}

fn bytes(b: u64) -> String {
    let m = b as f64 / 1048576.0;
    if m >= 1024.0 {
        format!("{:.2} GiB", m / 1024.0)
    } else {
        format!("{m:.1} MiB")
    }
}

fn state_text(s: &Snapshot) -> String {
    let mut t = s.state.to_string();
    if s.deleting {
        t = "deleting".into();
    }
    if s.state == SnapshotState::Saving
        && let Some(p) = &s.progress
    {
        t = format!(
            "saving ({} of {} RAM written)",
            bytes(p.ram_transferred),
            bytes(p.ram_total)
        );
    }
    t
}

fn kind_text(s: &Snapshot) -> &'static str {
    match s.kind {
        Some(SnapshotKind::Full) => "full",
        Some(SnapshotKind::DiskOnly) => "disk-only",
        None => "-",
    }
}

fn snapshot_table(list: &[Snapshot]) {
    let mut t = table(&[
        "VM", "SNAPSHOT", "STATE", "KIND", "SIZE", "PAUSED", "CREATED", "ORIGIN",
    ]);
    let now = Utc::now();
    for s in list {
        t.add_row(vec![
            s.instance.to_string(),
            s.name.to_string(),
            state_text(s),
            kind_text(s).into(),
            if s.state == SnapshotState::Ready {
                bytes(s.size_bytes())
            } else {
                "-".into()
            },
            s.paused_ms
                .map(|p| format!("{p} ms"))
                .unwrap_or_else(|| "-".into()),
            format!("{} ago", ago((now - s.created_at).num_seconds())),
            serde_json::to_value(s.origin)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

fn snapshot_detail(s: &Snapshot) {
    let mut rows = vec![
        ("vm", format!("{} (id {})", s.instance, s.instance_id)),
        ("snapshot", s.name.to_string()),
        ("state", state_text(s)),
        ("kind", kind_text(s).into()),
        ("host", s.host.to_string()),
        ("image", s.image.to_string()),
        (
            "size",
            format!(
                "{} vCPU, {} MiB{}",
                s.resources.vcpus,
                s.resources.memory_mib,
                s.instance_type
                    .as_ref()
                    .map(|t| format!(" (type {t})"))
                    .unwrap_or_default()
            ),
        ),
        ("created", s.created_at.to_rfc3339()),
    ];
    if let Some(t) = s.taken_at {
        rows.push(("taken at", t.to_rfc3339()));
    }
    if let Some(p) = s.paused_ms {
        rows.push(("vm paused", format!("{p} ms")));
    }
    if let Some(d) = s.duration_ms {
        rows.push(("took", format!("{:.2} s", d as f64 / 1000.0)));
    }
    if s.state == SnapshotState::Ready {
        rows.push(("memory file", bytes(s.memory_bytes)));
        rows.push(("disk file", bytes(s.disk_bytes)));
    }
    if let Some(m) = &s.message {
        rows.push(("message", m.clone()));
    }
    println!("{}", kv(&rows));
}

async fn wait_snapshot(client: &Client, vm: &str, name: &str, quiet: bool) -> Result<Snapshot> {
    let mut progress = Progress::new(quiet);
    let path = format!("/v1/instances/{vm}/snapshots/{name}");
    loop {
        let s: Snapshot = client.get(&path).await?;
        match s.state {
            SnapshotState::Ready => {
                progress.finish();
                return Ok(s);
            }
            SnapshotState::Failed => {
                progress.finish();
                bail!(
                    "snapshot {name} of VM {vm} failed: {}",
                    s.message.unwrap_or_else(|| "no reason given".into())
                );
            }
            _ => progress.set(&format!("{vm}/{name}: {}", state_text(&s))),
        }
        if progress.elapsed() > Duration::from_secs(1800) {
            progress.finish();
            bail!("timed out waiting for snapshot {name} of VM {vm}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `vm snapshot ...`.
pub async fn snapshot(client: &Client, format: OutputFormat, cmd: SnapshotCommand) -> Result<()> {
    let quiet = format == OutputFormat::Json;
    match cmd {
        SnapshotCommand::Create { vm, name, no_wait } => {
            let mut s: Snapshot = client
                .post(
                    &format!("/v1/instances/{vm}/snapshots"),
                    &CreateSnapshotRequest { name },
                )
                .await?;
            if !no_wait {
                s = wait_snapshot(client, &vm, s.name.as_str(), quiet).await?;
                if !quiet {
                    eprintln!(
                        "snapshot {} of VM {vm} is ready: {} ({}), VM paused {} ms",
                        s.name,
                        bytes(s.size_bytes()),
                        kind_text(&s),
                        s.paused_ms.unwrap_or(0)
                    );
                }
            }
            output::print(format, &s, |s| snapshot_table(std::slice::from_ref(s)));
        }
        SnapshotCommand::List { vm } => {
            let path = match &vm {
                Some(v) => format!("/v1/instances/{v}/snapshots"),
                None => "/v1/snapshots".into(),
            };
            let list: Vec<Snapshot> = client.get(&path).await?;
            output::print(format, &list, |l| snapshot_table(l));
        }
        SnapshotCommand::Show { vm, name } => {
            let s: Snapshot = client
                .get(&format!("/v1/instances/{vm}/snapshots/{name}"))
                .await?;
            output::print(format, &s, snapshot_detail);
        }
        SnapshotCommand::Delete { vm, name, no_wait } => {
            let path = format!("/v1/instances/{vm}/snapshots/{name}");
            let s: Snapshot = client
                .call::<(), Snapshot>(Method::DELETE, &path, None)
                .await?;
            if !no_wait {
                let mut progress = Progress::new(quiet);
                loop {
                    match client.get::<Snapshot>(&path).await {
                        Err(e) if e.is_not_found() => break,
                        Err(e) => {
                            progress.finish();
                            return Err(e.into());
                        }
                        Ok(s) => progress.set(&format!(
                            "deleting {vm}/{name}{}",
                            s.message.map(|m| format!(": {m}")).unwrap_or_default()
                        )),
                    }
                    if progress.elapsed() > Duration::from_secs(120) {
                        progress.finish();
                        bail!("timed out waiting for snapshot {name} to be deleted");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                progress.finish();
                if !quiet {
                    eprintln!("snapshot {name} of VM {vm} deleted");
                }
            }
            if quiet {
                output::print(format, &s, |_| {});
            }
        }
    }
    Ok(())
}

/// Runs `vm restore VM SNAPSHOT`; with `wait`, until the VM runs from it
/// and its service answers.
pub async fn restore(
    client: &Client,
    format: OutputFormat,
    vm: &str,
    snapshot: &str,
    wait: bool,
    timeout: Duration,
) -> Result<Instance> {
    let quiet = format == OutputFormat::Json;
    let snap: Snapshot = client
        .get(&format!("/v1/instances/{vm}/snapshots/{snapshot}"))
        .await?;
    let mut inst: Instance = client
        .post(
            &format!("/v1/instances/{vm}/restore"),
            &RestoreInstanceRequest {
                snapshot: snapshot.to_string(),
            },
        )
        .await?;
    let generation = inst.spec.restore.as_ref().map_or(0, |r| r.generation);
    if !wait {
        return Ok(inst);
    }
    let mut progress = Progress::new(quiet);
    let path = format!("/v1/instances/{vm}");
    loop {
        inst = client.get(&path).await?;
        let s = &inst.status;
        if s.observed_restore_generation >= generation {
            let failed = s
                .message
                .as_deref()
                .filter(|m| m.starts_with(&format!("restore from {snapshot} failed")));
            if let Some(m) = failed {
                progress.finish();
                bail!("VM {vm}: {m}");
            }
            if s.phase == InstancePhase::Failed {
                progress.finish();
                bail!(
                    "VM {vm} failed: {}",
                    s.message
                        .clone()
                        .unwrap_or_else(|| "no reason given".into())
                );
            }
            let full = snap.kind == Some(SnapshotKind::Full);
            let done = if full || inst.spec.power == PowerState::Running {
                s.phase == InstancePhase::Running && s.guest_ready
            } else {
                s.phase == InstancePhase::Stopped
            };
            if done {
                progress.finish();
                return Ok(inst);
            }
        }
        progress.set(&format!("{vm}: restoring from {snapshot} ({})", s.phase));
        if progress.elapsed() > timeout {
            progress.finish();
            bail!("timed out waiting for VM {vm} to restore from {snapshot}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `vm update NAME --checkpoint-every ... --keep ...`.
pub async fn update_schedule(
    client: &Client,
    vm: &str,
    schedule: Option<CheckpointSchedule>,
) -> Result<Instance> {
    Ok(client
        .call(
            Method::PUT,
            &format!("/v1/instances/{vm}/checkpoint-schedule"),
            Some(&ScheduleRequest { schedule }),
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parses_durations_and_off() {
        assert_eq!(parse_every("10m"), Ok(Some(600)));
        assert_eq!(parse_every("1h30m"), Ok(Some(5400)));
        assert_eq!(parse_every("off"), Ok(None));
        assert!(parse_every("soon").is_err());
        assert!(schedule(None, Some(3)).is_err());
        assert_eq!(schedule(Some("off"), Some(3)).expect("ok"), None);
        assert_eq!(
            schedule(Some("1m"), None).expect("ok"),
            Some(CheckpointSchedule {
                every_secs: 60,
                keep: 5
            })
        );
    }
}
