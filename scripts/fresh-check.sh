#!/usr/bin/env bash
# Proves the README's two commands on a fresh machine of this project's kind:
# builds (once, then cached) a clean Debian 12 root with debootstrap from the
# machine's own Debian mirror, holding only what a new machine ships
# (ca-certificates curl e2fsprogs gcc git iproute2 jq procps psmisc python3
# qemu-utils util-linux, plus the Rust toolchain and nextest bound in from this
# machine), clones the repository's committed HEAD into a throwaway copy of it
# and runs, inside it (its own mount namespace, pivoted into it):
#   1. ./scripts/quickstart.sh  (the demo VM's page must answer)
#   2. ./scripts/test.sh -E FILTER  (a named part of the suite; --full: all)
#   3. the Debian package: scripts/package.sh, installed with apt, then
#      `skyvisor --version`, `systemd-analyze verify` of its units, and
#      `skyvisor up` started the way its unit starts it.
# Cleans up every process and mount it started and prints what passed.
#
# Usage: scripts/fresh-check.sh [--full | --filter EXPR] [--skip-tests]
#        [--skip-package] [--keep]
# The VM network of the quick start (bridge svbr0, port 7780) is the host's:
# stop any `skyvisor up` on this machine first.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

filter='package(skyvisor-qemu) | package(skyvisor-image) | (binary(system) & test(/^(lifecycle|images|contract)::/))'
run_tests=1
run_package=1
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --full) filter="" ;;
    --filter) filter="$2"; shift ;;
    --skip-tests) run_tests=0 ;;
    --skip-package) run_package=0 ;;
    --keep) keep=1 ;;
    *) echo "fresh-check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "fresh-check: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "run as root (debootstrap, chroot, mounts)"
  exit 1
fi
if curl -fs --max-time 2 http://127.0.0.1:7780/healthz >/dev/null 2>&1; then
  say "a Skyvisor API already answers on 127.0.0.1:7780; stop it first (the clean root's quick start uses that port)"
  exit 1
fi
if ! git diff --quiet HEAD 2>/dev/null; then
  say "note: uncommitted changes are not checked (the clean root gets the committed HEAD)"
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  apt-get install -y -q debootstrap >/dev/null
fi

cache=${FRESH_CACHE:-/var/cache/skyvisor-fresh}
base=$cache/base-bookworm
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}
# What a new machine of this kind has installed (besides Rust and nextest).
ships=ca-certificates,curl,e2fsprogs,gcc,git,iproute2,jq,procps,psmisc,python3,qemu-utils,util-linux

mkdir -p "$cache"
if [ ! -f "$base/.complete" ]; then
  say "building the clean root with debootstrap --variant=minbase from $mirror (once; cached in $base)"
  rm -rf "$base"
  debootstrap --variant=minbase --include="$ships" bookworm "$base" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { say "debootstrap failed; see $cache/debootstrap.log"; tail -n 5 "$cache/debootstrap.log" >&2; exit 1; }
  # The same apt sources as a new machine: the main suite, updates and security.
  rm -f "$base/etc/apt/sources.list"
  cp /etc/apt/sources.list.d/debian.sources "$base/etc/apt/sources.list.d/" 2>/dev/null \
    || echo "deb $mirror bookworm main" > "$base/etc/apt/sources.list"
  touch "$base/.complete"
fi

# A throwaway copy of the base: an overlay, so the base stays clean.
work=$(mktemp -d "$cache/run-XXXXXX")
root=$work/root
mkdir -p "$work/upper" "$work/work" "$root"
mounts=()
mnt() { mount "$@"; mounts+=("${@: -1}"); }
bridge_before=0
ip link show svbr0 >/dev/null 2>&1 && bridge_before=1

