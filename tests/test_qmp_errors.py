"""How qemu.qmp's failures of a QMP command become cprctl's `QemuError` (pure; no QEMU)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from cprctl._qemu.qmp import Monitor, command_error
from cprctl.errors import QemuError


def _refusal() -> ExecuteError:
    sent = Message({"execute": "device_del", "arguments": {"id": "nic9"}, "id": "__qmp#00001"})
    raw = {"error": {"class": "DeviceNotFound", "desc": "Device 'nic9' not found"}, "id": "__qmp#00001"}
    return ExecuteError(ErrorResponse(raw), sent, Message(raw))


@pytest.mark.parametrize(
    ("exc", "message", "error_class"),
    [
        (_refusal(), "vm1: device_del: Device 'nic9' not found", "DeviceNotFound"),
        (ExecInterruptedError("gone"), "vm1: device_del: QEMU hung up (ExecInterruptedError)", None),
        (EOFError(), "vm1: device_del: QEMU hung up (EOFError)", None),
        (ConnectionResetError(), "vm1: device_del: QEMU hung up (ConnectionResetError)", None),
        (TimeoutError(), "vm1: device_del: no answer in 7 s", None),
        (QMPError("odd reply"), "vm1: device_del: odd reply", None),
    ],
)
def test_each_failure_maps_to_one_line_keeping_qmp_error_class(
    exc: BaseException, message: str, error_class: str | None
) -> None:
    err = command_error("vm1", "device_del", exc, 7.0)
    assert type(err) is QemuError
    assert str(err) == message and "\n" not in str(err)
    assert err.error_class == error_class


class _Client:
    """Stands in for qemu.qmp's client: fails each command with *exc*, or answers after *delay* s."""

    def __init__(self, exc: BaseException | None, delay: float = 0.0) -> None:
        self.exc, self.delay = exc, delay

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        await asyncio.sleep(self.delay)
        if self.exc is not None:
            raise self.exc
        return {}


@pytest.mark.parametrize("exc", [_refusal(), EOFError(), QMPError("odd reply")])
def test_execute_raises_the_mapped_error_chained_from_qemu_qmps(exc: BaseException) -> None:
    mon = Monitor("/nonexistent/qmp.sock", "vm1")
    mon._qmp = _Client(exc)  # type: ignore[assignment]
    with pytest.raises(QemuError) as info:
        asyncio.run(mon.execute("device_del", {"id": "nic9"}))
    assert str(info.value) == str(command_error("vm1", "device_del", exc, 60.0))
    assert info.value.__cause__ is exc


def test_execute_that_gets_no_answer_in_time() -> None:
    mon = Monitor("/nonexistent/qmp.sock", "vm1")
    mon._qmp = _Client(None, delay=30.0)  # type: ignore[assignment]
    with pytest.raises(QemuError, match=r"^vm1: query-status: no answer in 0 s$") as info:
        asyncio.run(mon.execute("query-status", timeout=0.05))
    assert info.value.error_class is None
