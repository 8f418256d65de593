#!/usr/bin/env bash
# Installs what cprctl's demo and tests need on Debian 12, idempotently:
# QEMU >= 9.0 from bookworm-backports, and the packages the test guest is built from.
set -euo pipefail

need_qemu() {
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1)
    [ -z "$v" ] || [ "$v" -lt 9 ]
}

missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || { echo "$p"; }
    done
}

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: needs root (apt-get)" >&2
    exit 1
fi

backports=/etc/apt/sources.list.d/cprctl-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Reuse the mirror this machine already uses for bookworm, with the backports suite.
    uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    [ -n "$uri" ] || { echo "install-deps: no bookworm apt source found to derive backports from" >&2; exit 1; }
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$backports"
    updated=0
fi

# systemd-container and mmdebstrap: tests/test_systemd_host.py boots a Debian root under systemd-nspawn.
pkgs=$(missing busybox-static cpio gcc libc6-dev binutils xz-utils zstd systemd-container mmdebstrap)
if need_qemu || [ -n "$pkgs" ] || [ -n "$(missing qemu-utils qemu-guest-agent)" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    if need_qemu || [ -n "$(missing qemu-utils qemu-guest-agent)" ]; then
        apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils qemu-guest-agent
    fi
    [ -z "$pkgs" ] || apt-get install -y -q $pkgs
fi
qemu-system-x86_64 --version | head -n1
