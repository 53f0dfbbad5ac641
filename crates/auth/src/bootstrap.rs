//! The first identity: a cluster admin whose token is written to a
//! root-only file, so that `skyvisor up` and a first server can be used at
//! once by whoever may read that file (the local CLI finds it by itself).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use skyvisor_core::auth::{
    BOOTSTRAP_IDENTITY, CreateIdentityRequest, CreateProjectRequest, DEFAULT_PROJECT, IdentityKind,
};
use skyvisor_core::{IdentityName, ProjectName};

use crate::token::{self, IssuedToken};
use crate::{AuthError, Directory};

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No token file was asked for: only the default project and the
    /// bootstrap identity were made sure of.
    NoFile,
    /// A new token was made and written to the file.
    Created,
    /// The file's token was already known, or was registered now.
    Existing,
}

/// Makes sure the default project, the bootstrap admin and its token
/// exist, the token's bearer string being in `token_file` (mode 0600).
/// Several servers sharing one file agree on one token: the first to write
/// the file wins and the others register what it wrote.
pub async fn ensure(dir: &Directory, token_file: Option<&Path>) -> Result<Outcome, AuthError> {
    let default = ProjectName::new(DEFAULT_PROJECT).expect("valid built-in name");
    let admin = IdentityName::new(BOOTSTRAP_IDENTITY).expect("valid built-in name");
    match dir
        .create_project(CreateProjectRequest {
            name: default,
            description: "The project objects belong to unless another is chosen.".into(),
            quota: Default::default(),
        })
        .await
    {
        Ok(_) | Err(AuthError::Exists { .. }) => {}
        Err(e) => return Err(e),
    }
    match dir
        .create_identity(CreateIdentityRequest {
            name: admin.clone(),
            kind: IdentityKind::User,
            cluster_admin: true,
            cluster_monitor: false,
            roles: Default::default(),
            default_project: None,
        })
        .await
    {
        Ok(_) | Err(AuthError::Exists { .. }) => {}
        Err(e) => return Err(e),
    }
    let Some(token_file) = token_file else {
        return Ok(Outcome::NoFile);
    };
    let file_error = |message: String| AuthError::BootstrapFile {
        path: token_file.display().to_string(),
        message,
    };
    let (bearer, outcome) = match std::fs::read_to_string(token_file) {
        Ok(text) => (text.trim().to_string(), Outcome::Existing),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let issued = token::issue(&admin, "bootstrap admin token", None);
            match write_new(token_file, &issued) {
                Ok(()) => (issued.bearer, Outcome::Created),
                // Another server wrote it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(token_file)
                        .map_err(|e| file_error(e.to_string()))?;
                    (text.trim().to_string(), Outcome::Existing)
                }
                Err(e) => return Err(file_error(e.to_string())),
            }
        }
        Err(e) => return Err(file_error(e.to_string())),
    };
    let parsed = token::parse(&bearer).map_err(|e| file_error(e.to_string()))?;
    match dir.token(&parsed.id).await? {
        Some(record) if token::matches(&record, &parsed.secret) => Ok(outcome),
        Some(_) => Err(file_error(
            "its token's id is in the store with another secret".into(),
        )),
        None => {
            let mut record = token::issue(&admin, "bootstrap admin token", None).record;
            record.id = parsed.id.clone();
            record.secret_sha256 = token::digest(&parsed.secret);
            match dir.store_token(&record).await {
                Ok(()) | Err(AuthError::Exists { .. }) => Ok(outcome),
                Err(e) => Err(e),
            }
        }
    }
}

/// Writes the token to a new file readable by its owner only; fails with
/// `AlreadyExists` when the file is there. The text appears whole or not at
/// all: it is written aside and linked into place.
fn write_new(path: &Path, issued: &IssuedToken) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(format!("{}\n", issued.bearer).as_bytes())?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked
}

/// A token for Skyvisor's own parts calling the API (a server copying
/// images from a peer, an agent fetching image files): the service account
/// `account` (a cluster admin, made if missing) gets a fresh token for
/// `holder`, and that holder's earlier tokens are deleted, so restarts do
/// not pile tokens up. Whoever can write the store can do this anyway; the
/// token only lets such a part use the HTTP API like any other caller.
pub async fn service_token(
    dir: &Directory,
    account: &str,
    holder: &str,
) -> Result<String, AuthError> {
    let name = IdentityName::new(account).map_err(|e| AuthError::NotFound {
        kind: "identity",
        name: e.to_string(),
    })?;
    match dir
        .create_identity(CreateIdentityRequest {
            name: name.clone(),
            kind: IdentityKind::ServiceAccount,
            cluster_admin: true,
            cluster_monitor: false,
            roles: Default::default(),
            default_project: None,
        })
        .await
    {
        Ok(_) | Err(AuthError::Exists { .. }) => {}
        Err(e) => return Err(e),
    }
    let description = format!("internal: {holder}");
    for old in dir.tokens(Some(&name)).await? {
        if old.description == description {
            dir.forget_token(&old.id).await?;
        }
    }
    Ok(dir.create_token(&name, &description, None).await?.bearer)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use skyvisor_store::EmbeddedStore;

    use super::*;

    #[tokio::test]
    async fn the_first_start_writes_a_token_that_later_starts_and_other_servers_reuse() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("admin.token");
        let store = Arc::new(EmbeddedStore::in_memory().expect("store"));
        let dir = Directory::new(store.clone());
        assert_eq!(
            ensure(&dir, Some(&file)).await.expect("first"),
            Outcome::Created
        );
        let mode = std::fs::metadata(&file).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let bearer = std::fs::read_to_string(&file).expect("read");
        let who = dir
            .authenticate(Some(&format!("Bearer {}", bearer.trim())))
            .await
            .expect("the bootstrap token works");
        assert!(who.identity.cluster_admin);
        assert_eq!(
            ensure(&dir, Some(&file)).await.expect("again"),
            Outcome::Existing
        );
        // A second server with a fresh store but the same file registers it.
        let other = Directory::new(Arc::new(EmbeddedStore::in_memory().expect("store")));
        assert_eq!(
            ensure(&other, Some(&file)).await.expect("other"),
            Outcome::Existing
        );
        other
            .authenticate(Some(&format!("Bearer {}", bearer.trim())))
            .await
            .expect("works there too");
        assert_eq!(dir.tokens(None).await.expect("tokens").len(), 1);
    }

    #[tokio::test]
    async fn a_garbled_file_is_refused_naming_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("admin.token");
        std::fs::write(&file, "not a token").expect("write");
        let dir = Directory::new(Arc::new(EmbeddedStore::in_memory().expect("store")));
        let err = ensure(&dir, Some(&file)).await.expect_err("refused");
        assert!(err.to_string().contains("admin.token"), "{err}");
    }
}
