//! The `debian-rootfs` recipe: the default guest's userland (static busybox,
//! `/init`, `skyvisor-guest` and its libraries) as a root filesystem tarball for
//! containers, built from the busybox Debian package alone and cached like the
//! VM image.
//!
//! It must never put device nodes or kernel parts in the tarball: the container
//! runtime makes `/dev`, and the host's kernel runs the container.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apt::{self, Package};
use crate::{
    BUSYBOX_PACKAGE, BuildOptions, BuildProgress, ImageError, KEEP_BUILDS, MANIFEST, blocking,
    cache, cached_build, fetch, initramfs, libs, tarball, unpack_busybox,
};

/// The recipe name of the container root filesystem.
pub const ROOTFS_RECIPE: &str = "debian-rootfs";
/// The file [`build_rootfs`] places in its output directory.
pub const ROOTFS_FILE: &str = "rootfs.tar.gz";
/// Bump when the layout changes in a way the hashed inputs do not capture.
const ROOTFS_RECIPE_VERSION: u32 = 1;

/// A finished root filesystem, in the output directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltRootfs {
    /// The gzip tar (`rootfs.tar.gz`), every entry owned by 0:0.
    pub rootfs: PathBuf,
    /// The Debian packages used, as `name=version`.
    pub packages: Vec<String>,
    /// The build's cache key (changes whenever any input changes).
    pub build_key: String,
}

/// What a finished rootfs build records about itself.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RootfsManifest {
    recipe: String,
    key: String,
    packages: Vec<String>,
}

