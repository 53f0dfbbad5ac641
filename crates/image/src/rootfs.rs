//! Unpacking a root filesystem tarball (from [`crate::build_rootfs`] or
//! [`crate::import_oci`]) into a container's directory, with every owner
//! shifted into the container's user namespace range (root in the container is
//! host uid `id_shift`).
//!
//! Runs as root. It must never create anything outside `dest`: no absolute or
//! `..` names, and no path through a symlink (every parent is checked to be a
//! real directory with `lstat`, and nothing is opened following a symlink). It
//! never makes device nodes or FIFOs (the runtime makes `/dev`). The tar
//! crate's own `unpack_in` is not used: it canonicalises parents (following
//! symlinks, if inside `dest`) and cannot shift owners.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use crate::ImageError;
use crate::tarball::{CopyError, copy_apart};

/// Attributes applied to a path after it is made.
#[derive(Debug, Clone, Copy)]
struct Attrs {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
}

/// Unpacks the gzip tar `tar_gz` into `dest` (created; it must be absent or
/// empty), adding `id_shift` to every entry's uid and gid, keeping modes
/// (setuid bits included) and mtimes. Device nodes and FIFOs are skipped.
/// Returns the bytes of file content written. Blocking.
pub fn unpack(tar_gz: &Path, dest: &Path, id_shift: u32) -> Result<u64, ImageError> {
    prepare_dest(dest)?;
    let file = File::open(tar_gz).map_err(ImageError::io("opening", tar_gz))?;
    let gz = flate2::read::MultiGzDecoder::new(io::BufReader::new(file));
    let mut archive = tar::Archive::new(gz);
    let read_err = ImageError::io("reading", tar_gz);
    let mut u = Unpacker {
        archive: tar_gz,
        dest,
        id_shift,
        dirs: BTreeMap::new(),
        bytes: 0,
    };
    u.dirs.insert(dest.to_path_buf(), u.implicit_dir());
    for entry in archive.entries().map_err(read_err)? {
        let entry = entry.map_err(ImageError::io("reading", tar_gz))?;
        u.entry(entry)?;
    }
    // Directories last, children before parents: making their children
    // changed their mtimes.
    for (path, attrs) in u.dirs.iter().rev() {
        apply(path, attrs, false)?;
    }
    Ok(u.bytes)
}

fn prepare_dest(dest: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(dest).map_err(ImageError::io("listing", dest))?;
            if entries.next().is_some() {
                return Err(ImageError::NotEmpty {
                    path: dest.to_path_buf(),
                });
            }
            Ok(())
        }
        Ok(_) => Err(ImageError::NotEmpty {
            path: dest.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(ImageError::io("creating", dest))
        }
        Err(e) => Err(ImageError::Io {
            op: "inspecting",
            path: dest.to_path_buf(),
            source: e,
        }),
    }
}

/// Sets owner, then mode (chown clears setuid bits), then mtime, on `path`
/// without following it if it is a symlink.
fn apply(path: &Path, a: &Attrs, is_symlink: bool) -> Result<(), ImageError> {
    std::os::unix::fs::lchown(path, Some(a.uid), Some(a.gid))
        .map_err(ImageError::io("changing the owner of", path))?;
    if !is_symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(a.mode & 0o7777))
            .map_err(ImageError::io("changing the mode of", path))?;
    }
    let t = TimeSpec::new(a.mtime, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| ImageError::Io {
        op: "setting the modification time of",
        path: path.to_path_buf(),
        source: io::Error::from(e),
    })
}

struct Unpacker<'a> {
    archive: &'a Path,
    dest: &'a Path,
    id_shift: u32,
    /// Directories and their attributes, applied at the end.
    dirs: BTreeMap<PathBuf, Attrs>,
    bytes: u64,
}

/// The components of a relative archive path, `.` dropped; `None` if absolute
/// or containing `..`.
fn components(name: &str) -> Option<Vec<&str>> {
    if name.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = name
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    (!parts.contains(&"..")).then_some(parts)
}

