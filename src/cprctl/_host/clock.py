"""The host's boot: when it began and which one it is (a record written before it speaks of processes that are gone)."""

from __future__ import annotations

import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_time() -> float:
    """When the running kernel booted (Unix time): ``btime`` of ``/proc/stat``, else from ``CLOCK_BOOTTIME``."""
    try:
        for line in PROC_STAT.read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """The running kernel's boot id (a new one at every boot, kexec included); ``""`` when unreadable."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""
