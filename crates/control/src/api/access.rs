//! `/v1/whoami`, `/v1/projects`, `/v1/identities` and `/v1/tokens`: who
//! may do what, and their API tokens.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use serde::Deserialize;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::auth::{
    Action, AuditRecord, CreateIdentityRequest, CreateProjectRequest, CreateTokenRequest,
    CreatedToken, DEFAULT_PROJECT, GrantRequest, Identity, IdentityKind, Project, ProjectView,
    TokenView, UpdateProjectRequest, WhoAmI,
};
use skyvisor_core::{IdentityName, ProjectName, ValidationError};
use utoipa::IntoParams;

use super::{ApiJson, ApiQuery};
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::{ApiError, ApiResult};

/// Longest description of a project or token.
const MAX_DESCRIPTION: usize = 1024;

/// Longest lifetime a token may be given: ten years.
pub(super) const MAX_TOKEN_SECS: u64 = 10 * 365 * 24 * 3600;

fn check_description(field: &str, d: &str) -> ApiResult<()> {
    if d.len() > MAX_DESCRIPTION {
        return Err(ValidationError::new(
            field,
            format!("is {} bytes; allowed: at most {MAX_DESCRIPTION}", d.len()),
        )
        .into());
    }
    Ok(())
}

/// Who the caller is, with which token, in which project and role.
#[utoipa::path(get, path = "/v1/whoami", tag = "access",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
pub(super) async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        identity: caller.principal.identity.clone(),
        token_id: caller.principal.token_id.clone(),
        project: caller.project.clone(),
        role: caller.role,
    })
}

async fn view(cp: &ControlPlane, project: Project) -> ApiResult<ProjectView> {
    let usage = cp.usage(&project.name).await?;
    Ok(ProjectView { project, usage })
}

/// The projects the caller has a role in (every project for a cluster
/// admin), with what each uses.
#[utoipa::path(get, path = "/v1/projects", tag = "access",
    responses((status = 200, body = Vec<ProjectView>)))]
pub(super) async fn list_projects(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<ProjectView>>> {
    let mut out = Vec::new();
    for p in cp.directory.projects().await? {
        if caller.may(Action::Read, &p.name) {
            out.push(view(&cp, p).await?);
        }
    }
    Ok(Json(out))
}

/// Creates a project (cluster admins).
#[utoipa::path(post, path = "/v1/projects", tag = "access",
    request_body = CreateProjectRequest,
    responses(
        (status = 201, body = ProjectView),
        (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name taken"),
    ))]
pub(super) async fn create_project(
    State(cp): State<ControlPlane>,
    ApiJson(req): ApiJson<CreateProjectRequest>,
) -> ApiResult<(StatusCode, Json<ProjectView>)> {
    check_description("description", &req.description)?;
    let p = cp.directory.create_project(req).await?;
    Ok((StatusCode::CREATED, Json(view(&cp, p).await?)))
}

fn project_name(name: &str) -> ApiResult<ProjectName> {
    ProjectName::new(name).map_err(|_| ApiError::not_found(format!("project {name} not found")))
}

/// One project with its quota and what it uses.
#[utoipa::path(get, path = "/v1/projects/{name}", tag = "access",
    params(("name" = String, Path, description = "project name")),
    responses((status = 200, body = ProjectView), (status = 404, body = ErrorBody)))]
pub(super) async fn show_project(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> ApiResult<Json<ProjectView>> {
    let name = project_name(&name)?;
    let p = cp
        .directory
        .project(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("project {name} not found")))?;
    Ok(Json(view(&cp, p).await?))
}

/// Changes a project's description or quota (cluster admins). A quota
/// below what the project uses refuses new objects; it removes nothing.
#[utoipa::path(patch, path = "/v1/projects/{name}", tag = "access",
    params(("name" = String, Path, description = "project name")),
    request_body = UpdateProjectRequest,
    responses(
        (status = 200, body = ProjectView),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn update_project(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateProjectRequest>,
) -> ApiResult<Json<ProjectView>> {
    let name = project_name(&name)?;
    if let Some(d) = &req.description {
        check_description("description", d)?;
    }
    let p = cp.directory.update_project(&name, req).await?;
    Ok(Json(view(&cp, p).await?))
}

/// Deletes an empty project (cluster admins); refused while it holds
/// objects, listing them.
#[utoipa::path(delete, path = "/v1/projects/{name}", tag = "access",
    params(("name" = String, Path, description = "project name")),
    responses(
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "it holds objects, or it is the default project"),
    ))]
