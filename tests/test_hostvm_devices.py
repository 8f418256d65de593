"""Persistent memory and a real VFIO device on a real kernel (issue 16, items 5 and 6): ``make test-devices``.

The Debian 13 host VM (tests/hostvm.py) boots once with an emulated IOMMU, an NVDIMM and QEMU's ``edu`` PCI
device (`HostVM(devices=True)`). Inside, the NVDIMM becomes an fsdax namespace with ext4 mounted ``-o dax``
from fstab, and ``edu`` is bound to vfio-pci at every boot, as an operator makes an assignment last. Two nested
guests: ``pmem`` keeps its RAM in a file on that DAX filesystem, ``vfio`` has ``edu`` assigned to it (anonymous
RAM, its agent, S3). The tests run in order:

- ``check --reboot`` takes ``pmem``'s RAM as non-volatile, kept in place, nothing to write or flush;
- RAM VFIO cannot pin is refused by ``launch`` at once, as QEMU itself fails; without an agent and S3,
  ``check`` and ``save`` refuse a VFIO guest and it runs on;
- a power cut right after ``save-all --reboot``: the unit restores both at the next boot, ``pmem`` with its RAM
  intact and none of it written, ``vfio`` suspended at the save, woken at the restore, its device answering;
  ``update`` then says why it must run cold, and the guest runs on whatever it decides.

``make test`` (`.ci/run`) runs it after tests/test_hostvm.py, in the same pytest run beside the suite, so that
only one host VM runs at a time; ``make test-devices`` runs it alone. One host boot (the power cut), two nested
first boots: 10.4 min on a quiet machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .guestvm import guest_dir
from .hostvm import (
    EDU_PROBE,
    PMEM_MOUNT,
    POWER_CUT,
    QEMU,
    HostVM,
    cached_image,
    console_text,
    launch_nested,
    nested_argv,
    nested_exec,
    wait_tick,
)
from .test_hostvm import (
    FILL,
    FIRST_BOOT_S,
    KVM_AMD,
    Phases,
    assert_back,
    cost,  # noqa: F401  (autouse: each test's wall-clock time and host VM CPU time, printed)
    journal,
    load,
    mark_of,
    wait_mem_ok,
)

pytestmark = [pytest.mark.qemu, pytest.mark.devices]

if os.geteuid() != 0 or not shutil.which("mmdebstrap") or not shutil.which("mkfs.ext4"):
    pytest.skip("needs root, mmdebstrap and mkfs.ext4 (scripts/install-deps.sh)", allow_module_level=True)

#: RAM on the host VM's persistent memory (ext4 -o dax on its NVDIMM): kept in place, nothing to flush.
PMEM = {"ram": "file", "fill": FILL, "ram_path": f"{PMEM_MOUNT}/pmem.ram"}
#: The guest with ``edu`` assigned: anonymous RAM (VFIO pins it; written to the state file at a save), no VGA
#: and no NIC (less device state to write).
VFIO = {"ram": "anon", "fill": FILL}
LEAN = ("-vga", "none", "-nic", "none")


@pytest.fixture(scope="module")
def host() -> Iterator[HostVM]:
    phases = Phases()
    image = cached_image()
    phases.done(f"host image ({image.folder.name})")
    work = Path(tempfile.mkdtemp(prefix="cprctl-hostvm-dev.", dir="/var/tmp"))
    vm: HostVM | None = None
    try:
        vm = phases.vm = HostVM(image, work, guest_dir(), append=KVM_AMD, devices=True)
        phases.done("host VM booted (IOMMU, NVDIMM, edu)")
        vm.install()
        phases.done("checkout installed")
        vm.setup_pmem()
        phases.done(f"{PMEM_MOUNT} on the NVDIMM (fsdax, ext4 -o dax)")
        vm.wait_kvm()
        launch_nested(vm, "pmem", **PMEM)
        vm.sh("cprctl install-units")  # again, now that a VM is known: ordered after the mount it needs
        wait_tick(vm, "pmem", 2, timeout=FIRST_BOOT_S)
        wait_mem_ok(vm, "pmem", 0)
        phases.done("guest pmem ticking, its RAM checked")
        yield vm
    except BaseException:
        if vm:
            print(vm.tail())
        raise
    finally:
        if vm:
            vm.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def edu(host: HostVM) -> tuple[str, str]:
    """The ``edu`` device bound to vfio-pci (now and at every boot): ``-device vfio-pci`` for it."""
    return "-device", f"vfio-pci,host={host.bind_edu()},id=edu0"


def test_dax_ram_is_non_volatile_with_nothing_to_flush(host: HostVM) -> None:
    """``check --reboot`` takes ``pmem``'s RAM (a file on ext4 ``-o dax``, mounted from fstab) as non-volatile,
    kept in place, nothing to flush; the unit waits for its mount. (That a save writes none of it and that it
    survives a power cut, `test_power_cut_after_save_all` shows.)"""
    assert "dax=always" in host.sh(f"grep ' {PMEM_MOUNT} ext4 ' /proc/mounts")
    assert " dax " in host.sh(f"grep ' {PMEM_MOUNT} ' /etc/fstab")  # mounted so at every boot
    found = json.loads(host.sh("cprctl check pmem --reboot --json"))
    assert not [f for f in found if f["blocking"]], found
    dax = next(f for f in found if f["code"] == "ram-dax-ram0")
    assert f"{PMEM_MOUNT}/pmem.ram on ext4 mounted with -o dax" in dax["message"], dax
    assert "nothing of it is written and it has no page cache to flush" in dax["message"], dax
    unit = host.sh("systemctl show -p RequiresMountsFor -p After cprctl-guests.service")
    assert PMEM_MOUNT in unit.split("RequiresMountsFor=")[1].split() and "mnt-pmem.mount" in unit, unit


def test_vfio_refusals(host: HostVM, edu: tuple[str, str]) -> None:
    """RAM VFIO cannot pin (a shared file on ext4, on ext4 -o dax) is refused by ``launch`` at once, in one line
    naming the backings that work, as QEMU itself fails on this kernel; a VFIO guest without an agent and S3 is
    refused by ``check`` and ``save``, and runs on."""
    for ram_path, errno in (("/srv/vms/pinned/ram", "-14"), (f"{PMEM_MOUNT}/pinned.ram", "-95")):
        argv = nested_argv("pinned", ram="file", ram_path=ram_path, extra=edu)
        out = host.exec(f"mkdir -p /srv/vms/pinned && cprctl launch pinned --agent -- {shlex.join(argv)}", check=False)
        assert out.rc == 1 and out.out == "" and out.err.count("\n") == 1, out
        assert "pinned: refused, nothing touched: VFIO cannot pin RAM kept in a shared file" in out.err, out.err
        assert f"(vfio_container_dma_map = {errno})" in out.err, out.err
        assert all(w in out.err for w in ("anonymous or memfd", "hugetlbfs", "device DAX")), out.err
        assert host.exec(f"test -e {ram_path} || test -e /var/lib/cprctl/vms/pinned", check=False).rc == 1
        # What the refusal spares: QEMU itself, started without cprctl, fails so on this kernel.
        qemu = host.exec(f"timeout 120 {shlex.join(argv)} -S; rm -f {ram_path}", timeout=300, check=False)
        assert "vfio_container_dma_map" in qemu.err and f") = {errno} (" in qemu.err, qemu.err
    host.exec("rm -rf /srv/vms/pinned", check=False)

    # Without an agent and with S3 off (the QEMU runs; its guest need not have booted): check and save refuse.
    bare = nested_argv("bare", ram="anon", extra=(*edu, *LEAN))
    at = bare.index("ICH9-LPC.disable_s3=0")
    del bare[at - 1 : at + 1]
    host.sh(f"mkdir -p /srv/vms/bare && cprctl launch bare -- {shlex.join(bare)}")
    try:
        res = host.exec("cprctl check bare --json", check=False)
        blocking = {f["code"] for f in json.loads(res.out) if f["blocking"]}
        assert res.rc == 1 and {"agent-missing", "s3-disabled"} <= blocking, res
        save = host.exec("cprctl save bare", check=False)
        assert save.rc == 1 and save.err.count("\n") == 1 and "no guest agent channel" in save.err, save
        assert host.status()["bare"]["state"] == "running"
    finally:
        host.exec("cprctl stop bare; cprctl remove bare; rm -rf /srv/vms/bare", check=False)


def test_power_cut_after_save_all(host: HostVM, edu: tuple[str, str]) -> None:
    """``vfio`` (``edu`` assigned) and ``pmem`` (RAM on DAX) through ``save-all --reboot`` and a power cut right
    after it: at the next boot the unit restores both, each on with the same boot and intact RAM; ``vfio`` was
    suspended at the save and woken at the restore, its device answers; ``pmem``'s save wrote none of its RAM."""
    launch_nested(host, "vfio", **VFIO, extra=(*edu, *LEAN))
    wait_tick(host, "vfio", 2, timeout=FIRST_BOOT_S)
    wait_mem_ok(host, "vfio", 0)
    assert_edu(host, "vfio")
    found = json.loads(host.sh("cprctl check vfio --reboot --json"))
    assert not [f for f in found if f["blocking"]], found
    before = {name: mark_of(host, name) for name in ("pmem", "vfio")}
    host.sh("sync")  # what the guests wrote up to here is durable: the save's own flushes must do the rest
    host.sh("sysctl -qw vm.dirty_expire_centisecs=360000")  # no write-back by the kernel meanwhile; the cut resets it
    saved = host.sh("cprctl save-all --reboot --json", timeout=900)
    print(f"save-all --reboot (load {load()}): {saved}")
    rows = {r["name"]: r for r in json.loads(saved)}
    assert {n: r["outcome"] for n, r in rows.items()} == {"pmem": "saved", "vfio": "saved"}, rows
    assert rows["pmem"]["strategy"] == "in-place" and dax_save_mb(rows["pmem"]["detail"]) < 8, rows  # no RAM
    record = json.loads(host.sh("cat /var/lib/cprctl/vms/vfio/vm.json"))
    assert record["checkpoint"]["suspended"] is True, record  # saved in S3, as VFIO needs
    consoles = " ".join(f"/srv/vms/{n}/console.log" for n in before)
    took = host.reboot_with(f"sync {consoles}; {POWER_CUT}")
    print(f"power cut after save-all --reboot: host back in {took:.0f} s (load {load()})")
    assert_back(host, before, tuple(before), crashed=True)
    woke = console_text(host, "vfio")[before["vfio"][2] :]
    assert "suspending" in woke and "resumed" in woke, woke  # the guest's own lines around its S3
    assert_edu(host, "vfio")
    assert "vfio: restored" in journal(host), journal(host)

    # update: it must run cold (the running QEMU holds the device), and says so. A cold update saves with a
    # suspend again, which this guest (q35 on SeaBIOS: once per boot) can no longer do: then it refuses, the
    # guest untouched. Either way the guest runs on, intact, its device answering.
    found = json.loads(host.exec(f"cprctl check vfio --qemu {QEMU} --json", check=False).out)
    cold = next(f for f in found if f["code"].startswith("update-"))
    assert "'update' will restart cold: VFIO devices are held by the running QEMU" in cold["message"], cold
    before = {"vfio": mark_of(host, "vfio")}
    upd = host.exec(f"cprctl update vfio --qemu {QEMU}", timeout=900, check=False)
    print(f"update of the VFIO guest: rc={upd.rc} (load {load()})\n{upd.out}{upd.err}")
    assert upd.rc == 0 or len([ln for ln in upd.err.splitlines() if ln.startswith("cprctl: error: ")]) == 1, upd
    assert_back(host, before, ("vfio",))
    assert_edu(host, "vfio")


def assert_edu(host: HostVM, name: str) -> None:
    """The ``edu`` device answers in nested guest *name*: its id register, and 0x04 inverting what was written."""
    out = nested_exec(host, name, EDU_PROBE)
    assert "id=0x010000ED not=0xEDCBA987" in out, out


def dax_save_mb(detail: str) -> float:
    """MB a save wrote, from its outcome's detail (``in-place, 0.9 MB``)."""
    found = re.search(r"in-place, ([0-9.]+) MB", detail)
    assert found, detail
    return float(found[1])
