//! Starting a QEMU process, re-attaching to one, and watching it exit.
//!
//! QEMU processes outlive their owner: [`launch`] starts QEMU in its own
//! session with no tie to the caller (no kill-on-drop, no parent-death
//! signal), and [`attach`] finds it again through its run directory's
//! pidfile and QMP socket after an agent restart. This module must never
//! kill QEMU implicitly — dropping a [`QemuVm`] only stops watching it; only
//! [`QemuVm::kill`] (or a failed [`launch`]) kills.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::process::{Pid, PidfdFlags, Signal};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{VmConfig, esc, files};
use crate::error::{QemuError, QmpError};
use crate::qmp::{EventKind, EventStream, EventStreamError, Qmp, QmpOptions, ShutdownInfo};

/// How long to wait, after the process ended, for the events it sent last
/// (the QMP connection closes at the same moment).
const EVENT_DRAIN: Duration = Duration::from_secs(3);
/// How long a QEMU that broke the QMP handshake gets to exit and explain.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How often [`launch`] looks for the QMP socket (often: a restore waits
/// on it with the guest down).
const POLL: Duration = Duration::from_millis(5);
/// Lines of `qemu.log` kept in errors and [`ExitInfo`].
const TAIL_LINES: usize = 20;
/// Bytes of `qemu.log` read for a tail.
const TAIL_BYTES: u64 = 16 * 1024;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// Not known: we were not its parent (after [`attach`]).
    Unknown,
}

impl From<std::process::ExitStatus> for ProcessExit {
    fn from(s: std::process::ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(c), _) => Self::Code(c),
            (None, Some(sig)) => Self::Signal(sig),
            (None, None) => Self::Unknown,
        }
    }
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => match signal_name(*s) {
                Some(name) => write!(f, "killed by {name}"),
                None => write!(f, "killed by signal {s}"),
            },
            Self::Unknown => f.write_str("exit status unknown"),
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// How and why a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code or signal, if known.
    pub status: ProcessExit,
    /// The last `SHUTDOWN` event seen, with its reason (`host-qmp-quit`,
    /// `guest-shutdown`, ...). `None` if QEMU died without one (killed,
    /// crashed) or it came before we attached.
    pub shutdown: Option<ShutdownInfo>,
    /// The last lines of `qemu.log`.
    pub log_tail: String,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QEMU ended ({})", self.status)?;
        if let Some(s) = &self.shutdown {
            write!(f, " after a shutdown ({})", s.reason)?;
        }
        if !self.log_tail.is_empty() {
            write!(f, "; its log ends with: {}", self.log_tail)?;
        }
        Ok(())
    }
}

/// A running QEMU process and its QMP connection.
///
/// Dropping it stops watching and closes QMP (once no clone of its [`Qmp`]
/// is left: QEMU serves one QMP client at a time, so a clone kept alive
/// would block a later [`attach`]); QEMU keeps running and can be found
/// again with [`attach`].
pub struct QemuVm {
    pid: i32,
    run_dir: PathBuf,
    qmp: Qmp,
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<ExitInfo>>,
    watcher: AbortHandle,
    spawned: bool,
}

impl fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuVm")
            .field("pid", &self.pid)
            .field("run_dir", &self.run_dir)
            .field("spawned", &self.spawned)
            .finish()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        // Stops watching only. A spawned child left unwaited is reaped by
        // tokio in the background once it exits.
        self.watcher.abort();
    }
}

impl QemuVm {
    /// QEMU's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The QMP session.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// This process started QEMU (so exit statuses are known), rather than
    /// attaching to it.
    pub fn spawned(&self) -> bool {
        self.spawned
    }

    /// Kills QEMU with SIGKILL: the last resort, the guest loses what it had
    /// not written. Succeeds if QEMU is already gone.
    pub fn kill(&self) -> Result<(), QemuError> {
        // Through the pidfd, so a recycled pid can never be hit.
        match rustix::process::pidfd_send_signal(&*self.pidfd, Signal::KILL) {
            Ok(()) => {
                info!(pid = self.pid, "killed QEMU");
                Ok(())
            }
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(QemuError::Process {
                action: "kill",
                pid: self.pid,
                source: e.into(),
            }),
        }
    }

