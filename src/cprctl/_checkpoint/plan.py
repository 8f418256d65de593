"""Deciding, without I/O: what the preflight check finds, and how a save will run.

`gather` (in ``facts.py``) collects `Facts` about a live VM; the functions here
turn them into `Finding` lists and a `Plan`, and `warm_blockers` says whether a warm
update can run. Keeping this pure makes every rule unit-testable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .._qemu import fds
from .._qemu.argv import RamBackend, ram_layout, size_bytes

Severity = Literal["error", "warning", "info"]
SuspendMode = Literal["auto", "always", "never"]
Strategy = Literal["auto", "in-place", "stream", "mapped-ram"]

#: Filesystems whose contents do not survive a host reboot.
VOLATILE_FS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs"})
#: Filesystems whose shared file mappings the kernel lets VFIO pin for the long term (shmem and hugetlb
#: pages need no dirty tracking); a regular filesystem's it refuses from `FILE_PINS_REFUSED_FROM` on, and a
#: DAX filesystem's always.
PINNABLE_FS = frozenset({"tmpfs", "hugetlbfs"})
#: The first kernel that refuses long-term pins of a regular filesystem's shared file pages
#: (mm/gup: ``writable_file_mapping_allowed``, Linux 6.5): QEMU's VFIO fails ``vfio_container_dma_map = -14``.
FILE_PINS_REFUSED_FROM = (6, 5)
#: Mount options of a filesystem whose files are DAX (persistent memory mapped directly, no page cache).
DAX_OPTIONS = frozenset({"dax", "dax=always"})
#: Migration capabilities that cpr-reboot cannot be combined with.
INCOMPATIBLE_CAPS = ("postcopy-ram", "background-snapshot", "x-colo")
#: Room the device state takes in a state file, on top of any RAM written (a generous bound).
DEVICE_STATE_BYTES = 64 << 20
#: Uncapped migration bandwidth (bytes/s): QEMU's 128 MiB/s default would cap a save to a file.
UNCAPPED = 1 << 40
#: O_DIRECT for mapped-ram saves and their restores. Measured here (2 GiB guest, 1.9 GB written,
#: ext4; see benchmarks/RESULTS.md): QEMU writes it in 0.83-0.99 s with O_DIRECT against 2.8-3.5 s
#: through the page cache, and loads it in 0.83 s against 2.5 s from the page cache the digest's
#: read filled. Through the page cache every byte also takes a page of host memory (a fleet restored
#: after a reboot would fill the cache with state files): cprctl reads them back with O_DIRECT too.
DIRECT_IO = True
#: At most this many multifd channels (measured here: 2 and 4 channels write at the same speed on 2 cores).
MAX_CHANNELS = 8


@dataclass(frozen=True)
class Finding:
    """One result of the preflight check."""

    code: str
    severity: Severity
    message: str
    fix: str = ""
    #: ``--force`` may override it (the risk is the operator's, not a certain failure).
    forceable: bool = False

    @property
    def blocking(self) -> bool:
        return self.severity == "error"


@dataclass(frozen=True)
class RamFact:
    """A RAM backend and what its ``mem-path`` is on this host."""

    backend: RamBackend
    #: ``file``, ``dir``, ``chardev`` (DAX), ``missing``, or None (no path).
    path_kind: str | None = None
    #: The filesystem of the path (of its folder while it is missing).
    fs_type: str | None = None
    #: Persistent memory: a device DAX (``/dev/daxN.M``) or a file on a filesystem mounted with ``-o dax``.
    dax: bool = False

    @property
    def device_dax(self) -> bool:
        return self.dax and self.path_kind == "chardev"

    def vfio_pinnable(self, kernel: tuple[int, int]) -> bool:
        """Whether *kernel* lets VFIO pin this RAM for the long term (its DMA mappings): not a shared mapping
        of a regular filesystem's file (from `FILE_PINS_REFUSED_FROM` on; of a DAX filesystem's, never)."""
        b = self.backend
        shared_file = b.kind == "file" and b.share and self.path_kind in ("file", "dir", "missing")
        if not shared_file or self.fs_type in PINNABLE_FS:
            return True
        return not self.dax and kernel < FILE_PINS_REFUSED_FROM

    @property
    def in_place(self) -> bool:
        """RAM that stays where it is across QEMU's exit (a named shared file or DAX device)."""
        return self.backend.named_shared_file and self.path_kind in ("file", "chardev")

    @property
    def bytes(self) -> int:
        return size_bytes(self.backend.size)

    @property
    def non_volatile(self) -> bool:
        return self.dax or (self.path_kind == "file" and self.fs_type not in VOLATILE_FS)


