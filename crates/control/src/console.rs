//! Interactive consoles in the browser: a WebSocket from the client,
//! relayed to a console session on the agent that runs the instance
//! (`skyvisor-console`, raw terminal bytes both ways).
//!
//! The WebSocket is accepted before the instance is looked up, because a
//! browser cannot read the status of a refused handshake: errors close the
//! socket with code `4000 + HTTP status` and the API's message as reason.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use skyvisor_core::ProjectName;
use skyvisor_core::api::CONSOLE_UPGRADE_PROTOCOL;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// The WebSocket subprotocol a console client asks for (and the server
/// selects); the others it offers carry its credentials (see
/// [`crate::access`]).
pub const WEBSOCKET_PROTOCOL: &str = "skyvisor.console";

/// Longest reason a close frame carries (its payload is at most 125 bytes,
/// two of them the code).
const MAX_REASON: usize = 123;

impl ControlPlane {
    /// Opens a console session on the agent of `project`'s instance `name`;
    /// `input` lets the caller type.
    pub async fn console_upstream(
        &self,
        project: &ProjectName,
        name: &str,
        input: bool,
    ) -> ApiResult<reqwest::Upgraded> {
        let inst = self.instance(project, name).await?;
        let host = self.inventory.host(&inst.spec.host).await.ok_or_else(|| {
            ApiError::unavailable(format!("host {} is not registered", inst.spec.host))
        })?;
        let Some(agent) = host.host.agent_url.clone() else {
            return Err(ApiError::unavailable(format!(
                "host {} serves no consoles",
                inst.spec.host
            )));
        };
        let url = format!(
            "{agent}/agent/v1/instances/{}/console-session",
            inst.spec.id
        );
        let request = self.http.get(&url).query(&[("input", input)]);
        let resp = ask_upgrade(request, CONSOLE_UPGRADE_PROTOCOL, &inst.spec.host).await?;
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(ApiError::bad_gateway(format!(
                "host {} answered {status} to a console session: {text}",
                inst.spec.host
            )));
        }
        upgraded(resp, &inst.spec.host, "console session").await
    }
}

/// Sends `request` to `host`'s agent asking it to switch the connection to
/// `protocol` (console and terminal sessions); the agent's answer.
pub(crate) async fn ask_upgrade(
    request: reqwest::RequestBuilder,
    protocol: &str,
    host: &skyvisor_core::HostName,
) -> ApiResult<reqwest::Response> {
    request
        .header(reqwest::header::UPGRADE, protocol)
        .header(reqwest::header::CONNECTION, "upgrade")
        .send()
        .await
        .map_err(|e| ApiError::unavailable(format!("host {host} unreachable: {e}")))
}

/// The connection a `101 Switching Protocols` answer of `host` opened for
/// its `session`.
pub(crate) async fn upgraded(
    resp: reqwest::Response,
    host: &skyvisor_core::HostName,
    session: &str,
) -> ApiResult<reqwest::Upgraded> {
    resp.upgrade()
        .await
        .map_err(|e| ApiError::bad_gateway(format!("host {host} did not open the {session}: {e}")))
}

/// Relays `socket` to the console session `upstream` opens, or closes it
/// with the reason that failed.
pub async fn relay(mut socket: WebSocket, upstream: ApiResult<reqwest::Upgraded>) {
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            let _ = socket.send(Message::Close(Some(close_frame(&e)))).await;
            return;
        }
    };
    let (mut up_rx, mut up_tx) = tokio::io::split(upstream);
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (client_left, mut left) = tokio::sync::oneshot::channel::<()>();
    let output = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let goodbye = loop {
            tokio::select! {
                read = up_rx.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break Some(CloseFrame {
                        code: 1011,
                        reason: "the host ended the console session".into(),
                    }),
                    Ok(n) => {
                        let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                        if ws_tx.send(Message::Binary(chunk)).await.is_err() {
                            return;
                        }
                    }
                },
                // The socket already queued its answer to the client's
                // close; closing the sink sends it.
                _ = &mut left => break None,
            }
        };
        if let Some(frame) = goodbye {
            let _ = ws_tx.send(Message::Close(Some(frame))).await;
        }
        let _ = ws_tx.close().await;
    };
    let input = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => bytes::Bytes::copy_from_slice(t.as_str().as_bytes()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if up_tx.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = client_left.send(());
    };
    // The output side ends the session: when the host ends it, or after
    // answering the client's close. Dropping the halves closes the agent's
    // connection.
    let input = tokio::spawn(input);
    output.await;
    input.abort();
}

/// The close frame that carries `e`: code 4000 + its HTTP status, its
/// message (cut at a character boundary to fit).
pub fn close_frame(e: &ApiError) -> CloseFrame {
    let mut reason = e.message.clone();
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    CloseFrame {
        code: 4000 + e.status.as_u16(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_frame_carries_the_status_and_a_reason_that_fits() {
        let e = ApiError::not_found("instance \"web\" not found");
        let f = close_frame(&e);
        assert_eq!(f.code, 4404);
        assert_eq!(f.reason.as_str(), "instance \"web\" not found");
        let long = ApiError::conflict("é".repeat(100));
        let f = close_frame(&long);
        assert_eq!(f.code, 4409);
        assert!(f.reason.len() <= MAX_REASON);
        assert!(f.reason.as_str().chars().all(|c| c == 'é'));
    }
}
