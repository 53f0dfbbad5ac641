#!/usr/bin/env bash
# A multi-host Skyvisor cluster on one machine: every "host" is a network
# namespace with its own address on a shared bridge (veth pairs), running
# its own `skyvisor agent` and QEMUs; etcd and the servers run in the root
# namespace on the bridge's address. Hosts can be killed (SIGKILL of the
# agent and its QEMUs), cut off (link down) and brought back.
#
# Usage: scripts/testbed.sh COMMAND [ARGS]    (as root)
#
#   up N [SERVERS]     network for N hosts, etcd, SERVERS servers (default 1)
#                      and one agent per host; waits until all hosts are ready
#   down               stop everything; remove namespaces, links and files
#   status             processes and `skyvisor host list`
#   env                print the variables to use the cluster from a shell
#   net-up N           only the network (namespaces, veths, bridge, route)
#   etcd-start | etcd-stop
#   server-start I | server-kill I | server-stop I
#   agent-start H | agent-kill H | agent-stop H
#   host-kill H        SIGKILL host H's agent and QEMUs (a crash of the host)
#   host-cut H         take host H's link down (it keeps running, unreachable)
#   host-restore H     bring host H's link up and start its agent if it is down
#   vmnet-via H        route this machine's traffic to the VM network through host H
#   exec H CMD...      run CMD inside host H's namespace
#
# Environment:
#   TESTBED_ID     1..200 (default 1): names, subnets and the state directory
#   TESTBED_DIR    state, logs and data (default /tmp/svtb-$TESTBED_ID)
#   SKYVISOR       the skyvisor binary (default: target/{release,debug}/skyvisor)
#   TESTBED_CACHE  servers' package/image build cache (default: $TESTBED_DIR/cache)
#   ACCEL          agents' accelerator: auto, kvm or tcg (default tcg)
#   LEASE_TTL      lease TTL of agents and servers in seconds (default 10)
#   ETCD_BIN       the etcd binary (default: etcd)
#   SERVER_ARGS    extra arguments of every `skyvisor server` (e.g. --weigher pack)
#   AGENT_ARGS     extra arguments of every `skyvisor agent`
#   TLS            1: servers serve their API over TLS (skyvisor's default;
#                  agents and curl trust s1's cluster-ca.pem); else (the
#                  default here) --plain-http, for simple test clients
#
# Layout for TESTBED_ID=n: hosts h1..hN in namespaces svtbnh1.., underlay
# 10.216.n.0/24 on bridge svtbnbr (root: .1, host H: .10+H), VM subnet
# 10.217.n.0/24 (routed from the root namespace through h1), etcd at
# 10.216.n.1:2379, server I at 10.216.n.1:(7779+I).
set -euo pipefail

ID=${TESTBED_ID:-1}
if ! [[ $ID =~ ^[0-9]+$ ]] || ((ID < 1 || ID > 200)); then
  echo "TESTBED_ID must be 1..200" >&2
  exit 2
fi
DIR=${TESTBED_DIR:-/tmp/svtb-$ID}
CACHE=${TESTBED_CACHE:-$DIR/cache}
ACCEL=${ACCEL:-tcg}
LEASE_TTL=${LEASE_TTL:-10}
ETCD_BIN=${ETCD_BIN:-etcd}
BR=svtb${ID}br
NET=10.216.$ID
VMNET=10.217.$ID.0/24
ROOT_IP=$NET.1
ETCD_URL=http://$ROOT_IP:2379
TLS=${TLS:-0}

skyvisor_bin() {
  if [[ -n ${SKYVISOR:-} ]]; then echo "$SKYVISOR"; return; fi
  local here
  here=$(cd "$(dirname "$0")/.." && pwd)
  for b in "$here/target/release/skyvisor" "$here/target/debug/skyvisor"; do
    [[ -x $b ]] && { echo "$b"; return; }
  done
  command -v skyvisor || { echo "no skyvisor binary: build it or set SKYVISOR" >&2; exit 1; }
}

ns() { echo "svtb${ID}h$1"; }
veth() { echo "svtb${ID}v$1"; }
host_ip() { echo "$NET.$((10 + $1))"; }
server_url() {
  if [[ $TLS == 1 ]]; then echo "https://$ROOT_IP:$((7779 + $1))"; else echo "http://$ROOT_IP:$((7779 + $1))"; fi
}
# The cluster CA (every server writes it to its data directory).
ca_file() { echo "$DIR/s1/cluster-ca.pem"; }
# curl, trusting the cluster CA when the servers serve TLS.
api_curl() {
  if [[ $TLS == 1 ]]; then curl --cacert "$(ca_file)" "$@"; else curl "$@"; fi
}
hosts() { cat "$DIR/hosts" 2>/dev/null || echo 0; }
servers() { cat "$DIR/servers" 2>/dev/null || echo 0; }
server_urls() {
  local urls="" i
  for ((i = 1; i <= $(servers); i++)); do urls+="${urls:+,}$(server_url "$i")"; done
  echo "$urls"
}

