//! Helpers shared by the integration tests: a server on a temporary file
//! and a runner for the real NBD clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use skyvisor_nbd::{Export, FileDevice, FileDeviceOptions, NbdServer, ServerConfig};

pub const SIZE: u64 = 64 << 20;

pub struct TestServer {
    pub server: NbdServer,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub device: FileDevice,
}

impl TestServer {
    pub async fn start() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let device = FileDevice::open(
            &dir.path().join("disk.img"),
            FileDeviceOptions {
                create_size: Some(SIZE),
                ..Default::default()
            },
        )
        .expect("file device");
        let server = NbdServer::new(ServerConfig::default());
        server
            .add_export(Export::new("disk", Arc::new(device.clone())).with_description("test disk"))
            .expect("export");
        let addr = server
            .listen_tcp("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("listen");
        Self {
            server,
            addr,
            dir,
            device,
        }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs a client program with a deadline; returns its output.
pub async fn run(program: &str, args: &[&str]) -> Output {
    let fut = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a program and asserts it succeeded; returns stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}