    /// Waits until QEMU has exited and tells how.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(info) => info.clone().unwrap_or_else(|| unknown_exit(&self.run_dir)),
            // The watcher only stops when `self` is dropped, so this is not
            // reached while `self` is borrowed.
            Err(_) => unknown_exit(&self.run_dir),
        }
    }

    /// How QEMU exited, if it has.
    pub fn exited(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// A channel that turns `Some` when QEMU exits, to `select!` on.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// A second reference to QEMU's open file of tap `ifname` (the same
    /// open file, taken with `pidfd_getfd`), or `None` if QEMU has no such
    /// file. Held while QEMU is replaced and given to the next one
    /// ([`crate::NicConfig::fd`]), it keeps the tap attached: frames for the
    /// guest queue in the tap instead of being dropped while no QEMU reads.
    pub fn tap_file(&self, ifname: &str) -> Result<Option<OwnedFd>, QemuError> {
        let failed = |source: io::Error| QemuError::Process {
            action: "find the tap file of",
            pid: self.pid,
            source,
        };
        let dir = format!("/proc/{}/fdinfo", self.pid);
        for entry in fs::read_dir(&dir).map_err(failed)? {
            let Ok(entry) = entry else { continue };
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // Files closed meanwhile simply do not match.
            let Ok(info) = fs::read_to_string(entry.path()) else {
                continue;
            };
            if tun_interface(&info) != Some(ifname) {
                continue;
            }
            return rustix::process::pidfd_getfd(
                &*self.pidfd,
                fd,
                rustix::process::PidfdGetfdFlags::empty(),
            )
            .map(Some)
            .map_err(|e| failed(e.into()));
        }
        Ok(None)
    }
}

/// The interface a tun/tap file is attached to, from its `fdinfo` (the
/// kernel's `iff:` line), if the file is one.
fn tun_interface(fdinfo: &str) -> Option<&str> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(str::trim)
}

fn unknown_exit(run_dir: &Path) -> ExitInfo {
    ExitInfo {
        status: ProcessExit::Unknown,
        shutdown: None,
        log_tail: log_tail(&run_dir.join(files::QEMU_LOG), None),
    }
}

/// Starts QEMU for `cfg` and returns it connected over QMP, still paused
/// (`-S`): subscribe to events, then `cont`.
///
/// Creates the run directory, refuses if a QEMU already runs there, removes
/// stale sockets, and appends QEMU's stdout and stderr to `qemu.log`. QEMU
/// runs in a new session so it survives the caller. If QEMU exits before it
/// is ready, the error holds its last log lines; if it does not get ready in
/// `cfg.start_timeout`, it is killed.
pub async fn launch(cfg: &VmConfig) -> Result<QemuVm, QemuError> {
    let args = cfg.to_args()?;
    let run_dir = cfg.run_dir.clone();
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| QemuError::Io {
            action,
            path,
            source,
        }
    };

    fs::create_dir_all(&run_dir).map_err(io_err("create run directory", &run_dir))?;
    // The sockets there control the VM.
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("set permissions of", &run_dir))?;
    if let Some(pid) = live_qemu_pid(&run_dir) {
        return Err(QemuError::AlreadyRunning { pid, run_dir });
    }
    for f in [
        files::QMP_SOCKET,
        files::CONSOLE_SOCKET,
        files::GUEST_SOCKET,
        files::PIDFILE,
    ] {
        let p = run_dir.join(f);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove stale", &p)(e));
            }
            _ => {}
        }
    }

    let log_path = run_dir.join(files::QEMU_LOG);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err("open", &log_path))?;
    writeln!(
        log,
        "--- skyvisor: {} starting {} {}",
        unix_now(),
        cfg.qemu_binary.display(),
        args.join(" ")
    )
    .map_err(io_err("write", &log_path))?;
    let start_offset = log.metadata().map_err(io_err("stat", &log_path))?.len();
    let stdout = log.try_clone().map_err(io_err("open", &log_path))?;

    let mut cmd = Command::new(&cfg.qemu_binary);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(log)
        .kill_on_drop(false);
    // Tap files QEMU inherits (`fd=`): opened close-on-exec like every file
    // here, so only the child's copies are made inheritable.
    let inherited: Vec<i32> = cfg.nics.iter().filter_map(|n| n.fd).collect();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the setsid and fcntl system calls, which are async-signal-safe,
    // on its own copies of the descriptors; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            // Own session: no signals from the caller's terminal or process
            // group reach QEMU.
            rustix::process::setsid().map_err(io::Error::from)?;
            for fd in &inherited {
                let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
                    .map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            QemuError::BinaryNotFound {
                path: cfg.qemu_binary.clone(),
            }
        } else {
            QemuError::Spawn {
                path: cfg.qemu_binary.clone(),
                source,
            }
        }
    })?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| QemuError::Process {
            action: "find the pid of",
            pid: 0,
            source: io::Error::other("the process exited and was reaped"),
        })?;
    info!(pid, name = %cfg.name, run_dir = %run_dir.display(), "started QEMU");

    let ready = async {
        // The child is not reaped before we wait for it, so the pid is ours.
        let pidfd = open_pidfd(pid)?;
        let qmp = wait_for_qmp(&mut child, cfg, &log_path, start_offset).await?;
        Ok::<_, QemuError>((pidfd, qmp))
    };
    let (pidfd, qmp) = match ready.await {
        Ok(r) => r,
        Err(e) => {
            // Never leave a half-started QEMU behind.
            let _ = child.start_kill();
            let _ = tokio::time::timeout(EXIT_GRACE, child.wait()).await;
            return Err(e);
        }
    };

    let events = qmp.events();
    let (tx, rx) = watch::channel(None);
    let watcher = tokio::spawn(watch_exit(
        ExitSource::Child(child),
        events,
        log_path,
        Some(start_offset),
        tx,
    ))
    .abort_handle();
    Ok(QemuVm {
        pid,
        run_dir,
        qmp,
        pidfd: Arc::new(pidfd),
        exit: rx,
        watcher,
        spawned: true,
    })
}

