"""Bringing a VM under management: `launch` a new QEMU, or `adopt` a running one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .._host import systemd
from .._qemu import argv as qargv
from .._qemu import process
from .._qemu.agent import Agent
from .._qemu.process import Binary
from .._qemu.qmp import START_TIMEOUT, Monitor
from .._store import StateDir, VMLock
from ..errors import AgentError, CheckFailed, QemuError, UsageError, VMStateError
from . import kept
from .facts import vfio_refusal
from .record import VMRecord
from .report import Quiet, Reporter
from .vm import LOG_FILE, VM, open_vm

#: sun_path holds 108 bytes, the last a NUL.
SOCKET_PATH_MAX = 107


def _fresh_folder(sd: StateDir, name: str) -> Path:
    """VM *name*'s folder, refusing a name that is already managed and not stopped."""
    if sd.existing_vm_dir(name) is not None:
        vm = open_vm(sd, name)
        if vm.state() != "stopped":
            raise VMStateError(f"{name} already exists and is {vm.state()}; pick another name")
    return sd.create_vm_dir(name)


@contextlib.contextmanager
def _claim(sd: StateDir, name: str, operation: str) -> Iterator[Path]:
    """A new VM's folder, locked; removed again if *operation* fails (nothing ran under cprctl yet)."""
    folder = _fresh_folder(sd, name)
    with VMLock(folder, name, operation):
        try:
            yield folder
        except BaseException:
            import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

            shutil.rmtree(folder, ignore_errors=True)
            raise


def _socket_path(path: Path) -> str:
    if len(str(path)) > SOCKET_PATH_MAX:
        raise UsageError(
            f"socket path {path} is longer than {SOCKET_PATH_MAX} bytes; use a shorter --state-dir or name"
        )
    path.unlink(missing_ok=True)
    return str(path)


def prepare_argv(argv: Sequence[str], folder: Path, agent: bool) -> tuple[list[str], str, str | None, str]:
    """The argv cprctl will run: absolute binary, machine pinned, QMP (and agent) sockets added.

    Returns ``(argv, qmp socket, agent socket, machine)``.
    """
    if not argv:
        raise UsageError("no QEMU command line given (cprctl launch NAME -- QEMU ARGS...)")
    binary = Binary.find(argv[0])
    binary.require_cpr()
    machine = binary.resolve_machine(qargv.machine_type(argv))
    # cprctl detaches QEMU itself: -daemonize would hide its pid (and -incoming is restore's business)
    out = qargv.with_machine_type(qargv.for_relaunch([binary.path, *argv[1:]]), machine)
    qmp = qargv.qmp_socket(out)
    if qmp is None:
        qmp = _socket_path(folder / "qmp.sock")
        out += qargv.qmp_args(qmp)
    qga = qargv.agent_socket(out)
    if agent and qga is None:
        qga = _socket_path(folder / "qga.sock")
        out += qargv.agent_args(qga)
    return out, qmp, qga, machine


async def launch(sd: StateDir, name: str, argv: Sequence[str], agent: bool = False) -> VMRecord:
    """Start QEMU detached under management and return once QMP answers.

    :raise UsageError: bad name or argv; `QemuError` when QEMU is too old or does not come up
        (its log tail in the message); `VMStateError` when *name* is taken.
    """
    refuse_unpinnable(name, argv)
    with _claim(sd, name, "launch") as folder:
        full, qmp, qga, machine = prepare_argv(argv, folder, agent)
        log = folder / LOG_FILE
        rec = VMRecord(
            name=name,
            argv=full,
            qmp=qmp,
            origin="launch",
            machine=machine,
            log=str(log),
            qga=qga,
            cwd=os.getcwd(),
            created=time.time(),
        )
        rec.pid = process.spawn(full, log, cwd=rec.cwd, scope=name)
        vm = VM(name, folder, rec)
        try:
            vm.commit()
            await wait_qmp(vm, rec.pid)
        except BaseException:
            process.kill(rec.pid)
            raise
        await _keep_build(vm)
        return rec


def refuse_unpinnable(name: str, argv: Sequence[str]) -> None:
    """:raise CheckFailed: *argv* has a VFIO device and RAM the kernel will not let VFIO pin (QEMU would fail)."""
    refusal = vfio_refusal(list(argv))
    if refusal:
        raise CheckFailed(name, [refusal])


