//! The test harness: a real `skyvisor up` per test, with its own data
//! directory, bridge, subnet and port, torn down (QEMUs, taps, bridge, NAT
//! table, files) when the test ends, even on failure.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The skyvisor binary under test.
pub fn skyvisor_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skyvisor"))
}

/// Where test daemons cache downloaded packages and built images, shared
/// by all tests so the guest image is built once.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SKYVISOR_TEST_CACHE") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-cache")
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A test slot: a number no other running test holds (an flock), used for
/// the bridge name, subnet and data directory.
pub struct Slot {
    /// The slot's number.
    pub n: u32,
    _lock: nix::fcntl::Flock<File>,
}

/// Takes a free test slot.
pub fn acquire_slot() -> Slot {
    let dir = Path::new("/tmp/skyvisor-test-slots");
    std::fs::create_dir_all(dir).expect("slot dir");
    for n in 1..250 {
        let f = File::create(dir.join(format!("{n}.lock"))).expect("slot file");
        if let Ok(lock) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            return Slot { n, _lock: lock };
        }
    }
    panic!("no free test slot");
}

/// A TCP port free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Options for a test cloud.
#[derive(Default, Clone)]
pub struct CloudOptions {
    /// Extra arguments to `skyvisor up`.
    pub extra_args: Vec<String>,
    /// Put the data directory on a tmpfs of this many MiB (to fill it up).
    pub tmpfs_mib: Option<u64>,
    /// Extra environment variables of `skyvisor up`.
    pub extra_env: Vec<(String, String)>,
}

/// A running all-in-one Skyvisor for one test.
pub struct Cloud {
    /// API base URL.
    pub url: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Bridge name.
    pub bridge: String,
    /// VM subnet's first three octets.
    pub subnet_prefix: [u8; 3],
    /// This cloud's host name.
    pub host: String,
    up: Option<Child>,
    port: u16,
    replica_port: u16,
    slot: Slot,
    options: CloudOptions,
}

impl Cloud {
    /// Starts `skyvisor up` and waits until its host is registered.
    pub fn start() -> Self {
        Self::start_with(CloudOptions::default())
    }

    /// Starts with options.
    pub fn start_with(options: CloudOptions) -> Self {
        let slot = acquire_slot();
        let n = slot.n;
        let data_dir = PathBuf::from(format!("/tmp/svt-{n}"));
        let mut cloud = Cloud {
            url: String::new(),
            data_dir,
            bridge: format!("svtb{n}"),
            subnet_prefix: [10, 215, n as u8],
            host: format!("test-{n}"),
            up: None,
            port: free_port(),
            replica_port: free_port(),
            slot,
            options,
        };
        // A killed earlier run may have left this slot's leftovers.
        cloud.cleanup();
        let scheme = if cloud.options.extra_args.iter().any(|a| a == "--tls") {
            "https"
        } else {
            "http"
        };
        cloud.url = format!("{scheme}://127.0.0.1:{}", cloud.port);
        if let Some(mib) = cloud.options.tmpfs_mib {
            std::fs::create_dir_all(&cloud.data_dir).expect("data dir");
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(&cloud.data_dir)
                .output()
                .expect("mount");
            assert!(
                out.status.success(),
                "mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cloud.spawn_up();
        cloud.wait_ready();
        cloud
    }

    /// The arguments `skyvisor up` runs with.
    fn up_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "up".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--cache-dir".into(),
            cache_dir().display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
            "--accel".into(),
            "tcg".into(),
            "--bridge".into(),
            self.bridge.clone(),
            "--subnet".into(),
            format!(
                "{}.{}.{}.0/24",
                self.subnet_prefix[0], self.subnet_prefix[1], self.subnet_prefix[2]
            ),
            "--host-name".into(),
            self.host.clone(),
            "--replica-listen".into(),
            format!("127.0.0.1:{}", self.replica_port),
            // The tests drive the guests through their test hooks.
            "--guest-test-hooks".into(),
            // Clouds of one machine share its namespace: their private
            // networks' ids (which name devices) must differ.
            "--private-vni-base".into(),
            self.private_vni_base().to_string(),
        ];
        a.extend(self.options.extra_args.iter().cloned());
        a
    }

    /// The first id of this cloud's private networks: clouds of one
    /// machine share its namespace, and ids name devices.
    fn private_vni_base(&self) -> u32 {
        0x2_0000 + self.slot.n * 0x1000
    }