@dataclass(frozen=True)
class Facts:
    """What cprctl knows about a running VM before it touches it."""

    name: str
    qemu_version: tuple[int, int, int]
    has_cpr_mode: bool
    machine: str
    ram: list[RamFact]
    ram_bytes: int
    enabled_caps: frozenset[str] = frozenset()
    vfio: list[str] = field(default_factory=list)
    agent_configured: bool = False
    agent_answers: bool = False
    agent_can_suspend: bool = False
    agent_error: str = ""
    s3_enabled: bool = False
    #: The guest boots QEMU's default SeaBIOS (no UEFI firmware).
    seabios: bool = False
    #: The guest's ACPI power-management block is decoded (QEMU's memory map, asked only when a suspend
    #: is wanted); None: not known (not asked, or no ICH9 block: not q35).
    acpi_pm_mapped: bool | None = None
    status: str = "running"
    state_fs: str = ""
    state_free: int = 0
    #: The state directory's filesystem takes O_DIRECT.
    state_dio: bool = False
    cores: int = 1
    #: Devices and RAM plugged in at run time, which the recorded argv lacks.
    hotplugged: list[str] = field(default_factory=list)
    #: The running kernel's ``(major, minor)``.
    kernel: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Plan:
    """How a save runs; recorded in the checkpoint so restore mirrors it."""

    strategy: Literal["in-place", "stream", "mapped-ram"]
    suspend: bool
    capabilities: dict[str, bool]
    parameters: dict[str, str | int | bool]
    expected_bytes: int


def ram_in_place(facts: Facts) -> bool:
    return bool(facts.ram) and all(r.in_place for r in facts.ram)


def wants_suspend(facts: Facts, mode: SuspendMode) -> bool:
    return mode == "always" or (mode == "auto" and bool(facts.vfio))


def dax_mount(options: str) -> bool:
    """Whether a filesystem's mount options (``rw,relatime,dax=always``) make its files DAX."""
    return not DAX_OPTIONS.isdisjoint(options.split(","))


def vfio_pin_refusal(ram: Sequence[RamFact], kernel: tuple[int, int]) -> Finding | None:
    """Why VFIO devices cannot run with this RAM on *kernel* (it refuses to pin it), or None."""
    bad = [r for r in ram if not r.vfio_pinnable(kernel)]
    if not bad:
        return None
    where = "; ".join(
        f"backend {r.backend.id!r} is {r.backend.path} on {r.fs_type or 'a filesystem'}{' (DAX)' if r.dax else ''}"
        for r in bad
    )
    # What QEMU's VFIO says (seen on 6.12): -14 (EFAULT) for a regular filesystem's file, -95 (EOPNOTSUPP) for
    # a file on a DAX filesystem.
    seen = {"-95" if r.dax else "-14" for r in bad}
    errnos = " or ".join(e for e in ("-14", "-95") if e in seen)
    return Finding(
        "vfio-file-ram",
        "error",
        f"VFIO cannot pin RAM kept in a shared file of a regular filesystem ({where}): the kernel refuses "
        f"long-term pins of its pages and QEMU fails (vfio_container_dma_map = {errnos})",
        "back that RAM with anonymous or memfd memory (written to the state file at a save), a file on "
        "hugetlbfs, or a device DAX (/dev/daxN.M)",
    )


def choose(facts: Facts, suspend: SuspendMode = "auto", strategy: Strategy = "auto") -> Plan:
    """The fastest safe way to save this VM.

    RAM that can stay in place does (``x-ignore-shared``); RAM that cannot is
    written with QEMU's bandwidth cap lifted, by default as ``mapped-ram`` with
    one multifd channel per core (see `DIRECT_IO`). ``stream`` and ``mapped-ram`` given explicitly write
    *all* RAM, shared files too (e.g. to carry RAM that lives on tmpfs across
    a reboot).
    """
    if strategy == "auto":
        chosen: Literal["in-place", "stream", "mapped-ram"] = "in-place" if ram_in_place(facts) else "mapped-ram"
        ignore_shared = any(r.in_place for r in facts.ram)
    else:
        chosen, ignore_shared = strategy, strategy == "in-place"
    mapped = chosen == "mapped-ram"
    # Every capability a save may turn on is set either way: a QEMU restored from a mapped-ram
    # checkpoint still has mapped-ram on, and a stream saved with it would not load.
    caps = {"x-ignore-shared": ignore_shared, "mapped-ram": mapped, "multifd": mapped}
    params: dict[str, str | int | bool] = {"mode": "cpr-reboot", "max-bandwidth": UNCAPPED}
    if mapped:
        params["multifd-channels"] = max(1, min(facts.cores, MAX_CHANNELS))
    if facts.qemu_version[:2] >= (9, 1):  # direct-io exists from 9.1 on
        params["direct-io"] = mapped and DIRECT_IO and facts.state_dio
    kept = sum(r.bytes for r in facts.ram if r.in_place) if ignore_shared else 0
    expected = DEVICE_STATE_BYTES + max(0, facts.ram_bytes - kept)
    suspend_now = wants_suspend(facts, suspend) and facts.status == "running"
    return Plan(chosen, suspend_now, caps, params, expected)


