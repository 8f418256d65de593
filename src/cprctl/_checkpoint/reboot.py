"""``cprctl reboot``: the whole host reboot in one command, through systemd.

cprctl does not save the VMs itself here: it checks that the host's shutdown will
(``cprctl-guests.service`` installed, enabled and active, every VM passing
``check --reboot``, the gate of ``save-all --reboot``), optionally loads the next
kernel (``kexec -l``), then hands over to ``systemctl kexec`` or ``systemctl
reboot``. The unit's ``save-all`` saves every VM at shutdown and its
``restore-all`` restores them at boot, as for any other reboot.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from .._host import kexec, systemd
from .._host.kexec import KexecKernel
from .._store import StateDir
from ..errors import FleetCheckFailed, UsageError
from . import inspect, timeline
from .fleet import blocks, broken_finding
from .plan import Finding, SuspendMode, estimate, estimate_restore, written_bytes
from .report import Quiet, Reporter
from .vm import open_vm

How = Literal["reboot", "kexec"]
#: The segments of a VM's downtime that are the host's own reboot (see `timeline`).
HOST_SEGMENTS = ("reboot", "kernel", "boot")


@dataclass(frozen=True)
class VMPlan:
    """What a host reboot does to one VM, and its expected downtime."""

    name: str
    state: str
    #: How its save runs at shutdown (``in-place``, ``mapped-ram``); None when it is not running.
    strategy: str | None = None
    #: Guest RAM its save writes to the state file (0: RAM stays in place).
    written_bytes: int = 0
    #: Rough seconds of its save at shutdown and of its restore at boot (see `plan.estimate`).
    save_s: float = 0.0
    restore_s: float = 0.0
    #: Why it refuses the reboot (its first blocking finding), or None.
    refused: str | None = None
    #: A stopped VM that the boot's restore-all boots afresh (it was shut down at a shutdown, or lost).
    boot_pending: bool = False


@dataclass(frozen=True)
class RebootPlan:
    """``cprctl reboot``'s plan (``--dry-run`` prints it) and whether the reboot was handed to systemd."""

    how: How
    kernel: KexecKernel | None
    vms: list[VMPlan]
    #: Why the reboot is refused, one line each (the host's first, then each VM's); empty: it may go.
    refusals: list[str] = field(default_factory=list)
    #: Rough seconds the shutdown spends saving (in-place saves run side by side, written ones in turn).
    saves_s: float = 0.0
    started: bool = False
    #: Seconds of the last host reboot the VMs went through (from the end of the saves to cprctl's start at
    #: boot: the rest of the shutdown, firmware or kexec, kernel and systemd; see `timeline`); None if none yet.
    last_host_s: float | None = None

    def downtime_s(self, vm: VMPlan) -> tuple[float, float]:
        """Rough seconds of *vm*'s downtime that cprctl accounts for, at least and at most: its own save and
        restore; at most also the saves after its own. The host's own reboot (the rest of the shutdown, firmware
        or kexec, kernel and systemd) comes on top."""
        if vm.state == "running":
            return vm.save_s + vm.restore_s, self.saves_s + vm.restore_s
        return vm.restore_s, vm.restore_s


async def reboot(
    sd: StateDir,
    *,
    use_kexec: bool = False,
    kernel: str | None = None,
    initrd: str | None = None,
    append: str | None = None,
    dry_run: bool = False,
    suspend: SuspendMode = "auto",
    force: bool = False,
    reporter: Reporter | None = None,
) -> RebootPlan:
    """Reboot the host through systemd (with *use_kexec*: into *kernel*, default the newest installed one),
    once its shutdown is sure to save every VM; with *dry_run*, only the plan.

    :raise UsageError: the host cannot do it (no systemd, the unit not enabled and active, no kernel or
        kexec); `FleetCheckFailed`: a VM would not survive the reboot. Nothing is touched then.
    """
    reporter = reporter or Quiet()
    if (kernel or initrd or append) and not use_kexec:
        raise UsageError("--kernel, --initrd and --append go with --kexec")
    refusals = host_refusals(use_kexec)
    chosen = None
    if use_kexec:
        try:
            chosen = kexec.choose(kernel, initrd, append)
        except UsageError as exc:
            refusals.append(str(exc))
    if refusals and not dry_run:
        raise UsageError(f"reboot refused, nothing touched: {refusals[0]}")
    statuses = await inspect.status(sd)  # finishes interrupted operations, as save-all does
    vms, refused = await _vm_plans(sd, statuses, suspend, force)
    plan = RebootPlan(
        "kexec" if use_kexec else "reboot", chosen, vms, refusals, _saves_s(vms), last_host_s=_last_host_s(sd, statuses)
    )
    if refused and not dry_run:
        raise FleetCheckFailed(refused, "reboot")
    plan.refusals.extend(f"{v.name}: {v.refused}" for v in vms if v.refused)
    if dry_run:
        return plan
    await asyncio.to_thread(_hand_over, plan, reporter)
    return RebootPlan(plan.how, plan.kernel, plan.vms, [], plan.saves_s, True, plan.last_host_s)


