"""A host reboot with several VMs: save-all, every QEMU and runtime file gone, restore-all (issue 5)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

import cprctl
from cprctl._qemu.agent import Agent

from .guestvm import GuestVM, cli

pytestmark = pytest.mark.qemu


def simulate_reboot(state_dir: Path) -> None:
    """What a host reboot leaves: no QEMU, no sockets or locks; only files on disk."""
    for st in cprctl.status(state_dir=state_dir):
        assert st.pid is None, f"{st.name}: QEMU still runs"
    for pattern in ("vms/*/*.sock", "vms/*/.lock"):
        for f in state_dir.glob(pattern):
            f.unlink()


def test_save_all_reboot_restore_all(state_dir: Path) -> None:
    vms = [
        GuestVM.launch("f1", state_dir, ram="file", fill=32),
        GuestVM.launch("a1", state_dir, ram="anon", fill=48),
        GuestVM.launch("f2", state_dir, ram="file", fill=16, agent=False),
    ]
    marks = [vm.mark() for vm in vms]
    out = cli("save-all", "--reboot", "--json", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    assert {o["name"]: o["outcome"] for o in json.loads(out.stdout)} == {"f1": "saved", "a1": "saved", "f2": "saved"}
    assert {s.state for s in cprctl.status(state_dir=state_dir)} == {"saved"}
    simulate_reboot(state_dir)
    # One restore at a time: the two whose RAM stayed in place (a few MB of device state each) come back
    # before the one whose RAM is loaded from its state file, not behind it (`fleet.restore_order`).
    out = cli("restore-all", "--parallel", "1", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    restored = [line.split("• ")[1].split(":")[0] for line in out.stderr.splitlines() if ": restored: " in line]
    assert sorted(restored) == ["a1", "f1", "f2"] and restored[-1] == "a1", out.stderr
    assert {s.state for s in cprctl.status(state_dir=state_dir)} == {"running"}
    for vm, mark, fill, agent in zip(vms, marks, (32, 48, 16), (True, True, False), strict=True):
        vm.assert_continued(mark, fill=fill, agent=agent)
        vm.stop()


def test_one_vm_failing_its_reboot_check_touches_nothing(state_dir: Path) -> None:
    shm = Path("/dev/shm") / f"cprctl-fleet-{os.getpid()}"
    try:
        ok = GuestVM.launch("ok1", state_dir, fill=0)
        bad = GuestVM.launch("shm1", state_dir, fill=0, ram_path=shm)
        out = cli("save-all", "--reboot", state_dir=state_dir)
        assert out.returncode != 0 and "no VM touched" in out.stderr and "shm1" in out.stderr, out.stderr
        for vm in (ok, bad):
            assert vm.status().state == "running" and vm.status().state_file is None
        ok.stop()
        bad.stop()
    finally:
        shm.unlink(missing_ok=True)


def test_save_all_reports_a_failed_vm_and_saves_the_others(state_dir: Path) -> None:
    good = GuestVM.launch("g1", state_dir, fill=0)
    silent = GuestVM.launch("s1", state_dir, fill=0, kernel_args="agent=0")
    out = cli("save-all", "--suspend", "always", "--json", state_dir=state_dir)
    assert out.returncode == 1
    got = {o["name"]: o for o in json.loads(out.stdout)}
    assert got["g1"]["outcome"] == "saved" and got["s1"]["outcome"] == "left running"
    assert "guest agent" in got["s1"]["detail"]
    assert silent.status().state == "running"
    cprctl.restore("g1", state_dir=state_dir)
    good.stop()
    silent.stop()


def guest_clock_skew(vm: GuestVM) -> float:
    qga = vm.status().qga
    assert qga

    async def skew() -> float:
        async with Agent(qga, vm.name, timeout=10) as agent:
            return int(await agent.execute("guest-get-time")) / 1e9 - time.time()

    return asyncio.run(skew())


def test_guest_clock_is_set_after_a_long_pause(state_dir: Path) -> None:
    vm = GuestVM.launch("clock", state_dir, fill=0)
    cprctl.save("clock", state_dir=state_dir)
    time.sleep(30)
    cprctl.restore("clock", sync_time=False, state_dir=state_dir)
    assert guest_clock_skew(vm) < -20, "without sync the guest clock lags by the pause"
    cprctl.save("clock", state_dir=state_dir)
    time.sleep(30)
    cprctl.restore("clock", state_dir=state_dir)
    assert abs(guest_clock_skew(vm)) < 1.0
    vm.stop()
