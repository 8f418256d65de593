#!/usr/bin/env bash
# Extracts Debian 12's own QEMU (7.2, which has no cpr-reboot) into DEST, for the tests that check
# cprctl refuses a QEMU older than 9.0. Nothing is installed: the .deb is only downloaded and unpacked.
set -euo pipefail
dest=${1:?usage: old-qemu.sh DEST}
bin="$dest/usr/bin/qemu-system-x86_64"
if [ -x "$bin" ]; then exit 0; fi
find_version() { apt-cache madison qemu-system-x86 | awk -F'|' '$2 ~ /7\.2/ {gsub(/ /, "", $2); print $2; exit}'; }
version=$(find_version)
if [ -z "$version" ]; then apt-get update -q >/dev/null && version=$(find_version); fi
[ -n "$version" ] || { echo "old-qemu: no QEMU 7.2 in the apt sources (apt-get update?)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "qemu-system-x86=$version" >/dev/null 2>&1)
mkdir -p "$dest.tmp"
dpkg-deb -x "$work"/qemu-system-x86_*.deb "$dest.tmp"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
"$bin" --version | head -n1
