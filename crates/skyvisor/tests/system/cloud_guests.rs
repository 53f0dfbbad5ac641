//! Full-OS guests: the `debian-12` image built from Debian packages, booted
//! with a project key pair, user data and a hostname through cloud-init's
//! NoCloud seed; readiness is cloud-init's own report through the guest
//! agent; SSH in with the key; a stop and start keeps the guest's files
//! and does not run first boot again; a user's imported qcow2 boots the
//! same way.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::{Cloud, skyvisor_bin};

/// Builds `debian-12` (a cache hit after the first run on a machine).
fn build_image(cloud: &Cloud) -> Value {
    cloud.sv_json(&["image", "build", "debian-12"]);
    let img = cloud.sv_json(&["image", "show", "debian-12"]);
    assert_eq!(img["kind"], "disk", "{img}");
    assert_eq!(img["ssh_user"], "debian", "{img}");
    assert_eq!(img["cloud_init"], true, "{img}");
    img
}

/// Makes key pair `name` of the project with the CLI (`run`); returns the
/// private key's file, in `dir`.
fn new_key_pair(run: impl Fn(&[&str]) -> String, dir: &Path, name: &str) -> std::path::PathBuf {
    let key = dir.join(name);
    run(&[
        "keypair",
        "create",
        name,
        "--out",
        key.to_str().expect("path"),
    ]);
    key
}

/// `ssh -i KEY debian@IP` with no prompts and no known-hosts file.
fn ssh_to(key: &Path, ip: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-i",
    ])
    .arg(key)
    .arg(format!("debian@{ip}"));
    c
}

/// `skyvisor vm ssh NAME -i KEY -- COMMAND`, with ssh's known hosts in
/// `home`.
fn vm_ssh(cloud: &Cloud, home: &Path, name: &str, key: &Path, command: &str) -> Output {
    Command::new(skyvisor_bin())
        .args(["vm", "ssh", name, "-i"])
        .arg(key)
        .args(["--", command])
        .env("HOME", home)
        .env("SKYVISOR_URL", &cloud.url)
        .env("SKYVISOR_DATA_DIR", &cloud.data_dir)
        .env("SKYVISOR_CONFIG", cloud.data_dir.join("cli-config.toml"))
        .output()
        .expect("run skyvisor vm ssh")
}

