//! Where the client connects and as whom: the config file of named remotes
//! (written by `skyvisor remote ...` and `skyvisor login`), the global
//! flags, and the bootstrap token file of a server on this host, resolved
//! into one [`Connection`].
//!
//! This module never talks to a server, and never prints, logs or puts a
//! token into an error message.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use skyvisor_core::ValidationError;
use skyvisor_core::names::{ProjectName, validate_name};
use thiserror::Error;

use crate::client::Client;

/// The API used when neither a flag nor a remote names one: a server on
/// this host.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7780";

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "SKYVISOR_CONFIG";

/// The remote `skyvisor login` creates when none is configured.
pub const DEFAULT_REMOTE: &str = "default";

/// What went wrong finding, reading or changing the client's configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// There is no per-user config directory and no `SKYVISOR_CONFIG`.
    #[error("cannot find your config directory; set SKYVISOR_CONFIG to the path of a config file")]
    NoConfigDir,
    /// The config file exists but could not be read.
    #[error("cannot read the config file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The config file is not valid.
    #[error("the config file {} is not valid: {source}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        #[source]
        source: toml::de::Error,
    },
    /// The configuration could not be encoded.
    #[error("cannot encode the config file: {0}")]
    Encode(#[from] toml::ser::Error),
    /// The config file could not be written.
    #[error("cannot write the config file {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No remote has this name.
    #[error("unknown remote {name:?}; {}", known_remotes_text(.known))]
    UnknownRemote {
        /// The name asked for.
        name: String,
        /// The remotes that exist.
        known: Vec<String>,
    },
    /// `remote add` of a name that is taken.
    #[error(
        "remote {name:?} already exists (url {url}); remove it first with `skyvisor remote remove {name}`"
    )]
    RemoteExists {
        /// The name.
        name: String,
        /// The existing remote's URL.
        url: String,
    },
    /// A remote name that breaks the naming rules.
    #[error(transparent)]
    InvalidName(#[from] ValidationError),
    /// A URL that is not an http(s) URL.
    #[error(
        "invalid API URL {url:?}: give http://HOST:PORT or https://HOST:PORT (servers of one cluster comma-separated)"
    )]
    InvalidUrl {
        /// The URL given.
        url: String,
    },
    /// A token with characters no token has (it is not shown).
    #[error(
        "the token from {source_of} contains spaces or control characters; it cannot be a Skyvisor token"
    )]
    InvalidToken {
        /// Where the token came from.
        source_of: TokenSource,
    },
}

fn known_remotes_text(known: &[String]) -> String {
    if known.is_empty() {
        "no remotes are configured (add one with `skyvisor remote add NAME URL`)".into()
    } else {
        format!("known remotes: {}", known.join(", "))
    }
}

/// One API the client knows by name: where it is and how to log in.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    /// The API's base URL (several servers of one cluster comma-separated).
    pub url: String,
    /// The bearer token to send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The project to act in (default: the identity's home project).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The cluster CA's certificate (PEM), pinned at `remote add`: the only
    /// one an `https` URL of this remote is trusted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("token", &redacted(&self.token))
            .field("project", &self.project)
            .finish()
    }
}

/// The client's config file: named remotes and the one in use.
///
/// ```toml
/// current_remote = "lab"
///
/// [remotes.lab]
/// url = "http://10.0.0.5:7780"
/// token = "..."
/// project = "web"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The remote used when `--remote` names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_remote: Option<String>,
    /// The remotes, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remotes: BTreeMap<String, Remote>,
}

const FILE_HEADER: &str = "# Skyvisor client configuration, written by `skyvisor remote` and\n\
                           # `skyvisor login`. It holds API tokens: keep it private.\n\n";

