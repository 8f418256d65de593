#!/usr/bin/env python3
"""Warm-update pause (issue 11): RAM in a shared file vs RAM pre-copied, cprctl vs QEMU driven by hand.

For each guest RAM size and kind (``file``: a shared file, cpr-reboot with ``x-ignore-shared``;
``anon``: anonymous RAM, normal-mode pre-copy), on the demo guest under TCG:

- the guest fills half its RAM with the memfill pattern (re-verified every 3 s), and a dirtier started
  through the guest agent rewrites `DIRTY_MIB` MiB of page cache in a loop, sleeping 1 s between rounds;
- cprctl: ``update`` onto the same binary, `--repeat` times in a chain;
- by hand: a bare ``qemu.qmp`` script does the same handover (standby QEMU with ``-incoming defer`` on
  its own sockets, the same capabilities and parameters, ``migrate`` over a unix socket, ``quit``), in
  a chain of the same length;
- pause = STOP event of the old QEMU to RESUME event of the new one; ``mem ok`` after every handover.

Writes (or replaces) the "Warm update" section of ``benchmarks/RESULTS.md``. Run as root:
``benchmarks/bench.py --warm-update`` (or this file directly).

``--modes N`` (issue 15) instead compares QEMU's cpr-transfer with the standby on the *same* guest:
for each RAM kind (``memfd``: memory-backend-memfd, which the standby pre-copies; ``file``: a shared
file, kept in place by both), one guest with ``-machine aux-ram-share=on`` and the dirtier running is
updated N times by each, alternating the order every round; pause and the whole update's time.
Writes the "cpr-transfer against the standby" section.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient, QMPError

import cprctl
from cprctl._checkpoint.precopy import TARGET_PAUSE_MS
from cprctl._demo import guest_argv
from cprctl._qemu.agent import Agent
from cprctl._qemu.argv import agent_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Guest, kill_under, machine_info

#: MiB the dirtier rewrites each round, and the seconds it sleeps after each (--dirty-sleep).
DIRTY_MIB = 64
dirty_sleep = 1.0
UNCAPPED = 1 << 40
SECTION = "## Warm update (issue 11)"
#: Median ms the dirtier took per round of DIRTY_MIB MiB, in each cprctl VM.
rounds: list[float] = []
#: What the by-hand script sets, per RAM kind: the same as cprctl's plan.
BY_HAND: dict[str, tuple[dict[str, bool], dict[str, Any]]] = {
    "file": ({"x-ignore-shared": True}, {"mode": "cpr-reboot", "max-bandwidth": UNCAPPED}),
    "anon": (
        {"x-ignore-shared": False, "auto-converge": True},
        {"mode": "normal", "max-bandwidth": UNCAPPED, "downtime-limit": TARGET_PAUSE_MS},
    ),
}


@dataclass
class Case:
    size: int
    ram: str
    who: str
    pauses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The host's 1-minute load average as each handover's guest was booted (``--first``).
    loads: list[float] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.pauses) if self.pauses else None


def dirtier_script(mib: int) -> str:
    """Rewrite *mib* MiB of guest page cache with random-looking data, sleep `dirty_sleep` s, again.

    The source is 1 MiB of /dev/urandom repeated (urandom is slow under TCG); every page is non-zero,
    so QEMU sends each dirtied page whole. Each round is timed into /dirty-rate (ms per round).
    """
    return (
        "head -c 1048576 /dev/urandom > /dirty-1m; i=0; "
        f"while [ $i -lt {mib} ]; do cat /dirty-1m; i=$((i+1)); done > /dirty-src; "
        "cs() { read u _ < /proc/uptime; echo ${u%.*}${u#*.}; }; "  # centiseconds (busybox date has no %N)
        "while :; do a=$(cs); dd if=/dirty-src of=/dirty-dst bs=1M conv=notrunc 2>/dev/null; "
        f"b=$(cs); echo $(( (b-a)*10 )) >> /dirty-rate; sleep {dirty_sleep:g}; done"
    )


async def start_dirtier(qga: str, name: str) -> None:
    """Start the dirtier in the guest and wait until it has rewritten its pages twice."""
    async with Agent(qga, name, timeout=30) as agent:
        await agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", dirtier_script(DIRTY_MIB)]})
        deadline = time.monotonic() + 180
        while int(await guest_sh(agent, "cat /dirty-rate 2>/dev/null | wc -l") or 0) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the dirtier did not start")
            await asyncio.sleep(1)


async def guest_sh(agent: Agent, script: str) -> str:
    started = await agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})
    while not (st := await agent.execute("guest-exec-status", {"pid": started["pid"]}))["exited"]:
        await asyncio.sleep(0.1)
    return base64.b64decode(st.get("out-data", "")).decode().strip()


async def dirty_round_ms(qga: str, name: str) -> float:
    """The median time of the dirtier's rounds so far (ms), read in the guest."""
    async with Agent(qga, name, timeout=30) as agent:
        values = [int(v) for v in (await guest_sh(agent, "cat /dirty-rate")).split()]
    return statistics.median(values) if values else 0.0


