#!/usr/bin/env python3
"""The benchmark of issue "Fast": how long cprctl pauses a guest, against what QEMU and the disk allow.

For each guest RAM size it measures, on the demo guest under TCG with most of its RAM dirtied
(``fill=`` kernel argument, checked with the guest's ``mem ok`` before and after every restore):

1. cprctl, RAM kept in place (``ram="file"``): cold ``save`` + ``restore``, ``update`` warm standby,
   ``update(warm=False)``;
2. cprctl, RAM written to the state file (``ram="anon"``): ``mapped-ram`` (the default) and ``stream``;
3. baseline (a), a bare ``qemu.qmp`` script with QEMU's defaults: cpr-reboot to a file and back, in
   place (``x-ignore-shared``) and RAM written under QEMU's default 128 MiB/s ``max-bandwidth``; and
   (a') the same script with QEMU's fastest settings (cprctl's plan, without its check and digest);
4. baseline (b), what ``virsh save`` does: pause, normal-mode ``migrate file:`` uncapped, restore;
5. the physical limit (c): the state directory's O_DIRECT write and read bandwidth (``dd``), and how
   fast a process can fill memory it never touched (which any load must do with the guest's RAM);
6. a fleet of 4 VMs: ``save_all``/``restore_all``, in parallel and one at a time.

Guest pause = STOP event to RESUME event (QMP host timestamps), minus the idle time the benchmark
spends between a save and its restore (``sync``, dropping the page cache and a short wait, so every
load reads the disk into memory freed long before, as after a host reboot). Prints one table and
writes ``benchmarks/RESULTS.md``. Run as root: ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from qemu.qmp import ConnectError, QMPClient, QMPError
from rich.console import Console
from rich.table import Table

import cprctl
from cprctl._demo import guest_argv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DD_MIB,
    DD_RUNS,
    SETTLE_S,
    Guest,
    as_after_reboot,
    dd_bandwidth,
    file_sizes,
    first_touch,
    fsync_ms,
    kill_under,
    machine_info,
)

#: Guest RAM (MiB) -> MiB the guest dirties: about 0.85 x RAM minus what the guest itself needs.
FILL_MIB = {512: 380, 2048: 1700, 4096: 3400}
#: The fleet: VMs of this size, filled this much.
FLEET_RAM_MIB, FLEET_FILL_MIB = 512, 300
#: QEMU's default max-bandwidth (bytes/s).
QEMU_DEFAULT_CAP = 128 << 20
#: "No cap" for the virsh-save-like baseline (libvirt lifts the cap too for a save to a file).
UNCAPPED = 1 << 40
#: What an expert would set by hand for RAM written to a file (the same as cprctl's plan here).
BEST_CAPS = {"mapped-ram": True, "multifd": True}
BEST_PARAMS: dict[str, Any] = {
    "mode": "cpr-reboot",
    "max-bandwidth": UNCAPPED,
    "multifd-channels": min(os.cpu_count() or 1, 8),
    "direct-io": True,
}
#: virsh save: normal mode, no cap, plain stream.
VIRSH_PARAMS: dict[str, Any] = {"mode": "normal", "max-bandwidth": UNCAPPED, "direct-io": False}
#: The capped default run only for sizes up to this (MiB): above, it takes size/128 seconds.
CAPPED_MAX_MIB = 1024
#: ``--written``: the guest of issue 12 (2 GiB, ~900 MiB dirtied, anonymous RAM) and its section in RESULTS.md.
WRITTEN_SIZE, WRITTEN_FILL = 2048, 900
#: ``--written``: the goal of issue 17 for the whole save and the whole restore against the bare script.
WRITTEN_TARGET = 1.15
#: ``--issue17``: 1 and 4 GiB of RAM written (guests of 1280 and 4608 MiB), 5 rounds each.
ISSUE17_SIZES, ISSUE17_FILLS, ISSUE17_REPEAT = "1280,4608", "1000,3900", 5
WRITTEN_TITLE = "## RAM written: whole save and restore against QEMU driven by hand (`--written`)"
MB = 1e6

out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One line of the table; lists hold one value per repetition (the table shows the median)."""

    size: int | None
    case: str
    save_ms: list[float] = field(default_factory=list)
    load_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    pause_ms: list[float] = field(default_factory=list)
    disk_bytes: int | None = None
    apparent_bytes: int | None = None
    note: str = ""
    #: The runs' cprctl timings_ms (save and restore steps), for the breakdown.
    steps: list[dict[str, float]] = field(default_factory=list)
    #: The host's 1-minute load average as each run started (the machine is shared).
    load: list[float] = field(default_factory=list)
    #: Bare runs: ms an fsync of the state file took right after the save (what a durable save adds).
    flush_ms: list[float] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return max(len(self.save_ms), len(self.load_ms), len(self.total_ms), len(self.pause_ms))

    def median(self, what: str) -> float | None:
        values: list[float] = getattr(self, what)
        return statistics.median(values) if values else None

    def step_medians(self) -> dict[str, float]:
        keys = dict.fromkeys(k for s in self.steps for k in s)
        return {k: statistics.median([s[k] for s in self.steps if k in s]) for k in keys}


@dataclass
class Ratio:
    name: str
    size: int | None
    value: str
    target: str = ""
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Results:
    rows: dict[tuple[int | None, str], Row] = field(default_factory=dict)
    dd_write: float = 0.0  # bytes/s
    dd_read: float = 0.0
    touch: float = 0.0  # bytes/s a fresh process fills never-touched memory at
    machine: dict[str, str] = field(default_factory=dict)

    def row(self, size: int | None, key: str, case: str, note: str = "") -> Row:
        if (size, key) not in self.rows:
            self.rows[(size, key)] = Row(size, case, note=note)
        return self.rows[(size, key)]

    def get(self, size: int | None, key: str) -> Row | None:
        return self.rows.get((size, key))


# --------------------------------------------------------------------------------------------------
# The guest


