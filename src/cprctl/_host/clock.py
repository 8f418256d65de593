"""The host's boot: when it began and which one it is (a record written before it speaks of processes that are gone)."""

from __future__ import annotations

import os
import time
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

#: Moments this process reached (Unix time), by name: see `mark`.
_marks: dict[str, float] = {}


def mark(name: str) -> None:
    """Note that this process reached moment *name* now (the first time only): ``restore-all`` marks its
    start and when it knew every VM's state, and a restore's timeline splits its queue by them."""
    _marks.setdefault(name, time.time())


def marks() -> dict[str, float]:
    """The moments `mark` noted so far."""
    return dict(_marks)


def boot_time() -> float:
    """When the running kernel started (Unix time, to the millisecond): now less ``CLOCK_BOOTTIME``
    (``/proc/stat``'s ``btime`` says the same in whole seconds). Firmware time before the kernel is not in it."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start(pid: int | str = "self") -> float | None:
    """When process *pid* started (Unix time): for the unit's ``cprctl restore-all``, when systemd ran it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def boot_id() -> str:
    """The running kernel's boot id (a new one at every boot, kexec included); ``""`` when unreadable."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""
