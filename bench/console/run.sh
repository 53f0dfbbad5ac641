#!/bin/sh
# Web console benchmark: builds the control-plane benchmark (which embeds the
# web console), then drives a headless Chromium against it.
#   bench/console/run.sh [--rounds 5] [--warmup 1] [--hosts 40] [--vms 1000] [--idle 10]
# Writes every round to $OUT (default /tmp/skyvisor-console-bench.json) and
# prints the summary table on stdout.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ ! -d ui/node_modules/playwright-core ]; then (cd ui && npm ci); fi
cargo build --release -p skyvisor-bench
echo "nproc: $(nproc); uptime: $(uptime)" >&2
exec node bench/console/run.mjs --bin target/release/cluster-scale --out "${OUT:-/tmp/skyvisor-console-bench.json}" "$@"