need_root() {
  [[ $(id -u) == 0 ]] || { echo "the test bed needs root (namespaces, bridges)" >&2; exit 1; }
}

# Starts a daemon in the background, its pid in $DIR/NAME.pid, log in NAME.log.
spawn() {
  local name=$1
  shift
  mkdir -p "$DIR"
  (exec "$@") >>"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

running() {
  local pid
  pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null
}

stop() {
  local name=$1 signal=${2:-TERM} pid
  pid=$(cat "$DIR/$name.pid" 2>/dev/null) || return 0
  kill "-$signal" "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$DIR/$name.pid"
}

# Polls CMD until it succeeds or SECONDS pass.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  for _ in $(seq 1 $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "timed out after ${seconds}s waiting for $what" >&2
  return 1
}

net_up() {
  local n=$1 h
  mkdir -p "$DIR"
  echo "$n" >"$DIR/hosts"
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
  ip addr replace "$ROOT_IP/24" dev "$BR"
  ip link set "$BR" up
  for ((h = 1; h <= n; h++)); do
    if ! ip netns list | grep -qw "$(ns "$h")"; then
      ip netns add "$(ns "$h")"
    fi
    if ! ip link show "$(veth "$h")" >/dev/null 2>&1; then
      ip link add "$(veth "$h")" type veth peer name eth0 netns "$(ns "$h")"
    fi
    ip link set "$(veth "$h")" master "$BR" up
    ip -n "$(ns "$h")" link set lo up
    ip -n "$(ns "$h")" addr replace "$(host_ip "$h")/24" dev eth0
    ip -n "$(ns "$h")" link set eth0 up
    ip -n "$(ns "$h")" route replace default via "$ROOT_IP"
  done
  # The VM subnet is reached through h1; h1 answers from its own address on
  # the VM network, so replies come back through it whatever host a VM is on.
  ip route replace "$VMNET" via "$(host_ip 1)"
}

etcd_start() {
  running etcd && return 0
  mkdir -p "$DIR/etcd"
  spawn etcd "$ETCD_BIN" --name "tb$ID" --data-dir "$DIR/etcd" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://$ROOT_IP:2380" --initial-advertise-peer-urls "http://$ROOT_IP:2380" \
    --initial-cluster "tb$ID=http://$ROOT_IP:2380" --initial-cluster-state new \
    --heartbeat-interval 50 --election-timeout 500 --log-level warn
  wait_for "etcd at $ETCD_URL" 30 curl -fsS "$ETCD_URL/health"
}

server_start() {
  local i=$1
  running "server$i" && return 0
  mkdir -p "$CACHE"
  local extra=()
  read -ra extra <<<"${SERVER_ARGS:-}"
  [[ $TLS == 1 ]] || extra+=(--plain-http)
  spawn "server$i" "$(skyvisor_bin)" server --etcd "$ETCD_URL" --name "s$i" \
    --listen "$ROOT_IP:$((7779 + i))" --data-dir "$DIR/s$i" --cache-dir "$CACHE" \
    --subnet "$VMNET" --lease-ttl "$LEASE_TTL" --bootstrap-token-file "$(token_file)" "${extra[@]}"
  (( i > $(servers) )) && echo "$i" >"$DIR/servers"
  if [[ $TLS == 1 ]]; then
    wait_for "server s$i" 60 curl -fsS --cacert "$DIR/s$i/cluster-ca.pem" "$(server_url "$i")/healthz"
  else
    wait_for "server s$i" 60 curl -fsS "$(server_url "$i")/healthz"
  fi
}

agent_start() {
  local h=$1
  running "agent$h" && return 0
  local extra=()
  read -ra extra <<<"${AGENT_ARGS:-}"
  local ca=()
  [[ $TLS == 1 ]] && ca=(env "SKYVISOR_CA_FILE=$(ca_file)")
  SKYVISOR_JOIN_TOKEN=$(cat "$(token_file)") spawn "agent$h" "${ca[@]}" ip netns exec "$(ns "$h")" "$(skyvisor_bin)" agent \
    --server "$(server_urls)" --host-name "h$h" --address "$(host_ip "$h")" \
    --data-dir "$DIR/h$h" --accel "$ACCEL" --lease-ttl "$LEASE_TTL" --guest-test-hooks "${extra[@]}"
}

