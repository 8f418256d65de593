"""Moving the paths a QEMU serves (`argv.served_sockets`) from one QEMU of a VM to the next.

A second QEMU started beside a running one binds each such path at ``PATH + suffix``;
these helpers only rename and unlink those paths, nothing else.
"""

from __future__ import annotations

import contextlib
import os


def take_over_sockets(paths: list[str], suffix: str) -> None:
    """Point each served socket path at the new QEMU (which bound ``PATH + suffix``)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.replace(path + suffix, path)


def drop_sockets(paths: list[str], suffix: str) -> None:
    """Remove the side paths (``PATH + suffix``) of a new QEMU that did not take over."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
