#!/usr/bin/env bash
# Installs what meshserve needs to build, run and test, idempotently:
#   - the wasm32-wasip2 Rust target (plugins are built for it),
#   - .venv: a Python virtual environment with the ONNX Runtime wheel (the library the server
#     loads; discovery finds it there) and the test clients,
#   - Triton's perf_analyzer in .venv/bin (scripts/install-perf-analyzer.sh),
#   - wrk in .venv/bin unless one is on PATH (scripts/install-wrk.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Reinstall only when the requirements changed since the last successful install.
stamp=.venv/.requirements.sha256
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi
# Triton's perf_analyzer, which the tests point at the node as Triton's users would (x86-64 only:
# the wheel that carries it is built for nothing else).
if [ "$(uname -m)" = x86_64 ]; then
  scripts/install-perf-analyzer.sh
fi
# wrk, the third-party generator `meshserve-bench suite` cross-checks its figures with.
scripts/install-wrk.sh
