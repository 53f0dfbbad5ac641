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

/// Writes (header, payload) frames to a stream from the tasks that have
/// them, without a writer task: a sender that finds the stream free writes
/// its frame and every frame queued meanwhile in one vectored write; a
/// sender that finds it busy leaves its frame to the writer of the moment,
/// which looks at the queue again after each write. So a lone request
/// costs no hop to another task, and a busy connection still batches.
pub(crate) struct FrameWriter<W> {
    queue: std::sync::Mutex<Vec<Bytes>>,
    stream: tokio::sync::Mutex<W>,
}

impl<W> std::fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter").finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer on `stream`.
    pub(crate) fn new(stream: W) -> Self {
        Self {
            queue: std::sync::Mutex::new(Vec::with_capacity(64)),
            stream: tokio::sync::Mutex::new(stream),
        }
    }

    /// Queues a frame and writes the queue unless another sender is
    /// writing (which then writes this frame too). A frame is written
    /// whole or, after an error, the stream must not be used again.
    pub(crate) async fn send(&self, (h, p): (Bytes, Option<Bytes>)) -> std::io::Result<()> {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.push(h);
            q.extend(p);
        }
        loop {
            let Ok(mut w) = self.stream.try_lock() else {
                return Ok(());
            };
            let mut segs =
                std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
            if segs.is_empty() {
                return Ok(());
            }
            write_all_vectored(&mut *w, &mut segs).await?;
            // TLS keeps records it could not send yet; TCP has none.
            w.flush().await?;
            drop(w);
            // A sender that queued while this one wrote found the stream
            // busy and left: its frame is written here.
            if self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                return Ok(());
            }
        }
    }

    /// Shuts the stream's write side down once the frames queued are out.
    pub(crate) async fn shutdown(&self) -> std::io::Result<()> {
        let mut w = self.stream.lock().await;
        let mut segs = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        write_all_vectored(&mut *w, &mut segs).await?;
        w.shutdown().await
    }
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
    let writer = Arc::new(FrameWriter::new(w));
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
        in_flight.spawn(async move {
            let id = frame.id;
            let result = store.handle(frame).await;
            // A failed write ends the connection: the reader sees it closed.
            let _ = writer.send(wire::encode_response(id, &result)).await;
            drop(permit);
        });
    };
    in_flight.close();
    in_flight.wait().await;
    let _ = writer.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_senders_frames_arrive_whole_and_none_is_lost() {
        let (a, mut b) = tokio::io::duplex(4096);
        let writer = Arc::new(FrameWriter::new(a));
        let senders = 16u32;
        let per = 50u32;
        let mut tasks = vec![];
        for t in 0..senders {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    // A frame: length, then (sender, index) and a payload
                    // whose bytes all say who sent it.
                    let payload = Bytes::from(vec![t as u8; 100 + (i as usize % 7) * 300]);
                    let mut h = BytesMut::new();
                    h.extend_from_slice(&((8 + payload.len()) as u32).to_be_bytes());
                    h.extend_from_slice(&t.to_be_bytes());
                    h.extend_from_slice(&i.to_be_bytes());
                    w.send((h.freeze(), Some(payload))).await.expect("send");
                }
            }));
        }
        let reader = tokio::spawn(async move {
            let mut next = vec![0u32; senders as usize];
            for _ in 0..senders * per {
                let body = read_frame(&mut b).await.expect("read").expect("frame");
                let t = u32::from_be_bytes(body[0..4].try_into().expect("t"));
                let i = u32::from_be_bytes(body[4..8].try_into().expect("i"));
                assert!(body[8..].iter().all(|x| *x == t as u8), "mixed frame");
                assert_eq!(i, next[t as usize], "sender {t}'s frames out of order");
                next[t as usize] += 1;
            }
            next
        });
        for t in tasks {
            t.await.expect("sender");
        }
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("every frame arrives")
            .expect("reader");
        assert!(next.iter().all(|n| *n == per), "{next:?}");
        writer.shutdown().await.expect("shutdown");
    }
}
