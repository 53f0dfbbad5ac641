//! [`ReplicaServer`]: serves a node's [`ReplicaStore`] over TCP with the
//! replica protocol; many requests in flight per connection, answered out of
//! order.
//!
//! A malformed frame closes the connection; nothing a peer sends may crash
//! the server.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use skyvisor_nbd::io::{SharedWriter, run_now_or_spawn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::replica::ReplicaStore;
use crate::wire::{self, MAX_FRAME, RequestFrame};

/// Errors starting a replica server.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaServerError {
    /// Cannot listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A running replica server.
#[derive(Debug)]
pub struct ReplicaServer {
    store: Arc<ReplicaStore>,
    addr: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Requests in flight per connection.
const MAX_IN_FLIGHT: usize = 256;

impl ReplicaServer {
    /// Listens on `addr` (port 0 picks one) and serves `store`.
    pub async fn start(
        store: Arc<ReplicaStore>,
        addr: SocketAddr,
    ) -> Result<ReplicaServer, ReplicaServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ReplicaServerError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ReplicaServerError::Listen { addr, source })?;
        info!(%addr, node = %store.node(), "replica server listening");
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (c, t, s) = (cancel.clone(), tasks.clone(), store.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            let (s, c2) = (s.clone(), c.clone());
                            t.spawn(async move {
                                let r = match crate::link_tls::process_tls() {
                                    Some(tls) => {
                                        let handshake = tokio::time::timeout(
                                            crate::link_key::HANDSHAKE_TIMEOUT,
                                            tls.accept(stream),
                                        );
                                        let mut stream = match handshake.await {
                                            Ok(Ok(stream)) => stream,
                                            Ok(Err(e)) => {
                                                warn!(%peer, "replica connection refused: TLS: {e}");
                                                return;
                                            }
                                            Err(_) => {
                                                warn!(%peer, "replica connection refused: TLS handshake timed out");
                                                return;
                                            }
                                        };
                                        if !link_key_accepted(&mut stream, peer).await {
                                            return;
                                        }
                                        let (r, w) = tokio::io::split(stream);
                                        serve(s, r, w, c2).await
                                    }
                                    None => {
                                        let mut stream = stream;
                                        if !link_key_accepted(&mut stream, peer).await {
                                            return;
                                        }
                                        let (r, w) = stream.into_split();
                                        serve(s, r, w, c2).await
                                    }
                                };
                                if let Err(e) = r {
                                    debug!(%peer, "replica connection ended: {e}");
                                }
                            });
                        }
                        Err(e) => {
                            warn!("accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        Ok(ReplicaServer {
            store,
            addr,
            cancel,
            tasks,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store it serves.
    pub fn store(&self) -> &Arc<ReplicaStore> {
        &self.store
    }

    /// Stops listening, closes connections after their requests in flight.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Runs the link-key handshake when this process has a key; false (and
/// logged) when the peer failed it.
async fn link_key_accepted<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
) -> bool {
    match crate::link_key::process_key() {
        Some(key) => match crate::link_key::accept(key, stream).await {
            Ok(()) => true,
            Err(e) => {
                warn!(%peer, "replica connection refused: {e}");
                false
            }
        },
        None => true,
    }
}

/// Reads one length-prefixed frame body; `None` at a clean end of stream.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Bytes>> {
    let len = match r.read_u32().await {
        Ok(l) => l as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes too large"
        )));
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    Ok(Some(buf.freeze()))
}

async fn serve<R, W>(
    store: Arc<ReplicaStore>,
    r: R,
    w: W,
    cancel: CancellationToken,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let writer = Arc::new(SharedWriter::new(w));
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let in_flight = TaskTracker::new();
    let result = loop {
        let body = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            b = read_frame(&mut r) => b,
        };
        let body = match body {
            Ok(Some(b)) => b,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let frame = match RequestFrame::decode(body) {
            Ok(f) => f,
            Err(e) => break Err(std::io::Error::other(e)),
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break Ok(());
        };
        let (store, writer) = (store.clone(), writer.clone());
        run_now_or_spawn(&in_flight, async move {
            let id = frame.id;
            let result = store.handle(frame).await;
            let (header, payload) = wire::encode_response(id, &result);
            // A failed write ends the connection: the reader sees it closed.
            let _ = writer.send(std::iter::once(header).chain(payload)).await;
            drop(permit);
        })
        .await;
    };
    in_flight.close();
    in_flight.wait().await;
    let _ = writer.shutdown().await;
    result
}
