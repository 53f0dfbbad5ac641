//! Builds the default guest image from Debian packages and boots it under QEMU
//! (TCG): HTTP endpoints, disk persistence across a power-button shutdown, the
//! memory tester, the control channel, the accelerator probe, and the build cache.
//!
//! Needs: network access to a Debian mirror the first time (≈28 MB of .debs, cached
//! under target/tmp), qemu-system-x86_64, qemu-img, mkfs.ext4, dumpe2fs, ldd.
//! Only one QEMU runs at a time (the machine has two cores).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use skyvisor_image::{
    BuildOptions, BuildProgress, BuiltImage, DEFAULT_RECIPE, GuestKernelArgs, build,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(60);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// One QEMU at a time.
static QEMU: Mutex<()> = Mutex::new(());

struct Built {
    image: BuiltImage,
    opts: BuildOptions,
    out_dir: PathBuf,
}

static IMAGE: OnceLock<Built> = OnceLock::new();

fn qemu_lock() -> MutexGuard<'static, ()> {
    QEMU.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds skyvisor-guest (release: the memory tester is CPU-bound under TCG) in a
/// private target directory, so the outer cargo's build lock is not contended.
fn guest_binary() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = manifest_dir
        .parent()
        .expect("crates dir")
        .join("guest/Cargo.toml");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building skyvisor-guest failed");
    target.join("release/skyvisor-guest")
}

fn built() -> &'static Built {
    IMAGE.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let opts = BuildOptions::new(tmp.join("image-cache"), guest_binary());
        let out_dir = tmp.join("image-out");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let started = Instant::now();
        let image = rt
            .block_on(build(DEFAULT_RECIPE, &out_dir, &opts, &|p| {
                eprintln!("image: {p}")
            }))
            .expect("the default image builds");
        eprintln!("image built in {:?}: {image:#?}", started.elapsed());
        Built {
            image,
            opts,
            out_dir,
        }
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A minimal HTTP/1.1 client: one request per connection.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    http_timeout(port, method, path, body, Duration::from_secs(20))
}

fn http_timeout(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: guest\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no complete response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, raw[split + 4..].to_vec()))
}

fn get_json(port: u16, path: &str) -> Value {
    send_json(port, "GET", path, b"")
}

