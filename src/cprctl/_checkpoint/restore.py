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

A mapped-ram save since issue 17 recorded the digest of each RAM block as the
saving QEMU held it (`ramdigest`), and of the file's other bytes. QEMU's load is
then the only reader of the RAM pages: beside it cprctl hashes only the other
bytes (a few MB), and once the load completed it hashes the RAM blocks in the new
QEMU's memory (`verify_ram`), which is what the guest will run on. Older records
(the whole file's digest) are verified as before.

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
from dataclasses import dataclass, replace

from .._host import clock
from .._qemu import argv as qargv
from .._qemu import process, ramblocks, virtio
from .._qemu.agent import Agent
from .._qemu.process import Binary
from .._qemu.qmp import START_TIMEOUT, Monitor
from .._store import StateDir, VMLock
from ..errors import AgentError, CheckFailed, CheckpointError, CprctlError, QemuError, UsageError, VMStateError
from . import canary, disks, kept, ramdigest, statefile, timeline
from .compat import Resize, binary_findings, fallback_binary, queue_args, queue_mismatches, require
from .facts import binary_info
from .plan import direct_io
from .record import GUEST_RESUMED, Checkpoint, Operation, Timeline
from .report import Quiet, Reporter
from .vm import VM, open_vm, recover, retire_checkpoint

LOAD_TIMEOUT = 3600.0


#: How a failed restore ends its message: nothing was lost.
RETRY = "; the checkpoint is kept, restore can be retried"


@dataclass(frozen=True)
class RestoreResult:
    name: str
    pid: int
    pause_ms: float
    status: str
    woke: bool
    timings_ms: dict[str, float]
    #: Set when the binary the restore would use could not load the checkpoint and the build that wrote it
    #: took the VM instead: that, in one line.
    fallback: str | None = None


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

    The RAM files kept in place are checked here too (`canary.check`), before any QEMU maps them.

    :raise VMStateError: nothing to restore; `CheckpointError` on any mismatch
        (disk changes pass with *force*; a kept RAM file that changed never does).
    """
    cp = vm.record.checkpoint
    if cp is None:
        raise VMStateError(f"{vm.name} has no checkpoint to restore (it is {vm.state()})")
    if vm.running():
        raise VMStateError(f"{vm.name}: QEMU (pid {vm.record.pid}) still runs; it is not saved")
    statefile.check_file(vm.checkpoint_file(), cp.size)
    canary.check(vm.name, cp)
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
    if cp.ram:  # RAM is verified in the loaded QEMU (`verify_ram`); here the file's other bytes
        if not trusted(vm, cp, trust_identity):
            blocks = statefile.check_layout(vm.checkpoint_file(), ram_prints(cp))
            if (actual := statefile.device_digest(vm.checkpoint_file(), blocks)) != cp.digest:
                raise CheckpointError(
                    f"state file {vm.checkpoint_file()} is corrupt: digest {actual} != recorded {cp.digest}"
                )
    else:
        statefile.check_digest(vm.checkpoint_file(), cp.digest, same_as, direct_io(cp.parameters), progress, pace)
    return (time.perf_counter() - t) * 1000


def ram_prints(cp: Checkpoint) -> dict[str, tuple[int, str]]:
    """*cp*'s RAM blocks as `statefile.verify_mapped` takes them."""
    return {name: (p.used, p.digest) for name, p in cp.ram.items()}


def trusted(vm: VM, cp: Checkpoint, trust_identity: bool) -> bool:
    """Whether an unchanged state file (inode, mtime) stands for its verification (see `restore`)."""
    try:
        return trust_identity and bool(cp.inode) and statefile.identity(vm.checkpoint_file()) == (cp.inode, cp.mtime_ns)
    except FileNotFoundError:
        return False


async def verify_ram(vm: VM, mon: Monitor, pid: int, cp: Checkpoint, progress: statefile.Progress) -> None:
    """Compare the RAM blocks the new QEMU (*pid*, loaded, guest stopped) holds with the save's digests.

    :raise CheckpointError: a block is missing, of another size or differs; or QEMU's memory cannot be read.
    """
    blocks = {b.name: b for b in await ramblocks.query(mon)}
    for name, want in cp.ram.items():
        if (b := blocks.get(name)) is None or b.used != want.used:
            raise CheckpointError(f"{vm.name}: the new QEMU has no RAM block {name} of {want.used} bytes to verify")
    try:
        actual = await asyncio.to_thread(ramdigest.digests, pid, [blocks[n] for n in cp.ram], progress)
    except OSError as exc:
        raise CheckpointError(f"{vm.name}: cannot read the new QEMU's memory to verify what it loaded: {exc}") from exc
    for name, want in cp.ram.items():
        if actual[name] != want.digest:
            await _reconcile(vm, pid, blocks[name], want.digest, actual[name])


async def _reconcile(vm: VM, pid: int, block: ramblocks.RamBlock, want: str, actual: str) -> None:
    """A block whose digest differs passes when only KVM's clock records differ (`ramdigest.reconcile`).

    :raise CheckpointError: anything else differs.
    """
    path = vm.checkpoint_file()
    try:
        mapped = next((b for b in statefile.mapped_ram_layout(path) if b.name == block.name and b.pages), None)
        if mapped is not None:
            await asyncio.to_thread(ramdigest.reconcile, pid, block, path, mapped, want)
            return
        detail = "the block is not in the file"
    except (OSError, ValueError, CheckpointError) as exc:
        detail = str(exc)
    raise CheckpointError(
        f"state file {path} is corrupt: digest of RAM block {block.name} as QEMU loaded it {actual} "
        f"!= recorded {want} ({detail})"
    )


async def restore(
    sd: StateDir,
    name: str,
    *,
    qemu: str | None = None,
    force: bool = False,
    sync_time: bool = True,
    reporter: Reporter | None = None,
    trust_identity: bool = False,
    fallback: bool | None = None,
) -> RestoreResult:
    """Resume VM *name* from its checkpoint, optionally on another QEMU binary.

    *trust_identity* (for ``update``, in the process that just saved): an
    unchanged state file (inode, mtime) is not hashed a second time. When the
    binary (*qemu*, else the VM's own) cannot load the checkpoint (refused by the
    preflight, or its load fails) and *fallback* is set (by default: when no *qemu*
    was asked for; an operator's explicit binary is refused, not replaced), the VM
    is restored on the build that wrote the checkpoint (its own binary while that is
    still the same build, else the kept copy, see `kept`); ``RestoreResult.fallback``
    says so.

    :raise VMStateError: there is no checkpoint; `CheckpointError`: it failed
        verification (the new QEMU, if started, is killed; the guest never ran);
        `CheckFailed`: binary *qemu* cannot run the VM or load its state (nothing
        started); `QemuError`: the new QEMU failed (the checkpoint is kept; QEMU's
        own error line is in the message). With a fallback, the error says both failures.
    """
    reporter = reporter or Quiet()
    allowed = qemu is None if fallback is None else fallback
    try:
        if allowed and (known := await asyncio.to_thread(_known_not_to_load, sd, name, qemu)):
            raise QemuError(f"{name}: {known}")  # no QEMU started only to fail the same way (at boot: time)
        result = await _restore_on(sd, name, qemu, force, sync_time, reporter, trust_identity)
    except (CheckFailed, QemuError, UsageError) as first:
        target = _fallback(sd, name, qemu) if allowed else None
        if target is None:
            raise
        why = str(first).removeprefix(f"{name}: ").removesuffix(RETRY)  # it is not retried: it falls back
        note = f"{name}: on the build that wrote the checkpoint ({target}): {qemu or 'its binary'} could not: {why}"
        reporter.step(note)
        try:
            result = await _restore_on(sd, name, target, force, sync_time, reporter, trust_identity)
        except CprctlError as second:
            raise QemuError(
                f"{first}; restoring on {target}, the build that wrote the checkpoint, failed too: {second}"
            ) from first
        result = replace(result, fallback=note)
    kept.collect(sd.path)
    return result


def _known_not_to_load(sd: StateDir, name: str, qemu: str | None) -> str | None:
    """Why *qemu* (default: the VM's own binary) is known not to load the checkpoint when a kept build can,
    from what was learnt (a failed standby, restore or trial of the same two builds); else None."""
    try:
        vm = open_vm(sd, name)
        if vm.record.checkpoint is None or vm.running():
            return None
        load = kept.loadability(vm, qemu)
    except CprctlError:
        return None
    return f"known not to load its state: {load.reason}" if load.verdict == "fails" and load.kept else None


def _fallback(sd: StateDir, name: str, qemu: str | None) -> str | None:
    """The binary to restore on after *qemu* (default: the VM's own) failed, or None."""
    try:
        vm = open_vm(sd, name)
        cp, home = vm.record.checkpoint, vm.record.argv[0]
        if cp is None or vm.running() or vm.record.operation is not None:
            return None
        failed = Binary.find(qemu).path if qemu else home
        launcher = kept.builds(vm).launcher(cp.build) if cp.build else None
        if cp.build is None:  # written before builds were kept: only the VM's own binary is left to try
            return fallback_binary(failed, False, home, True, None)
        failed_wrote_it = kept.same_build(vm, failed, cp.build)
        home_wrote_it = kept.same_build(vm, home, cp.build)
        return fallback_binary(failed, failed_wrote_it, home, home_wrote_it, str(launcher) if launcher else None)
    except CprctlError:
        return None


async def _restore_on(
    sd: StateDir,
    name: str,
    qemu: str | None,
    force: bool,
    sync_time: bool,
    reporter: Reporter,
    trust_identity: bool,
) -> RestoreResult:
    """One restore of VM *name* on binary *qemu* (default: its argv[0]); see `restore`."""
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "restore"):
        await recover(vm, reporter)
        t0 = time.perf_counter()
        if vm.record.checkpoint is not None:
            reporter.step(f"{name}: checking the state file and the disks")
        cp = await asyncio.to_thread(verify, vm, force, digest=False)
        argv, previous = await _preflight(vm, cp, qemu), vm.record.argv[0]
        timings = {"check": (time.perf_counter() - t0) * 1000}
        how = (trust_identity, sync_time, reporter)
        try:
            return await _start_and_load(vm, cp, argv, previous, list(vm.record.compat_args), timings, *how)
        except Resize as exc:  # once: a second mismatch is refused by `queue_args`
            reporter.step(f"{name}: {argv[0]} allocates smaller virtqueues; starting it with {exc.args_}")
            return await _start_and_load(vm, cp, argv, previous, exc.args_, timings, *how)


