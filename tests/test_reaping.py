"""Small things of a long-lived caller: exited QEMUs are reaped, and ``status`` in a pipe prints whole values."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import cprctl

from .guestvm import GuestVM, cli

pytestmark = pytest.mark.qemu


def zombie_children() -> set[int]:
    """Pids of this process's children that exited and were not reaped."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.add(int(proc.name))
    return found


def test_no_zombie_qemus_in_a_long_lived_api_caller(state_dir: Path) -> None:
    vm = GuestVM.launch("z1", state_dir, fill=0, agent=False)
    pids: set[int | None] = {vm.status().pid}
    cprctl.save("z1", state_dir=state_dir)  # QEMU quits: this process started it
    pids.add(cprctl.restore("z1", state_dir=state_dir).pid)
    cprctl.stop("z1", state_dir=state_dir)
    assert not zombie_children() & pids, "a QEMU this process started and stopped is a zombie"
    # Started here, stopped by another process: the next call of any kind reaps it.
    pids.add(cprctl.start("z1", state_dir=state_dir).pid)
    out = cli("stop", "z1", state_dir=state_dir)
    assert out.returncode == 0, out.stderr
    # Its main thread exits first: until its other threads have, it cannot be reaped (nor does the call wait).
    deadline = time.monotonic() + 10
    while cprctl.status("z1", state_dir=state_dir)[0].state == "stopped" and zombie_children() & pids:
        assert time.monotonic() < deadline, "a QEMU stopped by another cprctl stays a zombie"
        time.sleep(0.1)


def test_status_in_a_pipe_prints_whole_values(state_dir: Path) -> None:
    deep = state_dir.parent / ("long-" * 4)
    deep.mkdir()
    vm = GuestVM.launch("a-long-vm-name-for-cols", deep / "state", fill=0, agent=False)
    try:
        out = cli("status", state_dir=deep / "state")
        assert out.returncode == 0, out.stderr
        st = vm.status()
        assert "…" not in out.stdout and st.qmp in out.stdout and st.name in out.stdout, out.stdout
        assert max(map(len, out.stdout.splitlines())) > 80
    finally:
        vm.stop()
