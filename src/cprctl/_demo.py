"""``cprctl demo``: the whole round trip on the bundled demo guest, narrated.

The demo guest (built by ``guest/build.sh``) prints ``tick boot=ID n=N up=S``
every second on its serial console and re-verifies a RAM pattern (``mem ok``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from . import _api
from ._qemu import process

TICK = re.compile(r"tick boot=(?P<boot>[0-9a-f-]+) n=(?P<n>\d+) up=(?P<up>[\d.]+)")


@dataclass(frozen=True)
class Tick:
    boot: str
    n: int
    up: float


def ticks(console: Path) -> list[Tick]:
    """Every tick line the guest printed so far."""
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [Tick(m["boot"], int(m["n"]), float(m["up"])) for m in TICK.finditer(text)]


def wait_ticks(console: Path, count: int, timeout: float = 60.0) -> list[Tick]:
    """Wait until the console shows *count* more ticks than now; all ticks."""
    start = len(ticks(console))
    deadline = time.monotonic() + timeout
    while len(found := ticks(console)) < start + count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest printed {len(found) - start} of {count} ticks in {timeout:.0f} s")
        time.sleep(0.1)
    return found


def guest_argv(
    qemu: str,
    guest: Path,
    folder: Path,
    *,
    ram_mib: int = 512,
    fill_mib: int = 128,
    ram: str = "file",
    ram_path: Path | None = None,
    kernel_args: str = "",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A QEMU command line for the demo guest.

    *ram* is ``file`` (a shared file, *ram_path* or ``folder/ram``: stays in place) or ``anon``.
    """
    argv = [
        qemu,
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-machine",
        "q35",
        "-smp",
        "1",
        "-m",
        f"{ram_mib}M",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(guest / "vmlinuz"),
        "-initrd",
        str(guest / "initrd.img"),
        "-append",
        f"console=ttyS0 quiet fill={fill_mib} {kernel_args}".strip(),
        "-global",
        "ICH9-LPC.disable_s3=0",
        "-chardev",
        f"file,id=con0,path={folder / 'console.log'},append=on",
        "-serial",
        "chardev:con0",
    ]
    if ram == "file":
        argv += [
            "-object",
            f"memory-backend-file,id=ram0,size={ram_mib}M,mem-path={ram_path or folder / 'ram'},share=on",
            "-machine",
            "memory-backend=ram0",
        ]
    return [*argv, *extra]


def run_demo(guest: str, qemu: str, state_dir: str | None, out: Console) -> None:
    work = Path(tempfile.mkdtemp(prefix="cprctl-demo-"))
    sd = state_dir or str(work / "state")
    console = work / "console.log"
    name = "demo"
    try:
        out.rule("1. launch the demo guest (RAM in a shared file, guest agent on)")
        rec = _api.launch(name, guest_argv(qemu, Path(guest), work), agent=True, state_dir=sd)
        out.print(f"pid {rec.pid}, machine pinned to {rec.machine}")
        for t in wait_ticks(console, 3)[-3:]:
            out.print(f"  guest: boot={t.boot[:8]}… n={t.n} up={t.up:.1f}s")
        before = ticks(console)[-1]
        out.rule("2. save: cpr-reboot to a state file, QEMU exits")
        saved = _api.save(name, state_dir=sd)
        gone = not process.alive(rec.pid)
        out.print(f"QEMU pid {rec.pid} {'is gone' if gone else 'still runs (!)'}; strategy {saved.strategy}")
        head = Path(saved.state_file).read_bytes()[:8]
        out.print(
            f"state file {saved.state_file}: {saved.size / 1e6:.2f} MB, header {head!r} "
            f"(guest RAM stays in {work / 'ram'})"
        )
        out.print(
            f"save took {sum(saved.timings_ms.values()):.0f} ms: "
            + ", ".join(f"{k} {v:.0f}" for k, v in saved.timings_ms.items())
        )
        out.rule("3. restore: same argv + -incoming defer, migrate-incoming, resume")
        res = _api.restore(name, state_dir=sd)
        after = wait_ticks(console, 3)
        resumed = [t for t in after if t.n > before.n][:3]
        for t in resumed:
            out.print(f"  guest: boot={t.boot[:8]}… n={t.n} up={t.up:.1f}s")
        same = all(t.boot == before.boot for t in after)
        out.print(
            f"boot id {'unchanged' if same else 'CHANGED'}; counter went {before.n} -> {resumed[0].n}; "
            f"guest paused {res.pause_ms:.0f} ms"
        )
        mem = [line for line in console.read_text().splitlines() if line.startswith("mem ")]
        if mem:
            out.print(f"  guest: {mem[-1]}")
    finally:
        _api.stop(name, state_dir=sd) if _exists(name, sd) else None
        shutil.rmtree(work, ignore_errors=True)


def _exists(name: str, sd: str) -> bool:
    try:
        _api.status(name, state_dir=sd)
        return True
    except Exception:
        return False
