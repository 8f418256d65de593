"""Benchmark of issue 16: each guest's downtime across a real host reboot, cold and kexec, and cprctl's share.

Boots the Debian 13 host VM of the tests (``tests/hostvm.py``: cached image, QEMU under TCG, cprctl
installed with its unit), starts two nested guests under cprctl with ``-accel kvm`` inside it (``file``:
RAM in a shared file, kept in place; ``anon``: anonymous RAM, written to the state file), then reboots the
host with ``cprctl reboot`` and ``cprctl reboot --kexec``, alternating, ``--rounds`` times each. After every
boot both guests must run again with the same guest boot id, their tick counter going on and their RAM
verifying; their timeline (``cprctl status --json``: ``downtime``, ``downtime_shares``,
``downtime_steps_ms``) is collected. Writes its own section of ``RESULTS.md``.

    .venv/bin/python benchmarks/reboot.py [--rounds 3] [--host-boot uefi] [--ram-mib 256] [--fill 64] [--note "..."]

``--host-boot uefi`` (the default) boots the host VM as a Debian host boots: UEFI firmware (OVMF), GRUB with
Debian's 5 s menu, then the kernel; ``kernel`` boots it as the tests do (QEMU's ``-kernel``: no firmware
to speak of and no boot loader, so a cold reboot there skips what a real one has and kexec saves).

Run as root (it boots a VM with QEMU and builds the image on first use, like ``make test-hostvm``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.hostvm: the host VM of the tests
sys.path.insert(0, str(HERE))

from bench import replace_section  # noqa: E402
from common import machine_info  # noqa: E402
from tests.guestvm import guest_dir  # noqa: E402
from tests.hostvm import (  # noqa: E402
    QEMU,
    SMP,
    SRC,
    VENV,
    HostVM,
    cached_image,
    console_text,
    console_ticks,
    launch_nested,
    wait_tick,
)

TITLE = "## Host reboot and kexec: each guest's downtime (issue 16, `reboot.py`)"
GUESTS = ("file", "anon")
KINDS = {"reboot": "cprctl reboot", "kexec": "cprctl reboot --kexec"}
BLOB = "/srv/vms/blob"
GOAL_SHARE = 0.10
GOAL_KEXEC = 0.6
#: What a cold reboot goes through before the kernel, by ``--host-boot``.
COLD = {
    "uefi": "the host VM's reset, its UEFI firmware (OVMF), GRUB with Debian's 5 s menu, GRUB reading the kernel "
    "and initrd, then the kernel: as a Debian host boots",
    "kernel": "the host VM's reset, SeaBIOS loading the kernel QEMU was given (`-kernel`): no boot loader, "
    "less firmware than any real host's",
}


@dataclass
class Round:
    """One host reboot: how, the host's wall time around it, and each guest's status afterwards."""

    kind: str
    n: int
    loadavg: float
    wall_s: float
    kernel: str
    guests: dict[str, dict[str, object]] = field(default_factory=dict)
    #: The load average at the round's end, the CPU seconds the host VM's QEMU got during it, and the boot's
    #: ``systemd-analyze`` line (firmware, loader, kernel, initrd, userspace).
    loadavg_end: float = 0.0
    cpu_s: float = 0.0
    analyze: str = ""

    def total(self, name: str) -> float:
        return float(self.guests[name]["downtime"]["total"])  # type: ignore[index]

    def share(self, name: str) -> float:
        sh = self.guests[name]["downtime_shares"]
        return float(sh["cprctl"]) / float(sh["total"])  # type: ignore[index]


def _ticks(host: HostVM, name: str) -> tuple[str, int, int]:
    text = console_text(host, name)
    last = console_ticks(host, name)[-1]
    return last.boot, last.n, len(text)


def _mem_ok_after(host: HostVM, name: str, mark: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = console_text(host, name)[mark:]
        if "mem BAD" in text or "memfill exited" in text:
            raise RuntimeError(f"{name}: RAM corrupted across the reboot:\n{text[-1500:]}")
        if "mem ok" in text:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no 'mem ok' after the reboot:\n{text[-1500:]}")
        time.sleep(2)


def _assert_back(host: HostVM, before: dict[str, tuple[str, int, int]]) -> None:
    """Every guest runs again: the same boot, the counter on where it stopped, its RAM verifying."""
    for name, (boot, last, mark) in before.items():
        ticks = wait_tick(host, name, last + 1)
        if {t.boot for t in ticks if t.n > last} != {boot}:
            raise RuntimeError(f"{name} rebooted across the host reboot:\n{console_text(host, name)[-1500:]}")
        _mem_ok_after(host, name, mark)


def firmware_argv(name: str, ram: str, ram_mib: int) -> list[str]:
    """A nested guest with no OS: SeaBIOS finds nothing to boot and waits (``reboot-timeout=-1``); a loader
    blob of random bytes fills part of its RAM, so a RAM-written save has real pages to write and load."""
    folder = f"/srv/vms/{name}"
    argv = [
        QEMU, "-accel", "kvm", "-cpu", "max", "-machine", "pc-q35-10.0", "-smp", "1", "-m", f"{ram_mib}M",
        "-display", "none", "-nodefaults", "-boot", "reboot-timeout=-1",
        "-device", f"loader,file={BLOB},addr=0x1000000",
        "-chardev", f"file,id=con0,path={folder}/console.log,append=on", "-serial", "chardev:con0",
    ]  # fmt: skip
    if ram == "file":
        argv += ["-object", f"memory-backend-file,id=ram0,size={ram_mib}M,mem-path={folder}/ram,share=on"]
        argv += ["-machine", "memory-backend=ram0"]
    return argv


def setup(work: Path, ram_mib: int, fill: int, firmware_only: bool, host_boot: str) -> HostVM:
    t = time.monotonic()
    image = cached_image()
    print(f"host image: {time.monotonic() - t:.0f} s", flush=True)
    t = time.monotonic()
    host = HostVM(image, work, guest_dir(), firmware=host_boot)
    print(f"host VM booted ({host_boot}): {time.monotonic() - t:.0f} s", flush=True)
    host.install()
    install_wheel(host, work)
    print(f"cprctl pip-installed: {time.monotonic() - t:.0f} s", flush=True)
    host.wait_kvm()
    if firmware_only:
        host.sh(f"mkdir -p /srv/vms && head -c {fill}M /dev/urandom > {BLOB}")
        for name in GUESTS:
            argv = firmware_argv(name, name, ram_mib)
            host.sh(f"mkdir -p /srv/vms/{name} && cprctl launch {name} -- {shlex.join(argv)}")
        print(f"firmware-only guests up: {time.monotonic() - t:.0f} s", flush=True)
        return host
    for name in GUESTS:
        launch_nested(host, name, ram=name, ram_mib=ram_mib, fill=fill)
    for name in GUESTS:
        # A nested guest's first boot under the host VM's emulated SVM took 2 to 25 min here (load 15-20).
        wait_tick(host, name, 0, timeout=2700)
        _mem_ok_after(host, name, 0, timeout=900)
    print(f"guests up: {time.monotonic() - t:.0f} s", flush=True)
    return host


def install_wheel(host: HostVM, work: Path) -> None:
    """cprctl in the host VM as an operator installs it: a wheel of this checkout (built here, not under TCG)
    installed by pip into the venv, which byte-compiles it, in place of the tests' copy of the sources on the
    venv's path (`HostVM.install`, which writes no bytecode). Without setuptools and wheel, which the image's
    venv has and a venv of ``python3 -m venv`` does not (setuptools' ``.pth`` runs an import at every python
    start). Then its unit again, from the installed command."""
    wheels = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(HERE.parent)],
                   check=True, timeout=600)  # fmt: skip
    whl = next(wheels.glob("cprctl-*.whl"))
    host.put(f"/root/{whl.name}.b64", base64.b64encode(whl.read_bytes()).decode())
    host.sh(
        f"""set -e
