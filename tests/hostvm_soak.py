"""A soak of the host VM's own faults (not a test): boot the cached host VM, install the checkout, then launch
the two nested guests of test_hostvm.py again and again (first boots: where the host VM's kernel panicked and
the file guest's QEMU exited early), watching its console for a panic and the guests for their first ticks.

    PYTHONPATH=src python -m tests.hostvm_soak --variant base --minutes 10 --out /var/tmp/soak.jsonl

Each cycle: launch both guests side by side, wait for each guest's third tick (a guest whose QEMU exited is
recorded and launched again), let them run a little, stop and remove both (RAM file too), again. One JSON line
per event in --out. Options change the outer QEMU (--accel, --cpu, --smp), the host VM's kernel command line
(--append), the nested guests (--nested-cpu, --prealloc, --nested-extra, --only one of them), run commands in the
host VM before the first launch (--host-sh), move and write back its pages all along (--churn) or trace KVM's
exits, injections and CR accesses in the host VM (--trace: the trace's tail goes with a guest's exit). Each nested
QEMU logs its resets and guest errors to /srv/vms/NAME/debug.log inside.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from . import hostvm
from .guestvm import guest_dir
from .hostvm import HostVM, cached_image, console_text, console_ticks, launch_all, launch_nested

GUESTS: dict[str, dict[str, object]] = {"file": {"ram": "file", "fill": 8}, "anon": {"ram": "anon", "fill": 8}}


#: Moves and writes back the guests' RAM pages all the time: each move or write-protect is an mmu-notifier zap of
#: KVM's nested page tables, the old page freed for reuse (compaction), or written back (sync).
CHURN = "while :; do echo 1 > /proc/sys/vm/compact_memory; sync; sleep 10; done"


TRACE_ON = """cd /sys/kernel/tracing && echo 40000 > buffer_size_kb
for e in kvm_exit kvm_inj_exception kvm_cr kvm_emulate_insn kvm_userspace_exit kvm_inj_virq kvm_page_fault kvm_msr; do
  echo 1 > events/kvm/$e/enable; done; echo 1 > tracing_on"""


class Panicked(Exception):
    pass


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = open(args.out, "a")  # noqa: SIM115
        self.t0 = time.monotonic()

    def log(self, event: str, **kw: Any) -> None:
        row = {
            "variant": self.args.variant,
            "event": event,
            "t": round(time.monotonic() - self.t0),
            "load": load(),
            **kw,
        }
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()
        print(json.dumps(row)[:400], flush=True)


def patch_outer(args: argparse.Namespace) -> None:
    """Rewrite the host VM's QEMU command line (HostVM.start hard-codes it) for this variant."""

    def popen(argv: list[str], *a: Any, **kw: Any) -> subprocess.Popen[bytes]:
        argv = list(argv)
        for opt, val in (("-accel", args.accel), ("-cpu", args.cpu), ("-smp", args.smp)):
            if val:
                argv[argv.index(opt) + 1] = val
        print("host VM:", shlex.join(argv), flush=True)
        return subprocess.Popen(argv, *a, **kw)

    class Proxy:
        def __getattr__(self, name: str) -> Any:
            return getattr(subprocess, name)

    proxy = Proxy()
    proxy.Popen = popen  # type: ignore[attr-defined]
    hostvm.subprocess = proxy  # type: ignore[assignment,attr-defined]


def patch_nested(args: argparse.Namespace) -> None:
    orig = hostvm.nested_argv

    def nested(name: str, **kw: Any) -> list[str]:
        argv = orig(name, **kw)
        if args.nested_cpu:
            argv[argv.index("max,-svm")] = args.nested_cpu
        if args.prealloc:
            argv = [a + ",prealloc=on" if a.startswith("memory-backend-file,") else a for a in argv]
        argv += [
            "-d", "cpu_reset,guest_errors,unimp", "-D", f"/srv/vms/{name}/debug.log",
            *shlex.split(args.nested_extra),
        ]  # fmt: skip
        return argv

    hostvm.nested_argv = nested


def alive(vm: HostVM, name: str) -> bool:
    return vm.exec(f"pgrep -f '[/]srv/vms/{name}/'", check=False).rc == 0


def guest_report(vm: HostVM, name: str) -> str:
    script = f"""cprctl status; dmesg | tail -n 15
echo "-- qemu.log:"; tail -c 2000 /var/lib/cprctl/vms/{name}/qemu.log
journalctl -b --no-pager -o cat -u 'cprctl-{name}.scope' | tail -n 8
echo "-- trace:"; tail -n 150 /sys/kernel/tracing/trace 2>/dev/null
echo "-- debug.log:"; grep -v '^ahci' /srv/vms/{name}/debug.log | tail -c 3000
echo "-- console:"; tail -c 800 /srv/vms/{name}/console.log"""
    return vm.exec(script, timeout=120, check=False).out