def fill_for(size: int) -> int:
    return FILL_MIB.get(size, max(16, int(0.85 * size - 60) // 20 * 20))


# --------------------------------------------------------------------------------------------------
# Baselines: a bare qemu.qmp script, no cprctl


class BareVM:
    """A QEMU started by hand, as an operator would: the guest's argv plus a QMP socket."""

    def __init__(self, argv: list[str], folder: Path) -> None:
        self.folder = folder
        self.sock = folder / "qmp.sock"
        self.argv = [*argv, "-qmp", f"unix:{self.sock},server=on,wait=off"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, incoming: bool = False) -> None:
        self.sock.unlink(missing_ok=True)
        with open(self.folder / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.argv, *(["-incoming", "defer"] if incoming else [])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def connect(self, timeout: float = 60.0) -> QMPClient:
        assert self.proc is not None
        qmp = QMPClient("bench")
        deadline = time.monotonic() + timeout
        while True:
            try:
                await qmp.connect(str(self.sock))
                return qmp
            except ConnectError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"bare QEMU exited (rc {self.proc.returncode}); see {self.folder}/qemu.log"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)


def _event_time(qmp: QMPClient, name: str) -> float:
    for event in qmp.events.history:
        if event["event"] == name:
            stamp: dict[str, int] = event["timestamp"]  # type: ignore[assignment]
            return stamp["seconds"] + stamp["microseconds"] / 1e6
    raise RuntimeError(f"no {name} event seen")


async def _query(qmp: QMPClient, cmd: str) -> dict[str, Any]:
    answer: dict[str, Any] = await qmp.execute(cmd)  # type: ignore[assignment]
    return answer


async def _setup(qmp: QMPClient, caps: dict[str, bool], params: dict[str, Any]) -> None:
    if caps:
        await qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}
        )
    if params:
        await qmp.execute("migrate-set-parameters", params)


async def _qmp_command(sock: str, cmd: str) -> None:
    """One QMP command (``stop``, ``cont``) on the QEMU listening at *sock*."""
    qmp = QMPClient("bench")
    await qmp.connect(sock)
    try:
        await qmp.execute(cmd)
    finally:
        await qmp.disconnect()


