//! State on the VM's persistent disk (mounted at `/data`): the durable counter and
//! named files.
//!
//! Every write is write + fsync + rename + fsync(dir), and a call returns only once
//! the data is durable. It must never write outside its root, never accept a file
//! name that is not `[A-Za-z0-9._-]{1,64}` (nor `.`/`..`), and never write when the
//! root is not a mount point (unless configured for host-side tests), because then
//! the data would silently live in RAM.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Why a disk operation failed.
#[derive(Debug)]
pub enum DiskError {
    /// No filesystem is mounted at the root.
    NotMounted(PathBuf),
    /// The named file does not exist.
    NotFound(String),
    /// The counter file holds something that is not a number.
    Corrupt(String),
    /// An I/O error, with what we were doing.
    Io(String, io::Error),
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskError::NotMounted(p) => {
                write!(f, "no persistent disk is mounted at {}", p.display())
            }
            DiskError::NotFound(n) => write!(f, "file {n:?} not found"),
            DiskError::Corrupt(why) => write!(f, "counter file is corrupt: {why}"),
            DiskError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// Whether `name` is an acceptable file name.
pub fn valid_file_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The persistent-disk store.
pub struct Disk {
    root: PathBuf,
    require_mount: bool,
    // Serialises writers with each other and with shutdown (which unmounts).
    lock: Mutex<()>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DiskError {
    let what = what.into();
    move |e| DiskError::Io(what, e)
}

impl Disk {
    /// A store rooted at `root`; `require_mount` refuses to work unless `root` is a
    /// mount point.
    pub fn new(root: PathBuf, require_mount: bool) -> Self {
        Disk {
            root,
            require_mount,
            lock: Mutex::new(()),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the writer lock; shutdown holds it while unmounting so that no write is
    /// cut in half.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_mounted(&self) -> Result<(), DiskError> {
        if !self.require_mount {
            return Ok(());
        }
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.root.to_string_lossy();
        let mounted = mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(root.as_ref()));
        if mounted {
            Ok(())
        } else {
            Err(DiskError::NotMounted(self.root.clone()))
        }
    }

    fn ensure_dir(&self, dir: &Path) -> Result<(), DiskError> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            fsync_dir(&self.root)?;
        }
        Ok(())
    }

    fn counter_path(&self) -> PathBuf {
        self.root.join("counter")
    }

    fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    fn read_counter(&self) -> Result<u64, DiskError> {
        match fs::read_to_string(self.counter_path()) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| DiskError::Corrupt(format!("{:?}", s.trim()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(DiskError::Io("reading counter".to_string(), e)),
        }
    }

    /// The current counter value (0 if never incremented).
    pub fn counter(&self) -> Result<u64, DiskError> {
        self.check_mounted()?;
        self.read_counter()
    }

    /// Increments the counter and returns the new value once it is durable.
    pub fn increment(&self) -> Result<u64, DiskError> {
        let _guard = self.lock();
        self.check_mounted()?;
        let next = self.read_counter()?.saturating_add(1);
        self.ensure_dir(&self.tmp_dir())?;
        write_durably(
            &self.tmp_dir(),
            &self.root,
            "counter",
            format!("{next}\n").as_bytes(),
        )?;
        Ok(next)
    }

    /// Stores `data` as file `name`, durably.
    pub fn put_file(&self, name: &str, data: &[u8]) -> Result<(), DiskError> {
        let _guard = self.lock();
        self.check_mounted()?;
        self.ensure_dir(&self.tmp_dir())?;
        self.ensure_dir(&self.files_dir())?;
        write_durably(&self.tmp_dir(), &self.files_dir(), name, data)
    }

    /// Reads file `name`.
    pub fn get_file(&self, name: &str) -> Result<Vec<u8>, DiskError> {
        self.check_mounted()?;
        match fs::read(self.files_dir().join(name)) {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DiskError::NotFound(name.to_string()))
            }
            Err(e) => Err(DiskError::Io(format!("reading {name}"), e)),
        }
    }

    /// Deletes file `name`, durably.
    pub fn delete_file(&self, name: &str) -> Result<(), DiskError> {
        let _guard = self.lock();
        self.check_mounted()?;
        match fs::remove_file(self.files_dir().join(name)) {
            Ok(()) => fsync_dir(&self.files_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DiskError::NotFound(name.to_string()))
            }
            Err(e) => Err(DiskError::Io(format!("deleting {name}"), e)),
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<(), DiskError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync of directory {}", dir.display())))
}

/// Writes `data` to `tmp_dir/name`, fsyncs it, renames it to `dir/name` and fsyncs
/// `dir`, so that after return either the old or the new content survives a crash
/// and the new one is durable.
fn write_durably(tmp_dir: &Path, dir: &Path, name: &str, data: &[u8]) -> Result<(), DiskError> {
    let tmp = tmp_dir.join(format!("{name}.{}", std::process::id()));
    let target = dir.join(name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(format!("creating {}", tmp.display())))?;
        f.write_all(data)
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        f.sync_all()
            .map_err(io_err(format!("fsync of {}", tmp.display())))?;
        fs::rename(&tmp, &target).map_err(io_err(format!(
            "renaming {} to {}",
            tmp.display(),
            target.display()
        )))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("skyvisor-guest-disk-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp root");
        dir
    }

    #[test]
    fn counter_increments_and_persists_in_a_file() {
        let root = temp_root("counter");
        let d = Disk::new(root.clone(), false);
        assert_eq!(d.counter().expect("read"), 0);
        assert_eq!(d.increment().expect("inc"), 1);
        assert_eq!(d.increment().expect("inc"), 2);
        let again = Disk::new(root.clone(), false);
        assert_eq!(again.counter().expect("read"), 2);
        assert_eq!(
            fs::read_to_string(root.join("counter")).expect("file"),
            "2\n"
        );
        fs::write(root.join("counter"), "junk").expect("write");
        assert!(matches!(d.increment(), Err(DiskError::Corrupt(_))));
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn files_put_get_delete() {
        let root = temp_root("files");
        let d = Disk::new(root.clone(), false);
        d.put_file("a.txt", b"one").expect("put");
        d.put_file("a.txt", b"two").expect("overwrite");
        assert_eq!(d.get_file("a.txt").expect("get"), b"two");
        d.delete_file("a.txt").expect("delete");
        assert!(matches!(d.get_file("a.txt"), Err(DiskError::NotFound(_))));
        assert!(matches!(
            d.delete_file("a.txt"),
            Err(DiskError::NotFound(_))
        ));
        // No temp files are left behind.
        assert_eq!(fs::read_dir(root.join(".tmp")).expect("tmp dir").count(), 0);
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn refuses_to_write_when_not_mounted() {
        let root = temp_root("unmounted");
        let d = Disk::new(root.clone(), true);
        assert!(matches!(d.increment(), Err(DiskError::NotMounted(_))));
        assert!(!root.join("counter").exists());
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn file_names_are_restricted() {
        for ok in ["a", "A-b_c.9", &"x".repeat(64), ".hidden"] {
            assert!(valid_file_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65), "é", "a\0"] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
    }
}
