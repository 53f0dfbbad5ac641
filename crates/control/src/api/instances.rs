//! `/v1/instances`: create, list, show, start, stop, reboot, resize, delete,
//! console.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use skyvisor_core::api::{
    ConsoleLog, CreateInstanceRequest, ErrorBody, ResizeInstanceRequest, StopInstanceRequest,
};
use skyvisor_core::{Instance, InstancePhase};
use utoipa::IntoParams;

use super::{ApiJson, ApiQuery};
use crate::ControlPlane;
use crate::access::Caller;
use crate::error::{ApiError, ApiResult};

/// Filters and a page of the instance list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Only instances in this phase.
    #[serde(default)]
    state: Option<InstancePhase>,
    /// Only instances bound to this host.
    #[serde(default)]
    host: Option<String>,
    /// Only instances whose labels match: comma-separated `KEY=VALUE`
    /// (the label has that value) or `KEY` (it has the label) terms, all of
    /// which must hold.
    #[serde(default)]
    label: Option<String>,
    /// At most this many, in name order; the `x-skyvisor-continue` answer
    /// header then holds the token of the next page.
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The token from the previous page's `x-skyvisor-continue` header.
    #[serde(default, rename = "continue")]
    after: Option<String>,
}

/// The project's instances, in name order; filtered and paged on request.
#[utoipa::path(get, path = "/v1/instances", tag = "instances",
    params(ListQuery),
    responses(
        (status = 200, body = Vec<Instance>, headers(
            ("x-skyvisor-continue" = String, description = "present when more remain: the next page's token"))),
        (status = 400, body = ErrorBody),
    ))]
pub(super) async fn list(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<(axum::http::HeaderMap, Json<Vec<Instance>>)> {
    if let Some(h) = &q.host {
        skyvisor_core::HostName::new(h.as_str()).map_err(|e| {
            let mut err = ApiError::from(e);
            err.field = Some("host".into());
            err
        })?;
    }
    let selector = q
        .label
        .as_deref()
        .map(|l| skyvisor_core::labels::LabelSelector::parse("label", l))
        .transpose()?;
    let mut all = cp.instances().await;
    all.retain(|i| {
        i.spec.project == caller.project
            && q.state.is_none_or(|s| i.status.phase == s)
            && q.host.as_deref().is_none_or(|h| i.spec.host.as_str() == h)
            && selector.as_ref().is_none_or(|s| s.matches(&i.spec.labels))
    });
    let (items, headers) =
        super::page::page(all, |i| i.spec.name.as_str(), q.limit, q.after.as_deref())?;
    Ok((headers, Json(items)))
}

/// Creates an instance and, unless `start` is false, starts it.
#[utoipa::path(post, path = "/v1/instances", tag = "instances",
    request_body = CreateInstanceRequest,
    responses(
        (status = 201, body = Instance),
        (status = 400, body = ErrorBody, description = "invalid name, type or size"),
        (status = 404, body = ErrorBody, description = "unknown image"),
        (status = 409, body = ErrorBody, description = "duplicate name, image not ready, no host fits"),
    ))]
pub(super) async fn create(
    State(cp): State<ControlPlane>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateInstanceRequest>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    // Everything the new VM refers to must be the project's own (or a
    // public image).
    if !req.image.is_empty() {
        cp.visible_image(&caller, &req.image).await?;
    }
    if let Some(r) = &req.from_snapshot {
        cp.visible_snapshot_ref(&caller, r).await?;
    }
    for v in req.volumes.iter().chain(req.root_volume.iter()) {
        cp.visible_volume(&caller, v).await?;
    }
    Ok((
        StatusCode::CREATED,
        Json(cp.create_instance(&caller.project, req).await?),
    ))
}

/// One instance.
#[utoipa::path(get, path = "/v1/instances/{name}", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Instance>> {
    cp.visible_instance(&caller, &name).await?;
    Ok(Json(cp.instance(&caller.project, &name).await?))
}

/// Options of a delete.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteQuery {
    /// Delete even if it is running (it is powered off first).
    #[serde(default)]
    force: bool,
    /// Delete its snapshots too (by default they are kept, and can still
    /// be cloned).
    #[serde(default)]
    with_snapshots: bool,
}

/// Deletes an instance: its agent powers it off, removes its disk and
/// address, then the record. Poll until 404 to see it gone.
#[utoipa::path(delete, path = "/v1/instances/{name}", tag = "instances",
    params(("name" = String, Path, description = "instance name"), DeleteQuery),
    responses(
        (status = 202, body = Instance),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "running and not forced"),
    ))]
pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            cp.delete_instance(&caller.project, &name, q.force, q.with_snapshots)
                .await?,
        ),
    ))
}

/// Starts an instance.
#[utoipa::path(post, path = "/v1/instances/{name}/start", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    responses((status = 202, body = Instance), (status = 404, body = ErrorBody)))]
pub(super) async fn start(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.start_instance(&caller.project, &name).await?),
    ))
}

