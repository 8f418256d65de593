"""
cprctl's errors.

Every error cprctl raises on purpose is a `CprctlError`; its ``str()`` is one
line an operator can act on. The subclasses say whose fault it was:

.. admonition:: Exception hierarchy

 |   `Exception`
 |    +-- `CprctlError`
 |         +-- `UsageError`        bad input from the caller (a name, a flag, an argv)
 |         +-- `VMNotFound`        no VM of that name in the state directory
 |         +-- `VMStateError`      the VM is not in a state that allows the operation
 |         +-- `BusyError`         another cprctl holds the VM's lock
 |         +-- `CheckFailed`       the preflight check refused (``findings`` says why)
 |         |    +-- `FleetCheckFailed`  save-all --reboot: some VM would not survive a reboot
 |         +-- `RecordError`       a record on disk is malformed or from a newer cprctl
 |         +-- `StateDirError`     the state directory is unsafe or unusable
 |         +-- `CheckpointError`   a checkpoint failed verification (state file, disks)
 |         +-- `QemuError`         QEMU broke: would not start, too old, QMP silent,
 |         |    |                  migration failed, process died
 |         |    +-- `MigrationError`  the migration itself failed
 |         +-- `AgentError`        the guest agent did not answer or refused
 |
 The caller's faults (`UsageError`, `VMNotFound`, `VMStateError`, `BusyError`,
 `CheckFailed`) never leave anything changed. The rest may happen half-way;
 cprctl then rolls back (the guest keeps running) or keeps everything needed to
 try again (the checkpoint), and the message says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._checkpoint.plan import Finding

__all__ = (
    "CprctlError",
    "UsageError",
    "VMNotFound",
    "VMStateError",
    "BusyError",
    "CheckFailed",
    "FleetCheckFailed",
    "RecordError",
    "StateDirError",
    "CheckpointError",
    "QemuError",
    "MigrationError",
    "AgentError",
)


class CprctlError(Exception):
    """Base of every error cprctl raises on purpose; ``str()`` is one line."""

    #: Process exit status the CLI uses for this error.
    exit_code: int = 1


class UsageError(CprctlError):
    """The caller passed something invalid (name, option, argv)."""

    exit_code = 2


class VMNotFound(CprctlError):
    """No VM of that name is managed in the state directory."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no VM named {name!r} (see 'cprctl status')")
        self.name = name


class VMStateError(CprctlError):
    """The VM is not in a state that allows the operation (e.g. not running)."""


class BusyError(CprctlError):
    """Another cprctl operation holds the VM's lock."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class CheckFailed(CprctlError):
    """The preflight check found errors; nothing was touched."""

    def __init__(self, name: str, findings: Sequence[Finding]) -> None:
        worst = [f for f in findings if f.blocking]
        first = worst[0] if worst else None
        more = f" (+{len(worst) - 1} more, see 'cprctl check {name}')" if len(worst) > 1 else ""
        text = f"{first.message}; fix: {first.fix}" if first else "check failed"
        super().__init__(f"{name}: refused, nothing touched: {text}{more}")
        self.findings = list(findings)


class FleetCheckFailed(CheckFailed):
    """``save-all --reboot`` (or ``reboot``) refused because some VM would not survive the reboot; no VM was
    touched."""

    def __init__(self, refused: dict[str, list[Finding]], command: str = "save-all --reboot") -> None:
        name, findings = next(iter(refused.items()))
        worst = next((f for f in findings if f.blocking), findings[0])
        CprctlError.__init__(
            self,
            f"{command} refused, no VM touched: {', '.join(refused)} would not survive a reboot "
            f"({name}: {worst.message}; fix: {worst.fix})",
        )
        self.findings = list(findings)
        self.refused = refused


class RecordError(CprctlError):
    """A record file is malformed, unreadable, or written by a newer cprctl."""


class StateDirError(CprctlError):
    """The state directory (or a VM folder in it) is unsafe or unusable."""


class CheckpointError(CprctlError):
    """A checkpoint failed verification; its files are kept for inspection."""


class QemuError(CprctlError):
    """QEMU failed: it would not start, is too old, stopped answering, or died.

    When QEMU refused a QMP command, `error_class` is QMP's error class (``GenericError``,
    ``DeviceNotFound``, ...) and ``__cause__`` is qemu.qmp's error (what was sent and received).
    """

    def __init__(self, message: str, *, error_class: str | None = None) -> None:
        super().__init__(message)
        #: QMP's error class when QEMU refused a command, else None.
        self.error_class = error_class


class MigrationError(QemuError):
    """QEMU's migration (save or load of the VM state) failed."""


class AgentError(CprctlError):
    """The QEMU guest agent did not answer in time, or refused a command."""