#: Rough rates for the expected downtime of a host reboot (`estimate`), from the benchmarks here
#: (benchmarks/RESULTS.md, 2 GiB written): a whole save (QEMU's write and the read-back for the digest)
#: ~1 GB/s, a whole restore (load and verification) ~0.6 GB/s; a disk slower than that one scales them.
SAVE_RATE = 1.0e9
RESTORE_RATE = 0.6e9
#: What a save or restore of device state alone takes (QEMU's start-up included), from the same benchmarks.
FIXED_S = 0.3


def written_bytes(plan: Plan) -> int:
    """The guest RAM a save following *plan* writes (its device state apart)."""
    return max(0, plan.expected_bytes - DEVICE_STATE_BYTES)


def estimate(plan: Plan) -> tuple[float, float]:
    """Rough seconds of a save following *plan*, and of its restore (see `SAVE_RATE`)."""
    written = written_bytes(plan)
    return FIXED_S + written / SAVE_RATE, estimate_restore(written)


def estimate_restore(state_bytes: int) -> float:
    """Rough seconds of a restore that loads *state_bytes* from its state file."""
    return FIXED_S + state_bytes / RESTORE_RATE


_VERSIONED = re.compile(r".*-\d+\.\d+$")


def findings(
    facts: Facts, *, reboot: bool = False, suspend: SuspendMode = "auto", strategy: Strategy = "auto"
) -> list[Finding]:
    """Everything the preflight check says about *facts*, worst first."""
    found = [
        *_qemu(facts),
        *_ram(facts, reboot, strategy),
        *_vfio(facts, reboot),
        *_suspend(facts, suspend),
        *_space(facts, reboot, suspend, strategy),
        _how(facts, strategy),
    ]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda f: order[f.severity])


def direct_io(parameters: dict[str, str | int | bool]) -> bool:
    """QEMU writes (and loads) the state file with O_DIRECT: cprctl reads it back that way too."""
    return parameters.get("direct-io") is True


def warm_blockers(argv: Sequence[str], facts: Facts | None = None) -> list[str]:
    """Why two QEMUs of this VM cannot run side by side (empty: a warm update can run).

    Taps, TCP servers (chardevs, monitors, QMP, VNC) and the pidfile are handed over by a warm
    update (see `fds`); what cannot be is named here. Pure: argv and *facts* only.
    """
    why = fds.unhandable(argv)
    for b in ram_layout(argv).backends:
        if b.prealloc and b.share:
            why.append(f"RAM backend {b.id!r} has prealloc=on: the new QEMU would touch RAM the guest is using")
    if facts is not None and facts.vfio:
        why.append("VFIO devices are held by the running QEMU")
    return sorted(set(why))


def _how(facts: Facts, strategy: Strategy) -> Finding:
    """How `save` would run: what it writes, and how fast a way it found."""
    plan = choose(facts, "never", strategy)
    params = plan.parameters
    if plan.strategy == "in-place":
        how = "RAM stays in place (x-ignore-shared): only device state is written"
    elif plan.strategy == "stream":
        how = "RAM is written as one migration stream"
    else:
        how = f"RAM is written as mapped-ram with {params['multifd-channels']} multifd channel(s)"
        if params.get("direct-io"):
            how += " and O_DIRECT"
        elif "direct-io" not in params:
            how += " (QEMU < 9.1: no O_DIRECT)"
        elif not facts.state_dio:
            how += f" (no O_DIRECT: the state directory's {facts.state_fs or 'filesystem'} refuses it)"
    mib = plan.expected_bytes >> 20
    return Finding("save-plan", "info", f"save: {how}, bandwidth cap lifted; up to {mib} MiB")