def case_argv(case: Case, qemu: str, guest: Path, folder: Path) -> list[str]:
    """The guest's argv; kind ``realistic``: RAM in a shared file, 2 vCPUs, virtio-net, xHCI + tablet, qcow2 overlay;
    ``memfd-x``/``file-x``: memfd RAM or a shared file, with ``aux-ram-share=on`` (cpr-transfer can run)."""
    if case.ram in ("memfd-x", "file-x"):
        extra: tuple[str, ...] = ("-machine", "aux-ram-share=on")
        if case.ram == "memfd-x":
            extra += ("-object", f"memory-backend-memfd,id=m0,size={case.size}M", "-machine", "memory-backend=m0")
        kind = "file" if case.ram == "file-x" else "anon"
        return guest_argv(qemu, guest, folder, ram_mib=case.size, fill_mib=case.size // 2, ram=kind, extra=extra)
    if case.ram != "realistic":
        return guest_argv(qemu, guest, folder, ram_mib=case.size, fill_mib=case.size // 2, ram=case.ram)
    base, overlay = folder / "base.qcow2", folder / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)], check=True
    )
    extra = (
        *("-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="),
        *("-device", "qemu-xhci,id=xhci", "-device", "usb-tablet,bus=xhci.0"),
        *("-drive", f"file={overlay},if=none,id=d0,format=qcow2", "-device", "virtio-blk-pci,drive=d0"),
    )
    argv = guest_argv(qemu, guest, folder, ram_mib=case.size, fill_mib=case.size // 2, ram="file", extra=extra)
    return [w if w != "1" or argv[i - 1] != "-smp" else "2" for i, w in enumerate(argv)]


# -- cprctl ------------------------------------------------------------------------------------------


def run_cprctl(case: Case, qemu: str, guest: Path, work: Path, sd: Path, repeat: int, tag: str = "") -> None:
    name = f"{case.ram}{case.size}{tag}"
    folder = work / name
    folder.mkdir()
    argv = case_argv(case, qemu, guest, folder)
    cprctl.launch(name, argv, agent=True, state_dir=sd)
    con = Guest(folder)
    seen = con.wait_mem_ok(0, 120 + case.size / 10)
    status = cprctl.status(name, state_dir=sd)[0]
    assert status.qga
    asyncio.run(start_dirtier(status.qga, name))
    for _ in range(repeat):
        upd = cprctl.update(name, qemu, state_dir=sd)
        if not upd.warm:
            raise RuntimeError(f"{name}: update ran cold: {upd.cold_reason}")
        case.pauses.append(upd.pause_ms)
        t = upd.timings_ms
        if "downtime" in t:
            case.notes.append(f"old QEMU {t['downtime']:.0f} ms, warm-up {t.get('warm_up', 0):.0f} ms")
        if "precopy" in t:
            case.notes.append(
                f"{t['precopy'] / 1000:.1f} s pre-copy, {t['passes']:.0f} passes, QEMU downtime {t['downtime']:.0f} ms"
                + (", stop-and-copy forced" if t.get("stop_and_copy") else "")
            )
        seen = con.wait_mem_ok(seen, 120)
    rounds.append(asyncio.run(dirty_round_ms(status.qga, name)))
    cprctl.stop(name, state_dir=sd)
    cprctl.remove(name, state_dir=sd)


# -- by hand -----------------------------------------------------------------------------------------


class Hand:
    """One QEMU of a by-hand chain: the guest's argv, its own QMP and agent sockets."""

    def __init__(self, argv: list[str], folder: Path, gen: int, incoming: bool) -> None:
        self.qmp_path = folder / f"q{gen}.sock"
        self.qga_path = folder / f"a{gen}.sock"
        full = [
            *argv,
            *agent_args(str(self.qga_path)),
            *("-qmp", f"unix:{self.qmp_path},server=on,wait=off"),
            *(["-incoming", "defer"] if incoming else []),
        ]
        with open(folder / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.qmp = QMPClient(f"hand{gen}")

    async def connect(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.qmp.connect(str(self.qmp_path))
                return
            except ConnectError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)

    def event(self, name: str) -> float:
        for ev in self.qmp.events.history:
            if ev["event"] == name:
                stamp: dict[str, int] = ev["timestamp"]  # type: ignore[assignment]
                return stamp["seconds"] + stamp["microseconds"] / 1e6
        raise RuntimeError(f"no {name} event")

    async def setup(self, caps: dict[str, bool], params: dict[str, Any]) -> None:
        await self.qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}
        )
        await self.qmp.execute("migrate-set-parameters", params)

    async def quit(self) -> None:
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self.qmp.execute("quit")
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self.qmp.disconnect()
        await asyncio.to_thread(self.proc.wait, 30)


