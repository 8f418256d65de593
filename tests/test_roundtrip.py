"""Save and restore real guests on the real QEMU: the core paths a user takes (issue 2)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint import record
from cprctl._qemu import acpi
from cprctl._qemu.qmp import Monitor

from .guestvm import QEMU, GuestVM, cli, guest_dir

pytestmark = pytest.mark.qemu


def test_shared_file_ram_stays_in_place(state_dir: Path) -> None:
    vm = GuestVM.launch("shared", state_dir, ram="file", fill=64)
    st = vm.status()
    assert st.state == "running" and st.machine == "pc-q35-10.0"
    assert "pc-q35-10.0" in " ".join(st.argv) and " q35" not in " ".join(st.argv)
    saved = cprctl.save("shared", state_dir=state_dir)
    assert saved.strategy == "in-place"
    assert saved.size < 5_000_000
    assert Path(saved.state_file).read_bytes()[:8] == b"QEVM\x00\x00\x00\x03"
    assert Path(saved.state_file).stat().st_mode & 0o777 == 0o600, "state files hold guest memory"
    assert not os.path.exists(f"/proc/{st.pid}/cmdline") or "Z" in Path(f"/proc/{st.pid}/stat").read_text()
    assert vm.status().state == "saved" and vm.status().pid is None
    mark = vm.mark()
    res = cprctl.restore("shared", state_dir=state_dir)
    assert res.status == "running" and res.pause_ms > 0
    vm.assert_continued(mark)
    assert vm.status().state == "running"
    assert not Path(saved.state_file).exists(), "the checkpoint is retired once the guest runs"
    assert vm.status().last_pause_ms == pytest.approx(res.pause_ms)
    vm.stop()


class Recorder:
    """A reporter that keeps every progress report: (what, done, total)."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int]] = []

    def step(self, message: str) -> None:
        pass

    def progress(self, done: int, total: int, what: str = "saving") -> None:
        self.reports.append((what, done, total))

    def last(self, what: str) -> tuple[int, int]:
        done, total = [(d, t) for w, d, t in self.reports if w == what][-1]
        return done, total


def test_anonymous_ram_goes_into_the_state_file(state_dir: Path) -> None:
    vm = GuestVM.launch("anon", state_dir, ram="anon", fill=96)
    saving = Recorder()
    saved = cprctl.save("anon", state_dir=state_dir, reporter=saving)
    assert saved.strategy == "mapped-ram"
    assert saved.size > 96 << 20, "the filled RAM must be in the state file"
    record = json.loads((state_dir / "vms" / "anon" / "vm.json").read_text())
    assert record["checkpoint"]["parameters"]["direct-io"] is True, "ext4 takes O_DIRECT: the fast path"
    done, total = saving.last("hashing")
    assert done == total > 96 << 20, "the digest read back every data chunk"
    on_disk = os.stat(saved.state_file).st_blocks * 512
    mark = vm.mark()
    loading = Recorder()
    cprctl.restore("anon", state_dir=state_dir, reporter=loading)
    vm.assert_continued(mark, fill=96)
    assert loading.last("verifying")[0] == loading.last("verifying")[1]
    loads = [(d, t) for w, d, t in loading.reports if w == "loading"]
    assert loads and all(t == on_disk for _, t in loads), "load progress counts the bytes on disk"
    assert max(d for d, _ in loads) > 0, "QEMU's reads of the state file show as load progress"
    assert not Path(saved.state_file).exists(), "the checkpoint is retired once the guest runs"
    for thread in threading.enumerate():
        if thread.name == "cprctl-retire":
            thread.join(60)
    folder = Path(saved.state_file).parent
    assert not list(folder.glob("state.cpr*")), "the retired state file is deleted in the background"
    # What a killed cprctl retired but did not delete goes at the next operation on the VM.
    leftover = folder / "state.cpr.retired-dead"
    leftover.write_bytes(b"x" * 4096)
    cprctl.save("anon", state_dir=state_dir)
    assert not leftover.exists()
    cprctl.restore("anon", state_dir=state_dir)
    vm.stop()


def test_strategies_one_after_another_on_the_same_vm(state_dir: Path) -> None:
    """Each save sets every capability it could use: nothing a previous save or restore turned on leaks."""
    vm = GuestVM.launch("mixed", state_dir, ram="anon", fill=32)
    mark = vm.mark()
    for strategy in ("mapped-ram", "stream", "mapped-ram"):
        saved = cprctl.save("mixed", strategy=strategy, state_dir=state_dir)  # type: ignore[arg-type]
        assert saved.strategy == strategy
        cprctl.restore("mixed", state_dir=state_dir)
    res = cprctl.update("mixed", QEMU, state_dir=state_dir)  # warm, over a socket, after a mapped-ram restore
    assert res.warm
    vm.assert_continued(mark, fill=32)
    vm.stop()


def acpi_pm_mapped(vm: GuestVM) -> bool | None:
    """What QEMU's memory map says of the guest's ACPI PM block now (the probe check and save use)."""
    st = vm.status()

    async def ask() -> bool | None:
        async with Monitor(st.qmp, vm.name, st.pid) as mon:  # type: ignore[arg-type]
            return await acpi.acpi_pm_mapped(mon)

    return asyncio.run(ask())


