//! Errors of the image builder, the OCI importer and the root filesystem unpacker. Each variant says what failed and on what, so that a
//! person reading a CLI message knows which command, package or file to look at.
//! This module must never hide the underlying cause (it is kept as `source` or text).

use std::path::PathBuf;

/// Everything that can go wrong while building a guest image, importing an OCI
/// image or unpacking a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The recipe name is not one of [`crate::recipes`].
    #[error("unknown image recipe {name:?} (known: {known})")]
    UnknownRecipe {
        /// The requested name.
        name: String,
        /// Comma-separated known recipe names.
        known: String,
    },

    /// A required external program could not be started (usually not installed).
    #[error("could not run `{command}`: {source} (is the program installed? {hint})")]
    CommandSpawn {
        /// The command line.
        command: String,
        /// Which Debian package provides it.
        hint: String,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },

    /// An external program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its standard error.
        stderr: String,
    },

    /// apt could not tell which version of a package to use.
    #[error(
        "cannot resolve Debian package {package}: `{command}`: {detail} \
         (the image is built from Debian packages: this needs a Debian host with apt lists; run `apt-get update`)"
    )]
    PackageResolve {
        /// The package.
        package: String,
        /// The apt command that was run.
        command: String,
        /// What went wrong.
        detail: String,
    },

    /// `apt-get download` failed.
    #[error(
        "downloading Debian package {package} failed: `{command}`: {detail} \
         (needs network access to a Debian mirror and current apt lists)"
    )]
    PackageDownload {
        /// The package (`name=version`).
        package: String,
        /// The apt command that was run.
        command: String,
        /// What went wrong.
        detail: String,
    },

    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing, e.g. "reading".
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },

    /// An expected file is missing from an extracted package or the host.
    #[error("{what} not found at {}", path.display())]
    MissingFile {
        /// What we were looking for.
        what: String,
        /// Where.
        path: PathBuf,
    },

    /// A kernel module (or one of its dependencies) is not in the kernel package.
    #[error("kernel module {module} not found for kernel {kernel_version}")]
    ModuleNotFound {
        /// Module name.
        module: String,
        /// Kernel release.
        kernel_version: String,
    },

    /// The kernel ships compressed modules, which busybox insmod cannot load.
    #[error(
        "kernel module {module} is compressed ({}); only uncompressed .ko modules are supported",
        path.display()
    )]
    CompressedModule {
        /// Module name.
        module: String,
        /// The compressed file.
        path: PathBuf,
    },

    /// A module file could not be parsed.
    #[error("invalid kernel module {}: {reason}", path.display())]
    InvalidModule {
        /// The module file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },

    /// Module dependencies form a cycle.
    #[error("kernel module dependency cycle involving {module}")]
    ModuleCycle {
        /// A module on the cycle.
        module: String,
    },

    /// `ldd` output could not be understood.
    #[error("cannot determine the shared libraries of {}: {detail}", binary.display())]
    SharedLibraries {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// A kernel command-line value would break the command line.
    #[error("invalid kernel argument {key}={value:?}: {reason}")]
    InvalidKernelArg {
        /// The key, e.g. `sv.name`.
        key: String,
        /// The rejected value.
        value: String,
        /// Why.
        reason: String,
    },

    /// A cached build's manifest is unreadable.
    #[error("invalid build manifest {}: {detail}", path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// An OCI or docker-archive image could not be imported.
    #[error("cannot import image {}: {source}", path.display())]
    Oci {
        /// The image archive.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: OciError,
    },

    /// A root filesystem archive holds an entry that may not be unpacked.
    #[error("unpacking {}: entry {entry:?} {reason}", archive.display())]
    Unpack {
        /// The archive.
        archive: PathBuf,
        /// The entry's path as the archive names it.
        entry: String,
        /// Why it was refused.
        reason: String,
    },

    /// The directory to unpack into already holds files.
    #[error("{} is not empty; a root filesystem is unpacked only into an empty or absent directory", path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },

    /// A blocking build step panicked or was cancelled.
    #[error("build step {step} did not complete: {detail}")]
    Task {
        /// The step.
        step: &'static str,
        /// The join error.
        detail: String,
    },
}

impl ImageError {
    /// Wraps an I/O error with the operation and path.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ImageError::Io { op, path, source }
    }
}

/// What is wrong with an image given to [`crate::import_oci`].
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The file is not a tar archive (nor a gzip-compressed one).
    #[error("not a tar archive: {detail}")]
    NotATar {
        /// What the tar reader said.
        detail: String,
    },

    /// The tar holds neither an OCI image layout nor a docker-archive.
    #[error(
        "neither an OCI image layout (oci-layout and index.json) nor a docker-archive \
         (manifest.json); save it with `docker save` or `skopeo copy ... oci-archive:FILE`"
    )]
    UnknownFormat,

    /// A file the manifest names is not in the archive.
    #[error("{what} {name} is missing from the archive")]
    Missing {
        /// What it is, e.g. "layer 2" or "config".
        what: String,
        /// Its name or digest.
        name: String,
    },

    /// A blob's content does not match its digest (or its size).
    #[error("{what} {name} does not match its digest: expected {expected}, found {actual}")]
    DigestMismatch {
        /// What it is.
        what: String,
        /// Its name in the archive.
        name: String,
        /// The digest (or size) the manifest gives.
        expected: String,
        /// The digest (or size) of the content.
        actual: String,
    },

    /// A manifest, index or configuration cannot be understood.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which file.
        what: String,
        /// What is wrong.
        detail: String,
    },

    /// The archive holds several images and it is not clear which one is meant.
    #[error("the archive holds {count} images ({names}); import one at a time")]
    SeveralImages {
        /// How many.
        count: usize,
        /// Their tags or digests.
        names: String,
    },

    /// A multi-platform index has no linux/amd64 image.
    #[error("no linux/amd64 image in the index; it has {}", found.join(", "))]
    NoMatchingPlatform {
        /// The platforms it lists, as `os/arch[/variant]`.
        found: Vec<String>,
    },

    /// The image's architecture is not amd64.
    #[error("image is for {architecture}; this cloud runs amd64")]
    Architecture {
        /// The architecture the configuration names.
        architecture: String,
    },

    /// The image's operating system is not Linux.
    #[error("image is for {os}; this cloud runs linux")]
    Os {
        /// The operating system the configuration names.
        os: String,
    },

    /// A manifest, configuration or layer has a media type this importer does
    /// not handle.
    #[error("{what} has unsupported media type {media_type}{hint}")]
    MediaType {
        /// What it is.
        what: String,
        /// Its media type.
        media_type: String,
        /// What to do about it (empty or starting with "; ").
        hint: String,
    },

    /// A layer entry that may not be applied (escaping the root, a hard link to
    /// nothing, a name that is not UTF-8).
    #[error("layer {layer}: entry {path:?} {reason}")]
    UnsafeEntry {
        /// The layer, counted from 1.
        layer: usize,
        /// The entry's path as the layer names it.
        path: String,
        /// Why it was refused.
        reason: String,
    },

    /// The flattened image would not fit the in-memory importer.
    #[error("the image unpacks to more than {limit_bytes} bytes, more than this importer handles")]
    TooLarge {
        /// The limit.
        limit_bytes: u64,
    },

    /// Reading part of the archive failed (a truncated or corrupt file).
    #[error("reading {what}: {source}")]
    Read {
        /// What was being read.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
