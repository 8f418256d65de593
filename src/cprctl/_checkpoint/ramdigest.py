"""The digest of a guest's RAM, read from QEMU's memory (issue 17).

A mapped-ram save stops the guest before QEMU writes any RAM, so the saving QEMU's
RAM blocks hold, for the whole save, exactly what the state file receives. cprctl
hashes them from that QEMU's memory while it writes, instead of reading the file
back; a restore hashes the blocks of the NEW QEMU once its load completed (under
``-S``, disks inactive) and compares them: what the restored guest will run on is
what the saved guest had, whatever the file, the disk or QEMU's load did in
between. The file's other bytes (header, device state, page bitmaps) are digested
from the file (`statefile.device_digest`).

Each block's digest is ``xxh3_128c`` as for files (`statefile.digest`): the xxh3-128
of the xxh3-128 digests of its 4 MiB chunks, in order. A page the save did not
write (a zero page: mapped-ram leaves it out) reads as zeros in both QEMUs. In
private anonymous RAM, a chunk none of whose pages is in memory or swapped out
(``/proc/PID/pagemap``) was never touched or was discarded: it is zeros and is not
read (a loading QEMU leaves the pages the save did not write untouched).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import xxhash

from .._qemu import ramblocks
from .._qemu.ramblocks import Memory, RamBlock
from .statefile import ALGORITHM, CHUNK, Progress, no_progress

#: The digest of a chunk of zeros.
ZERO_CHUNK = bytes(xxhash.xxh3_128(bytes(CHUNK)).digest())
#: Chunks hashed at once: process_vm_readv (or reading /proc/PID/mem) and xxh3 both release the GIL. More
#: threads than the 2 cores here: the digest competes with QEMU's own threads (and, on a busy host, with
#: everything else) for the CPU while the guest is stopped, and each thread gets its share. Measured here on
#: 1 GiB at a load average of 5.7: 2 threads 0.89-1.11 s, 4 threads 0.73-0.76 s, 8 threads 0.67 s (0.35-0.42 s
#: of CPU time in each case).
THREADS = 4


def digests(pid: int, blocks: Iterable[RamBlock], progress: Progress = no_progress) -> dict[str, str]:
    """``{name: "xxh3_128c:<hex>"}`` of each of *blocks* as process *pid* holds it now.

    *progress* hears of every chunk (from worker threads, one call at a time); an exception
    it raises stops the digest and is raised.

    :raise OSError: the memory cannot be read (no ptrace access, the process is gone).
    """
    blocks = list(blocks)
    sparse = {b.name for b in blocks if ramblocks.anonymous_private(pid, b.host, b.used)}
    work = [(b, off) for b in blocks for off in range(0, b.used, CHUNK)]
    total, done, lock = sum(b.used for b in blocks), 0, threading.Lock()
    local = threading.local()
    stop = threading.Event()
    with Memory(pid) as mem:

        def one(item: tuple[RamBlock, int]) -> bytes:
            nonlocal done
            if stop.is_set():
                raise OSError("stopped")
            block, off = item
            if (buf := getattr(local, "buf", None)) is None:
                buf = local.buf = mmap.mmap(-1, CHUNK)
            length = min(CHUNK, block.used - off)
            view = memoryview(buf)[:length]
            try:
                if length == CHUNK and block.name in sparse and not mem.populated(block.host + off, length):
                    hashed = ZERO_CHUNK  # never touched: zeros, not read
                else:
                    mem.read_into(buf, length, block.host + off)
                    hashed = bytes(xxhash.xxh3_128(view).digest())
                with lock:
                    done += length
                    progress(done, total)
            except BaseException:
                stop.set()
                raise
            finally:
                view.release()
            return hashed

        with ThreadPoolExecutor(THREADS) as pool:
            try:
                parts = list(pool.map(one, work))
            finally:
                stop.set()
    result: dict[str, str] = {}
    at = 0
    for b in blocks:
        n = (b.used + CHUNK - 1) // CHUNK
        h = xxhash.xxh3_128()
        for part in parts[at : at + n]:
            h.update(part)
        at += n
        result[b.name] = f"{ALGORITHM}:{h.hexdigest()}"
    return result
