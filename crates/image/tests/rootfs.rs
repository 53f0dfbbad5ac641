//! Builds the `debian-rootfs` recipe from the real busybox package and
//! skyvisor-guest, checks the tarball, and unpacks it with shifted owners as
//! the agent does for a container. Boots nothing.
//!
//! Needs: network access to a Debian mirror the first time (the busybox .deb,
//! cached under target/tmp), apt lists, ldd, and root (for the owner shift).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use skyvisor_image::{BuildOptions, ROOTFS_FILE, build_rootfs, unpack_rootfs};

/// Builds skyvisor-guest in the private target directory the boot tests use.
fn guest_binary() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = manifest_dir
        .parent()
        .expect("crates dir")
        .join("guest/Cargo.toml");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building skyvisor-guest failed");
    target.join("release/skyvisor-guest")
}

#[test]
fn debian_rootfs_builds_from_the_cache_and_unpacks_shifted() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let opts = BuildOptions::new(tmp.join("image-cache"), guest_binary());
    let out = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let built = rt
        .block_on(build_rootfs(out.path(), &opts, &|p| {
            eprintln!("rootfs: {p}")
        }))
        .expect("the rootfs builds");
    assert_eq!(built.rootfs, out.path().join(ROOTFS_FILE));
    assert!(
        built
            .packages
            .iter()
            .any(|p| p.starts_with("busybox-static="))
    );
    let again = rt
        .block_on(build_rootfs(out.path(), &opts, &|_| {}))
        .expect("cached");
    assert_eq!(again.build_key, built.build_key);

    let gz = flate2::read::GzDecoder::new(std::fs::File::open(&built.rootfs).expect("open"));
    let mut ar = tar::Archive::new(gz);
    let mut entries = BTreeMap::new();
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let h = e.header().clone();
        let path = e.path().expect("path").to_string_lossy().into_owned();
        assert_eq!((h.uid().ok(), h.gid().ok()), (Some(0), Some(0)), "{path}");
        let mut body = Vec::new();
        e.read_to_end(&mut body).expect("read");
        entries.insert(path, (h.entry_type(), body.len()));
    }
    for p in [
        "init",
        "bin/busybox",
        "usr/bin/skyvisor-guest",
        "bin/sh",
        "etc/passwd",
    ] {
        assert!(entries.contains_key(p), "{p} missing");
    }
    assert!(
        entries
            .iter()
            .all(|(_, (k, _))| k.is_dir() || k.is_file() || k.is_symlink()),
        "only directories, files and symlinks"
    );

    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: skipping the unpack");
        return;
    }
    let root = out.path().join("root");
    let bytes = unpack_rootfs(&built.rootfs, &root, 1_000_000).expect("unpack");
    assert!(bytes > 1_000_000, "{bytes} bytes");
    let m = std::fs::symlink_metadata(root.join("usr/bin/skyvisor-guest")).expect("guest");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777),
        (1_000_000, 1_000_000, 0o755)
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).expect("sh"),
        Path::new("/bin/busybox")
    );
    let tmp_mode = std::fs::metadata(root.join("tmp")).expect("tmp").mode() & 0o7777;
    assert_eq!(tmp_mode, 0o1777);
}