fn send_json(port: u16, method: &str, path: &str, body: &[u8]) -> Value {
    let (status, body) =
        http(port, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{method} {path}: {text}");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
}

/// Polls `f` until it returns `Some`, or panics at the deadline with `what`.
fn poll<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running QEMU; killed on drop, even when a test fails.
struct Vm {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    port2: u16,
    started: Instant,
}

impl Vm {
    /// Boots the image with `args`; `overlay` is the data disk (if any).
    fn boot(dir: &Path, overlay: Option<&Path>, args: &GuestKernelArgs) -> Vm {
        let b = built();
        let cmdline = b.image.cmdline_with(args).expect("valid args");
        let (port, port2) = (free_port(), free_port());
        let serial = dir.join("serial.log");
        let _ = std::fs::remove_file(&serial);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "pc", "-accel", "tcg", "-m", "256", "-nographic", "-monitor", "none"])
            .arg("-kernel")
            .arg(&b.image.kernel)
            .arg("-initrd")
            .arg(&b.image.initrd)
            .arg("-append")
            .arg(&cmdline)
            .args([
                "-netdev",
                &format!(
                    "user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80,hostfwd=tcp:127.0.0.1:{port2}-10.0.2.16:80"
                ),
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
                "-device",
                "virtio-serial-pci",
                "-chardev",
                &format!("socket,id=ch0,path={},server=on,wait=off", dir.join("guest.sock").display()),
                "-device",
                "virtserialport,chardev=ch0,name=org.skyvisor.guest.0",
                "-qmp",
                &format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
                "-serial",
                &format!("file:{}", serial.display()),
            ]);
        if let Some(o) = overlay {
            cmd.arg("-drive")
                .arg(format!("file={},if=virtio,format=qcow2", o.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 starts");
        Vm {
            child: Some(child),
            dir: dir.to_path_buf(),
            port,
            port2,
            started: Instant::now(),
        }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default()
    }

    /// Waits until `/health` answers; returns the time since QEMU started.
    fn wait_healthy(&mut self) -> Duration {
        let until = Instant::now() + BOOT_DEADLINE;
        loop {
            // Short timeout: QEMU's user network accepts the connection at once and
            // holds it while the guest's network is still coming up.
            if let Ok((200, body)) =
                http_timeout(self.port, "GET", "/health", b"", Duration::from_secs(1))
                && body == b"ok\n"
            {
                return self.started.elapsed();
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "QEMU exited ({status}) before the guest was healthy; serial:\n{}",
                    self.serial()
                );
            }
            assert!(
                Instant::now() < until,
                "guest not healthy after {BOOT_DEADLINE:?}; serial:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = poll("QEMU to exit", deadline, || {
            child.try_wait().expect("try_wait")
        });
        self.child = None;
        status
    }

    /// Runs QMP commands (after capability negotiation); returns their replies.
    fn qmp(&self, commands: &[&str]) -> Vec<Value> {
        let path = self.dir.join("qmp.sock");
        let stream = poll("the QMP socket", BOOT_DEADLINE, || {
            UnixStream::connect(&path).ok()
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).expect("QMP greeting");
        assert!(line.contains("QMP"), "greeting: {line}");
        let mut replies = Vec::new();
        for cmd in
            std::iter::once(r#"{"execute":"qmp_capabilities"}"#).chain(commands.iter().copied())
        {
            writeln!(writer, "{cmd}").expect("send QMP");
            loop {
                line.clear();
                reader.read_line(&mut line).expect("QMP reply");
                let v: Value = serde_json::from_str(&line).expect("QMP JSON");
                if v.get("return").is_some() || v.get("error").is_some() {
                    replies.push(v);
                    break;
                }
            }
        }
        replies.remove(0);
        replies
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn overlay(dir: &Path) -> PathBuf {
    let b = built();
    let path = dir.join("overlay.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&b.image.disk)
        .arg(&path)
        .status()
        .expect("qemu-img runs");
    assert!(status.success());
    path
}

fn args(name: &str, ip: [u8; 4]) -> GuestKernelArgs {
    GuestKernelArgs {
        name: Some(name.to_string()),
        id: Some(format!("id-{name}")),
        ip: Some((ip.into(), 24)),
        gw: Some([10, 0, 2, 2].into()),
        dns: Some([10, 0, 2, 3].into()),
        probe: false,
        test_hooks: true,
    }
}

#[test]
fn guest_serves_http_memtest_and_control_channel() {
    let _one = qemu_lock();
    let b = built();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = overlay(dir.path());
    let mut vm = Vm::boot(dir.path(), Some(&disk), &args("t1", [10, 0, 2, 15]));
    let boot = vm.wait_healthy();
    eprintln!("boot time (QEMU start to /health): {boot:?}");
    assert!(
        vm.serial().contains("SKYVISOR-GUEST-READY name=t1"),
        "serial:\n{}",
        vm.serial()
    );
    let p = vm.port;

    let (status, page) = http(p, "GET", "/", b"").expect("index");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("Skyvisor guest t1 (id-t1) up"));

    let id = get_json(p, "/identity");
    assert_eq!(id["name"], "t1");
    assert_eq!(id["id"], "id-t1");
    assert_eq!(id["ip"], "10.0.2.15");
    assert_eq!(id["hostname"], "t1");
    assert_eq!(id["kernel"], b.image.kernel_version.as_str());
    let boot_id = id["boot_id"].as_str().expect("boot_id").to_string();
    assert_eq!(boot_id.len(), 36);
    let up = get_json(p, "/uptime");
    assert!(up["uptime_secs"].as_f64().expect("uptime") > 0.0);
    assert_eq!(up["boot_id"], boot_id.as_str());

    // RAM value and the in-memory counter.
    assert_eq!(get_json(p, "/ram")["value"], Value::Null);
    send_json(p, "PUT", "/ram", b"remember me");
    assert_eq!(get_json(p, "/ram")["value"], "remember me");
    let c0 = get_json(p, "/ram/counter")["value"]
        .as_u64()
        .expect("counter");
    poll(
        "the RAM counter to advance",
        Duration::from_secs(10),
        || (get_json(p, "/ram/counter")["value"].as_u64() > Some(c0)).then_some(()),
    );

    // Files on the persistent disk, and error answers.
    send_json(p, "PUT", "/files/a.txt", b"alpha");
    assert_eq!(
        http(p, "GET", "/files/a.txt", b"").expect("get"),
        (200, b"alpha".to_vec())
    );
    assert_eq!(
        http(p, "DELETE", "/files/a.txt", b"").expect("delete").0,
        200
    );
    assert_eq!(http(p, "GET", "/files/a.txt", b"").expect("get").0, 404);
    assert_eq!(http(p, "PUT", "/files/..", b"x").expect("put").0, 400);
    assert_eq!(http(p, "GET", "/nope", b"").expect("get").0, 404);
    assert_eq!(http(p, "POST", "/health", b"").expect("post").0, 405);

    // Memory tester: too big is refused; a real run verifies without mismatches.
    let (status, body) = http(p, "POST", "/memtest/start?mib=100000", b"").expect("start");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    send_json(p, "POST", "/memtest/start?mib=32", b"");
    let s = poll("three memtest passes", Duration::from_secs(180), || {
        let s = get_json(p, "/memtest");
        (s["passes"].as_u64() >= Some(3)).then_some(s)
    });
    assert_eq!(s["mismatches"], 0, "{s}");
    assert!(s["pages_checked"].as_u64() >= Some(2 * 8192), "{s}");
    // Throttled: 4 MiB at 4 MiB/s cannot take much under a second.
    send_json(p, "POST", "/memtest/rate?rate_mib_s=4", b"");
    let b0 = get_json(p, "/memtest")["bytes_written"]
        .as_u64()
        .expect("bytes");
    let t0 = Instant::now();
    poll("4 MiB of throttled writes", Duration::from_secs(60), || {
        (get_json(p, "/memtest")["bytes_written"].as_u64() >= Some(b0 + (4 << 20))).then_some(())
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "throttle ignored: {:?}",
        t0.elapsed()
    );
    let s = send_json(p, "POST", "/memtest/stop", b"");
    assert_eq!(s["running"], false);
    assert_eq!(s["mismatches"], 0, "{s}");

    // Control channel: ping, then a new identity with a new address.
    let sock = poll("the control socket", BOOT_DEADLINE, || {
        UnixStream::connect(dir.path().join("guest.sock")).ok()
    });
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut reader = BufReader::new(sock.try_clone().expect("clone"));
    let mut writer = sock;
    let mut ask = |req: &str| -> Value {
        writeln!(writer, "{req}").expect("send");
        let mut line = String::new();
        reader.read_line(&mut line).expect("control reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    };
    let pong = ask(r#"{"op":"ping"}"#);
    assert_eq!(pong["ok"], true, "{pong}");
    assert_eq!(pong["boot_id"], boot_id.as_str());
    let bad = ask(r#"{"op":"dance"}"#);
    assert_eq!(bad["ok"], false, "{bad}");
    let set = ask(
        r#"{"op":"set-identity","name":"t2","id":"id-t2","ip":"10.0.2.16/24","gw":"10.0.2.2"}"#,
    );
    assert_eq!(set["ok"], true, "{set}");
    let id = poll(
        "the guest at its new address",
        Duration::from_secs(30),
        || {
            http(vm.port2, "GET", "/identity", b"")
                .ok()
                .filter(|(s, _)| *s == 200)
        },
    );
    let id: Value = serde_json::from_slice(&id.1).expect("json");
    assert_eq!(id["name"], "t2");
    assert_eq!(id["id"], "id-t2");
    assert_eq!(id["ip"], "10.0.2.16");
    assert_eq!(id["hostname"], "t2");
    assert_eq!(id["boot_id"], boot_id.as_str(), "same boot, new identity");

    // Graceful poweroff over HTTP ends QEMU.
    let (status, _) = http(vm.port2, "POST", "/poweroff", b"").expect("poweroff");
    assert_eq!(status, 200);
    let exit = vm.wait_exit(EXIT_DEADLINE);
    assert!(exit.success(), "QEMU exit: {exit}");
}

fn fs_state(dir: &Path, overlay: &Path) -> String {
    let raw = dir.join("check.raw");
    let ok = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(overlay)
        .arg(&raw)
        .status()
        .expect("qemu-img")
        .success();
    assert!(ok);
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&raw)
        .output()
        .expect("dumpe2fs");
    let _ = std::fs::remove_file(&raw);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn disk_state_survives_power_button_shutdown() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = overlay(dir.path());
    let mut vm = Vm::boot(dir.path(), Some(&disk), &args("p1", [10, 0, 2, 15]));
    vm.wait_healthy();
    let p = vm.port;
    for expected in 1..=3u64 {
        assert_eq!(
            send_json(p, "POST", "/counter/increment", b"")["value"],
            expected
        );
    }
    send_json(p, "PUT", "/files/keep.txt", b"kept");
    send_json(p, "PUT", "/ram", b"volatile");
    let boot1 = get_json(p, "/identity")["boot_id"].clone();

    // ACPI power button: the guest must sync, unmount and power off by itself.
    let t0 = Instant::now();
    let replies = vm.qmp(&[r#"{"execute":"system_powerdown"}"#]);
    assert!(replies[0].get("return").is_some(), "{replies:?}");
    let exit = vm.wait_exit(EXIT_DEADLINE);
    assert!(exit.success(), "QEMU exit: {exit}");
    eprintln!("system_powerdown to QEMU exit: {:?}", t0.elapsed());
    assert!(
        vm.serial().contains("power button pressed"),
        "serial:\n{}",
        vm.serial()
    );
    let state = fs_state(dir.path(), &disk);
    assert!(state.contains("Filesystem state:         clean"), "{state}");
    assert!(!state.contains("needs_recovery"), "{state}");
    drop(vm);

    let mut vm = Vm::boot(dir.path(), Some(&disk), &args("p1", [10, 0, 2, 15]));
    vm.wait_healthy();
    let p = vm.port;
    assert_eq!(get_json(p, "/counter")["value"], 3);
    assert_eq!(
        http(p, "GET", "/files/keep.txt", b"").expect("get"),
        (200, b"kept".to_vec())
    );
    assert_eq!(
        get_json(p, "/ram")["value"],
        Value::Null,
        "RAM state must not survive a reboot"
    );
    let boot2 = get_json(p, "/identity")["boot_id"].clone();
    assert_ne!(boot2, boot1);
    assert_eq!(send_json(p, "POST", "/counter/increment", b"")["value"], 4);

    // A guest-initiated reboot keeps QEMU running and the disk intact.
    let (status, _) = http(p, "POST", "/reboot", b"").expect("reboot");
    assert_eq!(status, 200);
    let boot3 = poll(
        "the guest to come back with a new boot id",
        BOOT_DEADLINE,
        || {
            http_timeout(p, "GET", "/identity", b"", Duration::from_secs(1))
                .ok()
                .filter(|(s, _)| *s == 200)
                .and_then(|(_, body)| serde_json::from_slice::<Value>(&body).ok())
                .map(|id| id["boot_id"].clone())
                .filter(|id| *id != boot2)
        },
    );
    assert!(boot3.is_string());
    assert_eq!(get_json(p, "/counter")["value"], 4);
}

#[test]
fn probe_mode_prints_marker_and_powers_off() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let probe = GuestKernelArgs {
        probe: true,
        ..Default::default()
    };
    let mut vm = Vm::boot(dir.path(), None, &probe);
    let exit = vm.wait_exit(BOOT_DEADLINE);
    eprintln!("probe: QEMU start to exit {:?}", vm.started.elapsed());
    assert!(exit.success(), "QEMU exit: {exit}");
    assert!(
        vm.serial().lines().any(|l| l.trim() == "SKYVISOR-PROBE-OK"),
        "serial:\n{}",
        vm.serial()
    );
    assert!(
        !vm.serial().contains("SKYVISOR-GUEST-READY"),
        "probe must not start the service"
    );
}

#[test]
fn second_build_comes_from_the_cache_quickly() {
    let b = built();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let events = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let again = rt
        .block_on(build(DEFAULT_RECIPE, &b.out_dir, &b.opts, &|p| {
            events.lock().unwrap_or_else(|e| e.into_inner()).push(p)
        }))
        .expect("cached build");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "cached build took {took:?}");
    assert_eq!(again, b.image);
    let events = events.into_inner().unwrap_or_else(|e| e.into_inner());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BuildProgress::CacheHit { .. })),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, BuildProgress::Downloading { .. })),
        "{events:?}"
    );
    assert!(
        b.image
            .packages
            .iter()
            .any(|p| p.starts_with("linux-image-"))
    );
    assert!(
        b.image
            .packages
            .iter()
            .any(|p| p.starts_with("busybox-static="))
    );
    for f in [&b.image.kernel, &b.image.initrd, &b.image.disk] {
        assert!(f.starts_with(&b.out_dir) && f.is_file(), "{}", f.display());
    }
}
