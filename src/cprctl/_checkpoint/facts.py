"""Collecting `Facts` about a live VM: from QMP, the guest agent, its argv and this host's filesystems."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
from pathlib import Path
from typing import Any

from .._qemu import argv as qargv
from .._qemu.acpi import acpi_pm_mapped
from .._qemu.agent import Agent
from .._qemu.probe import BinaryInfo, probe
from .._qemu.process import Binary
from .._qemu.qmp import Monitor
from ..errors import AgentError, QemuError
from .plan import Facts, Finding, RamFact, SuspendMode, dax_mount, vfio_pin_refusal, wants_suspend
from .record import VMRecord


def mount_of(path: str) -> tuple[str, str, str]:
    """``(mount point, fs type, options)`` of the filesystem holding *path*."""
    real = os.path.realpath(path)
    best = ("/", "", "")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _dev, point, fstype, opts, *_ = line.split()
            point = point.replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, fstype, opts)
    return best


def ram_fact(backend: qargv.RamBackend) -> RamFact:
    if not backend.path:
        return RamFact(backend)
    try:
        st = os.stat(backend.path)
    except FileNotFoundError:
        # QEMU creates it (at launch): on the filesystem of its folder.
        _point, fstype, opts = mount_of(os.path.dirname(os.path.abspath(backend.path)))
        return RamFact(backend, "missing", fstype, dax_mount(opts))
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "chardev" if stat.S_ISCHR(st.st_mode) else "file"
    _point, fstype, opts = mount_of(backend.path)
    dax = is_device_dax(backend.path, st) if kind == "chardev" else dax_mount(opts)
    return RamFact(backend, kind, fstype, dax)


_DEVICE_DAX = re.compile(r"/dev/dax\d+\.\d+")


def is_device_dax(path: str, st: os.stat_result) -> bool:
    """Whether character device *path* is a device DAX (``/dev/daxN.M``, or a char device of sysfs class dax)."""
    if _DEVICE_DAX.fullmatch(os.path.realpath(path)):
        return True
    subsystem = Path(f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/subsystem")
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(subsystem)) == "dax"
    return False


def running_kernel() -> tuple[int, int]:
    """The running kernel's ``(major, minor)`` (``6.12.38+deb13-cloud-amd64`` -> ``(6, 12)``)."""
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def vfio_refusal(argv: list[str]) -> Finding | None:
    """Why *argv*'s VFIO devices cannot pin its RAM on the running kernel (QEMU would fail), or None."""
    if not qargv.has_vfio(argv):
        return None
    return vfio_pin_refusal([ram_fact(b) for b in qargv.ram_layout(argv).backends], running_kernel())


async def has_cpr_mode(mon: Monitor) -> bool:
    """Whether QEMU offers the ``cpr-reboot`` migration mode.

    Asked through ``query-migrate-parameters``: a mode is chosen only through its ``mode`` parameter, which
    came in QEMU 8.2 with ``MigMode`` whose first mode besides ``normal`` is ``cpr-reboot``. Not through the
    schema (``query-qmp-schema``): a 200 KB answer that took 0.4 s here on a loaded host, inside every save.
    """
    params: dict[str, Any] = await mon.execute("query-migrate-parameters")
    return "mode" in params


async def vfio_devices(mon: Monitor) -> list[str]:
    """Ids (or paths) of VFIO devices in the QOM tree, hot-plugged ones included."""
    found = []
    for folder in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = await mon.execute("qom-list", {"path": folder})
        except QemuError:
            continue
        found += [f"{folder}/{c['name']}" for c in children if str(c.get("type", "")).startswith("child<vfio")]
    return found


#: Ids QEMU gives the main RAM it makes itself when no backend is named (x86's pc and q35).
DEFAULT_RAM_IDS = frozenset({"pc.ram"})