async def handover(old: Hand, new: Hand, ram: str, sock: Path) -> tuple[float, str]:
    """Move the guest from *old* to *new* as an operator would by hand; the pause (ms), and a note."""
    caps, params = BY_HAND["file" if ram == "realistic" else ram]
    await new.connect()
    await new.setup(
        {k: v for k, v in caps.items() if k != "auto-converge"},
        {k: v for k, v in params.items() if k not in ("max-bandwidth", "downtime-limit")},
    )
    await new.qmp.execute("migrate-incoming", {"uri": f"unix:{sock}"})
    await old.setup(caps, params)
    t = time.monotonic()
    await old.qmp.execute("migrate", {"uri": f"unix:{sock}"})
    while (info := await old.qmp.execute("query-migrate"))["status"] != "completed":  # type: ignore[index]
        if info["status"] in ("failed", "cancelled"):  # type: ignore[index]
            raise RuntimeError(f"by-hand migration {info['status']}")  # type: ignore[index]
        await asyncio.sleep(0.005)
    while (await new.qmp.execute("query-status"))["status"] != "running":  # type: ignore[index]
        await asyncio.sleep(0.001)
    pause = (new.event("RESUME") - old.event("STOP")) * 1000
    note = f"old QEMU {info.get('downtime')} ms" if ram != "anon" else ""  # type: ignore[union-attr]
    if ram == "anon":
        done: dict[str, Any] = info  # type: ignore[assignment]
        passes = done.get("ram", {}).get("dirty-sync-count", 0)
        note = f"{time.monotonic() - t:.1f} s pre-copy, {passes} passes, QEMU downtime {done.get('downtime')} ms"
    await old.quit()
    return pause, note