async def bare_save(
    vm: BareVM, path: Path, caps: dict[str, bool], params: dict[str, Any], pause_first: bool
) -> tuple[float, float]:
    """Migrate the running VM to ``file:path``, quit QEMU; (ms until QEMU is gone, STOP time)."""
    assert vm.proc is not None
    t0 = time.perf_counter()
    qmp = await vm.connect()
    try:
        await _setup(qmp, caps, params)
        if pause_first:
            await qmp.execute("stop")
        await qmp.execute("migrate", {"uri": f"file:{path}"})
        while (info := await _query(qmp, "query-migrate"))["status"] != "completed":
            if info["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"bare migrate {info['status']}: {info.get('error-desc')}")
            await asyncio.sleep(0.005)
        stopped = _event_time(qmp, "STOP")
        with contextlib.suppress(QMPError, EOFError, OSError):
            await qmp.execute("quit")
    finally:
        with contextlib.suppress(QMPError, EOFError, OSError):
            await qmp.disconnect()
    await asyncio.to_thread(vm.proc.wait, 60)
    return (time.perf_counter() - t0) * 1000, stopped


async def bare_load(
    vm: BareVM, path: Path, caps: dict[str, bool], params: dict[str, Any], timeout: float = 600
) -> tuple[float, float]:
    """Start QEMU with ``-incoming defer``, load ``file:path``, run the guest; (ms until running, RESUME time)."""
    t0 = time.perf_counter()
    vm.start(incoming=True)
    assert vm.proc is not None
    qmp = await vm.connect()
    try:
        await _setup(qmp, caps, {k: v for k, v in params.items() if k != "max-bandwidth"})
        await qmp.execute("migrate-incoming", {"uri": f"file:{path}"})
        deadline = time.monotonic() + timeout
        while (status := (await _query(qmp, "query-status"))["status"]) != "running":
            if status in ("paused", "postmigrate"):
                mig = await _query(qmp, "query-migrate")
                if mig.get("status") == "failed":
                    raise RuntimeError(f"bare load failed: {mig.get('error-desc')}")
                await qmp.execute("cont")
            elif vm.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bare load: QEMU {status}; see {vm.folder}/qemu.log")
            await asyncio.sleep(0.005)
        resumed = _event_time(qmp, "RESUME")
    finally:
        with contextlib.suppress(QMPError, EOFError, OSError):
            await qmp.disconnect()
    return (time.perf_counter() - t0) * 1000, resumed


# --------------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.qemu: str = shutil.which(args.qemu) or args.qemu
        self.guest = Path(args.guest).expanduser()
        self.repeat: int = args.repeat
        self.work = work
        self.sd = work / "state"
        self.res = Results()

    def folder(self, name: str) -> Path:
        path = self.work / "vms" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def argv(self, folder: Path, size: int, fill: int, ram: str) -> list[str]:
        return guest_argv(self.qemu, self.guest, folder, ram_mib=size, fill_mib=fill, ram=ram)

    @staticmethod
    def boot_timeout(size: int) -> float:
        """Seconds to boot and fill: the fill dominates (3.9 GiB took over 350 s at a load average of 12-18)."""
        return 120 + max(size / 20, fill_for(size) / 4)

    def step(self, size: int | None, text: str) -> None:
        out.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {f'[{size} MiB] ' if size else ''}{text}")

    # cprctl, RAM in place -------------------------------------------------------------------------

    def cprctl_in_place(self, size: int) -> None:
        name, fill = f"file{size}", fill_for(size)
        folder = self.folder(name)
        guest = Guest(folder)
        self.step(size, f"cprctl, RAM in place: launch, fill {fill} MiB")
        cprctl.launch(name, self.argv(folder, size, fill, "file"), state_dir=self.sd)
        seen = guest.wait_mem_ok(0, self.boot_timeout(size))
        cold = self.res.row(size, "cp-cold", "cprctl in place: save + restore")
        for i in range(self.repeat):
            self.step(size, f"cprctl in place: save + restore {i + 1}/{self.repeat}")
            t = time.perf_counter()
            saved = cprctl.save(name, state_dir=self.sd)
            cold.save_ms.append((time.perf_counter() - t) * 1000)
            saved_at = time.time()
            cold.disk_bytes, cold.apparent_bytes = file_sizes(saved.state_file)
            as_after_reboot()
            gap = time.time() - saved_at
            t = time.perf_counter()
            restored = cprctl.restore(name, state_dir=self.sd)
            cold.load_ms.append((time.perf_counter() - t) * 1000)
            cold.total_ms.append(cold.save_ms[-1] + cold.load_ms[-1])
            cold.pause_ms.append(restored.pause_ms - gap * 1000)
            cold.steps.append(_steps(saved.timings_ms, restored.timings_ms))
            seen = guest.wait_mem_ok(seen, 120)
        for warm, key, case in ((True, "cp-warm", "warm standby"), (False, "cp-ucold", "cold")):
            row = self.res.row(size, key, f"cprctl in place: update, {case}")
            for i in range(self.repeat):
                self.step(size, f"cprctl in place: update ({case}) {i + 1}/{self.repeat}")
                t = time.perf_counter()
                upd = cprctl.update(name, self.qemu, warm=warm, state_dir=self.sd)
                row.total_ms.append((time.perf_counter() - t) * 1000)
                row.pause_ms.append(upd.pause_ms)
                row.steps.append(dict(upd.timings_ms))
                if upd.warm != warm:
                    row.note = f"ran {'warm' if upd.warm else 'cold'}: {upd.cold_reason}"
                seen = guest.wait_mem_ok(seen, 120)
            row.note = row.note or ("no state file: RAM stays, device state over a unix socket" if warm else "")
        cprctl.stop(name, state_dir=self.sd)
        cprctl.remove(name, state_dir=self.sd)
        shutil.rmtree(folder, ignore_errors=True)

    # cprctl, RAM written --------------------------------------------------------------------------

    def cprctl_written(self, size: int) -> None:
        name, fill = f"anon{size}", fill_for(size)
        folder = self.folder(name)
        guest = Guest(folder)
        self.step(size, f"cprctl, RAM written: launch, fill {fill} MiB")
        cprctl.launch(name, self.argv(folder, size, fill, "anon"), state_dir=self.sd)
        seen = guest.wait_mem_ok(0, self.boot_timeout(size))
        rows = {
            "auto": self.res.row(size, "cp-mapped", "cprctl RAM written: mapped-ram (default)"),
            "stream": self.res.row(size, "cp-stream", "cprctl RAM written: stream"),
        }
        # Either order works (every save sets all the capabilities it could use); stream runs first so the
        # default's numbers come from a QEMU that was itself restored, as in real use.
        for strategy in ("stream", "auto"):
            self.step(size, f"cprctl RAM written: save ({strategy}) + restore")
            seen = self.cprctl_round(name, guest, seen, rows[strategy], strategy)
        cprctl.stop(name, state_dir=self.sd)
        cprctl.remove(name, state_dir=self.sd)
        shutil.rmtree(folder, ignore_errors=True)

    def cprctl_round(self, name: str, guest: Guest, seen: int, row: Row, strategy: Literal["stream", "auto"]) -> int:
        """One cprctl save + restore of VM *name* into *row*; the guest's new ``mem ok`` count."""
        row.load.append(os.getloadavg()[0])
        t = time.perf_counter()
        saved = cprctl.save(name, strategy=strategy, state_dir=self.sd)
        save_ms = (time.perf_counter() - t) * 1000
        saved_at = time.time()
        if saved.strategy != ("mapped-ram" if strategy == "auto" else strategy):
            row.note = f"strategy ran: {saved.strategy}"
        row.disk_bytes, row.apparent_bytes = file_sizes(saved.state_file)
        as_after_reboot()
        gap = time.time() - saved_at
        t = time.perf_counter()
        restored = cprctl.restore(name, state_dir=self.sd)
        row.save_ms.append(save_ms)
        row.load_ms.append((time.perf_counter() - t) * 1000)
        row.total_ms.append(save_ms + row.load_ms[-1])
        row.pause_ms.append(restored.pause_ms - gap * 1000)
        row.steps.append(_steps(saved.timings_ms, restored.timings_ms))
        seen = guest.wait_mem_ok(seen, 300)
        for thread in threading.enumerate():  # the state file deleted in the background (`retire_file`)
            if thread.name == "cprctl-retire":
                thread.join()
        return seen

    def written_interleaved(self, size: int) -> None:
        """cprctl's default and the bare script with the same settings, one round of each in turn on two
        guests that both run throughout, so that both see the same machine (loads here vary 3x from one
        minute to the next with what else runs)."""
        fill = fill_for(size)
        name, folder = f"anon{size}", self.folder(f"anon{size}")
        bare_folder = self.folder(f"bare-anon{size}")
        guest, bare_guest = Guest(folder), Guest(bare_folder)
        vm = BareVM(self.argv(bare_folder, size, fill, "anon"), bare_folder)
        self.step(size, f"cprctl and bare QMP, RAM written: launch both, fill {fill} MiB")
        try:
            cprctl.launch(name, self.argv(folder, size, fill, "anon"), state_dir=self.sd)
            vm.start()
            seen = guest.wait_mem_ok(0, self.boot_timeout(size))
            bare_seen = bare_guest.wait_mem_ok(0, self.boot_timeout(size))
            mapped = self.res.row(size, "cp-mapped", "cprctl RAM written: mapped-ram (default)")
            best = self.res.row(
                size,
                "bare-best",
                "bare QMP RAM written: cpr-reboot, mapped-ram + multifd + direct-io, uncapped",
                "no check, no digest, no record",
            )
            qmp = cprctl.status(name, state_dir=self.sd)[0].qmp
            asyncio.run(_qmp_command(qmp, "stop"))
            for i in range(self.repeat):
                # Which goes first alternates from round to round. The guest not measured is paused: its RAM
                # check would take a core from the other.
                for who in ("cprctl", "bare") if i % 2 == 0 else ("bare", "cprctl"):
                    if who == "cprctl":
                        asyncio.run(_qmp_command(str(vm.sock), "stop"))
                        asyncio.run(_qmp_command(qmp, "cont"))
                        seen = guest.wait_mem_ok(seen, 300)
                        self.step(size, f"cprctl RAM written (mapped-ram): save + restore {i + 1}/{self.repeat}")
                        seen = self.cprctl_round(name, guest, seen, mapped, "auto")
                        asyncio.run(_qmp_command(qmp, "stop"))
                    else:
                        asyncio.run(_qmp_command(str(vm.sock), "cont"))
                        bare_seen = bare_guest.wait_mem_ok(bare_seen, 300)
                        self.step(size, f"bare QMP, same settings: save + load {i + 1}/{self.repeat}")
                        bare_seen = self.bare_round(vm, bare_guest, bare_seen, best, BEST_CAPS, BEST_PARAMS, False)
            asyncio.run(_qmp_command(qmp, "cont"))
            cprctl.stop(name, state_dir=self.sd)
            cprctl.remove(name, state_dir=self.sd)
        finally:
            vm.kill()
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(bare_folder, ignore_errors=True)

    # baselines ------------------------------------------------------------------------------------

    def bare_round(
        self, vm: BareVM, guest: Guest, seen: int, row: Row, caps: dict[str, bool], params: dict[str, Any], pause: bool
    ) -> int:
        """One bare save + load of *vm* into *row*; the guest's new ``mem ok`` count."""
        path = vm.folder / "state.mig"
        path.unlink(missing_ok=True)
        row.load.append(os.getloadavg()[0])
        save_ms, stopped = asyncio.run(bare_save(vm, path, caps, params, pause))
        saved_at = time.time()
        row.flush_ms.append(fsync_ms(path))
        row.disk_bytes, row.apparent_bytes = file_sizes(path)
        as_after_reboot()
        gap = time.time() - saved_at
        load_ms, resumed = asyncio.run(bare_load(vm, path, caps, params))
        row.save_ms.append(save_ms)
        row.load_ms.append(load_ms)
        row.total_ms.append(save_ms + load_ms)
        row.pause_ms.append((resumed - stopped - gap) * 1000)
        path.unlink()
        return guest.wait_mem_ok(seen, 300)

    def bare_in_place(self, size: int) -> None:
        fill = fill_for(size)
        folder = self.folder(f"bare-file{size}")
        guest, vm = Guest(folder), BareVM(self.argv(folder, size, fill, "file"), folder)
        self.step(size, f"bare QMP, RAM in place: start, fill {fill} MiB")
        try:
            vm.start()
            seen = guest.wait_mem_ok(0, self.boot_timeout(size))
            row = self.res.row(size, "bare-inplace", "bare QMP in place: cpr-reboot, x-ignore-shared")
            for i in range(self.repeat):
                self.step(size, f"bare QMP in place: save + load {i + 1}/{self.repeat}")
                seen = self.bare_round(vm, guest, seen, row, {"x-ignore-shared": True}, {"mode": "cpr-reboot"}, False)
        finally:
            vm.kill()
            shutil.rmtree(folder, ignore_errors=True)

    def bare_written(self, size: int) -> None:
        fill = fill_for(size)
        folder = self.folder(f"bare-anon{size}")
        guest, vm = Guest(folder), BareVM(self.argv(folder, size, fill, "anon"), folder)
        self.step(size, f"bare QMP, RAM written: start, fill {fill} MiB")
        try:
            vm.start()
            seen = guest.wait_mem_ok(0, self.boot_timeout(size))
            capped = self.res.row(size, "bare-cap", "bare QMP RAM written: cpr-reboot, QEMU's default cap")
            if size <= CAPPED_MAX_MIB:
                self.step(size, "bare QMP RAM written, default 128 MiB/s cap: save + load")
                seen = self.bare_round(vm, guest, seen, capped, {}, {"mode": "cpr-reboot"}, False)
            else:
                capped.note = f"skipped (cap: ~{size / 128:.0f} s)"
            self.step(size, "bare QMP RAM written, QEMU's fastest settings: save + load")
            best = self.res.row(
                size,
                "bare-best",
                "bare QMP RAM written: cpr-reboot, mapped-ram + multifd + direct-io, uncapped",
                "no check, no digest, no record",
            )
            seen = self.bare_round(vm, guest, seen, best, BEST_CAPS, BEST_PARAMS, False)
            self.step(size, "virsh-save-like: stop, normal migrate to file uncapped, load, cont")
            virsh = self.res.row(
                size, "virsh", "virsh-save-like: stop + normal migrate file:, uncapped", "max-bandwidth lifted"
            )
            plain = {"mapped-ram": False, "multifd": False}  # the previous load left them on
            self.bare_round(vm, guest, seen, virsh, plain, {**VIRSH_PARAMS}, True)
        finally:
            vm.kill()
            shutil.rmtree(folder, ignore_errors=True)

    # fleet ----------------------------------------------------------------------------------------

    def fleet(self) -> None:
        sd = self.work / "fleet"
        names = ["fleet-f1", "fleet-f2", "fleet-a1", "fleet-a2"]
        guests = {}
        self.step(None, f"fleet: launch 4 x {FLEET_RAM_MIB} MiB (2 RAM in place, 2 RAM written), fill {FLEET_FILL_MIB}")
        for name in names:
            folder = self.folder(name)
            ram = "file" if "-f" in name else "anon"
            cprctl.launch(name, self.argv(folder, FLEET_RAM_MIB, FLEET_FILL_MIB, ram), state_dir=sd)
            guests[name] = Guest(folder)
        seen = {n: g.wait_mem_ok(0, self.boot_timeout(FLEET_RAM_MIB) * 2) for n, g in guests.items()}
        cores = os.cpu_count() or 1
        for parallel, key in ((None, "fleet-par"), (1, "fleet-seq")):
            label = f"parallel={parallel or cores}{' (default)' if parallel is None else ''}"
            self.step(None, f"fleet: save_all + restore_all, {label}")
            row = self.res.row(None, key, f"fleet 4 x {FLEET_RAM_MIB} MiB: save_all + restore_all, {label}")
            t = time.perf_counter()
            saved = cprctl.save_all(parallel=parallel, state_dir=sd)
            row.save_ms.append((time.perf_counter() - t) * 1000)
            saved_at = time.time()
            _require_all(saved, "saved")
            files = [s.state_file for s in cprctl.status(state_dir=sd) if s.state_file]
            sizes = [file_sizes(f) for f in files]
            row.disk_bytes, row.apparent_bytes = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
            as_after_reboot()
            gap = time.time() - saved_at
            t = time.perf_counter()
            restored = cprctl.restore_all(parallel=parallel, state_dir=sd)
            row.load_ms.append((time.perf_counter() - t) * 1000)
            _require_all(restored, "restored")
            row.total_ms.append(row.save_ms[-1] + row.load_ms[-1])
            pauses = [s.last_pause_ms for s in cprctl.status(state_dir=sd) if s.last_pause_ms is not None]
            row.pause_ms.append(max(pauses) - gap * 1000)
            row.note = f"pause = longest of the 4; {len(files)} state files"
            seen = {n: g.wait_mem_ok(seen[n], 300) for n, g in guests.items()}
        for name in names:
            cprctl.stop(name, state_dir=sd)

    # the physical limit ---------------------------------------------------------------------------

    def dd(self) -> None:
        self.step(None, f"dd: O_DIRECT write and read of {DD_MIB} MiB in the state dir")
        self.res.dd_write, self.res.dd_read = dd_bandwidth(self.work)
        row = self.res.row(None, "dd", f"dd O_DIRECT {DD_MIB} MiB, bs=1M, best of {DD_RUNS} (physical limit)")
        row.save_ms.append(DD_MIB * 2**20 / self.res.dd_write * 1000)
        row.load_ms.append(DD_MIB * 2**20 / self.res.dd_read * 1000)
        row.note = f"write {self.res.dd_write / MB:.0f} MB/s, read {self.res.dd_read / MB:.0f} MB/s"
        self.step(None, f"RAM first touch: a new process fills {DD_MIB} MiB it never touched")
        self.res.touch = first_touch()
        row = self.res.row(None, "touch", f"RAM first touch, {DD_MIB} MiB, best of {DD_RUNS} (bounds any load)")
        row.load_ms.append(DD_MIB * 2**20 / self.res.touch * 1000)
        row.note = f"{self.res.touch / MB:.0f} MB/s"

    def run_written(self, sizes: list[int]) -> None:
        """Only cprctl's default RAM-written save + restore and the bare script with the same settings."""
        self.res.machine = machine_info(self.qemu, self.work)
        self.dd()
        for size in sizes:
            self.written_interleaved(size)
            for key in ("cp-mapped", "bare-best"):
                row = self.res.get(size, key)
                if row is not None and row.save_ms:
                    row.note = _join(row.note, _bandwidths(row))

    def run(self, sizes: list[int], fleet: bool) -> None:
        self.res.machine = machine_info(self.qemu, self.work)
        self.dd()
        for size in sizes:
            self.cprctl_in_place(size)
            self.bare_in_place(size)
            self.cprctl_written(size)
            self.bare_written(size)
            for key in ("cp-mapped", "cp-stream", "bare-cap", "bare-best", "virsh"):
                row = self.res.get(size, key)
                if row is not None and row.save_ms:
                    row.note = _join(row.note, _bandwidths(row))
        if fleet:
            self.fleet()


def _join(*parts: str) -> str:
    seen: list[str] = []
    for part in parts:
        for piece in part.split("; "):
            if piece and piece not in seen:
                seen.append(piece)
    return "; ".join(seen)


def _steps(save: dict[str, float], restore: dict[str, float]) -> dict[str, float]:
    return {**{f"save.{k}": v for k, v in save.items()}, **{f"restore.{k}": v for k, v in restore.items()}}


def _require_all(outcomes: list[cprctl.VMOutcome], what: str) -> None:
    bad = [o for o in outcomes if o.outcome != what]
    if bad:
        raise RuntimeError("; ".join(f"{o.name}: {o.outcome} {o.detail}" for o in bad))


def _bandwidths(row: Row) -> str:
    save, load = row.median("save_ms"), row.median("load_ms")
    assert save and load and row.disk_bytes
    return f"save {row.disk_bytes / save / 1e3:.0f} MB/s, load {row.disk_bytes / load / 1e3:.0f} MB/s"


# --------------------------------------------------------------------------------------------------
# Ratios and report


def ratios(res: Results, sizes: list[int]) -> list[Ratio]:
    out_: list[Ratio] = []
    for size in sizes:
        cold, bare = res.get(size, "cp-cold"), res.get(size, "bare-inplace")
        warm = res.get(size, "cp-warm")
        if cold and bare and cold.pause_ms and bare.pause_ms:
            c, b = cold.median("pause_ms"), bare.median("pause_ms")
            assert c is not None and b is not None
            out_.append(Ratio("cold in-place pause: cprctl / bare QMP", size, f"{c / b:.2f}", "<= 1.05", c / b <= 1.05))
            over = c - b
            limit = max(0.05 * c, 10.0)
            out_.append(
                Ratio(
                    "cprctl overhead, cold save + restore in place (pause - bare pause)",
                    size,
                    f"{over:+.0f} ms ({over / c * 100:+.1f} % of {c:.0f} ms)",
                    f"<= {limit:.0f} ms (max(5 %, 10 ms))",
                    over <= limit,
                )
            )
        if warm and warm.pause_ms:
            w = warm.median("pause_ms")
            assert w is not None
            out_.append(Ratio("warm update pause, median", size, f"{w:.1f} ms", "<= 20 ms", w <= 20))
            if cold and cold.pause_ms:
                c = cold.median("pause_ms")
                assert c is not None
                out_.append(Ratio("warm / cold pause (in place)", size, f"{w / c:.3f}"))
        capped = res.get(size, "bare-cap")
        cap_bw, cap_src = float(QEMU_DEFAULT_CAP), "nominal 128 MiB/s"
        if capped and capped.save_ms and capped.disk_bytes:
            cap_bw, cap_src = capped.disk_bytes / (capped.median("save_ms") or 1) * 1000, "measured"
        for key, name in (("cp-mapped", "mapped-ram"), ("cp-stream", "stream"), ("bare-best", "bare QMP, fastest")):
            row = res.get(size, key)
            if not row or not row.save_ms or not row.disk_bytes:
                continue
            judged = key == "cp-mapped"  # the targets are for cprctl's default; the others are for comparison
            written = row.disk_bytes
            save_bw = written / (row.median("save_ms") or 1) * 1000
            load_bw = written / (row.median("load_ms") or 1) * 1000
            migrate = row.step_medians().get("save.migrate")
            extra = f" (migrate step alone: {written / migrate / 1e3 / (res.dd_write / MB):.2f})" if migrate else ""
            out_.append(
                Ratio(
                    f"{name}: save bandwidth / dd write",
                    size,
                    f"{save_bw / res.dd_write:.2f}{extra}",
                    ">= 0.90" if judged else "",
                    save_bw / res.dd_write >= 0.9 if judged else None,
                )
            )
            limit = f"; / RAM first touch: {load_bw / res.touch:.2f}" if res.touch else ""
            out_.append(
                Ratio(
                    f"{name}: load bandwidth / dd read",
                    size,
                    f"{load_bw / res.dd_read:.2f}{limit}",
                    ">= 0.90" if judged else "",
                    load_bw / res.dd_read >= 0.9 if judged else None,
                )
            )
            if key != "bare-best":
                out_.append(
                    Ratio(
                        f"{name}: save speedup vs QEMU's default cap ({cap_src})",
                        size,
                        f"{save_bw / cap_bw:.1f}x",
                        ">= 5x" if judged else "",
                        save_bw / cap_bw >= 5 if judged else None,
                    )
                )
        mapped, best = res.get(size, "cp-mapped"), res.get(size, "bare-best")
        if mapped and best and mapped.save_ms and best.save_ms:
            for what, label in (("save_ms", "save"), ("load_ms", "restore")):
                m, b = mapped.median(what), best.median(what)
                assert m is not None and b is not None
                out_.append(
                    Ratio(
                        f"mapped-ram: whole {label}, cprctl / bare QMP with the same settings",
                        size,
                        f"{m / b:.2f} ({m:,.0f} / {b:,.0f} ms)",
                        f"<= {WRITTEN_TARGET}",
                        m / b <= WRITTEN_TARGET,
                    )
                )
                mw, bw = max(getattr(mapped, what)), max(getattr(best, what))
                out_.append(
                    Ratio(
                        f"mapped-ram: whole {label}, worst run, cprctl / bare QMP",
                        size,
                        f"{mw / bw:.2f} ({mw:,.0f} / {bw:,.0f} ms)",
                    )
                )
                # Round by round (each cprctl run against the bare run next to it in time): what a load that
                # changes from minute to minute disturbs least.
                pairs = [c / b for c, b in zip(getattr(mapped, what), getattr(best, what), strict=False) if b]
                if pairs:
                    out_.append(
                        Ratio(
                            f"mapped-ram: whole {label}, median of the ratios round by round",
                            size,
                            f"{statistics.median(pairs):.2f} (rounds: {', '.join(f'{p:.2f}' for p in pairs)})",
                        )
                    )
                if what == "save_ms" and len(best.flush_ms) == len(best.save_ms):
                    out_.extend(_durable_ratios(size, mapped, best))
        if mapped and best and mapped.pause_ms and best.pause_ms:
            m, b = mapped.median("pause_ms"), best.median("pause_ms")
            assert m is not None and b is not None
            steps = mapped.step_medians()
            # restore.verify runs while QEMU loads; only the wait for it after the load is in the pause
            digest = (
                steps.get("save.digest", 0.0)
                + steps.get("restore.verify_wait", steps.get("restore.verify", 0.0))
                + steps.get("restore.verify_ram", 0.0)
            )
            # The state file's flush runs beside the save's digest (save.sync: until both are done).
            sync = steps.get("save.sync", 0.0)
            flushed = f", the state file's flush after QEMU's write {sync:,.0f} ms" if sync else ""
            out_.append(
                Ratio(
                    "mapped-ram pause: cprctl / bare QMP with the same settings",
                    size,
                    f"{m / b:.2f} ({m - b:+,.0f} ms; digests in the pause {digest:,.0f} ms = "
                    f"{digest / m * 100:.0f} % of it{flushed})",
                )
            )
    par, seq = res.get(None, "fleet-par"), res.get(None, "fleet-seq")
    if par and seq and par.save_ms and seq.save_ms:
        out_.append(
            Ratio(
                "fleet: save_all / restore_all speedup, parallel vs parallel=1",
                None,
                f"{seq.save_ms[0] / par.save_ms[0]:.2f}x / {seq.load_ms[0] / par.load_ms[0]:.2f}x",
            )
        )
    return out_


def _durable_ratios(size: int, mapped: Row, best: Row) -> list[Ratio]:
    """cprctl's whole save against the bare script's followed by an fsync of its state file: both then leave
    the state on disk (cprctl's save flushes it; the bare script's leaves it in the disk's write cache)."""
    durable = [s + f for s, f in zip(best.save_ms, best.flush_ms, strict=True)]
    m, b = statistics.median(mapped.save_ms), statistics.median(durable)
    pairs = [c / d for c, d in zip(mapped.save_ms, durable, strict=False) if d]
    return [
        Ratio(
            "mapped-ram: whole save, cprctl / bare QMP + fsync of its state file",
            size,
            f"{m / b:.2f} ({m:,.0f} / {b:,.0f} ms; the fsync alone {statistics.median(best.flush_ms):,.0f} ms)",
        ),
        Ratio(
            "mapped-ram: whole save, cprctl / bare QMP + fsync, round by round",
            size,
            f"{statistics.median(pairs):.2f} (rounds: {', '.join(f'{p:.2f}' for p in pairs)})",
        ),
    ]


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / MB:,.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


HEAD = ["RAM", "case", "save ms", "load ms", "total ms", "pause ms", "state on disk", "apparent", "runs", "notes"]


def table_rows(res: Results) -> Iterator[list[str]]:
    for row in res.rows.values():
        yield [
            f"{row.size} MiB" if row.size else "—",
            row.case,
            _ms(row.median("save_ms")),
            _ms(row.median("load_ms")),
            _ms(row.median("total_ms")),
            _ms(row.median("pause_ms")),
            _bytes(row.disk_bytes),
            _bytes(row.apparent_bytes),
            str(row.runs) if row.runs else "0",
            row.note,
        ]


def breakdown(res: Results) -> Iterator[str]:
    """Where cprctl's time goes: median timings_ms of each cprctl case."""
    for row in res.rows.values():
        if row.steps and row.size:
            steps = ", ".join(f"{k} {v:.0f}" for k, v in row.step_medians().items())
            yield f"{row.size} MiB, {row.case}: {steps}"


def show(res: Results, rats: list[Ratio]) -> None:
    table = Table(title="cprctl benchmark (medians; ms; pause = STOP→RESUME minus the save/restore gap)")
    for h in HEAD:
        table.add_column(h, justify="right" if h.endswith(("ms", "disk", "apparent", "runs")) else "left")
    for cells in table_rows(res):
        table.add_row(*cells)
    out.print(table)
    rt = Table(title="ratios and the issue's targets")
    for h in ("RAM", "ratio", "value", "target", "verdict"):
        rt.add_column(h)
    for r in rats:
        color = {"PASS": "green", "MISS": "red"}.get(r.verdict, "")
        verdict = f"[{color}]{r.verdict}[/{color}]" if color else ""
        rt.add_row(f"{r.size} MiB" if r.size else "—", r.name, r.value, r.target, verdict)
    out.print(rt)
    out.print("[bold]where cprctl's time goes (median timings_ms):[/bold]")
    for line in breakdown(res):
        out.print(f"  {line}")


def markdown(res: Results, rats: list[Ratio], argv: list[str], runtime_s: float, sizes: list[int], repeat: int) -> str:
    def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows),
        ]

    fills = ", ".join(f"{s} MiB → fill {fill_for(s)} MiB" for s in sizes)
    lines = [
        '# cprctl benchmark (issue "Fast")',
        "",
        f"Command: `{' '.join(argv)}` — total runtime {runtime_s / 60:.1f} min.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in res.machine.items()),
        "",
        "## Method",
        "",
        "- Demo guest under TCG (`-accel tcg -cpu max`, 1 vCPU), q35; the guest dirties `fill` MiB of its RAM "
        f"with an incompressible pattern ({fills}) and re-verifies it every 3 s; every measurement waits for "
        "`mem ok` before it starts and after each restore.",
        "- *save ms*: the whole operation on the running VM until its QEMU is gone (for cprctl: the `save()` "
        "call: check, migrate, digest, quit). *load ms*: until the guest runs again (`restore()`: verify, "
        "start QEMU, load, resume). For `update`, only *total ms* (the `update()` call).",
        "- *pause ms*: the QMP STOP event of the old QEMU to the RESUME event of the new one (QEMU's host "
        "timestamps, as cprctl measures it), minus the idle time the benchmark spends between save and "
        "restore. Between every save and its load the page cache is dropped (`sync; echo 3 > "
        f"/proc/sys/vm/drop_caches`) and the benchmark waits {SETTLE_S:.0f} s: loads read the disk and fill "
        "memory freed long before, like after a host reboot (this VM hands freed memory back to its host). "
        "`update` runs without that (no reboot).",
        "- Bandwidths are the bytes the state file holds on disk (`st_blocks * 512`: the dirtied RAM, the "
        "guest's own pages and the device state) divided by the save or load time, in MB/s (10^6 B/s).",
        "- *state on disk* = `st_blocks * 512`; *apparent* = `st_size` (mapped-ram files are sparse).",
        "- Baseline (a): a bare `qemu.qmp` script (in `bench.py`), QEMU's defaults: `mode=cpr-reboot` "
        "(+ `x-ignore-shared` for RAM in a file), `migrate file:`, poll `query-migrate` every 5 ms, `quit`; "
        "start the same argv + `-incoming defer`, same settings, `migrate-incoming`, wait for `running`. "
        "RAM written under QEMU's default `max-bandwidth` (128 MiB/s) only up to "
        f"{CAPPED_MAX_MIB} MiB.",
        "- Baseline (a'), QEMU at its fastest with no cprctl: the same bare script with what cprctl's plan sets "
        f"(mapped-ram, multifd x {BEST_PARAMS['multifd-channels']}, direct-io, no cap), and no check, digest or "
        "record; it loads with O_DIRECT.",
        "- Baseline (b), what `virsh save` does: `stop`, normal mode, `max-bandwidth` lifted (libvirt lifts "
        "it too for a save to a file), `migrate file:`, `quit`; load with `-incoming defer` and `cont`.",
        f"- Physical limit (c): `dd` of {DD_MIB} MiB with O_DIRECT, bs=1M, in the state directory, best of {DD_RUNS} "
        "(this is a virtual disk: its bandwidth varies from run to run).",
        f"- RAM first touch: a new process fills {DD_MIB} MiB of memory it never touched, best of {DD_RUNS}, "
        "5 s after the last run. Any load does this with the guest's RAM; on this virtual machine freed memory "
        "goes back to the host (virtio-balloon free page reporting), so each first touch costs a host fault.",
        f"- Repetitions: {repeat} runs of each in-place case (median shown); RAM-written cases and the fleet once.",
        "- The stream save runs before the mapped-ram one on the same VM (either order works: every save sets "
        "all the capabilities it could use).",
        "",
        "## Results",
        "",
        *md_table(HEAD, list(table_rows(res))),
        "",
        "## Ratios and targets",
        "",
        *md_table(
            ["RAM", "ratio", "value", "target", "verdict"],
            [[f"{r.size} MiB" if r.size else "—", r.name, r.value, r.target, r.verdict] for r in rats],
        ),
        "",
        "## Where cprctl's time goes (median `timings_ms`)",
        "",
        *(f"- {line}" for line in breakdown(res)),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def written_section(
    res: Results, rats: list[Ratio], argv: list[str], runtime_s: float, sizes: list[int], repeat: int, note: str
) -> str:
    """The ``--written`` run as its own section of RESULTS.md."""
    rows = [r for r in table_rows(res)]
    keep = ("mapped-ram: whole", "mapped-ram pause", "mapped-ram: save bandwidth", "mapped-ram: load bandwidth")
    lines = [
        WRITTEN_TITLE,
        "",
        f"Command: `{' '.join(argv)}` — {runtime_s / 60:.1f} min, {res.machine.get('date', '')}; load average "
        f"{res.machine.get('load average at the start (1, 5, 15 min)', '?')} at the start, "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end (2 cores)." + (f" {note}" if note else ""),
        "",
        f"Two guests ({', '.join(f'{s} MiB, fill {fill_for(s)} MiB' for s in sizes)}, anonymous RAM) are "
        "launched; one is saved and restored by cprctl (the default, mapped-ram), the other by the bare script "
        "with the same settings (mapped-ram, multifd, direct-io, no cap; no check, digest or record), in turn, "
        f"{repeat} rounds each (the guest not measured is paused meanwhile), with the page "
        f"cache dropped and a {SETTLE_S:.0f} s wait between each save and its load (medians shown). *save ms*: "
        "until QEMU is gone; *load ms*: until the guest runs (cprctl's `restore()` also sets the guest clock "
        "through the agent after that). The CLI's start-up is not in these (the API is called).",
        "",
        "| RAM | case | save ms | load ms | total ms | pause ms | state on disk | apparent | runs | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows),
        "",
        "| RAM | ratio | value | target | verdict |",
        "|---|---|---|---|---|",
        *(
            f"| {r.size} MiB | {r.name} | {r.value} | {r.target} | {r.verdict} |"
            for r in rats
            if r.name.startswith(keep)
        ),
        "",
        "Each run, in the order they ran (save ms / load ms, and the host's 1-minute load average as it started):",
        "",
        *(
            f"- {row.size} MiB, {row.case}: "
            + ", ".join(
                f"{a:,.0f} / {b:,.0f} (load {la:.1f})"
                for a, b, la in zip(
                    row.save_ms, row.load_ms, row.load or [float("nan")] * len(row.save_ms), strict=True
                )
            )
            for row in res.rows.values()
            if row.size and row.save_ms
        ),
        "",
        "Where cprctl's time goes (median `timings_ms`):",
        "",
        *(f"- {line}" for line in breakdown(res)),
        "",
    ]
    return "\n".join(lines)


def _section(text: str, title: str) -> str:
    """The section of *text* that starts with the line *title*, up to the next ``## `` heading."""
    start = text.find(title + "\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(title))
    return text[start : end + 1 if end >= 0 else len(text)]


def replace_section(text: str, title: str, section: str) -> str:
    """*text* with its section *title* replaced by *section* (added at the end if absent)."""
    old = _section(text, title)
    if old:
        return text.replace(old, section.rstrip("\n") + "\n")
    return f"{text.rstrip()}\n\n{section.rstrip()}\n"


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main() -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--guest", default="~/.cache/cprctl-guest", help="folder with vmlinuz and initrd.img")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--sizes", default="512,2048,4096", help="guest RAM sizes, MiB (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="512 MiB only")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each in-place case (default: %(default)s)")
    ap.add_argument("--no-fleet", action="store_true", help="skip the 4-VM save_all/restore_all")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temp folder goes (default: %(default)s)")
    ap.add_argument("--out", default=str(here / "RESULTS.md"), help="markdown results (default: %(default)s)")
    ap.add_argument(
        "--warm-update", action="store_true", help="only the warm-update pause cases (options: warm_update.py --help)"
    )
    ap.add_argument(
        "--written",
        action="store_true",
        help="only cprctl's default RAM-written save + restore against the bare script with the same settings "
        f"(--sizes default {WRITTEN_SIZE}, --fill default {WRITTEN_FILL}); replaces its own section of --out",
    )
    ap.add_argument("--fill", help="MiB each guest dirties, one value or one per size (default: by size, see FILL_MIB)")
    ap.add_argument(
        "--issue17",
        action="store_true",
        help="issue 17's goals in one run: --written at 1 and 4 GiB written (--sizes "
        f"{ISSUE17_SIZES}, --fill {ISSUE17_FILLS}, --repeat {ISSUE17_REPEAT}), then --first first warm handovers "
        "(warm_update.py), and a summary of every goal",
    )
    ap.add_argument("--first", type=int, default=20, help="--issue17: first warm handovers each (default: %(default)s)")
    ap.add_argument("--note", default="", help="a line for the results, e.g. what else ran on the machine")
    if "--warm-update" in sys.argv[1:]:
        import warm_update

        return warm_update.main([a for a in sys.argv[1:] if a != "--warm-update"])
    args = ap.parse_args()
    if args.issue17:
        args.written = True
        if args.sizes == ap.get_default("sizes"):
            args.sizes, args.fill = ISSUE17_SIZES, args.fill or ISSUE17_FILLS
        if args.repeat == ap.get_default("repeat"):
            args.repeat = ISSUE17_REPEAT
    if args.written and args.sizes == ap.get_default("sizes"):
        args.sizes = str(WRITTEN_SIZE)
    sizes = [512] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    fills = [int(f) for f in str(args.fill or (WRITTEN_FILL if args.written else "")).split(",") if f.strip()]
    if fills:
        FILL_MIB.update(zip(sizes, fills * len(sizes) if len(fills) == 1 else fills, strict=True))
    if os.geteuid() != 0:
        out.print("[red]run as root: the benchmark drops the page cache before every load[/red]")
        return 2
    guest = Path(args.guest).expanduser()
    if not (guest / "vmlinuz").is_file() or not (guest / "initrd.img").is_file():
        out.print(f"[red]no demo guest in {guest}: run `make guest`[/red]")
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="cprctl-bench-", dir=args.workdir))
    bench = Bench(args, work)
    started = time.monotonic()
    ok = False
    try:
        if args.written:
            bench.run_written(sizes)
        else:
            bench.run(sizes, fleet=not args.no_fleet)
        ok = True
    except KeyboardInterrupt:
        out.print("[red]interrupted[/red]")
    except Exception:
        out.print_exception()
        out.print("[red]benchmark failed; partial results below[/red]")
    finally:
        killed = kill_under(work)
        if killed:
            out.print(f"[dim]killed leftover processes {killed}[/dim]")
        shutil.rmtree(work, ignore_errors=True)
    runtime = time.monotonic() - started
    rats = ratios(bench.res, sizes)
    show(bench.res, rats)
    out.print(f"total runtime {runtime / 60:.1f} min")
    if ok:
        argv = ["benchmarks/bench.py", *sys.argv[1:]]
        out_path = Path(args.out)
        if args.written:
            old = out_path.read_text() if out_path.exists() else "# cprctl benchmark\n"
            section = written_section(bench.res, rats, argv, runtime, sizes, args.repeat, args.note)
            out_path.write_text(replace_section(old, WRITTEN_TITLE, section))
        else:
            text = markdown(bench.res, rats, argv, runtime, sizes, args.repeat)
            old_section = _section(out_path.read_text(), WRITTEN_TITLE) if out_path.exists() else ""
            out_path.write_text(replace_section(text, WRITTEN_TITLE, old_section) if old_section else text)
        out.print(f"wrote {args.out}")
    if ok and args.issue17:
        ok = first_handovers(args, rats)
    return 0 if ok else 1


