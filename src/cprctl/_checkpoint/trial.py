"""A trial load: does a saved VM's checkpoint load into the binary a restore would use? (``check --trial``)

The cheapest real proof: the binary is started as a restore starts it (the VM's
argv, ``-S -incoming defer``), loads the state file, and is killed once QEMU
says the load completed. The guest never runs there (``-S``), its disks stay
inactive (as in `restore`), and the checkpoint is untouched. The outcome is
recorded as a proof (`record.Proof`, how ``trial``) that `check` and `status`
report and `save-all --reboot` weighs.

A running VM has no checkpoint to try: its proof is a warm ``update`` (the
standby loads the state beside the running QEMU and the guest runs on there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

from .._qemu import argv as qargv
from .._qemu import process
from .._qemu.qmp import Monitor
from .._store import StateDir, VMLock
from ..errors import CprctlError, VMStateError
from . import canary, kept
from .compat import Loadability
from .report import Quiet
from .restore import late_block_activate, verify
from .vm import open_vm, recover

#: How long a trial load may take.
TRIAL_TIMEOUT = 600.0


@dataclass(frozen=True)
class TrialResult:
    name: str
    binary: str
    loads: bool
    #: QEMU's own error line when it did not load.
    reason: str
    load: Loadability


async def trial(sd: StateDir, name: str, qemu: str | None = None) -> TrialResult:
    """Load saved VM *name*'s checkpoint into *qemu* (default: the binary a restore would use) under ``-S``
    and kill it; record the outcome as a proof.

    :raise VMStateError: the VM is not saved; `CheckpointError`: its state file or disks fail verification.
    """
    vm = open_vm(sd, name)
    with VMLock(vm.folder, name, "trial"):
        await recover(vm, Quiet())
        if vm.record.checkpoint is None:
            raise VMStateError(f"{name} is {vm.state()}: only a saved VM's checkpoint can be tried")
        cp = await asyncio.to_thread(verify, vm, False, digest=False)
        argv = [qemu or vm.record.argv[0], *vm.record.argv[1:]]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vm.record.qmp)
        pid = process.spawn([*qargv.incoming(argv), "-S"], vm.log_path, cwd=vm.record.cwd, scope=name)
        reason = ""
        try:
            async with Monitor(vm.record.qmp, name, pid) as mon:
                await mon.set_migration({**cp.capabilities, **await late_block_activate(mon)}, cp.parameters)
                await mon.execute("migrate-incoming", {"uri": f"file:{cp.state_file}"})
                await mon.wait_migration(TRIAL_TIMEOUT)
                await mon.wait_status({"paused", "postmigrate", "suspended"}, 60)
        except CprctlError as exc:
            said = process.qemu_error(vm.log_path) if not process.alive(pid) else ""
            reason = f"{said} ({exc})" if said else str(exc)
        finally:
            await asyncio.to_thread(process.kill, pid)
            await asyncio.to_thread(canary.retake, cp)  # what that QEMU wrote in the kept RAM (KVM's clock)
        kept.learn(vm, cp.build, argv[0], not reason, "trial", reason)
        vm.commit()
        return TrialResult(name, argv[0], not reason, reason, kept.loadability(vm, argv[0]))

