//! `skyvisor lb ...`: load balancers in front of instance groups.

use anyhow::{Result, bail};
use clap::Subcommand;
use reqwest::Method;
use skyvisor_core::lb::{
    CreateLoadBalancerRequest, LbAlgorithm, Listener, ListenerProtocol, LoadBalancer,
};

use crate::client::{Client, path_segment};
use crate::output::{self, OutputFormat, kv, table};

/// `skyvisor lb ...`
#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Make a load balancer for a group: an address on the group's network
    /// spreading connections over its serving members.
    Create {
        /// Name (lowercase letters, digits and '-').
        name: String,
        /// The instance group behind it.
        #[arg(long)]
        group: String,
        /// A port to listen on, PORT or PORT:TARGET_PORT (repeatable).
        #[arg(long = "listen", required = true)]
        listen: Vec<String>,
        /// The members' port for a single --listen PORT (default: the same).
        #[arg(long)]
        target_port: Option<u16>,
        /// round-robin (default) or least-connections.
        #[arg(long, value_parser = parse_algorithm)]
        algorithm: Option<LbAlgorithm>,
        /// Seconds a leaving member keeps its connections (default 10).
        #[arg(long)]
        drain: Option<u32>,
        /// HTTP mode: every request gets X-Forwarded-For and
        /// X-Forwarded-Proto (default: TCP, bytes as they come).
        #[arg(long)]
        http: bool,
        /// Also listen on every host's own address, for clients outside
        /// the cluster (the ports are then taken on every host).
        #[arg(long)]
        external: bool,
    },
    /// List the project's load balancers.
    #[command(alias = "ls")]
    List,
    /// Show a load balancer and its backends.
    Show {
        /// The load balancer.
        name: String,
    },
    /// Delete a load balancer.
    #[command(alias = "rm")]
    Delete {
        /// The load balancer.
        name: String,
    },
}

fn parse_algorithm(s: &str) -> Result<LbAlgorithm, String> {
    match s {
        "round-robin" => Ok(LbAlgorithm::RoundRobin),
        "least-connections" => Ok(LbAlgorithm::LeastConnections),
        _ => Err(format!("{s:?}: allowed: round-robin, least-connections")),
    }
}

fn listeners(
    listen: &[String],
    target_port: Option<u16>,
    protocol: ListenerProtocol,
) -> Result<Vec<Listener>> {
    if target_port.is_some() && listen.len() != 1 {
        bail!("--target-port goes with a single --listen; give PORT:TARGET_PORT for each instead");
    }
    listen
        .iter()
        .map(|l| {
            let (p, t) = match l.split_once(':') {
                Some((p, t)) => (p, Some(t)),
                None => (l.as_str(), None),
            };
            let port: u16 = p.parse().map_err(|_| {
                anyhow::anyhow!("--listen {l:?}: allowed: PORT or PORT:TARGET_PORT (1-65535)")
            })?;
            let target_port = match t {
                Some(t) => Some(t.parse::<u16>().map_err(|_| {
                    anyhow::anyhow!("--listen {l:?}: allowed: PORT or PORT:TARGET_PORT (1-65535)")
                })?),
                None => target_port,
            };
            Ok(Listener {
                port,
                target_port,
                protocol,
            })
        })
        .collect()
}

fn path(name: &str) -> String {
    format!("/v1/load-balancers/{}", path_segment(name))
}

fn algorithm_name(a: LbAlgorithm) -> &'static str {
    match a {
        LbAlgorithm::RoundRobin => "round-robin",
        LbAlgorithm::LeastConnections => "least-connections",
    }
}

fn ports(lb: &LoadBalancer) -> String {
    lb.spec
        .listeners
        .iter()
        .map(|l| {
            let http = if l.protocol == ListenerProtocol::Http {
                " (http)"
            } else {
                ""
            };
            format!("{}->{}{http}", l.port, l.target())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_one(format: OutputFormat, lb: &LoadBalancer) {
    output::print(format, lb, |lb| {
        println!(
            "{}",
            kv(&[
                ("name", lb.spec.name.clone()),
                ("address", lb.spec.address.to_string()),
                ("network", lb.spec.network.clone()),
                ("group", lb.spec.group.to_string()),
                ("listeners", ports(lb)),
                ("algorithm", algorithm_name(lb.spec.algorithm).to_string()),
                ("drain", format!("{} s", lb.spec.drain_secs)),
                (
                    "external",
                    if lb.external_endpoints.is_empty() {
                        "-".to_string()
                    } else {
                        lb.external_endpoints.join(", ")
                    },
                ),
            ])
        );
        let mut t = table(&["BACKEND", "IP", "STATE"]);
        for b in &lb.backends {
            t.add_row(vec![
                b.member.clone(),
                b.ip.to_string(),
                format!("{:?}", b.state).to_lowercase(),
            ]);
        }
        println!("{t}");
    });
}

/// Runs `skyvisor lb ...`.
pub async fn lb(client: &Client, format: OutputFormat, cmd: LbCommand) -> Result<()> {
    match cmd {
        LbCommand::Create {
            name,
            group,
            listen,
            target_port,
            algorithm,
            drain,
            http,
            external,
        } => {
            let protocol = if http {
                ListenerProtocol::Http
            } else {
                ListenerProtocol::Tcp
            };
            let req = CreateLoadBalancerRequest {
                name,
                group,
                listeners: listeners(&listen, target_port, protocol)?,
                algorithm: algorithm.unwrap_or_default(),
                drain_secs: drain,
                external,
            };
            let lb: LoadBalancer = client.post("/v1/load-balancers", &req).await?;
            print_one(format, &lb);
        }
        LbCommand::List => {
            let list: Vec<LoadBalancer> = client.get("/v1/load-balancers").await?;
            output::print(format, &list, |list| {
                let mut t = table(&["NAME", "ADDRESS", "GROUP", "LISTENERS", "BACKENDS"]);
                for lb in list {
                    t.add_row(vec![
                        lb.spec.name.clone(),
                        lb.spec.address.to_string(),
                        lb.spec.group.to_string(),
                        ports(lb),
                        lb.backends.len().to_string(),
                    ]);
                }
                println!("{t}");
            });
        }
        LbCommand::Show { name } => {
            let lb: LoadBalancer = client.get(&path(&name)).await?;
            print_one(format, &lb);
        }
        LbCommand::Delete { name } => {
            client
                .call::<(), ()>(Method::DELETE, &path(&name), None)
                .await?;
            if format == OutputFormat::Table {
                println!("load balancer {name} deleted");
            }
        }
    }
    Ok(())
}
