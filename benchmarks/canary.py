#!/usr/bin/env python3
"""What the kept RAM's canary (`cprctl._checkpoint.canary`) costs, on a plain file of each size (no QEMU).

For each size a RAM file is written once (random bytes, flushed), then, `--rounds` times each:

- ``save``: `canary.take`, the file in the page cache (a save takes it once the file has its final content);
- ``restore, warm``: `canary.problem` with the file in the page cache (a restore in the boot that saved it);
- ``restore, cold``: the same once the file's pages were dropped from the page cache (``POSIX_FADV_DONTNEED``
  on that file alone, after its flush): a restore after a host reboot reads the sampled pages from the disk.

Prints ms per step (median, min, max) and the pages sampled. Run::

    PYTHONPATH=src python benchmarks/canary.py [--sizes 256,1024] [--rounds 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cprctl._checkpoint import canary

MIB = 1 << 20


def _write(path: Path, size: int) -> None:
    block = os.urandom(4 * MIB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _ms(fn: Callable[[], object], before: Callable[[], None] | None = None) -> float:
    if before:
        before()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def _line(what: str, times: list[float]) -> str:
    return f"  {what:16} median {statistics.median(times):7.2f} ms  (min {min(times):.2f}, max {max(times):.2f})"


def run(size_mib: int, rounds: int, folder: Path) -> None:
    path = folder / f"canary-{size_mib}.ram"
    _write(path, size_mib * MIB)
    try:
        c = canary.take(str(path))
        save = [_ms(lambda: canary.take(str(path))) for _ in range(rounds)]
        warm = [_ms(lambda: canary.problem(c)) for _ in range(rounds)]
        cold = [_ms(lambda: canary.problem(c), lambda: _drop(path)) for _ in range(rounds)]
        print(f"{size_mib} MiB: {canary.sampled(c)} of {canary.pages_of(c.size)} pages sampled")
        for what, times in (("save", save), ("restore, warm", warm), ("restore, cold", cold)):
            print(_line(what, times))
    finally:
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,1024", help="MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the RAM files are written")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cprctl-canary-") as folder:
        for size in (int(s) for s in args.sizes.split(",")):
            run(size, args.rounds, Path(folder))


if __name__ == "__main__":
    main()
