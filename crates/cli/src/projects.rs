//! `skyvisor project ...`: projects, their quotas and usage, and who may
//! do what in them.
//!
//! It only asks the API; what a caller may do is decided there.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use skyvisor_core::auth::{
    CreateProjectRequest, GrantRequest, Identity, ProjectView, Quota, Role, UpdateProjectRequest,
    Usage,
};
use skyvisor_core::{IdentityName, ProjectName};

use crate::client::Client;
use crate::identities::identity_table;
use crate::output::{self, OutputFormat, kv, mib, table};
use crate::{parse_gib, parse_mib};

/// `skyvisor project ...`
#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project (cluster admins only).
    Create {
        /// Name (lowercase letters, digits and '-').
        name: ProjectName,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Its limits (default: none).
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// List the projects you can see, with usage and limits.
    #[command(alias = "ls")]
    List,
    /// Show a project: its quota and what it uses.
    Show {
        /// The project.
        name: ProjectName,
    },
    /// Change a project's limits; the others stay as they are.
    SetQuota {
        /// The project.
        name: ProjectName,
        /// The limits to change ('none' or 'unlimited' removes one).
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Delete an empty project.
    #[command(alias = "rm")]
    Delete {
        /// The project.
        name: ProjectName,
    },
    /// Give an identity a role in a project (replacing its old one there).
    Grant {
        /// The project.
        name: ProjectName,
        /// The user or service account.
        identity: IdentityName,
        /// viewer, member or admin.
        role: Role,
    },
    /// Take an identity's role in a project away.
    Revoke {
        /// The project.
        name: ProjectName,
        /// The user or service account.
        identity: IdentityName,
    },
}

/// A limit given on the command line: a number, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit<T> {
    /// `none` / `unlimited`: no limit.
    Unlimited,
    /// At most this much.
    Max(T),
}

impl<T> Limit<T> {
    fn into_option(self) -> Option<T> {
        match self {
            Limit::Unlimited => None,
            Limit::Max(v) => Some(v),
        }
    }
}

fn parse_limit<T>(s: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Limit<T>, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "none" | "unlimited" => Ok(Limit::Unlimited),
        _ => parse(s).map(Limit::Max),
    }
}

/// Parses a count limit: a number, or `none`/`unlimited`.
pub fn parse_count_limit(s: &str) -> Result<Limit<u32>, String> {
    parse_limit(s, |s| {
        s.trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a count; give a number, or 'none' for no limit"))
    })
}

/// Parses a memory limit: a size like `64G` (→ MiB), or `none`/`unlimited`.
pub fn parse_memory_limit(s: &str) -> Result<Limit<u64>, String> {
    parse_limit(s, parse_mib)
}

/// Parses a disk limit: a size like `500G` or `2T` (→ GiB), or
/// `none`/`unlimited`.
pub fn parse_disk_limit(s: &str) -> Result<Limit<u64>, String> {
    parse_limit(s, parse_gib)
}

/// The `--max-*` flags of a project's quota.
#[derive(Debug, Clone, Default, Args)]
pub struct QuotaArgs {
    /// At most this many instances ('none': no limit).
    #[arg(long, value_name = "N", value_parser = parse_count_limit)]
    pub max_instances: Option<Limit<u32>>,
    /// At most this many vCPUs, all instances together.
    #[arg(long, value_name = "N", value_parser = parse_count_limit)]
    pub max_vcpus: Option<Limit<u32>>,
    /// At most this much memory, all instances together, e.g. 64G.
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_limit)]
    pub max_memory: Option<Limit<u64>>,
    /// At most this many volumes (root disks of volume-backed VMs included).
    #[arg(long, value_name = "N", value_parser = parse_count_limit)]
    pub max_volumes: Option<Limit<u32>>,
    /// At most this much volume size, all volumes together, e.g. 500G or 2T.
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_limit)]
    pub max_volume_size: Option<Limit<u64>>,
    /// At most this many snapshots of instances and volumes.
    #[arg(long, value_name = "N", value_parser = parse_count_limit)]
    pub max_snapshots: Option<Limit<u32>>,
}

impl QuotaArgs {
    /// Whether no flag was given.
    pub fn is_empty(&self) -> bool {
        self.max_instances.is_none()
            && self.max_vcpus.is_none()
            && self.max_memory.is_none()
            && self.max_volumes.is_none()
            && self.max_volume_size.is_none()
            && self.max_snapshots.is_none()
    }

