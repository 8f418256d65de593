"""``save``: check, plan, (suspend), migrate to a state file, record the checkpoint, quit QEMU.

Until the checkpoint is recorded, any failure (QEMU's, the guest agent's, the
disk's, a Ctrl-C) rolls back: the migration is cancelled, the guest runs again
(woken if cprctl suspended it), the partial state file is removed. After it is
recorded, the VM is saved whatever happens next; a killed cprctl's successor
finishes the job (see `vm.recover`).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Literal

from .._host import clock
from .._qemu.agent import Agent
from .._qemu.argv import ram_layout
from .._qemu.qmp import Monitor
from .._store import StateDir, VMLock
from ..errors import AgentError, CheckFailed, CprctlError, QemuError, VMStateError
from . import disks, statefile
from .facts import gather
from .plan import Plan, Strategy, SuspendMode, choose, direct_io, findings
from .record import Checkpoint, DiskPrint, Operation
from .report import Quiet, Reporter, migration_progress
from .vm import VM, finish_quit, open_vm, recover, resume_guest

#: How long a guest may take to reach ``suspended`` after guest-suspend-ram.
SUSPEND_TIMEOUT = 20.0


@dataclass(frozen=True)
class SaveResult:
    name: str
    strategy: str
    state_file: str
    size: int
    suspended: bool
    timings_ms: dict[str, float]


async def save(
    sd: StateDir,
    name: str,
    *,
    suspend: SuspendMode = "auto",
    strategy: Strategy = "auto",
    reboot: bool = False,
    durable: bool = True,
    force: bool = False,
    verify_disks: Literal["sampled", "full"] = "sampled",
    reporter: Reporter | None = None,
) -> SaveResult:
    """Checkpoint VM *name* with cpr-reboot and stop its QEMU.

    With *durable* (the default), RAM kept in place in a file is flushed to disk
    with the state file, so a host crash after the save loses nothing; ``update``,
    which restores at once, skips that.

    :raise CheckFailed: the preflight check refused; nothing was touched.
    :raise VMStateError: the VM is not running, or is saved already.
    :raise QemuError, AgentError: the save failed and was rolled back (the guest runs).
    """
    reporter = reporter or Quiet()
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "save"):
        await recover(vm, reporter)
        r = vm.record
        if r.checkpoint is not None:
            raise VMStateError(f"{name} is saved already; restore it first")
        if not vm.running():
            raise VMStateError(f"{name} is not running (QEMU pid {r.pid} is gone)")
        t0 = time.perf_counter()
        async with Monitor(r.qmp, name, r.pid) as mon:
            facts = await gather(r, mon, vm.folder, suspend)
            found = findings(facts, reboot=reboot, suspend=suspend, strategy=strategy)
            if [f for f in found if f.blocking and not (force and f.forceable)]:
                raise CheckFailed(name, found)
            plan = choose(facts, suspend, strategy)
            nodes = await mon.execute("query-named-block-nodes", {"flat": True})
            timings = {"check": (time.perf_counter() - t0) * 1000}
            r.operation = Operation("save", os.getpid(), time.time(), state_file=str(vm.state_path))
            r.operation.mark("planned")
            vm.commit()
            try:
                checkpoint = await _checkpoint(
                    vm,
                    mon,
                    plan,
                    facts.status,
                    verify_disks == "full",
                    disks.image_paths(nodes),
                    timings,
                    reporter,
                    durable,
                )
            except BaseException as exc:
                await _rollback(vm, mon, exc, reporter)
                if isinstance(exc, CprctlError) and not vm.running():
                    raise QemuError(
                        f"{name}: QEMU died during the save ({exc}); the VM is stopped and its running state is lost"
                    ) from exc
                raise
            reporter.step(f"{name}: checkpoint recorded ({checkpoint.size / 1e6:.1f} MB); stopping QEMU")
            t1 = time.perf_counter()
            await finish_quit(vm, mon)
            checkpoint.timings_ms["quit"] = (time.perf_counter() - t1) * 1000
        r.operation = None
        vm.commit()
        return SaveResult(
            name, plan.strategy, checkpoint.state_file, checkpoint.size, checkpoint.suspended, checkpoint.timings_ms
        )


async def _checkpoint(
    vm: VM,
    mon: Monitor,
    plan: Plan,
    status: str,
    full_disks: bool,
    images: list[str],
    timings: dict[str, float],
    reporter: Reporter,
    durable: bool,
) -> Checkpoint:
    """Suspend if planned, migrate to the state file, verify it, and record the checkpoint."""
    r, op = vm.record, vm.record.operation
    assert op is not None
    stopped_at = None
    if durable:
        # Flush RAM kept in files while the guest still runs: the flush after the stop then has
        # only what the guest wrote since, and the pause stays short.
        t = time.perf_counter()
        await asyncio.to_thread(_fsync_ram, r.argv)
        timings["preflush"] = (time.perf_counter() - t) * 1000
    if plan.suspend:
        reporter.step(f"{vm.name}: suspending the guest through its agent")
        op.suspended_by_us = True
        op.mark("suspending")
        vm.commit()
        t = time.perf_counter()
        stopped_at = await suspend_guest(vm, mon)
        timings["suspend"] = (time.perf_counter() - t) * 1000
        status = "suspended"
    op.mark("migrating")
    vm.commit()
    reporter.step(f"{vm.name}: saving ({plan.strategy}) to {vm.state_path}")
    vm.state_path.unlink(missing_ok=True)
    t = time.perf_counter()
    before = time.time()
    await mon.set_migration(plan.capabilities, plan.parameters)
    await mon.execute("migrate", {"uri": f"file:{vm.state_path}"})
    os.chmod(vm.state_path, 0o600)
    await mon.wait_migration(timeout=3600, on_progress=lambda i: migration_progress(reporter, i))
    timings["migrate"] = (time.perf_counter() - t) * 1000
    stopped_at = stopped_at or mon.event_time("STOP", before - 1) or before
    t = time.perf_counter()
    # Written with O_DIRECT, the file is not in the page cache: read it back the same way.
    size, digest = await asyncio.to_thread(
        statefile.digest,
        vm.state_path,
        True,
        direct_io(plan.parameters),
        lambda done, total: reporter.progress(done, total, "hashing"),
    )
    inode, mtime_ns = statefile.identity(vm.state_path)
    timings["digest"] = (time.perf_counter() - t) * 1000
    if durable:
        t = time.perf_counter()
        await asyncio.to_thread(_fsync_ram, r.argv)
        timings["flush"] = (time.perf_counter() - t) * 1000
    checkpoint = Checkpoint(
        state_file=str(vm.state_path),
        size=size,
        digest=digest,
        capabilities=plan.capabilities,
        parameters={k: v for k, v in plan.parameters.items() if k != "max-bandwidth"},
        strategy=plan.strategy,
        suspended=op.suspended_by_us,
        was_running=status in ("running", "suspended"),
        stopped_at=stopped_at,
        saved_at=time.time(),
        qemu_version=".".join(map(str, await mon.version())),
        disks=[DiskPrint(p, 0, 0, 0, "", full_disks) for p in images],
        inode=inode,
        mtime_ns=mtime_ns,
        timings_ms=timings,
        boot_id=clock.boot_id(),
    )
    r.checkpoint = checkpoint
    r.lost = None
    op.mark("saved")
    vm.commit()
    return checkpoint


def _fsync_ram(argv: list[str]) -> None:
    """Flush RAM kept in files to disk, so a host crash after the save loses nothing."""
    for b in ram_layout(argv).backends:
        if b.named_shared_file and b.path and os.path.isfile(b.path):
            fd = os.open(b.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


async def suspend_guest(vm: VM, mon: Monitor) -> float:
    """Suspend the guest to RAM through its agent; when it stopped (host time).

    :raise AgentError: the agent is missing, silent or refuses; `QemuError` when the guest
        does not reach ``suspended`` within `SUSPEND_TIMEOUT`.
    """
    if not vm.record.qga:
        raise AgentError(f"{vm.name}: no guest agent channel; launch it with --agent")
    before = time.time()
    async with Agent(vm.record.qga, vm.name) as agent:
        await agent.suspend_ram()
    await mon.wait_status({"suspended"}, SUSPEND_TIMEOUT, poll=0.05)
    return mon.event_time("SUSPEND", before - 1) or time.time()


async def _rollback(vm: VM, mon: Monitor, exc: BaseException, reporter: Reporter) -> None:
    """Undo a save that failed before its checkpoint was recorded; never raises over *exc*."""
    op = vm.record.operation
    assert op is not None
    if vm.record.checkpoint is not None:
        return  # the checkpoint is complete: the caller keeps it
    reason = str(exc) if isinstance(exc, CprctlError) else type(exc).__name__
    try:
        if vm.running():
            await asyncio.shield(resume_guest(mon, op.suspended_by_us))
            reporter.step(f"{vm.name}: save failed ({reason}); rolled back, the guest runs as before")
        else:
            vm.lose(f"its QEMU died during its save (step {op.step}: {reason})")
            reporter.step(f"{vm.name}: save failed: {vm.record.lost}; restore-all boots it afresh")
    except (QemuError, OSError) as err:
        reporter.step(f"{vm.name}: save failed ({reason}) and rollback failed too: {err}")
    finally:
        vm.state_path.unlink(missing_ok=True)
        vm.record.operation = None
        if not vm.running():
            vm.record.pid = None
        vm.commit()
