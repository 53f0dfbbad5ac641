//! The stored projects, identities and tokens, and token verification.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use skyvisor_core::auth::{
    CreateIdentityRequest, CreateProjectRequest, Identity, Project, Role, TokenRecord,
    UpdateProjectRequest,
};
use skyvisor_core::{IdentityName, ProjectName, keys};
use skyvisor_store::{Revision, Store, StoreExt, encode};

use crate::token::{self, IssuedToken};
use crate::{AuthError, Principal};

/// How often a token's `last_used_at` is written at most: every request
/// would turn each read into a store write.
const LAST_USED_EVERY: Duration = Duration::from_secs(60);

/// How long a verified token is still accepted while the store cannot be
/// reached (nothing can be revoked then either): read-only calls such as
/// `/v1/info` keep answering through an outage.
const OUTAGE_GRACE: Duration = Duration::from_secs(60);

/// How many times a read-modify-write retries on a concurrent change.
const CAS_ATTEMPTS: usize = 16;

/// Projects, identities and tokens in the store.
pub struct Directory {
    store: Arc<dyn Store>,
    /// When this process last recorded each token's use.
    last_used: Mutex<HashMap<String, Instant>>,
    /// Tokens verified lately: (hash of the secret, principal, when).
    verified: Mutex<HashMap<String, (String, Principal, Instant)>>,
    /// Identities and projects, followed from the store.
    view: crate::view::AuthView,
}

