//! `skyvisor dns ...`: the project's names in the internal zone.

use anyhow::Result;
use clap::Subcommand;
use skyvisor_core::dns::DnsZone;

use crate::client::Client;
use crate::output::{self, OutputFormat, table};

/// `skyvisor dns ...`
#[derive(Debug, Subcommand)]
pub enum DnsCommand {
    /// The names the project's guests resolve (through their network's
    /// gateway): instances, groups (their serving members) and load
    /// balancers.
    List,
}

/// Runs a `dns` command.
pub async fn dns(client: &Client, format: OutputFormat, cmd: DnsCommand) -> Result<()> {
    match cmd {
        DnsCommand::List => {
            let zone: DnsZone = client.get("/v1/dns").await?;
            output::print(format, &zone, |zone| {
                let mut t = table(&["NAME", "FQDN", "ADDRESSES"]);
                for n in &zone.names {
                    let addrs: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
                    t.add_row(vec![
                        n.name.clone(),
                        n.fqdn.clone(),
                        if addrs.is_empty() {
                            "-".to_string()
                        } else {
                            addrs.join(", ")
                        },
                    ]);
                }
                println!("{t}");
                println!("search domain: {}", zone.domain);
            });
        }
    }
    Ok(())
}
