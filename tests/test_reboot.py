"""``cprctl reboot``: the kernel it chooses, its gate, its plan, and what it asks of systemd and kexec.

The choice of kernel and command line is pure (a boot folder of real files in tmp). The host calls
(systemctl, kexec) are faked only where this machine cannot make them (no systemd as init, no reboot):
the gate over real VMs and ``--dry-run`` run for real; the real reboots are in the host VM's tests.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint import reboot as op
from cprctl._host import kexec, systemd
from cprctl._store import StateDir

from .guestvm import GuestVM, cli


def boot_folder(tmp: Path, versions: list[str], initrds: list[str] | None = None) -> Path:
    boot = tmp / "boot"
    boot.mkdir(parents=True)
    for v in versions:
        (boot / f"vmlinuz-{v}").write_bytes(b"kernel")
        (boot / f"config-{v}").write_text("")
    for v in versions if initrds is None else initrds:
        (boot / f"initrd.img-{v}").write_bytes(b"initrd")
    return boot


def test_newest_kernel_is_by_version_not_by_name_or_date(tmp_path: Path) -> None:
    boot = boot_folder(tmp_path, ["6.12.9+deb13-cloud-amd64", "6.12.10+deb13-cloud-amd64", "6.1.0-31-amd64"])
    os.utime(boot / "vmlinuz-6.1.0-31-amd64")  # the newest file is not the newest kernel
    (boot / "vmlinuz-6.99.old").write_bytes(b"")  # not a kernel Debian installs
    assert kexec.newest_kernel(boot) == boot / "vmlinuz-6.12.10+deb13-cloud-amd64"


def test_no_kernel_is_a_clear_refusal(tmp_path: Path) -> None:
    with pytest.raises(cprctl.UsageError, match=r"no kernel \(vmlinuz-VERSION\) in .*; give --kernel"):
        kexec.newest_kernel(boot_folder(tmp_path, []))


def test_cmdline_drops_boot_image_and_initrd_only() -> None:
    running = "BOOT_IMAGE=/boot/vmlinuz-6.12.9 root=UUID=ab-cd ro initrd=\\initrd.img quiet console=ttyS0,115200\n"
    assert kexec.boot_cmdline(running) == "root=UUID=ab-cd ro quiet console=ttyS0,115200"


def test_default_choice_and_explicit_files(tmp_path: Path) -> None:
    boot = boot_folder(tmp_path, ["6.12.9", "6.12.10"], initrds=["6.12.10"])
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda rw console=ttyS0\n")
    k = kexec.choose(boot=boot, proc_cmdline=cmdline)
    assert k == kexec.KexecKernel(
        str(boot / "vmlinuz-6.12.10"), str(boot / "initrd.img-6.12.10"), "root=/dev/vda rw console=ttyS0"
    )
    assert kexec.command(k) == [
        "kexec", "-l", str(boot / "vmlinuz-6.12.10"), f"--initrd={boot}/initrd.img-6.12.10",
        "--append=root=/dev/vda rw console=ttyS0",
    ]  # fmt: skip
    # An older kernel without an initrd beside it: none (kexec gets no --initrd), the command line as given.
    k = kexec.choose(str(boot / "vmlinuz-6.12.9"), append="root=/dev/vdb", boot=boot, proc_cmdline=cmdline)
    assert (k.initrd, k.cmdline) == (None, "root=/dev/vdb") and "--initrd" not in " ".join(kexec.command(k))
    with pytest.raises(cprctl.UsageError, match=r"--kernel .*/nope: no such file"):
        kexec.choose(str(boot / "nope"), boot=boot, proc_cmdline=cmdline)
    with pytest.raises(cprctl.UsageError, match=r"--initrd .*/nope: no such file"):
        kexec.choose(str(boot / "vmlinuz-6.12.9"), str(boot / "nope"), boot=boot, proc_cmdline=cmdline)


class FakeHost:
    """systemd and kexec as a systemd host with the unit enabled and active; records what was asked."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, tmp: Path, *, active: bool = True, power_ok: bool = True
    ) -> None:
        self.calls: list[str] = []
        boot = boot_folder(tmp, ["6.12.38+deb13-cloud-amd64", "6.12.41+deb13-cloud-amd64"])
        real_choose = kexec.choose
        monkeypatch.setattr(systemd, "booted", lambda: True)
        monkeypatch.setattr(systemd, "unit_state", lambda unit: (True, True))
        monkeypatch.setattr(systemd, "unit_active", lambda unit: active)
        monkeypatch.setattr(kexec, "available", lambda: True)
        monkeypatch.setattr(kexec, "load", lambda k: self.calls.append(f"load {k.kernel} {k.initrd} {k.cmdline}"))
        monkeypatch.setattr(kexec, "unload", lambda: self.calls.append("unload"))
        monkeypatch.setattr(
            kexec,
            "choose",
            lambda kernel=None, initrd=None, append=None: real_choose(kernel, initrd, append or "ro", boot),
        )

        def power(action: str) -> None:
            self.calls.append(f"systemctl {action}")
            if not power_ok:
                raise OSError(f"systemctl {action} failed: Access denied")

        monkeypatch.setattr(systemd, "power", power)
        self.boot = boot


