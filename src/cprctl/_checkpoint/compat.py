"""Deciding, without I/O: can a QEMU binary take this VM? (``update``, ``restore --qemu``, ``check --qemu``)

`binary_findings` compares what the VM's argv and migration plan need with
what `BinaryInfo` says the binary offers. Any error is a refusal made while
the guest still runs on its old QEMU (or, for a restore, before anything starts).

`queue_mismatches` and `queue_args` compare the VM's virtqueues (`virtio.devices`
of the running QEMU, or as recorded at the save) with what the new QEMU allocated
once started: where a property sizes the queue, the new QEMU is started again with
``-global TYPE.PROP=SIZE`` (kept in the record beside the operator's argv); where
none does, the move is refused naming the device and queue.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .._qemu import argv as qargv
from .._qemu.probe import BinaryInfo
from .._qemu.process import MIN_VERSION
from .._qemu.virtio import VirtioDevice
from ..errors import CheckFailed
from .plan import Finding, Severity
from .record import Proof

#: Firmware x86 machines load when the argv names none (SeaBIOS).
X86_DEFAULT_BIOS = "bios-256k.bin"
#: ``-nic``/``-net`` values that name no backend.
NO_BACKEND = frozenset({"none", "nic"})


def binary_findings(
    info: BinaryInfo,
    argv: Sequence[str],
    machine: str,
    capabilities: Mapping[str, bool],
    parameters: Mapping[str, object],
    cwd: str = "/",
) -> list[Finding]:
    """What binary *info* lacks to run *argv* on machine type *machine* and load its state."""
    return [
        Finding(f"binary-{what}", "error", f"{info.path} {lack}", "pick a QEMU that has it; the VM was not touched")
        for what, lack in _lacks(info, argv, machine, capabilities, parameters, cwd)
    ]


def fallback_binary(failed: str, failed_wrote_it: bool, home: str, home_wrote_it: bool, kept: str | None) -> str | None:
    """Where a restore goes when binary *failed* could not load the checkpoint: the VM's own binary *home*
    while it is still the build that wrote the checkpoint (*home_wrote_it*), else the *kept* build's
    launcher. None when the binary that failed is itself that build (*failed_wrote_it*: another copy of it
    would fail the same way, e.g. the state file or the host is at fault) or nothing is left to try."""
    if failed_wrote_it:
        return None
    for candidate in (home if home_wrote_it else None, kept):
        if candidate and candidate != failed:
            return candidate
    return None


#: Whether a VM's state loads into a binary: its own build's, proven by a trial, known to fail, not yet tried,
#: or unknown (the state's build was never recorded).
LoadVerdict = Literal["same-build", "proven", "fails", "unproven", "unknown"]


@dataclass(frozen=True)
class Loadability:
    """What is known about loading a VM's state into *binary*."""

    verdict: LoadVerdict
    binary: str
    reason: str = ""
    #: The kept build that wrote the state, which a restore falls back to; None when none is kept.
    kept: str | None = None

    @property
    def restorable(self) -> bool:
        """Whether a restore has a binary that is not known to fail: *binary* itself or the kept build."""
        return self.verdict != "fails" or self.kept is not None


def loadability(
    source: str | None, target: str | None, binary: str, proof: Proof | None, kept: str | None
) -> Loadability:
    """Decide from the state's build *source*, the *binary*'s build *target* (None: missing or unreadable),
    what was learnt (*proof*) and the *kept* build's launcher."""
    if source is None:
        return Loadability("unknown", binary, "the build that runs it was not recorded", kept)
    if target is None:
        return Loadability("fails", binary, f"{binary} is missing or unreadable", kept)
    if source == target:
        return Loadability("same-build", binary, "", kept)
    if proof is None:
        return Loadability("unproven", binary, "", kept)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(proof.at))
    if proof.loads:
        return Loadability("proven", binary, f"by a {proof.how} at {when}", kept)
    return Loadability("fails", binary, f"{proof.reason} ({proof.how} at {when})", kept)


