"""The QEMU guest agent (qemu-ga), spoken to over its host-side socket with ``qemu.qmp``."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ..errors import AgentError


class _AgentClient(QMPClient):
    """qemu.qmp's client with command ids unique to this connection.

    The agent answers guest-suspend-ram only after the guest wakes, possibly
    on a later connection; with the default ids (restarting at 0 on each
    client) that stale answer would be taken as the reply to our first command.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._prefix = f"cprctl-{os.urandom(4).hex()}"
        self._seq = 0
        self.await_greeting = False
        self.negotiate = False

    def _get_exec_id(self) -> str:
        self._seq += 1
        return f"{self._prefix}-{self._seq}"


class Agent:
    """One connection to a guest agent. Use as ``async with Agent(path, name) as ga:``.

    qemu-ga sends no greeting and does no negotiation; a fresh connection is
    synchronised with ``guest-sync`` so a stale reply can never be mistaken
    for the answer to our command.

    :raise AgentError: from any method, when the agent does not answer in time or refuses.
    """

    def __init__(self, path: str, name: str, timeout: float = 5.0) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self._client = _AgentClient(f"{name}-qga")

    async def __aenter__(self) -> Agent:
        try:
            async with asyncio.timeout(self.timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                await self._client.connect(self.path)
        except (QMPError, OSError, TimeoutError) as exc:
            raise AgentError(f"{self.name}: guest agent socket {self.path}: cannot connect ({exc})") from exc
        await self.sync()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(EOFError, OSError, QMPError):
            await self._client.disconnect()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await self._client.execute(cmd, args)
        except TimeoutError:
            raise AgentError(
                f"{self.name}: guest agent did not answer {cmd} in {timeout or self.timeout:.0f} s"
            ) from None
        except ExecuteError as exc:
            raise AgentError(f"{self.name}: guest agent refused {cmd}: {exc}") from exc
        except (QMPError, EOFError, OSError) as exc:
            raise AgentError(f"{self.name}: guest agent connection broke during {cmd}: {exc}") from exc

    async def sync(self) -> None:
        token = int.from_bytes(os.urandom(4)) % (2**31 - 1) + 1
        if await self.execute("guest-sync", {"id": token}) != token:
            raise AgentError(f"{self.name}: guest agent answered guest-sync with a stale reply")

    async def commands(self) -> set[str]:
        """The enabled commands the agent offers."""
        info = await self.execute("guest-info")
        return {c["name"] for c in info.get("supported_commands", []) if c.get("enabled", True)}

    async def suspend_ram(self) -> None:
        """Ask the guest to suspend to RAM. Success has no reply: poll QMP's runstate for ``suspended``."""
        try:
            async with asyncio.timeout(0.5):
                await self._client.execute("guest-suspend-ram")
        except TimeoutError:
            return  # expected: the guest went to sleep before answering
        except ExecuteError as exc:
            raise AgentError(f"{self.name}: guest agent refused guest-suspend-ram: {exc}") from exc
        except (QMPError, EOFError, OSError):
            return

    async def shutdown(self) -> None:
        """Ask the guest to power itself off. Success has no reply: wait for QEMU to exit.

        :raise AgentError: when the agent refuses (e.g. the guest has no shutdown command).
        """
        try:
            async with asyncio.timeout(2.0):
                await self._client.execute("guest-shutdown", {"mode": "powerdown"})
        except TimeoutError:
            return
        except ExecuteError as exc:
            raise AgentError(f"{self.name}: guest agent refused guest-shutdown: {exc}") from exc
        except (QMPError, EOFError, OSError):
            return

    async def set_time(self, ns: int) -> None:
        """Set the guest clock to *ns* nanoseconds since the epoch (``guest-set-time``)."""
        await self.execute("guest-set-time", {"time": ns}, timeout=10)
