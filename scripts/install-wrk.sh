#!/usr/bin/env bash
# Installs wrk as .venv/bin/wrk (unless one is on PATH), the third-party load generator that
# `meshserve-bench suite` cross-checks its closed-loop rows with. It comes from Debian's wrk and
# libluajit-5.1-2 packages (`apt-get download`: no install, no root); the library stays in
# .venv/wrk/lib and the wrapper puts it on the library path.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/wrk ] && exit 0
command -v wrk >/dev/null 2>&1 && exit 0

dest=.venv/wrk
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest/lib"
packages=(wrk libluajit-5.1-2)
if ! (cd "$tmp" && apt-get download -q "${packages[@]}" >/dev/null 2>&1); then
  # A fresh machine may not have read Debian's package lists yet.
  apt-get update -q >/dev/null
  (cd "$tmp" && apt-get download -q "${packages[@]}" >/dev/null)
fi
for deb in "$tmp"/*.deb; do
  dpkg-deb -x "$deb" "$tmp/root"
done
cp "$tmp/root/usr/bin/wrk" "$dest/wrk"
cp -P "$tmp"/root/usr/lib/*/libluajit-5.1.so.2* "$dest/lib/"

cat > .venv/bin/wrk <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$PWD/$dest/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$PWD/$dest/wrk" "\$@"
EOF
chmod +x .venv/bin/wrk
