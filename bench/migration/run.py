#!/usr/bin/env python3
"""Live-migration benchmark: Skyvisor against a raw QEMU-to-QEMU migration
of the same guest, done by hand, in the same run.

For each guest (256 MiB and 1 GiB; idle, and one whose memtest keeps
rewriting half of its RAM) it measures:
  - total time of the migration,
  - the downtime QEMU reports (query-migrate),
  - the pause: from the source's STOP to the destination's RESUME,
  - what a client sees: a NEW TCP connection to the guest's /health every
    10-20 ms, from 1 s before the migration to 1.5 s after it: failed
    requests and the slowest one,
  - for the busy guest, the memtest's mismatches after the move (RAM that
    did not arrive bit for bit).

Raw QEMU by hand (the plain QEMU way, default migration parameters: QEMU
decides the switchover itself): two QEMUs with Skyvisor's devices, their
taps on one bridge in the root namespace, same MAC on both sides. The
destination starts with `-S -incoming defer`, `late-block-activate`, an
empty qcow2 on the same base image, and exports it over NBD
(`nbd-server-start` + `block-export-add writable`). The source mirrors its
disk into that export (`blockdev-add` nbd + `blockdev-mirror sync=top
copy-mode=write-blocking`), then `migrate`s; once completed:
`block-job-cancel` of the mirror, on the destination `nbd-server-stop`,
`cont`, `announce-self`. Pause = source STOP event -> destination RESUME
event (QMP timestamps, one clock). Total = `blockdev-add` -> RESUME.

Skyvisor: the same guest as a VM on a 2-host test bed (scripts/testbed.sh,
hosts in network namespaces, VXLAN between them), migrated with
`POST /v1/instances/NAME/migrate` to the other host (back and forth for
repeats); figures from the completed migration record (`result`).

Usage: bench/migration/run.py [--release] [--repeat N] [--sizes 256,1024]
                              [--cases idle,busy] [--rate MIB_S] [--no-build]
                              [--disk replicated|local] [--out FILE]
Needs root, qemu-system-x86_64, qemu-img, etcd; builds skyvisor first (in
the repository's own target directory). Writes bench/migration/results.md
and prints it.
"""

import argparse
import atexit
import json
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TESTBED = os.path.join(ROOT, "scripts", "testbed.sh")
TESTBED_ID = int(os.environ.get("MIGBENCH_TESTBED_ID", "60"))
API = f"http://10.216.{TESTBED_ID}.1:7780"
# The raw QEMUs' own bridge, taps and guest address.
BRIDGE = "svmig0"
SUBNET = "10.219.60"
SRC_TAP = "svmigs0"
DST_TAP = "svmigd0"
RAW_IP = f"{SUBNET}.250"
RAW_MAC = "52:54:00:00:be:60"
RAW_UUID = "5ab1e000-0000-4000-8000-00000000be60"
# The client: a new connection every 10-20 ms; a request failing or taking
# longer than REQ_TIMEOUT counts as failed.
PROBE_GAP = (0.010, 0.020)
REQ_TIMEOUT = 10.0
MAX_IN_FLIGHT = 400
SLOW_MS = 500
# A raw migration that has not completed by then did not converge.
CONVERGE_TIMEOUT = 120.0
SV_TIMEOUT = 600.0
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- small HTTP and QMP clients ------------------------------------------

# No proxies: the guests and the API are on local networks.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method, url, body=None, timeout=10.0, token=None):
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with _opener.open(req, timeout=timeout) as r:
        text = r.read().decode()
        return json.loads(text) if text.strip() else None


