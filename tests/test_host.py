"""The host layer's pure parts: sd_notify, the notifying reporter, cgroup parsing, unit refusals.

The real thing (scopes, ordering, shutdown and boot) is in test_systemd_host.py, under a real systemd.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cprctl import _units
from cprctl._host import systemd
from cprctl._store import StateDir
from cprctl.errors import UsageError


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    return sock


def test_notify_sends_a_datagram(notify_socket: socket.socket) -> None:
    assert systemd.under_unit()
    assert systemd.notify("STATUS=hello\nEXTEND_TIMEOUT_USEC=5")
    assert notify_socket.recv(4096) == b"STATUS=hello\nEXTEND_TIMEOUT_USEC=5"


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("STATUS=x")


def test_notifier_extends_on_steps_and_progress_only(notify_socket: socket.socket) -> None:
    rep = systemd.Notifier(extend=60, limit=3600)
    rep.step("web1: saving")
    assert notify_socket.recv(4096) == b"STATUS=web1: saving\nEXTEND_TIMEOUT_USEC=60000000"
    rep._last = 0.0  # as if 5 s had passed
    rep.progress(10 << 20, 100 << 20)
    assert notify_socket.recv(4096).startswith(b"STATUS=saving: 10 of 100 MiB\nEXTEND_TIMEOUT_USEC=")
    rep._last = 0.0
    rep.progress(10 << 20, 100 << 20)  # no progress: no extension
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)


def test_notifier_never_extends_past_its_limit(notify_socket: socket.socket) -> None:
    rep = systemd.Notifier(extend=60, limit=0)
    rep.step("still saving")
    assert notify_socket.recv(4096) == b"STATUS=still saving"


def test_unit_of_reads_the_unified_or_systemd_hierarchy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemd, "BOOTED", tmp_path)  # as if systemd ran
    fake = tmp_path / "cgroup"
    real_path = Path

    class FakePath(type(Path())):  # type: ignore[misc]
        def __new__(cls, p: str) -> Path:
            return real_path(fake) if p.startswith("/proc/") else real_path(p)

    monkeypatch.setattr(systemd, "Path", FakePath)
    fake.write_text("0::/machine.slice/cprctl-web1.scope\n")
    assert systemd.unit_of(1) == "cprctl-web1.scope"
    fake.write_text("9:name=systemd:/user.slice/user-0.slice/session-3.scope\n0::/\n")
    assert systemd.unit_of(1) == "session-3.scope"
    fake.write_text("0::/\n")
    assert systemd.unit_of(1) is None


def test_no_scope_without_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(systemd, "BOOTED", tmp_path / "missing")
    assert systemd.scope_command("web1") == []
    assert systemd.attach(os.getpid(), "web1") is None
    assert systemd.unit_of(os.getpid()) is None


def test_scope_command_orders_the_scope_before_the_guests_unit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(systemd, "BOOTED", tmp_path)
    monkeypatch.setattr(systemd, "_free", lambda unit: unit != "cprctl-web1.scope")  # an old QEMU holds it
    monkeypatch.setattr(systemd.os, "geteuid", lambda: 0)
    cmd = systemd.scope_command("web1")
    assert cmd[:2] == ["systemd-run", "--scope"] and cmd[-1] == "--"
    assert "--unit=cprctl-web1-2.scope" in cmd
    assert "--slice=machine.slice" in cmd and "--property=Before=cprctl-guests.service" in cmd


def test_user_unit_text(tmp_path: Path) -> None:
    text = _units.unit_text(StateDir(tmp_path / "state"), exe="/usr/bin/cprctl", user=True)
    assert "WantedBy=default.target" in text and "network-online" not in text
    assert "NotifyAccess=all" in text and "infinity" not in text


def test_install_units_refusals_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_units.os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match=r"needs root .* install-units --user"):
        _units.install(StateDir(tmp_path / "state"))
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(UsageError, match="cannot write"):
        _units.install(StateDir(tmp_path / "state"), dest=blocked / "sub", user=True)
