//! Importing container images: an OCI image layout or a docker-archive, as a
//! tar file (what `skopeo copy ... oci-archive:FILE` and `docker save` make),
//! flattened into one root filesystem tarball that [`crate::rootfs::unpack`]
//! can unpack for a container.
//!
//! The importer reads the manifest (choosing linux/amd64 from a multi-platform
//! index), checks every blob against its digest and every layer against the
//! configuration's `diff_ids`, then applies the layers in order with OCI
//! whiteouts. It is in-memory: the flattened tree (file contents included) is
//! held in a map before it is written, which suits images of tens of MiB;
//! [`flatten::MAX_FLATTENED_BYTES`] bounds it.
//!
//! It must never let an entry escape the root (absolute names, `..`, parents
//! reached through symlinks are resolved inside the image), never keep device
//! nodes or FIFOs (the runtime makes `/dev`), and never write `dest` unless the
//! whole import succeeded (it is written aside and renamed into place).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

mod flatten;

use crate::ImageError;
use crate::error::OciError;
use crate::tarball::{CopyError, copy_apart};
use flatten::{Tree, normalize};

/// Largest manifest, index or configuration read.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// Indexes nested deeper than this are refused.
const MAX_INDEX_DEPTH: usize = 4;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
const LAYER_TYPES: [&str; 7] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// What [`import_oci`] found and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciImport {
    /// `"oci-layout"` or `"docker-archive"`.
    pub format: &'static str,
    /// The configuration's architecture (always `amd64`).
    pub architecture: String,
    /// The configuration's operating system (always `linux`).
    pub os: String,
    /// `Entrypoint` (empty if unset).
    pub entrypoint: Vec<String>,
    /// `Cmd` (empty if unset).
    pub cmd: Vec<String>,
    /// `Env`, as `NAME=value`.
    pub env: Vec<String>,
    /// `WorkingDir`, if set and not empty.
    pub working_dir: Option<String>,
    /// How many layers were applied.
    pub layers: usize,
    /// Bytes of file content in the flattened root filesystem (hard links
    /// counted once).
    pub size_bytes: u64,
}

