"""``update``: move a running VM onto another QEMU binary with the least guest pause.

Warm standby: the new QEMU is started with ``-incoming defer`` *while the old
one runs*, then the old one migrates (cpr-reboot, RAM kept in place through
``x-ignore-shared``) straight into it over a unix socket. The guest pause is
then only the device state's save and load: no QEMU exit or start-up, no file.
The old QEMU stays alive until the new one runs the guest, so any failure
before that resumes the guest on the old QEMU.

What this needs, from QEMU's source and tried here:
- both QEMUs map the same shared RAM file; QEMU skips ROM loading and RAM
  writes while ``inmigrate``, and the old one is paused (``postmigrate``)
  from the stop on, so only one writes at a time;
- the new QEMU opens the disk images inactive (no write lock) until the
  migration completes, after the old one has flushed and released them;
- unix sockets the VM serves (QMP, guest agent, consoles) cannot be bound by
  two QEMUs: the new one binds ``PATH~TOKEN`` and takes over ``PATH`` by
  rename once the old one has exited (an exiting QEMU unlinks the path it
  bound, so each update needs a name of its own).

Configurations that cannot run two QEMUs side by side fall back to the cold
path (save to a file, quit, restore), and ``check`` says why: see `plan.warm_blockers`.

QEMU's own ``cpr-transfer`` mode (10.0+) runs the same standby differently: the
new QEMU starts with a second ``-incoming`` naming a cpr channel (a unix socket)
and blocks reading it before it opens its monitor; the old QEMU's ``migrate``
(mode ``cpr-transfer``, channels main + cpr) sends the fd of every RAM block
over it while the guest runs on, so RAM that is shared memory but no named file
(memfd) stays in place instead of being pre-copied. The new QEMU then answers
QMP (``inmigrate``): cprctl compares its virtqueues as for the standby, and only
its ``migrate-incoming`` lets the old QEMU stop the guest and send the device
state. Until then a ``migrate_cancel`` leaves the guest running on the old QEMU
(tried here: a cancelled or a failed cpr channel never stopped the guest).
`compat.handover_mode` picks between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._qemu import argv as qargv
from .._qemu import fds, process, virtio
from .._qemu.process import Binary
from .._qemu.qmp import Monitor
from .._qemu.sockets import drop_sockets, take_over_sockets
from .._store import StateDir, VMLock
from ..errors import CheckFailed, CprctlError, QemuError, VMStateError
from . import disks, kept, precopy, warmup
from .compat import (
    HandoverMode,
    Resize,
    binary_findings,
    handover_mode,
    queue_args,
    queue_mismatches,
    require,
    transfer_blockers,
)
from .facts import binary_info, gather
from .lifecycle import SOCKET_PATH_MAX
from .plan import Finding, Plan, SuspendMode, choose, findings, warm_blockers
from .record import Operation
from .report import Quiet, Reporter
from .restore import restore
from .save import save, suspend_guest
from .vm import CPR_SOCKET, VM, open_vm, recover, resume_guest, settle_update

MIGRATION_SOCKET = "migrate.sock"
#: What a QEMU says when a host resource is held by the QEMU beside it (the two cannot run side by side).
RESOURCE_CONFLICTS = re.compile(
    r"Address already in use|Failed to get .*lock|Is another process using|Device or resource busy"
    r"|Resource temporarily unavailable|lock pid file|already in use",
    re.IGNORECASE,
)
#: The name of the VNC listening socket given to the new QEMU (QMP ``getfd``).
VNC_FD = "cprctl-vnc"


@dataclass(frozen=True)
class UpdateResult:
    name: str
    pid: int
    pause_ms: float
    warm: bool
    #: Why the cold path was taken, when it was.
    cold_reason: str | None
    timings_ms: dict[str, float]
    #: How the guest moved: ``cpr-transfer``, ``standby`` (warm) or ``cold``.
    mode: str = "standby"
    #: Why cpr-transfer did not run, when it was asked for (``--mode cpr-transfer``) or would have kept more.
    mode_reason: str | None = None


def _side_by_side(argv: Sequence[str], suffix: str) -> list[str]:
    """*argv* with each served unix socket and its pidfile at ``PATH + suffix``, to start beside the running QEMU."""
    out = list(argv)
    for path in qargv.served_sockets(argv):
        if len(path + suffix) > SOCKET_PATH_MAX:
            raise _NoStandby(f"socket path {path} is too long to add a second QEMU's beside it")
        new = path + suffix
        out = [w.replace(f"path={path}", f"path={new}").replace(f"unix:{path}", f"unix:{new}") for w in out]
    for opt in qargv.options(out, "pidfile"):
        out[opt.index + 1] = f"{opt.value}{suffix}"
    return out


def _hand_over(pid: int | None, argv: list[str], folder: Path, suffix: str) -> fds.Handover:
    """The running QEMU's taps and TCP servers, for the new QEMU (see `fds`).

    :raise _NoStandby: when one cannot be taken (e.g. no permission to take the fds of QEMU).
    """
    try:
        return fds.hand_over(pid or 0, argv, str(folder / f"vnc.sock{suffix}"))
    except fds.HandoverError as exc:
        raise _NoStandby(str(exc)) from None


async def update(
    sd: StateDir,
    name: str,
    qemu: str,
    *,
    suspend: SuspendMode = "auto",
    force: bool = False,
    sync_time: bool = True,
    warm: bool = True,
    mode: HandoverMode = "auto",
    reporter: Reporter | None = None,
) -> UpdateResult:
    """Move running VM *name* onto QEMU binary *qemu*: warm standby when possible, else save + restore.

    The new binary is checked first (`compat.binary_findings`): one that cannot
    run the VM's argv or load its state is refused while the guest runs on. The
    cold path runs only when the two QEMUs cannot run side by side; if its restore
    on the new binary fails, the VM is restored on its previous binary at once.

    :raise CheckFailed: the preflight check refused (nothing touched); `QemuError`:
        the warm update failed and the guest runs on the old QEMU again, or the cold
        path's restore failed (the message says where the VM runs, or that the
        checkpoint is kept).
    """
    reporter = reporter or Quiet()
    binary = Binary.find(qemu)
    binary.require_cpr()
    vm = open_vm(sd, name)
    await preflight(vm, binary.path, suspend)
    reason = "--cold" if not warm else None
    if reason is None:
        blockers = warm_blockers(vm.record.argv)
        if blockers:
            reason = "; ".join(blockers)
        else:
            try:
                result = await _warm(sd, name, binary.path, suspend, force, reporter, mode)
            except _NoStandby as exc:
                reason = str(exc)
            else:
                kept.collect(sd.path)  # the build it left, once nothing refers to it (see `kept`)
                return result
    reporter.step(f"{name}: cold update ({reason})")
    return await _cold(sd, name, binary.path, reason, suspend, force, sync_time, reporter)


async def preflight(vm: VM, binary: str, suspend: SuspendMode = "auto") -> list[Finding]:
    """The findings on moving running *vm* onto *binary*, as its next save would run.

    :raise VMStateError: the VM is not running; `CheckFailed`: the binary cannot take it;
        `QemuError`: the binary does not answer what it offers.
    """
    r = vm.record
    if r.checkpoint is not None or not vm.running():
        raise VMStateError(f"{vm.name} is {vm.state()}, not running; use restore --qemu")
    async with Monitor(r.qmp, vm.name, r.pid) as mon:
        plan = choose(await gather(r, mon, vm.folder, suspend), suspend)
    try:
        info = await binary_info(binary)
    except QemuError as exc:
        raise QemuError(f"{vm.name}: refused, nothing touched: {exc}", error_class=exc.error_class) from exc
    found = binary_findings(info, [binary, *r.argv[1:]], r.machine, plan.capabilities, plan.parameters, r.cwd)
    require(vm.name, found)
    return found


async def _cold(
    sd: StateDir,
    name: str,
    binary: str,
    reason: str,
    suspend: SuspendMode,
    force: bool,
    sync_time: bool,
    reporter: Reporter,
) -> UpdateResult:
    """Save, then restore on *binary*; if that restore fails, the restore falls back to the build that wrote
    the checkpoint (the binary the VM ran before, or its kept copy when a package replaced it)."""
    t = time.perf_counter()
    await save(sd, name, suspend=suspend, force=force, durable=False, reporter=reporter)
    res = await restore(
        sd, name, qemu=binary, force=force, sync_time=sync_time, reporter=reporter, trust_identity=True, fallback=True
    )
    if res.fallback:
        back = open_vm(sd, name).record.argv[0]
        raise QemuError(
            f"{name}: update to {binary} failed ({res.fallback}); the VM runs again on its previous binary {back} "
            f"(pid {res.pid}, paused {res.pause_ms:.0f} ms)"
        )
    timings = {"total": (time.perf_counter() - t) * 1000, **res.timings_ms}
    return UpdateResult(name, res.pid, res.pause_ms, False, reason, timings, "cold")


class _NoStandby(Exception):
    """The new QEMU could not start beside the old one; nothing was changed."""


async def _warm(
    sd: StateDir, name: str, binary: str, suspend: SuspendMode, force: bool, reporter: Reporter, asked: HandoverMode
) -> UpdateResult:
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "update"):
        await recover(vm, reporter)
        r = vm.record
        if r.checkpoint is not None or not vm.running():
            raise VMStateError(f"{name} is {vm.state()}, not running; use restore --qemu")
        async with Monitor(r.qmp, name, r.pid) as old:
            facts = await gather(r, old, vm.folder, suspend)
            found = findings(facts, suspend=suspend)
            if [f for f in found if f.blocking and not (force and f.forceable)]:
                raise CheckFailed(name, found)
            if blockers := warm_blockers(r.argv, facts):
                raise _NoStandby("; ".join(blockers))
            plan, compat = choose(facts, suspend), list(r.compat_args)
            mode, why_not = await _handover(vm, facts.qemu_version, binary, plan, asked, reporter)
            plan = transfer_plan(plan) if mode == "cpr-transfer" else over_socket(plan)
            try:
                res = await _switch(vm, old, plan, binary, reporter, compat)
            except Resize as exc:  # once: a second mismatch is refused by `queue_args`
                reporter.step(f"{vm.name}: {binary} allocates smaller virtqueues; starting it with {exc.args_}")
                res = await _switch(vm, old, plan, binary, reporter, exc.args_)
            return dataclasses.replace(res, mode=mode, mode_reason=why_not)


async def _handover(
    vm: VM, old_version: tuple[int, int, int], binary: str, plan: Plan, asked: HandoverMode, reporter: Reporter
) -> tuple[str, str | None]:
    """The warm handover's mode (see `compat.handover_mode`); says in one line why not cpr-transfer when
    it was asked for."""
    if asked == "standby":
        return "standby", None
    blockers = transfer_blockers(vm.record.argv, old_version, await binary_info(binary), plan.suspend)
    mode, why_not = handover_mode(asked, blockers)
    if why_not and asked == "cpr-transfer":
        reporter.step(f"{vm.name}: no cpr-transfer ({why_not}); warm standby instead")
    return mode, why_not if asked == "cpr-transfer" else None


def transfer_plan(plan: Plan) -> Plan:
    """*plan* for QEMU's cpr-transfer: every RAM block's fd goes over the cpr channel, so no RAM is sent
    (x-ignore-shared, pre-copy, multifd are all off)."""
    caps = dict.fromkeys(plan.capabilities, False)
    params: dict[str, str | int | bool] = {"mode": "cpr-transfer"}
    if "max-bandwidth" in plan.parameters:
        params["max-bandwidth"] = plan.parameters["max-bandwidth"]
    return Plan("in-place", plan.suspend, caps, params, 0)


def is_transfer(plan: Plan) -> bool:
    return plan.parameters.get("mode") == "cpr-transfer"


def cpr_channel(path: Path) -> dict[str, object]:
    """The cpr channel of a cpr-transfer (QAPI ``MigrationChannel``): a unix socket, the only kind that passes fds."""
    return {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(path)}}


def over_socket(plan: Plan) -> Plan:
    """*plan* for a migration straight into the new QEMU.

    All RAM in place: cpr-reboot with ``x-ignore-shared`` (only device state moves).
    Any other RAM: a normal-mode pre-copy (see `precopy`), RAM in shared files still skipped.
    """
    caps = {**plan.capabilities, "mapped-ram": False, "multifd": False}  # a socket is not seekable
    params = {k: v for k, v in plan.parameters.items() if k in ("mode", "max-bandwidth", "direct-io")}
    if "direct-io" in params:
        params["direct-io"] = False
    if plan.strategy == "in-place":
        return Plan("in-place", plan.suspend, {**caps, "auto-converge": False}, params, 0)
    return precopy.precopy_plan(Plan("stream", plan.suspend, caps, params, 0))


async def _switch(vm: VM, old: Monitor, plan: Plan, binary: str, reporter: Reporter, compat: list[str]) -> UpdateResult:
    r = vm.record
    argv = [binary, *r.argv[1:]]
    timings: dict[str, float] = {}
    sockets = qargv.served_sockets(argv)
    suffix = f"~{secrets.token_hex(2)}"
    handover = _hand_over(r.pid, [*argv, *compat], vm.folder, suffix)
    standby_argv = qargv.incoming(_side_by_side(handover.argv, suffix))
    cpr = vm.folder / f"{CPR_SOCKET}{suffix}"
    if is_transfer(plan):  # a second -incoming: the new QEMU reads the cpr state from it before anything else
        standby_argv += ["-incoming", json.dumps(cpr_channel(cpr))]
    t = time.perf_counter()
    try:
        new_pid = process.spawn(standby_argv, vm.log_path, cwd=r.cwd, scope=vm.name, pass_fds=handover.fds)
    finally:
        handover.close()  # the new QEMU has its own copies
    r.operation = op = Operation(
        "update", os.getpid(), time.time(), new_pid=new_pid, binary=binary, socket_suffix=suffix, compat_args=compat
    )
    op.mark("standby")
    vm.commit()
    try:
        if is_transfer(plan):
            await _send_cpr_state(vm, old, plan, new_pid, cpr)
        async with Monitor(r.qmp + suffix, vm.name, new_pid, timeout=30) as new:
            timings["standby"] = (time.perf_counter() - t) * 1000
            reporter.step(f"{vm.name}: new QEMU {binary} waits beside the old one (pid {new_pid})")
            await _fit_queues(vm, old, new, binary, compat)
            return await _migrate(vm, old, new, plan, argv, sockets, suffix, timings, reporter, handover)
    except BaseException as exc:
        if op.step == "standby":  # the new QEMU never got the guest: just stop it
            if is_transfer(plan):  # first cancel the old QEMU's cpr-transfer, which has not stopped the guest
                with contextlib.suppress(QemuError):  # else it fails once the new QEMU is gone: the guest runs on
                    await resume_guest(old, False)
            await asyncio.to_thread(process.kill, new_pid)
            drop_sockets(sockets, suffix)
            r.operation = None
            vm.commit()
            if isinstance(exc, QemuError):
                raise _standby_failed(vm, binary, exc) from exc
            raise
        done = "its outcome is unknown, see 'cprctl status'"
        with contextlib.suppress(QemuError):
            done = await settle_update(vm, old)  # the `new` connection is closed here, so it can ask
        r.operation = None
        why = _new_qemu_error(vm, binary, new_pid, exc) if isinstance(exc, CprctlError) else ""
        vm.commit()
        if isinstance(exc, CprctlError):
            error_class = exc.error_class if isinstance(exc, QemuError) else None
            raise QemuError(f"{vm.name}: warm update failed: {why}; {done}", error_class=error_class) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            cpr.unlink()


async def _send_cpr_state(vm: VM, old: Monitor, plan: Plan, new_pid: int, cpr: Path) -> None:
    """Start the old QEMU's cpr-transfer: once the new QEMU listens on the cpr channel, ``migrate`` with the
    main and cpr channels. The old QEMU sends the cpr state (its RAM fds) at once and then waits, the guest
    running, until the new QEMU's ``migrate-incoming`` (see `_migrate`).

    :raise QemuError: the new QEMU exited or did not listen within 30 s.
    """
    deadline = time.monotonic() + 30
    while not cpr.exists():
        if not process.alive(new_pid):
            raise QemuError(f"{vm.name}: QEMU (pid {new_pid}) exited")
        if time.monotonic() > deadline:
            raise QemuError(f"{vm.name}: the new QEMU did not listen on its cpr channel {cpr} in 30 s")
        await asyncio.sleep(0.002)
    await old.set_migration(plan.capabilities, plan.parameters)
    main = {
        "channel-type": "main",
        "addr": {"transport": "socket", "type": "unix", "path": str(vm.folder / MIGRATION_SOCKET)},
    }
    await old.execute("migrate", {"channels": [main, cpr_channel(cpr)]})


async def _fit_queues(vm: VM, old: Monitor, new: Monitor, binary: str, compat: list[str]) -> None:
    """Compare the VM's virtqueues with what the standby allocated (see `compat.queue_args`).

    :raise Resize: the standby must start again with more ``-global``; `CheckFailed`: it cannot load them.
    """
    found = queue_mismatches(await virtio.devices(old), await virtio.devices(new))
    if found:
        try:
            args = queue_args(vm.name, binary, found, compat)
        except CheckFailed as exc:  # a failed proof: this build cannot load the VM's state
            kept.learn(vm, vm.record.build, binary, False, "update", exc.findings[0].message)
            raise
        raise Resize(args)


def _new_qemu_error(vm: VM, binary: str, new_pid: int, exc: CprctlError) -> str:
    """Why a warm update failed: the new QEMU's own error line when it died (e.g. it could not load the
    state), with the QMP error in brackets; else the QMP error alone. A load QEMU refused is recorded as a
    failed proof (committed with the record)."""
    said = process.qemu_error(vm.log_path) if not process.alive(new_pid) else ""
    if not said:
        return str(exc)
    kept.learn(vm, vm.record.build, binary, False, "update", said)
    return f"{binary} could not take the VM: {said} ({exc})"


def _standby_failed(vm: VM, binary: str, exc: QemuError) -> Exception:
    """Why the new QEMU did not come up: `_NoStandby` (go cold) for a host resource the old QEMU holds,
    else a refusal: a binary that fails beside the old QEMU would fail a cold restore too."""
    tail = process.log_tail(vm.log_path)
    conflict = next((part for part in tail.split(" | ") if RESOURCE_CONFLICTS.search(part)), None)
    if conflict:
        return _NoStandby(f"the new QEMU could not share a host resource with the old one: {conflict}")
    said = process.qemu_error(vm.log_path)
    return QemuError(
        f"{vm.name}: refused: {binary} did not start beside the old QEMU: {said or exc}"
        f"{f' ({exc})' if said else ''}; the guest runs on as before (pid {vm.record.pid})"
    )


async def _migrate(
    vm: VM,
    old: Monitor,
    new: Monitor,
    plan: Plan,
    argv: list[str],
    sockets: list[str],
    suffix: str,
    timings: dict[str, float],
    reporter: Reporter,
    handover: fds.Handover | None = None,
) -> UpdateResult:
    r, op = vm.record, vm.record.operation
    assert op is not None
    if handover is not None and handover.vnc is not None:
        with handover.vnc:
            await new.give_fd(VNC_FD, handover.vnc.fileno())
    uri = f"unix:{vm.folder / MIGRATION_SOCKET}"
    transfer = is_transfer(plan)
    if not transfer:  # a cpr-transfer's new QEMU takes its mode from the cpr state; the old one is set
        await new.set_migration(*precopy.incoming_side(plan))
        await new.execute("migrate-incoming", {"uri": uri})
        await old.set_migration(plan.capabilities, plan.parameters)
    op.mark("migrating")
    op.suspended_by_us = plan.suspend
    # Not flushed to disk (an fsync here, just before the stop, is a journal commit of the whole filesystem:
    # it may still be flushing the guest's RAM file when the old QEMU's own flush at the stop comes). After a
    # host crash both QEMUs are gone whichever step the disk holds, and the VM is booted afresh
    # (`settle_update`, or `note_host_down` when no update shows); a killed cprctl's successor reads it anyway.
    vm.commit(durable=False)
    t = time.perf_counter()
    await _warm_up(vm, old, new)
    timings["warm_up"] = (time.perf_counter() - t) * 1000
    stopped_at = await suspend_guest(vm, old) if plan.suspend else None
    reporter.step(f"{vm.name}: handing the guest over to pid {new.pid}")
    t = time.perf_counter()
    before = time.time()
    if transfer:  # the new QEMU listens on the main channel: the old one connects, stops the guest, sends
        await new.execute("migrate-incoming", {"uri": uri})
    else:
        await old.execute("migrate", {"uri": uri})
    if precopy.is_precopy(plan):
        timings.update(await precopy.run(old, reporter, vm.name))
    else:
        done = await old.wait_migration(timeout=3600)
        if isinstance(done.get("downtime"), int):  # the old QEMU's part of the pause: stop, flush, device state
            timings["downtime"] = float(done["downtime"])
    status = await new.wait_status({"running", "paused", "suspended", "postmigrate"}, 60, poll=0.001)
    timings["switch"] = (time.perf_counter() - t) * 1000
    if status == "suspended" and op.suspended_by_us:
        await new.execute("system_wakeup")
        status = await new.wait_status({"running"}, 30)
    resumed = new.event_time("WAKEUP" if op.suspended_by_us else "RESUME") or time.time()
    stopped_at = stopped_at or old.event_time("STOP", before - 1) or before
    pause_ms = (resumed - stopped_at) * 1000
    # The guest runs on the new QEMU: from here on, only forward.
    op.mark("switched")
    if handover is not None and handover.vnc_side is not None:
        await _move_vnc(new, handover.vnc_side, reporter)
    old_pid = r.pid
    await old.quit()
    if old_pid and not await asyncio.to_thread(process.wait_gone, old_pid, 30):
        await asyncio.to_thread(process.kill, old_pid)
    take_over_sockets(sockets, suffix)  # only now: an exiting QEMU unlinks the path it bound
    previous, source = r.argv[0], r.build
    r.argv, r.pid, r.last_pause_ms, r.compat_args, r.operation = argv, new.pid, pause_ms, list(op.compat_args), None
    vm.commit()
    await asyncio.to_thread(kept.learn, vm, source, argv[0], True, "update")
    await asyncio.to_thread(kept.settle, vm, previous, reporter)
    vm.commit()
    how = f"pre-copy: {timings['precopy'] / 1000:.1f} s, {timings['passes']:.0f} passes" if "precopy" in timings else ""
    kind = "cpr-transfer" if transfer else "warm standby"
    reporter.step(f"{vm.name}: {status} on {argv[0]} after a {pause_ms:.1f} ms pause ({kind}{how and '; '}{how})")
    return UpdateResult(vm.name, new.pid or 0, pause_ms, True, None, timings)


async def _warm_up(vm: VM, old: Monitor, new: Monitor) -> None:
    """Before the guest stops: flush its disk images, read the new QEMU's code ahead (see `warmup`)."""
    images = disks.image_paths(await old.execute("query-named-block-nodes", {"flat": True}))
    await asyncio.to_thread(warmup.flush, images)
    if new.pid:
        await asyncio.to_thread(warmup.read_ahead, new.pid)


async def _move_vnc(new: Monitor, side: str, reporter: Reporter) -> None:
    """Point the new QEMU's VNC server at the listening socket handed over; a failure only warns (the guest runs)."""
    try:
        await new.execute("display-update", {"type": "vnc", "addresses": [{"type": "fd", "str": VNC_FD}]})
    except QemuError as exc:
        reporter.step(f"warning: the VNC server stays on {side}: {exc}")
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(side)
