//! Test harness: "hosts" are `skyvisor-volume-node` processes that can be
//! SIGKILLed, stopped and continued; every child is killed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub struct Host {
    pub node: String,
    pub data_dir: PathBuf,
    pub addr: String,
    pub control: PathBuf,
    membership_dir: PathBuf,
    log: PathBuf,
    timeout_ms: u64,
    child: Option<std::process::Child>,
}

impl Host {
    pub async fn start(root: &Path, node: &str, timeout_ms: u64) -> Host {
        Self::start_with_data_dir(root, node, timeout_ms, root.join(node)).await
    }

    pub async fn start_with_data_dir(
        root: &Path,
        node: &str,
        timeout_ms: u64,
        data_dir: PathBuf,
    ) -> Host {
        let mut h = Host {
            node: node.to_owned(),
            data_dir,
            addr: format!("127.0.0.1:{}", free_port()),
            control: root.join(format!("{node}.sock")),
            membership_dir: root.join("membership"),
            log: root.join(format!("{node}.log")),
            timeout_ms,
            child: None,
        };
        h.spawn().await;
        h
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_skyvisor-volume-node"))
            .args([
                "--node",
                &self.node,
                "--listen",
                &self.addr,
                "--request-timeout-ms",
                &self.timeout_ms.to_string(),
                "--reconnect-ms",
                "200",
            ])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--membership-dir")
            .arg(&self.membership_dir)
            .arg("--control")
            .arg(&self.control)
            .env(
                "RUST_LOG",
                std::env::var("NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn node");
        self.child = Some(child);
        // Ready when the control socket answers and the replica port accepts.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = self.try_control("ping").await
                && v.get("ok").is_some()
                && tokio::net::TcpStream::connect(&self.addr).await.is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} did not start; log:\n{}",
                self.node,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn try_control(&self, cmd: &str) -> std::io::Result<Value> {
        let s = UnixStream::connect(&self.control).await?;
        let (r, mut w) = s.into_split();
        w.write_all(format!("{cmd}\n").as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await?;
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    /// Runs a control command; returns `Ok(value)` or `Err(message)`.
    pub async fn control(&self, cmd: &str) -> Result<Value, String> {
        let v = tokio::time::timeout(Duration::from_secs(120), self.try_control(cmd))
            .await
            .map_err(|_| format!("control {cmd} timed out"))?
            .map_err(|e| format!("control {cmd}: {e}"))?;
        match (v.get("ok"), v.get("error")) {
            (Some(ok), _) => Ok(ok.clone()),
            (_, Some(e)) => Err(e.to_string()),
            _ => Err(format!("bad answer {v}")),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigstop(&self) {
        kill(self.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    }

    pub fn sigcont(&self) {
        kill(self.pid(), Signal::SIGCONT).expect("SIGCONT");
    }

    pub async fn restart(&mut self) {
        self.sigkill();
        self.spawn().await;
    }

    pub fn data_file(&self, volume: &str) -> PathBuf {
        self.data_dir.join("volumes").join(volume).join("data.img")
    }

    pub async fn status(&self, volume: &str) -> Value {
        self.control(&format!("status {volume}"))
            .await
            .expect("status")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
        }
        self.sigkill();
    }
}

/// States of all replicas from a status value.
pub fn states(status: &Value) -> Vec<(String, String)> {
    status["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["node"].as_str().unwrap_or("").to_owned(),
                        r["state"]["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn all_in_sync(status: &Value) -> bool {
    let s = states(status);
    !s.is_empty() && s.iter().all(|(_, st)| st == "in_sync")
}

/// Polls `status VOLUME` on `host` until `f` holds.
pub async fn wait_status(
    host: &Host,
    volume: &str,
    what: &str,
    secs: u64,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(v) = host.control(&format!("status {volume}")).await
            && f(&v)
        {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; last status: {:?}",
                host.control(&format!("status {volume}")).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} timed out"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success()
            && !stdout.contains("verification failed")
            && !stdout.contains("failed:"),
        "{program} {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}
