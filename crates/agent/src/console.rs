//! Interactive serial consoles: a session streams an instance's console
//! log (its recent tail, then what is appended) and, when the caller may
//! type, forwards input to the VM's serial port.
//!
//! Output is read from the log file rather than QEMU's console socket:
//! the log has everything whether or not anyone is connected, and any
//! number of sessions can follow a file. QEMU's socket takes one client at a
//! time, so the sessions of one VM share one connection for their input
//! ([`SerialPort`]), kept while any of them is open: a connection per
//! keystroke loses bytes (QEMU drops what it had not read from a client
//! that hung up, and it reads only as fast as the guest's UART takes them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};
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
    let port = input.then(|| SerialPort::of(&files.socket));
    let mut buf = vec![0u8; 4096];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Some(port) = &port else { continue };
                if let Err(e) = port.send(&buf[..n]).await {
                    // The VM may be stopped or restarting; its output (or
                    // lack of it) tells the user, and the next keystroke
                    // tries again.
                    tracing::debug!(error = %e, "console input not delivered");
                }
            }
        }
    }
    follow.abort();
}

/// The open serial ports, by console socket: shared by the sessions of a
/// VM, closed when the last of them ends.
static PORTS: LazyLock<Mutex<HashMap<PathBuf, Weak<SerialPort>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// One connection to a VM's console socket, for input.
pub struct SerialPort {
    socket: PathBuf,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

struct Connection {
    tx: tokio::net::unix::OwnedWriteHalf,
    /// Reads and drops what QEMU sends the client (the log has it): an
    /// unread socket would stall the guest's console.
    drain: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

impl SerialPort {
    /// The port of `socket`, shared with the other sessions that have it.
    pub fn of(socket: &Path) -> Arc<Self> {
        let mut ports = PORTS.lock().unwrap_or_else(|p| p.into_inner());
        ports.retain(|_, p| p.strong_count() > 0);
        if let Some(port) = ports.get(socket).and_then(Weak::upgrade) {
            return port;
        }
        let port = Arc::new(Self {
            socket: socket.to_path_buf(),
            conn: tokio::sync::Mutex::new(None),
        });
        ports.insert(socket.to_path_buf(), Arc::downgrade(&port));
        port
    }

    /// Writes `bytes` to the serial port, connecting (again) if needed:
    /// once more after a failed write (QEMU restarted since).
    pub async fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut conn = self.conn.lock().await;
        for attempt in 0..2 {
            if conn.is_none() {
                *conn = Some(self.connect().await?);
            }
            let Some(c) = conn.as_mut() else { continue };
            match c.tx.write_all(bytes).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 1 => return Err(e),
                Err(_) => *conn = None,
            }
        }
        Ok(())
    }

    async fn connect(&self) -> std::io::Result<Connection> {
        let stream = tokio::time::timeout(
            CONNECT_DEADLINE,
            tokio::net::UnixStream::connect(&self.socket),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "console socket busy"))??;
        let (mut rx, tx) = stream.into_split();
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        Ok(Connection { tx, drain })
    }
}

/// Streams the log from its tail onwards into `out` until writing fails.
async fn follow_log<W: AsyncWrite + Unpin>(log: PathBuf, mut out: W) {
    let mut follower = Follower {
        log,
        file: None,
        offset: 0,
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match follower.read_new(&mut buf).await {
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

/// A console log followed from [`TAIL_BYTES`] before its end, through one
/// open file (the log is appended across runs, never replaced).
struct Follower {
    log: PathBuf,
    file: Option<tokio::fs::File>,
    /// Where the next read starts.
    offset: u64,
}

impl Follower {
    /// Reads what was appended since the last read into `buf`. A log that
    /// shrank (truncated) is read again from its start.
    async fn read_new(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let mut f = tokio::fs::File::open(&self.log).await?;
                self.offset = f.metadata().await?.len().saturating_sub(TAIL_BYTES);
                f.seek(std::io::SeekFrom::Start(self.offset)).await?;
                self.file.insert(f)
            }
        };
        let n = file.read(buf).await?;
        if n == 0 && file.metadata().await?.len() < self.offset {
            self.offset = 0;
            file.seek(std::io::SeekFrom::Start(0)).await?;
        }
        self.offset += n as u64;
        Ok(n)
    }
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

        // Typed input reaches the serial port, keystroke by keystroke, on
        // one connection that a second session shares.
        for b in b"root\r" {
            ctx.write_all(&[*b]).await.expect("test value");
        }
        let (mut port, _) = tokio::time::timeout(Duration::from_secs(10), serial.accept())
            .await
            .expect("test value")
            .expect("test value");
        let mut got = [0u8; 5];
        port.read_exact(&mut got).await.expect("test value");
        assert_eq!(&got, b"root\r");

        let (client2, server2) = tokio::io::duplex(1 << 20);
        let files2 = ConsoleFiles {
            log: log.clone(),
            socket: socket.clone(),
        };
        let second = tokio::spawn(session(files2, true, server2));
        let (_crx2, mut ctx2) = tokio::io::split(client2);
        ctx2.write_all(b"ls\r").await.expect("test value");
        let mut got = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(10), port.read_exact(&mut got))
            .await
            .expect("the second session's input on the same connection")
            .expect("test value");
        assert_eq!(&got, b"ls\r");

        // When every session has ended, the port is closed.
        drop((ctx, crx, ctx2, _crx2));
        second.await.expect("test value");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), port.read_to_end(&mut rest))
            .await
            .expect("the port closed after the last session")
            .expect("test value");
        assert!(rest.is_empty());
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
