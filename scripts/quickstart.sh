#!/usr/bin/env bash
# Quick start: installs what is needed, builds Skyvisor, starts an
# all-in-one host (`skyvisor up`) in the background, creates a demo VM and
# prints the URL of its web service.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
echo "==> building (cargo build --release)" >&2
cargo build --release --workspace --bins -q

sv=./target/release/skyvisor
data_dir=${SKYVISOR_DATA_DIR:-/var/lib/skyvisor}
log=/var/log/skyvisor-up.log
export SKYVISOR_URL=${SKYVISOR_URL:-http://127.0.0.1:7780}

if ! "$sv" info >/dev/null 2>&1; then
  echo "==> starting skyvisor up (data: $data_dir, log: $log)" >&2
  nohup "$sv" up --data-dir "$data_dir" >"$log" 2>&1 &
  up_pid=$!
  # Wait for the host to be ready (the first start builds the guest image).
  for _ in $(seq 1 600); do
    if grep -q "Skyvisor is up" "$log" 2>/dev/null; then break; fi
    if ! kill -0 "$up_pid" 2>/dev/null; then
      echo "skyvisor up exited:" >&2; tail -20 "$log" >&2; exit 1
    fi
    sleep 0.5
  done
  grep -E "image:|Accelerator|Skyvisor is up" "$log" >&2 || true
fi

"$sv" host show
if ! "$sv" vm show demo >/dev/null 2>&1; then
  echo "==> creating VM demo" >&2
  "$sv" vm create demo --type micro --restart always --wait
fi
ip=$("$sv" vm show demo -o json | jq -r .spec.network.ip)
echo "==> the demo VM's web service answers:" >&2
curl -fsS --max-time 10 "http://$ip/"
echo
echo "Demo VM: http://$ip/  (try: $sv vm list; $sv vm console demo; curl http://$ip/identity)"