/// Imports the image archive `src` (an OCI image layout or a docker-archive,
/// as a tar, optionally gzip-compressed) and writes its flattened root
/// filesystem to `dest` as a gzip tar. Blocking; the whole flattened tree is
/// held in memory (see the module documentation).
pub fn import_oci(src: &Path, dest: &Path) -> Result<OciImport, ImageError> {
    let oci = |source| ImageError::Oci {
        path: src.to_path_buf(),
        source,
    };
    let scratch_dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let outer = Outer::open(src, scratch_dir).map_err(|e| match e {
        Opened::Oci(e) => oci(e),
        Opened::Image(e) => e,
    })?;
    let image = if outer.has("oci-layout") && outer.has("index.json") {
        read_oci_layout(&outer)
    } else if outer.has("manifest.json") {
        read_docker_archive(&outer)
    } else {
        Err(OciError::UnknownFormat)
    }
    .map_err(oci)?;
    check_platform(&image.config).map_err(oci)?;

    let diff_ids = image
        .config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != image.layers.len() {
        return Err(oci(OciError::Invalid {
            what: "image configuration".to_string(),
            detail: format!(
                "{} diff_ids for {} layers",
                diff_ids.len(),
                image.layers.len()
            ),
        }));
    }
    let mut tree = Tree::default();
    for (i, layer) in image.layers.iter().enumerate() {
        apply_layer(
            &mut tree,
            &outer,
            i + 1,
            layer,
            diff_ids.get(i).map(String::as_str),
        )
        .map_err(oci)?;
    }

    let staged = tempfile::Builder::new()
        .prefix(".import-")
        .suffix(".tar.gz")
        .tempfile_in(scratch_dir)
        .map_err(ImageError::io("creating a temporary file in", scratch_dir))?;
    let size_bytes = tree.write(staged.path())?;
    // Temporary files are private; the result is an ordinary file.
    std::fs::set_permissions(staged.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(ImageError::io("changing the mode of", staged.path()))?;
    staged.persist(dest).map_err(|e| ImageError::Io {
        op: "renaming into",
        path: dest.to_path_buf(),
        source: e.error,
    })?;

    let c = image.config.config.unwrap_or_default();
    Ok(OciImport {
        format: image.format,
        architecture: image.config.architecture,
        os: image.config.os,
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
        layers: image.layers.len(),
        size_bytes,
    })
}

// ---------------------------------------------------------------------------
// The outer archive: an index of its members, read in place.

/// One member of the outer tar.
#[derive(Debug, Clone)]
enum Member {
    /// A regular file at this offset with this size.
    File(u64, u64),
    /// A symbolic or hard link (`docker save` links duplicate layers).
    Link(String),
}

/// The outer tar, indexed; members are read in place with positioned reads.
struct Outer {
    file: File,
    members: HashMap<String, Member>,
    /// A gzip-compressed outer tar is decompressed into this anonymous file.
    _scratch: Option<tempfile::NamedTempFile>,
}

enum Opened {
    Oci(OciError),
    Image(ImageError),
}

impl From<OciError> for Opened {
    fn from(e: OciError) -> Self {
        Opened::Oci(e)
    }
}

/// A range of a file, read with `pread` (no shared cursor).
struct Slice<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive is truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn magic(file: &File, offset: u64) -> io::Result<[u8; 4]> {
    let mut m = [0u8; 4];
    let n = file.read_at(&mut m, offset)?;
    if n < 4 {
        m = [0; 4];
    }
    Ok(m)
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl Outer {
    fn open(src: &Path, scratch_dir: &Path) -> Result<Self, Opened> {
        let file = File::open(src)
            .map_err(ImageError::io("opening", src))
            .map_err(Opened::Image)?;
        let head = magic(&file, 0).map_err(|e| OciError::Read {
            what: "the archive".to_string(),
            source: e,
        })?;
        let (file, scratch) = if head[..2] == GZIP_MAGIC {
            // Decompressed aside, so members can be read in place like a plain tar.
            let mut tmp = tempfile::Builder::new()
                .prefix(".image-")
                .tempfile_in(scratch_dir)
                .map_err(ImageError::io("creating a temporary file in", scratch_dir))
                .map_err(Opened::Image)?;
            let mut gz = flate2::read::MultiGzDecoder::new(io::BufReader::new(file));
            match copy_apart(&mut gz, tmp.as_file_mut()) {
                Ok(_) => {}
                Err(CopyError::Read(e)) => {
                    return Err(Opened::Oci(OciError::NotATar {
                        detail: format!("gzip-compressed, but decompressing failed: {e}"),
                    }));
                }
                Err(CopyError::Write(source)) => {
                    return Err(Opened::Image(ImageError::Io {
                        op: "decompressing into",
                        path: tmp.path().to_path_buf(),
                        source,
                    }));
                }
            }
            let f = tmp
                .reopen()
                .map_err(ImageError::io("reopening", tmp.path()))
                .map_err(Opened::Image)?;
            (f, Some(tmp))
        } else {
            (file, None)
        };
        let members = Self::index(&file)?;
        Ok(Outer {
            file,
            members,
            _scratch: scratch,
        })
    }

    fn index(file: &File) -> Result<HashMap<String, Member>, OciError> {
        let not_tar = |e: io::Error| OciError::NotATar {
            detail: e.to_string(),
        };
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(not_tar)? {
            let entry = entry.map_err(not_tar)?;
            let Some(name) = std::str::from_utf8(&entry.path_bytes())
                .ok()
                .and_then(normalize)
            else {
                continue;
            };
            let kind = entry.header().entry_type();
            let member = if kind.is_file() || kind.is_contiguous() {
                Member::File(entry.raw_file_position(), entry.size())
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Some(target) = entry
                    .link_name_bytes()
                    .and_then(|t| String::from_utf8(t.into_owned()).ok())
                else {
                    continue;
                };
                // Symlink targets are relative to the link's directory; hard
                // link targets to the archive's root.
                let joined = match (kind.is_symlink(), name.rsplit_once('/')) {
                    (true, Some((dir, _))) => format!("{dir}/{target}"),
                    _ => target,
                };
                match normalize(&joined) {
                    Some(t) => Member::Link(t),
                    None => continue,
                }
            } else {
                continue;
            };
            members.insert(name, member);
        }
        if members.is_empty() {
            return Err(OciError::NotATar {
                detail: "it holds no files".to_string(),
            });
        }
        Ok(members)
    }

    fn has(&self, name: &str) -> bool {
        self.locate(name).is_some()
    }

    /// Offset and size of `name`, following links a few times.
    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = name.to_string();
        for _ in 0..8 {
            match self.members.get(&name)? {
                Member::File(offset, size) => return Some((*offset, *size)),
                Member::Link(target) => name = target.clone(),
            }
        }
        None
    }

    fn open_member(&self, name: &str, what: &str) -> Result<(Slice<'_>, u64), OciError> {
        let (offset, size) = self.locate(name).ok_or_else(|| OciError::Missing {
            what: what.to_string(),
            name: name.to_string(),
        })?;
        Ok((
            Slice {
                file: &self.file,
                pos: offset,
                end: offset + size,
            },
            size,
        ))
    }

    fn read_small(&self, name: &str, what: &str) -> Result<Vec<u8>, OciError> {
        let (mut r, size) = self.open_member(name, what)?;
        if size > MAX_JSON_BYTES {
            return Err(OciError::Invalid {
                what: what.to_string(),
                detail: format!("{name} is {size} bytes, more than {MAX_JSON_BYTES}"),
            });
        }
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).map_err(|e| OciError::Read {
            what: format!("{what} {name}"),
            source: e,
        })?;
        Ok(buf)
    }

    fn sha256(&self, name: &str, what: &str) -> Result<(String, u64), OciError> {
        let (r, size) = self.open_member(name, what)?;
        let hex = sha256_of(r).map_err(|e| OciError::Read {
            what: format!("{what} {name}"),
            source: e,
        })?;
        Ok((hex, size))
    }
}