cleanup() {
  set +e
  # Every process started in the clean root: each carries this run's
  # marker in its environment (or has the clean root as its root).
  for _ in 1 2 3; do
    for p in /proc/[0-9]*; do
      if [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] \
        || { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qx "SKYVISOR_FRESH_RUN=$work"; then
        kill -9 "${p#/proc/}" 2>/dev/null
      fi
    done
    sleep 0.5
  done
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount -R "${mounts[$i]}" 2>/dev/null || umount -lR "${mounts[$i]}" 2>/dev/null
  done
  if [ "$bridge_before" = 0 ]; then
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^svt' | while read -r t; do
      ip link del "$t" 2>/dev/null
    done
    ip link del svbr0 2>/dev/null
    nft delete table ip skyvisor-svbr0 2>/dev/null
  fi
  if [ "$keep" = 0 ]; then
    rm -rf "$work"
  else
    say "kept $work"
  fi
}
trap cleanup EXIT

mnt -t overlay overlay -o "lowerdir=$base,upperdir=$work/upper,workdir=$work/work" "$root"
mnt -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"; mount --make-rslave "$root/sys"; mounts+=("$root/sys")
mount --rbind /dev "$root/dev"; mount --make-rslave "$root/dev"; mounts+=("$root/dev")
mnt -t tmpfs tmpfs "$root/run"
mnt -t tmpfs tmpfs "$root/tmp"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The certificate authorities a machine of this kind trusts (its registries
# are reached through them).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1 || say "update-ca-certificates failed in the clean root"
fi
# The machine's Rust toolchain and nextest, as a new machine has them; the
# crates registry cache is shared so a rerun downloads nothing again.
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
mkdir -p "$root/root/.rustup" "$root/root/.cargo"
mnt --bind "$rustup_home" "$root/root/.rustup"
mnt --bind "$cargo_home" "$root/root/.cargo"
nextest=$(command -v cargo-nextest)
touch "$root/usr/local/bin/cargo-nextest"
mnt --bind "$nextest" "$root/usr/local/bin/cargo-nextest"

git clone -q "$repo" "$root/root/skyvisor"
say "clean root at $root (HEAD $(git -C "$repo" rev-parse --short HEAD))"

# Runs a command with the clean root as its root: in a mount namespace of
# its own whose root it is (pivot_root), not a chroot, because the kernel
# refuses user namespaces (containers) to a chrooted process and a fresh
# machine is not one.
in_root() {
  unshare --mount /bin/bash -c '
    set -e
    cd "$1"
    mkdir -p .oldroot
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot 2>/dev/null || true
    exec /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 SKYVISOR_FRESH_RUN="$3" \
      PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo \
      /bin/bash -c "cd /root/skyvisor && $2"
  ' in_root "$root" "$1" "$work"
}

results=()
started=$(date +%s)
step() {
  local name=$1 cmd=$2 t0 rc
  t0=$(date +%s)
  say "step: $name ($cmd)"
  set +e
  in_root "$cmd" 2>&1 | tee "$work/$name.log" | sed -u 's/^/    | /' >&2
  rc=${PIPESTATUS[0]}
  set -e
  results+=("$(printf '%-10s %-4s %5ss  %s' "$name" "$([ "$rc" = 0 ] && echo ok || echo FAIL)" "$(($(date +%s) - t0))" "$cmd")")
  return "$rc"
}

summary() {
  say "results (total $(($(date +%s) - started))s):"
  printf '  %s\n' "${results[@]}" >&2
}

failed=0
step quickstart "./scripts/quickstart.sh" || failed=1
if [ "$failed" = 0 ] && ! grep -q "Demo VM: http://" "$work/quickstart.log"; then
  results+=("quickstart: the demo VM's URL was not printed"); failed=1
fi
if [ "$failed" = 0 ] && grep -q $'\e\[' "$work/quickstart.log"; then
  results+=("quickstart: its output has ANSI escape codes"); failed=1
fi
# A second run reuses the running host and the demo VM.
if [ "$failed" = 0 ]; then
  step rerun "./scripts/quickstart.sh" || failed=1
  grep -q "reusing it" "$work/rerun.log" || { results+=("rerun: did not reuse the running host"); failed=1; }
fi
# The quick start's `skyvisor up` stays for the tests only if they need it: stop it.
in_root "pkill -f 'skyvisor up' ; pkill -f qemu-system ; true" >/dev/null 2>&1 || true

if [ "$failed" = 0 ] && [ "$run_tests" = 1 ]; then
  if [ -n "$filter" ]; then
    step tests "./scripts/test.sh -E '$filter'" || failed=1
  else
    step tests "./scripts/test.sh" || failed=1
  fi
fi

if [ "$failed" = 0 ] && [ "$run_package" = 1 ]; then
  step package "deb=\$(./scripts/package.sh) && apt-get install -y -q \"\$deb\" >/dev/null && skyvisor --version" || failed=1
  if [ "$failed" = 0 ]; then
    step units "apt-get install -y -q --no-install-recommends systemd >/dev/null && \
      systemd-analyze verify --man=no /lib/systemd/system/skyvisor-up.service /lib/systemd/system/skyvisor-server.service /lib/systemd/system/skyvisor-agent.service" || failed=1
  fi
  if [ "$failed" = 0 ]; then
    # As the unit starts it (ExecStart, NO_COLOR, the packaged config), then a VM.
    step service "cmd=\$(sed -n 's/^ExecStart=//p' /lib/systemd/system/skyvisor-up.service) && \
      (NO_COLOR=1 setsid \$cmd >/var/log/skyvisor-unit.log 2>&1 &) && \
      skyvisor vm create svc --type nano --wait --timeout 900 && \
      curl -fsS --max-time 10 http://\$(skyvisor vm show svc -o json | jq -r .spec.network.ip)/health" || failed=1
  fi
fi

summary
if [ "$failed" = 0 ]; then
  say "PASSED: the README's commands work on a clean Debian 12 root"
else
  say "FAILED (logs in $work; pass --keep to keep them)"
  exit 1
fi
