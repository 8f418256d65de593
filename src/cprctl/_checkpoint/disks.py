"""Disk fingerprints: proof that no image changed between save and restore.

A sampled fingerprint reads the first and last MiB and 64 blocks of 64 KiB
spread over the image (about 6 MiB whatever the size), plus size, inode and
mtime; ``full`` digests the whole file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import xxhash

from .record import DiskPrint

_EDGE = 1 << 20
_BLOCK = 64 << 10
_SAMPLES = 64


def image_paths(nodes: list[dict[str, Any]]) -> list[str]:
    """Host files behind ``query-named-block-nodes`` (protocol nodes ``file``/``host_device``)."""
    paths = {n["file"] for n in nodes if n.get("drv") in ("file", "host_device") and n.get("file")}
    return sorted(paths)


def _offsets(size: int) -> list[tuple[int, int]]:
    spans = [(0, min(size, _EDGE)), (max(0, size - _EDGE), min(size, _EDGE))]
    step = max(1, size // _SAMPLES)
    spans += [(i * step, _BLOCK) for i in range(_SAMPLES) if i * step < size]
    return spans


def fingerprint(path: str, full: bool = False) -> DiskPrint:
    """Fingerprint the image at *path* (sampled, or the whole file with *full*)."""
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = os.lseek(fd, 0, os.SEEK_END)
        if full:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, 8 << 20):
                h.update(chunk)
        else:
            for offset, length in _offsets(size):
                h.update(os.pread(fd, length, offset))
    finally:
        os.close(fd)
    kind = "full" if full else "sampled"
    return DiskPrint(path, size, st.st_ino, st.st_mtime_ns, f"{kind}:{h.hexdigest()}", full)


def changed(old: DiskPrint, full: bool = False) -> str | None:
    """Why the image at ``old.path`` differs from *old*, or None when it is the same."""
    if not Path(old.path).exists():
        return "it is gone"
    new = fingerprint(old.path, full=full and old.full)
    if new.size != old.size:
        return f"its size changed ({old.size} -> {new.size})"
    if new.inode != old.inode:
        return "it was replaced (new inode)"
    if new.mtime_ns != old.mtime_ns:
        return "it was written to (mtime changed)"
    if new.digest != old.digest:
        return "its content changed"
    return None
