#!/usr/bin/env python3
"""Checkpoint benchmark: Skyvisor against the same operations done by hand
with raw QEMU commands, in the same run, on the same host, bridge and guest.

For each guest (256 MiB and 1 GiB; idle, and one whose memtest keeps
rewriting half of its RAM) it measures:
  - time to take a checkpoint (request -> files complete),
  - how long the guest was paused (QEMU's STOP -> RESUME events),
  - the checkpoint's size on disk, against the RAM the guest really uses
    (its non-zero pages at the checkpoint) plus the disk delta,
  - time from asking for a restore to the guest's service answering with
    the checkpoint's RAM state: both sides probed the same way from the
    request on, a new connection every 10 ms in its own thread,
  - how many of the connections made during the restore lost their SYN
    (waited TCP's 1 s retransmit).

Raw QEMU by hand: the guest is started with the same devices; a checkpoint
is `migrate` to `file:` with mapped-ram while it runs, then, paused in
postmigrate, `blockdev-set-active` + `blockdev-backup sync=top` of the root
disk, `cont`; a restore is `quit`, copy the disk back, start QEMU with
`-incoming defer`, `migrate-incoming file:`, `cont`.

Skyvisor: `POST /v1/instances/NAME/snapshots`, poll until ready;
`POST /v1/instances/NAME/restore`, poll the guest.

Usage: [BENCH_TRACE=1] bench/checkpoints/run.py [--release] [--repeat N]
       [--sizes 256,1024] [--no-build] [--keep]
Needs root, qemu-system-x86_64, qemu-img, fincore (with BENCH_TRACE); builds
skyvisor first unless --no-build. Writes bench/checkpoints/results.md and
prints it. BENCH_TRACE=1 also prints each restore's probes, the agent's and
raw QEMU's step timings and how much of the memory file is cached.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BRIDGE = "svbench0"
SUBNET = "10.219.0"
RAW_TAP = "svbraw0"
RAW_IP = f"{SUBNET}.250"
RAW_MAC = "52:54:00:00:be:01"
PAGE = 4096


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- small HTTP and QMP clients ------------------------------------------

def http(method, url, body=None, timeout=5.0, token=None):
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
        return json.loads(text) if text.strip() else None


def read_token(path):
    """The bootstrap admin token a server wrote (None until it has)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.005)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            return r["return"]

    def wait_event(self, pred, timeout=600):
        for i, e in enumerate(self.events):
            if pred(e):
                return self.events.pop(i)
        self.s.settimeout(timeout)
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                if pred(r):
                    return r
                self.events.append(r)


def ts(e):
    return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6


def allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def nonzero_pages(path):
    """Non-zero 4 KiB pages stored in a mapped-ram file: the guest RAM in use."""
    n = 0
    zero = bytes(PAGE)
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        off = 0
        while off < end:
            try:
                data_at = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
            f.seek(data_at)
            left = hole_at - data_at
            while left > 0:
                chunk = f.read(min(left, 1 << 22))
                if not chunk:
                    break
                left -= len(chunk)
                for i in range(0, len(chunk), PAGE):
                    if chunk[i:i + PAGE] != zero[: len(chunk[i:i + PAGE])]:
                        n += 1
            off = hole_at
    return n * PAGE


def quick_get(ip, path, connect_timeout=0.05, answer_timeout=0.5):
    """GET with short timeouts (by default 50 ms to connect, 0.5 s for the
    answer): for polling a guest that is coming up. Restores are timed by
    `poll_from_now`, whose overlapping probes need no short timeouts."""
    s = socket.create_connection((ip, 80), timeout=connect_timeout)
    try:
        s.settimeout(answer_timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:80])
    return body.decode()


TRACE = os.environ.get("BENCH_TRACE") == "1"


def wait_guest(ip, timeout=300):
    """Waits until the guest's service answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            quick_get(ip, "/ram")
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.002)
    raise RuntimeError(f"guest {ip} did not answer in {timeout}s")


def cached(path):
    """How much of a file is in the page cache (util-linux fincore)."""
    r = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", path],
                       capture_output=True, text=True)
    return r.stdout.strip() or r.stderr.strip()


AGENT_STEPS = [("restore: old QEMU stopped", ("stop_ms", "disk_ms")),
               ("QEMU started, QMP connected", ("ms",)),
               ("memory loaded", ("took_ms",))]


def agent_steps(log_text):
    """The agent's debug timings of the last restore in its log."""
    out = []
    for marker, fields in AGENT_STEPS:
        line = next((l for l in reversed(log_text.splitlines()) if marker in l), "")
        for f in fields:
            for word in line.split():
                if word.startswith(f + "="):
                    out.append(f"{f} {word.split('=', 1)[1]}")
    return ", ".join(out)


