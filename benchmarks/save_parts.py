#!/usr/bin/env python3
"""Where a mapped-ram save's time after QEMU's write goes (issue 17), part by part.

One demo guest (anonymous RAM, most of it dirtied) is saved again and again by a bare QMP script with
cprctl's settings (mapped-ram, multifd, direct-io, no cap; `bench.BEST_CAPS`/`BEST_PARAMS`); after each
save the guest runs on (``cont``) until its next ``mem ok``. Each save is one of:

- ``none``: QEMU's write alone;
- ``during``: cprctl's RAM digest (`ramdigest.digests`) from the stop on, beside QEMU's write, as a save does;
- ``after``: the same digest once QEMU's write completed (QEMU stopped and idle);

and then, one after another, each timed: the file's mapped-ram layout, the digest of its other bytes
(`statefile.device_digest`), an fsync of the file. Prints each save's ms (from the ``migrate`` command)
and the medians. Run as root::

    .venv/bin/python benchmarks/save_parts.py [--size 1280] [--fill 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from cprctl._checkpoint import ramdigest, statefile
from cprctl._demo import guest_argv
from cprctl._qemu.ramblocks import parse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BEST_CAPS, BEST_PARAMS, BareVM, _query, _setup
from common import Guest, fsync_ms

STOPPED = {"finish-migrate", "postmigrate", "paused"}
MODES = ("none", "during", "after")


async def save(vm: BareVM, pid: int, path: Path, mode: str) -> dict[str, float]:
    """One save of *vm* (QEMU *pid*) to *path* in *mode*; ms of each part since the ``migrate`` command."""
    qmp = await vm.connect()
    r: dict[str, float] = {}
    try:
        await _setup(qmp, BEST_CAPS, BEST_PARAMS)
        blocks = parse(str(await qmp.execute("human-monitor-command", {"command-line": "info ramblock"})))
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()

        def since() -> float:
            return (time.perf_counter() - t0) * 1000

        def hashing() -> None:
            start = time.perf_counter()
            ramdigest.digests(pid, blocks)
            r["hash_end"], r["hash_alone"] = since(), (time.perf_counter() - start) * 1000

        await qmp.execute("migrate", {"uri": f"file:{path}"})
        while (await _query(qmp, "query-status"))["status"] not in STOPPED:
            await asyncio.sleep(0.002)
        r["stopped"] = since()
        digest = threading.Thread(target=hashing)
        if mode == "during":
            digest.start()
        while (info := await _query(qmp, "query-migrate"))["status"] != "completed":
            if info["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
            await asyncio.sleep(0.005)
        r["migrate"] = since()
        if mode == "after":
            digest.start()
        if mode != "none":
            digest.join()
        t = time.perf_counter()
        layout = statefile.mapped_ram_layout(path)
        r["layout"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        statefile.device_digest(path, layout)
        r["device"] = (time.perf_counter() - t) * 1000
        r["fsync"] = fsync_ms(path)
        r["total"] = since()
        await qmp.execute("cont")
    finally:
        await qmp.disconnect()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", default="~/.cache/cprctl-guest", help="folder with vmlinuz and initrd.img")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--size", type=int, default=1280, help="guest RAM, MiB")
    ap.add_argument("--fill", type=int, default=1000, help="MiB the guest dirties")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--workdir", default="/var/tmp")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if unknown := set(modes) - set(MODES):
        ap.error(f"unknown modes: {', '.join(sorted(unknown))}")
    work = Path(a.workdir) / f"save-parts-{os.getpid()}"
    work.mkdir(parents=True)
    argv = guest_argv(a.qemu, Path(a.guest).expanduser(), work, ram_mib=a.size, fill_mib=a.fill, ram="anon")
    vm, guest = BareVM(argv, work), Guest(work)
    vm.start()
    assert vm.proc is not None
    try:
        seen = guest.wait_mem_ok(0, 600)
        results: dict[str, list[dict[str, float]]] = {}
        for _ in range(a.rounds):
            for mode in modes:
                os.sync()  # each save starts with nothing left to write back
                time.sleep(2)
                load = os.getloadavg()[0]
                r = asyncio.run(save(vm, vm.proc.pid, work / "state.mig", mode))
                results.setdefault(mode, []).append(r)
                print(f"{mode:6} load {load:4.1f}  " + "  ".join(f"{k} {v:,.0f}" for k, v in r.items()), flush=True)
                seen = guest.wait_mem_ok(seen, 300)
        for mode, rs in results.items():
            medians = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            print(f"median {mode:6} " + "  ".join(f"{k} {v:,.0f}" for k, v in medians.items()))
    finally:
        vm.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