async def _start_and_load(
    vm: VM,
    cp: Checkpoint,
    argv: list[str],
    previous: str,
    compat: list[str],
    timings: dict[str, float],
    trust_identity: bool,
    sync_time: bool,
    reporter: Reporter,
) -> RestoreResult:
    """Start *argv* with *compat* to receive, load the checkpoint and resume (the rest of `_restore_on`).

    :raise Resize: the new QEMU allocated smaller virtqueues than the checkpoint has (it was killed).
    """
    name = vm.name
    vm.record.operation = op = Operation("restore", os.getpid(), time.time(), compat_args=compat)
    vm.commit()
    reporter.step(
        f"{name}: starting {argv[0]} -S -incoming defer; verifying the state file ({cp.size / 1e6:.1f} MB)"
        " while it loads"
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(vm.record.qmp)
    t = time.perf_counter()
    pid = process.spawn([*qargv.incoming([*argv, *compat]), "-S"], vm.log_path, cwd=vm.record.cwd, scope=name)
    timings["spawn"] = (time.perf_counter() - t) * 1000  # the scope's systemd-run until it exec'd QEMU
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
        result = await _load(vm, cp, pid, argv, timings, t, reporter, start_verifying, verifying, trust_identity)
    except BaseException as exc:
        stop.set()  # a digest still running stops at its next chunk (Ctrl-C need not wait for it)
        if op.step in GUEST_RESUMED and process.alive(pid):
            # The guest may have run on the new QEMU: its RAM and disks have moved on from the
            # checkpoint, so going back would corrupt it. Keep the new QEMU.
            vm.record.argv, vm.record.compat_args = qargv.for_relaunch(argv), compat
            retire_checkpoint(vm, pid, None)
            vm.record.operation = None
            vm.commit()
            raise QemuError(
                f"{name}: the guest was resumed on the new QEMU (pid {pid}), but then: {exc}; "
                "it is kept running, see 'cprctl status'"
            ) from exc
        await asyncio.to_thread(process.kill, pid)
        if op.step not in GUEST_RESUMED:  # the guest never ran: what that QEMU wrote in the kept RAM is KVM's
            await asyncio.to_thread(canary.retake, cp)
        vm.record.operation = None
        vm.commit()
        if isinstance(exc, CprctlError):
            said = "" if isinstance(exc, CheckpointError) else process.qemu_error(vm.log_path)
            if said and isinstance(exc, QemuError):
                kept.learn(vm, cp.build, argv[0], False, "restore", said)
                vm.commit()
            again = type(exc)(f"{said + ' (' + str(exc) + ')' if said else exc}{RETRY}")
            again.__dict__.update(vars(exc))  # what it carries, e.g. `QemuError.error_class`
            raise again from exc
        raise
    t = time.perf_counter()
    await asyncio.to_thread(kept.learn, vm, cp.build, argv[0], True, "restore")
    await asyncio.to_thread(kept.settle, vm, previous, reporter, cp.build)
    vm.commit()
    timings["settle"] = (time.perf_counter() - t) * 1000
    if sync_time and vm.record.qga and result.status == "running":
        t = time.perf_counter()
        await _sync_time(vm, reporter)
        timings["sync_time"] = (time.perf_counter() - t) * 1000
    return result


async def _preflight(vm: VM, cp: Checkpoint, qemu: str | None) -> list[str]:
    """The argv to restore on: the VM's own, or on binary *qemu*. Another binary than the build that wrote the
    checkpoint is checked first (`compat.binary_findings`); a refusal is recorded as a failed proof.

    :raise CheckFailed: the binary cannot take the VM (nothing started); `UsageError`: it is missing.
    """
    argv = list(vm.record.argv)
    if not qemu and await asyncio.to_thread(kept.same_build, vm, argv[0], cp.build):
        return argv
    binary = Binary.find(qemu or argv[0])
    binary.require_cpr()
    argv[0] = binary.path
    info = await binary_info(binary.path)
    found = binary_findings(info, argv, vm.record.machine, cp.capabilities, cp.parameters, vm.record.cwd)
    try:
        require(vm.name, found)
    except CheckFailed:
        reason = "; ".join(f.message for f in found if f.blocking)
        await asyncio.to_thread(kept.learn, vm, cp.build, argv[0], False, "restore", reason)
        vm.commit()
        raise
    return argv


async def _load(
    vm: VM,
    cp: Checkpoint,
    pid: int,
    argv: list[str],
    timings: dict[str, float],
    t_start: float,
    reporter: Reporter,
    start_verifying: Callable[[], asyncio.Future[float]],
    verifying: statefile.Progress,
    trust_identity: bool,
) -> RestoreResult:
    """Verify the state file (*start_verifying*) while the new QEMU (started with ``-S``) loads it, and the
    RAM it loaded (mapped-ram saves since issue 17: `verify_ram`, *verifying* hears its progress); resume
    once both passed.

    :raise CheckpointError: the digest did not match (the guest never ran); `QemuError` or
        `MigrationError`: the load failed (a digest mismatch is reported instead when there is one).
    """
    r, op = vm.record, vm.record.operation
    assert op is not None
    async with Monitor(r.qmp, vm.name, pid, timeout=START_TIMEOUT) as mon:
        timings["start"] = (time.perf_counter() - t_start) * 1000
        # From here on, not while QEMU itself starts: after a reboot it reads its binary and libraries.
        t = time.perf_counter()
        await _fit_queues(vm, cp, mon, argv[0], op.compat_args)
        timings["queues"] = (time.perf_counter() - t) * 1000
        hashing = start_verifying()
        t = time.perf_counter()
        await mon.set_migration({**cp.capabilities, **await late_block_activate(mon)}, cp.parameters)
        # An incoming query-migrate has no RAM counters: QEMU's own read count tells how far the load is.
        start = process.bytes_read(pid) or 0
        total = min(cp.size, statefile.stored_bytes(vm.checkpoint_file()))
        timings["setup"] = (time.perf_counter() - t) * 1000  # cprctl's asking, before QEMU's load (as a save's)
        t = time.perf_counter()
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
        if cp.ram and not trusted(vm, cp, trust_identity):
            t = time.perf_counter()
            await verify_ram(vm, mon, pid, cp, verifying)
            timings["verify_ram"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        op.mark("verified")
        woke, cont = False, status in ("paused", "postmigrate") and cp.was_running
        if cont:
            op.mark("resuming")  # one commit for both: recovery resumes only from "resuming"
        vm.commit()
        if cont:
            t_cont = time.perf_counter()
            await mon.execute("cont")  # a guest saved suspended goes back to suspended (QEMU >= 9.0)
            status = await mon.wait_status({"running", "suspended"}, 30)
            timings["cont"] = (time.perf_counter() - t_cont) * 1000
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
            r.timeline = _timeline(cp, op.started - timings["check"] / 1000, resumed, timings)
        r.argv, r.compat_args = qargv.for_relaunch(argv), list(op.compat_args)
        retire_checkpoint(vm, pid, pause_ms if status == "running" else None)
        r.operation = None
        # Not flushed here: the commit after `kept.settle` (in `_start_and_load`) is, a moment later. A host crash
        # before it finds step "resuming" (flushed before ``cont``) and boots the VM afresh, as it would then.
        vm.commit(durable=False)
        timings["retire"] = (time.perf_counter() - t) * 1000
        reporter.step(f"{vm.name}: {status} again after a {pause_ms:.0f} ms pause")
        return RestoreResult(vm.name, pid, pause_ms, status, woke, timings)


def _timeline(cp: Checkpoint, restore_at: float, running_at: float, timings: dict[str, float]) -> Timeline:
    """Where the downtime went; across a host reboot (another boot id than the save's), with the new
    kernel's start and this cprctl's (at boot, the unit's ``restore-all``)."""
    if cp.boot_id and cp.boot_id != clock.boot_id():
        init, started = clock.process_start(1), clock.process_start()
        steps = {**timings, **timeline.queue_steps(started, clock.marks())}
        return timeline.make(cp, restore_at, running_at, clock.boot_time(), started, init, steps)
    return timeline.make(cp, restore_at, running_at, None, None, restore_ms=timings)
async def _fit_queues(vm: VM, cp: Checkpoint, mon: Monitor, binary: str, compat: list[str]) -> None:
    """Compare the checkpoint's virtqueues with what the new QEMU allocated (see `compat.queue_args`).

    :raise Resize: it must start again with more ``-global``; `QemuError`: it cannot load them.
    """
    if found := queue_mismatches(cp.virtio, await virtio.devices(mon)):
        try:
            args = queue_args(vm.name, binary, found, compat)
        except CheckFailed as exc:  # not loadable: a failed restore (the checkpoint is kept)
            raise QemuError(str(exc)) from exc
        raise Resize(args)


async def late_block_activate(mon: Monitor) -> dict[str, bool]:
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