def poll_from_now(ip, want_ram, every=0.01, timeout=300):
    """Starts probing the guest at once: a new connection every `every`
    seconds, each in its own thread, so a probe that stalls (one the old
    guest accepted just before it stopped: the restored guest knows nothing
    of it) holds back none of the later ones. Both sides are timed the same
    way, from the restore request to the first answer with the checkpoint's
    value. Returns a function that waits for that instant."""
    start = time.time()
    answered = threading.Event()
    result = {}
    seen = []
    lock = threading.Lock()

    def probe(t):
        try:
            body = quick_get(ip, "/ram", connect_timeout=3.0, answer_timeout=2.0)
            what = "ok" if json.loads(body).get("value") == want_ram else "other value"
        except Exception as e:  # noqa: BLE001 - a failed probe is traced
            what = type(e).__name__
        with lock:
            seen.append((round(t - start, 3), round(time.time() - t, 3), what))
            if what == "ok" and not answered.is_set():
                result["at"] = time.time()
                answered.set()

    def launch():
        while not answered.is_set() and time.time() < start + timeout:
            t = threading.Thread(target=probe, args=(time.time(),), daemon=True)
            t.start()
            threads.append(t)
            answered.wait(every)

    threads = []
    threading.Thread(target=launch, daemon=True).start()

    def answered_at():
        """(first answer's time, (probes sent before it that waited for
        TCP's 1 s SYN retransmit, probes sent before it and answered)):
        how many clients that connected during the restore lost their SYN.
        Probes the old guest took and lost are left out (a reset or a hang:
        the same for both sides)."""
        if not answered.wait(timeout):
            raise RuntimeError(f"guest {ip} did not answer in {timeout}s")
        for t in list(threads):
            t.join(5.0)
        with lock:
            before = [p for p in seen if start + p[0] <= result["at"]]
            ok = [p for p in before if p[2] == "ok"]
            lost_syn = (sum(1 for p in ok if p[1] >= 1.0), len(ok))
            if TRACE:
                # Probes that did not answer at once: (sent at, took, outcome).
                odd = sorted(p for p in before if p[2] != "ok" or p[1] > 0.05)
                log(f"    probes of {ip}: {len(before)}, slow or failed: {odd[:12]}")
        return result["at"], lost_syn

    return answered_at


def start_load(ip, mem_mib, busy):
    if busy:
        mib = mem_mib // 2
        http("POST", f"http://{ip}/memtest/start?mib={mib}&rate_mib_s=0", "")
        # Measure once the tester has written its whole buffer at least once.
        deadline = time.time() + 300
        while http("GET", f"http://{ip}/memtest")["passes"] < 1:
            if time.time() > deadline:
                raise RuntimeError("memtest made no pass in 300 s")
            time.sleep(0.2)


# --- Skyvisor ------------------------------------------------------------

