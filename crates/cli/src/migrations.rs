//! `skyvisor vm migrate`, `skyvisor migration ...` and host maintenance
//! (`host drain|undrain|rebalance`): live migration from the command line.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use skyvisor_core::api::{MigrateInstanceRequest, RebalancePlan, RebalanceRequest};
use skyvisor_core::{HostView, Instance, Migration, MigrationPhase};

use crate::client::Client;
use crate::output::{self, OutputFormat, kv, table};
use crate::progress::Progress;

/// `skyvisor migration ...`
#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// List migrations, newest first.
    #[command(alias = "ls")]
    List,
    /// Show one migration.
    Show {
        /// Its id (see `skyvisor migration list`).
        id: String,
    },
}

fn mib_of(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// One line of progress for people.
fn progress_line(m: &Migration) -> String {
    let p = &m.progress;
    match m.phase {
        MigrationPhase::CopyingDisk => format!(
            "{} -> {}: copying disk {} of {}",
            m.source,
            m.destination,
            mib_of(p.disk_copied),
            mib_of(p.disk_total)
        ),
        MigrationPhase::Transferring => format!(
            "{} -> {}: memory {} sent, {} remaining of {}, pass {}, dirtied {}/s, {:.0} Mbit/s, expected downtime {} ms{}",
            m.source,
            m.destination,
            mib_of(p.ram_transferred),
            mib_of(p.ram_remaining),
            mib_of(p.ram_total),
            p.iteration,
            mib_of(p.dirty_rate),
            p.mbps,
            p.expected_downtime_ms,
            if p.throttle_percent > 0 {
                format!(", guest throttled {}%", p.throttle_percent)
            } else {
                String::new()
            }
        ),
        phase => format!("{} -> {}: {phase}", m.source, m.destination),
    }
}

fn show_table(m: &Migration) {
    let mut rows = vec![
        ("id", m.id.to_string()),
        ("instance", m.instance.to_string()),
        ("from", m.source.to_string()),
        ("to", m.destination.to_string()),
        ("reason", m.reason.to_string()),
        ("phase", m.phase.to_string()),
        ("started", m.created_at.to_rfc3339()),
    ];
    if let Some(r) = &m.result {
        rows.push(("total time", format!("{} ms", r.total_ms)));
        rows.push(("guest paused", format!("{} ms", r.pause_ms)));
        rows.push(("QEMU downtime", format!("{} ms", r.qemu_downtime_ms)));
        rows.push(("memory sent", mib_of(r.ram_transferred)));
        rows.push(("disk copied", mib_of(r.disk_copied)));
        rows.push(("frames held in the pause", r.held_frames.to_string()));
        let streams = if r.encrypted {
            "mutual TLS"
        } else {
            "plain TCP"
        };
        rows.push(("streams", streams.to_string()));
    } else if !m.phase.is_finished() {
        rows.push(("progress", progress_line(m)));
    }
    if let Some(e) = &m.error {
        rows.push(("error", e.clone()));
    }
    println!("{}", kv(&rows));
}

fn list_table(list: &[Migration]) {
    let mut t = table(&[
        "ID", "INSTANCE", "FROM", "TO", "REASON", "PHASE", "PAUSE", "TOTAL",
    ]);
    for m in list {
        let (pause, total) = match &m.result {
            Some(r) => (format!("{} ms", r.pause_ms), format!("{} ms", r.total_ms)),
            None => ("-".into(), "-".into()),
        };
        t.add_row(vec![
            m.id.to_string()[..8].to_string(),
            m.instance.to_string(),
            m.source.to_string(),
            m.destination.to_string(),
            m.reason.to_string(),
            m.phase.to_string(),
            pause,
            total,
        ]);
    }
    println!("{t}");
}

/// Follows migration `m` until it finishes; fails unless it completed.
async fn follow(client: &Client, format: OutputFormat, mut m: Migration) -> Result<Migration> {
    let mut progress = Progress::new(format == OutputFormat::Json);
    while !m.phase.is_finished() {
        progress.set(&progress_line(&m));
        tokio::time::sleep(Duration::from_millis(250)).await;
        m = client.get(&format!("/v1/migrations/{}", m.id)).await?;
    }
    // The figures follow the commit by a moment (the guest's resume).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while m.phase == MigrationPhase::Completed
        && m.result.is_none()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = client.get(&format!("/v1/migrations/{}", m.id)).await?;
    }
    progress.finish();
    Ok(m)
}

