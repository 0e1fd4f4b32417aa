#!/usr/bin/env bash
# Builds every first-party plugin as a WebAssembly component:
#   Rust plugins   -> plugins/target/wasm32-wasip2/release/<name>.wasm
#   Python plugins -> plugins/target/python/<name>.wasm (componentize-py, from .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --manifest-path plugins/Cargo.toml --release --target wasm32-wasip2

mkdir -p plugins/target/python
for app in plugins/python/*/app.py; do
  dir=$(dirname "$app")
  out="plugins/target/python/$(basename "$dir").wasm"
  # componentize-py takes seconds; rebuild only when the source or the WIT changed.
  if [ ! -f "$out" ] || [ -n "$(find "$dir" guest-sdk/wit -newer "$out" -type f | head -1)" ]; then
    # The WIT world the plugin implements (pre, post or pre-post) is named in its folder.
    world=$(cat "$dir/world")
    .venv/bin/componentize-py -d guest-sdk/wit -w "$world" componentize app -p "$dir" -o "$out"
  fi
done

# The example endpoints' folders hold their components.
scripts/endpoint-components.sh