def load_finding(name: str, load: Loadability) -> Finding:
    """The finding `check --reboot` and `check --qemu` report about loading *name*'s state."""
    b, kept = load.binary, load.kept
    instead = f"; a restore falls back to the kept build {kept}" if kept else ""
    if load.verdict == "same-build":
        return Finding("state-loads", "info", f"its state is written by the build of {b}: it loads there")
    if load.verdict == "proven":
        return Finding("state-loads", "info", f"its state is proven to load into {b} ({load.reason})")
    if load.verdict == "unknown":
        return Finding(
            "state-load-unknown",
            "warning",
            f"whether its state loads into {b} is unknown: {load.reason}",
            "save and restore it once (or update it) so cprctl keeps its QEMU build",
        )
    if load.verdict == "unproven":
        severity: Severity = "info" if kept else "warning"
        return Finding(
            "state-load-unproven",
            severity,
            f"its state is not yet proven to load into {b}{instead}",
            "" if kept else f"'cprctl update {name} --qemu {b}' tries it with the guest running",
        )
    if kept:
        return Finding(
            "state-load-fails",
            "warning",
            f"its state does not load into {b}: {load.reason}{instead}",
            f"'cprctl update {name}' again once a QEMU that loads it is installed",
        )
    return Finding(
        "state-load-fails",
        "error",
        f"its state does not load into {b} ({load.reason}) and no kept build can take it: it would stay down",
        "keep the VM running, or install a QEMU that loads it and move it there with 'cprctl update'",
    )


def require(name: str, found: list[Finding]) -> None:
    """:raise CheckFailed: when *found* has an error (the VM named *name* was not touched)."""
    if any(f.blocking for f in found):
        raise CheckFailed(name, found)


def _lacks(
    info: BinaryInfo,
    argv: Sequence[str],
    machine: str,
    capabilities: Mapping[str, bool],
    parameters: Mapping[str, object],
    cwd: str,
) -> Iterator[tuple[str, str]]:
    if info.version[:2] < MIN_VERSION:
        have, need = ".".join(map(str, info.version)), ".".join(map(str, MIN_VERSION))
        yield "version", f"is QEMU {have}; cpr-reboot needs QEMU >= {need}"
    if parameters.get("mode", "normal") not in info.modes:
        yield "mode", f"has no migration mode {parameters.get('mode')}"
    yield from (("capability", f"lacks migration capability {c}") for c in capabilities if c not in info.capabilities)
    yield from (("parameter", f"lacks migration parameter {p}") for p in parameters if p not in info.parameters)
    if machine not in info.machines:
        yield "machine", f"lacks machine type {machine}"
    for device in _named(argv, "device", "driver"):
        if device not in info.devices:
            yield "device", f"lacks device {device}"
    for obj in _named(argv, "object", "qom-type"):
        if obj not in info.objects:
            yield "object", f"lacks object type {obj}"
    for netdev in _netdevs(argv):
        if netdev not in info.netdevs:
            yield "netdev", f"lacks network backend {netdev}"
    for cpu in _named(argv, "cpu", "model"):
        if cpu not in info.cpus:
            yield "cpu", f"lacks CPU model {cpu}"
    for path in firmware(argv, info.datadirs, cwd, info.root):
        if not os.path.exists(path):
            yield "file", f"would not find {path}"


def _named(argv: Sequence[str], option: str, implied: str) -> list[str]:
    """The type every *option* of *argv* names (its implied first value)."""
    values = (qargv.split_keyval(o.value or "", implied).get(implied, "") for o in qargv.options(argv, option))
    return [v for v in values if v]


def _netdevs(argv: Sequence[str]) -> list[str]:
    found = _named(argv, "netdev", "type")
    found += [t for t in _named(argv, "nic", "type") + _named(argv, "net", "type") if t not in NO_BACKEND]
    return found


