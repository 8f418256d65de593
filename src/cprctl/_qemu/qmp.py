"""QMP: the control channel of one QEMU process, over QEMU's own ``qemu.qmp`` client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from ..errors import MigrationError, QemuError
from . import process

#: Runstates in which a guest counts as paused by a migration.
PAUSED_BY_MIGRATION = frozenset({"postmigrate", "finish-migrate", "paused", "inmigrate", "prelaunch"})


#: Seconds `Monitor.wait_migration` polls every 5 ms before it slows to every 50 ms.
FAST_POLL_S = 10.0

#: How each failure of a QMP command reads (after ``NAME: COMMAND: ``), first match first: ``{exc}`` is
#: the failure, ``{kind}`` its type's name, ``{timeout}`` the seconds waited.
FAILURES: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((ExecuteError,), "{exc}"),  # QEMU refused it: its own message
    ((ExecInterruptedError, EOFError, ConnectionError), "QEMU hung up ({kind})"),
    ((TimeoutError,), "no answer in {timeout:.0f} s"),
    ((QMPError,), "{exc}"),
)
_FAILURE_TYPES = tuple(t for types, _ in FAILURES for t in types)


def command_error(name: str, cmd: str, exc: BaseException, timeout: float) -> QemuError:
    """The one-line `QemuError` for failure *exc* of QMP command *cmd* of VM *name* (see `FAILURES`).

    It keeps QMP's error class when QEMU refused the command; the caller chains *exc* as its cause.
    """
    text = next((text for types, text in FAILURES if isinstance(exc, types)), "{exc}")
    error_class = exc.error_class if isinstance(exc, ExecuteError) else None
    message = text.format(exc=exc, kind=type(exc).__name__, timeout=timeout)
    return QemuError(f"{name}: {cmd}: {message}", error_class=error_class)


#: Seconds to wait for a running QEMU's QMP greeting.
CONNECT_TIMEOUT = 30.0
#: Seconds a QEMU just started (launched, booted afresh, restored) may take to open its QMP socket; given up at
#: once if it exits. At boot on a busy host (the host VM tests) QEMU took over 30 s, and a VM given up on then
#: is killed: a cold boot or restore at boot would fail for a QEMU that was only slow.
START_TIMEOUT = 180.0


class Monitor:
    """One QMP connection. Use as ``async with Monitor(path, name) as mon:``.

    Every method raises `QemuError` when QEMU refuses a command, stops
    answering, or goes away; the message names the VM and the command.
    """

    def __init__(self, path: str, name: str, pid: int | None = None, timeout: float | None = None) -> None:
        self.path = path
        self.name = name
        self.pid = pid
        self.timeout = CONNECT_TIMEOUT if timeout is None else timeout
        self._qmp = QMPClient(name)

    async def __aenter__(self) -> Monitor:
        await self.connect(self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 30.0) -> None:
        """Connect, retrying until QEMU listens; give up at once if its process died.

        :raise QemuError: after *timeout* seconds, or when the process is gone.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await self._qmp.connect(self.path)
                return
            except TimeoutError:
                raise QemuError(
                    f"{self.name}: QMP at {self.path} is not answering (no greeting in {timeout:.0f} s)"
                ) from None
            except ConnectError as exc:  # exc.exc: the socket's own error
                if self.pid is not None and not process.alive(self.pid):
                    raise QemuError(f"{self.name}: QEMU (pid {self.pid}) exited") from exc
                if time.monotonic() > deadline:
                    raise QemuError(f"{self.name}: QMP at {self.path} is not answering: {exc}") from exc
                await asyncio.sleep(0.002)

    async def close(self) -> None:
        """Disconnect; a QEMU that already hung up (after ``quit``) is not an error."""
        with contextlib.suppress(EOFError, OSError, QMPError):
            await self._qmp.disconnect()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        """Run one QMP command; its return value.

        :raise QemuError: when QEMU refuses it (with QEMU's message and `QemuError.error_class`),
            hangs up, or does not answer in time; chained from qemu.qmp's error.
        """
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                return await self._qmp.execute(cmd, args)
        except _FAILURE_TYPES as exc:
            raise command_error(self.name, cmd, exc, timeout) from exc

    async def status(self) -> str:
        """The VM's runstate (``running``, ``paused``, ``suspended``, ``postmigrate``, ...)."""
        return str((await self.execute("query-status"))["status"])

    async def version(self) -> tuple[int, int, int]:
        q = (await self.execute("query-version"))["qemu"]
        return int(q["major"]), int(q["minor"]), int(q["micro"])

    async def wait_status(self, wanted: set[str], timeout: float, poll: float = 0.005) -> str:
        """Poll until the runstate is one of *wanted*; the runstate.

        :raise QemuError: after *timeout* seconds.
        """
        deadline = time.monotonic() + timeout
        while (status := await self.status()) not in wanted:
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: still {status!r} after {timeout:.0f} s, wanted {sorted(wanted)}")
            await asyncio.sleep(poll)
        return status

    def event_time(self, name: str, after: float = 0.0) -> float | None:
        """Host time (s) of the first event *name* seen on this connection after *after*."""
        for event in self._qmp.events.history:
            if event["event"] == name:
                stamp: dict[str, int] = event["timestamp"]  # type: ignore[assignment]
                when = stamp["seconds"] + stamp["microseconds"] / 1e6
                if when >= after:
                    return float(when)
        return None

    async def set_migration(self, capabilities: dict[str, bool], parameters: dict[str, Any]) -> None:
        if capabilities:
            caps = [{"capability": k, "state": v} for k, v in capabilities.items()]
            await self.execute("migrate-set-capabilities", {"capabilities": caps})
        if parameters:
            await self.execute("migrate-set-parameters", parameters)

    async def wait_migration(
        self, timeout: float, on_progress: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None
    ) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``; its last answer. *on_progress* hears every other
        answer (awaited when it is a coroutine function).

        Polled every 1, 2, 4, then 5 ms (as a script by hand would: the end of a save or of a handover is
        seen within 5 ms), every 50 ms after the first `FAST_POLL_S` seconds.

        :raise MigrationError: when it fails or is cancelled (with QEMU's reason), or times out.
        """
        start = time.monotonic()
        deadline = start + timeout
        poll = 0.001
        while True:
            info: dict[str, Any] = await self.execute("query-migrate")
            state = info.get("status", "none")
            if state == "completed":
                return info
            if state in ("failed", "cancelled", "cancelling"):
                reason = info.get("error-desc", state)
                raise MigrationError(f"{self.name}: migration {state}: {reason}")
            if on_progress is not None and (pending := on_progress(info)) is not None:
                await pending
            if time.monotonic() > deadline:
                raise MigrationError(f"{self.name}: migration still {state!r} after {timeout:.0f} s")
            await asyncio.sleep(poll)
            poll = min(poll * 2, 0.005 if time.monotonic() - start < FAST_POLL_S else 0.05)

    async def give_fd(self, name: str, fd: int) -> None:
        """Pass open file *fd* to QEMU under *name* (``getfd`` over the socket, SCM_RIGHTS).

        :raise QemuError: when QEMU refuses it.
        """
        self._qmp.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def quit(self) -> None:
        """Ask QEMU to exit; it hanging up on us is the expected answer."""
        with contextlib.suppress(QemuError):
            await self.execute("quit", timeout=10)
        await self.close()
