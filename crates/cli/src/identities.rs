//! `skyvisor identity ...`: users and service accounts, and their roles.
//!
//! It only asks the API; who may create identities is decided there.

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{Result, bail};
use clap::Subcommand;
use reqwest::Method;
use skyvisor_core::auth::{CreateIdentityRequest, Identity, IdentityKind, Role};
use skyvisor_core::{IdentityName, ProjectName};

use crate::client::Client;
use crate::output::{self, OutputFormat, kv, table};

/// `skyvisor identity ...`
#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create a user (or, with --service-account, a program's identity).
    Create {
        /// Name (lowercase letters, digits and '-').
        name: IdentityName,
        /// A program (CI, an autoscaler), not a person.
        #[arg(long)]
        service_account: bool,
        /// May manage hosts, projects, identities and cluster settings, and
        /// is admin in every project.
        #[arg(long)]
        cluster_admin: bool,
        /// May read every server's and agent's metrics and the scrape
        /// targets, nothing else (for a Prometheus).
        #[arg(long)]
        cluster_monitor: bool,
        /// A role in a project, e.g. web=member; repeatable.
        #[arg(long = "role", value_name = "PROJECT=ROLE", value_parser = parse_project_role)]
        roles: Vec<ProjectRole>,
        /// The project it acts in when a request names none.
        #[arg(long)]
        default_project: Option<ProjectName>,
    },
    /// List identities.
    #[command(alias = "ls")]
    List,
    /// Show an identity and its roles.
    Show {
        /// The identity.
        name: IdentityName,
    },
    /// Delete an identity and its tokens.
    #[command(alias = "rm")]
    Delete {
        /// The identity.
        name: IdentityName,
    },
}

/// `PROJECT=ROLE` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRole {
    /// The project.
    pub project: ProjectName,
    /// The role in it.
    pub role: Role,
}

/// Parses `PROJECT=ROLE`, e.g. `web=member`.
pub fn parse_project_role(s: &str) -> Result<ProjectRole, String> {
    let Some((project, role)) = s.split_once('=') else {
        return Err(format!(
            "{s:?} is not PROJECT=ROLE (e.g. web=member; roles: viewer, member, admin)"
        ));
    };
    Ok(ProjectRole {
        project: ProjectName::new(project.trim()).map_err(|e| e.to_string())?,
        role: Role::from_str(role.trim())?,
    })
}

/// The roles of `--role` flags, by project; a project given twice is an
/// error.
pub fn roles_by_project(roles: Vec<ProjectRole>) -> Result<BTreeMap<ProjectName, Role>> {
    let mut out = BTreeMap::new();
    for r in roles {
        if let Some(old) = out.insert(r.project.clone(), r.role)
            && old != r.role
        {
            bail!(
                "project {} is given two roles ({old} and {}); give one",
                r.project,
                r.role
            );
        }
    }
    Ok(out)
}

/// Roles as `default=admin,web=viewer`.
pub fn roles_text(id: &Identity) -> String {
    id.roles
        .iter()
        .map(|(p, r)| format!("{p}={r}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What an identity may do cluster-wide.
fn cluster_text(id: &Identity) -> &'static str {
    match (id.cluster_admin, id.cluster_monitor) {
        (true, _) => "admin",
        (false, true) => "monitor (metrics)",
        (false, false) => "-",
    }
}

/// Prints identities as a table.
pub fn identity_table(list: &[Identity]) {
    let mut t = table(&["NAME", "KIND", "CLUSTER", "ROLES"]);
    for id in list {
        t.add_row(vec![
            id.name.to_string(),
            id.kind.to_string(),
            cluster_text(id).into(),
            roles_text(id),
        ]);
    }
    println!("{t}");
}

fn identity_detail(id: &Identity) {
    println!(
        "{}",
        kv(&[
            ("name", id.name.to_string()),
            ("kind", id.kind.to_string()),
            ("cluster", cluster_text(id).into()),
            (
                "default project",
                match &id.default_project {
                    Some(p) => p.to_string(),
                    None => format!("{} (implied)", id.home_project()),
                }
            ),
            ("created", id.created_at.to_rfc3339()),
        ])
    );
    if !id.roles.is_empty() {
        let mut t = table(&["PROJECT", "ROLE"]);
        for (project, role) in &id.roles {
            t.add_row(vec![project.to_string(), role.to_string()]);
        }
        println!("{t}");
    }
}

/// Runs `skyvisor identity ...`.
pub async fn identity(client: &Client, format: OutputFormat, cmd: IdentityCommand) -> Result<()> {
    match cmd {
        IdentityCommand::Create {
            name,
            service_account,
            cluster_admin,
            cluster_monitor,
            roles,
            default_project,
        } => {
            let req = CreateIdentityRequest {
                name,
                kind: if service_account {
                    IdentityKind::ServiceAccount
                } else {
                    IdentityKind::User
                },
                cluster_admin,
                cluster_monitor,
                roles: roles_by_project(roles)?,
                default_project,
            };
            let id: Identity = client.post("/v1/identities", &req).await?;
            output::print(format, &id, |id| {
                identity_detail(id);
                eprintln!(
                    "give it a token with `skyvisor token create --identity {}`",
                    id.name
                );
            });
        }
        IdentityCommand::List => {
            let list: Vec<Identity> = client.get("/v1/identities").await?;
            output::print(format, &list, |l| identity_table(l));
        }
        IdentityCommand::Show { name } => {
            let id: Identity = client.get(&format!("/v1/identities/{name}")).await?;
            output::print(format, &id, identity_detail);
        }
        IdentityCommand::Delete { name } => {
            client
                .call::<(), ()>(Method::DELETE, &format!("/v1/identities/{name}"), None)
                .await?;
            if format != OutputFormat::Json {
                eprintln!("identity {name} deleted");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_roles_parse() {
        let r = parse_project_role("web=member").expect("parse");
        assert_eq!(r.project.as_str(), "web");
        assert_eq!(r.role, Role::Member);
        assert!(parse_project_role("web").is_err());
        assert!(parse_project_role("web=owner").is_err());
        assert!(parse_project_role("Web=admin").is_err());
    }

    #[test]
    fn a_project_gets_one_role() {
        let p = |s: &str| parse_project_role(s).expect("parse");
        let roles = roles_by_project(vec![p("web=viewer"), p("db=admin"), p("web=viewer")])
            .expect("same role twice is fine");
        assert_eq!(roles.len(), 2);
        assert!(roles_by_project(vec![p("web=viewer"), p("web=admin")]).is_err());
    }
}