def read_token(path):
    """The bootstrap admin token a server wrote (None until it has)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def http_error_text(e):
    try:
        return f"HTTP {e.code}: {e.read().decode()[:300]}"
    except Exception:
        return str(e)


class QmpError(RuntimeError):
    pass


class Qmp:
    """QMP over a unix socket; a reader thread keeps every event with its
    timestamp, so commands and event waits never race."""

    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.01)
        self.f = self.s.makefile("rb")
        json.loads(self.f.readline())
        self.replies = queue.Queue()
        self.events = []
        self.cv = threading.Condition()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            for line in self.f:
                msg = json.loads(line)
                if "event" in msg:
                    with self.cv:
                        self.events.append(msg)
                        self.cv.notify_all()
                else:
                    self.replies.put(msg)
        except (OSError, ValueError):
            pass
        self.replies.put(None)
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def cmd(self, name, timeout=60, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        with self.lock:
            try:
                self.s.sendall((json.dumps(msg) + "\n").encode())
            except OSError as e:
                raise QmpError(f"{name}: {e}") from e
            try:
                r = self.replies.get(timeout=timeout)
            except queue.Empty:
                raise QmpError(f"{name}: no answer in {timeout}s") from None
        if r is None:
            raise QmpError(f"{name}: QMP connection closed")
        if "error" in r:
            raise QmpError(f"{name}: {r['error'].get('desc', r['error'])}")
        return r["return"]

    def mark(self):
        with self.cv:
            return len(self.events)

    def wait_event(self, pred, timeout, after=0):
        """The first event from index `after` on matching `pred`; None on timeout."""
        deadline = time.time() + timeout
        with self.cv:
            i = after
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                left = deadline - time.time()
                if left <= 0 or self.closed:
                    return None
                self.cv.wait(left)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def ts(e):
    return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6


def is_event(name, **data):
    return lambda e: e["event"] == name and all(e.get("data", {}).get(k) == v for k, v in data.items())


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(*cmd, check=True, **kw):
    return subprocess.run(list(cmd), check=check, **kw)


# --- the guest -------------------------------------------------------------

def get(ip, path, timeout):
    """One GET on a new connection; returns the body, raises on anything
    but 200."""
    s = socket.create_connection((ip, 80), timeout=timeout)
    try:
        s.settimeout(timeout)
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
        raise RuntimeError(f"answer: {head[:80]!r}")
    return body.decode()


def wait_guest(ip, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            get(ip, "/health", 1.0)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"guest {ip} did not answer in {timeout}s")


def start_memtest(ip, mem, rate):
    mib = mem // 2
    r = http("POST", f"http://{ip}/memtest/start?mib={mib}&rate_mib_s={rate}", "")
    if not r or not r.get("running"):
        raise RuntimeError(f"memtest did not start: {r}")
    # Migrate once the tester has written its whole buffer at least once.
    deadline = time.time() + 600
    while True:
        st = http("GET", f"http://{ip}/memtest")
        if st["passes"] >= 1:
            log(f"  memtest: {mib} MiB, writing at {st['rate_mib_s']:.1f} MiB/s")
            return
        if time.time() > deadline:
            raise RuntimeError("memtest made no pass in 600 s")
        time.sleep(0.25)


def memtest_mismatches(ip):
    st = http("GET", f"http://{ip}/memtest", timeout=30)
    if not st.get("running"):
        return f"stopped ({st.get('error')})"
    return st["mismatches"]


class Prober:
    """A client that opens a new TCP connection to the guest's /health
    every 10-20 ms (each request in its own thread, so a stalled one does
    not hold back the next)."""

    def __init__(self, ip):
        self.ip = ip
        self.results = []  # (start wall time, duration s, error or None)
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.workers = []
        self.launcher = None
        self.action_at = None

    def _one(self):
        t0 = time.time()
        m0 = time.monotonic()
        err = None
        try:
            get(self.ip, "/health", REQ_TIMEOUT)
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
        with self.lock:
            self.results.append((t0, time.monotonic() - m0, err))

    def _launch(self):
        while not self.stop_ev.is_set():
            self.workers = [w for w in self.workers if w.is_alive()]
            if len(self.workers) < MAX_IN_FLIGHT:
                w = threading.Thread(target=self._one, daemon=True)
                w.start()
                self.workers.append(w)
            self.stop_ev.wait(random.uniform(*PROBE_GAP))

    def start(self):
        self.launcher = threading.Thread(target=self._launch, daemon=True)
        self.launcher.start()

    def stop(self):
        self.stop_ev.set()
        self.launcher.join()
        for w in self.workers:
            w.join(REQ_TIMEOUT + 5)
        with self.lock:
            res = list(self.results)
        ok = [d for _, d, e in res if e is None]
        errs = [e for _, _, e in res if e is not None]
        slowest = max(ok) * 1000 if ok else None
        # The longest time in which no request got its answer: between two
        # successive answers (a lost SYN costs its own request ~1 s, but
        # the others sent meanwhile may still be answered).
        done = sorted(t + d for t, d, e in res if e is None)
        gaps = [(b - a, a, b) for a, b in zip(done, done[1:])]
        silence = max(gaps)[0] * 1000 if gaps else None
        # When the slow ones started, seconds after the migration was asked for.
        t0 = self.action_at or 0
        # Where the longest silence was: between which two answers.
        silence_at = f"+{max(gaps)[1] - t0:.2f}s..+{max(gaps)[2] - t0:.2f}s" if gaps else None
        slow = sorted((t - t0, d * 1000) for t, d, e in res if e is None and d * 1000 > SLOW_MS)
        return {"requests": len(res), "failed": len(errs), "slowest_ms": slowest,
                "silence_ms": silence, "silence_at": silence_at,
                "slow": len(slow), "slow_at": [f"+{t:.2f}s:{d:.0f}ms" for t, d in slow][:8],
                "errors": sorted(set(errs))[:5]}


def measure(ip, action):
    """Runs `action()` with the client probing from 1 s before to 1.5 s
    after; returns (action's result, client figures)."""
    get(ip, "/health", 5.0)
    p = Prober(ip)
    p.start()
    time.sleep(1.0)
    try:
        p.action_at = time.time()
        out = action()
    finally:
        time.sleep(1.5)
        client = p.stop()
    return out, client


# --- Skyvisor on the test bed -----------------------------------------------

def default_image_files(get_image, testbed_dir, work):
    """Waits until the test bed's default image is built, copies its files
    (the raw QEMUs boot the very same kernel, initrd and base disk) into
    `work`; returns ({role: path}, kernel command line)."""
    deadline = time.time() + 1800
    while True:
        try:
            img = get_image()
            if img["state"] == "ready":
                break
            if img["state"] == "failed":
                raise RuntimeError(f"image build failed: {img.get('message')}")
        except urllib.error.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError("image debian-busybox not ready in 1800 s")
        time.sleep(1)
    d = os.path.join(testbed_dir, "s1", "images", "default", "debian-busybox")
    mine = os.path.join(work, "image")
    os.makedirs(mine)
    files = {}
    for f in img["files"]:
        shutil.copy(os.path.join(d, f["file_name"]), mine)
        files[f["role"]] = os.path.join(mine, f["file_name"])
    return files, img.get("cmdline") or ""


class Skyvisor:
    def __init__(self, binary, work, disk="replicated"):
        self.binary = binary
        self.work = work
        self.disk = disk
        self.env = dict(os.environ, TESTBED_ID=str(TESTBED_ID), SKYVISOR=binary,
                        TESTBED_CACHE=os.environ.get(
                            "TESTBED_CACHE", os.path.join(ROOT, "target", "test-cache")),
                        LEASE_TTL="3", ACCEL="tcg")
        self.env.pop("TESTBED_DIR", None)
        self.dir = f"/tmp/svtb-{TESTBED_ID}"
        self.up = False
        # A test bed left over by an interrupted run of ours.
        self.testbed("down", check=False)
        self.up = True
        log(f"test bed {TESTBED_ID}: starting 2 hosts, etcd and a server")
        self.testbed("up", "2", "1")
        self.files, self.cmdline = default_image_files(
            lambda: self.api("GET", "/v1/images/debian-busybox"), self.dir, work)

    def testbed(self, *args, check=True):
        r = subprocess.run([TESTBED, *args], env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"testbed.sh {' '.join(args)} failed: {r.stderr.strip()[-2000:]}")
        return r

    def api(self, method, path, body=None, timeout=60):
        return http(method, f"{API}{path}", json.dumps(body) if body is not None else None, timeout,
                    token=read_token(f"{self.dir}/admin.token"))

    def create(self, name, mem):
        try:
            body = {"name": name, "image": "debian-busybox",
                    "vcpus": 1, "memory_mib": mem, "disk_gib": 2}
            if self.disk == "local":
                body["local_disk"] = True
            inst = self.api("POST", "/v1/instances", body)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"creating {name}: {http_error_text(e)}") from None
        deadline = time.time() + 600
        while True:
            inst = self.api("GET", f"/v1/instances/{name}")
            st = inst.get("status") or {}
            if inst["spec"].get("host") and inst["spec"]["network"].get("ip") \
                    and st.get("phase") == "running":
                break
            if st.get("phase") in ("failed", "error"):
                raise RuntimeError(f"{name} failed to start: {st}")
            if time.time() > deadline:
                raise RuntimeError(f"{name} not running in 600 s: {st}")
            time.sleep(0.5)
        ip = inst["spec"]["network"]["ip"]
        wait_guest(ip)
        return ip, inst["spec"]["host"]

    def qemu_args(self, name):
        """The command line of the VM's QEMU (to compare devices with the raw one)."""
        inst = self.api("GET", f"/v1/instances/{name}")
        vm_id = inst["spec"]["id"]
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"qemu-system-x86_64") and vm_id.encode() in b" ".join(args):
                return [a.decode() for a in args if a]
        return None

    def migrate(self, name, to, insecure=False):
        t0 = time.time()
        body = {"to": to, "insecure": True} if insecure else {"to": to}
        try:
            m = self.api("POST", f"/v1/instances/{name}/migrate", body)
        except urllib.error.HTTPError as e:
            return {"error": f"migrate request: {http_error_text(e)}"}
        deadline = t0 + SV_TIMEOUT
        # Completed, and its figures in (they follow the commit by a moment).
        while m["phase"] not in ("failed", "cancelled") and not (
                m["phase"] == "completed" and m.get("result")):
            if time.time() > deadline:
                try:
                    self.api("POST", f"/v1/instances/{name}/migrate/cancel")
                except Exception:
                    pass
                return {"error": f"not finished in {SV_TIMEOUT:.0f} s (phase {m['phase']}); cancelled",
                        "converged": False}
            time.sleep(0.05)
            m = self.api("GET", f"/v1/migrations/{m['id']}")
        wall = (time.time() - t0) * 1000
        if m["phase"] != "completed":
            return {"error": f"{m['phase']}: {m.get('error')}",
                    "converged": "converge" not in (m.get("error") or "")}
        r = m["result"]
        return {"total_ms": r["total_ms"], "downtime_ms": r["qemu_downtime_ms"],
                "pause_ms": r["pause_ms"], "wall_ms": wall, "ram_mib": r["ram_transferred"] / 2**20,
                "disk_mib": r["disk_copied"] / 2**20, "encrypted": r.get("encrypted", False),
                "held_frames": r.get("held_frames")}

    def case(self, mem, busy, repeat, rate, tls_compare=False):
        """`repeat` migrations; with `tls_compare`, every other one sends
        its streams in the clear (`insecure`), so TLS and plain alternate
        on the same guest."""
        name = f"mig{mem}-{'busy' if busy else 'idle'}"
        ip, host = self.create(name, mem)
        args = self.qemu_args(name)
        if args:
            log("  Skyvisor's QEMU: " + " ".join(args))
        if busy:
            start_memtest(ip, mem, rate)
        runs = []
        try:
            for i in range(repeat):
                to = "h2" if host == "h1" else "h1"
                insecure = tls_compare and i % 2 == 1
                log(f"  Skyvisor run {i + 1}/{repeat}: {name} {host} -> {to}"
                    f"{' (plain streams)' if insecure else ''}")
                res, client = measure(ip, lambda: self.migrate(name, to, insecure))
                res["insecure"] = insecure
                res.update(client)
                res["dir"] = f"{host}->{to}"
                if busy:
                    try:
                        res["mismatches"] = memtest_mismatches(ip)
                    except Exception as e:
                        res["mismatches"] = f"unreadable: {e}"
                log(f"    {fmt_run(res)}")
                runs.append(res)
                if "error" in res:
                    break
                host = to
        finally:
            try:
                self.api("DELETE", f"/v1/instances/{name}?force=true")
                deadline = time.time() + 120
                while time.time() < deadline:
                    try:
                        self.api("GET", f"/v1/instances/{name}")
                    except urllib.error.HTTPError:
                        break
                    time.sleep(0.2)
            except Exception as e:
                log(f"  deleting {name}: {e}")
        return runs

    def close(self, keep_logs_in=None):
        if not self.up:
            return
        if keep_logs_in:
            for f in ("server1.log", "agent1.log", "agent2.log", "etcd.log"):
                try:
                    shutil.copy(os.path.join(self.dir, f), keep_logs_in)
                except OSError:
                    pass
        self.testbed("down", check=False)
        self.up = False


