"""Unit tests of reading QEMU's RAM blocks (real process memory, no QEMU)."""

from __future__ import annotations

import ctypes
import mmap
import os

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