fn sha256_of(mut r: impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    io::copy(&mut r, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The hex part of a `sha256:<64 hex>` digest.
fn sha256_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str, OciError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| OciError::Invalid {
            what: what.to_string(),
            detail: format!("digest {digest:?} is not sha256:<64 hex digits>"),
        })?;
    Ok(hex)
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|e| OciError::Invalid {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

// ---------------------------------------------------------------------------
// Manifests and configuration.

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

impl Descriptor {
    /// Docker's build attestations ride along in indexes as "unknown/unknown".
    fn is_attestation(&self) -> bool {
        self.annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest")
            || self.platform.as_ref().is_some_and(|p| p.os == "unknown")
    }

    fn name(&self) -> String {
        self.annotations
            .get("io.containerd.image.name")
            .or_else(|| self.annotations.get("org.opencontainers.image.ref.name"))
            .cloned()
            .unwrap_or_else(|| self.digest.clone())
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

impl Platform {
    fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ImageManifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
}

/// How a layer is found and what it claims to be.
#[derive(Debug)]
struct LayerRef {
    /// Its member name in the outer tar.
    name: String,
    /// Its media type (empty in a docker-archive, which has none).
    media_type: String,
}

/// A manifest, read and checked, with its configuration.
struct Image {
    format: &'static str,
    config: ImageConfig,
    layers: Vec<LayerRef>,
}

/// Reads the blob `d` names, checking its size and digest.
fn read_blob(outer: &Outer, d: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
    let name = blob_name(d, what)?;
    let bytes = outer.read_small(&name, what)?;
    check_size(d, bytes.len() as u64, what, &name)?;
    let actual = hex::encode(Sha256::digest(&bytes));
    check_digest(d, &actual, what, &name)?;
    Ok(bytes)
}

fn blob_name(d: &Descriptor, what: &str) -> Result<String, OciError> {
    Ok(format!("blobs/sha256/{}", sha256_hex(&d.digest, what)?))
}

fn check_size(d: &Descriptor, actual: u64, what: &str, name: &str) -> Result<(), OciError> {
    match d.size {
        Some(expected) if expected != actual => Err(OciError::DigestMismatch {
            what: what.to_string(),
            name: name.to_string(),
            expected: format!("{expected} bytes"),
            actual: format!("{actual} bytes"),
        }),
        _ => Ok(()),
    }
}

fn check_digest(d: &Descriptor, actual_hex: &str, what: &str, name: &str) -> Result<(), OciError> {
    let expected = sha256_hex(&d.digest, what)?;
    if expected.eq_ignore_ascii_case(actual_hex) {
        Ok(())
    } else {
        Err(OciError::DigestMismatch {
            what: what.to_string(),
            name: name.to_string(),
            expected: d.digest.clone(),
            actual: format!("sha256:{actual_hex}"),
        })
    }
}

fn read_oci_layout(outer: &Outer) -> Result<Image, OciError> {
    let index: Index = parse_json(&outer.read_small("index.json", "index")?, "index.json")?;
    let top: Vec<Descriptor> = index
        .manifests
        .into_iter()
        .filter(|d| !d.is_attestation())
        .collect();
    if top.is_empty() {
        return Err(OciError::Invalid {
            what: "index.json".to_string(),
            detail: "it lists no image".to_string(),
        });
    }
    // Entries without a platform are separate images (several tags saved
    // together), not variants of one.
    if top.len() > 1 && top.iter().any(|d| d.platform.is_none()) {
        let mut names: Vec<String> = top.iter().map(Descriptor::name).collect();
        names.dedup();
        if names.len() > 1 || top.iter().any(|d| d.digest != top[0].digest) {
            return Err(OciError::SeveralImages {
                count: top.len(),
                names: names.join(", "),
            });
        }
    }
    let mut leaves = Vec::new();
    collect_manifests(outer, top, 0, &mut leaves)?;
    let chosen = choose_platform(leaves)?;
    let manifest_bytes = read_blob(outer, &chosen, "manifest")?;
    let manifest: ImageManifest = parse_json(&manifest_bytes, "manifest")?;
    if !manifest.media_type.is_empty()
        && manifest.media_type != OCI_MANIFEST
        && manifest.media_type != DOCKER_MANIFEST
    {
        return Err(OciError::MediaType {
            what: "the manifest".to_string(),
            media_type: manifest.media_type,
            hint: String::new(),
        });
    }
    if !manifest.config.media_type.is_empty()
        && !CONFIG_TYPES.contains(&manifest.config.media_type.as_str())
    {
        return Err(OciError::MediaType {
            what: "the image configuration".to_string(),
            media_type: manifest.config.media_type.clone(),
            hint: "; this is not a container image".to_string(),
        });
    }
    let config: ImageConfig = parse_json(
        &read_blob(outer, &manifest.config, "config")?,
        "image configuration",
    )?;
    let mut layers = Vec::new();
    for (i, d) in manifest.layers.iter().enumerate() {
        let what = format!("layer {}", i + 1);
        check_layer_type(&d.media_type, &what)?;
        let name = blob_name(d, &what)?;
        let (actual, size) = outer.sha256(&name, &what)?;
        check_size(d, size, &what, &name)?;
        check_digest(d, &actual, &what, &name)?;
        layers.push(LayerRef {
            name,
            media_type: d.media_type.clone(),
        });
    }
    Ok(Image {
        format: "oci-layout",
        config,
        layers,
    })
}

/// Walks `descriptors`, descending into nested indexes, collecting image
/// manifests (with the platform their index gives them).
fn collect_manifests(
    outer: &Outer,
    descriptors: Vec<Descriptor>,
    depth: usize,
    leaves: &mut Vec<Descriptor>,
) -> Result<(), OciError> {
    for d in descriptors {
        if d.is_attestation() {
            continue;
        }
        match d.media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => leaves.push(d),
            OCI_INDEX | DOCKER_LIST => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(OciError::Invalid {
                        what: "index".to_string(),
                        detail: format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
                    });
                }
                let nested: Index = parse_json(&read_blob(outer, &d, "index")?, "index")?;
                collect_manifests(outer, nested.manifests, depth + 1, leaves)?;
            }
            // No media type: look inside.
            "" => {
                let bytes = read_blob(outer, &d, "manifest")?;
                let value: serde_json::Value = parse_json(&bytes, "manifest")?;
                if value.get("manifests").is_some() {
                    let nested: Index = parse_json(&bytes, "index")?;
                    if depth >= MAX_INDEX_DEPTH {
                        return Err(OciError::Invalid {
                            what: "index".to_string(),
                            detail: format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
                        });
                    }
                    collect_manifests(outer, nested.manifests, depth + 1, leaves)?;
                } else {
                    leaves.push(d);
                }
            }
            other => {
                return Err(OciError::MediaType {
                    what: format!("manifest {}", d.digest),
                    media_type: other.to_string(),
                    hint: if other.contains("manifest.v1") {
                        "; Docker schema 1 images are not supported".to_string()
                    } else {
                        String::new()
                    },
                });
            }
        }
    }
    Ok(())
}

fn choose_platform(leaves: Vec<Descriptor>) -> Result<Descriptor, OciError> {
    if leaves.len() <= 1 {
        // A single image: its configuration says which platform it is for.
        return leaves.into_iter().next().ok_or_else(|| OciError::Invalid {
            what: "index".to_string(),
            detail: "it lists no image manifest".to_string(),
        });
    }
    let is_amd64 = |p: &Platform| p.os == "linux" && p.architecture == "amd64";
    let found: Vec<String> = leaves
        .iter()
        .map(|d| {
            d.platform
                .as_ref()
                .map_or_else(|| "unknown".to_string(), Platform::label)
        })
        .collect();
    leaves
        .into_iter()
        .find(|d| d.platform.as_ref().is_some_and(is_amd64))
        .ok_or(OciError::NoMatchingPlatform { found })
}

fn check_layer_type(media_type: &str, what: &str) -> Result<(), OciError> {
    if LAYER_TYPES.contains(&media_type) {
        return Ok(());
    }
    let hint = if media_type.contains("zstd") {
        "; zstd-compressed layers are not supported: convert the image with \
         `skopeo copy --dest-compress-format gzip`"
    } else {
        ""
    };
    Err(OciError::MediaType {
        what: what.to_string(),
        media_type: media_type.to_string(),
        hint: hint.to_string(),
    })
}

fn read_docker_archive(outer: &Outer) -> Result<Image, OciError> {
    let entries: Vec<DockerEntry> = parse_json(
        &outer.read_small("manifest.json", "manifest")?,
        "manifest.json",
    )?;
    let entry = match <[DockerEntry; 1]>::try_from(entries) {
        Ok([e]) => e,
        Err(entries) if entries.is_empty() => {
            return Err(OciError::Invalid {
                what: "manifest.json".to_string(),
                detail: "it lists no image".to_string(),
            });
        }
        Err(entries) => {
            let names: Vec<String> = entries
                .iter()
                .map(|e| {
                    e.repo_tags
                        .as_ref()
                        .and_then(|t| t.first().cloned())
                        .unwrap_or_else(|| e.config.clone())
                })
                .collect();
            return Err(OciError::SeveralImages {
                count: entries.len(),
                names: names.join(", "),
            });
        }
    };
    let config_name = normalize(&entry.config).ok_or_else(|| OciError::Invalid {
        what: "manifest.json".to_string(),
        detail: format!("config path {:?} escapes the archive", entry.config),
    })?;
    let config_bytes = outer.read_small(&config_name, "config")?;
    // The configuration is stored under its own digest: check it when the name
    // says which (`<hex>.json` or `blobs/sha256/<hex>`).
    let stem = config_name
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .trim_end_matches(".json")
        .to_string();
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
        let actual = hex::encode(Sha256::digest(&config_bytes));
        if !actual.eq_ignore_ascii_case(&stem) {
            return Err(OciError::DigestMismatch {
                what: "config".to_string(),
                name: config_name,
                expected: format!("sha256:{stem}"),
                actual: format!("sha256:{actual}"),
            });
        }
    }
    let config: ImageConfig = parse_json(&config_bytes, "image configuration")?;
    let mut layers = Vec::new();
    for (i, l) in entry.layers.iter().enumerate() {
        let name = normalize(l).ok_or_else(|| OciError::Invalid {
            what: "manifest.json".to_string(),
            detail: format!("layer path {l:?} escapes the archive"),
        })?;
        if !outer.has(&name) {
            return Err(OciError::Missing {
                what: format!("layer {}", i + 1),
                name,
            });
        }
        layers.push(LayerRef {
            name,
            media_type: String::new(),
        });
    }
    Ok(Image {
        format: "docker-archive",
        config,
        layers,
    })
}

