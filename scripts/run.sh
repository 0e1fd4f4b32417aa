#!/usr/bin/env bash
# Sets up, builds, and runs a three-node meshserve mesh on loopback:
#   node a: HTTP 127.0.0.1:8000, HTTP/3 :8443, QUIC (mesh) :7000, examples/node.toml: the
#           example repository (the bundled models and the endpoint folders beside them, with
#           the first-party WebAssembly plugins) and a compiled-plugin cache;
#   nodes b and c: HTTP :8001/:8002, HTTP/3 :8444/:8445, QUIC :7001/:7002, the same
#           repository, joining through a. Every node lists all three as seeds (its own address is skipped),
#           so any of them restarted finds the others again.
# Certificates: the mesh CA is made once in target/demo-certs; node certificates (each node gets
# only its own folder, target/demo-certs/node-NAME), client certificates and
# the front door's (for 127.0.0.1 and localhost) are issued again on every run, so certificates
# from an older build never linger. Extra arguments go to node a's
# `meshserve serve`. Ctrl-C (or SIGTERM) stops all three after their grace period and drain;
# a second Ctrl-C stops them at once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-plugins.sh
# The same build as scripts/test.sh, so running both builds once.
cargo build --release --workspace --all-targets
bin=target/release/meshserve
certs=target/demo-certs
"$bin" certs --dir "$certs" --node a --node b --node c --client ops \
    --server 127.0.0.1 --server localhost >/dev/null
seeds=(--seed 127.0.0.1:7000 --seed 127.0.0.1:7001 --seed 127.0.0.1:7002)
http3() {
    echo --http3 "127.0.0.1:$1" --http3-cert "$certs/server.pem" --http3-key "$certs/server.key"
}
pids=()
stop() {
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait
}
trap stop EXIT TERM
# Ctrl-C already reaches every node (they share the terminal's process group): just wait.
trap wait INT
start_peer() {
    RUST_LOG=${RUST_LOG:-warn} "$bin" serve --model-repository examples/models \
        --http "127.0.0.1:800$2" $(http3 "844$((3 + $2))") --quic "127.0.0.1:700$2" \
        --certs "$certs/node-$1" --name "$1" --publisher a "${seeds[@]}" &
    pids+=($!)
}
start_peer b 1
start_peer c 2
"$bin" serve --config examples/node.toml $(http3 8443) --quic 127.0.0.1:7000 --certs "$certs/node-a" \
    --name a --publisher a "${seeds[@]}" "$@" &
pids+=($!)
wait "${pids[-1]}"
