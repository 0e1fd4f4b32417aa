#!/usr/bin/env bash
# Sets up, builds, and runs a meshserve node serving the bundled models on 127.0.0.1:8000.
# Extra arguments go to `meshserve serve` (e.g. --http 0.0.0.0:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p meshserve
exec target/release/meshserve serve "$@"