impl Unpacker<'_> {
    /// The root and parents the archive leaves out: the container's root's.
    fn implicit_dir(&self) -> Attrs {
        Attrs {
            uid: self.id_shift,
            gid: self.id_shift,
            mode: 0o755,
            mtime: 0,
        }
    }

    fn refuse(&self, entry: &str, reason: impl Into<String>) -> ImageError {
        ImageError::Unpack {
            archive: self.archive.to_path_buf(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    fn shift(&self, name: &str, id: u64) -> Result<u32, ImageError> {
        u32::try_from(id)
            .ok()
            .and_then(|id| id.checked_add(self.id_shift))
            .ok_or_else(|| self.refuse(name, format!("has owner {id}, outside the id range")))
    }

    /// `dest/parts[..]`, after checking every existing parent is a real
    /// directory (never a symlink) and making missing ones, owned by the
    /// container's root.
    fn parent_of(&mut self, name: &str, parts: &[&str]) -> Result<PathBuf, ImageError> {
        let mut dir = self.dest.to_path_buf();
        for c in parts.iter().take(parts.len().saturating_sub(1)) {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.refuse(
                        name,
                        format!(
                            "goes through the symlink {}",
                            dir.strip_prefix(self.dest).unwrap_or(&dir).display()
                        ),
                    ));
                }
                Ok(_) => {
                    return Err(self.refuse(name, "has a file as a parent directory"));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&dir).map_err(ImageError::io("creating", &dir))?;
                    self.dirs.insert(dir.clone(), self.implicit_dir());
                }
                Err(e) => {
                    return Err(ImageError::Io {
                        op: "inspecting",
                        path: dir,
                        source: e,
                    });
                }
            }
        }
        Ok(dir)
    }

    /// Removes whatever is at `path` (an earlier entry of the same name),
    /// without following it.
    fn clear(&mut self, path: &Path, keep_dir: bool) -> Result<(), ImageError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() && keep_dir => Ok(()),
            Ok(m) if m.is_dir() => {
                self.dirs.retain(|d, _| !d.starts_with(path));
                fs::remove_dir_all(path).map_err(ImageError::io("removing", path))
            }
            Ok(_) => fs::remove_file(path).map_err(ImageError::io("removing", path)),
            Err(_) => Ok(()),
        }
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ImageError> {
        // Our archives never hold other names (the importer refuses them), and a
        // lossy conversion would silently rename the file.
        let name = String::from_utf8(entry.path_bytes().into_owned()).map_err(|e| {
            self.refuse(
                &String::from_utf8_lossy(e.as_bytes()),
                "has a name that is not UTF-8",
            )
        })?;
        let parts = components(&name)
            .ok_or_else(|| self.refuse(&name, "is absolute or has a `..` component"))?;
        let header = entry.header();
        let kind = header.entry_type();
        let read_err = |e: io::Error| ImageError::Io {
            op: "reading",
            path: self.archive.to_path_buf(),
            source: io::Error::new(e.kind(), format!("entry {name}: {e}")),
        };
        let attrs = Attrs {
            uid: self.shift(&name, header.uid().map_err(read_err)?)?,
            gid: self.shift(&name, header.gid().map_err(read_err)?)?,
            mode: header.mode().map_err(read_err)? & 0o7777,
            mtime: header
                .mtime()
                .ok()
                .and_then(|m| i64::try_from(m).ok())
                .unwrap_or(0),
        };
        let Some(last) = parts.last() else {
            // The root: its owner and mode apply to `dest`.
            if kind.is_dir() {
                self.dirs.insert(self.dest.to_path_buf(), attrs);
            }
            return Ok(());
        };
        if !(kind.is_dir()
            || kind.is_file()
            || kind.is_contiguous()
            || kind.is_symlink()
            || kind.is_hard_link())
        {
            // Device nodes and FIFOs: the runtime makes /dev.
            tracing::debug!(entry = %name, ?kind, "skipping entry");
            return Ok(());
        }
        let path = self.parent_of(&name, &parts)?.join(last);
        if kind.is_dir() {
            self.clear(&path, true)?;
            if fs::symlink_metadata(&path).is_err() {
                fs::create_dir(&path).map_err(ImageError::io("creating", &path))?;
            }
            self.dirs.insert(path, attrs);
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(read_err)?
                .ok_or_else(|| self.refuse(&name, "is a symlink without a target"))?
                .into_owned();
            self.clear(&path, false)?;
            std::os::unix::fs::symlink(&target, &path)
                .map_err(ImageError::io("making the symlink", &path))?;
            apply(&path, &attrs, true)?;
        } else if kind.is_hard_link() {
            let target_name = entry
                .link_name_bytes()
                .and_then(|t| String::from_utf8(t.into_owned()).ok())
                .ok_or_else(|| self.refuse(&name, "is a hard link without a UTF-8 target"))?;
            let target_parts = components(&target_name).ok_or_else(|| {
                self.refuse(
                    &name,
                    format!("is a hard link to {target_name:?}, outside the root"),
                )
            })?;
            let Some(target_last) = target_parts.last() else {
                return Err(self.refuse(&name, "is a hard link to the root"));
            };
            let target = self.parent_of(&name, &target_parts)?.join(target_last);
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_file() => {}
                _ => {
                    return Err(self.refuse(
                        &name,
                        format!("is a hard link to {target_name:?}, which is not a file unpacked before it"),
                    ));
                }
            }
            self.clear(&path, false)?;
            // linkat(2) without AT_SYMLINK_FOLLOW: never follows `target`.
            fs::hard_link(&target, &path).map_err(ImageError::io("linking", &path))?;
        } else {
            self.clear(&path, false)?;
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(OFlag::O_NOFOLLOW.bits())
                .mode(0o600)
                .open(&path)
                .map_err(ImageError::io("creating", &path))?;
            let n = copy_apart(&mut entry, &mut out).map_err(|e| match e {
                CopyError::Read(e) => read_err(e),
                CopyError::Write(source) => ImageError::Io {
                    op: "writing",
                    path: path.clone(),
                    source,
                },
            })?;
            self.bytes += n;
            drop(out);
            apply(&path, &attrs, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn owner(path: &Path) -> (u32, u32) {
        let m = fs::symlink_metadata(path).expect("lstat");
        (m.uid(), m.gid())
    }

    const SHIFT: u32 = 1_000_000;

    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }
        fn raw(
            mut self,
            name: &str,
            kind: tar::EntryType,
            mode: u32,
            owner: (u64, u64),
            body: &[u8],
            link: &str,
        ) -> Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(owner.0);
            h.set_gid(owner.1);
            h.set_mtime(1_600_000_000);
            h.set_size(body.len() as u64);
            if !link.is_empty() {
                h.set_link_name(link).expect("link");
            }
            let n = name.as_bytes();
            h.as_old_mut().name[..n.len()].copy_from_slice(n);
            h.set_cksum();
            self.0.append(&h, body).expect("append");
            self
        }
        fn file(self, name: &str, mode: u32, owner: (u64, u64), body: &str) -> Self {
            self.raw(
                name,
                tar::EntryType::Regular,
                mode,
                owner,
                body.as_bytes(),
                "",
            )
        }
        fn dir(self, name: &str, mode: u32, owner: (u64, u64)) -> Self {
            self.raw(name, tar::EntryType::Directory, mode, owner, b"", "")
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.raw(name, tar::EntryType::Symlink, 0o777, (0, 0), b"", target)
        }
        fn write(self, dir: &Path) -> PathBuf {
            let data = self.0.into_inner().expect("tar");
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            io::Write::write_all(&mut e, &data).expect("gz");
            let p = dir.join("rootfs.tar.gz");
            fs::write(&p, e.finish().expect("gz")).expect("write");
            p
        }
    }

    fn running_as_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn shifts_owners_and_keeps_modes_and_mtimes() {
        if !running_as_root() {
            eprintln!("skipped: needs root to change owners");
            return;
        }
        let work = tempfile::tempdir().expect("tempdir");
        let tar = Tar::new()
            .dir("./", 0o755, (0, 0))
            .dir("usr/bin", 0o755, (0, 0))
            .file("usr/bin/su", 0o4755, (0, 0), "su")
            .file("home/www/index.html", 0o640, (33, 33), "hi")
            .symlink("bin", "usr/bin")
            .raw(
                "usr/bin/su2",
                tar::EntryType::Link,
                0,
                (0, 0),
                b"",
                "usr/bin/su",
            )
            .dir("ro", 0o555, (0, 0))
            .file("ro/inside", 0o444, (0, 0), "x")
            .raw("dev/null", tar::EntryType::Char, 0o666, (0, 0), b"", "")
            .raw("fifo", tar::EntryType::Fifo, 0o666, (0, 0), b"", "")
            .write(work.path());
        let dest = work.path().join("root");
        let bytes = unpack(&tar, &dest, SHIFT).expect("unpack");
        assert_eq!(bytes, 2 + 2 + 1);
        assert_eq!(owner(&dest), (SHIFT, SHIFT));
        assert_eq!(owner(&dest.join("usr/bin/su")), (SHIFT, SHIFT));
        assert_eq!(
            owner(&dest.join("home/www/index.html")),
            (SHIFT + 33, SHIFT + 33)
        );
        assert_eq!(owner(&dest.join("home")), (SHIFT, SHIFT), "implicit parent");
        assert_eq!(owner(&dest.join("bin")), (SHIFT, SHIFT), "symlink itself");
        assert_eq!(
            fs::read_link(dest.join("bin")).expect("link"),
            Path::new("usr/bin")
        );
        let meta = |p: &str| fs::symlink_metadata(dest.join(p)).expect("stat");
        assert_eq!(meta("usr/bin/su").mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(meta("home/www/index.html").mode() & 0o7777, 0o640);
        assert_eq!(meta("ro").mode() & 0o7777, 0o555);
        assert_eq!(meta("usr/bin/su").mtime(), 1_600_000_000);
        assert_eq!(meta("usr/bin").mtime(), 1_600_000_000, "dir mtime kept");
        assert_eq!(meta("usr/bin/su2").ino(), meta("usr/bin/su").ino());
        assert!(!dest.join("dev/null").exists());
        assert!(!dest.join("fifo").exists());
    }

    #[test]
    fn refuses_entries_escaping_through_symlinks_or_dotdot() {
        if !running_as_root() {
            eprintln!("skipped: needs root to change owners");
            return;
        }
        let work = tempfile::tempdir().expect("tempdir");
        let outside = work.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        let cases = [
            Tar::new()
                .symlink("escape", outside.to_str().expect("utf-8"))
                .file("escape/evil", 0o644, (0, 0), "x"),
            Tar::new()
                .symlink("up", "..")
                .file("up/evil", 0o644, (0, 0), "x"),
            Tar::new().file("../evil", 0o644, (0, 0), "x"),
            Tar::new().file("/evil", 0o644, (0, 0), "x"),
            Tar::new()
                .symlink("l", outside.to_str().expect("utf-8"))
                .raw(
                    "h",
                    tar::EntryType::Link,
                    0,
                    (0, 0),
                    b"",
                    "l/../../etc/passwd",
                ),
            Tar::new().symlink("l", "/etc").raw(
                "h",
                tar::EntryType::Link,
                0,
                (0, 0),
                b"",
                "l/passwd",
            ),
        ];
        for (i, tar) in cases.into_iter().enumerate() {
            let case = work.path().join(format!("case{i}"));
            fs::create_dir(&case).expect("mkdir");
            let tar = tar.write(&case);
            let err = unpack(&tar, &case.join("root"), SHIFT).expect_err("refused");
            assert!(matches!(err, ImageError::Unpack { .. }), "case {i}: {err}");
        }
        assert_eq!(fs::read_dir(&outside).expect("list").count(), 0);
        assert!(!work.path().join("evil").exists());
    }

    #[test]
    fn a_later_entry_replaces_a_symlink_rather_than_writing_through_it() {
        if !running_as_root() {
            eprintln!("skipped: needs root to change owners");
            return;
        }
        let work = tempfile::tempdir().expect("tempdir");
        let victim = work.path().join("victim");
        fs::write(&victim, "untouched").expect("write");
        let tar = Tar::new()
            .symlink("f", victim.to_str().expect("utf-8"))
            .file("f", 0o644, (0, 0), "replaced")
            .write(work.path());
        let dest = work.path().join("root");
        unpack(&tar, &dest, SHIFT).expect("unpack");
        assert_eq!(fs::read_to_string(&victim).expect("read"), "untouched");
        assert_eq!(
            fs::read_to_string(dest.join("f")).expect("read"),
            "replaced"
        );
    }

    #[test]
    fn refuses_a_non_empty_destination() {
        let work = tempfile::tempdir().expect("tempdir");
        let tar = Tar::new().file("a", 0o644, (0, 0), "a").write(work.path());
        let dest = work.path().join("root");
        fs::create_dir(&dest).expect("mkdir");
        fs::write(dest.join("x"), "x").expect("write");
        let err = unpack(&tar, &dest, SHIFT).expect_err("not empty");
        assert!(matches!(err, ImageError::NotEmpty { .. }), "{err}");
    }

    #[test]
    fn splits_names_safely() {
        assert_eq!(components("./a/./b/"), Some(vec!["a", "b"]));
        assert_eq!(components("./"), Some(vec![]));
        assert_eq!(components("a/../b"), None);
        assert_eq!(components("/a"), None);
    }
}