def _qemu(facts: Facts) -> list[Finding]:
    out = []
    if facts.qemu_version[:2] < (9, 0):
        have = ".".join(map(str, facts.qemu_version))
        out.append(
            Finding(
                "qemu-version",
                "error",
                f"QEMU {have} is older than 9.0",
                "run the VM on QEMU >= 9.0 (e.g. from bookworm-backports)",
            )
        )
    if not facts.has_cpr_mode:
        out.append(
            Finding("no-cpr-mode", "error", "this QEMU has no 'cpr-reboot' migration mode", "run the VM on QEMU >= 9.0")
        )
    for cap in INCOMPATIBLE_CAPS:
        if cap in facts.enabled_caps:
            out.append(
                Finding(
                    f"cap-{cap}",
                    "error",
                    f"migration capability {cap} is on; cpr-reboot cannot use it",
                    f"migrate-set-capabilities {cap}=off",
                )
            )
    if not _VERSIONED.fullmatch(facts.machine) and facts.machine not in ("none", "microvm", "isapc"):
        out.append(
            Finding(
                "machine-unpinned",
                "warning",
                f"machine type {facts.machine!r} is not versioned; a newer QEMU may not load the state",
                "start the VM with a versioned machine type (cprctl launch pins it)",
            )
        )
    if facts.hotplugged:
        what = ", ".join(facts.hotplugged)
        out.append(
            Finding(
                "hotplugged",
                "error",
                f"{what} was plugged in at run time and is not in the recorded "
                "command line, so the restarted QEMU would not have it and could not load the state",
                "unplug it, or stop and launch the VM again with it on the command line",
            )
        )
    if facts.status not in ("running", "paused", "suspended"):
        out.append(
            Finding(
                "runstate",
                "error",
                f"the VM is {facts.status!r}, not running",
                "resume it, or let the operation in progress finish",
            )
        )
    return out


def _ram(facts: Facts, reboot: bool, strategy: Strategy) -> list[Finding]:
    out = []
    keeps_shared = choose(facts, "never", strategy).capabilities["x-ignore-shared"]
    for r in facts.ram:
        b = r.backend
        if b.kind == "file" and r.path_kind == "dir":
            out.append(
                Finding(
                    f"ram-dir-{b.id}",
                    "warning",
                    f"RAM backend {b.id!r}: mem-path {b.path} is a directory, so QEMU's RAM there is an "
                    "unlinked file that dies with QEMU; it will be written to the state file",
                    "give mem-path a file name to keep RAM in place",
                )
            )
        elif b.kind == "file" and not b.share:
            out.append(
                Finding(
                    f"ram-private-{b.id}",
                    "info",
                    f"RAM backend {b.id!r} is share=off: it will be written to the state file",
                    "use share=on to keep RAM in place",
                )
            )
        elif b.kind in ("memfd", "ram", "default", "mem-path", "epc"):
            out.append(
                Finding(
                    f"ram-anon-{b.id}",
                    "info",
                    f"RAM backend {b.id!r} ({b.kind}) cannot stay in place: it will be written to the state file",
                    "use memory-backend-file,share=on,mem-path=FILE to keep RAM in place",
                )
            )
        if reboot and r.in_place and r.dax and keeps_shared:
            where = f"device DAX {b.path}" if r.device_dax else f"{b.path} on {r.fs_type} mounted with -o dax"
            out.append(
                Finding(
                    f"ram-dax-{b.id}",
                    "info",
                    f"RAM backend {b.id!r} stays in place on persistent memory ({where}): it survives a "
                    "reboot, nothing of it is written and it has no page cache to flush",
                )
            )
        if reboot and r.in_place and not r.non_volatile and keeps_shared:
            out.append(
                Finding(
                    f"ram-volatile-{b.id}",
                    "error",
                    f"RAM backend {b.id!r} stays in {b.path} on {r.fs_type or 'unknown fs'}, "
                    "which a host reboot erases",
                    "put mem-path on a disk filesystem or a DAX device, or save with --strategy mapped-ram "
                    "(writes that RAM to the state file)",
                )
            )
    if strategy == "in-place" and not ram_in_place(facts):
        out.append(
            Finding(
                "strategy-in-place",
                "error",
                "--strategy in-place needs every RAM backend to be a named shared file",
                "use --strategy auto",
            )
        )
    if reboot and facts.state_fs in VOLATILE_FS:
        out.append(
            Finding(
                "state-volatile",
                "error",
                f"the state directory is on {facts.state_fs}, which a host reboot erases",
                "set CPRCTL_STATE_DIR to a folder on a disk filesystem",
            )
        )
    return out


