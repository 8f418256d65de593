"""Unit tests of the state-file digest and the mapped-ram layout (real files, no QEMU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from cprctl._checkpoint import statefile
from cprctl.errors import CheckpointError

MIB = 1 << 20


def _sparse(path: Path) -> bytes:
    """A file with data, a hole of whole chunks, and an odd-sized tail, like a mapped-ram state file."""
    head = statefile.HEADER + os.urandom(3 * MIB)
    tail = os.urandom(5 * MIB + 123)
    with open(path, "wb") as f:
        f.write(head)
        f.seek(4 * statefile.CHUNK)
        f.write(tail)
    return head + bytes(4 * statefile.CHUNK - len(head)) + tail


def test_digest_is_the_same_read_any_way_and_sparse_or_not(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.state"
    dense = tmp_path / "dense.state"
    dense.write_bytes(_sparse(sparse))
    assert os.stat(sparse).st_blocks < os.stat(dense).st_blocks
    want = statefile.digest(dense)
    assert statefile.digest(sparse) == want
    assert statefile.digest(sparse, direct=True) == want
    assert statefile.digest(sparse, direct=True, pace=statefile.BESIDE_LOAD) == want  # 1 MiB requests
    assert statefile.digest(sparse, direct=True, pace=statefile.Pace(3, 64 << 10)) == want
    assert statefile.digest(dense, direct=True) == want


@pytest.mark.parametrize("offset", [0, statefile.CHUNK - 1, 4 * statefile.CHUNK + 5 * MIB + 122])
def test_any_flipped_byte_changes_the_digest(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "s.state"
    data = bytearray(_sparse(path))
    size, digest = statefile.digest(path, direct=True)
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    assert statefile.digest(path)[1] != digest
    for direct in (False, True):
        with pytest.raises(CheckpointError):
            statefile.verify(path, size, digest, direct=direct)


def test_progress_raising_stops_the_digest_early(tmp_path: Path) -> None:
    path = tmp_path / "big.state"
    chunks = 8 * statefile.THREADS
    path.write_bytes(os.urandom(chunks * statefile.CHUNK))
    calls = []

    def stop(done: int, total: int) -> None:
        calls.append(done)
        raise CheckpointError("stopped")

    with pytest.raises(CheckpointError, match="stopped"):
        statefile.digest(path, direct=True, progress=stop)
    assert calls == [statefile.CHUNK], "progress went on being heard after it raised"


# A mapped-ram state file as QEMU lays it out (migration/ram.c): the RAM section's setup names each
# block with its size, then its MappedRamHeader; the block's bitmap follows the header and its pages
# start at the next 1 MiB boundary; the stream goes on after the pages.
PAGE = 4096


def _mapped(path: Path, blocks: dict[str, bytes], written: dict[str, set[int]], addr: bool = False) -> bytes:
    """Write a mapped-ram file holding *blocks* (name -> RAM), of which the pages in *written* are set in
    the bitmaps (the others stay zeros); with *addr*, each block also carries its address
    (``x-ignore-shared``). Its non-RAM bytes, in file order."""
    img = bytearray(statefile.HEADER + b"\x05config-ish" + b"\x01" + (2).to_bytes(4, "big"))
    img += b"\x03ram" + bytes(4) + (4).to_bytes(4, "big")
    img += (sum(len(r) for r in blocks.values()) | 0x04).to_bytes(8, "big")
    device, ram_bytes = bytearray(), 0  # the non-RAM bytes so far; the RAM bytes in img so far
    for name, data in blocks.items():
        img += bytes([len(name)]) + name.encode() + len(data).to_bytes(8, "big")
        if addr:
            img += (0xFEE00000).to_bytes(8, "big")
        pages = len(data) // PAGE
        bitmap_at = len(img) + 28
        bitmap_len = (pages + 63) // 64 * 8
        pages_at = (bitmap_at + bitmap_len + MIB - 1) // MIB * MIB
        img += (1).to_bytes(4, "big") + PAGE.to_bytes(8, "big") + bitmap_at.to_bytes(8, "big")
        img += pages_at.to_bytes(8, "big")
        bitmap = bytearray(bitmap_len)
        for n in written[name]:
            bitmap[n // 8] |= 1 << (n % 8)
        img += bitmap + bytes(pages_at - bitmap_at - bitmap_len)
        device += img[len(device) + ram_bytes :]
        ram = bytearray(len(data))
        for n in written[name]:
            ram[n * PAGE : (n + 1) * PAGE] = data[n * PAGE : (n + 1) * PAGE]
        img += ram
        ram_bytes += len(ram)
    tail = b"\x00device state\x00" * 1000
    img += tail
    device += tail
    path.write_bytes(bytes(img))
    return bytes(device)


def _ram() -> tuple[dict[str, bytes], dict[str, set[int]]]:
    big = bytearray(os.urandom(6 * MIB))
    big[PAGE : 2 * PAGE] = bytes(PAGE)  # a zero page: not written, a hole in the file
    return {"pc.ram": bytes(big), "pc.bios": os.urandom(64 << 10)}, {
        "pc.ram": set(range(6 * MIB // PAGE)) - {1},
        "pc.bios": set(range(16)),
    }


@pytest.mark.parametrize("addr", [False, True])
def test_mapped_ram_layout_and_what_qemu_loads(tmp_path: Path, addr: bool) -> None:
    path = tmp_path / "m.state"
    blocks, written = _ram()
    device = _mapped(path, blocks, written, addr)
    layout = statefile.mapped_ram_layout(path)
    assert [(b.name, b.used) for b in layout] == [(n, len(d)) for n, d in blocks.items()]
    assert all(b.pages % MIB == 0 for b in layout)

    assert statefile.device_digest(path, layout) == f"xxh3_128d:{xxhash.xxh3_128(device).hexdigest()}"
    for b in layout:  # the file route gives the digest of the RAM QEMU loads: set pages, zeros elsewhere
        want = xxhash.xxh3_128()
        data = blocks[b.name]
        for off in range(0, len(data), statefile.CHUNK):
            want.update(xxhash.xxh3_128(data[off : off + statefile.CHUNK]).digest())
        assert statefile.loaded_digest(path, b) == f"xxh3_128c:{want.hexdigest()}"


def test_mapped_ram_flips_are_caught_where_they_matter(tmp_path: Path) -> None:
    path = tmp_path / "m.state"
    blocks, written = _ram()
    _mapped(path, blocks, written)
    layout = statefile.mapped_ram_layout(path)
    ram = {b.name: (b.used, statefile.loaded_digest(path, b)) for b in layout}
    device = statefile.device_digest(path, layout)
    size = path.stat().st_size
    statefile.verify_mapped(path, size, device, ram)
    pc = layout[0]
    for at, what in [(pc.pages + 5 * PAGE + 7, "RAM block pc.ram"), (size - 10, "corrupt: digest xxh3_128d")]:
        data = bytearray(path.read_bytes())
        data[at] ^= 0x08
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=what):
            statefile.verify_mapped(path, size, device, ram)
        data[at] ^= 0x08
        path.write_bytes(bytes(data))
    # A byte of a page QEMU never wrote (its bit is clear) is not loaded: the guest's RAM is unchanged.
    with open(path, "r+b") as f:
        f.seek(pc.pages + 1 * PAGE + 9)
        f.write(b"\x01")
    statefile.verify_mapped(path, size, device, ram)
    with pytest.raises(CheckpointError, match="not those recorded"):
        statefile.verify_mapped(path, size, device, {**ram, "pc.rom": (PAGE, "x")})
