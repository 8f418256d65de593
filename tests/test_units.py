"""The systemd unit: written from the managed VMs, and accepted by systemd-analyze verify."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cprctl import _units
from cprctl._checkpoint import record
from cprctl._checkpoint.record import VMRecord
from cprctl._store import StateDir

from .guestvm import cli


def _vm(sd: StateDir, name: str, argv: list[str]) -> None:
    folder = sd.create_vm_dir(name)
    record.save(
        folder / "vm.json",
        VMRecord(
            name=name,
            argv=argv,
            qmp=str(folder / "qmp.sock"),
            origin="launch",
            machine="pc-q35-10.0",
            log=str(folder / "qemu.log"),
        ),
    )


def test_size_bytes() -> None:
    assert _units.size_bytes("4G") == 4 << 30
    assert _units.size_bytes("512") == 512 << 20
    assert _units.size_bytes("size=2G,slots=4,maxmem=8G") == 2 << 30
    assert _units.size_bytes(None) == 0


def test_unit_sizes_mounts_and_timeout(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "state")
    _vm(
        sd,
        "inplace",
        [
            "/usr/bin/qemu-system-x86_64",
            "-m",
            "64G",
            "-object",
            "memory-backend-file,id=r,size=64G,mem-path=/srv/ram/vm.ram,share=on",
            "-machine",
            "memory-backend=r",
        ],
    )
    _vm(sd, "anon", ["/usr/bin/qemu-system-x86_64", "-m", "64G"])
    text = _units.unit_text(sd, exe="/usr/local/bin/cprctl")
    mounts = text.split("RequiresMountsFor=")[1].split("\n")[0].split()
    assert sorted(mounts) == sorted([str(tmp_path / "state"), "/srv/ram", "/usr/bin"])
    assert "network" not in text  # no VM on the host's network: restores wait for none of it
    assert "ExecStop=/usr/local/bin/cprctl save-all --shutdown-unsaveable" in text
    # "-": a failed restore (one VM's) still leaves the unit active, so its save runs at the next shutdown.
    assert "ExecStart=-/usr/local/bin/cprctl restore-all" in text
    # At boot and shutdown only, the saves and restores come before the other services' CPU.
    assert f"StartupCPUWeight={_units.STARTUP_CPU_WEIGHT}\n" in text and "\nCPUWeight" not in text
    timeout = int(text.split("TimeoutStopSec=")[1].split()[0])
    assert timeout >= (64 << 30) // _units.SLOW_DISK  # only the anonymous 64G is written


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_installed_unit_verifies(tmp_path: Path) -> None:
    sd = tmp_path / "state"
    out = cli("install-units", "--dest", str(tmp_path / "units"), "--no-enable", state_dir=sd)
    assert out.returncode == 0, out.stderr
    unit = tmp_path / "units" / _units.UNIT
    text = unit.read_text()
    assert str(Path(sys.executable).parent / "cprctl") in text or "cprctl" in text
    check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in check.stderr.splitlines() if _units.UNIT in line]
    assert check.returncode == 0 and not problems, check.stderr


def test_unit_waits_for_exactly_what_the_vms_need(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "state")
    _vm(
        sd,
        "disks",
        [
            "/opt/qemu/bin/qemu-system-x86_64",
            "-drive", "file=/srv/images/a.qcow2,if=virtio",
            "-blockdev", "driver=file,filename=/mnt/nfs/b.raw,node-name=b",
            "-drive", "file=nbd:localhost:10809,if=virtio",
            "-kernel", "/boot/vmlinuz", "-bios", "/usr/share/ovmf/OVMF.fd",
            "-netdev", "tap,id=n0,ifname=tap0,script=no", "-device", "virtio-net-pci,netdev=n0",
        ],
    )  # fmt: skip
    text = _units.unit_text(sd, exe="/usr/local/bin/cprctl")
    mounts = text.split("RequiresMountsFor=")[1].split("\n")[0].split()
    want = [str(tmp_path / "state"), "/opt/qemu/bin", "/srv/images", "/mnt/nfs", "/boot", "/usr/share/ovmf"]
    assert sorted(mounts) == sorted(want)
    assert "After=network.target\n" in text and "network-online" not in text
    assert "network" not in _units.unit_text(sd, exe="/usr/local/bin/cprctl", user=True)


def test_boot_runs_the_commands_python_on_the_lean_entry(tmp_path: Path) -> None:
    """The unit starts restore-all with the python of the cprctl command (its #! line) on `cprctl._boot`, which
    imports less before the first restore; a command whose python is unknown or lacks cprctl runs as itself."""
    script = tmp_path / "cprctl"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom cprctl.cli import main\nsys.exit(main())\n")
    assert _units.boot_command(str(script)) == f"{sys.executable} -m cprctl._boot restore-all"
    sd = StateDir(tmp_path / "state")
    assert f"ExecStart=-{sys.executable} -m cprctl._boot restore-all\n" in _units.unit_text(sd, exe=str(script))
    other = tmp_path / "other"
    other.write_text("#!/bin/sh\nexec cprctl \"$@\"\n")
    assert _units.boot_command(str(other)) == f"{other} restore-all"
    assert _units.boot_command(str(tmp_path / "missing")) == f"{tmp_path / 'missing'} restore-all"