async def wait_qmp(vm: VM, pid: int) -> None:
    """Wait for QMP of a QEMU just started (up to `START_TIMEOUT`); stop it and say why if it never answers."""
    try:
        async with Monitor(vm.record.qmp, vm.name, pid, timeout=START_TIMEOUT):
            pass
    except QemuError as exc:
        process.kill(pid)
        tail = process.log_tail(vm.log_path)
        raise QemuError(f"{exc}{': ' + tail if tail else ''}", error_class=exc.error_class) from exc


def socket_peer_pid(path: str) -> int:
    """The pid of the process listening on unix socket *path* (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError as exc:
            raise QemuError(f"cannot connect to {path}: {exc.strerror}") from exc
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


async def adopt(sd: StateDir, name: str, qmp: str, qga: str | None = None) -> VMRecord:
    """Take a QEMU that something else started under management.

    Its argv comes from ``/proc/PID/cmdline`` (PID from the QMP socket's peer),
    with the machine type pinned to the one QEMU actually runs.

    :raise QemuError: when QMP does not answer or QEMU is too old.
    """
    qmp = os.path.abspath(qmp)
    pid = socket_peer_pid(qmp)
    with _claim(sd, name, "adopt") as folder:
        argv = process.cmdline(pid)
        async with Monitor(qmp, name, pid, timeout=5.0) as mon:
            version = await mon.version()
            machine = str(await mon.execute("qom-get", {"path": "/machine", "property": "type"}))
        if version[:2] < process.MIN_VERSION:
            raise QemuError(f"{name}: QEMU {'.'.join(map(str, version))} is too old; cpr-reboot needs >= 9.0")
        machine = machine.removesuffix("-machine")
        argv = qargv.with_machine_type([_absolute_in(argv[0], pid), *argv[1:]], machine)
        qga = os.path.abspath(qga) if qga else qargv.agent_socket(argv)
        cwd = os.readlink(f"/proc/{pid}/cwd")
        rec = VMRecord(
            name=name,
            argv=argv,
            qmp=qmp,
            origin="adopt",
            machine=machine,
            log=str(folder / LOG_FILE),
            qga=qga,
            pid=pid,
            cwd=cwd,
            created=time.time(),
        )
        # Out of the unit that started it (which systemd would stop at shutdown without a save).
        systemd.attach(pid, name)
        vm = VM(name, folder, rec)
        vm.commit()
        await _keep_build(vm)
        return rec


def _absolute_in(binary: str, pid: int) -> str:
    """The adopted QEMU's binary as an absolute path (it may have been started by a relative one)."""
    if os.sep in binary and not os.path.isabs(binary):
        return os.path.normpath(os.path.join(os.readlink(f"/proc/{pid}/cwd"), binary))
    if os.sep not in binary:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    return binary


async def stop(sd: StateDir, name: str) -> None:
    """Power VM *name* off (QMP ``quit``, then signals); the record stays, as ``stopped``.

    :raise VMStateError: the VM is saved (restore it, or `remove` it with its checkpoint).
    """
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "stop"):
        if vm.record.checkpoint is not None:
            raise VMStateError(f"{name} is saved, not running; 'cprctl remove --force' discards the checkpoint")
        pid = vm.record.pid
        if pid and process.alive(pid):
            try:
                async with Monitor(vm.record.qmp, name, pid) as mon:
                    await mon.quit()
            except QemuError:
                pass
            if not process.wait_gone(pid, 10):
                process.kill(pid)
        vm.record.pid = None
        vm.record.boot_pending = False  # the operator wants it off: restore-all leaves it so
        vm.record.lost = None
        vm.commit()


#: Seconds a guest is given to power off, after guest-shutdown and again after the ACPI button.
SHUTDOWN_GRACE = 60.0


