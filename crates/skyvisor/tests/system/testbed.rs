//! The multi-host test bed for cluster tests: N hosts as network
//! namespaces on one bridge, etcd, servers and one real `skyvisor agent`
//! per host, all driven through `scripts/testbed.sh` (so the script users
//! run is the one the tests exercise). Each test bed takes a slot no other
//! running test holds (an flock), which picks its names and subnets, and is
//! torn down when dropped, even when the test fails.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{cache_dir, http, http_json, http_json_as, ip_of, skyvisor_bin, wait_until};

/// The lease TTL of agents and servers in the test bed, seconds: short, so
/// that failures are noticed quickly.
pub const LEASE_TTL: u64 = 3;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/testbed.sh")
}

/// A slot no other running test bed holds.
struct Slot {
    n: u32,
    _lock: nix::fcntl::Flock<File>,
}

fn acquire_slot() -> Slot {
    let dir = Path::new("/tmp/skyvisor-testbed-slots");
    std::fs::create_dir_all(dir).expect("slot dir");
    for n in 1..=200 {
        let f = File::create(dir.join(format!("{n}.lock"))).expect("slot file");
        if let Ok(lock) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            return Slot { n, _lock: lock };
        }
    }
    panic!("no free test bed slot");
}

/// Options of a test bed.
#[derive(Debug, Clone, Default)]
pub struct TestBedOptions {
    /// Extra arguments of every server.
    pub server_args: Vec<String>,
    /// Serve the servers' API over TLS, as `skyvisor server` does by
    /// default (talk to them through the CLI then). Without it the bed's
    /// servers serve plain HTTP (`--plain-http`), which the harness's own
    /// small HTTP client speaks.
    pub tls: bool,
}

/// A running multi-host cluster on this machine.
pub struct TestBed {
    /// The slot number (`TESTBED_ID`).
    pub id: u32,
    /// State, logs and data.
    pub dir: PathBuf,
    /// Number of hosts (h1..hN).
    pub hosts: u32,
    /// Number of servers started (s1..sN).
    pub servers: u32,
    options: TestBedOptions,
    _slot: Slot,
}

impl TestBed {
    /// Starts `hosts` hosts and `servers` servers and waits until every host
    /// is ready.
    pub fn start(hosts: u32, servers: u32) -> Self {
        Self::start_with(hosts, servers, TestBedOptions::default())
    }

    /// Starts with options.
    pub fn start_with(hosts: u32, servers: u32, options: TestBedOptions) -> Self {
        let slot = acquire_slot();
        let bed = TestBed {
            id: slot.n,
            dir: PathBuf::from(format!("/tmp/svtb-{}", slot.n)),
            hosts,
            servers,
            options,
            _slot: slot,
        };
        // A killed earlier run may have left this slot's leftovers.
        bed.script_quiet(&["down"]);
        let started = Instant::now();
        let n = hosts.to_string();
        let s = servers.to_string();
        let out = bed.script(&["up", &n, &s]);
        assert!(
            out.status.success(),
            "testbed up failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            bed.logs_tail()
        );
        eprintln!(
            "test bed {}: {hosts} hosts, {servers} servers ready in {:?}",
            bed.id,
            started.elapsed()
        );
        // Servers build the default image in the background; wait for it.
        wait_until("the default image", Duration::from_secs(300), || {
            let v = if bed.options.tls {
                let out = bed.sv_at(
                    &bed.urls(),
                    &["image", "show", "debian-busybox", "-o", "json"],
                );
                serde_json::from_slice::<Value>(&out.stdout).unwrap_or_default()
            } else {
                let (status, v) = bed.api("GET", "/v1/images/debian-busybox", None);
                if status != 200 {
                    return None;
                }
                v
            };
            (v["state"] == "ready").then_some(())
        });
        bed
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(script())
            .args(args)
            .env("TESTBED_ID", self.id.to_string())
            .env("TESTBED_DIR", &self.dir)
            .env("SKYVISOR", skyvisor_bin())
            .env("TESTBED_CACHE", cache_dir())
            .env("LEASE_TTL", LEASE_TTL.to_string())
            .env("ACCEL", "tcg")
            .env("SERVER_ARGS", self.options.server_args.join(" "))
            .env("TLS", if self.options.tls { "1" } else { "0" })
            .env(
                "RUST_LOG",
                std::env::var("TESTBED_RUST_LOG")
                    .unwrap_or_else(|_| "info,skyvisor_agent=debug".into()),
            );
        c
    }

