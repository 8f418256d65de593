"""A host crash in the middle of ``save-all`` or ``restore-all``, simulated on this host (issue 16, item 2).

The crash: cprctl and every QEMU are SIGKILLed at a journal step; then what a reboot leaves: no process,
sockets or locks, and records written during an earlier boot (their ``boot_id`` is rewritten, as a new
kernel's boot id would differ). Then ``restore-all`` runs as the unit runs it at boot. The real reboots are
the host VM's tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint import lifecycle
from cprctl._demo import ticks
from cprctl._qemu import process
from cprctl._store import StateDir

from .guestvm import GuestVM, cli, op_step, record_of, spawn_cli, wait_record

pytestmark = pytest.mark.qemu


def crash(proc: object, *pids: int | None) -> None:
    """The host goes down: cprctl and these QEMUs die at once (no rollback, no flush of anything)."""
    assert hasattr(proc, "kill") and hasattr(proc, "wait")
    proc.kill()
    for pid in pids:
        if pid:
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in pids:
        assert not pid or process.wait_gone(pid, 10)


def boot_again(state_dir: Path) -> None:
    """What the next boot finds: records of an earlier boot, no sockets or locks."""
    for path in state_dir.glob("vms/*/vm.json"):
        rec = json.loads(path.read_text())
        rec["boot_id"] = "an-earlier-boot"
        if rec.get("checkpoint"):
            rec["checkpoint"]["boot_id"] = "an-earlier-boot"
        path.write_text(json.dumps(rec))
    for pattern in ("vms/*/*.sock", "vms/*/.lock"):
        for f in state_dir.glob(pattern):
            f.unlink()


def boots(vm: GuestVM) -> list[str]:
    """The guest's boot ids, in order."""
    return list(dict.fromkeys(t.boot for t in ticks(vm.console)))