def test_kexec_loads_the_newest_kernel_then_hands_over(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, tmp_path)
    plan = asyncio.run(op.reboot(StateDir(tmp_path / "state"), use_kexec=True))
    k = host.boot / "vmlinuz-6.12.41+deb13-cloud-amd64"
    assert host.calls == [f"load {k} {host.boot}/initrd.img-6.12.41+deb13-cloud-amd64 ro", "systemctl kexec"]
    assert plan.started and plan.how == "kexec" and not plan.refusals


def test_plain_reboot_and_a_refusing_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, tmp_path, power_ok=False)
    with pytest.raises(cprctl.UsageError, match=r"reboot refused by systemd, VMs untouched: .*Access denied"):
        asyncio.run(op.reboot(StateDir(tmp_path / "state"), use_kexec=True))
    assert host.calls[1:] == ["systemctl kexec", "unload"]  # the loaded kernel is forgotten again
    host.calls.clear()
    with pytest.raises(cprctl.UsageError):
        asyncio.run(op.reboot(StateDir(tmp_path / "state")))
    assert host.calls == ["systemctl reboot"]


def test_an_inactive_unit_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, tmp_path, active=False)
    with pytest.raises(cprctl.UsageError, match=r"enabled but not active.*systemctl start cprctl-guests.service"):
        asyncio.run(op.reboot(StateDir(tmp_path / "state"), use_kexec=True))
    assert host.calls == []
    with pytest.raises(cprctl.UsageError, match=r"--kernel, --initrd and --append go with --kexec"):
        asyncio.run(op.reboot(StateDir(tmp_path / "state"), kernel="/boot/vmlinuz"))


@pytest.mark.qemu
def test_gate_and_dry_run_with_real_vms(monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    """Real VMs: one with RAM in place on disk, one with anonymous RAM, one with RAM on tmpfs (which a
    reboot erases). This host is not systemd: the command refuses, saying why, and --dry-run shows the plan
    and every refusal; with a systemd host faked, the VM gate alone refuses, then lets the reboot through."""
    shm = Path("/dev/shm") / f"cprctl-reboot-{os.getpid()}"
    vms = [
        GuestVM.launch("rf", state_dir, ram="file", fill=0, agent=False),
        GuestVM.launch("ra", state_dir, ram="anon", fill=0, agent=False, ram_mib=192),
        GuestVM.launch("rshm", state_dir, fill=0, agent=False, ram_path=shm),
    ]
    try:
        out = cli("reboot", state_dir=state_dir)
        assert out.returncode == 2 and out.stdout == "", out
        assert out.stderr.count("\n") == 1 and "the host's init is not systemd" in out.stderr, out.stderr
        out = cli("reboot", "--dry-run", state_dir=state_dir)
        assert out.returncode == 1, out
        lines = out.stdout.splitlines()
        assert lines[0].startswith("plan: systemctl reboot;"), lines
        assert any(line.startswith("rf: saved at shutdown (in-place, 0 MB of RAM written)") for line in lines), lines
        ra = next(line for line in lines if line.startswith("ra: "))
        assert "mapped-ram, 201 MB of RAM written" in ra and "expected downtime" in ra, ra
        assert any(line.startswith("refused: the host's init is not systemd") for line in lines), lines
        assert any(line.startswith("refused: rshm: ") and "tmpfs" in line for line in lines), lines
        # A systemd host with the unit active: the tmpfs VM alone refuses it, and nothing was touched.
        host = FakeHost(monkeypatch, state_dir.parent / "fakehost")
        with pytest.raises(cprctl.FleetCheckFailed, match=r"^reboot refused, no VM touched: rshm would not survive"):
            cprctl.reboot(state_dir=state_dir)
        assert host.calls == [] and {st.state for st in cprctl.status(state_dir=state_dir)} == {"running"}
        vms.pop().stop()
        cprctl.remove("rshm", state_dir=state_dir)
        plan = cprctl.reboot(kexec=True, state_dir=state_dir)
        assert plan.started and host.calls[-1] == "systemctl kexec", host.calls
        assert {st.state for st in cprctl.status(state_dir=state_dir)} == {"running"}  # the unit saves them
    finally:
        for vm in vms:
            vm.stop()
        shm.unlink(missing_ok=True)
