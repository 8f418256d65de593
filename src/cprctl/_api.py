"""The Python API: one blocking function per operation, used by the CLI and other tools alike.

Each takes ``state_dir`` (default: ``$CPRCTL_STATE_DIR``, /var/lib/cprctl for
root, else ``$XDG_STATE_HOME/cprctl``) and raises only `CprctlError`
subclasses on purpose (see `cprctl.errors`).
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._store import StateDir

# Each function imports the operation module it runs: a ``cprctl restore`` process then loads only what
# a restore needs (its start-up falls inside the guest's pause), not the fleet, update and inspection
# machinery, and ``import cprctl`` stays cheap.
if TYPE_CHECKING:
    from ._checkpoint.compat import HandoverMode
    from ._checkpoint.fleet import VMOutcome
    from ._checkpoint.inspect import VMStatus
    from ._checkpoint.plan import Finding, Strategy, SuspendMode
    from ._checkpoint.reboot import RebootPlan
    from ._checkpoint.record import VMRecord
    from ._checkpoint.report import Reporter
    from ._checkpoint.restore import RestoreResult
    from ._checkpoint.save import SaveResult
    from ._checkpoint.update import UpdateResult

T = TypeVar("T")

PathLike = Path | str | None


def _run(operation: Coroutine[Any, Any, T]) -> T:
    import asyncio

    return asyncio.run(operation)


def launch(name: str, argv: Sequence[str], *, agent: bool = False, state_dir: PathLike = None) -> VMRecord:
    """Start ``argv`` (a QEMU command line) detached as managed VM *name*; returns once QMP answers.

    The machine type is pinned, a QMP socket (and with *agent* a guest agent
    channel) added, and the exact argv recorded.
    """
    from ._checkpoint import lifecycle

    return _run(lifecycle.launch(StateDir(state_dir), name, argv, agent))


def adopt(name: str, qmp: str, *, qga: str | None = None, state_dir: PathLike = None) -> VMRecord:
    """Manage a running QEMU that something else started, reachable at QMP socket *qmp*."""
    from ._checkpoint import lifecycle

    return _run(lifecycle.adopt(StateDir(state_dir), name, qmp, qga))


def save(
    name: str,
    *,
    suspend: SuspendMode = "auto",
    strategy: Strategy = "auto",
    reboot: bool = False,
    force: bool = False,
    verify_disks: Literal["sampled", "full"] = "sampled",
    reporter: Reporter | None = None,
    state_dir: PathLike = None,
) -> SaveResult:
    """Checkpoint VM *name* with cpr-reboot and stop its QEMU (see `cprctl.errors` for failures).

    *reboot* also requires what a host reboot needs (RAM kept in place on
    non-volatile storage) and flushes RAM files to disk.
    """
    from ._checkpoint import save as _save

    return _run(
        _save.save(
            StateDir(state_dir),
            name,
            suspend=suspend,
            strategy=strategy,
            reboot=reboot,
            force=force,
            verify_disks=verify_disks,
            reporter=reporter,
        )
    )


def restore(
    name: str,
    *,
    qemu: str | None = None,
    force: bool = False,
    sync_time: bool = True,
    reporter: Reporter | None = None,
    state_dir: PathLike = None,
) -> RestoreResult:
    """Resume VM *name* from its checkpoint, optionally on QEMU binary *qemu*."""
    from ._checkpoint import restore as _restore

    return _run(
        _restore.restore(StateDir(state_dir), name, qemu=qemu, force=force, sync_time=sync_time, reporter=reporter)
    )


def update(
    name: str,
    qemu: str,
    *,
    suspend: SuspendMode = "auto",
    force: bool = False,
    warm: bool = True,
    sync_time: bool = True,
    mode: HandoverMode = "auto",
    reporter: Reporter | None = None,
    state_dir: PathLike = None,
) -> UpdateResult:
    """Move running VM *name* onto QEMU binary *qemu*.

    Warm standby (the new QEMU started beside the old, the state handed over
    directly: the guest pauses for milliseconds) when the VM's configuration
    allows two QEMUs side by side; otherwise, or with ``warm=False``, save +
    restore. ``UpdateResult.cold_reason`` says why the cold path ran.
    *mode* picks how a warm update hands over: ``auto``, ``standby``, or QEMU's
    ``cpr-transfer`` (falls back to the standby when it cannot run; ``UpdateResult.mode``
    and ``mode_reason`` say which ran and why).
    """
    from ._checkpoint import update as _update

    return _run(
        _update.update(
            StateDir(state_dir),
            name,
            qemu,
            suspend=suspend,
            force=force,
            warm=warm,
            sync_time=sync_time,
            mode=mode,
            reporter=reporter,
        )
    )


def check(
    name: str,
    *,
    reboot: bool = False,
    suspend: SuspendMode = "auto",
    strategy: Strategy = "auto",
    qemu: str | None = None,
    trial: bool = False,
    state_dir: PathLike = None,
) -> list[Finding]:
    """The preflight check of VM *name*, worst finding first; touches nothing.

    With *qemu*, also what that binary lacks to take the VM (as ``update`` checks). With *trial*, a saved
    VM's checkpoint is first loaded into the binary a restore would use (or *qemu*) under ``-S`` and that
    QEMU killed: the outcome is recorded as a proof (the guest never runs there).
    """
    from ._checkpoint import inspect

    return _run(
        inspect.check(
            StateDir(state_dir), name, reboot=reboot, suspend=suspend, strategy=strategy, qemu=qemu, trial=trial
        )
    )


def status(name: str | None = None, *, reporter: Reporter | None = None, state_dir: PathLike = None) -> list[VMStatus]:
    """Status of VM *name*, or of every managed VM (finishing what a killed cprctl left undone)."""
    from ._checkpoint import inspect

    return _run(inspect.status(StateDir(state_dir), name, reporter))


def stop(name: str, *, state_dir: PathLike = None) -> None:
    """Power VM *name* off (the guest is not saved); it stays managed, as ``stopped``."""
    from ._checkpoint import lifecycle

    _run(lifecycle.stop(StateDir(state_dir), name))


def remove(name: str, *, force: bool = False, state_dir: PathLike = None) -> None:
    """Stop managing VM *name* (not running; saved only with *force*) and delete its folder."""
    from ._checkpoint import lifecycle

    lifecycle.remove(StateDir(state_dir), name, force)


def save_all(
    *,
    reboot: bool = False,
    parallel: int | None = None,
    suspend: SuspendMode = "auto",
    force: bool = False,
    shutdown_unsaveable: bool = False,
    trial: bool = False,
    reporter: Reporter | None = None,
    state_dir: PathLike = None,
) -> list[VMOutcome]:
    """Save every running VM, *parallel* at a time (default: one per core).

    With *reboot*, every VM must pass ``check --reboot`` first, or none is
    touched (`FleetCheckFailed`). With *shutdown_unsaveable* (the host is going
    down), each VM that passes is saved and each other one is shut down cleanly
    (guest agent, else ACPI) and booted afresh by the next `restore_all`.
    With *trial*, each checkpoint is then loaded into the binary a restore will use, as ``check --trial``.
    Returns one `VMOutcome` per managed VM.
    """
    from ._checkpoint import fleet

    return _run(
        fleet.save_all(
            StateDir(state_dir),
            reboot=reboot,
            parallel=parallel,
            suspend=suspend,
            force=force,
            shutdown_unsaveable=shutdown_unsaveable,
            trial=trial,
            reporter=reporter,
        )
    )


def restore_all(
    *, parallel: int | None = None, sync_time: bool = True, reporter: Reporter | None = None, state_dir: PathLike = None
) -> list[VMOutcome]:
    """Restore every saved VM, *parallel* at a time; one `VMOutcome` per managed VM."""
    from ._checkpoint import fleet

    return _run(fleet.restore_all(StateDir(state_dir), parallel=parallel, sync_time=sync_time, reporter=reporter))


def update_all(
    *,
    qemu: str | None = None,
    parallel: int | None = None,
    suspend: SuspendMode = "auto",
    force: bool = False,
    reporter: Reporter | None = None,
    state_dir: PathLike = None,
) -> list[VMOutcome]:
    """Move every VM whose QEMU binary a package replaced on disk onto the binary now there (warm where
    it can); with *qemu*, every running VM onto *qemu*. One `VMOutcome` per managed VM."""
    from ._checkpoint import fleet

    return _run(
        fleet.update_all(
            StateDir(state_dir), qemu=qemu, parallel=parallel, suspend=suspend, force=force, reporter=reporter
        )
    )


def start(name: str, *, state_dir: PathLike = None) -> VMRecord:
    """Boot stopped VM *name* afresh from its recorded argv (a cold boot: its old running state is gone)."""
    from ._checkpoint import lifecycle

    return _run(lifecycle.start(StateDir(state_dir), name))


def ping(name: str, *, timeout: float = 10.0, state_dir: PathLike = None) -> float:
    """Round-trip time (ms) of the guest agent's ``guest-ping``; raises `AgentError` if it does not answer."""
    from ._checkpoint import lifecycle

    return _run(lifecycle.ping(StateDir(state_dir), name, timeout))


def reboot(
    *,
    kexec: bool = False,
    kernel: str | None = None,
    initrd: str | None = None,
    append: str | None = None,
    dry_run: bool = False,
    suspend: SuspendMode = "auto",
    force: bool = False,
    reporter: Reporter | None = None,
    state_dir: PathLike = None,
) -> RebootPlan:
    """Reboot the host through systemd once its shutdown is sure to save every VM: ``cprctl-guests.service``
    installed, enabled and active, every VM passing ``check --reboot``. With *kexec*, ``kexec -l`` *kernel*
    (default: the newest in /boot, with its initrd and the running command line) then ``systemctl kexec``;
    else ``systemctl reboot``. With *dry_run*, only the plan (``RebootPlan.refusals`` says what would refuse).

    :raise UsageError: the host cannot (no systemd, the unit, kexec or a kernel missing);
        `FleetCheckFailed`: a VM would not survive it. Nothing is touched then.
    """
    from ._checkpoint import reboot as _reboot

    return _run(
        _reboot.reboot(
            StateDir(state_dir),
            use_kexec=kexec,
            kernel=kernel,
            initrd=initrd,
            append=append,
            dry_run=dry_run,
            suspend=suspend,
            force=force,
            reporter=reporter,
        )
    )
