"""One managed VM on disk: its folder, its record, and finishing what a killed cprctl left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .._host import clock, systemd
from .._qemu import process
from .._qemu.argv import served_sockets
from .._qemu.qmp import Monitor
from .._qemu.sockets import drop_sockets, take_over_sockets
from .._store import StateDir, VMLock
from .._store.statedir import RECORD_FILE
from ..errors import BusyError, QemuError, VMNotFound
from . import canary, disks, record
from .record import GUEST_RESUMED, VMRecord
from .report import Reporter

STATE_FILE = "state.cpr"
#: A retired state file is renamed to ``STATE_FILE + RETIRED + token`` and deleted in the background.
RETIRED = ".retired-"
#: Every capability a save may turn on; a rolled-back save turns them off again.
PLAN_CAPABILITIES = ("x-ignore-shared", "mapped-ram", "multifd")
LOG_FILE = "qemu.log"
#: The cpr channel of a warm update by cpr-transfer (``cpr.sock~TOKEN`` in the VM's folder; see `update`).
CPR_SOCKET = "cpr.sock"


@dataclass
class VM:
    """A VM's folder and its record; `commit` writes the record back atomically."""

    name: str
    folder: Path
    record: VMRecord
    #: The QEMU pid the record held when loaded, if it was written during an earlier boot (no process of ours).
    stale_pid: int | None = None

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD_FILE

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def checkpoint_file(self) -> Path:
        """The state file of the recorded checkpoint, in this VM's folder."""
        assert self.record.checkpoint is not None
        return self.folder / os.path.basename(self.record.checkpoint.state_file)

    @property
    def log_path(self) -> Path:
        return Path(self.record.log)

    def commit(self, durable: bool = True) -> None:
        """Write the record, with the systemd unit its QEMU runs in now and this boot's id.

        *durable* (the default): flushed to disk, so the record survives a host crash. Only a step after
        which a host crash leads to the same recovery as before it may be committed without (see `_migrate`
        of `update`): a killed cprctl's successor reads the new record all the same.
        """
        if not self.same_boot() and self.record.pid == self.stale_pid:
            self.record.pid = None  # a QEMU of an earlier boot: its pid may be anyone's now
        self.record.boot_id = clock.boot_id()
        self.record.unit = systemd.unit_of(self.record.pid) if self.running() else None
        record.save(self.record_path, self.record, durable)

    def same_boot(self) -> bool:
        """Whether the record was last written during this boot of the host (its pids may be alive)."""
        return self.record.boot_id in (None, clock.boot_id())

    def alive(self, pid: int | None) -> bool:
        """Whether *pid*, recorded for this VM, still runs: never a pid of an earlier boot."""
        return self.same_boot() and process.alive(pid)

    def running(self) -> bool:
        return self.alive(self.record.pid)

    def lose(self, why: str) -> None:
        """The VM's running state is gone (*why*, one line): the next ``restore-all`` boots it afresh."""
        self.record.lost = f"{why}; its running state was lost"
        self.record.boot_pending = True
        self.record.pid = None

    def state(self) -> str:
        """``running``, ``saved``, ``stopped`` or ``broken`` (an unfinished operation or missing state file)."""
        r = self.record
        if r.operation is not None:
            return "broken"
        if r.checkpoint is not None:
            return "saved" if Path(r.checkpoint.state_file).exists() and not self.running() else "broken"
        return "running" if self.running() else "stopped"


def open_vm(sd: StateDir, name: str) -> VM:
    """Load VM *name*.

    :raise VMNotFound: when it is not managed; `RecordError` when its record is bad.
    """
    folder = sd.existing_vm_dir(name)
    if folder is None:
        raise VMNotFound(name)
    vm = VM(name, folder, record.load(folder / RECORD_FILE))
    if not vm.same_boot():
        vm.stale_pid = vm.record.pid
    return vm


async def settled(sd: StateDir, name: str, reporter: Reporter) -> VM:
    """VM *name* once what an earlier boot or a killed cprctl left is dealt with: an interrupted operation
    finished or rolled back (`recover`), a VM that ran unsaved when the host went down noted (`note_host_down`).
    A VM another cprctl holds is returned as it is."""
    vm = open_vm(sd, name)
    stale = vm.record.operation is not None and not vm.alive(vm.record.operation.pid)
    if stale or ran_before_boot(vm):
        with contextlib.suppress(BusyError), VMLock(vm.folder, name, "recover"):
            vm = open_vm(sd, name)
            await recover(vm, reporter)
            note_host_down(vm, reporter)
    return vm


