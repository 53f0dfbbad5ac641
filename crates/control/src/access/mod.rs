//! Authorization of every API request, in one place: the layer that
//! authenticates the caller (401), finds the rule of the matched route
//! ([`policy`]), resolves the project the request acts in and checks the
//! caller's role there (403, or 404 for a project it may not see), and
//! hands handlers a [`Caller`]. Handlers scope every object they touch to
//! `Caller::project` through [`crate::tenancy`]; an object of another
//! project is 404, exactly as if it did not exist.

pub mod policy;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use skyvisor_auth::Principal;
use skyvisor_core::ProjectName;
use skyvisor_core::auth::{Action, PROJECT_HEADER, Role};

use crate::ControlPlane;
use crate::error::ApiError;
use policy::Rule;

/// The authenticated caller of a request and the project it acts in.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who, with which token.
    pub principal: Principal,
    /// The project the request acts in: its objects are the only ones it
    /// sees, and new objects belong to it.
    pub project: ProjectName,
    /// The caller's role in that project (a cluster admin is admin).
    pub role: Option<Role>,
}

impl Caller {
    /// Whether the caller administers the cluster.
    pub fn is_cluster_admin(&self) -> bool {
        self.principal.identity.cluster_admin
    }

    /// Whether the caller may perform `action` in `project`.
    pub fn may(&self, action: Action, project: &ProjectName) -> bool {
        self.principal
            .identity
            .role_in(project)
            .is_some_and(|r| r.allows(action))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Set by `authorize`, which every routed request passes through.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::unauthenticated("this request was not authenticated"))
    }
}

/// The layer: authenticates and authorizes a routed request, or answers
/// 401/403/404 without calling the handler.
/// Requests that may change something (and their refusals) are written
/// to the audit trail with who sent them.
pub async fn authorize(State(cp): State<ControlPlane>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let (caller, project_scoped) = match caller_of(&cp, &parts).await {
        Ok(found) => found,
        Err(e) => {
            if changes && let Some(caller) = e.1 {
                cp.audit
                    .record(&caller, false, method.as_str(), &path, e.0.status.as_u16());
            }
            return e.0.into_response();
        }
    };
    parts.extensions.insert(caller.clone());
    cp.events
        .token_used(&caller.principal.identity.name, &caller.principal.token_id);
    // The events the request records name its caller.
    let resp = crate::events::as_actor(
        caller.principal.identity.name.clone(),
        next.run(Request::from_parts(parts, body)),
    )
    .await;
    if changes {
        cp.audit.record(
            &caller,
            project_scoped,
            method.as_str(),
            &path,
            resp.status().as_u16(),
        );
    }
    resp
}

/// A refusal, with the caller when it was authenticated (to audit it).
type Refusal = (ApiError, Option<Caller>);

/// The caller and whether the request acts in a project, or why not.
async fn caller_of(cp: &ControlPlane, req: &Parts) -> Result<(Caller, bool), Refusal> {
    let refused = |e: ApiError| (e, None);
    let (principal, path, rule) = authenticate(cp, req).await.map_err(refused)?;
    let project = match rule {
        Rule::ProjectInPath(_) => path_project(req).map_err(refused)?,
        _ => header_project(req, &principal).map_err(refused)?,
    };
    let role = principal.identity.role_in(&project);
    let caller = Caller {
        principal,
        project,
        role,
    };
    match check(cp, req, &caller, &path, rule).await {
        Ok(scoped) => Ok((caller, scoped)),
        Err(e) => Err((e, Some(caller))),
    }
}

/// Who the caller is, the matched route and its rule.
async fn authenticate(
    cp: &ControlPlane,
    req: &Parts,
) -> Result<(Principal, String, Rule), ApiError> {
    let from_websocket;
    let header = match req.headers.get(axum::http::header::AUTHORIZATION) {
        None => {
            from_websocket = websocket_credential(req, BEARER_PROTOCOL)
                .map_err(ApiError::unauthenticated)?
                .map(|token| format!("Bearer {token}"));
            from_websocket.as_deref()
        }
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::unauthenticated(
                "malformed API token: the Authorization header is not text".to_string(),
            )
        })?),
    };
    let principal = cp.directory.authenticate(header).await?;
    let path = req
        .extensions
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let Some(rule) = policy::rule(&req.method, &path) else {
        // A route nobody wrote a rule for is closed, not open.
        return Err(ApiError::forbidden(format!(
            "{} {path} has no authorization rule; refused",
            req.method
        )));
    };
    Ok((principal, path, rule))
}

/// The WebSocket subprotocol prefix that carries a browser's token
/// (browsers cannot set headers on a WebSocket; Kubernetes does the same).
pub const BEARER_PROTOCOL: &str = "skyvisor.bearer.";
/// The WebSocket subprotocol prefix that carries the project.
pub const PROJECT_PROTOCOL: &str = "skyvisor.project.";