impl ConfigFile {
    /// Reads the config file at `path`; a missing file is an empty
    /// configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the configuration to `path` atomically (a temporary file
    /// renamed over it), readable by its owner only; a missing directory is
    /// created, private too.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = format!("{FILE_HEADER}{}", toml::to_string(self)?);
        let failed = |source| ConfigError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(failed)?;
        }
        let Some(file_name) = path.file_name() else {
            return Err(failed(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a file path",
            )));
        };
        let mut tmp_name = OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        // A leftover of a crashed run with our pid: it is ours to replace.
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(failed)
    }

    /// The names of the remotes, sorted.
    pub fn remote_names(&self) -> Vec<String> {
        self.remotes.keys().cloned().collect()
    }

    /// The remote called `name`.
    pub fn remote(&self, name: &str) -> Result<&Remote, ConfigError> {
        self.remotes.get(name).ok_or_else(|| self.unknown(name))
    }

    /// The current remote's name, if it names one that exists.
    pub fn current(&self) -> Option<&str> {
        self.current_remote
            .as_deref()
            .filter(|n| self.remotes.contains_key(*n))
    }

    /// Adds a remote; it becomes the current one when there is none.
    /// Returns whether it became current.
    pub fn add_remote(&mut self, name: &str, remote: Remote) -> Result<bool, ConfigError> {
        validate_name("remote name", name)?;
        validate_url(&remote.url)?;
        if let Some(old) = self.remotes.get(name) {
            return Err(ConfigError::RemoteExists {
                name: name.to_owned(),
                url: old.url.clone(),
            });
        }
        self.remotes.insert(name.to_owned(), remote);
        let current = self.current().is_none();
        if current {
            self.current_remote = Some(name.to_owned());
        }
        Ok(current)
    }

    /// Makes `name` the current remote.
    pub fn switch(&mut self, name: &str) -> Result<(), ConfigError> {
        self.remote(name)?;
        self.current_remote = Some(name.to_owned());
        Ok(())
    }

    /// Removes the remote `name` (no remote is current after removing the
    /// current one) and returns it.
    pub fn remove_remote(&mut self, name: &str) -> Result<Remote, ConfigError> {
        let removed = self
            .remotes
            .remove(name)
            .ok_or_else(|| self.unknown(name))?;
        if self.current_remote.as_deref() == Some(name) {
            self.current_remote = None;
        }
        Ok(removed)
    }

    /// Records a successful login: the remote `name` (created if missing)
    /// gets `url` and `token`, and `project` when one is given; it becomes
    /// the current remote when there is none.
    pub fn save_login(
        &mut self,
        name: &str,
        url: &str,
        token: &str,
        project: Option<&str>,
    ) -> Result<(), ConfigError> {
        validate_name("remote name", name)?;
        validate_url(url)?;
        let remote = self
            .remotes
            .entry(name.to_owned())
            .or_insert_with(|| Remote {
                ca_cert: None,
                url: url.to_owned(),
                token: None,
                project: None,
            });
        remote.url = url.to_owned();
        remote.token = Some(token.to_owned());
        if let Some(p) = project {
            remote.project = Some(p.to_owned());
        }
        if self.current().is_none() {
            self.current_remote = Some(name.to_owned());
        }
        Ok(())
    }

    fn unknown(&self, name: &str) -> ConfigError {
        ConfigError::UnknownRemote {
            name: name.to_owned(),
            known: self.remote_names(),
        }
    }
}

/// Checks that every comma-separated part of `url` is an http(s) URL.
pub fn validate_url(url: &str) -> Result<(), ConfigError> {
    let invalid = || ConfigError::InvalidUrl {
        url: url.to_owned(),
    };
    let mut parts = 0;
    for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let rest = part
            .strip_prefix("http://")
            .or_else(|| part.strip_prefix("https://"))
            .ok_or_else(invalid)?;
        if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
            return Err(invalid());
        }
        parts += 1;
    }
    if parts == 0 {
        return Err(invalid());
    }
    Ok(())
}

