"""Read-only views of managed VMs: `status` and the preflight `check`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any

from .._host import systemd
from .._qemu import process
from .._qemu.argv import ram_layout
from .._qemu.process import Binary
from .._qemu.qmp import Monitor
from .._store import StateDir
from ..errors import CprctlError, QemuError
from . import canary, disks, kept, statefile, timeline
from .compat import binary_findings, load_finding, transfer_blockers
from .facts import binary_info, gather, mount_of, ram_fact, vfio_refusal
from .plan import (
    VOLATILE_FS,
    Finding,
    Plan,
    Strategy,
    SuspendMode,
    choose,
    direct_io,
    findings,
    wants_suspend,
    warm_blockers,
)
from .precopy import warm_path
from .record import RamCanary
from .report import Quiet, Reporter
from .trial import trial as trial_load
from .vm import VM, open_vm, settled


@dataclass(frozen=True)
class VMStatus:
    """What `status` reports for one VM (also its ``--json`` form)."""

    name: str
    state: str
    pid: int | None
    qmp: str
    qga: str | None
    argv: list[str]
    machine: str
    origin: str
    state_file: str | None
    state_file_bytes: int | None
    strategy: str | None
    last_pause_ms: float | None
    operation: str | None
    #: The running QEMU's executable was replaced or deleted on disk since it started (a package upgrade):
    #: ``update-all`` moves it onto the binary now there.
    binary_replaced: bool = False
    #: The systemd unit (scope) its QEMU runs in; None without systemd or when not running.
    unit: str | None = None
    #: A host shutdown powered it off (it could not be saved), or its running state was lost (`lost`):
    #: the next restore-all boots it.
    boot_pending: bool = False
    #: The kept QEMU build (`cprctl._store.builds`) it runs on, and the one that wrote its checkpoint.
    build: str | None = None
    checkpoint_build: str | None = None
    #: It runs on a kept build because the binary at this path could not take it (``binary_replaced`` is
    #: then set too: ``update-all`` tries this path again).
    kept_from: str | None = None
    #: Whether its state loads into the binary a restore would use (`compat.LoadVerdict`: ``same-build``,
    #: ``proven``, ``fails``, ``unproven``, ``unknown``), why, and the kept build a restore falls back to.
    loads: str | None = None
    loads_detail: str = ""
    fallback_build: str | None = None
    #: Why its running state was lost, one line (e.g. the host went down during its save), until its
    #: next save or stop; None otherwise.
    lost: str | None = None
    #: Seconds of its last downtime from a save to a restore, by segment (`timeline.segments`: ``save``,
    #: across a host reboot ``shutdown``, ``reboot``, ``boot``, ``queue``, else ``saved``; ``restore``;
    #: ``total``); None before its first restore.
    downtime: dict[str, float] | None = None
    #: The same downtime by who spent it (`timeline.shares`: ``qemu``, ``host``, ``cprctl``, ``idle``,
    #: ``total``), and the save's and restore's steps in ms (``{"save": ..., "restore": ...}``).
    downtime_shares: dict[str, float] | None = None
    downtime_steps_ms: dict[str, dict[str, float]] | None = None
    #: A saved VM's RAM files kept in place and their canaries (`canary`: ``path``, ``bytes``,
    #: ``pages_sampled``), checked before its restore starts QEMU; None when it has none.
    kept_ram: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vm_status(vm: VM) -> VMStatus:
    r, cp = vm.record, vm.record.checkpoint
    size = None
    if cp is not None:
        with contextlib.suppress(OSError):
            size = os.stat(cp.state_file).st_size
    op = f"{r.operation.kind} at '{r.operation.step}' (pid {r.operation.pid})" if r.operation else None
    pid = r.pid if vm.running() else None
    return VMStatus(
        r.name,
        vm.state(),
        pid,
        r.qmp,
        r.qga,
        r.argv,
        r.machine,
        r.origin,
        cp.state_file if cp else None,
        size,
        cp.strategy if cp else None,
        r.last_pause_ms,
        op,
        pid is not None and (r.kept_from is not None or process.exe_replaced(pid, r.argv[0])),
        systemd.unit_of(pid) if pid is not None else None,
        r.boot_pending,
        r.build,
        cp.build if cp else None,
        r.kept_from,
        *_loads(vm, pid is not None),
        r.lost,
        timeline.segments(r.timeline) if r.timeline else None,
        timeline.shares(r.timeline) if r.timeline else None,
        {"save": r.timeline.save_ms, "restore": r.timeline.restore_ms} if r.timeline else None,
        [_kept_ram(c) for c in cp.kept_ram] if cp and cp.kept_ram else None,
    )


def _kept_ram(c: RamCanary) -> dict[str, Any]:
    return {"path": c.path, "bytes": c.size, "pages_sampled": canary.sampled(c)}


def _loads(vm: VM, running: bool) -> tuple[str | None, str, str | None]:
    if not running and vm.record.checkpoint is None:
        return None, "", None
    load = kept.loadability(vm)
    return load.verdict, load.reason, load.kept


async def status(sd: StateDir, name: str | None = None, reporter: Reporter | None = None) -> list[VMStatus]:
    """Status of VM *name*, or of every managed VM.

    An operation that a killed cprctl left unfinished is finished or rolled
    back first (see `vm.recover`), so no guest stays paused behind a dead cprctl.

    :raise VMNotFound: *name* is not managed.
    """
    names = [name] if name else sd.names()
    return [vm_status(await settled(sd, n, reporter or Quiet())) for n in names]


async def check(
    sd: StateDir,
    name: str,
    *,
    reboot: bool = False,
    suspend: SuspendMode = "auto",
    strategy: Strategy = "auto",
    qemu: str | None = None,
    trial: bool = False,
) -> list[Finding]:
    """The preflight check of VM *name*, without touching it (but for a *trial*, see `trial.trial`).

    A running VM is checked as `save` would; a saved one has its checkpoint
    verified (state file, disks, RAM kept in place). With *qemu*, also whether
    that binary can take the VM (as ``update`` and ``restore --qemu`` check).

    :raise UsageError: *qemu* is not an executable.
    """
    binary = Binary.find(qemu).path if qemu else None
    tried = await _trial(sd, name, binary) if trial else []
    vm = open_vm(sd, name)
    found, _plan = await _check(vm, reboot, suspend, strategy, binary)
    found = [*tried, *found]
    if (reboot or binary or trial) and (vm.running() or vm.record.checkpoint is not None):
        found.append(load_finding(name, await asyncio.to_thread(kept.loadability, vm, binary)))
    return found + host_findings(vm) if reboot else found


async def _trial(sd: StateDir, name: str, binary: str | None) -> list[Finding]:
    """A trial load of a saved VM's checkpoint (its outcome is then a proof `load_finding` reports)."""
    if open_vm(sd, name).record.checkpoint is None:
        return [Finding("trial", "info", "a running VM has no checkpoint to try: a warm 'update' is its trial")]
    await trial_load(sd, name, binary)
    return []


