"""A QEMU package upgrade on a host with running VMs: how long is each guest down, before and after update-all?

    .venv/bin/python benchmarks/upgrade.py --guest ~/.cache/cprctl-guest [--vms 3] [--out benchmarks/UPGRADE.md]

Needs root. The VMs run on /usr/bin/qemu-system-x86_64, and the upgrade is real: the QEMU system packages
cached in /var/cache/apt/archives are installed again with ``apt-get install --reinstall``, which replaces
the binary on disk by a rename, as any upgrade does (same version: what changes is the file, not the code).

- **save-all flow** (what the rolling playbook did before): ``save-all``, the upgrade, ``restore-all``. Each
  guest is down from its save's stop to its restore's resume: the whole apt run falls inside the pause.
- **update-all flow** (now): the upgrade while the VMs run, then ``update-all``: each VM moves warm onto the
  binary now on disk.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cprctl
from cprctl._demo import guest_argv

QEMU = "/usr/bin/qemu-system-x86_64"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")


def debs() -> list[str]:
    """The cached .debs of the installed QEMU version, one per package in `PACKAGES`."""
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "qemu-system-x86"], capture_output=True, text=True, check=True
    ).stdout.replace(":", "%3a")
    found = [glob.glob(f"/var/cache/apt/archives/{p}_{version}_*.deb") for p in PACKAGES]
    if not all(found):
        sys.exit(f"upgrade: no cached .deb of {', '.join(PACKAGES)} {version} (apt-get install --download-only)")
    return [f[0] for f in found]


def upgrade(packages: list[str]) -> float:
    """Install *packages* again (the binary is replaced on disk); seconds it took."""
    t = time.perf_counter()
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--reinstall", "-o", "DPkg::Lock::Timeout=300", *packages],
        check=True,
        capture_output=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return time.perf_counter() - t


def launch(names: list[str], sd: Path, work: Path, guest: Path) -> None:
    for name in names:
        folder = work / name
        folder.mkdir()
        cprctl.launch(name, guest_argv(QEMU, guest, folder, ram_mib=512, fill_mib=128), agent=True, state_dir=sd)
    for name in names:
        wait_for(work / name / "console.log", r"mem ok")


def wait_for(console: Path, pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, console.read_text(errors="replace") if console.exists() else ""):
        if time.monotonic() > deadline:
            sys.exit(f"upgrade: {pattern!r} not seen in {console}")
        time.sleep(0.2)


def save_all_flow(sd: Path, packages: list[str]) -> tuple[list[float], float]:
    cprctl.save_all(state_dir=sd)
    apt_s = upgrade(packages)
    outcomes = cprctl.restore_all(state_dir=sd)
    if any(o.outcome != "restored" for o in outcomes):
        sys.exit(f"upgrade: restore-all failed: {outcomes}")
    return [o.pause_ms or 0.0 for o in outcomes], apt_s


def update_all_flow(sd: Path, packages: list[str]) -> tuple[list[float], float]:
    apt_s = upgrade(packages)
    if not all(st.binary_replaced for st in cprctl.status(state_dir=sd)):
        sys.exit("upgrade: the reinstall did not replace the binary of every VM")
    outcomes = cprctl.update_all(state_dir=sd)
    if any(o.outcome != "updated" or not o.warm for o in outcomes):
        sys.exit(f"upgrade: update-all did not move every VM warm: {outcomes}")
    return [o.pause_ms or 0.0 for o in outcomes], apt_s


def report(rows: dict[str, tuple[list[float], float]], vms: int) -> str:
    lines = [
        "# A QEMU package upgrade with running VMs (`benchmarks/upgrade.py`)",
        "",
        f"{vms} demo guests (512 MiB, RAM in a shared file, 128 MiB dirtied, TCG) on {QEMU}; the upgrade is",
        f"`apt-get install --reinstall` of the cached {', '.join(PACKAGES)} .debs (the binary is replaced by a",
        "rename). Pause: the guest's STOP to its RESUME (QMP timestamps), as cprctl records it.",
        "",
        "| flow | apt run (s) | pause per VM, median (ms) | max (ms) | host's total VM downtime (s) |",
        "|---|---|---|---|---|",
    ]
    for flow, (pauses, apt_s) in rows.items():
        lines.append(
            f"| {flow} | {apt_s:.1f} | {statistics.median(pauses):.1f} | {max(pauses):.1f} | {sum(pauses) / 1000:.2f} |"
        )
    lines += ["", f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--guest", type=Path, default=Path.home() / ".cache" / "cprctl-guest")
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("upgrade: needs root (apt-get)")
    packages = debs()
    work = Path(tempfile.mkdtemp(prefix="cprctl-upg-", dir="/var/tmp"))
    sd = work / "state"
    names = [f"vm{i}" for i in range(args.vms)]
    try:
        launch(names, sd, work, args.guest)
        rows = {"save-all, upgrade, restore-all": save_all_flow(sd, packages)}
        rows["upgrade while running, update-all"] = update_all_flow(sd, packages)
        for name in names:
            wait_for(work / name / "console.log", r"mem ok(?![\s\S]*mem BAD)")
    finally:
        for st in cprctl.status(state_dir=sd):
            if st.state == "running":
                cprctl.stop(st.name, state_dir=sd)
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args.vms)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
