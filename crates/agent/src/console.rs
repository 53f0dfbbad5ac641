//! Interactive serial consoles: a session streams an instance's console
//! log (its recent tail, then what is appended) and, when the caller may
//! type, forwards input to the VM's serial port.
//!
//! Output is read from the log file rather than QEMU's console socket:
//! the log has everything whether or not anyone is connected, QEMU's socket
//! takes one client at a time, and any number of sessions can follow a file.
//! Input connects to the socket for each chunk the user types, so sessions
//! never hold the single client slot (a held one would stall the others'
//! input).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

pub use skyvisor_core::api::CONSOLE_UPGRADE_PROTOCOL as UPGRADE_PROTOCOL;

/// How much of the log a new session sees first.
pub const TAIL_BYTES: u64 = 64 * 1024;

/// How often a session looks for new output (a guest writes its serial
/// port slowly; 50 ms is below what a person notices).
const FOLLOW_INTERVAL: Duration = Duration::from_millis(50);

/// Longest wait for QEMU to accept an input connection.
const CONNECT_DEADLINE: Duration = Duration::from_secs(2);

/// One session's files.
#[derive(Debug, Clone)]
pub struct ConsoleFiles {
    /// The console log, appended across runs.
    pub log: PathBuf,
    /// QEMU's console socket (absent for a container or a VM that is not
    /// running).
    pub socket: PathBuf,
}

/// Runs a session on `stream` until the client hangs up: the log's tail
/// and new output go out; input goes to the serial port if `input`,
/// else it is read and dropped.
pub async fn session<S>(files: ConsoleFiles, input: bool, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rx, tx) = tokio::io::split(stream);
    let follow = tokio::spawn(follow_log(files.log.clone(), tx));
    let mut buf = vec![0u8; 4096];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) if input => {
                if let Err(e) = send_input(&files.socket, &buf[..n]).await {
                    // The VM may be stopped or restarting; its output (or
                    // lack of it) tells the user, and the next keystroke
                    // tries again.
                    tracing::debug!(error = %e, "console input not delivered");
                }
            }
            Ok(_) => {}
        }
    }
    follow.abort();
}

/// Streams the log from its tail onwards into `out` until writing fails.
async fn follow_log<W: AsyncWrite + Unpin>(log: PathBuf, mut out: W) {
    let mut offset: Option<u64> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_new(&log, &mut offset, &mut buf).await {
            Ok(0) => tokio::time::sleep(FOLLOW_INTERVAL).await,
            Ok(n) => {
                if out.write_all(&buf[..n]).await.is_err() || out.flush().await.is_err() {
                    return;
                }
            }
            // No log yet (the VM never ran here): wait for one.
            Err(_) => tokio::time::sleep(FOLLOW_INTERVAL).await,
        }
    }
}

/// Reads what was appended to `log` after `offset` into `buf`; the first
/// read starts [`TAIL_BYTES`] before the end. A log that shrank (replaced)
/// is read again from its start.
async fn read_new(log: &Path, offset: &mut Option<u64>, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut f = tokio::fs::File::open(log).await?;
    let len = f.metadata().await?.len();
    let start = match *offset {
        None => len.saturating_sub(TAIL_BYTES),
        Some(o) if o > len => 0,
        Some(o) => o,
    };
    if start == len {
        *offset = Some(start);
        return Ok(0);
    }
    f.seek(std::io::SeekFrom::Start(start)).await?;
    let n = f.read(buf).await?;
    *offset = Some(start + n as u64);
    Ok(n)
}

/// Writes `bytes` to the serial port through QEMU's console socket.
async fn send_input(socket: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut conn = tokio::time::timeout(CONNECT_DEADLINE, tokio::net::UnixStream::connect(socket))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "console socket busy"))??;
    conn.write_all(bytes).await?;
    conn.flush().await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_sees_the_tail_then_appended_output_and_forwards_input() {
        let dir = tempfile::tempdir().expect("test value");
        let log = dir.path().join("serial.log");
        let socket = dir.path().join("console.sock");
        // More than the tail, so the session must skip the start.
        let mut old = vec![b'a'; TAIL_BYTES as usize];
        old.extend_from_slice(b"BOOT-END\n");
        std::fs::write(&log, &old).expect("test value");
        let serial = tokio::net::UnixListener::bind(&socket).expect("test value");

        let (client, server) = tokio::io::duplex(1 << 20);
        let files = ConsoleFiles {
            log: log.clone(),
            socket: socket.clone(),
        };
        tokio::spawn(session(files, true, server));
        let (mut crx, mut ctx) = tokio::io::split(client);

        let mut seen = Vec::new();
        read_until(&mut crx, &mut seen, b"BOOT-END\n").await;
        assert_eq!(seen.len(), TAIL_BYTES as usize, "exactly the tail");

        // Appended output arrives.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("test value");
        std::io::Write::write_all(&mut f, b"login: ").expect("test value");
        seen.clear();
        read_until(&mut crx, &mut seen, b"login: ").await;

        // Typed input reaches the serial port.
        ctx.write_all(b"root\r").await.expect("test value");
        let (mut port, _) = tokio::time::timeout(Duration::from_secs(10), serial.accept())
            .await
            .expect("test value")
            .expect("test value");
        let mut got = Vec::new();
        port.read_to_end(&mut got).await.expect("test value");
        assert_eq!(got, b"root\r");
    }

    #[tokio::test]
    async fn a_read_only_session_drops_input() {
        let dir = tempfile::tempdir().expect("test value");
        let log = dir.path().join("serial.log");
        let socket = dir.path().join("console.sock");
        std::fs::write(&log, b"hello\n").expect("test value");
        let serial = tokio::net::UnixListener::bind(&socket).expect("test value");
        let (client, server) = tokio::io::duplex(1 << 16);
        let files = ConsoleFiles { log, socket };
        tokio::spawn(session(files, false, server));
        let (mut crx, mut ctx) = tokio::io::split(client);
        let mut seen = Vec::new();
        read_until(&mut crx, &mut seen, b"hello\n").await;
        ctx.write_all(b"reboot\r").await.expect("test value");
        // Output keeps flowing after the input was read...
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("serial.log"))
            .expect("test value");
        std::io::Write::write_all(&mut f, b"still\n").expect("test value");
        seen.clear();
        read_until(&mut crx, &mut seen, b"still\n").await;
        // ...and nothing ever connected to the serial port.
        let accepted = tokio::time::timeout(Duration::from_millis(300), serial.accept()).await;
        assert!(accepted.is_err(), "a read-only session must not type");
    }

    async fn read_until<R: AsyncRead + Unpin>(r: &mut R, seen: &mut Vec<u8>, end: &[u8]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 8192];
        while !seen.ends_with(end) {
            let n = tokio::time::timeout_at(deadline, r.read(&mut buf))
                .await
                .expect("output within 10 s")
                .expect("test value");
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
    }
}
