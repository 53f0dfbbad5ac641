//! Getting Debian packages: resolving the candidate version (and the versioned
//! kernel package behind `linux-image-cloud-amd64`) with `apt-cache`, downloading
//! `.deb` files with `apt-get download` into the shared cache, and extracting them
//! with `dpkg-deb -x`.
//!
//! Downloads land in the cache atomically (temporary name, then rename), so
//! concurrent builders sharing a cache never see a partial `.deb`. This module must
//! never install packages on the host or need a writable dpkg database.

use std::path::{Path, PathBuf};

use crate::ImageError;
use crate::command;

/// A package pinned to one version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Debian version (may include an epoch, e.g. `1:1.35.0-4`).
    pub version: String,
}

impl Package {
    /// `name=version`, as apt spells a pinned package.
    pub fn pinned(&self) -> String {
        format!("{}={}", self.name, self.version)
    }

    /// The file name under which the cache keeps its `.deb`.
    pub fn deb_file_name(&self) -> String {
        let safe: String = self
            .version
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '~') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{}_{}.deb", self.name, safe)
    }
}

/// The value of `field` in the first paragraph of `apt-cache show` output.
pub fn control_field<'a>(stanza: &'a str, field: &str) -> Option<&'a str> {
    let prefix = format!("{field}:");
    stanza
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::trim)
}

/// The first dependency in a `Depends:` value whose name starts with `prefix`
/// (alternatives and version constraints are stripped).
pub fn dependency_with_prefix(depends: &str, prefix: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.trim().split([' ', '(', ':']).next().unwrap_or_default())
        .find(|name| name.starts_with(prefix))
        .map(str::to_string)
}

/// Splits `apt-cache show` output into its stanzas.
fn stanzas(text: &str) -> impl Iterator<Item = &str> {
    text.split("\n\n").filter(|s| !s.trim().is_empty())
}

/// The candidate version and `Depends:` field of each of `names`, with one
/// `apt-cache show --no-all-versions` call (each call costs apt a full cache
/// build on hosts that disable `pkgcache.bin`, as Debian container images do).
pub async fn candidates(names: &[&str]) -> Result<Vec<(Package, String)>, ImageError> {
    let mut args = vec!["show", "--no-all-versions"];
    args.extend_from_slice(names);
    let cmd = command::display("apt-cache", &args);
    let resolve_err = |package: &str, detail: String| ImageError::PackageResolve {
        package: package.to_string(),
        command: cmd.clone(),
        detail,
    };
    let out = command::run("apt-cache", &args, None)
        .await
        .map_err(|e| resolve_err(&names.join(" "), e.to_string()))?;
    names
        .iter()
        .map(|name| {
            let stanza = stanzas(&out.stdout)
                .find(|s| control_field(s, "Package") == Some(name))
                .ok_or_else(|| {
                    resolve_err(
                        name,
                        "no candidate version (is it in the apt sources?)".to_string(),
                    )
                })?;
            let version = control_field(stanza, "Version")
                .ok_or_else(|| resolve_err(name, "no Version field".to_string()))?;
            let depends = control_field(stanza, "Depends")
                .unwrap_or_default()
                .to_string();
            Ok((
                Package {
                    name: (*name).to_string(),
                    version: version.to_string(),
                },
                depends,
            ))
        })
        .collect()
}

/// Resolves a kernel metapackage (e.g. `linux-image-cloud-amd64`) to the versioned
/// image package it depends on (e.g. `linux-image-6.1.0-56-cloud-amd64`), and the
/// candidates of `others`; returns the kernel first, then `others` in order.
pub async fn resolve(kernel_meta: &str, others: &[&str]) -> Result<Vec<Package>, ImageError> {
    let mut names = vec![kernel_meta];
    names.extend_from_slice(others);
    let mut found = candidates(&names).await?.into_iter();
    let (_, depends) = found.next().ok_or_else(|| ImageError::PackageResolve {
        package: kernel_meta.to_string(),
        command: format!("apt-cache show --no-all-versions {kernel_meta}"),
        detail: "no answer".to_string(),
    })?;
    let kernel = dependency_with_prefix(&depends, "linux-image-").ok_or_else(|| {
        ImageError::PackageResolve {
            package: kernel_meta.to_string(),
            command: format!("apt-cache show --no-all-versions {kernel_meta}"),
            detail: format!("no linux-image-* dependency in Depends: {depends:?}"),
        }
    })?;
    let mut packages: Vec<Package> = candidates(&[&kernel])
        .await?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    packages.extend(found.map(|(p, _)| p));
    Ok(packages)
}

