"""What a QEMU binary on disk can run: its machine types, devices, backends, CPU models and migration schema.

Read before a VM is moved onto the binary (``update``, ``restore --qemu``), so a
binary that cannot take the VM is refused while the guest still runs. Every
answer comes from the binary itself: its ``help`` listings, and its QMP schema
read from a short-lived ``-machine none`` instance over stdio.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import QemuError
from .process import Binary

#: How long a probe of one binary may take.
PROBE_TIMEOUT = 30.0


@dataclass(frozen=True)
class BinaryInfo:
    """What one QEMU binary offers; names include aliases."""

    path: str
    version: tuple[int, int, int]
    machines: frozenset[str]
    devices: frozenset[str]
    objects: frozenset[str]
    netdevs: frozenset[str]
    cpus: frozenset[str]
    #: Where the binary looks for firmware named without a path (``-L help``), as the binary sees them.
    datadirs: tuple[str, ...]
    #: Migration modes (``cpr-reboot``...), capabilities and settable parameters in its QMP schema.
    modes: frozenset[str]
    capabilities: frozenset[str]
    parameters: frozenset[str]
    #: The host path of the root the binary runs in: ``/``, or a Debian root a wrapper chroots into
    #: (its ``datadirs`` are below it).
    root: str = "/"


def probe(binary: Binary) -> BinaryInfo:
    """Ask *binary* what it can run.

    :raise UsageError: the binary is missing or not executable; `QemuError`: it
        fails to answer (it is broken, or not a QEMU system emulator).
    """
    answers, root = qmp_answers(binary, "query-qmp-schema", "query-cpu-definitions")
    modes, caps, params = migration_schema(answers["query-qmp-schema"])
    return BinaryInfo(
        binary.path,
        binary.version,
        machines(binary.run("-machine", "help")),
        devices(binary.run("-device", "help")),
        listed(binary.run("-object", "help")),
        listed(binary.run("-netdev", "help")),
        frozenset(c["name"] for c in answers["query-cpu-definitions"]) | {"host"},
        tuple(line.strip() for line in binary.run("-L", "help").splitlines() if line.strip()),
        modes,
        caps,
        params,
        root,
    )


def machines(text: str) -> frozenset[str]:
    """Machine types and their aliases from ``-machine help``."""
    found = set()
    for line in text.splitlines()[1:]:
        found.add(line.split(" ", 1)[0])
        if alias := re.search(r"\(alias of ([^)]+)\)", line):
            found.add(alias.group(1))
    return frozenset(found - {""})


def devices(text: str) -> frozenset[str]:
    """Device drivers and their aliases from ``-device help``."""
    return frozenset(re.findall(r'(?:^name|, alias) "([^"]+)"', text, re.MULTILINE))


def listed(text: str) -> frozenset[str]:
    """One name per indented or bare line after the heading (``-object help``, ``-netdev help``)."""
    return frozenset(line.split()[0] for line in text.splitlines()[1:] if line.strip())


def qmp_answers(binary: Binary, *commands: str) -> tuple[dict[str, Any], str]:
    """The answers of *binary* to QMP *commands*, from an instance that runs nothing, and the root it ran in.

    The root is read from ``/proc/PID/root`` once QEMU greeted: a wrapper that chroots
    QEMU into another tree (a Debian root with a newer QEMU) shows its files there.

    :raise QemuError: when it does not answer them all.
    """
    script = "".join(json.dumps({"execute": c, "id": c}) + "\n" for c in ("qmp_capabilities", *commands, "quit"))
    argv = [binary.path, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-no-user-config"]
    try:
        proc = subprocess.Popen(
            [*argv, "-qmp", "stdio"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        raise QemuError(f"cannot run {binary.path}: {exc.strerror}") from exc
    timer = threading.Timer(PROBE_TIMEOUT, proc.kill)
    timer.start()
    try:
        greeting = proc.stdout.readline() if proc.stdout else ""
        root = process_root(proc.pid) if greeting else "/"
        out, err = proc.communicate(script)
    finally:
        timer.cancel()
    if proc.returncode == -signal.SIGKILL and not out:
        raise QemuError(f"{binary.path} did not answer QMP in {PROBE_TIMEOUT:.0f} s")
    replies = [json.loads(line) for line in (greeting + out).splitlines() if line.startswith("{")]
    answers = {r["id"]: r["return"] for r in replies if r.get("id") in commands and "return" in r}
    if missing := [c for c in commands if c not in answers]:
        why = (err.strip().splitlines() or ["no answer"])[-1]
        raise QemuError(f"{binary.path} did not answer {missing[0]}: {why[:200]}")
    return answers, root


def process_root(pid: int) -> str:
    """The host path of process *pid*'s root directory, or ``/`` when it is not reachable by that path."""
    try:
        path = os.readlink(f"/proc/{pid}/root")
        same = os.stat(path), os.stat(f"/proc/{pid}/root")
    except OSError:
        return "/"
    return path if (same[0].st_dev, same[0].st_ino) == (same[1].st_dev, same[1].st_ino) else "/"


def migration_schema(entries: list[dict[str, Any]]) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """``(modes, capabilities, parameters)`` of migration in a QMP schema."""
    by_name = {e["name"]: e for e in entries}
    enums = [frozenset(e.get("values", [])) for e in entries if e.get("meta-type") == "enum"]
    modes = next((v for v in enums if "normal" in v and "cpr-reboot" in v), frozenset[str]())
    caps = next((v for v in enums if "x-ignore-shared" in v), frozenset[str]())
    params: frozenset[str] = frozenset()
    command = by_name.get("migrate-set-parameters", {})
    arg_type = by_name.get(command.get("arg-type", ""), {})
    if arg_type:
        params = frozenset(m["name"] for m in arg_type.get("members", []))
    return modes, caps, params
