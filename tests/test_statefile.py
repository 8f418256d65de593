"""Unit tests of the state-file digest (real files, no QEMU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
    assert statefile.digest(dense, fsync=True, direct=True) == want


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
