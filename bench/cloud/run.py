#!/usr/bin/env python3
"""Full-OS guest benchmark (#13): the debian-12 image against raw QEMU
booting the same disk, in the same run.

It measures:
  - image build time: cold (an empty cache: every package downloaded)
    and cached (the same inputs again);
  - create -> SSH-ready: from the request until `ssh -i KEY debian@IP true`
    first succeeds, for
      * Skyvisor: `skyvisor vm create NAME --image debian-12 --key K
        --type small` (its overlay, NoCloud seed, tap, QEMU);
      * raw QEMU, by hand: `qemu-img create` an overlay on the same
        qcow2, a NoCloud seed made with `cloud-localds` (cloud-image-utils,
        installed if missing) holding the same key and a static address,
        and QEMU with the same CPU, memory and devices on a tap of the
        same bridge;
    runs alternate (raw, Skyvisor, raw, ...), one at a time;
  - memory of an idle full-OS VM: the QEMU process's RSS 30 s after SSH
    answered, for both.

Usage: bench/cloud/run.py [--repeat N] [--no-build] [--out FILE]
Needs root, qemu-system-x86_64, qemu-img, mmdebstrap, ssh. Writes
bench/cloud/results.md and prints it.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BRIDGE = "svcloud0"
SUBNET = "10.219.70"
RAW_TAP = "svcloudr0"
RAW_IP = f"{SUBNET}.250"
RAW_MAC = "52:54:00:00:c1:70"
PORT = 17890
MEMORY_MIB = 512
IDLE_SECS = 30
SSH_DEADLINE = 900


def run(args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def ssh_ok(key, ip):
    r = subprocess.run(
        ["ssh", "-q", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-i", key, f"debian@{ip}", "true"],
        capture_output=True, timeout=30)
    return r.returncode == 0


def wait_ssh(key, ip, t0):
    while time.time() - t0 < SSH_DEADLINE:
        try:
            if ssh_ok(key, ip):
                return time.time() - t0
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no SSH to {ip} after {SSH_DEADLINE}s")


def guest_uptimes(serial_log):
    """When (guest uptime, s) cloud-init's init-local stage started and when
    it finished, from the serial console: where the time went inside the
    guest."""
    import re
    try:
        text = open(serial_log, errors="replace").read()
    except OSError:
        return (float("nan"), float("nan"))
    def up(pattern):
        m = re.search(pattern + r".*?Up ([0-9.]+) seconds", text)
        return float(m.group(1)) if m else float("nan")
    return (up(r"running 'init-local'"), up(r"finished at"))


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Skyvisor:
    def __init__(self, binary, work, cache):
        self.bin = binary
        self.work = work
        self.data = os.path.join(work, "data")
        self.url = f"http://127.0.0.1:{PORT}"
        self.log = open(os.path.join(work, "up.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "up", "--data-dir", self.data, "--cache-dir", cache,
             "--listen", f"127.0.0.1:{PORT}", "--accel", "tcg", "--bridge", BRIDGE,
             "--subnet", f"{SUBNET}.0/24", "--host-name", "cloudbench"],
            stdout=self.log, stderr=self.log)
        deadline = time.time() + 900
        while time.time() < deadline:
            with open(os.path.join(work, "up.log")) as f:
                if "Skyvisor is up" in f.read():
                    return
            if self.proc.poll() is not None:
                raise RuntimeError("skyvisor up exited; see up.log")
            time.sleep(0.2)
        raise RuntimeError("skyvisor up did not start")

    def sv(self, *args):
        env = dict(os.environ, SKYVISOR_URL=self.url, SKYVISOR_DATA_DIR=self.data,
                   SKYVISOR_CONFIG=os.path.join(self.data, "cli-config.toml"))
        return run([self.bin, *args, "-o", "json"], env=env)

    def stop(self):
        for pidf in subprocess.run(["sh", "-c", f"ls {self.data}/agent/vms/*/qemu.pid 2>/dev/null"],
                                   capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(open(pidf).read().strip()), 9)
            except (OSError, ValueError):
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def timed_build(sv):
    t0 = time.time()
    sv.sv("image", "build", "debian-12")
    return time.time() - t0


def skyvisor_boot(sv, key, i):
    name = f"bench{i}"
    t0 = time.time()
    vm = json.loads(sv.sv("vm", "create", name, "--image", "debian-12", "--type", "small",
                          "--key", "bench").stdout)
    ip = vm["spec"]["network"]["ip"]
    took = wait_ssh(key, ip, t0)
    time.sleep(IDLE_SECS)
    shown = json.loads(sv.sv("vm", "show", name).stdout)
    mem = rss_mib(shown["status"]["pid"])
    vm_dir = os.path.join(sv.data, "agent", "vms", shown["spec"]["id"].replace("-", ""))
    ups = guest_uptimes(os.path.join(vm_dir, "serial.log"))
    sv.sv("vm", "delete", name, "--force")
    return took, mem, ups


def raw_boot(disk, pubkey, key, work, i):
    d = os.path.join(work, f"raw{i}")
    os.makedirs(d)
    t0 = time.time()
    overlay = os.path.join(d, "root.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk, overlay, "4G"])
    with open(os.path.join(d, "meta-data"), "w") as f:
        f.write(f"instance-id: raw-{i}-{time.time_ns()}\nlocal-hostname: raw{i}\n")
    with open(os.path.join(d, "user-data"), "w") as f:
        f.write(f"#cloud-config\nssh_authorized_keys:\n  - {pubkey}\n")
    with open(os.path.join(d, "network-config"), "w") as f:
        f.write("version: 2\nethernets:\n  eth0:\n"
                f"    match: {{macaddress: '{RAW_MAC}'}}\n    set-name: eth0\n"
                f"    addresses: [{RAW_IP}/24]\n    gateway4: {SUBNET}.1\n")
    seed = os.path.join(d, "seed.iso")
    run(["cloud-localds", "--network-config", os.path.join(d, "network-config"), seed,
         os.path.join(d, "user-data"), os.path.join(d, "meta-data")])
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-name", "guest=raw", "-nodefaults", "-no-user-config",
         "-display", "none", "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64",
         "-smp", "1", "-m", str(MEMORY_MIB), "-serial", f"file:{d}/serial.log",
         "-drive", f"file={overlay},if=virtio,format=qcow2,cache=writeback",
         "-drive", f"file={seed},media=cdrom,readonly=on",
         "-netdev", f"tap,id=n0,ifname={RAW_TAP},script=no,downscript=no",
         "-device", f"virtio-net-pci,netdev=n0,mac={RAW_MAC}",
         "-device", "virtio-rng-pci"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        took = wait_ssh(key, RAW_IP, t0)
        time.sleep(IDLE_SECS)
        mem = rss_mib(qemu.pid)
    finally:
        qemu.kill()
        qemu.wait()
    return took, mem, guest_uptimes(os.path.join(d, "serial.log"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if not shutil.which("cloud-localds"):
        print("installing cloud-image-utils (cloud-localds) for the raw baseline", file=sys.stderr)
        run(["apt-get", "install", "-y", "-q", "cloud-image-utils"])
    if not args.no_build:
        subprocess.run(["cargo", "build", "-q", "--bin", "skyvisor", "--bin", "skyvisor-guest"],
                       cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "debug", "skyvisor")
    work = tempfile.mkdtemp(prefix="cloudbench-")
    cache = os.path.join(work, "cache")
    key = os.path.join(work, "key")
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    pubkey = open(key + ".pub").read().strip()
    sv = Skyvisor(binary, work, cache)
    try:
        # The raw QEMU's tap, on Skyvisor's bridge (made by `skyvisor up`).
        subprocess.run(["ip", "link", "del", RAW_TAP], capture_output=True)
        run(["ip", "tuntap", "add", RAW_TAP, "mode", "tap"])
        run(["ip", "link", "set", RAW_TAP, "master", BRIDGE, "up"])
        cold = timed_build(sv)
        sv.sv("image", "delete", "debian-12")
        cached = timed_build(sv)
        print(f"build: cold {cold:.1f}s, cached {cached:.1f}s", file=sys.stderr)
        sv.sv("keypair", "import", "bench", "--public-key", key + ".pub")
        img = json.loads(sv.sv("image", "show", "debian-12").stdout)
        disk = os.path.join(sv.data, "images", "default", "debian-12", img["files"][0]["file_name"])
        raw, sky = [], []
        for i in range(args.repeat):
            raw.append(raw_boot(disk, pubkey, key, work, i))
            print(f"raw {i}: ssh after {raw[-1][0]:.1f}s, RSS {raw[-1][1]:.0f} MiB, guest uptime at init-local/finished {raw[-1][2]}", file=sys.stderr)
            sky.append(skyvisor_boot(sv, key, i))
            print(f"skyvisor {i}: ssh after {sky[-1][0]:.1f}s, RSS {sky[-1][1]:.0f} MiB, guest uptime at init-local/finished {sky[-1][2]}", file=sys.stderr)
    finally:
        sv.stop()
        subprocess.run(["ip", "link", "del", RAW_TAP], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    med = lambda xs: statistics.median(xs)
    raw_t, sky_t = med([r[0] for r in raw]), med([s[0] for s in sky])
    raw_m, sky_m = med([r[1] for r in raw]), med([s[1] for s in sky])
    lines = [
        "# Full-OS guest benchmark (debian-12)",
        "",
        f"`bench/cloud/run.py --repeat {args.repeat}` on {time.strftime('%Y-%m-%d')}, TCG, "
        f"{MEMORY_MIB} MiB, 1 vCPU, runs one at a time (raw, Skyvisor, ...).",
        "",
        "| | raw QEMU + cloud-localds seed | Skyvisor | Skyvisor / raw |",
        "|---|---|---|---|",
        f"| create -> SSH answers, median (s) | {raw_t:.1f} | {sky_t:.1f} | {sky_t / raw_t:.2f}x |",
        f"| each run (s) | {', '.join(f'{r[0]:.1f}' for r in raw)} | {', '.join(f'{s[0]:.1f}' for s in sky)} | |",
        f"| QEMU RSS when idle, median (MiB) | {raw_m:.0f} | {sky_m:.0f} | {sky_m / raw_m:.2f}x |",
        f"| guest uptime when cloud-init's init-local started, median (s) | {med([r[2][0] for r in raw]):.1f} | {med([s[2][0] for s in sky]):.1f} | |",
        f"| guest uptime when cloud-init finished, median (s) | {med([r[2][1] for r in raw]):.1f} | {med([s[2][1] for s in sky]):.1f} | |",
        "",
        f"Image build: cold (empty cache, every package downloaded) {cold:.1f} s; cached {cached:.1f} s.",
        "",
    ]
    text = "\n".join(lines)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