base64 -d /root/{whl.name}.b64 > /root/{whl.name}
site=$(echo {VENV}/lib/python3*/site-packages)
rm -rf "$site/cprctl.pth" "$site"/cprctl-*.dist-info {SRC}
{VENV}/bin/pip install -q --no-deps --no-index --disable-pip-version-check /root/{whl.name}
{VENV}/bin/pip uninstall -q -y --disable-pip-version-check setuptools wheel
ln -sf {VENV}/bin/cprctl /usr/local/bin/cprctl
cprctl install-units
sync""",
        timeout=1200,
    )


def one_round(host: HostVM, kind: str, n: int, firmware_only: bool) -> Round:
    plan = host.sh(f"{KINDS[kind]} --dry-run", timeout=300)
    print(plan.strip(), flush=True)
    before = {} if firmware_only else {name: _ticks(host, name) for name in GUESTS}
    load, cpu = os.getloadavg()[0], host.cpu_seconds()
    wall = host.reboot_with(KINDS[kind], timeout=1800)
    _assert_back(host, before)
    st = host.status()
    rnd = Round(kind, n, load, wall, host.sh("uname -r").strip())
    rnd.loadavg_end, rnd.cpu_s = os.getloadavg()[0], host.cpu_seconds() - cpu
    analyze = host.exec("systemd-analyze", check=False).out.strip().splitlines()
    rnd.analyze = analyze[0] if analyze else ""
    for name in GUESTS:
        row = st[name]
        if row["state"] != "running" or not row.get("downtime_shares"):
            raise RuntimeError(f"{name} after {kind}: {row}")
        rnd.guests[name] = {k: row[k] for k in ("downtime", "downtime_shares", "downtime_steps_ms")}
    print(f"{kind} #{n}: host {wall:.0f} s; " + "; ".join(_line(rnd, g) for g in GUESTS), flush=True)
    return rnd


def _line(r: Round, name: str) -> str:
    d = r.guests[name]["downtime"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in d.items() if k != "total")  # type: ignore[union-attr]
    return f"{name} {r.total(name):.1f} s ({parts}; cprctl {100 * r.share(name):.1f} %)"


def host_facts(host: HostVM) -> dict[str, str]:
    """What the host VM says about its boot and about cprctl's start-up (measured inside, once)."""
    out = {}
    out["systemd-analyze"] = host.exec("systemd-analyze", check=False).out.strip().splitlines()[0]
    out["critical chain"] = " ".join(
        host.exec("systemd-analyze critical-chain cprctl-guests.service --no-pager", check=False).out.split()
    )[-600:]
    path = "cprctl._api, cprctl._checkpoint.fleet, cprctl._checkpoint.restore"
    for what, code in (
        ("restore-all through the CLI (`cprctl.cli` and the restore path)", f"import cprctl.cli, {path}"),
        ("restore-all through the unit's entry (`cprctl._boot` and the restore path)", f"import cprctl._boot, {path}"),
    ):
        starts = []
        for _ in range(3):
            t = host.sh(f"cd / && a=$(date +%s%N); {host_python()} -c '{code}'; b=$(date +%s%N); "
                        "echo $(( (b - a) / 1000000 ))")  # fmt: skip
            starts.append(int(t.strip()))
        out[f"python's start and imports of {what}, wall ms (3 runs, warm cache, idle host VM)"] = ", ".join(
            map(str, starts)
        )
    unit = host.exec("systemctl show -p ExecStart --value cprctl-guests.service", check=False).out.strip()
    out["the unit's ExecStart"] = unit[:300]
    return out