fn check_platform(config: &ImageConfig) -> Result<(), OciError> {
    if config.os != "linux" {
        return Err(OciError::Os {
            os: if config.os.is_empty() {
                "an unnamed operating system".to_string()
            } else {
                config.os.clone()
            },
        });
    }
    if config.architecture != "amd64" {
        return Err(OciError::Architecture {
            architecture: if config.architecture.is_empty() {
                "an unnamed architecture".to_string()
            } else {
                config.architecture.clone()
            },
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Layers.

/// Hashes what passes through (a layer's uncompressed stream, for its diff_id).
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Checks and decompresses layer `number` and applies it to `tree`.
fn apply_layer(
    tree: &mut Tree,
    outer: &Outer,
    number: usize,
    layer: &LayerRef,
    diff_id: Option<&str>,
) -> Result<(), OciError> {
    let what = format!("layer {number}");
    let (offset, _) = outer.locate(&layer.name).ok_or_else(|| OciError::Missing {
        what: what.clone(),
        name: layer.name.clone(),
    })?;
    let head = magic(&outer.file, offset).map_err(|e| OciError::Read {
        what: what.clone(),
        source: e,
    })?;
    if head == ZSTD_MAGIC {
        return Err(OciError::MediaType {
            what,
            media_type: if layer.media_type.is_empty() {
                "zstd-compressed tar".to_string()
            } else {
                layer.media_type.clone()
            },
            hint: "; zstd-compressed layers are not supported".to_string(),
        });
    }
    let (raw, _) = outer.open_member(&layer.name, &what)?;
    let decompressed: Box<dyn Read + '_> = if head[..2] == GZIP_MAGIC {
        Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(raw)))
    } else {
        Box::new(raw)
    };
    let mut hashing = Hashing {
        inner: decompressed,
        hash: Sha256::new(),
    };
    tree.apply(&mut hashing, number, &layer.name)?;
    // The rest (end-of-archive padding) belongs to the layer's diff_id too.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| OciError::Read {
        what: format!("{what} ({})", layer.name),
        source: e,
    })?;
    if let Some(diff_id) = diff_id {
        let d = Descriptor {
            media_type: String::new(),
            digest: diff_id.to_string(),
            size: None,
            platform: None,
            annotations: HashMap::new(),
        };
        let actual = hex::encode(hashing.hash.finalize());
        check_digest(
            &d,
            &actual,
            &format!("{what} (uncompressed, diff_id)"),
            &layer.name,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A tar layer built in memory.
    #[derive(Default)]
    struct Layer(Vec<(String, tar::EntryType, Vec<u8>, String, u32)>);

    impl Layer {
        fn file(mut self, path: &str, body: &str) -> Self {
            self.0.push((
                path.into(),
                tar::EntryType::Regular,
                body.as_bytes().to_vec(),
                String::new(),
                0o644,
            ));
            self
        }
        fn dir(mut self, path: &str) -> Self {
            self.0.push((
                path.into(),
                tar::EntryType::Directory,
                vec![],
                String::new(),
                0o755,
            ));
            self
        }
        fn symlink(mut self, path: &str, target: &str) -> Self {
            self.0.push((
                path.into(),
                tar::EntryType::Symlink,
                vec![],
                target.into(),
                0o777,
            ));
            self
        }
        fn hard_link(mut self, path: &str, target: &str) -> Self {
            self.0.push((
                path.into(),
                tar::EntryType::Link,
                vec![],
                target.into(),
                0o644,
            ));
            self
        }
        fn fifo(mut self, path: &str) -> Self {
            self.0.push((
                path.into(),
                tar::EntryType::Fifo,
                vec![],
                String::new(),
                0o644,
            ));
            self
        }
        fn tar(&self) -> Vec<u8> {
            let mut b = tar::Builder::new(Vec::new());
            for (path, kind, body, target, mode) in &self.0 {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(*kind);
                h.set_mode(*mode);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(body.len() as u64);
                h.set_mtime(1_700_000_000);
                if kind.is_symlink() || kind.is_hard_link() {
                    h.set_link_name(target).expect("link name");
                }
                // Bypass the builder's path checks: tests feed hostile names.
                let name = path.as_bytes();
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, body.as_slice()).expect("append");
            }
            b.into_inner().expect("tar")
        }
        fn gz(&self) -> Vec<u8> {
            gzip(&self.tar())
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut e, data).expect("gzip");
        e.finish().expect("gzip")
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn outer_tar(members: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data.as_slice())
                .expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn config_json(arch: &str, layers_uncompressed: &[Vec<u8>]) -> Vec<u8> {
        let diff_ids: Vec<String> = layers_uncompressed
            .iter()
            .map(|l| format!("sha256:{}", sha(l)))
            .collect();
        serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/app"],
                "Cmd": ["--serve"],
                "Env": ["PATH=/usr/bin:/bin"],
                "WorkingDir": "/srv"
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        })
        .to_string()
        .into_bytes()
    }

    /// An OCI layout tar with one image of `layers` (gzip-compressed), and
    /// the members so a test can tamper with them.
    fn oci_members(arch: &str, layers: &[Layer]) -> Vec<(String, Vec<u8>)> {
        let raw: Vec<Vec<u8>> = layers.iter().map(Layer::tar).collect();
        let gz: Vec<Vec<u8>> = layers.iter().map(Layer::gz).collect();
        let config = config_json(arch, &raw);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": CONFIG_TYPES[0],
                "digest": format!("sha256:{}", sha(&config)),
                "size": config.len()
            },
            "layers": gz.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": format!("sha256:{}", sha(l)),
                "size": l.len()
            })).collect::<Vec<_>>()
        })
        .to_string()
        .into_bytes();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST,
                "digest": format!("sha256:{}", sha(&manifest)),
                "size": manifest.len()
            }]
        })
        .to_string()
        .into_bytes();
        let mut members = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_string(), index),
            (format!("blobs/sha256/{}", sha(&manifest)), manifest),
            (format!("blobs/sha256/{}", sha(&config)), config),
        ];
        for l in gz {
            members.push((format!("blobs/sha256/{}", sha(&l)), l));
        }
        members
    }

    struct Flat {
        entries: BTreeMap<String, (tar::EntryType, Vec<u8>, String)>,
    }

    impl Flat {
        fn read(path: &Path) -> Flat {
            let gz = flate2::read::GzDecoder::new(File::open(path).expect("open"));
            let mut ar = tar::Archive::new(gz);
            let mut entries = BTreeMap::new();
            for e in ar.entries().expect("entries") {
                let mut e = e.expect("entry");
                let p = e.path().expect("path").to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let link = e
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut body = Vec::new();
                e.read_to_end(&mut body).expect("read");
                entries.insert(p, (kind, body, link));
            }
            Flat { entries }
        }
        fn body(&self, p: &str) -> Option<&str> {
            self.entries
                .get(p)
                .map(|(_, b, _)| std::str::from_utf8(b).expect("utf-8"))
        }
        fn has(&self, p: &str) -> bool {
            self.entries.contains_key(p)
        }
    }

    fn import_bytes(archive: &[u8]) -> (tempfile::TempDir, Result<OciImport, ImageError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("image.tar");
        std::fs::write(&src, archive).expect("write");
        let r = import_oci(&src, &dir.path().join("rootfs.tar.gz"));
        (dir, r)
    }

    fn oci_error(r: Result<OciImport, ImageError>) -> OciError {
        match r {
            Err(ImageError::Oci { source, .. }) => source,
            other => panic!("expected an OCI error, got {other:?}"),
        }
    }

    fn two_layers() -> Vec<Layer> {
        vec![
            Layer::default()
                .dir("etc")
                .file("etc/os-release", "one")
                .file("etc/gone", "x")
                .dir("var/cache")
                .file("var/cache/a", "a")
                .file("var/cache/sub/b", "b")
                .file("bin/tool", "tool")
                .hard_link("bin/tool-link", "bin/tool")
                .fifo("run/fifo")
                .symlink("lib", "usr/lib"),
            Layer::default()
                .file("etc/os-release", "two")
                .file("etc/.wh.gone", "")
                .file("var/cache/.wh..wh..opq", "")
                .file("var/cache/new", "new")
                .file("lib/libx.so", "x")
                .file("bin/tool", "tool v2"),
        ]
    }

    #[test]
    fn flattens_an_oci_layout_with_whiteouts_and_opaque_dirs() {
        let archive = outer_tar(&oci_members("amd64", &two_layers()));
        let (dir, r) = import_bytes(&archive);
        let info = r.expect("import");
        assert_eq!(info.format, "oci-layout");
        assert_eq!(info.layers, 2);
        assert_eq!(info.architecture, "amd64");
        assert_eq!(info.entrypoint, ["/bin/app"]);
        assert_eq!(info.cmd, ["--serve"]);
        assert_eq!(info.env, ["PATH=/usr/bin:/bin"]);
        assert_eq!(info.working_dir.as_deref(), Some("/srv"));
        let flat = Flat::read(&dir.path().join("rootfs.tar.gz"));
        assert_eq!(flat.body("etc/os-release"), Some("two"));
        assert!(!flat.has("etc/gone"), "whiteout removes the lower file");
        assert!(flat.has("var/cache"), "an opaque dir stays");
        assert!(!flat.has("var/cache/a") && !flat.has("var/cache/sub/b"));
        assert_eq!(flat.body("var/cache/new"), Some("new"));
        assert!(!flat.has("run/fifo"), "FIFOs are skipped");
        // Through the `lib -> usr/lib` symlink, inside the image.
        assert_eq!(flat.body("usr/lib/libx.so"), Some("x"));
        assert_eq!(
            flat.entries.get("lib").map(|e| e.0),
            Some(tar::EntryType::Symlink)
        );
        // The link keeps the old content once its original is replaced.
        assert_eq!(flat.body("bin/tool"), Some("tool v2"));
        assert_eq!(flat.body("bin/tool-link"), Some("tool"));
        assert_eq!(
            info.size_bytes,
            ["two", "new", "x", "tool v2", "tool"]
                .iter()
                .map(|s| s.len() as u64)
                .sum::<u64>()
        );
    }

    #[test]
    fn keeps_hard_links_as_links_and_whiteouts_spare_their_own_layer() {
        let layers = vec![
            Layer::default().file("a/x", "lower"),
            Layer::default()
                .file("a/x", "upper")
                .file("a/.wh.x", "")
                .file("f", "data")
                .hard_link("g", "f"),
        ];
        let archive = outer_tar(&oci_members("amd64", &layers));
        let (dir, r) = import_bytes(&archive);
        r.expect("import");
        let flat = Flat::read(&dir.path().join("rootfs.tar.gz"));
        assert_eq!(flat.body("a/x"), Some("upper"));
        let g = flat.entries.get("g").expect("g");
        assert_eq!((g.0, g.2.as_str()), (tar::EntryType::Link, "f"));
    }

    #[test]
    fn imports_a_docker_archive_even_gzip_compressed() {
        let layers = [
            Layer::default().file("hello", "1"),
            Layer::default().file("world", "2"),
        ];
        let raw: Vec<Vec<u8>> = layers.iter().map(Layer::tar).collect();
        let config = config_json("amd64", &raw);
        let config_name = format!("{}.json", sha(&config));
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": ["demo:latest"],
            "Layers": ["l1/layer.tar", "l2/layer.tar"]
        }])
        .to_string()
        .into_bytes();
        let archive = outer_tar(&[
            ("manifest.json".to_string(), manifest),
            (config_name, config),
            ("l1/layer.tar".to_string(), raw[0].clone()),
            ("l2/layer.tar".to_string(), raw[1].clone()),
        ]);
        for bytes in [archive.clone(), gzip(&archive)] {
            let (dir, r) = import_bytes(&bytes);
            let info = r.expect("import");
            assert_eq!(info.format, "docker-archive");
            assert_eq!(info.layers, 2);
            let flat = Flat::read(&dir.path().join("rootfs.tar.gz"));
            assert_eq!(flat.body("hello"), Some("1"));
            assert_eq!(flat.body("world"), Some("2"));
        }
    }

    #[test]
    fn refuses_another_architecture() {
        let archive = outer_tar(&oci_members("arm64", &[Layer::default().file("a", "a")]));
        let (_dir, r) = import_bytes(&archive);
        let e = oci_error(r);
        assert_eq!(e.to_string(), "image is for arm64; this cloud runs amd64");
    }

    #[test]
    fn picks_amd64_from_an_index_or_names_the_platforms() {
        let members = oci_members("amd64", &[Layer::default().file("a", "a")]);
        let manifest = members[2].clone();
        let index = |platforms: &[(&str, &str)]| {
            serde_json::json!({
                "schemaVersion": 2,
                "manifests": platforms.iter().map(|(os, arch)| serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": format!("sha256:{}", sha(&manifest.1)),
                    "size": manifest.1.len(),
                    "platform": {"os": os, "architecture": arch}
                })).collect::<Vec<_>>()
            })
            .to_string()
            .into_bytes()
        };
        let mut m = members.clone();
        m[1].1 = index(&[("linux", "arm64"), ("linux", "amd64")]);
        let (_dir, r) = import_bytes(&outer_tar(&m));
        r.expect("amd64 chosen");
        m[1].1 = index(&[("linux", "arm64"), ("linux", "s390x")]);
        let (_dir, r) = import_bytes(&outer_tar(&m));
        let e = oci_error(r);
        assert!(matches!(e, OciError::NoMatchingPlatform { .. }), "{e}");
        assert!(e.to_string().contains("linux/arm64, linux/s390x"), "{e}");
    }

    #[test]
    fn refuses_a_digest_mismatch_naming_the_blob() {
        let mut members = oci_members("amd64", &[Layer::default().file("a", "a")]);
        let layer = members.last_mut().expect("layer");
        let name = layer.0.clone();
        // Same size, different content.
        let last = layer.1.len() - 1;
        layer.1[last] ^= 0xff;
        let (_dir, r) = import_bytes(&outer_tar(&members));
        let e = oci_error(r);
        assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
        assert!(e.to_string().contains(&name), "{e}");
        assert!(e.to_string().contains("layer 1"), "{e}");
    }

    #[test]
    fn refuses_a_missing_layer_blob() {
        let mut members = oci_members("amd64", &[Layer::default().file("a", "a")]);
        let (name, _) = members.pop().expect("layer");
        let (_dir, r) = import_bytes(&outer_tar(&members));
        let e = oci_error(r);
        assert!(matches!(e, OciError::Missing { .. }), "{e}");
        assert!(e.to_string().contains(&name), "{e}");
    }

    #[test]
    fn refuses_garbage_and_unknown_layouts() {
        let (_dir, r) = import_bytes(&[0x42; 4096]);
        assert!(matches!(oci_error(r), OciError::NotATar { .. }));
        let (_dir, r) = import_bytes(&[]);
        assert!(matches!(oci_error(r), OciError::NotATar { .. }));
        let (_dir, r) = import_bytes(&outer_tar(&[("readme".to_string(), b"hi".to_vec())]));
        assert!(matches!(oci_error(r), OciError::UnknownFormat));
    }

    #[test]
    fn refuses_paths_escaping_the_root() {
        for layer in [
            Layer::default().file("../evil", "x"),
            Layer::default().file("a/../../evil", "x"),
            Layer::default().file("/etc/evil", "x"),
            Layer::default().file("f", "x").hard_link("g", "../f"),
        ] {
            let (dir, r) = import_bytes(&outer_tar(&oci_members("amd64", &[layer])));
            let e = oci_error(r);
            assert!(matches!(e, OciError::UnsafeEntry { .. }), "{e}");
            assert!(!dir.path().join("rootfs.tar.gz").exists());
        }
        // A symlink to an absolute path leads back into the image, not out.
        let layers = [Layer::default()
            .symlink("out", "/../../tmp")
            .file("out/x", "in")];
        let (dir, r) = import_bytes(&outer_tar(&oci_members("amd64", &layers)));
        r.expect("import");
        let flat = Flat::read(&dir.path().join("rootfs.tar.gz"));
        assert_eq!(flat.body("tmp/x"), Some("in"));
    }

    #[test]
    fn refuses_zstd_layers_naming_the_media_type() {
        let mut members = oci_members("amd64", &[Layer::default().file("a", "a")]);
        let text = String::from_utf8(members[2].1.clone()).expect("utf-8");
        let manifest = text.replace("tar+gzip", "tar+zstd").into_bytes();
        let old = members[2].0.clone();
        let new_digest = sha(&manifest);
        members[2] = (format!("blobs/sha256/{new_digest}"), manifest.clone());
        let old_hex = old.trim_start_matches("blobs/sha256/");
        members[1].1 = String::from_utf8(members[1].1.clone())
            .expect("utf-8")
            .replace(old_hex, &new_digest)
            .into_bytes();
        let (_dir, r) = import_bytes(&outer_tar(&members));
        let e = oci_error(r);
        assert!(
            e.to_string()
                .contains("application/vnd.oci.image.layer.v1.tar+zstd"),
            "{e}"
        );
    }
}
