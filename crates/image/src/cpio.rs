//! A writer for the cpio "newc" format (the format the Linux kernel unpacks as an
//! initramfs), and an [`Archive`] that collects entries, adds missing parent
//! directories and writes them parents-first.
//!
//! Output is deterministic (fixed inode numbering, mtime 0, uid/gid 0) so that the
//! same inputs give the same bytes. It must never emit a path with a leading `/`
//! or a `..` component.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const TRAILER: &str = "TRAILER!!!";

/// Streams newc entries to `W`.
pub struct Writer<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

impl<W: Write> Writer<W> {
    /// A writer with nothing written yet.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..pad])
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        if name != TRAILER
            && (name.starts_with('/') || name.split('/').any(|c| c == ".." || c.is_empty()))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid archive path {name:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is too large for cpio"),
            )
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        self.write_all(header.as_bytes())?;
        self.write_all(name.as_bytes())?;
        self.write_all(&[0])?;
        self.pad4()?;
        self.write_all(data)?;
        self.pad4()
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), (0, 0), &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer, pads to a 512-byte block as cpio tools do, and returns
    /// the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, (0, 0), &[])?;
        let pad = (512 - (self.offset % 512) as usize) % 512;
        self.write_all(&vec![0u8; pad])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Where a file's content comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// Bytes in memory.
    Bytes(Vec<u8>),
    /// A file on the host, read when the archive is written.
    Host(PathBuf),
}

/// One archive member.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A directory with permissions.
    Dir(u32),
    /// A regular file with permissions.
    File(u32, Content),
    /// A symlink to the target.
    Symlink(String),
    /// A character device (perm, major, minor).
    CharDevice(u32, u32, u32),
}

/// A set of entries keyed by path; parents are created as needed.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `path`, creating missing parent directories (0755).
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = normalize(path);
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in components.iter().take(components.len().saturating_sub(1)) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            self.entries
                .entry(parent.clone())
                .or_insert(Entry::Dir(0o755));
        }
        self.entries.insert(path, entry);
    }

    /// The entries in writing order (a path sorts before its extensions, so
    /// parents come first), for writers of other formats.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    /// Whether `path` is present.
    #[cfg(test)]
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&normalize(path))
    }

    /// Writes all entries, parents before children (a path sorts before its
    /// extensions), then the trailer.
    pub fn write<W: Write>(&self, out: W) -> io::Result<W> {
        let mut w = Writer::new(out);
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir(perm) => w.dir(path, *perm)?,
                Entry::File(perm, Content::Bytes(b)) => w.file(path, *perm, b)?,
                Entry::File(perm, Content::Host(src)) => {
                    let data = std::fs::read(src).map_err(|e| {
                        io::Error::new(e.kind(), format!("reading {}: {e}", src.display()))
                    })?;
                    w.file(path, *perm, &data)?;
                }
                Entry::Symlink(target) => w.symlink(path, target)?,
                Entry::CharDevice(perm, major, minor) => {
                    w.char_device(path, *perm, *major, *minor)?
                }
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn cpio(args: &[&str], dir: &std::path::Path, input: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cpio is installed (apt-get install cpio)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("feed cpio");
        let out = child.wait_with_output().expect("cpio runs");
        assert!(
            out.status.success(),
            "cpio {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn round_trips_through_gnu_cpio() {
        let host_file = tempfile::NamedTempFile::new().expect("temp file");
        fs::write(host_file.path(), b"from the host").expect("write");
        let mut a = Archive::new();
        a.add(
            "/bin/busybox",
            Entry::File(0o755, Content::Bytes(b"\x7fELFfake".to_vec())),
        );
        a.add("bin/sh", Entry::Symlink("/bin/busybox".to_string()));
        a.add(
            "etc/skyvisor/modules",
            Entry::File(0o644, Content::Bytes(b"a\nb\n".to_vec())),
        );
        a.add(
            "etc/odd",
            Entry::File(0o600, Content::Bytes(vec![1, 2, 3, 4, 5])),
        );
        a.add(
            "usr/share/host",
            Entry::File(0o644, Content::Host(host_file.path().to_path_buf())),
        );
        a.add("tmp", Entry::Dir(0o1777));
        a.add("empty", Entry::File(0o644, Content::Bytes(Vec::new())));
        let bytes = a.write(Vec::new()).expect("write archive");
        assert_eq!(bytes.len() % 512, 0);

        let listing = cpio(&["-t"], std::path::Path::new("/"), &bytes);
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "empty",
                "etc",
                "etc/odd",
                "etc/skyvisor",
                "etc/skyvisor/modules",
                "tmp",
                "usr",
                "usr/share",
                "usr/share/host"
            ]
        );

        let dir = tempfile::tempdir().expect("temp dir");
        cpio(&["-idm", "--quiet"], dir.path(), &bytes);
        let root = dir.path();
        assert_eq!(
            fs::read(root.join("bin/busybox")).expect("read"),
            b"\x7fELFfake"
        );
        assert_eq!(
            fs::read_link(root.join("bin/sh")).expect("link"),
            PathBuf::from("/bin/busybox")
        );
        assert_eq!(
            fs::read(root.join("etc/odd")).expect("read"),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            fs::read(root.join("etc/skyvisor/modules")).expect("read"),
            b"a\nb\n"
        );
        assert_eq!(
            fs::read(root.join("usr/share/host")).expect("read"),
            b"from the host"
        );
        assert_eq!(fs::read(root.join("empty")).expect("read"), b"");
        let mode = |p: &str| {
            fs::symlink_metadata(root.join(p))
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("bin/busybox"), 0o755);
        assert_eq!(mode("etc/odd"), 0o600);
        assert_eq!(mode("tmp"), 0o1777);
    }

    #[test]
    fn device_nodes_are_listed_with_their_numbers() {
        let mut a = Archive::new();
        a.add("dev/console", Entry::CharDevice(0o600, 5, 1));
        let bytes = a.write(Vec::new()).expect("write");
        let listing = cpio(&["-tv"], std::path::Path::new("/"), &bytes);
        let line = listing
            .lines()
            .find(|l| l.ends_with("dev/console"))
            .expect("console listed");
        assert!(line.starts_with("crw-------"), "{line}");
        assert!(line.contains("5,"), "{line}");
    }

    #[test]
    fn output_is_deterministic() {
        let build = || {
            let mut a = Archive::new();
            a.add("b/x", Entry::File(0o644, Content::Bytes(b"x".to_vec())));
            a.add("a", Entry::Symlink("b/x".to_string()));
            a.write(Vec::new()).expect("write")
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn rejects_escaping_paths() {
        let mut w = Writer::new(Vec::new());
        assert!(w.file("../etc/passwd", 0o644, b"").is_err());
        assert!(w.file("a//b", 0o644, b"").is_err());
    }
}
