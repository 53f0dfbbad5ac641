//! The agent's own small HTTP service: what only this host can answer
//! (console logs of its VMs; the server proxies users' requests here) and
//! the verified image files it holds, by checksum, for peer hosts that
//! cannot reach a server.

use std::io::SeekFrom;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use skyvisor_core::InstanceId;
use skyvisor_core::api::ConsoleLog;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::AgentContext;

/// The agent's routes.
pub fn router(ctx: Arc<AgentContext>) -> Router {
    Router::new()
        .route("/agent/v1/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/agent/v1/instances/{id}/console",
            axum::routing::get(console),
        )
        .route(
            "/agent/v1/instances/{id}/console-session",
            axum::routing::get(console_session),
        )
        .route("/agent/v1/instances/{id}/exec", axum::routing::post(exec))
        .route(
            "/agent/v1/instances/{id}/exec-tty",
            axum::routing::post(exec_tty),
        )
        .route(
            "/agent/v1/image-files/{sha256}",
            axum::routing::get(image_file),
        )
        .route("/agent/v1/peer-probe", axum::routing::get(peer_probe))
        .route("/agent/v1/samples", axum::routing::get(samples))
        .route("/agent/v1/history/host", axum::routing::get(host_history))
        .route(
            "/agent/v1/history/instances/{project}/{name}",
            axum::routing::get(instance_history),
        )
        .with_state(ctx)
}

/// Admits only callers that present the cluster's key (servers and other
/// agents); `/agent/v1/health` stays open for liveness checks.
pub fn members_only(router: Router, key: skyvisor_auth::ClusterKey) -> Router {
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let key = key.clone();
            async move {
                let presented = req
                    .headers()
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                // A member shows its certificate of the cluster's CA (the
                // TLS handshake checked it) and the cluster's key.
                let member = req
                    .extensions()
                    .get::<axum::extract::ConnectInfo<skyvisor_auth::tls::PeerCertificate>>()
                    .is_some_and(|c| c.0.0);
                if req.uri().path() == "/agent/v1/health" || (member && key.admits(presented)) {
                    next.run(req).await
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        "this agent API admits only the cluster's servers and agents",
                    )
                        .into_response()
                }
            }
        },
    ))
}

#[derive(Deserialize)]
struct ConsoleQuery {
    offset: Option<i64>,
    max_bytes: Option<u64>,
}

async fn console(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<uuid::Uuid>,
    Query(q): Query<ConsoleQuery>,
) -> impl IntoResponse {
    let path = ctx
        .vm_dir(&InstanceId(id))
        .join(skyvisor_qemu::files::SERIAL_LOG);
    let max = q.max_bytes.unwrap_or(64 * 1024).min(1 << 20);
    match read_slice(&path, q.offset.unwrap_or(0), max).await {
        Ok(log) => Json(log).into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json(ConsoleLog {
            offset: 0,
            text: String::new(),
        })
        .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct SessionQuery {
    /// Whether the caller may type (the server checked its role).
    #[serde(default)]
    input: bool,
}

/// An interactive console session over an upgraded connection
/// (`Upgrade: skyvisor-console`): raw terminal bytes both ways (see
/// [`crate::console`]).
async fn console_session(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<uuid::Uuid>,
    Query(q): Query<SessionQuery>,
    mut req: axum::extract::Request,
) -> axum::response::Response {
    use crate::console::UPGRADE_PROTOCOL;
    if !asks_upgrade(&req, UPGRADE_PROTOCOL) {
        return (
            StatusCode::BAD_REQUEST,
            format!("a console session needs Upgrade: {UPGRADE_PROTOCOL}"),
        )
            .into_response();
    }
    let dir = ctx.vm_dir(&InstanceId(id));
    let files = crate::console::ConsoleFiles {
        log: dir.join(skyvisor_qemu::files::SERIAL_LOG),
        socket: dir.join(skyvisor_qemu::files::CONSOLE_SOCKET),
    };
    serve_upgraded(&mut req, UPGRADE_PROTOCOL, move |conn| {
        crate::console::session(files, q.input, conn)
    })
}

/// Whether `req` asks to upgrade its connection to `protocol`.
fn asks_upgrade(req: &axum::extract::Request, protocol: &str) -> bool {
    req.headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(protocol.as_bytes()))
}

/// Switches `req`'s connection to `protocol` and runs `session` on it
/// once the client has it (in its own task: it outlives this request).
fn serve_upgraded<F, Fut>(
    req: &mut axum::extract::Request,
    protocol: &'static str,
    session: F,
) -> axum::response::Response
where
    F: FnOnce(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            session(hyper_util::rt::TokioIo::new(upgraded)).await;
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (axum::http::header::UPGRADE, protocol),
            (axum::http::header::CONNECTION, "upgrade"),
        ],
    )
        .into_response()
}

