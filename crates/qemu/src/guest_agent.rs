//! A small client of the QEMU guest agent (`qemu-guest-agent` in the
//! guest), reached through the VM's `qga.sock` (see
//! [`crate::files::GUEST_AGENT_SOCKET`]).
//!
//! Everything it returns comes from inside the guest, which the host must
//! not trust: callers use it as the guest's own report (has cloud-init
//! finished, what addresses does it see), never to decide anything about
//! other VMs. Every call has a deadline, since a guest without an agent
//! never answers.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The most bytes [`GuestAgent::read_file`] reads.
const MAX_FILE_BYTES: usize = 256 * 1024;

/// Why a guest agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    /// The socket could not be reached or broke.
    #[error("guest agent socket: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time (no agent runs in the guest, or it is busy).
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error.
    #[error("the guest agent refused {command}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// Its error's description.
        desc: String,
    },
    /// The answer was not what the protocol says.
    #[error("unexpected answer from the guest agent: {0}")]
    Protocol(String),
}

/// One interface the guest sees, with its IP addresses (`addr/prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    /// Its name in the guest.
    pub name: String,
    /// Its MAC, if it has one.
    pub mac: Option<String>,
    /// Its addresses.
    pub addresses: Vec<String>,
}

/// A connected session with a guest agent.
pub struct GuestAgent {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    timeout: Duration,
}

