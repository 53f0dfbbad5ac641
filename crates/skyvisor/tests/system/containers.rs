//! Containers on a real host: real `crun`, real namespaces and cgroups,
//! real HTTP to the guest service inside, and the host checked for what a
//! container leaves behind.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::ha::{failovers, route_around, running_elsewhere};
use crate::harness::{Cloud, alive, guest_json, http, ip_of, wait_until};
use crate::networks::{fetch_from, resolved_by};
use crate::testbed::TestBed;

/// Waits until the container image `skyvisor up` builds in the background
/// is ready.
fn wait_for_rootfs_image(cloud: &Cloud) {
    wait_until(
        "image debian-rootfs ready",
        Duration::from_secs(600),
        || {
            let out = cloud.sv(&["image", "show", "debian-rootfs", "-o", "json"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["state"] == "ready").then_some(())
        },
    );
}

/// Runs `command` in container `name`; gives (exit status, stdout).
fn exec(cloud: &Cloud, name: &str, command: &[&str]) -> (i32, String) {
    let mut args = vec!["vm", "exec", name, "--"];
    args.extend(command);
    let out = cloud.sv(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn exec_ok(cloud: &Cloud, name: &str, command: &[&str]) -> String {
    let (code, out) = exec(cloud, name, command);
    assert_eq!(code, 0, "{command:?} in {name} exited {code}: {out}");
    out
}

/// Runs `skyvisor vm exec -t NAME -- sh` on a pseudo-terminal, types
/// `lines` into it, and gives (exit status, everything the terminal showed).
fn tty_session(cloud: &Cloud, name: &str, lines: &[&str]) -> (i32, String) {
    let script = r##"
import os, pty, select, sys, time
argv, lines = sys.argv[1:8], sys.argv[8:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
out = b""
def pump(until, secs):
    global out
    end = time.time() + secs
    while time.time() < end:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                d = os.read(fd, 4096)
            except OSError:
                return
            if not d:
                return
            out += d
            if until is not None and until in out:
                return
pump(b"# ", 60)
for line in lines:
    os.write(fd, line.encode() + b"\r")
pump(None, 30)
status = None
for _ in range(60):
    p, st = os.waitpid(pid, os.WNOHANG)
    if p:
        status = os.waitstatus_to_exitcode(st)
        break
    time.sleep(0.5)
if status is None:
    os.kill(pid, 9)
    status = -1
sys.stdout.write(str(status) + "\n" + out.decode(errors="replace"))
"##;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(crate::harness::skyvisor_bin())
        .args(["vm", "exec", "-t"])
        .arg(name)
        .arg("--")
        .arg("sh")
        .args(lines)
        .env("SKYVISOR_URL", &cloud.url)
        .env("SKYVISOR_DATA_DIR", &cloud.data_dir)
        .env("SKYVISOR_CONFIG", cloud.data_dir.join("cli-config.toml"))
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.split_once('\n') {
        Some((code, shown)) => (code.trim().parse().unwrap_or(-1), shown.to_string()),
        None => (
            -1,
            format!(
                "(the driver failed: {})",
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
    }
}

/// The memory limit the container reads from its own cgroup (v2 or v1).
fn memory_limit_inside(cloud: &Cloud, name: &str) -> u64 {
    let out = exec_ok(
        cloud,
        name,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        ],
    );
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("memory limit {out:?}"))
}

/// What of container `id` (its id without dashes) is left on the host:
/// every trace found, none when it is gone.
fn traces(cloud_dir: &Path, id: &str) -> Vec<String> {
    let cid = format!("sv-{id}");
    let mut found = Vec::new();
    let vm_dir = cloud_dir.join("agent/vms").join(id);
    if vm_dir.exists() {
        found.push(format!("directory {}", vm_dir.display()));
    }
    if cloud_dir.join("agent/crun").join(&cid).exists() {
        found.push("the runtime's state".into());
    }
    for cg in [
        format!("/sys/fs/cgroup/memory/skyvisor/{cid}"),
        format!("/sys/fs/cgroup/skyvisor/{cid}"),
    ] {
        if Path::new(&cg).exists() {
            found.push(format!("cgroup {cg}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.contains(&vm_dir.display().to_string()) {
        found.push("its root mount".into());
    }
    let short = &id[..8];
    for dev in [format!("svt{short}"), format!("svp{short}")] {
        if Path::new("/sys/class/net").join(&dev).exists() {
            found.push(format!("device {dev}"));
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let cgroup = std::fs::read_to_string(p.path().join("cgroup")).unwrap_or_default();
            if cgroup.contains(&cid) {
                found.push(format!("process {}", p.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn id_of(v: &Value) -> String {
    v["spec"]["id"].as_str().expect("id").replace('-', "")
}

#[test]
fn a_container_answers_is_isolated_keeps_its_layer_resizes_live_and_leaves_no_trace() {
    let cloud = Cloud::start();
    wait_for_rootfs_image(&cloud);
    let v = cloud.sv_json(&[
        "vm",
        "create",
        "c1",
        "--kind",
        "container",
        "--type",
        "nano",
        "--wait",
        "--timeout",
        "120",
    ]);
    assert_eq!(v["spec"]["kind"], "container", "{v}");
    let ip = ip_of(&v);
    let id = id_of(&v);
    let list = cloud.sv_ok(&["vm", "list"]);
    assert!(list.contains("container"), "vm list shows the kind: {list}");

    // The same guest service as in a VM answers, on the project's network.
    let identity = guest_json(ip, "/identity");
    assert_eq!(identity["name"], "c1", "{identity}");
    let boot_id = identity["boot_id"].as_str().expect("boot id").to_string();

    // Root inside is an unprivileged id outside.
    assert_eq!(exec_ok(&cloud, "c1", &["id", "-u"]).trim(), "0");
    let map = exec_ok(&cloud, "c1", &["cat", "/proc/self/uid_map"]);
    let map: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(map, ["0", "1000000", "65536"], "uid map");
    let pid = cloud.instance("c1")["status"]["pid"].as_u64().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("init status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid.contains("1000000"),
        "the init runs as host uid 1000000: {uid}"
    );
    // It sees none of the host's devices, processes or files, and may not
    // mount or change its address.
    let devices = exec_ok(&cloud, "c1", &["ls", "/sys/class/net"]);
    let devices: Vec<&str> = devices.split_whitespace().collect();
    assert_eq!(devices, ["eth0", "lo"], "network devices inside");
    let procs = exec_ok(&cloud, "c1", &["sh", "-c", "ls /proc | grep -c '^[0-9]'"]);
    let procs: u32 = procs.trim().parse().expect("count");
    assert!(
        procs < 10,
        "{procs} processes visible: the host's would be hundreds"
    );
    let host_dir = cloud.data_dir.display().to_string();
    assert_ne!(
        exec(&cloud, "c1", &["test", "-e", &host_dir]).0,
        0,
        "the host's files are visible"
    );
    assert_eq!(
        exec(&cloud, "c1", &["test", "-x", "/init"]).0,
        0,
        "its root is its image"
    );
    assert_ne!(
        exec(&cloud, "c1", &["mount", "-t", "tmpfs", "x", "/mnt"]).0,
        0,
        "mount allowed"
    );
    assert_ne!(
        exec(
            &cloud,
            "c1",
            &["ip", "addr", "add", "10.1.2.3/24", "dev", "eth0"]
        )
        .0,
        0,
        "the container changed its own address"
    );
    // exec's exit status is the command's.
    assert_eq!(exec(&cloud, "c1", &["sh", "-c", "exit 7"]).0, 7);
    // Interactively, on a terminal of its own: what is typed runs, its
    // output comes back, and the session ends with the shell's status.
    let (code, shown) = tty_session(&cloud, "c1", &["echo $((6*7)); tty", "exit 3"]);
    assert!(shown.contains("42"), "the typed command's output: {shown}");
    assert!(shown.contains("/dev/pts/"), "a terminal inside: {shown}");
    assert_eq!(code, 3, "the session's status is the shell's: {shown}");

    // The writable layer outlives a stop.
    exec_ok(&cloud, "c1", &["sh", "-c", "echo kept > /data/keep"]);
    cloud.sv_ok(&["vm", "stop", "c1"]);
    let stopped = cloud.instance("c1");
    assert_eq!(stopped["status"]["phase"], "stopped", "{stopped}");
    let detail = stopped["status"]["last_exit"]["detail"]
        .as_str()
        .unwrap_or("");
    assert!(
        detail.contains("gracefully"),
        "a container stops on SIGTERM: {detail}"
    );
    let left = traces(&cloud.data_dir, &id);
    assert!(
        left.iter().all(|t| t.starts_with("directory")),
        "a stopped container keeps only its directory: {left:?}"
    );
    cloud.sv_ok(&["vm", "start", "c1", "--wait", "--timeout", "120"]);
    assert_eq!(exec_ok(&cloud, "c1", &["cat", "/data/keep"]).trim(), "kept");
    let identity = guest_json(ip, "/identity");
    assert_ne!(
        identity["boot_id"],
        boot_id.as_str(),
        "a start is a new boot"
    );

    // Resized without a restart: the new limit is in force inside, the
    // same init runs.
    let before = cloud.instance("c1");
    let pid = before["status"]["pid"].clone();
    assert_eq!(memory_limit_inside(&cloud, "c1"), 128 << 20);
    cloud.sv_ok(&["vm", "resize", "c1", "--type", "micro"]);
    wait_until(
        "the new memory limit inside",
        Duration::from_secs(30),
        || (memory_limit_inside(&cloud, "c1") == 256 << 20).then_some(()),
    );
    let after = cloud.instance("c1");
    assert_eq!(after["status"]["pid"], pid, "resized live, not restarted");
    assert_eq!(
        after["status"]["boot_count"],
        before["status"]["boot_count"]
    );

    // A process beyond the limit is killed inside; the event is recorded;
    // the container serves on.
    let (code, _) = exec(
        &cloud,
        "c1",
        &[
            "sh",
            "-c",
            "a=$(head -c 600000000 /dev/zero | tr '\\0' x); echo ${#a}",
        ],
    );
    assert_eq!(code, 137, "the memory hog is killed by the kernel");
    wait_until("an out-of-memory event", Duration::from_secs(30), || {
        let events = cloud.sv_json(&["event", "list"]);
        events
            .as_array()?
            .iter()
            .any(|e| e["kind"] == "out-of-memory" && e["name"] == "c1")
            .then_some(())
    });
    assert_eq!(
        cloud.instance("c1")["status"]["pid"],
        pid,
        "the container lived on"
    );
    guest_json(ip, "/identity");

    // Deleted: nothing of it is left on the host.
    cloud.sv_ok(&["vm", "delete", "c1", "--force"]);
    wait_until("c1 gone without a trace", Duration::from_secs(60), || {
        let gone = !cloud.sv_ok(&["vm", "list"]).contains("c1");
        (gone && traces(&cloud.data_dir, &id).is_empty()).then_some(())
    });
}

#[test]
fn containers_and_vms_of_a_project_talk_and_other_projects_reach_neither() {
    let cloud = Cloud::start();
    wait_for_rootfs_image(&cloud);
    for p in ["alpha", "beta"] {
        cloud.sv_ok(&["project", "create", p]);
    }
    let create = |project: &str, name: &str, kind: &str| -> (Ipv4Addr, u32) {
        let v = cloud.sv_json(&[
            "--project",
            project,
            "vm",
            "create",
            name,
            "--kind",
            kind,
            "--type",
            "nano",
            "--wait",
            "--timeout",
            "300",
        ]);
        let vni = v["spec"]["network"]["vni"]
            .as_u64()
            .expect("private network");
        (ip_of(&v), u32::try_from(vni).expect("vni"))
    };
    let (vm, va) = create("alpha", "v1", "vm");
    let (c1, va2) = create("alpha", "c1", "container");
    let (c2, vb) = create("beta", "c2", "container");
    assert_eq!(va, va2, "one project's instances share its network");
    // A container and a VM reach each other, by name too.
    let body = fetch_from(va, c1, "http://v1/identity").expect("c1 reaches v1 by name");
    assert!(body.contains("\"v1\""), "{body}");
    let body = fetch_from(va, vm, &format!("http://{c1}/identity")).expect("v1 reaches c1");
    assert!(body.contains("\"c1\""), "{body}");
    assert_eq!(resolved_by(va, c1, "c1"), Some(vec![c1]));
    // Another project's container reaches neither, whatever the address.
    for target in [vm, c1] {
        if target == c2 {
            continue;
        }
        assert_eq!(
            fetch_from(vb, c2, &format!("http://{target}/identity")),
            None,
            "beta's container reached alpha's {target}"
        );
    }
    assert_eq!(
        resolved_by(vb, c2, "c1"),
        None,
        "alpha's names resolve in beta"
    );
    assert_eq!(
        resolved_by(vb, c2, "v1"),
        None,
        "alpha's names resolve in beta"
    );

    // A security group filters a container as it does a VM: closed while
    // the group has no rule, open once one allows port 80.
    cloud.sv_ok(&[
        "--project",
        "alpha",
        "security-group",
        "create",
        "web",
        "--empty",
    ]);
    cloud.sv_ok(&[
        "--project",
        "alpha",
        "vm",
        "set-security-groups",
        "c1",
        "--security-group",
        "web",
    ]);
    wait_until(
        "c1 closed by its empty group",
        Duration::from_secs(30),
        || {
            fetch_from(va, vm, &format!("http://{c1}/identity"))
                .is_none()
                .then_some(())
        },
    );
    cloud.sv_ok(&[
        "--project",
        "alpha",
        "security-group",
        "allow",
        "web",
        "--protocol",
        "tcp",
        "--port",
        "80",
        "--cidr",
        "10.0.0.0/24",
    ]);
    wait_until("c1 open on port 80", Duration::from_secs(30), || {
        fetch_from(va, vm, &format!("http://{c1}/identity")).filter(|b| b.contains("\"c1\""))
    });
}

/// Writes an OCI image layout tarball at `out`: one layer holding busybox
/// (taken from the rootfs tarball `rootfs`) and `/www/index.html` saying
/// `page`; the configuration runs busybox's HTTP server on port 80 and
/// names `arch`.
fn oci_image(rootfs: &Path, out: &Path, page: &str, arch: &str) {
    let script = r#"
import hashlib, io, json, sys, tarfile, gzip
src, out, page, arch = sys.argv[1:5]
with tarfile.open(src, 'r:gz') as t:
    m = t.getmember('bin/busybox') if 'bin/busybox' in t.getnames() else t.getmember('./bin/busybox')
    busybox = t.extractfile(m).read()
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode='w') as t:
    for d in ['bin', 'www', 'tmp', 'etc']:
        i = tarfile.TarInfo(d); i.type = tarfile.DIRTYPE; i.mode = 0o755; t.addfile(i)
    i = tarfile.TarInfo('bin/busybox'); i.size = len(busybox); i.mode = 0o755
    t.addfile(i, io.BytesIO(busybox))
    for a in ['sh', 'httpd']:
        i = tarfile.TarInfo('bin/' + a); i.type = tarfile.SYMTYPE; i.linkname = 'busybox'; t.addfile(i)
    data = page.encode()
    i = tarfile.TarInfo('www/index.html'); i.size = len(data); i.mode = 0o644
    t.addfile(i, io.BytesIO(data))
layer = gzip.compress(layer.getvalue())
config = json.dumps({'architecture': arch, 'os': 'linux',
    'config': {'Cmd': ['/bin/httpd', '-f', '-p', '80', '-h', '/www'], 'Env': ['PATH=/bin']},
    'rootfs': {'type': 'layers', 'diff_ids': []}}).encode()
def blob(b): return 'sha256:' + hashlib.sha256(b).hexdigest()
manifest = json.dumps({'schemaVersion': 2, 'mediaType': 'application/vnd.oci.image.manifest.v1+json',
    'config': {'mediaType': 'application/vnd.oci.image.config.v1+json', 'digest': blob(config), 'size': len(config)},
    'layers': [{'mediaType': 'application/vnd.oci.image.layer.v1.tar+gzip', 'digest': blob(layer), 'size': len(layer)}]}).encode()
index = json.dumps({'schemaVersion': 2, 'manifests': [{'mediaType': 'application/vnd.oci.image.manifest.v1+json',
    'digest': blob(manifest), 'size': len(manifest), 'platform': {'architecture': arch, 'os': 'linux'}}]}).encode()
with tarfile.open(out, 'w') as t:
    def add(name, data):
        i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))
    add('oci-layout', b'{"imageLayoutVersion": "1.0.0"}')
    add('index.json', index)
    for b in [config, layer, manifest]:
        add('blobs/sha256/' + hashlib.sha256(b).hexdigest(), b)
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(rootfs)
        .arg(out)
        .arg(page)
        .arg(arch)
        .status()
        .expect("python3");
    assert!(status.success(), "making the OCI image");
}

#[test]
fn oci_images_import_and_run_and_what_cannot_be_is_refused_with_nothing_left() {
    let cloud = Cloud::start();
    wait_for_rootfs_image(&cloud);
    let rootfs: PathBuf = cloud
        .data_dir
        .join("images/default/debian-rootfs/rootfs.tar.gz");
    let work = tempfile::tempdir().expect("tmp");
    let good = work.path().join("web.tar");
    oci_image(&rootfs, &good, "hello from an OCI image", "amd64");
    cloud.sv_ok(&[
        "image",
        "import",
        "web",
        "--oci",
        good.to_str().expect("path"),
    ]);
    let image = cloud.sv_json(&["image", "show", "web"]);
    assert_eq!(image["kind"], "rootfs", "{image}");
    assert_eq!(image["process"]["args"][0], "/bin/httpd", "{image}");
    let v = cloud.sv_json(&[
        "vm",
        "create",
        "w1",
        "--kind",
        "container",
        "--image",
        "web",
        "--type",
        "nano",
    ]);
    let ip = ip_of(&v);
    let page = wait_until(
        "the imported image's server answers",
        Duration::from_secs(60),
        || {
            http(
                "GET",
                &format!("http://{ip}/"),
                None,
                Duration::from_secs(5),
            )
            .ok()
            .filter(|(s, _)| *s == 200)
        },
    );
    assert_eq!(page.1.trim(), "hello from an OCI image");

    // Malformed and foreign images: 400, no image left.
    let garbage = work.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is no tarball").expect("write");
    let err = cloud.sv_err(&[
        "image",
        "import",
        "bad",
        "--oci",
        garbage.to_str().expect("path"),
    ]);
    assert!(err.contains("oci"), "{err}");
    let arm = work.path().join("arm.tar");
    oci_image(&rootfs, &arm, "arm", "arm64");
    let err = cloud.sv_err(&[
        "image",
        "import",
        "arm",
        "--oci",
        arm.to_str().expect("path"),
    ]);
    assert!(err.contains("arm64"), "names the architecture: {err}");
    let images = cloud.sv_ok(&["image", "list"]);
    assert!(
        !images.contains("bad") && !images.contains("arm "),
        "{images}"
    );

    // A VM image for a container and the reverse; what needs a VM.
    let err = cloud.sv_err(&[
        "vm",
        "create",
        "x1",
        "--kind",
        "container",
        "--image",
        "debian-busybox",
    ]);
    assert!(err.contains("rootfs") && err.contains("image"), "{err}");
    let err = cloud.sv_err(&["vm", "create", "x2", "--image", "web"]);
    assert!(err.contains("--kind container"), "{err}");
    cloud.sv_ok(&["volume", "create", "data", "--size", "1G"]);
    let err = cloud.sv_err(&[
        "vm",
        "create",
        "x3",
        "--kind",
        "container",
        "--volume",
        "data",
    ]);
    assert!(err.contains("NBD"), "{err}");
    for args in [
        vec!["vm", "snapshot", "create", "w1"],
        vec!["vm", "migrate", "w1"],
    ] {
        let err = cloud.sv_err(&args);
        assert!(err.contains("CRIU"), "{args:?}: {err}");
    }
    cloud.sv_ok(&["vm", "create", "v1", "--type", "nano", "--no-start"]);
    let err = cloud.sv_err(&["vm", "exec", "v1", "--", "true"]);
    assert!(err.contains("vm ssh"), "exec on a VM: {err}");
    let list = cloud.sv_ok(&["vm", "list"]);
    for name in ["x1", "x2", "x3"] {
        assert!(!list.contains(name), "{name} half-made: {list}");
    }
}

#[test]
fn a_dead_hosts_container_starts_again_on_another_host_once() {
    let bed = TestBed::start(3, 1);
    wait_until(
        "image debian-rootfs ready",
        Duration::from_secs(600),
        || {
            let out = bed.sv_at(
                &bed.urls(),
                &["image", "show", "debian-rootfs", "-o", "json"],
            );
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["state"] == "ready").then_some(())
        },
    );
    let v = bed.sv_json(&[
        "vm",
        "create",
        "c",
        "--kind",
        "container",
        "--type",
        "nano",
        "--wait",
        "--timeout",
        "300",
    ]);
    // In a cluster a container is protected: it starts again from its image.
    assert_eq!(v["spec"]["ha"], "restart", "{v}");
    let h = bed.host_of(&v);
    let old_init = u32::try_from(v["status"]["pid"].as_u64().expect("pid")).expect("pid");
    let id = id_of(&v);
    route_around(&bed, h);
    bed.script_ok(&["host-kill", &h.to_string()]);
    wait_until(
        "the dead host's container gone",
        Duration::from_secs(10),
        || (!alive(old_init)).then_some(()),
    );
    let moved = running_elsewhere(&bed, "c", h);
    let records = failovers(&bed);
    let record = records
        .iter()
        .find(|r| r["instance"] == "c")
        .unwrap_or_else(|| panic!("no failover of c: {records:?}"));
    assert_eq!(record["outcome"], "restarted", "{record}");
    // Exactly one container of c runs on the machine: the new host's.
    let inits: Vec<u32> = (1..=bed.hosts)
        .filter_map(|host| {
            let f = bed
                .dir
                .join(format!("h{host}/agent/vms/{id}/container.pid"));
            let pid: u32 = std::fs::read_to_string(f).ok()?.trim().parse().ok()?;
            alive(pid).then_some(pid)
        })
        .collect();
    assert_eq!(inits.len(), 1, "containers of c running: {inits:?}");
    // Its status is the new host's (its agent reports the init it runs).
    let new_host = moved["spec"]["host"].clone();
    wait_until(
        "c's status from its new host",
        Duration::from_secs(30),
        || {
            let v = bed.instance("c");
            (v["status"]["host"] == new_host
                && v["status"]["pid"].as_u64() == inits.first().map(|p| u64::from(*p)))
            .then_some(())
        },
    );
}

#[test]
fn a_group_of_containers_serves_behind_a_balancer_and_replaces_a_killed_member() {
    let cloud = Cloud::start();
    wait_for_rootfs_image(&cloud);
    cloud.sv_ok(&[
        "group",
        "create",
        "web",
        "--kind",
        "container",
        "--image",
        "debian-rootfs",
        "--type",
        "nano",
        "--min",
        "2",
        "--max",
        "3",
        "--desired",
        "2",
        "--health",
        "http:80/health",
        "--wait",
    ]);
    let lb = cloud.sv_json(&["lb", "create", "web-lb", "--group", "web", "--listen", "80"]);
    let vip = lb["spec"]["address"].as_str().expect("address").to_string();
    let members = || -> Vec<Value> {
        let (_, g) = cloud.api("GET", "/v1/groups/web", None);
        g["members"].as_array().cloned().unwrap_or_default()
    };
    for m in members() {
        let name = m["name"].as_str().expect("name");
        assert_eq!(cloud.instance(name)["spec"]["kind"], "container", "{m}");
    }
    // Both members answer through the balancer.
    let names = |n: usize| -> std::collections::BTreeSet<String> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..n {
            if let Ok((200, body)) = http(
                "GET",
                &format!("http://{vip}/identity"),
                None,
                Duration::from_secs(5),
            ) {
                let v: Value = serde_json::from_str(&body).expect("identity");
                seen.insert(v["name"].as_str().unwrap_or_default().to_string());
            }
        }
        seen
    };
    wait_until(
        "both members behind the balancer",
        Duration::from_secs(60),
        || (names(20).len() == 2).then_some(()),
    );
    // A member's container killed from the host: the group replaces it.
    let victim = members()[0]["name"].as_str().expect("name").to_string();
    let pid = cloud.instance(&victim)["status"]["pid"]
        .as_u64()
        .expect("pid");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until(
        "two healthy members, the victim replaced or back",
        Duration::from_secs(120),
        || {
            let (_, g) = cloud.api("GET", "/v1/groups/web", None);
            (g["healthy"] == 2 && names(20).len() == 2).then_some(())
        },
    );
}