/// Runs a command in a container of this host (the server checked who
/// may).
async fn exec(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<uuid::Uuid>,
    Json(req): Json<skyvisor_core::api::ExecRequest>,
) -> axum::response::Response {
    let Some(driver) = &ctx.containers else {
        return (StatusCode::CONFLICT, "this host runs no containers").into_response();
    };
    match driver.exec(&InstanceId(id), &req).await {
        Ok(result) => Json(result).into_response(),
        Err(e @ crate::containers::ExecError::Invalid(_)) => {
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
        Err(e @ crate::containers::ExecError::NotRunning) => {
            (StatusCode::CONFLICT, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct TtyQuery {
    /// The [`skyvisor_core::api::ExecRequest`], as JSON.
    spec: String,
}

/// Runs a command on a terminal in a container of this host, over the
/// upgraded connection (see [`skyvisor_core::exec_stream`]).
async fn exec_tty(
    State(ctx): State<Arc<AgentContext>>,
    Path(id): Path<uuid::Uuid>,
    Query(q): Query<TtyQuery>,
    mut req: axum::extract::Request,
) -> axum::response::Response {
    use skyvisor_core::exec_stream::UPGRADE_PROTOCOL;
    let Some(driver) = ctx.containers.clone() else {
        return (StatusCode::CONFLICT, "this host runs no containers").into_response();
    };
    let exec: skyvisor_core::api::ExecRequest = match serde_json::from_str(&q.spec) {
        Ok(e) => e,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("spec: {e}")).into_response(),
    };
    if !asks_upgrade(&req, UPGRADE_PROTOCOL) {
        return (
            StatusCode::BAD_REQUEST,
            format!("a terminal session needs Upgrade: {UPGRADE_PROTOCOL}"),
        )
            .into_response();
    }
    let instance = InstanceId(id);
    match driver.check_tty(&instance, &exec).await {
        Ok(()) => {}
        Err(e @ crate::containers::ExecError::NotRunning) => {
            return (StatusCode::CONFLICT, e.to_string()).into_response();
        }
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
    serve_upgraded(&mut req, UPGRADE_PROTOCOL, move |conn| async move {
        driver.tty_session(&instance, &exec, conn).await;
    })
}

#[derive(Deserialize)]
struct ProbeQuery {
    from: String,
}

/// A peer's fencing probe: answering it is hearing that peer, which this
/// host then reports (see [`crate::fencing`]).
async fn peer_probe(
    State(ctx): State<Arc<AgentContext>>,
    Query(q): Query<ProbeQuery>,
) -> axum::response::Response {
    let Ok(peer) = skyvisor_core::HostName::new(q.from) else {
        return (StatusCode::BAD_REQUEST, "from: a host name").into_response();
    };
    match &ctx.fence {
        Some(fence) => {
            fence.heard_from(peer);
            Json(serde_json::json!({ "host": ctx.host })).into_response()
        }
        None => (StatusCode::NOT_FOUND, "this host does not fence").into_response(),
    }
}

/// A verified image file this host holds, by its SHA-256 (lowercase hex).
/// Image files are content-addressed and the fetching host verifies the
/// checksum, so a peer need not be trusted.
async fn image_file(
    State(ctx): State<Arc<AgentContext>>,
    Path(sha256): Path<String>,
) -> axum::response::Response {
    if sha256.len() != 64
        || !sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return (
            StatusCode::BAD_REQUEST,
            "the file is named by its SHA-256: 64 lowercase hex digits",
        )
            .into_response();
    }
    let Some(path) = ctx.images.by_checksum(&sha256).await else {
        return (StatusCode::NOT_FOUND, "no verified copy of that file here").into_response();
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => {
            let len = f.metadata().await.map(|m| m.len()).ok();
            let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                f,
                1 << 20,
            ));
            let mut resp = body.into_response();
            if let Some(len) = len
                && let Ok(v) = axum::http::HeaderValue::from_str(&len.to_string())
            {
                resp.headers_mut()
                    .insert(axum::http::header::CONTENT_LENGTH, v);
            }
            resp
        }
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

/// Up to `max` bytes of `path` from `offset` (negative: from the end).
pub async fn read_slice(
    path: &std::path::Path,
    offset: i64,
    max: u64,
) -> std::io::Result<ConsoleLog> {
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    let start = if offset < 0 {
        len.saturating_sub(offset.unsigned_abs())
    } else {
        (offset as u64).min(len)
    };
    f.seek(SeekFrom::Start(start)).await?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf).await?;
    Ok(ConsoleLog {
        offset: start,
        text: String::from_utf8_lossy(&buf).into_owned(),
    })
}

/// The host's and its VMs' counters now, for the servers' `vm top` and
/// `host top` (members only, like every route here).
async fn samples(State(ctx): State<Arc<AgentContext>>) -> impl IntoResponse {
    match ctx.metrics.samples().await {
        Some(mut s) => {
            s.lb_connections = ctx.load_balancers.connections();
            Json(s).into_response()
        }
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "this agent's host name is not a valid name",
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    minutes: Option<u64>,
}

/// The host's recent metric history.
async fn host_history(
    State(ctx): State<Arc<AgentContext>>,
    Query(q): Query<HistoryQuery>,
) -> impl IntoResponse {
    use skyvisor_core::top::{HISTORY_MINUTES, HISTORY_STEP_SECONDS, HostMetrics};
    Json(HostMetrics {
        host: ctx.host.clone(),
        step_seconds: HISTORY_STEP_SECONDS,
        points: ctx
            .metrics
            .history
            .host_points(q.minutes.unwrap_or(HISTORY_MINUTES)),
    })
}

/// An instance's recent metric history on this host.
async fn instance_history(
    State(ctx): State<Arc<AgentContext>>,
    Path((project, name)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> axum::response::Response {
    use skyvisor_core::top::{HISTORY_MINUTES, HISTORY_STEP_SECONDS, InstanceMetrics};
    let Ok(project) = skyvisor_core::ProjectName::new(project) else {
        return (StatusCode::BAD_REQUEST, "project: a project name").into_response();
    };
    Json(InstanceMetrics {
        host: ctx.host.clone(),
        step_seconds: HISTORY_STEP_SECONDS,
        points: ctx.metrics.history.instance_points(
            &project,
            &name,
            q.minutes.unwrap_or(HISTORY_MINUTES),
        ),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slices_from_start_and_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("serial.log");
        tokio::fs::write(&p, b"hello world").await.expect("write");
        let s = read_slice(&p, 0, 5).await.expect("read");
        assert_eq!((s.offset, s.text.as_str()), (0, "hello"));
        let s = read_slice(&p, -5, 100).await.expect("read");
        assert_eq!((s.offset, s.text.as_str()), (6, "world"));
        let s = read_slice(&p, 100, 10).await.expect("read");
        assert_eq!((s.offset, s.text.as_str()), (11, ""));
    }
}
