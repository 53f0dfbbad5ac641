//! `skyvisor group ...`: instance groups (scale-out). A group keeps
//! `desired` identical members made from its launch template, spread
//! across hosts, health-checked and replaced when they fail.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use skyvisor_core::api::CreateInstanceRequest;
use skyvisor_core::group::{
    CreateGroupRequest, Group, HealthCheck, ScaleGroupRequest, ScheduledSize, UpdateGroupRequest,
};

use crate::client::{Client, path_segment};
use crate::output::{self, OutputFormat, kv, table};
use crate::progress::Progress;
use crate::readiness::{self, Needs};

/// The launch template's arguments (`group create` and `group update`).
#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// What members are: vm (the default) or container.
    #[arg(long, value_parser = crate::commands::parse_kind)]
    pub kind: Option<skyvisor_core::InstanceKind>,
    /// Image members boot.
    #[arg(long)]
    pub image: Option<String>,
    /// Instance type of each member (default small).
    #[arg(long = "type", short = 't')]
    pub instance_type: Option<String>,
    /// vCPUs (overrides the type's).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory, e.g. 512M (overrides the type's).
    #[arg(long, value_parser = crate::parse_mib)]
    pub memory: Option<u64>,
    /// The project's network members join.
    #[arg(long)]
    pub network: Option<String>,
    /// A security group for each member (repeatable).
    #[arg(long = "security-group")]
    pub security_groups: Vec<String>,
    /// A label for each member, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// A key pair each member's default user accepts (repeatable).
    #[arg(long = "key", value_name = "KEYPAIR")]
    pub keys: Vec<String>,
    /// User data for cloud-init, from FILE.
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// What a member's host does when it ends unasked: never (the group
    /// then replaces it), on-failure, always.
    #[arg(long)]
    pub restart: Option<skyvisor_core::RestartPolicy>,
    /// In a cluster: replicas of each member's root disk (1-3).
    #[arg(long)]
    pub disk_replicas: Option<u32>,
    /// In a cluster: keep each member's disk on its host (a failed host's
    /// members are then replaced rather than restarted).
    #[arg(long, conflicts_with = "disk_replicas")]
    pub local_disk: bool,
}

impl TemplateArgs {
    fn given(&self) -> bool {
        self.kind.is_some()
            || self.image.is_some()
            || self.instance_type.is_some()
            || self.vcpus.is_some()
            || self.memory.is_some()
            || self.network.is_some()
            || !self.security_groups.is_empty()
            || !self.labels.is_empty()
            || !self.keys.is_empty()
            || self.user_data.is_some()
            || self.disk_replicas.is_some()
            || self.restart.is_some()
            || self.local_disk
    }

    fn template(&self) -> Result<CreateInstanceRequest> {
        let Some(image) = self.image.clone() else {
            bail!("--image is required: the image members boot");
        };
        let instance_type = match (&self.instance_type, self.vcpus, self.memory) {
            (None, None, None) => Some("small".to_string()),
            (t, _, _) => t.clone(),
        };
        let mut labels = skyvisor_core::labels::Labels::new();
        for l in &self.labels {
            let Some((k, v)) = l.split_once('=') else {
                bail!("--label {l:?} is not KEY=VALUE");
            };
            labels.insert(k.to_string(), v.to_string());
        }
        let user_data = match &self.user_data {
            Some(p) => Some(crate::commands::read_user_data(p)?),
            None => None,
        };
        Ok(CreateInstanceRequest {
            kind: self
                .kind
                .filter(|k| *k == skyvisor_core::InstanceKind::Container),
            image,
            instance_type,
            vcpus: self.vcpus,
            memory_mib: self.memory,
            network: self.network.clone(),
            security_groups: self.security_groups.clone(),
            labels,
            keys: self.keys.clone(),
            user_data,
            disk_replicas: self.disk_replicas,
            restart_policy: self.restart,
            local_disk: self.local_disk.then_some(true),
            ..Default::default()
        })
    }
}

/// Health-check arguments.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Health check of each member: http:PORT[/PATH] or tcp:PORT.
    #[arg(long)]
    pub health: Option<String>,
    /// Seconds between checks (default 5).
    #[arg(long, requires = "health")]
    pub health_interval: Option<u32>,
    /// Seconds after a member's start before failed checks count
    /// (default 300).
    #[arg(long, requires = "health")]
    pub health_grace: Option<u32>,
}

