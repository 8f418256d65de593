"""Helpers the benchmarks share (bench.py, warm_update.py): the host (page cache, dd, memory, leftover
processes, machine facts) and the demo guest's console."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cprctl._checkpoint import statefile

#: Seconds between a save and its load after dropping the page cache (see `as_after_reboot`).
SETTLE_S = 5.0
#: dd test file size (MiB), and how many times it runs (the best counts: the limit is what the disk can do).
DD_MIB, DD_RUNS = 2048, 2


def fsync_ms(path: Path) -> float:
    """ms to flush *path* to disk: what a save that survives a host crash adds to the bare script's
    (cprctl flushes every state file before it records the checkpoint)."""
    t = time.perf_counter()
    statefile.flush(path)  # as cprctl's save flushes its state file
    return (time.perf_counter() - t) * 1000


def drop_caches() -> None:
    """Write back and drop the page cache, so the next load reads the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def as_after_reboot() -> None:
    """Between a save and its load: no state file in the page cache, and no recently freed memory.

    After a host reboot nothing is cached, and on this machine (a VM whose freed memory goes back to
    its host) memory freed seconds ago is still cheap to touch again while older free memory is not:
    waiting `SETTLE_S` puts every load, cprctl's and the baselines', in the same state.
    """
    drop_caches()
    time.sleep(SETTLE_S)


def file_sizes(path: str | Path) -> tuple[int, int]:
    """(bytes on disk, apparent size) of *path*."""
    st = os.stat(path)
    return st.st_blocks * 512, st.st_size


def kill_under(folder: Path) -> list[int]:
    """SIGKILL every process whose command line mentions *folder* (never this one); their pids."""
    needle = str(folder).encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def dd_bandwidth(folder: Path) -> tuple[float, float]:
    """O_DIRECT write and read bandwidth (bytes/s) of *folder*'s filesystem, 1 MiB blocks: the best of `DD_RUNS`."""
    path = folder / "dd.test"
    wr = rd = 0.0
    try:
        for _ in range(DD_RUNS):
            path.unlink(missing_ok=True)
            wr = max(
                wr, _dd(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={DD_MIB}", "oflag=direct", "conv=fsync"])
            )
            drop_caches()
            rd = max(rd, _dd(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"]))
    finally:
        path.unlink(missing_ok=True)
    return wr, rd


TOUCH = """
import mmap, sys, time
n = int(sys.argv[1]) << 20
mem, zeros = mmap.mmap(-1, n), bytes(1 << 20)
t = time.perf_counter()
for _ in range(0, n, 1 << 20):
    mem.write(zeros)
print(n / (time.perf_counter() - t))
"""


def first_touch(mib: int = DD_MIB, settle_s: float = 5.0) -> float:
    """Bytes/s at which a new process fills *mib* MiB of memory it never touched (best of `DD_RUNS`).

    A load must do the same with the guest's RAM. On a virtual machine whose free memory goes back to
    its host (virtio-balloon free page reporting), every first touch is a fault the host serves, and
    this, not the disk, can bound a load; *settle_s* lets freed memory be reported before each run.
    """
    best = 0.0
    for _ in range(DD_RUNS):
        time.sleep(settle_s)
        done = subprocess.run([sys.executable, "-c", TOUCH, str(mib)], capture_output=True, text=True, check=True)
        best = max(best, float(done.stdout))
    return best


def _dd(argv: list[str]) -> float:
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    m = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", done.stderr, re.MULTILINE)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {done.stderr.strip()}")
    return int(m[1]) / float(m[2])


def machine_info(qemu: str, folder: Path) -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "?",
    )
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])  # type: ignore[index]
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(folder)], capture_output=True, text=True, check=False
    ).stdout.split()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": f"{mem_kib / 1024**2:.0f} GiB",
        "kernel": platform.release(),
        "QEMU": version,
        "state dir": f"{folder} ({' on '.join(fs) if fs else '?'})",
        "Python": platform.python_version(),
        "load average at the start (1, 5, 15 min)": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


class Guest:
    """The console of one demo guest: ``mem ok`` lines prove its dirtied RAM is intact."""

    def __init__(self, folder: Path) -> None:
        self.console = folder / "console.log"

    def _text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mem_ok(self) -> int:
        """How many ``mem ok`` lines the guest printed so far; raises on a memory error."""
        text = self._text()
        bad = re.search(r"^(mem BAD.*|mem alloc failed.*|memfill exited.*)$", text, re.MULTILINE)
        if bad:
            raise RuntimeError(f"guest {self.console.parent.name}: {bad[1].strip()}")
        return len(re.findall(r"^mem ok ", text, re.MULTILINE))

    def wait_mem_ok(self, seen: int, timeout: float) -> int:
        """Wait for a ``mem ok`` after the *seen* first ones (a full verification pass); the new count."""
        deadline = time.monotonic() + timeout
        while (n := self.mem_ok()) <= seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest {self.console.parent.name}: no 'mem ok' within {timeout:.0f} s")
            time.sleep(0.1)
        return n