async def preview(sd: StateDir, name: str, *, suspend: SuspendMode = "auto") -> tuple[list[Finding], Plan | None]:
    """``check --reboot`` of VM *name* without the host's findings, and how its save would run
    (None: it is not running)."""
    return await _check(open_vm(sd, name), True, suspend, "auto", None)


async def _check(
    vm: VM, reboot: bool, suspend: SuspendMode, strategy: Strategy, binary: str | None
) -> tuple[list[Finding], Plan | None]:
    name = vm.name
    if vm.running() and vm.record.checkpoint is None:
        try:
            async with Monitor(vm.record.qmp, name, vm.record.pid) as mon:
                facts = await gather(vm.record, mon, vm.folder, suspend)
        except QemuError as exc:
            return [Finding("qmp", "error", str(exc), "check that QEMU is healthy")], None
        found = findings(facts, reboot=reboot, suspend=suspend, strategy=strategy)
        if binary:
            plan = choose(facts, suspend, strategy)
            found = [*await _binary(vm, binary, plan.capabilities, plan.parameters), *found]
        blockers = warm_blockers(vm.record.argv, facts)
        if blockers:
            found.append(
                Finding(
                    "update-cold",
                    "info",
                    f"'update' will restart cold: {'; '.join(blockers)}",
                    "remove what keeps two QEMUs from running side by side",
                )
            )
        else:
            found.append(
                Finding(
                    "update-warm",
                    "info",
                    f"'update' can run warm: the new QEMU starts beside this one; {warm_path(facts)}",
                )
            )
            found += await _mode_finding(
                vm, facts.qemu_version, binary or vm.record.argv[0], wants_suspend(facts, suspend)
            )
        return found, choose(facts, suspend, strategy)
    if vm.record.checkpoint is not None:
        found = _check_saved(vm, reboot)
        if binary:
            cp = vm.record.checkpoint
            found = [*await _binary(vm, binary, cp.capabilities, cp.parameters), *found]
        return found, None
    return [
        Finding(
            "not-running", "error", f"{name} is {vm.state()}: nothing to check", "launch it again with 'cprctl launch'"
        )
    ], None


