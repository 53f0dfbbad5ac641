#!/usr/bin/env bash
# Benchmark of Skyvisor replicated volumes over NBD against qemu-nbd.
#
# fio's nbd engine (libnbd) drives: 4k random write QD1 (latency p50/p99),
# 4k random write QD32 (IOPS), 1 MiB sequential write (throughput), on
#   - qemu-nbd serving a plain raw file (baseline),
#   - skyvisor-volume-node with 1, 2 and 3 replicas.
# The primary (and its own replica) runs in this network namespace; every
# other replica runs in a network namespace of its own, reached over a veth
# pair, as another host would be (NETNS=0, or not running as root: all on
# loopback instead). Each replica has its own data directory on the same disk.
#
# All four targets run at once and the tests are interleaved round by round
# (each test on each target, ROUNDS times, medians reported), so load from
# elsewhere on the machine hits every target alike.
#
# Usage: [NETNS=0] [ROUNDS=3] bench/volumes/run.sh [RUNTIME_SECONDS]   (default 5)
# Needs: fio with the nbd engine, qemu-nbd, python3. Writes results to
# bench/volumes/results.md and prints them.
set -euo pipefail

RUNTIME=${1:-5}
ROUNDS=${ROUNDS:-3}
SIZE=$((1024 * 1024 * 1024))
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d /var/tmp/skyvisor-bench.XXXXXX)
PIDS=()
NETNS=${NETNS:-1}
[ "$(id -u)" = 0 ] || NETNS=0
TAG=$(( $$ % 10000 ))
NAMESPACES=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  for i in 2 3; do ip link del "vbh${i}x$TAG" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio lacks the nbd engine" >&2; exit 1; }
cargo build --release -q -p skyvisor-volume --bin skyvisor-volume-node
NODE=$CARGO_TARGET_DIR/release/skyvisor-volume-node

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_tcp() { # host:port
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; socket.create_connection(('${1%:*}', ${1#*:}), 1)" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "timeout waiting for $1" >&2; return 1
}

control() { # socket command...
  python3 - "$1" "${@:2}" <<'PY'
import socket, sys, json, time
path, cmd = sys.argv[1], " ".join(sys.argv[2:])
for _ in range(400):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path); break
    except OSError:
        time.sleep(0.05)
s.sendall((cmd + "\n").encode())
line = s.makefile().readline()
v = json.loads(line)
if "error" in v:
    sys.exit("control error: " + v["error"])
print(json.dumps(v["ok"]))
PY
}

# fio JOB_NAME URI RW BS IODEPTH -> json file
run_fio() {
  local name=$1 uri=$2 rw=$3 bs=$4 qd=$5
  # Every test starts with no dirty pages: otherwise the previous target's
  # writes, still being written back, throttle the next target's (the
  # kernel's dirty limits), and the order of the targets decides the result.
  sync
  fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --size=$SIZE --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 \
      --output-format=json --output="$WORK/$name.json" >/dev/null
}

# --- baseline: qemu-nbd on a raw file -------------------------------------
truncate -s $SIZE "$WORK/plain.img"
PORT=$(free_port)
qemu-nbd -f raw -x vol -b 127.0.0.1 -p "$PORT" -t --cache=writeback --aio=threads "$WORK/plain.img" &
PIDS+=($!); disown
wait_tcp "127.0.0.1:$PORT"
declare -A URI
URI[qemu-nbd]="nbd://127.0.0.1:$PORT/vol"

# A "host" for replica I: its own network namespace joined to this one by a
# veth pair (10.254.I.1 here, 10.254.I.2 there). Prints the namespace.
make_host_ns() {
  local i=$1 ns="svb${TAG}n$1"
  ip netns add "$ns"; NAMESPACES+=("$ns")
  ip link add "vbh${i}x$TAG" type veth peer name "vbn${i}x$TAG"
  ip link set "vbn${i}x$TAG" netns "$ns"
  ip addr add "10.254.$i.1/30" dev "vbh${i}x$TAG"
  ip link set "vbh${i}x$TAG" up
  ip netns exec "$ns" ip addr add "10.254.$i.2/30" dev "vbn${i}x$TAG"
  ip netns exec "$ns" ip link set "vbn${i}x$TAG" up
  ip netns exec "$ns" ip link set lo up
}
if [ "$NETNS" = 1 ]; then
  make_host_ns 2
  make_host_ns 3
fi

# --- certificates of a CA, for replica links over mutual TLS ---------------
TLS=$WORK/tls; mkdir -p "$TLS"
(
  cd "$TLS"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -subj /CN=bench-ca -days 2 -out ca.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem 2>/dev/null
  openssl req -new -key key.pem -subj /CN=node -out node.csr 2>/dev/null
  printf '%s\n' 'subjectAltName=IP:127.0.0.1,IP:10.254.2.2,IP:10.254.3.2' \
    'extendedKeyUsage=serverAuth,clientAuth' 'basicConstraints=CA:FALSE' \
    'keyUsage=digitalSignature' > ext
  openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile ext -out node.pem 2>/dev/null
  cat node.pem ca.pem > chain.pem
)

# --- skyvisor with 1, 2, 3 replicas; 2 replicas over TLS ---------------------
for CFG in 1 2 3 2tls; do
  N=${CFG%tls}
  TLS_ARGS=()
  [ "$CFG" != "$N" ] && TLS_ARGS=(--tls-dir "$TLS")
  D=$WORK/sky$CFG; mkdir -p "$D"
  REPLICAS=()
  for i in $(seq 1 "$N"); do
    if [ "$NETNS" = 1 ] && [ "$i" -gt 1 ]; then
      ADDR=10.254.$i.2:$(free_port)
      RUN=(ip netns exec "svb${TAG}n$i")
    else
      ADDR=127.0.0.1:$(free_port)
      RUN=()
    fi
    RUST_LOG=warn "${RUN[@]}" "$NODE" --node "n$i" --data-dir "$D/n$i" --listen "$ADDR" \
      --membership-dir "$D/membership" --control "$D/n$i.sock" "${TLS_ARGS[@]}" 2>"$D/n$i.log" &
    PIDS+=($!); disown
    wait_tcp "$ADDR"
    REPLICAS+=("n$i=$ADDR")
  done
  control "$D/n1.sock" create vol $SIZE 1 "${REPLICAS[@]}" >/dev/null
  NBD_PORT=$(free_port)
  control "$D/n1.sock" open vol "127.0.0.1:$NBD_PORT" 0 >/dev/null
  URI[sky$CFG]="nbd://127.0.0.1:$NBD_PORT/vol"
done

# --- the tests, interleaved ----------------------------------------------------
for round in $(seq 1 "$ROUNDS"); do
  for target in qemu-nbd sky1 sky2 sky2tls sky3; do
    run_fio "$target-seq-$round" "${URI[$target]}" write 1M 8
    run_fio "$target-qd1-$round" "${URI[$target]}" randwrite 4k 1
    run_fio "$target-qd32-$round" "${URI[$target]}" randwrite 4k 32
  done
done

python3 - "$WORK" "$RUNTIME" "$NETNS" "$ROUNDS" > "$HERE/results.md" <<'PY'
import json, sys, os, statistics
work, runtime, netns, rounds = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
def runs(n):
    return [json.load(open(os.path.join(work, f"{n}-{r}.json")))["jobs"][0]["write"] for r in range(1, rounds + 1)]
med = statistics.median
rows = []
base = {}
by_name = {}
for label, name in [("qemu-nbd (raw file)", "qemu-nbd"), ("skyvisor, 1 replica", "sky1"),
                    ("skyvisor, 2 replicas", "sky2"), ("skyvisor, 2 replicas, mutual TLS links", "sky2tls"),
                    ("skyvisor, 3 replicas", "sky3")]:
    qd1 = [j["clat_ns"]["percentile"] for j in runs(name + "-qd1")]
    r = dict(p50=med([p["50.000000"] for p in qd1]) / 1000, p99=med([p["99.000000"] for p in qd1]) / 1000,
             iops=med([j["iops"] for j in runs(name + "-qd32")]),
             mbs=med([j["bw_bytes"] for j in runs(name + "-seq")]) / 2**20)
    if name == "qemu-nbd":
        base = r
    rows.append((label, r))
    by_name[name] = r
where = ("the primary's own replica in its process, every other replica in its own network namespace over a veth pair"
         if netns else "replicas are separate processes on loopback")
print(f"fio nbd engine, {runtime}s per test after 1s ramp, median of {rounds} interleaved rounds, 1 GiB volume; {where}; same disk.\n")
print("| target | 4k randwrite QD1 p50 (µs) | p99 (µs) | p50 vs qemu-nbd | 4k randwrite QD32 IOPS | IOPS vs qemu-nbd | 1M seq write MiB/s | vs qemu-nbd |")
print("|---|---|---|---|---|---|---|---|")
for label, r in rows:
    print(f"| {label} | {r['p50']:.0f} | {r['p99']:.0f} | {r['p50']/base['p50']:.2f}x | {r['iops']:.0f} | {r['iops']/base['iops']:.0%} | {r['mbs']:.0f} | {r['mbs']/base['mbs']:.0%} |")
t, p = by_name["sky2tls"], by_name["sky2"]
print(f"\nWhat TLS costs on 2-replica links (TLS / plain, same run): QD1 p50 {t['p50']/p['p50']:.2f}x, "
      f"QD32 IOPS {t['iops']/p['iops']:.0%}, 1M sequential {t['mbs']/p['mbs']:.0%}.")
PY
cat "$HERE/results.md"