pub(super) async fn delete_project(
    State(cp): State<ControlPlane>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let name = project_name(&name)?;
    if name.as_str() == DEFAULT_PROJECT {
        return Err(ApiError::conflict(
            "the default project cannot be deleted: it is where objects go when no project is named",
        ));
    }
    if cp.directory.project(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("project {name} not found")));
    }
    let mut contents = cp.project_contents(&name).await?;
    contents.extend(cp.project_network_contents(&name).await?);
    if !contents.is_empty() {
        return Err(ApiError::conflict(format!(
            "project {name} still holds {}; delete them first",
            contents.join(", ")
        )));
    }
    cp.delete_project_networks(&name).await?;
    cp.directory.delete_project(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn identity_name(name: &str) -> ApiResult<IdentityName> {
    IdentityName::new(name).map_err(|_| ApiError::not_found(format!("identity {name} not found")))
}

/// Gives an identity a role in the project (project admins).
#[utoipa::path(put, path = "/v1/projects/{name}/members/{identity}", tag = "access",
    params(("name" = String, Path, description = "project name"),
           ("identity" = String, Path, description = "identity name")),
    request_body = GrantRequest,
    responses(
        (status = 200, body = Identity),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn grant(
    State(cp): State<ControlPlane>,
    Path((name, identity)): Path<(String, String)>,
    ApiJson(req): ApiJson<GrantRequest>,
) -> ApiResult<Json<Identity>> {
    let project = project_name(&name)?;
    let identity = identity_name(&identity)?;
    Ok(Json(
        cp.directory
            .set_role(&identity, &project, Some(req.role))
            .await?,
    ))
}

/// Takes an identity's role in the project away (project admins).
#[utoipa::path(delete, path = "/v1/projects/{name}/members/{identity}", tag = "access",
    params(("name" = String, Path, description = "project name"),
           ("identity" = String, Path, description = "identity name")),
    responses((status = 200, body = Identity), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_role(
    State(cp): State<ControlPlane>,
    Path((name, identity)): Path<(String, String)>,
) -> ApiResult<Json<Identity>> {
    let project = project_name(&name)?;
    let identity = identity_name(&identity)?;
    Ok(Json(
        cp.directory.set_role(&identity, &project, None).await?,
    ))
}

/// Every identity (cluster admins).
#[utoipa::path(get, path = "/v1/identities", tag = "access",
    responses((status = 200, body = Vec<Identity>)))]
pub(super) async fn list_identities(
    State(cp): State<ControlPlane>,
) -> ApiResult<Json<Vec<Identity>>> {
    Ok(Json(cp.directory.identities().await?))
}

/// Creates a user or service account (cluster admins); give it a token
/// with `POST /v1/tokens`.
#[utoipa::path(post, path = "/v1/identities", tag = "access",
    request_body = CreateIdentityRequest,
    responses(
        (status = 201, body = Identity),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "a project of its roles does not exist"),
        (status = 409, body = ErrorBody, description = "name taken"),
    ))]
pub(super) async fn create_identity(
    State(cp): State<ControlPlane>,
    ApiJson(req): ApiJson<CreateIdentityRequest>,
) -> ApiResult<(StatusCode, Json<Identity>)> {
    Ok((
        StatusCode::CREATED,
        Json(cp.directory.create_identity(req).await?),
    ))
}

/// One identity: the caller itself, or any for a cluster admin.
#[utoipa::path(get, path = "/v1/identities/{name}", tag = "access",
    params(("name" = String, Path, description = "identity name")),
    responses((status = 200, body = Identity), (status = 404, body = ErrorBody)))]
pub(super) async fn show_identity(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Identity>> {
    let name = identity_name(&name)?;
    let hidden = || ApiError::not_found(format!("identity {name} not found"));
    if name != caller.principal.identity.name && !caller.is_cluster_admin() {
        return Err(hidden());
    }
    Ok(Json(
        cp.directory.identity(&name).await?.ok_or_else(hidden)?,
    ))
}

/// Deletes an identity and revokes its tokens (cluster admins).
#[utoipa::path(delete, path = "/v1/identities/{name}", tag = "access",
    params(("name" = String, Path, description = "identity name")),
    responses(
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the caller itself"),
    ))]