fn ssh_ok(cloud: &Cloud, home: &Path, name: &str, key: &Path, command: &str) -> String {
    let out = vm_ssh(cloud, home, name, key, command);
    assert!(
        out.status.success(),
        "vm ssh {name} {command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_cloud_init_finished(vm: &Value) {
    let ci = &vm["status"]["cloud_init"];
    assert!(
        ci["datasource"]
            .as_str()
            .is_some_and(|d| d.contains("NoCloud")),
        "cloud-init must report its NoCloud seed: {vm}"
    );
    assert_eq!(ci["errors"], serde_json::json!([]), "{vm}");
}

const USER_DATA: &str = "#cloud-config
write_files:
  - path: /var/tmp/from-user-data
    content: written by user data
runcmd:
  - [sh, -c, 'echo ran >> /var/tmp/first-boot-runs']
";

/// A guest's shell command that reads its instance id from the metadata
/// service the IMDSv2 way (a session token first).
const IMDS_V2_INSTANCE_ID: &str = "python3 -c \"import urllib.request as u; m='http://169.254.169.254/latest/'; t=u.urlopen(u.Request(m+'api/token', method='PUT', headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'}), timeout=20).read().decode(); print(u.urlopen(u.Request(m+'meta-data/instance-id', headers={'X-aws-ec2-metadata-token': t}), timeout=20).read().decode())\"";

#[test]
fn a_debian_guest_gets_its_key_user_data_and_hostname_and_first_boot_runs_once() {
    let cloud = Cloud::start();
    build_image(&cloud);
    let tmp = tempfile::tempdir().expect("tmp");
    let key = new_key_pair(|a| cloud.sv_ok(a), tmp.path(), "mine");
    let user_data = tmp.path().join("user-data");
    std::fs::write(&user_data, USER_DATA).expect("user data");

    cloud.sv_json(&["volume", "create", "data", "--size", "64M"]);
    let vm = cloud.sv_json(&[
        "vm",
        "create",
        "deb",
        "--image",
        "debian-12",
        "--type",
        "small",
        "--volume",
        "data",
        "--key",
        "mine",
        "--user-data",
        user_data.to_str().expect("path"),
        "--hostname",
        "deb-host",
        "--wait",
        "--timeout",
        "900",
    ]);
    // --wait returned once cloud-init reported, not before.
    assert_eq!(vm["status"]["guest_ready"], true, "{vm}");
    assert_cloud_init_finished(&vm);
    let ip = vm["spec"]["network"]["ip"]
        .as_str()
        .expect("ip")
        .to_string();
    let addrs = vm["status"]["guest_addresses"]
        .as_array()
        .expect("addresses");
    assert!(
        addrs
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.starts_with(&format!("{ip}/")))),
        "the guest agent reports the address the network gave: {vm}"
    );
    let show = cloud.sv_ok(&["vm", "show", "deb"]);
    assert!(show.contains(&format!("ssh debian@{ip}")), "{show}");

    // SSH in with the key: user data ran, the hostname is set, and
    // password login is off.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let out = ssh_ok(
        &cloud,
        &home,
        "deb",
        &key,
        &format!(
            "cat /var/tmp/from-user-data; echo; hostname; cat /var/tmp/first-boot-runs; sudo sshd -T | grep -i '^passwordauthentication'; {IMDS_V2_INSTANCE_ID}"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    let id = vm["spec"]["id"].as_str().expect("id");
    assert_eq!(
        lines,
        [
            "written by user data",
            "deb-host",
            "ran",
            "passwordauthentication no",
            id,
        ],
        "{out}"
    );

    // Its resolver is the gateway's DNS server: its own name resolves,
    // bare (the project's search domain) and in full.
    let out = ssh_ok(
        &cloud,
        &home,
        "deb",
        &key,
        "getent hosts deb | cut -d' ' -f1; getent hosts deb.default.skyvisor.internal | cut -d' ' -f1",
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [ip.as_str(), ip.as_str()],
        "{out}"
    );

    // A snapshot of its volume freezes the guest's file systems through
    // its guest agent, and thaws them: the guest writes again at once.
    let snap = cloud.sv_json(&["volume", "snapshot", "create", "data", "s1"]);
    assert_eq!(snap["consistency"], "file_system", "{snap}");
    let out = ssh_ok(
        &cloud,
        &home,
        "deb",
        &key,
        "timeout 20 sh -c 'echo after > /var/tmp/after-snapshot && sync' && cat /var/tmp/after-snapshot",
    );
    assert_eq!(out.trim(), "after", "the guest is still frozen: {out}");

    // Another key is refused.
    let other = new_key_pair(|a| cloud.sv_ok(a), tmp.path(), "other");
    let refused = vm_ssh(&cloud, &home, "deb", &other, "true");
    assert!(
        !refused.status.success(),
        "a key the VM was not given got in"
    );

    // Stop and start: the guest's own changes stay, and cloud-init does not
    // run first boot again (the instance id is the VM's id).
    ssh_ok(
        &cloud,
        &home,
        "deb",
        &key,
        "echo mine > /var/tmp/guest-change; sync",
    );
    cloud.sv_ok(&["vm", "stop", "deb"]);
    let stopped = cloud.instance("deb");
    assert_eq!(
        stopped["status"]["last_exit"]["detail"],
        "shut down gracefully (asked through the guest agent)",
        "{stopped}"
    );
    let vm = cloud.sv_json(&["vm", "start", "deb", "--wait", "--timeout", "900"]);
    assert_eq!(vm["status"]["boot_count"], 2, "{vm}");
    let vm = cloud.instance("deb");
    assert_cloud_init_finished(&vm);
    let out = ssh_ok(
        &cloud,
        &home,
        "deb",
        &key,
        "cat /var/tmp/guest-change /var/tmp/first-boot-runs",
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["mine", "ran"], "{out}");
}

