#!/usr/bin/env python3
"""HA benchmark: recovery time from a host's death to the guest's service
answering on another host, against the floor in the same run: a raw QEMU
cold boot of the same guest.

Skyvisor: a 3-host test bed (scripts/testbed.sh: hosts in network
namespaces, etcd, one server; agents with the default lease TTL unless
--lease-ttl says otherwise) and one protected VM (nano, root disk a
2-replica volume: `disk_replicas: 2`). Each round SIGKILLs every process
of the host the VM runs on (`testbed.sh host-kill`), then measures from the
kill to the first answer of the guest's /health on its new host (a new TCP
connection every 50 ms, from this machine, routed through a surviving
host), checks that the guest rebooted (new boot id) and kept its disk
counter, and restarts the dead host's agent (its replica then resyncs: the
time until the volume is healthy again is reported too).

Raw QEMU: the very same kernel, initrd and base disk, booted by hand
(bench/migration's raw QEMU command line) on a bridge in the root
namespace; from exec to the first answer of /health.

Usage: bench/ha/run.py [--kills 20] [--raw 5] [--lease-ttl 8] [--release] [--no-build]
Needs root; builds skyvisor first. Writes bench/ha/results.md and prints it.
"""

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TESTBED = os.path.join(ROOT, "scripts", "testbed.sh")
TESTBED_ID = int(os.environ.get("HABENCH_TESTBED_ID", "61"))
API = f"http://10.216.{TESTBED_ID}.1:7780"
PROBE_GAP = 0.05

# The raw QEMU command line and QMP helper of the migration benchmark.
_spec = importlib.util.spec_from_file_location(
    "migbench", os.path.join(ROOT, "bench", "migration", "run.py"))
