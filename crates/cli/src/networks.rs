//! `skyvisor network ...` and `skyvisor security-group ...`: a project's
//! private networks and the rules that say what reaches its instances.
//!
//! It only asks the API; what is allowed is decided there.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use skyvisor_core::api::{CreateNetworkRequest, CreateSecurityGroupRequest, SecurityRulesRequest};
use skyvisor_core::{Network, Protocol, SecurityGroup, SecurityRule};

use crate::client::{Client, path_segment};
use crate::output::{self, OutputFormat, kv, table};

/// `skyvisor network ...`
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create a private network: its own segment and subnet, reachable from
    /// no other project.
    Create {
        /// Name (lowercase letters, digits and '-').
        name: String,
        /// Its subnet (default 10.0.0.0/24; projects may overlap).
        #[arg(long)]
        subnet: Option<String>,
    },
    /// List the project's networks.
    #[command(alias = "ls")]
    List,
    /// Show a network.
    Show {
        /// The network.
        name: String,
    },
    /// Delete a network no instance uses.
    #[command(alias = "rm")]
    Delete {
        /// The network.
        name: String,
    },
}

/// `skyvisor security-group ...`
#[derive(Debug, Subcommand)]
pub enum SecurityGroupCommand {
    /// Create a group. Without --empty it lets in everything from its own
    /// members (and nothing else).
    Create {
        /// Name (lowercase letters, digits and '-').
        name: String,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
        /// Start with no rules at all: nothing gets in.
        #[arg(long)]
        empty: bool,
    },
    /// List the project's groups.
    #[command(alias = "ls")]
    List,
    /// Show a group and its rules.
    Show {
        /// The group.
        name: String,
    },
    /// Delete a group no instance is in.
    #[command(alias = "rm")]
    Delete {
        /// The group.
        name: String,
    },
    /// Allow traffic in: adds a rule (running members get it at once).
    Allow {
        /// The group.
        name: String,
        /// The rule.
        #[command(flatten)]
        rule: RuleArgs,
    },
    /// Stop allowing traffic: removes the rule that matches exactly.
    Revoke {
        /// The group.
        name: String,
        /// The rule.
        #[command(flatten)]
        rule: RuleArgs,
    },
}

/// A rule on the command line.
#[derive(Debug, Clone, Args)]
pub struct RuleArgs {
    /// tcp, udp, icmp or any.
    #[arg(long, value_parser = parse_protocol)]
    pub protocol: Protocol,
    /// A port or a range like 8000-8100 (tcp and udp; default: all).
    #[arg(long)]
    pub port: Option<String>,
    /// Where from, as an IPv4 range like 0.0.0.0/0.
    #[arg(
        long,
        conflicts_with = "from_group",
        required_unless_present = "from_group"
    )]
    pub cidr: Option<String>,
    /// Where from, as the members of a group of the project.
    #[arg(long)]
    pub from_group: Option<String>,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "icmp" => Ok(Protocol::Icmp),
        "any" | "all" => Ok(Protocol::Any),
        _ => Err(format!(
            "{s:?} is not a protocol; allowed: tcp, udp, icmp, any"
        )),
    }
}

impl RuleArgs {
    fn rule(&self) -> Result<SecurityRule> {
        let (port_from, port_to) = match &self.port {
            None => (None, None),
            Some(p) => {
                let parse = |s: &str| -> Result<u16> {
                    match s.trim().parse::<u16>() {
                        Ok(n) => Ok(n),
                        Err(_) => bail!(
                            "--port {p:?}: {s:?} is not a port; allowed: 1 to 65535, or a range like 8000-8100"
                        ),
                    }
                };
                match p.split_once('-') {
                    Some((a, b)) => (Some(parse(a)?), Some(parse(b)?)),
                    None => (Some(parse(p)?), None),
                }
            }
        };
        Ok(SecurityRule {
            protocol: self.protocol,
            port_from,
            port_to,
            cidr: self.cidr.clone(),
            group: self.from_group.clone(),
        })
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Any => "any",
    }
}

fn ports_of(r: &SecurityRule) -> String {
    match (r.port_from, r.port_to) {
        (Some(a), Some(b)) if a != b => format!("{a}-{b}"),
        (Some(a), _) => a.to_string(),
        _ => "all".into(),
    }
}

fn source_of(r: &SecurityRule) -> String {
    match (&r.cidr, &r.group) {
        (Some(c), _) => c.clone(),
        (None, Some(g)) => format!("group {g}"),
        (None, None) => "-".into(),
    }
}

fn print_group(format: OutputFormat, g: &SecurityGroup) {
    output::print(format, g, |g| {
        println!(
            "{}",
            kv(&[
                ("name", g.name.clone()),
                ("project", g.project.to_string()),
                ("description", g.description.clone()),
                ("rules", g.rules.len().to_string()),
            ])
        );
        let mut t = table(&["PROTOCOL", "PORTS", "FROM"]);
        for r in &g.rules {
            t.add_row(vec![
                protocol_name(r.protocol).to_string(),
                ports_of(r),
                source_of(r),
            ]);
        }
        if g.rules.is_empty() {
            println!("no rules: nothing gets in");
        } else {
            println!("{t}");
        }
    });
}

