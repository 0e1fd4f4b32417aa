#!/usr/bin/env bash
# Installs Triton's perf_analyzer as .venv/bin/perf_analyzer, so the tests and benchmarks load a
# node with the generator Triton's users measure with. Everything comes from the registries this
# project builds from:
#   - the binary, from the tritonclient 2.48.0 wheel (PyPI; later wheels no longer carry it),
#   - libcudart.so.12, which it links (and never calls without a GPU), from NVIDIA's
#     nvidia-cuda-runtime-cu12 wheel (PyPI),
#   - libb64.so.0d, from Debian's libb64-0d package (`apt-get download`: no install needed).
# The libraries stay in .venv/perf_analyzer/lib; the wrapper puts them on the library path.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/perf_analyzer ] && exit 0

dest=.venv/perf_analyzer
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest/lib"
.venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary :all: --dest "$tmp" tritonclient==2.48.0 nvidia-cuda-runtime-cu12==12.9.79
unzip -q -o -j "$tmp"/tritonclient-2.48.0-*.whl 'tritonclient-2.48.0.data/data/bin/perf_analyzer' -d "$dest"
unzip -q -o -j "$tmp"/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$dest/lib"
if ! (cd "$tmp" && apt-get download -q libb64-0d >/dev/null 2>&1); then
  # A fresh machine may not have read Debian's package lists yet.
  apt-get update -q >/dev/null
  (cd "$tmp" && apt-get download -q libb64-0d >/dev/null)
fi
dpkg-deb -x "$tmp"/libb64-0d_*.deb "$tmp/b64"
cp -P "$tmp"/b64/usr/lib/*/libb64.so.0d* "$dest/lib/"
chmod +x "$dest/perf_analyzer"

cat > .venv/bin/perf_analyzer <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$PWD/$dest/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$PWD/$dest/perf_analyzer" "\$@"
EOF
chmod +x .venv/bin/perf_analyzer
