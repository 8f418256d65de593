"""Bad input and unusable QEMUs: one clear line on stderr, a non-zero exit, nothing changed."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from .guestvm import QEMU, GuestVM, cli


def one_line_error(out: object, *words: str) -> None:
    lines = out.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert out.returncode != 0, out  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("cprctl: error: "), out.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in out.stderr  # type: ignore[attr-defined]
    for w in words:
        assert w in lines[0], lines[0]


def test_unknown_vm(tmp_path: Path) -> None:
    for cmd in ("save", "restore", "status", "check", "stop"):
        one_line_error(cli(cmd, "nosuch", state_dir=tmp_path), "no VM named 'nosuch'")


@pytest.mark.parametrize("name", ["../x", "a/b", "x" * 300, ".."])
def test_bad_names(tmp_path: Path, name: str) -> None:
    out = cli("launch", name, "--", QEMU, "-m", "64M", state_dir=tmp_path)
    one_line_error(out, "invalid VM name")
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_empty_name(tmp_path: Path) -> None:
    one_line_error(cli("save", "", state_dir=tmp_path), "invalid VM name: empty")


def test_old_qemu_refused(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = cli("launch", "old", "--", str(fake), "-m", "64M", state_dir=tmp_path / "state")
    one_line_error(out, "QEMU 7.2.0", ">= 9.0")


def test_missing_binary(tmp_path: Path) -> None:
    one_line_error(cli("launch", "x", "--", "/nonexistent/qemu", state_dir=tmp_path), "not found")


def test_qmp_not_answering(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(5)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    out = cli("adopt", "silent", "--qmp", str(path), state_dir=tmp_path / "state")
    one_line_error(out, "QMP", "not answering")
    server.close()


def test_qemu_that_dies_at_start_shows_its_log(tmp_path: Path) -> None:
    out = cli("launch", "bad", "--", QEMU, "-machine", "q35", "-no-such-option", state_dir=tmp_path / "state")
    one_line_error(out, "exited", "no-such-option")
    assert not (tmp_path / "state" / "vms" / "bad").exists(), "a VM that never ran leaves nothing behind"


@pytest.mark.qemu
def test_running_vm_cannot_be_restored_and_stopped_cannot_be_saved(state_dir: Path) -> None:
    vm = GuestVM.launch("st", state_dir, fill=0, extra=("-daemonize",))
    assert "-daemonize" not in vm.status().argv, "cprctl detaches QEMU itself and must keep its pid"
    one_line_error(cli("restore", "st", state_dir=state_dir), "no checkpoint", "running")
    one_line_error(cli("launch", "st", "--", QEMU, state_dir=state_dir), "already exists")
    assert cli("stop", "st", state_dir=state_dir).returncode == 0
    one_line_error(cli("save", "st", state_dir=state_dir), "not running")
    assert vm.status().state == "stopped"
    assert cli("start", "st", state_dir=state_dir).returncode == 0  # a cold boot from the recorded argv
    vm.wait_for(r"tick .* n=1 ", after=vm.text().rfind("tick") + 1)
    assert vm.status().state == "running"
    ping = cli("ping", "st", state_dir=state_dir)
    assert ping.returncode == 0 and "answered" in ping.stdout, ping.stderr
    one_line_error(cli("start", "st", state_dir=state_dir), "running, not stopped")
    assert cli("stop", "st", state_dir=state_dir).returncode == 0
    assert cli("remove", "st", state_dir=state_dir).returncode == 0
    one_line_error(cli("status", "st", state_dir=state_dir), "no VM named")


def test_malformed_record(tmp_path: Path) -> None:
    folder = tmp_path / "vms" / "broken"
    folder.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path, 0o700)
    os.chmod(tmp_path / "vms", 0o700)
    (folder / "vm.json").write_text('{"version": 1, "name": ')
    for cmd in ("status", "save", "restore"):
        one_line_error(cli(cmd, "broken", state_dir=tmp_path), "malformed record")
    (folder / "vm.json").write_text('{"version": 7}')
    one_line_error(cli("status", state_dir=tmp_path), "version 7 is not understood")