async fn wait_for_qmp(
    child: &mut Child,
    cfg: &VmConfig,
    log_path: &Path,
    offset: u64,
) -> Result<Qmp, QemuError> {
    let path = cfg.qmp_socket();
    let run_dir = &cfg.run_dir;
    let opts = QmpOptions {
        command_timeout: cfg.qmp_command_timeout,
    };
    let started = Instant::now();
    let deadline = started + cfg.start_timeout;
    let start_failed = |status: std::process::ExitStatus| QemuError::StartFailed {
        status: status.into(),
        stderr_tail: log_tail(log_path, Some(offset)),
    };
    let qmp_err = |source| QemuError::Qmp {
        run_dir: run_dir.clone(),
        source,
    };
    loop {
        if let Some(status) = child.try_wait().map_err(|source| QemuError::Process {
            action: "check on",
            pid: child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0),
            source,
        })? {
            return Err(start_failed(status));
        }
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                let remaining = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1));
                let err = match tokio::time::timeout(remaining, Qmp::handshake(stream, &path, opts))
                    .await
                {
                    Ok(Ok(qmp)) => {
                        debug!(waited = ?started.elapsed(), "QEMU ready");
                        return Ok(qmp);
                    }
                    Ok(Err(e)) => qmp_err(e),
                    Err(_) => QemuError::StartTimeout {
                        path,
                        waited: started.elapsed(),
                    },
                };
                // QEMU opens its sockets before it builds the machine, so a
                // bad kernel path or device shows as a hang-up here: prefer
                // QEMU's own explanation.
                return match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                    Ok(Ok(status)) => Err(start_failed(status)),
                    _ => Err(err),
                };
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(source) => return Err(qmp_err(QmpError::Connect { path, source })),
        }
        if Instant::now() >= deadline {
            return Err(QemuError::StartTimeout {
                path,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Connects to the QEMU that an earlier process started in `run_dir`, with
/// default QMP options.
pub async fn attach(run_dir: &Path) -> Result<QemuVm, QemuError> {
    attach_with(run_dir, QmpOptions::default()).await
}

/// Connects to the QEMU that an earlier process started in `run_dir`: reads
/// its pidfile, checks that the process is alive and is that QEMU, and
/// connects QMP. Exit statuses are unknown afterwards (we are not its
/// parent); exits are still seen, through a pidfd.
pub async fn attach_with(run_dir: &Path, opts: QmpOptions) -> Result<QemuVm, QemuError> {
    let not_running = |reason: String| QemuError::NotRunning {
        run_dir: run_dir.to_owned(),
        reason,
    };
    let pidfile = run_dir.join(files::PIDFILE);
    let pid = match fs::read_to_string(&pidfile) {
        Ok(s) => s
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                not_running(format!(
                    "pidfile {} holds {:?}, not a pid",
                    pidfile.display(),
                    s.trim()
                ))
            })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(not_running(format!("no pidfile {}", pidfile.display())));
        }
        Err(source) => {
            return Err(QemuError::Io {
                action: "read",
                path: pidfile,
                source,
            });
        }
    };
    // Open the pidfd first: from then on the pid cannot be recycled under us.
    let pidfd = open_pidfd(pid).map_err(|e| match e {
        QemuError::Process { source, .. }
            if source.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) =>
        {
            not_running(format!("process {pid} has exited"))
        }
        other => other,
    })?;
    match process_identity(pid, run_dir) {
        Identity::Ours => {}
        Identity::Gone => return Err(not_running(format!("process {pid} has exited"))),
        Identity::Other => {
            return Err(QemuError::PidMismatch {
                pid,
                run_dir: run_dir.to_owned(),
            });
        }
    }
    let qmp = Qmp::connect(&run_dir.join(files::QMP_SOCKET), opts)
        .await
        .map_err(|source| QemuError::Qmp {
            run_dir: run_dir.to_owned(),
            source,
        })?;
    info!(pid, run_dir = %run_dir.display(), "attached to QEMU");

    let dup = pidfd.try_clone().map_err(|source| QemuError::Process {
        action: "watch",
        pid,
        source,
    })?;
    // SAFETY: `dup` is an open pidfd that the AsyncFd owns (and so keeps
    // open and unchanged) for its whole life.
    let afd = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }.map_err(|e| {
        QemuError::Process {
            action: "watch",
            pid,
            source: e.into_parts().1,
        }
    })?;
    let events = qmp.events();
    let (tx, rx) = watch::channel(None);
    let watcher = tokio::spawn(watch_exit(
        ExitSource::Pidfd(afd),
        events,
        run_dir.join(files::QEMU_LOG),
        None,
        tx,
    ))
    .abort_handle();
    Ok(QemuVm {
        pid,
        run_dir: run_dir.to_owned(),
        qmp,
        pidfd: Arc::new(pidfd),
        exit: rx,
        watcher,
        spawned: false,
    })
}

