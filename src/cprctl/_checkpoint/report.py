"""How operations tell their caller what they are doing (the CLI draws it; the API may ignore it)."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def step(self, message: str) -> None:
        """A step began or something worth saying happened."""

    def progress(self, done: int, total: int, what: str = "saving") -> None:
        """Bytes done so far of *total* (0 when unknown) in the long step *what*.

        *what* is ``saving`` (QEMU writing the state file), ``hashing`` (cprctl
        reading it back for its digest), ``verifying`` (checking that digest
        before a restore) or ``loading`` (QEMU reading the file). ``hashing`` and
        ``verifying`` are reported from worker threads, one call at a time.
        """


class Quiet:
    """A `Reporter` that says nothing."""

    def step(self, message: str) -> None:
        pass

    def progress(self, done: int, total: int, what: str = "saving") -> None:
        pass


def migration_progress(reporter: Reporter, info: dict[str, object]) -> None:
    """Pass ``query-migrate``'s RAM counters (of a save: a load has none) to *reporter*."""
    ram = info.get("ram")
    if isinstance(ram, dict):
        reporter.progress(int(ram.get("transferred", 0)), int(ram.get("total", 0)), "saving")
