#!/usr/bin/env bash
# Builds the Debian package of Skyvisor (target/debian/skyvisor_*.deb) with
# cargo-deb: /usr/bin/skyvisor, the guest service, systemd units for
# `skyvisor up`, `server` and `agent`, and /etc/skyvisor/skyvisor.toml.
# Prints the package's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "package: installing cargo-deb (cargo install --locked cargo-deb)" >&2
  cargo install --locked --quiet cargo-deb >&2
fi
echo "package: building (cargo build --release)" >&2
cargo build --release -q -p skyvisor -p skyvisor-guest >&2
out=$(cargo deb -p skyvisor --no-build --quiet 2>&1 | tail -n 1)
if [ ! -f "$out" ]; then
  echo "package: cargo deb did not make a package: $out" >&2
  exit 1
fi
realpath "$out"