fn open_pidfd(pid: i32) -> Result<OwnedFd, QemuError> {
    let p = Pid::from_raw(pid).ok_or_else(|| QemuError::Process {
        action: "open a pidfd for",
        pid,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    rustix::process::pidfd_open(p, PidfdFlags::empty()).map_err(|e| QemuError::Process {
        action: "open a pidfd for",
        pid,
        source: e.into(),
    })
}

enum Identity {
    Ours,
    Other,
    Gone,
}

/// Is `pid` the QEMU of `run_dir`? Its command line names our QMP socket.
fn process_identity(pid: i32, run_dir: &Path) -> Identity {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // A zombie has an empty command line: it is gone, not someone else.
    match fs::read_to_string(proc_dir.join("stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if matches!(state, Some('Z' | 'X')) {
                return Identity::Gone;
            }
        }
        Err(_) => return Identity::Gone,
    }
    let Ok(cmdline) = fs::read(proc_dir.join("cmdline")) else {
        return Identity::Gone;
    };
    let Some(qmp) = run_dir.join(files::QMP_SOCKET).to_str().map(esc) else {
        return Identity::Other;
    };
    let needle = format!("path={qmp},");
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(&needle));
    if ours {
        Identity::Ours
    } else {
        Identity::Other
    }
}

/// The pid of a live QEMU of `run_dir`, if there is one.
fn live_qemu_pid(run_dir: &Path) -> Option<i32> {
    let pid = fs::read_to_string(run_dir.join(files::PIDFILE))
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    (pid > 0 && matches!(process_identity(pid, run_dir), Identity::Ours)).then_some(pid)
}

enum ExitSource {
    Child(Child),
    Pidfd(AsyncFd<OwnedFd>),
}