impl HealthArgs {
    fn check(&self) -> Result<Option<HealthCheck>> {
        let Some(text) = &self.health else {
            return Ok(None);
        };
        let mut check = HealthCheck::parse_short(text).map_err(|e| anyhow::anyhow!(e.message))?;
        if let Some(i) = self.health_interval {
            check.interval_secs = i;
            check.timeout_secs = check.timeout_secs.min(i);
        }
        if let Some(g) = self.health_grace {
            check.grace_secs = g;
        }
        Ok(Some(check))
    }
}

/// How a template change rolls through the members.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// Members made beyond the desired count at a time during a rolling
    /// update (default 1).
    #[arg(long)]
    max_surge: Option<u32>,
    /// Members fewer than the desired count that may be serving during a
    /// rolling update (default 0: never fewer).
    #[arg(long)]
    max_unavailable: Option<u32>,
}

impl RolloutArgs {
    fn rollout(&self) -> Option<skyvisor_core::group::Rollout> {
        if self.max_surge.is_none() && self.max_unavailable.is_none() {
            return None;
        }
        let d = skyvisor_core::group::Rollout::default();
        Some(skyvisor_core::group::Rollout {
            max_surge: self.max_surge.unwrap_or(d.max_surge),
            max_unavailable: self.max_unavailable.unwrap_or(d.max_unavailable),
        })
    }
}

