//! Builds Skyvisor's default guest image from Debian packages alone: the Debian
//! cloud kernel, a busybox initramfs running `skyvisor-guest`, and an empty ext4
//! base data disk (qcow2); the same busybox userland as a container root
//! filesystem ([`build_rootfs`]). Also imports OCI and docker-archive images
//! into a flattened root filesystem ([`import_oci`]) and unpacks root
//! filesystems for containers with shifted owners ([`unpack_rootfs`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), skyvisor_image::ImageError> {
//! use skyvisor_image::{BuildOptions, build, guest_binary_near_current_exe};
//! let guest = guest_binary_near_current_exe().expect("skyvisor-guest is installed next to us");
//! let opts = BuildOptions::new(BuildOptions::default_cache_dir(), guest);
//! let image = build("debian-busybox", "/var/lib/skyvisor/images".as_ref(), &opts, &|p| {
//!     eprintln!("{p}")
//! })
//! .await?;
//! println!("{} {} {}", image.kernel.display(), image.initrd.display(), image.disk.display());
//! # Ok(()) }
//! ```
//!
//! Finished builds are cached (keyed by recipe version, package versions, the guest
//! binary and its libraries, and the init script) and hard-linked into the output
//! directory, so a repeated build takes milliseconds. This crate must never install
//! anything on the host or write outside the cache and output directories (apt's
//! download directory is a private temporary one) or, when importing and
//! unpacking, outside the destination it is given.

mod apt;
mod cache;
mod cloud;
mod cmdline;
mod command;
mod cpio;
mod disk;
mod error;
mod initramfs;
mod libs;
mod modules;
mod oci;
mod rootfs;
mod rootfs_build;
mod tarball;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use cloud::{BuiltDisk, CLOUD_DISK_SIZE, CLOUD_RECIPE, CLOUD_USER, build_cloud_disk};
pub use cmdline::{BASE_CMDLINE, GuestKernelArgs, guest_cmdline};
pub use disk::DATA_LABEL;
pub use error::{ImageError, OciError};
pub use oci::{OciImport, import_oci};
pub use rootfs::unpack as unpack_rootfs;
pub use rootfs_build::{BuiltRootfs, ROOTFS_FILE, ROOTFS_RECIPE, build_rootfs};

use apt::Package;

/// Bump when the recipe's logic changes in a way the hashed inputs do not capture
/// (initramfs layout, module list, disk options).
const RECIPE_VERSION: u32 = 1;
/// The recipe name of the default guest.
pub const DEFAULT_RECIPE: &str = "debian-busybox";
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Default virtual size of the base data disk: 1 GiB.
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;
/// Builds kept in the cache (most recently used first).
pub(crate) const KEEP_BUILDS: usize = 4;
/// A finished build's description, in its cache directory.
pub(crate) const MANIFEST: &str = "manifest.json";
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initrd.img";

/// What a recipe makes, and so which function builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeKind {
    /// A kernel, an initramfs and a data disk: [`build`].
    KernelInitrd,
    /// One bootable disk with its own OS: [`build_cloud_disk`].
    Disk,
    /// A root filesystem tarball for containers: [`build_rootfs`].
    Rootfs,
}

/// A recipe the builder knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeInfo {
    /// Its name.
    pub name: &'static str,
    /// What it builds.
    pub description: &'static str,
    /// What it makes.
    pub kind: RecipeKind,
}

/// The recipes the builder knows.
pub fn recipes() -> Vec<RecipeInfo> {
    vec![
        RecipeInfo {
            name: DEFAULT_RECIPE,
            description: "Debian cloud kernel + busybox initramfs running skyvisor-guest, \
                          with an empty ext4 data disk",
            kind: RecipeKind::KernelInitrd,
        },
        RecipeInfo {
            name: CLOUD_RECIPE,
            description: "Debian 12 with systemd, OpenSSH, cloud-init and the QEMU guest agent, \
                          a bootable 2 GiB disk (user debian gets the VM's SSH keys)",
            kind: RecipeKind::Disk,
        },
        RecipeInfo {
            name: ROOTFS_RECIPE,
            description: "busybox root filesystem running skyvisor-guest, for containers",
            kind: RecipeKind::Rootfs,
        },
    ]
}

