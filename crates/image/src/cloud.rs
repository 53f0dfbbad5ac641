//! The full-OS recipe, `debian-12`: a bootable Debian 12 disk (qcow2) with
//! systemd, the cloud kernel, OpenSSH, cloud-init and the QEMU guest agent,
//! made from Debian packages alone.
//!
//! The root file system comes from `mmdebstrap` (packages from the host's own
//! Debian mirror); `mkfs.ext4 -d` writes it into the first partition of a
//! raw disk without mounting anything, and GRUB's BIOS boot code (made by
//! `grub-mkimage` inside the new system) goes into the MBR and the gap
//! before that partition, as `grub-install` would put it. The disk boots
//! with the firmware like any cloud image, so a user's imported image and
//! this one take the same path through Skyvisor. cloud-init reads a NoCloud
//! seed; the kernel comes from the `/vmlinuz` link, so a kernel upgrade in
//! the guest boots.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apt::Package;
use crate::cache::{self, KeyBuilder};
use crate::{BuildOptions, BuildProgress, ImageError, command};

/// The recipe's name.
pub const CLOUD_RECIPE: &str = "debian-12";
/// The user cloud-init makes on Debian (`default_user` in its `cloud.cfg`),
/// who gets the VM's SSH keys.
pub const CLOUD_USER: &str = "debian";
/// Bump when the recipe's logic changes in a way the hashed inputs do not
/// capture.
const CLOUD_RECIPE_VERSION: u32 = 3;
/// Virtual size of the disk; cloud-init grows the partition and file system
/// to a VM's disk at first boot.
pub const CLOUD_DISK_SIZE: u64 = 2 << 30;
/// Where the root partition starts (sectors of 512 bytes): 1 MiB, leaving
/// room for GRUB's core image before it.
const PARTITION_START: u64 = 2048;
const SECTOR: u64 = 512;
/// The packages asked for; apt adds what they depend on.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    // logind needs it: without it neither the ACPI power button nor the
    // guest agent's `shutdown` (which asks logind) powers the guest off.
    "dbus",
    "udev",
    "linux-image-cloud-amd64",
    "openssh-server",
    "cloud-init",
    "cloud-guest-utils",
    "qemu-guest-agent",
    "sudo",
    "ifupdown",
    "iproute2",
    "netbase",
    "e2fsprogs",
    "grub-pc-bin",
    "ca-certificates",
];
/// GRUB modules built into the core image: read an MBR partition with
/// ext4, load Linux, run `grub.cfg`.
const GRUB_MODULES: &[&str] = &[
    "biosdisk",
    "part_msdos",
    "ext2",
    "normal",
    "linux",
    "boot",
    "configfile",
    "echo",
    "test",
];
/// cloud-init settings of the image: the NoCloud seed Skyvisor attaches,
/// no locale generation (the image carries no locales), and password
/// login off unless user data turns it on.
const CLOUD_CFG: &str = "\
# Written by Skyvisor's debian-12 recipe.
datasource_list: [ NoCloud, None ]
locale: false
ssh_pwauth: false
";
const DISK_FILE: &str = "disk.qcow2";

/// A finished full-OS image, in the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltDisk {
    /// The bootable qcow2 disk (`disk-<key>.qcow2`; never replaced, since
    /// overlays refer to it by path).
    pub disk: PathBuf,
    /// The Debian packages asked for, as `name=version`.
    pub packages: Vec<String>,
    /// The user that gets the VM's SSH keys.
    pub ssh_user: &'static str,
    /// The build's cache key.
    pub build_key: String,
}

