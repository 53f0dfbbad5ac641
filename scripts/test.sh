#!/usr/bin/env bash
# Runs the whole test suite: a static check of the shell scripts, unit
# tests, store conformance against etcd, and integration tests that boot
# real guests under QEMU. Extra arguments go to nextest (e.g. -E FILTER).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
echo "==> shellcheck (warnings) of the scripts" >&2
shellcheck -S warning scripts/*.sh .ci/run bench/*/*.sh
cargo build --workspace --bins -q
# The OpenAPI fuzzer the contract test runs (schemathesis, from PyPI).
venv=${SCHEMATHESIS_VENV:-/opt/skyvisor-schemathesis}
if [[ ! -x $venv/bin/st ]]; then
  echo "==> installing schemathesis 4.32.5 into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q schemathesis==4.32.5
fi
if [[ ! -x $venv/bin/openapi-python-client ]]; then
  echo "==> installing openapi-python-client into $venv" >&2
  "$venv/bin/pip" install -q openapi-python-client==0.29.1
fi
exec cargo nextest run --workspace --profile ci "$@"
