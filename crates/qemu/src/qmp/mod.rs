//! A QMP client: QEMU's JSON control protocol over a unix socket.
//!
//! Hand-written rather than built on the `qapi` crate: Skyvisor needs a few
//! dozen commands, whose shapes we check against QEMU 10's own schema
//! (`query-qmp-schema`), while `qapi`'s generated schema lags QEMU releases
//! and brings a large generated API and its own async plumbing. Here one
//! reader task and one writer task own the socket; commands carry an `id`
//! and are matched to answers by it, so any number of callers may run
//! commands at once; events go to every subscriber through a broadcast
//! channel.
//!
//! This module speaks QMP only: it must never start or signal processes nor
//! know about VMs' files (that is [`crate::process`]).

mod commands;
pub mod event;
pub mod types;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::{debug, trace, warn};

use crate::error::QmpError;
pub use event::{BlockJobEvent, EventKind, EventStream, EventStreamError, QmpEvent, ShutdownInfo};
pub use types::*;

/// QEMU sends each message on one line; the largest (`query-qmp-schema`)
/// is a few hundred KiB. Longer lines are dropped rather than buffered.
const MAX_LINE: usize = 16 * 1024 * 1024;

/// Events kept for a subscriber that has not read them yet.
const EVENT_BUFFER: usize = 1024;

/// Client settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmpOptions {
    /// How long a command (and the greeting) may take.
    pub command_timeout: Duration,
}

impl Default for QmpOptions {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// What QEMU said when we connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version.
    pub version: VersionTriple,
    /// The distribution's package version.
    pub package: String,
    /// QMP capabilities offered (e.g. `oob`); none are enabled.
    pub capabilities: Vec<String>,
}

/// A connected QMP session. Cheap to clone; the connection closes when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.inner.path)
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// A command line for the writer task, with a file descriptor to pass
/// along it (`SCM_RIGHTS`) for commands like `add-fd`.
struct Outgoing {
    line: String,
    fd: Option<OwnedFd>,
}

struct Inner {
    path: PathBuf,
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Outgoing>,
    next_id: AtomicU64,
    opts: QmpOptions,
    greeting: Greeting,
    tasks: [AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the socket lets another client (a restarted agent) connect:
        // QEMU serves one QMP client at a time.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// State shared with the reader and writer tasks.
struct Shared {
    state: Mutex<State>,
    closed: watch::Sender<bool>,
}

struct State {
    open: bool,
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// `None` once closed: dropping the sender ends every subscription after
    /// the events already sent.
    events: Option<broadcast::Sender<QmpEvent>>,
}

type Reply = Result<Value, ErrorBody>;

struct ErrorBody {
    class: String,
    desc: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every
        // critical section is a single map or flag update.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection closed: waiting commands fail as disconnected,
    /// subscribers see the end of their stream.
    fn close(&self) {
        let mut st = self.lock();
        st.open = false;
        st.pending.clear();
        st.events = None;
        drop(st);
        self.closed.send_replace(true);
    }

    fn dispatch(&self, line: &str) {
        trace!(%line, "QMP received");
        let Ok(Value::Object(mut msg)) = serde_json::from_str::<Value>(line) else {
            warn!(%line, "QMP sent something that is not a JSON object; ignored");
            return;
        };
        if msg.contains_key("event") {
            match QmpEvent::from_message(&msg) {
                Some(ev) => {
                    debug!(event = %ev.name, data = %ev.data, "QMP event");
                    if let Some(tx) = &self.lock().events {
                        // No subscribers is fine.
                        let _ = tx.send(ev);
                    }
                }
                None => warn!(%line, "malformed QMP event; ignored"),
            }
            return;
        }
        let reply = if let Some(r) = msg.remove("return") {
            Ok(r)
        } else if let Some(e) = msg.remove("error") {
            let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            Err(ErrorBody {
                class: field("class"),
                desc: field("desc"),
            })
        } else {
            warn!(%line, "QMP message is neither an answer nor an event; ignored");
            return;
        };
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            warn!(%line, "QMP answer without a command id; ignored");
            return;
        };
        match self.lock().pending.remove(&id) {
            // The caller may have given up (timeout) in the meantime.
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => debug!(id, "answer to an abandoned QMP command"),
        }
    }
}

/// Removes a command's slot when its caller stops waiting, whatever the
/// reason (answer, timeout, cancellation).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path` and negotiates capabilities.
    pub async fn connect(path: &Path, opts: QmpOptions) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::handshake(stream, path, opts).await
    }

    /// Runs the QMP handshake on a connected socket: reads the greeting and
    /// sends `qmp_capabilities`.
    pub async fn handshake(
        stream: UnixStream,
        path: &Path,
        opts: QmpOptions,
    ) -> Result<Self, QmpError> {
        let (rd, wr) = stream.into_split();
        let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
        let hs = |reason: String| QmpError::Handshake { reason };
        let first = match tokio::time::timeout(opts.command_timeout, lines.next()).await {
            Err(_) => {
                return Err(hs(format!(
                    "no greeting within {:?} (is another client connected?)",
                    opts.command_timeout
                )));
            }
            Ok(None) => return Err(hs("connection closed before the greeting".into())),
            Ok(Some(Err(e))) => return Err(hs(format!("reading the greeting: {e}"))),
            Ok(Some(Ok(line))) => line,
        };
        let greeting =
            parse_greeting(&first).ok_or_else(|| hs(format!("not a QMP greeting: {first}")))?;

        let (closed, _) = watch::channel(false);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                open: true,
                pending: HashMap::new(),
                events: Some(events),
            }),
            closed,
        });
        let (out, out_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(lines, shared.clone())).abort_handle();
        let writer = tokio::spawn(write_loop(wr, out_rx, shared.clone())).abort_handle();
        let qmp = Qmp {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                shared,
                out,
                next_id: AtomicU64::new(1),
                opts,
                greeting,
                tasks: [reader, writer],
            }),
        };
        qmp.execute("qmp_capabilities", Value::Null)
            .await
            .map_err(|e| hs(format!("qmp_capabilities: {e}")))?;
        debug!(path = %path.display(), version = %qmp.inner.greeting.version, "QMP connected");
        Ok(qmp)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// What QEMU said when we connected.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// The connection is still open.
    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().open
    }

    /// Resolves when the connection is closed (QEMU exited or closed it).
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed.subscribe();
        // The sender lives as long as `self`, so this only ends on close.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// A subscription to events from now on. After the connection closed,
    /// the stream ends at once.
    pub fn events(&self) -> EventStream {
        match &self.inner.shared.lock().events {
            Some(tx) => EventStream { rx: tx.subscribe() },
            None => {
                let (tx, rx) = broadcast::channel(1);
                drop(tx);
                EventStream { rx }
            }
        }
    }

    /// Runs `command` with `args` (`Value::Null` for none) and returns its
    /// answer, within the default command timeout.
    pub async fn execute(&self, command: &str, args: Value) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, args, self.inner.opts.command_timeout)
            .await
    }

    /// Runs `command` and decodes its answer as `T`.
    pub async fn execute_as<T: DeserializeOwned>(
        &self,
        command: &str,
        args: Value,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, args).await?;
        serde_json::from_value(v).map_err(|source| QmpError::Decode {
            command: command.to_owned(),
            source,
        })
    }

    /// Runs `command` and waits for its answer at most `timeout`. A command
    /// that timed out may still take effect in QEMU later.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, args, None, timeout).await
    }

    /// Runs `command` with a file descriptor passed along (`SCM_RIGHTS`),
    /// as `add-fd` and `getfd` want. QEMU takes its own copy; `fd` is
    /// closed here once sent.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        args: Value,
        fd: OwnedFd,
    ) -> Result<Value, QmpError> {
        self.send(command, args, Some(fd), self.inner.opts.command_timeout)
            .await
    }

    async fn send(
        &self,
        command: &str,
        args: Value,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.lock();
            if !st.open {
                return Err(QmpError::Disconnected {
                    command: Some(command.to_owned()),
                });
            }
            st.pending.insert(id, tx);
        }
        let _guard = PendingGuard { shared, id };

        let mut msg = Map::new();
        msg.insert("execute".into(), command.into());
        if !args.is_null() {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), id.into());
        let mut line = Value::Object(msg).to_string();
        line.push('\n');
        debug!(command, id, "QMP command");
        // The writer task writes whole lines, so a caller that gives up
        // half-way can never leave half a command on the socket.
        if self.inner.out.send(Outgoing { line, fd }).is_err() {
            return Err(QmpError::Disconnected {
                command: Some(command.to_owned()),
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                after: timeout,
            }),
            Ok(Err(_)) => Err(QmpError::Disconnected {
                command: Some(command.to_owned()),
            }),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(QmpError::Command {
                command: command.to_owned(),
                class: e.class,
                desc: e.desc,
            }),
        }
    }
}

