"""Unit tests of reading QEMU's RAM blocks (real process memory, no QEMU)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

import pytest
import xxhash

from cprctl._checkpoint import ramdigest, statefile
from cprctl._qemu import ramblocks
from cprctl.errors import QemuError

#: QEMU 10.0's answer to ``info ramblock`` (q35, 256 MiB, VGA, e1000e).
INFO = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000 0x00007fde47e00000  rw
    /rom@etc/acpi/tables    4 KiB  0x0000000011100000 0x0000000000020000 0x0000000000200000 0x00007fde47800000  ro
 0000:00:02.0/e1000e.rom    4 KiB  0x00000000110c0000 0x0000000000040000 0x0000000000040000 0x00007fde47c00000  ro
"""


def test_info_ramblock_parses() -> None:
    assert ramblocks.parse(INFO) == [
        ramblocks.RamBlock("pc.ram", 0x10000000, 0x7FDE47E00000),
        ramblocks.RamBlock("/rom@etc/acpi/tables", 0x20000, 0x7FDE47800000),  # Used, not Total
        ramblocks.RamBlock("0000:00:02.0/e1000e.rom", 0x40000, 0x7FDE47C00000),
    ]
    with pytest.raises(QemuError, match="HVA"):
        ramblocks.parse("Block Name PSize Offset Used Total\npc.ram 4 KiB 0x0 0x1000 0x1000\n")


def test_digest_of_memory_is_the_file_digest_of_the_same_bytes() -> None:
    data = os.urandom(9 << 20) + bytes(5 << 20) + os.urandom(4096)
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    host = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        block = ramblocks.RamBlock("pc.ram", len(data), host)
        got = ramdigest.digests(os.getpid(), [block, ramblocks.RamBlock("tail", 4096, host + len(data) - 4096)])
    finally:
        del host
    want = xxhash.xxh3_128()
    for off in range(0, len(data), statefile.CHUNK):
        want.update(xxhash.xxh3_128(data[off : off + statefile.CHUNK]).digest())
    assert got["pc.ram"] == f"xxh3_128c:{want.hexdigest()}"
    assert got["tail"] == f"xxh3_128c:{xxhash.xxh3_128(xxhash.xxh3_128(data[-4096:]).digest()).hexdigest()}"
    with pytest.raises(OSError):
        ramdigest.digests(os.getpid(), [ramblocks.RamBlock("nowhere", 4096, 4096)])


@pytest.mark.skipif(os.geteuid() != 0, reason="taking the priority back takes root")
def test_the_digest_yields_the_cpu_until_told_then_runs_as_before() -> None:
    """A save's digest runs `YIELD_NICE` nicer while QEMU writes (its *yield_until* not set), then as the caller
    does; the digest is the same either way."""
    data = os.urandom(32 * statefile.CHUNK)
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    block = ramblocks.RamBlock("pc.ram", len(data), ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    written, seen = threading.Event(), []

    def progress(done: int, total: int) -> None:  # in the worker that hashed the chunk, after it did
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))
        if done >= total // 2:
            written.set()

    got = ramdigest.digests(os.getpid(), [block], progress, yield_until=written)
    assert got == ramdigest.digests(os.getpid(), [block])
    half = len(seen) // 2
    assert set(seen[:half]) == {base + ramdigest.YIELD_NICE}, seen
    # After it was set each thread finishes the chunk it had begun (nicer), then takes the priority back.
    late = [n for n in seen[half:] if n != base]
    assert seen[half:].count(base) >= half - ramdigest.THREADS and set(late) <= {base + ramdigest.YIELD_NICE}, seen
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's own thread never changed


def test_untouched_private_anonymous_chunks_are_zeros_and_not_read() -> None:
    size = 6 * statefile.CHUNK
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[statefile.CHUNK + 100 : statefile.CHUNK + 104] = b"data"  # chunk 1 touched, the others never
    host = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ramblocks.anonymous_private(os.getpid(), host, size)
    with ramblocks.Memory(os.getpid()) as mem:
        assert mem.populated(host + statefile.CHUNK, statefile.CHUNK)
        assert not mem.populated(host + 3 * statefile.CHUNK, statefile.CHUNK)
    got = ramdigest.digests(os.getpid(), [ramblocks.RamBlock("pc.ram", size, host)])
    data = bytes(buf)
    del host
    want = xxhash.xxh3_128()
    for off in range(0, size, statefile.CHUNK):
        want.update(xxhash.xxh3_128(data[off : off + statefile.CHUNK]).digest())
    assert got["pc.ram"] == f"xxh3_128c:{want.hexdigest()}"


#: A kvmclock record as a KVM guest's firmware registered it, in the saving QEMU and after the loading QEMU
#: handed the clock to KVM (measured here with -accel kvm: version 4 -> 6, the stable flag cleared).
SAVED_CLOCK = bytes.fromhex("04000000000000000c62ac606b1e0000ed6e2c000000000065923d8000010000")
LOADED_CLOCK = bytes.fromhex("06000000000000000c62ac606b1e0000ed6e2c000000000065923d8000000000")


