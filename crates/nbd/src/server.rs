//! The server handle: named exports that can be added and removed at run
//! time, TCP and unix listeners, and graceful shutdown.
//!
//! This module owns connection lifetimes; it must never parse the wire
//! itself (see `handshake` and `transmission`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::device::{BlockDevice, MAX_PAYLOAD};
use crate::handshake::{HandshakeOutcome, handshake};
use crate::transmission::transmission;

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export served to clients that ask for the empty name.
    pub default_export: Option<String>,
    /// How long a client may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// Requests in flight per connection; more wait until one completes.
    pub max_requests_in_flight: usize,
    /// Payload bytes in flight per connection (at least 32 MiB).
    pub max_bytes_in_flight: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            default_export: None,
            handshake_timeout: Duration::from_secs(30),
            max_requests_in_flight: 128,
            max_bytes_in_flight: 2 * MAX_PAYLOAD as usize,
        }
    }
}

/// One named export.
#[derive(Clone)]
pub struct Export {
    /// The name clients ask for.
    pub name: String,
    /// Optional description (NBD_INFO_DESCRIPTION, NBD_OPT_LIST).
    pub description: Option<String>,
    /// The device behind it.
    pub device: Arc<dyn BlockDevice>,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN: true when a FLUSH on one
    /// connection covers writes completed on every other connection.
    pub multi_conn: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.device.size())
            .field("multi_conn", &self.multi_conn)
            .finish()
    }
}

impl Export {
    /// An export named `name` serving `device`.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Self {
            name: name.into(),
            description: None,
            device,
            multi_conn: true,
        }
    }

    /// Sets the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }
}

/// Errors of the server handle.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An export with this name already exists.
    #[error("export {name:?} already exists")]
    ExportExists {
        /// The name.
        name: String,
    },
    /// The export name is not acceptable.
    #[error("invalid export name {name:?}: {reason}")]
    InvalidExportName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A listener could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address or path.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// An export plus what is needed to end its connections.
#[derive(Clone)]
pub(crate) struct ExportEntry {
    pub(crate) export: Export,
    pub(crate) cancel: CancellationToken,
    pub(crate) connections: TaskTracker,
}

pub(crate) struct ServerInner {
    pub(crate) config: ServerConfig,
    exports: RwLock<BTreeMap<String, ExportEntry>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ServerInner {
    pub(crate) fn export(&self, name: &str) -> Option<ExportEntry> {
        let exports = self.exports.read().unwrap_or_else(|p| p.into_inner());
        let name = if name.is_empty() {
            self.config.default_export.as_deref().unwrap_or("")
        } else {
            name
        };
        exports.get(name).cloned()
    }

    pub(crate) fn export_list(&self) -> Vec<(String, Option<String>)> {
        let exports = self.exports.read().unwrap_or_else(|p| p.into_inner());
        exports
            .values()
            .map(|e| (e.export.name.clone(), e.export.description.clone()))
            .collect()
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

/// A running NBD server: cheap to clone, every clone is the same server.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.export_names())
            .finish()
    }
}

impl NbdServer {
    /// A server with no exports and no listeners.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            inner: Arc::new(ServerInner {
                config,
                exports: RwLock::new(BTreeMap::new()),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Adds an export; new connections can select it at once.
    pub fn add_export(&self, export: Export) -> Result<(), ServerError> {
        if export.name.len() > crate::proto::MAX_STRING {
            return Err(ServerError::InvalidExportName {
                name: export.name,
                reason: "longer than 4096 bytes",
            });
        }
        if self.inner.shutting_down() {
            return Err(ServerError::ShuttingDown);
        }
        let mut exports = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if exports.contains_key(&export.name) {
            return Err(ServerError::ExportExists { name: export.name });
        }
        info!(export = %export.name, size = export.device.size(), "NBD export added");
        exports.insert(
            export.name.clone(),
            ExportEntry {
                export,
                cancel: self.inner.shutdown.child_token(),
                connections: TaskTracker::new(),
            },
        );
        Ok(())
    }

    /// Removes an export and waits until every connection to it has
    /// finished its requests in flight and closed. Returns false if there
    /// was no such export.
    pub async fn remove_export(&self, name: &str) -> bool {
        let entry = {
            let mut exports = self
                .inner
                .exports
                .write()
                .unwrap_or_else(|p| p.into_inner());
            exports.remove(name)
        };
        let Some(entry) = entry else { return false };
        entry.cancel.cancel();
        entry.connections.close();
        entry.connections.wait().await;
        info!(export = %name, "NBD export removed");
        true
    }

    /// The names of the exports.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .export_list()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// Listens on a TCP address (port 0 picks one); returns the bound address.
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        info!(%local, "NBD server listening on TCP");
        let server = self.clone();
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = server.inner.shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((stream, peer)) => {
                            // Replies are small and latency matters more than packet count.
                            if let Err(e) = stream.set_nodelay(true) {
                                debug!(%peer, "cannot set TCP_NODELAY: {e}");
                            }
                            let (r, w) = stream.into_split();
                            server.spawn_connection(r, w, peer.to_string());
                        }
                        Err(e) => {
                            warn!("accept failed on {local}: {e}");
                            // Usually EMFILE: back off instead of spinning.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        Ok(local)
    }

    /// Listens on a unix socket at `path`, replacing a stale socket file.
    pub async fn listen_unix(&self, path: &Path) -> Result<PathBuf, ServerError> {
        use std::os::unix::fs::FileTypeExt;
        let err = |source| ServerError::Listen {
            addr: path.display().to_string(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && meta.file_type().is_socket()
        {
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        info!(path = %path.display(), "NBD server listening on unix socket");
        let server = self.clone();
        let shown = path.display().to_string();
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = server.inner.shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((stream, _)) => {
                            let (r, w) = stream.into_split();
                            server.spawn_connection(r, w, shown.clone());
                        }
                        Err(e) => {
                            warn!("accept failed on {shown}: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        Ok(path.to_owned())
    }

    /// Serves one already-connected stream (e.g. a socketpair or an
    /// in-memory duplex in tests) until the client disconnects.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        serve_connection(self.inner.clone(), r, w, "stream".into()).await;
    }

    fn spawn_connection<R, W>(&self, r: R, w: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let inner = self.inner.clone();
        self.inner
            .tasks
            .spawn(async move { serve_connection(inner, r, w, peer).await });
    }

    /// Stops the listeners, lets every connection finish its requests in
    /// flight, closes them, and returns when all are gone.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        info!("NBD server stopped");
    }
}

async fn serve_connection<R, W>(inner: Arc<ServerInner>, r: R, mut w: W, peer: String)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let timeout = inner.config.handshake_timeout;
    let outcome = tokio::select! {
        _ = inner.shutdown.cancelled() => return,
        r = tokio::time::timeout(timeout, handshake(&mut reader, &mut w, &inner)) => r,
    };
    let session = match outcome {
        Err(_) => {
            debug!(%peer, "NBD handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            debug!(%peer, "NBD handshake ended: {e}");
            return;
        }
        Ok(Ok(HandshakeOutcome::Closed)) => return,
        Ok(Ok(HandshakeOutcome::Transmission(session))) => session,
    };
    let entry = session.export.clone();
    // Counted in the export's tracker so remove_export can wait for us.
    let _token = entry.connections.token();
    if entry.cancel.is_cancelled() {
        return;
    }
    debug!(%peer, export = %entry.export.name, "NBD transmission starts");
    if let Err(e) = transmission(reader, w, session, &inner.config, entry.cancel.clone()).await {
        debug!(%peer, export = %entry.export.name, "NBD connection ended: {e}");
    }
}
