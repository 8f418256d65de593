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
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, TypeVar

from .._host import clock
from .._qemu import ramblocks, virtio
from .._qemu.agent import Agent
from .._qemu.qmp import Monitor
from .._qemu.ramblocks import RamBlock
from .._store import StateDir, VMLock
from ..errors import AgentError, CheckFailed, CheckpointError, CprctlError, QemuError, VMStateError
from . import canary, disks, kept, ramdigest, statefile
from .facts import gather
from .plan import Plan, Strategy, SuspendMode, choose, direct_io, findings
from .record import Checkpoint, DiskPrint, Operation, RamPrint
from .report import Quiet, Reporter, migration_progress
from .vm import VM, finish_quit, open_vm, recover, resume_guest

T = TypeVar("T")

#: How long a guest may take to reach ``suspended`` after guest-suspend-ram.
SUSPEND_TIMEOUT = 20.0
#: Runstates of a QEMU whose guest cannot change its RAM: a cpr-reboot migration stops the guest
#: (``finish-migrate``) before QEMU writes any RAM.
STOPPED = {"finish-migrate", "postmigrate", "paused", "suspended"}


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
        # At the latest now: the checkpoint names the build that writes it (restore may fall back to it).
        await asyncio.to_thread(kept.keep, vm, reporter)
        timings = {"keep": (time.perf_counter() - t0) * 1000}
        async with Monitor(r.qmp, name, r.pid) as mon:
            facts, nodes = await asyncio.gather(
                gather(r, mon, vm.folder, suspend), mon.execute("query-named-block-nodes", {"flat": True})
            )
            found = findings(facts, reboot=reboot, suspend=suspend, strategy=strategy)
            if [f for f in found if f.blocking and not (force and f.forceable)]:
                raise CheckFailed(name, found)
            plan = choose(facts, suspend, strategy)
            timings["check"] = (time.perf_counter() - t0) * 1000
            r.operation = Operation("save", os.getpid(), time.time(), state_file=str(vm.state_path))
            r.operation.mark("planned")
            # Not flushed: the guest still runs, and after a host crash before "migrating" (flushed) the VM is
            # booted afresh either way; a killed cprctl's successor reads it all the same.
            vm.commit(durable=False)
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
        # Not flushed: the checkpoint was (step "saved"); after a host crash before this reaches the disk,
        # recovery finishes the save from that step just the same (`vm._recover_save`).
        vm.commit(durable=False)
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
        await asyncio.to_thread(_fsync_ram, r.argv, r.cwd)
        timings["preflush"] = (time.perf_counter() - t) * 1000
    # The virtqueues a restore on another build must allocate, asked while the guest still runs (not
    # in its pause): a guest's driver may only shrink a queue below what QEMU allocated.
    t = time.perf_counter()
    hashable = _blocks_to_hash(mon, r.pid, plan) if plan.strategy == "mapped-ram" else _no_blocks()
    queues, blocks = await asyncio.gather(virtio.devices(mon), hashable)
    timings["virtio"] = (time.perf_counter() - t) * 1000
    if plan.suspend:
        reporter.step(f"{vm.name}: suspending the guest through its agent")
        op.suspended_by_us = True
        op.mark("suspending")
        vm.commit()
        t = time.perf_counter()
        stopped_at = await suspend_guest(vm, mon)
        timings["suspend"] = (time.perf_counter() - t) * 1000
        status = "suspended"
    t = time.perf_counter()
    op.mark("migrating")
    vm.commit()
    timings["journal"] = (time.perf_counter() - t) * 1000
    reporter.step(f"{vm.name}: saving ({plan.strategy}) to {vm.state_path}")
    vm.state_path.unlink(missing_ok=True)
    t = time.perf_counter()
    before = time.time()
    await mon.set_migration(plan.capabilities, plan.parameters)
    timings["setup"] = (time.perf_counter() - t) * 1000
    await mon.execute("migrate", {"uri": f"file:{vm.state_path}"})
    os.chmod(vm.state_path, 0o600)
    hashing = _MemoryDigest(r.pid, reporter)
    if blocks:
        await hashing.start(mon, blocks)
        timings["stopped"] = (time.perf_counter() - t) * 1000
    try:
        await mon.wait_migration(timeout=3600, on_progress=lambda i: migration_progress(reporter, i))
        hashing.written.set()
        timings["migrate"] = (time.perf_counter() - t) * 1000
        stopped_at = stopped_at or mon.event_time("STOP", before - 1) or before
        # The migration's part of the guest's pause (`timeline.shares`: QEMU's own share of the downtime).
        timings["migrate_stopped"] = max(0.0, time.time() - stopped_at) * 1000
        # The disk flushes the file while the CPU finishes its digest: neither waits for the other.
        t = time.perf_counter()
        (size, digest, ram), _ = await asyncio.gather(
            _timed(_digest(vm, plan, hashing, reporter), timings, "digest", t),
            _timed(asyncio.to_thread(statefile.flush, vm.state_path), timings, "sync", t),
        )
    finally:
        hashing.written.set()
        hashing.stop.set()  # on a failure, a digest still reading QEMU's memory stops at its next chunk
    inode, mtime_ns = statefile.identity(vm.state_path)
    if durable:
        t = time.perf_counter()
        await asyncio.to_thread(_fsync_ram, r.argv, r.cwd)
        timings["flush"] = (time.perf_counter() - t) * 1000
    # The RAM kept in files has its final content now (on disk when durable, else in the page cache).
    t = time.perf_counter()
    kept_ram = await asyncio.to_thread(canary.take_kept, r.argv, plan.capabilities, r.cwd)
    timings["canary"] = (time.perf_counter() - t) * 1000
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
        virtio=queues,
        build=r.build,
        boot_id=clock.boot_id(),
        ram=ram,
        kept_ram=kept_ram,
    )
    r.checkpoint = checkpoint
    r.lost = None
    op.mark("saved")
    vm.commit()
    return checkpoint


