//! Errors of the image builder. Each variant says what failed and on what, so that a
//! person reading a CLI message knows which command, package or file to look at.
//! This module must never hide the underlying cause (it is kept as `source` or text).

use std::path::PathBuf;

/// Everything that can go wrong while building a guest image.
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