impl GuestAgent {
    /// Connects and synchronises (discarding anything a previous client
    /// left unread); each call then has `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, GuestAgentError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| GuestAgentError::Timeout(timeout))??;
        let (r, w) = stream.into_split();
        let mut agent = GuestAgent {
            reader: BufReader::new(r),
            writer: w,
            timeout,
        };
        agent.sync().await?;
        Ok(agent)
    }

    /// Changes how long each later call may take (a freeze may take
    /// longer than a query).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    async fn sync(&mut self) -> Result<(), GuestAgentError> {
        let id = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
        self.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}))
            .await?;
        // Answers to an earlier client's commands may come first.
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let v = self.read_line(deadline).await?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
        }
    }

    async fn send(&mut self, msg: &Value) -> Result<(), GuestAgentError> {
        let mut line = msg.to_string();
        line.push('\n');
        let write = async {
            self.writer.write_all(line.as_bytes()).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| GuestAgentError::Timeout(self.timeout))??;
        Ok(())
    }

    async fn read_line(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Value, GuestAgentError> {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line))
                .await
                .map_err(|_| GuestAgentError::Timeout(self.timeout))??;
            if n == 0 {
                return Err(GuestAgentError::Protocol("the socket closed".into()));
            }
            // The agent may send a 0xFF sentinel or blank lines; skip them.
            let text = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{ff}');
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str(text)
                .map_err(|e| GuestAgentError::Protocol(format!("{e}: {text:.200}")));
        }
    }

    /// Runs `command` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Value) -> Result<Value, GuestAgentError> {
        let mut msg = json!({ "execute": command });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        self.send(&msg).await?;
        let v = self
            .read_line(tokio::time::Instant::now() + self.timeout)
            .await?;
        if let Some(err) = v.get("error") {
            return Err(refusal(command, err));
        }
        v.get("return")
            .cloned()
            .ok_or_else(|| GuestAgentError::Protocol(format!("no return in {v:.200}")))
    }

    /// The content of a file in the guest, `None` if it cannot be opened
    /// (it does not exist yet).
    pub async fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, GuestAgentError> {
        let handle = match self
            .execute("guest-file-open", json!({"path": path, "mode": "r"}))
            .await
        {
            Ok(h) => h,
            Err(GuestAgentError::Refused { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let handle = handle
            .as_i64()
            .ok_or_else(|| GuestAgentError::Protocol(format!("file handle {handle}")))?;
        let mut out = Vec::new();
        let result = loop {
            let chunk = match self
                .execute(
                    "guest-file-read",
                    json!({"handle": handle, "count": 64 * 1024}),
                )
                .await
            {
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            let data = chunk.get("buf-b64").and_then(Value::as_str).unwrap_or("");
            match base64_decode(data) {
                Some(bytes) => out.extend_from_slice(&bytes),
                None => break Err(GuestAgentError::Protocol("invalid base64".into())),
            }
            let eof = chunk.get("eof").and_then(Value::as_bool).unwrap_or(true);
            if eof || out.len() > MAX_FILE_BYTES {
                break Ok(Some(out));
            }
        };
        let _ = self
            .execute("guest-file-close", json!({"handle": handle}))
            .await;
        result
    }

    /// Asks the guest to power itself off (`guest-shutdown`, mode
    /// `powerdown`): the guest's own clean shutdown, which does not depend
    /// on it handling the ACPI power button. The agent sends no answer
    /// when it complies, so silence for `grace` means accepted; an error
    /// answer is a refusal.
    pub async fn shutdown(&mut self, grace: Duration) -> Result<(), GuestAgentError> {
        self.send(&json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}))
            .await?;
        match self.read_line(tokio::time::Instant::now() + grace).await {
            Ok(v) => match v.get("error") {
                Some(err) => Err(refusal("guest-shutdown", err)),
                None => Ok(()),
            },
            // Silence, or the channel closing as the guest goes down.
            Err(GuestAgentError::Timeout(_) | GuestAgentError::Protocol(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Freezes the guest's file systems (`guest-fsfreeze-freeze`): their
    /// pending writes reach the disks and new ones wait, so that a disk
    /// snapshot taken now is what a clean unmount would leave. Returns how
    /// many file systems froze. Always follow with [`GuestAgent::thaw`].
    pub async fn freeze(&mut self) -> Result<u64, GuestAgentError> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null).await?;
        v.as_u64()
            .ok_or_else(|| GuestAgentError::Protocol(format!("freeze returned {v}")))
    }

    /// Thaws what [`GuestAgent::freeze`] froze; returns how many thawed.
    pub async fn thaw(&mut self) -> Result<u64, GuestAgentError> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null).await?;
        v.as_u64()
            .ok_or_else(|| GuestAgentError::Protocol(format!("thaw returned {v}")))
    }

    /// The guest's network interfaces and their addresses.
    pub async fn interfaces(&mut self) -> Result<Vec<GuestInterface>, GuestAgentError> {
        let v = self
            .execute("guest-network-get-interfaces", Value::Null)
            .await?;
        let list = v
            .as_array()
            .ok_or_else(|| GuestAgentError::Protocol("interfaces are not a list".into()))?;
        Ok(list
            .iter()
            .map(|i| GuestInterface {
                name: i["name"].as_str().unwrap_or_default().to_string(),
                mac: i["hardware-address"].as_str().map(str::to_string),
                addresses: i["ip-addresses"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| {
                                Some(format!(
                                    "{}/{}",
                                    x["ip-address"].as_str()?,
                                    x["prefix"].as_u64()?
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }
}

/// The error for `command` answered with `err` (the agent's `error`).
fn refusal(command: &str, err: &Value) -> GuestAgentError {
    GuestAgentError::Refused {
        command: command.to_string(),
        desc: err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("no description")
            .to_string(),
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ (t >> 16)) as u16
}

/// Standard base64 with padding, as the guest agent sends it.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_what_the_agent_sends() {
        assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64_decode("aGkh").as_deref(), Some(&b"hi!"[..]));
        assert_eq!(base64_decode("aA==").as_deref(), Some(&b"h"[..]));
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("a*=="), None);
    }

    /// A fake agent on a socket: answers guest-sync and reads one file.
    #[tokio::test]
    async fn reads_a_file_and_treats_a_missing_one_as_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            // A stale answer first, as an earlier client may leave.
            w.write_all(b"{\"return\": {}}\n").await.expect("write");
            while let Ok(Some(l)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&l).expect("json");
                let a = &v["arguments"];
                let reply = match v["execute"].as_str().unwrap_or("") {
                    "guest-sync" => json!({"return": a["id"]}),
                    "guest-file-open" if a["path"] == "/there" => json!({"return": 7}),
                    "guest-file-open" => {
                        json!({"error": {"class": "GenericError", "desc": "No such file"}})
                    }
                    "guest-file-read" => {
                        json!({"return": {"count": 2, "buf-b64": "aGk=", "eof": true}})
                    }
                    _ => json!({"return": {}}),
                };
                w.write_all(format!("{reply}\n").as_bytes())
                    .await
                    .expect("write");
            }
        });
        let mut agent = GuestAgent::connect(&sock, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(
            agent.read_file("/there").await.expect("read"),
            Some(b"hi".to_vec())
        );
        assert_eq!(agent.read_file("/missing").await.expect("read"), None);
    }

    #[tokio::test]
    async fn a_silent_socket_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let _keep = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.expect("accept");
            std::future::pending::<()>().await;
        });
        let err = GuestAgent::connect(&sock, Duration::from_millis(200))
            .await
            .err()
            .expect("no agent answers");
        assert!(matches!(err, GuestAgentError::Timeout(_)), "{err}");
    }
}