/// The value a WebSocket handshake's offered subprotocol `PREFIX<base64url>`
/// carries, if it offers one.
fn websocket_credential(req: &Parts, prefix: &str) -> Result<Option<String>, String> {
    use base64::Engine;
    let offered = req
        .headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(prefix));
    let Some(encoded) = offered else {
        return Ok(None);
    };
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            format!("the WebSocket subprotocol {prefix}... must carry base64url text")
        })?;
    Ok(Some(text))
}

/// The project the header names, or the caller's home project.
fn header_project(req: &Parts, principal: &Principal) -> Result<ProjectName, ApiError> {
    let from_websocket = websocket_credential(req, PROJECT_PROTOCOL).map_err(ApiError::invalid)?;
    match (req.headers.get(PROJECT_HEADER), from_websocket) {
        (None, Some(name)) => ProjectName::new(name).map_err(|e| {
            let mut err = ApiError::from(e);
            err.field = Some(PROJECT_HEADER.into());
            err
        }),
        (None, None) => Ok(principal.identity.home_project()),
        (Some(v), _) => {
            let text = v.to_str().map_err(|_| {
                ApiError::invalid(format!("the {PROJECT_HEADER} header is not text"))
            })?;
            ProjectName::new(text).map_err(|e| {
                let mut err = ApiError::from(e);
                err.field = Some(PROJECT_HEADER.into());
                err
            })
        }
    }
}

/// Whether `caller` may call the route; `Ok(true)` when the request acts
/// in the caller's project.
async fn check(
    cp: &ControlPlane,
    req: &Parts,
    caller: &Caller,
    path: &str,
    rule: Rule,
) -> Result<bool, ApiError> {
    let identity = &caller.principal.identity;
    let project = &caller.project;
    let joiner = identity.name.as_str() == skyvisor_auth::JOINER;
    if joiner && rule != Rule::Join {
        return Err(ApiError::forbidden(
            skyvisor_auth::AuthError::JoinOnly.to_string(),
        ));
    }
    let action = match rule {
        Rule::Authenticated => return Ok(false),
        Rule::Join if joiner || identity.cluster_admin => return Ok(false),
        Rule::Join => {
            return Err(ApiError::forbidden(format!(
                "{} {path} needs a join token or a cluster admin; {} is neither",
                req.method, identity.name
            )));
        }
        Rule::ClusterAdmin => {
            if identity.cluster_admin {
                return Ok(false);
            }
            return Err(ApiError::forbidden(format!(
                "{} {path} needs a cluster admin; {} is not one",
                req.method, identity.name
            )));
        }
        Rule::Monitor => {
            if identity.may_read_metrics() {
                return Ok(false);
            }
            return Err(ApiError::forbidden(format!(
                "{} {path} needs a cluster admin or a cluster monitor; {} is neither",
                req.method, identity.name
            )));
        }
        Rule::Project(a) | Rule::ProjectInPath(a) => a,
    };
    // A project the caller has no role in is one it cannot see: 404, as
    // for one that does not exist.
    let hidden = || ApiError::not_found(format!("project {project} not found"));
    let Some(role) = caller.role else {
        return Err(hidden());
    };
    if cp.directory.project(project).await?.is_none() {
        return Err(hidden());
    }
    if !role.allows(action) {
        return Err(ApiError::forbidden(format!(
            "{} {path} needs the {} role in project {project}; {} is {role}",
            req.method,
            Role::needed_for(action),
            identity.name
        )));
    }
    Ok(true)
}

/// The `{name}` of a `/v1/projects/{name}...` path.
fn path_project(req: &Parts) -> Result<ProjectName, ApiError> {
    let name = req
        .uri
        .path()
        .strip_prefix("/v1/projects/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let name = percent_decode(name);
    ProjectName::new(name)
        .map_err(|_| ApiError::not_found("project not found: not a valid project name"))
}

/// Decodes `%XX` escapes (a path segment as a client may send it).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(protocols: &str) -> Parts {
        let (parts, ()) = axum::http::Request::get("/v1/instances/web/console/ws")
            .header(axum::http::header::SEC_WEBSOCKET_PROTOCOL, protocols)
            .body(())
            .expect("request")
            .into_parts();
        parts
    }

    #[test]
    fn a_websocket_carries_its_token_and_project_as_subprotocols() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let parts = handshake(&format!(
            "skyvisor.console, {BEARER_PROTOCOL}{}, {PROJECT_PROTOCOL}{}",
            b64("svt_abc_def"),
            b64("shop")
        ));
        assert_eq!(
            websocket_credential(&parts, BEARER_PROTOCOL),
            Ok(Some("svt_abc_def".to_string()))
        );
        assert_eq!(
            websocket_credential(&parts, PROJECT_PROTOCOL),
            Ok(Some("shop".to_string()))
        );
        // None offered: no credential (the request is then unauthenticated).
        let plain = handshake("skyvisor.console");
        assert_eq!(websocket_credential(&plain, BEARER_PROTOCOL), Ok(None));
        // Not base64url text: refused with what it must be.
        let bad = handshake(&format!("{BEARER_PROTOCOL}!!!"));
        let err = websocket_credential(&bad, BEARER_PROTOCOL).expect_err("refused");
        assert!(err.contains("base64url"), "{err}");
    }
}
