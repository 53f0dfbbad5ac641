//! The build cache: content keys for finished builds, atomic publication of a
//! staged build directory, hard-linking results into an output directory, and
//! pruning of old builds.
//!
//! Several builders may share one cache at the same time. This module must never
//! let a reader see a half-written build (builds are staged, then renamed into
//! place in one step), and never modify a published file (they are read-only and
//! replaced only by renaming).

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::ImageError;

/// Accumulates labelled inputs into a key.
#[derive(Default)]
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    /// Adds one labelled input (length-prefixed so inputs cannot run together).
    pub fn add(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// The hex key.
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// SHA-256 of a file, hex (blocking).
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = fs::File::open(path).map_err(ImageError::io("opening", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(ImageError::io("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex::encode(h.finalize()))
}

/// Makes every regular file directly in `dir` read-only.
pub fn make_read_only(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    for e in fs::read_dir(dir).map_err(ImageError::io("listing", dir))? {
        let e = e.map_err(ImageError::io("listing", dir))?;
        let path = e.path();
        if path.is_file() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o444))
                .map_err(ImageError::io("making read-only", &path))?;
        }
    }
    Ok(())
}

/// Publishes `stage` as `target` by renaming. Returns false (and removes `stage`)
/// if another builder published `target` first.
pub fn publish_dir(stage: &Path, target: &Path) -> Result<bool, ImageError> {
    match fs::rename(stage, target) {
        Ok(()) => Ok(true),
        Err(_) if target.join(crate::MANIFEST).is_file() => {
            let _ = fs::remove_dir_all(stage);
            Ok(false)
        }
        Err(e) => Err(ImageError::Io {
            op: "publishing build to",
            path: target.to_path_buf(),
            source: e,
        }),
    }
}

/// Publishes the file `stage` as `target` (same filesystem) unless `target`
/// already exists; returns whether ours was used.
pub fn publish_file(stage: &Path, target: &Path) -> Result<bool, ImageError> {
    match fs::hard_link(stage, target) {
        Ok(()) => {
            let _ = fs::remove_file(stage);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(stage);
            Ok(false)
        }
        Err(e) => Err(ImageError::Io {
            op: "publishing",
            path: target.to_path_buf(),
            source: e,
        }),
    }
}

/// Makes `dst` a hard link to (or, across filesystems, a copy of) `src`, replacing
/// any existing `dst` atomically. With `keep_existing`, an existing `dst` is left
/// alone (base disks: overlays refer to them by path).
pub fn link_into(src: &Path, dst: &Path, keep_existing: bool) -> Result<PathBuf, ImageError> {
    if keep_existing && dst.exists() {
        return Ok(dst.to_path_buf());
    }
    // Already linked (rename(2) between two links of one file would do nothing and
    // leave the temporary name behind).
    if let (Ok(a), Ok(b)) = (fs::metadata(src), fs::metadata(dst))
        && (a.dev(), a.ino()) == (b.dev(), b.ino())
    {
        return Ok(dst.to_path_buf());
    }
    let dir = dst.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        dst.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(src, &tmp).is_err() {
        fs::copy(src, &tmp).map_err(ImageError::io("copying to", &tmp))?;
    }
    if keep_existing {
        // Never replace a base someone may already use.
        let linked = fs::hard_link(&tmp, dst);
        let _ = fs::remove_file(&tmp);
        return match linked {
            Ok(()) => Ok(dst.to_path_buf()),
            // Another builder linked it first.
            Err(_) if dst.exists() => Ok(dst.to_path_buf()),
            Err(e) => Err(ImageError::Io {
                op: "linking",
                path: dst.to_path_buf(),
                source: e,
            }),
        };
    }
    fs::rename(&tmp, dst).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ImageError::Io {
            op: "renaming into",
            path: dst.to_path_buf(),
            source: e,
        }
    })?;
    Ok(dst.to_path_buf())
}