def run_by_hand(case: Case, qemu: str, guest: Path, work: Path, repeat: int, tag: str = "") -> None:
    folder = work / f"hand-{case.ram}{case.size}{tag}"
    folder.mkdir()
    argv = cprctl_pinned(case_argv(case, qemu, guest, folder))

    async def chain() -> None:
        cur = Hand(argv, folder, 0, incoming=False)
        await cur.connect()
        con = Guest(folder)
        seen = await asyncio.to_thread(con.wait_mem_ok, 0, 120 + case.size / 10)
        await start_dirtier(str(cur.qga_path), "by-hand")
        for gen in range(1, repeat + 1):
            nxt = Hand(argv, folder, gen, incoming=True)
            pause, note = await handover(cur, nxt, case.ram, folder / "mig.sock")
            case.pauses.append(pause)
            if note:
                case.notes.append(note)
            cur = nxt
            seen = await asyncio.to_thread(con.wait_mem_ok, seen, 120)
        await cur.quit()

    asyncio.run(chain())


def cprctl_pinned(argv: list[str]) -> list[str]:
    """*argv* with the machine type pinned as cprctl pins it (the same QEMU, the same machine)."""
    return [w if w != "q35" else "pc-q35-10.0" for w in argv]


# -- report ------------------------------------------------------------------------------------------


def markdown(cases: list[Case], machine: dict[str, str], argv: list[str], runtime: float, load: str) -> str:
    round_ms = statistics.median(rounds) if rounds else None
    lines = [
        SECTION,
        "",
        f"Command: `{' '.join(argv)}` — runtime {runtime / 60:.1f} min; {machine.get('date', '')}, "
        f"{machine.get('cores', '?')} cores, {machine.get('QEMU', '')}.",
        "",
        f"- Demo guest under TCG, 1 vCPU; it fills half its RAM with the memfill pattern (re-verified every 3 s, "
        f"`mem ok` after every handover) and a dirtier rewrites {DIRTY_MIB} MiB of guest page cache with "
        f"random data, then sleeps {dirty_sleep:g} s, in a loop: a round took a median {_ms(round_ms)} ms "
        f"in the guest, so it dirtied about {DIRTY_MIB / (dirty_sleep + (round_ms or 1) / 1000):.0f} MiB/s.",
        "- *file*: RAM in a shared file, cpr-reboot + `x-ignore-shared` over a unix socket. *anon*: anonymous "
        f"RAM, normal-mode pre-copy, auto-converge, `downtime-limit` {TARGET_PAUSE_MS} ms, bandwidth cap lifted.",
        "- *by hand*: a bare `qemu.qmp` script doing the same handover with the same settings, no cprctl. "
        "Each is a chain of handovers of one guest (the first is after boot). Pause = STOP of the old QEMU to "
        "RESUME of the new one (QEMU's timestamps).",
        f"- Host load during the run: {load}.",
        "",
        "| RAM | kind | cprctl pauses ms | by hand pauses ms | cprctl median | by hand median | ratio | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(c.size, c.ram, c.who): c for c in cases}
    for size, ram in dict.fromkeys((c.size, c.ram) for c in cases):
        cp, hand = by.get((size, ram, "cprctl")), by.get((size, ram, "hand"))
        cpm, hm = (cp.median if cp else None), (hand.median if hand else None)
        ratio = f"{cpm / hm:.2f}" if cpm and hm else ""
        lines.append(
            f"| {size} MiB | {ram} | {_list(cp)} | {_list(hand)} | {_ms(cpm)} | {_ms(hm)} | {ratio} | "
            f"cprctl: {'; '.join(cp.notes) if cp else ''}; by hand: {'; '.join(hand.notes) if hand else ''} |"
        )
    return "\n".join(lines) + "\n"


#: The last `run_first` results (cprctl, by hand), for bench.py's summary.
last_first: tuple[Case, Case] | None = None

FIRST_SECTION = "## First warm handover of freshly booted realistic guests (issue 17)"


#: Seconds a fresh realistic guest may take to boot, fill its RAM and start the dirtier (two boot at once).
FIRST_BOOT_TIMEOUT = 900.0


class HandGuest:
    """A by-hand realistic guest for one first handover, driven in a thread of its own (its QMP clients
    belong to that thread's event loop): boot, fill, dirtier (`ready`), then on `go` one handover
    (`done`), then on `finish` quit."""

    def __init__(self, case: Case, qemu: str, guest: Path, work: Path, tag: str) -> None:
        self.case, self.folder = case, work / f"hand-{case.ram}{case.size}{tag}"
        self.folder.mkdir()
        self.argv = cprctl_pinned(case_argv(case, qemu, guest, self.folder))
        self.ready, self.go, self.done, self.finish = (threading.Event() for _ in range(4))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"hand{tag}")

    def _run(self) -> None:
        try:
            asyncio.run(self._chain())
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.ready.set()
            self.done.set()

    async def _chain(self) -> None:
        cur = Hand(self.argv, self.folder, 0, incoming=False)
        try:
            await cur.connect()
            con = Guest(self.folder)
            seen = await asyncio.to_thread(con.wait_mem_ok, 0, FIRST_BOOT_TIMEOUT)
            await start_dirtier(str(cur.qga_path), "by-hand")
            self.ready.set()
            await asyncio.to_thread(self.go.wait)
            nxt = Hand(self.argv, self.folder, 1, incoming=True)
            pause, note = await handover(cur, nxt, self.case.ram, self.folder / "mig.sock")
            cur = nxt
            self.case.pauses.append(pause)
            self.case.notes.append(note)
            await asyncio.to_thread(con.wait_mem_ok, seen, 120)
            self.done.set()
            await asyncio.to_thread(self.finish.wait)
        finally:
            await cur.quit()

    def wait(self, event: threading.Event, timeout: float) -> None:
        if not event.wait(timeout) or self.error is not None:
            raise RuntimeError(f"by-hand guest {self.folder.name}: {self.error or 'timed out'}") from self.error


