//! `skyvisor remote ...`: the named APIs of the config file, and which one
//! is current.
//!
//! These commands only edit the config file; they never contact a server
//! and never print a token.

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;

use crate::config::{ConfigFile, ConnectionArgs, Remote, given, validate_url};
use crate::output::{self, OutputFormat, table};

/// `skyvisor remote ...`
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Add a remote; the first one becomes current. The global --token and
    /// --project, if given, are saved with it.
    Add {
        /// Its name (lowercase letters, digits and '-').
        name: String,
        /// The API's URL, e.g. http://10.0.0.5:7780 (servers of one cluster
        /// comma-separated).
        url: String,
        /// For an https URL: trust the CA the server presents without
        /// asking (after checking its fingerprint some other way).
        #[arg(long)]
        accept_certificate: bool,
        /// For an https URL: the CA fingerprint to expect (what `skyvisor
        /// server --tls` printed); anything else is refused.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// List remotes (tokens are shown as set or unset, never their value).
    #[command(alias = "ls")]
    List,
    /// Make a remote the current one.
    #[command(alias = "use")]
    Switch {
        /// The remote.
        name: String,
    },
    /// Remove a remote and its token from the config file.
    #[command(alias = "rm")]
    Remove {
        /// The remote.
        name: String,
    },
}

/// A remote as listed: never its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteView {
    /// Its name.
    pub name: String,
    /// The API's URL.
    pub url: String,
    /// The project it acts in, if set.
    pub project: Option<String>,
    /// Whether it is the current remote.
    pub current: bool,
    /// Whether a token is saved for it.
    pub token_set: bool,
}

impl RemoteView {
    fn new(name: &str, remote: &Remote, current: bool) -> Self {
        Self {
            name: name.to_owned(),
            url: remote.url.clone(),
            project: remote.project.clone(),
            current,
            token_set: remote.token.is_some(),
        }
    }
}

/// The remotes of `config`, by name.
pub fn views(config: &ConfigFile) -> Vec<RemoteView> {
    let current = config.current();
    config
        .remotes
        .iter()
        .map(|(name, r)| RemoteView::new(name, r, current == Some(name.as_str())))
        .collect()
}

fn remote_table(list: &[RemoteView]) {
    let mut t = table(&["NAME", "URL", "PROJECT", "CURRENT", "TOKEN"]);
    for r in list {
        t.add_row(vec![
            r.name.clone(),
            r.url.clone(),
            r.project.clone().unwrap_or_else(|| "-".into()),
            if r.current { "*" } else { "" }.into(),
            if r.token_set { "set" } else { "unset" }.into(),
        ]);
    }
    println!("{t}");
}

/// Runs `skyvisor remote ...` on the config file `args` names.
pub async fn remote(args: &ConnectionArgs, format: OutputFormat, cmd: RemoteCommand) -> Result<()> {
    let path = args.config_path()?;
    let mut config = ConfigFile::load(&path)?;
    let quiet = format == OutputFormat::Json;
    match cmd {
        RemoteCommand::List => {
            let list = views(&config);
            output::print(format, &list, |l| {
                if l.is_empty() {
                    eprintln!(
                        "no remotes in {}; add one with `skyvisor remote add NAME URL`",
                        path.display()
                    );
                } else {
                    remote_table(l);
                }
            });
            return Ok(());
        }
        RemoteCommand::Add {
            name,
            url,
            accept_certificate,
            fingerprint,
        } => {
            let url = url.trim().to_owned();
            validate_url(&url)?;
            let ca_cert = pin(&url, accept_certificate, fingerprint.as_deref()).await?;
            let project = given(&args.project);
            if let Some(p) = &project {
                skyvisor_core::ProjectName::new(p.as_str())?;
            }
            let remote = Remote {
                ca_cert,
                url,
                token: given(&args.token),
                project,
            };
            let current = config.add_remote(&name, remote.clone())?;
            config.save(&path)?;
            output::print(format, &RemoteView::new(&name, &remote, current), |_| {
                eprintln!(
                    "remote {name} added{}",
                    if current {
                        "; it is the current one"
                    } else {
                        ""
                    }
                );
            });
        }
        RemoteCommand::Switch { name } => {
            config.switch(&name)?;
            config.save(&path)?;
            let view = RemoteView::new(&name, config.remote(&name)?, true);
            output::print(format, &view, |v| {
                eprintln!("now using remote {name} ({})", v.url);
            });
        }
        RemoteCommand::Remove { name } => {
            let was_current = config.current() == Some(name.as_str());
            let removed = config.remove_remote(&name)?;
            config.save(&path)?;
            output::print(format, &RemoteView::new(&name, &removed, false), |_| {
                eprintln!(
                    "remote {name} removed{}",
                    if was_current {
                        "; no remote is current now (see `skyvisor remote switch`)"
                    } else {
                        ""
                    }
                );
            });
        }
    }
    if !quiet {
        // The table of what is configured now, for people.
        remote_table(&views(&config));
    }
    Ok(())
}