/// `skyvisor group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Make a group; its members are made from the template.
    Create {
        /// Name (lowercase letters, digits and '-'; at most 57).
        name: String,
        /// The launch template.
        #[command(flatten)]
        template: TemplateArgs,
        /// The members' health check.
        #[command(flatten)]
        health: HealthArgs,
        /// How template changes roll.
        #[command(flatten)]
        rollout: RolloutArgs,
        /// Fewest members (default 1).
        #[arg(long)]
        min: Option<u32>,
        /// Most members (default the larger of min and desired).
        #[arg(long)]
        max: Option<u32>,
        /// Members wanted now (default min).
        #[arg(long)]
        desired: Option<u32>,
        /// Wait until `desired` members run and are healthy.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// List the project's groups.
    #[command(alias = "ls")]
    List,
    /// Show a group with its members and their health.
    Show {
        /// The group.
        name: String,
    },
    /// Set the number of members wanted.
    Scale {
        /// The group.
        name: String,
        /// Members wanted.
        desired: u32,
        /// A new minimum.
        #[arg(long)]
        min: Option<u32>,
        /// A new maximum.
        #[arg(long)]
        max: Option<u32>,
        /// Wait until that many members run and are healthy.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Change the template or health check: members are replaced one at
    /// a time, a new one serving before an old one goes. A new template
    /// is given whole (--image is required with it).
    Update {
        /// The group.
        name: String,
        /// The new launch template.
        #[command(flatten)]
        template: TemplateArgs,
        /// The new health check.
        #[command(flatten)]
        health: HealthArgs,
        /// How this and later template changes roll.
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Make the group size itself: by target vCPU utilisation, target new
    /// connections per second per member (through its load balancers), or
    /// a schedule; --off removes the policy.
    Autoscale {
        /// The group.
        name: String,
        /// Target average vCPU utilisation of the members, percent.
        #[arg(long)]
        target_cpu: Option<u32>,
        /// Target new connections per second per member.
        #[arg(long)]
        target_rps: Option<u32>,
        /// A scheduled size, HH:MM=N (UTC, daily; repeatable).
        #[arg(long = "at", value_name = "HH:MM=N")]
        schedule: Vec<String>,
        /// Seconds the metrics are averaged over (default 60).
        #[arg(long)]
        window: Option<u32>,
        /// Seconds after a change before scaling out again (default 60).
        #[arg(long)]
        out_cooldown: Option<u32>,
        /// Seconds after a change before scaling in (default 300).
        #[arg(long)]
        in_cooldown: Option<u32>,
        /// Remove the policy: the group keeps its desired size.
        #[arg(long, conflicts_with_all = ["target_cpu", "target_rps", "schedule"])]
        off: bool,
    },
    /// Delete a group and its members.
    #[command(alias = "rm")]
    Delete {
        /// The group.
        name: String,
        /// Wait until the group and its members are gone.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

fn path(name: &str) -> String {
    format!("/v1/groups/{}", path_segment(name))
}

fn print_one(format: OutputFormat, g: &Group) {
    output::print(format, g, |g| {
        let s = &g.spec;
        let health = s.health_check.as_ref().map_or("none".to_string(), |h| {
            format!(
                "{}:{}{} every {} s",
                match h.protocol {
                    skyvisor_core::group::HealthProtocol::Http => "http",
                    skyvisor_core::group::HealthProtocol::Tcp => "tcp",
                },
                h.port,
                h.path.as_deref().unwrap_or(""),
                h.interval_secs
            )
        });
        let mut rows = vec![
            ("name", s.name.to_string()),
            ("image", s.template.image.clone()),
            (
                "rollout",
                format!(
                    "max surge {}, max unavailable {}",
                    s.rollout.max_surge, s.rollout.max_unavailable
                ),
            ),
            (
                "type",
                s.template
                    .instance_type
                    .clone()
                    .unwrap_or_else(|| "custom".into()),
            ),
            (
                "size",
                format!(
                    "{} healthy of {} desired (min {}, max {})",
                    g.healthy, s.desired, s.min, s.max
                ),
            ),
            ("health check", health),
            ("template", format!("generation {}", s.template_generation)),
        ];
        if let Some(a) = &s.autoscale {
            let mut parts = Vec::new();
            if let Some(c) = a.target_cpu_percent {
                parts.push(format!("vCPU {c}%"));
            }
            if let Some(r) = a.target_requests_per_member {
                parts.push(format!("{r} conn/s per member"));
            }
            for z in &a.schedule {
                parts.push(format!("{} at {}", z.desired, z.at));
            }
            rows.push(("autoscale", parts.join(", ")));
        }
        if let Some(d) = &g.autoscaled {
            rows.push((
                "last scaled",
                format!(
                    "{} -> {} at {}: {}",
                    d.from,
                    d.to,
                    d.at.format("%H:%M:%S"),
                    d.reason
                ),
            ));
        }
        if s.deleting {
            rows.push(("state", "deleting".into()));
        }
        if let Some(m) = &g.message {
            rows.push(("message", m.clone()));
        }
        println!("{}", kv(&rows));
        let mut t = table(&["MEMBER", "PHASE", "HEALTH", "IP", "HOST", "TEMPLATE"]);
        for m in &g.members {
            t.add_row(vec![
                if m.leaving {
                    format!("{} (leaving)", m.name)
                } else {
                    m.name.clone()
                },
                m.phase.to_string(),
                m.health.to_string(),
                m.ip.clone(),
                m.host.clone().unwrap_or_default(),
                m.template_generation.to_string(),
            ]);
        }
        println!("{t}");
    });
}

/// Waits until `name` has `want` healthy members and no others; shows
/// progress.
async fn wait_settled(
    client: &Client,
    name: &str,
    timeout: Duration,
    quiet: bool,
) -> Result<Group> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::new(quiet);
    loop {
        let g: Group = client.get(&path(name)).await?;
        let present = g.members.iter().filter(|m| !m.leaving).count() as u32;
        let line = format!(
            "group {name}: {} healthy of {} desired, {} members{}",
            g.healthy,
            g.spec.desired,
            present,
            g.message
                .as_ref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
        progress.set(&line);
        if g.healthy == g.spec.desired && present == g.spec.desired {
            progress.finish();
            return Ok(g);
        }
        if Instant::now() >= deadline {
            progress.finish();
            bail!(
                "group {name} did not settle within {} s: {line}",
                timeout.as_secs()
            );
        }
        // Poll interval, bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `skyvisor group ...`.
pub async fn group(client: &Client, format: OutputFormat, cmd: GroupCommand) -> Result<()> {
    let quiet = format == OutputFormat::Json;
    match cmd {
        GroupCommand::Create {
            name,
            template,
            health,
            rollout,
            min,
            max,
            desired,
            wait,
            timeout,
        } => {
            let req = CreateGroupRequest {
                name: name.clone(),
                template: template.template()?,
                min,
                max,
                desired,
                health_check: health.check()?,
                autoscale: None,
                rollout: rollout.rollout(),
            };
            // Right after `skyvisor up` the image may still be building.
            let needs = Needs {
                image: Some(req.template.image.as_str()),
                hosts: 1,
            };
            readiness::wait_for(client, needs, Duration::from_secs(timeout), quiet).await?;
            let mut g: Group = client.post("/v1/groups", &req).await?;
            if wait {
                g = wait_settled(client, &name, Duration::from_secs(timeout), quiet).await?;
            }
            print_one(format, &g);
        }
        GroupCommand::List => {
            let list: Vec<Group> = client.get("/v1/groups").await?;
            output::print(format, &list, |list| {
                let mut t = table(&["NAME", "IMAGE", "TYPE", "HEALTHY", "DESIRED", "MIN", "MAX"]);
                for g in list {
                    t.add_row(vec![
                        g.spec.name.to_string(),
                        g.spec.template.image.clone(),
                        g.spec.template.instance_type.clone().unwrap_or_default(),
                        g.healthy.to_string(),
                        g.spec.desired.to_string(),
                        g.spec.min.to_string(),
                        g.spec.max.to_string(),
                    ]);
                }
                println!("{t}");
            });
        }
        GroupCommand::Show { name } => {
            let g: Group = client.get(&path(&name)).await?;
            print_one(format, &g);
        }
        GroupCommand::Scale {
            name,
            desired,
            min,
            max,
            wait,
            timeout,
        } => {
            let mut g: Group = client
                .post(
                    &format!("{}/scale", path(&name)),
                    &ScaleGroupRequest { desired, min, max },
                )
                .await?;
            if wait {
                g = wait_settled(client, &name, Duration::from_secs(timeout), quiet).await?;
            }
            print_one(format, &g);
        }
        GroupCommand::Update {
            name,
            template,
            health,
            rollout,
        } => {
            let req = UpdateGroupRequest {
                rollout: rollout.rollout(),
                template: if template.given() {
                    Some(template.template()?)
                } else {
                    None
                },
                health_check: health.check()?,
            };
            let g: Group = client.call(Method::PATCH, &path(&name), Some(&req)).await?;
            print_one(format, &g);
        }
        GroupCommand::Autoscale {
            name,
            target_cpu,
            target_rps,
            schedule,
            window,
            out_cooldown,
            in_cooldown,
            off,
        } => {
            let url = format!("{}/autoscale", path(&name));
            let g: Group = if off {
                client.call::<(), Group>(Method::DELETE, &url, None).await?
            } else {
                let mut sizes = Vec::new();
                for s in &schedule {
                    let Some((at, n)) = s.split_once('=') else {
                        bail!("--at {s:?} is not HH:MM=N");
                    };
                    let desired = n
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--at {s:?}: N is not a number"))?;
                    sizes.push(ScheduledSize {
                        at: at.to_string(),
                        desired,
                    });
                }
                // The server fills the defaults and checks every field.
                let mut body = serde_json::json!({ "schedule": sizes });
                for (k, v) in [
                    ("target_cpu_percent", target_cpu),
                    ("target_requests_per_member", target_rps),
                    ("window_secs", window),
                    ("scale_out_cooldown_secs", out_cooldown),
                    ("scale_in_cooldown_secs", in_cooldown),
                ] {
                    if let Some(v) = v {
                        body[k] = v.into();
                    }
                }
                client.call(Method::PUT, &url, Some(&body)).await?
            };
            print_one(format, &g);
        }
        GroupCommand::Delete {
            name,
            wait,
            timeout,
        } => {
            let g: Group = client
                .call::<(), Group>(Method::DELETE, &path(&name), None)
                .await?;
            if wait {
                let deadline = Instant::now() + Duration::from_secs(timeout);
                let mut progress = Progress::new(quiet);
                loop {
                    match client.get::<Group>(&path(&name)).await {
                        Err(e) if e.is_not_found() => break,
                        Err(e) => return Err(e.into()),
                        Ok(g) => {
                            progress
                                .set(&format!("group {name}: {} members left", g.members.len()));
                        }
                    }
                    if Instant::now() >= deadline {
                        bail!("group {name} still exists after {timeout} s");
                    }
                    // Poll interval, bounded by the deadline above.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                progress.finish();
                if format == OutputFormat::Table {
                    println!("group {name} deleted");
                }
            } else if format == OutputFormat::Table {
                println!(
                    "group {name} is being deleted with its {} members",
                    g.members.len()
                );
            }
        }
    }
    Ok(())
}
