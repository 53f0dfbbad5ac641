//! Links from a primary to replicas: [`Link`] is either the in-process
//! replica of the primary's own node or a pipelined TCP connection to a
//! replica server ([`RemoteReplica`]).
//!
//! Every call has a deadline. When a remote call times out or the
//! connection breaks, the whole connection is closed and every call in
//! flight on it fails at once, so a dead replica costs one timeout, not one
//! per request. A link is never reused after it broke.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{BufReader, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio_util::either::Either;

use crate::ids::{NodeId, VolumeId};
use crate::replica::{Replica, ReplicaStore};
use crate::server::read_frame;
use crate::wire::{self, Request, RequestFrame, Response, WireError};
use skyvisor_nbd::io::SharedWriter;

/// Why a call to a replica failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The replica could not be reached or did not answer in time.
    #[error("replica {node} unreachable: {message}")]
    Transport {
        /// The replica's node.
        node: NodeId,
        /// What happened.
        message: String,
    },
    /// The replica answered with an error.
    #[error("replica {node} refused: {error}")]
    Replica {
        /// The replica's node.
        node: NodeId,
        /// The error.
        error: WireError,
    },
}

impl LinkError {
    /// The replica says our epoch is behind: someone newer owns the volume.
    pub fn is_fenced(&self) -> bool {
        matches!(self, LinkError::Replica { error: WireError::StaleEpoch { request, current }, .. } if current > request)
    }
}

type Pending =
    Arc<std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<Result<Response, WireError>>>>>>;

type TlsLink = crate::link_tls::ClientLink;
/// The sending side of a link: plain TCP, or TLS in a cluster with a CA.
type LinkWriter = Either<OwnedWriteHalf, WriteHalf<TlsLink>>;
type LinkReader = Either<OwnedReadHalf, ReadHalf<TlsLink>>;

