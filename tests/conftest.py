from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cprctl._qemu import process

from .guestvm import short_tmp


def kill_qemus_under(root: Path) -> None:
    """Kill every process whose command line mentions *root* (the QEMUs of one test module)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(root).encode() in cmd and b"qemu" in cmd:
                process.kill(int(proc.name), timeout=2)


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    """A state directory for one test module; every QEMU started under it is killed at the end."""
    root = short_tmp()
    yield root / "state"
    kill_qemus_under(root)
    shutil.rmtree(root, ignore_errors=True)
