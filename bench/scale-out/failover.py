#!/usr/bin/env python3
"""Load balancer datapath when a host dies, on the 3-host test bed.

A group of 3 busybox guests (one per host where the scheduler can) sits
behind a load balancer. A client on this machine, routed into the cluster
network through host 1 (`testbed.sh vmnet-via 1`, so host 1's agent is its
datapath, as for any client on host 1), opens a new connection every
10 ms to the balancer's address, each on its own thread, so one that hangs
on a dying member holds no other back. Each round SIGKILLs every process of
another host that runs a member (`testbed.sh host-kill`): its member dies
without a word and its agent with it, so nobody reports the member
unhealthy until the host is declared dead.

Measured from the kill, over a fixed window: failed requests (those in
flight to the dying member may fail: they hang until the client's 5 s
timeout), the longest silence the client sees (the largest gap between
two answers: the datapath's failover time), the slowest request, and the time until the group is back at 3 serving members
elsewhere. The baseline in the same run is the same client over the same
window just before the kill (its longest silence with nothing dying).

The datapath is every host's own agent (docs/scale-out.md), so a dead
host takes only its own clients with it; what a surviving host's client
sees is the cost of a backend vanishing: a connection that waits for it
up to 1 s before the next backend is tried, after which it is ejected
(tried last) until a probe of the agent's own connects to it, and out
for good once the leader drops it.

Usage: bench/scale-out/failover.py [--rounds 3] [--window 20] [--release] [--no-build]
Needs root. Writes bench/scale-out/failover-results.md and prints it.
"""

import argparse
import importlib.util
import os
import statistics
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))

_spec = importlib.util.spec_from_file_location("habench", os.path.join(ROOT, "bench", "ha", "run.py"))
ha = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ha)
log, wait = ha.log, ha.wait

VIA = 1


