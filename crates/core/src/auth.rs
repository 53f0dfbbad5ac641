//! Projects, identities, roles, tokens and quotas: the wire types of
//! multi-tenancy. Enforcement lives in the `skyvisor-auth` crate and the
//! API's one authorization layer; this module only says what things are.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::{IdentityName, ProjectName};

/// The project every object belongs to unless another is chosen; it always
/// exists.
pub const DEFAULT_PROJECT: &str = "default";

/// [`DEFAULT_PROJECT`] as a name; the serde default of the `project`
/// field of objects stored before projects existed.
pub fn default_project() -> ProjectName {
    ProjectName::new(DEFAULT_PROJECT).expect("valid built-in name")
}

/// The serde default of [`crate::Image::public`]: images stored before
/// projects existed were shared by everyone, and stay so.
pub fn public_by_default() -> bool {
    true
}

/// The identity `skyvisor up` and the first server create, a cluster admin
/// whose token is written to a root-only file.
pub const BOOTSTRAP_IDENTITY: &str = "admin";

/// The HTTP header that chooses the project of a request (the caller's
/// default project when absent).
pub const PROJECT_HEADER: &str = "x-skyvisor-project";

/// What a role may do in a project, from least to most.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees the project's objects.
    Viewer,
    /// Also creates, changes and deletes them.
    Member,
    /// Also manages who may do what in the project.
    Admin,
}

impl Role {
    /// The least role that may perform `action`.
    pub fn needed_for(action: Action) -> Role {
        match action {
            Action::Read => Role::Viewer,
            Action::Write => Role::Member,
            Action::Manage => Role::Admin,
        }
    }

    /// Whether this role may perform `action`.
    pub fn allows(self, action: Action) -> bool {
        self >= Role::needed_for(action)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}; allowed: viewer, member, admin"
            )),
        }
    }
}

/// What a request does to a project's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Show or list.
    Read,
    /// Create, change, delete.
    Write,
    /// Grant roles, manage the project's service accounts and tokens.
    Manage,
}

/// Limits of one project; an absent limit is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub instances: Option<u32>,
    /// vCPUs of all instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub vcpus: Option<u32>,
    /// Memory of all instances, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub memory_mib: Option<u64>,
    /// Volumes (root disks of volume-backed VMs included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub volumes: Option<u32>,
    /// Size of all volumes, GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub volume_gib: Option<u64>,
    /// Snapshots of instances and volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub snapshots: Option<u32>,
}

/// What a project uses, counted from its objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Instances.
    pub instances: u32,
    /// vCPUs of all instances.
    pub vcpus: u32,
    /// Memory of all instances, MiB.
    pub memory_mib: u64,
    /// Volumes.
    pub volumes: u32,
    /// Size of all volumes, GiB.
    pub volume_gib: u64,
    /// Snapshots of instances and volumes.
    pub snapshots: u32,
}

impl Usage {
    /// The first limit of `quota` that `self + more` would exceed, as
    /// (resource, usage now, requested, limit).
    pub fn exceeds(&self, more: &Usage, quota: &Quota) -> Option<(&'static str, u64, u64, u64)> {
        let checks: [(&'static str, u64, u64, Option<u64>); 6] = [
            (
                "instances",
                self.instances.into(),
                more.instances.into(),
                quota.instances.map(u64::from),
            ),
            (
                "vcpus",
                self.vcpus.into(),
                more.vcpus.into(),
                quota.vcpus.map(u64::from),
            ),
            (
                "memory_mib",
                self.memory_mib,
                more.memory_mib,
                quota.memory_mib,
            ),
            (
                "volumes",
                self.volumes.into(),
                more.volumes.into(),
                quota.volumes.map(u64::from),
            ),
            (
                "volume_gib",
                self.volume_gib,
                more.volume_gib,
                quota.volume_gib,
            ),
            (
                "snapshots",
                self.snapshots.into(),
                more.snapshots.into(),
                quota.snapshots.map(u64::from),
            ),
        ];
        checks.into_iter().find_map(|(what, now, req, limit)| {
            let limit = limit?;
            (req > 0 && now.saturating_add(req) > limit).then_some((what, now, req, limit))
        })
    }
}

/// A project: the unit of ownership, isolation and quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    /// Unique name.
    pub name: ProjectName,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Its limits.
    #[serde(default)]
    pub quota: Quota,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A project with what it uses.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    /// The project.
    #[serde(flatten)]
    pub project: Project,
    /// What it uses now.
    pub usage: Usage,
}

/// `POST /v1/projects`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    /// Unique name.
    pub name: ProjectName,
    /// What it is for.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: String,
    /// Its limits (default: none).
    #[serde(default)]
    pub quota: Quota,
}

/// `PATCH /v1/projects/{name}`: what to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProjectRequest {
    /// A new description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub description: Option<String>,
    /// New limits (replace the old ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

/// Who an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A person.
    User,
    /// A program (CI, an autoscaler, an agent).
    ServiceAccount,
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentityKind::User => "user",
            IdentityKind::ServiceAccount => "service_account",
        })
    }
}

