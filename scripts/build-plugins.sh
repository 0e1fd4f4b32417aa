#!/usr/bin/env bash
# Builds every first-party plugin as a wasm32-wasip2 component into
# plugins/target/wasm32-wasip2/release/<name>.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --manifest-path plugins/Cargo.toml --release --target wasm32-wasip2