/// `skyvisor vm migrate`.
pub async fn migrate(
    client: &Client,
    format: OutputFormat,
    name: &str,
    request: MigrateInstanceRequest,
    cancel: bool,
    wait: bool,
) -> Result<()> {
    if cancel {
        let m: Migration = client
            .post(
                &format!("/v1/instances/{name}/migrate/cancel"),
                &serde_json::json!({}),
            )
            .await?;
        let m = if wait {
            follow(client, format, m).await?
        } else {
            m
        };
        output::print(format, &m, show_table);
        return Ok(());
    }
    let m: Migration = client
        .post(&format!("/v1/instances/{name}/migrate"), &request)
        .await?;
    if !wait {
        output::print(format, &m, show_table);
        return Ok(());
    }
    let m = follow(client, format, m).await?;
    output::print(format, &m, show_table);
    match m.phase {
        MigrationPhase::Completed => Ok(()),
        phase => bail!(
            "migration of {name} {phase}: {}; it still runs on {}",
            m.error.as_deref().unwrap_or("no reason recorded"),
            m.source
        ),
    }
}

/// `skyvisor migration ...`
pub async fn migration(client: &Client, format: OutputFormat, cmd: MigrationCommand) -> Result<()> {
    match cmd {
        MigrationCommand::List => {
            let list: Vec<Migration> = client.get("/v1/migrations").await?;
            output::print(format, &list, |l| list_table(l));
        }
        MigrationCommand::Show { id } => {
            let m: Migration = client.get(&format!("/v1/migrations/{id}")).await?;
            output::print(format, &m, show_table);
        }
    }
    Ok(())
}

/// `skyvisor host drain`: with `wait`, until no running VM is left on it.
pub async fn drain(client: &Client, format: OutputFormat, name: &str, wait: bool) -> Result<()> {
    let h: HostView = client
        .post(&format!("/v1/hosts/{name}/drain"), &serde_json::json!({}))
        .await?;
    if wait {
        let mut progress = Progress::new(format == OutputFormat::Json);
        let mut stuck_since: Option<std::time::Instant> = None;
        loop {
            let all: Vec<Instance> = client.get("/v1/instances").await?;
            let left: Vec<&Instance> = all
                .iter()
                .filter(|i| i.spec.host.as_str() == name)
                .filter(|i| i.spec.power == skyvisor_core::PowerState::Running)
                .collect();
            if left.is_empty() {
                break;
            }
            let moving = left.iter().filter(|i| i.spec.migration.is_some()).count();
            progress.set(&format!(
                "draining {name}: {} running VM(s) left, {moving} moving",
                left.len()
            ));
            // Nothing moving for a while: the rest cannot be moved now.
            if moving == 0 {
                let since = *stuck_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(90) {
                    progress.finish();
                    let names: Vec<String> = left.iter().map(|i| i.spec.name.to_string()).collect();
                    bail!(
                        "host {name} still runs {} and they do not move (see `skyvisor migration list`)",
                        names.join(", ")
                    );
                }
            } else {
                stuck_since = None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        progress.finish();
    }
    let h: HostView = if wait {
        client.get(&format!("/v1/hosts/{name}")).await?
    } else {
        h
    };
    output::print(format, &h, |h| {
        println!("host {} is {}", h.host.name, h.state);
    });
    Ok(())
}

/// `skyvisor host undrain`.
pub async fn undrain(client: &Client, format: OutputFormat, name: &str) -> Result<()> {
    let h: HostView = client
        .post(&format!("/v1/hosts/{name}/undrain"), &serde_json::json!({}))
        .await?;
    output::print(format, &h, |h| {
        println!("host {} is {}", h.host.name, h.state);
    });
    Ok(())
}

/// `skyvisor host rebalance`.
pub async fn rebalance(
    client: &Client,
    format: OutputFormat,
    max_moves: Option<u32>,
) -> Result<()> {
    let plan: RebalancePlan = client
        .post("/v1/hosts/rebalance", &RebalanceRequest { max_moves })
        .await?;
    output::print(format, &plan, |p| {
        if p.moves.is_empty() {
            println!(
                "the pool is balanced enough (memory allocation spread {:.0}%): nothing to move",
                p.spread_before_percent
            );
            return;
        }
        let mut t = table(&["#", "INSTANCE", "FROM", "TO"]);
        for (i, m) in p.moves.iter().enumerate() {
            t.add_row(vec![
                (i + 1).to_string(),
                m.instance.clone(),
                m.from.clone(),
                m.to.clone(),
            ]);
        }
        println!("{t}");
        println!(
            "memory allocation spread {:.0}% -> {:.0}%; the moves run one at a time (`skyvisor migration list`)",
            p.spread_before_percent, p.spread_after_percent
        );
    });
    Ok(())
}
