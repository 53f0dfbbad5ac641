//! [`FileDevice`]: a block device on a regular (sparse) file.
//!
//! Reads and writes are `pread`/`pwrite` on tokio's blocking pool; FLUSH and
//! FUA are `fdatasync`, batched so that concurrent callers share one sync
//! (group commit); TRIM punches holes. After a failed `fdatasync` the device
//! refuses all further I/O: the kernel may have dropped the dirty pages, so
//! continuing would acknowledge writes that are lost. This module must never
//! block a tokio worker thread on file I/O.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use nix::fcntl::{FallocateFlags, fallocate};
use tokio::sync::watch;

use crate::device::{BlockDevice, BlockSizeConstraints, DeviceError, Extent, check_range};

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Default)]
pub struct FileDeviceOptions {
    /// Create the file if missing and set its length to this size. `None`:
    /// the file must exist and its current length is the device size.
    pub create_size: Option<u64>,
    /// Refuse writes.
    pub read_only: bool,
    /// Block sizes to advertise.
    pub block_size: BlockSizeConstraints,
}

/// Errors opening a [`FileDevice`].
#[derive(Debug, thiserror::Error)]
pub enum FileDeviceError {
    /// The file could not be opened, created or sized.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A block device backed by a regular file.
#[derive(Debug, Clone)]
pub struct FileDevice {
    inner: Arc<FileInner>,
}

#[derive(Debug)]
struct FileInner {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    options: FileDeviceOptions,
    syncer: SyncBatcher,
    poisoned: AtomicBool,
}

impl FileDevice {
    /// Opens (and with `create_size`, creates or resizes) the file at `path`.
    pub fn open(path: &Path, options: FileDeviceOptions) -> Result<Self, FileDeviceError> {
        let err = |source| FileDeviceError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .create(options.create_size.is_some() && !options.read_only)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        let size = match options.create_size {
            Some(size) => {
                let current = file.metadata().map_err(err)?.len();
                if current != size {
                    file.set_len(size).map_err(err)?;
                }
                size
            }
            None => file.metadata().map_err(err)?.len(),
        };
        let file = Arc::new(file);
        Ok(Self {
            inner: Arc::new(FileInner {
                syncer: SyncBatcher::new(file.clone()),
                file,
                path: path.to_owned(),
                size,
                options,
                poisoned: AtomicBool::new(false),
            }),
        })
    }

    /// The path of the backing file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The open file (for callers that need e.g. to copy it).
    pub fn file(&self) -> &Arc<File> {
        &self.inner.file
    }

    fn check_usable(&self) -> Result<(), DeviceError> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(DeviceError::Unavailable(format!(
                "{} failed to sync earlier; refusing I/O",
                self.inner.path.display()
            )));
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.inner.options.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.check_usable()?;
        check_range(offset, len, self.inner.size)
    }

