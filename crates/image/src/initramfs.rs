//! Assembling the guest initramfs: busybox and its applet links, `/init`, the guest
//! service with the shared libraries it needs, the kernel modules in load order,
//! and a few static files; written as gzip-compressed cpio. The same userland
//! without kernel parts ([`add_system`]) is the container root filesystem.
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

/// The userland every image of ours carries, VM or container: busybox, `/init`
/// and the guest service.
pub struct System<'a> {
    /// The static busybox binary.
    pub busybox: &'a Path,
    /// Applet paths from `busybox --list-full` (e.g. `sbin/ip`).
    pub applets: &'a [String],
    /// The skyvisor-guest executable.
    pub guest_binary: &'a Path,
    /// Absolute host paths of its shared libraries and loader.
    pub libs: &'a [PathBuf],
}

/// What goes into the initramfs.
pub struct Inputs<'a> {
    /// Busybox, `/init` and the guest service.
    pub system: System<'a>,
    /// Modules in load order (name, file).
    pub modules: &'a [(String, PathBuf)],
    /// Kernel release the modules belong to.
    pub kernel_version: &'a str,
}

/// In-initramfs path of a module.
pub fn module_path(kernel_version: &str, name: &str) -> String {
    format!("lib/modules/{kernel_version}/{name}.ko")
}

/// Adds what [`System`] describes to `a`: the top-level directories, busybox
/// and its applet links, `/init`, the guest service with its libraries and the
/// static files of `/etc`. No device nodes: the initramfs adds its own, and a
/// container runtime makes `/dev` itself.
pub fn add_system(a: &mut Archive, system: &System<'_>) {
    for dir in ["proc", "sys", "dev", "run", "data", "root", "etc/skyvisor"] {
        a.add(dir, Entry::Dir(0o755));
    }
    a.add("tmp", Entry::Dir(0o1777));
    a.add(
        "bin/busybox",
        Entry::File(0o755, Content::Host(system.busybox.to_path_buf())),
    );
    for applet in system.applets {
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
        Entry::File(0o755, Content::Host(system.guest_binary.to_path_buf())),
    );
    for lib in system.libs {
        a.add(
            &lib.to_string_lossy(),
            Entry::File(0o755, Content::Host(lib.clone())),
        );
    }
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
}

/// The archive for `inputs`.
pub fn archive(inputs: &Inputs<'_>) -> Archive {
    let mut a = Archive::new();
    add_system(&mut a, &inputs.system);
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    a.add("dev/console", Entry::CharDevice(0o600, 5, 1));
    a.add("dev/null", Entry::CharDevice(0o666, 1, 3));
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
    use std::os::unix::process::CommandExt;
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
            system: System {
                busybox: &busybox,
                applets: &applets,
                guest_binary: &guest,
                libs: std::slice::from_ref(&libc),
            },
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

    /// Runs the container branch of `/init` with `sh`, its paths moved into a
    /// temporary directory. The script is cut before the VM part (which
    /// mounts filesystems) so that a fall-through shows as exit status 3
    /// instead of touching this host.
    #[test]
    fn container_init_restarts_the_service_and_stops_on_sigterm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let log = d.join("log");
        let guest = d.join("guest");
        // Fails on its first start, then runs until SIGTERM.
        std::fs::write(
            &guest,
            format!(
                "#!/bin/sh\n\
                 echo \"started $*\" >>{log}\n\
                 [ -e {d}/ran ] || {{ touch {d}/ran; exit 1; }}\n\
                 trap 'echo term >>{log}; exit 0' TERM\n\
                 while :; do sleep 0.05; done\n",
                log = log.display(),
                d = d.display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&guest, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let vm_part = INIT_SCRIPT
            .find("\nmount -t proc")
            .expect("the VM part mounts /proc");
        let script = format!("{}\necho FELL-THROUGH; exit 3\n", &INIT_SCRIPT[..vm_part])
            .replace("/usr/bin/skyvisor-guest", &guest.to_string_lossy())
            .replace("/etc/resolv.conf", &d.join("resolv.conf").to_string_lossy())
            .replace("mkdir -p /data", &format!("mkdir -p {}/data", d.display()));
        /// Kills the script and its service if the test fails half-way.
        struct Group(std::process::Child);
        impl Drop for Group {
            fn drop(&mut self) {
                if let Ok(pid) = i32::try_from(self.0.id()) {
                    let group = nix::unistd::Pid::from_raw(-pid);
                    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
                }
                let _ = self.0.wait();
            }
        }
        let mut child = Group(
            Command::new("sh")
                .args(["-c", &script])
                .env("SV_CONTAINER", "1")
                .env(
                    "SV_CMDLINE",
                    "sv.name=c1 sv.dns=10.0.0.1 sv.domain=p.example",
                )
                .process_group(0)
                .spawn()
                .expect("sh runs"),
        );
        let wait_for = |what: &str, ok: &mut dyn FnMut() -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !ok() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "timed out waiting for {what}"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_for("the restarted service", &mut || {
            log_text().lines().count() >= 2
        });
        assert_eq!(log_text(), "started serve\nstarted serve\n");
        assert_eq!(
            std::fs::read_to_string(d.join("resolv.conf")).expect("resolv.conf"),
            "nameserver 10.0.0.1\nsearch p.example\noptions timeout:2 attempts:2\n"
        );
        assert!(d.join("data").is_dir());
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
        let mut status = None;
        wait_for("init to exit", &mut || {
            status = child.0.try_wait().expect("wait");
            status.is_some()
        });
        assert_eq!(status.and_then(|s| s.code()), Some(0), "init exits 0");
        assert!(
            log_text().ends_with("term\n"),
            "the service got SIGTERM: {}",
            log_text()
        );
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
