"""cprctl: update QEMU or reboot the host without losing running VMs, with QEMU's cpr-reboot.

The public API is this module's ``__all__``; everything in ``_``-modules is
private. Errors are in `cprctl.errors`.
"""

from typing import TYPE_CHECKING

from .errors import (
    AgentError,
    BusyError,
    CheckFailed,
    CheckpointError,
    CprctlError,
    FleetCheckFailed,
    MigrationError,
    QemuError,
    RecordError,
    StateDirError,
    UsageError,
    VMNotFound,
    VMStateError,
)

if TYPE_CHECKING:
    from ._api import (
        adopt,
        check,
        launch,
        ping,
        reboot,
        remove,
        restore,
        restore_all,
        save,
        save_all,
        start,
        status,
        stop,
        update,
        update_all,
    )
    from ._checkpoint.fleet import VMOutcome
    from ._checkpoint.inspect import VMStatus
    from ._checkpoint.plan import Finding
    from ._checkpoint.reboot import RebootPlan, VMPlan
    from ._checkpoint.record import Checkpoint, VMRecord
    from ._checkpoint.report import Reporter
    from ._checkpoint.restore import RestoreResult
    from ._checkpoint.save import SaveResult
    from ._checkpoint.update import UpdateResult

__version__ = "0.1.0"

#: Where each lazily imported public name lives: ``import cprctl`` (and the CLI's start-up, which
#: falls inside a ``cprctl restore``'s pause) loads only what is used.
_LAZY = {
    **dict.fromkeys(
        (
            "launch",
            "adopt",
            "save",
            "restore",
            "update",
            "save_all",
            "restore_all",
            "update_all",
            "check",
            "status",
            "start",
            "stop",
            "remove",
            "ping",
            "reboot",
        ),
        "._api",
    ),
    "VMOutcome": "._checkpoint.fleet",
    "VMStatus": "._checkpoint.inspect",
    "Finding": "._checkpoint.plan",
    "RebootPlan": "._checkpoint.reboot",
    "VMPlan": "._checkpoint.reboot",
    "Checkpoint": "._checkpoint.record",
    "VMRecord": "._checkpoint.record",
    "Reporter": "._checkpoint.report",
    "RestoreResult": "._checkpoint.restore",
    "SaveResult": "._checkpoint.save",
    "UpdateResult": "._checkpoint.update",
}


def __getattr__(name: str) -> object:
    """Import a public name on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = (
    # Operations
    "launch",
    "adopt",
    "save",
    "restore",
    "update",
    "save_all",
    "restore_all",
    "update_all",
    "check",
    "status",
    "start",
    "stop",
    "remove",
    "ping",
    "reboot",
    # Results and records
    "SaveResult",
    "RestoreResult",
    "UpdateResult",
    "VMOutcome",
    "VMStatus",
    "RebootPlan",
    "VMPlan",
    "Finding",
    "VMRecord",
    "Checkpoint",
    "Reporter",
    # Errors, most generic first
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
