//! Assembling the guest initramfs: busybox and its applet links, `/init`, the guest
//! service with the shared libraries it needs, the kernel modules in load order,
//! and a few static files; written as gzip-compressed cpio.
//!
//! It must never depend on anything the host has installed beyond what it is given
//! explicitly (paths of busybox, the guest binary, its libraries and the modules).

use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::ImageError;
use crate::cpio::{Archive, Content, Entry};

/// The `/init` script (busybox sh).
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// Where the guest service lives inside the initramfs.
pub const GUEST_PATH: &str = "usr/bin/skyvisor-guest";
/// The file listing module paths in load order, read by `/init`.
pub const MODULE_LIST_PATH: &str = "etc/skyvisor/modules";

/// What goes into the initramfs.
pub struct Inputs<'a> {
    /// The static busybox binary.
    pub busybox: &'a Path,
    /// Applet paths from `busybox --list-full` (e.g. `sbin/ip`).
    pub applets: &'a [String],
    /// The skyvisor-guest executable.
    pub guest_binary: &'a Path,
    /// Absolute host paths of its shared libraries and loader.
    pub libs: &'a [PathBuf],
    /// Modules in load order (name, file).
    pub modules: &'a [(String, PathBuf)],
    /// Kernel release the modules belong to.
    pub kernel_version: &'a str,
}

/// In-initramfs path of a module.
pub fn module_path(kernel_version: &str, name: &str) -> String {
    format!("lib/modules/{kernel_version}/{name}.ko")
}

/// The archive for `inputs`.
pub fn archive(inputs: &Inputs<'_>) -> Archive {
    let mut a = Archive::new();
    for dir in ["proc", "sys", "dev", "run", "data", "root", "etc/skyvisor"] {
        a.add(dir, Entry::Dir(0o755));
    }
    a.add("tmp", Entry::Dir(0o1777));
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    a.add("dev/console", Entry::CharDevice(0o600, 5, 1));
    a.add("dev/null", Entry::CharDevice(0o666, 1, 3));
    a.add(
        "bin/busybox",
        Entry::File(0o755, Content::Host(inputs.busybox.to_path_buf())),
    );
    for applet in inputs.applets {
        let applet = applet.trim().trim_start_matches('/');
        // `linuxrc` would be an alternative init; keep ours the only one.
        if applet.is_empty()
            || applet == "linuxrc"
            || applet == "bin/busybox"
            || applet.contains("..")
        {
            continue;
        }
        a.add(applet, Entry::Symlink("/bin/busybox".to_string()));
    }
    a.add(
        "init",
        Entry::File(0o755, Content::Bytes(INIT_SCRIPT.as_bytes().to_vec())),
    );
    a.add(
        GUEST_PATH,
        Entry::File(0o755, Content::Host(inputs.guest_binary.to_path_buf())),
    );
    for lib in inputs.libs {
        a.add(
            &lib.to_string_lossy(),
            Entry::File(0o755, Content::Host(lib.clone())),
        );
    }
    let mut list = String::new();
    for (name, path) in inputs.modules {
        let dest = module_path(inputs.kernel_version, name);
        list.push('/');
        list.push_str(&dest);
        list.push('\n');
        a.add(&dest, Entry::File(0o644, Content::Host(path.clone())));
    }
    a.add(
        MODULE_LIST_PATH,
        Entry::File(0o644, Content::Bytes(list.into_bytes())),
    );
    let statics: [(&str, &str); 4] = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\ntty:x:5:\n"),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("etc/resolv.conf", ""),
    ];
    for (path, text) in statics {
        a.add(
            path,
            Entry::File(0o644, Content::Bytes(text.as_bytes().to_vec())),
        );
    }
    a
}

/// Writes `archive` gzip-compressed to `path` (blocking).
pub fn write_gz(archive: &Archive, path: &Path) -> Result<(), ImageError> {
    let file = std::fs::File::create(path).map_err(ImageError::io("creating", path))?;
    let gz = GzEncoder::new(std::io::BufWriter::new(file), Compression::default());
    let gz = archive.write(gz).map_err(ImageError::io("writing", path))?;
    let buf = gz.finish().map_err(ImageError::io("compressing", path))?;
    let file = buf.into_inner().map_err(|e| ImageError::Io {
        op: "flushing",
        path: path.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(ImageError::io("syncing", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn contains_init_guest_libs_modules_and_applets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, body: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).expect("write");
            p
        };
        let busybox = file("busybox", b"bb");
        let guest = file("guest", b"guest");
        let ko_a = file("a.ko", b"ko-a");
        let ko_b = file("b.ko", b"ko-b");
        let libc = file("libc.so.6", b"libc");
        let applets = vec![
            "sbin/ip".to_string(),
            "bin/sh".to_string(),
            "linuxrc".to_string(),
        ];
        let inputs = Inputs {
            busybox: &busybox,
            applets: &applets,
            guest_binary: &guest,
            libs: std::slice::from_ref(&libc),
            modules: &[("b".to_string(), ko_b), ("a".to_string(), ko_a)],
            kernel_version: "6.1.0-t",
        };
        let a = archive(&inputs);
        for p in [
            "init",
            "bin/busybox",
            "sbin/ip",
            "bin/sh",
            GUEST_PATH,
            "dev/console",
            "tmp",
        ] {
            assert!(a.contains(p), "{p} missing");
        }
        assert!(!a.contains("linuxrc"));
        assert!(a.contains(&libc.to_string_lossy()));
        assert!(a.contains("lib/modules/6.1.0-t/a.ko"));

        let out = dir.path().join("initrd.img");
        write_gz(&a, &out).expect("write");
        let extract = dir.path().join("x");
        std::fs::create_dir(&extract).expect("mkdir");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zcat {} | cpio -idm --quiet --no-absolute-filenames --nonmatching 'dev/*'",
                out.display()
            ))
            .current_dir(&extract)
            .status()
            .expect("zcat and cpio are installed");
        assert!(status.success());
        let list = std::fs::read_to_string(extract.join(MODULE_LIST_PATH)).expect("module list");
        assert_eq!(
            list,
            "/lib/modules/6.1.0-t/b.ko\n/lib/modules/6.1.0-t/a.ko\n"
        );
        assert_eq!(
            std::fs::read(extract.join(GUEST_PATH)).expect("guest"),
            b"guest"
        );
        let init = std::fs::read_to_string(extract.join("init")).expect("init");
        assert!(init.starts_with("#!/bin/sh\n"));
        assert!(init.contains("SKYVISOR-PROBE-OK"));
    }

    #[test]
    fn init_script_is_valid_shell() {
        let status = Command::new("sh")
            .args(["-n", "-c", INIT_SCRIPT])
            .status()
            .expect("sh runs");
        assert!(status.success(), "init.sh has a syntax error");
    }
}