/// Builds (or takes from the cache) the `debian-12` disk and links it into
/// `out_dir`. Needs root (`mmdebstrap` in root mode) and the Debian mirror.
pub async fn build_cloud_disk(
    out_dir: &Path,
    opts: &BuildOptions,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<BuiltDisk, ImageError> {
    let started = Instant::now();
    progress(BuildProgress::Resolving);
    fs::create_dir_all(&opts.cache_dir).map_err(ImageError::io("creating", &opts.cache_dir))?;
    let packages: Vec<String> = crate::apt::candidates(PACKAGES)
        .await?
        .into_iter()
        .map(|(p, _)| Package::pinned(&p))
        .collect();
    let mirrors = debian_mirrors(Path::new("/etc/apt"));
    let key = {
        let mut k = KeyBuilder::default();
        k.add("recipe-version", &CLOUD_RECIPE_VERSION.to_le_bytes())
            .add("recipe", CLOUD_RECIPE.as_bytes())
            .add("cloud-cfg", CLOUD_CFG.as_bytes())
            .add("grub-modules", GRUB_MODULES.join(",").as_bytes())
            .add("size", &CLOUD_DISK_SIZE.to_le_bytes());
        for m in &mirrors {
            k.add("mirror", m.as_bytes());
        }
        for p in &packages {
            k.add("package", p.as_bytes());
        }
        k.finish()
    };
    let builds_dir = opts.cache_dir.join("builds");
    let tmp_dir = opts.cache_dir.join("tmp");
    for d in [&builds_dir, &tmp_dir, &out_dir.to_path_buf()] {
        fs::create_dir_all(d).map_err(ImageError::io("creating", d))?;
    }
    let build_dir = builds_dir.join(&key);
    let cached = build_dir.join(DISK_FILE).is_file() && build_dir.join(crate::MANIFEST).is_file();
    if cached {
        progress(BuildProgress::CacheHit { key: key.clone() });
        cache::touch(&build_dir.join(DISK_FILE));
    } else {
        if build_dir.exists() {
            // Incomplete (no manifest): rebuilt rather than trusted.
            tracing::warn!(build = %build_dir.display(), "discarding incomplete cached build");
            let _ = fs::remove_dir_all(&build_dir);
        }
        let stage = tmp_dir.join(format!("{key}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&stage);
        fs::create_dir_all(&stage).map_err(ImageError::io("creating", &stage))?;
        let result = build_fresh(&key, &stage, &mirrors, opts, progress).await;
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&stage);
            return Err(e);
        }
        // Another server sharing the cache may have published the same
        // build meanwhile; `publish_dir` then keeps theirs.
        cache::make_read_only(&stage)?;
        cache::publish_dir(&stage, &build_dir)?;
        cache::prune(&builds_dir, &tmp_dir, crate::KEEP_BUILDS, &build_dir);
    }
    let disk = cache::link_into(
        &build_dir.join(DISK_FILE),
        &out_dir.join(format!("disk-{}.qcow2", key.get(..16).unwrap_or(&key))),
        true,
    )?;
    let elapsed = started.elapsed();
    tracing::info!(key = %key, cached, ?elapsed, "full-OS image ready");
    progress(BuildProgress::Done { cached, elapsed });
    Ok(BuiltDisk {
        disk,
        packages,
        ssh_user: CLOUD_USER,
        build_key: key,
    })
}

/// Bootstraps the system into `stage/rootfs`, writes it to a bootable raw
/// disk and converts that to `stage/disk.qcow2`; only that file is left.
async fn build_fresh(
    key: &str,
    stage: &Path,
    mirrors: &[String],
    opts: &BuildOptions,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<(), ImageError> {
    let rootfs = stage.join("rootfs");
    let debs = opts.cache_dir.join("debs-debian-12");
    fs::create_dir_all(&debs).map_err(ImageError::io("creating", &debs))?;
    let grub = format!(
        "chroot \"$1\" grub-mkimage -O i386-pc -o /boot/grub/core.img -p '(hd0,msdos1)/boot/grub' {}",
        GRUB_MODULES.join(" ")
    );
    let mut args: Vec<String> = vec![
        "--mode=root".into(),
        "--variant=apt".into(),
        format!("--include={}", PACKAGES.join(",")),
        // Downloaded packages are kept for the next build (mmdebstrap's
        // documented cache recipe), and none stay in the image.
        "--skip=download/empty".into(),
        format!(
            "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ && cp -a {}/. \"$1\"/var/cache/apt/archives/",
            shell_quote(&debs)
        ),
        "--customize-hook=mkdir -p \"$1\"/boot/grub".into(),
        format!("--customize-hook={grub}"),
        format!(
            "--customize-hook=cp -a \"$1\"/var/cache/apt/archives/*.deb {}/ ; rm -f \"$1\"/var/cache/apt/archives/*.deb",
            shell_quote(&debs)
        ),
        "bookworm".into(),
        rootfs.to_string_lossy().into_owned(),
    ];
    args.extend(mirrors.iter().cloned());
    let step = |line: &str| {
        if let Some(msg) = line.strip_prefix("I: ") {
            progress(BuildProgress::Bootstrapping {
                step: msg.chars().take(100).collect(),
            });
        }
    };
    if !crate::apt::is_root() {
        return Err(ImageError::MissingFile {
            what: "root privileges (mmdebstrap builds the debian-12 image as root)".into(),
            path: rootfs,
        });
    }
    command::run_streaming("mmdebstrap", &args, &step).await?;
    let fs_uuid = uuid_from_key(key);
    configure_tree(&rootfs, &fs_uuid)?;
    progress(BuildProgress::MakingDisk);
    let raw = stage.join("disk.raw");
    let fs_bytes = CLOUD_DISK_SIZE - PARTITION_START * SECTOR;
    {
        let f = fs::File::create(&raw).map_err(ImageError::io("creating", &raw))?;
        f.set_len(CLOUD_DISK_SIZE)
            .map_err(ImageError::io("sizing", &raw))?;
    }
    let offset = format!("offset={}", PARTITION_START * SECTOR);
    let raw_s = raw.to_string_lossy().into_owned();
    let rootfs_s = rootfs.to_string_lossy().into_owned();
    let blocks = format!("{}k", fs_bytes / 1024);
    command::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "skyvisor-root",
            "-U",
            &fs_uuid,
            "-E",
            &offset,
            "-d",
            &rootfs_s,
            &raw_s,
            &blocks,
        ],
        None,
    )
    .await?;
    let core = rootfs.join("boot/grub/core.img");
    let boot = rootfs.join("usr/lib/grub/i386-pc/boot.img");
    write_boot_sectors(&raw, &boot, &core, key)?;
    let _ = fs::remove_dir_all(&rootfs);
    let qcow = stage.join(DISK_FILE);
    command::run(
        "qemu-img",
        &["convert", "-O", "qcow2", &raw_s, &qcow.to_string_lossy()],
        None,
    )
    .await?;
    fs::remove_file(&raw).map_err(ImageError::io("removing", &raw))?;
    // Written last: a build directory with a manifest is complete (the
    // cache's rule, which concurrent builders rely on).
    let manifest = stage.join(crate::MANIFEST);
    let text = serde_json::json!({"recipe": CLOUD_RECIPE, "key": key, "file": DISK_FILE});
    fs::write(&manifest, format!("{text:#}\n")).map_err(ImageError::io("writing", &manifest))?;
    Ok(())
}

