"""Kept QEMU builds (issue 15): a VM is never left down because the QEMU on disk cannot load its state.

The VM runs on a private QEMU tree (its executable, and libraries through LD_LIBRARY_PATH), which a
"package upgrade" then deletes and replaces by a QEMU that cannot load the VM's state (a wrapper that loads
a firmware of another size: QEMU's own "Size mismatch: pc.bios ... error while loading state" refusal). The
restore then runs the kept build, from the state directory alone, and the guest goes on in the same boot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint import kept, record

from .guestvm import QEMU, GuestVM, cli, qemu_copy

pytestmark = pytest.mark.qemu

#: A QEMU that starts, passes every check, but cannot load a VM saved with SeaBIOS's 256 KiB image.
SMALL_BIOS = """for a in "$@"; do [ "$a" = "-incoming" ] && exec {QEMU} "$@" -bios bios.bin; done"""


def small_bios(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/bash\n{SMALL_BIOS.replace("{QEMU}", QEMU)}\nexec {QEMU} "$@"\n')
    path.chmod(0o755)
    return path


def private_tree(prefix: Path) -> tuple[Path, Path]:
    """A copy of the system QEMU at PREFIX/bin (a build of its own: a tag follows its ELF contents) and of the
    libraries it links (but glibc) at PREFIX/lib."""
    binary = qemu_copy(prefix / "bin")
    with open(binary, "ab") as f:
        f.write(b"private build")
    lib = prefix / "lib"
    lib.mkdir(parents=True)
    out = subprocess.run(["ldd", QEMU], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].strip().startswith("/"):
            path = parts[1].split()[0]
            if not os.path.basename(path).startswith(("libc.so", "libm.so", "ld-linux")):
                shutil.copy2(path, lib / os.path.basename(path))
    return binary, lib


def elf_maps(pid: int) -> set[str]:
    """The files process *pid* maps that are ELF objects (executable, loader, libraries)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            with open(f"/proc/{pid}/map_files/{fields[0]}", "rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.add(fields[5])
    return found


@pytest.fixture(scope="module")
def tree(state_dir: Path) -> Iterator[tuple[Path, Path]]:
    yield private_tree(state_dir.parent / "pfx")


def test_a_vm_launched_from_a_private_tree_has_a_kept_build(tree: tuple[Path, Path], state_dir: Path) -> None:
    binary, lib = tree
    os.environ["LD_LIBRARY_PATH"] = str(lib)  # only the QEMU launched now: spawn passes the environment on
    try:
        vm = GuestVM.launch("k1", state_dir, ram="file", fill=8, qemu=str(binary), work=state_dir.parent / "k1-w")
    finally:
        del os.environ["LD_LIBRARY_PATH"]
    st = vm.status()
    assert st.pid and st.build and not st.binary_replaced and st.kept_from is None
    assert any(p.startswith(str(lib)) for p in elf_maps(st.pid)), "the VM does not run on the private libraries"
    folder = state_dir / "builds" / st.build
    assert (folder / "bin" / "qemu-system-x86_64").exists() and (folder / "share" / "bios-256k.bin").exists()
    assert {p.name for p in (folder / "lib").iterdir()} >= {p.name for p in lib.iterdir()}


def test_restore_runs_the_kept_build_when_the_qemu_on_disk_cannot_load_the_state(
    tree: tuple[Path, Path], state_dir: Path
) -> None:
    binary, _lib = tree
    vm = GuestVM("k1", state_dir, state_dir.parent / "k1-w")
    build, mark = vm.status().build, vm.mark()
    assert cli("save", "k1", state_dir=state_dir).returncode == 0
    assert vm.status().state == "saved"
    # The upgrade: the private tree is gone; its path now holds a QEMU that cannot load the state.
    shutil.rmtree(binary.parent.parent)
    small_bios(binary)
    out = cli("restore", "k1", "--json", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["status"] == "running" and "the build that wrote the checkpoint" in res["fallback"]
    # QEMU's own error line, not a QMP hang-up:
    assert "mismatch: pc.bios" in res["fallback"] and "error while loading state" in res["fallback"], res
    st = vm.status()
    launcher = state_dir / "builds" / str(build) / "bin" / "qemu-system-x86_64"
    assert st.state == "running" and st.argv[0] == str(launcher) and st.build == build
    assert st.kept_from == str(binary) and st.binary_replaced  # update-all tries the disk binary again
    assert st.pid
    outside = {p for p in elf_maps(st.pid) if not p.startswith(str(state_dir / "builds" / str(build)))}
    assert not outside, f"the kept build maps files from outside it: {outside}"
    vm.assert_continued(mark, fill=8)
    rows = cli("status", state_dir=state_dir).stdout
    assert "kept" in rows, rows


def test_a_failed_standby_names_qemus_own_error_line(tree: tuple[Path, Path], state_dir: Path) -> None:
    binary, _lib = tree
    vm = GuestVM("k1", state_dir, state_dir.parent / "k1-w")
    pid, mark = vm.status().pid, vm.mark()
    out = cli("update-all", "--json", state_dir=state_dir)  # onto the path the VM came from: still the bad QEMU
    got = {o["name"]: o for o in json.loads(out.stdout)}["k1"]
    assert out.returncode == 1 and got["outcome"] != "updated", got
    assert "mismatch: pc.bios" in got["detail"] and "error while loading state" in got["detail"], got
    assert "hung up" not in got["detail"].split("(")[0], got
    st = vm.status()
    assert st.state == "running" and st.pid == pid and st.kept_from == str(binary)
    vm.assert_continued(mark, fill=8)


def test_a_state_known_not_to_load_is_reported_and_without_a_kept_build_save_all_reboot_refuses(
    state_dir: Path,
) -> None:
    binary = qemu_copy(state_dir.parent / "pkg2" / "bin")
    with open(binary, "ab") as f:
        f.write(b"k2 build")
    vm = GuestVM.launch("k2", state_dir, ram="file", fill=0, qemu=str(binary), work=state_dir.parent / "k2-w")
    own = vm.status().build
    new = binary.with_name("new")
    small_bios(new)
    os.rename(new, binary)  # the upgrade: a QEMU that cannot load k2's state
    out = cli("update", "k2", "--qemu", str(binary), state_dir=state_dir)
    assert out.returncode == 1 and "mismatch: pc.bios" in out.stderr, out.stderr  # a failed proof, learnt
    st = vm.status()
    assert st.state == "running" and st.loads == "fails" and st.fallback_build == own, st
    assert "mismatch: pc.bios" in st.loads_detail and "update at" in st.loads_detail
    out = cli("check", "k2", "--reboot", "--json", state_dir=state_dir)
    found = {f["code"]: f for f in json.loads(out.stdout)}
    assert found["state-load-fails"]["severity"] == "warning" and own in found["state-load-fails"]["message"]
    # Without a kept build (kept by an older cprctl, or the copy failed) no QEMU after a reboot loads it.
    shutil.rmtree(state_dir / "builds" / str(own))
    out = cli("check", "k2", "--reboot", "--json", state_dir=state_dir)
    found = {f["code"]: f for f in json.loads(out.stdout)}
    assert out.returncode == 1 and found["state-load-fails"]["severity"] == "error", out.stdout
    assert "would stay down" in found["state-load-fails"]["message"]
    pids = {s.name: s.pid for s in cprctl.status(state_dir=state_dir)}
    out = cli("save-all", "--reboot", state_dir=state_dir)
    assert out.returncode != 0 and "would stay down" in out.stderr, out.stderr
    after = cprctl.status(state_dir=state_dir)
    assert all(s.state == "running" and s.pid == pids[s.name] for s in after), after  # nothing touched
    cprctl.stop("k2", state_dir=state_dir)
    cprctl.remove("k2", state_dir=state_dir)


def test_a_trial_load_proves_or_disproves_a_saved_state_and_the_guest_never_runs_there(state_dir: Path) -> None:
    vm = GuestVM.launch("k3", state_dir, ram="file", fill=0, work=state_dir.parent / "k3-w")
    assert cli("save", "k3", state_dir=state_dir).returncode == 0
    mark = vm.mark()
    bad = small_bios(state_dir.parent / "bad" / "qemu-system-x86_64")
    other = qemu_copy(state_dir.parent / "other")
    with open(other, "ab") as f:
        f.write(b"another build that loads it")
    out = cli("check", "k3", "--trial", "--qemu", str(bad), "--json", state_dir=state_dir)
    found = {f["code"]: f for f in json.loads(out.stdout)}
    assert found["state-load-fails"]["severity"] == "warning", out.stdout  # the kept build takes it instead
    assert "mismatch: pc.bios" in found["state-load-fails"]["message"] and "trial at" in out.stdout
    out = cli("check", "k3", "--trial", "--qemu", str(other), "--json", state_dir=state_dir)
    found = {f["code"]: f for f in json.loads(out.stdout)}
    assert out.returncode == 0 and "proven to load" in found["state-loads"]["message"], out.stdout
    assert vm.status().state == "saved" and vm.mark() == mark, "the guest ran during a trial"
    assert cli("restore", "k3", state_dir=state_dir).returncode == 0
    vm.assert_continued(mark, fill=0)
    # save-all --trial: every checkpoint tried on the binary its restore will use (k1: its kept build).
    k1 = GuestVM("k1", state_dir, state_dir.parent / "k1-w")
    marks = {v.name: v.mark() for v in (vm, k1)}
    out = cli("save-all", "--trial", "--json", state_dir=state_dir)
    got = {o["name"]: o for o in json.loads(out.stdout)}
    assert out.returncode == 0 and all("loads into" in got[n]["detail"] for n in marks), got
    assert cli("restore-all", state_dir=state_dir).returncode == 0
    for v in (vm, k1):
        v.assert_continued(marks[v.name], fill=8 if v is k1 else 0)
    cprctl.stop("k3", state_dir=state_dir)
    cprctl.remove("k3", state_dir=state_dir)


def test_a_build_not_kept_at_launch_is_kept_from_proc_before_the_save(state_dir: Path) -> None:
    binary = qemu_copy(state_dir.parent / "pkg4" / "bin")
    with open(binary, "ab") as f:
        f.write(b"k4 build")
    vm = GuestVM.launch("k4", state_dir, ram="file", fill=0, qemu=str(binary), work=state_dir.parent / "k4-w")
    own = vm.status().build
    # As if an older cprctl had launched it: no build kept, none recorded.
    shutil.rmtree(state_dir / "builds" / str(own))
    path = state_dir / "vms" / "k4" / "vm.json"
    rec = record.load(path)
    rec.build = None
    record.save(path, rec)
    binary.unlink()  # the package removed, the running QEMU maps a deleted executable
    small_bios(binary)
    mark = vm.mark()
    assert cli("save", "k4", state_dir=state_dir).returncode == 0
    st = vm.status()
    assert st.checkpoint_build == own and (state_dir / "builds" / own / "bin" / "qemu-system-x86_64").exists()
    meta = kept.Builds(state_dir).meta(own)
    assert meta is not None and meta.late  # taken from /proc/PID/exe and /proc/PID/map_files
    out = cli("restore", "k4", "--json", state_dir=state_dir)
    assert out.returncode == 0 and json.loads(out.stdout)["fallback"], out.stderr
    vm.assert_continued(mark, fill=0)
    cprctl.stop("k4", state_dir=state_dir)
    cprctl.remove("k4", state_dir=state_dir)


def test_once_a_fixed_qemu_is_installed_update_all_moves_the_vm_off_the_kept_build(
    tree: tuple[Path, Path], state_dir: Path
) -> None:
    binary, _lib = tree
    vm = GuestVM("k1", state_dir, state_dir.parent / "k1-w")
    old_build, mark = vm.status().build, vm.mark()
    binary.unlink()
    qemu_copy(binary.parent)  # the fixed package
    out = cli("update-all", "--json", state_dir=state_dir)
    got = {o["name"]: o for o in json.loads(out.stdout)}["k1"]
    assert out.returncode == 0 and got["outcome"] == "updated" and got["warm"], got
    st = vm.status()
    assert st.argv[0] == str(binary) and st.kept_from is None and not st.binary_replaced
    assert st.build and st.build != old_build  # the system QEMU's build, not the private tree's
    vm.assert_continued(mark, fill=8)
    # No VM or checkpoint refers to the private tree's build any more: it is collected; the running one stays.
    assert old_build in kept.Builds(state_dir).ids()
    assert kept.collect(state_dir, grace=3600) == []  # just used: spared for a while
    assert old_build in kept.collect(state_dir, grace=0)  # with those of VMs removed above
    assert kept.Builds(state_dir).ids() == [st.build]
    cprctl.stop("k1", state_dir=state_dir)
    cprctl.remove("k1", state_dir=state_dir)


def test_a_restore_goes_straight_to_the_kept_build_when_the_disk_qemu_is_known_not_to_load(state_dir: Path) -> None:
    binary = qemu_copy(state_dir.parent / "pkg9" / "bin")
    with open(binary, "ab") as f:
        f.write(b"k9 build")
    vm = GuestVM.launch("k9", state_dir, ram="file", fill=8, qemu=str(binary), work=state_dir.parent / "k9-w")
    new = binary.with_name("new")
    small_bios(new)
    os.rename(new, binary)  # the upgrade: a QEMU that cannot load k9's state
    assert cli("update", "k9", "--qemu", str(binary), state_dir=state_dir).returncode == 1  # learnt: it fails
    assert vm.status().loads == "fails"
    mark = vm.mark()
    assert cli("save", "k9", state_dir=state_dir).returncode == 0
    log = state_dir / "vms" / "k9" / "qemu.log"
    runs = log.read_text().count("--- cprctl")
    out = cli("restore", "k9", "--json", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert "known not to load its state" in res["fallback"] and "mismatch: pc.bios" in res["fallback"], res
    # One QEMU started, the kept build's: none only to fail as it is known to (at boot, each costs time).
    starts = [line for line in log.read_text().splitlines() if line.startswith("--- cprctl")]
    assert len(starts) == runs + 1 and f"{state_dir}/builds/" in starts[-1], starts[runs:]
    vm.assert_continued(mark, fill=8)
    cprctl.stop("k9", state_dir=state_dir)
    cprctl.remove("k9", state_dir=state_dir)
