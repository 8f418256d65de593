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

Under KVM the loading QEMU's memory is not quite the saved one: when QEMU hands the vCPUs'
clock state to KVM at the end of the load, KVM rewrites each vCPU's ``pvclock_vcpu_time_info``
(the kvmclock page the guest registered: its version goes up by 2, its flags change) in guest
RAM, before the guest runs. A block whose digest then differs is compared with the state file
page by page (`reconcile`): it passes only when the file's pages still hash to the recorded
digest and every byte the loaded QEMU holds otherwise is in such a record or in the
wall-clock record KVM writes when QEMU hands the wall-clock MSR back.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from .._qemu import ramblocks
from .._qemu.ramblocks import Memory, RamBlock
from .statefile import ALGORITHM, CHUNK, MappedBlock, Progress, loaded_chunks, no_progress

#: The digest of a chunk of zeros.
ZERO_CHUNK = bytes(xxhash.xxh3_128(bytes(CHUNK)).digest())
#: Chunks hashed at once: process_vm_readv (or reading /proc/PID/mem) and xxh3 both release the GIL. More
#: threads than the 2 cores here: the digest competes with QEMU's own threads (and, on a busy host, with
#: everything else) for the CPU while the guest is stopped, and each thread gets its share. Measured here on
#: 1 GiB at a load average of 5.7: 2 threads 0.89-1.11 s, 4 threads 0.73-0.76 s, 8 threads 0.67 s (0.35-0.42 s
#: of CPU time in each case).
THREADS = 4
#: How much nicer the threads run while QEMU is still writing the RAM they read (`digests`' *yield_until*): at a
#: save the digest need only end with QEMU's write, and on 2 cores its 4 threads at the same priority slowed that
#: write by about a fifth (1 GiB: 1.20 s against 0.98 s alone; 0.99 s beside them at nice 10).
YIELD_NICE = 10