def test_a_kvmclock_update_is_told_from_other_differences() -> None:
    assert ramdigest.pvclock_update(SAVED_CLOCK, LOADED_CLOCK)
    assert not ramdigest.pvclock_update(LOADED_CLOCK, SAVED_CLOCK)  # the version went down
    for at, value in ((0, 5), (4, 1), (30, 1), (28, 0x40)):  # odd version, pads, a shift of 64
        bad = bytearray(LOADED_CLOCK)
        bad[at] = value
        assert not ramdigest.pvclock_update(SAVED_CLOCK, bytes(bad)), at
    page = os.urandom(4096)
    loaded = bytearray(page)
    loaded[96:128] = LOADED_CLOCK
    assert ramdigest.rewritten(page[:96] + SAVED_CLOCK + page[128:], bytes(loaded)) == 1
    assert ramdigest.rewritten(page, page) == 0
    loaded[200] ^= 1
    assert ramdigest.rewritten(page[:96] + SAVED_CLOCK + page[128:], bytes(loaded)) is None
    # The error names the first difference no record explains, with the bytes around it on each side.
    line = ramdigest.unexplained(page[:96] + SAVED_CLOCK + page[128:], bytes(loaded), 0x10000)
    assert line.startswith(f"at 0x100c8 (bytes 0x100c0-0x100ff saved {page[192:256].hex()}, loaded "), line
    assert line.endswith(f"{loaded[192:256].hex()}; 1 page(s) of the 4 KiB from 0x10000 differ)"), line


def test_a_wall_clock_update_is_told_from_other_differences() -> None:
    saved = bytearray(8192)
    saved[4100:4112] = ramdigest.WALLCLOCK.pack(2, 1764460000, 5000)  # a guest's wall clock, 4-aligned
    loaded = bytearray(saved)
    loaded[4100:4112] = ramdigest.WALLCLOCK.pack(4, 1764463600, 999_999_999)
    assert ramdigest.rewritten(bytes(saved), bytes(loaded)) == 1
    loaded[4100:4112] = ramdigest.WALLCLOCK.pack(3, 1764463600, 0)  # odd: KVM is half-way, or no clock
    assert ramdigest.rewritten(bytes(saved), bytes(loaded)) is None
    loaded[4100:4112] = ramdigest.WALLCLOCK.pack(4, 1764463600, 10**9)
    assert ramdigest.rewritten(bytes(saved), bytes(loaded)) is None
    loaded[4100:4112] = ramdigest.WALLCLOCK.pack(4, 1764463600, 0)
    loaded[4112] = 1  # past the record
    assert ramdigest.rewritten(bytes(saved), bytes(loaded)) is None


def test_reconcile_passes_a_clock_update_and_nothing_else(tmp_path: pytest.TempPathFactory) -> None:
    saved = bytearray(os.urandom(6 << 20))
    saved[0x1000 + 64 : 0x1000 + 96] = SAVED_CLOCK
    want = xxhash.xxh3_128()
    for off in range(0, len(saved), statefile.CHUNK):
        want.update(xxhash.xxh3_128(bytes(saved[off : off + statefile.CHUNK])).digest())
    digest = f"xxh3_128c:{want.hexdigest()}"
    path = Path(str(tmp_path)) / "state"
    bitmap = b"\xff" * (len(saved) // 4096 // 8)  # every page written
    with open(path, "wb") as f:
        f.write(bitmap + b"x" * (8192 - len(bitmap)) + saved)
    mapped = statefile.MappedBlock("pc.ram", len(saved), 8192, 0)
    loaded = bytearray(saved)
    loaded[0x1000 + 64 : 0x1000 + 96] = LOADED_CLOCK
    buf = mmap.mmap(-1, len(loaded))
    buf[:] = loaded
    block = ramblocks.RamBlock("pc.ram", len(loaded), ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    assert ramdigest.reconcile(os.getpid(), block, path, mapped, digest) == 1
    buf[0x300000] ^= 0xFF  # the loaded memory differs elsewhere
    with pytest.raises(ValueError, match=r"differs from the state file at 0x300000 \(bytes 0x300000-0x30003f saved "):
        ramdigest.reconcile(os.getpid(), block, path, mapped, digest)
    buf[0x300000] ^= 0xFF
    with open(path, "r+b") as f:  # the file's pages are not what was saved (and the memory agrees with them)
        f.seek(8192 + 0x500000)
        f.write(bytes([saved[0x500000] ^ 1]))
    buf[0x500000] ^= 1
    with pytest.raises(ValueError, match="do not match the recorded digest"):
        ramdigest.reconcile(os.getpid(), block, path, mapped, digest)