async def _no_blocks() -> list[RamBlock] | None:
    return None


async def _blocks_to_hash(mon: Monitor, pid: int | None, plan: Plan) -> list[RamBlock] | None:
    """The RAM blocks a mapped-ram save writes, to hash from QEMU's memory (blocks left in place
    by ``x-ignore-shared`` are not); None when QEMU does not say where they are."""
    try:
        blocks = await ramblocks.query(mon)
    except QemuError:
        return None
    if pid is None:
        return None
    if plan.capabilities.get("x-ignore-shared"):
        blocks = [b for b in blocks if not ramblocks.shared_file_backed(pid, b.host)]
    return blocks


class _MemoryDigest:
    """The digest of the saving QEMU's RAM blocks, taken in a thread while QEMU writes them."""

    def __init__(self, pid: int | None, reporter: Reporter) -> None:
        self.pid, self.reporter = pid, reporter
        self.stop = threading.Event()
        #: Set once QEMU's write has ended: until then the digest yields the CPU to it (as root, which may
        #: take the priority back after; `ramdigest.YIELD_NICE`).
        self.written = threading.Event()
        if os.geteuid() != 0:
            self.written.set()
        self.blocks: dict[str, RamBlock] = {}
        self.task: asyncio.Future[dict[str, str]] | None = None

    async def start(self, mon: Monitor, blocks: list[RamBlock]) -> None:
        """Start hashing *blocks* once the guest has stopped (cpr-reboot stops it before QEMU writes RAM);
        not when the migration failed first (`Monitor.wait_migration` then reports why)."""
        deadline = time.monotonic() + 30
        while await mon.status() not in STOPPED:
            if (await mon.execute("query-migrate")).get("status") in ("failed", "cancelled", "cancelling"):
                return
            if time.monotonic() > deadline:
                raise QemuError(f"{mon.name}: the guest did not stop within 30 s of the migration's start")
            await asyncio.sleep(0.005)
        self.blocks = {b.name: b for b in blocks}
        self.task = asyncio.ensure_future(asyncio.to_thread(self.hash, blocks))
        self.task.add_done_callback(lambda f: f.cancelled() or f.exception())  # read on every path

    def hash(self, blocks: list[RamBlock]) -> dict[str, str]:
        assert self.pid is not None

        def hashing(done: int, total: int) -> None:
            if self.stop.is_set():
                raise OSError("stopped")
            self.reporter.progress(done, total, "hashing")

        return ramdigest.digests(self.pid, blocks, hashing, yield_until=self.written)

    async def result(self, layout: list[statefile.MappedBlock]) -> dict[str, RamPrint]:
        """Each RAM block of the file (*layout*) with its digest; a block QEMU wrote that was not
        hashed yet is hashed now (QEMU still runs, stopped).

        :raise OSError: the memory cannot be read; `CheckpointError`: the file's blocks are not QEMU's.
        """
        hashed = await self.task if self.task else {}
        written = [b for b in layout if b.pages]
        for b in written:
            if b.name not in self.blocks or self.blocks[b.name].used != b.used:
                raise CheckpointError(f"RAM block {b.name} ({b.used} bytes) of the state file is not QEMU's")
        if late := [self.blocks[b.name] for b in written if b.name not in hashed]:
            hashed.update(await asyncio.to_thread(self.hash, late))
        return {b.name: RamPrint(b.used, hashed[b.name]) for b in written}


async def _timed(work: Awaitable[T], timings: dict[str, float], key: str, start: float) -> T:
    """*work*'s result, its end noted in *timings* under *key* (ms since *start*)."""
    result = await work
    timings[key] = (time.perf_counter() - start) * 1000
    return result


async def _digest(
    vm: VM, plan: Plan, hashing: _MemoryDigest, reporter: Reporter
) -> tuple[int, str, dict[str, RamPrint]]:
    """``(size, digest, RAM blocks)`` of the state file just written: RAM from QEMU's memory and the
    other bytes from the file where it can (mapped-ram), else the whole file read back (flushed to disk
    by the caller, not here)."""
    path = vm.state_path
    if hashing.task is not None:
        try:
            layout = await asyncio.to_thread(statefile.mapped_ram_layout, path)
            ram = await hashing.result(layout)
            digest = await asyncio.to_thread(statefile.device_digest, path, layout)
            return path.stat().st_size, digest, ram
        except (OSError, CheckpointError) as exc:
            reporter.step(f"{vm.name}: reading the state file back for its digest ({exc})")
    # Written with O_DIRECT, the file is not in the page cache: read it back the same way.
    size, digest = await asyncio.to_thread(
        statefile.digest,
        path,
        direct_io(plan.parameters),
        lambda done, total: reporter.progress(done, total, "hashing"),
    )
    return size, digest, {}


def _fsync_ram(argv: list[str], cwd: str = "/") -> None:
    """Flush RAM kept in files to disk, so a host crash after the save loses nothing (a relative ``mem-path``
    is QEMU's, from *cwd*)."""
    for path in canary.shared_files(argv, cwd):
        if os.path.isfile(path):
            statefile.flush(path)


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