def test_suspend_always_saves_suspended_and_wakes(state_dir: Path) -> None:
    vm = GuestVM.launch("susp", state_dir, ram="file", fill=32)
    assert acpi_pm_mapped(vm) is True, "SeaBIOS set PMBASE at boot: the block decodes at 0x600"
    found = {f.code: f for f in cprctl.check("susp", suspend="always", state_dir=state_dir)}
    assert "s3-once" in found and not found["s3-once"].blocking, found  # q35 on SeaBIOS: suspends once per boot
    assert not [f for f in found.values() if f.blocking], found
    saved = cprctl.save("susp", suspend="always", state_dir=state_dir)
    assert saved.suspended
    rec = record.load(state_dir / "vms" / "susp" / "vm.json")
    assert rec.checkpoint is not None and rec.checkpoint.suspended
    assert "suspending" in vm.text()
    mark = vm.mark()
    res = cprctl.restore("susp", state_dir=state_dir)
    assert res.woke and res.status == "running"
    vm.wait_for("resumed", after=mark)
    vm.assert_continued(mark, fill=32)
    # What the warning said: the wake reset the LPC bridge and SeaBIOS did not set PMBASE again, so the block is
    # off and the next suspend could never hold. check and save say so at once, and the guest is not touched.
    assert acpi_pm_mapped(vm) is False
    found = {f.code: f for f in cprctl.check("susp", suspend="always", state_dir=state_dir)}
    assert found["acpi-pm-unmapped"].blocking and "s3-once" not in found, found
    pid, again = vm.status().pid, vm.mark()
    with pytest.raises(cprctl.CheckFailed, match="nothing touched: --suspend always, but the guest's ACPI power"):
        cprctl.save("susp", suspend="always", state_dir=state_dir)
    out = cli("save", "susp", "--suspend", "always", state_dir=state_dir)
    errors = [line for line in out.stderr.splitlines() if line.startswith("cprctl: error: ")]
    assert out.returncode != 0 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "not decoded (SeaBIOS" in errors[0] and "fix: reboot the guest" in errors[0], out.stderr
    st = vm.status()
    assert st.state == "running" and st.pid == pid and st.state_file is None
    assert "suspending" not in vm.text()[again:], "the guest was asked to suspend"
    vm.assert_continued(mark, fill=32)
    vm.stop()


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_update_moves_the_vm_to_another_binary(state_dir: Path, tmp_path: Path, warm: bool) -> None:
    new = tmp_path / "qemu-new"
    shutil.copy2(QEMU, new)
    name = f"upd-{'warm' if warm else 'cold'}"
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    extra = ("-drive", f"file={disk},if=none,id=d0,format=qcow2", "-device", "virtio-blk-pci,drive=d0")
    vm = GuestVM.launch(name, state_dir, ram="file", fill=32, extra=extra)
    old_pid = vm.status().pid
    mark = vm.mark()
    res = cprctl.update(name, str(new), warm=warm, state_dir=state_dir)
    assert res.warm is warm and (res.cold_reason is None) is warm
    assert res.pid != old_pid and os.readlink(f"/proc/{res.pid}/exe") == str(new)
    assert vm.status().argv[0] == str(new) and vm.status().pid == res.pid
    assert not os.path.exists(f"/proc/{old_pid}/cmdline") or "Z" in Path(f"/proc/{old_pid}/stat").read_text()
    vm.assert_continued(mark, fill=32)
    # the VM stays manageable on its new QEMU: QMP and the agent answer at their usual paths
    assert cli("check", name, state_dir=state_dir).returncode == 0
    vm.stop()


def test_update_falls_back_to_cold_when_two_qemus_cannot_coexist(state_dir: Path, tmp_path: Path) -> None:
    extra = ("-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22", "-device", "virtio-net-pci,netdev=n0,romfile=")
    vm = GuestVM.launch("upd-fwd", state_dir, fill=16, extra=extra)
    mark = vm.mark()
    res = cprctl.update("upd-fwd", QEMU, state_dir=state_dir)
    assert not res.warm and res.cold_reason and "host port" in res.cold_reason
    vm.assert_continued(mark, fill=16)
    vm.stop()


def test_adopt_a_qemu_cprctl_did_not_launch(state_dir: Path) -> None:
    from cprctl._demo import guest_argv
    from cprctl._qemu import argv as qa

    work = state_dir.parent / "adopted-work"
    work.mkdir()
    qmp, qga = work / "q.sock", work / "g.sock"
    argv = [
        *guest_argv(QEMU, guest_dir(), work, ram_mib=256, fill_mib=32),
        *qa.agent_args(str(qga), "ga"),
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    argv[argv.index("q35")] = "q35,usb=off"
    with open(work / "qemu.log", "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd=work
        )
    vm = GuestVM("adopted", state_dir, work, argv)
    vm.wait_ready(32)
    rec = cprctl.adopt("adopted", str(qmp), state_dir=state_dir)
    assert rec.pid == proc.pid and rec.origin == "adopt"
    assert rec.machine == "pc-q35-10.0" and "pc-q35-10.0,usb=off" in rec.argv
    assert rec.qga == str(qga)
    mark = vm.mark()
    cprctl.save("adopted", state_dir=state_dir)
    assert proc.wait(10) == 0
    cprctl.restore("adopted", state_dir=state_dir)
    vm.assert_continued(mark, fill=32)
    vm.stop()


def test_status_json_keys(state_dir: Path) -> None:
    out = cli("status", "--json", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {d["name"] for d in data} == {p.name for p in (state_dir / "vms").iterdir()}
    for d in data:
        assert {"name", "state", "pid", "qmp", "qga", "argv", "state_file", "last_pause_ms"} <= d.keys()
        assert d["state"] == "stopped" and d["last_pause_ms"] > 0
    one = json.loads(cli("status", "adopted", "--json", state_dir=state_dir).stdout)
    assert one["name"] == "adopted" and one["argv"][0].endswith("qemu-system-x86_64")