/// The ifupdown hook that writes `/etc/resolv.conf` from an interface's
/// `dns-nameservers` and `dns-search` (ifupdown passes them as
/// `IF_DNS_*`), which cloud-init's network configuration sets: what the
/// resolvconf package does, without a second resolver manager.
const RESOLV_HOOK: &str = "#!/bin/sh
# Written by Skyvisor's debian-12 recipe: /etc/resolv.conf from the
# interface's dns-nameservers and dns-search options.
[ -n \"$IF_DNS_NAMESERVERS\" ] || exit 0
tmp=/etc/resolv.conf.skyvisor.$$
{
    for ns in $IF_DNS_NAMESERVERS; do echo \"nameserver $ns\"; done
    [ -n \"$IF_DNS_SEARCH\" ] && echo \"search $IF_DNS_SEARCH\"
    echo 'options timeout:2 attempts:2'
} >\"$tmp\" && mv -f \"$tmp\" /etc/resolv.conf
";

/// The files of the image Skyvisor writes itself: the boot menu, fstab,
/// cloud-init's settings, the resolver hook; host keys are removed so that every VM makes its
/// own at first boot.
fn configure_tree(rootfs: &Path, fs_uuid: &str) -> Result<(), ImageError> {
    let write = |rel: &str, text: &str| -> Result<(), ImageError> {
        let path = rootfs.join(rel);
        fs::write(&path, text).map_err(ImageError::io("writing", &path))
    };
    write(
        "boot/grub/grub.cfg",
        &format!(
            "# Written by Skyvisor's debian-12 recipe.\n\
             set timeout=0\n\
             linux /vmlinuz root=UUID={fs_uuid} ro console=ttyS0 net.ifnames=0\n\
             initrd /initrd.img\n\
             boot\n"
        ),
    )?;
    write(
        "etc/fstab",
        &format!("UUID={fs_uuid} / ext4 defaults,errors=remount-ro 0 1\n"),
    )?;
    write("etc/cloud/cloud.cfg.d/90_skyvisor.cfg", CLOUD_CFG)?;
    write("etc/hostname", "localhost\n")?;
    // The build host's resolver must not stay in the image: the network
    // configuration's (cloud-init's dns-nameservers, the gateway's DNS
    // server) is written at boot by an ifupdown hook, as resolvconf would.
    let resolv = rootfs.join("etc/resolv.conf");
    if fs::symlink_metadata(&resolv).is_ok() {
        fs::remove_file(&resolv).map_err(ImageError::io("removing", &resolv))?;
    }
    write(
        "etc/resolv.conf",
        "# Written at boot from the network configuration (/etc/network/if-up.d/skyvisor-resolv).\n",
    )?;
    write("etc/network/if-up.d/skyvisor-resolv", RESOLV_HOOK)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let hook = rootfs.join("etc/network/if-up.d/skyvisor-resolv");
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755))
            .map_err(ImageError::io("making executable", &hook))?;
    }
    let ssh = rootfs.join("etc/ssh");
    for e in fs::read_dir(&ssh).map_err(ImageError::io("listing", &ssh))? {
        let e = e.map_err(ImageError::io("listing", &ssh))?;
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(e.path()).map_err(ImageError::io("removing", e.path()))?;
        }
    }
    Ok(())
}

