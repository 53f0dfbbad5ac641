#!/usr/bin/env python3
"""Scale-out benchmark: an instance group behind a Skyvisor load balancer,
against going straight to the members, in the same run, on one host.

On a `skyvisor up` with a group of 3 busybox guests (TCG) and a balancer:
  - latency the balancer adds per request: new connection + GET /identity,
    sequential, direct to one member against through the balancer's
    address (p50, p99), interleaved round by round;
  - throughput: N client threads for T seconds, each opening a new
    connection per request, spread evenly over the members directly
    against all through the balancer;
  - a dead backend out of rotation: a member's QEMU is killed while a
    client sends a request every 10 ms through the balancer; the time
    until the balancer's backends no longer list it, and the time of the
    last failed request, both from the kill;
  - load step to first new member serving: with a policy of 20 new
    connections per second per member, a client at ~100/s starts; the
    time until a member made for it answers through the balancer.

The datapath is in every host's agent (see docs/scale-out.md): a host's
death takes only its own clients with it, so there is no datapath
failover to time; this single-host bench does not kill a host.

Usage: bench/scale-out/run.py [--release] [--rounds N]
Needs root and a built skyvisor (builds it first). Writes
bench/scale-out/results.md and prints it.
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
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BRIDGE = "svbench1"
SUBNET = "10.218.0"


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


def identity(ip, timeout=2.0):
    """One request on a new connection: the answering member's name."""
    s = socket.create_connection((ip, 80), timeout=timeout)
    try:
        s.settimeout(timeout)
        s.sendall(f"GET /identity HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
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
    return json.loads(body)["name"]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


class Cloud:
    def __init__(self, binary, work):
        self.data = os.path.join(work, "data")
        self.port = 17991
        self.url = f"http://127.0.0.1:{self.port}"
        self.logf = open(os.path.join(work, "up.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "up", "--data-dir", self.data, "--listen", f"127.0.0.1:{self.port}",
             "--accel", "tcg", "--bridge", BRIDGE, "--subnet", f"{SUBNET}.0/24",
             "--host-name", "bench", "--replica-listen", "127.0.0.1:17992"],
            stdout=self.logf, stderr=self.logf)
        deadline = time.time() + 900
        while time.time() < deadline:
            try:
                with open(os.path.join(work, "up.log")) as f:
                    if "Skyvisor is up" in f.read():
                        break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("skyvisor up exited; see up.log")
            time.sleep(0.2)
        self.binary = binary

    def token(self):
        with open(os.path.join(self.data, "admin.token")) as f:
            return f.read().strip()

    def api(self, method, path, body=None):
        return http(method, f"{self.url}{path}", json.dumps(body) if body is not None else None,
                    timeout=60, token=self.token())

    def wait(self, what, check, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = check()
            if v:
                return v
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for d in os.listdir(os.path.join(self.data, "agent", "vms")):
            try:
                with open(os.path.join(self.data, "agent", "vms", d, "qemu.pid")) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        subprocess.run(["ip", "link", "del", BRIDGE], stderr=subprocess.DEVNULL)


def members(cloud, group="web"):
    g = cloud.api("GET", f"/v1/groups/{group}")
    return g, [(m["name"], m["ip"]) for m in g["members"] if not m["leaving"]]


def settled(cloud, n, group="web"):
    def check():
        g, ms = members(cloud, group)
        return (g if g["healthy"] == n and len(g["members"]) == n else None)
    return cloud.wait(f"{n} healthy members", check)


def latency(ips, vip, rounds, per_round):
    """Per-request times (µs): straight to one member, straight to each
    member in turn (what the balancer's round robin does: here an idle
    TCG guest is slower to wake than a busy one, so this is the fair
    baseline), and through the balancer."""
    one, each, via = [], [], []
    for _ in range(rounds):
        for targets, out in (([ips[0]], one), (ips, each), ([vip], via)):
            for i in range(per_round):
                t = time.perf_counter()
                identity(targets[i % len(targets)])
                out.append((time.perf_counter() - t) * 1e6)
    return one, each, via


def throughput(targets, threads, secs):
    """Requests per second with `threads` clients, thread i going to
    targets[i % len(targets)]."""
    done = [0] * threads
    errors = [0] * threads
    stop = time.time() + secs

    def work(i):
        t = targets[i % len(targets)]
        while time.time() < stop:
            try:
                identity(t, timeout=5)
                done[i] += 1
            except Exception:
                errors[i] += 1

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / secs, sum(errors)


class Client:
    """A request every 10 ms through `vip`, recording (time, name|None)."""

    def __init__(self, vip):
        self.vip, self.seen, self.running = vip, [], True
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while self.running:
            t = time.time()
            try:
                self.seen.append((t, identity(self.vip)))
            except Exception:
                self.seen.append((t, None))
            time.sleep(max(0.0, 0.01 - (time.time() - t)))

    def stop(self):
        self.running = False
        self.thread.join()
        return self.seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--secs", type=int, default=10)
    args = ap.parse_args()
    profile = "release" if args.release else "debug"
    cmd = ["cargo", "build", "-q", "-p", "skyvisor", "-p", "skyvisor-guest"]
    if args.release:
        cmd.append("--release")
    subprocess.run(cmd, cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", profile, "skyvisor")
    work = tempfile.mkdtemp(prefix="skyvisor-scaleout-")
    cloud = Cloud(binary, work)
    out = {}
    try:
        cloud.api("POST", "/v1/groups", {
            "name": "web", "min": 1, "max": 4, "desired": 3,
            "template": {"image": "debian-busybox", "instance_type": "nano",
                         "restart_policy": "never"},
            "health_check": {"protocol": "http", "port": 80, "path": "/health",
                             "interval_secs": 1, "timeout_secs": 1}})
        settled(cloud, 3)
        lb = cloud.api("POST", "/v1/load-balancers",
                       {"name": "web-lb", "group": "web", "listeners": [{"port": 80}],
                        "drain_secs": 2})
        vip = lb["spec"]["address"]
        cloud.wait("3 backends", lambda: len(cloud.api("GET", "/v1/load-balancers/web-lb")["backends"]) == 3)
        _, ms = members(cloud)
        ips = [ip for _, ip in ms]
        log(f"group of 3 at {ips}, balancer at {vip}")

        # Warm both paths.
        latency(ips, vip, 1, 50)
        one, each, via = latency(ips, vip, args.rounds, 200)
        out["lat"] = (statistics.median(each), pct(each, 0.99),
                      statistics.median(via), pct(via, 0.99),
                      statistics.median(one), pct(one, 0.99))
        log(f"latency direct p50 {out['lat'][0]:.0f} us (one member {out['lat'][4]:.0f}), "
            f"via {out['lat'][2]:.0f} us")

        d_rps, d_err = throughput(ips, args.threads, args.secs)
        v_rps, v_err = throughput([vip], args.threads, args.secs)
        out["tput"] = (d_rps, d_err, v_rps, v_err)
        log(f"throughput direct {d_rps:.0f}/s, via {v_rps:.0f}/s")

        # A dead backend.
        c = Client(vip)
        time.sleep(2)
        victim, _ = ms[0]
        pid = cloud.api("GET", f"/v1/instances/{victim}")["status"]["pid"]
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        gone = cloud.wait("the dead backend removed", lambda: (
            time.time() if all(b["member"] != victim for b in
                               cloud.api("GET", "/v1/load-balancers/web-lb")["backends"]) else None), 60)
        time.sleep(3)
        seen = c.stop()
        failed = [t for t, n in seen if n is None and t >= killed - 0.1]
        out["dead"] = (gone - killed, (max(failed) - killed) if failed else None, len(failed),
                       len([1 for t, _ in seen if t >= killed]))
        log(f"dead backend out of rotation after {out['dead'][0]:.2f} s; failed {len(failed)}")
        settled(cloud, 3)

        # A load step.
        cloud.api("POST", "/v1/groups/web/scale", {"desired": 1})
        settled(cloud, 1)
        cloud.api("PUT", "/v1/groups/web/autoscale", {
            "target_requests_per_member": 20, "window_secs": 10,
            "scale_out_cooldown_secs": 0, "scale_in_cooldown_secs": 600})
        _, ms = members(cloud)
        before = {n for n, _ in ms}
        c = Client(vip)
        start = time.time()
        first_new = cloud.wait("a new member answering", lambda: next(
            (t for t, n in list(c.seen) if n is not None and n not in before), None), 600)
        first_decision = cloud.api("GET", "/v1/groups/web").get("autoscaled") or {}
        c.stop()
        out["step"] = (first_new - start, first_decision.get("reason", ""))
        log(f"load step to a new member serving: {out['step'][0]:.1f} s")
    finally:
        cloud.stop()

    lat = out["lat"]
    tput = out["tput"]
    dead = out["dead"]
    step = out["step"]
    lines = [
        f"`bench/scale-out/run.py{' --release' if args.release else ''} --rounds {args.rounds}`, "
        f"{time.strftime('%Y-%m-%d')}, one host, 3 busybox members (TCG, 1 vCPU each), "
        f"a new TCP connection per request (GET /identity).",
        "",
        "| figure | direct, each member in turn | through the balancer | ratio / added | target |",
        "|---|---|---|---|---|",
        f"| latency p50 (µs) | {lat[0]:.0f} | {lat[2]:.0f} | {lat[2] - lat[0]:+.0f} µs | added < 1000 µs |",
        f"| latency p99 (µs) | {lat[1]:.0f} | {lat[3]:.0f} | {lat[3] - lat[1]:+.0f} µs | |",
        f"| throughput, {args.threads} clients (req/s) | {tput[0]:.0f} (spread over 3) | {tput[2]:.0f} | "
        f"{tput[2] / tput[0] * 100:.0f}% | |",
        "",
        f"Straight to one member only (it stays busy, so its guest never idles): "
        f"p50 {lat[4]:.0f} µs, p99 {lat[5]:.0f} µs.",
        "",
        "| event | time | target |",
        "|---|---|---|",
        f"| member's QEMU killed → out of the balancer's backends | {dead[0]:.2f} s | < 3 s |",
        f"| member's QEMU killed → last failed request | "
        f"{'none failed' if dead[1] is None else f'{max(dead[1], 0.0):.2f} s'} "
        f"({dead[2]} of {dead[3]} requests after the kill failed) | |",
        f"| load step (~100 conn/s, target 20 per member) → first new member answers | {step[0]:.1f} s | |",
        "",
        f"The autoscaler's reason: {step[1]}",
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