class Skyvisor:
    def __init__(self, binary, work):
        self.binary = binary
        self.data = os.path.join(work, "sv")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        os.makedirs(self.data)
        self.logf = open(os.path.join(work, "up.log"), "w")
        cache = os.environ.get("SKYVISOR_TEST_CACHE", os.path.join(ROOT, "target", "test-cache"))
        self.proc = subprocess.Popen(
            [binary, "up", "--data-dir", self.data, "--cache-dir", cache,
             "--listen", f"127.0.0.1:{self.port}", "--accel", "tcg", "--bridge", BRIDGE,
             "--subnet", f"{SUBNET}.0/24", "--host-name", "bench"],
            stdout=self.logf, stderr=self.logf,
            # BENCH_TRACE: the agent's timings of a restore's steps.
            env={**os.environ, "RUST_LOG": "info,skyvisor_agent::supervisor=debug,"
                 "skyvisor_agent::qemu_hv=debug"} if TRACE else None)
        deadline = time.time() + 900
        while time.time() < deadline:
            try:
                if http("GET", f"{self.url}/v1/info", token=self.token())["hosts"] == 1:
                    with open(os.path.join(work, "up.log")) as f:
                        if "Skyvisor is up" in f.read():
                            break
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("skyvisor up exited; see up.log")
            time.sleep(0.2)
        img = self.api("GET", "/v1/images/debian-busybox")
        d = os.path.join(self.data, "images", "default", "debian-busybox")
        self.kernel = os.path.join(d, next(f["file_name"] for f in img["files"] if f["role"] == "kernel"))
        self.initrd = os.path.join(d, next(f["file_name"] for f in img["files"] if f["role"] == "initrd"))
        self.cmdline = img.get("cmdline") or ""
        self.base = next((os.path.join(d, f["file_name"]) for f in img["files"] if f["role"] == "disk"), None)

    def token(self):
        return read_token(os.path.join(self.data, "admin.token"))

    def log_restore_steps(self):
        self.logf.flush()
        with open(self.logf.name) as f:
            log(f"    agent restore steps: {agent_steps(f.read())}")

    def api(self, method, path, body=None):
        return http(method, f"{self.url}{path}", json.dumps(body) if body is not None else None,
                    timeout=60, token=self.token())

    def case(self, name, mem, busy):
        inst = self.api("POST", "/v1/instances", {"name": name, "image": "debian-busybox",
                                                   "vcpus": 1, "memory_mib": mem, "disk_gib": 2})
        ip = inst["spec"]["network"]["ip"]
        wait_guest(ip)
        start_load(ip, mem, busy)
        http("PUT", f"http://{ip}/ram", "at-checkpoint")
        t0 = time.time()
        self.api("POST", f"/v1/instances/{name}/snapshots", {"name": "b"})
        while True:
            s = self.api("GET", f"/v1/instances/{name}/snapshots/b")
            if s["state"] in ("ready", "failed"):
                break
            time.sleep(0.005)
        took = time.time() - t0
        if s["state"] != "ready":
            raise RuntimeError(f"snapshot failed: {s['message']}")
        vm_id = inst["spec"]["id"].replace("-", "")
        snap_dir = os.path.join(self.data, "agent", "snapshots", vm_id, "b")
        used = nonzero_pages(os.path.join(snap_dir, "memory"))
        root_delta = allocated(os.path.join(self.data, "agent", "vms", vm_id, "root.qcow2"))
        http("PUT", f"http://{ip}/ram", "after-checkpoint")
        t0 = time.time()
        if TRACE:
            log(f"    sv memory file in the page cache: {cached(os.path.join(snap_dir, 'memory'))}")
        answered_at = poll_from_now(ip, "at-checkpoint")
        self.api("POST", f"/v1/instances/{name}/restore", {"snapshot": "b"})
        at, lost_syn = answered_at()
        restore = at - t0
        if TRACE:
            self.log_restore_steps()
        self.api("DELETE", f"/v1/instances/{name}?force=true&with_snapshots=true")
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                self.api("GET", f"/v1/instances/{name}")
            except urllib.error.HTTPError:
                break
            time.sleep(0.1)
        return {"take": took, "pause_ms": s["paused_ms"], "size": s["memory_bytes"] + s["disk_bytes"],
                "used": used, "disk_delta": root_delta, "restore": restore,
                "lost_syn": lost_syn}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# --- raw QEMU by hand ----------------------------------------------------

