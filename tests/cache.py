"""One cache of test roots and images built on first use (the nspawn root, the host VM's image)."""

from __future__ import annotations

import fcntl
import shutil
import time
from collections.abc import Callable
from pathlib import Path

#: Entries of other recipes older than this are removed (another checkout may still use a newer one).
KEEP_OTHERS_S = 86400


def cached(cache: Path, key: str, marker: str, build: Callable[[Path], None]) -> Path:
    """``cache/key``, built by *build* unless its *marker* file exists; one builder at a time.

    Entries of other recipes are removed once a day old.
    """
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / key
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / marker).exists():
            shutil.rmtree(dest, ignore_errors=True)
            build(dest)
        for old in cache.iterdir():
            if (
                old.is_dir()
                and old != dest
                and not old.name.startswith(".")
                and old.stat().st_mtime < time.time() - KEEP_OTHERS_S
            ):
                shutil.rmtree(old, ignore_errors=True)
    return dest