/// How to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Holds downloaded `.deb` files and finished builds; may be shared by
    /// concurrent builders.
    pub cache_dir: PathBuf,
    /// The `skyvisor-guest` executable to put in the image.
    pub guest_binary: PathBuf,
    /// Virtual size of the base data disk.
    pub disk_size_bytes: u64,
}

impl BuildOptions {
    /// Options with the default disk size.
    pub fn new(cache_dir: PathBuf, guest_binary: PathBuf) -> Self {
        BuildOptions {
            cache_dir,
            guest_binary,
            disk_size_bytes: DEFAULT_DISK_SIZE,
        }
    }

    /// `$XDG_CACHE_HOME/skyvisor`, else `$HOME/.cache/skyvisor`, else
    /// `/var/cache/skyvisor`.
    pub fn default_cache_dir() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(x).join("skyvisor");
        }
        if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(h).join(".cache/skyvisor");
        }
        PathBuf::from("/var/cache/skyvisor")
    }
}

/// A finished image, in the output directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltImage {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initrd.img`, gzip cpio).
    pub initrd: PathBuf,
    /// The qcow2 base data disk with an empty ext4 labelled `skyvisor-data`. Its
    /// name carries its own key (`base-<key>.qcow2`) and an existing one is never
    /// replaced, because overlays refer to their base by path. Use it read-only,
    /// as a backing file.
    pub disk: PathBuf,
    /// The base kernel command line; append [`GuestKernelArgs`] with
    /// [`BuiltImage::cmdline_with`].
    pub cmdline: String,
    /// The Debian packages used, as `name=version`.
    pub packages: Vec<String>,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// The build's cache key (changes whenever any input changes).
    pub build_key: String,
}

impl BuiltImage {
    /// The full kernel command line for a guest with `args`.
    pub fn cmdline_with(&self, args: &GuestKernelArgs) -> Result<String, ImageError> {
        guest_cmdline(&self.cmdline, args)
    }
}

/// Progress of a build, reported through the callback of [`build`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildProgress {
    /// Asking apt which package versions to use.
    Resolving,
    /// A finished build with the same inputs is in the cache.
    CacheHit {
        /// The build key.
        key: String,
    },
    /// Downloading a package.
    Downloading {
        /// `name=version`.
        package: String,
    },
    /// A package is already in the cache.
    CachedPackage {
        /// `name=version`.
        package: String,
    },
    /// Unpacking a package.
    Extracting {
        /// `name=version`.
        package: String,
    },
    /// A step of bootstrapping a Debian system (`mmdebstrap`'s own words).
    Bootstrapping {
        /// What it does.
        step: String,
    },
    /// Writing the initramfs.
    BuildingInitramfs,
    /// Writing a container root filesystem.
    BuildingRootfs,
    /// Creating the base data disk.
    MakingDisk,
    /// Finished.
    Done {
        /// Whether the build came from the cache.
        cached: bool,
        /// How long it took.
        elapsed: Duration,
    },
}

impl fmt::Display for BuildProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildProgress::Resolving => f.write_str("resolving package versions"),
            BuildProgress::CacheHit { key } => {
                write!(f, "using cached build {}", key.get(..12).unwrap_or(key))
            }
            BuildProgress::Downloading { package } => write!(f, "downloading {package}"),
            BuildProgress::CachedPackage { package } => write!(f, "using cached {package}"),
            BuildProgress::Extracting { package } => write!(f, "extracting {package}"),
            BuildProgress::Bootstrapping { step } => write!(f, "bootstrapping: {step}"),
            BuildProgress::BuildingInitramfs => f.write_str("building initramfs"),
            BuildProgress::BuildingRootfs => f.write_str("building root filesystem"),
            BuildProgress::MakingDisk => f.write_str("making base disk"),
            BuildProgress::Done { cached, elapsed } => write!(
                f,
                "done in {:.1}s{}",
                elapsed.as_secs_f64(),
                if *cached { " (cached)" } else { "" }
            ),
        }
    }
}

/// Finds `skyvisor-guest` next to the running executable, one directory up (test
/// binaries live in `target/<profile>/deps`), or where the Debian package puts
/// it (`/usr/lib/skyvisor/` beside `/usr/bin/skyvisor`).
pub fn guest_binary_near_current_exe() -> Option<PathBuf> {
    guest_binary_near(&std::env::current_exe().ok()?)
}

