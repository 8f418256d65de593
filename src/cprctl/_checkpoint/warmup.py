"""What a warm update makes ready before the guest stops, so that nothing inside the pause waits for it
(issue 17).

Inside the pause the old QEMU stops the VM, which flushes every disk image (``bdrv_flush_all``), and
the new one loads the device state and starts, running code of its binary it has not run yet. Two
things cprctl can do beforehand:

- **flush** the disk images while the guest still runs: the flush at the stop then has only what the
  guest wrote since (a qcow2 overlay just created holds dirty metadata). The RAM files kept in place
  are not flushed: measured on first handovers of freshly booted guests, flushing the 1 GiB RAM file
  just before the stop (185-294 ms) came with longer stops of the old QEMU (51-239 ms against 27-68 ms
  by hand), so it was dropped;
- **read ahead** the files the new QEMU runs code from (its binary and libraries), so that a page of
  its load path is never read from the disk in the pause (after a package upgrade or on a busy host,
  they need not be in the page cache).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .._qemu import process


def flush(paths: Iterable[str]) -> None:
    """fsync each regular file of *paths* (one that is gone or cannot be opened is skipped)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def read_ahead(pid: int) -> int:
    """Ask the kernel to read into the page cache every file process *pid* maps executable; how many."""
    count = 0
    for path in process.code_files(pid):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            count += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return count