# --- raw QEMU by hand --------------------------------------------------------

class Raw:
    def __init__(self, sv, work):
        self.sv = sv
        self.dir = os.path.join(work, "raw")
        os.makedirs(self.dir)
        self.procs = []
        run("ip", "link", "del", BRIDGE, check=False, stderr=subprocess.DEVNULL)
        for tap in (SRC_TAP, DST_TAP):
            run("ip", "link", "del", tap, check=False, stderr=subprocess.DEVNULL)
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for tap in (SRC_TAP, DST_TAP):
            run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            run("ip", "link", "set", tap, "master", BRIDGE, "up")

    def qemu(self, side, mem, tap, incoming):
        d = os.path.join(self.dir, side)
        os.makedirs(d, exist_ok=True)
        cmdline = (f"{self.sv.cmdline} sv.name=raw sv.id={RAW_UUID} sv.ip={RAW_IP}/24 "
                   f"sv.gw={SUBNET}.1 sv.mtu=1500").strip()
        cache = {"direct": False, "no-flush": False}
        args = ["qemu-system-x86_64", "-name", "guest=raw,debug-threads=on", "-uuid", RAW_UUID,
                "-nodefaults", "-no-user-config", "-display", "none", "-msg", "timestamp=on",
                "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64", "-smp", "1",
                "-m", f"{mem}M", "-rtc", "base=utc", "-action", "shutdown=pause",
                "-pidfile", f"{d}/qemu.pid",
                "-chardev", f"socket,id=qmp,path={d}/qmp.sock,server=on,wait=off",
                "-mon", "chardev=qmp,mode=control",
                "-chardev", f"socket,id=console,path={d}/console.sock,server=on,wait=off,"
                            f"logfile={d}/serial.log,logappend=on",
                "-serial", "chardev:console",
                "-kernel", self.sv.files["kernel"], "-initrd", self.sv.files["initrd"],
                "-append", cmdline,
                "-blockdev", json.dumps({"cache": cache, "driver": "qcow2", "node-name": "root",
                                         "read-only": False,
                                         "file": {"cache": cache, "driver": "file",
                                                  "filename": f"{d}/root.qcow2",
                                                  "node-name": "root-file", "read-only": False}}),
                # The destination exports its disk while the device exists.
                "-device", "virtio-blk-pci,id=root,drive=root,write-cache=on"
                           + (",share-rw=on" if incoming else ""),
                "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,id=net0,netdev=net0,mac={RAW_MAC}",
                "-chardev", f"socket,id=guestchan,path={d}/guest.sock,server=on,wait=off",
                "-device", "virtio-serial-pci,id=vserial0",
                "-device", "virtserialport,bus=vserial0.0,chardev=guestchan,name=org.skyvisor.guest.0",
                "-device", "virtio-rng-pci,id=rng0"]
        if incoming:
            args += ["-S", "-incoming", "defer"]
        for f in ("qmp.sock", "guest.sock", "console.sock", "root.qcow2"):
            try:
                os.remove(os.path.join(d, f))
            except FileNotFoundError:
                pass
        base = self.sv.files.get("disk")
        backing = ["-b", base, "-F", "qcow2"] if base else []
        run("qemu-img", "create", "-q", "-f", "qcow2", *backing, f"{d}/root.qcow2", "2G")
        qlog = open(os.path.join(d, "qemu.log"), "a")
        p = subprocess.Popen(args, stdout=qlog, stderr=qlog)
        self.procs.append(p)
        try:
            return p, Qmp(f"{d}/qmp.sock")
        except Exception:
            raise RuntimeError(f"raw QEMU ({side}) did not start; see {d}/qemu.log") from None

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs = []

    def migrate(self, src, dst, nbd_port, mig_port):
        """The plain QEMU way; returns the figures or the reason it failed."""
        t0 = time.time()
        src.cmd("blockdev-add", driver="nbd", **{
            "node-name": "mirror", "export": "root",
            "server": {"type": "inet", "host": "127.0.0.1", "port": str(nbd_port)}})
        mark = src.mark()
        src.cmd("blockdev-mirror", device="root", target="mirror", sync="top",
                **{"job-id": "mirror", "copy-mode": "write-blocking"})
        if not src.wait_event(is_event("BLOCK_JOB_READY", device="mirror"), 600, mark):
            return {"error": f"disk mirror not ready: {src.cmd('query-block-jobs')}"}
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        mark = src.mark()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{mig_port}")
        started = time.time()
        while True:
            info = src.cmd("query-migrate")
            status = info.get("status")
            if status in ("completed", "failed", "cancelled"):
                break
            if time.time() - started > CONVERGE_TIMEOUT:
                ram = info.get("ram", {})
                log(f"    raw: no convergence after {CONVERGE_TIMEOUT:.0f} s "
                    f"(pass {ram.get('dirty-sync-count')}, {ram.get('remaining', 0) >> 20} MiB left, "
                    f"dirtying {ram.get('dirty-pages-rate', 0) * 4096 >> 20} MiB/s, "
                    f"{ram.get('mbps', 0):.0f} Mbit/s); cancelling")
                src.cmd("migrate_cancel")
                while src.cmd("query-migrate").get("status") not in ("cancelled", "failed", "completed"):
                    time.sleep(0.05)
                src.cmd("block-job-cancel", device="mirror", force=True)
                return {"error": f"did not converge in {CONVERGE_TIMEOUT:.0f} s", "converged": False}
            time.sleep(0.02)
        if status != "completed":
            return {"error": f"migrate {status}: {info.get('error-desc')}"}
        mark_b = src.mark()
        src.cmd("block-job-cancel", device="mirror")
        done = src.wait_event(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                              and e["data"].get("device") == "mirror", 120, mark_b)
        if not done or done["event"] != "BLOCK_JOB_COMPLETED" or done["data"].get("error"):
            return {"error": f"disk mirror did not complete: {done}"}
        deadline = time.time() + 120
        while (s := dst.cmd("query-migrate").get("status")) != "completed":
            if s in ("failed", "cancelled") or time.time() > deadline:
                return {"error": f"incoming migration {s}: {dst.cmd('query-migrate')}"}
            time.sleep(0.002)
        dmark = dst.mark()
        dst.cmd("nbd-server-stop")
        dst.cmd("cont")
        dst.cmd("announce-self", **ANNOUNCE)
        resume = dst.wait_event(is_event("RESUME"), 30, dmark)
        stop = src.wait_event(is_event("STOP"), 5, mark)
        if not resume or not stop:
            return {"error": f"missing events: STOP {stop}, RESUME {resume}"}
        return {"total_ms": (ts(resume) - t0) * 1000, "downtime_ms": info.get("downtime"),
                "pause_ms": (ts(resume) - ts(stop)) * 1000,
                "wall_ms": (time.time() - t0) * 1000, "stop_at": ts(stop) - t0,
                "ram_mib": info["ram"]["transferred"] / 2**20,
                "disk_mib": done["data"].get("offset", 0) / 2**20}

    def case(self, mem, busy, rate):
        src_p, src = self.qemu("src", mem, SRC_TAP, incoming=False)
        dst = None
        try:
            wait_guest(RAW_IP)
            if busy:
                start_memtest(RAW_IP, mem, rate)
            _, dst = self.qemu("dst", mem, DST_TAP, incoming=True)
            nbd_port, mig_port = free_port(), free_port()
            dst.cmd("migrate-set-capabilities", capabilities=[
                {"capability": "events", "state": True},
                {"capability": "late-block-activate", "state": True}])
            dst.cmd("nbd-server-start", addr={"type": "inet", "data": {
                "host": "127.0.0.1", "port": str(nbd_port)}})
            dst.cmd("block-export-add", type="nbd", id="root", writable=True,
                    **{"node-name": "root"})
            dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{mig_port}")
            params = src.cmd("query-migrate-parameters")
            log(f"    raw: QEMU defaults: downtime-limit {params.get('downtime-limit')} ms, "
                f"max-bandwidth {params.get('max-bandwidth', 0) >> 20} MiB/s")
            res, client = measure(RAW_IP, lambda: self.migrate(src, dst, nbd_port, mig_port))
            res.update(client)
            if busy and "error" not in res:
                try:
                    res["mismatches"] = memtest_mismatches(RAW_IP)
                except Exception as e:
                    res["mismatches"] = f"unreadable: {e}"
            return res
        finally:
            for q in (src, dst):
                if q:
                    try:
                        q.cmd("quit", timeout=5)
                    except QmpError:
                        pass
                    q.close()
            deadline = time.time() + 10
            while time.time() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.05)
            self.kill()

    def close(self):
        self.kill()
        for dev in (SRC_TAP, DST_TAP, BRIDGE):
            run("ip", "link", "del", dev, check=False, stderr=subprocess.DEVNULL)


