#!/usr/bin/env bash
# What benchmarks/reboot.py's default cold boot of the host VM (--host-boot uefi) needs besides `make deps`:
# OVMF (the UEFI firmware), GRUB's EFI modules and grub-mkstandalone, and mtools for the EFI system partition
# (tests/hostvm.py: uefi_disks). Idempotent; not part of `make test` (the tests boot the host VM with -kernel).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-uefi-deps: needs root (apt-get)" >&2
    exit 1
fi
missing=""
for p in ovmf grub-efi-amd64-bin grub-common mtools; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # --no-install-recommends: grub-efi-amd64-bin must not pull in a boot loader for this machine itself.
    apt-get install -y -q --no-install-recommends $missing
fi
