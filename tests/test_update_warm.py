"""Warm updates of VMs that used to fall back to cold or stop for a full copy (issue 11), on the real QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cprctl

from .guestvm import QEMU, GuestVM, cli

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("ram", ["anon", "memfd"])
def test_ram_not_in_a_shared_file_is_precopied_while_the_guest_runs(state_dir: Path, ram: str) -> None:
    extra: tuple[str, ...] = ()
    if ram == "memfd":
        extra = ("-object", "memory-backend-memfd,id=m0,size=256M,share=on", "-machine", "memory-backend=m0")
    name = f"pre-{ram}"
    vm = GuestVM.launch(name, state_dir, ram="anon", fill=96, extra=extra)
    found = json.loads(cli("check", name, "--json", state_dir=state_dir).stdout)
    warm = [f for f in found if f["code"] == "update-warm"]
    assert warm and "pre-copied" in warm[0]["message"], found
    mark = vm.mark()
    res = cprctl.update(name, QEMU, state_dir=state_dir)
    assert res.warm and res.cold_reason is None, res
    # normal-mode pre-copy ran: dirty-bitmap passes were counted, and the guest paused only at the switch
    assert res.timings_ms["passes"] >= 1 and "precopy" in res.timings_ms
    assert res.pause_ms < res.timings_ms["precopy"]
    vm.assert_continued(mark, fill=96)
    vm.wait_for(r"mem ok 96 MiB pass=\d+", after=vm.mark())  # the pattern re-verifies on the new QEMU again
    # the next update of the same VM works too (the new QEMU's migration settings do not get in the way)
    mark = vm.mark()
    assert cprctl.update(name, QEMU, state_dir=state_dir).warm
    vm.assert_continued(mark, fill=96)
    vm.stop()