/// The config file's path: `$SKYVISOR_CONFIG`, else
/// `skyvisor/config.toml` in the user's config directory.
pub fn default_config_path() -> Result<PathBuf, ConfigError> {
    config_path_from(std::env::var_os(CONFIG_ENV), dirs::config_dir())
}

fn config_path_from(
    env: Option<OsString>,
    config_dir: Option<PathBuf>,
) -> Result<PathBuf, ConfigError> {
    match env.filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => config_dir
            .map(|d| d.join("skyvisor").join("config.toml"))
            .ok_or(ConfigError::NoConfigDir),
    }
}

/// The token in the file at `path`, trimmed; `None` if the file is
/// missing, unreadable (a root-only file read by another user) or empty.
pub fn read_token_file(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// The CA certificate a local server writes beside its bootstrap token.
pub const LOCAL_CA_FILE: &str = "cluster-ca.pem";

/// What the command line says about the connection: the global flags (or
/// their environment variables) and where the files are. Resolved by
/// [`ConnectionArgs::connect`].
#[derive(Clone, Default)]
pub struct ConnectionArgs {
    /// `--url` / `SKYVISOR_URL`.
    pub url: Option<String>,
    /// `--token` / `SKYVISOR_TOKEN`.
    pub token: Option<String>,
    /// `--project` / `SKYVISOR_PROJECT`.
    pub project: Option<String>,
    /// `--remote` / `SKYVISOR_REMOTE`.
    pub remote: Option<String>,
    /// The config file; `None`: [`default_config_path`].
    pub config_file: Option<PathBuf>,
    /// The bootstrap admin's token file of a server on this host
    /// (`admin.token` in its data directory); read, when it is readable, if
    /// no token is given otherwise.
    pub bootstrap_token_file: Option<PathBuf>,
}

impl fmt::Debug for ConnectionArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionArgs")
            .field("url", &self.url)
            .field("token", &redacted(&self.token))
            .field("project", &self.project)
            .field("remote", &self.remote)
            .field("config_file", &self.config_file)
            .field("bootstrap_token_file", &self.bootstrap_token_file)
            .finish()
    }
}

/// Where a connection's token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token` or `SKYVISOR_TOKEN`.
    Flag,
    /// A remote of the config file.
    Remote {
        /// The remote.
        name: String,
    },
    /// A server's bootstrap token file on this host.
    BootstrapFile {
        /// The file.
        path: PathBuf,
    },
    /// Standard input (`skyvisor login`).
    Stdin,
    /// No token is sent.
    None,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Flag => f.write_str("--token / SKYVISOR_TOKEN"),
            TokenSource::Remote { name } => write!(f, "remote {name:?}"),
            TokenSource::BootstrapFile { path } => write!(f, "{}", path.display()),
            TokenSource::Stdin => f.write_str("standard input"),
            TokenSource::None => f.write_str("nowhere (no token)"),
        }
    }
}

/// Where and as whom to connect, resolved.
#[derive(Clone)]
pub struct Connection {
    /// The API's base URL.
    pub url: String,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Where the token came from.
    pub token_source: TokenSource,
    /// The project to act in; `None`: the identity's home project.
    pub project: Option<ProjectName>,
    /// The remote whose settings apply, if one does.
    pub remote: Option<String>,
    /// With no token: the bootstrap token file to read when it appears (a
    /// command run right after `skyvisor up` starts, before it wrote it).
    pub token_file: Option<PathBuf>,
    /// The CA an `https` API is trusted with: the remote's pinned one, else
    /// `SKYVISOR_CA_FILE`'s, else the local server's (beside its bootstrap
    /// token).
    pub ca_cert: Option<String>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url)
            .field("token", &redacted(&self.token))
            .field("token_source", &self.token_source)
            .field("project", &self.project)
            .field("remote", &self.remote)
            .finish()
    }
}

impl Connection {
    /// A client of this connection's API, sending its token and project.
    pub fn client(&self) -> Client {
        Client::new(&self.url)
            .with_token(self.token.clone())
            .with_token_file(self.token_file.clone())
            .with_project(self.project.as_ref().map(|p| p.to_string()))
            .with_ca(self.ca_cert.as_deref())
    }
}

