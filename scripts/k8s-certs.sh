#!/usr/bin/env bash
# Makes deploy/kubernetes/certs, which the kustomization turns into the meshserve-certs Secret:
# the mesh CA, a certificate for each StatefulSet pod (meshserve-0 .. meshserve-N-1: pod names
# are node names), the front door's for the HTTP Service's DNS names, and an `ops` client
# certificate for `meshserve status`. Reissues everything but the CA when run again (rotate:
# run it, `kubectl apply -k deploy/kubernetes`, then restart or SIGHUP the pods).
#   scripts/k8s-certs.sh [REPLICAS]     (default 3; more than 3: list the new files in
#                                        deploy/kubernetes/kustomization.yaml too)
set -euo pipefail
cd "$(dirname "$0")/.."
replicas=${1:-3}
namespace=${NAMESPACE:-meshserve}
bin=${MESHSERVE_BIN:-target/release/meshserve}
dir=${CERTS_DIR:-deploy/kubernetes/certs}
args=()
for ((i = 0; i < replicas; i++)); do
    args+=(--node "meshserve-$i")
done
for name in meshserve "meshserve.$namespace" "meshserve.$namespace.svc" \
    "meshserve.$namespace.svc.cluster.local"; do
    args+=(--server "$name")
done
"$bin" certs --dir "$dir" --client ops "${args[@]}"
