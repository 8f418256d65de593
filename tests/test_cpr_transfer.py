"""``update`` through QEMU's own cpr-transfer mode (issue 15 item 5), on the real QEMU and test guest.

cpr-transfer needs every RAM block in shared memory: the guests here have memfd RAM (which the standby
would pre-copy) and ``-machine aux-ram-share=on``. What is checked: the guest moves with the same boot and
its RAM pattern intact and no RAM copied; a VM that cannot use the mode falls back to the standby saying
why in one line; a fault at each step before the new QEMU runs the guest leaves it running on the old one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint import update as upd
from cprctl._qemu import process
from cprctl._qemu.qmp import Monitor
from cprctl.errors import QemuError

from .guestvm import QEMU, GuestVM, cli, op_step, spawn_cli, wait_record

pytestmark = pytest.mark.qemu

MEMFD = ("-object", "memory-backend-memfd,id=m0,size=256M,share=on", "-machine", "memory-backend=m0")
SHARED = ("-machine", "aux-ram-share=on")


def launch(name: str, state_dir: Path, qemu: str = QEMU, extra: tuple[str, ...] = ()) -> GuestVM:
    return GuestVM.launch(name, state_dir, ram="anon", fill=96, extra=(*MEMFD, *SHARED, *extra), qemu=qemu)


def test_update_by_cpr_transfer_keeps_the_guest_and_copies_no_ram(state_dir: Path) -> None:
    vm = launch("xfer", state_dir)
    old_pid = vm.status().pid
    found = json.loads(cli("check", "xfer", "--json", state_dir=state_dir).stdout)
    assert any(f["code"] == "update-mode" and "by QEMU's cpr-transfer" in f["message"] for f in found), found
    mark = vm.mark()
    res = cprctl.update("xfer", QEMU, state_dir=state_dir)  # auto: memfd RAM the standby would pre-copy
    assert res.warm and res.mode == "cpr-transfer" and res.mode_reason is None, res
    assert "passes" not in res.timings_ms and "precopy" not in res.timings_ms, res.timings_ms  # no RAM copied
    assert res.pid != old_pid and not process.alive(old_pid)
    vm.assert_continued(mark, fill=96)
    vm.wait_for(r"mem ok 96 MiB pass=\d+", after=vm.mark())  # the pattern re-verifies on the new QEMU
    assert not list((state_dir / "vms" / "xfer").glob("cpr.sock*"))
    # the VM moves on: the standby on request (it pre-copies), then cpr-transfer again through the CLI
    mark = vm.mark()
    res = cprctl.update("xfer", QEMU, mode="standby", state_dir=state_dir)
    assert res.mode == "standby" and res.timings_ms["passes"] >= 1, res
    done = cli("update", "xfer", "--qemu", QEMU, "--mode", "cpr-transfer", state_dir=state_dir)
    assert done.returncode == 0 and "(cpr-transfer)" in done.stdout, done.stdout + done.stderr
    vm.assert_continued(mark, fill=96)
    vm.stop()


def test_without_shared_aux_ram_it_falls_back_to_the_standby_saying_why(state_dir: Path) -> None:
    vm = GuestVM.launch("noaux", state_dir, ram="anon", fill=32, extra=MEMFD)
    found = json.loads(cli("check", "noaux", "--json", state_dir=state_dir).stdout)
    assert any(f["code"] == "update-mode" and "aux-ram-share=on" in f["message"] for f in found), found
    mark = vm.mark()
    done = cli("update", "noaux", "--qemu", QEMU, "--mode", "cpr-transfer", state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if "no cpr-transfer" in ln]
    assert lines and "aux-ram-share=on" in lines[-1] and "warm standby" in lines[-1], done.stdout
    vm.assert_continued(mark, fill=32)
    # auto says nothing: the standby is simply the way for this VM
    res = cprctl.update("noaux", QEMU, state_dir=state_dir)
    assert res.mode == "standby" and res.mode_reason is None, res
    vm.stop()


def test_a_fault_before_the_new_qemu_runs_the_guest_leaves_it_running_on_the_old_one(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = launch("fault", state_dir)
    pid = vm.status().pid

    async def refuse(*_: object) -> None:  # after the cpr state went over, the guest still on the old QEMU
        raise QemuError("injected: the standby cannot load it")

    monkeypatch.setattr(upd, "_fit_queues", refuse)
    mark = vm.mark()
    with pytest.raises(QemuError, match="injected"):
        cprctl.update("fault", QEMU, state_dir=state_dir)
    st = vm.status()
    assert st.state == "running" and st.pid == pid and st.operation is None, st
    vm.assert_continued(mark, fill=96)
    monkeypatch.undo()

    killed: list[int] = []

    async def kill_new(v: object, old: object, new: Monitor) -> None:
        assert new.pid  # step migrating: the old QEMU's migrate is issued, the new one waits for its main channel
        killed.append(new.pid)
        process.kill(new.pid)

    monkeypatch.setattr(upd, "_warm_up", kill_new)
    mark = vm.mark()
    with pytest.raises(QemuError, match=r"warm update failed.*rolled it back"):
        cprctl.update("fault", QEMU, state_dir=state_dir)
    st = vm.status()
    assert killed and st.state == "running" and st.pid == pid and st.operation is None, st
    vm.assert_continued(mark, fill=96)
    monkeypatch.undo()

    res = cprctl.update("fault", QEMU, state_dir=state_dir)  # and the next update goes through
    assert res.mode == "cpr-transfer" and os.path.exists(f"/proc/{res.pid}")
    vm.assert_continued(mark, fill=96)
    vm.stop()


def test_across_releases_by_cpr_transfer(state_dir: Path) -> None:
    """10.0.2 (this host) -> 11.1.3 moves by cpr-transfer; 10.0.13 -> 11.1.3 with the agent's virtio-serial is
    refused once the new QEMU answers (its virtqueues are smaller), which cancels the old QEMU's cpr-transfer:
    the guest runs on 10.0.13 untouched."""
    from . import qemuroots
    from .test_upgrade import one_line_refusal

    if why := qemuroots.available():
        pytest.skip(why)
    q10, q11 = qemuroots.qemu("trixie"), qemuroots.qemu("unstable")
    pin = ("-machine", "pc-q35-10.0")
    vm = launch("x102", state_dir, extra=pin)
    mark = vm.mark()
    res = cprctl.update("x102", str(q11), state_dir=state_dir)
    assert res.mode == "cpr-transfer" and vm.status().argv[0] == str(q11), res
    vm.assert_continued(mark, fill=96)
    res = cprctl.update("x102", str(q11), state_dir=state_dir)  # and on within 11.1.3
    assert res.mode == "cpr-transfer", res
    vm.assert_continued(mark, fill=96)
    vm.stop()

    vm = launch("x13", state_dir, qemu=str(q10), extra=pin)
    pid, mark = vm.status().pid, vm.mark()
    out = cli("update", "x13", "--qemu", str(q11), "--mode", "cpr-transfer", state_dir=state_dir)
    one_line_refusal(out, "virtio-serial-device", "allocates 128")
    st = vm.status()
    assert st.state == "running" and st.pid == pid and st.operation is None, st
    vm.assert_continued(mark, fill=96)
    vm.stop()


def test_cprctl_killed_after_the_cpr_state_went_over(state_dir: Path) -> None:
    """Killed once the new QEMU answers QMP (so the old one's cpr-transfer migrate is under way): the next
    command finishes the update or rolls it back (cancelling the old QEMU's migration); the guest runs on."""
    vm = launch("kill", state_dir)
    mark = vm.mark()
    proc = spawn_cli("update", "kill", "--qemu", QEMU, "--mode", "cpr-transfer", state_dir=state_dir)
    rec = wait_record(state_dir, "kill", lambda r: op_step(r)[0] == "update" and r["operation"].get("socket_suffix"))
    new_qmp = Path(str(rec["qmp"]) + rec["operation"]["socket_suffix"])  # type: ignore[index]
    deadline = time.monotonic() + 120
    while not new_qmp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    out = cli("status", "kill", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    st = vm.status()
    assert st.state == "running" and st.operation is None, st
    vm.assert_continued(mark, fill=96)
    leftovers = [p.name for p in (state_dir / "vms" / "kill").iterdir() if "~" in p.name]
    assert not leftovers, leftovers
    assert cprctl.update("kill", QEMU, state_dir=state_dir).mode == "cpr-transfer"  # nothing left in the way
    vm.assert_continued(mark, fill=96)
    vm.stop()
