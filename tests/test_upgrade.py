"""Updates never take a VM down (issue 10): the new binary is checked before the guest stops, a binary
that cannot take the VM is refused, a failed cold restore goes back to the previous binary, and VMs whose
binary a package upgrade replaced move onto the new one warm (update-all)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint.facts import binary_info

from .guestvm import GuestVM, cli, qemu_copy, upgrade_binary, wrapper

pytestmark = pytest.mark.qemu

MACHINE = "pc-q35-10.0"
#: Stands in for an older QEMU: it lacks the VM's machine type in -machine help and refuses it.
NO_MACHINE = f"""for a in "$@"; do case "$a" in *{MACHINE}*)
  echo "qemu-system-x86_64: unsupported machine type '{MACHINE}'" >&2; exit 1;; esac; done
if [ "$1" = "-machine" ] && [ "$2" = "help" ]; then
  {{QEMU}} "$@" | grep -v '^{MACHINE} ' | sed 's/alias of {MACHINE}/alias of pc-q35-9.2/'; exit 0
fi"""
#: Passes every check but fails whenever it is started to receive a migration.
NO_INCOMING = (
    """for a in "$@"; do [ "$a" = "-incoming" ] && { echo "simulated: cannot load here" >&2; exit 1; }; done"""
)


def one_line_refusal(out: object, *words: str) -> None:
    """A non-zero exit with one error line (after any progress lines) that says *words*."""
    stderr = out.stderr.strip()  # type: ignore[attr-defined]
    assert out.returncode != 0, stderr  # type: ignore[attr-defined]
    errors = [line for line in stderr.splitlines() if line.startswith("cprctl: error: ")]
    assert len(errors) == 1 and errors[0] == stderr.splitlines()[-1] and "Traceback" not in stderr, stderr
    for w in words:
        assert w in errors[0], stderr


@pytest.fixture(scope="module")
def vm(state_dir: Path) -> GuestVM:
    return GuestVM.launch("u1", state_dir, ram="file", fill=16)


def test_a_binary_lacking_the_machine_type_is_refused_and_the_vm_runs_on(vm: GuestVM, state_dir: Path) -> None:
    from .guestvm import QEMU

    bad = wrapper(state_dir.parent / "nomachine", "qemu-system-x86_64", NO_MACHINE.replace("{QEMU}", QEMU))
    pid, mark = vm.status().pid, vm.mark()
    for cold in ([], ["--cold"]):
        out = cli("update", "u1", "--qemu", str(bad), *cold, state_dir=state_dir)
        one_line_refusal(out, "refused", f"lacks machine type {MACHINE}", "not touched")
        st = vm.status()
        assert st.state == "running" and st.pid == pid and st.state_file is None
    out = cli("check", "u1", "--qemu", str(bad), "--json", state_dir=state_dir)
    errors = [f["message"] for f in json.loads(out.stdout) if f["blocking"]]
    assert out.returncode == 1 and errors == [f"{bad} lacks machine type {MACHINE}"], out.stdout
    assert cli("check", "u1", "--qemu", QEMU, state_dir=state_dir).returncode == 0
    vm.assert_continued(mark, fill=16)
    # restore --qemu refuses it too, before anything starts, and keeps the checkpoint.
    cprctl.save("u1", state_dir=state_dir)
    out = cli("restore", "u1", "--qemu", str(bad), state_dir=state_dir)
    one_line_refusal(out, f"lacks machine type {MACHINE}")
    assert vm.status().state == "saved"
    cprctl.restore("u1", state_dir=state_dir)
    vm.assert_continued(mark, fill=16)


def test_a_qemu_older_than_9_is_refused(vm: GuestVM, state_dir: Path) -> None:
    old = os.environ.get("CPRCTL_OLD_QEMU", str(Path.home() / ".cache/cprctl-old-qemu/usr/bin/qemu-system-x86_64"))
    assert os.access(old, os.X_OK), f"no QEMU 7.2 at {old}: run 'make old-qemu'"
    pid = vm.status().pid
    out = cli("update", "u1", "--qemu", old, state_dir=state_dir)
    one_line_refusal(out, "7.2", ">= 9.0")
    assert vm.status().state == "running" and vm.status().pid == pid


def test_a_standby_that_fails_for_its_binary_is_a_refusal_not_a_cold_fallback(vm: GuestVM, state_dir: Path) -> None:
    from .guestvm import QEMU

    bad = wrapper(state_dir.parent / "noincoming", "qemu-system-x86_64", NO_INCOMING)
    pid, mark = vm.status().pid, vm.mark()
    out = cli("update", "u1", "--qemu", str(bad), state_dir=state_dir)
    one_line_refusal(out, "refused", "did not start beside the old QEMU", "simulated: cannot load here")
    st = vm.status()
    assert st.state == "running" and st.pid == pid and st.state_file is None, "it went cold"
    vm.assert_continued(mark, fill=16)
    assert QEMU


def test_a_failed_cold_restore_goes_back_to_the_previous_binary(vm: GuestVM, state_dir: Path) -> None:
    bad = wrapper(state_dir.parent / "noincoming", "qemu-system-x86_64", NO_INCOMING)
    previous, mark = vm.status().argv[0], vm.mark()
    out = cli("update", "u1", "--qemu", str(bad), "--cold", state_dir=state_dir)
    one_line_refusal(out, "runs again on its previous binary", "simulated: cannot load here")
    st = vm.status()
    assert st.state == "running" and st.argv[0] == previous and st.state_file is None
    vm.assert_continued(mark, fill=16)


def test_a_replaced_binary_is_kept_to_go_back_to(state_dir: Path) -> None:
    binary = qemu_copy(state_dir.parent / "pkg2" / "bin")
    v = GuestVM.launch("r1", state_dir, ram="file", fill=0, qemu=str(binary), work=state_dir.parent / "r1-w")
    upgrade_binary(binary, tag=b"another build")
    bad = wrapper(state_dir.parent / "noincoming", "qemu-system-x86_64", NO_INCOMING)
    mark = v.mark()
    out = cli("update", "r1", "--qemu", str(bad), "--cold", state_dir=state_dir)
    one_line_refusal(out, "runs again on its previous binary", "simulated: cannot load here")
    st = v.status()
    kept_launcher = state_dir / "builds" / str(st.build) / "bin" / "qemu-system-x86_64"
    assert st.state == "running" and st.argv[0] == str(kept_launcher) and os.path.exists(st.argv[0])
    assert st.kept_from == str(binary) and st.binary_replaced, st  # update-all tries the new binary again
    v.assert_continued(mark, fill=0)
    v.stop()


def test_update_all_moves_vms_off_a_replaced_binary_warm(state_dir: Path) -> None:
    binary = qemu_copy(state_dir.parent / "pkg" / "bin")
    vms = [
        GuestVM.launch(n, state_dir, ram="file", fill=8, qemu=str(binary), work=state_dir.parent / f"{n}-w")
        for n in ("p1", "p2")
    ]
    pids = {v.name: v.status().pid for v in vms}
    assert not any(v.status().binary_replaced for v in vms)
    marks = {v.name: v.mark() for v in vms}
    upgrade_binary(binary)  # what dpkg does: the running QEMUs keep the old file
    out = cli("status", "--json", state_dir=state_dir)
    replaced = {s["name"]: s["binary_replaced"] for s in json.loads(out.stdout)}
    assert replaced["p1"] and replaced["p2"] and not replaced["u1"], replaced
    out = cli("update-all", "--json", state_dir=state_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    got = {o["name"]: o for o in json.loads(out.stdout)}
    for name in ("p1", "p2"):
        assert got[name]["outcome"] == "updated" and got[name]["warm"] is True, got[name]
        assert isinstance(got[name]["pause_ms"], float)
    assert got["u1"]["outcome"] == "skipped" and got["u1"]["warm"] is None
    for v in vms:
        st = v.status()
        assert st.state == "running" and not st.binary_replaced and st.pid != pids[v.name]
        assert st.argv[0] == str(binary)
        v.assert_continued(marks[v.name], fill=8)
    out = cli("update-all", "--json", state_dir=state_dir)  # nothing left to move
    assert out.returncode == 0 and {o["outcome"] for o in json.loads(out.stdout)} == {"skipped"}
    for v in vms:
        v.stop()


def test_a_binary_is_probed_once_until_it_is_replaced(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    binary = wrapper(tmp_path / "bin", "qemu-system-x86_64", f'echo "$@" >> {runs}')
    first = asyncio.run(binary_info(str(binary)))
    probed = runs.read_text()
    assert "-machine help" in probed and asyncio.run(binary_info(str(binary))) == first
    assert runs.read_text() == probed, "the same file was probed again"
    new = binary.with_name("new")
    new.write_text(binary.read_text())
    new.chmod(0o755)
    os.rename(new, binary)  # replaced, as a package does
    asyncio.run(binary_info(str(binary)))
    assert runs.read_text() == probed * 2, "a replaced binary was not probed again"