impl ConnectionArgs {
    /// The config file's path.
    pub fn config_path(&self) -> Result<PathBuf, ConfigError> {
        match &self.config_file {
            Some(p) => Ok(p.clone()),
            None => default_config_path(),
        }
    }

    /// Reads the config file (an empty configuration when there is no
    /// config directory at all).
    pub fn load_config(&self) -> Result<ConfigFile, ConfigError> {
        match self.config_path() {
            Ok(path) => ConfigFile::load(&path),
            Err(ConfigError::NoConfigDir) => Ok(ConfigFile::default()),
            Err(e) => Err(e),
        }
    }

    /// Reads the config file and resolves the connection.
    pub fn connect(&self) -> Result<Connection, ConfigError> {
        self.resolve(&self.load_config()?)
    }

    /// The remote named by `--remote`, else the config's current one.
    pub fn chosen_remote(&self, config: &ConfigFile) -> Option<String> {
        given(&self.remote).or_else(|| config.current_remote.clone())
    }

    /// Resolves the connection against `config`:
    ///
    /// - url: `--url`, else the remote's (`--remote`, else the current
    ///   one), else [`DEFAULT_URL`];
    /// - token: `--token`, else the remote's when the remote gave the url
    ///   or `--url` is the remote's, else the bootstrap token file when it
    ///   is readable, else none;
    /// - project: `--project`, else the remote's, else none (the server
    ///   uses the identity's home project).
    pub fn resolve(&self, config: &ConfigFile) -> Result<Connection, ConfigError> {
        let remote = match self.chosen_remote(config) {
            Some(name) => {
                let r = config.remote(&name)?;
                Some((name, r))
            }
            None => None,
        };
        let url_flag = given(&self.url);
        if let Some(u) = &url_flag {
            validate_url(u)?;
        }
        let url = url_flag
            .clone()
            .or_else(|| remote.as_ref().map(|(_, r)| r.url.clone()))
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let remote_applies = remote
            .as_ref()
            .is_some_and(|(_, r)| url_flag.as_deref().is_none_or(|u| same_url(u, &r.url)));
        let from_remote = remote
            .as_ref()
            .filter(|_| remote_applies)
            .and_then(|(name, r)| Some((name.clone(), given(&r.token)?)));
        let (token, token_source) = if let Some(t) = given(&self.token) {
            (Some(t), TokenSource::Flag)
        } else if let Some((name, t)) = from_remote {
            (Some(t), TokenSource::Remote { name })
        } else if let Some((path, t)) = self
            .bootstrap_token_file
            .as_ref()
            .and_then(|p| Some((p.clone(), read_token_file(p)?)))
        {
            (Some(t), TokenSource::BootstrapFile { path })
        } else {
            (None, TokenSource::None)
        };
        if let Some(t) = &token
            && !is_token_text(t)
        {
            return Err(ConfigError::InvalidToken {
                source_of: token_source,
            });
        }
        let project = given(&self.project)
            .or_else(|| remote.as_ref().and_then(|(_, r)| given(&r.project)))
            .map(|p| ProjectName::new(p).map_err(ConfigError::from))
            .transpose()?;
        let token_file_fallback = match token_source {
            TokenSource::None => self.bootstrap_token_file.clone(),
            _ => None,
        };
        let ca_cert = remote
            .as_ref()
            .filter(|_| remote_applies)
            .and_then(|(_, r)| given(&r.ca_cert))
            .or_else(|| {
                let file = std::env::var_os("SKYVISOR_CA_FILE")
                    .filter(|f| !f.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| {
                        self.bootstrap_token_file
                            .as_ref()
                            .and_then(|t| t.parent().map(|d| d.join(LOCAL_CA_FILE)))
                    })?;
                std::fs::read_to_string(file).ok()
            });
        Ok(Connection {
            url,
            token,
            token_source,
            project,
            ca_cert,
            token_file: token_file_fallback,
            remote: remote.filter(|_| remote_applies).map(|(name, _)| name),
        })
    }
}