/// Writes GRUB's boot sector and core image: the boot code into the MBR
/// (with a partition table holding one bootable Linux partition), the core
/// image right after it. GRUB's boot sector loads the core image from
/// sector 1 by default, and the core image's own block list, as
/// `grub-mkimage` writes it, covers the rest of it from sector 2.
fn write_boot_sectors(raw: &Path, boot: &Path, core: &Path, key: &str) -> Result<(), ImageError> {
    let boot_img = fs::read(boot).map_err(ImageError::io("reading", boot))?;
    let core_img = fs::read(core).map_err(ImageError::io("reading", core))?;
    let max_core = (PARTITION_START - 1) * SECTOR;
    if boot_img.len() != SECTOR as usize || core_img.len() as u64 > max_core {
        return Err(ImageError::MissingFile {
            what: format!(
                "a 512-byte GRUB boot.img and a core.img of at most {max_core} bytes (got {} and {})",
                boot_img.len(),
                core_img.len()
            ),
            path: core.to_path_buf(),
        });
    }
    let mbr = mbr(&boot_img, disk_signature(key));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .map_err(ImageError::io("opening", raw))?;
    f.write_all(&mbr).map_err(ImageError::io("writing", raw))?;
    f.seek(SeekFrom::Start(SECTOR))
        .map_err(ImageError::io("seeking", raw))?;
    f.write_all(&core_img)
        .map_err(ImageError::io("writing", raw))?;
    f.sync_all().map_err(ImageError::io("syncing", raw))
}

