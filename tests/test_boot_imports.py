"""What ``cprctl restore-all`` imports before its first restore: at boot its python start-up is part of every
guest's downtime (the timeline's ``queue``; benchmarks/reboot.py), so the save, update and trial paths,
which a restore never runs, and `status`'s full report and `check` (`inspect`), are not imported with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NOT_AT_BOOT = (
    "cprctl._checkpoint.save",
    "cprctl._checkpoint.update",
    "cprctl._checkpoint.warmup",
    "cprctl._checkpoint.inspect",
    "cprctl._checkpoint.trial",
    "cprctl._checkpoint.precopy",
)
#: Standard modules the restores do not need before their first step, each a few files read from a cold
#: cache at boot (shutil: bz2 and lzma with their libraries; secrets: hmac, hashlib and OpenSSL's _hashlib;
#: ctypes: libffi): imported where used (a kept build, a warm handover, reading a RAM block).
STDLIB_NOT_AT_BOOT = ("shutil", "secrets", "hashlib", "ctypes", "random")


def _imported(entry: str, unwanted: tuple[str, ...]) -> str:
    """Which of *unwanted* a fresh python has imported once it imported *entry* and restore-all's modules."""
    code = (
        f"import sys, {entry}, cprctl._api, cprctl._checkpoint.fleet, cprctl._checkpoint.restore\n"
        f"print(' '.join(m for m in {unwanted!r} if m in sys.modules))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_restore_all_path_imports_no_save_or_update() -> None:
    assert (found := _imported("cprctl.cli", NOT_AT_BOOT)) == "", f"imported by restore-all's path: {found}"
    # It can fail: the save path is what save-all imports.
    code = "import sys, cprctl._checkpoint.fleet as f, asyncio; from cprctl._checkpoint import save; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


def test_the_units_boot_entry_imports_no_cli() -> None:
    """`cprctl._boot` (the unit's ExecStart) imports neither click nor the CLI, besides the above."""
    found = _imported("cprctl._boot", (*NOT_AT_BOOT, *STDLIB_NOT_AT_BOOT, "click", "cprctl.cli", "rich"))
    assert found == "", f"imported by the unit's restore-all: {found}"


def test_the_units_boot_entry_runs_restore_all(tmp_path: Path) -> None:
    """With no VM it restores none and says so (the unit's status line); other arguments are refused."""
    env = {**os.environ, "CPRCTL_STATE_DIR": str(tmp_path / "state")}
    env.pop("NOTIFY_SOCKET", None)
    run = [sys.executable, "-m", "cprctl._boot"]
    done = subprocess.run([*run, "restore-all"], capture_output=True, text=True, env=env, cwd="/")
    assert done.returncode == 0 and done.stdout == "no VMs\n", done
    wrong = subprocess.run([*run, "save-all"], capture_output=True, text=True, env=env, cwd="/")
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage:"), wrong
