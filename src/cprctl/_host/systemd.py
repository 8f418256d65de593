"""systemd as the host's init: a scope per VM, the unit a process lives in, and sd_notify.

Every QEMU cprctl starts runs in a transient scope ``cprctl-NAME.scope`` in
``machine.slice`` (``systemd-run --scope`` registers the scope, then execs
QEMU, so the pid cprctl records is QEMU's). The scope is ordered
``Before=cprctl-guests.service``: at shutdown systemd stops units in the
reverse order, so the scope is stopped only once that unit's ``save-all`` has
finished. As root the scope goes to the system manager, else to the user's
manager (``systemd-run --user``).

Nothing here does anything when the host's init is not systemd
(``/run/systemd/system`` missing) or ``CPRCTL_NO_SCOPE=1`` is set.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

GUESTS_UNIT = "cprctl-guests.service"
SLICE = "machine.slice"
BOOTED = Path("/run/systemd/system")


def booted() -> bool:
    """Whether the host's init is systemd."""
    return BOOTED.is_dir()


def user_manager() -> bool:
    """Whether cprctl talks to the user's manager (not root) rather than the system one."""
    return os.geteuid() != 0


def _manager_flag() -> list[str]:
    return ["--user"] if user_manager() else []


def scopes_enabled() -> bool:
    """Whether VMs go into scopes: systemd runs, its manager for this user is reachable, not disabled."""
    if os.environ.get("CPRCTL_NO_SCOPE") == "1" or not booted():
        return False
    if not user_manager():
        return True
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return runtime is not None and Path(runtime, "systemd", "private").exists()


def scope_name(vm: str, n: int = 1) -> str:
    return f"cprctl-{vm}.scope" if n == 1 else f"cprctl-{vm}-{n}.scope"


