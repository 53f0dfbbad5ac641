//! `skyvisor login` and `skyvisor whoami`: checking a token with the API,
//! keeping it in the config file, and saying who the caller is.
//!
//! A token is only ever saved after the API accepted it, and is never
//! printed.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result, bail};
use skyvisor_core::auth::{AuditRecord, WhoAmI};

use crate::client::{Client, ClientError};
use crate::config::{
    self, Connection, ConnectionArgs, DEFAULT_REMOTE, DEFAULT_URL, TokenSource, given,
    is_token_text,
};
use crate::output::{self, OutputFormat, kv, table};

/// Runs `skyvisor login`: the token comes from `--token` (or
/// `SKYVISOR_TOKEN`), else one line of standard input; it is checked with
/// `GET /v1/whoami` and, if the API accepts it, saved with the URL into the
/// remote (`--remote`, else the current one, else a new `default` one).
pub async fn login(args: &ConnectionArgs, format: OutputFormat) -> Result<()> {
    let path = args.config_path()?;
    let mut file = config::ConfigFile::load(&path)?;
    let name = args
        .chosen_remote(&file)
        .unwrap_or_else(|| DEFAULT_REMOTE.to_owned());
    let existing = file.remotes.get(&name);
    let url = given(&args.url)
        .or_else(|| existing.map(|r| r.url.clone()))
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    config::validate_url(&url)?;
    let project_flag = given(&args.project);
    let project = project_flag
        .clone()
        .or_else(|| existing.and_then(|r| r.project.clone()));
    if let Some(p) = &project {
        skyvisor_core::ProjectName::new(p.as_str())?;
    }
    let (token, source) = match given(&args.token) {
        Some(t) => (t, TokenSource::Flag),
        None => (read_token_from_stdin(&url)?, TokenSource::Stdin),
    };
    if !is_token_text(&token) {
        bail!(config::ConfigError::InvalidToken { source_of: source });
    }
    let client = Client::new(&url)
        .with_token(Some(token.clone()))
        .with_project(project);
    let me: WhoAmI = match client.get("/v1/whoami").await {
        Ok(me) => me,
        Err(ClientError::Api {
            status, message, ..
        }) if status == reqwest::StatusCode::UNAUTHORIZED => {
            bail!("the API at {url} refused the token: {message}; nothing was saved")
        }
        Err(e) => return Err(e.into()),
    };
    file.save_login(&name, &url, &token, project_flag.as_deref())?;
    file.save(&path)?;
    output::print(format, &me, |me| {
        println!(
            "logged in to {url} as {} ({}{}); project {}, role {}",
            me.identity.name,
            me.identity.kind,
            if me.identity.cluster_admin {
                ", cluster admin"
            } else {
                ""
            },
            me.project,
            role_text(me),
        );
        eprintln!("saved as remote {name:?} in {}", path.display());
    });
    Ok(())
}

/// Reads the token from standard input, prompting on the terminal.
fn read_token_from_stdin(url: &str) -> Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("API token for {url}: ");
        std::io::stderr().flush().ok();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the token from standard input")?;
    let token = line.trim().to_owned();
    if token.is_empty() {
        bail!("no token given: pass --token TOKEN or type it on standard input");
    }
    Ok(token)
}

/// Runs `skyvisor whoami`.
pub async fn whoami(client: &Client, conn: &Connection, format: OutputFormat) -> Result<()> {
    let me: WhoAmI = client.get("/v1/whoami").await?;
    output::print(format, &me, |me| {
        let id = &me.identity;
        println!(
            "{}",
            kv(&[
                ("identity", id.name.to_string()),
                ("kind", id.kind.to_string()),
                (
                    "cluster admin",
                    if id.cluster_admin { "yes" } else { "no" }.into()
                ),
                ("project", me.project.to_string()),
                ("role", role_text(me)),
                ("home project", id.home_project().to_string()),
                (
                    "token",
                    format!("{} (from {})", me.token_id, conn.token_source)
                ),
                ("api", client.base().to_string()),
            ])
        );
        if !id.roles.is_empty() {
            let mut t = table(&["PROJECT", "ROLE"]);
            for (project, role) in &id.roles {
                t.add_row(vec![project.to_string(), role.to_string()]);
            }
            println!("{t}");
        }
    });
    Ok(())
}

fn role_text(me: &WhoAmI) -> String {
    me.role
        .map(|r| r.to_string())
        .unwrap_or_else(|| "none".into())
}

/// `skyvisor audit`: the newest entries of the audit trail.
pub async fn audit(
    client: &Client,
    format: OutputFormat,
    limit: usize,
    cluster: bool,
) -> Result<()> {
    let path = format!("/v1/audit?limit={limit}&cluster={cluster}");
    let records: Vec<AuditRecord> = client.get(&path).await?;
    output::print(format, &records, |records| {
        let mut t = table(&["TIME", "IDENTITY", "PROJECT", "METHOD", "PATH", "STATUS"]);
        for r in records {
            t.add_row(vec![
                r.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                r.identity.to_string(),
                r.project
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |p| p.to_string()),
                r.method.clone(),
                r.path.clone(),
                r.status.to_string(),
            ]);
        }
        println!("{t}");
    });
    Ok(())
}
