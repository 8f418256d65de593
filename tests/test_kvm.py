"""Save and restore under KVM (the accelerator of a real host): KVM rewrites the guest's kvmclock record when the
loading QEMU hands it the clock, so the loaded RAM is not byte for byte the saved RAM, and the restore's RAM
verification must tell that from corruption. This machine's KVM runs firmware (no stock kernel), which is enough:
SeaBIOS registers a kvmclock record in low RAM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import cprctl
from cprctl import CprctlError
from cprctl._checkpoint import canary, record, statefile

from .guestvm import cli

pytestmark = pytest.mark.qemu


def launch(state_dir: Path, name: str) -> None:
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "kvm64", "-m", "256", "-machine", "q35"]
    argv += ["-display", "none", "-nodefaults", "-serial", "none"]
    r = cli("launch", name, "--", *argv, state_dir=state_dir)
    if r.returncode and ("kvm" in r.stderr.lower() or "MSR" in r.stderr):
        pytest.skip(f"KVM cannot run a VM here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr


def status(state_dir: Path, name: str) -> dict[str, object]:
    return dict(json.loads(cli("status", name, "--json", state_dir=state_dir).stdout))


@pytest.fixture(scope="module")
def kvm() -> None:
    try:
        open("/dev/kvm", "rb").close()
    except OSError as exc:
        pytest.skip(f"no /dev/kvm: {exc}")


def test_anonymous_ram_under_kvm_restores(kvm: None, state_dir: Path) -> None:
    launch(state_dir, "kv1")
    subprocess.run(["sleep", "2"], check=True)  # the firmware registers its clock
    r = cli("save", "kv1", state_dir=state_dir)
    assert r.returncode == 0 and "mapped-ram" in r.stdout, r.stdout + r.stderr
    r = cli("restore", "kv1", state_dir=state_dir)
    assert r.returncode == 0, r.stderr
    assert status(state_dir, "kv1")["state"] == "running"


def test_corrupt_ram_under_kvm_is_still_refused(kvm: None, state_dir: Path) -> None:
    launch(state_dir, "kv2")
    subprocess.run(["sleep", "2"], check=True)
    assert cli("save", "kv2", state_dir=state_dir).returncode == 0
    path = state_dir / "vms" / "kv2" / "state.cpr"
    ram = next(b for b in statefile.mapped_ram_layout(path) if b.name == "pc.ram")
    with open(path, "r+b") as f:
        f.seek(ram.pages + 0xF0000)  # the firmware's own code, in RAM
        byte = f.read(1)
        f.seek(ram.pages + 0xF0000)
        f.write(bytes([byte[0] ^ 0x55]))
    r = cli("restore", "kv2", state_dir=state_dir)
    assert r.returncode != 0 and "corrupt" in r.stderr, r.stderr
    assert status(state_dir, "kv2")["state"] == "saved" and path.exists()


def test_kept_ram_under_kvm_passes_its_canary_after_a_trial(
    kvm: None, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAM kept in place under KVM, every page of it in the canary: nothing writes the file between the save's
    canary and QEMU's exit, and what a trial's QEMU leaves in it (KVM's clock records) is taken into the canary
    again once it is gone (`canary.retake`), so the restore passes."""
    monkeypatch.setattr(canary, "MIN_SAMPLES", 1 << 30)  # every page: a write anywhere is seen
    ram = tmp_path / "kv3.ram"
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "kvm64", "-m", "256", "-machine", "q35,memory-backend=m0"]
    argv += ["-object", f"memory-backend-file,id=m0,size=256M,mem-path={ram},share=on"]
    argv += ["-display", "none", "-nodefaults", "-serial", "none"]
    r = cli("launch", "kv3", "--", *argv, state_dir=state_dir)
    if r.returncode and ("kvm" in r.stderr.lower() or "MSR" in r.stderr):
        pytest.skip(f"KVM cannot run a VM here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    subprocess.run(["sleep", "2"], check=True)  # the firmware registers its clock
    assert cprctl.save("kv3", state_dir=state_dir).strategy == "in-place"
    saved = record.load(state_dir / "vms" / "kv3" / "vm.json").checkpoint
    assert saved is not None and [canary.sampled(c) for c in saved.kept_ram] == [65536]
    assert canary.problem(saved.kept_ram[0]) is None  # QEMU's exit wrote nothing into it
    cprctl.check("kv3", trial=True, state_dir=state_dir)
    print(f"after the trial, against the save's canary: {canary.problem(saved.kept_ram[0]) or 'unchanged'}")
    # A restore refused once its QEMU started (a byte of the state file flipped) may leave the same behind.
    tried = record.load(state_dir / "vms" / "kv3" / "vm.json").checkpoint
    assert tried is not None
    path = state_dir / "vms" / "kv3" / "state.cpr"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CprctlError, match="corrupt"):
        cprctl.restore("kv3", state_dir=state_dir)
    print(f"after the refused restore, against the trial's canary: {canary.problem(tried.kept_ram[0]) or 'unchanged'}")
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cprctl.restore("kv3", state_dir=state_dir)
    assert status(state_dir, "kv3")["state"] == "running"
    cprctl.stop("kv3", state_dir=state_dir)