impl Directory {
    /// The directory kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            last_used: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            view: crate::view::AuthView::default(),
        }
    }

    /// Keeps an in-memory copy of identities and projects current, so that
    /// authorizing a request reads only its token from the store. Runs
    /// until the store goes away; spawn it once per process.
    pub fn follow(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.view.clone().follow(self.store.clone())
    }

    /// Verifies an `Authorization` header value. Reads the token and its
    /// identity from the store on every call, so a revocation or a
    /// deleted identity takes effect on every server at once.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let bearer = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                AuthError::Malformed("the Authorization header must be 'Bearer <token>'".into())
            })?
            .trim();
        let parsed = token::parse(bearer)?;
        match self.verify(&parsed).await {
            Err(AuthError::Store(e)) => self.recently_verified(&parsed).ok_or(AuthError::Store(e)),
            Ok(p) => {
                if let Ok(mut v) = self.verified.lock() {
                    v.insert(
                        parsed.id.clone(),
                        (token::digest(&parsed.secret), p.clone(), Instant::now()),
                    );
                }
                Ok(p)
            }
            Err(e) => {
                if let Ok(mut v) = self.verified.lock() {
                    v.remove(&parsed.id);
                }
                Err(e)
            }
        }
    }

    /// A principal this process verified for this token within
    /// [`OUTAGE_GRACE`].
    fn recently_verified(&self, parsed: &token::ParsedToken) -> Option<Principal> {
        let v = self.verified.lock().ok()?;
        let (hash, principal, at) = v.get(&parsed.id)?;
        (at.elapsed() < OUTAGE_GRACE && *hash == token::digest(&parsed.secret))
            .then(|| principal.clone())
    }

    async fn verify(&self, parsed: &token::ParsedToken) -> Result<Principal, AuthError> {
        let Some((record, rev)) = self
            .store
            .get_json::<TokenRecord>(&keys::token(&parsed.id))
            .await?
        else {
            return Err(AuthError::Unknown {
                id: parsed.id.clone(),
            });
        };
        if !token::matches(&record, &parsed.secret) {
            return Err(AuthError::Unknown {
                id: parsed.id.clone(),
            });
        }
        if let Some(at) = record.revoked_at {
            if record.single_use {
                return Err(AuthError::Used { id: record.id, at });
            }
            return Err(AuthError::Revoked { id: record.id, at });
        }
        let now = Utc::now();
        if let Some(at) = record.expires_at
            && at <= now
        {
            return Err(AuthError::Expired { id: record.id, at });
        }
        let Some(identity) = self.identity(&record.identity).await? else {
            return Err(AuthError::IdentityGone {
                id: record.id,
                identity: record.identity.to_string(),
            });
        };
        self.note_use(record.clone(), rev, now);
        Ok(Principal {
            identity,
            token_id: record.id,
        })
    }

    /// Records a token's use in the background, at most once a minute per
    /// token and process; a concurrent change (a revocation) wins.
    fn note_use(&self, mut record: TokenRecord, rev: Revision, now: DateTime<Utc>) {
        {
            let Ok(mut seen) = self.last_used.lock() else {
                return;
            };
            let due = seen
                .get(&record.id)
                .is_none_or(|t| t.elapsed() >= LAST_USED_EVERY);
            if !due {
                return;
            }
            seen.insert(record.id.clone(), Instant::now());
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            record.last_used_at = Some(now);
            let key = keys::token(&record.id);
            if let Err(e) = store.compare_and_swap(&key, rev, encode(&record)).await {
                tracing::debug!(token = %record.id, error = %e, "cannot record token use");
            }
        });
    }

    // ---- projects ----

    /// One project.
    pub async fn project(&self, name: &ProjectName) -> Result<Option<Project>, AuthError> {
        let key = keys::project(name);
        // A miss may be a project made a moment ago on another server.
        if let Some(Some(p)) = self.view.project(&key) {
            return Ok(Some(p));
        }
        Ok(self.store.get_json::<Project>(&key).await?.map(|(p, _)| p))
    }

    /// Every project.
    pub async fn projects(&self) -> Result<Vec<Project>, AuthError> {
        let (items, _) = self.store.list_json::<Project>(keys::PROJECTS).await?;
        Ok(items.into_iter().map(|(p, _)| p).collect())
    }

    /// Creates a project.
    pub async fn create_project(&self, req: CreateProjectRequest) -> Result<Project, AuthError> {
        let project = Project {
            name: req.name,
            description: req.description,
            quota: req.quota,
            created_at: Utc::now(),
        };
        if !self
            .store
            .create(&keys::project(&project.name), encode(&project))
            .await?
        {
            return Err(AuthError::Exists {
                kind: "project",
                name: project.name.to_string(),
            });
        }
        self.view
            .put_project(keys::project(&project.name), Some(project.clone()));
        Ok(project)
    }

    /// Changes a project's description or quota.
    pub async fn update_project(
        &self,
        name: &ProjectName,
        req: UpdateProjectRequest,
    ) -> Result<Project, AuthError> {
        let key = keys::project(name);
        let p = self
            .modify(&key, "project", name.as_str(), |p: &mut Project| {
                if let Some(d) = &req.description {
                    p.description = d.clone();
                }
                if let Some(q) = &req.quota {
                    p.quota = q.clone();
                }
            })
            .await?;
        self.view.put_project(key, Some(p.clone()));
        Ok(p)
    }

    /// Deletes a project's record and every role in it. The caller has
    /// checked that it holds no objects.
    pub async fn delete_project(&self, name: &ProjectName) -> Result<(), AuthError> {
        if self.project(name).await?.is_none() {
            return Err(AuthError::NotFound {
                kind: "project",
                name: name.to_string(),
            });
        }
        for identity in self.identities().await? {
            if identity.roles.contains_key(name) || identity.default_project.as_ref() == Some(name)
            {
                let key = keys::identity(&identity.name);
                let i = self
                    .modify(
                        &key,
                        "identity",
                        identity.name.as_str(),
                        |i: &mut Identity| {
                            i.roles.remove(name);
                            if i.default_project.as_ref() == Some(name) {
                                i.default_project = None;
                            }
                        },
                    )
                    .await?;
                self.view.put_identity(key, Some(i));
            }
        }
        self.store.delete(&keys::project(name)).await?;
        self.view.put_project(keys::project(name), None);
        Ok(())
    }

    // ---- identities ----

    /// One identity.
    pub async fn identity(&self, name: &IdentityName) -> Result<Option<Identity>, AuthError> {
        let key = keys::identity(name);
        if let Some(Some(i)) = self.view.identity(&key) {
            return Ok(Some(i));
        }
        Ok(self.store.get_json::<Identity>(&key).await?.map(|(i, _)| i))
    }

    /// Every identity.
    pub async fn identities(&self) -> Result<Vec<Identity>, AuthError> {
        let (items, _) = self.store.list_json::<Identity>(keys::IDENTITIES).await?;
        Ok(items.into_iter().map(|(i, _)| i).collect())
    }

    /// Creates an identity; every project it gets a role in must exist.
    pub async fn create_identity(&self, req: CreateIdentityRequest) -> Result<Identity, AuthError> {
        for project in req.roles.keys().chain(req.default_project.iter()) {
            self.require_project(project).await?;
        }
        let identity = Identity {
            name: req.name,
            kind: req.kind,
            cluster_admin: req.cluster_admin,
            cluster_monitor: req.cluster_monitor,
            roles: req.roles,
            default_project: req.default_project,
            created_at: Utc::now(),
        };
        if !self
            .store
            .create(&keys::identity(&identity.name), encode(&identity))
            .await?
        {
            return Err(AuthError::Exists {
                kind: "identity",
                name: identity.name.to_string(),
            });
        }
        self.view
            .put_identity(keys::identity(&identity.name), Some(identity.clone()));
        Ok(identity)
    }

    /// Grants `role` in `project` to `identity`, or takes its role away.
    pub async fn set_role(
        &self,
        identity: &IdentityName,
        project: &ProjectName,
        role: Option<Role>,
    ) -> Result<Identity, AuthError> {
        self.require_project(project).await?;
        let key = keys::identity(identity);
        let i = self
            .modify(
                &key,
                "identity",
                identity.as_str(),
                |i: &mut Identity| match role {
                    Some(r) => {
                        i.roles.insert(project.clone(), r);
                    }
                    None => {
                        i.roles.remove(project);
                    }
                },
            )
            .await?;
        self.view.put_identity(key, Some(i.clone()));
        Ok(i)
    }

    /// Deletes an identity and revokes its tokens.
    pub async fn delete_identity(&self, name: &IdentityName) -> Result<(), AuthError> {
        if self.identity(name).await?.is_none() {
            return Err(AuthError::NotFound {
                kind: "identity",
                name: name.to_string(),
            });
        }
        for t in self.tokens(Some(name)).await? {
            if t.revoked_at.is_none() {
                self.revoke_token(&t.id).await?;
            }
        }
        self.store.delete(&keys::identity(name)).await?;
        self.view.put_identity(keys::identity(name), None);
        Ok(())
    }

    // ---- tokens ----

    /// Makes a token for `identity`; the bearer string is never stored.
    pub async fn create_token(
        &self,
        identity: &IdentityName,
        description: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<IssuedToken, AuthError> {
        if self.identity(identity).await?.is_none() {
            return Err(AuthError::NotFound {
                kind: "identity",
                name: identity.to_string(),
            });
        }
        let issued = token::issue(identity, description, expires_at);
        self.store_token(&issued.record).await?;
        Ok(issued)
    }

    /// Makes a join token: good for one join of a host within `ttl`. It
    /// belongs to the built-in identity [`crate::JOINER`], which has no
    /// role anywhere.
    pub async fn create_join_token(
        &self,
        ttl: chrono::Duration,
        made_by: &IdentityName,
    ) -> Result<IssuedToken, AuthError> {
        let joiner = IdentityName::new(crate::JOINER).map_err(|e| AuthError::NotFound {
            kind: "identity",
            name: e.to_string(),
        })?;
        match self
            .create_identity(skyvisor_core::auth::CreateIdentityRequest {
                name: joiner.clone(),
                kind: skyvisor_core::auth::IdentityKind::ServiceAccount,
                cluster_admin: false,
                cluster_monitor: false,
                roles: Default::default(),
                default_project: None,
            })
            .await
        {
            Ok(_) | Err(AuthError::Exists { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut issued = token::issue(
            &joiner,
            &format!("join token made by {made_by}"),
            Some(Utc::now() + ttl),
        );
        issued.record.single_use = true;
        self.store_token(&issued.record).await?;
        Ok(issued)
    }

    /// Spends the join token `principal` came with: the first caller wins,
    /// a second use of the same token is refused.
    pub async fn spend_join_token(&self, principal: &Principal) -> Result<(), AuthError> {
        let key = keys::token(&principal.token_id);
        let Some((mut record, rev)) = self.store.get_json::<TokenRecord>(&key).await? else {
            return Err(AuthError::Unknown {
                id: principal.token_id.clone(),
            });
        };
        if !record.single_use {
            return Ok(());
        }
        if let Some(at) = record.revoked_at {
            return Err(AuthError::Used { id: record.id, at });
        }
        let now = Utc::now();
        record.revoked_at = Some(now);
        if !self
            .store
            .compare_and_swap(&key, rev, encode(&record))
            .await?
        {
            return Err(AuthError::Used {
                id: record.id,
                at: now,
            });
        }
        if let Ok(mut v) = self.verified.lock() {
            v.remove(&record.id);
        }
        Ok(())
    }

    /// Stores a token record that must be new.
    pub(crate) async fn store_token(&self, record: &TokenRecord) -> Result<(), AuthError> {
        if !self
            .store
            .create(&keys::token(&record.id), encode(record))
            .await?
        {
            return Err(AuthError::Exists {
                kind: "token",
                name: record.id.clone(),
            });
        }
        Ok(())
    }

    /// One token's record.
    pub async fn token(&self, id: &str) -> Result<Option<TokenRecord>, AuthError> {
        if id.is_empty() || id.contains('/') {
            return Ok(None);
        }
        Ok(self
            .store
            .get_json::<TokenRecord>(&keys::token(id))
            .await?
            .map(|(t, _)| t))
    }

    /// Every token, or those of one identity.
    pub async fn tokens(
        &self,
        identity: Option<&IdentityName>,
    ) -> Result<Vec<TokenRecord>, AuthError> {
        let (items, _) = self.store.list_json::<TokenRecord>(keys::TOKENS).await?;
        Ok(items
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| identity.is_none_or(|i| &t.identity == i))
            .collect())
    }

    /// Deletes a token's record (an internal token being replaced).
    pub(crate) async fn forget_token(&self, id: &str) -> Result<(), AuthError> {
        self.store.delete(&keys::token(id)).await?;
        Ok(())
    }

    /// Revokes a token; it stops working at once on every server.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord, AuthError> {
        if self.token(id).await?.is_none() {
            return Err(AuthError::NotFound {
                kind: "token",
                name: id.to_string(),
            });
        }
        let now = Utc::now();
        self.modify(&keys::token(id), "token", id, |t: &mut TokenRecord| {
            t.revoked_at.get_or_insert(now);
        })
        .await
    }

    async fn require_project(&self, project: &ProjectName) -> Result<(), AuthError> {
        match self.project(project).await? {
            Some(_) => Ok(()),
            None => Err(AuthError::NotFound {
                kind: "project",
                name: project.to_string(),
            }),
        }
    }

    /// Read-modify-write of one record with compare-and-swap.
    async fn modify<T>(
        &self,
        key: &str,
        kind: &'static str,
        name: &str,
        change: impl Fn(&mut T),
    ) -> Result<T, AuthError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut value, rev)) = self.store.get_json::<T>(key).await? else {
                return Err(AuthError::NotFound {
                    kind,
                    name: name.to_string(),
                });
            };
            change(&mut value);
            if self
                .store
                .compare_and_swap(key, rev, encode(&value))
                .await?
            {
                return Ok(value);
            }
        }
        Err(AuthError::Store(skyvisor_store::StoreError::Unavailable(
            format!("{kind} {name} kept changing; try again"),
        )))
    }
}