/// A pipelined connection to a remote replica server.
#[derive(Debug)]
pub struct RemoteReplica {
    node: NodeId,
    writer: SharedWriter<LinkWriter>,
    pending: Pending,
    next_id: AtomicU64,
    broken: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteReplica {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl RemoteReplica {
    /// Connects to `addr` and checks it is `node`'s server.
    pub async fn connect(
        node: &NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<Arc<Self>, LinkError> {
        let err = |m: String| LinkError::Transport {
            node: node.clone(),
            message: m,
        };
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| err("connect timed out".into()))?
            .map_err(|e| err(format!("connect {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let addr_shown: SocketAddr = stream.peer_addr().map_err(|e| err(e.to_string()))?;
        let (r, w): (LinkReader, LinkWriter) = match crate::link_tls::process_tls() {
            Some(tls) => {
                let mut tls = tokio::time::timeout(timeout, tls.connect(addr, stream))
                    .await
                    .map_err(|_| err("TLS handshake timed out".into()))?
                    .map_err(|e| err(format!("TLS with {addr}: {e}")))?;
                if let Some(key) = crate::link_key::process_key() {
                    crate::link_key::connect(key, &mut tls)
                        .await
                        .map_err(|e| err(format!("{addr}: {e}")))?;
                }
                let (r, w) = tokio::io::split(tls);
                (Either::Right(r), Either::Right(w))
            }
            None => {
                if let Some(key) = crate::link_key::process_key() {
                    crate::link_key::connect(key, &mut stream)
                        .await
                        .map_err(|e| err(format!("{addr}: {e}")))?;
                }
                let (r, w) = stream.into_split();
                (Either::Left(r), Either::Left(w))
            }
        };
        let pending: Pending = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        let broken = Arc::new(AtomicBool::new(false));
        let reader = {
            let (pending, broken) = (pending.clone(), broken.clone());
            tokio::spawn(async move {
                let mut r = BufReader::with_capacity(256 * 1024, r);
                loop {
                    let body = match read_frame(&mut r).await {
                        Ok(Some(b)) => b,
                        _ => break,
                    };
                    let Ok((id, result)) = wire::decode_response(body) else {
                        break;
                    };
                    let waiter = pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_mut()
                        .and_then(|m| m.remove(&id));
                    if let Some(w) = waiter {
                        let _ = w.send(result);
                    }
                }
                broken.store(true, Ordering::Release);
                // Dropping the senders fails every call in flight.
                pending.lock().unwrap_or_else(|p| p.into_inner()).take();
            })
        };
        tracing::debug!(node = %node, addr = %addr_shown, "connected to replica");
        Ok(Arc::new(Self {
            node: node.clone(),
            writer: SharedWriter::new(w),
            pending,
            next_id: AtomicU64::new(1),
            broken,
            reader,
        }))
    }

    /// Whether the connection is known to be broken.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Closes the connection; calls in flight fail.
    pub fn close(&self) {
        self.broken.store(true, Ordering::Release);
        self.reader.abort();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    async fn call(
        &self,
        volume: &VolumeId,
        epoch: u64,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, LinkError> {
        let err = |m: &str| LinkError::Transport {
            node: self.node.clone(),
            message: m.to_owned(),
        };
        if self.is_broken() {
            return Err(err("connection closed"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match p.as_mut() {
                Some(m) => {
                    m.insert(id, tx);
                }
                None => return Err(err("connection closed")),
            }
        }
        let frame = RequestFrame {
            id,
            epoch,
            volume: volume.clone(),
            request,
        };
        let r = tokio::time::timeout(timeout, async {
            let (header, payload) = frame.encode();
            if let Err(e) = self
                .writer
                .send(std::iter::once(header).chain(payload))
                .await
            {
                // Part of a frame may be out: the stream is unusable.
                self.close();
                return Err(err(&format!("sending: {e}")));
            }
            rx.await.map_err(|_| err("connection closed"))
        })
        .await;
        match r {
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(error))) => Err(LinkError::Replica {
                node: self.node.clone(),
                error,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // One timeout condemns the connection (see module doc).
                self.close();
                Err(err("request timed out"))
            }
        }
    }
}

/// A link to one replica of a volume.
#[derive(Debug, Clone)]
pub enum Link {
    /// The replica on the primary's own node, called in process.
    Local {
        /// The node.
        node: NodeId,
        /// The store holding it.
        store: Arc<ReplicaStore>,
    },
    /// A replica on another node.
    Remote(Arc<RemoteReplica>),
}

impl Link {
    /// The replica's node.
    pub fn node(&self) -> &NodeId {
        match self {
            Link::Local { node, .. } => node,
            Link::Remote(r) => &r.node,
        }
    }

    /// Whether the link can no longer be used.
    pub fn is_broken(&self) -> bool {
        match self {
            Link::Local { .. } => false,
            Link::Remote(r) => r.is_broken(),
        }
    }

    /// Closes the link.
    pub fn close(&self) {
        if let Link::Remote(r) = self {
            r.close();
        }
    }

    /// The in-process replica, if local and present.
    pub fn local_replica(&self, volume: &VolumeId) -> Option<Arc<Replica>> {
        match self {
            Link::Local { store, .. } => store.get(volume),
            Link::Remote(_) => None,
        }
    }

    /// Calls the replica with a deadline.
    pub async fn call(
        &self,
        volume: &VolumeId,
        epoch: u64,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, LinkError> {
        match self {
            Link::Local { node, store } => {
                let frame = RequestFrame {
                    id: 0,
                    epoch,
                    volume: volume.clone(),
                    request,
                };
                // Run here while it need not wait (a small write to the
                // page cache: no hop to another thread), else in a task of
                // its own, as a remote replica server runs each request: a
                // caller that times out must not cancel the replica's work
                // half-way (a half-done sync or metadata update would wedge
                // the replica for every later request).
                let store = store.clone();
                let mut work = Box::pin(async move { store.handle(frame).await });
                let first =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(work.as_mut().poll(cx))).await;
                let result = match first {
                    std::task::Poll::Ready(r) => Ok(Ok(r)),
                    std::task::Poll::Pending => {
                        tokio::time::timeout(timeout, tokio::spawn(work)).await
                    }
                };
                match result {
                    Ok(Ok(Ok(r))) => Ok(r),
                    Ok(Ok(Err(error))) => Err(LinkError::Replica {
                        node: node.clone(),
                        error,
                    }),
                    Ok(Err(e)) => Err(LinkError::Transport {
                        node: node.clone(),
                        message: format!("local replica task failed: {e}"),
                    }),
                    Err(_) => Err(LinkError::Transport {
                        node: node.clone(),
                        message: "local replica timed out".into(),
                    }),
                }
            }
            Link::Remote(r) => r.call(volume, epoch, request, timeout).await,
        }
    }
}
