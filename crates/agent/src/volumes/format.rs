//! A blank root volume gets a journaling file system before its first
//! boot, made on the host with `mkfs.ext4` (label `skyvisor-data`, as the
//! image's base disks): the guest's own fallback (busybox `mke2fs`) makes
//! ext2, which has no journal, and a VM restarted elsewhere after its host
//! died would then mount a file system a crash left inconsistent.
//!
//! This module must never write to a volume that is not blank.

use std::path::Path;

use bytes::Bytes;
use skyvisor_nbd::device::BlockDevice;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::info;

/// The label the default guest mounts at `/data`.
const LABEL: &str = "skyvisor-data";
/// How much of the start of a volume is read to tell whether it is blank.
const PROBE: usize = 64 * 1024;
/// Copy granularity: only chunks with data are written.
const CHUNK: usize = 1 << 20;

/// Formats `device` (of `size` bytes) if its start is all zeroes, building
/// the file system in a sparse scratch file under `scratch_dir`. Returns
/// whether it formatted.
pub async fn format_if_blank(
    device: &dyn BlockDevice,
    size: u64,
    scratch_dir: &Path,
) -> Result<bool, String> {
    let probe = device
        .read(0, PROBE.min(size as usize))
        .await
        .map_err(|e| format!("reading the volume's start: {e}"))?;
    if probe.iter().any(|b| *b != 0) {
        return Ok(false);
    }
    tokio::fs::create_dir_all(scratch_dir)
        .await
        .map_err(|e| format!("creating {}: {e}", scratch_dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".format-")
        .tempfile_in(scratch_dir)
        .map_err(|e| format!("creating a scratch file in {}: {e}", scratch_dir.display()))?;
    scratch
        .as_file()
        .set_len(size)
        .map_err(|e| format!("sizing the scratch file: {e}"))?;
    let out = tokio::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            LABEL,
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(scratch.path())
        .output()
        .await
        .map_err(|e| format!("running mkfs.ext4 (install e2fsprogs): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // Only the file system's data extents: reading the whole (sparse)
    // scratch file would cost seconds per GiB.
    let ranges = data_ranges(scratch.as_file(), size);
    let mut file = tokio::fs::File::open(scratch.path())
        .await
        .map_err(|e| format!("reading the scratch file: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for (start, end) in ranges {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| format!("reading the scratch file: {e}"))?;
        let mut offset = start;
        while offset < end {
            let want = CHUNK.min((end - offset) as usize);
            file.read_exact(&mut buf[..want])
                .await
                .map_err(|e| format!("reading the scratch file: {e}"))?;
            if buf[..want].iter().any(|b| *b != 0) {
                device
                    .write(offset, Bytes::copy_from_slice(&buf[..want]), false)
                    .await
                    .map_err(|e| format!("writing the file system at {offset}: {e}"))?;
                written += want as u64;
            }
            offset += want as u64;
        }
    }
    device
        .flush()
        .await
        .map_err(|e| format!("flushing the new file system: {e}"))?;
    info!(written, "formatted a blank root volume with ext4");
    Ok(true)
}

/// The `[start, end)` ranges of `f` (of `size` bytes) that hold data (see
/// [`skyvisor_nbd::file::file_extents`]; on any error the rest counts as
/// data: correct, only slower).
fn data_ranges(f: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let extents = skyvisor_nbd::file::file_extents(f, pos, size - pos, size);
        for e in extents {
            if !e.hole {
                match out.last_mut() {
                    Some(last) if last.1 == pos => last.1 = pos + e.length,
                    _ => out.push((pos, pos + e.length)),
                }
            }
            pos += e.length;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn data_ranges_skip_holes_and_cover_every_written_byte() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let size = 64u64 << 20;
        f.set_len(size).expect("size");
        for at in [3u64 << 20, 40 << 20] {
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.write_all(&[7u8; 5000]).expect("write");
        }
        f.sync_all().expect("sync");
        let ranges = data_ranges(&f, size);
        assert!(!ranges.is_empty());
        for at in [3u64 << 20, 40 << 20] {
            assert!(
                ranges.iter().any(|(s, e)| *s <= at && at + 5000 <= *e),
                "{ranges:?} misses {at}"
            );
        }
        let covered: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        assert!(covered < size / 4, "holes were not skipped: {ranges:?}");
    }
}