mig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mig)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def http(method, url, body=None, timeout=10.0, token=None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
        try:
            return json.loads(text)
        except ValueError:
            return text


def read_token(path):
    """The bootstrap admin token a server wrote (None until it has)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def answers(ip, path="/health", timeout=0.5):
    try:
        return http("GET", f"http://{ip}{path}", timeout=timeout)
    except Exception:
        return None


def post_quietly(url):
    """POST, or None if it failed (for polling)."""
    try:
        return http("POST", url, timeout=2.0)
    except Exception:
        return None


class Bed:
    def __init__(self, binary, lease_ttl, work):
        self.lease_ttl = lease_ttl
        self.env = dict(os.environ, TESTBED_ID=str(TESTBED_ID), SKYVISOR=binary,
                        TESTBED_CACHE=os.environ.get(
                            "TESTBED_CACHE", os.path.join(ROOT, "target", "test-cache")),
                        LEASE_TTL=str(lease_ttl), ACCEL="tcg")
        self.env.pop("TESTBED_DIR", None)
        self.dir = f"/tmp/svtb-{TESTBED_ID}"
        self.testbed("down", check=False)
        self.up = True
        log(f"test bed {TESTBED_ID}: 3 hosts, etcd, a server; lease TTL {lease_ttl} s")
        self.testbed("up", "3", "1")
        self.files, self.cmdline = mig.default_image_files(
            lambda: self.api("GET", "/v1/images/debian-busybox"), self.dir, work)

    def testbed(self, *args, check=True):
        r = subprocess.run([TESTBED, *args], env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"testbed.sh {' '.join(args)}: {r.stderr.strip()[-2000:]}")
        return r

    def api(self, method, path, body=None, timeout=30):
        return http(method, f"{API}{path}", body, timeout, token=read_token(f"{self.dir}/admin.token"))

    def instance(self, name):
        return self.api("GET", f"/v1/instances/{name}")

    def host_ready(self, h):
        try:
            return self.api("GET", f"/v1/hosts/h{h}")["state"] == "ready"
        except Exception:
            return False

    def close(self):
        if self.up:
            self.testbed("down", check=False)
            self.up = False


def wait(what, timeout, check, gap=0.2):
    deadline = time.time() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(gap)


def kill_round(bed, name, ip):
    inst = bed.instance(name)
    h = int(inst["spec"]["host"][1:])
    via = next(o for o in (1, 2, 3) if o != h)
    bed.testbed("vmnet-via", str(via))
    boot = wait("the guest's boot id", 60, lambda: answers(ip, "/uptime", 2.0))["boot_id"]
    counter = wait("an acknowledged increment", 60, lambda: post_quietly(
        f"http://{ip}/counter/increment"))["value"]
    t0 = time.time()
    bed.testbed("host-kill", str(h))
    wait("the guest on another host", 300,
         lambda: answers(ip) is not None and int(bed.instance(name)["spec"]["host"][1:]) != h,
         gap=PROBE_GAP)
    recovery = time.time() - t0
    new_boot = answers(ip, "/uptime")["boot_id"]
    kept = http("GET", f"http://{ip}/counter")["value"]
    # The dead host returns; its replica catches up.
    t1 = time.time()
    bed.testbed("agent-start", str(h))
    wait(f"h{h} ready", 120, lambda: bed.host_ready(h))
    wait("the volume healthy", 600,
         lambda: bed.api("GET", f"/v1/volumes/{name}-disk").get("health") == "healthy")
    resync = time.time() - t1
    return {"host": h, "recovery_s": recovery, "rebooted": new_boot != boot,
            "counter_kept": kept >= counter, "resync_s": resync}


def raw_boots(bed, work, n):
    raw = mig.Raw(bed, work)
    times = []
    try:
        for i in range(n):
            t0 = time.time()
            raw.qemu(f"boot{i}", 128, mig.SRC_TAP, incoming=False)
            wait("the raw guest", 300, lambda: answers(mig.RAW_IP) is not None, gap=PROBE_GAP)
            times.append(time.time() - t0)
            log(f"raw QEMU cold boot {i + 1}/{n}: {times[-1]:.2f} s")
            raw.kill()
    finally:
        raw.close()
    return times


def pct(values, p):
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def start_bed(lease_ttl, release=False, build=True, prefix="svha-"):
    """Checks for root, builds skyvisor (unless told not to), starts the
    3-host test bed and arranges for it and the work directory to go at
    exit or on a signal. Returns (bed, work directory)."""
    if os.geteuid() != 0:
        sys.exit("needs root")
    env = dict(os.environ)
    env.pop("CARGO_TARGET_DIR", None)
    if build:
        cmd = ["cargo", "build", "-q", "-p", "skyvisor", "-p", "skyvisor-guest"]
        if release:
            cmd.append("--release")
        subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    binary = os.path.join(ROOT, "target", "release" if release else "debug", "skyvisor")
    work = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    state = {"bed": None}

    def cleanup():
        if state["bed"]:
            state["bed"].close()
        shutil.rmtree(work, ignore_errors=True)

    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))
    state["bed"] = Bed(binary, lease_ttl, work)
    return state["bed"], work


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--raw", type=int, default=5, help="raw QEMU cold boots")
    ap.add_argument("--lease-ttl", type=int, default=8, help="agents' lease TTL (default: the product's)")
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    bed, work = start_bed(args.lease_ttl, release=args.release, build=not args.no_build,
                          prefix="svhabench-")
    raws = raw_boots(bed, work, args.raw)
    bed.api("POST", "/v1/instances", {"name": "ha", "image": "debian-busybox",
                                      "instance_type": "nano", "disk_replicas": 2})
    inst = wait("the VM", 300, lambda: (lambda v: v if v["status"].get("guest_ready") else None)(
        bed.instance("ha")))
    ip = inst["spec"]["network"]["ip"]
    rounds = []
    for i in range(args.kills):
        r = kill_round(bed, "ha", ip)
        log(f"kill {i + 1}/{args.kills}: h{r['host']} -> answers after {r['recovery_s']:.2f} s, "
            f"rebooted={r['rebooted']} counter kept={r['counter_kept']}, "
            f"resynced in {r['resync_s']:.1f} s")
        rounds.append(r)
    rec = [r["recovery_s"] for r in rounds]
    res = [r["resync_s"] for r in rounds]
    raw_med = statistics.median(raws)
    lines = [
        "# HA benchmark results",
        "",
        f"`sudo python3 bench/ha/run.py --kills {args.kills} --raw {args.raw} --lease-ttl "
        f"{args.lease_ttl}{' --release' if args.release else ''}` ({'release' if args.release else 'debug'} build), "
        f"{time.strftime('%Y-%m-%d')}, TCG on this 2-core machine.",
        "",
        "| what | n | p50 | p99 | min | max |",
        "|---|---|---|---|---|---|",
        f"| raw QEMU cold boot to /health (the floor) | {len(raws)} | {statistics.median(raws):.2f} s"
        f" | {pct(raws, 99):.2f} s | {min(raws):.2f} s | {max(raws):.2f} s |",
        f"| host SIGKILLed to /health on another host | {len(rec)} | {statistics.median(rec):.2f} s"
        f" | {pct(rec, 99):.2f} s | {min(rec):.2f} s | {max(rec):.2f} s |",
        f"| dead host's agent restarted to its replica in sync again | {len(res)}"
        f" | {statistics.median(res):.1f} s | {pct(res, 99):.1f} s | {min(res):.1f} s"
        f" | {max(res):.1f} s |",
        "",
        f"Recovery p50 / raw boot p50: **{statistics.median(rec) / raw_med:.2f}x**; "
        f"recovery minus raw boot (detection, fencing margin, placement, volume takeover): "
        f"{statistics.median(rec) - raw_med:.2f} s at the median.",
        f"Every kill: guest rebooted (new boot id) {sum(r['rebooted'] for r in rounds)}/{len(rounds)}, "
        f"acknowledged counter kept {sum(r['counter_kept'] for r in rounds)}/{len(rounds)}.",
        "",
        "Per kill (s): " + ", ".join(f"{v:.1f}" for v in rec),
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
