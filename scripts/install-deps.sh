#!/usr/bin/env bash
# Installs everything Skyvisor needs on Debian 12 (bookworm): QEMU 10 from
# bookworm-backports (blockdev-mirror migrations, current QMP), etcd, NBD
# tools, and the build tools for the Rust workspace. Idempotent.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (it uses apt-get)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/skyvisor-backports.list
fi

packages=(
  # VMs: QEMU and its disk tools.
  qemu-system-x86 qemu-utils
  # Host networking: bridges, taps, VXLAN, NAT.
  iproute2 nftables iptables
  # Guest image recipe: unpacking Debian packages, making the data disk.
  dpkg e2fsprogs cpio kmod
  # Cluster store.
  etcd-server etcd-client
  # Building: etcd-client needs protoc.
  protobuf-compiler pkg-config gcc
  # Volumes and benchmarks: NBD clients, fio.
  libnbd-bin fio
  # Tests and scripts.
  curl jq procps psmisc util-linux
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
qemu_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
if [ "${#missing[@]}" -gt 0 ] || [ "${qemu_major:-0}" -lt 10 ]; then
  echo "install-deps: installing ${missing[*]:-qemu 10}" >&2
  apt-get update -qq
  apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  apt-get install -y -q "${packages[@]}" >/dev/null
fi
# The etcd package may start a system etcd on the default ports; Skyvisor
# starts its own etcd where it needs one.
if command -v systemctl >/dev/null && systemctl is-enabled --quiet etcd 2>/dev/null; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo is missing; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
echo "install-deps: ok ($(qemu-system-x86_64 --version | head -1))" >&2
