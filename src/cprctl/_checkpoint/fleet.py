"""Every VM of the host at once: ``save-all`` before a reboot or upgrade, ``restore-all`` after.

Each VM goes through the same `save.save` / `restore.restore` as alone (checks,
verification, rollback); a bounded number run at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Literal

from .._host import clock
from .._qemu.argv import ram_layout
from .._qemu.process import Binary
from .._store import StateDir, VMLock
from ..errors import CprctlError, FleetCheckFailed
from . import lifecycle, timeline
from .plan import Finding, SuspendMode
from .report import Quiet, Reporter
from .restore import restore
from .vm import VM, open_vm, settled

# save, trial, update and inspect (status, check) are imported where used: restore-all runs at boot, in every
# guest's downtime, and python's imports are a part of it that cprctl adds (issue 16's benchmark: the
# timeline's ``queue``).

Outcome = Literal["saved", "restored", "updated", "failed", "left running", "skipped", "shut down", "cold-booted"]


@dataclass(frozen=True)
class VMOutcome:
    """What ``save-all``/``restore-all`` did to one VM."""

    name: str
    outcome: Outcome
    detail: str = ""
    #: The VM's state afterwards (``running``, ``saved``, ``stopped``, ``broken``).
    state: str = ""
    strategy: str | None = None
    pause_ms: float | None = None
    #: For ``update-all``: whether the VM moved warm (None: it did not move).
    warm: bool | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("saved", "restored", "updated", "skipped", "cold-booted")


def summary(outcomes: list[VMOutcome]) -> str:
    """How many VMs had each outcome, in a few words (a unit's ``STATUS=``): ``1 failed, 2 restored``."""
    counts = Counter(o.outcome for o in outcomes)
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no VMs"


def default_parallel() -> int:
    return max(1, os.cpu_count() or 1)


async def save_all(
    sd: StateDir,
    *,
    reboot: bool = False,
    parallel: int | None = None,
    suspend: SuspendMode = "auto",
    force: bool = False,
    shutdown_unsaveable: bool = False,
    trial: bool = False,
    reporter: Reporter | None = None,
) -> list[VMOutcome]:
    """Save every running VM, *parallel* at a time (default: one per core; VMs whose RAM must be
    written, one at a time); with *reboot*, only if every VM passes ``check --reboot``.

    With *shutdown_unsaveable* (the host is going down: implies *reboot*), every VM that passes
    ``check --reboot`` is saved and every other running VM, or one whose save fails, is shut down
    cleanly (`lifecycle.shut_down`) instead of the whole fleet being refused.

    With *trial*, each saved checkpoint is then loaded into the binary a restore will use (`trial.trial`,
    the guest never runs there) and the outcome's detail says whether it loads or the kept build takes it.

    :raise FleetCheckFailed: with *reboot* alone, when any VM fails its check (nothing was touched).
    """
    from . import inspect

    reboot = reboot or shutdown_unsaveable
    reporter = reporter or Quiet()
    states = {st.name: st.state for st in await inspect.status(sd, reporter=reporter)}  # finishes interrupted ops
    running = [n for n, s in states.items() if s == "running"]
    if reboot:
        refused = {}
        for name, state in states.items():
            if state == "broken":
                refused[name] = [broken_finding(name)]
            elif state != "stopped":
                found = await inspect.check(sd, name, reboot=True, suspend=suspend)
                if blocks(found, force):
                    refused[name] = found
        if refused and not shutdown_unsaveable:
            raise FleetCheckFailed(refused)
    else:
        refused = {}
    limit = asyncio.Semaphore(parallel or default_parallel())
    # Saves that write RAM share the disk, and mapped-ram's multifd channels already use every core:
    # by default they go one at a time, beside any number of in-place saves.
    writers = asyncio.Semaphore(parallel or 1)

    async def one(name: str) -> VMOutcome:
        if name in refused:
            why = next((f.message for f in refused[name] if f.blocking), "it fails 'check --reboot'")
            return await _shut_down(sd, name, f"cannot be saved ({why})", reporter)
        in_place = all(b.named_shared_file for b in ram_layout(open_vm(sd, name).record.argv).backends)
        async with limit, contextlib.nullcontext() if in_place else writers:
            try:
                from .save import save

                res = await save(sd, name, suspend=suspend, reboot=reboot, force=force, reporter=reporter)
                outcome = VMOutcome(name, "saved", f"{res.strategy}, {res.size / 1e6:.1f} MB", "saved", res.strategy)
                if trial:
                    outcome = replace(outcome, detail=f"{outcome.detail}; {await _tried(sd, name)}")
            except CprctlError as exc:
                outcome = _not_done(sd, name, exc)
                if outcome.state == "running" and shutdown_unsaveable:
                    return await _shut_down(sd, name, f"save failed ({exc})", reporter)
        reporter.step(f"{name}: {outcome.outcome}: {outcome.detail}")
        return outcome

    done = await asyncio.gather(*(one(n) for n in running))
    _mark_fleet_done(sd, [o.name for o in done if o.outcome == "saved"], time.time())
    others = [_untouched(n, s) for n, s in states.items() if n not in running]
    return sorted([*done, *others], key=lambda o: o.name)


async def _tried(sd: StateDir, name: str) -> str:
    """A trial load of *name*'s new checkpoint, in a few words."""
    try:
        from .trial import trial as trial_load

        tried = await trial_load(sd, name)
    except CprctlError as exc:
        return f"trial load failed to run: {exc}"
    if tried.loads:
        return f"its state loads into {tried.binary} (trial)"
    instead = f"restore-all will use the kept build {tried.load.kept}" if tried.load.kept else "no kept build can"
    return f"its state does not load into {tried.binary} ({tried.reason}); {instead}"
def _mark_fleet_done(sd: StateDir, names: list[str], at: float) -> None:
    """Note in each checkpoint when the save-all ended (the host's shutdown goes on from there: see `timeline`)."""
    for name in names:
        vm = open_vm(sd, name)
        with contextlib.suppress(CprctlError), VMLock(vm.folder, name, "save-all"):
            vm = open_vm(sd, name)
            if vm.record.checkpoint is not None and vm.record.operation is None:
                vm.record.checkpoint.fleet_done_at = at
                vm.commit()


def broken_finding(name: str) -> Finding:
    """Why a broken VM refuses a host reboot (the reboot gate)."""
    return Finding(
        "broken",
        "error",
        f"{name} is broken (an unfinished operation or a missing state file)",
        f"see 'cprctl status {name}'",
    )


def blocks(found: list[Finding], force: bool = False) -> bool:
    """Whether *found* refuses the operation (with *force*, only what cannot be overridden does)."""
    return any(f.blocking and not (force and f.forceable) for f in found)


async def _shut_down(sd: StateDir, name: str, why: str, reporter: Reporter) -> VMOutcome:
    """Power off a VM the host's shutdown cannot save; it is booted afresh by the next restore-all."""
    reporter.step(f"{name}: {why}; shutting it down cleanly")
    try:
        how = await lifecycle.shut_down(sd, name, reporter=reporter)
    except CprctlError as exc:
        outcome = VMOutcome(name, "failed", f"{why}; shutdown failed: {exc}", open_vm(sd, name).state())
    else:
        outcome = VMOutcome(name, "shut down", f"{why}; {how}", "stopped")
    reporter.step(f"{name}: {outcome.outcome}: {outcome.detail}")
    return outcome


def _not_done(sd: StateDir, name: str, exc: CprctlError) -> VMOutcome:
    """A VM whose operation failed: ``left running`` when its guest still runs, else ``failed``."""
    state = open_vm(sd, name).state()
    return VMOutcome(name, "left running" if state == "running" else "failed", str(exc), state)


def _untouched(name: str, state: str) -> VMOutcome:
    """A VM save-all/restore-all left alone: fine unless it is broken."""
    if state == "broken":
        return VMOutcome(name, "failed", f"{name} is broken; see 'cprctl status {name}'", state)
    return VMOutcome(name, "skipped", f"already {state}", state)


async def restore_all(
    sd: StateDir, *, parallel: int | None = None, sync_time: bool = True, reporter: Reporter | None = None
) -> list[VMOutcome]:
    """Restore every saved VM, and boot afresh every VM a host shutdown powered off (it could not be saved)."""
    clock.mark("restore_all")  # at boot: the end of python's start (see `timeline.queue_steps`)
    reporter = reporter or Quiet()
    # Each VM's state once interrupted operations are finished; not `status`'s whole report (at boot it is time).
    vms = {n: await settled(sd, n, reporter) for n in sd.names()}
    states = {n: vm.state() for n, vm in vms.items()}
    clock.mark("states")
    costs = {n: _restore_bytes(vms[n]) for n, s in states.items() if s == "saved"}
    costs |= {n: 0 for n, s in states.items() if s == "stopped" and vms[n].record.boot_pending}
    saved = restore_order(costs)
    limit = asyncio.Semaphore(parallel or default_parallel())

    async def one(name: str) -> VMOutcome:
        async with limit:
            try:
                if states[name] == "stopped":
                    why = open_vm(sd, name).record.lost or "powered off at shutdown"
                    rec = await lifecycle.start(sd, name)
                    outcome = VMOutcome(name, "cold-booted", f"{why}; pid {rec.pid}", "running")
                else:
                    res = await restore(sd, name, sync_time=sync_time, reporter=reporter)
                    tl = open_vm(sd, name).record.timeline
                    where = f" ({timeline.describe(timeline.segments(tl))})" if tl and tl.boot_at else ""
                    how = f"; {res.fallback}" if res.fallback else ""
                    outcome = VMOutcome(
                        name, "restored", f"paused {res.pause_ms:.0f} ms{where}{how}", res.status, None, res.pause_ms
                    )
            except CprctlError as exc:
                outcome = VMOutcome(name, "failed", str(exc), open_vm(sd, name).state())
        reporter.step(f"{name}: {outcome.outcome}: {outcome.detail}")
        return outcome

    done = await asyncio.gather(*(one(n) for n in saved))
    others = [_untouched(n, s) for n, s in states.items() if n not in saved]
    return sorted([*done, *others], key=lambda o: o.name)


def restore_order(costs: dict[str, int]) -> list[str]:
    """The VMs of *costs* (``{name: bytes its restore loads}``) in the order restore-all starts them: the
    quickest first, by name among equals. With fewer restores at a time than VMs, a VM whose RAM stayed in place
    (a few MB of device state) then comes back in seconds instead of waiting behind one whose GBs of RAM are
    loaded from its state file: the shortest first gives the least downtime on average (the longest
    VM's is the same either way)."""
    return sorted(costs, key=lambda n: (costs[n], n))


def _restore_bytes(vm: VM) -> int:
    """The bytes *vm*'s restore loads: its state file's size (0 without a checkpoint)."""
    cp = vm.record.checkpoint
    return cp.size if cp else 0


async def update_all(
    sd: StateDir,
    *,
    qemu: str | None = None,
    parallel: int | None = None,
    suspend: SuspendMode = "auto",
    force: bool = False,
    reporter: Reporter | None = None,
) -> list[VMOutcome]:
    """Move every running VM whose QEMU executable was replaced on disk (a package upgrade) onto the
    binary now at its path; with *qemu*, every running VM onto *qemu*. Warm where it can (see `update`).

    :raise UsageError: *qemu* is not an executable (no VM touched).
    """
    from . import inspect

    reporter = reporter or Quiet()
    binary = Binary.find(qemu).path if qemu else None
    statuses = await inspect.status(sd, reporter=reporter)  # finishes interrupted ops
    moving = [st for st in statuses if st.state == "running" and (binary or st.binary_replaced)]
    limit = asyncio.Semaphore(parallel or default_parallel())

    async def one(name: str, target: str) -> VMOutcome:
        async with limit:
            try:
                from .update import update

                res = await update(sd, name, target, suspend=suspend, force=force, reporter=reporter)
            except CprctlError as exc:
                return _not_done(sd, name, exc)
            how = {"cpr-transfer": "warm (cpr-transfer)", "standby": "warm"}.get(res.mode, f"cold ({res.cold_reason})")
            detail = f"{how} onto {target}, paused {res.pause_ms:.1f} ms"
            return VMOutcome(name, "updated", detail, "running", None, res.pause_ms, res.warm)

    done = await asyncio.gather(*(one(st.name, binary or st.kept_from or st.argv[0]) for st in moving))
    moved = {st.name for st in moving}
    others = [
        VMOutcome(st.name, "skipped", "runs the binary on disk", st.state)
        if st.state == "running"
        else _untouched(st.name, st.state)
        for st in statuses
        if st.name not in moved
    ]
    return sorted([*done, *others], key=lambda o: o.name)
