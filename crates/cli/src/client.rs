//! A typed client of the REST API.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use skyvisor_core::api::ErrorBody;
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
    /// The API answered with an error.
    #[error("{message}")]
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
}

/// A client of one Skyvisor API, served by one server or several (a
/// cluster): a request no server accepted the connection for goes to the
/// next one.
#[derive(Clone)]
pub struct Client {
    bases: Vec<String>,
    /// The server that answered last; requests start there.
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
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
        }
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
        for k in 0..n {
            let i = (first + k) % n;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{}", self.bases[i], path))
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

    /// A request builder for `path` on the server in use, for callers with
    /// special bodies.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base(), path))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
