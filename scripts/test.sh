#!/usr/bin/env bash
# Runs the whole test suite: unit tests, store conformance against etcd,
# and integration tests that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --workspace --bins -q
exec cargo nextest run --workspace --profile ci "$@"