/// Runs `skyvisor network ...`.
pub async fn network(client: &Client, format: OutputFormat, cmd: NetworkCommand) -> Result<()> {
    let show = |n: &Network| {
        println!(
            "{}",
            kv(&[
                ("name", n.name.clone()),
                ("project", n.project.to_string()),
                ("subnet", n.subnet.to_string()),
                ("gateway", n.subnet.gateway().to_string()),
                ("vni", n.vni.to_string()),
                ("mtu", n.mtu.to_string()),
            ])
        )
    };
    match cmd {
        NetworkCommand::Create { name, subnet } => {
            let n: Network = client
                .post("/v1/networks", &CreateNetworkRequest { name, subnet })
                .await?;
            output::print(format, &n, show);
        }
        NetworkCommand::List => {
            let list: Vec<Network> = client.get("/v1/networks").await?;
            output::print(format, &list, |list| {
                let mut t = table(&["NAME", "SUBNET", "GATEWAY", "VNI"]);
                for n in list {
                    t.add_row(vec![
                        n.name.clone(),
                        n.subnet.to_string(),
                        n.subnet.gateway().to_string(),
                        n.vni.to_string(),
                    ]);
                }
                println!("{t}");
            });
        }
        NetworkCommand::Show { name } => {
            let n: Network = client
                .get(&format!("/v1/networks/{}", path_segment(&name)))
                .await?;
            output::print(format, &n, show);
        }
        NetworkCommand::Delete { name } => {
            client
                .call::<(), ()>(
                    Method::DELETE,
                    &format!("/v1/networks/{}", path_segment(&name)),
                    None,
                )
                .await?;
            if format == OutputFormat::Table {
                println!("network {name} deleted");
            }
        }
    }
    Ok(())
}

/// Runs `skyvisor security-group ...`.
pub async fn security_group(
    client: &Client,
    format: OutputFormat,
    cmd: SecurityGroupCommand,
) -> Result<()> {
    let path = |name: &str| format!("/v1/security-groups/{}", path_segment(name));
    match cmd {
        SecurityGroupCommand::Create {
            name,
            description,
            empty,
        } => {
            let req = CreateSecurityGroupRequest {
                name,
                description,
                rules: empty.then(Vec::new),
            };
            let g: SecurityGroup = client.post("/v1/security-groups", &req).await?;
            print_group(format, &g);
        }
        SecurityGroupCommand::List => {
            let list: Vec<SecurityGroup> = client.get("/v1/security-groups").await?;
            output::print(format, &list, |list| {
                let mut t = table(&["NAME", "RULES", "DESCRIPTION"]);
                for g in list {
                    t.add_row(vec![
                        g.name.clone(),
                        g.rules.len().to_string(),
                        g.description.clone(),
                    ]);
                }
                println!("{t}");
            });
        }
        SecurityGroupCommand::Show { name } => {
            let g: SecurityGroup = client.get(&path(&name)).await?;
            print_group(format, &g);
        }
        SecurityGroupCommand::Delete { name } => {
            client
                .call::<(), ()>(Method::DELETE, &path(&name), None)
                .await?;
            if format == OutputFormat::Table {
                println!("security group {name} deleted");
            }
        }
        SecurityGroupCommand::Allow { name, rule } => {
            let rule = rule.rule()?;
            let g: SecurityGroup = client.get(&path(&name)).await?;
            let mut rules = g.rules;
            if !rules.contains(&rule) {
                rules.push(rule);
            }
            print_group(format, &put_rules(client, &path(&name), rules).await?);
        }
        SecurityGroupCommand::Revoke { name, rule } => {
            let rule = rule.rule()?;
            let g: SecurityGroup = client.get(&path(&name)).await?;
            let before = g.rules.len();
            let rules: Vec<SecurityRule> = g.rules.into_iter().filter(|r| r != &rule).collect();
            if rules.len() == before {
                bail!(
                    "security group {name} has no rule {} {} from {}; see `skyvisor security-group show {name}`",
                    protocol_name(rule.protocol),
                    ports_of(&rule),
                    source_of(&rule)
                );
            }
            print_group(format, &put_rules(client, &path(&name), rules).await?);
        }
    }
    Ok(())
}

/// Replaces the rules of the group at `group_path`.
async fn put_rules(
    client: &Client,
    group_path: &str,
    rules: Vec<SecurityRule>,
) -> Result<SecurityGroup> {
    Ok(client
        .call(
            Method::PUT,
            &format!("{group_path}/rules"),
            Some(&SecurityRulesRequest { rules }),
        )
        .await?)
}