fn parse_greeting(line: &str) -> Option<Greeting> {
    let v: Value = serde_json::from_str(line).ok()?;
    let qmp = v.get("QMP")?;
    let version = qmp.get("version")?;
    Some(Greeting {
        version: VersionTriple::deserialize(version.get("qemu")?).ok()?,
        package: version
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        capabilities: qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|caps| {
                caps.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

async fn read_loop(mut lines: FramedRead<OwnedReadHalf, LinesCodec>, shared: Arc<Shared>) {
    while let Some(item) = lines.next().await {
        match item {
            Ok(line) => shared.dispatch(&line),
            // The codec skips the rest of the line and goes on; the command
            // it answered (if any) times out.
            Err(LinesCodecError::MaxLineLengthExceeded) => {
                warn!("QMP message longer than {MAX_LINE} bytes dropped")
            }
            Err(LinesCodecError::Io(e)) => {
                debug!(error = %e, "QMP read failed");
                break;
            }
        }
    }
    debug!("QMP connection closed");
    shared.close();
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    while let Some(out) = rx.recv().await {
        let mut rest = out.line.as_bytes();
        if let Some(fd) = &out.fd {
            // The descriptor travels with the first bytes of the line.
            match send_with_fd(&wr, rest, fd).await {
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(e) => {
                    debug!(error = %e, "QMP write with a file descriptor failed");
                    shared.close();
                    return;
                }
            }
        }
        if let Err(e) = wr.write_all(rest).await {
            debug!(error = %e, "QMP write failed");
            shared.close();
            return;
        }
    }
}

/// Sends `bytes` (at least one) with `fd` attached as `SCM_RIGHTS`;
/// returns how many bytes went.
async fn send_with_fd(wr: &OwnedWriteHalf, bytes: &[u8], fd: &OwnedFd) -> std::io::Result<usize> {
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;

    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let stream: &tokio::net::UnixStream = wr.as_ref();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd.as_fd()];
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(std::io::Error::other("no room for the file descriptor"));
            }
            sendmsg(
                stream,
                &[std::io::IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