    /// `quota` with the given flags applied: a number sets a limit, `none`
    /// clears it, an absent flag keeps it.
    pub fn apply(&self, quota: &Quota) -> Quota {
        fn merge<T: Copy>(flag: Option<Limit<T>>, old: Option<T>) -> Option<T> {
            match flag {
                Some(l) => l.into_option(),
                None => old,
            }
        }
        Quota {
            instances: merge(self.max_instances, quota.instances),
            vcpus: merge(self.max_vcpus, quota.vcpus),
            memory_mib: merge(self.max_memory, quota.memory_mib),
            volumes: merge(self.max_volumes, quota.volumes),
            volume_gib: merge(self.max_volume_size, quota.volume_gib),
            snapshots: merge(self.max_snapshots, quota.snapshots),
        }
    }
}

/// `used/limit`, or `used` when unlimited.
fn used_of(used: u64, limit: Option<u64>, show: impl Fn(u64) -> String) -> String {
    match limit {
        Some(l) => format!("{}/{}", show(used), show(l)),
        None => show(used),
    }
}

/// One row per resource: (name, used, limit), shown for people.
fn resources(usage: &Usage, quota: &Quota) -> [(&'static str, String, String); 6] {
    let count = |n: u64| n.to_string();
    let gib = |n: u64| format!("{n} GiB");
    let limit = |l: Option<u64>, show: &dyn Fn(u64) -> String| {
        l.map(show).unwrap_or_else(|| "unlimited".into())
    };
    [
        (
            "instances",
            count(usage.instances.into()),
            limit(quota.instances.map(u64::from), &count),
        ),
        (
            "vcpus",
            count(usage.vcpus.into()),
            limit(quota.vcpus.map(u64::from), &count),
        ),
        (
            "memory",
            mib(usage.memory_mib),
            limit(quota.memory_mib, &mib),
        ),
        (
            "volumes",
            count(usage.volumes.into()),
            limit(quota.volumes.map(u64::from), &count),
        ),
        (
            "volume size",
            gib(usage.volume_gib),
            limit(quota.volume_gib, &gib),
        ),
        (
            "snapshots",
            count(usage.snapshots.into()),
            limit(quota.snapshots.map(u64::from), &count),
        ),
    ]
}

fn project_table(list: &[ProjectView]) {
    let mut t = table(&[
        "NAME",
        "INSTANCES",
        "VCPUS",
        "MEMORY",
        "VOLUMES",
        "VOLUME GIB",
        "SNAPSHOTS",
        "DESCRIPTION",
    ]);
    let count = |n: u64| n.to_string();
    for v in list {
        let (u, q) = (&v.usage, &v.project.quota);
        t.add_row(vec![
            v.project.name.to_string(),
            used_of(u.instances.into(), q.instances.map(u64::from), count),
            used_of(u.vcpus.into(), q.vcpus.map(u64::from), count),
            used_of(u.memory_mib, q.memory_mib, mib),
            used_of(u.volumes.into(), q.volumes.map(u64::from), count),
            used_of(u.volume_gib, q.volume_gib, count),
            used_of(u.snapshots.into(), q.snapshots.map(u64::from), count),
            v.project.description.clone(),
        ]);
    }
    println!("{t}");
}

fn project_detail(v: &ProjectView) {
    println!(
        "{}",
        kv(&[
            ("name", v.project.name.to_string()),
            ("description", v.project.description.clone()),
            ("created", v.project.created_at.to_rfc3339()),
        ])
    );
    let mut t = table(&["RESOURCE", "USED", "LIMIT"]);
    for (what, used, limit) in resources(&v.usage, &v.project.quota) {
        t.add_row(vec![what.to_string(), used, limit]);
    }
    println!("{t}");
}

/// Runs `skyvisor project ...`.
pub async fn project(client: &Client, format: OutputFormat, cmd: ProjectCommand) -> Result<()> {
    let quiet = format == OutputFormat::Json;
    match cmd {
        ProjectCommand::Create {
            name,
            description,
            quota,
        } => {
            let req = CreateProjectRequest {
                name,
                description,
                quota: quota.apply(&Quota::default()),
            };
            let v: ProjectView = client.post("/v1/projects", &req).await?;
            output::print(format, &v, project_detail);
        }
        ProjectCommand::List => {
            let list: Vec<ProjectView> = client.get("/v1/projects").await?;
            output::print(format, &list, |l| project_table(l));
        }
        ProjectCommand::Show { name } => {
            let v: ProjectView = client.get(&format!("/v1/projects/{name}")).await?;
            output::print(format, &v, project_detail);
        }
        ProjectCommand::SetQuota { name, quota } => {
            if quota.is_empty() {
                bail!(
                    "give at least one limit: --max-instances, --max-vcpus, --max-memory, \
                     --max-volumes, --max-volume-size or --max-snapshots (a number, or 'none')"
                );
            }
            let path = format!("/v1/projects/{name}");
            let old: ProjectView = client.get(&path).await?;
            let req = UpdateProjectRequest {
                description: None,
                quota: Some(quota.apply(&old.project.quota)),
            };
            let v: ProjectView = client.call(Method::PATCH, &path, Some(&req)).await?;
            output::print(format, &v, project_detail);
        }
        ProjectCommand::Delete { name } => {
            client
                .call::<(), ()>(Method::DELETE, &format!("/v1/projects/{name}"), None)
                .await?;
            if !quiet {
                eprintln!("project {name} deleted");
            }
        }
        ProjectCommand::Grant {
            name,
            identity,
            role,
        } => {
            let id: Identity = client
                .call(
                    Method::PUT,
                    &format!("/v1/projects/{name}/members/{identity}"),
                    Some(&GrantRequest { role }),
                )
                .await?;
            output::print(format, &id, |id| {
                eprintln!("{identity} is now {role} in project {name}");
                identity_table(std::slice::from_ref(id));
            });
        }
        ProjectCommand::Revoke { name, identity } => {
            let id: Identity = client
                .call::<(), Identity>(
                    Method::DELETE,
                    &format!("/v1/projects/{name}/members/{identity}"),
                    None,
                )
                .await?;
            output::print(format, &id, |id| {
                eprintln!("{identity} no longer has a role in project {name}");
                identity_table(std::slice::from_ref(id));
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_numbers_sizes_and_none() {
        assert_eq!(parse_count_limit("10"), Ok(Limit::Max(10)));
        assert_eq!(parse_count_limit("none"), Ok(Limit::Unlimited));
        assert_eq!(parse_count_limit("Unlimited"), Ok(Limit::Unlimited));
        assert!(parse_count_limit("-1").is_err());
        assert!(parse_count_limit("ten").is_err());
        assert_eq!(parse_memory_limit("64G"), Ok(Limit::Max(65536)));
        assert_eq!(parse_memory_limit("512"), Ok(Limit::Max(512)));
        assert_eq!(parse_memory_limit("none"), Ok(Limit::Unlimited));
        assert_eq!(parse_disk_limit("2T"), Ok(Limit::Max(2048)));
        assert_eq!(parse_disk_limit("unlimited"), Ok(Limit::Unlimited));
        assert!(parse_disk_limit("5M").is_err());
    }

    #[test]
    fn quota_flags_merge_into_the_old_quota() {
        let old = Quota {
            instances: Some(10),
            vcpus: Some(20),
            memory_mib: Some(8192),
            ..Quota::default()
        };
        let flags = QuotaArgs {
            max_instances: Some(Limit::Max(5)),
            max_vcpus: Some(Limit::Unlimited),
            max_snapshots: Some(Limit::Max(3)),
            ..QuotaArgs::default()
        };
        assert!(!flags.is_empty());
        assert!(QuotaArgs::default().is_empty());
        assert_eq!(
            flags.apply(&old),
            Quota {
                instances: Some(5),
                vcpus: None,
                memory_mib: Some(8192),
                volumes: None,
                volume_gib: None,
                snapshots: Some(3),
            }
        );
        assert_eq!(QuotaArgs::default().apply(&old), old);
    }

    #[test]
    fn usage_cells() {
        let count = |n: u64| n.to_string();
        assert_eq!(used_of(3, Some(10), count), "3/10");
        assert_eq!(used_of(3, None, count), "3");
        assert_eq!(used_of(2048, Some(8192), mib), "2 GiB/8 GiB");
    }
}