/// Builds (or takes from the cache) the [`ROOTFS_RECIPE`] root filesystem and
/// places `rootfs.tar.gz` in `out_dir` (hard-linked from the cache). Needs only
/// the busybox package, not the kernel.
pub async fn build_rootfs(
    out_dir: &Path,
    opts: &BuildOptions,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<BuiltRootfs, ImageError> {
    let started = Instant::now();
    if !opts.guest_binary.is_file() {
        return Err(ImageError::MissingFile {
            what: "the skyvisor-guest executable".to_string(),
            path: opts.guest_binary.clone(),
        });
    }
    progress(BuildProgress::Resolving);
    std::fs::create_dir_all(&opts.cache_dir)
        .map_err(ImageError::io("creating", &opts.cache_dir))?;
    // A memo of its own: the VM recipe's asks a different question.
    let packages = apt::candidates_memoised(
        &opts.cache_dir.join("resolved-rootfs.json"),
        &[BUSYBOX_PACKAGE],
    )
    .await?;
    let [busybox_pkg] =
        <[Package; 1]>::try_from(packages).map_err(|_| ImageError::PackageResolve {
            package: BUSYBOX_PACKAGE.to_string(),
            command: "apt-cache show".to_string(),
            detail: "unexpected number of packages".to_string(),
        })?;
    let libs = libs::shared_libraries(&opts.guest_binary).await?;
    let key = build_key(&opts.guest_binary, &libs, &busybox_pkg).await?;

    let builds_dir = opts.cache_dir.join("builds");
    let tmp_dir = opts.cache_dir.join("tmp");
    for d in [&builds_dir, &tmp_dir, &out_dir.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(ImageError::io("creating", d))?;
    }
    let build_dir = builds_dir.join(&key);
    let (manifest, cached) = match cached_build(&build_dir, &[ROOTFS_FILE], |m: &RootfsManifest| {
        m.key == key
    }) {
        Some(m) => {
            progress(BuildProgress::CacheHit { key: key.clone() });
            cache::touch(&build_dir.join(MANIFEST));
            (m, true)
        }
        None => {
            let m = build_fresh(&key, &busybox_pkg, &libs, opts, progress).await?;
            cache::prune(&builds_dir, &tmp_dir, KEEP_BUILDS, &build_dir);
            (m, false)
        }
    };
    let rootfs = cache::link_into(
        &build_dir.join(ROOTFS_FILE),
        &out_dir.join(ROOTFS_FILE),
        false,
    )?;
    let elapsed = started.elapsed();
    tracing::info!(key = %key, cached, ?elapsed, "container root filesystem ready");
    progress(BuildProgress::Done { cached, elapsed });
    Ok(BuiltRootfs {
        rootfs,
        packages: manifest.packages,
        build_key: manifest.key,
    })
}

async fn build_key(
    guest: &Path,
    libs: &[PathBuf],
    busybox: &Package,
) -> Result<String, ImageError> {
    let guest = guest.to_path_buf();
    let libs = libs.to_vec();
    let package = busybox.pinned();
    blocking("hashing inputs", move || {
        let mut k = cache::KeyBuilder::default();
        k.add(
            "rootfs-recipe-version",
            &ROOTFS_RECIPE_VERSION.to_le_bytes(),
        )
        .add("recipe", ROOTFS_RECIPE.as_bytes())
        .add("init", initramfs::INIT_SCRIPT.as_bytes())
        .add("guest", cache::sha256_file(&guest)?.as_bytes())
        .add("package", package.as_bytes());
        for l in &libs {
            k.add("lib", l.to_string_lossy().as_bytes())
                .add("lib-sha256", cache::sha256_file(l)?.as_bytes());
        }
        Ok(k.finish())
    })
    .await
}

async fn build_fresh(
    key: &str,
    busybox_pkg: &Package,
    libs: &[PathBuf],
    opts: &BuildOptions,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<RootfsManifest, ImageError> {
    let busybox_deb = fetch(busybox_pkg, &opts.cache_dir.join("debs"), progress).await?;
    let tmp_dir = opts.cache_dir.join("tmp");
    let work = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(&tmp_dir)
        .map_err(ImageError::io(
            "creating a temporary directory in",
            &tmp_dir,
        ))?;
    let (busybox, applets) = unpack_busybox(
        busybox_pkg,
        &busybox_deb,
        &work.path().join("busybox"),
        progress,
    )
    .await?;

    progress(BuildProgress::BuildingRootfs);
    let stage = work.path().join("stage");
    std::fs::create_dir(&stage).map_err(ImageError::io("creating", &stage))?;
    let manifest = RootfsManifest {
        recipe: ROOTFS_RECIPE.to_string(),
        key: key.to_string(),
        packages: vec![busybox_pkg.pinned()],
    };
    let manifest = {
        let stage = stage.clone();
        let guest = opts.guest_binary.clone();
        let libs = libs.to_vec();
        blocking("building root filesystem", move || {
            let system = initramfs::System {
                busybox: &busybox,
                applets: &applets,
                guest_binary: &guest,
                libs: &libs,
            };
            write_rootfs(&system, &stage.join(ROOTFS_FILE))?;
            crate::seal_build(&stage, &manifest)?;
            Ok(manifest)
        })
        .await?
    };
    let target = opts.cache_dir.join("builds").join(key);
    if !cache::publish_dir(&stage, &target)? {
        tracing::debug!(key, "another builder published this build first");
    }
    Ok(manifest)
}

/// Writes the root filesystem of `system` to `path` (blocking).
fn write_rootfs(system: &initramfs::System<'_>, path: &Path) -> Result<(), ImageError> {
    let mut a = crate::cpio::Archive::new();
    initramfs::add_system(&mut a, system);
    tarball::write_archive(&a, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn rootfs_has_init_guest_busybox_and_no_devices_all_owned_by_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, body: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).expect("write");
            p
        };
        let busybox = file("busybox", b"bb");
        let guest = file("guest", b"guest");
        let libc = file("libc.so.6", b"libc");
        let applets = vec!["sbin/ip".to_string(), "bin/sh".to_string()];
        let system = initramfs::System {
            busybox: &busybox,
            applets: &applets,
            guest_binary: &guest,
            libs: std::slice::from_ref(&libc),
        };
        let out = dir.path().join(ROOTFS_FILE);
        write_rootfs(&system, &out).expect("write rootfs");

        let gz = flate2::read::GzDecoder::new(std::fs::File::open(&out).expect("open"));
        let mut ar = tar::Archive::new(gz);
        let mut seen = std::collections::BTreeMap::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let h = e.header().clone();
            let path = e.path().expect("path").to_string_lossy().into_owned();
            assert_eq!((h.uid().ok(), h.gid().ok()), (Some(0), Some(0)), "{path}");
            let kind = h.entry_type();
            assert!(
                kind.is_dir() || kind.is_file() || kind.is_symlink(),
                "{path} is {kind:?}"
            );
            let mut body = Vec::new();
            e.read_to_end(&mut body).expect("read");
            seen.insert(path, (kind, h.mode().expect("mode"), body));
        }
        let body = |p: &str| seen.get(p).map(|(_, _, b)| b.as_slice());
        assert_eq!(body("init"), Some(initramfs::INIT_SCRIPT.as_bytes()));
        assert_eq!(body(initramfs::GUEST_PATH), Some(&b"guest"[..]));
        assert_eq!(body("bin/busybox"), Some(&b"bb"[..]));
        let lib = libc.to_string_lossy();
        assert_eq!(body(lib.trim_start_matches('/')), Some(&b"libc"[..]));
        assert_eq!(
            seen.get("sbin/ip").map(|(k, _, _)| *k),
            Some(tar::EntryType::Symlink)
        );
        assert_eq!(seen.get("tmp").map(|(_, m, _)| *m), Some(0o1777));
        for d in ["proc", "sys", "dev", "run", "data", "root", "etc/skyvisor"] {
            assert_eq!(
                seen.get(d).map(|(k, _, _)| *k),
                Some(tar::EntryType::Directory),
                "{d}"
            );
        }
        assert!(!seen.keys().any(|p| p.starts_with("dev/")), "{seen:?}");
        assert!(!seen.contains_key(initramfs::MODULE_LIST_PATH));
        assert_eq!(body("etc/resolv.conf"), Some(&b""[..]));
        for f in ["etc/passwd", "etc/group", "etc/hosts"] {
            assert!(body(f).is_some_and(|b| !b.is_empty()), "{f}");
        }
    }

    #[tokio::test]
    async fn missing_guest_fails_early() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = BuildOptions::new(dir.path().join("cache"), dir.path().join("no-guest"));
        let err = build_rootfs(dir.path(), &opts, &|_| {})
            .await
            .expect_err("missing guest");
        assert!(matches!(err, ImageError::MissingFile { .. }), "{err}");
        assert!(!dir.path().join("cache").exists());
    }
}
