//! Test support: a real, single-member etcd server in a temporary directory
//! on free 127.0.0.1 ports, for this crate's tests and for cluster tests
//! elsewhere.
//!
//! The server can be stopped (as a crash would: SIGKILL) and started again on
//! the same data directory and ports, to test that etcd restarts are
//! survived. It is killed when the [`EtcdProcess`] is dropped.
//!
//! This module is for tests only: it must never be used to run a production
//! etcd (it binds to loopback, uses short raft timeouts and keeps its data in
//! a temporary directory).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where Debian's etcd-server installs etcd.
pub const DEFAULT_ETCD_BINARY: &str = "/usr/bin/etcd";
/// Environment variable that overrides [`DEFAULT_ETCD_BINARY`].
pub const ETCD_BINARY_ENV: &str = "SKYVISOR_ETCD_BINARY";
/// How long etcd gets to become healthy.
const HEALTH_DEADLINE: Duration = Duration::from_secs(30);

/// What can go wrong starting a test etcd.
#[derive(Debug, Error)]
pub enum EtcdProcessError {
    /// The binary could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The etcd binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// etcd did not report healthy in time (or exited).
    #[error("etcd at {endpoint} not healthy: {reason}; end of its log:\n{log}")]
    NotHealthy {
        /// Its client endpoint.
        endpoint: String,
        /// What was seen.
        reason: String,
        /// The end of etcd's log.
        log: String,
    },
    /// The temporary directory, log file or ports could not be set up.
    #[error("setting up a test etcd: {0}")]
    Setup(String),
}

/// A running (or stopped) test etcd. Killed on drop.
#[derive(Debug)]
pub struct EtcdProcess {
    dir: tempfile::TempDir,
    binary: String,
    client_port: u16,
    peer_port: u16,
    /// Where `/health` answers in plain HTTP when clients need TLS.
    metrics_port: u16,
    tls: Option<ServerTlsFiles>,
    child: Option<Child>,
}

/// The files of a TLS etcd: its certificate and key, and the CA whose
/// client certificates it requires.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// The CA that signs clients' certificates (`--trusted-ca-file`).
    pub ca: PathBuf,
    /// etcd's certificate (`--cert-file`).
    pub cert: PathBuf,
    /// Its key (`--key-file`).
    pub key: PathBuf,
}

impl EtcdProcess {
    /// Starts etcd on free ports in a new temporary directory and waits until
    /// it is healthy.
    pub async fn start() -> Result<Self, EtcdProcessError> {
        Self::start_with(None).await
    }

    /// Starts an etcd that serves clients over TLS only and requires their
    /// certificates (`--client-cert-auth`).
    pub async fn start_tls(files: ServerTlsFiles) -> Result<Self, EtcdProcessError> {
        Self::start_with(Some(files)).await
    }

    async fn start_with(tls: Option<ServerTlsFiles>) -> Result<Self, EtcdProcessError> {
        // The ports are free when chosen, but another process (a parallel
        // test's etcd) can take one before etcd binds it: choose again.
        const ATTEMPTS: usize = 5;
        let mut attempt = 1;
        loop {
            match Self::start_once(tls.clone()).await {
                Err(EtcdProcessError::NotHealthy { log, .. })
                    if attempt < ATTEMPTS && log.contains("address already in use") =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(tls: Option<ServerTlsFiles>) -> Result<Self, EtcdProcessError> {
        let binary =
            std::env::var(ETCD_BINARY_ENV).unwrap_or_else(|_| DEFAULT_ETCD_BINARY.to_owned());
        let dir = tempfile::Builder::new()
            .prefix("skyvisor-etcd-")
            .tempdir()
            .map_err(|e| EtcdProcessError::Setup(format!("temporary directory: {e}")))?;
        // Both listeners stay open while choosing, so the two ports differ.
        let (client_port, peer_port, metrics_port) = {
            let bind = || {
                TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| Ok((l.local_addr()?.port(), l)))
                    .map_err(|e| EtcdProcessError::Setup(format!("finding a free port: {e}")))
            };
            let (client, _c) = bind()?;
            let (peer, _p) = bind()?;
            let (metrics, _m) = bind()?;
            (client, peer, metrics)
        };
        let mut etcd = EtcdProcess {
            dir,
            binary,
            client_port,
            peer_port,
            metrics_port,
            tls,
            child: None,
        };
        etcd.launch().await?;
        Ok(etcd)
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client URLs, as [`crate::EtcdStore::connect`] takes them.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The data directory (kept across [`Self::stop`] and [`Self::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Whether the etcd process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills etcd (SIGKILL, as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a paused process too. An error means it
            // already exited.
            let _ = child.kill();
            let _ = child.wait();
            tracing::info!(endpoint = %self.endpoint(), "test etcd stopped");
        }
    }

    /// Freezes etcd (SIGSTOP): connections stay open but nothing answers, as
    /// in a network partition or a hung server.
    pub fn pause(&self) -> Result<(), EtcdProcessError> {
        self.signal("-STOP")
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) -> Result<(), EtcdProcessError> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<(), EtcdProcessError> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| EtcdProcessError::Setup("etcd is not running".into()))?;
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .map_err(|e| EtcdProcessError::Setup(format!("kill {signal} {pid}: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(EtcdProcessError::Setup(format!(
                "kill {signal} {pid}: {status}"
            )))
        }
    }

    /// Starts etcd again on the same data directory and ports (stopping it
    /// first if it runs) and waits until it is healthy.
    pub async fn restart(&mut self) -> Result<(), EtcdProcessError> {
        self.stop();
        self.launch().await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn launch(&mut self) -> Result<(), EtcdProcessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| EtcdProcessError::Setup(format!("log file: {e}")))?;
        let log_err = log
            .try_clone()
            .map_err(|e| EtcdProcessError::Setup(format!("log file: {e}")))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.binary);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.cert.display()))
                .arg(format!("--key-file={}", t.key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name=skyvisor-test")
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=skyvisor-test={peer}"))
            .arg("--initial-cluster-state=new")
            // Short raft timers: a single member elects itself faster, and
            // the minimum lease TTL drops to 1 s.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| EtcdProcessError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        self.wait_healthy().await
    }

    async fn wait_healthy(&mut self) -> Result<(), EtcdProcessError> {
        let deadline = Instant::now() + HEALTH_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(self.not_healthy(format!("etcd exited with {status}")));
            }
            let last = match self.health().await {
                Ok(body) if body.contains("\"health\":\"true\"") => {
                    tracing::info!(endpoint = %self.endpoint(), "test etcd healthy");
                    return Ok(());
                }
                Ok(body) => format!("unhealthy: {body}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(self.not_healthy(format!(
                    "not healthy after {HEALTH_DEADLINE:?} (last: {last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /health`, in plain HTTP/1.0 over TCP.
    async fn health(&self) -> std::io::Result<String> {
        let request = async {
            // The metrics listener answers in plain HTTP, TLS or not.
            let mut stream =
                tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
            stream
                .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok(response)
        };
        tokio::time::timeout(Duration::from_secs(2), request)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "health check timed out",
                ))
            })
    }

    fn not_healthy(&mut self, reason: String) -> EtcdProcessError {
        let log = tail(&self.log_path(), 4000);
        self.stop();
        EtcdProcessError::NotHealthy {
            endpoint: self.endpoint(),
            reason,
            log,
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `max` bytes of a file, for error messages.
fn tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}