/// A fingerprint of everything apt's candidate choice depends on (package lists,
/// sources, preferences, configuration, installed packages), from file names,
/// sizes and modification times. Equal fingerprints mean apt would answer the same.
pub fn apt_state_fingerprint() -> String {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [
        "/var/lib/apt/lists",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences.d",
        "/etc/apt/apt.conf.d",
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            files.extend(entries.flatten().map(|e| e.path()));
        }
    }
    files.extend(
        [
            "/etc/apt/sources.list",
            "/etc/apt/preferences",
            "/var/lib/dpkg/status",
        ]
        .iter()
        .map(PathBuf::from),
    );
    files.sort();
    let mut key = crate::cache::KeyBuilder::default();
    for f in files {
        let stamp = std::fs::metadata(&f)
            .map(|m| {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{}:{mtime}", m.len())
            })
            .unwrap_or_else(|_| "absent".to_string());
        key.add(&f.to_string_lossy(), stamp.as_bytes());
    }
    key.finish()
}

/// The packages [`resolve`] returned last time, if apt's state is unchanged.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Resolved {
    fingerprint: String,
    query: Vec<String>,
    packages: Vec<Package>,
}

/// [`resolve`], memoised in `memo_file` against [`apt_state_fingerprint`] so that a
/// repeated build does not pay for apt-cache again.
pub async fn resolve_memoised(
    memo_file: &Path,
    kernel_meta: &str,
    others: &[&str],
) -> Result<Vec<Package>, ImageError> {
    let query = std::iter::once(kernel_meta).chain(others.iter().copied());
    memoised(memo_file, query, resolve(kernel_meta, others)).await
}

/// The candidate versions of `names` (no kernel), memoised like
/// [`resolve_memoised`].
pub async fn candidates_memoised(
    memo_file: &Path,
    names: &[&str],
) -> Result<Vec<Package>, ImageError> {
    memoised(memo_file, names.iter().copied(), async {
        Ok(candidates(names)
            .await?
            .into_iter()
            .map(|(p, _)| p)
            .collect())
    })
    .await
}

/// The answer to `query` from `memo_file` if apt's state is unchanged, else
/// that of `resolver`, then remembered.
async fn memoised<'a>(
    memo_file: &Path,
    query: impl Iterator<Item = &'a str>,
    resolver: impl std::future::Future<Output = Result<Vec<Package>, ImageError>>,
) -> Result<Vec<Package>, ImageError> {
    let fingerprint = apt_state_fingerprint();
    let query: Vec<String> = query.map(str::to_string).collect();
    if let Ok(bytes) = std::fs::read(memo_file)
        && let Ok(r) = serde_json::from_slice::<Resolved>(&bytes)
        && r.fingerprint == fingerprint
        && r.query == query
    {
        return Ok(r.packages);
    }
    let packages = resolver.await?;
    let memo = Resolved {
        fingerprint,
        query,
        packages: packages.clone(),
    };
    // Best effort: a failed write only costs the next build an apt query.
    if let (Some(dir), Ok(json)) = (memo_file.parent(), serde_json::to_vec_pretty(&memo))
        && let Ok(mut tmp) = tempfile::Builder::new()
            .prefix(".resolved-")
            .tempfile_in(dir)
        && std::io::Write::write_all(&mut tmp, &json).is_ok()
    {
        let _ = tmp.persist(memo_file);
    }
    Ok(packages)
}

/// User apt drops to while downloading as root; it must be able to write there.
const APT_SANDBOX_USER: &str = "_apt";

fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

