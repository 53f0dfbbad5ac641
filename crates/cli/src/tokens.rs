//! `skyvisor token ...`: API tokens, made, listed and revoked.
//!
//! A new token's secret is printed once, alone on standard output (so
//! `T=$(skyvisor token create)` works); nothing else here ever prints one.

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use reqwest::Method;
use skyvisor_core::IdentityName;
use skyvisor_core::auth::{CreateTokenRequest, CreatedToken, TokenView};

use crate::client::{Client, path_segment};
use crate::output::{self, OutputFormat, ago, table};

/// `skyvisor token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed once, keep it.
    Create {
        /// Whose token (default: your own).
        #[arg(long)]
        identity: Option<IdentityName>,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Stop working after this long, e.g. 12h or 30d (default: never).
        #[arg(long, value_name = "DURATION", value_parser = parse_expiry)]
        expires: Option<u64>,
    },
    /// List tokens (never their secrets).
    #[command(alias = "ls")]
    List {
        /// Only this identity's.
        #[arg(long)]
        identity: Option<IdentityName>,
    },
    /// Revoke a token: it stops working at once.
    #[command(alias = "rm")]
    Revoke {
        /// The token's id (see `skyvisor token list`).
        id: String,
    },
}

/// Parses a lifetime like `30d` or `12h` into whole seconds (at least 1).
pub fn parse_expiry(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 12h or 30d: {e}"))?;
    match d.as_secs() {
        0 => Err(format!("{s:?} is shorter than a second")),
        secs => Ok(secs),
    }
}

fn since(at: Option<DateTime<Utc>>, now: DateTime<Utc>, never: &str) -> String {
    match at {
        Some(t) => format!("{} ago", ago((now - t).num_seconds())),
        None => never.into(),
    }
}

fn expires_text(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match at {
        None => "never".into(),
        Some(t) if t > now => format!("in {}", ago((t - now).num_seconds())),
        Some(t) => format!("expired {} ago", ago((now - t).num_seconds())),
    }
}

fn token_table(list: &[TokenView]) {
    let now = Utc::now();
    let mut t = table(&[
        "ID",
        "IDENTITY",
        "DESCRIPTION",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "REVOKED",
    ]);
    for tok in list {
        t.add_row(vec![
            tok.id.clone(),
            tok.identity.to_string(),
            tok.description.clone(),
            since(Some(tok.created_at), now, "-"),
            expires_text(tok.expires_at, now),
            since(tok.last_used_at, now, "never"),
            since(tok.revoked_at, now, "-"),
        ]);
    }
    println!("{t}");
}

/// Runs `skyvisor token ...`.
pub async fn token(client: &Client, format: OutputFormat, cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            identity,
            description,
            expires,
        } => {
            let req = CreateTokenRequest {
                identity,
                description,
                expires_in_secs: expires,
            };
            let created: CreatedToken = client.post("/v1/tokens", &req).await?;
            output::print(format, &created, |c| {
                println!("{}", c.token);
                eprintln!(
                    "token {} for {} ({}): this is the only time it is shown; keep it",
                    c.view.id,
                    c.view.identity,
                    match c.view.expires_at {
                        Some(t) => format!("expires {}", t.to_rfc3339()),
                        None => "never expires".into(),
                    }
                );
            });
        }
        TokenCommand::List { identity } => {
            let path = match identity {
                Some(i) => format!("/v1/tokens?identity={i}"),
                None => "/v1/tokens".into(),
            };
            let list: Vec<TokenView> = client.get(&path).await?;
            output::print(format, &list, |l| token_table(l));
        }
        TokenCommand::Revoke { id } => {
            client
                .call::<(), ()>(
                    Method::DELETE,
                    &format!("/v1/tokens/{}", path_segment(&id)),
                    None,
                )
                .await?;
            if format != OutputFormat::Json {
                eprintln!("token {id} revoked");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    #[test]
    fn expiry_durations() {
        assert_eq!(parse_expiry("30d"), Ok(30 * 86400));
        assert_eq!(parse_expiry("12h"), Ok(12 * 3600));
        assert_eq!(parse_expiry("1h 30m"), Ok(5400));
        assert!(parse_expiry("500ms").is_err());
        assert!(parse_expiry("soon").is_err());
    }

    #[test]
    fn times_for_people() {
        let now = Utc::now();
        assert_eq!(expires_text(None, now), "never");
        assert_eq!(expires_text(Some(now + Duration::days(3)), now), "in 3d");
        assert_eq!(
            expires_text(Some(now - Duration::hours(3)), now),
            "expired 3h ago"
        );
        assert_eq!(since(None, now, "never"), "never");
        assert_eq!(since(Some(now - Duration::minutes(5)), now, "-"), "5m ago");
    }
}
