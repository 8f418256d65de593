"""RAM on persistent memory (DAX) and VFIO's pins: the check's rules (pure), the facts read from this host,
and ``launch``'s refusal before QEMU starts (issue 16, items 5 and 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint.facts import is_device_dax, ram_fact, running_kernel
from cprctl._checkpoint.plan import (
    FILE_PINS_REFUSED_FROM,
    FIXED_S,
    RamFact,
    choose,
    dax_mount,
    estimate,
    findings,
    vfio_pin_refusal,
)
from cprctl._qemu.argv import RamBackend

from .guestvm import QEMU, cli
from .test_plan import ANON, SHARED, SHM, facts

FS_DAX = RamFact(RamBackend("ram0", "file", True, "/mnt/pmem/vm.ram", "1G"), "file", "ext4", dax=True)
DEV_DAX = RamFact(RamBackend("ram0", "file", True, "/dev/dax0.0", "1G"), "chardev", "devtmpfs", dax=True)
HUGE = RamFact(RamBackend("ram0", "file", True, "/dev/hugepages/vm.ram", "1G"), "file", "hugetlbfs")
MEMFD = RamFact(RamBackend("ram0", "memfd", True, None, "1G"))
PRIVATE = RamFact(RamBackend("ram0", "file", False, "/var/lib/vm/ram", "1G"), "file", "ext4")
DIR = RamFact(RamBackend("ram0", "file", True, "/var/lib/vm", "1G"), "dir", "ext4")
NOT_YET = RamFact(RamBackend("ram0", "file", True, "/var/lib/vm/new.ram", "1G"), "missing", "ext4")


def test_dax_mount_options() -> None:
    assert dax_mount("rw,relatime,dax=always") and dax_mount("rw,dax")
    assert not dax_mount("rw,relatime") and not dax_mount("rw,dax=never") and not dax_mount("rw,dax=inode")


@pytest.mark.parametrize("ram", [FS_DAX, DEV_DAX])
def test_dax_is_non_volatile_and_kept_in_place(ram: RamFact) -> None:
    found = findings(facts(ram), reboot=True)
    assert not [f for f in found if f.blocking], found
    dax = next(f for f in found if f.code == "ram-dax-ram0")
    assert "persistent memory" in dax.message and "no page cache to flush" in dax.message
    assert ("device DAX /dev/dax0.0" in dax.message) == ram.device_dax
    plan = choose(facts(ram))
    assert plan.strategy == "in-place" and plan.capabilities["x-ignore-shared"]
    assert estimate(plan) == (FIXED_S, FIXED_S)  # nothing of its RAM written or loaded


def test_shared_ram_on_tmpfs_is_still_refused_for_a_reboot() -> None:
    assert "ram-volatile-ram0" in {f.code for f in findings(facts(SHM), reboot=True) if f.blocking}


NEW, OLD = (6, 12), (6, 1)  # kernels after and before the refusal of pins of regular files (6.5)
VFIO = ["/machine/peripheral/nic0"]


@pytest.mark.parametrize("ram", [SHARED, FS_DAX, DIR, NOT_YET])
def test_vfio_refuses_ram_in_a_regular_file(ram: RamFact) -> None:
    assert not ram.vfio_pinnable(NEW)
    found = [f for f in findings(facts(ram, vfio=VFIO, kernel=NEW)) if f.code == "vfio-file-ram"]
    assert len(found) == 1 and found[0].blocking, found
    f = found[0]
    assert f"backend 'ram0' is {ram.backend.path} on ext4" in f.message, f.message
    assert f"vfio_container_dma_map = {'-95' if ram.dax else '-14'})" in f.message, f.message  # as QEMU says on 6.12
    assert "anonymous or memfd" in f.fix and "hugetlbfs" in f.fix and "device DAX" in f.fix, f.fix


@pytest.mark.parametrize("ram", [ANON, MEMFD, HUGE, DEV_DAX, SHM, PRIVATE])
def test_vfio_takes_ram_it_can_pin(ram: RamFact) -> None:
    assert ram.vfio_pinnable(NEW) and vfio_pin_refusal([ram], NEW) is None
    assert not {f.code for f in findings(facts(ram, vfio=VFIO, kernel=NEW), reboot=True)} & {
        "vfio-file-ram",
        "vfio-file-ram-later",
    }


def test_an_older_kernel_pins_regular_files_but_not_dax() -> None:
    assert SHARED.vfio_pinnable(OLD) and not FS_DAX.vfio_pinnable(OLD)
    assert "vfio-file-ram" not in {f.code for f in findings(facts(SHARED, vfio=VFIO, kernel=OLD))}
    later = next(f for f in findings(facts(SHARED, vfio=VFIO, kernel=OLD), reboot=True) if f.code.endswith("later"))
    assert later.severity == "warning" and "kernels from 6.5 on refuse" in later.message, later
    assert "vfio-file-ram" in {f.code for f in findings(facts(FS_DAX, vfio=VFIO, kernel=OLD)) if f.blocking}


def test_without_vfio_a_file_is_fine() -> None:
    assert "vfio-file-ram" not in {f.code for f in findings(facts(SHARED, kernel=NEW))}


def test_facts_of_this_host(tmp_path: Path) -> None:
    null = os.stat("/dev/null")
    assert not is_device_dax("/dev/null", null)
    disk = ram_fact(RamBackend("r", "file", True, str(tmp_path / "vm.ram"), "1G"))  # missing: its folder's fs
    assert disk.path_kind == "missing" and disk.fs_type and not disk.dax
    shm = Path("/dev/shm") / f"cprctl-pin-{os.getpid()}"
    shm.write_bytes(b"")
    try:
        fact = ram_fact(RamBackend("r", "file", True, str(shm), "1G"))
        assert (fact.path_kind, fact.fs_type, fact.vfio_pinnable(NEW)) == ("file", "tmpfs", True)
    finally:
        shm.unlink()


@pytest.mark.skipif(running_kernel() < FILE_PINS_REFUSED_FROM, reason="this kernel pins regular files")
def test_launch_refuses_vfio_with_ram_in_a_file_at_once(tmp_path: Path) -> None:
    """No VFIO device is needed: the refusal comes before QEMU starts, and nothing is left behind."""
    state = tmp_path / "state"
    argv = [
        QEMU, "-machine", "q35,memory-backend=ram0", "-m", "256M",
        "-object", f"memory-backend-file,id=ram0,size=256M,mem-path={tmp_path}/vm.ram,share=on",
        "-device", "vfio-pci,host=0000:00:02.0",
    ]  # fmt: skip
    out = cli("launch", "pinned", "--", *argv, state_dir=state)
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.count("\n") == 1, out.stderr
    assert "pinned: refused, nothing touched: VFIO cannot pin RAM kept in a shared file" in out.stderr, out.stderr
    assert "hugetlbfs" in out.stderr and "device DAX" in out.stderr
    assert not (tmp_path / "vm.ram").exists() and not (state / "vms" / "pinned").exists()
    with pytest.raises(cprctl.CheckFailed, match="vfio_container_dma_map = -14"):
        cprctl.launch("pinned", argv, state_dir=state)
