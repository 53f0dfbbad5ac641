#!/usr/bin/env python3
"""Randomized HA trials: faults on random hosts while a client increments
the protected VM's disk counter throughout; checks that no acknowledged
increment is ever lost and that no moment has two live QEMUs of the VM.

Each trial picks a fault — kill (SIGKILL of every process of a host), cut
(its link down) or hang (SIGSTOP of its agent) — and a host (the VM's own
two times in three, another one otherwise), applies it, waits until the
VM's service answers again with every acknowledged increment, heals the
fault (agent restarted, link up, SIGCONT) and waits until every host is
ready and the VM's volume healthy. A sampler looks at every process of the
machine every 50 ms and counts the live QEMUs of the VM.

Usage: bench/ha/trials.py [--trials 30] [--seed N] [--lease-ttl 3] [--no-build]
Needs root. Prints the trial log and writes bench/ha/trials.md.
"""

import argparse
import os
import random
import shutil
import signal
import sys
import threading
import time

os.environ.setdefault("HABENCH_TESTBED_ID", "62")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as habench  # noqa: E402  (the HA benchmark's test-bed helpers)

HERE = habench.HERE
ROOT = habench.ROOT


class Client(threading.Thread):
    """Increments the counter as fast as it answers; keeps the highest
    acknowledged value."""

    def __init__(self, ip):
        super().__init__(daemon=True)
        self.ip = ip
        self.acked = 0
        self.errors = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                v = habench.http("POST", f"http://{self.ip}/counter/increment", timeout=2.0)["value"]
                self.acked = max(self.acked, v)
            except Exception:
                self.errors += 1
                time.sleep(0.05)


class Sampler(threading.Thread):
    """Counts the live QEMUs of the VM every 50 ms; remembers the worst."""

    def __init__(self, vm_id):
        super().__init__(daemon=True)
        self.vm_id = vm_id.replace("-", "").encode()
        self.max_seen = 0
        self.violations = []
        self.stop = threading.Event()

    def count(self):
        n = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"qemu-system" in cmd.split(b"\0")[0] and self.vm_id in cmd and state not in ("Z", "X"):
                n += 1
        return n

    def run(self):
        while not self.stop.is_set():
            n = self.count()
            self.max_seen = max(self.max_seen, n)
            if n > 1:
                self.violations.append((time.strftime("%H:%M:%S"), n))
            time.sleep(0.05)


def agent_pid(bed, h):
    with open(os.path.join(bed.dir, f"agent{h}.pid")) as f:
        return int(f.read().strip())


def trial(bed, rng, ip, client):
    vm_host = int(bed.instance("t")["spec"]["host"][1:])
    others = [h for h in (1, 2, 3) if h != vm_host]
    target = vm_host if rng.random() < 2 / 3 else rng.choice(others)
    fault = rng.choice(["kill", "cut", "hang"])
    via = next(h for h in (1, 2, 3) if h != target)
    bed.testbed("vmnet-via", str(via))
    before = client.acked
    t0 = time.time()
    if fault == "kill":
        bed.testbed("host-kill", str(target))
    elif fault == "cut":
        bed.testbed("host-cut", str(target))
    else:
        pid = agent_pid(bed, target)
        os.kill(pid, signal.SIGSTOP)
    # The service answers again, with every increment acknowledged so far.
    habench.wait("the VM answering with its counter", 300,
                 lambda: (lambda c: c is not None and c["value"] >= before)(
                     habench.answers(ip, "/counter", 1.0)), gap=0.1)
    back = time.time() - t0
    # Hold the fault past twice the lease TTL, so the faulty host's lease
    # expires whether or not the VM was on it.
    held = 2 * bed.lease_ttl + 1
    while time.time() - t0 < held:
        time.sleep(0.2)
    moved_to = int(bed.instance("t")["spec"]["host"][1:])
    if fault == "kill":
        bed.testbed("agent-start", str(target))
    elif fault == "cut":
        bed.testbed("host-restore", str(target))
    else:
        os.kill(pid, signal.SIGCONT)
    for h in (1, 2, 3):
        habench.wait(f"h{h} ready", 120, lambda h=h: bed.host_ready(h))
    habench.wait("the volume healthy", 600,
                 lambda: bed.api("GET", "/v1/volumes/t-disk").get("health") == "healthy")
    # Every increment acknowledged before this read must be in it.
    acked = client.acked
    final = habench.wait("the counter", 120,
                         lambda: habench.answers(ip, "/counter", 2.0))["value"]
    return {"fault": fault, "target": target, "vm_host": vm_host, "moved_to": moved_to,
            "answers_after_s": back, "acked_before": before, "acked_now": acked,
            "counter": final, "lost": max(0, acked - final)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--lease-ttl", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    bed, _ = habench.start_bed(args.lease_ttl, build=not args.no_build, prefix="svhatrials-")
    bed.api("POST", "/v1/instances", {"name": "t", "image": "debian-busybox",
                                      "instance_type": "nano", "disk_replicas": 2})
    inst = habench.wait("the VM", 300, lambda: (lambda v: v if v["status"].get("guest_ready") else None)(
        bed.instance("t")))
    ip = inst["spec"]["network"]["ip"]
    client = Client(ip)
    sampler = Sampler(inst["spec"]["id"])
    client.start()
    sampler.start()
    log_lines = []
    results = []
    for i in range(args.trials):
        try:
            r = trial(bed, rng, ip, client)
        except Exception as e:
            import traceback
            r = {"error": f"{type(e).__name__}: {e} at "
                          f"{traceback.extract_tb(e.__traceback__)[-1].lineno}"}
            keep = "/var/tmp/svhatrials-logs"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(bed.dir, keep, ignore=shutil.ignore_patterns("*.sock", "etcd", "*.img", "*.qcow2", "images", "image-cache", "data*"),
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
            r["error"] += f" (test bed logs kept in {keep})"
        results.append(r)
        if "error" in r:
            line = f"trial {i + 1:2}: ERROR {r['error']}"
        else:
            line = (f"trial {i + 1:2}: {r['fault']:4} h{r['target']} (VM on h{r['vm_host']}) -> "
                    f"answers after {r['answers_after_s']:5.1f} s on h{r['moved_to']}; "
                    f"acked {r['acked_now']}, counter {r['counter']}, lost {r['lost']}")
        habench.log(line)
        log_lines.append(line)
        if "error" in r:
            break
    client.stop.set()
    sampler.stop.set()
    ok = [r for r in results if "error" not in r]
    lost = sum(r["lost"] for r in ok)
    text = "\n".join([
        "# Randomized HA trials",
        "",
        f"`sudo python3 bench/ha/trials.py --trials {args.trials} --seed {args.seed} "
        f"--lease-ttl {args.lease_ttl}`, {time.strftime('%Y-%m-%d')}, TCG, 3 hosts.",
        "",
        f"- trials completed: {len(ok)} of {args.trials}",
        f"- acknowledged increments lost: **{lost}** (the client's highest acknowledged value "
        f"{client.acked}; failed requests while the VM was down: {client.errors})",
        f"- samples with two or more live QEMUs of the VM: **{len(sampler.violations)}** "
        f"(most seen at once: {sampler.max_seen})",
        "",
        "```",
        *log_lines,
        "```",
        "",
    ])
    with open(os.path.join(HERE, "trials.md"), "w") as f:
        f.write(text)
    print(text)
    if lost or sampler.violations or len(ok) < args.trials:
        sys.exit(1)


if __name__ == "__main__":
    main()
