//! `skyvisor volume ...` and `skyvisor vm attach-volume|detach-volume`:
//! replicated volumes, their snapshots, and plugging them into VMs.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use reqwest::Method;
use skyvisor_core::volume::{
    AttachVolumeRequest, ChangeReplicasRequest, CreateVolumeRequest, CreateVolumeSnapshotRequest,
    GrowVolumeRequest,
};
use skyvisor_core::{
    Instance, InstancePhase, ReplicaState, ReplicaView, Volume, VolumePhase, VolumeSnapshot,
};

use crate::client::Client;
use crate::output::{self, OutputFormat, kv, table};
use crate::parse_bytes;
use crate::progress::Progress;
use crate::readiness::{self, Needs};

/// `skyvisor volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a replicated volume (one replica per host).
    Create {
        /// Name (lowercase letters, digits and '-').
        name: String,
        /// Size, e.g. 512M, 10G, 1T.
        #[arg(long, value_parser = parse_bytes)]
        size: u64,
        /// Replicas, each on its own host: 1, 2 or 3.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Writes fail (rather than be acknowledged by fewer) below this
        /// many in-sync replicas.
        #[arg(long, default_value_t = 1)]
        min_in_sync: u32,
    },
    /// List volumes.
    #[command(alias = "ls")]
    List,
    /// Show a volume: replicas, hosts, states, epoch, primary, VM.
    Show {
        /// The volume.
        name: String,
    },
    /// Grow a volume (its VM must be stopped).
    Grow {
        /// The volume.
        name: String,
        /// The new size, e.g. 20G.
        #[arg(long, value_parser = parse_bytes)]
        size: u64,
    },
    /// Delete a volume no VM uses, and its snapshots.
    #[command(alias = "rm")]
    Delete {
        /// The volume.
        name: String,
        /// Return without waiting until it is gone.
        #[arg(long)]
        no_wait: bool,
    },
    /// Snapshots of a volume (file-system consistent when its VM has a
    /// guest agent, else crash-consistent).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Where a volume's replicas live: add, remove or move one.
    #[command(subcommand)]
    Replica(ReplicaCommand),
}

