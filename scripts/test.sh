#!/usr/bin/env bash
# Sets up and runs the whole test suite: one release build, reused by the Rust unit and
# integration tests (which start real meshserve processes) and by the Python client tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace
MESHSERVE_BIN="$PWD/target/release/meshserve" .venv/bin/python -m pytest -q mesh/tests/python
