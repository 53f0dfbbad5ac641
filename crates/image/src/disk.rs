//! The base data disk: an empty ext4 filesystem labelled `skyvisor-data`, made with
//! `mkfs.ext4` on a sparse raw file and converted to qcow2 with `qemu-img`.
//!
//! Inode tables and the journal are initialised up front so the guest kernel does
//! not zero them lazily after the first mount (that would dirty every new overlay).
//! This module must never touch a block device, only the files it is given.

use std::path::Path;

use crate::ImageError;
use crate::command;

/// The filesystem label the guest's `/data` disk carries.
pub const DATA_LABEL: &str = "skyvisor-data";

/// The `mke2fs` version banner (part of the disk's cache key).
pub async fn mkfs_version() -> Result<String, ImageError> {
    let out = command::run("mkfs.ext4", &["-V"], None).await?;
    Ok(out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Creates the qcow2 base disk at `qcow2` (virtual size `size_bytes`), using
/// `scratch_raw` as a temporary raw image.
pub async fn make_base_disk(
    qcow2: &Path,
    scratch_raw: &Path,
    size_bytes: u64,
) -> Result<(), ImageError> {
    let raw =
        std::fs::File::create(scratch_raw).map_err(ImageError::io("creating", scratch_raw))?;
    raw.set_len(size_bytes)
        .map_err(ImageError::io("sizing", scratch_raw))?;
    drop(raw);
    let result = async {
        command::run(
            "mkfs.ext4",
            &[
                "-F".as_ref(),
                "-q".as_ref(),
                "-L".as_ref(),
                DATA_LABEL.as_ref(),
                "-E".as_ref(),
                "lazy_itable_init=0,lazy_journal_init=0".as_ref(),
                scratch_raw.as_os_str(),
            ],
            None,
        )
        .await?;
        command::run(
            "qemu-img",
            &[
                "convert".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                scratch_raw.as_os_str(),
                qcow2.as_os_str(),
            ],
            None,
        )
        .await
    }
    .await;
    let _ = std::fs::remove_file(scratch_raw);
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn makes_a_labelled_ext4_qcow2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qcow2 = dir.path().join("base.qcow2");
        let raw = dir.path().join("scratch.raw");
        make_base_disk(&qcow2, &raw, 64 * 1024 * 1024)
            .await
            .expect("make disk");
        assert!(!raw.exists(), "scratch file removed");
        let info = command::run(
            "qemu-img",
            &["info".as_ref(), "--output=json".as_ref(), qcow2.as_os_str()],
            None,
        )
        .await
        .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("json");
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 64 * 1024 * 1024);
        // Back to raw, then ask e2fsprogs what is on it.
        let back = dir.path().join("back.raw");
        command::run(
            "qemu-img",
            &[
                "convert".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                qcow2.as_os_str(),
                back.as_os_str(),
            ],
            None,
        )
        .await
        .expect("convert back");
        let dump = command::run("dumpe2fs", &["-h".as_ref(), back.as_os_str()], None)
            .await
            .expect("dumpe2fs");
        assert!(
            dump.stdout
                .contains("Filesystem volume name:   skyvisor-data"),
            "{}",
            dump.stdout
        );
        assert!(
            dump.stdout.contains("Filesystem state:         clean"),
            "{}",
            dump.stdout
        );
        assert!(dump.stdout.contains("has_journal"), "{}", dump.stdout);
        assert!(
            mkfs_version()
                .await
                .expect("version")
                .starts_with("mke2fs ")
        );
    }
}