async def shut_down(sd: StateDir, name: str, grace: float | None = None, reporter: Reporter | None = None) -> str:
    """Power VM *name* off the clean way, as at a host shutdown it cannot be saved for: the guest
    agent's ``guest-shutdown``, else ACPI ``system_powerdown``, each given *grace* seconds; only
    then QMP ``quit`` and signals (default *grace*: `SHUTDOWN_GRACE`). Marks the VM to be booted
    afresh by the next ``restore-all``. Returns how it went (one line).

    :raise VMStateError: the VM is not running.
    """
    reporter = reporter or Quiet()
    grace = SHUTDOWN_GRACE if grace is None else grace
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "shutdown"):
        pid = vm.record.pid
        if vm.state() != "running" or not pid:
            raise VMStateError(f"{name} is {vm.state()}, not running")
        how = await _power_off(vm, pid, grace, reporter)
        vm.record.pid = None
        vm.record.boot_pending = True
        vm.record.lost = None
        vm.commit()
        return how


async def _power_off(vm: VM, pid: int, grace: float, reporter: Reporter) -> str:
    if vm.record.qga:
        reporter.step(f"{vm.name}: asking the guest agent to shut the guest down")
        try:
            async with Agent(vm.record.qga, vm.name, timeout=10) as agent:
                await agent.shutdown()
            if await asyncio.to_thread(process.wait_gone, pid, grace):
                return "shut down by its guest agent"
        except AgentError as exc:
            reporter.step(f"{vm.name}: {exc}")
    reporter.step(f"{vm.name}: pressing the ACPI power button (system_powerdown)")
    with contextlib.suppress(QemuError):
        async with Monitor(vm.record.qmp, vm.name, pid) as mon:
            await mon.execute("system_powerdown")
        if await asyncio.to_thread(process.wait_gone, pid, grace):
            return "shut down on the ACPI power button"
    reporter.step(f"{vm.name}: the guest did not power off in {grace:.0f} s; stopping QEMU")
    with contextlib.suppress(QemuError):
        async with Monitor(vm.record.qmp, vm.name, pid) as mon:
            await mon.quit()
    if not await asyncio.to_thread(process.wait_gone, pid, 10):
        await asyncio.to_thread(process.kill, pid)
    return f"the guest did not power off in {grace:.0f} s; QEMU was stopped (the guest was not shut down)"


def remove(sd: StateDir, name: str, force: bool = False) -> None:
    """Stop managing VM *name* and delete its folder.

    :raise VMStateError: it runs, or is saved and *force* is not given (its checkpoint would be lost).
    """
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "remove"):
        if vm.running():
            raise VMStateError(f"{name} is running; 'cprctl stop {name}' first")
        if vm.record.checkpoint is not None and not force:
            raise VMStateError(f"{name} is saved; removing it discards its checkpoint (use --force)")
        import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

        shutil.rmtree(vm.folder)
    kept.collect(sd.path)


async def start(sd: StateDir, name: str) -> VMRecord:
    """Boot a stopped VM afresh from its recorded argv (its earlier running state is gone).

    :raise VMStateError: it runs, or is saved (restore it instead).
    """
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "start"):
        if vm.state() != "stopped":
            hint = "; restore it instead" if vm.state() == "saved" else ""
            raise VMStateError(f"{name} is {vm.state()}, not stopped{hint}")
        for path in (vm.record.qmp, vm.record.qga):
            if path:
                Path(path).unlink(missing_ok=True)
        vm.record.pid = process.spawn(qargv.for_relaunch(vm.record.argv), vm.log_path, cwd=vm.record.cwd, scope=name)
        vm.record.boot_pending = False
        vm.record.compat_args = []  # a fresh boot has the queues its argv gives (see `compat.queue_args`)
        vm.commit()
        await wait_qmp(vm, vm.record.pid)
        await _keep_build(vm)
        return vm.record


async def _keep_build(vm: VM) -> None:
    """Keep the build the VM's QEMU runs (see `kept`) and record it."""
    if await asyncio.to_thread(kept.keep, vm):
        vm.commit()


async def ping(sd: StateDir, name: str, timeout: float = 10.0) -> float:
    """Round-trip time (ms) of ``guest-ping`` to the VM's guest agent.

    :raise AgentError: no agent channel, or it does not answer within *timeout*;
        `VMStateError` when the VM is not running.
    """
    vm = open_vm(sd, name)
    if not vm.running():
        raise VMStateError(f"{name} is {vm.state()}, not running")
    if not vm.record.qga:
        raise AgentError(f"{name} has no guest agent channel")
    t = time.perf_counter()
    async with Agent(vm.record.qga, name, timeout=timeout) as agent:
        await agent.execute("guest-ping")
    return (time.perf_counter() - t) * 1000