def first_handovers(args: argparse.Namespace, rats: list[Ratio]) -> bool:
    """``--issue17``'s second part: the first warm handovers (warm_update.py), then every goal in one table."""
    import warm_update

    argv = ["--first", str(args.first), "--sizes", "1024", "--guest", args.guest, "--qemu", args.qemu]
    argv += ["--workdir", args.workdir, "--out", args.out]
    try:
        warm_update.main(argv)
    except KeyboardInterrupt:
        out.print("[red]interrupted[/red]")
        return False
    goals = Table(title="issue 17: every goal of this run")
    for col in ("what", "value", "goal", "verdict"):
        goals.add_column(col)
    for r in rats:
        if r.name.startswith("mapped-ram: whole") and r.size:
            goals.add_row(f"{r.size} MiB: {r.name}", r.value, r.target, r.verdict)
    if warm_update.last_first is not None:
        cp, hand = warm_update.last_first
        if cp.pauses and hand.pauses:
            p50 = statistics.median(cp.pauses) / statistics.median(hand.pauses)
            worst = max(cp.pauses) / max(hand.pauses)
            runs = f"{len(cp.pauses)} + {len(hand.pauses)} runs"
            for what, value, goal in (("p50", p50, 1.1), ("worst", worst, 1.5)):
                row = Ratio(f"first warm handover {what}, cprctl / by hand ({runs})", None, f"{value:.2f}")
                goals.add_row(row.name, row.value, f"<= {goal}", "PASS" if value <= goal else "MISS")
    out.print(goals)
    return True


if __name__ == "__main__":
    sys.exit(main())
