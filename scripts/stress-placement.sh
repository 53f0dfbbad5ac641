#!/usr/bin/env bash
# Runs the two-servers-one-etcd placement test many times, several at once,
# to catch rare races (over-booking, creates that give up). The suite runs
# it once; this is the long run a stop's note reports.
#
#   scripts/stress-placement.sh [RUNS_PER_WORKER] [WORKERS]   (default 200 4)
set -euo pipefail
runs=${1:-200}
workers=${2:-4}
cd "$(dirname "$0")/.."
cargo test -p skyvisor-control --test cluster --no-run 2>/dev/null
bin=$(cargo test -p skyvisor-control --test cluster --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="cluster" and m.get("executable"): print(m["executable"])')
logs=$(mktemp -d)
start=$(date +%s)
for w in $(seq 1 "$workers"); do
    (
        for i in $(seq 1 "$runs"); do
            if "$bin" --exact two_servers_never_double_book_a_host_etcd >"$logs/$w-$i.log" 2>&1; then
                rm "$logs/$w-$i.log"
            fi
        done
    ) &
done
wait
failed=$(find "$logs" -name '*.log' | wc -l)
total=$((runs * workers))
echo "placement stress: $((total - failed)) of $total runs passed in $(($(date +%s) - start)) s ($workers at once)"
if [ "$failed" -gt 0 ]; then
    echo "failed runs' logs: $logs"
    grep -h "panicked" -A2 "$logs"/*.log | head -30
    exit 1
fi
rm -r "$logs"