def _last_host_s(sd: StateDir, statuses: list[inspect.VMStatus]) -> float | None:
    """Seconds of the host's own part (`HOST_SEGMENTS`) of the last reboot a VM was restored across: that of
    the latest such restore (a VM restored long ago, since stopped, speaks of an older one); None without."""
    timelines = [tl for st in statuses if (tl := open_vm(sd, st.name).record.timeline) and tl.boot_at is not None]
    if not timelines:
        return None
    seg = timeline.segments(max(timelines, key=lambda tl: tl.restore_at))
    return sum(seg.get(k, 0.0) for k in HOST_SEGMENTS)


def host_refusals(use_kexec: bool) -> list[str]:
    """Why this host's shutdown would not save the VMs (or cannot kexec), one line each."""
    out = []
    if not systemd.booted():
        return [
            "the host's init is not systemd, so no cprctl-guests.service saves the VMs at shutdown; "
            "run 'cprctl save-all --reboot', then reboot"
        ]
    unit = systemd.GUESTS_UNIT
    installed, enabled = systemd.unit_state(unit)
    if not installed or not enabled:
        out.append(f"{unit} is not {'enabled' if installed else 'installed'}: run 'cprctl install-units'")
    elif not systemd.unit_active(unit):
        out.append(f"{unit} is enabled but not active, so its save would not run at shutdown: systemctl start {unit}")
    if use_kexec and not kexec.available():
        out.append("kexec is not installed (apt-get install kexec-tools)")
    return out


async def _vm_plans(
    sd: StateDir, statuses: list[inspect.VMStatus], suspend: SuspendMode, force: bool
) -> tuple[list[VMPlan], dict[str, list[Finding]]]:
    """Each VM's part in the reboot, and the findings of those that refuse it (``save-all --reboot``'s gate)."""
    plans, refused = [], {}
    for st in statuses:
        if st.state == "broken":
            found: list[Finding] = [broken_finding(st.name)]
            plan = None
        elif st.state == "stopped":
            plans.append(VMPlan(st.name, st.state, boot_pending=st.boot_pending))
            continue
        else:
            found, plan = await inspect.preview(sd, st.name, suspend=suspend)
        why = next((f"{f.message} (fix: {f.fix})" for f in found if f.blocking), None)
        if blocks(found, force):
            refused[st.name] = found
        else:
            why = None
        if plan is not None:
            save_s, restore_s = estimate(plan)
            plans.append(VMPlan(st.name, st.state, plan.strategy, written_bytes(plan), save_s, restore_s, why))
        else:
            restore_s = estimate_restore(st.state_file_bytes or 0)
            plans.append(VMPlan(st.name, st.state, st.strategy, 0, 0.0, restore_s, why))
    return plans, refused


def _saves_s(vms: list[VMPlan]) -> float:
    """Rough seconds the shutdown's ``save-all`` takes: saves that write RAM go one at a time, beside the
    in-place ones (which run side by side)."""
    running = [v for v in vms if v.state == "running"]
    writers = sum(v.save_s for v in running if v.written_bytes)
    in_place = max((v.save_s for v in running if not v.written_bytes), default=0.0)
    return max(writers, in_place)


def _hand_over(plan: RebootPlan, reporter: Reporter) -> None:
    """Load the kernel (kexec) and ask systemd to reboot; a failure unloads the kernel again.

    :raise UsageError: kexec or systemctl refused (the VMs are untouched: systemd did not start the shutdown).
    """
    if plan.kernel is not None:
        k = plan.kernel
        reporter.step(f"loading {k.kernel} (initrd {k.initrd or 'none'}) for kexec; command line: {k.cmdline}")
        kexec.load(k)
    reporter.step(f"systemctl {plan.how}: cprctl-guests.service saves every VM at shutdown, restores them at boot")
    try:
        systemd.power(plan.how)
    except OSError as exc:
        if plan.kernel is not None:
            kexec.unload()
        raise UsageError(f"reboot refused by systemd, VMs untouched: {exc}") from None