def firmware(argv: Sequence[str], datadirs: Sequence[str], cwd: str = "/", root: str = "/") -> list[str]:
    """The files *argv* makes QEMU load at start-up (firmware, kernel, ROMs), as paths to look for.

    A bare ``-bios``/``romfile`` name is searched in the binary's data dirs below
    *root* (the tree the binary runs in; the first dir stands for all when none has
    it); other paths are the host's, taken from *cwd*.
    """
    found: list[str] = []
    for opt in qargv.options(argv, "bios", "pflash", "kernel", "initrd", "dtb"):
        if opt.value and opt.name == "bios":
            found.append(_datadir_file(opt.value, datadirs, root))
        elif opt.value:
            found.append(os.path.join(cwd, opt.value))
    for opt in qargv.options(argv, "drive"):
        props = qargv.split_keyval(opt.value or "", "file")
        if props.get("if") == "pflash" and props.get("file"):
            found.append(os.path.join(cwd, props["file"]))
    for opt in qargv.options(argv, "device"):
        rom = qargv.split_keyval(opt.value or "", "driver").get("romfile")
        if rom:
            found.append(_datadir_file(rom, datadirs, root))
    x86 = os.path.basename(argv[0]).startswith(("qemu-system-x86_64", "qemu-system-i386")) if argv else False
    pflash = any(p.endswith("pflash") or "if=pflash" in p for p in argv)
    if x86 and not qargv.options(argv, "bios") and not pflash:
        found.append(_datadir_file(X86_DEFAULT_BIOS, datadirs, root))
    return found


def _datadir_file(name: str, datadirs: Sequence[str], root: str = "/") -> str:
    if os.sep in name or not datadirs:
        return name
    paths = [os.path.join(root, d.lstrip("/"), name) for d in datadirs]
    return next((p for p in paths if os.path.exists(p)), paths[0])


#: The driver of a ``-global`` that sizes a virtqueue: QEMU applies it to every device of that backend type.
GLOBAL = "-global"


@dataclass(frozen=True)
class QueueMismatch:
    """A virtqueue the new QEMU would not load: the VM's queue is larger than what the new QEMU allocated."""

    device: str
    qom_type: str
    queue: int
    size: int
    maximum: int
    #: The property that sets this queue's allocation, or None when no property does.
    prop: str | None


def size_property(qom_type: str, queue: int, count: int) -> str | None:
    """The property of virtio backend *qom_type* that sets the size of its queue *queue* (of *count*)."""
    if qom_type in ("virtio-blk-device", "vhost-user-blk"):
        return "queue-size"
    if qom_type == "virtio-scsi-device":
        return "virtqueue_size"
    if qom_type == "virtio-net-device":
        if count % 2 == 1 and queue == count - 1:
            return None  # the control queue: a fixed 64 entries
        return "rx_queue_size" if queue % 2 == 0 else "tx_queue_size"
    return None


def queue_mismatches(saved: Sequence[VirtioDevice], new: Sequence[VirtioDevice]) -> list[QueueMismatch]:
    """The queues of *saved* (the VM's devices as they run or were saved) larger than *new* allocates.

    A device *new* lacks is not judged here (QEMU names it when it loads).
    """
    by_path = {d.path: d for d in new}
    found = []
    for dev in saved:
        other = by_path.get(dev.path)
        if other is None:
            continue
        for i, size in enumerate(dev.sizes):
            maximum = other.maxima[i] if i < len(other.maxima) else 0
            if size > maximum:
                prop = size_property(dev.qom_type, i, len(dev.sizes))
                found.append(QueueMismatch(dev.device, dev.qom_type, i, size, maximum, prop))
    return found


class Resize(Exception):
    """A new QEMU allocated smaller virtqueues than the VM has: start it again with *args_* (nothing changed)."""

    def __init__(self, args_: list[str]) -> None:
        super().__init__(" ".join(args_))
        self.args_ = args_


