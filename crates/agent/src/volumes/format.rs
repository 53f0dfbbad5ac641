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
/// Copy granularity: only chunks with data are written.
const CHUNK: usize = 1 << 20;

/// Formats `device` if its start is all zeroes, building the file system
/// in a sparse scratch file under `scratch_dir`. Returns whether it
/// formatted.
pub async fn format_if_blank(device: &dyn BlockDevice, scratch_dir: &Path) -> Result<bool, String> {
    if !super::copy::is_blank(device).await? {
        return Ok(false);
    }
    let size = device.size();
    let scratch = super::copy::scratch_file(scratch_dir, ".format-").await?;
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
    let ranges = super::copy::data_ranges(scratch.as_file(), size);
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