class Client(threading.Thread):
    """Starts a new connection to `url` every 10 ms, each on its own thread
    (a request that hangs on a dying member does not hold the next ones
    back); records (start, end, name or None) for each."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.seen = []
        self.lock = threading.Lock()
        self.workers = []

    def one(self):
        t0 = time.time()
        try:
            v = ha.http("GET", self.url, timeout=5.0)
            name = v.get("name") if isinstance(v, dict) else None
        except Exception:
            name = None
        with self.lock:
            self.seen.append((t0, time.time(), name))

    def run(self):
        next_at = time.time()
        while not self.stop.is_set():
            w = threading.Thread(target=self.one, daemon=True)
            w.start()
            self.workers.append(w)
            next_at += 0.01
            time.sleep(max(0.0, next_at - time.time()))
        for w in self.workers:
            w.join()


def window_stats(seen, start, end):
    """Failures, longest silence and slowest request of the requests started
    in [start, end)."""
    inside = sorted(r for r in seen if start <= r[0] < end)
    answers = sorted(r[1] for r in inside if r[2])
    gaps = [b - a for a, b in zip([start] + answers, answers + [end])]
    answered = [r[1] - r[0] for r in inside if r[2]]
    return {
        "requests": len(inside),
        "failed": sum(1 for r in inside if not r[2]),
        "silence_s": max(gaps) if gaps else end - start,
        "slowest_s": max(answered, default=0.0),
        "slow": sum(1 for t in answered if t > 0.1),
    }


def members(bed):
    g = bed.api("GET", "/v1/groups/web")
    return [m for m in g["members"] if not m["leaving"]], g


def serving(bed, n, away_from=None):
    """The group once it has `n` members, all healthy, none on host
    `away_from` (a dead host's member stays listed as healthy until the
    host is declared dead)."""
    ms, g = members(bed)
    if away_from is not None and any(m.get("host") == f"h{away_from}" for m in ms):
        return None
    return g if g["healthy"] == n and len(ms) == n else None


def one_round(bed, url, window):
    ms, _ = members(bed)
    victims = sorted({int(m["host"][1:]) for m in ms if m.get("host")} - {VIA})
    if not victims:
        raise RuntimeError(f"no member on a host other than h{VIA}: {ms}")
    h = victims[0]
    client = Client(url)
    client.start()
    time.sleep(window)  # the baseline window: nothing dies
    t0 = time.time()
    bed.testbed("host-kill", str(h))
    # Replaced elsewhere: watched from the kill, through the window and on.
    back, replaced_s = None, None
    while time.time() < t0 + window or back is None:
        if back is None:
            try:
                back = serving(bed, 3, away_from=h)
            except Exception:
                back = None  # the server may be busy; ask again
            if back is not None:
                replaced_s = time.time() - t0
        if time.time() > t0 + 600:
            raise RuntimeError("the group did not get back to 3 serving members in 600 s")
        if time.time() >= t0 + window:
            client.stop.set()
        time.sleep(0.5)
    client.stop.set()
    client.join()
    base = window_stats(client.seen, t0 - window, t0)
    after = window_stats(client.seen, t0, t0 + window)
    bed.testbed("agent-start", str(h))
    wait(f"h{h} ready", 180, lambda: bed.host_ready(h))
    return {"host": h, "base": base, "after": after, "replaced_s": replaced_s,
            "members": [m["name"] for m in back["members"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=20.0, help="seconds before and after each kill")
    ap.add_argument("--lease-ttl", type=int, default=8, help="agents' lease TTL (default: the product's)")
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    bed, _work = ha.start_bed(args.lease_ttl, release=args.release, build=not args.no_build,
                              prefix="svlbfail-")
    bed.testbed("vmnet-via", str(VIA))
    bed.api("POST", "/v1/groups", {
        "name": "web", "template": {"image": "debian-busybox", "instance_type": "nano"},
        "min": 1, "max": 3, "desired": 3,
        "health_check": {"protocol": "http", "port": 80, "path": "/health",
                         "interval_secs": 1, "grace_secs": 300}})
    wait("3 serving members", 900, lambda: serving(bed, 3), gap=1.0)
    lb = bed.api("POST", "/v1/load-balancers", {"name": "web-lb", "group": "web",
                                                 "listeners": [{"port": 80}], "drain_secs": 0})
    vip = lb["spec"]["address"]
    url = f"http://{vip}/identity"
    wait("3 active backends", 60,
         lambda: len(bed.api("GET", "/v1/load-balancers/web-lb")["backends"]) == 3)
    wait("the balancer answers", 60, lambda: ha.answers(vip, "/identity", 2.0))
    rounds = []
    for i in range(args.rounds):
        r = one_round(bed, url, args.window)
        log(f"round {i + 1}/{args.rounds}: killed h{r['host']}: "
            f"failed {r['after']['failed']}/{r['after']['requests']}, "
            f"longest silence {r['after']['silence_s']:.2f} s (before: {r['base']['silence_s']:.2f} s), "
            f"slowest {r['after']['slowest_s']:.2f} s ({r['after']['slow']} over 0.1 s), "
            f"back at 3 after {r['replaced_s']:.1f} s")
        rounds.append(r)

    def col(key, part):
        return [r[part][key] for r in rounds]

    def cell(values, fmt="{:.2f}"):
        return (f"{fmt.format(statistics.median(values))} "
                f"({fmt.format(min(values))}–{fmt.format(max(values))})")

    lines = [
        "# Load balancer datapath when a host dies",
        "",
        f"`sudo python3 bench/scale-out/failover.py --rounds {args.rounds} --window {args.window:g}"
        f"{' --release' if args.release else ''}` ({'release' if args.release else 'debug'} build), "
        f"{time.strftime('%Y-%m-%d')}, 3-host test bed, TCG on this 2-core machine. "
        "Median (min–max) over the rounds; each window is "
        f"{args.window:g} s of a new connection every 10 ms through the balancer from host h{VIA}.",
        "",
        "| | before the kill (baseline) | after the kill |",
        "|---|---|---|",
        f"| requests | {cell(col('requests', 'base'), '{:.0f}')} | {cell(col('requests', 'after'), '{:.0f}')} |",
        f"| failed requests | {cell(col('failed', 'base'), '{:.0f}')} | {cell(col('failed', 'after'), '{:.0f}')} |",
        f"| longest silence | {cell(col('silence_s', 'base'))} s | {cell(col('silence_s', 'after'))} s |",
        f"| slowest answered request | {cell(col('slowest_s', 'base'))} s | {cell(col('slowest_s', 'after'))} s |",
        f"| requests slower than 0.1 s | {cell(col('slow', 'base'), '{:.0f}')} | {cell(col('slow', 'after'), '{:.0f}')} |",
        "",
        f"Datapath failover (the longest a client waited for an answer after the kill): "
        f"**{statistics.median(col('slowest_s', 'after')):.2f} s** at the median, "
        f"{max(col('slowest_s', 'after')):.2f} s at worst; target under 2 s "
        "(OpenStack Octavia: 60 s heartbeat timeout before an amphora fails over).",
        f"Group back at 3 serving members on the surviving hosts: "
        f"{cell([r['replaced_s'] for r in rounds], '{:.1f}')} s after the kill.",
        "",
        "Per round: " + "; ".join(
            f"h{r['host']} killed, {r['after']['failed']} failed, slowest {r['after']['slowest_s']:.2f} s"
            for r in rounds),
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(HERE, "failover-results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
