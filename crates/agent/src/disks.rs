//! VM root disks: qcow2 overlays on an image's base disk, made and removed
//! with `qemu-img`.

use std::path::Path;

use skyvisor_core::image::DiskFormat;
use tokio::process::Command;

/// Creates a qcow2 root disk at `path` of `size_bytes`: an overlay on
/// `base` when given, else blank. Removes a partial file on failure.
pub async fn create_root_disk(
    path: &Path,
    base: Option<(&Path, DiskFormat)>,
    size_bytes: u64,
) -> Result<(), String> {
    let tmp = path.with_extension("qcow2.tmp");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some((base, fmt)) = base {
        cmd.arg("-b").arg(base).args(["-F", fmt.as_str()]);
    }
    cmd.arg(&tmp).arg(size_bytes.to_string());
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img (install qemu-utils): {e}"))?;
    if !out.status.success() {
        let _ = tokio::fs::remove_file(&tmp).await;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(if stderr.contains("No space left") {
            format!(
                "no space left on the host's disk for the root disk at {}",
                path.display()
            )
        } else {
            format!("creating the root disk failed: {stderr}")
        });
    }
    if let Err(e) = tokio::fs::rename(&tmp, path).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(format!("creating the root disk failed: {e}"));
    }
    Ok(())
}

/// Converts disk image `from` (QEMU format `from_format`, read through its
/// backing files) into a new image `to` of format `to_format`; zero
/// regions stay holes.
pub async fn convert(
    from: &Path,
    from_format: &str,
    to: &Path,
    to_format: &str,
) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", from_format, "-O", to_format])
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img (install qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "converting {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlay_has_backing_and_size() {
        let dir = tempfile::tempdir().expect("tmp");
        let base = dir.path().join("base.qcow2");
        create_root_disk(&base, None, 64 << 20).await.expect("base");
        let root = dir.path().join("root.qcow2");
        create_root_disk(&root, Some((&base, DiskFormat::Qcow2)), 128 << 20)
            .await
            .expect("overlay");
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&root)
            .output()
            .expect("qemu-img");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["virtual-size"], 128 << 20);
        assert_eq!(v["backing-filename"], base.to_string_lossy().as_ref());
        assert!(!root.with_extension("qcow2.tmp").exists());
    }

    #[tokio::test]
    async fn missing_base_fails_without_leftovers() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("root.qcow2");
        let err = create_root_disk(
            &root,
            Some((&dir.path().join("nope"), DiskFormat::Qcow2)),
            1 << 20,
        )
        .await
        .expect_err("no base");
        assert!(err.contains("creating the root disk failed"), "{err}");
        assert!(!root.exists());
        assert!(std::fs::read_dir(dir.path()).expect("ls").next().is_none());
    }
}