def test_crash_during_save_all(state_dir: Path) -> None:
    first = GuestVM.launch("s1", state_dir, ram="file", fill=16)
    second = GuestVM.launch("s2", state_dir, ram="anon", ram_mib=384, fill=256)
    mark, pid2 = first.mark(), second.status().pid
    partial = state_dir / "vms" / "s2" / "state.cpr"
    proc = spawn_cli("save-all", "--parallel", "1", state_dir=state_dir)
    wait_record(state_dir, "s2", lambda r: op_step(r) == ("save", "migrating") and partial.exists())
    crash(proc, pid2)
    rec1 = record_of(state_dir, "s1")
    assert rec1["checkpoint"] and rec1["operation"] is None, "s1 was not saved before s2's save began"
    assert op_step(record_of(state_dir, "s2")) == ("save", "migrating")
    boot_again(state_dir)

    out = cli("status", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    lost = "the host went down during its save (step migrating); its running state was lost"
    assert f"{lost}; restore-all boots it" in out.stdout, out.stdout
    assert not partial.exists(), "the partial state file is kept"
    st = {s.name: s for s in cprctl.status(state_dir=state_dir)}
    assert (st["s1"].state, st["s2"].state, st["s2"].boot_pending, st["s2"].lost) == ("saved", "stopped", True, lost)
    plan = cli("reboot", "--dry-run", state_dir=state_dir).stdout.splitlines()
    assert "s2: stopped, booted afresh at boot" in plan and any(p.startswith("s1: saved already") for p in plan), plan

    out = cli("restore-all", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    assert f"s2: cold-booted: {lost}; pid " in out.stderr, out.stderr  # the journal's line
    first.assert_continued(mark, fill=16)
    old = boots(second)[0]
    second.wait_for(rf"tick boot=(?!{old})\S+ n=2 ", timeout=120)  # booted afresh
    st2 = second.status()
    assert (st2.state, st2.boot_pending, st2.lost) == ("running", False, lost)
    out = cli("status", "s2", state_dir=state_dir)
    assert f"running (cold-booted: {lost})" in out.stdout, out.stdout
    cprctl.save("s2", state_dir=state_dir)  # a save of its new life clears the note
    assert second.status().lost is None
    first.stop()
    cprctl.remove("s2", force=True, state_dir=state_dir)


def test_crash_during_restore_all(state_dir: Path) -> None:
    first = GuestVM.launch("r1", state_dir, ram="file", fill=16)
    second = GuestVM.launch("r2", state_dir, ram="anon", ram_mib=384, fill=256)
    marks = [first.mark(), second.mark()]
    assert cli("save-all", state_dir=state_dir).returncode == 0
    proc = spawn_cli("restore-all", "--parallel", "1", state_dir=state_dir)
    rec = wait_record(state_dir, "r2", lambda r: op_step(r) == ("restore", "started"))
    pid1 = first.status().pid
    assert pid1, "r1 was not restored before r2's restore began"
    crash(proc, pid1, rec["operation"]["new_pid"])
    boot_again(state_dir)

    out = cli("restore-all", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    # r2's restore is done over from its checkpoint: the same guest runs on.
    assert "r2: an earlier restore was interrupted at 'started': rolled it back" in out.stderr, out.stderr
    assert "r2: restored: paused" in out.stderr, out.stderr
    second.assert_continued(marks[1], fill=256)
    # r1 ran again when the host went down: what it did since its restore is lost; it boots afresh.
    lost = "the host went down while it ran, unsaved; its running state was lost"
    assert f"r1: cold-booted: {lost}; pid " in out.stderr, out.stderr
    old = boots(first)[0]
    first.wait_for(rf"tick boot=(?!{old})\S+ n=2 ", timeout=120)
    assert {s.state for s in cprctl.status(state_dir=state_dir)} >= {"running"}
    first.stop()
    second.stop()


def test_timeline_across_a_reboot(state_dir: Path) -> None:
    """The times are real, the reboot simulated: this kernel and its init started before the save, so the host's
    part is all ``reboot`` (save-all's end to cprctl's start) and ``boot`` is 0 here (the host VM's tests see
    a real kernel and init); the segments add up."""
    vm = GuestVM.launch("t1", state_dir, ram="file", fill=0, agent=False)
    off = GuestVM.launch("t2", state_dir, ram="file", fill=0)  # shut down at the shutdown, as if unsaveable
    mark = vm.mark()
    assert cli("save-all", "--reboot", state_dir=state_dir).returncode == 0
    cprctl.restore("t2", state_dir=state_dir)  # t2 back, then powered off as a shutdown does to an unsaveable VM
    asyncio.run(lifecycle.shut_down(StateDir(state_dir), "t2", grace=1.0))
    boot_again(state_dir)
    old = boots(off)[0]
    out = cli("restore-all", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    assert "t2: cold-booted: powered off at shutdown; pid None" not in out.stderr, out.stderr  # a pid of this boot
    assert off.status().state == "running", out.stderr
    off.wait_for(rf"tick boot=(?!{old})\S+ n=2 ", timeout=120)
    off.stop()
    assert "t1: restored: paused " in out.stderr and ": save " in out.stderr, out.stderr  # the journal says where
    vm.assert_continued(mark, fill=0, agent=False)
    st = json.loads(cli("status", "t1", "--json", state_dir=state_dir).stdout)
    down = st["downtime"]
    assert list(down) == ["save", "shutdown", "reboot", "boot", "queue", "restore", "total"], down
    assert abs(sum(v for k, v in down.items() if k != "total") - down["total"]) < 0.01, down
    assert abs(down["total"] * 1000 - st["last_pause_ms"]) < 5, (down, st["last_pause_ms"])
    assert all(v >= 0 for v in down.values()) and down["boot"] == 0, down
    # Whose time it was, from the save's and restore's real steps: QEMU's, the host's, cprctl's own.
    sh, steps = st["downtime_shares"], st["downtime_steps_ms"]
    assert {"migrate_stopped", "digest", "flush"} <= set(steps["save"]), steps
    assert {"check", "spawn", "start", "load", "cont"} <= set(steps["restore"]), steps
    assert abs(sh["qemu"] + sh["host"] + sh["cprctl"] + sh["idle"] - sh["total"]) < 0.01, sh
    assert sh["qemu"] > 0 and sh["cprctl"] > 0 and sh["idle"] == 0, sh
    assert abs(sh["host"] - down["shutdown"] - down["reboot"] - down["boot"]) < 0.01, (sh, down)
    text = cli("status", state_dir=state_dir).stdout
    assert f"{down['total']:.1f} s: save {down['save']:.1f}, shutdown" in text, text
    assert f"cprctl's own {sh['cprctl']:.1f} s" in text, text
    plan = cli("reboot", "--dry-run", state_dir=state_dir).stdout  # the host's part, as last measured
    assert f"the host's own reboot (last time {down['reboot'] + down['boot']:.1f} s)" in plan, plan
    # Saved and restored within one boot: the time between is "saved".
    cprctl.save("t1", state_dir=state_dir)
    cprctl.restore("t1", state_dir=state_dir)
    assert list(vm.status().downtime or {}) == ["save", "saved", "restore", "total"]
    vm.stop()