def first_pair(i: int, cp: Case, hand: Case, qemu: str, guest: Path, work: Path) -> None:
    """Pair *i* of `run_first`: a cprctl guest and a by-hand guest boot and fill at the same time, then each
    is handed over once, in turn (cprctl first in even pairs), while the other runs; then both stop."""
    tag = f"-{i}"
    name, folder, sd = f"{cp.ram}{cp.size}{tag}", work / f"{cp.ram}{cp.size}{tag}", work / "state"
    folder.mkdir()
    by_hand = HandGuest(hand, qemu, guest, work, tag)
    load = os.getloadavg()[0]
    cp.loads.append(load)
    hand.loads.append(load)
    by_hand.thread.start()
    launched = False
    try:
        cprctl.launch(name, case_argv(cp, qemu, guest, folder), agent=True, state_dir=sd)
        launched = True
        con = Guest(folder)
        seen = con.wait_mem_ok(0, FIRST_BOOT_TIMEOUT)
        status = cprctl.status(name, state_dir=sd)[0]
        assert status.qga
        asyncio.run(start_dirtier(status.qga, name))
        by_hand.wait(by_hand.ready, FIRST_BOOT_TIMEOUT)
        for who in ("cprctl", "hand") if i % 2 == 0 else ("hand", "cprctl"):
            if who == "cprctl":
                upd = cprctl.update(name, qemu, state_dir=sd)
                if not upd.warm:
                    raise RuntimeError(f"{name}: update ran cold: {upd.cold_reason}")
                cp.pauses.append(upd.pause_ms)
                t = upd.timings_ms
                cp.notes.append(f"old QEMU {t.get('downtime', 0):.0f} ms, warm-up {t.get('warm_up', 0):.0f} ms")
                seen = con.wait_mem_ok(seen, 120)
            else:
                by_hand.go.set()
                by_hand.wait(by_hand.done, 300)
            case = cp if who == "cprctl" else hand
            print(f"  {who}: {case.pauses[-1]:.1f} ms ({case.notes[-1]})", flush=True)
    finally:
        by_hand.finish.set()
        by_hand.go.set()  # a guest still waiting for its turn quits without a handover
        by_hand.thread.join(60)
        if launched:
            with contextlib.suppress(cprctl.CprctlError):
                cprctl.stop(name, state_dir=sd)
            with contextlib.suppress(cprctl.CprctlError):
                cprctl.remove(name, state_dir=sd, force=True)
        for path in (folder, by_hand.folder):
            shutil.rmtree(path, ignore_errors=True)  # its 1 GiB RAM file


