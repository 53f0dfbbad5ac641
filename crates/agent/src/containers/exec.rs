//! Commands run in a container: `vm exec` (output captured, with a
//! timeout) and `vm exec -t` (a terminal of its own, relayed as
//! [`skyvisor_core::exec_stream`] frames).

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use skyvisor_core::InstanceId;
use tokio::process::Command;

use super::ContainerDriver;

impl ContainerDriver {
    /// Whether instance `id`'s container runs here, as the runtime says.
    async fn ensure_running(&self, id: &InstanceId) -> Result<(), ExecError> {
        let state = self
            .runtime_cmd(&["state", &Self::container_id(id)])
            .await
            .map_err(|_| ExecError::NotRunning)?;
        if state.contains("\"running\"") {
            Ok(())
        } else {
            Err(ExecError::NotRunning)
        }
    }

    /// Runs `req` in instance `id`'s running container, as its root, with
    /// the container's environment; gives what it did.
    pub async fn exec(
        &self,
        id: &InstanceId,
        req: &skyvisor_core::api::ExecRequest,
    ) -> Result<skyvisor_core::api::ExecResult, ExecError> {
        let timeout = req
            .validate()
            .map_err(|e| ExecError::Invalid(e.to_string()))?;
        self.ensure_running(id).await?;
        let cid = Self::container_id(id);
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root")
            .arg(&self.state_root)
            .arg("exec")
            .arg(&cid)
            .args(&req.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| ExecError::Failed(format!("starting {}: {e}", self.runtime.display())))?;
        let stdin = req.stdin.clone().unwrap_or_default();
        let mut input = child.stdin.take();
        let feed = async move {
            if let Some(w) = input.as_mut() {
                let _ = tokio::io::AsyncWriteExt::write_all(w, stdin.as_bytes()).await;
            }
            // Closed: the command sees the end of its input.
            drop(input);
        };
        let out = read_capped(child.stdout.take());
        let err = read_capped(child.stderr.take());
        let waited = tokio::time::timeout(Duration::from_secs(u64::from(timeout)), async {
            let ((), o, e, status) = tokio::join!(feed, out, err, child.wait());
            (o, e, status)
        })
        .await;
        match waited {
            Ok(((stdout, t1), (stderr, t2), status)) => {
                let code = status.ok().and_then(|s| s.code()).unwrap_or(-1);
                Ok(skyvisor_core::api::ExecResult {
                    exit_code: code,
                    stdout,
                    stderr,
                    timed_out: false,
                    truncated: t1 || t2,
                })
            }
            Err(_) => {
                // The runtime's exec and what it started, as one group.
                if let Some(pid) = child.id() {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait().await;
                Ok(skyvisor_core::api::ExecResult {
                    exit_code: 137,
                    timed_out: true,
                    ..Default::default()
                })
            }
        }
    }

    /// Checks that `req` can run with a terminal in instance `id`'s
    /// container: valid and the container running.
    pub async fn check_tty(
        &self,
        id: &InstanceId,
        req: &skyvisor_core::api::ExecRequest,
    ) -> Result<(), ExecError> {
        req.validate()
            .map_err(|e| ExecError::Invalid(e.to_string()))?;
        if req.stdin.is_some() {
            return Err(ExecError::Invalid(
                "stdin: a terminal session reads its input from the terminal".into(),
            ));
        }
        self.ensure_running(id).await
    }

    /// Runs `req` in instance `id`'s container on a terminal, relaying it
    /// over `stream` as [`skyvisor_core::exec_stream`] frames until the
    /// command ends (then its exit status) or the stream closes (then the
    /// command is killed).
    pub async fn tty_session<S>(
        &self,
        id: &InstanceId,
        req: &skyvisor_core::api::ExecRequest,
        stream: S,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        use skyvisor_core::exec_stream::{Decoder, Frame};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut from_client, mut to_client) = tokio::io::split(stream);
        let fail = |e: String| Frame::Data(format!("skyvisor: {e}\r\n").into_bytes());
        let pty = match nix::pty::openpty(None, None) {
            Ok(p) => p,
            Err(e) => {
                let _ = to_client
                    .write_all(&fail(format!("no terminal: {e}")).encode())
                    .await;
                let _ = to_client.write_all(&Frame::Exit(-1).encode()).await;
                return;
            }
        };
        let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
        let (Ok(i), Ok(o), Ok(e)) = (stdio(&pty.slave), stdio(&pty.slave), stdio(&pty.slave))
        else {
            let _ = to_client.write_all(&Frame::Exit(-1).encode()).await;
            return;
        };
        let mut cmd = Command::new(&self.runtime);
        cmd.arg("--root")
            .arg(&self.state_root)
            .arg("exec")
            .arg("--tty")
            .arg(Self::container_id(id))
            .args(&req.command)
            .stdin(i)
            .stdout(o)
            .stderr(e)
            .kill_on_drop(true);
        // The terminal is the runtime's controlling terminal, in a session
        // of its own.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = to_client
                    .write_all(&fail(format!("starting the runtime: {e}")).encode())
                    .await;
                let _ = to_client.write_all(&Frame::Exit(-1).encode()).await;
                return;
            }
        };
        // Only the command may hold the terminal's other end (the command
        // builder keeps copies until dropped): its end is the master's EOF.
        drop(cmd);
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        let Ok(master_in) = master.try_clone() else {
            let _ = child.start_kill();
            return;
        };
        let mut master_out = tokio::fs::File::from_std(master);
        let mut master_in = tokio::fs::File::from_std(master_in);
        // Keystrokes to the terminal.
        let input = tokio::spawn(async move {
            let mut decoder = Decoder::default();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(Frame::Data(d))) => {
                            if master_in.write_all(&d).await.is_err() {
                                return true;
                            }
                            let _ = master_in.flush().await;
                        }
                        Ok(Some(Frame::Exit(_))) | Ok(None) => break,
                        Err(_) => return false,
                    }
                }
            }
        });
        // Its output to the client, until the terminal closes (EIO once
        // the command and the runtime are gone).
        let mut buf = vec![0u8; 16 * 1024];
        let mut client_gone = false;
        loop {
            tokio::select! {
                read = master_out.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_client.write_all(&Frame::Data(buf[..n].to_vec()).encode()).await.is_err() {
                            client_gone = true;
                            break;
                        }
                    }
                },
                // The client hung up: the command goes with the session.
                _ = async { while !input.is_finished() { tokio::time::sleep(Duration::from_millis(50)).await; } } => {
                    if !matches!(child.try_wait(), Ok(Some(_))) {
                        client_gone = true;
                        break;
                    }
                }
            }
        }
        input.abort();
        if client_gone {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return;
        }
        let code = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
        let _ = to_client.write_all(&Frame::Exit(code).encode()).await;
        let _ = to_client.shutdown().await;
    }
}

/// Why an exec did not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The container is not running here.
    #[error("the container is not running")]
    NotRunning,
    /// The runtime failed.
    #[error("{0}")]
    Failed(String),
}

/// Reads a stream to its end, keeping the first
/// [`skyvisor_core::api::EXEC_MAX_IO_BYTES`]; says whether it cut.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let Some(mut r) = r else {
        return (String::new(), false);
    };
    let max = skyvisor_core::api::EXEC_MAX_IO_BYTES;
    let mut kept = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut cut = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                if n > room {
                    cut = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), cut)
}
