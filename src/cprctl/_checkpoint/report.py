"""How operations tell their caller what they are doing (the CLI draws it; the API may ignore it)."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def step(self, message: str) -> None:
        """A step began or something worth saying happened."""

    def progress(self, done: int, total: int) -> None:
        """Bytes of a migration written or read so far, of *total* (0 when unknown)."""


class Quiet:
    """A `Reporter` that says nothing."""

    def step(self, message: str) -> None:
        pass

    def progress(self, done: int, total: int) -> None:
        pass