def queue_args(name: str, binary: str, found: Sequence[QueueMismatch], current: Sequence[str]) -> list[str]:
    """*current* (``-global`` pairs passed to the VM's QEMU besides its argv) plus what sizes *found*'s queues.

    :raise CheckFailed: a queue no property sizes, or one a ``-global`` already in *current* did not
        raise: the new QEMU cannot load the state (one line naming the device and property).
    """
    globals_ = _globals(current)
    for m in found:
        if m.prop is None or int(globals_.get(f"{m.qom_type}.{m.prop}", "0") or 0) >= m.size:
            raise CheckFailed(name, [_unloadable(binary, m)])
        key = f"{m.qom_type}.{m.prop}"
        globals_[key] = str(max(m.size, int(globals_.get(key, "0") or 0)))
    return [w for key, value in globals_.items() for w in (GLOBAL, f"{key}={value}")]


def _globals(args: Sequence[str]) -> dict[str, str]:
    pairs = zip(args[::2], args[1::2], strict=False)
    return dict(value.split("=", 1) for flag, value in pairs if flag == GLOBAL and "=" in value)


def _unloadable(binary: str, m: QueueMismatch) -> Finding:
    how = (
        "no property sizes that queue"
        if m.prop is None
        else f"{m.qom_type}.{m.prop}={m.size} does not raise it (the build caps it)"
    )
    return Finding(
        "virtio-queue-size",
        "error",
        f"{binary} cannot load {m.qom_type} {m.device}: its queue {m.queue} has {m.size} entries, "
        f"{binary} allocates {m.maximum} and {how}",
        "keep the VM on the QEMU build it runs on (machine-type compatibility differs between these builds)",
    )


#: How a warm update hands the guest over: QEMU's ``cpr-transfer`` mode, or the standby with cpr-reboot /
#: normal-mode migration (see `update`). ``auto`` picks (see `handover_mode`).
HandoverMode = Literal["auto", "standby", "cpr-transfer"]
#: The first QEMU release with ``cpr-transfer`` (docs/devel/migration/CPR.rst; 10.0.2 and 10.0.13 have it).
TRANSFER_VERSION = (10, 0, 0)


def transfer_blockers(
    argv: Sequence[str], old_version: tuple[int, int, int], new: BinaryInfo, suspend: bool = False
) -> list[str]:
    """Why a warm update of *argv* cannot use ``cpr-transfer`` onto *new* (empty: it can).

    cpr-transfer passes each RAM block's fd to the new QEMU over a unix socket, so every RAM block
    must be shared memory: every memory backend ``share=on`` (memfd is by default) and, for the
    blocks QEMU makes itself (ROMs, VGA), ``-machine aux-ram-share=on``. Both QEMUs need the mode.
    """
    why: list[str] = []
    if old_version < TRANSFER_VERSION:
        why.append(f"the running QEMU {'.'.join(map(str, old_version))} has no cpr-transfer (QEMU >= 10.0)")
    if "cpr-transfer" not in new.modes:
        why.append(f"{new.path} has no cpr-transfer")
    if qargv.machine_props(argv).get("aux-ram-share", "off") not in qargv.TRUE:
        why.append("the VM was started without -machine aux-ram-share=on")
    for b in qargv.ram_layout(argv).backends:
        if b.kind in ("default", "mem-path"):
            why.append("its main RAM is not a memory backend with share=on")
        elif not b.share:
            why.append(f"RAM backend {b.id!r} is not share=on")
    if suspend:
        why.append("the guest is suspended for the handover (cpr-transfer here keeps no VFIO device)")
    return why


def handover_mode(asked: HandoverMode, blockers: Sequence[str]) -> tuple[str, str | None]:
    """``(mode, why not cpr-transfer)`` for a warm update asked to run in *asked* mode.

    ``auto`` takes cpr-transfer wherever it can run: it keeps in place RAM that the standby would pre-copy
    (memfd, ``memory-backend-ram,share=on``), and where all RAM is in named shared files its pause measured
    a third to a half of the standby's on the same guest (benchmarks/RESULTS.md, "cpr-transfer against the
    standby"). An explicit ``cpr-transfer`` that cannot run falls back to the standby, with the reason.
    """
    if asked == "standby":
        return "standby", None
    if blockers:
        return "standby", "; ".join(blockers)
    return "cpr-transfer", None