async def _mode_finding(vm: VM, version: tuple[int, int, int], binary: str, suspend: bool) -> list[Finding]:
    """How a warm update onto *binary* would hand over: cpr-transfer or the standby (see `compat.handover_mode`)."""
    try:
        info = await binary_info(binary)
    except CprctlError:
        return []  # the binary findings say why
    argv = vm.record.argv
    blockers = transfer_blockers(argv, version, info, suspend)
    if not blockers:
        how = "QEMU's cpr-transfer: every RAM block is shared memory and its fd goes to the new QEMU, none is copied"
        return [Finding("update-mode", "info", f"'update' hands the guest over by {how}")]
    return [
        Finding(
            "update-mode",
            "info",
            f"'update' cannot use QEMU's cpr-transfer: {'; '.join(blockers)}",
            "launch it with -machine aux-ram-share=on and share=on memory backends (QEMU >= 10.0)",
        )
    ]


async def _binary(vm: VM, binary: str, caps: dict[str, bool], params: dict[str, str | int | bool]) -> list[Finding]:
    """What *binary* lacks to take *vm* (or that it can)."""
    try:
        info = await binary_info(binary)
    except CprctlError as exc:
        return [Finding("binary", "error", str(exc), "pick a working QEMU binary")]
    r = vm.record
    found = binary_findings(info, [binary, *r.argv[1:]], r.machine, caps, params, r.cwd)
    return found or [Finding("binary-ok", "info", f"{binary} (QEMU {'.'.join(map(str, info.version))}) can take it")]


def host_findings(vm: VM) -> list[Finding]:
    """What the host's init will do to VM *vm* at shutdown (``check --reboot``)."""
    if not systemd.booted():
        return [
            Finding(
                "init",
                "info",
                "the host's init is not systemd: no unit saves VMs at shutdown",
                "run 'cprctl save-all --reboot' before rebooting",
            )
        ]
    manager = "user" if systemd.user_manager() else "system"
    installed, enabled = systemd.unit_state(systemd.GUESTS_UNIT)
    unit = systemd.GUESTS_UNIT
    found = [Finding("init", "info", f"the host's init is systemd (the {manager} manager runs cprctl's units)")]
    if installed and enabled and not systemd.unit_active(unit):
        found.append(
            Finding(
                "unit",
                "warning",
                f"{unit} is enabled but not active: systemd runs its save at shutdown only once it has started",
                f"systemctl{' --user' if systemd.user_manager() else ''} start {unit}",
            )
        )
    elif installed and enabled:
        found.append(Finding("unit", "info", f"{unit} is installed and enabled: it saves this VM at shutdown"))
    else:
        why = "enabled" if installed else "installed"
        flag = " --user" if systemd.user_manager() else ""
        found.append(
            Finding(
                "unit",
                "warning",
                f"{unit} is not {why}: a host shutdown would not save this VM",
                f"cprctl install-units{flag}",
            )
        )
    if vm.running():
        found.append(_scope_finding(vm))
    return found