def check(vm: HostVM) -> None:
    try:
        vm.check_alive()
    except AssertionError as exc:
        raise Panicked(str(exc)) from exc


def cycle(soak: Soak, vm: HostVM, n: int, deadline: float) -> bool:
    """One launch of both guests up to their third ticks; False when the run's time is up first."""
    vm.exec("cprctl status >/dev/null", check=False)
    soak.log("launch", cycle=n)
    start = time.monotonic()
    launch_all(vm, GUESTS)
    waiting = set(GUESTS)
    while waiting:
        check(vm)
        if time.monotonic() > deadline:
            soak.log("timeout", cycle=n, waiting=sorted(waiting), after=round(time.monotonic() - start))
            return False
        for name in sorted(waiting):
            if any(t.n > 2 for t in console_ticks(vm, name)):
                waiting.discard(name)
                soak.log("ticked", cycle=n, guest=name, after=round(time.monotonic() - start))
            elif not alive(vm, name):
                check(vm)
                soak.log("exited", cycle=n, guest=name, after=round(time.monotonic() - start),
                         report=guest_report(vm, name))  # fmt: skip
                vm.exec(f"cprctl remove {name}; rm -rf /srv/vms/{name}", check=False)
                launch_nested(vm, name, **GUESTS[name])
        time.sleep(3)
    time.sleep(soak.args.settle)
    check(vm)
    bad = {name: "mem BAD" in console_text(vm, name) for name in GUESTS}
    if any(bad.values()):
        soak.log("membad", cycle=n, bad=bad)
    script = "; ".join(f"cprctl stop {g}; cprctl remove {g}; rm -rf /srv/vms/{g}" for g in GUESTS)
    vm.exec(script, timeout=300, check=False)
    return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--out", default="/var/tmp/cprctl-soak.jsonl")
    p.add_argument("--append", default="kvm_amd.vgif=0")
    p.add_argument("--accel", default="")
    p.add_argument("--cpu", default="")
    p.add_argument("--smp", default="")
    p.add_argument("--nested-cpu", default="")
    p.add_argument("--prealloc", action="store_true")
    p.add_argument("--nested-extra", default="")
    p.add_argument("--host-sh", default="")
    p.add_argument("--settle", type=float, default=15)
    p.add_argument("--only", default="", help="launch only this guest")
    p.add_argument("--trace", action="store_true", help="trace KVM's exits, injections and CR writes in the host VM")
    p.add_argument("--churn", action="store_true", help="compact memory and sync in a loop in the host VM")
    args = p.parse_args()
    patch_outer(args)
    patch_nested(args)
    soak = Soak(args)
    image = cached_image()
    work = Path(tempfile.mkdtemp(prefix="cprctl-soak.", dir="/var/tmp"))
    soak.log("start", args=vars(args), work=str(work))
    vm: HostVM | None = None
    cycles = 0
    try:
        vm = HostVM(image, work, guest_dir(), append=args.append)
        soak.log("booted")
        vm.install()
        vm.wait_kvm()
        params = vm.sh("cd /sys/module/kvm_amd/parameters && grep -H . npt vgif nested; uname -r; cat /proc/cmdline")
        soak.log("installed", params=params)
        if args.churn:
            vm.spawn(CHURN)
        if args.only:
            for name in set(GUESTS) - {args.only}:
                del GUESTS[name]
        if args.trace:
            vm.sh(TRACE_ON)
        if args.host_sh:
            soak.log("host-sh", out=vm.sh(args.host_sh))
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            if not cycle(soak, vm, cycles, deadline):
                break
            cycles += 1
        check(vm)
        soak.log("end", cycles=cycles, panic=False, cpu=vm.cpu_seconds())
    except Exception as exc:
        panic = vm.panic_since(0) if vm else ""
        soak.log("end", cycles=cycles, panic=bool(panic), error=repr(exc)[:300], console=panic[-5000:],
                 cpu=vm.cpu_seconds() if vm and vm.proc.poll() is None else None)  # fmt: skip
    finally:
        if vm:
            shutil.copy(vm.console, Path(args.out).with_suffix(f".{args.variant}.{int(time.time())}.console"))
            vm.stop()
            shutil.rmtree(vm.work, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