    /// Starts (or restarts) the daemon process.
    pub fn spawn_up(&mut self) {
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("up.log"))
            .expect("log");
        let child = Command::new(skyvisor_bin())
            .args(self.up_args())
            .env("RUST_LOG", "info,skyvisor_agent=debug")
            .envs(self.options.extra_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn skyvisor up");
        self.up = Some(child);
    }

    /// Waits until the API answers and the host is registered.
    pub fn wait_ready(&mut self) {
        let url = format!("{}/v1/info", self.url);
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(child) = self.up.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("skyvisor up exited ({status}):\n{}", self.log_tail());
            }
            let answered = if self.url.starts_with("https://") {
                // This harness speaks plain HTTP; the CLI speaks TLS.
                self.log().contains("Skyvisor is up") && self.sv(&["info"]).status.success()
            } else {
                http_json_as("GET", &url, None, self.token().as_deref())
                    .is_ok_and(|v| v.1["hosts"].as_u64() == Some(1))
                    && self.log().contains("Skyvisor is up")
            };
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "skyvisor up not ready:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILLs the daemon (its VMs keep running).
    pub fn kill_up(&mut self) {
        if let Some(mut c) = self.up.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("up.log")).unwrap_or_default()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The bootstrap admin token `skyvisor up` wrote, once it has.
    pub fn token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// Runs the CLI against this cloud; it finds the bootstrap token in
    /// the data directory by itself, as on a fresh machine.
    pub fn sv(&self, args: &[&str]) -> Output {
        Command::new(skyvisor_bin())
            .args(args)
            .env("SKYVISOR_URL", &self.url)
            .env("SKYVISOR_DATA_DIR", &self.data_dir)
            .env("SKYVISOR_CONFIG", self.data_dir.join("cli-config.toml"))
            .output()
            .expect("run skyvisor")
    }

