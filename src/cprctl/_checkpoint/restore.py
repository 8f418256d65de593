"""``restore``: check the checkpoint, start QEMU with ``-S -incoming defer``, load, verify, resume, retire.

The state file's digest is computed while the new QEMU starts and loads it:
QEMU runs with ``-S``, so the guest stays stopped after the load, and its disks
stay inactive (QEMU activates block devices only when the VM starts: ``cont``,
or autostart, which ``-S`` turns off; before QEMU 10.0 only with the
``late-block-activate`` capability, which cprctl sets where QEMU has it). The
guest is resumed only once the digest matched; on a mismatch the new QEMU is
killed, the guest never ran on the file and never wrote its disks. The journal
marks ``verified`` then ``resuming``; a killed cprctl's successor resumes only
from ``resuming`` (see `vm.recover`), so nothing resumes an unverified file.

Nothing is deleted until the guest runs on the new QEMU. A failure before that
stops the new QEMU and keeps the checkpoint, so restore can be tried again
(with another binary, too); once the guest has run, going back to the
checkpoint would lose its new state, so cprctl only goes forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._host import clock
from .._qemu import argv as qargv
from .._qemu import process
from .._qemu.agent import Agent
from .._qemu.process import Binary
from .._qemu.qmp import Monitor
from .._store import StateDir, VMLock
from ..errors import AgentError, CheckpointError, CprctlError, QemuError, VMStateError
from . import disks, statefile, timeline
from .compat import binary_findings, require
from .facts import binary_info
from .plan import direct_io
from .record import GUEST_RESUMED, Checkpoint, Operation, Timeline
from .report import Quiet, Reporter
from .vm import VM, open_vm, recover, retire_checkpoint

LOAD_TIMEOUT = 3600.0


@dataclass(frozen=True)
class RestoreResult:
    name: str
    pid: int
    pause_ms: float
    status: str
    woke: bool
    timings_ms: dict[str, float]


def verify(
    vm: VM,
    force: bool = False,
    trust_identity: bool = False,
    progress: statefile.Progress = statefile.no_progress,
    digest: bool = True,
) -> Checkpoint:
    """The VM's checkpoint, after its state file and disks were verified.

    Without *digest*, the state file's size and header are checked but not its
    digest (`verify_digest` does that, while QEMU loads).

    :raise VMStateError: nothing to restore; `CheckpointError` on any mismatch
        (disk changes pass with *force*).
    """
    cp = vm.record.checkpoint
    if cp is None:
        raise VMStateError(f"{vm.name} has no checkpoint to restore (it is {vm.state()})")
    if vm.running():
        raise VMStateError(f"{vm.name}: QEMU (pid {vm.record.pid}) still runs; it is not saved")
    statefile.check_file(vm.checkpoint_file(), cp.size)
    if digest:
        verify_digest(vm, cp, trust_identity, progress)
    for old in cp.disks:
        why = disks.changed(old, full=old.full)
        if why and not force:
            raise CheckpointError(
                f"{vm.name}: disk {old.path} changed since the save: {why}; "
                "restore --force accepts the risk of a corrupt guest filesystem"
            )
    return cp


def verify_digest(
    vm: VM,
    cp: Checkpoint,
    trust_identity: bool = False,
    progress: statefile.Progress = statefile.no_progress,
    pace: statefile.Pace | None = None,
) -> float:
    """Check the state file's digest against *cp*'s; how long it took (ms).

    *trust_identity*: an unchanged inode and mtime stand for the digest (see `restore`); *pace*: see
    `statefile.digest`.

    :raise CheckpointError: the file is altered or gone.
    """
    t = time.perf_counter()
    same_as = (cp.inode, cp.mtime_ns) if trust_identity and cp.inode else None
    statefile.check_digest(vm.checkpoint_file(), cp.digest, same_as, direct_io(cp.parameters), progress, pace)
    return (time.perf_counter() - t) * 1000


async def restore(
    sd: StateDir,
    name: str,
    *,
    qemu: str | None = None,
    force: bool = False,
    sync_time: bool = True,
    reporter: Reporter | None = None,
    trust_identity: bool = False,
) -> RestoreResult:
    """Resume VM *name* from its checkpoint, optionally on another QEMU binary.

    *trust_identity* (for ``update``, in the process that just saved): an
    unchanged state file (inode, mtime) is not hashed a second time.

    :raise VMStateError: there is no checkpoint; `CheckpointError`: it failed
        verification (the new QEMU, if started, is killed; the guest never ran);
        `CheckFailed`: binary *qemu* cannot run the VM or load its state (nothing
        started); `QemuError`: the new QEMU failed (the checkpoint is kept; the
        log tail is in the message).
    """
    reporter = reporter or Quiet()
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "restore"):
        await recover(vm, reporter)
        t0 = time.perf_counter()
        if vm.record.checkpoint is not None:
            reporter.step(f"{name}: checking the state file and the disks")
        cp = await asyncio.to_thread(verify, vm, force, digest=False)
        argv = list(vm.record.argv)
        if qemu:
            binary = Binary.find(qemu)
            binary.require_cpr()
            argv[0] = binary.path
            info = await binary_info(binary.path)
            require(name, binary_findings(info, argv, vm.record.machine, cp.capabilities, cp.parameters, vm.record.cwd))
        timings = {"check": (time.perf_counter() - t0) * 1000}
        vm.record.operation = op = Operation("restore", os.getpid(), time.time())
        vm.commit()
        reporter.step(
            f"{name}: starting {argv[0]} -S -incoming defer; verifying the state file ({cp.size / 1e6:.1f} MB)"
            " while it loads"
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vm.record.qmp)
        t = time.perf_counter()
        pid = process.spawn([*qargv.incoming(argv), "-S"], vm.log_path, cwd=vm.record.cwd, scope=name)
        op.new_pid = pid
        op.mark("started")
        vm.commit()
        stop = threading.Event()

        def verifying(done: int, total: int) -> None:
            if stop.is_set():
                raise CheckpointError(f"{name}: verification stopped")
            reporter.progress(done, total, "verifying")

        def start_verifying() -> asyncio.Future[float]:
            pace = statefile.BESIDE_LOAD
            hashing = asyncio.ensure_future(asyncio.to_thread(verify_digest, vm, cp, trust_identity, verifying, pace))
            hashing.add_done_callback(lambda f: f.cancelled() or f.exception())  # read on every path
            return hashing

        try:
            result = await _load(vm, cp, pid, argv, timings, t, reporter, start_verifying)
        except BaseException as exc:
            stop.set()  # a digest still running stops at its next chunk (Ctrl-C need not wait for it)
            if op.step in GUEST_RESUMED and process.alive(pid):
                # The guest may have run on the new QEMU: its RAM and disks have moved on from the
                # checkpoint, so going back would corrupt it. Keep the new QEMU.
                vm.record.argv = qargv.for_relaunch(argv)
                retire_checkpoint(vm, pid, None)
                vm.record.operation = None
                vm.commit()
                raise QemuError(
                    f"{name}: the guest was resumed on the new QEMU (pid {pid}), but then: {exc}; "
                    "it is kept running, see 'cprctl status'"
                ) from exc
            await asyncio.to_thread(process.kill, pid)
            vm.record.operation = None
            vm.commit()
            if isinstance(exc, CprctlError):
                tail = "" if isinstance(exc, CheckpointError) else process.log_tail(vm.log_path)
                again = type(exc)(
                    f"{exc}; the checkpoint is kept, restore can be retried"
                    f"{' (QEMU log: ' + tail + ')' if tail else ''}"
                )
                again.__dict__.update(vars(exc))  # what it carries, e.g. `QemuError.error_class`
                raise again from exc
            raise
        if sync_time and vm.record.qga and result.status == "running":
            await _sync_time(vm, reporter)
        return result


async def _load(
    vm: VM,
    cp: Checkpoint,
    pid: int,
    argv: list[str],
    timings: dict[str, float],
    t_start: float,
    reporter: Reporter,
    start_verifying: Callable[[], asyncio.Future[float]],
) -> RestoreResult:
    """Verify the state file (*start_verifying*) while the new QEMU (started with ``-S``) loads it; resume
    once it passed.

    :raise CheckpointError: the digest did not match (the guest never ran); `QemuError` or
        `MigrationError`: the load failed (a digest mismatch is reported instead when there is one).
    """
    r, op = vm.record, vm.record.operation
    assert op is not None
    async with Monitor(r.qmp, vm.name, pid) as mon:
        timings["start"] = (time.perf_counter() - t_start) * 1000
        # From here on, not while QEMU itself starts: after a reboot it reads its binary and libraries.
        hashing = start_verifying()
        t = time.perf_counter()
        await mon.set_migration({**cp.capabilities, **await _late_block_activate(mon)}, cp.parameters)
        # An incoming query-migrate has no RAM counters: QEMU's own read count tells how far the load is.
        start = process.bytes_read(pid) or 0
        total = min(cp.size, statefile.stored_bytes(vm.checkpoint_file()))
        await mon.execute("migrate-incoming", {"uri": f"file:{cp.state_file}"})

        def loading(_info: object) -> None:
            if (done := process.bytes_read(pid)) is not None:
                reporter.progress(max(0, min(done - start, total)), total, "loading")

        try:
            await mon.wait_migration(LOAD_TIMEOUT, on_progress=loading)
            status = await mon.wait_status({"running", "paused", "suspended", "postmigrate"}, 60)
        except CprctlError:
            await hashing  # a corrupt state file is the cause to report, rather than QEMU's failure to load it
            raise
        timings["load"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        timings["verify"] = await hashing  # the guest runs only from a verified state file
        timings["verify_wait"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        op.mark("verified")
        woke, cont = False, status in ("paused", "postmigrate") and cp.was_running
        if cont:
            op.mark("resuming")  # one commit for both: recovery resumes only from "resuming"
        vm.commit()
        if cont:
            await mon.execute("cont")  # a guest saved suspended goes back to suspended (QEMU >= 9.0)
            status = await mon.wait_status({"running", "suspended"}, 30)
        if status == "suspended" and cp.suspended:
            if op.step != "resuming":
                op.mark("resuming")
                vm.commit()
            await mon.execute("system_wakeup")
            status = await mon.wait_status({"running"}, 30)
            woke = True
        timings["resume"] = (time.perf_counter() - t) * 1000
        resumed = (mon.event_time("WAKEUP") if woke else mon.event_time("RESUME")) or time.time()
        pause_ms = (resumed - cp.stopped_at) * 1000
        # The guest has run on the new QEMU: from here on, only forward.
        t = time.perf_counter()
        op.mark("resumed")
        if status == "running":
            r.timeline = _timeline(cp, op.started - timings["check"] / 1000, resumed)
        r.argv = qargv.for_relaunch(argv)
        retire_checkpoint(vm, pid, pause_ms if status == "running" else None)
        r.operation = None
        vm.commit()
        timings["retire"] = (time.perf_counter() - t) * 1000
        reporter.step(f"{vm.name}: {status} again after a {pause_ms:.0f} ms pause")
        return RestoreResult(vm.name, pid, pause_ms, status, woke, timings)


def _timeline(cp: Checkpoint, restore_at: float, running_at: float) -> Timeline:
    """Where the downtime went; across a host reboot (another boot id than the save's), with the new
    kernel's start and this cprctl's (at boot, the unit's ``restore-all``)."""
    if cp.boot_id and cp.boot_id != clock.boot_id():
        return timeline.make(cp, restore_at, running_at, clock.boot_time(), clock.process_start())
    return timeline.make(cp, restore_at, running_at, None, None)


async def _late_block_activate(mon: Monitor) -> dict[str, bool]:
    """``{"late-block-activate": True}`` where QEMU has that capability (before 10.0 it keeps disks
    inactive after the load until ``cont``; from 10.0 on, QEMU does so always and may drop it)."""
    caps = await mon.execute("query-migrate-capabilities")
    return {"late-block-activate": True} if any(c.get("capability") == "late-block-activate" for c in caps) else {}


async def _sync_time(vm: VM, reporter: Reporter) -> None:
    """Set the guest clock to the host's after the pause (like libvirt-guests' SYNC_TIME)."""
    assert vm.record.qga
    try:
        async with Agent(vm.record.qga, vm.name, timeout=5) as agent:
            before = await agent.execute("guest-get-time")
            await agent.set_time(time.time_ns())
        skew = time.time() - int(before) / 1e9
        reporter.step(f"{vm.name}: guest clock set from the host (was {skew:+.1f} s off)")
    except AgentError as exc:
        reporter.step(f"{vm.name}: guest clock not synced: {exc}")
