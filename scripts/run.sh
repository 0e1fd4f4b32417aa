#!/usr/bin/env bash
# Sets up, builds, and runs a meshserve node on 127.0.0.1:8000: the bundled models, with the
# first-party WebAssembly plugins around them (examples/node.toml). Extra arguments go to
# `meshserve serve` (e.g. --http 0.0.0.0:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-plugins.sh
cargo build --release -p meshserve
exec target/release/meshserve serve --config examples/node.toml "$@"
