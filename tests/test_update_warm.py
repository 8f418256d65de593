"""Warm updates of VMs that used to fall back to cold or stop for a full copy (issue 11), on the real QEMU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import cprctl
from cprctl._qemu import fds

from .guestvm import QEMU, GuestVM, cli, record_of

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_vnc_display() -> int:
    for display in range(70, 99):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 5900 + display)) != 0:
                return display
    raise AssertionError("no free VNC display")


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b""  # a monitor's greeting; QEMU may first send an event left over from the last client's session
        while len(data) < 12 or (data.startswith(b"{") and b'"QMP"' not in data):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


@pytest.fixture
def tap() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("making a tap device needs root and iproute2")
    name = f"cprtap{os.getpid() % 10000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def _holds_tap(pid: int, name: str) -> bool:
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            if f"iff:\t{name}\n" in info.read_text():
                return True
    return False


def test_tap_vnc_tcp_servers_and_pidfile_go_to_the_new_qemu(state_dir: Path, tmp_path: Path, tap: str) -> None:
    hmp, qmp, display = _free_port(), _free_port(), _free_vnc_display()
    pidfile = tmp_path / "qemu.pid"
    extra = (
        *("-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no"),
        *("-device", "virtio-net-pci,netdev=n0,romfile="),
        *("-vnc", f"127.0.0.1:{display}"),
        *("-chardev", f"socket,id=hmp0,host=127.0.0.1,port={hmp},server=on,wait=off"),
        *("-mon", "chardev=hmp0,mode=readline"),
        *("-qmp", f"tcp:127.0.0.1:{qmp},server=on,wait=off"),
        *("-pidfile", str(pidfile)),
    )
    name = "handover"
    vm = GuestVM.launch(name, state_dir, fill=32, extra=extra)
    old_pid = vm.status().pid
    assert old_pid and _holds_tap(old_pid, tap) and pidfile.read_text().strip() == str(old_pid)
    found = json.loads(cli("check", name, "--json", state_dir=state_dir).stdout)
    assert any(f["code"] == "update-warm" for f in found), found
    mark = vm.mark()
    res = cprctl.update(name, QEMU, state_dir=state_dir)
    assert res.warm, res.cold_reason
    new_pid = res.pid
    vm.assert_continued(mark, fill=32)
    # the new QEMU holds the same tap, serves VNC and the TCP monitors on their ports, and owns the pidfile
    assert _holds_tap(new_pid, tap)
    assert pidfile.read_text().strip() == str(new_pid)
    assert _greeting(5900 + display).startswith(b"RFB ")
    assert b"QEMU" in _greeting(hmp) and b"QMP" in _greeting(qmp)
    for port in (5900 + display, hmp, qmp):
        assert fds.listening_fd(new_pid, port) >= 0
    # the recorded argv keeps the original form: a cold save + restore opens the tap by name again
    assert f"ifname={tap}" in " ".join(vm.status().argv)
    mark = vm.mark()
    cprctl.save(name, state_dir=state_dir)
    restored = cprctl.restore(name, state_dir=state_dir)
    vm.assert_continued(mark, fill=32)
    assert _holds_tap(restored.pid, tap) and _greeting(5900 + display).startswith(b"RFB ")
    vm.stop()


def test_a_resource_that_cannot_be_taken_means_a_cold_update_with_the_reason(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(pid: int, target: int) -> int:
        raise fds.HandoverError(f"cannot take fd {target} of QEMU pid {pid} (pidfd_getfd: Operation not permitted)")

    port = _free_port()
    extra = ("-chardev", f"socket,id=hmp0,host=127.0.0.1,port={port},server=on,wait=off", "-mon", "chardev=hmp0")
    vm = GuestVM.launch("no-perm", state_dir, fill=16, extra=extra)
    monkeypatch.setattr(fds, "getfd", refuse)  # as for a non-root cprctl without ptrace rights over QEMU
    mark = vm.mark()
    res = cprctl.update("no-perm", QEMU, state_dir=state_dir)
    assert not res.warm and res.cold_reason and "pidfd_getfd" in res.cold_reason
    vm.assert_continued(mark, fill=16)
    assert b"QEMU" in _greeting(port)  # the cold restore listens on the port again
    vm.stop()


def test_a_precopy_that_does_not_converge_finishes_with_the_guest_stopped(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cprctl._checkpoint import precopy

    monkeypatch.setattr(precopy, "MAX_PASSES", 0)  # give up converging at once: stop-and-copy
    monkeypatch.setattr(precopy, "TARGET_PAUSE_MS", 1)
    vm = GuestVM.launch("no-conv", state_dir, ram="anon", fill=96)
    mark = vm.mark()
    res = cprctl.update("no-conv", QEMU, state_dir=state_dir)
    assert res.warm and res.timings_ms["stop_and_copy"] == 1.0, res.timings_ms
    vm.assert_continued(mark, fill=96)
    vm.stop()


def test_the_new_qemu_dying_during_precopy_leaves_the_guest_running_on_the_old_one(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cprctl._checkpoint import precopy
    from cprctl._qemu import process
    from cprctl._qemu.qmp import Monitor
    from cprctl.errors import QemuError

    vm = GuestVM.launch("pre-die", state_dir, ram="anon", fill=96)
    old_pid = vm.status().pid
    real_run = precopy.run

    async def kill_new_then_run(old: Monitor, reporter: object, name: str) -> dict[str, float]:
        assert (await old.execute("query-migrate"))["status"] in ("setup", "active")
        op = record_of(state_dir, "pre-die")["operation"]
        assert isinstance(op, dict) and op["new_pid"]
        process.kill(int(op["new_pid"]), timeout=5)  # in the middle of the pre-copy, guest still running
        return await real_run(old, reporter, name)  # type: ignore[arg-type]

    monkeypatch.setattr(precopy, "run", kill_new_then_run)
    mark = vm.mark()
    with pytest.raises(QemuError, match=r"warm update failed.*guest runs on the old QEMU"):
        cprctl.update("pre-die", QEMU, state_dir=state_dir)
    st = vm.status()
    assert st.state == "running" and st.pid == old_pid and st.operation is None
    vm.assert_continued(mark, fill=96)
    vm.stop()