/// A master boot record: `boot_img`'s code (its first 440 bytes), a disk
/// signature, and one active Linux partition from [`PARTITION_START`] to
/// the end of the disk.
fn mbr(boot_img: &[u8], signature: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    let code = boot_img.get(..440).unwrap_or_default();
    m[..code.len()].copy_from_slice(code);
    m[440..444].copy_from_slice(&signature.to_le_bytes());
    let sectors = (CLOUD_DISK_SIZE / SECTOR - PARTITION_START) as u32;
    // Status (active), CHS start (unused: LBA), type 0x83 (Linux), CHS end,
    // LBA start, sector count.
    let mut entry = [0u8; 16];
    entry[0] = 0x80;
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = 0x83;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&(PARTITION_START as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    m[446..462].copy_from_slice(&entry);
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// A file system UUID made from the build key (one per build).
fn uuid_from_key(key: &str) -> String {
    let h: String = key
        .chars()
        .filter(char::is_ascii_hexdigit)
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect();
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn disk_signature(key: &str) -> u32 {
    u32::from_str_radix(key.get(..8).unwrap_or("5eed0001"), 16).unwrap_or(0x5eed_0001)
}

/// The host's Debian mirrors as apt lines for `bookworm`, its updates and
/// its security suite: the same servers the host installs from (they are
/// the only ones these hosts may reach), else Debian's defaults.
pub(crate) fn debian_mirrors(apt_dir: &Path) -> Vec<String> {
    let mut text = fs::read_to_string(apt_dir.join("sources.list")).unwrap_or_default();
    if let Ok(dir) = fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or_default();
            if ext == "list" || ext == "sources" {
                text.push('\n');
                text.push_str(&fs::read_to_string(&f).unwrap_or_default());
            }
        }
    }
    let uris: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .filter(|t| t.starts_with("http://") || t.starts_with("https://"))
        .map(|t| t.trim_end_matches('/'))
        .collect();
    let main = uris
        .iter()
        .find(|u| u.ends_with("/debian"))
        .copied()
        .unwrap_or("http://deb.debian.org/debian");
    let security = uris
        .iter()
        .find(|u| u.ends_with("/debian-security"))
        .copied()
        .unwrap_or("http://deb.debian.org/debian-security");
    vec![
        format!("deb {main} bookworm main"),
        format!("deb {main} bookworm-updates main"),
        format!("deb {security} bookworm-security main"),
    ]
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_has_one_active_linux_partition_after_the_boot_gap() {
        let boot = [0xebu8; 512];
        let m = mbr(&boot, 0x1234_5678);
        assert_eq!(&m[..440], &boot[..440]);
        assert_eq!(&m[440..444], &0x1234_5678u32.to_le_bytes());
        assert_eq!(m[446], 0x80);
        assert_eq!(m[450], 0x83);
        assert_eq!(u32::from_le_bytes([m[454], m[455], m[456], m[457]]), 2048);
        let len = u32::from_le_bytes([m[458], m[459], m[460], m[461]]) as u64;
        assert_eq!((2048 + len) * 512, CLOUD_DISK_SIZE);
        assert_eq!(&m[462..510], &[0u8; 48]);
        assert_eq!((m[510], m[511]), (0x55, 0xaa));
    }

    #[test]
    fn uuids_from_keys_are_well_formed_and_differ() {
        let a = uuid_from_key(&"ab".repeat(32));
        let b = uuid_from_key(&"cd".repeat(32));
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn mirrors_come_from_the_hosts_apt_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("sources.list.d")).expect("mkdir");
        fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n\n\
             Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n",
        )
        .expect("write");
        fs::write(
            dir.path().join("sources.list.d/other.list"),
            "deb https://packages.example/apt stable main\n",
        )
        .expect("write");
        assert_eq!(
            debian_mirrors(dir.path()),
            vec![
                "deb http://mirror.example/debian bookworm main",
                "deb http://mirror.example/debian bookworm-updates main",
                "deb http://mirror.example/debian-security bookworm-security main",
            ]
        );
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(debian_mirrors(empty.path())[0].contains("deb.debian.org/debian "));
    }
}
