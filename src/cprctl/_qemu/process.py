"""QEMU's binary and processes: version, machine aliases, detached start, liveness, exit."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .._host import systemd
from ..errors import QemuError, UsageError

#: The oldest QEMU whose cpr-reboot cprctl trusts (8.2 has it, 9.0 made it reliable).
MIN_VERSION = (9, 0)


@dataclass(frozen=True)
class Binary:
    """A QEMU system emulator binary on this host."""

    path: str

    @classmethod
    def find(cls, name: str) -> Binary:
        """The binary *name* names: a path (made absolute) or a command looked up on ``$PATH``.

        :raise UsageError: when there is no such binary.
        """
        import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

        found = shutil.which(name) if os.sep not in name else name
        if not found:
            raise UsageError(f"QEMU binary not found: {name}")
        return cls(os.path.abspath(found))

    def run(self, *args: str) -> str:
        """The output of the binary run with *args* (``-machine help``...).

        :raise UsageError: it is missing or not executable; `QemuError`: it fails or hangs.
        """
        try:
            done = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError:
            raise UsageError(f"QEMU binary not found: {self.path}") from None
        except PermissionError:
            raise UsageError(f"QEMU binary not executable: {self.path}") from None
        except subprocess.TimeoutExpired:
            raise QemuError(f"{self.path} {' '.join(args)} did not answer in 30 s") from None
        if done.returncode != 0:
            raise QemuError(f"{self.path} {' '.join(args)} failed: {done.stderr.strip()[:200]}")
        return done.stdout

    @cached_property
    def version(self) -> tuple[int, int, int]:
        """``(major, minor, micro)`` from ``--version``.

        :raise UsageError: when the binary is missing; `QemuError` when it does not say.
        """
        text = self.run("--version")
        match = re.search(r"version (\d+)\.(\d+)\.(\d+)", text)
        if not match:
            raise QemuError(f"{self.path} --version does not name a QEMU version")
        major, minor, micro = (int(g) for g in match.groups())
        return major, minor, micro

    def require_cpr(self) -> None:
        """:raise QemuError: when this QEMU is older than `MIN_VERSION`."""
        if self.version[:2] < MIN_VERSION:
            have = ".".join(map(str, self.version))
            raise QemuError(f"{self.path} is QEMU {have}; cpr-reboot needs QEMU >= {MIN_VERSION[0]}.{MIN_VERSION[1]}")

    def resolve_machine(self, requested: str | None) -> str:
        """The versioned machine type *requested* (an alias, or None for the default) stands for."""
        aliases: dict[str, str] = {}
        default = None
        for line in self.run("-machine", "help").splitlines()[1:]:
            name = line.split(" ", 1)[0]
            alias = re.search(r"\(alias of ([^)]+)\)", line)
            if alias:
                aliases[name] = alias.group(1)
            if "(default)" in line:
                default = name
        if requested is None:
            if default is None:
                raise UsageError(f"{self.path} has no default machine type; pass -machine TYPE")
            return aliases.get(default, default)
        return aliases.get(requested, requested)


def spawn(
    argv: Sequence[str], log: Path, cwd: str = "/", scope: str | None = None, pass_fds: Sequence[int] = ()
) -> int:
    """Start *argv* detached (own session, stdin closed, output appended to *log*); its pid.

    Never through a shell. With *scope* (a VM's name) and systemd as the host's init, the process
    runs in a systemd scope of its own (see `cprctl._host.systemd`); the pid is still *argv*'s.
    *pass_fds* stay open in it, at the same numbers.

    :raise UsageError: when the binary does not exist or cannot run.
    """
    reap()
    with open(log, "ab", buffering=0) as out:
        os.chmod(log, 0o600)
        out.write(f"--- cprctl {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n".encode())
        prefix = systemd.scope_command(scope) if scope else []
        try:
            proc = subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                cwd=cwd,
            )
        except OSError as exc:
            raise UsageError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    _children[proc.pid] = proc
    if prefix:
        _wait_exec(proc, argv[0])
    return proc.pid


def _wait_exec(proc: subprocess.Popen[bytes], binary: str, timeout: float = 60.0) -> None:
    """Wait until the scope's ``systemd-run`` has exec'd *binary* (or failed, saying why in the log)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(QemuError):
            if cmdline(proc.pid)[:1] == [binary]:
                return
        time.sleep(0.002)


#: Processes this cprctl started and has not reaped yet: QEMUs (a long-lived process using the API starts
#: many) and the scope's ``systemd-run`` that execs one. No SIGCHLD handler (the caller's to own): every
#: `spawn`, `alive`, `wait_gone` and `kill` reaps those that exited (`reap`), whoever stopped them.
_children: dict[int, subprocess.Popen[bytes]] = {}


def reap() -> list[int]:
    """Collect every child this process started that has exited, without waiting; their pids."""
    gone = [pid for pid, child in list(_children.items()) if child.poll() is not None]
    for pid in gone:
        _children.pop(pid, None)
    return gone


def alive(pid: int | None) -> bool:
    """Whether *pid* runs (a zombie counts as gone: here PID 1 may never reap it)."""
    if pid in reap() or not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    """The argv of process *pid*.

    :raise QemuError: when the process is gone.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        raise QemuError(f"process {pid} is gone") from None
    return [w.decode() for w in raw.split(b"\0")[:-1]]


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to *timeout* seconds for *pid* to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    _collect(pid)
    return True


def _collect(pid: int, timeout: float = 5.0) -> None:
    """Reap child *pid* that `alive` saw gone: its main thread may have exited (``Z``) before its other
    threads, and only once they have can it be reaped."""
    child = _children.get(pid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
        reap()


def kill(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM *pid*, then SIGKILL if it has not gone after *timeout* seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, timeout):
            return


def exe_replaced(pid: int, path: str) -> bool:
    """Whether running process *pid*'s executable is no longer the file at *path* (replaced or deleted).

    A package upgrade renames a new binary over the old one: the running QEMU
    keeps the old file mapped, and ``/proc/PID/exe`` still reaches it. A wrapper
    script is judged by the executable it names (`real_exe`).
    """
    try:
        running = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return False
    try:
        on_disk = os.stat(real_exe(path))
    except OSError:
        return True
    return (running.st_dev, running.st_ino) != (on_disk.st_dev, on_disk.st_ino)


#: How a wrapper script that runs QEMU from another tree (a chroot) names the executable it runs.
EXE_MARKER = "# cprctl-exe: "


def real_exe(path: str) -> str:
    """The executable *path* runs: itself, or what a wrapper script names in a ``# cprctl-exe: PATH`` line."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return path
    if not head.startswith(b"#!"):
        return path
    lines = head.decode(errors="replace").splitlines()[1:8]
    return next((line[len(EXE_MARKER) :].strip() for line in lines if line.startswith(EXE_MARKER)), path)


def copy_exe(pid: int, dest: Path) -> None:
    """Copy the executable process *pid* runs (even one deleted on disk) to *dest*, executable by its owner.

    :raise QemuError: when the process is gone or its executable cannot be read.
    """
    try:
        import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

        shutil.copyfile(f"/proc/{pid}/exe", dest)
    except OSError as exc:
        raise QemuError(f"cannot copy the executable of process {pid}: {exc.strerror}") from exc
    os.chmod(dest, 0o700)


def log_tail(log: Path, lines: int = 5) -> str:
    """The last *lines* lines of a QEMU log, joined with `` | `` (one line for an error)."""
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    tail = [line.strip() for line in text[-lines:] if line.strip() and not line.startswith("--- cprctl")]
    return " | ".join(tail)


#: How QEMU starts the lines it prints to stderr (``qemu-system-x86_64: ...``).
_QEMU_LINE = re.compile(r"^qemu-system-[\w-]+: (.*)$")
#: QEMU's summary lines that add nothing to the first error (the cause comes first).
_GENERIC = re.compile(r"^(load of migration failed|Failed to load )", re.IGNORECASE)
#: A warning, never the error: bare, or after the option QEMU was parsing (11.1: ``-mon chardev=...: warning:
#: '-mon' is deprecated``, printed at every start of a VM that cprctl gave a QMP monitor).
_WARNING = re.compile(r"^(?:qemu-system-[\w-]+: )?(?:-\S.*?: )?warning: ", re.IGNORECASE)
#: QEMU's last words when it is killed; not its error when this process killed it (a refusal, a rollback).
_KILLED = re.compile(r"terminating on signal \d+ from pid (\d+)")


def qemu_error(log: Path) -> str:
    """QEMU's own error from the last run in *log* (after cprctl's last ``--- cprctl`` line), in one line:
    its first error line, and the device whose state failed to load when it names one; else its last line
    (a wrapper's own message); "" when it said nothing but warnings, or that this process killed it.

    E.g. ``VQ 0 vring.num 1024 exceeds allocated max 128; error while loading state for instance 0x0 of
    device '0000:00:02.0/virtio-console'``.
    """
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in ("\n" + text).rpartition("\n--- cprctl ")[2].splitlines() if line.strip()]
    lines = lines[1:] if ("\n" + text).find("\n--- cprctl ") >= 0 else lines  # not the marker itself
    lines = [line for line in lines if not _WARNING.match(line) and not _killed_by_us(line)]
    said = [m[1].strip() for line in lines if (m := _QEMU_LINE.match(line))]
    errors = [line for line in said if not _GENERIC.match(line)]
    if not errors:
        return said[-1] if said else (lines[-1] if lines else "")
    device = next((line for line in errors[1:] if line.startswith("error while loading state")), None)
    return "; ".join(dict.fromkeys([errors[0], *([device] if device else [])]))


def _killed_by_us(line: str) -> bool:
    return (m := _KILLED.search(line)) is not None and int(m[1]) == os.getpid()


def bytes_read(pid: int) -> int | None:
    """Bytes process *pid* read through read-type system calls so far (``rchar``); None when unreadable."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    found = re.search(r"^rchar: (\d+)$", text, re.MULTILINE)
    return int(found[1]) if found else None


def code_files(pid: int) -> list[str]:
    """The files process *pid* maps executable (its binary and libraries), each once; [] when unknown."""
    found: dict[str, None] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) > 5 and "x" in fields[1] and fields[5].startswith("/"):
                    path = fields[5].strip()
                    if not path.endswith(" (deleted)"):
                        found[path] = None
    except OSError:
        return []
    return list(found)