impl ExitSource {
    async fn wait(&mut self) -> ProcessExit {
        match self {
            Self::Child(c) => match c.wait().await {
                Ok(s) => s.into(),
                Err(e) => {
                    warn!(error = %e, "cannot wait for QEMU");
                    ProcessExit::Unknown
                }
            },
            // A pidfd turns readable when the process exits.
            Self::Pidfd(fd) => match fd.readable().await {
                Ok(_) => ProcessExit::Unknown,
                Err(e) => {
                    warn!(error = %e, "cannot poll the pidfd of QEMU");
                    std::future::pending().await
                }
            },
        }
    }
}

async fn watch_exit(
    mut source: ExitSource,
    mut events: EventStream,
    log_path: PathBuf,
    offset: Option<u64>,
    tx: watch::Sender<Option<ExitInfo>>,
) {
    fn record(shutdown: &mut Option<ShutdownInfo>, ev: &crate::qmp::QmpEvent) {
        if let EventKind::Shutdown(info) = ev.kind() {
            *shutdown = Some(info);
        }
    }
    let mut shutdown = None;
    let mut events_open = true;
    let status = loop {
        tokio::select! {
            status = source.wait() => break status,
            ev = events.recv(), if events_open => match ev {
                Ok(ev) => record(&mut shutdown, &ev),
                Err(EventStreamError::Lagged { .. }) => {}
                Err(EventStreamError::Closed) => events_open = false,
            },
        }
    };
    if events_open {
        let drain = async {
            loop {
                match events.recv().await {
                    Ok(ev) => record(&mut shutdown, &ev),
                    Err(EventStreamError::Lagged { .. }) => {}
                    Err(EventStreamError::Closed) => break,
                }
            }
        };
        let _ = tokio::time::timeout(EVENT_DRAIN, drain).await;
    }
    let info = ExitInfo {
        status,
        shutdown,
        log_tail: log_tail(&log_path, offset),
    };
    info!(%info, "QEMU exited");
    tx.send_replace(Some(info));
}

/// The last lines of `path` from `offset` on (or of the whole file).
pub(crate) fn log_tail(path: &Path, offset: Option<u64>) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let start = offset
            .unwrap_or(0)
            .max(len.saturating_sub(TAIL_BYTES))
            .min(len);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => tail_lines(&text, TAIL_LINES),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with("--- skyvisor:"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_well() {
        assert_eq!(ProcessExit::Code(1).to_string(), "exit code 1");
        assert_eq!(ProcessExit::Signal(9).to_string(), "killed by SIGKILL");
        assert_eq!(ProcessExit::Signal(64).to_string(), "killed by signal 64");
        assert_eq!(
            ProcessExit::from(std::process::ExitStatus::from_raw(9)),
            ProcessExit::Signal(9)
        );
        assert_eq!(
            ProcessExit::from(std::process::ExitStatus::from_raw(3 << 8)),
            ProcessExit::Code(3)
        );
    }

    #[test]
    fn tun_files_are_told_by_their_fdinfo() {
        let tap = "pos:\t0\nflags:\t02004002\nmnt_id:\t25\nino:\t1061\niff:\tsvt0123\n";
        assert_eq!(tun_interface(tap), Some("svt0123"));
        let file = "pos:\t0\nflags:\t02100002\nmnt_id:\t25\nino:\t77\n";
        assert_eq!(tun_interface(file), None);
        // A tun file not yet attached to an interface names none.
        assert_eq!(tun_interface("pos:\t0\niff:\t\n"), Some(""));
    }

    #[test]
    fn log_tails_skip_our_headers_and_keep_the_end() {
        let text = "--- skyvisor: 1 starting qemu\nfirst\n\nsecond\nthird\n";
        assert_eq!(tail_lines(text, 2), "second\nthird");
        assert_eq!(tail_lines(text, 10), "first\nsecond\nthird");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("qemu.log");
        fs::write(&p, "old run\n--- skyvisor: 2 starting\nnew run\n").expect("write");
        assert_eq!(log_tail(&p, None), "old run\nnew run");
        assert_eq!(log_tail(&p, Some(8)), "new run");
        assert!(log_tail(&dir.path().join("missing"), None).starts_with("(cannot read"));
    }

    #[test]
    fn our_own_process_is_not_a_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = i32::try_from(std::process::id()).expect("pid");
        assert!(matches!(process_identity(me, dir.path()), Identity::Other));
        fs::write(dir.path().join(files::PIDFILE), format!("{me}\n")).expect("write");
        assert_eq!(live_qemu_pid(dir.path()), None);
    }
}