async def hotplugged(mon: Monitor, argv: list[str]) -> list[str]:
    """What was plugged in after QEMU started: a restart from the recorded argv would lack it."""
    known = qargv.device_ids(argv)
    try:
        children = await mon.execute("qom-list", {"path": "/machine/peripheral"})
    except QemuError:
        children = []
    found = [
        f"device {c['name']!r}"
        for c in children
        if str(c.get("type", "")).startswith("child<") and c["name"] not in known
    ]
    backends = {b.id for b in qargv.ram_layout(argv).backends} | DEFAULT_RAM_IDS
    memdevs = await mon.execute("query-memdev")
    found += [f"memory backend {m['id']!r}" for m in memdevs if m.get("id") and m["id"] not in backends]
    return found


async def agent_facts(record: VMRecord) -> tuple[bool, bool, str]:
    """``(answers, offers guest-suspend-ram, error)`` for the VM's guest agent."""
    if not record.qga:
        return False, False, "no agent channel"
    try:
        async with Agent(record.qga, record.name, timeout=3.0) as agent:
            return True, "guest-suspend-ram" in await agent.commands(), ""
    except AgentError as exc:
        return False, False, str(exc).split(": ", 1)[-1]


def supports_direct_io(folder: Path) -> bool:
    """Whether files in *folder* can be opened with O_DIRECT (tmpfs, for one, refuses)."""
    probe = folder / f".dio-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    os.close(fd)
    return True


async def gather(record: VMRecord, mon: Monitor, state_dir: Path, suspend: SuspendMode = "auto") -> Facts:
    """Everything the plan and the check need, read without changing the VM."""
    # Asked all at once: QEMU answers them in turn, the round trips overlap (each took 1-10 ms here).
    caps, summary, vfio, status, version, cpr, plugged = await asyncio.gather(
        mon.execute("query-migrate-capabilities"),
        mon.execute("query-memory-size-summary"),
        vfio_devices(mon),
        mon.status(),
        mon.version(),
        has_cpr_mode(mon),
        hotplugged(mon, record.argv),
    )
    base = Facts(
        record.name,
        version,
        cpr,
        record.machine,
        [ram_fact(b) for b in qargv.ram_layout(record.argv).backends],
        int(summary.get("base-memory", 0)) + int(summary.get("plugged-memory", 0)),
        frozenset(c["capability"] for c in caps if c["state"]),
        vfio,
    )
    (answers, can_suspend, err), pm_mapped = (False, False, ""), None
    if wants_suspend(base, suspend) and status == "running":
        (answers, can_suspend, err), pm_mapped = await asyncio.gather(agent_facts(record), acpi_pm_mapped(mon))
    vfs = os.statvfs(state_dir)
    return Facts(
        **{
            **base.__dict__,
            "agent_configured": bool(record.qga),
            "agent_answers": answers,
            "agent_can_suspend": can_suspend,
            "agent_error": err,
            "s3_enabled": qargv.s3_enabled(record.argv),
            "seabios": not qargv.uefi_firmware(record.argv),
            "acpi_pm_mapped": pm_mapped,
            "status": status,
            "state_fs": mount_of(str(state_dir))[1],
            "state_free": vfs.f_bavail * vfs.f_frsize,
            "state_dio": supports_direct_io(state_dir),
            "cores": os.cpu_count() or 1,
            "hotplugged": plugged,
            "kernel": running_kernel(),
        }
    )


#: Probes of this process, by the binary file's identity: a cold update checks the binary before the
#: guest stops and its restore checks it again (with the guest stopped); update-all checks it per VM.
_probed: dict[tuple[str, int, int, int, int], BinaryInfo] = {}


async def binary_info(path: str) -> BinaryInfo:
    """What the QEMU binary at *path* offers (see `probe`); about 0.3 s the first time, the VM untouched.

    A file already probed by this process (same path, device, inode, size and mtime) is not run again.
    """
    try:
        st = os.stat(path)
        key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return await asyncio.to_thread(probe, Binary(path))  # probe says why it cannot run
    if key not in _probed:
        _probed[key] = await asyncio.to_thread(probe, Binary(path))
    return _probed[key]