def run_first(
    runs: int, size: int, qemu: str, guest: Path, work: Path, done: Callable[[Case, Case], None]
) -> tuple[Case, Case]:
    """*runs* fresh realistic guests each for cprctl and by hand (see `first_pair`: booted two at a time, handed
    over in turn, which goes first alternating); *done* hears the results after each pair."""
    cp, hand = Case(size, "realistic", "cprctl"), Case(size, "realistic", "hand")
    for i in range(runs):
        if i:
            done(cp, hand)
        print(f"{time.strftime('%H:%M:%S')} first handovers, pair {i + 1}/{runs}", flush=True)
        first_pair(i, cp, hand, qemu, guest, work)
    return cp, hand


def first_markdown(cp: Case, hand: Case, machine: dict[str, str], argv: list[str], runtime: float) -> str:
    def row(c: Case) -> str:
        return (
            f"| {c.who} | {len(c.pauses)} | {statistics.median(c.pauses):.1f} | {max(c.pauses):.1f} | "
            f"{', '.join(f'{p:.1f}' for p in c.pauses)} | {', '.join(f'{x:.1f}' for x in c.loads)} | "
            f"{'; '.join(c.notes)} |"
        )

    p50 = statistics.median(cp.pauses) / statistics.median(hand.pauses)
    worst = max(cp.pauses) / max(hand.pauses)
    return "\n".join(
        [
            FIRST_SECTION,
            "",
            f"Command: `{' '.join(argv)}` — runtime {runtime / 60:.1f} min; {machine.get('date', '')}, "
            f"{machine.get('cores', '?')} cores, {machine.get('QEMU', '')}; the machine is shared with other "
            "developers' QEMUs (load average as each guest booted in the table).",
            "",
            f"Each pair boots two fresh realistic guests at the same time ({cp.size} MiB RAM in a shared file, "
            "2 vCPUs, virtio-net, xHCI + tablet, qcow2 overlay over a qcow2 base), waits for their memfill "
            f"pattern, starts their dirtier ({DIRTY_MIB} MiB per round), and hands each over ONCE (its first "
            "handover after boot) onto the same binary, in turn, while the other runs: one with `cprctl update`, "
            "the other with the by-hand script (which goes first alternates from pair to pair). Pause = STOP of "
            "the old QEMU to RESUME of the new one.",
            "",
            "| who | runs | p50 ms | worst ms | pauses ms, in order | load average at boot | of which the old QEMU's "
            "downtime (stop, disk flush, device state) |",
            "|---|---|---|---|---|---|---|",
            row(cp),
            row(hand),
            "",
            f"cprctl / by hand: p50 **{p50:.2f}** (goal <= 1.1), worst **{worst:.2f}** (goal <= 1.5).",
            "",
        ]
    )