/// `skyvisor volume replica ...`: the copy runs in the background; these
/// wait for it (with progress) unless `--no-wait`.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Add a replica (copied in full, then in sync).
    Add {
        /// The volume.
        volume: String,
        /// The host; default: the one with the most free disk.
        #[arg(long)]
        host: Option<String>,
        /// Return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove a replica (refused if it is the last one).
    #[command(alias = "rm")]
    Remove {
        /// The volume.
        volume: String,
        /// The host whose replica goes.
        host: String,
        /// Return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move a replica: a new one is made and in sync before the old one
    /// goes.
    Move {
        /// The volume.
        volume: String,
        /// The host whose replica moves.
        from: String,
        /// The host it moves to; default: the one with the most free disk.
        #[arg(long)]
        to: Option<String>,
        /// Return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

/// `skyvisor volume snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (I/O pauses while every in-sync replica is copied).
    Create {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
    /// List a volume's snapshots.
    #[command(alias = "ls")]
    List {
        /// The volume.
        volume: String,
    },
    /// Delete a snapshot.
    #[command(alias = "rm")]
    Delete {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
    },
}

fn size_text(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn replica_state(r: &ReplicaView) -> String {
    match (r.state, r.resync_done_bytes, r.resync_total_bytes) {
        (ReplicaState::Resyncing, Some(d), Some(t)) if t > 0 => {
            format!(
                "resyncing {}% ({} of {} MiB)",
                d * 100 / t,
                d >> 20,
                t >> 20
            )
        }
        (s, ..) => match &r.message {
            Some(m) if s != ReplicaState::InSync => format!("{s}: {m}"),
            _ => s.to_string(),
        },
    }
}

fn redundancy_text(v: &Volume) -> String {
    let r = &v.redundancy;
    let hosts = |l: &[skyvisor_core::HostName]| {
        l.iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!("{} of {} wanted replicas in sync", r.in_sync, r.wanted);
    if !r.pending.is_empty() {
        out.push_str(&format!("; not yet: {}", hosts(&r.pending)));
    }
    if !r.surplus.is_empty() {
        out.push_str(&format!("; to drop: {}", hosts(&r.surplus)));
    }
    out
}

fn attached_text(v: &Volume) -> String {
    match &v.attached_to {
        Some(a) if a.root => format!("{} (root)", a.instance),
        Some(a) => a.instance.to_string(),
        None => "-".into(),
    }
}

fn volume_table(list: &[Volume]) {
    let mut t = table(&[
        "NAME", "STATE", "HEALTH", "SIZE", "REPLICAS", "HOSTS", "VM", "PRIMARY",
    ]);
    for v in list {
        let in_sync = v
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .count();
        t.add_row(vec![
            v.spec.name.to_string(),
            if v.spec.deleting {
                "deleting".into()
            } else {
                v.status.phase.to_string()
            },
            v.health.to_string(),
            size_text(v.spec.size_bytes),
            format!("{in_sync}/{} in sync", v.spec.replicas),
            v.spec
                .hosts
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(","),
            attached_text(v),
            v.primary
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
}

fn volume_detail(v: &Volume) {
    let mut rows = vec![
        ("name", v.spec.name.to_string()),
        ("id", v.spec.id.to_string()),
        (
            "state",
            if v.spec.deleting {
                "deleting".into()
            } else {
                v.status.phase.to_string()
            },
        ),
        ("health", v.health.to_string()),
        ("size", size_text(v.spec.size_bytes)),
        (
            "replicas",
            format!(
                "{} (writes need {} in sync)",
                v.spec.replicas, v.spec.min_in_sync
            ),
        ),
        ("epoch", v.epoch.to_string()),
        (
            "primary",
            v.primary
                .as_ref()
                .map(|h| format!("{h} (serving)"))
                .unwrap_or_else(|| "- (not served)".into()),
        ),
        ("attached to", attached_text(v)),
        ("resynced", format!("{} MiB", v.resynced_bytes >> 20)),
        ("redundancy", redundancy_text(v)),
    ];
    if let Some(m) = &v.status.message {
        rows.push(("message", m.clone()));
    }
    println!("{}", kv(&rows));
    let mut t = table(&["HOST", "STATE", "ADDRESS", "READS"]);
    for r in &v.replicas {
        t.add_row(vec![
            r.host.to_string(),
            replica_state(r),
            r.address.clone(),
            if r.read_source { "yes" } else { "" }.into(),
        ]);
    }
    println!("{t}");
}

fn snapshot_table(list: &[VolumeSnapshot]) {
    let mut t = table(&[
        "VOLUME",
        "SNAPSHOT",
        "SIZE",
        "CONSISTENCY",
        "EPOCH",
        "HOSTS",
        "CREATED",
    ]);
    for s in list {
        t.add_row(vec![
            s.volume.to_string(),
            s.name.clone(),
            size_text(s.size_bytes),
            match s.consistency {
                skyvisor_core::volume::SnapshotConsistency::Crash => "crash",
                skyvisor_core::volume::SnapshotConsistency::FileSystem => "file system",
            }
            .to_string(),
            s.epoch.to_string(),
            s.hosts
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(","),
            s.created_at.to_rfc3339(),
        ]);
    }
    println!("{t}");
}

/// Polls the volume until `done`, failing if it fails; `None` if it is gone
/// (and `gone_ok`).
async fn wait_volume(
    client: &Client,
    name: &str,
    quiet: bool,
    timeout: Duration,
    gone_ok: bool,
    done: impl Fn(&Volume) -> bool,
) -> Result<Option<Volume>> {
    let mut progress = Progress::new(quiet);
    loop {
        let v: Volume = match client.get(&format!("/v1/volumes/{name}")).await {
            Ok(v) => v,
            Err(e) if gone_ok && e.is_not_found() => {
                progress.finish();
                return Ok(None);
            }
            Err(e) => {
                progress.finish();
                return Err(e.into());
            }
        };
        if done(&v) {
            progress.finish();
            return Ok(Some(v));
        }
        if v.status.phase == VolumePhase::Failed {
            progress.finish();
            bail!(
                "volume {name} failed: {}",
                v.status.message.unwrap_or_else(|| "no reason given".into())
            );
        }
        progress.set(&format!(
            "volume {name}: {}{}{}",
            v.status.phase,
            if v.redundancy.pending.is_empty() && v.redundancy.surplus.is_empty() {
                String::new()
            } else {
                format!(
                    ", {}/{} replicas in sync: {}",
                    v.redundancy.in_sync,
                    v.redundancy.wanted,
                    v.replicas
                        .iter()
                        .map(|r| format!("{} {}", r.host, replica_state(r)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            v.status
                .message
                .as_ref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        ));
        if progress.elapsed() > timeout {
            progress.finish();
            bail!(
                "timed out after {}s waiting for volume {name} (it is {})",
                timeout.as_secs(),
                v.status.phase
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `skyvisor volume ...`.
pub async fn volume(client: &Client, format: OutputFormat, cmd: VolumeCommand) -> Result<()> {
    let quiet = format == OutputFormat::Json;
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            min_in_sync,
        } => {
            let req = CreateVolumeRequest {
                name: name.clone(),
                size_bytes: size,
                replicas: Some(replicas),
                min_in_sync: Some(min_in_sync),
            };
            // Right after `skyvisor up` the host may not have registered yet.
            let needs = Needs {
                image: None,
                hosts: 1,
            };
            readiness::wait_for(client, needs, Duration::from_secs(120), quiet).await?;
            let mut v: Volume = client.post("/v1/volumes", &req).await?;
            if v.status.phase != VolumePhase::Available
                && let Some(done) =
                    wait_volume(client, &name, quiet, Duration::from_secs(120), false, |v| {
                        v.status.phase == VolumePhase::Available
                    })
                    .await?
            {
                v = done;
            }
            output::print(format, &v, |v| volume_table(std::slice::from_ref(v)));
        }
        VolumeCommand::List => {
            let list: Vec<Volume> = client.get("/v1/volumes").await?;
            output::print(format, &list, |l| volume_table(l));
        }
        VolumeCommand::Show { name } => {
            let v: Volume = client.get(&format!("/v1/volumes/{name}")).await?;
            output::print(format, &v, volume_detail);
        }
        VolumeCommand::Replica(cmd) => {
            let (name, req, no_wait) = match cmd {
                ReplicaCommand::Add {
                    volume,
                    host,
                    no_wait,
                } => (
                    volume,
                    ChangeReplicasRequest {
                        to: Some(host.unwrap_or_else(|| "auto".into())),
                        from: None,
                    },
                    no_wait,
                ),
                ReplicaCommand::Remove {
                    volume,
                    host,
                    no_wait,
                } => (
                    volume,
                    ChangeReplicasRequest {
                        to: None,
                        from: Some(host),
                    },
                    no_wait,
                ),
                ReplicaCommand::Move {
                    volume,
                    from,
                    to,
                    no_wait,
                } => (
                    volume,
                    ChangeReplicasRequest {
                        to: Some(to.unwrap_or_else(|| "auto".into())),
                        from: Some(from),
                    },
                    no_wait,
                ),
            };
            let mut v: Volume = client
                .post(&format!("/v1/volumes/{name}/replicas"), &req)
                .await?;
            if !no_wait
                && let Some(done) = wait_volume(
                    client,
                    &name,
                    quiet,
                    Duration::from_secs(3600),
                    false,
                    |v| v.redundancy.pending.is_empty() && v.redundancy.surplus.is_empty(),
                )
                .await?
            {
                v = done;
            }
            output::print(format, &v, volume_detail);
        }
        VolumeCommand::Grow { name, size } => {
            let mut v: Volume = client
                .post(
                    &format!("/v1/volumes/{name}/grow"),
                    &GrowVolumeRequest { size_bytes: size },
                )
                .await?;
            if let Some(done) =
                wait_volume(client, &name, quiet, Duration::from_secs(300), false, |v| {
                    v.status.phase == VolumePhase::Available && v.status.size_bytes >= size
                })
                .await?
            {
                v = done;
            }
            output::print(format, &v, |v| volume_table(std::slice::from_ref(v)));
        }
        VolumeCommand::Delete { name, no_wait } => {
            let v: Volume = client
                .call::<(), Volume>(Method::DELETE, &format!("/v1/volumes/{name}"), None)
                .await?;
            if !no_wait {
                wait_volume(client, &name, quiet, Duration::from_secs(120), true, |_| {
                    false
                })
                .await?;
                if !quiet {
                    eprintln!("volume {name} deleted");
                }
            }
            if quiet {
                output::print(format, &v, |_| {});
            }
        }
        VolumeCommand::Snapshot(SnapshotCommand::Create { volume, name }) => {
            let s: VolumeSnapshot = client
                .post(
                    &format!("/v1/volumes/{volume}/snapshots"),
                    &CreateVolumeSnapshotRequest { name },
                )
                .await?;
            output::print(format, &s, |s| snapshot_table(std::slice::from_ref(s)));
        }
        VolumeCommand::Snapshot(SnapshotCommand::List { volume }) => {
            let list: Vec<VolumeSnapshot> = client
                .get(&format!("/v1/volumes/{volume}/snapshots"))
                .await?;
            output::print(format, &list, |l| snapshot_table(l));
        }
        VolumeCommand::Snapshot(SnapshotCommand::Delete { volume, name }) => {
            client
                .call::<(), ()>(
                    Method::DELETE,
                    &format!("/v1/volumes/{volume}/snapshots/{name}"),
                    None,
                )
                .await?;
            if !quiet {
                eprintln!("snapshot {name} of volume {volume} deleted");
            }
        }
    }
    Ok(())
}

/// `vm attach-volume`: attaches and, for a running VM, waits until the
/// guest has the disk.
pub async fn attach(
    client: &Client,
    format: OutputFormat,
    vm: &str,
    volume: &str,
    wait: bool,
) -> Result<()> {
    let mut inst: Instance = client
        .post(
            &format!("/v1/instances/{vm}/volumes"),
            &AttachVolumeRequest {
                volume: volume.to_owned(),
            },
        )
        .await?;
    if wait && inst.status.phase == InstancePhase::Running {
        let mut progress = Progress::new(format == OutputFormat::Json);
        loop {
            inst = client.get(&format!("/v1/instances/{vm}")).await?;
            if inst
                .status
                .attached_volumes
                .iter()
                .any(|v| v.as_str() == volume)
            {
                break;
            }
            if let Some(m) = &inst.status.message
                && m.contains(&format!("attaching volume {volume}"))
            {
                progress.finish();
                bail!("VM {vm} could not attach volume {volume}: {m}");
            }
            if inst.status.phase != InstancePhase::Running {
                break;
            }
            progress.set(&format!("attaching volume {volume} to VM {vm}"));
            if progress.elapsed() > Duration::from_secs(120) {
                progress.finish();
                bail!("timed out waiting for VM {vm} to attach volume {volume}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress.finish();
    }
    output::print(format, &inst, |i| {
        let names: Vec<String> = i.spec.volumes.iter().map(|v| v.name.to_string()).collect();
        println!("VM {vm} volumes: {}", names.join(", "));
    });
    Ok(())
}

/// `vm detach-volume`: detaches and waits until the volume is free.
pub async fn detach(
    client: &Client,
    format: OutputFormat,
    vm: &str,
    volume: &str,
    wait: bool,
) -> Result<()> {
    let inst: Instance = client
        .call::<(), Instance>(
            Method::DELETE,
            &format!("/v1/instances/{vm}/volumes/{volume}"),
            None,
        )
        .await?;
    if wait {
        let mut progress = Progress::new(format == OutputFormat::Json);
        loop {
            let v: Volume = client.get(&format!("/v1/volumes/{volume}")).await?;
            if v.attached_to.is_none() {
                break;
            }
            let i: Instance = client.get(&format!("/v1/instances/{vm}")).await?;
            if let Some(m) = &i.status.message
                && m.contains(&format!("detaching volume {volume}"))
            {
                progress.finish();
                bail!("VM {vm} could not detach volume {volume}: {m}");
            }
            progress.set(&format!("waiting for VM {vm} to release volume {volume}"));
            if progress.elapsed() > Duration::from_secs(120) {
                progress.finish();
                bail!("timed out waiting for VM {vm} to release volume {volume}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress.finish();
    }
    output::print(format, &inst, |i| {
        let names: Vec<String> = i.spec.volumes.iter().map(|v| v.name.to_string()).collect();
        println!(
            "VM {vm} volumes: {}",
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        );
    });
    Ok(())
}