/// Whether `t` can be sent in an `Authorization` header.
pub fn is_token_text(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c.is_ascii_graphic())
}

/// A set, non-blank value, trimmed.
pub(crate) fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Whether two API URLs name the same servers (ignoring spaces and
/// trailing slashes).
fn same_url(a: &str, b: &str) -> bool {
    let norm = |u: &str| {
        u.split(',')
            .map(|p| p.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
    };
    norm(a) == norm(b)
}

fn redacted(token: &Option<String>) -> &'static str {
    match token {
        Some(_) => "<set>",
        None => "<unset>",
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn remote(url: &str, token: Option<&str>, project: Option<&str>) -> Remote {
        Remote {
            url: url.into(),
            token: token.map(Into::into),
            project: project.map(Into::into),
            ca_cert: None,
        }
    }

    fn lab_config() -> ConfigFile {
        let mut c = ConfigFile::default();
        c.add_remote(
            "lab",
            remote("http://10.0.0.5:7780", Some("lab-token"), Some("web")),
        )
        .expect("add lab");
        c.add_remote(
            "prod",
            remote("https://prod:7780", Some("prod-token"), None),
        )
        .expect("add prod");
        c
    }

    #[test]
    fn config_file_round_trips_privately() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("new-dir").join("config.toml");
        assert_eq!(
            ConfigFile::load(&path).expect("missing is empty"),
            ConfigFile::default()
        );
        let config = lab_config();
        config.save(&path).expect("save");
        assert_eq!(ConfigFile::load(&path).expect("load"), config);
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        // Saving again replaces it; no temporary file is left behind.
        let mut changed = config.clone();
        changed.switch("prod").expect("switch");
        changed.save(&path).expect("save again");
        assert_eq!(ConfigFile::load(&path).expect("load"), changed);
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("config.toml")]);
    }

    #[test]
    fn config_file_format() {
        let text = r#"
            current_remote = "lab"
            [remotes.lab]
            url = "http://10.0.0.5:7780"
            token = "t"
            [remotes.other]
            url = "http://other:7780"
            project = "web"
        "#;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        fs::write(&path, text).expect("write");
        let c = ConfigFile::load(&path).expect("load");
        assert_eq!(c.current(), Some("lab"));
        assert_eq!(c.remote("lab").expect("lab").token.as_deref(), Some("t"));
        assert_eq!(
            c.remote("other").expect("other").project.as_deref(),
            Some("web")
        );
        fs::write(&path, "[remotes.x]\nurl = \"http://x\"\ntokn = \"t\"\n").expect("write");
        let err = ConfigFile::load(&path).expect_err("typo");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("config.toml"), "{err}");
    }

    #[test]
    fn config_path_prefers_the_env_var() {
        assert_eq!(
            config_path_from(Some("/x/c.toml".into()), Some("/home/u/.config".into()))
                .expect("path"),
            PathBuf::from("/x/c.toml")
        );
        assert_eq!(
            config_path_from(Some("".into()), Some("/home/u/.config".into())).expect("path"),
            PathBuf::from("/home/u/.config/skyvisor/config.toml")
        );
        assert!(matches!(
            config_path_from(None, None),
            Err(ConfigError::NoConfigDir)
        ));
    }

    #[test]
    fn remote_add_switch_remove() {
        let mut c = ConfigFile::default();
        assert!(
            c.add_remote("lab", remote("http://a:1", None, None))
                .expect("first")
        );
        assert!(
            !c.add_remote("prod", remote("http://b:1", None, None))
                .expect("second")
        );
        assert_eq!(c.current(), Some("lab"));

        let err = c
            .add_remote("lab", remote("http://c:1", None, None))
            .expect_err("taken");
        assert!(matches!(err, ConfigError::RemoteExists { .. }), "{err}");
        assert!(err.to_string().contains("http://a:1"), "{err}");
        let err = c
            .add_remote("Bad Name", remote("http://c:1", None, None))
            .expect_err("bad name");
        assert!(matches!(err, ConfigError::InvalidName(_)), "{err}");
        let err = c
            .add_remote("x", remote("10.0.0.1:7780", None, None))
            .expect_err("bad url");
        assert!(matches!(err, ConfigError::InvalidUrl { .. }), "{err}");

        let err = c.switch("nope").expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown remote \"nope\"; known remotes: lab, prod"
        );
        c.switch("prod").expect("switch");
        assert_eq!(c.current(), Some("prod"));

        let err = c.remove_remote("nope").expect_err("unknown");
        assert!(
            err.to_string().contains("known remotes: lab, prod"),
            "{err}"
        );
        c.remove_remote("prod").expect("remove");
        assert_eq!(c.current(), None);
        c.remove_remote("lab").expect("remove");
        let err = c.switch("lab").expect_err("none left");
        assert!(
            err.to_string().contains("no remotes are configured"),
            "{err}"
        );
    }

    #[test]
    fn login_creates_or_updates_a_remote() {
        let mut c = ConfigFile::default();
        c.save_login(DEFAULT_REMOTE, DEFAULT_URL, "t1", None)
            .expect("login");
        assert_eq!(c.current(), Some(DEFAULT_REMOTE));
        assert_eq!(
            c.remote(DEFAULT_REMOTE).expect("remote"),
            &remote(DEFAULT_URL, Some("t1"), None)
        );
        c.add_remote("lab", remote("http://a:1", Some("old"), Some("web")))
            .expect("add");
        c.save_login("lab", "http://b:1", "t2", None)
            .expect("login");
        assert_eq!(
            c.remote("lab").expect("lab"),
            &remote("http://b:1", Some("t2"), Some("web"))
        );
        assert_eq!(c.current(), Some(DEFAULT_REMOTE));
    }

    #[test]
    fn resolution_without_anything_is_the_local_default() {
        let conn = ConnectionArgs::default()
            .resolve(&ConfigFile::default())
            .expect("resolve");
        assert_eq!(conn.url, DEFAULT_URL);
        assert_eq!(conn.token, None);
        assert_eq!(conn.token_source, TokenSource::None);
        assert_eq!(conn.project, None);
        assert_eq!(conn.remote, None);
    }

    #[test]
    fn resolution_precedence_flag_remote_bootstrap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let boot = dir.path().join("admin.token");
        fs::write(&boot, "  boot-token\n").expect("write");
        let config = lab_config();
        let args = ConnectionArgs {
            bootstrap_token_file: Some(boot.clone()),
            ..ConnectionArgs::default()
        };

        // The current remote gives url, token and project.
        let conn = args.resolve(&config).expect("resolve");
        assert_eq!(conn.url, "http://10.0.0.5:7780");
        assert_eq!(conn.token.as_deref(), Some("lab-token"));
        assert_eq!(
            conn.token_source,
            TokenSource::Remote { name: "lab".into() }
        );
        assert_eq!(conn.project.as_ref().map(|p| p.as_str()), Some("web"));
        assert_eq!(conn.remote.as_deref(), Some("lab"));

        // --remote chooses another.
        let conn = ConnectionArgs {
            remote: Some("prod".into()),
            ..args.clone()
        }
        .resolve(&config)
        .expect("resolve");
        assert_eq!(conn.url, "https://prod:7780");
        assert_eq!(conn.token.as_deref(), Some("prod-token"));
        assert_eq!(conn.project, None);

        // Flags beat the remote.
        let conn = ConnectionArgs {
            token: Some("flag-token".into()),
            project: Some("db".into()),
            ..args.clone()
        }
        .resolve(&config)
        .expect("resolve");
        assert_eq!(conn.url, "http://10.0.0.5:7780");
        assert_eq!(conn.token.as_deref(), Some("flag-token"));
        assert_eq!(conn.token_source, TokenSource::Flag);
        assert_eq!(conn.project.as_ref().map(|p| p.as_str()), Some("db"));

        // --url elsewhere: the remote's token is not sent there; the
        // bootstrap file's is.
        let conn = ConnectionArgs {
            url: Some("http://127.0.0.1:7780".into()),
            ..args.clone()
        }
        .resolve(&config)
        .expect("resolve");
        assert_eq!(conn.url, "http://127.0.0.1:7780");
        assert_eq!(conn.token.as_deref(), Some("boot-token"));
        assert_eq!(
            conn.token_source,
            TokenSource::BootstrapFile { path: boot.clone() }
        );
        assert_eq!(conn.remote, None);

        // --url equal to the remote's (up to a trailing slash) keeps its token.
        let conn = ConnectionArgs {
            url: Some("http://10.0.0.5:7780/".into()),
            ..args.clone()
        }
        .resolve(&config)
        .expect("resolve");
        assert_eq!(conn.token.as_deref(), Some("lab-token"));

        // No remote: the bootstrap file; a blank flag counts as unset.
        let conn = ConnectionArgs {
            token: Some("  ".into()),
            ..args.clone()
        }
        .resolve(&ConfigFile::default())
        .expect("resolve");
        assert_eq!(conn.url, DEFAULT_URL);
        assert_eq!(conn.token.as_deref(), Some("boot-token"));

        // A missing or empty bootstrap file: no token.
        fs::write(&boot, "\n").expect("write");
        let conn = args.resolve(&ConfigFile::default()).expect("resolve");
        assert_eq!(conn.token, None);
        let conn = ConnectionArgs {
            bootstrap_token_file: Some(dir.path().join("missing")),
            ..ConnectionArgs::default()
        }
        .resolve(&ConfigFile::default())
        .expect("resolve");
        assert_eq!(conn.token_source, TokenSource::None);
    }

    #[test]
    fn resolution_errors() {
        let config = lab_config();
        let err = ConnectionArgs {
            remote: Some("nope".into()),
            ..ConnectionArgs::default()
        }
        .resolve(&config)
        .expect_err("unknown remote");
        assert!(
            err.to_string().contains("known remotes: lab, prod"),
            "{err}"
        );

        let err = ConnectionArgs {
            project: Some("Not A Project".into()),
            ..ConnectionArgs::default()
        }
        .resolve(&config)
        .expect_err("bad project");
        assert!(err.to_string().contains("project name"), "{err}");

        let err = ConnectionArgs {
            token: Some("two words".into()),
            ..ConnectionArgs::default()
        }
        .resolve(&config)
        .expect_err("bad token");
        assert!(!err.to_string().contains("two words"), "{err}");

        let err = ConnectionArgs {
            url: Some("localhost:7780".into()),
            ..ConnectionArgs::default()
        }
        .resolve(&config)
        .expect_err("bad url");
        assert!(matches!(err, ConfigError::InvalidUrl { .. }), "{err}");
    }

    #[test]
    fn urls() {
        assert!(validate_url("http://a:1").is_ok());
        assert!(validate_url("https://a:1/, http://b:1").is_ok());
        assert!(validate_url("").is_err());
        assert!(validate_url("http://").is_err());
        assert!(validate_url("ftp://a").is_err());
        assert!(same_url("http://A:1/", "http://a:1"));
        assert!(!same_url("http://a:1", "http://a:2"));
    }

    #[test]
    fn debug_never_shows_tokens() {
        let text = format!("{:?}", lab_config());
        assert!(!text.contains("lab-token"), "{text}");
        let args = ConnectionArgs {
            token: Some("secret".into()),
            ..ConnectionArgs::default()
        };
        assert!(!format!("{args:?}").contains("secret"));
    }
}
