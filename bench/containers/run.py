#!/usr/bin/env python3
"""Containers against VMs of the same service, in the same run, on one host.

On a `skyvisor up`, each round creates one VM (debian-busybox, TCG) and
one container (debian-rootfs: the same busybox and skyvisor-guest, run by
crun), both of type nano, interleaved, and measures for each:
  - create -> service answering: from the create request to the first
    200 from the instance's /health (new connection every 20 ms);
  - memory when idle, 10 s after it answered:
      VM: the resident memory (VmRSS) of its QEMU process;
      container: the resident memory of every process in its cgroup plus
      its runtime monitor (`crun run`), and, for reference, what its
      memory cgroup is charged (which counts page cache too).

Usage: bench/containers/run.py [--release] [--rounds N]
Needs root and a built skyvisor (builds it first). Writes
bench/containers/results.md and prints it.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BRIDGE = "svbench2"
SUBNET = "10.218.1"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def http(method, url, body=None, timeout=10.0, token=None):
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
        return json.loads(text) if text.strip() else None


class Cloud:
    def __init__(self, binary, work):
        self.data = os.path.join(work, "data")
        self.port = 17993
        self.url = f"http://127.0.0.1:{self.port}"
        self.logf = open(os.path.join(work, "up.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "up", "--data-dir", self.data, "--listen", f"127.0.0.1:{self.port}",
             "--accel", "tcg", "--bridge", BRIDGE, "--subnet", f"{SUBNET}.0/24",
             "--host-name", "bench", "--replica-listen", "127.0.0.1:17994"],
            stdout=self.logf, stderr=self.logf)
        self.wait("skyvisor up", lambda: "Skyvisor is up" in open(os.path.join(work, "up.log")).read()
                  or (self.proc.poll() is not None and self.fail()), 900)

    def fail(self):
        raise RuntimeError("skyvisor up exited; see up.log")

    def token(self):
        with open(os.path.join(self.data, "admin.token")) as f:
            return f.read().strip()

    def api(self, method, path, body=None):
        return http(method, f"{self.url}{path}", json.dumps(body) if body is not None else None,
                    timeout=60, token=self.token())

    def wait(self, what, check, timeout=600, every=0.05):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = check()
            if v:
                return v
            time.sleep(every)
        raise RuntimeError(f"timed out waiting for {what}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        vms = os.path.join(self.data, "agent", "vms")
        for d in os.listdir(vms) if os.path.isdir(vms) else []:
            for f in ("qemu.pid", "container.pid"):
                try:
                    with open(os.path.join(vms, d, f)) as p:
                        os.kill(int(p.read()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            subprocess.run(["umount", "-l", os.path.join(vms, d, "rootfs")],
                           stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", BRIDGE], stderr=subprocess.DEVNULL)


def answers(ip):
    """One attempt: a new connection (given up after 100 ms, so that a SYN
    sent before the instance's network is up does not hold the poll) and
    GET /health."""
    try:
        s = socket.create_connection((ip, 80), timeout=0.1)
    except OSError:
        return False
    try:
        s.settimeout(5)
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def container_memory(cid):
    """(RSS of its processes + its monitor's, KiB; cgroup charge, KiB)."""
    pids, monitor = [], None
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cgroup") as f:
                if f"skyvisor/{cid}" in f.read():
                    pids.append(int(p))
                    continue
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if argv and argv[0].endswith(b"crun") and b"run" in argv and cid.encode() in argv:
                monitor = int(p)
        except OSError:
            pass
    rss = sum(rss_kib(p) for p in pids) + (rss_kib(monitor) if monitor else 0)
    charged = 0
    for path in (f"/sys/fs/cgroup/memory/skyvisor/{cid}/memory.usage_in_bytes",
                 f"/sys/fs/cgroup/skyvisor/{cid}/memory.current"):
        try:
            with open(path) as f:
                charged = int(f.read()) // 1024
                break
        except OSError:
            pass
    return rss, charged, len(pids)


def one(cloud, name, kind):
    body = {"name": name, "instance_type": "nano", "restart_policy": "never",
            "image": "debian-rootfs" if kind == "container" else "debian-busybox"}
    if kind == "container":
        body["kind"] = "container"
    t0 = time.perf_counter()
    inst = cloud.api("POST", "/v1/instances", body)
    ip = inst["spec"]["network"]["ip"]
    cloud.wait(f"{name} answering", lambda: answers(ip), 300, every=0.02)
    took = time.perf_counter() - t0
    time.sleep(10)
    inst = cloud.api("GET", f"/v1/instances/{name}")
    if kind == "container":
        cid = "sv-" + inst["spec"]["id"].replace("-", "")
        rss, charged, procs = container_memory(cid)
    else:
        rss, charged, procs = rss_kib(inst["status"]["pid"]), None, 1
    cloud.api("DELETE", f"/v1/instances/{name}?force=true")
    cloud.wait(f"{name} deleted", lambda: not any(
        i["spec"]["name"] == name for i in cloud.api("GET", "/v1/instances")), 120)
    return took, rss, charged, procs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    profile = "release" if args.release else "debug"
    cmd = ["cargo", "build", "-q", "-p", "skyvisor", "-p", "skyvisor-guest"]
    if args.release:
        cmd.append("--release")
    subprocess.run(cmd, cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", profile, "skyvisor")
    work = tempfile.mkdtemp(prefix="skyvisor-containers-")
    # A container's root (an unprivileged host id) must reach its files.
    os.chmod(work, 0o755)
    cloud = Cloud(binary, work)
    res = {"vm": [], "container": []}
    try:
        cloud.wait("image debian-rootfs", lambda: cloud.api(
            "GET", "/v1/images/debian-rootfs")["state"] == "ready", 600, every=0.5)
        # Warm: the container image is unpacked once per host, the VM
        # image's files are in the page cache.
        for kind in ("vm", "container"):
            one(cloud, f"warm-{kind[0]}", kind)
        for r in range(args.rounds):
            for kind in ("vm", "container") if r % 2 == 0 else ("container", "vm"):
                took, rss, charged, procs = one(cloud, f"{kind[0]}{r}", kind)
                res[kind].append((took, rss, charged, procs))
                log(f"round {r} {kind}: answered after {took:.3f} s, idle RSS {rss / 1024:.1f} MiB"
                    + (f", cgroup charged {charged / 1024:.1f} MiB, {procs} processes" if charged is not None else ""))
    finally:
        cloud.stop()

    def med(kind, i):
        return statistics.median(x[i] for x in res[kind])

    def spread(kind, i, scale=1.0, fmt="{:.2f}"):
        xs = [x[i] * scale for x in res[kind]]
        return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"

    vm_t, ct_t = med("vm", 0), med("container", 0)
    vm_m, ct_m = med("vm", 1) / 1024, med("container", 1) / 1024
    ct_c = med("container", 2) / 1024
    lines = [
        "# Containers against VMs of the same service",
        "",
        f"`sudo python3 bench/containers/run.py{' --release' if args.release else ''} --rounds {args.rounds}`"
        f" ({time.strftime('%Y-%m-%d')}, this machine: 2 cores, TCG for the VMs). Each round"
        " creates a VM (debian-busybox) and a container (debian-rootfs: the same busybox and"
        " skyvisor-guest), type nano, interleaved; medians, with the range over rounds.",
        "",
        "| | VM | container | ratio | target |",
        "|---|---|---|---|---|",
        f"| create → service answers | {vm_t:.2f} s ({spread('vm', 0)}) | {ct_t:.3f} s ({spread('container', 0, fmt='{:.3f}')}) "
        f"| {vm_t / ct_t:.0f}× faster | container < 0.5 s: **{'met' if ct_t < 0.5 else 'missed'}** |",
        f"| memory when idle (RSS) | {vm_m:.0f} MiB ({spread('vm', 1, 1 / 1024, '{:.0f}')}) | {ct_m:.1f} MiB ({spread('container', 1, 1 / 1024, '{:.1f}')}) "
        f"| {vm_m / ct_m:.0f}× less | container < 10 MiB: **{'met' if ct_m < 10 else 'missed'}** |",
        f"| container's memory cgroup charge (page cache included) | | {ct_c:.1f} MiB ({spread('container', 2, 1 / 1024, '{:.1f}')}) | | |",
        "",
        "VM memory is its QEMU's resident set (guest RAM it touched, QEMU itself, TCG's code"
        " cache); a container's is the resident set of its processes (its init and the guest"
        " service) and of its runtime monitor (`crun run`, which waits for it and gives its"
        " exit status). The cgroup charge also counts the page cache its files brought in"
        " (the image's files on the overlay), which the kernel reclaims first.",
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
