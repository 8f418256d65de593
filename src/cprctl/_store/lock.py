"""One operation per VM at a time: an flock on a file in the VM's folder.

The kernel drops an flock when its holder dies, so a killed cprctl never leaves
a stale lock behind. The holder writes who it is into the file so that the
next caller can say what it waits for.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from ..errors import BusyError

LOCK_FILE = ".lock"


class VMLock:
    """Exclusive, non-blocking lock on one VM folder; use as a context manager.

    :raise BusyError: on enter, when another process holds the lock.
    """

    def __init__(self, folder: Path, name: str, operation: str) -> None:
        self.path = folder / LOCK_FILE
        self.name = name
        self.operation = operation
        self._fd: int | None = None

    def __enter__(self) -> VMLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BusyError(f"{self.name}: busy: {holder}; try again when it is done") from None
        stamp = time.strftime("%H:%M:%S")
        text = f"'{self.operation}' by pid {os.getpid()} since {stamp}\n".encode()
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int, wait: float = 0.2) -> str:
    """Who holds the lock, as it wrote into the file; the holder may be a moment away from writing it."""
    deadline = time.monotonic() + wait
    while not (text := os.pread(fd, 200, 0).decode(errors="replace").strip()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return text or "another process"