#[cfg(test)]
mod tests {
    use skyvisor_core::auth::IdentityKind;
    use skyvisor_store::EmbeddedStore;

    use super::*;

    async fn with_user() -> (Directory, IdentityName) {
        let dir = Directory::new(Arc::new(EmbeddedStore::in_memory().expect("store")));
        let name = IdentityName::new("alice").expect("name");
        dir.create_identity(CreateIdentityRequest {
            name: name.clone(),
            kind: IdentityKind::User,
            cluster_admin: false,
            cluster_monitor: false,
            roles: Default::default(),
            default_project: None,
        })
        .await
        .expect("identity");
        (dir, name)
    }

    fn bearer(t: &IssuedToken) -> String {
        format!("Bearer {}", t.bearer)
    }

    #[tokio::test]
    async fn each_refusal_says_which() {
        let (dir, alice) = with_user().await;
        assert!(matches!(
            dir.authenticate(None).await,
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            dir.authenticate(Some("Basic abc")).await,
            Err(AuthError::Malformed(_))
        ));
        let t = dir.create_token(&alice, "", None).await.expect("token");
        let good = dir.authenticate(Some(&bearer(&t))).await.expect("works");
        assert_eq!(good.identity.name, alice);
        // The right id with a wrong secret is as unknown as a wrong id.
        let forged = format!("Bearer svt_{}_{}", t.record.id, "0".repeat(64));
        assert!(matches!(
            dir.authenticate(Some(&forged)).await,
            Err(AuthError::Unknown { .. })
        ));
        let old = dir
            .create_token(&alice, "", Some(Utc::now() - chrono::Duration::seconds(1)))
            .await
            .expect("token");
        assert!(matches!(
            dir.authenticate(Some(&bearer(&old))).await,
            Err(AuthError::Expired { .. })
        ));
        dir.revoke_token(&t.record.id).await.expect("revoke");
        assert!(matches!(
            dir.authenticate(Some(&bearer(&t))).await,
            Err(AuthError::Revoked { .. })
        ));
        let other = dir.create_token(&alice, "", None).await.expect("token");
        dir.delete_identity(&alice).await.expect("delete");
        assert!(matches!(
            dir.authenticate(Some(&bearer(&other))).await,
            Err(AuthError::Revoked { .. } | AuthError::IdentityGone { .. })
        ));
        assert!(
            dir.tokens(None)
                .await
                .expect("tokens")
                .iter()
                .all(|t| !t.secret_sha256.contains(&other.bearer[21..]))
        );
    }

    #[tokio::test]
    async fn roles_need_an_existing_project_and_go_with_it() {
        let (dir, alice) = with_user().await;
        let web = ProjectName::new("web").expect("name");
        assert!(matches!(
            dir.set_role(&alice, &web, Some(Role::Member)).await,
            Err(AuthError::NotFound {
                kind: "project",
                ..
            })
        ));
        dir.create_project(CreateProjectRequest {
            name: web.clone(),
            description: String::new(),
            quota: Default::default(),
        })
        .await
        .expect("project");
        let i = dir
            .set_role(&alice, &web, Some(Role::Member))
            .await
            .expect("grant");
        assert_eq!(i.role_in(&web), Some(Role::Member));
        dir.delete_project(&web).await.expect("delete");
        let i = dir.identity(&alice).await.expect("read").expect("exists");
        assert_eq!(i.role_in(&web), None);
    }
}