/// Stops an instance: ACPI shutdown, then power off after the timeout.
#[utoipa::path(post, path = "/v1/instances/{name}/stop", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    request_body(content = StopInstanceRequest, description = "optional"),
    responses((status = 202, body = Instance), (status = 404, body = ErrorBody)))]
pub(super) async fn stop(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    // The body is optional: an empty one means the defaults.
    let req: StopInstanceRequest = super::extract::optional_body(&body)?;
    // Bad values are refused before the instance is looked up.
    if let Some(t) = req.timeout_secs {
        crate::instances::validate_stop_timeout(t)?;
    }
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.stop_instance(&caller.project, &name, req).await?),
    ))
}

/// Reboots a running instance gracefully.
#[utoipa::path(post, path = "/v1/instances/{name}/reboot", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    responses(
        (status = 202, body = Instance),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not running"),
    ))]
pub(super) async fn reboot(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.reboot_instance(&caller.project, &name).await?),
    ))
}

/// Changes an instance's vCPUs and memory (a running one is restarted).
#[utoipa::path(post, path = "/v1/instances/{name}/resize", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    request_body = ResizeInstanceRequest,
    responses(
        (status = 202, body = Instance),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the host cannot fit the new size"),
    ))]
pub(super) async fn resize(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ResizeInstanceRequest>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    cp.visible_instance(&caller, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(cp.resize_instance(&caller.project, &name, req).await?),
    ))
}

/// Puts an instance in exactly the given security groups (none: not
/// filtered); its host applies them within a second, while it runs.
#[utoipa::path(put, path = "/v1/instances/{name}/security-groups", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    request_body = skyvisor_core::api::SetSecurityGroupsRequest,
    responses(
        (status = 200, body = Instance),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such instance or group"),
        (status = 409, body = ErrorBody, description = "being deleted or migrated"),
    ))]
pub(super) async fn set_security_groups(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<skyvisor_core::api::SetSecurityGroupsRequest>,
) -> ApiResult<Json<Instance>> {
    cp.visible_instance(&caller, &name).await?;
    Ok(Json(
        cp.set_instance_security_groups(&caller.project, &name, req.security_groups)
            .await?,
    ))
}

/// Replaces an instance's labels.
#[utoipa::path(put, path = "/v1/instances/{name}/labels", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    request_body = skyvisor_core::api::SetLabelsRequest,
    responses(
        (status = 200, body = Instance),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such instance"),
        (status = 409, body = ErrorBody, description = "being deleted"),
    ))]
pub(super) async fn set_labels(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<skyvisor_core::api::SetLabelsRequest>,
) -> ApiResult<Json<Instance>> {
    cp.visible_instance(&caller, &name).await?;
    Ok(Json(
        cp.set_instance_labels(&caller.project, &name, req.labels)
            .await?,
    ))
}

/// Runs a command in a running container and returns its exit status and
/// output (`skyvisor vm exec NAME -- COMMAND`).
#[utoipa::path(post, path = "/v1/instances/{name}/exec", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    request_body = skyvisor_core::api::ExecRequest,
    responses(
        (status = 200, body = skyvisor_core::api::ExecResult),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "a VM, or a container that is not running"),
    ))]
pub(super) async fn exec(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<skyvisor_core::api::ExecRequest>,
) -> ApiResult<Json<skyvisor_core::api::ExecResult>> {
    cp.visible_instance(&caller, &name).await?;
    Ok(Json(
        cp.exec_in_instance(&caller.project, &name, &req).await?,
    ))
}

/// What `POST /v1/instances/{name}/exec-tty` runs.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecTtyQuery {
    /// The command and its arguments, as a JSON array of strings (e.g.
    /// `["sh"]`).
    command: String,
}

/// Runs a command on a terminal in a running container (`skyvisor vm exec
/// -t`), until it ends or the client hangs up (no timeout). Send `Connection: upgrade` and `Upgrade: skyvisor-exec`; on 101
/// the connection carries frames `[kind u8][length u32 BE][payload]`:
/// kind 0, terminal bytes both ways; kind 1, the command's exit status
/// (i32 BE), sent last by the server.
#[utoipa::path(post, path = "/v1/instances/{name}/exec-tty", tag = "instances",
    params(("name" = String, Path, description = "instance name"), ExecTtyQuery),
    responses(
        (status = 101, description = "switched to the skyvisor-exec stream"),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "a VM, or a container that is not running"),
    ))]
pub(super) async fn exec_tty(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ExecTtyQuery>,
    mut req: axum::extract::Request,
) -> ApiResult<axum::response::Response> {
    use skyvisor_core::exec_stream::UPGRADE_PROTOCOL;
    cp.visible_instance(&caller, &name).await?;
    let command: Vec<String> = serde_json::from_str(&q.command).map_err(|e| {
        let mut err = ApiError::invalid(format!(
            "command must be a JSON array of strings, such as [\"sh\"]: {e}"
        ));
        err.field = Some("command".into());
        err
    })?;
    let asked = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| {
            v.as_bytes()
                .eq_ignore_ascii_case(UPGRADE_PROTOCOL.as_bytes())
        });
    if !asked {
        return Err(ApiError::invalid(format!(
            "a terminal session is an upgraded connection: send Connection: upgrade and Upgrade: {UPGRADE_PROTOCOL} (or use POST /v1/instances/{{name}}/exec without a terminal)"
        )));
    }
    let exec = skyvisor_core::api::ExecRequest {
        command,
        stdin: None,
        timeout_secs: None,
    };
    let upstream = cp.exec_tty_upstream(&caller.project, &name, &exec).await?;
    let client = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(client) = client.await {
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut upstream = upstream;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (axum::http::header::UPGRADE, UPGRADE_PROTOCOL),
            (axum::http::header::CONNECTION, "upgrade"),
        ],
    )
        .into_response())
}

