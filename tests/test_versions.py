"""VMs across real QEMU releases (issue 15): Debian 13's 10.0.13, this host's 10.0.2 and Debian unstable's 11.1.3.

The two other releases run from cached Debian roots through wrappers (`qemuroots`).
What is true of these builds (measured, see README "QEMU upgrades"): 10.0.13
allocates 1024 entries for every virtqueue, 10.0.2 and 11.1.3 what the device's
properties say, and 11.1.3 refuses to load a queue larger than it allocated. So
from 10.0.13 a virtio-blk disk moves once ``-global virtio-blk-device.queue-size=1024``
is given to 11.1.3, while virtio-serial (the guest agent's channel) has no such
property: that move is refused, naming it, and the VM runs on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import cprctl

from . import qemuroots
from .guestvm import QEMU, GuestVM, cli, qemu_copy, record_of
from .test_upgrade import one_line_refusal

pytestmark = pytest.mark.qemu

if why := qemuroots.available():
    pytest.skip(why, allow_module_level=True)

MACHINE = "pc-q35-10.0"
BLK_SIZE = ["-global", "virtio-blk-device.queue-size=1024"]


@pytest.fixture(scope="module")
def q10() -> Path:
    return qemuroots.qemu("trixie")


@pytest.fixture(scope="module")
def q11() -> Path:
    return qemuroots.qemu("unstable")


@pytest.fixture(scope="module")
def disk(state_dir: Path) -> Iterator[Path]:
    folder = state_dir.parent / "disks"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def launch(name: str, state_dir: Path, qemu: Path | str, disk: Path | None, *, agent: bool) -> GuestVM:
    extra: tuple[str, ...] = ("-machine", MACHINE)
    if disk is not None:
        image = disk / f"{name}.img"
        image.write_bytes(b"\0" * (1 << 20))
        extra += ("-drive", f"if=none,id=d0,file={image},format=raw", "-device", "virtio-blk-pci,drive=d0,id=blk0")
    return GuestVM.launch(
        name,
        state_dir,
        ram="file",
        fill=8,
        ram_mib=128,
        agent=agent,
        kernel_args="" if agent else "agent=0",
        qemu=str(qemu),
        extra=extra,
        work=state_dir.parent / f"{name}-w",
    )


def test_the_wrappers_run_the_releases(q10: Path, q11: Path) -> None:
    assert "version 10.0." in cli_version(q10) and "version 11." in cli_version(q11)


def cli_version(binary: Path) -> str:
    import subprocess

    return subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout


def test_update_from_10_0_13_sizes_the_virtio_blk_queues(q10: Path, q11: Path, state_dir: Path, disk: Path) -> None:
    vm = launch("b13", state_dir, q10, disk, agent=False)
    st = vm.status()
    assert not st.binary_replaced, "a wrapper is judged by the executable it names"
    mark = vm.mark()
    out = cli("update", "b13", "--qemu", str(q11), state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    assert "allocates smaller virtqueues" in out.stdout + out.stderr
    st = vm.status()
    assert st.state == "running" and st.argv[0] == str(q11)
    rec = record_of(state_dir, "b13")
    assert rec["compat_args"] == BLK_SIZE and BLK_SIZE[1] not in rec["argv"], rec
    vm.assert_continued(mark, fill=8, agent=False)
    # Later moves on 11.1.3 keep passing it: a save and a restore, then an update onto the same build.
    cprctl.save("b13", state_dir=state_dir)
    cprctl.restore("b13", state_dir=state_dir)
    assert cli("update", "b13", "--qemu", str(q11), state_dir=state_dir).returncode == 0
    assert record_of(state_dir, "b13")["compat_args"] == BLK_SIZE
    vm.assert_continued(mark, fill=8, agent=False)
    vm.stop()


def test_update_from_10_0_13_with_the_agent_channel_is_refused_naming_it(q10: Path, q11: Path, state_dir: Path) -> None:
    vm = launch("a13", state_dir, q10, None, agent=True)
    pid, mark = vm.status().pid, vm.mark()
    out = cli("update", "a13", "--qemu", str(q11), state_dir=state_dir)
    one_line_refusal(out, "refused", "virtio-serial-device", "queue 0 has 1024 entries", "allocates 128")
    st = vm.status()
    assert st.state == "running" and st.pid == pid and st.state_file is None
    vm.assert_continued(mark, fill=8)
    vm.stop()


def test_update_and_update_all_from_this_hosts_10_0_2(q11: Path, state_dir: Path, disk: Path) -> None:
    vm = launch("h102", state_dir, QEMU, disk, agent=True)
    binary = qemu_copy(state_dir.parent / "pkg102")  # 10.0.2 at a path a package owns
    vm2 = launch("h102b", state_dir, binary, None, agent=True)
    marks = {v.name: v.mark() for v in (vm, vm2)}
    out = cli("update", "h102", "--qemu", str(q11), state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    assert record_of(state_dir, "h102")["compat_args"] == []
    new = binary.with_name("new")
    shutil.copy2(q11, new)
    os.rename(new, binary)  # the upgrade: 11.1.3's wrapper renamed over 10.0.2
    assert vm2.status().binary_replaced
    out = cli("update-all", "--json", state_dir=state_dir)
    got = {o["name"]: o for o in json.loads(out.stdout)}
    assert got["h102b"]["outcome"] == "updated", got
    assert not vm2.status().binary_replaced and "version 11." in cli_version(binary)
    for v in (vm, vm2):
        v.assert_continued(marks[v.name], fill=8)
        v.stop()


def test_update_all_after_an_upgrade_of_the_root(q10: Path, q11: Path, state_dir: Path, disk: Path) -> None:
    pkg = qemuroots.switchable(q10, state_dir.parent / "pkg")
    vms = [launch("ua1", state_dir, pkg, disk, agent=False), launch("ua2", state_dir, pkg, None, agent=True)]
    marks = {v.name: v.mark() for v in vms}
    pids = {v.name: v.status().pid for v in vms}
    qemuroots.switch(pkg.parent, q11)  # "apt upgrade": the running QEMUs keep 10.0.13
    assert all(v.status().binary_replaced for v in vms)
    out = cli("update-all", "--json", state_dir=state_dir)
    assert out.returncode == 1, out.stdout + out.stderr  # not all moved
    got = {o["name"]: o for o in json.loads(out.stdout)}
    assert got["ua1"]["outcome"] == "updated", got["ua1"]
    assert got["ua2"]["outcome"] != "updated" and "virtio-serial-device" in json.dumps(got["ua2"]), got["ua2"]
    st1, st2 = vms[0].status(), vms[1].status()
    assert st1.state == "running" and not st1.binary_replaced
    assert st2.state == "running" and st2.pid == pids["ua2"] and st2.binary_replaced
    for v in vms:
        v.assert_continued(marks[v.name], fill=8, agent=v.name == "ua2")
        v.stop()


def test_restore_of_a_10_0_13_checkpoint_on_11_1_3(q10: Path, q11: Path, state_dir: Path, disk: Path) -> None:
    vm = launch("r13", state_dir, q10, disk, agent=False)
    mark = vm.mark()
    cprctl.save("r13", state_dir=state_dir)
    out = cli("restore", "r13", "--qemu", str(q11), state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    st = vm.status()
    assert st.state == "running" and st.argv[0] == str(q11)
    assert record_of(state_dir, "r13")["compat_args"] == BLK_SIZE
    vm.assert_continued(mark, fill=8, agent=False)
    vm.stop()


def test_the_ansible_module_updates_across_releases(q10: Path, q11: Path, state_dir: Path, disk: Path) -> None:
    from .test_ansible import Hosts

    sd = state_dir.parent / "ansible-state"
    (state_dir.parent / "ansible").mkdir()
    hosts = Hosts(state_dir.parent / "ansible", sd, state_dir.parent / "ansible-unused")
    pkg = qemuroots.switchable(q10, state_dir.parent / "pkg-ansible")
    vms = [launch("an1", sd, pkg, disk, agent=False), launch("an2", sd, pkg, None, agent=True)]
    marks = {v.name: v.mark() for v in vms}
    pid2 = vms[1].status().pid
    qemuroots.switch(pkg.parent, q11)  # apt upgraded the root while the VMs run
    out = hosts.adhoc("hostA", "cprctl_vm", f"state=updated state_dir={sd}")
    assert out.returncode != 0, out.stdout  # not every VM moved: the play says so
    assert "virtio-serial-device" in out.stdout, out.stdout
    st1, st2 = vms[0].status(), vms[1].status()
    assert st1.state == "running" and not st1.binary_replaced
    assert record_of(sd, "an1")["compat_args"] == BLK_SIZE
    assert st2.state == "running" and st2.pid == pid2
    for v in vms:
        v.assert_continued(marks[v.name], fill=8, agent=v.name == "an2")
        v.stop()
