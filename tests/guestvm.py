"""Test helpers: the demo guest under cprctl, and what it printed.

What the tests assert about a guest after a restore is always the same:
the boot id never changed, the counter ran on with no gap and no reset, the
RAM pattern still verifies, and the guest agent answers.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cprctl
from cprctl._demo import guest_argv, ticks
from cprctl._qemu.agent import Agent

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
MEM = re.compile(r"mem (ok|BAD) (\d+) MiB(?: pass=(\d+))?")


def guest_dir() -> Path:
    folder = Path(os.environ.get("CPRCTL_TEST_GUEST", Path.home() / ".cache" / "cprctl-guest"))
    if not (folder / "vmlinuz").exists() or not (folder / "initrd.img").exists():
        raise RuntimeError(f"no test guest in {folder}: run 'make guest' (or set CPRCTL_TEST_GUEST)")
    return folder


def short_tmp(prefix: str = "cpr") -> Path:
    """A private temp folder with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class GuestVM:
    """One demo guest managed by cprctl in *state_dir*; its console and RAM file live in *work*."""

    name: str
    state_dir: Path
    work: Path
    argv: list[str] = field(default_factory=list)

    @classmethod
    def launch(
        cls,
        name: str,
        state_dir: Path,
        *,
        ram: str = "file",
        fill: int = 64,
        ram_mib: int = 256,
        agent: bool = True,
        extra: tuple[str, ...] = (),
        qemu: str = QEMU,
        ram_path: Path | None = None,
        kernel_args: str = "",
        work: Path | None = None,
    ) -> GuestVM:
        work = work or state_dir.parent / f"{name}-work"
        work.mkdir(exist_ok=True)
        vm = cls(
            name,
            state_dir,
            work,
            guest_argv(
                qemu,
                guest_dir(),
                work,
                ram_mib=ram_mib,
                fill_mib=fill,
                ram=ram,
                ram_path=ram_path,
                kernel_args=kernel_args,
                extra=extra,
            ),
        )
        cprctl.launch(name, vm.argv, agent=agent, state_dir=state_dir)
        vm.wait_ready(fill)
        return vm

    @property
    def console(self) -> Path:
        return self.work / "console.log"

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 60.0) -> re.Match[str]:
        """Wait for *pattern* in the console text past offset *after*."""
        deadline = time.monotonic() + timeout
        while not (m := re.compile(pattern).search(self.text(), after)):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: {pattern!r} not seen in {timeout:.0f} s; console tail:\n" + self.text()[-800:]
                )
            time.sleep(0.1)
        return m

    def wait_ready(self, fill: int) -> None:
        self.wait_for(r"guest ready")
        if fill:
            self.wait_for(r"mem ok")
        self.wait_for(r"tick .* n=2 ")

    def mark(self) -> int:
        """An offset into the console: what comes after it was printed after now."""
        return len(self.text())

    def assert_continued(self, mark: int, fill: int = 64, agent: bool = True) -> None:
        """The guest went on where it stopped: same boot, no counter gap or reset, RAM intact."""
        self.wait_for(r"tick .*\n(?:.*\n)*?.*tick ", after=mark)  # two ticks after the restore
        if fill:
            self.wait_for(r"mem ok", after=mark)
        all_ticks = ticks(self.console)
        assert len({t.boot for t in all_ticks}) == 1, "the guest rebooted"
        ns = [t.n for t in all_ticks]
        assert ns == list(range(1, len(ns) + 1)), f"counter not continuous: {ns}"
        assert "mem BAD" not in self.text() and "memfill exited" not in self.text()
        if agent:
            assert self.agent_answers()

    def agent_answers(self) -> bool:
        status = cprctl.status(self.name, state_dir=self.state_dir)[0]
        if not status.qga:
            return True

        async def ping() -> bool:
            async with Agent(status.qga, self.name, timeout=10) as agent:  # type: ignore[arg-type]
                return "guest-sync" in await agent.commands()

        return asyncio.run(ping())

    def status(self) -> cprctl.VMStatus:
        return cprctl.status(self.name, state_dir=self.state_dir)[0]

    def stop(self) -> None:
        st = self.status()
        if st.state == "running":
            cprctl.stop(self.name, state_dir=self.state_dir)


def cli(*args: str, state_dir: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``cprctl`` command of this venv."""
    exe = str(Path(sys.executable).parent / "cprctl")
    pre = ["--state-dir", str(state_dir)] if state_dir else []
    return subprocess.run([exe, *pre, *args], capture_output=True, text=True, timeout=timeout, check=False)


def record_of(state_dir: Path, name: str) -> dict[str, object]:
    """The VM's record as raw JSON (what a killed cprctl left), or {} while it is being replaced."""
    import json

    try:
        return dict(json.loads((state_dir / "vms" / name / "vm.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_record(state_dir: Path, name: str, pred: object, timeout: float = 60.0, poll: float = 0.002) -> dict:
    """Poll the record until ``pred(record)`` holds; the record."""
    deadline = time.monotonic() + timeout
    while not pred(rec := record_of(state_dir, name)):  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: record never matched; last: {rec}")
        time.sleep(poll)
    return rec


def op_step(rec: dict) -> tuple[str | None, str | None]:
    op = rec.get("operation")
    if not isinstance(op, dict):
        return None, None
    steps = op.get("steps") or [["started", 0]]
    return op.get("kind"), steps[-1][0]


def spawn_cli(*args: str, state_dir: Path) -> subprocess.Popen[str]:
    exe = str(Path(sys.executable).parent / "cprctl")
    # SIGINT as on a terminal, even when the tests run as a background job (which ignores it).
    return subprocess.Popen(
        [exe, "--state-dir", str(state_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def qemu_copy(folder: Path, name: str = "qemu-system-x86_64") -> Path:
    """A private copy of the system QEMU binary at *folder*/*name*, as a package would install it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    shutil.copy2(QEMU, path)
    return path


def upgrade_binary(path: Path, tag: bytes = b"") -> None:
    """Replace the binary at *path* as dpkg does: write the new file beside it, then rename it over.

    With *tag* (appended after the ELF's contents, which the loader ignores) it is another build: its
    build id differs, as a real upgrade's does.
    """
    new = path.with_name(path.name + ".dpkg-new")
    shutil.copy2(QEMU, new)
    if tag:
        with open(new, "ab") as f:
            f.write(tag)
    os.rename(new, path)


def wrapper(folder: Path, name: str, body: str) -> Path:
    """An executable shell script *folder*/*name* that ends by running the system QEMU with its arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/bash\n{body}\nexec {QEMU} "$@"\n')
    path.chmod(0o755)
    return path
