#!/usr/bin/env bash
# Event write throughput, store space per 1,000 events, and the time to
# compute a month's invoice for a project of 1,000 VMs (simulated records).
#   bench/metering/run.sh [EVENTS]   (default 20000)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo run --release -q -p skyvisor-control --example events_scale -- "${1:-20000}"
