"""RAM on persistent memory across a real host crash (issue 16, item 5): the Debian 13 host VM
(tests/hostvm.py) gets an emulated NVDIMM (QEMU's ``nvdimm`` device on a file of this machine), which it
sees as ``/dev/pmem0``, formats with ext4 and mounts with ``-o dax``. A nested guest keeps its RAM in a
shared file there. ``check --reboot`` takes it as non-volatile, the save writes none of that RAM (only
device state, in place with ``x-ignore-shared``), and after ``save-all --reboot`` and a power cut (sysrq
``b``: no sync, no shutdown) the unit restores it at boot with the same guest boot and its RAM intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cprctl._demo import TICK

from .guestvm import guest_dir
from .hostvm import HostVM, cached_image, console_text, launch_nested, wait_tick

pytestmark = [pytest.mark.qemu, pytest.mark.hostvm]

if os.geteuid() != 0 or not shutil.which("mmdebstrap") or not shutil.which("mkfs.ext4"):
    pytest.skip("needs root, mmdebstrap and mkfs.ext4 (scripts/install-deps.sh)", allow_module_level=True)

PMEM_MIB = 512
MOUNT = "/mnt/pmem"
NAME = "dax"
RAM_MIB = 128
FILL = 32


def nvdimm_args(backing: Path) -> tuple[str, ...]:
    """The host VM's NVDIMM on file *backing* (``-machine``/``-m`` options merge with the host VM's own)."""
    return (
        "-machine", "nvdimm=on",
        "-m", "3G,slots=2,maxmem=8G",
        "-object", f"memory-backend-file,id=pmem0,share=on,mem-path={backing},size={PMEM_MIB}M",
        "-device", "nvdimm,memdev=pmem0,id=nv0",
    )  # fmt: skip


@pytest.fixture(scope="module")
def host() -> Iterator[HostVM]:
    image = cached_image()
    work = Path(tempfile.mkdtemp(prefix="cprctl-hostvm-dax.", dir="/var/tmp"))
    backing = work / "pmem.img"
    with open(backing, "wb") as f:
        f.truncate(PMEM_MIB << 20)
    vm: HostVM | None = None
    try:
        vm = HostVM(image, work, guest_dir(), extra=nvdimm_args(backing))
        vm.install()
        # The pmem device, a DAX ext4 on it, mounted at every boot before the unit (its RequiresMountsFor=).
        vm.sh(
            "for i in $(seq 60); do [ -b /dev/pmem0 ] && break; sleep 1; done; "
            f"mkfs.ext4 -q -F -b 4096 /dev/pmem0 && mkdir -p {MOUNT} && "
            f"echo '/dev/pmem0 {MOUNT} ext4 dax 0 2' >> /etc/fstab && systemctl daemon-reload && mount {MOUNT}"
        )
        vm.wait_kvm()
        launch_nested(vm, NAME, ram="file", ram_mib=RAM_MIB, fill=FILL, ram_path=f"{MOUNT}/{NAME}.ram")
        vm.sh("cprctl install-units")  # again: the unit now requires the pmem mount the guest's RAM is on
        wait_tick(vm, NAME, 2, timeout=900)
        wait_mem_ok(vm, 0)
        yield vm
    except BaseException:
        if vm:
            print(vm.tail())
        raise
    finally:
        if vm:
            vm.stop()
        shutil.rmtree(work, ignore_errors=True)


def wait_mem_ok(host: HostVM, after: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while "mem ok" not in console_text(host, NAME)[after:]:
        assert time.monotonic() < deadline, f"no 'mem ok' past {after}:\n{console_text(host, NAME)[-1500:]}"
        time.sleep(2)


def test_pmem_is_dax_and_the_unit_needs_it(host: HostVM) -> None:
    opts = host.sh(f"findmnt -n -o OPTIONS {MOUNT}")
    assert "dax" in opts, opts
    unit = host.sh("systemctl cat cprctl-guests.service")
    assert MOUNT in unit, unit


def test_check_takes_dax_as_non_volatile(host: HostVM) -> None:
    found = json.loads(host.sh(f"cprctl check --reboot --json {NAME}"))
    assert not [f for f in found if f["blocking"]], found
    assert any(f["code"].startswith("ram-dax-") and "persistent memory" in f["message"] for f in found), found


def test_crash_after_save_all_keeps_ram_on_pmem(host: HostVM) -> None:
    text = console_text(host, NAME)
    last = list(TICK.finditer(text))[-1]
    boot, n, mark = last["boot"], int(last["n"]), last.end()
    host.sh("cprctl save-all --reboot", timeout=600)
    st = json.loads(host.sh(f"cprctl status --json {NAME}"))
    assert st["state"] == "saved" and st["strategy"] == "in-place", st
    # The save wrote none of the guest's RAM: its state file holds device state only.
    assert st["state_file_bytes"] < (RAM_MIB << 20) // 8, st
    host.crash()  # no sync, no shutdown
    host.wait_silent()
    host.wait_boot()
    st = json.loads(host.sh(f"cprctl status --json {NAME}"))
    assert st["state"] == "running", (st, host.exec("journalctl -b -u cprctl-guests.service -o cat", check=False).out)
    ticks = wait_tick(host, NAME, n + 1)
    after = [t for t in ticks if t.n > n]
    assert {t.boot for t in after} == {boot}, console_text(host, NAME)[-1500:]
    wait_mem_ok(host, mark)
    tail = console_text(host, NAME)[mark:]
    assert "mem BAD" not in tail and "memfill exited" not in tail, tail[-1500:]