# --- report -----------------------------------------------------------------

def fmt_run(r):
    if "error" in r:
        head = f"FAILED: {r['error']}"
    else:
        head = (f"{r['dir'] + ': ' if r.get('dir') else ''}"
                f"total {r['total_ms']:.0f} ms (request → done seen: {r['wall_ms']:.0f} ms), "
                f"QEMU downtime {r['downtime_ms']} ms, "
                f"pause {r['pause_ms']:.0f} ms, RAM sent {r['ram_mib']:.0f} MiB, "
                f"disk copied {r['disk_mib']:.1f} MiB"
                f"{'' if r.get('held_frames') is None else ', frames held in the pause ' + str(r['held_frames'])}")
    slowest = "-" if r.get("slowest_ms") is None else f"{r['slowest_ms']:.0f}"
    silence = "-" if r.get("silence_ms") is None else f"{r['silence_ms']:.0f}"
    tail = (f"; client: {r.get('requests', 0)} requests, {r.get('failed', 0)} failed, "
            f"slowest {slowest} ms, longest silence {silence} ms"
            f"{' (' + r['silence_at'] + ')' if r.get('silence_at') else ''}, "
            f"{r.get('slow', 0)} over {SLOW_MS} ms")
    if r.get("slow_at"):
        tail += f" (at {', '.join(r['slow_at'])} after the request"
        if r.get("stop_at"):
            tail += f"; source STOP at +{r['stop_at']:.2f}s"
        tail += ")"
    if r.get("errors"):
        tail += f" (errors: {r['errors']})"
    if "mismatches" in r:
        tail += f"; memtest mismatches {r['mismatches']}"
    return head + tail


