//! A fake QMP server on a unix socket, for tests without QEMU.
//!
//! It greets like QEMU 10, negotiates capabilities, keeps a tiny run state
//! (`cont`/`stop`/`query-status`, with `RESUME`/`STOP` events; `quit` emits
//! `SHUTDOWN` and hangs up) and answers anything else with QEMU's
//! `CommandNotFound` unless a test scripted a reply. Tests can emit events,
//! delay or withhold answers, answer out of order and hang up. Like QEMU it
//! serves one client at a time.
//!
//! Test code only: it must never be used to stand in for QEMU outside tests.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, LinesCodec};

/// How the fake answers a command.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeReply {
    /// `{"return": value}`.
    Return(Value),
    /// `{"error": {"class": .., "desc": ..}}`.
    Error {
        /// QEMU's error class.
        class: String,
        /// The message.
        desc: String,
    },
    /// No answer ever (to test timeouts).
    Never,
    /// The reply after a delay; later commands are answered meanwhile, so
    /// answers arrive out of order.
    Delayed(Duration, Box<FakeReply>),
    /// Hang up instead of answering.
    Disconnect,
}

/// A command the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedCommand {
    /// Its name.
    pub command: String,
    /// Its arguments (`null` when none).
    pub arguments: Value,
}

enum Out {
    Line(String),
    Close,
}

struct FakeState {
    running: bool,
    status: String,
    scripts: HashMap<String, FakeReply>,
    received: Vec<ReceivedCommand>,
    conn: Option<mpsc::UnboundedSender<Out>>,
    connections: u64,
}

type Ctl = Arc<Mutex<FakeState>>;

fn lock(ctl: &Ctl) -> MutexGuard<'_, FakeState> {
    ctl.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running fake server. Dropping it stops it.
pub struct FakeQmp {
    path: PathBuf,
    ctl: Ctl,
    task: AbortHandle,
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeQmp {
    /// Listens on `path` (removing a stale socket there). Must be called
    /// inside a tokio runtime.
    pub fn start(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        let ctl: Ctl = Arc::new(Mutex::new(FakeState {
            running: false,
            status: "prelaunch".into(),
            scripts: HashMap::new(),
            received: Vec::new(),
            conn: None,
            connections: 0,
        }));
        let task = tokio::spawn(accept_loop(listener, ctl.clone())).abort_handle();
        Ok(Self {
            path: path.to_owned(),
            ctl,
            task,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers every later `command` with `reply` instead of the default.
    pub fn script(&self, command: &str, reply: FakeReply) {
        lock(&self.ctl).scripts.insert(command.to_owned(), reply);
    }

    /// Sends an event to the connected client; false if none is connected.
    pub fn emit(&self, name: &str, data: Value) -> bool {
        match &lock(&self.ctl).conn {
            Some(tx) => tx.send(Out::Line(event_line(name, data))).is_ok(),
            None => false,
        }
    }

    /// Hangs up on the connected client, as QEMU exiting would.
    pub fn disconnect(&self) {
        if let Some(tx) = lock(&self.ctl).conn.take() {
            let _ = tx.send(Out::Close);
        }
    }

    /// The commands received so far, `qmp_capabilities` included.
    pub fn received(&self) -> Vec<ReceivedCommand> {
        lock(&self.ctl).received.clone()
    }

    /// How many clients have connected so far.
    pub fn connections(&self) -> u64 {
        lock(&self.ctl).connections
    }

    /// Sets what `query-status` answers.
    pub fn set_status(&self, running: bool, status: &str) {
        let mut st = lock(&self.ctl);
        st.running = running;
        st.status = status.to_owned();
    }
}

async fn accept_loop(listener: UnixListener, ctl: Ctl) {
    while let Ok((stream, _)) = listener.accept().await {
        serve(stream, &ctl).await;
    }
}

async fn serve(stream: UnixStream, ctl: &Ctl) {
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut st = lock(ctl);
        st.conn = Some(tx.clone());
        st.connections += 1;
    }
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0},
                                               "package": "skyvisor-fake"},
                                   "capabilities": ["oob"]}});
    if wr
        .write_all(format!("{greeting}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut lines = FramedRead::new(rd, LinesCodec::new());
    loop {
        tokio::select! {
            line = lines.next() => match line {
                Some(Ok(line)) => handle(&line, ctl, &tx),
                _ => break,
            },
            out = rx.recv() => match out {
                Some(Out::Line(s)) => {
                    if wr.write_all(s.as_bytes()).await.is_err() {
                        break;
                    }
                }
                Some(Out::Close) | None => break,
            },
        }
    }
    lock(ctl).conn = None;
}

fn handle(line: &str, ctl: &Ctl, tx: &mpsc::UnboundedSender<Out>) {
    let Ok(msg) = serde_json::from_str::<Value>(line) else {
        let err = json!({"error": {"class": "GenericError", "desc": "JSON parse error"}});
        let _ = tx.send(Out::Line(format!("{err}\n")));
        return;
    };
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let command = msg
        .get("execute")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let arguments = msg.get("arguments").cloned().unwrap_or(Value::Null);
    let mut st = lock(ctl);
    st.received.push(ReceivedCommand {
        command: command.clone(),
        arguments,
    });
    let scripted = st.scripts.get(&command).cloned();
    let emit = |name: &str, data: Value| {
        let _ = tx.send(Out::Line(event_line(name, data)));
    };
    let reply = match scripted {
        Some(r) => r,
        None => match command.as_str() {
            "qmp_capabilities" => FakeReply::Return(json!({})),
            "query-status" => {
                FakeReply::Return(json!({"running": st.running, "status": st.status}))
            }
            "cont" => {
                st.running = true;
                st.status = "running".into();
                emit("RESUME", json!({}));
                FakeReply::Return(json!({}))
            }
            "stop" => {
                st.running = false;
                st.status = "paused".into();
                emit("STOP", json!({}));
                FakeReply::Return(json!({}))
            }
            "system_reset" => {
                emit(
                    "RESET",
                    json!({"guest": false, "reason": "host-qmp-system-reset"}),
                );
                FakeReply::Return(json!({}))
            }
            "system_powerdown" => {
                emit("POWERDOWN", json!({}));
                FakeReply::Return(json!({}))
            }
            "quit" => {
                emit(
                    "SHUTDOWN",
                    json!({"guest": false, "reason": "host-qmp-quit"}),
                );
                respond(FakeReply::Return(json!({})), id, tx.clone());
                let _ = tx.send(Out::Close);
                return;
            }
            "query-version" => FakeReply::Return(
                json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "skyvisor-fake"}),
            ),
            "query-migrate" => FakeReply::Return(json!({})),
            other => FakeReply::Error {
                class: "CommandNotFound".into(),
                desc: format!("The command {other} has not been found"),
            },
        },
    };
    drop(st);
    respond(reply, id, tx.clone());
}

fn respond(reply: FakeReply, id: Value, tx: mpsc::UnboundedSender<Out>) {
    let line = |v: Value| Out::Line(format!("{v}\n"));
    let _ = match reply {
        FakeReply::Return(v) => tx.send(line(json!({"return": v, "id": id}))),
        FakeReply::Error { class, desc } => tx.send(line(
            json!({"error": {"class": class, "desc": desc}, "id": id}),
        )),
        FakeReply::Never => Ok(()),
        FakeReply::Disconnect => tx.send(Out::Close),
        FakeReply::Delayed(d, r) => {
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                respond(*r, id, tx);
            });
            Ok(())
        }
    };
}

fn event_line(name: &str, data: Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ev = json!({"event": name, "data": data,
                    "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}});
    format!("{ev}\n")
}