async def recover(vm: VM, reporter: Reporter) -> str | None:
    """Finish or roll back an operation a killed cprctl left in the record; what was done.

    Call with the VM's lock held. A save whose checkpoint was recorded is
    finished (QEMU stopped); an earlier one is rolled back (the guest resumed,
    the partial state file removed). A restore whose new QEMU runs the guest is
    finished; otherwise that QEMU is stopped and the checkpoint kept.
    """
    op = vm.record.operation
    if op is None or (op.pid != os.getpid() and vm.alive(op.pid) and _is_cprctl(op.pid)):
        if op is None:
            await asyncio.to_thread(remove_retired, vm)
        return None
    if op.kind == "save":
        done = await _recover_save(vm)
    elif op.kind == "update":
        done = await _recover_update(vm)
    else:
        done = await _recover_restore(vm)
    vm.record.operation = None
    vm.commit()
    reporter.step(f"{vm.name}: an earlier {op.kind} was interrupted at '{op.step}': {done}")
    return done


def ran_before_boot(vm: VM) -> bool:
    """Whether the VM ran, unsaved, when the host went down (its record, of an earlier boot, has a QEMU pid)."""
    r = vm.record
    return bool(r.pid) and not vm.same_boot() and r.checkpoint is None and r.operation is None


def note_host_down(vm: VM, reporter: Reporter) -> None:
    """A VM that ran, unsaved, when the host went down (see `ran_before_boot`): the next restore-all boots it.

    Call with the VM's lock held.
    """
    if ran_before_boot(vm):
        vm.lose("the host went down while it ran, unsaved")
        vm.commit()
        reporter.step(f"{vm.name}: {vm.record.lost}; restore-all boots it afresh")


def _is_cprctl(pid: int) -> bool:
    with contextlib.suppress(QemuError):
        return any("cprctl" in w for w in process.cmdline(pid)[:3])
    return False


async def _recover_save(vm: VM) -> str:
    r, op = vm.record, vm.record.operation
    assert op is not None
    if r.checkpoint is not None:
        await finish_quit(vm)
        return "finished it (the checkpoint was complete); the VM is saved"
    if not vm.running():
        _remove(op.state_file)  # partial: never loaded
        vm.lose(f"{went_down(vm)} during its save (step {op.step})")
        return f"{vm.record.lost}; restore-all boots it afresh"
    async with Monitor(r.qmp, r.name, r.pid) as mon:
        await resume_guest(mon, op.suspended_by_us)
    _remove(op.state_file)
    return "rolled it back; the guest runs as before"


async def _recover_restore(vm: VM) -> str:
    r, op = vm.record, vm.record.operation
    assert op is not None
    if op.step in GUEST_RESUMED and not vm.alive(op.new_pid):
        # The guest may have run on from the checkpoint (its RAM file and disks moved on), then its QEMU
        # went: loading the checkpoint again would give it a past that no longer matches them.
        _remove(r.checkpoint.state_file if r.checkpoint else None)
        r.checkpoint = None
        vm.lose(f"{went_down(vm)} after its restore had resumed the guest (step {op.step})")
        return f"{r.lost}; restore-all boots it afresh"
    if op.new_pid and vm.alive(op.new_pid):
        status = "unknown"
        with contextlib.suppress(QemuError):
            async with Monitor(r.qmp, r.name, op.new_pid) as mon:
                status = await mon.status()
                if op.step == "resuming" and r.checkpoint is not None:
                    await resume_guest(mon, r.checkpoint.suspended)  # it was being woken: go on
                    status = await mon.status()
        if status == "running" or op.step in GUEST_RESUMED:
            retire_checkpoint(vm, op.new_pid, None)
            return f"finished it (the guest was already resumed, now {status}); the checkpoint is retired"
        await asyncio.to_thread(process.kill, op.new_pid)
    if r.checkpoint is not None and op.new_pid and op.step not in GUEST_RESUMED:
        # That QEMU passed the kept RAM's check, and only it wrote the files since (KVM's clock records).
        await asyncio.to_thread(canary.retake, r.checkpoint)
    return "rolled it back; the checkpoint is kept, run restore again"


def went_down(vm: VM) -> str:
    """Who took an operation's QEMU down while no cprctl watched: the host (the record is of an earlier boot)
    or the processes themselves."""
    return "the host went down" if not vm.same_boot() else "its QEMU died while cprctl was gone"


async def _recover_update(vm: VM) -> str:
    return await settle_update(vm)


