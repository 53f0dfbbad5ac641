#!/usr/bin/env bash
# Installs everything Skyvisor needs on Debian 12 (bookworm): QEMU 10 from
# bookworm-backports (blockdev-mirror migrations, current QMP), etcd, NBD
# tools, and the build tools for the Rust workspace. Idempotent: a machine
# that has it all is left alone and no package list is fetched.
#
# Every probe of something that may not be installed yet is written so that
# a missing command is an answer ("not there"), never an exit under
# `set -e`/`pipefail`.
set -euo pipefail

say() { echo "install-deps: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "run as root (it uses apt-get)"
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
backports_list=/etc/apt/sources.list.d/skyvisor-backports.list
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The same Debian mirror the machine already uses for bookworm (only the
  # files apt reads: *.list and *.sources).
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ' || true)
  echo "deb ${mirror:-http://deb.debian.org/debian} bookworm-backports main" > "$backports_list"
fi

packages=(
  # VMs: QEMU and its disk tools.
  qemu-system-x86 qemu-utils
  # Host networking: bridges, taps, VXLAN, NAT.
  iproute2 nftables iptables
  # Guest image recipes: unpacking Debian packages, making the data disk;
  # mmdebstrap bootstraps the full-OS image (debian-12).
  dpkg e2fsprogs cpio kmod mmdebstrap
  # Containers: the OCI runtime (the agent writes each container's
  # runtime configuration and runs it with crun).
  crun
  # Cluster store.
  etcd-server etcd-client
  # Building: etcd-client needs protoc.
  protobuf-compiler pkg-config gcc
  # Volumes and benchmarks: NBD clients, fio.
  libnbd-bin fio
  # `skyvisor vm ssh` and the full-OS guest tests log in with ssh.
  openssh-client
  # Tests and scripts (shellcheck checks the scripts themselves; the API
  # fuzzer lives in a Python venv).
  curl jq procps psmisc util-linux shellcheck python3-venv
  # Metrics: the real Prometheus (and promtool) the metrics are tested
  # with and documented for. Without its recommends: no node exporter.
  prometheus
  # The web console's end-to-end tests drive a real headless Chromium.
  chromium
)
# The web console is bundled with Node.js and npm at build time (its
# packages come from the npm registry, locked by ui/package-lock.json).
# A machine with its own Node.js (e.g. NodeSource's, which includes npm)
# keeps it: Debian's npm would conflict with it.
if ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

# QEMU's major version, or 0 when QEMU is not installed yet.
qemu_major() {
  local v=""
  if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n 1 || true)
  fi
  echo "${v:-0}"
}

if [ "${#missing[@]}" -gt 0 ] || [ "$(qemu_major)" -lt 10 ]; then
  say "installing ${missing[*]:-QEMU 10}"
  say "step: apt-get update (needs the Debian package mirror)"
  if ! apt-get update -qq; then
    say "cannot reach the Debian package mirror (apt-get update failed); nothing was installed. Check the network or /etc/apt/sources.list and run again."
    exit 1
  fi
  say "step: QEMU 10 from bookworm-backports"
  if ! apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null; then
    say "installing QEMU from bookworm-backports failed (see apt's message above)"
    exit 1
  fi
  say "step: the other packages"
  # Packages must not start their daemons (a system etcd or Prometheus):
  # Skyvisor and its tests start their own. Only while installing.
  started_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    started_policy=yes
  fi
  installed=0
  apt-get install -y -q --no-install-recommends prometheus >/dev/null || installed=1
  if [ "$installed" -eq 0 ]; then
    apt-get install -y -q "${packages[@]}" >/dev/null || installed=1
  fi
  if [ -n "$started_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
  fi
  if [ "$installed" -ne 0 ]; then
    say "installing packages failed (see apt's message above)"
    exit 1
  fi
fi
if [ "$(qemu_major)" -lt 10 ]; then
  say "QEMU 10 or newer is needed; found: $(qemu-system-x86_64 --version 2>/dev/null | head -n 1 || echo none)"
  exit 1
fi

# The etcd and prometheus packages may start system daemons on their
# default ports; Skyvisor starts its own where it needs them.
for unit in etcd prometheus; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet "$unit" 2>/dev/null; then
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  fi
done

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo is missing; install a Rust toolchain (rustup) first"
  exit 1
fi
say "ok ($(qemu-system-x86_64 --version | head -n 1))"
