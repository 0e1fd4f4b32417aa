#!/usr/bin/env bash
# Copies the built first-party components into the example endpoints' folders
# (examples/models/*/endpoint.toml names them): an endpoint folder is one unit that travels
# through the mesh by its digest, so its components live inside it. Copied only when changed,
# so digests stay put. Run after the Rust plugins are built (scripts/build-plugins.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
for endpoint in examples/models/*/endpoint.toml; do
  dir=$(dirname "$endpoint")
  for wasm in $(grep -o '[a-z_]*\.wasm' "$endpoint" | sort -u); do
    built="plugins/target/wasm32-wasip2/release/$wasm"
    cmp -s "$built" "$dir/$wasm" || cp "$built" "$dir/$wasm"
  done
done
