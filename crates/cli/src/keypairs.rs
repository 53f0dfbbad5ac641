//! `skyvisor keypair ...`: a project's SSH public keys. A pair made by the
//! server has its private key written to a file of the user's (mode 0600)
//! or printed, once; the server keeps only the public half.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use reqwest::Method;
use skyvisor_core::keypair::{CreateKeyPairRequest, CreatedKeyPair, KeyPair};

use crate::client::{Client, path_segment};
use crate::output::{self, OutputFormat, kv, table};

/// `skyvisor keypair ...`
#[derive(Debug, Subcommand)]
pub enum KeyPairCommand {
    /// Import a public key (for example ~/.ssh/id_ed25519.pub).
    Import {
        /// Name (lowercase letters, digits and '-').
        name: String,
        /// The public key file.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Make a new Ed25519 pair: the server keeps the public key; the
    /// private key is written to --out (mode 0600) or printed, once.
    Create {
        /// Name (lowercase letters, digits and '-').
        name: String,
        /// Where to write the private key (refused if the file exists).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the project's key pairs.
    #[command(alias = "ls")]
    List,
    /// Show a key pair.
    Show {
        /// The key pair.
        name: String,
    },
    /// Delete a key pair (VMs that got it keep it).
    #[command(alias = "rm")]
    Delete {
        /// The key pair.
        name: String,
    },
}

fn print_one(format: OutputFormat, k: &KeyPair) {
    output::print(format, k, |k| {
        println!(
            "{}",
            kv(&[
                ("name", k.name.clone()),
                ("project", k.project.to_string()),
                ("algorithm", k.algorithm.clone()),
                ("fingerprint", k.fingerprint.clone()),
                ("public key", k.public_key.clone()),
            ])
        );
    });
}

/// Writes `private` to a new file readable by its owner only.
fn write_private_key(path: &PathBuf, private: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} for the private key", path.display()))?;
    f.write_all(private.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs `skyvisor keypair ...`.
pub async fn keypair(client: &Client, format: OutputFormat, cmd: KeyPairCommand) -> Result<()> {
    let path = |name: &str| format!("/v1/keypairs/{}", path_segment(name));
    match cmd {
        KeyPairCommand::Import { name, public_key } => {
            let text = std::fs::read_to_string(&public_key)
                .with_context(|| format!("cannot read {}", public_key.display()))?;
            let made: CreatedKeyPair = client
                .post(
                    "/v1/keypairs",
                    &CreateKeyPairRequest {
                        name,
                        public_key: Some(text),
                    },
                )
                .await?;
            print_one(format, &made.key_pair);
        }
        KeyPairCommand::Create { name, out } => {
            if let Some(p) = &out
                && p.exists()
            {
                bail!("{} exists; give another --out", p.display());
            }
            let made: CreatedKeyPair = client
                .post(
                    "/v1/keypairs",
                    &CreateKeyPairRequest {
                        name,
                        public_key: None,
                    },
                )
                .await?;
            let Some(private) = &made.private_key else {
                bail!("the server returned no private key");
            };
            match &out {
                Some(p) => {
                    write_private_key(p, private)?;
                    print_one(format, &made.key_pair);
                    if format == OutputFormat::Table {
                        println!(
                            "private key written to {} (shown nowhere else)",
                            p.display()
                        );
                    }
                }
                None => output::print(format, &made, |m| {
                    print!("{private}");
                    eprintln!(
                        "key pair {} ({}): the private key above is shown once; keep it",
                        m.key_pair.name, m.key_pair.fingerprint
                    );
                }),
            }
        }
        KeyPairCommand::List => {
            let list: Vec<KeyPair> = client.get("/v1/keypairs").await?;
            output::print(format, &list, |list| {
                let mut t = table(&["NAME", "ALGORITHM", "FINGERPRINT"]);
                for k in list {
                    t.add_row(vec![
                        k.name.clone(),
                        k.algorithm.clone(),
                        k.fingerprint.clone(),
                    ]);
                }
                println!("{t}");
            });
        }
        KeyPairCommand::Show { name } => {
            let k: KeyPair = client.get(&path(&name)).await?;
            print_one(format, &k);
        }
        KeyPairCommand::Delete { name } => {
            client
                .call::<(), ()>(Method::DELETE, &path(&name), None)
                .await?;
            if format == OutputFormat::Table {
                println!("key pair {name} deleted");
            }
        }
    }
    Ok(())
}
