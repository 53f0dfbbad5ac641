//! A typed client of the REST API.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use skyvisor_core::api::ErrorBody;
use skyvisor_core::auth::PROJECT_HEADER;
use thiserror::Error;

/// An error talking to the API, ready to show to people.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The API could not be reached.
    #[error(
        "cannot reach the Skyvisor API at {url}: {message} (is `skyvisor up` running? set --url or SKYVISOR_URL)"
    )]
    Unreachable {
        /// The API's base URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The API answered with an error (a 401's message comes with a hint
    /// on how to log in).
    #[error("{message}{}", auth_hint(.status))]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Machine-readable code.
        code: String,
        /// What was wrong.
        message: String,
    },
    /// The API answered something unreadable.
    #[error("unexpected answer from the API: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether the API said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// Whether the API refused the request's credentials (401).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Self::Api { status, .. } if *status == StatusCode::UNAUTHORIZED)
    }
}

/// What to do about a refused token, after the API's message.
fn auth_hint(status: &StatusCode) -> &'static str {
    if *status == StatusCode::UNAUTHORIZED {
        " (log in with `skyvisor login`, or set SKYVISOR_TOKEN)"
    } else {
        ""
    }
}

/// A client of one Skyvisor API, served by one server or several (a
/// cluster): a request no server accepted the connection for goes to the
/// next one. Every request carries the client's token and project, when
/// it has them.
#[derive(Clone)]
pub struct Client {
    bases: Vec<String>,
    /// The server that answered last; requests start there.
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer ...`.
    token: Option<String>,
    /// Without a token: a file to read one from once it exists.
    token_file: Option<std::path::PathBuf>,
    /// Sent as the project header.
    project: Option<String>,
}

impl Client {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:7780`), or of
    /// several servers of one cluster, comma-separated.
    pub fn new(base: &str) -> Self {
        let mut bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            bases.push(base.trim().to_string());
        }
        Self {
            bases,
            current: Arc::new(AtomicUsize::new(0)),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .no_proxy()
                .build()
                .unwrap_or_default(),
            token: None,
            token_file: None,
            project: None,
        }
    }

    /// The same client, reading its token from `file` at each request while
    /// it has none (the file a starting server has yet to write).
    pub fn with_token_file(mut self, file: Option<std::path::PathBuf>) -> Self {
        self.token_file = file;
        self
    }

    /// The same client, sending `token` as its bearer token (none if
    /// `None`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The same client, acting in `project` (the identity's home project
    /// if `None`).
    pub fn with_project(mut self, project: Option<String>) -> Self {
        self.project = project;
        self
    }

    /// The same client, trusting only `ca_pem` (a cluster CA) for `https`
    /// URLs when given; the system's roots otherwise.
    pub fn with_ca(mut self, ca_pem: Option<&str>) -> Self {
        if let Some(pem) = ca_pem
            && let Ok(cert) = reqwest::Certificate::from_pem(pem.as_bytes())
        {
            self.http = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .no_proxy()
                .tls_certs_only([cert])
                .build()
                .unwrap_or_default();
        }
        self
    }

    /// The project requests act in, if one is chosen.
    pub fn project(&self) -> Option<&str> {
        self.project.as_deref()
    }

    /// Adds the token and the project header to a request.
    fn authorize(&self, mut req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        } else if let Some(t) = self
            .token_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| crate::config::is_token_text(t))
        {
            req = req.bearer_auth(t);
        }
        if let Some(p) = &self.project {
            req = req.header(PROJECT_HEADER, p);
        }
        req
    }

    /// Whether the token file fallback has a token to send now.
    fn file_token_ready(&self) -> bool {
        self.token.is_none()
            && self
                .token_file
                .as_ref()
                .and_then(|f| std::fs::read_to_string(f).ok())
                .is_some_and(|t| crate::config::is_token_text(t.trim()))
    }

    /// The API's base URL (the server in use).
    pub fn base(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.bases.len();
        &self.bases[i]
    }

    /// Sends a request with an optional JSON body and decodes the answer.
    /// When a server refuses the connection (it is down), the next one is
    /// tried: nothing was sent, so any request may be.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut refused = Vec::new();
        let tokenless = self.token.is_none() && !self.file_token_ready();
        for k in 0..n {
            let i = (first + k) % n;
            let mut req = self
                .authorize(
                    self.http
                        .request(method.clone(), format!("{}{}", self.bases[i], path)),
                )
                .timeout(Duration::from_secs(120));
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Err(e) if e.is_connect() && k + 1 < n => {
                    refused.push(format!("{}: {}", self.bases[i], root_cause(&e)));
                }
                Err(e) => {
                    refused.push(format!("{}: {}", self.bases[i], root_cause(&e)));
                    return Err(ClientError::Unreachable {
                        url: self.bases.join(","),
                        message: refused.join("; "),
                    });
                }
                Ok(resp) => {
                    self.current.store(i, Ordering::Relaxed);
                    // Sent before a starting server wrote its token file,
                    // which is there now: send again, with it.
                    if resp.status() == StatusCode::UNAUTHORIZED
                        && tokenless
                        && self.file_token_ready()
                    {
                        return Box::pin(self.call(method, path, body)).await;
                    }
                    return self.decode(resp).await;
                }
            }
        }
        Err(ClientError::Unreachable {
            url: self.bases.join(","),
            message: refused.join("; "),
        })
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// POST a JSON body and decode.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Sends a prepared request and decodes the answer or the API's error.
    pub async fn finish<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base().to_string(),
            message: root_cause(&e),
        })?;
        self.decode(resp).await
    }

    /// Decodes an answer or the API's error.
    async fn decode<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: self.base().to_string(),
            message: root_cause(&e),
        })?;
        if status.is_success() {
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body).map_err(|e| ClientError::Protocol(e.to_string()));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(err) => Err(ClientError::Api {
                status,
                code: err.error.code,
                message: err.error.message,
            }),
            Err(_) => Err(ClientError::Api {
                status,
                code: "http".into(),
                message: format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
            }),
        }
    }

    /// Opens a stream of server-sent events at `path` (resuming after
    /// `last_event_id` when given); an error answer is decoded as usual.
    pub async fn open_stream(
        &self,
        path: &str,
        last_event_id: Option<u64>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self
            .request(Method::GET, path)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            // A stream lasts as long as the user watches.
            .timeout(Duration::from_secs(365 * 24 * 3600));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base().to_string(),
            message: root_cause(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        match self.decode::<serde_json::Value>(resp).await {
            Err(e) => Err(e),
            Ok(_) => Err(ClientError::Protocol(
                "an error status with a readable body".into(),
            )),
        }
    }

    /// POSTs to `path` asking to upgrade the connection to `protocol`; the
    /// upgraded connection, or the API's error.
    pub async fn upgrade(
        &self,
        path: &str,
        query: &[(&str, String)],
        protocol: &str,
    ) -> Result<reqwest::Upgraded, ClientError> {
        let resp = self
            .request(Method::POST, path)
            .query(query)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, protocol)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base().to_string(),
                message: root_cause(&e),
            })?;
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return match self.decode::<serde_json::Value>(resp).await {
                Err(e) => Err(e),
                Ok(_) => Err(ClientError::Protocol(format!(
                    "the server did not switch to {protocol}"
                ))),
            };
        }
        resp.upgrade()
            .await
            .map_err(|e| ClientError::Protocol(format!("upgrading to {protocol}: {e}")))
    }

    /// A request builder for `path` on the server in use, for callers with
    /// special bodies; it carries the token and project.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.authorize(
            self.http
                .request(method, format!("{}{}", self.base(), path)),
        )
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `s` as one URL path segment: anything but unreserved characters is
/// percent-encoded.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_errors_say_how_to_log_in() {
        let err = ClientError::Api {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthenticated".into(),
            message: "the token is unknown".into(),
        };
        assert!(err.is_unauthorized());
        assert_eq!(
            err.to_string(),
            "the token is unknown (log in with `skyvisor login`, or set SKYVISOR_TOKEN)"
        );
        let err = ClientError::Api {
            status: StatusCode::FORBIDDEN,
            code: "forbidden".into(),
            message: "needs role member in project web".into(),
        };
        assert_eq!(err.to_string(), "needs role member in project web");
    }

    #[test]
    fn requests_carry_token_and_project() {
        let client = Client::new("http://127.0.0.1:1/")
            .with_token(Some("tok".into()))
            .with_project(Some("web".into()));
        let req = client
            .request(Method::GET, "/v1/whoami")
            .build()
            .expect("request");
        assert_eq!(req.url().as_str(), "http://127.0.0.1:1/v1/whoami");
        assert_eq!(
            req.headers()
                .get(reqwest::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
            Some("Bearer tok")
        );
        assert_eq!(
            req.headers()
                .get(PROJECT_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("web")
        );
        let bare = Client::new("http://127.0.0.1:1")
            .request(Method::GET, "/v1/info")
            .build()
            .expect("request");
        assert!(bare.headers().is_empty());
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("tok_AB-1.x"), "tok_AB-1.x");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
