#!/usr/bin/env bash
# Sets up and runs the whole test suite: the plugins and one release build of the node, reused
# by the Rust unit and integration tests (which start real meshserve processes with real
# plugins) and by the Python client tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-plugins.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace
MESHSERVE_BIN="$PWD/target/release/meshserve" .venv/bin/python -m pytest -q mesh/tests/python