#[test]
fn an_imported_cloud_image_boots_the_same_way_and_bad_guest_input_is_refused() {
    let cloud = Cloud::start();
    let img = build_image(&cloud);
    let tmp = tempfile::tempdir().expect("tmp");
    let key = new_key_pair(|a| cloud.sv_ok(a), tmp.path(), "mine");

    // Bad input: refused with the field named, nothing created.
    let big = tmp.path().join("big");
    std::fs::write(&big, format!("#!/bin/sh\n{}", "x".repeat(17 * 1024))).expect("write");
    let bad_yaml = tmp.path().join("bad-yaml");
    std::fs::write(&bad_yaml, "#cloud-config\nruncmd: [ls\n").expect("write");
    let binary = tmp.path().join("binary");
    std::fs::write(&binary, [0x1f, 0x8b, 0xff, 0x00]).expect("write");
    for (args, expect) in [
        (vec!["--key", "nope"], "no key pair \"nope\""),
        (
            vec!["--user-data", big.to_str().expect("path")],
            "at most 16384 characters",
        ),
        (
            vec!["--user-data", bad_yaml.to_str().expect("path")],
            "not a valid YAML mapping",
        ),
        (
            vec!["--user-data", binary.to_str().expect("path")],
            "not UTF-8",
        ),
        (vec!["--hostname", "bad_name"], "hostname"),
    ] {
        let mut a = vec!["vm", "create", "bad", "--image", "debian-12"];
        a.extend(args);
        let err = cloud.sv_err(&a);
        assert!(err.contains(expect), "{a:?}: {err}");
    }
    let (status, body) = cloud.api(
        "POST",
        "/v1/instances",
        Some(r##"{"name":"bad","image":"debian-12","user_data":"#cloud-config\n- a list\n"}"##),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("user_data"), "{body}");
    let (status, _) = cloud.api("GET", "/v1/instances/bad", None);
    assert_eq!(status, 404, "a refused create leaves nothing");

    // The built disk, imported as a user's own cloud image.
    let file = img["files"][0]["file_name"].as_str().expect("file name");
    let disk = cloud.data_dir.join("images/default/debian-12").join(file);
    let imported = cloud.sv_json(&[
        "image",
        "import",
        "my-cloud",
        "--disk",
        disk.to_str().expect("path"),
        "--cloud-init",
        "--ssh-user",
        "debian",
    ]);
    assert_eq!(imported["kind"], "disk", "{imported}");
    let vm = cloud.sv_json(&[
        "vm",
        "create",
        "mine",
        "--image",
        "my-cloud",
        "--type",
        "small",
        "--key",
        "mine",
        "--wait",
        "--timeout",
        "900",
    ]);
    assert_cloud_init_finished(&vm);
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let out = ssh_ok(
        &cloud,
        &home,
        "mine",
        &key,
        "hostname; df -BG --output=size / | tail -1",
    );
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines.first(), Some(&"mine"), "{out}");
    // cloud-init grew the root file system to the type's 4 GiB disk.
    let size: u64 = lines
        .get(1)
        .and_then(|s| s.trim_end_matches('G').parse().ok())
        .unwrap_or(0);
    assert!(size >= 3, "root file system {size} GiB: {out}");
}

/// An SSH session that prints a line every 200 ms; records when each
/// line arrived.
struct TickingSession {
    child: std::process::Child,
    ticks: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
}

impl TickingSession {
    fn open(key: &Path, ip: &str) -> Self {
        use std::io::BufRead;
        let mut child = ssh_to(key, ip)
            .arg("while true; do echo tick; sleep 0.2; done")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ssh");
        let out = child.stdout.take().expect("stdout");
        let ticks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ticks.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                if line.is_err() {
                    break;
                }
                if let Ok(mut t) = seen.lock() {
                    t.push(std::time::Instant::now());
                }
            }
        });
        Self { child, ticks }
    }

    fn count(&self) -> usize {
        self.ticks.lock().map(|t| t.len()).unwrap_or(0)
    }

    fn longest_gap(&self) -> std::time::Duration {
        let t = self.ticks.lock().map(|t| t.clone()).unwrap_or_default();
        t.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

impl Drop for TickingSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_debian_guest_keeps_an_open_ssh_session_across_a_live_migration() {
    use std::time::Duration;

    use crate::harness::wait_until;
    use crate::testbed::TestBed;

    let bed = TestBed::start(2, 1);
    bed.sv_json(&["image", "build", "debian-12"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let key = new_key_pair(|a| bed.sv_ok(a), tmp.path(), "mine");
    let vm = bed.sv_json(&[
        "vm",
        "create",
        "deb",
        "--image",
        "debian-12",
        "--type",
        "small",
        "--key",
        "mine",
        "--local-disk",
        "--wait",
        "--timeout",
        "900",
    ]);
    assert_cloud_init_finished(&vm);
    let ip = vm["spec"]["network"]["ip"]
        .as_str()
        .expect("ip")
        .to_string();
    let from = vm["spec"]["host"].as_str().expect("host").to_string();
    let to = if from == "h1" { "h2" } else { "h1" };

    let mut session = TickingSession::open(&key, &ip);
    wait_until("the SSH session ticks", Duration::from_secs(120), || {
        (session.count() >= 5).then_some(())
    });
    let m = bed.sv_json(&["vm", "migrate", "deb", "--to", to]);
    assert_eq!(m["phase"], "completed", "{m}");
    let at_move = session.count();
    wait_until(
        "the SSH session ticks after the move",
        Duration::from_secs(120),
        || (session.count() >= at_move + 10).then_some(()),
    );
    assert!(
        session.child.try_wait().expect("ssh status").is_none(),
        "the SSH session ended"
    );
    let gap = session.longest_gap();
    eprintln!(
        "migration pause {} ms; the session's longest silence {gap:?}",
        m["result"]["pause_ms"]
    );
    assert!(gap < Duration::from_secs(30), "the session stalled {gap:?}");

    // The same boot on the new host: cloud-init did not run again.
    let now = bed.instance("deb");
    assert_eq!(now["spec"]["host"], to, "{now}");
    assert_eq!(now["status"]["boot_count"], 1, "{now}");
    let out = ssh_to(&key, &ip)
        .arg("cloud-init status; ls /var/lib/cloud/instances | wc -l")
        .output()
        .expect("ssh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: done"), "{text}");
    assert_eq!(
        text.lines().last().map(str::trim),
        Some("1"),
        "one instance, one first boot: {text}"
    );
}