    /// Runs the CLI and asserts it succeeded; returns stdout.
    pub fn sv_ok(&self, args: &[&str]) -> String {
        let out = self.sv(args);
        assert!(
            out.status.success(),
            "skyvisor {args:?} failed: {}\n{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `-o json` and parses stdout.
    pub fn sv_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.sv_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {out}"))
    }

    /// Runs the CLI and asserts it failed; returns stderr.
    pub fn sv_err(&self, args: &[&str]) -> String {
        let out = self.sv(args);
        assert!(
            !out.status.success(),
            "skyvisor {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// An API call: (status, JSON body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        http_json_as(
            method,
            &format!("{}{path}", self.url),
            body,
            self.token().as_deref(),
        )
        .expect("API reachable")
    }

    /// An instance as the API shows it.
    pub fn instance(&self, name: &str) -> Value {
        let (status, v) = self.api("GET", &format!("/v1/instances/{name}"), None);
        assert_eq!(status, 200, "instance {name}: {v}");
        v
    }

    /// Creates a VM with the CLI and waits until its service answers;
    /// returns its IP.
    pub fn create_vm(&self, name: &str, extra: &[&str]) -> Ipv4Addr {
        let mut args = vec!["vm", "create", name, "--wait", "--timeout", "300"];
        args.extend(extra);
        let v = self.sv_json(&args);
        ip_of(&v)
    }

    /// The QEMU pids running from this cloud's data directory.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let vms = self.data_dir.join("agent/vms");
        if let Ok(dir) = std::fs::read_dir(vms) {
            for e in dir.flatten() {
                if let Ok(p) = std::fs::read_to_string(e.path().join("qemu.pid"))
                    && let Ok(pid) = p.trim().parse::<u32>()
                    && Path::new(&format!("/proc/{pid}")).exists()
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Removes everything this cloud made: processes, taps, bridge, NAT, files.
    fn cleanup(&mut self) {
        self.kill_up();
        let vms = self.data_dir.join("agent/vms");
        if let Ok(dir) = std::fs::read_dir(&vms) {
            for e in dir.flatten() {
                if let Ok(p) = std::fs::read_to_string(e.path().join("qemu.pid"))
                    && let Ok(pid) = p.trim().parse::<i32>()
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                // A container: its init (its namespace ends with it), its
                // veth and its root mount.
                if let Ok(p) = std::fs::read_to_string(e.path().join("container.pid"))
                    && let Ok(pid) = p.trim().parse::<i32>()
                    && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                        .is_ok_and(|c| c.contains("skyvisor/sv-"))
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(e.path().join("rootfs"))
                    .output();
                let cid = format!("sv-{}", e.file_name().to_string_lossy());
                if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
                    for h in hierarchies.flatten() {
                        let _ = std::fs::remove_dir(h.path().join("skyvisor").join(&cid));
                    }
                }
                let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/skyvisor").join(&cid));
                if let Ok(l) = std::fs::read_to_string(e.path().join("launch.json"))
                    && let Ok(v) = serde_json::from_str::<Value>(&l)
                    && let Some(tap) = v["tap"].as_str()
                {
                    let _ = Command::new("ip").args(["link", "del", tap]).output();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = Command::new("nft")
            .args([
                "delete",
                "table",
                "ip",
                &format!("skyvisor-{}", self.bridge),
            ])
            .output();
        // Private networks of this slot's projects, their firewall tables.
        let base = self.private_vni_base();
        for vni in base..base + 32 {
            let d = skyvisor_net::private_devices(vni);
            if std::path::Path::new("/sys/class/net")
                .join(&d.bridge)
                .exists()
            {
                for dev in [&d.vxlan, &d.gateway_port, &d.uplink, &d.bridge] {
                    let _ = Command::new("ip").args(["link", "del", dev]).output();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &d.namespace])
                .output();
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", &format!("skyvisor-net-{vni:06x}")])
                .output();
        }
        for table in [
            format!("bridge skyvisor-guard-{}", self.bridge),
            format!("ip skyvisor-sg-{}", self.bridge),
        ] {
            let mut args = vec!["delete", "table"];
            args.extend(table.split(' '));
            let _ = Command::new("nft").args(&args).output();
        }
        // A tmpfs from an earlier run or this one.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.data_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- skyvisor up log (slot {}) ---\n{}",
                self.slot.n,
                self.log_tail()
            );
        }
        self.cleanup();
    }
}

/// The IP of an instance JSON.
pub fn ip_of(v: &Value) -> Ipv4Addr {
    v["spec"]["network"]["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no ip in {v}"))
}

/// A minimal HTTP/1.1 client: (status, body). Plain std so tests measure
/// the guest, not a client library.
pub fn http(
    method: &str,
    url: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    http_as(method, url, body, timeout, None)
}

/// [`http`] with an API token.
pub fn http_as(
    method: &str,
    url: &str,
    body: Option<&str>,
    timeout: Duration,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let sock: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:.200}")))?;
    let body = match text.find("\r\n\r\n") {
        Some(i) => text[i + 4..].to_string(),
        None => String::new(),
    };
    // Decode a chunked body (axum streams some answers).
    let body = if text[..text.find("\r\n\r\n").unwrap_or(0)]
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some(i) = s.find("\r\n") {
        let Ok(n) = usize::from_str_radix(s[..i].trim(), 16) else {
            break;
        };
        if n == 0 || s.len() < i + 2 + n {
            break;
        }
        out.push_str(&s[i + 2..i + 2 + n]);
        s = &s[(i + 2 + n + 2).min(s.len())..];
    }
    out
}

/// An HTTP call whose answer is JSON.
pub fn http_json(method: &str, url: &str, body: Option<&str>) -> std::io::Result<(u16, Value)> {
    http_json_as(method, url, body, None)
}

/// [`http_json`] with an API token.
pub fn http_json_as(
    method: &str,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> std::io::Result<(u16, Value)> {
    let (status, text) = http_as(method, url, body, Duration::from_secs(30), token)?;
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::other(format!("{e}: {text:.300}")))?
    };
    Ok((status, v))
}

/// GETs a guest's endpoint as JSON.
pub fn guest_json(ip: Ipv4Addr, path: &str) -> Value {
    let (status, v) = http_json("GET", &format!("http://{ip}{path}"), None)
        .unwrap_or_else(|e| panic!("guest {ip}{path}: {e}"));
    assert_eq!(status, 200, "guest {ip}{path}: {v}");
    v
}

/// Sends a request to a guest and returns the JSON answer.
pub fn guest_call(ip: Ipv4Addr, method: &str, path: &str, body: Option<&str>) -> Value {
    let (status, v) = http_json(method, &format!("http://{ip}{path}"), body)
        .unwrap_or_else(|e| panic!("guest {ip}{path}: {e}"));
    assert!(
        (200..300).contains(&status),
        "guest {method} {ip}{path}: {status} {v}"
    );
    v
}

/// Whether a process exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}