def med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    return statistics.median(vals) if vals else None


def num(v, nd=0):
    return "–" if v is None else f"{v:.{nd}f}"


def row(label, side, runs):
    ok = [r for r in runs if "error" not in r]
    if not ok:
        err = runs[0]["error"] if runs else "not run"
        cells = [err, "–", "–"]
    else:
        cells = [num(med(ok, "total_ms")), num(med(ok, "downtime_ms")), num(med(ok, "pause_ms"))]
        if len(ok) < len(runs):
            cells[0] += f" ({len(runs) - len(ok)}/{len(runs)} failed: {runs[-1].get('error') or ''})"
    slowest = [r["slowest_ms"] for r in runs if r.get("slowest_ms") is not None]
    s = num(statistics.median(slowest)) if slowest else "–"
    if len(slowest) > 1:
        s += f" (max {max(slowest):.0f})"
    silent = [r["silence_ms"] for r in runs if r.get("silence_ms") is not None]
    q = num(statistics.median(silent)) if silent else "–"
    if len(silent) > 1:
        q += f" ({min(silent):.0f}–{max(silent):.0f})"
    failed = f"{sum(r.get('failed', 0) for r in runs)} / {sum(r.get('requests', 0) for r in runs)}"
    mm = [r["mismatches"] for r in runs if "mismatches" in r]
    mism = "–" if not mm else (str(sum(mm)) if all(isinstance(m, int) for m in mm) else str(mm))
    return f"| {label} | {side} | " + " | ".join(cells + [s, q, failed, mism]) + " |"