pub(super) async fn delete_identity(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let name = identity_name(&name)?;
    if name == caller.principal.identity.name {
        return Err(ApiError::conflict(
            "an identity cannot delete itself; ask another cluster admin",
        ));
    }
    cp.directory.delete_identity(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which tokens to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct TokensQuery {
    /// Only this identity's (cluster admins may name any; others only
    /// themselves). Default: the caller's own, or all for a cluster admin.
    #[serde(default)]
    identity: Option<String>,
}

/// API tokens: the caller's own, or any for a cluster admin. Never their
/// secrets.
#[utoipa::path(get, path = "/v1/tokens", tag = "access",
    params(TokensQuery),
    responses((status = 200, body = Vec<TokenView>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_tokens(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiQuery(q): ApiQuery<TokensQuery>,
) -> ApiResult<Json<Vec<TokenView>>> {
    let me = &caller.principal.identity.name;
    let whose = match q.identity {
        Some(n) => {
            let n = identity_name(&n)?;
            if &n != me && !caller.is_cluster_admin() {
                return Err(ApiError::not_found(format!("identity {n} not found")));
            }
            Some(n)
        }
        None if caller.is_cluster_admin() => None,
        None => Some(me.clone()),
    };
    let tokens = cp.directory.tokens(whose.as_ref()).await?;
    Ok(Json(tokens.iter().map(TokenView::from).collect()))
}

/// Makes an API token; its secret is in this answer only. For another
/// identity: a cluster admin, or a project admin for a service account
/// whose every role is in projects the caller administers.
#[utoipa::path(post, path = "/v1/tokens", tag = "access",
    request_body = CreateTokenRequest,
    responses(
        (status = 201, body = CreatedToken),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such identity"),
    ))]
pub(super) async fn create_token(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    check_description("description", &req.description)?;
    let me = &caller.principal.identity;
    let whose = req.identity.clone().unwrap_or_else(|| me.name.clone());
    if whose != me.name && !caller.is_cluster_admin() {
        let hidden = || ApiError::not_found(format!("identity {whose} not found"));
        let target = cp.directory.identity(&whose).await?.ok_or_else(hidden)?;
        let administers = target.kind == IdentityKind::ServiceAccount
            && !target.cluster_admin
            && !target.roles.is_empty()
            && target.roles.keys().all(|p| caller.may(Action::Manage, p));
        if !administers {
            return Err(hidden());
        }
    }
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(s) if (1..=MAX_TOKEN_SECS).contains(&s) => {
            Some(Utc::now() + chrono::Duration::seconds(s as i64))
        }
        Some(s) => {
            return Err(ValidationError::new(
                "expires_in_secs",
                format!("{s} is out of range; allowed: 1 to {MAX_TOKEN_SECS} (ten years)"),
            )
            .into());
        }
    };
    let issued = cp
        .directory
        .create_token(&whose, &req.description, expires_at)
        .await?;
    cp.events.record(skyvisor_core::Event::new(
        skyvisor_core::EventKind::TokenCreated,
        skyvisor_core::ObjectKind::Token,
        None,
        issued.record.id.clone(),
        format!("token {} created for identity {whose}", issued.record.id),
    ));
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: issued.bearer,
            view: TokenView::from(&issued.record),
        }),
    ))
}

/// Revokes a token at once, on every server: the caller's own, or any for
/// a cluster admin.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "access",
    params(("id" = String, Path, description = "token id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_token(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let hidden = || ApiError::not_found(format!("token {id} not found"));
    let record = cp.directory.token(&id).await?.ok_or_else(hidden)?;
    if record.identity != caller.principal.identity.name && !caller.is_cluster_admin() {
        return Err(hidden());
    }
    cp.directory.revoke_token(&id).await?;
    cp.events.record(skyvisor_core::Event::new(
        skyvisor_core::EventKind::TokenRevoked,
        skyvisor_core::ObjectKind::Token,
        None,
        id.clone(),
        format!("token {id} of identity {} revoked", record.identity),
    ));
    Ok(StatusCode::NO_CONTENT)
}

/// Which audit records to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    /// Most records, newest first (default 100, at most 1000).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The cluster-wide trail (hosts, projects, identities, refusals)
    /// instead of the project's; cluster admins only.
    #[serde(default)]
    cluster: bool,
}

/// The audit trail of the request's project (project admins), or the
/// cluster-wide one: who did what to which object, and the answer.
#[utoipa::path(get, path = "/v1/audit", tag = "access",
    params(AuditQuery),
    responses(
        (status = 200, body = Vec<AuditRecord>),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ))]
pub(super) async fn audit(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Vec<AuditRecord>>> {
    let limit = match q.limit {
        None => 100,
        Some(n) if (1..=crate::audit::MAX_LIST).contains(&n) => n,
        Some(n) => {
            return Err(ValidationError::new(
                "limit",
                format!(
                    "{n} is out of range; allowed: 1 to {}",
                    crate::audit::MAX_LIST
                ),
            )
            .into());
        }
    };
    if q.cluster && !caller.is_cluster_admin() {
        return Err(ApiError::forbidden(
            "the cluster-wide audit trail needs a cluster admin",
        ));
    }
    let project = (!q.cluster).then_some(&caller.project);
    Ok(Json(
        crate::audit::list(cp.store.as_ref(), project, limit).await?,
    ))
}