/// For an `https` URL: the CA to pin, once the user accepted its
/// fingerprint (or it matched `expected`). Plain `http`: none.
async fn pin(url: &str, accept: bool, expected: Option<&str>) -> Result<Option<String>> {
    let Some(first) = url
        .split(',')
        .map(str::trim)
        .find(|u| u.starts_with("https://"))
    else {
        return Ok(None);
    };
    let (pem, fp) = crate::pinning::server_ca(first).await?;
    if let Some(want) = expected {
        if crate::pinning::normalized(want) != crate::pinning::normalized(&fp) {
            anyhow::bail!(
                "{first} presents a CA with fingerprint {fp}, not {want}: refusing it (is something between you and the server?)"
            );
        }
        return Ok(Some(pem));
    }
    if accept {
        eprintln!("trusting the CA of {first}: {fp}");
        return Ok(Some(pem));
    }
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "{first} presents a CA with fingerprint {fp}; check it against the server's (`skyvisor server --tls` prints it), then add the remote with --fingerprint {fp} or --accept-certificate"
        );
    }
    eprint!("{first} presents a CA with fingerprint\n  {fp}\nTrust it for this remote? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(Some(pem))
    } else {
        anyhow::bail!("not trusted: the remote was not added")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remote_commands_edit_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        let args = ConnectionArgs {
            config_file: Some(path.clone()),
            token: Some("secret".into()),
            project: Some("web".into()),
            ..ConnectionArgs::default()
        };
        let json = OutputFormat::Json;
        remote(
            &args,
            json,
            RemoteCommand::Add {
                name: "lab".into(),
                url: "http://10.0.0.5:7780".into(),
                accept_certificate: false,
                fingerprint: None,
            },
        )
        .await
        .expect("add");
        remote(
            &ConnectionArgs {
                config_file: Some(path.clone()),
                ..ConnectionArgs::default()
            },
            json,
            RemoteCommand::Add {
                name: "prod".into(),
                url: "http://prod:7780".into(),
                accept_certificate: false,
                fingerprint: None,
            },
        )
        .await
        .expect("add");
        let config = ConfigFile::load(&path).expect("load");
        assert_eq!(
            views(&config),
            vec![
                RemoteView {
                    name: "lab".into(),
                    url: "http://10.0.0.5:7780".into(),
                    project: Some("web".into()),
                    current: true,
                    token_set: true,
                },
                RemoteView {
                    name: "prod".into(),
                    url: "http://prod:7780".into(),
                    project: None,
                    current: false,
                    token_set: false,
                },
            ]
        );
        let listed = serde_json::to_string(&views(&config)).expect("json");
        assert!(!listed.contains("secret"), "{listed}");

        let err = remote(
            &args,
            json,
            RemoteCommand::Switch {
                name: "nope".into(),
            },
        )
        .await
        .expect_err("unknown");
        assert!(
            err.to_string().contains("known remotes: lab, prod"),
            "{err}"
        );
        let err = remote(
            &args,
            json,
            RemoteCommand::Add {
                name: "lab".into(),
                url: "http://x:1".into(),
                accept_certificate: false,
                fingerprint: None,
            },
        )
        .await
        .expect_err("taken");
        assert!(err.to_string().contains("already exists"), "{err}");

        remote(
            &args,
            json,
            RemoteCommand::Switch {
                name: "prod".into(),
            },
        )
        .await
        .expect("switch");
        assert_eq!(
            ConfigFile::load(&path).expect("load").current(),
            Some("prod")
        );
        remote(
            &args,
            json,
            RemoteCommand::Remove {
                name: "prod".into(),
            },
        )
        .await
        .expect("remove");
        let config = ConfigFile::load(&path).expect("load");
        assert_eq!(config.current(), None);
        assert_eq!(config.remote_names(), vec!["lab".to_string()]);
        let err = remote(
            &args,
            json,
            RemoteCommand::Remove {
                name: "prod".into(),
            },
        )
        .await
        .expect_err("gone");
        assert!(err.to_string().contains("known remotes: lab"), "{err}");
    }
}