/// An interactive serial console over a WebSocket (the web console's
/// terminal). Ask for the subprotocol `skyvisor.console`; a browser, which
/// cannot set headers on a WebSocket, may pass its token and project as the
/// further subprotocols `skyvisor.bearer.BASE64URL(token)` and
/// `skyvisor.project.BASE64URL(project)`. Binary messages both ways: the
/// console log's last 64 KiB, then live output; keystrokes (dropped unless
/// the caller may change the project's objects: viewers watch). Errors
/// after the handshake close the socket with code 4000 + the HTTP status
/// and the error's message as reason.
#[utoipa::path(get, path = "/v1/instances/{name}/console/ws", tag = "instances",
    params(("name" = String, Path, description = "instance name")),
    responses(
        (status = 101, description = "switched to a WebSocket"),
        (status = 400, body = ErrorBody, description = "not a WebSocket handshake"),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn console_ws(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ws: Result<
        axum::extract::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> ApiResult<axum::response::Response> {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            // Not a handshake: an instance the caller cannot see is 404
            // first, as on every route. (A handshake is accepted before the
            // lookup, because a browser cannot read a refused one's answer:
            // it learns why from the close frame.)
            cp.visible_instance(&caller, &name).await?;
            return Err(ApiError::invalid(format!(
                "this endpoint is a WebSocket: open it with a WebSocket handshake asking for the subprotocol {} ({e}); GET /v1/instances/{{name}}/console reads the log without one",
                crate::console::WEBSOCKET_PROTOCOL
            )));
        }
    };
    let input = caller.may(skyvisor_core::auth::Action::Write, &caller.project);
    Ok(ws
        .protocols([crate::console::WEBSOCKET_PROTOCOL])
        .on_upgrade(move |socket| async move {
            let upstream = match cp.visible_instance(&caller, &name).await {
                Ok(_) => cp.console_upstream(&caller.project, &name, input).await,
                Err(e) => Err(e),
            };
            crate::console::relay(socket, upstream).await;
        }))
}

/// Most console bytes one call returns.
const MAX_CONSOLE_BYTES: u64 = 1 << 20;

/// Which part of the console log to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ConsoleQuery {
    /// Byte offset to start at; negative counts from the end.
    #[serde(default)]
    offset: Option<i64>,
    /// Most bytes to return (default 64 KiB, at most 1 MiB).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1048576)]
    max_bytes: Option<u64>,
}

/// The instance's serial console output.
#[utoipa::path(get, path = "/v1/instances/{name}/console", tag = "instances",
    params(("name" = String, Path, description = "instance name"), ConsoleQuery),
    responses((status = 200, body = ConsoleLog), (status = 404, body = ErrorBody)))]
pub(super) async fn console(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> ApiResult<Json<ConsoleLog>> {
    cp.visible_instance(&caller, &name).await?;
    let inst = cp.instance(&caller.project, &name).await?;
    let max = q.max_bytes.unwrap_or(64 * 1024);
    if !(1..=MAX_CONSOLE_BYTES).contains(&max) {
        let mut e = ApiError::invalid(format!(
            "max_bytes {max} is out of range; allowed: 1 to {MAX_CONSOLE_BYTES}"
        ));
        e.field = Some("max_bytes".into());
        return Err(e);
    }
    let host = cp.inventory.host(&inst.spec.host).await.ok_or_else(|| {
        ApiError::unavailable(format!("host {} is not registered", inst.spec.host))
    })?;
    let Some(agent) = host.host.agent_url.clone() else {
        return Err(ApiError::unavailable(format!(
            "host {} does not serve console logs",
            inst.spec.host
        )));
    };
    let url = format!("{agent}/agent/v1/instances/{}/console", inst.spec.id);
    let mut query = vec![("max_bytes", max.to_string())];
    if let Some(o) = q.offset {
        query.push(("offset", o.to_string()));
    }
    let resp =
        cp.http.get(&url).query(&query).send().await.map_err(|e| {
            ApiError::unavailable(format!("host {} unreachable: {e}", inst.spec.host))
        })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(ApiError::bad_gateway(format!(
            "host {} answered {status}: {text}",
            inst.spec.host
        )));
    }
    let log: ConsoleLog = resp.json().await.map_err(|e| {
        ApiError::bad_gateway(format!(
            "host {} sent a bad console log: {e}",
            inst.spec.host
        ))
    })?;
    Ok(Json(log))
}