fn guest_binary_near(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    let packaged = dir.parent().map(|d| d.join("lib/skyvisor"));
    [
        Some(dir.to_path_buf()),
        dir.parent().map(Path::to_path_buf),
        packaged,
    ]
    .into_iter()
    .flatten()
    .map(|d| d.join("skyvisor-guest"))
    .find(|p| p.is_file())
}

/// What a finished build records about itself.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Manifest {
    recipe: String,
    key: String,
    kernel_version: String,
    cmdline: String,
    packages: Vec<String>,
    modules: Vec<String>,
}

fn read_manifest<M: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<M>, ImageError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ImageError::Manifest {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ImageError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

async fn blocking<T: Send + 'static>(
    step: &'static str,
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Task {
            step,
            detail: e.to_string(),
        })?
}

/// Builds (or takes from the cache) image `recipe` and places its files in
/// `out_dir`. Progress is reported through `progress`.
pub async fn build(
    recipe: &str,
    out_dir: &Path,
    opts: &BuildOptions,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<BuiltImage, ImageError> {
    if !recipes()
        .iter()
        .any(|r| r.name == recipe && r.kind == RecipeKind::KernelInitrd)
    {
        return Err(ImageError::UnknownRecipe {
            name: recipe.to_string(),
            known: recipes()
                .iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
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
    let packages = apt::resolve_memoised(
        &opts.cache_dir.join("resolved.json"),
        KERNEL_METAPACKAGE,
        &[BUSYBOX_PACKAGE],
    )
    .await?;
    let [kernel_pkg, busybox_pkg] =
        <[Package; 2]>::try_from(packages.clone()).map_err(|_| ImageError::PackageResolve {
            package: BUSYBOX_PACKAGE.to_string(),
            command: "apt-cache show".to_string(),
            detail: "unexpected number of packages".to_string(),
        })?;
    let libs = libs::shared_libraries(&opts.guest_binary).await?;

    let key = {
        let guest = opts.guest_binary.clone();
        let libs = libs.clone();
        let packages: Vec<String> = packages.iter().map(Package::pinned).collect();
        let recipe = recipe.to_string();
        blocking("hashing inputs", move || {
            let mut k = cache::KeyBuilder::default();
            k.add("recipe-version", &RECIPE_VERSION.to_le_bytes())
                .add("recipe", recipe.as_bytes())
                .add("init", initramfs::INIT_SCRIPT.as_bytes())
                .add("modules", modules::GUEST_MODULES.join(",").as_bytes())
                .add("cmdline", BASE_CMDLINE.as_bytes())
                .add("guest", cache::sha256_file(&guest)?.as_bytes());
            for p in &packages {
                k.add("package", p.as_bytes());
            }
            for l in &libs {
                k.add("lib", l.to_string_lossy().as_bytes())
                    .add("lib-sha256", cache::sha256_file(l)?.as_bytes());
            }
            Ok(k.finish())
        })
        .await?
    };

    let builds_dir = opts.cache_dir.join("builds");
    let tmp_dir = opts.cache_dir.join("tmp");
    for d in [&builds_dir, &tmp_dir, &out_dir.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(ImageError::io("creating", d))?;
    }
    let build_dir = builds_dir.join(&key);
    let manifest_path = build_dir.join(MANIFEST);
    let cached_manifest = cached_build(&build_dir, &[KERNEL_FILE, INITRD_FILE], |m: &Manifest| {
        m.key == key
    });
    let (manifest, cached) = match cached_manifest {
        Some(m) => {
            progress(BuildProgress::CacheHit { key: key.clone() });
            cache::touch(&manifest_path);
            (m, true)
        }
        None => {
            let m = build_fresh(
                &key,
                recipe,
                &kernel_pkg,
                &busybox_pkg,
                &libs,
                opts,
                progress,
            )
            .await?;
            cache::prune(&builds_dir, &tmp_dir, KEEP_BUILDS, &build_dir);
            (m, false)
        }
    };

    let disk = ensure_disk(opts, progress).await?;
    let kernel = cache::link_into(
        &build_dir.join(KERNEL_FILE),
        &out_dir.join(KERNEL_FILE),
        false,
    )?;
    let initrd = cache::link_into(
        &build_dir.join(INITRD_FILE),
        &out_dir.join(INITRD_FILE),
        false,
    )?;
    let disk_name = disk
        .file_name()
        .map(|n| format!("base-{}", n.to_string_lossy()))
        .unwrap_or_else(|| "base.qcow2".to_string());
    let disk = cache::link_into(&disk, &out_dir.join(disk_name), true)?;
    let elapsed = started.elapsed();
    tracing::info!(key = %key, cached, ?elapsed, "guest image ready");
    progress(BuildProgress::Done { cached, elapsed });
    Ok(BuiltImage {
        kernel,
        initrd,
        disk,
        cmdline: manifest.cmdline,
        packages: manifest.packages,
        kernel_version: manifest.kernel_version,
        build_key: manifest.key,
    })
}

/// The manifest of the finished build in `build_dir` if it has all of `files`
/// and `valid` accepts it. A damaged or incomplete entry is removed, to be
/// rebuilt rather than trusted.
fn cached_build<M: serde::de::DeserializeOwned>(
    build_dir: &Path,
    files: &[&str],
    valid: impl FnOnce(&M) -> bool,
) -> Option<M> {
    let complete = files.iter().all(|f| build_dir.join(f).is_file());
    match read_manifest::<M>(&build_dir.join(MANIFEST)) {
        Ok(Some(m)) if complete && valid(&m) => Some(m),
        Ok(None) => None,
        Ok(Some(_)) | Err(_) => {
            tracing::warn!(build = %build_dir.display(), "discarding incomplete cached build");
            let _ = std::fs::remove_dir_all(build_dir);
            None
        }
    }
}

/// The cached base disk for `opts.disk_size_bytes`, made if missing. Keyed apart
/// from the build so a new guest binary does not change the base under existing
/// overlays.
async fn ensure_disk(
    opts: &BuildOptions,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<PathBuf, ImageError> {
    let mut k = cache::KeyBuilder::default();
    k.add("recipe-version", &RECIPE_VERSION.to_le_bytes())
        .add("label", DATA_LABEL.as_bytes())
        .add("size", &opts.disk_size_bytes.to_le_bytes())
        .add("mkfs", disk::mkfs_version().await?.as_bytes());
    let key = k.finish();
    let disks = opts.cache_dir.join("disks");
    std::fs::create_dir_all(&disks).map_err(ImageError::io("creating", &disks))?;
    let target = disks.join(format!("{}.qcow2", key.get(..16).unwrap_or(&key)));
    if target.is_file() {
        return Ok(target);
    }
    progress(BuildProgress::MakingDisk);
    let work = tempfile::Builder::new()
        .prefix("disk-")
        .tempdir_in(opts.cache_dir.join("tmp"))
        .map_err(ImageError::io(
            "creating a temporary directory in",
            opts.cache_dir.join("tmp"),
        ))?;
    let staged = work.path().join("disk.qcow2");
    disk::make_base_disk(&staged, &work.path().join("disk.raw"), opts.disk_size_bytes).await?;
    cache::make_read_only(work.path())?;
    cache::publish_file(&staged, &target)?;
    Ok(target)
}

/// Finishes a build staged in `stage`: writes its manifest and makes it
/// read-only, ready to publish (blocking).
pub(crate) fn seal_build(stage: &Path, manifest: &impl serde::Serialize) -> Result<(), ImageError> {
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| ImageError::Manifest {
        path: stage.join(MANIFEST),
        detail: e.to_string(),
    })?;
    std::fs::write(stage.join(MANIFEST), json)
        .map_err(ImageError::io("writing", stage.join(MANIFEST)))?;
    cache::make_read_only(stage)
}

/// Finds exactly one directory below `root/{lib,usr/lib}/modules`.
fn kernel_release(root: &Path) -> Result<(String, PathBuf), ImageError> {
    for base in ["lib/modules", "usr/lib/modules"] {
        let dir = root.join(base);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        if let Some(e) = entries.flatten().find(|e| e.path().is_dir()) {
            return Ok((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
    }
    Err(ImageError::MissingFile {
        what: "kernel modules directory".to_string(),
        path: root.join("lib/modules"),
    })
}

fn first_existing(root: &Path, candidates: &[&str], what: &str) -> Result<PathBuf, ImageError> {
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::MissingFile {
            what: what.to_string(),
            path: root.join(candidates.first().copied().unwrap_or_default()),
        })
}

/// Extracts the busybox package `deb` into `dir`; returns the busybox
/// executable and its applet paths (`busybox --list-full`).
async fn unpack_busybox(
    pkg: &Package,
    deb: &Path,
    dir: &Path,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<(PathBuf, Vec<String>), ImageError> {
    progress(BuildProgress::Extracting {
        package: pkg.pinned(),
    });
    apt::extract(deb, dir).await?;
    let busybox = first_existing(dir, &["bin/busybox", "usr/bin/busybox"], "busybox")?;
    let applets: Vec<String> = command::run(&busybox.to_string_lossy(), &["--list-full"], None)
        .await?
        .stdout
        .lines()
        .map(str::to_string)
        .collect();
    Ok((busybox, applets))
}

async fn fetch(
    pkg: &Package,
    debs: &Path,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<PathBuf, ImageError> {
    if debs.join(pkg.deb_file_name()).is_file() {
        progress(BuildProgress::CachedPackage {
            package: pkg.pinned(),
        });
    } else {
        progress(BuildProgress::Downloading {
            package: pkg.pinned(),
        });
    }
    apt::download(pkg, debs).await
}

/// The guest kernel and the static busybox the default recipe is made of,
/// unpacked from the same Debian packages into `cache_dir` (kept there, so a
/// second call is a lookup). For tools and tests that boot a bare kernel with
/// an initramfs of their own, such as the accelerator probe's tests, on a host
/// with no kernel of its own in `/boot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestParts {
    /// The kernel image (`vmlinuz-<release>`).
    pub kernel: PathBuf,
    /// The static busybox executable.
    pub busybox: PathBuf,
}

/// Fetches (or finds in `cache_dir`) the parts described by [`GuestParts`].
pub async fn guest_parts(cache_dir: &Path) -> Result<GuestParts, ImageError> {
    std::fs::create_dir_all(cache_dir).map_err(ImageError::io("creating", cache_dir))?;
    let packages = apt::resolve_memoised(
        &cache_dir.join("resolved.json"),
        KERNEL_METAPACKAGE,
        &[BUSYBOX_PACKAGE],
    )
    .await?;
    let [kernel_pkg, busybox_pkg] =
        <[Package; 2]>::try_from(packages).map_err(|_| ImageError::PackageResolve {
            package: BUSYBOX_PACKAGE.to_string(),
            command: "apt-cache show".to_string(),
            detail: "unexpected number of packages".to_string(),
        })?;
    let debs = cache_dir.join("debs");
    let silent = |_: BuildProgress| {};
    let parts_dir = cache_dir.join("parts");
    let mut unpacked = Vec::new();
    for pkg in [&kernel_pkg, &busybox_pkg] {
        let dir = parts_dir.join(pkg.deb_file_name());
        if !dir.is_dir() {
            let deb = fetch(pkg, &debs, &silent).await?;
            // Unpacked aside and renamed, so a concurrent caller never sees
            // half a package.
            let stage = parts_dir.join(format!(".stage-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&stage);
            apt::extract(&deb, &stage).await?;
            if let Err(source) = std::fs::rename(&stage, &dir)
                && !dir.is_dir()
            {
                return Err(ImageError::Io {
                    op: "renaming into",
                    path: dir,
                    source,
                });
            }
            let _ = std::fs::remove_dir_all(&stage);
        }
        unpacked.push(dir);
    }
    let (kernel_version, _) = kernel_release(&unpacked[0])?;
    Ok(GuestParts {
        kernel: first_existing(
            &unpacked[0],
            &[&format!("boot/vmlinuz-{kernel_version}")],
            "kernel image",
        )?,
        busybox: first_existing(&unpacked[1], &["bin/busybox", "usr/bin/busybox"], "busybox")?,
    })
}

async fn build_fresh(
    key: &str,
    recipe: &str,
    kernel_pkg: &Package,
    busybox_pkg: &Package,
    libs: &[PathBuf],
    opts: &BuildOptions,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<Manifest, ImageError> {
    let debs = opts.cache_dir.join("debs");
    let kernel_deb = fetch(kernel_pkg, &debs, progress).await?;
    let busybox_deb = fetch(busybox_pkg, &debs, progress).await?;

    let tmp_dir = opts.cache_dir.join("tmp");
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&tmp_dir)
        .map_err(ImageError::io(
            "creating a temporary directory in",
            &tmp_dir,
        ))?;
    let kroot = work.path().join("kernel");
    let broot = work.path().join("busybox");
    progress(BuildProgress::Extracting {
        package: kernel_pkg.pinned(),
    });
    apt::extract(&kernel_deb, &kroot).await?;
    let (busybox, applets) = unpack_busybox(busybox_pkg, &busybox_deb, &broot, progress).await?;

    let (kernel_version, module_dir) = kernel_release(&kroot)?;
    let vmlinuz = first_existing(
        &kroot,
        &[&format!("boot/vmlinuz-{kernel_version}")],
        "kernel image",
    )?;

    progress(BuildProgress::BuildingInitramfs);
    let stage = work.path().join("stage");
    std::fs::create_dir(&stage).map_err(ImageError::io("creating", &stage))?;
    let manifest = {
        let stage = stage.clone();
        let guest = opts.guest_binary.clone();
        let libs = libs.to_vec();
        let kernel_version = kernel_version.clone();
        let manifest = Manifest {
            recipe: recipe.to_string(),
            key: key.to_string(),
            kernel_version: kernel_version.clone(),
            cmdline: BASE_CMDLINE.to_string(),
            packages: vec![kernel_pkg.pinned(), busybox_pkg.pinned()],
            modules: Vec::new(),
        };
        blocking("building initramfs", move || {
            let index = modules::ModuleIndex::scan(&module_dir)?;
            let mods = modules::resolve(&index, modules::GUEST_MODULES, &kernel_version)?;
            let inputs = initramfs::Inputs {
                system: initramfs::System {
                    busybox: &busybox,
                    applets: &applets,
                    guest_binary: &guest,
                    libs: &libs,
                },
                modules: &mods,
                kernel_version: &kernel_version,
            };
            initramfs::write_gz(&initramfs::archive(&inputs), &stage.join(INITRD_FILE))?;
            let kernel_out = stage.join(KERNEL_FILE);
            std::fs::copy(&vmlinuz, &kernel_out).map_err(ImageError::io("copying", &vmlinuz))?;
            let manifest = Manifest {
                modules: mods.into_iter().map(|(n, _)| n).collect(),
                ..manifest
            };
            seal_build(&stage, &manifest)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_guest_binary_beside_or_above_the_executable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deps = dir.path().join("debug/deps");
        std::fs::create_dir_all(&deps).expect("mkdir");
        assert_eq!(guest_binary_near(&deps.join("test-bin")), None);
        let above = dir.path().join("debug/skyvisor-guest");
        std::fs::write(&above, b"x").expect("write");
        assert_eq!(
            guest_binary_near(&deps.join("test-bin")),
            Some(above.clone())
        );
        assert_eq!(
            guest_binary_near(&dir.path().join("debug/skyvisor")),
            Some(above)
        );
        let beside = deps.join("skyvisor-guest");
        std::fs::write(&beside, b"x").expect("write");
        assert_eq!(guest_binary_near(&deps.join("test-bin")), Some(beside));
    }

    #[test]
    fn lists_the_default_recipe() {
        let r = recipes();
        assert!(r.iter().any(|r| r.name == DEFAULT_RECIPE));
    }

    #[tokio::test]
    async fn unknown_recipe_and_missing_guest_fail_early() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = BuildOptions::new(dir.path().join("cache"), dir.path().join("no-guest"));
        let err = build("nope", dir.path(), &opts, &|_| {})
            .await
            .expect_err("unknown");
        assert!(err.to_string().contains("debian-busybox"), "{err}");
        let err = build(DEFAULT_RECIPE, dir.path(), &opts, &|_| {})
            .await
            .expect_err("missing guest");
        assert!(matches!(err, ImageError::MissingFile { .. }), "{err}");
        assert!(
            !dir.path().join("cache").exists(),
            "nothing created on early failure"
        );
    }

    #[test]
    fn finds_kernel_release_in_either_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(kernel_release(dir.path()).is_err());
        std::fs::create_dir_all(
            dir.path()
                .join("usr/lib/modules/6.12.0-1-cloud-amd64/kernel"),
        )
        .expect("mkdir");
        let (release, path) = kernel_release(dir.path()).expect("found");
        assert_eq!(release, "6.12.0-1-cloud-amd64");
        assert!(path.ends_with("usr/lib/modules/6.12.0-1-cloud-amd64"));
    }

    #[test]
    fn progress_reads_well() {
        assert_eq!(
            BuildProgress::Downloading {
                package: "busybox-static=1:1.35".into()
            }
            .to_string(),
            "downloading busybox-static=1:1.35"
        );
        let done = BuildProgress::Done {
            cached: true,
            elapsed: Duration::from_millis(300),
        };
        assert_eq!(done.to_string(), "done in 0.3s (cached)");
    }
}
