//! `vm exec -t`: this terminal relayed to a command's terminal in a
//! container, over the API's upgraded connection
//! ([`skyvisor_core::exec_stream`]).

use anyhow::{Context, Result};
use skyvisor_core::exec_stream::{Decoder, Frame, UPGRADE_PROTOCOL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Client;

/// Ctrl-]: ends the session from this side, as telnet's escape does.
const ESCAPE: u8 = 0x1d;

/// This terminal in raw mode while it lives (keystrokes go through as
/// typed, the remote terminal echoes); restored when dropped. Nothing when
/// standard input is not a terminal.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = nix::sys::termios::tcgetattr(&stdin) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        if nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw).is_err() {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Runs `command` on a terminal in container `name`; gives its exit status.
pub async fn exec_tty(
    client: &Client,
    name: &str,
    command: &[String],
    _timeout: u32,
) -> Result<i32> {
    let query = [("command", serde_json::to_string(command)?)];
    let stream = client
        .upgrade(
            &format!(
                "/v1/instances/{}/exec-tty",
                crate::client::path_segment(name)
            ),
            &query,
            UPGRADE_PROTOCOL,
        )
        .await?;
    let raw = RawMode::enter();
    let (mut from_remote, mut to_remote) = tokio::io::split(stream);
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let keys = &buf[..n];
            if let Some(i) = keys.iter().position(|b| *b == ESCAPE) {
                let _ = to_remote
                    .write_all(&Frame::Data(keys[..i].to_vec()).encode())
                    .await;
                let _ = to_remote.shutdown().await;
                return;
            }
            if to_remote
                .write_all(&Frame::Data(keys.to_vec()).encode())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut out = tokio::io::stdout();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let code = 'session: loop {
        let n = from_remote
            .read(&mut buf)
            .await
            .context("reading the session")?;
        if n == 0 {
            break None;
        }
        decoder.push(&buf[..n]);
        while let Some(frame) = decoder.next_frame().context("the session's stream")? {
            match frame {
                Frame::Data(d) => {
                    out.write_all(&d).await?;
                    out.flush().await?;
                }
                Frame::Exit(code) => break 'session Some(code),
            }
        }
    };
    input.abort();
    drop(raw);
    match code {
        Some(c) => Ok(c),
        None => {
            eprintln!("\r\nskyvisor: the session ended before the command did");
            Ok(255)
        }
    }
}