/// A user or service account and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Identity {
    /// Unique name.
    pub name: IdentityName,
    /// User or service account.
    pub kind: IdentityKind,
    /// May manage hosts, projects, identities and cluster settings, and
    /// acts as admin in every project.
    #[serde(default)]
    pub cluster_admin: bool,
    /// May read every server's and agent's metrics and the list of scrape
    /// targets (a Prometheus), and nothing else of the cluster's.
    #[serde(default)]
    pub cluster_monitor: bool,
    /// Its role in each project it belongs to.
    #[serde(default)]
    pub roles: BTreeMap<ProjectName, Role>,
    /// The project a request without a project header acts in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_project: Option<ProjectName>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

impl Identity {
    /// Whether it may read the cluster's metrics (every project's VMs
    /// appear in them): a cluster admin or a cluster monitor.
    pub fn may_read_metrics(&self) -> bool {
        self.cluster_admin || self.cluster_monitor
    }

    /// Its role in `project`: a cluster admin is admin everywhere.
    pub fn role_in(&self, project: &ProjectName) -> Option<Role> {
        if self.cluster_admin {
            return Some(Role::Admin);
        }
        self.roles.get(project).copied()
    }

    /// The project a request acts in when it names none.
    pub fn home_project(&self) -> ProjectName {
        if let Some(p) = &self.default_project {
            return p.clone();
        }
        let default = default_project();
        if self.cluster_admin || self.roles.contains_key(&default) || self.roles.is_empty() {
            return default;
        }
        self.roles.keys().next().cloned().unwrap_or(default)
    }
}

/// `POST /v1/identities`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateIdentityRequest {
    /// Unique name.
    pub name: IdentityName,
    /// User or service account.
    pub kind: IdentityKind,
    /// Whether it administers the cluster.
    #[serde(default)]
    pub cluster_admin: bool,
    /// Whether it may read the cluster's metrics (see
    /// [`Identity::cluster_monitor`]).
    #[serde(default)]
    pub cluster_monitor: bool,
    /// Its roles, by project.
    #[serde(default)]
    pub roles: BTreeMap<ProjectName, Role>,
    /// The project it acts in by default.
    #[serde(default)]
    pub default_project: Option<ProjectName>,
}

/// `PUT /v1/projects/{name}/members/{identity}`: the role to grant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// The role.
    pub role: Role,
}

/// A stored API token: only a hash of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id (the part of the token before its secret).
    pub id: String,
    /// Whose token it is.
    pub identity: IdentityName,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it was last used (updated at most once a minute).
    #[serde(default)]
    pub last_used_at: Option<DateTime<Utc>>,
    /// A join token: good for one join, then spent (its `revoked_at` says
    /// when).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single_use: bool,
}

/// A token as the API shows it: never its secret or hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Public id.
    pub id: String,
    /// Whose token it is.
    pub identity: IdentityName,
    /// What it is for.
    pub description: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it was last used.
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> Self {
        Self {
            id: t.id.clone(),
            identity: t.identity.clone(),
            description: t.description.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
            last_used_at: t.last_used_at,
        }
    }
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Whose token (default: the caller's own). Another identity's token
    /// needs a cluster admin, or a project admin for a service account
    /// whose only roles are in projects the caller administers.
    #[serde(default)]
    pub identity: Option<IdentityName>,
    /// What it is for.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: String,
    /// How long it works, in seconds (default: forever).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub expires_in_secs: Option<u64>,
}

/// A new token: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The bearer token; keep it, it is not shown again.
    pub token: String,
    /// The token's record.
    #[serde(flatten)]
    pub view: TokenView,
}

/// One action taken through the API: who did what, in which project, and
/// how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    /// When it was answered.
    pub at: DateTime<Utc>,
    /// Who.
    pub identity: IdentityName,
    /// With which token.
    pub token_id: String,
    /// The project it acted in; none for cluster-wide actions.
    pub project: Option<ProjectName>,
    /// HTTP method.
    pub method: String,
    /// The path it acted on (the object is named in it).
    pub path: String,
    /// The answer's HTTP status.
    pub status: u16,
}

/// `GET /v1/whoami`: who the caller is and what it may do here.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The identity.
    pub identity: Identity,
    /// The token in use.
    pub token_id: String,
    /// The project this request acted in.
    pub project: ProjectName,
    /// The caller's role in it, if any.
    pub role: Option<Role>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer.allows(Action::Read));
        assert!(!Role::Viewer.allows(Action::Write));
        assert!(Role::Member.allows(Action::Write));
        assert!(!Role::Member.allows(Action::Manage));
        assert!(Role::Admin.allows(Action::Manage));
    }

    #[test]
    fn quota_names_the_first_limit_exceeded() {
        let quota = Quota {
            vcpus: Some(4),
            ..Quota::default()
        };
        let now = Usage {
            vcpus: 3,
            ..Usage::default()
        };
        let more = Usage {
            instances: 1,
            vcpus: 2,
            ..Usage::default()
        };
        assert_eq!(now.exceeds(&more, &quota), Some(("vcpus", 3, 2, 4)));
        let fits = Usage {
            vcpus: 1,
            ..Usage::default()
        };
        assert_eq!(now.exceeds(&fits, &quota), None);
    }
}
