//! [`ReplicaServer`]: serves a node's [`ReplicaStore`] over TCP with the
//! replica protocol; many requests in flight per connection, answered out of
//! order.
//!
//! A malformed frame closes the connection; nothing a peer sends may crash
//! the server.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
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
                            let (r, w) = stream.into_split();
                            let (s, c2) = (s.clone(), c.clone());
                            t.spawn(async move {
                                if let Err(e) = serve(s, r, w, c2).await {
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

/// Writes queued (header, payload) frames, batching them into vectored writes.
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<(Bytes, Option<Bytes>)>,
) -> std::io::Result<()> {
    let mut segs: Vec<Bytes> = Vec::with_capacity(64);
    while let Some((h, p)) = rx.recv().await {
        segs.push(h);
        segs.extend(p);
        while segs.len() < 64 {
            match rx.try_recv() {
                Ok((h, p)) => {
                    segs.push(h);
                    segs.extend(p);
                }
                Err(_) => break,
            }
        }
        write_all_vectored(&mut w, &mut segs).await?;
    }
    w.shutdown().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    segs: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut idx = 0;
    while idx < segs.len() {
        let slices: Vec<IoSlice<'_>> = segs[idx..]
            .iter()
            .take(64)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < segs.len() {
            let l = segs[idx].len();
            if n >= l {
                n -= l;
                idx += 1;
            } else {
                segs[idx] = segs[idx].split_off(n);
                n = 0;
            }
        }
        while idx < segs.len() && segs[idx].is_empty() {
            idx += 1;
        }
    }
    segs.clear();
    Ok(())
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
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_frames(w, rx));
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
        let (store, tx) = (store.clone(), tx.clone());
        in_flight.spawn(async move {
            let id = frame.id;
            let result = store.handle(frame).await;
            let _ = tx.send(wire::encode_response(id, &result)).await;
            drop(permit);
        });
    };
    in_flight.close();
    in_flight.wait().await;
    drop(tx);
    let _ = writer.await;
    result
}
