#!/usr/bin/env python3
"""Redundancy benchmark: how long until a 1 GiB volume has all its replicas
in sync again after one is lost, against copying the same amount of data
by hand in the same run.

Skyvisor: the 3-host test bed of bench/ha (hosts in network namespaces,
etcd, one server started with --replica-grace 1) and a 2-replica root
volume of --size-gib GiB of a VM that wrote --fill-mib MiB of random data
into it first (files PUT to the guest's service, through QEMU and the
replicated device). Each round SIGKILLs the
agent host holding the replica the VM does not use (`testbed.sh
host-kill`), and measures from the kill to the moment `GET
/v1/volumes/NAME` shows every wanted replica in sync on a new host: lease
expiry, the grace period, the leader's re-replication and the full copy.
The copy alone (new replica added to in sync) is reported too. The killed
host is then started again (its stale replica is removed) for the next
round.

Floor: the same number of bytes read from one host's replica file and
written with fsync to a file on another host (`dd`, through the namespace
boundary over a pipe), timed in the same run.

Usage: sudo bench/ha/redundancy.py [--rounds 3] [--size-gib 1] [--fill-mib 768]
                                   [--release] [--no-build]
Writes bench/ha/redundancy.md and prints it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as habench  # noqa: E402  (the HA benchmark's test-bed helpers)

log = habench.log
wait = habench.wait


def http_raw(method, url, data, timeout):
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def volume(bed, name):
    return bed.api("GET", f"/v1/volumes/{name}")


def in_sync_hosts(v):
    return sorted(r["host"] for r in v["replicas"] if r["state"] == "in-sync")


def replica_file(bed, host, volume_id):
    """The data file of `host`'s replica (see `ReplicaStore`)."""
    path = os.path.join(bed.dir, host, "agent", "replicas", "volumes",
                        volume_id.replace("-", ""), "data.img")
    return path if os.path.exists(path) else None


def floor_copy(bed, src_host, dst_host, path, size):
    """Reads `size` bytes of `path` in `src_host`'s namespace and writes
    them with fsync in `dst_host`'s: seconds."""
    ns = lambda h: f"svtb{habench.TESTBED_ID}{h}"  # noqa: E731
    out = f"/var/tmp/svredund-floor-{os.getpid()}"
    started = time.time()
    reader = subprocess.Popen(["ip", "netns", "exec", ns(src_host), "dd", f"if={path}",
                               "bs=1M", f"count={size >> 20}", "status=none"],
                              stdout=subprocess.PIPE)
    subprocess.run(["ip", "netns", "exec", ns(dst_host), "dd", f"of={out}", "bs=1M",
                    "conv=fsync", "status=none", "iflag=fullblock"],
                   stdin=reader.stdout, check=True)
    reader.wait()
    took = time.time() - started
    os.remove(out)
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=1)
    ap.add_argument("--fill-mib", type=int, default=768,
                    help="random data written into the volume through the guest first")
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    os.environ["SERVER_ARGS"] = "--replica-grace 1"
    bed, _work = habench.start_bed(8, release=args.release, build=not args.no_build,
                                   prefix="svredund-")
    size = args.size_gib << 30
    name = "filled"
    # A VM boots from a 2-replica root volume of that size and fills it.
    bed.api("POST", "/v1/instances", {"name": name, "image": "debian-busybox",
                                      "instance_type": "nano", "disk_gib": args.size_gib,
                                      "disk_replicas": 2})
    inst = wait("the VM running", 600, lambda: (lambda i: i if i["status"].get("guest_ready")
                                                 else None)(bed.instance(name)))
    vm_host = inst["spec"]["host"]
    log(f"VM {name} on {vm_host}; filling its disk through the guest")
    ip = inst["spec"]["network"]["ip"]
    disk = f"{name}-disk"
    # Fill it with incompressible data through the guest (its file system
    # on the volume): a resync sends zero regions as cheap "write zeroes",
    # so an empty volume would flatter the copy.
    # (The guest service takes bodies of up to 16 MiB.)
    chunk = 16 << 20
    chunks = args.fill_mib // 16
    for c in range(chunks):
        http_raw("PUT", f"http://{ip}/files/fill{c}", os.urandom(chunk), timeout=300)
    log(f"wrote {chunks * 16} MiB of random data into {disk}")
    v = volume(bed, disk)
    vid = v["spec"]["id"]
    rounds, copies, floors = [], [], []
    for i in range(args.rounds):
        v = volume(bed, disk)
        others = [h for h in v["spec"]["hosts"] if h != vm_host]
        if not others:
            raise RuntimeError(f"no replica away from the VM's host: {v['spec']['hosts']}")
        victim = others[0]
        src = replica_file(bed, vm_host, vid)
        spare = next(h for h in ("h1", "h2", "h3") if h not in v["spec"]["hosts"])
        if src:
            floors.append(floor_copy(bed, vm_host, spare, src, size))
            log(f"  floor: {size >> 20} MiB copied host to host in {floors[-1]:.2f} s")
        log(f"round {i + 1}: killing {victim} (replica away from the VM)")
        killed = time.time()
        bed.testbed("host-kill", victim[1:])
        added = {}

        def healed():
            vv = volume(bed, disk)
            hosts = vv["spec"]["hosts"]
            if victim not in hosts and "t" not in added:
                added["t"] = time.time()
            r = vv.get("redundancy") or {}
            return vv if victim not in hosts and r.get("in_sync") == 2 else None

        wait("redundancy restored", 1800, healed, gap=0.1)
        done = time.time()
        rounds.append(done - killed)
        copies.append(done - added.get("t", killed))
        log(f"  redundancy restored {rounds[-1]:.1f} s after the kill "
            f"(copy {copies[-1]:.1f} s)")
        bed.testbed("agent-start", victim[1:])
        wait(f"{victim} ready", 120, lambda: bed.host_ready(int(victim[1:])))
    med = statistics.median
    lines = [
        "# Redundancy benchmark",
        "",
        f"`sudo python3 bench/ha/redundancy.py --rounds {args.rounds} --size-gib {args.size_gib}`"
        f" ({'release' if args.release else 'debug'} build), "
        f"{time.strftime('%Y-%m-%d')}, this 2-core machine; lease TTL 8 s, --replica-grace 1; "
        f"the volume holds {args.fill_mib} MiB of random data.",
        "",
        "| what | n | median | min | max |",
        "|---|---|---|---|---|",
    ]
    if floors:
        lines.append(f"| floor: the replica file ({args.size_gib} GiB) read on one host, written "
                     f"with fsync on another | {len(floors)} | {med(floors):.2f} s | {min(floors):.2f} s | "
                     f"{max(floors):.2f} s |")
    lines += [
        f"| replica host killed → every wanted replica in sync again | {len(rounds)} | "
        f"{med(rounds):.1f} s | {min(rounds):.1f} s | {max(rounds):.1f} s |",
        f"| of which the copy (new replica wanted → in sync) | {len(copies)} | "
        f"{med(copies):.1f} s | {min(copies):.1f} s | {max(copies):.1f} s |",
    ]
    if floors:
        lines += ["", f"Copy / floor: **{med(copies) / med(floors):.2f}x**."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "redundancy.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