def _vfio(facts: Facts, reboot: bool) -> list[Finding]:
    if not facts.vfio:
        return []
    refusal = vfio_pin_refusal(facts.ram, facts.kernel)
    if refusal:
        return [refusal]
    later = vfio_pin_refusal(facts.ram, FILE_PINS_REFUSED_FROM)
    if reboot and later:  # it runs on this older kernel; a newer one would refuse it
        major, minor = FILE_PINS_REFUSED_FROM
        return [
            Finding(
                "vfio-file-ram-later",
                "warning",
                f"kernels from {major}.{minor} on refuse this VM's VFIO pins: after a reboot into one, its "
                f"restore fails ({later.message})",
                later.fix,
            )
        ]
    return []


def _suspend(facts: Facts, mode: SuspendMode) -> list[Finding]:
    out = []
    if facts.vfio and mode == "never":
        out.append(
            Finding(
                "vfio-no-suspend",
                "error",
                f"VFIO devices {', '.join(facts.vfio)} need the guest suspended, and --suspend never was given",
                "use --suspend auto",
            )
        )
    if not wants_suspend(facts, mode) or facts.status != "running":
        return out
    why = "VFIO devices are present" if facts.vfio else "--suspend always"
    if not facts.agent_configured:
        out.append(
            Finding(
                "agent-missing",
                "error",
                f"{why}, but the VM has no guest agent channel",
                "launch the VM with --agent and run qemu-ga in the guest",
            )
        )
    elif not facts.agent_answers:
        out.append(
            Finding(
                "agent-silent",
                "error",
                f"{why}, but the guest agent does not answer ({facts.agent_error})",
                "start qemu-ga in the guest",
            )
        )
    elif not facts.agent_can_suspend:
        out.append(
            Finding(
                "agent-no-suspend",
                "error",
                f"{why}, but the guest agent does not offer guest-suspend-ram",
                "enable guest-suspend-ram in qemu-ga",
            )
        )
    if facts.s3_enabled:
        out += _s3_again(facts, why)
    else:
        out.append(
            Finding(
                "s3-disabled",
                "error",
                f"{why}, but the guest's S3 (suspend to RAM) is disabled",
                "add -global ICH9-LPC.disable_s3=0 (q35) or -global PIIX4_PM.disable_s3=0 (pc)",
                forceable=True,
            )
        )
    return out


def _s3_again(facts: Facts, why: str) -> list[Finding]:
    """Whether the guest can enter S3 now, and again after the wake that follows this save's restore."""
    if facts.acpi_pm_mapped is False:
        cause = " (SeaBIOS does not set ICH9's PMBASE again after an S3 wake)" if facts.seabios else ""
        return [
            Finding(
                "acpi-pm-unmapped",
                "error",
                f"{why}, but the guest's ACPI power-management block is not decoded{cause}: it cannot suspend "
                "again until it reboots",
                "reboot the guest, or boot it with UEFI firmware (OVMF)"
                + ("" if facts.vfio else ", or save it with --suspend auto"),
            )
        ]
    if facts.seabios and "q35" in facts.machine:
        return [
            Finding(
                "s3-once",
                "warning",
                f"{why}: a q35 guest on SeaBIOS suspends to RAM once per boot: the wake resets the ICH9 LPC "
                "bridge and SeaBIOS does not set its ACPI base again, so after the restore the guest's ACPI power "
                "block is off until the guest reboots (cprctl then refuses to suspend it: acpi-pm-unmapped; ACPI "
                "power-off and the power button are expected to fail too)",
                "boot the guest with UEFI firmware (OVMF, which restores it), or on an i440fx (pc) machine",
            )
        ]
    return []


def _space(facts: Facts, reboot: bool, suspend: SuspendMode, strategy: Strategy) -> list[Finding]:
    plan = choose(facts, suspend, strategy)
    if facts.state_free and facts.state_free < plan.expected_bytes:
        need, have = plan.expected_bytes >> 20, facts.state_free >> 20
        return [
            Finding(
                "space",
                "error",
                f"the state directory has {have} MiB free; this save needs up to {need} MiB",
                "free space, or move CPRCTL_STATE_DIR to a larger filesystem",
                forceable=True,
            )
        ]
    return []