    async fn sync(&self) -> Result<(), DeviceError> {
        let r = self.inner.syncer.sync().await;
        if r.is_err() {
            self.inner.poisoned.store(true, Ordering::Release);
        }
        r
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let file = self.inner.file.clone();
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(|e| DeviceError::from_io(op, e)),
            Err(_) => Err(DeviceError::Io {
                op,
                source: std::io::Error::other("blocking task failed"),
            }),
        }
    }

    /// Like [`Self::blocking`] for a small read or write: it mostly hits the
    /// page cache and takes microseconds, so it runs right here on the
    /// async worker. Both ways off the worker cost more than the I/O: a hop
    /// to the blocking pool and back, and `block_in_place` (which hands the
    /// worker's core to another thread each time, a futex wake per request:
    /// at 32 requests in flight it cost a third of a replicated volume's
    /// IOPS). A write the kernel throttles (dirty page limits) holds this
    /// worker for that long; the runtime's other workers steal its queued
    /// tasks meanwhile.
    async fn small_io<T: Send + 'static>(
        &self,
        op: &'static str,
        len: usize,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, DeviceError> {
        if len <= SMALL_IO {
            return f(&self.inner.file).map_err(|e| DeviceError::from_io(op, e));
        }
        self.blocking(op, f).await
    }

    async fn zero_by_writing(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.blocking("writing zeroes", move |f| {
            let chunk = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                f.write_all_at(&chunk[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        })
        .await
    }
}

/// Reads and writes up to this size run in place (see `small_io`).
const SMALL_IO: usize = 64 * 1024;

fn to_off(v: u64) -> Result<i64, DeviceError> {
    i64::try_from(v).map_err(|_| DeviceError::Invalid(format!("offset {v} too large")))
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn block_size(&self) -> BlockSizeConstraints {
        self.inner.options.block_size
    }

    fn read_only(&self) -> bool {
        self.inner.options.read_only
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        self.check_usable()?;
        check_range(offset, len as u64, self.inner.size)?;
        self.small_io("reading", len, move |f| {
            let mut buf = BytesMut::zeroed(len);
            let mut done = 0usize;
            while done < len {
                match f.read_at(&mut buf[done..], offset + done as u64) {
                    // Past the end of a short file: the rest reads as zeroes.
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(buf.freeze())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.check_write(offset, data.len() as u64)?;
        let len = data.len();
        self.small_io("writing", len, move |f| f.write_all_at(&data, offset))
            .await?;
        if fua { self.sync().await } else { Ok(()) }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.check_usable()?;
        if self.inner.options.read_only {
            return Ok(());
        }
        self.sync().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (o, l) = (to_off(offset)?, to_off(len)?);
        let r = self
            .blocking("punching a hole", move |f| {
                fallocate(
                    f,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    o,
                    l,
                )
                .map_err(std::io::Error::from)
            })
            .await;
        match r {
            // Trim is advisory: a file system without hole punching keeps the data.
            Err(DeviceError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            other => other?,
        }
        if fua { self.sync().await } else { Ok(()) }
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (o, l) = (to_off(offset)?, to_off(len)?);
        let mode = if may_trim {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        let r = self
            .blocking("zeroing", move |f| {
                fallocate(f, mode, o, l).map_err(std::io::Error::from)
            })
            .await;
        match r {
            Ok(()) => {}
            Err(DeviceError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                self.zero_by_writing(offset, len).await?;
            }
            Err(e) => return Err(e),
        }
        if fua { self.sync().await } else { Ok(()) }
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.check_usable()?;
        check_range(offset, len, self.inner.size)?;
        let size = self.inner.size;
        self.blocking("querying allocation", move |f| {
            Ok(file_extents(f, offset, len, size))
        })
        .await
    }
}

/// Extents of `[offset, offset+len)` of `f` (of `size` bytes) from
/// SEEK_DATA/SEEK_HOLE, at most 1024 of them (call again from where they
/// end for the rest); on any error the range is reported as data, which is
/// always correct.
pub fn file_extents(f: &File, offset: u64, len: u64, size: u64) -> Vec<Extent> {
    use nix::unistd::{Whence, lseek};
    let end = offset.saturating_add(len).min(size);
    let mut out = Vec::new();
    let mut pos = offset;
    const MAX_EXTENTS: usize = 1024;
    while pos < end && out.len() < MAX_EXTENTS {
        let Ok(p) = i64::try_from(pos) else { break };
        let data = match lseek(f, p, Whence::SeekData) {
            Ok(d) => d as u64,
            // ENXIO: no data after pos, the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => end,
            Err(_) => break,
        };
        if data > pos {
            let hole_end = data.min(end);
            out.push(Extent {
                length: hole_end - pos,
                hole: true,
                zero: true,
            });
            pos = hole_end;
            continue;
        }
        let hole = match lseek(f, p, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(_) => end,
        };
        let data_end = if hole > pos { hole } else { end };
        out.push(Extent {
            length: data_end - pos,
            hole: false,
            zero: false,
        });
        pos = data_end;
    }
    if out.is_empty() {
        out.push(Extent {
            length: end.saturating_sub(offset).max(1).min(len.max(1)),
            hole: false,
            zero: false,
        });
    }
    out
}

/// Hands the lead of a [`SyncBatcher`] back if its leader is dropped
/// before its sync finished: the next caller leads a new sync.
struct LeadGuard<'a> {
    batcher: &'a SyncBatcher,
    done: bool,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.batcher.lock().running = false;
            // Wakes the waiters: they look again and one of them leads.
            self.batcher.done.send_modify(|_| {});
        }
    }
}

/// Group commit for `fdatasync`: a caller waits for a sync that *started*
/// after it called, and concurrent callers share one.
#[derive(Debug)]
pub struct SyncBatcher {
    file: Arc<File>,
    state: std::sync::Mutex<SyncState>,
    done: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct SyncState {
    started: u64,
    completed: u64,
    running: bool,
    failed: bool,
}

impl SyncBatcher {
    /// A batcher syncing `file`.
    pub fn new(file: Arc<File>) -> Self {
        Self {
            file,
            state: std::sync::Mutex::new(SyncState::default()),
            done: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        // A panic while holding this lock cannot leave the counters torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once every write completed before this call is durable.
    pub async fn sync(&self) -> Result<(), DeviceError> {
        let mut rx = self.done.subscribe();
        let target = self.lock().started + 1;
        loop {
            let lead = {
                let mut s = self.lock();
                if s.failed {
                    return Err(DeviceError::Io {
                        op: "syncing",
                        source: std::io::Error::other("an earlier fdatasync failed"),
                    });
                }
                if s.completed >= target {
                    return Ok(());
                }
                if s.running {
                    None
                } else {
                    s.running = true;
                    s.started += 1;
                    Some(s.started)
                }
            };
            match lead {
                Some(generation) => {
                    // If this caller gives up while it leads (its future is
                    // dropped, e.g. by a timeout), the guard hands the lead
                    // back; without it every later sync would wait forever
                    // for a sync marked running that nobody finishes.
                    let mut lead = LeadGuard {
                        batcher: self,
                        done: false,
                    };
                    let file = self.file.clone();
                    let r = tokio::task::spawn_blocking(move || file.sync_data())
                        .await
                        .unwrap_or_else(|_| Err(std::io::Error::other("sync task failed")));
                    lead.done = true;
                    {
                        let mut s = self.lock();
                        s.running = false;
                        s.completed = generation;
                        if r.is_err() {
                            s.failed = true;
                        }
                    }
                    self.done.send_replace(generation);
                    if let Err(e) = r {
                        return Err(DeviceError::from_io("syncing", e));
                    }
                }
                None => {
                    // The sender lives as long as self, so this cannot fail.
                    let _ = rx.changed().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    use std::time::Duration;

    use super::*;

    /// Polls `fut` once.
    async fn poll_once<F: Future>(mut fut: Pin<&mut F>) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
    }

    #[tokio::test]
    async fn write_read_trim_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = FileDevice::open(
            &dir.path().join("d.img"),
            FileDeviceOptions {
                create_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .expect("open");
        assert_eq!(dev.size(), 1 << 20);
        dev.write(4096, Bytes::from(vec![7u8; 8192]), true)
            .await
            .expect("write");
        assert_eq!(dev.read(4096, 8192).await.expect("read"), vec![7u8; 8192]);
        dev.trim(4096, 4096, false).await.expect("trim");
        assert_eq!(dev.read(4096, 4096).await.expect("read"), vec![0u8; 4096]);
        dev.write_zeroes(8192, 4096, false, true)
            .await
            .expect("zero");
        assert_eq!(dev.read(8192, 4096).await.expect("read"), vec![0u8; 4096]);
        assert!(dev.read((1 << 20) - 1, 2).await.is_err());
        let ext = dev.block_status(0, 1 << 20).await.expect("status");
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        assert!(ext[0].hole, "start of a sparse file is a hole: {ext:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_syncs_share_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = FileDevice::open(
            &dir.path().join("d.img"),
            FileDeviceOptions {
                create_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .expect("open");
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let d = dev.clone();
            tasks.push(tokio::spawn(async move {
                d.write(i * 4096, Bytes::from(vec![i as u8; 4096]), true)
                    .await
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("fua write");
        }
        let syncs = dev.inner.syncer.lock().completed;
        assert!((1..=32).contains(&syncs), "syncs: {syncs}");
    }

    /// A caller that gives up while it leads a sync (its future dropped by
    /// a timeout, as a replica call's is) must not leave every later sync
    /// waiting for it: seen as a volume whose replica stopped answering.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_sync_leader_does_not_block_later_syncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(dir.path().join("f"))
                .expect("open"),
        );
        let batcher = SyncBatcher::new(file.clone());
        // A leader polled once (it takes the lead and starts the sync) and
        // dropped, with a waiter parked behind it. (Retried in the unlikely
        // case the sync finished before the first poll returned.)
        let mut exercised = false;
        for _ in 0..20 {
            std::io::Write::write_all(&mut &*file, &[1u8; 65536]).expect("write");
            let mut leader = Box::pin(batcher.sync());
            let mut waiter = Box::pin(batcher.sync());
            if poll_once(leader.as_mut()).await.is_ready() {
                continue;
            }
            assert!(poll_once(waiter.as_mut()).await.is_pending());
            drop(leader);
            assert!(
                !batcher.lock().running,
                "the dropped leader left the sync marked running"
            );
            tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("the waiter hung after its leader was dropped")
                .expect("sync");
            exercised = true;
            break;
        }
        assert!(
            exercised,
            "every sync finished before its first poll returned"
        );
        tokio::time::timeout(Duration::from_secs(10), batcher.sync())
            .await
            .expect("a later sync hung behind the dropped leader")
            .expect("sync");
    }
}
