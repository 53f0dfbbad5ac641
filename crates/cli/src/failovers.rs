//! `skyvisor failover list`: what HA did when hosts died, and what it
//! refused to do, with the reasons and timings.

use anyhow::Result;
use clap::Subcommand;
use skyvisor_core::{FailoverOutcome, FailoverRecord};

use crate::client::Client;
use crate::output::{self, OutputFormat, table};

/// `skyvisor failover ...`
#[derive(Debug, Subcommand)]
pub enum FailoverCommand {
    /// Every failover and refusal, oldest first.
    #[command(alias = "ls")]
    List,
}

/// Runs `skyvisor failover ...`.
pub async fn failover(client: &Client, format: OutputFormat, cmd: FailoverCommand) -> Result<()> {
    match cmd {
        FailoverCommand::List => {
            let list: Vec<FailoverRecord> = client.get("/v1/failovers").await?;
            output::print(format, &list, |l| list_table(l));
        }
    }
    Ok(())
}

fn list_table(list: &[FailoverRecord]) {
    let mut t = table(&[
        "INSTANCE",
        "FROM",
        "TO",
        "OUTCOME",
        "LEASE LOST",
        "DEAD AFTER",
        "REASON",
    ]);
    for r in list {
        let dead_after = (r.declared_dead_at - r.lease_lost_at)
            .to_std()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_default();
        t.add_row(vec![
            r.instance.to_string(),
            r.from_host.to_string(),
            r.to_host
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or("-".into()),
            match r.outcome {
                FailoverOutcome::Restarted => "restarted".into(),
                FailoverOutcome::Refused => "refused".into(),
            },
            r.lease_lost_at.format("%H:%M:%S%.3f").to_string(),
            dead_after,
            r.reason.clone(),
        ]);
    }
    println!("{t}");
}
