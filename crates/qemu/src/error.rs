//! The errors of the QEMU driver, each saying what failed and on what.
//!
//! The messages are shown to users as they are (a VM that fails to start
//! shows QEMU's own complaint), so they must be complete sentences about the
//! VM, never about this crate's internals.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::process::ProcessExit;

/// A [`crate::VmConfig`] that cannot be turned into a QEMU command line.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// One field's value is not allowed.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The field, e.g. `disk id`.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        field: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            field,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// Starting, attaching to or probing a QEMU process failed.
#[derive(Debug, Error)]
pub enum QemuError {
    /// The VM config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The QEMU binary does not exist.
    #[error("QEMU binary {path} not found")]
    BinaryNotFound {
        /// The binary asked for.
        path: PathBuf,
    },
    /// The binary exists but could not be run.
    #[error("cannot run QEMU binary {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// QEMU exited before it was ready; `stderr_tail` is its complaint.
    #[error("QEMU exited during startup ({status}): {stderr_tail}")]
    StartFailed {
        /// How it exited.
        status: ProcessExit,
        /// The last lines QEMU wrote to its log.
        stderr_tail: String,
    },
    /// QEMU did not open its QMP socket in time; it has been killed.
    #[error("QEMU did not open its QMP socket {path} within {waited:?}; it was killed")]
    StartTimeout {
        /// The socket waited for.
        path: PathBuf,
        /// How long.
        waited: Duration,
    },
    /// A file of the run directory could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `create run directory`.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another QEMU is running in this run directory.
    #[error("a QEMU (pid {pid}) is already running in {run_dir}")]
    AlreadyRunning {
        /// Its pid.
        pid: i32,
        /// The run directory.
        run_dir: PathBuf,
    },
    /// No QEMU runs in this run directory.
    #[error("no QEMU is running in {run_dir}: {reason}")]
    NotRunning {
        /// The run directory.
        run_dir: PathBuf,
        /// Why we think so.
        reason: String,
    },
    /// The pidfile names a process that is not this run directory's QEMU
    /// (a stale pidfile whose pid was reused).
    #[error("process {pid} named by the pidfile in {run_dir} is not its QEMU")]
    PidMismatch {
        /// The pid in the pidfile.
        pid: i32,
        /// The run directory.
        run_dir: PathBuf,
    },
    /// Signalling or watching the process failed.
    #[error("cannot {action} QEMU process {pid}: {source}")]
    Process {
        /// What was being done.
        action: &'static str,
        /// The pid.
        pid: i32,
        /// Why.
        source: io::Error,
    },
    /// QMP failed.
    #[error("QMP of the QEMU in {run_dir}: {source}")]
    Qmp {
        /// The run directory.
        run_dir: PathBuf,
        /// What failed.
        source: QmpError,
    },
    /// `qemu --version` did not say a version.
    #[error("cannot tell the version of {path}: {reason}")]
    Version {
        /// The binary.
        path: PathBuf,
        /// What it said instead.
        reason: String,
    },
}

/// A QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// QEMU did not greet as QMP does.
    #[error("QMP handshake failed: {reason}")]
    Handshake {
        /// What went wrong.
        reason: String,
    },
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// No answer in time. The connection stays usable.
    #[error("QMP command {command} got no answer within {after:?}")]
    Timeout {
        /// The command.
        command: String,
        /// How long we waited.
        after: Duration,
    },
    /// The connection is closed: QEMU has exited (or closed the socket).
    #[error("QMP connection closed (QEMU gone){}", command.as_ref().map(|c| format!(" while running {c}")).unwrap_or_default())]
    Disconnected {
        /// The command that was waiting, if any.
        command: Option<String>,
    },
    /// The answer did not have the expected shape.
    #[error("unexpected answer to QMP command {command}: {source}")]
    Decode {
        /// The command.
        command: String,
        /// Why it did not parse.
        source: serde_json::Error,
    },
}