def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "–"


def report(rows, args, profile):
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    out = [f"Skyvisor's root disk: {args.disk} "
           f"({'a 2-replica volume, not copied' if args.disk == 'replicated' else 'a local qcow2, mirrored'}). "
           f"Medians of {args.repeat} run(s) per case; TCG guests, 1 vCPU, 2 GiB disk; "
           f"`{profile}` build; {qv}; raw QEMU and Skyvisor in the same run. "
           f"Busy: memtest rewriting half the guest's RAM at {args.rate} MiB/s. "
           f"Client: a new TCP connection to /health every 10–20 ms, from 1 s before to 1.5 s "
           f"after the migration.", "",
           "| guest | side | total ms | QEMU downtime ms | pause ms (STOP → RESUME) | "
           "slowest request ms | longest silence ms (range) | failed / requests | memtest mismatches |",
           "|---|---|---|---|---|---|---|---|---|"]
    checks = {"failed": [], "slow": [], "pause": [], "converge": [], "memtest": []}
    plain_rows = []
    for label, raw_runs, all_sv_runs in rows:
        sv_runs = [r for r in all_sv_runs if not r.get("insecure")]
        plain = [r for r in all_sv_runs if r.get("insecure")]
        out.append(row(label, "raw QEMU", raw_runs))
        out.append(row(label, "Skyvisor", sv_runs))
        if plain:
            out.append(row(label, "Skyvisor, plain streams", plain))
            plain_rows.append((label, sv_runs, plain))
        # Ratios over completed migrations only.
        rs = [r["slowest_ms"] for r in raw_runs if r.get("slowest_ms") is not None and "error" not in r]
        ss_ok = [r["slowest_ms"] for r in sv_runs if r.get("slowest_ms") is not None and "error" not in r]
        ss = [r["slowest_ms"] for r in sv_runs if r.get("slowest_ms") is not None]
        out.append(f"| {label} | Skyvisor / raw | – | – | "
                   f"{ratio(med(sv_runs, 'pause_ms'), med(raw_runs, 'pause_ms'))} | "
                   f"{ratio(statistics.median(ss_ok) if ss_ok else None, statistics.median(rs) if rs else None)}"
                   f" | {ratio(med(sv_runs, 'silence_ms'), med(raw_runs, 'silence_ms'))} | | |")
        checks["failed"].append((label, sum(r.get("failed", 0) for r in sv_runs)))
        checks["slow"].append((label, max(ss) if ss else None))
        if "256 MiB idle" == label:
            checks["pause"].append((label, max((r["pause_ms"] for r in sv_runs if "pause_ms" in r),
                                               default=None)))
        if "busy" in label:
            checks["converge"].append((label, all("error" not in r for r in sv_runs) and bool(sv_runs),
                                       all("error" not in r for r in raw_runs) and bool(raw_runs)))
            checks["memtest"].append((label, [r.get("mismatches") for r in sv_runs]))
    if plain_rows:
        out += ["", "What TLS on the streams costs (Skyvisor's default, mutual TLS with the "
                "cluster's certificates, against `insecure` migrations of the same guest, "
                "alternating in the same run):", "",
                "| guest | total ms TLS / plain | pause TLS / plain | longest silence TLS / plain |",
                "|---|---|---|---|"]
        for label, tls_runs, plain in plain_rows:
            out.append(f"| {label} | {ratio(med(tls_runs, 'total_ms'), med(plain, 'total_ms'))} | "
                       f"{ratio(med(tls_runs, 'pause_ms'), med(plain, 'pause_ms'))} | "
                       f"{ratio(med(tls_runs, 'silence_ms'), med(plain, 'silence_ms'))} |")
    out += ["", "Targets (Skyvisor):", ""]
    f = checks["failed"]
    out.append(f"- zero failed requests: {'yes' if all(n == 0 for _, n in f) else 'NO'} "
               f"({', '.join(f'{l}: {n}' for l, n in f)})")
    s = checks["slow"]
    out.append(f"- no request slower than {SLOW_MS} ms: "
               f"{'yes' if all(v is not None and v < SLOW_MS for _, v in s) else 'NO'} "
               f"({', '.join(f'{l}: {num(v)} ms' for l, v in s)})")
    for l, v in checks["pause"]:
        out.append(f"- idle 256 MiB pause under 100 ms: {'yes' if v is not None and v < 100 else 'NO'} "
                   f"(slowest run {num(v)} ms)")
    for l, sv_ok, raw_ok in checks["converge"]:
        out.append(f"- {l} converges: {'yes' if sv_ok else 'NO'} "
                   f"(raw QEMU with default parameters: {'yes' if raw_ok else 'did not converge/failed'})")
    for l, mm in checks["memtest"]:
        out.append(f"- {l} memory intact after every move: "
                   f"{'yes' if mm and all(m == 0 for m in mm) else 'NO'} (mismatches {mm})")
    out += ["", "Total: raw = `blockdev-add` of the mirror target → destination RESUME; "
            "Skyvisor = the migration record's `total_ms` (source agent picks it up → VM runs on "
            "the destination). Pause: raw = QMP STOP (source) → RESUME (destination) timestamps; "
            "Skyvisor = the record's `pause_ms` (same two points, measured by the source agent).",
            "", "Runs (slow requests: start after the migration was asked for, and duration):", ""]
    for label, raw_runs, sv_runs in rows:
        for side, runs in (("raw QEMU", raw_runs), ("Skyvisor", sv_runs)):
            for i, r in enumerate(runs):
                plain = " (plain streams)" if r.get("insecure") else ""
                out.append(f"- {label}, {side} #{i + 1}{plain}: {fmt_run(r)}")
    return "\n".join(out) + "\n"


