"""What a QEMU binary on disk can run: its machine types, devices, backends, CPU models and migration schema.

Read before a VM is moved onto the binary (``update``, ``restore --qemu``), so a
binary that cannot take the VM is refused while the guest still runs. Every
answer comes from the binary itself: its ``help`` listings, and its QMP schema
read from a short-lived ``-machine none`` instance over stdio.
"""

from __future__ import annotations

import json
import re
import subprocess
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
    #: Where the binary looks for firmware named without a path (``-L help``).
    datadirs: tuple[str, ...]
    #: Migration modes (``cpr-reboot``...), capabilities and settable parameters in its QMP schema.
    modes: frozenset[str]
    capabilities: frozenset[str]
    parameters: frozenset[str]


def probe(binary: Binary) -> BinaryInfo:
    """Ask *binary* what it can run.

    :raise UsageError: the binary is missing or not executable; `QemuError`: it
        fails to answer (it is broken, or not a QEMU system emulator).
    """
    answers = qmp_answers(binary, "query-qmp-schema", "query-cpu-definitions")
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


def qmp_answers(binary: Binary, *commands: str) -> dict[str, Any]:
    """The answers of *binary* to QMP *commands*, from an instance that runs nothing.

    :raise QemuError: when it does not answer them all.
    """
    script = "".join(json.dumps({"execute": c, "id": c}) + "\n" for c in ("qmp_capabilities", *commands, "quit"))
    argv = [binary.path, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-no-user-config"]
    try:
        done = subprocess.run(
            [*argv, "-qmp", "stdio"], input=script, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise QemuError(f"{binary.path} did not answer QMP in {PROBE_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise QemuError(f"cannot run {binary.path}: {exc.strerror}") from exc
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    answers = {r["id"]: r["return"] for r in replies if r.get("id") in commands and "return" in r}
    if missing := [c for c in commands if c not in answers]:
        why = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        raise QemuError(f"{binary.path} did not answer {missing[0]}: {why[:200]}")
    return answers


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