def write_first(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    head, found, rest = old.partition(FIRST_SECTION)
    tail = ""
    if found:
        after = rest.find("\n## ")
        tail = rest[after:] if after >= 0 else ""
    path.write_text(head.rstrip() + "\n\n" + text + tail)


def _list(case: Case | None) -> str:
    return ", ".join(f"{p:.1f}" for p in case.pauses) if case else ""


def _ms(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else ""


MODES_SECTION = "## cpr-transfer against the standby (issue 15)"


def run_modes(size: int, ram: str, qemu: str, guest: Path, work: Path, sd: Path, n: int) -> dict[str, Case]:
    """One guest, updated *n* times by each mode, alternating which goes first; the Cases by mode
    (``notes``: the whole update's wall time in ms, one per handover)."""
    cases = {m: Case(size, ram, m) for m in ("standby", "cpr-transfer")}
    name = f"m{ram}{size}"
    folder = work / name
    folder.mkdir()
    cprctl.launch(name, case_argv(Case(size, ram, ""), qemu, guest, folder), agent=True, state_dir=sd)
    con = Guest(folder)
    seen = con.wait_mem_ok(0, 120 + size / 10)
    status = cprctl.status(name, state_dir=sd)[0]
    assert status.qga
    asyncio.run(start_dirtier(status.qga, name))
    for i in range(n):
        for mode in ("standby", "cpr-transfer") if i % 2 == 0 else ("cpr-transfer", "standby"):
            t = time.perf_counter()
            upd = cprctl.update(name, qemu, mode=mode, state_dir=sd)  # type: ignore[arg-type]
            wall = (time.perf_counter() - t) * 1000
            if upd.mode != mode:
                raise RuntimeError(f"{name}: asked {mode}, ran {upd.mode}: {upd.mode_reason or upd.cold_reason}")
            cases[mode].pauses.append(upd.pause_ms)
            cases[mode].notes.append(f"{wall:.0f}")
            print(f"  {mode}: paused {upd.pause_ms:.1f} ms, update {wall:.0f} ms", flush=True)
            seen = con.wait_mem_ok(seen, 120)
    rounds.append(asyncio.run(dirty_round_ms(status.qga, name)))
    cprctl.stop(name, state_dir=sd)
    cprctl.remove(name, state_dir=sd)
    return cases


def modes_markdown(
    results: list[dict[str, Case]], machine: dict[str, str], argv: list[str], runtime: float, load: str
) -> str:
    round_ms = statistics.median(rounds) if rounds else None
    lines = [
        MODES_SECTION,
        "",
        f"Command: `{' '.join(argv)}` — runtime {runtime / 60:.1f} min; {machine.get('date', '')}, "
        f"{machine.get('cores', '?')} cores, {machine.get('QEMU', '')}.",
        "",
        "- One demo guest per RAM kind under TCG, 1 vCPU, `-machine aux-ram-share=on`, the memfill pattern "
        f"(`mem ok` after every handover) and the dirtier ({DIRTY_MIB} MiB of page cache per round, a round took "
        f"a median {_ms(round_ms)} ms). Each round updates it once by each mode, the order alternating.",
        "- *memfd-x*: `memory-backend-memfd` (the standby pre-copies it while the guest runs; cpr-transfer passes "
        "its fd). *file-x*: RAM in a shared file (both keep it in place).",
        "- pause = STOP of the old QEMU to RESUME of the new one; update = the whole `update()` call.",
        f"- Host load during the run: {load}.",
        "",
        "| RAM | mode | pauses ms | median | worst | update ms (median, worst) |",
        "|---|---|---|---|---|---|",
    ]
    for cases in results:
        for c in cases.values():
            walls = [float(w) for w in c.notes]
            wall = f"{statistics.median(walls):.0f}, {max(walls):.0f}" if walls else ""
            worst = _ms(max(c.pauses)) if c.pauses else ""
            lines.append(f"| {c.size} MiB {c.ram} | {c.who} | {_list(c)} | {_ms(c.median)} | {worst} | {wall} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str, section: str = SECTION) -> None:
    old = path.read_text() if path.exists() else ""
    head, found, rest = old.partition(section)
    tail = ""
    if found:
        after = rest.find("\n## ")
        tail = rest[after:] if after >= 0 else ""
    path.write_text(head.rstrip() + "\n\n" + text + tail)


def host_load() -> str:
    qemus = subprocess.run(["pgrep", "-c", "qemu-system"], capture_output=True, text=True).stdout.strip()
    return f"loadavg {os.getloadavg()[0]:.2f}, {qemus or 0} QEMU processes running on the host at the start"


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--guest", default="~/.cache/cprctl-guest")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--sizes", default="1024,2048", help="guest RAM sizes, MiB (default: %(default)s)")
    ap.add_argument(
        "--kinds", default="anon,file", help="anon, file, realistic (file RAM + devices) (default: %(default)s)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="handovers per chain (default: %(default)s)")
    ap.add_argument("--dirty-sleep", type=float, default=1.0, help="s between dirtier rounds (default: %(default)s)")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--out", default=str(here / "RESULTS.md"))
    ap.add_argument(
        "--first", type=int, default=0, help="N fresh realistic guests each, one handover each (first handover)"
    )
    ap.add_argument("--modes", type=int, default=0, help="N rounds of cpr-transfer against the standby (issue 15)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    global dirty_sleep
    dirty_sleep = args.dirty_sleep
    qemu = shutil.which(args.qemu) or args.qemu
    guest = Path(args.guest).expanduser()
    work = Path(tempfile.mkdtemp(prefix="cprctl-wu-", dir=args.workdir))
    load = host_load()
    started = time.monotonic()
    if args.first:
        size = int(args.sizes.split(",")[0])
        full = ["benchmarks/bench.py", "--warm-update", *(argv if argv is not None else sys.argv[1:])]
        machine = machine_info(qemu, Path(args.workdir))

        def write(cp: Case, hand: Case) -> None:  # after every pair: a run cut short keeps what it measured
            text = first_markdown(cp, hand, machine, full, time.monotonic() - started)
            print(text, flush=True)
            write_first(Path(args.out), text)

        global last_first
        try:
            last_first = run_first(args.first, size, qemu, guest, work, write)
            write(*last_first)
        finally:
            kill_under(work)
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.modes:
        full = ["benchmarks/warm_update.py", *(argv if argv is not None else sys.argv[1:])]
        results: list[dict[str, Case]] = []
        try:
            for size in [int(s) for s in args.sizes.split(",")]:
                for ram in args.kinds.split(","):
                    print(f"{time.strftime('%H:%M:%S')} {size} MiB {ram}", flush=True)
                    results.append(run_modes(size, ram, qemu, guest, work, work / "state", args.modes))
        finally:
            kill_under(work)
            shutil.rmtree(work, ignore_errors=True)
        machine = machine_info(qemu, Path(args.workdir))
        text = modes_markdown(results, machine, full, time.monotonic() - started, load)
        print(text)
        write_section(Path(args.out), text, MODES_SECTION)
        return 0
    cases: list[Case] = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            for ram in args.kinds.split(","):
                cp, hand = Case(size, ram, "cprctl"), Case(size, ram, "hand")
                cases += [cp, hand]
                print(f"{time.strftime('%H:%M:%S')} {size} MiB {ram}: cprctl", flush=True)
                run_cprctl(cp, qemu, guest, work, work / "state", args.repeat)
                print(f"{time.strftime('%H:%M:%S')} {size} MiB {ram}: by hand", flush=True)
                run_by_hand(hand, qemu, guest, work, args.repeat)
                print(f"  cprctl {_list(cp)} ms {cp.notes}; by hand {_list(hand)} ms {hand.notes}", flush=True)
    finally:
        kill_under(work)
        shutil.rmtree(work, ignore_errors=True)
    runtime = time.monotonic() - started
    machine = machine_info(qemu, Path(args.workdir))
    text = markdown(
        cases,
        machine,
        ["benchmarks/bench.py", "--warm-update", *(argv if argv is not None else sys.argv[1:])],
        runtime,
        load,
    )
    print(text)
    write_section(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