pub(crate) fn is_root() -> bool {
    // /proc/self/status "Uid:" line: real, effective, saved, fs.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Downloads `pkg` into `debs_dir` unless it is already there; returns the path.
pub async fn download(pkg: &Package, debs_dir: &Path) -> Result<PathBuf, ImageError> {
    let target = debs_dir.join(pkg.deb_file_name());
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(debs_dir).map_err(ImageError::io("creating", debs_dir))?;
    // apt-get download writes into the current directory. Run as root, apt drops
    // to `_apt` and warns unless `_apt` can write there: use a private temporary
    // directory owned by `_apt` (below /tmp, which `_apt` can traverse, unlike a
    // cache under /root).
    let dl = tempfile::Builder::new()
        .prefix("skyvisor-apt-")
        .tempdir()
        .map_err(ImageError::io(
            "creating a temporary directory in",
            std::env::temp_dir(),
        ))?;
    if is_root()
        && let Some(uid) = uid_of(APT_SANDBOX_USER)
    {
        std::os::unix::fs::chown(dl.path(), Some(uid), None)
            .map_err(ImageError::io("chown to _apt of", dl.path()))?;
    }
    let pinned = pkg.pinned();
    let args = ["download", pinned.as_str()];
    let cmd = command::display("apt-get", &args);
    tracing::info!(package = %pinned, "downloading");
    command::run("apt-get", &args, Some(dl.path()))
        .await
        .map_err(|e| ImageError::PackageDownload {
            package: pinned.clone(),
            command: cmd.clone(),
            detail: e.to_string(),
        })?;
    let deb = std::fs::read_dir(dl.path())
        .map_err(ImageError::io("listing", dl.path()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| ImageError::PackageDownload {
            package: pinned.clone(),
            command: cmd,
            detail: "it succeeded but left no .deb file".to_string(),
        })?;
    // Copy (the temp dir may be on another filesystem), then rename into place.
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(debs_dir)
        .map_err(ImageError::io("creating a temporary file in", debs_dir))?;
    std::fs::copy(&deb, partial.path()).map_err(ImageError::io("copying", &deb))?;
    partial
        .as_file()
        .sync_all()
        .map_err(ImageError::io("syncing", partial.path()))?;
    partial.persist(&target).map_err(|e| ImageError::Io {
        op: "renaming into",
        path: target.clone(),
        source: e.error,
    })?;
    Ok(target)
}

/// Extracts the files of `deb` into `dir`.
pub async fn extract(deb: &Path, dir: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dir).map_err(ImageError::io("creating", dir))?;
    command::run(
        "dpkg-deb",
        &["-x".as_ref(), deb.as_os_str(), dir.as_os_str()],
        None,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "Package: linux-image-cloud-amd64\n\
        Source: linux-signed-amd64 (6.1.192+2)\n\
        Version: 6.1.192-2\n\
        Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n\
        Description: Linux for x86-64 cloud\n\
        \n\
        Package: linux-image-cloud-amd64\n\
        Version: 6.1.176-1\n";

    #[test]
    fn reads_fields_of_the_first_stanza_only() {
        assert_eq!(control_field(SHOW, "Version"), Some("6.1.192-2"));
        assert_eq!(
            control_field(SHOW, "Package"),
            Some("linux-image-cloud-amd64")
        );
        assert_eq!(control_field(SHOW, "Missing"), None);
    }

    #[test]
    fn finds_the_versioned_kernel_dependency() {
        let deps = control_field(SHOW, "Depends").expect("depends");
        assert_eq!(
            dependency_with_prefix(deps, "linux-image-").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            dependency_with_prefix("initramfs-tools | linux-initramfs-tool, linux-image-6.12.1-cloud-amd64:amd64 (>= 1)", "linux-image-")
                .as_deref(),
            Some("linux-image-6.12.1-cloud-amd64")
        );
        assert_eq!(dependency_with_prefix("libc6", "linux-image-"), None);
    }

    #[test]
    fn splits_stanzas() {
        let all: Vec<&str> = stanzas(SHOW).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(control_field(all[1], "Version"), Some("6.1.176-1"));
    }

    #[test]
    fn fingerprint_is_stable_while_apt_state_is_unchanged() {
        assert_eq!(apt_state_fingerprint(), apt_state_fingerprint());
    }

    #[test]
    fn cache_file_names_are_safe() {
        let p = Package {
            name: "busybox-static".to_string(),
            version: "1:1.35.0-4+deb12u1+b1".to_string(),
        };
        assert_eq!(p.pinned(), "busybox-static=1:1.35.0-4+deb12u1+b1");
        assert_eq!(
            p.deb_file_name(),
            "busybox-static_1_1.35.0-4+deb12u1+b1.deb"
        );
    }

    #[test]
    fn parses_passwd_for_the_apt_user() {
        // The _apt user exists on every Debian system with apt.
        if std::path::Path::new("/usr/bin/apt-get").exists() {
            assert!(uid_of(APT_SANDBOX_USER).is_some());
        }
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(uid_of("skyvisor-no-such-user"), None);
    }
}