# --- main ---------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", action="store_true", help="build and run the release binary")
    ap.add_argument("--repeat", type=int, default=1, help="migrations per case (median reported)")
    ap.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB")
    ap.add_argument("--cases", default="idle,busy", help="idle, busy or both")
    ap.add_argument("--rate", type=float, default=50, help="busy guests' memtest rate, MiB/s")
    ap.add_argument("--no-build", action="store_true", help="use the binary already built")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    ap.add_argument("--disk", choices=["replicated", "local"], default="replicated",
                    help="Skyvisor VM's root disk: a 2-replica volume (the cluster default; "
                         "not copied) or a local qcow2 (mirrored)")
    ap.add_argument("--tls-compare", action="store_true",
                    help="also migrate with plain streams (insecure), alternating with TLS, "
                         "and report what TLS costs")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"),
                    help="where to write the report")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, bridges, taps)")
    sizes = [int(m) for m in args.sizes.split(",") if m]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in ("idle", "busy") for c in cases):
        sys.exit("--cases takes idle and/or busy")
    profile = "release" if args.release else "debug"
    # The repository's own target dir: the image recipe takes skyvisor-guest
    # from next to the skyvisor binary.
    env = dict(os.environ)
    env.pop("CARGO_TARGET_DIR", None)
    if not args.no_build:
        build = ["cargo", "build", "-q", "-p", "skyvisor", "-p", "skyvisor-guest"]
        if args.release:
            build.append("--release")
        subprocess.run(build, cwd=ROOT, check=True, env=env)
    binary = os.path.join(ROOT, "target", profile, "skyvisor")
    if not os.access(binary, os.X_OK):
        sys.exit(f"no {binary}: build it first")

    work = tempfile.mkdtemp(prefix="svmigbench-", dir="/var/tmp")
    state = {"sv": None, "raw": None, "ok": False}

    def cleanup():
        if state["raw"]:
            state["raw"].close()
            state["raw"] = None
        if state["sv"]:
            state["sv"].close(keep_logs_in=None if state["ok"] and not args.keep else work)
            state["sv"] = None
        if state["ok"] and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work} for a look")

    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))

    rows = []
    try:
        state["sv"] = sv = Skyvisor(binary, work, args.disk)
        state["raw"] = raw = Raw(sv, work)
        for mem in sizes:
            for case in cases:
                busy = case == "busy"
                label = f"{mem} MiB {case}"
                log(f"== {label}")
                raw_runs = []
                for i in range(args.repeat):
                    log(f"  raw QEMU run {i + 1}/{args.repeat}")
                    try:
                        r = raw.case(mem, busy, args.rate)
                    except Exception as e:
                        r = {"error": f"{type(e).__name__}: {e}"}
                    log(f"    {fmt_run(r)}")
                    raw_runs.append(r)
                try:
                    sv_runs = sv.case(mem, busy, args.repeat * (2 if args.tls_compare else 1),
                                      args.rate, args.tls_compare)
                except Exception as e:
                    sv_runs = [{"error": f"{type(e).__name__}: {e}"}]
                    log(f"    {fmt_run(sv_runs[0])}")
                rows.append((label, raw_runs, sv_runs))
        state["ok"] = all("error" not in r for _, a, b in rows for r in a + b)
    finally:
        cleanup()

    text = report(rows, args, profile)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
