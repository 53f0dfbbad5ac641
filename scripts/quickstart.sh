#!/usr/bin/env bash
# Quick start: installs what is needed, builds Skyvisor, starts an
# all-in-one host (`skyvisor up`) in the background, creates a demo VM and
# prints the URL of its web service. Idempotent: a second run reuses the
# running host and the demo VM.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "==> $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "quickstart: run as root (it installs packages, and Skyvisor makes bridges and taps)" >&2
  exit 1
fi

step "installing dependencies (scripts/install-deps.sh)"
./scripts/install-deps.sh
step "building Skyvisor (cargo build --release; the first build takes a few minutes)"
cargo build --release --workspace --bins -q

sv=./target/release/skyvisor
data_dir=${SKYVISOR_DATA_DIR:-/var/lib/skyvisor}
# The CLI finds the bootstrap admin token `skyvisor up` writes there.
export SKYVISOR_DATA_DIR=$data_dir
log=/var/log/skyvisor-up.log
export SKYVISOR_URL=${SKYVISOR_URL:-http://127.0.0.1:7780}

up_pid=""
if "$sv" info >/dev/null 2>&1; then
  step "skyvisor up is already running at $SKYVISOR_URL; reusing it"
else
  step "starting skyvisor up in the background (data: $data_dir, log: $log)"
  NO_COLOR=1 nohup "$sv" up --data-dir "$data_dir" >"$log" 2>&1 &
  up_pid=$!
fi

# Runs a client command; stops with the log's tail if `skyvisor up` (started
# above) exits meanwhile.
while_up_runs() {
  "$@" &
  local cmd=$!
  while kill -0 "$cmd" 2>/dev/null; do
    if [ -n "$up_pid" ] && ! kill -0 "$up_pid" 2>/dev/null; then
      kill "$cmd" 2>/dev/null || true
      echo "quickstart: skyvisor up exited; the end of $log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
    sleep 1
  done
  wait "$cmd"
}

demo_phase=$("$sv" vm show demo -o json 2>/dev/null | jq -r '.status.phase // empty' || true)
case "$demo_phase" in
  "")
    step "creating the VM demo (waits for the guest image, built from Debian packages on the first start, and the host)"
    while_up_runs "$sv" vm create demo --type micro --restart always --wait --timeout 1200
    ;;
  running)
    step "the VM demo exists and runs; reusing it"
    while_up_runs "$sv" vm start demo --wait >/dev/null
    ;;
  *)
    step "the VM demo exists ($demo_phase); starting it"
    while_up_runs "$sv" vm start demo --wait
    ;;
esac

"$sv" host show
ip=$("$sv" vm show demo -o json | jq -r .spec.network.ip)
step "the demo VM's web service answers:"
curl -fsS --max-time 10 "http://$ip/"
echo
echo "Demo VM: http://$ip/  (try: $sv vm list; $sv vm console demo; curl http://$ip/identity)"
if ! curl -fsS "$SKYVISOR_URL/ui/" | grep -q '<title>Skyvisor</title>'; then
  step "the web console does not answer at $SKYVISOR_URL/ui/"
  exit 1
fi
echo "Web console: $SKYVISOR_URL/ui/  (sign in with the token in $data_dir/admin.token)"
