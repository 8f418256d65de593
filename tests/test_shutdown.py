"""A host shutdown: save-all --shutdown-unsaveable saves what it can, powers off the rest, and
restore-all brings both back (restored, and booted afresh). The systemd side is test_systemd_host.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import cprctl
from cprctl._checkpoint import fleet, lifecycle
from cprctl._demo import ticks
from cprctl._store import StateDir

from .guestvm import GuestVM, cli

pytestmark = pytest.mark.qemu


def test_shutdown_saves_what_it_can_and_powers_off_the_rest(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ram = Path("/dev/shm") / f"cprctl-test-{os.getpid()}.ram"  # tmpfs: a reboot erases it
    keep = GuestVM.launch("keep", state_dir, fill=0)
    shm = GuestVM.launch("shm", state_dir, fill=0, ram_path=ram)
    try:
        # Without the shutdown mode one unsaveable VM refuses the fleet, and nothing is touched.
        refused = cli("save-all", "--reboot", state_dir=state_dir)
        assert refused.returncode == 1 and "shm" in refused.stderr + refused.stdout
        assert {s.name: s.state for s in cprctl.status(state_dir=state_dir)} == {"keep": "running", "shm": "running"}

        # This test guest has no shutdown command and no ACPI daemon: the whole fallback chain runs.
        monkeypatch.setattr(lifecycle, "SHUTDOWN_GRACE", 2.0)
        mark = keep.mark()
        out = {o.name: o for o in asyncio.run(fleet.save_all(StateDir(state_dir), shutdown_unsaveable=True))}
        assert out["keep"].outcome == "saved", out
        assert out["shm"].outcome == "shut down" and "did not power off in 2 s" in out["shm"].detail, out
        st = {s.name: s for s in cprctl.status(state_dir=state_dir)}
        assert st["shm"].state == "stopped" and st["shm"].boot_pending
        assert st["keep"].state == "saved"

        back = {o.name: o for o in cprctl.restore_all(state_dir=state_dir)}
        assert back["keep"].outcome == "restored" and back["shm"].outcome == "cold-booted", back
        keep.assert_continued(mark, fill=0)
        shm.wait_for(r"guest ready(?:.*\n)*?.*tick ", after=shm.text().rindex("tick"))  # a tick of the new boot
        assert len({t.boot for t in ticks(shm.console)}) == 2, "shm was not booted afresh"
        assert not cprctl.status("shm", state_dir=state_dir)[0].boot_pending
    finally:
        keep.stop()
        shm.stop()
        ram.unlink(missing_ok=True)