/// Marks a build as recently used (pruning keeps the newest).
pub fn touch(path: &Path) {
    if let Ok(f) = fs::OpenOptions::new().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Removes all but the `keep` most recently used builds in `builds_dir` (never
/// `current`), and leftovers of crashed builds in `tmp_dir` older than a day.
pub fn prune(builds_dir: &Path, tmp_dir: &Path, keep: usize, current: &Path) {
    let mtime = |p: &Path| {
        fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    if let Ok(entries) = fs::read_dir(builds_dir) {
        let mut builds: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join(crate::MANIFEST).is_file() && p != current)
            .map(|p| (mtime(&p.join(crate::MANIFEST)), p))
            .collect();
        builds.sort_by_key(|b| std::cmp::Reverse(b.0));
        for (_, old) in builds.into_iter().skip(keep.saturating_sub(1)) {
            tracing::info!(build = %old.display(), "pruning old image build");
            let _ = fs::remove_dir_all(&old);
        }
    }
    if let Ok(entries) = fs::read_dir(tmp_dir) {
        let day_ago = SystemTime::now() - Duration::from_secs(24 * 3600);
        for e in entries.flatten() {
            if mtime(&e.path()) < day_ago {
                let _ = fs::remove_dir_all(e.path());
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_input_and_its_boundaries() {
        let key = |parts: &[(&str, &[u8])]| {
            let mut k = KeyBuilder::default();
            for (l, v) in parts {
                k.add(l, v);
            }
            k.finish()
        };
        let base = key(&[("a", b"1"), ("b", b"2")]);
        assert_eq!(base.len(), 64);
        assert_eq!(base, key(&[("a", b"1"), ("b", b"2")]));
        assert_ne!(base, key(&[("a", b"1"), ("b", b"3")]));
        assert_ne!(
            key(&[("a", b"12"), ("b", b"")]),
            key(&[("a", b"1"), ("b", b"2")])
        );
    }

    #[test]
    fn publishing_a_dir_twice_keeps_the_first() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("build");
        for (i, content) in ["first", "second"].iter().enumerate() {
            let stage = root.path().join(format!("stage{i}"));
            fs::create_dir(&stage).expect("mkdir");
            fs::write(stage.join(crate::MANIFEST), content).expect("write");
            let won = publish_dir(&stage, &target).expect("publish");
            assert_eq!(won, i == 0);
            assert!(!stage.exists());
        }
        assert_eq!(
            fs::read_to_string(target.join(crate::MANIFEST)).expect("read"),
            "first"
        );
    }

    #[test]
    fn link_into_replaces_or_keeps() {
        let root = tempfile::tempdir().expect("tempdir");
        let a = root.path().join("a");
        let b = root.path().join("b");
        fs::write(&a, "A").expect("write");
        fs::write(&b, "B").expect("write");
        let out = root.path().join("out");
        link_into(&a, &out, false).expect("link");
        link_into(&a, &out, false).expect("link again");
        assert_eq!(
            fs::metadata(&out).expect("stat").ino(),
            fs::metadata(&a).expect("stat").ino()
        );
        link_into(&b, &out, false).expect("replace");
        assert_eq!(fs::read_to_string(&out).expect("read"), "B");
        link_into(&a, &out, true).expect("keep");
        assert_eq!(fs::read_to_string(&out).expect("read"), "B");
        let fresh = root.path().join("fresh");
        link_into(&a, &fresh, true).expect("create");
        assert_eq!(fs::read_to_string(&fresh).expect("read"), "A");
        let leftovers: Vec<_> = fs::read_dir(root.path())
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn prune_keeps_the_newest_and_the_current() {
        let root = tempfile::tempdir().expect("tempdir");
        let builds = root.path().join("builds");
        let tmp = root.path().join("tmp");
        fs::create_dir_all(&tmp).expect("mkdir");
        let mut dirs = Vec::new();
        for i in 0..5u64 {
            let d = builds.join(format!("b{i}"));
            fs::create_dir_all(&d).expect("mkdir");
            let m = d.join(crate::MANIFEST);
            fs::write(&m, "{}").expect("write");
            let f = fs::OpenOptions::new().append(true).open(&m).expect("open");
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i))
                .expect("mtime");
            dirs.push(d);
        }
        // b0 is the oldest but current: it stays; of the others the newest (b4) stays.
        prune(&builds, &tmp, 2, &dirs[0]);
        let left: Vec<bool> = dirs.iter().map(|d| d.exists()).collect();
        assert_eq!(left, [true, false, false, false, true]);
    }
}
