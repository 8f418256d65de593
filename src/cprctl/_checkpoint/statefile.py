"""State files: their digest and the QEMU migration stream header.

Digest: xxh3-128. Measured here on a 3 GiB file in page cache, 8 MiB reads:
xxh3-128 15 GB/s, sha1 2.0 GB/s, sha256 1.9 GB/s, blake2b 1.2 GB/s. A state
file is guarded against corruption, not against an attacker (the folder is
0700), so the fastest well-mixed hash wins.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from ..errors import CheckpointError

ALGORITHM = "xxh3_128"
#: QEMU_VM_FILE_MAGIC ('QEVM') and QEMU_VM_FILE_VERSION (3), big-endian.
HEADER = b"QEVM\x00\x00\x00\x03"
_CHUNK = 8 << 20


def digest(path: Path, fsync: bool = False) -> tuple[int, str]:
    """``(size, "xxh3_128:<hex>")`` of *path*; with *fsync*, flush it to disk first."""
    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fsync:
            os.fsync(fd)
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            size += n
    finally:
        os.close(fd)
    return size, f"{ALGORITHM}:{h.hexdigest()}"


def verify(path: Path, size: int, expected: str) -> None:
    """Refuse a state file that is missing, of the wrong size, not a QEMU stream, or altered.

    :raise CheckpointError: naming what is wrong; the file is left as it is.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"state file {path} is missing") from None
    if st.st_size != size:
        raise CheckpointError(
            f"state file {path} is {st.st_size} bytes, the checkpoint recorded {size}: truncated or replaced"
        )
    with open(path, "rb") as f:
        head = f.read(len(HEADER))
    if head != HEADER:
        raise CheckpointError(f"state file {path} does not start with a QEMU migration header (QEVM, version 3)")
    actual = digest(path)[1]
    if actual != expected:
        raise CheckpointError(f"state file {path} is corrupt: digest {actual} != recorded {expected}")