host_ready() {
  api_curl -fsS -H "Authorization: Bearer $(cat "$(token_file)")" "$(server_url 1)/v1/hosts/h$1" |
    grep -q '"state":"ready"'
}

# The bootstrap admin token every server of the bed shares (written by the
# first server to start); the tests, benches and agents use it.
token_file() {
  echo "$DIR/admin.token"
}

host_kill() {
  local h=$1 pids f
  rm -f "$DIR/agent$h.pid"
  pids=$(ip netns pids "$(ns "$h")" 2>/dev/null || true)
  [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
  # Its containers live in namespaces of their own: their inits (each
  # container's processes die with it).
  for f in "$DIR/h$h"/agent/vms/*/container.pid; do
    if [[ -f $f ]]; then kill -9 "$(cat "$f")" 2>/dev/null || true; fi
  done
}

down() {
  local h i n
  n=$(hosts)
  for ((h = 1; h <= n; h++)); do host_kill "$h"; done
  for ((i = 1; i <= $(servers); i++)); do stop "server$i" KILL; done
  stop etcd KILL
  for ((h = 1; h <= n; h++)); do
    ip netns del "$(ns "$h")" 2>/dev/null || true
    ip link del "$(veth "$h")" 2>/dev/null || true
  done
  ip route del "$VMNET" 2>/dev/null || true
  ip link del "$BR" 2>/dev/null || true
  # Containers' roots (overlays) left mounted by killed hosts.
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$DIR/" 'index($2, d) == 1 && $2 ~ /\/rootfs$/ { print $2 }' /proc/mounts)
  # And their cgroups, which their killed runtimes could not remove.
  for m in "$DIR"/h*/agent/vms/*; do
    [[ -d $m ]] || continue
    for cg in /sys/fs/cgroup/*/skyvisor/"sv-${m##*/}" /sys/fs/cgroup/skyvisor/"sv-${m##*/}"; do
      if [[ -d $cg ]]; then rmdir "$cg" 2>/dev/null || true; fi
    done
  done
  rm -rf "$DIR"
}

cmd=${1:-}
shift || true
case $cmd in
  up)
    need_root
    n=${1:?usage: up N [SERVERS]}
    s=${2:-1}
    net_up "$n"
    etcd_start
    echo "$s" >"$DIR/servers"
    for ((i = 1; i <= s; i++)); do server_start "$i"; done
    for ((h = 1; h <= n; h++)); do agent_start "$h"; done
    for ((h = 1; h <= n; h++)); do wait_for "host h$h ready" 600 host_ready "$h"; done
    echo "Test bed $ID: $n hosts, $s server(s). Use it with:" >&2
    echo "  export SKYVISOR_URL=$(server_url 1)" >&2
    ;;
  down) need_root; down ;;
  status)
    for f in "$DIR"/*.pid; do
      [[ -e $f ]] || continue
      name=$(basename "$f" .pid)
      if running "$name"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: stopped"; fi
    done
    SKYVISOR_URL=$(server_url 1) "$(skyvisor_bin)" host list || true
    ;;
  env) echo "export SKYVISOR_URL=$(server_url 1)" ;;
  net-up) need_root; net_up "${1:?usage: net-up N}" ;;
  etcd-start) need_root; etcd_start ;;
  etcd-stop) stop etcd KILL ;;
  server-start) server_start "${1:?usage: server-start I}" ;;
  server-kill) stop "server${1:?usage: server-kill I}" KILL ;;
  server-stop) stop "server${1:?usage: server-stop I}" TERM ;;
  agent-start) need_root; agent_start "${1:?usage: agent-start H}" ;;
  agent-kill) stop "agent${1:?usage: agent-kill H}" KILL ;;
  agent-stop) stop "agent${1:?usage: agent-stop H}" TERM ;;
  host-kill) need_root; host_kill "${1:?usage: host-kill H}" ;;
  host-cut) need_root; ip link set "$(veth "${1:?usage: host-cut H}")" down ;;
  vmnet-via) need_root; ip route replace "$VMNET" via "$(host_ip "${1:?usage: vmnet-via H}")" ;;
  host-restore)
    need_root
    h=${1:?usage: host-restore H}
    ip link set "$(veth "$h")" up
    agent_start "$h"
    ;;
  exec)
    need_root
    h=${1:?usage: exec H CMD...}
    shift
    exec ip netns exec "$(ns "$h")" "$@"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