def _systemctl(*args: str) -> str:
    try:
        done = subprocess.run(
            ["systemctl", *_manager_flag(), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def _transient_dir() -> Path:
    if user_manager():
        return Path(os.environ.get("XDG_RUNTIME_DIR", "/nonexistent"), "systemd", "transient")
    return Path("/run/systemd/transient")


def _free(unit: str) -> bool:
    """Whether no transient unit *unit* is loaded (its file lives while it is: a stat, not a
    ``systemctl`` round trip, which would add ~35 ms to a restore's pause)."""
    return not (_transient_dir() / unit).exists()


def free_scope(vm: str) -> str:
    """A scope name for a new QEMU of *vm*: ``cprctl-VM.scope``, or ``cprctl-VM-N.scope`` while an
    older QEMU of the VM (a warm update's) still holds it."""
    n = 1
    while not _free(scope_name(vm, n)):
        n += 1
    return scope_name(vm, n)


def scope_command(vm: str) -> list[str]:
    """The ``systemd-run`` prefix that runs a QEMU of VM *vm* in a scope of its own; ``[]`` without systemd."""
    if not scopes_enabled():
        return []
    return [
        "systemd-run",
        *_manager_flag(),
        "--scope",
        "--quiet",
        "--collect",
        f"--unit={free_scope(vm)}",
        f"--slice={SLICE}",
        f"--description=cprctl VM {vm} (QEMU)",
        # Stopped at shutdown only after cprctl-guests.service has saved it (stop order is reversed).
        f"--property=Before={GUESTS_UNIT}",
        "--",
    ]


def unit_of(pid: int | None) -> str | None:
    """The systemd unit (scope or service) process *pid* lives in, from ``/proc/PID/cgroup``;
    None without systemd or when the process is gone."""
    if not pid or not booted():
        return None
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    # The unified hierarchy (cgroup v2 or hybrid), else systemd's own v1 hierarchy.
    for line in sorted(text.splitlines(), key=lambda line: not line.startswith("0::")):
        if line.startswith("0::") or ":name=systemd:" in line:
            units = [p for p in line.split(":", 2)[2].split("/") if re.search(r"\.(scope|service)$", p)]
            if units:
                return units[-1]
    return None


def waits_for_save(unit: str) -> bool:
    """Whether *unit* is stopped at shutdown only after ``cprctl-guests.service`` (ordered Before= it)."""
    return GUESTS_UNIT in _systemctl("show", "-p", "Before", "--value", unit).split()


def unit_state(unit: str) -> tuple[bool, bool]:
    """``(installed, enabled)`` of *unit* in this user's manager."""
    load = _systemctl("show", "-p", "LoadState", "--value", unit)
    return load == "loaded", _systemctl("is-enabled", unit) in ("enabled", "enabled-runtime")


def unit_active(unit: str) -> bool:
    """Whether *unit* is active: a oneshot's ``ExecStop`` (the save at shutdown) runs only then."""
    return _systemctl("show", "-p", "ActiveState", "--value", unit) == "active"


def power(action: str) -> None:
    """Hand the host over to systemd: ``systemctl reboot`` or ``systemctl kexec`` (of the system manager,
    whoever asks); returns once systemd has queued the job.

    :raise OSError: with systemctl's last line when it refuses.
    """
    try:
        done = subprocess.run(["systemctl", action], capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"systemctl {action} did not return: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[-1]
        raise OSError(f"systemctl {action} failed: {why}")


def attach(pid: int, vm: str, timeout: float = 10.0) -> str | None:
    """Move running process *pid* into a new scope of VM *vm* (systemd's StartTransientUnit with
    ``PIDs``); the scope's name, or None when that is not possible (no systemd, no manager, refused,
    or *pid* is the main process of a service, which would still stop it at shutdown)."""
    if not scopes_enabled():
        return None
    old = unit_of(pid)
    if old and old.endswith(".service") and _systemctl("show", "-p", "MainPID", "--value", old) == str(pid):
        return None  # its service tracks it as its main process and would still stop it at shutdown
    unit = free_scope(vm)
    cmd = [
        "busctl",
        *_manager_flag(),
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        unit,
        "fail",
        "5",
        "PIDs", "au", "1", str(pid),
        "Slice", "s", SLICE,
        "Description", "s", f"cprctl VM {vm} (QEMU, adopted)",
        "CollectMode", "s", "inactive-or-failed",
        "Before", "as", "1", GUESTS_UNIT,
        "0",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if unit_of(pid) == unit:
            return unit
        time.sleep(0.05)
    return None


def notify(message: str) -> bool:
    """Send *message* (``KEY=VALUE`` lines) to the manager that runs us (``$NOTIFY_SOCKET``); whether sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError:
        return False
    return True


class Notifier:
    """A `Reporter` for cprctl run by a unit: each step is a line on stdout (the journal) and the
    unit's ``STATUS=``; steps and progress extend the unit's start or stop timeout by *extend*
    seconds (``EXTEND_TIMEOUT_USEC``), but never past *limit* seconds after the start, so a
    wedged save cannot hold the host's shutdown forever."""

    def __init__(self, extend: float = 120.0, limit: float = 4 * 3600.0) -> None:
        self.extend = extend
        self._deadline = time.monotonic() + limit
        self._last = 0.0
        self._done: dict[str, int] = {}

    def step(self, message: str) -> None:
        print(message, flush=True)
        self._send(message)

    def progress(self, done: int, total: int, what: str = "saving") -> None:
        now = time.monotonic()
        if done <= self._done.get(what, -1) or now - self._last < 5.0:
            return  # only progress keeps the timeout alive; and not more than every 5 s
        self._done[what] = done
        self._send(f"{what}: {done >> 20} of {total >> 20} MiB" if total else f"{what}: {done >> 20} MiB")

    def _send(self, status: str) -> None:
        self._last = now = time.monotonic()
        extend = min(self.extend, self._deadline - now)
        line = f"STATUS={status.splitlines()[0][:200] if status else ''}"
        notify(f"{line}\nEXTEND_TIMEOUT_USEC={int(extend * 1e6)}" if extend > 0 else line)

    def status(self, summary: str) -> None:
        """The unit's final ``STATUS=`` (shown by ``systemctl status``)."""
        print(summary, flush=True)
        notify(f"STATUS={summary}")


def under_unit() -> bool:
    """Whether cprctl runs under a unit that listens to sd_notify (``$NOTIFY_SOCKET`` set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))