def host_python() -> str:
    from tests.hostvm import VENV

    return f"{VENV}/bin/python"


def _med_worst(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def section(rounds: list[Round], facts: dict[str, str], info: dict[str, str], args: argparse.Namespace) -> str:
    lines = [TITLE, ""]
    lines.append(
        f"`benchmarks/reboot.py --rounds {args.rounds} --host-boot {args.host_boot} --ram-mib {args.ram_mib} "
        f"--fill {args.fill}{' --firmware-only' if args.firmware_only else ''}`, {info['date']}. The Debian 13 host VM "
        f"(tests/hostvm.py: {info.get('smp', '2')} vCPU(s) under TCG (runs before 30 Nov 12:00: 2), 3 GiB, QEMU "
        "10.0.13 and cprctl with its unit inside) runs two "
        f"nested guests with `-accel kvm` (the host VM's emulated SVM): `file` ({args.ram_mib} MiB in a "
        f"shared file, kept in place) and `anon` ({args.ram_mib} MiB anonymous, written as mapped-ram), "
        + (
            f"**with no OS**: SeaBIOS finds nothing to boot and waits, {args.fill} MiB of random bytes loaded "
            "into RAM (`-device loader`); the demo guests' first boot inside took over 20 min at this machine's "
            "load (tests/test_hostvm.py checks a real guest's boot and RAM across the same reboots). "
            if args.firmware_only
            else f"the demo guest dirtying {args.fill} MiB; after each round both ran again with the same guest "
            "boot, the tick counter continuous and RAM verifying. "
        )
        + f"Each round is `cprctl reboot` ({COLD[args.host_boot]}) or "
        "`cprctl reboot --kexec` (no firmware, no boot loader: the new kernel straight from the old); after each, "
        "`status` showed both running. **This machine is "
        "shared and loaded** (other helpers' QEMUs under TCG on its 2 cores; load average at each round's "
        "start in the last table): absolute numbers are slow and noisy."
    )
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        "cprctl's own share (`cprctl status --json`: `downtime_shares`, `timeline.shares`) is the downtime less "
        "QEMU's own work (its migration after the guest stopped; at boot its process start less the scope's "
        "`systemd-run`, its load from `migrate-incoming` on, and its `cont`) and less the host's (the shutdown "
        "after this VM's save, the other VMs' saves included, then firmware, boot loader or kexec, the kernel, "
        "systemd up to the unit): the save's digest and flush, python's start and imports at boot "
        "(`queue_python`), every VM's state (`queue_states`), the state file's checks (`check`), the scope's "
        "`systemd-run` (`spawn`), QEMU's migration parameters (`setup`), the RAM's verification "
        "(`verify_wait`, `verify_ram`) and the records' fsyncs (`resume` less `cont`). The clocks of two boots "
        "are compared (each read from the RTC at boot, 1 s resolution, no NTP in the host VM): ±1 s.",
    ]
    lines += ["", "| how | guest | rounds | downtime median s | worst s | cprctl's share median | worst | goal |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    med: dict[tuple[str, str], float] = {}
    for kind in KINDS:
        for g in GUESTS:
            rs = [r for r in rounds if r.kind == kind]
            if not rs:
                continue
            tm, tw = _med_worst([r.total(g) for r in rs])
            sm, sw = _med_worst([r.share(g) for r in rs])
            med[kind, g] = tm
            ok = "PASS" if sw <= GOAL_SHARE else "MISS"
            lines.append(
                f"| {kind} | {g} | {len(rs)} | {tm:.1f} | {tw:.1f} | {100 * sm:.1f} % | {100 * sw:.1f} % "
                f"| ≤ 10 %: {ok} |"
            )
    if all((k, g) in med for k in KINDS for g in GUESTS):
        lines += ["", "| guest | kexec ÷ reboot (medians) | goal |", "|---|---|---|"]
        for g in GUESTS:
            ratio = med["kexec", g] / med["reboot", g]
            lines.append(f"| {g} | {ratio:.2f} | ≤ {GOAL_KEXEC}: {'PASS' if ratio <= GOAL_KEXEC else 'MISS'} |")
    segs = ("save", "shutdown", "reboot", "kernel", "boot", "queue", "restore")
    lines += ["", "Median seconds of each segment (`status`'s `downtime`) and of each share:", "",
              "| how | guest | " + " | ".join(segs) + " | QEMU | host | cprctl |",
              "|---|---|" + "---|" * (len(segs) + 3)]  # fmt: skip
    for kind in KINDS:
        for g in GUESTS:
            rs = [r for r in rounds if r.kind == kind]
            if not rs:
                continue
            cells = [statistics.median(float(r.guests[g]["downtime"].get(s, 0.0)) for r in rs) for s in segs]  # type: ignore[attr-defined]
            shares = [
                statistics.median(float(r.guests[g]["downtime_shares"][k]) for r in rs)  # type: ignore[index]
                for k in ("qemu", "host", "cprctl")
            ]
            lines.append(f"| {kind} | {g} | " + " | ".join(f"{c:.2f}" for c in [*cells, *shares]) + " |")
    steps = sorted({k for r in rounds for g in GUESTS for k in r.guests[g]["downtime_steps_ms"]["restore"]})  # type: ignore[index]
    lines += ["", "Median ms of each restore step at boot (`downtime_steps_ms`; `start` includes `spawn`, "
              "the scope's systemd-run; `verify` runs beside `load`; `queue_python` and `queue_states` are the "
              "first two parts of the `queue`, before any restore):", "",
              "| how | guest | " + " | ".join(steps) + " |", "|---|---|" + "---|" * len(steps)]  # fmt: skip
    for kind in KINDS:
        for g in GUESTS:
            rs = [r for r in rounds if r.kind == kind]
            if rs:
                vals = [
                    statistics.median(float(r.guests[g]["downtime_steps_ms"]["restore"].get(s, 0.0)) for r in rs)  # type: ignore[index]
                    for s in steps
                ]
                lines.append(f"| {kind} | {g} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
    lines += ["", "Every round (seconds; the host's wall time is from `cprctl reboot` to the agent answering "
              "in a booted system; load average at its start and end; CPU seconds the host VM's QEMU got in it; "
              "the boot's `systemd-analyze`):", "",
              "| # | how | kernel after | load avg | host wall | host VM CPU | file | anon | systemd-analyze |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rounds:
        lines.append(
            f"| {r.n} | {r.kind} | {r.kernel} | {r.loadavg:.1f} to {r.loadavg_end:.1f} | {r.wall_s:.0f} "
            f"| {r.cpu_s:.0f} | {_line(r, 'file')} | {_line(r, 'anon')} | {r.analyze} |"
        )
    if facts:
        lines += ["", "Inside the host VM (after the first round's boot):", ""]
        lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "This machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), ""]
    return "\n".join(lines)


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each kind (default: %(default)s)")
    ap.add_argument("--kinds", default="reboot,kexec", help="(default: %(default)s)")
    ap.add_argument("--ram-mib", type=int, default=128)
    ap.add_argument("--fill", type=int, default=32, help="MiB each guest dirties (default: %(default)s)")
    ap.add_argument(
        "--firmware-only",
        action="store_true",
        help="nested guests with no OS (SeaBIOS waiting, --fill MiB of random bytes loaded in RAM): no first boot",
    )
    ap.add_argument(
        "--host-boot",
        choices=("uefi", "kernel"),
        default="uefi",
        help="how the host VM boots cold: uefi (OVMF, GRUB, the kernel: as a Debian host) or kernel (QEMU's "
        "-kernel, as the tests) (default: %(default)s)",
    )
    ap.add_argument("--note", default="", help="a line added to the section (e.g. what else ran)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--raw", default="", help="also write every round as JSON here")
    ap.add_argument("--from-raw", default="", help="write the section from a --raw file of an earlier run (no VM)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.from_raw:
        rounds = [Round(**r) for r in json.loads(Path(args.from_raw).read_text())]
        raw = Path(args.from_raw)
        facts_file = raw.with_suffix(".facts.json")
        facts = json.loads(facts_file.read_text()) if facts_file.exists() else {}
        info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(raw.stat().st_mtime)), "from": str(raw)}
        out = Path(args.out)
        text = section(rounds, facts, info, args)
        print(text)
        out.write_text(replace_section(out.read_text() if out.exists() else "# Results\n", TITLE, text))
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    work = Path(tempfile.mkdtemp(prefix="cprctl-bench-reboot.", dir="/var/tmp"))
    host: HostVM | None = None
    rounds: list[Round] = []
    try:
        info = machine_info("qemu-system-x86_64", work) | {"smp": SMP}
        host = setup(work, args.ram_mib, args.fill, args.firmware_only, args.host_boot)
        facts: dict[str, str] = {}
        for n in range(1, args.rounds + 1):
            for kind in kinds:
                rounds.append(one_round(host, kind, n, args.firmware_only))
                if args.raw:
                    Path(args.raw).write_text(json.dumps([r.__dict__ for r in rounds], indent=1))
                if not facts:  # once, after the first reboot (a run cut short has them too)
                    facts = host_facts(host)
                    print(json.dumps(facts, indent=1), flush=True)
                    if args.raw:
                        Path(args.raw).with_suffix(".facts.json").write_text(json.dumps(facts, indent=1))
        text = section(rounds, facts, info, args)
        print(text)
        out = Path(args.out)
        out.write_text(replace_section(out.read_text() if out.exists() else "# Results\n", TITLE, text))
        return 0
    except BaseException:
        if host:
            print(host.tail(), file=sys.stderr)
        for r in rounds:
            print(f"{r.kind} #{r.n}: " + "; ".join(_line(r, g) for g in GUESTS), file=sys.stderr)
        raise
    finally:
        if host:
            host.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