    /// Runs `testbed.sh ARGS` and returns its output.
    pub fn script(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run testbed.sh")
    }

    /// Runs `testbed.sh ARGS` and asserts it succeeded.
    pub fn script_ok(&self, args: &[&str]) {
        let out = self.script(args);
        assert!(
            out.status.success(),
            "testbed.sh {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs_tail()
        );
    }

    fn script_quiet(&self, args: &[&str]) {
        let _ = self.script(args);
    }

    /// The underlay address of the root namespace (etcd, servers).
    pub fn root_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 216, self.id as u8, 1)
    }

    /// Host `h`'s underlay address.
    pub fn host_ip(&self, h: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 216, self.id as u8, 10 + h as u8)
    }

    /// The etcd endpoint.
    pub fn etcd_url(&self) -> String {
        format!("http://{}:2379", self.root_ip())
    }

    /// Server `i`'s API URL.
    pub fn server_url(&self, i: u32) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.root_ip(), 7779 + i)
    }

    /// The cluster CA's certificate, as the first server wrote it.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("s1").join("cluster-ca.pem")
    }

    /// Every server's URL, comma-separated (the CLI fails over among them).
    pub fn urls(&self) -> String {
        (1..=self.servers)
            .map(|i| self.server_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Host `h`'s network namespace.
    pub fn netns(&self, h: u32) -> String {
        format!("svtb{}h{h}", self.id)
    }

    /// An API call to server `i`: (status, JSON body).
    pub fn api_on(&self, i: u32, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        http_json_as(
            method,
            &format!("{}{path}", self.server_url(i)),
            body,
            self.token().as_deref(),
        )
        .unwrap_or_else(|e| panic!("server s{i} {method} {path}: {e}"))
    }

    /// An API call to the first server.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.api_on(1, method, path, body)
    }

    /// The bootstrap admin token the bed's servers share.
    pub fn token(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// Runs the CLI against the given servers (comma-separated URLs).
    pub fn sv_at(&self, urls: &str, args: &[&str]) -> Output {
        let mut c = Command::new(skyvisor_bin());
        if let Some(t) = self.token() {
            c.env("SKYVISOR_TOKEN", t);
        }
        if self.options.tls {
            c.env("SKYVISOR_CA_FILE", self.ca_file());
        }
        c.args(args)
            .env("SKYVISOR_URL", urls)
            .env("SKYVISOR_CONFIG", self.dir.join("cli-config.toml"))
            .output()
            .expect("run skyvisor")
    }

    /// Runs the CLI against every server and asserts it succeeded.
    pub fn sv_ok(&self, args: &[&str]) -> String {
        let out = self.sv_at(&self.urls(), args);
        assert!(
            out.status.success(),
            "skyvisor {args:?} failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs_tail()
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
        let out = self.sv_at(&self.urls(), args);
        assert!(
            !out.status.success(),
            "skyvisor {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Creates a VM and waits until its service answers; returns it.
    pub fn create_vm(&self, name: &str, extra: &[&str]) -> Value {
        let mut args = vec!["vm", "create", name, "--wait", "--timeout", "240"];
        args.extend(extra);
        self.sv_json(&args)
    }

    /// An instance as the API shows it.
    pub fn instance(&self, name: &str) -> Value {
        let (status, v) = self.api_on(
            self.any_server(),
            "GET",
            &format!("/v1/instances/{name}"),
            None,
        );
        assert_eq!(status, 200, "instance {name}: {v}");
        v
    }

    /// A server that answers.
    fn any_server(&self) -> u32 {
        (1..=self.servers)
            .find(|i| http_json("GET", &format!("{}/v1/info", self.server_url(*i)), None).is_ok())
            .unwrap_or(1)
    }

    /// Host `h`'s state as the API shows it.
    pub fn host_state(&self, h: u32) -> String {
        let (status, v) = self.api_on(self.any_server(), "GET", &format!("/v1/hosts/h{h}"), None);
        assert_eq!(status, 200, "host h{h}: {v}");
        v["state"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until host `h` is in `state`.
    pub fn wait_host_state(&self, h: u32, state: &str, timeout: Duration) {
        wait_until(&format!("host h{h} {state}"), timeout, || {
            (self.host_state(h) == state).then_some(())
        });
    }

    /// The host an instance is bound to, as a number.
    pub fn host_of(&self, v: &Value) -> u32 {
        v["spec"]["host"]
            .as_str()
            .and_then(|h| h.strip_prefix('h'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no host in {v}"))
    }

    /// HTTP from inside host `h`'s network namespace (a thread that enters
    /// it), as that host's own processes would see the network.
    pub fn http_from_host(&self, h: u32, url: &str) -> std::io::Result<(u16, String)> {
        let ns = format!("/var/run/netns/{}", self.netns(h));
        let url = url.to_string();
        std::thread::spawn(move || {
            let f = File::open(&ns)?;
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::other)?;
            http("GET", &url, None, Duration::from_secs(10))
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    }

    /// HTTP from inside the router of private network `vni` on host `h`
    /// (where that network's instances are reachable from on the host).
    pub fn http_from_router(&self, h: u32, vni: u32, url: &str) -> std::io::Result<(u16, String)> {
        use std::os::unix::fs::MetadataExt;
        let host_ns = std::fs::metadata(format!("/var/run/netns/{}", self.netns(h)))?.ino();
        // The agent made the router's namespace file in its own mount
        // namespace (`ip netns exec` gives it one): look through its eyes.
        let agent = std::fs::read_dir("/proc")?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.iter().any(|a| *a == b"agent")
                    && std::fs::metadata(format!("/proc/{pid}/ns/net"))
                        .is_ok_and(|m| m.ino() == host_ns)
            })
            .ok_or_else(|| {
                std::io::Error::other(format!("no agent runs in host {h}'s namespace"))
            })?;
        let ns = format!("/proc/{agent}/root/run/netns/svn-{vni:06x}-{host_ns:x}");
        let url = url.to_string();
        std::thread::spawn(move || {
            let f = File::open(&ns)?;
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::other)?;
            http("GET", &url, None, Duration::from_secs(20))
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    }

    /// The pids of the QEMUs of host `h` that are alive.
    pub fn qemu_pids(&self, h: u32) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.dir.join(format!("h{h}/agent/vms"))) {
            for e in dir.flatten() {
                if let Ok(p) = std::fs::read_to_string(e.path().join("qemu.pid"))
                    && let Ok(pid) = p.trim().parse::<u32>()
                    && crate::harness::alive(pid)
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// The last lines of every daemon's log.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".log"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            let text = std::fs::read_to_string(self.dir.join(&n)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {n} ---\n"));
            out.push_str(&lines[lines.len().saturating_sub(25)..].join("\n"));
            out.push('\n');
        }
        out
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- test bed {} logs ---\n{}", self.id, self.logs_tail());
        }
        // Whole logs for a closer look, when asked (passed or not).
        if let Some(keep) = std::env::var_os("TESTBED_KEEP_LOGS") {
            let _ = std::process::Command::new("cp")
                .arg("-r")
                .arg(&self.dir)
                .arg(keep)
                .status();
        }
        // The hosts' private-network routers lived in their agents' mount
        // namespaces, which go with them: their files stay behind, empty.
        use std::os::unix::fs::MetadataExt;
        let inodes: Vec<String> = (1..=self.hosts)
            .filter_map(|h| std::fs::metadata(format!("/var/run/netns/{}", self.netns(h))).ok())
            .map(|m| format!("-{:x}", m.ino()))
            .collect();
        self.script_quiet(&["down"]);
        if let Ok(dir) = std::fs::read_dir("/var/run/netns") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("svn-") && inodes.iter().any(|i| name.ends_with(i.as_str())) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// A tiny HTTP server in the test process on `ip`, answering every request
/// with the peer address it came from. Serves until the process ends.
pub fn whoami_server(ip: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((ip, 0)).expect("bind whoami server");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let peer = c
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            // Read the whole head before answering.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{peer}",
                peer.len()
            );
        }
    });
    port
}

/// The IP of an instance JSON (re-exported for the cluster tests).
pub fn vm_ip(v: &Value) -> Ipv4Addr {
    ip_of(v)
}
