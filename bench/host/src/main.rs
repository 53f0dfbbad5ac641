//! Single-host benchmark (a report, not a test). Starts its own
//! `skyvisor up` and measures, in the same run:
//! - boot: `vm create` → the guest's web service answering, against the same
//!   image started with a raw QEMU command line (median of N, and the ratio);
//! - API latency of create / list / show (p50, p99);
//! - the daemon's memory, and QEMU's memory per idle VM of each small type.
//!
//! Usage (root): `cargo run --release -p skyvisor-bench-host -- [--runs N]`

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

const BRIDGE: &str = "svbench0";
const SUBNET: &str = "10.219.0";

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("--runs N")?
        .unwrap_or(5);
    let bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("skyvisor"))
        .ok_or_else(|| anyhow!("no exe dir"))?;
    if !bin.exists() {
        bail!("build the workspace first: {} is missing", bin.display());
    }
    let bench = Bench::start(&bin)?;
    let result = bench.run(runs);
    drop(bench);
    result
}

struct Bench {
    bin: PathBuf,
    data: PathBuf,
    url: String,
    up: Child,
}

impl Bench {
    fn start(bin: &Path) -> Result<Self> {
        let data = PathBuf::from("/tmp/svbench");
        cleanup_net();
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let log = std::fs::File::create(data.join("up.log"))?;
        // Room for the API-latency VMs: they are created stopped but still
        // reserve their vCPUs.
        let config = data.join("bench.toml");
        std::fs::write(
            &config,
            "[overcommit]\ncpu = 64.0\nmemory = 1.0\ndisk = 4.0\n",
        )?;
        let port = 17999;
        let up = Command::new(bin)
            .args(["up", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--accel",
                "tcg",
                "--bridge",
                BRIDGE,
                "--subnet",
                &format!("{SUBNET}.0/24"),
                "--host-name",
                "bench",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let b = Bench {
            bin: bin.to_path_buf(),
            data,
            url: format!("http://127.0.0.1:{port}"),
            up,
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        while !std::fs::read_to_string(b.data.join("up.log"))?.contains("Skyvisor is up") {
            if Instant::now() > deadline {
                bail!("skyvisor up did not start; see {}/up.log", b.data.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(b)
    }

    fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
        let token = std::fs::read_to_string(self.data.join("admin.token")).ok();
        let (status, text) = http(
            method,
            &format!("{}{path}", self.url),
            body,
            token.as_deref().map(str::trim),
        )?;
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| text.clone())?
        };
        Ok((status, v))
    }

    fn run(&self, runs: usize) -> Result<()> {
        println!("# Skyvisor single-host benchmark ({runs} runs each, TCG)\n");
        // Boot: alternate raw and Skyvisor so drift hits both alike.
        let image = self.data.join("images/default/debian-busybox");
        let kernel = find(&image, "vmlinuz")?;
        let initrd = find(&image, "initrd")?;
        let base = find(&image, "base-")?;
        let (_, img) = self.api("GET", "/v1/images/debian-busybox", None)?;
        let cmdline = img["cmdline"]
            .as_str()
            .unwrap_or("console=ttyS0")
            .to_string();
        let mut raw = Vec::new();
        let mut sky = Vec::new();
        for i in 0..runs {
            raw.push(self.boot_raw(i, &kernel, &initrd, &base, &cmdline)?);
            sky.push(self.boot_skyvisor(i)?);
        }
        let (r, s) = (median(&mut raw), median(&mut sky));
        println!("## Boot: create → guest web service answers (micro: 1 vCPU, 256 MiB)\n");
        println!("| | median | min | max |\n|---|---|---|---|");
        println!(
            "| raw QEMU command line | {:.2} s | {:.2} s | {:.2} s |",
            r,
            min(&raw),
            max(&raw)
        );
        println!(
            "| skyvisor vm create | {:.2} s | {:.2} s | {:.2} s |",
            s,
            min(&sky),
            max(&sky)
        );
        println!("\nratio skyvisor / raw: **{:.3}** (target ≤ 1.10)\n", s / r);

        // API latency.
        let n = 100;
        let mut create = Vec::new();
        for i in 0..n {
            let body = format!(
                "{{\"name\":\"lat-{i}\",\"image\":\"debian-busybox\",\"instance_type\":\"nano\",\"start\":false}}"
            );
            let t = Instant::now();
            let (st, v) = self.api("POST", "/v1/instances", Some(&body))?;
            create.push(t.elapsed().as_secs_f64() * 1000.0);
            if st != 201 {
                bail!("create failed: {st} {v}");
            }
        }
        let mut list = Vec::new();
        let mut show = Vec::new();
        for i in 0..n {
            let t = Instant::now();
            self.api("GET", "/v1/instances", None)?;
            list.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            self.api("GET", &format!("/v1/instances/lat-{i}"), None)?;
            show.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!("## API latency ({n} requests each; list returns {n} VMs)\n");
        println!("| call | p50 | p99 |\n|---|---|---|");
        for (name, v) in [
            ("create", &mut create),
            ("list", &mut list),
            ("show", &mut show),
        ] {
            println!(
                "| {name} | {:.2} ms | {:.2} ms |",
                pct(v, 50.0),
                pct(v, 99.0)
            );
        }
        for i in 0..n {
            self.api("DELETE", &format!("/v1/instances/lat-{i}?force=true"), None)?;
        }

        // Memory.
        println!("\n## Memory\n");
        println!(
            "skyvisor up (API + agent + store), RSS after the above: **{:.1} MiB**\n",
            rss_kib(self.up.id()) as f64 / 1024.0
        );
        println!("| type | guest memory | QEMU RSS, idle guest | QEMU PSS |\n|---|---|---|---|");
        for ty in ["nano", "micro", "small"] {
            let name = format!("mem-{ty}");
            self.sv(&["vm", "create", &name, "--type", ty, "--wait"])?;
            let (_, v) = self.api("GET", &format!("/v1/instances/{name}"), None)?;
            let pid = v["status"]["pid"]
                .as_u64()
                .ok_or_else(|| anyhow!("no pid"))? as u32;
            let mem = v["spec"]["resources"]["memory_mib"].as_u64().unwrap_or(0);
            // Let the guest settle into idle.
            std::thread::sleep(Duration::from_secs(5));
            println!(
                "| {ty} | {mem} MiB | {:.1} MiB | {:.1} MiB |",
                rss_kib(pid) as f64 / 1024.0,
                pss_kib(pid) as f64 / 1024.0
            );
            self.sv(&["vm", "delete", &name, "--force"])?;
        }
        Ok(())
    }

    fn sv(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("SKYVISOR_URL", &self.url)
            .output()?;
        if !out.status.success() {
            bail!(
                "skyvisor {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn boot_skyvisor(&self, i: usize) -> Result<f64> {
        let name = format!("boot-{i}");
        let body = format!(
            "{{\"name\":\"{name}\",\"image\":\"debian-busybox\",\"instance_type\":\"micro\"}}"
        );
        let t = Instant::now();
        let (st, v) = self.api("POST", "/v1/instances", Some(&body))?;
        if st != 201 {
            bail!("create failed: {st} {v}");
        }
        let ip: Ipv4Addr = v["spec"]["network"]["ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no ip"))?;
        wait_health(ip)?;
        let secs = t.elapsed().as_secs_f64();
        self.api("DELETE", &format!("/v1/instances/{name}?force=true"), None)?;
        wait(|| {
            self.api("GET", &format!("/v1/instances/{name}"), None)
                .map(|(s, _)| s == 404)
                .unwrap_or(false)
        })?;
        Ok(secs)
    }

    fn boot_raw(
        &self,
        i: usize,
        kernel: &Path,
        initrd: &Path,
        base: &Path,
        cmdline: &str,
    ) -> Result<f64> {
        let dir = self.data.join(format!("raw-{i}"));
        std::fs::create_dir_all(&dir)?;
        let disk = dir.join("root.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                &base.display().to_string(),
                &disk.display().to_string(),
                "2G",
            ],
        )?;
        let tap = format!("svbraw{i}");
        run("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        run("ip", &["link", "set", &tap, "master", BRIDGE, "up"])?;
        let ip = Ipv4Addr::new(10, 219, 0, 250);
        let append = format!("{cmdline} sv.name=raw sv.ip={ip}/24 sv.gw={SUBNET}.1");
        let t = Instant::now();
        let mut qemu = Command::new("qemu-system-x86_64")
            .args([
                "-M", "pc", "-accel", "tcg", "-cpu", "qemu64", "-m", "256", "-smp", "1",
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache=writeback",
                disk.display()
            ))
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:be:ec:00"])
            .args(["-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("serial.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let r = wait_health(ip);
        let secs = t.elapsed().as_secs_f64();
        let _ = qemu.kill();
        let _ = qemu.wait();
        let _ = run("ip", &["link", "del", &tap]);
        let _ = std::fs::remove_dir_all(&dir);
        r.map(|()| secs)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.up.kill();
        let _ = self.up.wait();
        if let Ok(d) = std::fs::read_dir(self.data.join("agent/vms")) {
            for e in d.flatten() {
                if let Ok(p) = std::fs::read_to_string(e.path().join("qemu.pid")) {
                    let _ = Command::new("kill").args(["-9", p.trim()]).status();
                }
            }
        }
        for l in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = l.file_name().to_string_lossy().into_owned();
            let master = std::fs::read_link(l.path().join("master")).ok();
            if master.is_some_and(|m| m.ends_with(BRIDGE)) {
                let _ = run("ip", &["link", "del", &name]);
            }
        }
        cleanup_net();
    }
}

fn cleanup_net() {
    let _ = run("ip", &["link", "del", BRIDGE]);
    let _ = run(
        "nft",
        &["delete", "table", "ip", &format!("skyvisor-{BRIDGE}")],
    );
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        bail!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn find(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .ok_or_else(|| anyhow!("no {prefix}* in {}", dir.display()))
}

fn wait(mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Polls the guest's /health every 20 ms (the same for both paths).
fn wait_health(ip: Ipv4Addr) -> Result<()> {
    wait(|| {
        http("GET", &format!("http://{ip}/health"), None, None)
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    })
}

fn http(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("http only"))?;
    let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = if auth.contains(':') {
        auth.parse()?
    } else {
        format!("{auth}:80").parse()?
    };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    let bearer = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {auth}\r\nConnection: close\r\n{bearer}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad response"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn median(v: &mut [f64]) -> f64 {
    pct(v, 50.0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