def digests(
    pid: int, blocks: Iterable[RamBlock], progress: Progress = no_progress, yield_until: threading.Event | None = None
) -> dict[str, str]:
    """``{name: "xxh3_128c:<hex>"}`` of each of *blocks* as process *pid* holds it now.

    *progress* hears of every chunk (from worker threads, one call at a time); an exception
    it raises stops the digest and is raised. With *yield_until*, the threads run `YIELD_NICE` nicer
    until it is set, then at the caller's niceness again (which takes root: pass it only then).

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
            if yield_until is not None:
                _pace(local, yield_until)
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


def _pace(local: threading.local, until: threading.Event) -> None:
    """Run the calling thread (Linux: niceness is a thread's) `YIELD_NICE` nicer until *until* is set, then at
    its own niceness again (the kernel caps the nicer one at 19); what it has so far is in *local*."""
    want = 0 if until.is_set() else YIELD_NICE
    if getattr(local, "nice", 0) != want:
        if not hasattr(local, "base"):
            local.base = os.getpriority(os.PRIO_PROCESS, 0)
        with contextlib.suppress(OSError):  # not allowed (no root): the digest runs on as it is
            os.setpriority(os.PRIO_PROCESS, 0, local.base + want)
            local.nice = want


#: KVM's ``pvclock_vcpu_time_info``: 32 bytes, little-endian: version u32, pad u32, tsc_timestamp u64,
#: system_time u64, tsc_to_system_mul u32, tsc_shift s8, flags u8, pad[2].
PVCLOCK = struct.Struct("<IIQQIbB2x")
#: The record's bytes KVM writes (all but the pads 4-7 and 30-31).
_PVCLOCK_FIELDS = frozenset(range(4)) | frozenset(range(8, 30))
#: Records are compared within a page (neither record crosses one where KVM puts them).
PAGE = 4096
#: More rewritten records than this is no clock update (one per vCPU, a Linux guest's one per possible CPU).
MAX_REWRITTEN = 1024


def pvclock_update(saved: bytes, loaded: bytes) -> bool:
    """Whether 32-byte records *saved* and *loaded* are one kvmclock record before and after KVM updated it:
    both have the record's shape (even version, zero pads, a multiplier, a shift of at most 32 either way),
    the version went up, and only the record's fields differ."""
    if saved[4:8] != bytes(4) or loaded[4:8] != bytes(4) or saved[30:] != bytes(2) or loaded[30:] != bytes(2):
        return False
    (v1, _, _, _, mul1, shift1, _), (v2, _, _, _, mul2, shift2, _) = PVCLOCK.unpack(saved), PVCLOCK.unpack(loaded)
    if v1 % 2 or v2 % 2 or v2 <= v1 or not mul1 or not mul2 or abs(shift1) > 32 or abs(shift2) > 32:
        return False
    return all(i in _PVCLOCK_FIELDS for i in range(32) if saved[i] != loaded[i])


#: KVM's ``pvclock_wall_clock``: 12 bytes, 4-aligned, little-endian: version u32, sec u32, nsec u32. KVM writes
#: it at once when the wall-clock MSR is written, as QEMU does when it hands a loaded vCPU's MSRs back.
WALLCLOCK = struct.Struct("<III")


def wallclock_update(saved: bytes, loaded: bytes) -> bool:
    """Whether 12-byte records *saved* and *loaded* are one wall-clock record before and after KVM rewrote it
    (even versions going up, nanoseconds under a second)."""
    (v1, _, n1), (v2, _, n2) = WALLCLOCK.unpack(saved), WALLCLOCK.unpack(loaded)
    return not v1 % 2 and not v2 % 2 and v2 > v1 and n1 < 10**9 and n2 < 10**9


def _explained(saved: bytes, loaded: bytes, at: int) -> int | None:
    """The end of a kvmclock or wall-clock record that KVM rewrote and that holds differing byte *at*."""
    r = at - at % PVCLOCK.size
    if r + PVCLOCK.size <= len(saved) and pvclock_update(saved[r : r + PVCLOCK.size], loaded[r : r + PVCLOCK.size]):
        return r + PVCLOCK.size
    w = at - at % 4
    end = w + WALLCLOCK.size
    if end <= len(saved) and wallclock_update(saved[w:end], loaded[w:end]):
        return end
    return None


def rewritten(saved: bytes, loaded: bytes) -> int | None:
    """How many records differ between equal-sized *saved* and *loaded*, when each is a kvmclock record
    (`pvclock_update`) or the wall-clock record (`wallclock_update`, found by its version, the first byte to
    differ) that KVM rewrote; None when any difference is not."""
    count, _ = _scan(saved, loaded)
    return count


def _scan(saved: bytes, loaded: bytes) -> tuple[int | None, int]:
    """`rewritten`'s count, and the offset of the first difference it cannot explain (with None)."""
    count = 0
    for page in range(0, len(saved), PAGE):
        a, b = saved[page : page + PAGE], loaded[page : page + PAGE]
        at = len(a) if a == b else 0
        while at < len(a):
            if a[at] == b[at]:
                at += 1
            elif (end := _explained(a, b, at)) is None:
                return None, page + at
            else:
                count, at = count + 1, end
    return count, len(saved)


#: How many bytes around an unexplained difference its error shows (aligned, from each side).
SHOWN = 64


def unexplained(saved: bytes, loaded: bytes, base: int) -> str:
    """One line on the first difference between *saved* and *loaded* (at offset *base* in their block) that
    `rewritten` cannot explain: where, the bytes around it on each side, and how many pages differ in all."""
    _, at = _scan(saved, loaded)
    w = at - at % SHOWN
    pages = sum(saved[p : p + PAGE] != loaded[p : p + PAGE] for p in range(0, len(saved), PAGE))
    return (
        f"at {base + at:#x} (bytes {base + w:#x}-{base + w + SHOWN - 1:#x} saved {saved[w : w + SHOWN].hex()}, "
        f"loaded {loaded[w : w + SHOWN].hex()}; {pages} page(s) of the {len(saved) >> 10} KiB from {base:#x} differ)"
    )


def reconcile(pid: int, block: RamBlock, path: Path, mapped: MappedBlock, want: str) -> int:
    """Check block *block* of loaded QEMU *pid* against the same block *mapped* in mapped-ram state file *path*
    as QEMU loads it (`statefile.loaded_chunks`): that must hash to *want* (the save's digest of the saving
    QEMU's memory), and the loaded memory must equal it but for the kvmclock and wall-clock records KVM
    rewrote. Returns how many it rewrote.

    :raise ValueError: the file's pages do not hash to *want*, or the memory differs otherwise.
    :raise OSError: the memory or the file cannot be read.
    """
    total, h = 0, xxhash.xxh3_128()
    mem_buf = mmap.mmap(-1, CHUNK)
    with Memory(pid) as mem:
        for off, chunk in zip(range(0, block.used, CHUNK), loaded_chunks(path, mapped), strict=True):
            mem.read_into(mem_buf, len(chunk), block.host + off)
            h.update(xxhash.xxh3_128(chunk).digest())
            if mem_buf[: len(chunk)] != chunk:
                if (n := rewritten(chunk, loaded := mem_buf[: len(chunk)])) is None:
                    why = unexplained(chunk, loaded, off)
                    raise ValueError(f"RAM block {block.name} as loaded differs from the state file {why}")
                total += n
    if f"{ALGORITHM}:{h.hexdigest()}" != want:
        raise ValueError(f"the state file's pages of RAM block {block.name} do not match the recorded digest")
    if total > MAX_REWRITTEN:
        raise ValueError(f"RAM block {block.name}: {total} records differ, more than a clock update rewrites")
    return total
