//! Small file-system helpers: atomic replacement and sparse copies.
//!
//! Must never leave a half-written file under the final name.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably (temp file, fsync,
/// rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Copies `src` to a new file `dst` keeping holes: tries a reflink first
/// (instant on XFS/btrfs), else copies only the data segments.
pub fn sparse_copy(src: &File, dst: &Path) -> std::io::Result<()> {
    use nix::unistd::{Whence, lseek};
    use std::os::fd::AsRawFd;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open
    // for the duration of the call.
    let r = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        return out.sync_all();
    }
    let len = src.metadata()?.len();
    out.set_len(len)?;
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        let data = match lseek(src, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src, data, Whence::SeekHole).unwrap_or(len as i64);
        let mut off = data as u64;
        while off < hole as u64 {
            let n = ((hole as u64 - off) as usize).min(buf.len());
            let got = src.read_at(&mut buf[..n], off)?;
            if got == 0 {
                break;
            }
            if buf[..got].iter().any(|b| *b != 0) {
                out.write_all_at(&buf[..got], off)?;
            }
            off += got as u64;
        }
        pos = hole;
    }
    out.sync_all()
}