class Raw:
    def __init__(self, sv, work):
        self.sv = sv
        self.dir = os.path.join(work, "raw")
        os.makedirs(self.dir)
        subprocess.run(["ip", "tuntap", "add", "dev", RAW_TAP, "mode", "tap"], check=True)
        subprocess.run(["ip", "link", "set", RAW_TAP, "master", BRIDGE, "up"], check=True)

    def qemu(self, mem, incoming=False):
        d = self.dir
        cmdline = (f"{self.sv.cmdline} sv.name=raw sv.id=raw sv.ip={RAW_IP}/24 "
                   f"sv.gw={SUBNET}.1 sv.mtu=1500").strip()
        args = ["qemu-system-x86_64", "-name", "guest=raw", "-nodefaults", "-no-user-config",
                "-display", "none", "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64",
                "-smp", "1", "-m", f"{mem}M", "-rtc", "base=utc", "-action", "shutdown=pause",
                "-chardev", f"socket,id=qmp,path={d}/qmp.sock,server=on,wait=off",
                "-mon", "chardev=qmp,mode=control", "-serial", f"file:{d}/serial.log",
                "-kernel", self.sv.kernel, "-initrd", self.sv.initrd, "-append", cmdline,
                "-blockdev", json.dumps({"driver": "qcow2", "node-name": "root",
                                         "cache": {"direct": False, "no-flush": False},
                                         "file": {"driver": "file", "node-name": "root-file",
                                                  "filename": f"{d}/root.qcow2"}}),
                "-device", "virtio-blk-pci,id=root,drive=root,write-cache=on",
                "-netdev", f"tap,id=net0,ifname={RAW_TAP},script=no,downscript=no",
                "-device", f"virtio-net-pci,id=net0,netdev=net0,mac={RAW_MAC}",
                "-chardev", f"socket,id=guestchan,path={d}/guest.sock,server=on,wait=off",
                "-device", "virtio-serial-pci,id=vserial0",
                "-device", "virtserialport,bus=vserial0.0,chardev=guestchan,name=org.skyvisor.guest.0",
                "-device", "virtio-rng-pci,id=rng0"]
        if incoming:
            args += ["-S", "-incoming", "defer"]
        for f in ("qmp.sock", "guest.sock"):
            try:
                os.remove(os.path.join(d, f))
            except FileNotFoundError:
                pass
        qlog = open(os.path.join(d, "qemu.log"), "a")
        p = subprocess.Popen(args, stdout=qlog, stderr=qlog)
        return p, Qmp(f"{d}/qmp.sock")

    def case(self, mem, busy):
        d = self.dir
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
        backing = ["-b", self.sv.base, "-F", "qcow2"] if self.sv.base else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, f"{d}/root.qcow2", "2G"], check=True)
        p, q = self.qemu(mem)
        wait_guest(RAW_IP)
        start_load(RAW_IP, mem, busy)
        http("PUT", f"http://{RAW_IP}/ram", "at-checkpoint")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, f"{d}/snap.qcow2", "2G"], check=True)
        q.events.clear()
        t0 = time.time()
        q.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True}, {"capability": "mapped-ram", "state": True},
            {"capability": "auto-converge", "state": True}])
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 50})
        q.cmd("migrate", uri=f"file:{d}/memory")
        ev = q.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"))
        if ev["data"]["status"] != "completed":
            raise RuntimeError(f"raw migrate failed: {q.cmd('query-migrate')}")
        while q.cmd("query-status")["status"] != "postmigrate":
            pass
        q.cmd("blockdev-set-active", active=True)
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "snap",
                                                 "file": {"driver": "file", "filename": f"{d}/snap.qcow2"}})
        q.cmd("blockdev-backup", device="root", target="snap", sync="top",
              **{"job-id": "snap", "auto-dismiss": False})
        q.cmd("cont")
        res = q.wait_event(lambda e: e["event"] == "RESUME")
        stop = [e for e in q.events if e["event"] == "STOP"][-1]
        while not all(j["status"] == "concluded" for j in q.cmd("query-jobs")):
            time.sleep(0.005)
        q.cmd("job-dismiss", id="snap")
        q.cmd("blockdev-del", **{"node-name": "snap"})
        took = time.time() - t0
        pause_ms = (ts(res) - ts(stop)) * 1000
        size = allocated(f"{d}/memory") + allocated(f"{d}/snap.qcow2")
        used = nonzero_pages(f"{d}/memory")
        disk_delta = allocated(f"{d}/root.qcow2")
        http("PUT", f"http://{RAW_IP}/ram", "after-checkpoint")
        # Restore by hand.
        t0 = time.time()
        if TRACE:
            log(f"    raw memory file in the page cache: {cached(f'{d}/memory')}")
        answered_at = poll_from_now(RAW_IP, "at-checkpoint")
        steps = []
        q.cmd("quit")
        p.wait()
        steps.append(("quit", time.time() - t0))
        subprocess.run(["cp", "--sparse=always", f"{d}/snap.qcow2", f"{d}/root.qcow2"], check=True)
        steps.append(("copy", time.time() - t0))
        p, q = self.qemu(mem, incoming=True)
        steps.append(("qmp", time.time() - t0))
        q.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True}, {"capability": "mapped-ram", "state": True}])
        q.cmd("migrate-incoming", uri=f"file:{d}/memory")
        q.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"))
        steps.append(("loaded", time.time() - t0))
        q.cmd("cont")
        at, lost_syn = answered_at()
        restore = at - t0
        if TRACE:
            log("    raw restore steps: " + ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in steps))
        q.cmd("quit")
        p.wait()
        return {"take": took, "pause_ms": pause_ms, "size": size, "used": used,
                "disk_delta": disk_delta, "restore": restore, "lost_syn": lost_syn}

    def close(self):
        subprocess.run(["ip", "link", "del", RAW_TAP], stderr=subprocess.DEVNULL)


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", action="store_true", help="build and run the release binary")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--no-build", action="store_true",
                    help="run the binaries already built (e.g. an A/B of a change)")
    args = ap.parse_args()
    profile = "release" if args.release else "debug"
    build = ["cargo", "build", "-q", "-p", "skyvisor", "-p", "skyvisor-guest"]
    if args.release:
        build.append("--release")
    if not args.no_build:
        subprocess.run(build, cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    binary = os.path.join(target, profile, "skyvisor")
    work = tempfile.mkdtemp(prefix="svbench-", dir="/var/tmp")
    sv = raw = None
    rows = []
    ok = False
    try:
        sv = Skyvisor(binary, work)
        raw = Raw(sv, work)
        for mem in [int(m) for m in args.sizes.split(",")]:
            for busy in (False, True):
                label = f"{mem} MiB, {'busy (memtest on half its RAM)' if busy else 'idle'}"
                r_runs, s_runs = [], []
                for i in range(args.repeat):
                    log(f"{label}: run {i + 1}/{args.repeat}: raw QEMU")
                    r_runs.append(raw.case(mem, busy))
                    log(f"{label}: run {i + 1}/{args.repeat}: Skyvisor")
                    s_runs.append(sv.case(f"b{mem}-{'busy' if busy else 'idle'}-{i}", mem, busy))
                    log(f"  raw {r_runs[-1]}\n  sv  {s_runs[-1]}")
                rows.append((label, r_runs, s_runs))
        ok = True
    finally:
        if raw:
            raw.close()
        if sv:
            sv.stop()
            subprocess.run([binary, "--url", sv.url, "vm", "list"], stderr=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, env={**os.environ, "SKYVISOR_DATA_DIR": sv.data})
            for pidf in subprocess.run(["sh", "-c", f"ls {sv.data}/agent/vms/*/qemu.pid 2>/dev/null"],
                                       capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(open(pidf).read()), signal.SIGKILL)
                except Exception:
                    pass
            subprocess.run(["ip", "link", "del", BRIDGE], stderr=subprocess.DEVNULL)
            subprocess.run(["nft", "delete", "table", "ip", f"skyvisor-{BRIDGE}"], stderr=subprocess.DEVNULL)
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work} for a look")

    mib = lambda b: b / 1048576
    out = [f"Medians of {args.repeat} runs per case; TCG guests, 1 vCPU; `{profile}` build; "
           f"raw QEMU and Skyvisor alternate in the same run.", ""]
    out.append("| guest | metric | raw QEMU | Skyvisor | Skyvisor / raw |")
    out.append("|---|---|---|---|---|")
    for label, r, s in rows:
        for key, name, fmt in [
            ("take", "time to take (s)", lambda v: f"{v:.2f}"),
            ("pause_ms", "VM paused (ms)", lambda v: f"{v:.1f}"),
            ("size", "snapshot size (MiB)", lambda v: f"{mib(v):.1f}"),
            ("restore", "restore → service answers (s)", lambda v: f"{v:.3f}"),
        ]:
            rv, sv_ = median_of(r, key), median_of(s, key)
            ratio = f"{sv_ / rv:.2f}x" if rv else "-"
            out.append(f"| {label} | {name} | {fmt(rv)} | {fmt(sv_)} | {ratio} |")
        lost = lambda runs: (sum(x["lost_syn"][0] for x in runs), sum(x["lost_syn"][1] for x in runs))
        (rl, rn), (sl, sn) = lost(r), lost(s)
        out.append(f"| {label} | connections made during the restore that lost their SYN "
                   f"(waited ≥ 1 s), all runs | {rl} of {rn} | {sl} of {sn} | - |")
        used = median_of(s, "used") + median_of(s, "disk_delta")
        out.append(f"| {label} | RAM in use + disk delta (MiB) | "
                   f"{mib(median_of(r, 'used') + median_of(r, 'disk_delta')):.1f} | {mib(used):.1f} | "
                   f"size/used {median_of(s, 'size') / used:.2f}x |")
    text = "\n".join(out) + "\n"
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