def _scope_finding(vm: VM) -> Finding:
    unit = systemd.unit_of(vm.record.pid)
    if unit is None:
        return Finding("scope", "warning", f"cannot tell which systemd unit QEMU (pid {vm.record.pid}) runs in")
    if systemd.waits_for_save(unit):
        return Finding("scope", "info", f"QEMU runs in {unit}, which systemd stops only after the save at shutdown")
    return Finding(
        "scope",
        "warning",
        f"QEMU runs in {unit}: at shutdown systemd would stop it without a save",
        f"'cprctl update {vm.name} --qemu {vm.record.binary}' moves it into a scope of its own",
    )


def _check_saved(vm: VM, reboot: bool) -> list[Finding]:
    cp = vm.record.checkpoint
    assert cp is not None
    out: list[Finding] = []
    try:
        if cp.ram:
            ram = {name: (p.used, p.digest) for name, p in cp.ram.items()}
            statefile.verify_mapped(vm.checkpoint_file(), cp.size, cp.digest, ram)
        else:
            statefile.verify(vm.checkpoint_file(), cp.size, cp.digest, direct=direct_io(cp.parameters))
    except CprctlError as exc:
        out.append(Finding("state-file", "error", str(exc), "the checkpoint cannot be restored"))
    for d in cp.disks:
        if why := disks.changed(d):
            out.append(
                Finding(
                    "disk-changed", "error", f"disk {d.path}: {why}", "restore --force accepts the risk", forceable=True
                )
            )
    out += _canary_findings(vm)
    if cp.strategy == "in-place":
        sampled = {c.path for c in cp.kept_ram}
        for b in ram_layout(vm.record.argv).backends:
            fact = ram_fact(b)
            if b.path and canary.ram_path(vm.record.cwd, b.path) in sampled:
                continue  # the canary said it
            if fact.path_kind != "file" and not fact.dax:
                out.append(
                    Finding(
                        "ram-missing",
                        "error",
                        f"RAM file {b.path} of backend {b.id!r} is gone",
                        "the guest's RAM is lost; the checkpoint cannot be restored",
                    )
                )
            elif reboot and not fact.non_volatile:
                out.append(
                    Finding(
                        "ram-volatile",
                        "error",
                        f"RAM file {b.path} is on {fact.fs_type}: a reboot erases it",
                        "do not reboot before restoring this VM",
                    )
                )
    if refusal := vfio_refusal(vm.record.argv):  # e.g. saved on an older kernel: its restore would fail here
        out.append(refusal)
    if reboot and mount_of(str(vm.folder))[1] in VOLATILE_FS:
        out.append(
            Finding(
                "state-volatile",
                "error",
                "the state directory is on a filesystem a reboot erases",
                "do not reboot before restoring",
            )
        )
    return out or [Finding("ok", "info", f"checkpoint of {vm.name} verifies{_canary_summary(cp.kept_ram)}", "")]


def _canary_findings(vm: VM) -> list[Finding]:
    """A finding for each kept RAM file that is not what the save left (`canary`): never forceable."""
    cp = vm.record.checkpoint
    assert cp is not None
    fix = "restore it once the file the save left is back; else its running state is lost ('cprctl remove --force')"
    return [Finding("ram-changed", "error", line, fix) for line in canary.refusals(vm.name, cp)]


def _canary_summary(kept_ram: list[RamCanary]) -> str:
    """``" (kept RAM sampled: FILE 1026 of 65536 pages)"`` for a check that passed; "" without kept RAM."""
    if not kept_ram:
        return ""
    files = ", ".join(f"{c.path} {canary.sampled(c)} of {canary.pages_of(c.size)} pages" for c in kept_ram)
    return f" (kept RAM sampled: {files})"
