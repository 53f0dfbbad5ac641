//! Writing root filesystems as gzip-compressed tar files: the `debian-rootfs`
//! recipe's output (from the same [`Archive`] the initramfs is made of) and the
//! flattened result of an OCI image import.
//!
//! It must never write a device node, a FIFO, an absolute path or a `..`
//! component: container runtimes make `/dev` themselves, and
//! [`crate::rootfs::unpack`] refuses such entries anyway.

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use tar::{EntryType, Header};

use crate::ImageError;
use crate::cpio::{Archive, Content, Entry};

/// Owner, permissions and modification time of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: u64,
}

impl Meta {
    /// Owned by root, modified at the epoch (deterministic output).
    pub fn root(mode: u32) -> Self {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }
}

/// Streams entries into a `.tar.gz` file.
pub struct TarGzWriter {
    builder: tar::Builder<GzEncoder<BufWriter<File>>>,
    path: PathBuf,
}

fn header(kind: EntryType, meta: &Meta, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode & 0o7777);
    h.set_uid(meta.uid);
    h.set_gid(meta.gid);
    h.set_mtime(meta.mtime);
    h.set_size(size);
    h
}

impl TarGzWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, ImageError> {
        let file = File::create(path).map_err(ImageError::io("creating", path))?;
        let gz = GzEncoder::new(BufWriter::new(file), Compression::default());
        Ok(TarGzWriter {
            builder: tar::Builder::new(gz),
            path: path.to_path_buf(),
        })
    }

    /// The error as it came: callers look at its errno (a full disk).
    fn failed(&self) -> impl FnOnce(io::Error) -> ImageError + use<> {
        ImageError::io("writing", self.path.clone())
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, meta: &Meta) -> Result<(), ImageError> {
        let mut h = header(EntryType::Directory, meta, 0);
        let err = self.failed();
        self.builder
            .append_data(&mut h, name, io::empty())
            .map_err(err)
    }

    /// A regular file of `size` bytes read from `data`.
    pub fn file(
        &mut self,
        name: &str,
        meta: &Meta,
        size: u64,
        data: impl Read,
    ) -> Result<(), ImageError> {
        let mut h = header(EntryType::Regular, meta, size);
        let err = self.failed();
        self.builder.append_data(&mut h, name, data).map_err(err)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, meta: &Meta, target: &str) -> Result<(), ImageError> {
        let mut h = header(EntryType::Symlink, meta, 0);
        let err = self.failed();
        self.builder.append_link(&mut h, name, target).map_err(err)
    }

    /// A hard link to `target`, an earlier entry of the archive.
    pub fn hard_link(&mut self, name: &str, meta: &Meta, target: &str) -> Result<(), ImageError> {
        let mut h = header(EntryType::Link, meta, 0);
        let err = self.failed();
        self.builder.append_link(&mut h, name, target).map_err(err)
    }

    /// Writes the end of the archive and syncs the file.
    pub fn finish(self) -> Result<(), ImageError> {
        let path = self.path;
        let gz = self
            .builder
            .into_inner()
            .map_err(ImageError::io("writing", &path))?;
        let buf = gz.finish().map_err(ImageError::io("compressing", &path))?;
        let file = buf.into_inner().map_err(|e| ImageError::Io {
            op: "flushing",
            path: path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(ImageError::io("syncing", &path))
    }
}

/// Writes `archive` as a gzip tar at `path`, every entry owned by 0:0 with
/// mtime 0. Refuses device nodes (a root filesystem has none).
pub fn write_archive(archive: &Archive, path: &Path) -> Result<(), ImageError> {
    let mut w = TarGzWriter::create(path)?;
    for (name, entry) in archive.entries() {
        match entry {
            Entry::Dir(perm) => w.dir(name, &Meta::root(*perm))?,
            Entry::File(perm, Content::Bytes(b)) => {
                w.file(name, &Meta::root(*perm), b.len() as u64, b.as_slice())?
            }
            Entry::File(perm, Content::Host(src)) => {
                let f = File::open(src).map_err(ImageError::io("opening", src))?;
                let size = f
                    .metadata()
                    .map_err(ImageError::io("reading metadata of", src))?
                    .len();
                // `take` so a file that grows meanwhile cannot overrun its header.
                w.file(name, &Meta::root(*perm), size, f.take(size))?
            }
            Entry::Symlink(target) => w.symlink(name, &Meta::root(0o777), target)?,
            Entry::CharDevice(..) => {
                return Err(ImageError::Io {
                    op: "writing",
                    path: path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("device node {name} does not belong in a root filesystem"),
                    ),
                });
            }
        }
    }
    w.finish()
}

/// Which side of a copy failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source (a corrupt or truncated archive).
    Read(io::Error),
    /// Writing the destination (a full disk, say).
    Write(io::Error),
}

/// Copies like [`io::copy`], but tells a failed read from a failed write.
pub fn copy_apart(r: &mut impl Read, w: &mut impl io::Write) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        w.write_all(buf.get(..n).unwrap_or_default())
            .map_err(CopyError::Write)?;
        total += n as u64;
    }
}
