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
# The SDK's own tests and the first-party plugins' tests run natively (meshserve_guest::testing
# answers the host calls); that workspace builds for wasm32 unless told otherwise.
cargo test --manifest-path plugins/Cargo.toml --target "$(rustc -vV | sed -n 's/^host: //p')" \
  -p meshserve-guest -p fraud-features -p threshold
MESHSERVE_BIN="$PWD/target/release/meshserve" .venv/bin/python -m pytest -q mesh/tests/python
