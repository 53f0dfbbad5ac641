#!/usr/bin/env python3
"""API latency with authentication, against the same calls without it.

    sudo python3 bench/api/run.py --base BIN --new BIN [--n 100] [--rounds 3]

Starts `skyvisor up` from each binary in turn (the baseline, e.g. one built
from the commit before authentication, and the current one), on its own
data directory, port and bridge, and times, over keep-alive HTTP from this
process:
  create: POST /v1/instances (nano, not started: the API and the store, no
          QEMU), list: GET /v1/instances (returning n VMs), show: GET
          /v1/instances/NAME, delete: DELETE ...?force=true.
Rounds alternate base and new so that drift hits both alike. The new
binary's calls carry the bootstrap token; the base's carry none (it has no
authentication). Reports p50 and p99 of each, and the ratio new/base;
the issue's bar is at most 1.2x. Python 3 standard library only.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pct(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))
    return v[k]


class Up:
    """One `skyvisor up` on its own port, bridge and data directory."""

    def __init__(self, binary, slot, work, cache):
        self.port = 18100 + slot
        self.data = os.path.join(work, f"up{slot}")
        os.makedirs(self.data, exist_ok=True)
        self.log = open(os.path.join(self.data, "up.log"), "w")
        # Room for every VM the round creates (they are never started).
        config = os.path.join(self.data, "config.toml")
        with open(config, "w") as f:
            f.write("[overcommit]\ncpu = 64.0\nmemory = 1.0\ndisk = 4.0\n")
        self.proc = subprocess.Popen(
            [binary, "up", "--config", config, "--data-dir", self.data, "--cache-dir", cache,
             "--listen", f"127.0.0.1:{self.port}", "--accel", "tcg",
             "--bridge", f"svapib{slot}", "--subnet", f"10.221.{slot}.0/24",
             "--host-name", f"api{slot}",
             "--replica-listen", f"127.0.0.1:{self.port + 50}"],
            stdout=self.log, stderr=self.log)
        self.conn = None
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"skyvisor up exited; see {self.data}/up.log")
            with open(os.path.join(self.data, "up.log")) as f:
                if "Skyvisor is up" in f.read():
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("skyvisor up did not start")
        token_file = os.path.join(self.data, "admin.token")
        self.token = open(token_file).read().strip() if os.path.exists(token_file) else None

    def call(self, method, path, body=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        data = json.dumps(body) if body is not None else None
        t = time.perf_counter()
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        text = r.read()
        ms = (time.perf_counter() - t) * 1000
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {text[:300]!r}")
        return ms

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        subprocess.run(["ip", "link", "del", f"svapib{self.port - 18100}"],
                       stderr=subprocess.DEVNULL)


def round_of(up, n, out):
    for i in range(n):
        out["create"].append(up.call("POST", "/v1/instances", {
            "name": f"lat-{i}", "image": "debian-busybox",
            "instance_type": "nano", "start": False}))
    for i in range(n):
        out["list"].append(up.call("GET", "/v1/instances"))
        out["show"].append(up.call("GET", f"/v1/instances/lat-{i}"))
    for i in range(n):
        out["delete"].append(up.call("DELETE", f"/v1/instances/lat-{i}?force=true"))
    # Deletes finish in the background; wait until every record is gone.
    deadline = time.time() + 120
    while time.time() < deadline:
        up.conn.request("GET", "/v1/instances", headers={"authorization": f"Bearer {up.token}"} if up.token else {})
        r = up.conn.getresponse()
        if json.loads(r.read() or b"[]") == []:
            return
        time.sleep(0.2)
    raise RuntimeError("deleted VMs did not go away")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="skyvisor binary without authentication")
    ap.add_argument("--new", required=True, help="skyvisor binary with authentication")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.md"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="skyvisor-api-bench-")
    cache = os.environ.get("SKYVISOR_CACHE_DIR", "/var/cache/skyvisor")
    samples = {k: {"create": [], "list": [], "show": [], "delete": []} for k in ("base", "new")}
    ups = {}
    try:
        ups["base"] = Up(args.base, 1, work, cache)
        ups["new"] = Up(args.new, 2, work, cache)
        if ups["new"].token is None:
            raise RuntimeError("the new binary wrote no bootstrap token")
        for r in range(args.rounds):
            for which in ("base", "new"):
                log(f"round {r + 1}/{args.rounds}: {which}")
                round_of(ups[which], args.n, samples[which])
    finally:
        for up in ups.values():
            up.stop()
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# API latency with authentication",
        "",
        f"`python3 bench/api/run.py --n {args.n} --rounds {args.rounds}`: "
        f"{args.rounds} rounds of {args.n} calls each, base and new alternating; "
        "`skyvisor up` (embedded store), keep-alive HTTP, nano VMs not started.",
        "",
        "| call | base p50 | new p50 | ratio | base p99 | new p99 | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for call in ("create", "list", "show", "delete"):
        b, n = samples["base"][call], samples["new"][call]
        b50, n50, b99, n99 = pct(b, 50), pct(n, 50), pct(b, 99), pct(n, 99)
        lines.append(f"| {call} | {b50:.2f} ms | {n50:.2f} ms | **{n50 / b50:.2f}x** "
                     f"| {b99:.2f} ms | {n99:.2f} ms | {n99 / b99:.2f}x |")
    lines.append("")
    lines.append("Target: at most 1.2x of the same calls without authentication.")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
