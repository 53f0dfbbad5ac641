//! Small pieces of the request paths that cost wakeups, shared by the NBD
//! server and the replica protocol: a stream many tasks write frames to
//! without a writer task ([`SharedWriter`]), vectored writes of many
//! buffers ([`write_all_vectored`]), and running a request in the reader
//! that received it unless it has to wait ([`run_now_or_spawn`]).
//!
//! On a small host each hop from one task to another is a wakeup of another
//! thread, and at queue depth 1 every hop is on the request's critical path.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::task::TaskTracker;

/// Frames from many tasks onto one stream, each written whole and in the
/// order its sender queued it, without a writer task: a sender that finds
/// the stream free writes its frame and every frame queued meanwhile in one
/// vectored write; a sender that finds it busy leaves its frame to the
/// writer of the moment, which looks at the queue again after each write.
/// So a lone frame costs no hop to another task, and a busy stream still
/// batches.
pub struct SharedWriter<W> {
    queue: std::sync::Mutex<Vec<Bytes>>,
    stream: tokio::sync::Mutex<W>,
}

impl<W> std::fmt::Debug for SharedWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWriter").finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> SharedWriter<W> {
    /// A writer on `stream`.
    pub fn new(stream: W) -> Self {
        Self {
            queue: std::sync::Mutex::new(Vec::with_capacity(64)),
            stream: tokio::sync::Mutex::new(stream),
        }
    }

    /// Queues the buffers of one frame and writes the queue unless another
    /// sender is writing (which then writes this frame too). A frame is
    /// written whole or, after an error, the stream must not be used again.
    pub async fn send(&self, frame: impl IntoIterator<Item = Bytes>) -> std::io::Result<()> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(frame);
        loop {
            let Ok(mut w) = self.stream.try_lock() else {
                return Ok(());
            };
            let mut segs =
                std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
            if segs.is_empty() {
                return Ok(());
            }
            // Flushes too: TLS keeps records it could not send yet.
            write_all_vectored(&mut *w, &mut segs).await?;
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
    pub async fn shutdown(&self) -> std::io::Result<()> {
        let mut w = self.stream.lock().await;
        let mut segs = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        write_all_vectored(&mut *w, &mut segs).await?;
        w.shutdown().await
    }
}

/// Writes every buffer fully, many per system call, then flushes.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    segs: &mut Vec<Bytes>,
) -> std::io::Result<()> {
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
    w.flush().await
}

/// Polls `work` once right here and, only if it has to wait, hands it to a
/// task of its own in `tasks`.
///
/// A request that completes without waiting (a small write to the page
/// cache) then costs no hop to another thread, and one that waits (on a
/// replica across the network) has already sent what it waits on before
/// the hop. A request handed over is never cancelled half-way: from its
/// first wait on, it belongs to its own task, not to the caller.
pub async fn run_now_or_spawn<F>(tasks: &TaskTracker, work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut work: Pin<Box<F>> = Box::pin(work);
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    if first.is_pending() {
        // Polled again at once in the task, which takes over its wakeups.
        tasks.spawn(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::AsyncReadExt;

    async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await.expect("length");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        r.read_exact(&mut body).await.expect("body");
        body
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_senders_frames_arrive_whole_and_none_is_lost() {
        let (a, mut b) = tokio::io::duplex(4096);
        let writer = Arc::new(SharedWriter::new(a));
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
                    let mut h = Vec::new();
                    h.extend_from_slice(&((8 + payload.len()) as u32).to_be_bytes());
                    h.extend_from_slice(&t.to_be_bytes());
                    h.extend_from_slice(&i.to_be_bytes());
                    w.send([Bytes::from(h), payload]).await.expect("send");
                }
            }));
        }
        let reader = tokio::spawn(async move {
            let mut next = vec![0u32; senders as usize];
            for _ in 0..senders * per {
                let body = read_frame(&mut b).await;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_that_waits_finishes_in_its_own_task_and_ready_work_here() {
        let tasks = TaskTracker::new();
        let done = Arc::new(AtomicU32::new(0));
        let d = done.clone();
        run_now_or_spawn(&tasks, async move {
            d.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 1, "ready work ran in place");
        assert!(tasks.is_empty(), "and took no task");

        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let d = done.clone();
        run_now_or_spawn(&tasks, async move {
            d.fetch_add(1, Ordering::SeqCst);
            let v = rx.await.expect("value");
            d.fetch_add(v, Ordering::SeqCst);
        })
        .await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            2,
            "its first part ran in place"
        );
        assert_eq!(tasks.len(), 1, "the rest waits in a task");
        tx.send(10).expect("send");
        tasks.close();
        tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait())
            .await
            .expect("the task finishes");
        assert_eq!(done.load(Ordering::SeqCst), 12);
    }
}