async def settle_update(vm: VM, old: Monitor | None = None) -> str:
    """End a warm update that did not finish: forward if the new QEMU runs the guest, else back.

    Going back is safe only while the new QEMU never ran the guest (their RAM is
    the same shared file), so the new QEMU's real runstate decides. *old* is an
    open connection to the old QEMU, if the caller has one.
    """
    r, op = vm.record, vm.record.operation
    assert op is not None and op.binary
    argv = [op.binary, *r.argv[1:]]
    with contextlib.suppress(FileNotFoundError):  # a cpr-transfer's channel, if it was one
        (vm.folder / f"{CPR_SOCKET}{op.socket_suffix}").unlink()
    status = "gone"
    if op.new_pid and vm.alive(op.new_pid):
        with contextlib.suppress(QemuError):
            async with Monitor(r.qmp + op.socket_suffix, r.name, op.new_pid, timeout=5) as new:
                status = await new.status()
    if status == "running" or (status not in ("inmigrate", "suspended", "gone") and op.step == "switched"):
        if old is not None:
            await old.quit()
        if r.pid and not await asyncio.to_thread(process.wait_gone, r.pid, 10):
            await asyncio.to_thread(process.kill, r.pid)
        take_over_sockets(served_sockets(argv), op.socket_suffix)
        r.argv, r.pid, r.compat_args = argv, op.new_pid, list(op.compat_args)
        return f"finished it (the guest already ran on {op.binary})"
    if op.new_pid and vm.alive(op.new_pid):
        await asyncio.to_thread(process.kill, op.new_pid)
    drop_sockets(served_sockets(argv), op.socket_suffix)
    if not vm.running():
        vm.lose(f"{went_down(vm)} during its update (step {op.step}), both QEMUs gone")
        return f"{r.lost}; restore-all boots it afresh"
    if old is not None:
        await resume_guest(old, op.suspended_by_us)
    else:
        async with Monitor(r.qmp, r.name, r.pid) as mon:
            await resume_guest(mon, op.suspended_by_us)
    return "rolled it back; the guest runs on the old QEMU as before"


async def resume_guest(mon: Monitor, wake: bool) -> None:
    """Undo a save that did not finish: cancel the migration, run the guest again, wake it if we slept it."""
    info = await mon.execute("query-migrate")
    if info.get("status") in ("active", "setup", "device", "pre-switchover", "wait-unplug"):
        with contextlib.suppress(QemuError):
            await mon.execute("migrate_cancel")
        deadline = time.monotonic() + 10
        while (await mon.execute("query-migrate")).get("status") in ("active", "cancelling", "setup", "device"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
    status = await mon.status()
    if status in ("postmigrate", "paused", "finish-migrate"):
        await mon.execute("cont")
        status = await mon.status()
    if wake and status == "suspended":
        await mon.execute("system_wakeup")
    with contextlib.suppress(QemuError):
        await mon.set_migration(dict.fromkeys(PLAN_CAPABILITIES, False), {"mode": "normal"})


async def finish_quit(vm: VM, mon: Monitor | None = None) -> None:
    """Stop the QEMU of a VM whose checkpoint is recorded (through *mon* if open), then fingerprint its disks."""
    r = vm.record
    if vm.running():
        with contextlib.suppress(QemuError):
            if mon is None:
                async with Monitor(r.qmp, r.name, r.pid) as mon:
                    await mon.quit()
            else:
                await mon.quit()
        if r.pid and not await asyncio.to_thread(process.wait_gone, r.pid, 30):
            await asyncio.to_thread(process.kill, r.pid)
    await asyncio.to_thread(fingerprint_disks, vm)
    r.pid = None


def fingerprint_disks(vm: VM) -> None:
    """Record the disks' fingerprints (taken once QEMU is gone, so its last writes are in)."""
    cp = vm.record.checkpoint
    if cp is None:
        return
    cp.disks = [disks.fingerprint(d.path, d.full) for d in cp.disks]


def retire_checkpoint(vm: VM, pid: int, pause_ms: float | None) -> None:
    """The guest runs again: forget the checkpoint and delete its state file (in the background, see
    `retire_file`)."""
    r = vm.record
    if r.checkpoint is not None:
        retire_file(r.checkpoint.state_file)
    r.checkpoint = None
    r.pid = pid
    if pause_ms is not None:
        r.last_pause_ms = pause_ms


def retire_file(path: str) -> threading.Thread | None:
    """Rename state file *path* out of the way at once and delete it in a thread; that thread, if any.

    Deleting a state file of gigabytes takes seconds on a filesystem that discards freed blocks (1.6 s for
    1.2 GB here), and nothing waits for it: the guest already runs. The thread is not a daemon, so a process
    that exits still deletes it first; what a killed one left is deleted by `remove_retired`.
    """
    retired = f"{path}{RETIRED}{os.urandom(4).hex()}"
    try:
        os.rename(path, retired)
    except FileNotFoundError:
        return None
    except OSError:
        _remove(path)
        return None
    thread = threading.Thread(target=_remove, args=(retired,), name="cprctl-retire")
    thread.start()
    return thread


def remove_retired(vm: VM) -> None:
    """Delete the state files a process retired but did not get to delete (it was killed)."""
    for leftover in vm.folder.glob(f"{STATE_FILE}{RETIRED}*"):
        _remove(str(leftover))


def _remove(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
