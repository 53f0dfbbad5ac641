//! Raw access to the guest's extra virtio disks (`/dev/vdb`, `/dev/vdc`...):
//! list them with their serial numbers (the volume name the host gave),
//! read and write byte ranges. Lets tests and people check what a volume
//! holds without a file system.
//!
//! It must never touch a disk that is mounted (the root/data disk) and
//! never accept a device name other than `vd` plus one or two letters.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::json::quote;

/// Largest read one request may ask for.
pub const MAX_READ: u64 = 4 << 20;

/// Why a block operation failed.
#[derive(Debug)]
pub enum BlkError {
    /// The name is not a virtio disk name.
    BadName(String),
    /// No such disk.
    NotFound(String),
    /// The disk is mounted.
    Mounted(String),
    /// The range is outside the disk or too long.
    BadRange(String),
    /// An I/O error.
    Io(String, io::Error),
}

impl BlkError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            BlkError::BadName(_) | BlkError::BadRange(_) => 400,
            BlkError::NotFound(_) => 404,
            BlkError::Mounted(_) => 409,
            BlkError::Io(..) => 500,
        }
    }
}

impl std::fmt::Display for BlkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlkError::BadName(n) => write!(f, "invalid disk name {n:?}: use vdb, vdc..."),
            BlkError::NotFound(n) => write!(f, "no disk {n}"),
            BlkError::Mounted(n) => write!(f, "disk {n} is mounted; refusing raw access"),
            BlkError::BadRange(m) => f.write_str(m),
            BlkError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// Whether `name` is a virtio disk name (`vd` plus one or two letters).
pub fn valid_name(name: &str) -> bool {
    name.len() >= 3
        && name.len() <= 4
        && name.starts_with("vd")
        && name[2..].bytes().all(|b| b.is_ascii_lowercase())
}

/// The guest's virtio disks.
pub struct Blk {
    sys: PathBuf,
    dev: PathBuf,
    mounts: PathBuf,
}

impl Blk {
    /// Disks as the kernel shows them (`/sys/block`, `/dev`, `/proc/mounts`).
    pub fn system() -> Self {
        Self::at(
            PathBuf::from("/sys/block"),
            PathBuf::from("/dev"),
            PathBuf::from("/proc/mounts"),
        )
    }

    /// Disks under other roots (tests).
    pub fn at(sys: PathBuf, dev: PathBuf, mounts: PathBuf) -> Self {
        Self { sys, dev, mounts }
    }

    fn size(&self, name: &str) -> Option<u64> {
        let sectors: u64 = fs::read_to_string(self.sys.join(name).join("size"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(sectors * 512)
    }

    fn check(&self, name: &str) -> Result<u64, BlkError> {
        if !valid_name(name) {
            return Err(BlkError::BadName(name.to_owned()));
        }
        let size = self
            .size(name)
            .ok_or_else(|| BlkError::NotFound(name.to_owned()))?;
        let dev = self.dev.join(name);
        let mounted = fs::read_to_string(&self.mounts)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.split(' ')
                    .next()
                    .is_some_and(|d| d == dev.to_string_lossy())
            });
        if mounted {
            return Err(BlkError::Mounted(name.to_owned()));
        }
        Ok(size)
    }

    /// The disks as a JSON array of `{name, size_bytes, serial}`.
    pub fn list_json(&self) -> String {
        let mut names: Vec<String> = fs::read_dir(&self.sys)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| valid_name(n))
                    .collect()
            })
            .unwrap_or_default();
        names.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
        let items: Vec<String> = names
            .iter()
            .map(|n| {
                let serial = fs::read_to_string(self.sys.join(n).join("serial"))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default();
                format!(
                    r#"{{"name":{},"size_bytes":{},"serial":{}}}"#,
                    quote(n),
                    self.size(n).unwrap_or(0),
                    quote(&serial)
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    /// Reads `len` bytes at `offset` of disk `name`.
    pub fn read(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, BlkError> {
        let size = self.check(name)?;
        if len > MAX_READ || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlkError::BadRange(format!(
                "cannot read {len} bytes at {offset} of {name} ({size} bytes; at most {MAX_READ} per read)"
            )));
        }
        let f = fs::File::open(self.dev.join(name))
            .map_err(|e| BlkError::Io(format!("opening {name}"), e))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| BlkError::Io(format!("reading {name}"), e))?;
        Ok(buf)
    }

    /// Writes `data` at `offset` of disk `name` and makes it durable.
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) -> Result<(), BlkError> {
        let size = self.check(name)?;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(BlkError::BadRange(format!(
                "cannot write {} bytes at {offset} of {name} ({size} bytes)",
                data.len()
            )));
        }
        let f = OpenOptions::new()
            .write(true)
            .open(self.dev.join(name))
            .map_err(|e| BlkError::Io(format!("opening {name}"), e))?;
        f.write_all_at(data, offset)
            .map_err(|e| BlkError::Io(format!("writing {name}"), e))?;
        // Durable before the answer: the flush reaches every in-sync replica.
        f.sync_data()
            .map_err(|e| BlkError::Io(format!("flushing {name}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(tag: &str) -> (Blk, PathBuf) {
        let root = std::env::temp_dir().join(format!("skyvisor-blk-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["sys/vdb", "sys/vdc", "sys/sda", "dev"] {
            fs::create_dir_all(root.join(d)).expect("dir");
        }
        fs::write(root.join("sys/vdb/size"), "8\n").expect("size");
        fs::write(root.join("sys/vdb/serial"), "data1\n").expect("serial");
        fs::write(root.join("sys/vdc/size"), "8\n").expect("size");
        fs::write(root.join("dev/vdb"), vec![0u8; 4096]).expect("dev");
        fs::write(root.join("dev/vdc"), vec![0u8; 4096]).expect("dev");
        let mounts = format!("{}/dev/vdc /data ext4 rw 0 0\n", root.display());
        fs::write(root.join("mounts"), mounts).expect("mounts");
        (
            Blk::at(root.join("sys"), root.join("dev"), root.join("mounts")),
            root,
        )
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("vdb") && valid_name("vdaa"));
        for bad in ["sda", "vd", "vd1", "vdabc", "../vdb", "vdB"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn lists_reads_writes_and_refuses_mounted_disks() {
        let (b, root) = fake("rw");
        let list = b.list_json();
        assert!(
            list.contains(r#""name":"vdb","size_bytes":4096,"serial":"data1""#),
            "{list}"
        );
        assert!(!list.contains("sda"), "{list}");
        b.write("vdb", 100, b"hello").expect("write");
        assert_eq!(b.read("vdb", 100, 5).expect("read"), b"hello");
        assert_eq!(b.read("vdb", 4090, 10).expect_err("beyond").status(), 400);
        assert_eq!(
            b.write("vdb", 4095, b"xy").expect_err("beyond").status(),
            400
        );
        assert_eq!(b.read("vdc", 0, 1).expect_err("mounted").status(), 409);
        assert_eq!(b.read("vdz", 0, 1).expect_err("absent").status(), 404);
        assert_eq!(b.read("sda", 0, 1).expect_err("bad").status(), 400);
        let _ = fs::remove_dir_all(root);
    }
}
