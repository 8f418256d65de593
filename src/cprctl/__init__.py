"""cprctl: update QEMU or reboot the host without losing running VMs, with QEMU's cpr-reboot.

The public API is this module's ``__all__``; everything in ``_``-modules is
private. Errors are in `cprctl.errors`.
"""

from ._api import (
    adopt,
    check,
    launch,
    ping,
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
from ._checkpoint.record import Checkpoint, VMRecord
from ._checkpoint.report import Reporter
from ._checkpoint.restore import RestoreResult
from ._checkpoint.save import SaveResult
from ._checkpoint.update import UpdateResult
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

__version__ = "0.1.0"

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
    # Results and records
    "SaveResult",
    "RestoreResult",
    "UpdateResult",
    "VMOutcome",
    "VMStatus",
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
