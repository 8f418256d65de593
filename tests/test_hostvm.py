"""Real host reboots: a Debian 13 host VM (tests/hostvm.py) rebooted, kexec'd and crashed with VMs inside.

Two nested guests run under ``cprctl-guests.service``: ``file`` with its RAM in a shared file (kept in
place across the reboot) and ``anon`` with anonymous RAM (written to the state file). After every reboot
both must run again with the same guest boot id, the tick counter going on where it stopped and their RAM
pattern verifying. The tests share one host VM and run in order; each leaves both guests running. Five host
boots in all: ``systemctl reboot``, ``cprctl reboot --kexec``, a power cut right after ``save-all --reboot``
whose boot is cut again in the middle of its ``restore-all``, and last a cut in the middle of ``save-all``
(its unsaved guest boots afresh).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cprctl._demo import TICK

from .guestvm import guest_dir
from .hostvm import (
    CRASH_WHEN,
    POWER_CUT,
    HostVM,
    cached_image,
    console_text,
    console_ticks,
    launch_all,
    launch_nested,
    wait_tick,
)

pytestmark = [pytest.mark.qemu, pytest.mark.hostvm]

if os.geteuid() != 0 or not shutil.which("mmdebstrap") or not shutil.which("mkfs.ext4"):
    pytest.skip("needs root, mmdebstrap and mkfs.ext4 (scripts/install-deps.sh)", allow_module_level=True)

FILL = 8
#: A nested guest's first boot: the guest with its RAM in a file took 773 s (339 s of the host VM's CPU) at a
#: load of 10-16 on 2 cores (each of its first page touches goes through the host VM's emulated nested paging
#: and ext4); the one with anonymous RAM a few minutes.
FIRST_BOOT_S = 1800
GUESTS: dict[str, dict[str, object]] = {"file": {"ram": "file", "fill": FILL}, "anon": {"ram": "anon", "fill": FILL}}


#: Given to the host VM's kernel: KVM without virtual GIF, which the host VM's SVM (emulated by TCG) offers (see
#: *The host VM's own faults* in the README: the host VM's kernel panicked under its KVM, with and without it).
#: Not ``kvm_amd.npt=0``: QEMU 10.0's TCG checks a nested guest's CR3/CR4 reads against KVM's CR0-read intercept
#: (the new decoder's ``if (decode->e.intercept)`` in decode_op, X86_TYPE_C: READ_CR0 is 0), so under KVM's shadow
#: paging a guest reads the shadow CR3 and both nested guests triple-fault early in their boot, after 10-14 s of
#: their CPU (20 of 20 launches, tests/hostvm_soak.py, 30 Nov).
KVM_AMD = "kvm_amd.vgif=0"


@pytest.fixture(scope="module")
def host() -> Iterator[HostVM]:
    phases = Phases()
    image = cached_image()
    phases.done(f"host image ({image.folder.name})")
    work = Path(tempfile.mkdtemp(prefix="cprctl-hostvm.", dir="/var/tmp"))
    vm: HostVM | None = None
    try:
        vm = phases.vm = HostVM(image, work, guest_dir(), append=KVM_AMD)
        phases.done("host VM booted")
        try:
            set_up(vm, phases)
        except Exception as failure:
            again(vm, failure, "the set-up")
            set_up(vm, phases)
        CLEAN["mark"] = vm.console_mark()
        yield vm
    except BaseException:
        if vm:
            print(vm.tail())
        raise
    finally:
        if vm:
            vm.stop()
            shutil.rmtree(vm.work, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def set_up(vm: HostVM, phases: Phases) -> None:
    """Install the checkout in the booted host VM, launch the guests, wait for their first ticks."""
    vm.install()
    phases.done("checkout installed")
    vm.wait_kvm()
    phases.done("/dev/kvm")
    print("hostvm set-up: kvm_amd", vm.sh("cd /sys/module/kvm_amd/parameters && grep -H . npt vgif nested").split())
    launch_all(vm, GUESTS)
    phases.done("guests launched")
    for name in GUESTS:
        try:
            wait_first_tick(vm, name)
        except GuestExited as exc:
            if RELAUNCHED:
                raise
            RELAUNCHED.append(name)
            loud(f"{name}'s QEMU EXITED in its first boot: launching it again ONCE.", str(exc))
            vm.exec(f"cprctl remove {name}; rm -rf /srv/vms/{name}", check=False)
            launch_nested(vm, name, **GUESTS[name])
            wait_first_tick(vm, name)
        wait_mem_ok(vm, name, 0)
        phases.done(f"guest {name} ticking, its RAM checked")


def loud(headline: str, detail: str) -> None:
    """Print a retry of the host VM's own fault so that no one misses it in the output."""
    bar = "!" * 100
    print(f"\n{bar}\n!!! {headline}\n{detail}\n{bar}")


#: What was run again after a panic of the host VM's kernel (at most one thing per module).
RETRIED: list[str] = []
#: The host VM's console offset where the last test (or the set-up) passed: a panic past it fails what runs next.
CLEAN = {"mark": 0}


def again(vm: HostVM, failure: Exception, what: str) -> None:
    """After *failure* in *what*: when the host VM's kernel panicked (on its console since the last test passed),
    boot a fresh host VM in its place, loudly; anything else (a product failure, say) is raised as it is. Once per
    module."""
    panic = vm.panic_since(CLEAN["mark"])
    if not panic or RETRIED:
        raise failure
    RETRIED.append(what)
    loud(
        f"THE HOST VM'S KERNEL PANICKED in {what} (its emulated SVM, not cprctl): booting a fresh host VM and"
        f" running {what} again ONCE.\n!!! The failure: {failure!r}",
        panic,
    )
    old = vm.work
    vm.stop()
    vm.start(Path(tempfile.mkdtemp(prefix="cprctl-hostvm.", dir="/var/tmp")))
    if old != vm.work:
        shutil.rmtree(old, ignore_errors=True)


def panic_retry(test: Callable[[HostVM], None]) -> Callable[[HostVM], None]:
    """Runs *test* again once, on a fresh host VM set up as the fixture does, when the host VM's kernel panicked
    in it (see `again`)."""

    @functools.wraps(test)
    def run(host: HostVM) -> None:
        try:
            test(host)
        except Exception as failure:
            again(host, failure, test.__name__)
            CLEAN["mark"] = 0
            set_up(host, Phases(host))
            test(host)
        CLEAN["mark"] = host.console_mark()

    return run


@pytest.fixture(autouse=True)
def cost(host: HostVM, request: pytest.FixtureRequest) -> Iterator[None]:
    """Prints each test's wall-clock time and the host VM's CPU time in it."""
    t, cpu = time.monotonic(), host.cpu_seconds()
    yield
    print(
        f"\n{request.node.name}: {time.monotonic() - t:.0f} s, host VM CPU {host.cpu_seconds() - cpu:.0f} s"
        f" (load {load()})"
    )


class Phases:
    """Prints how long each phase of the set-up took, in wall-clock time and in the host VM's CPU time
    (pytest -s shows it; make test-hostvm runs so)."""

    def __init__(self, vm: HostVM | None = None) -> None:
        self.start = self.last = time.monotonic()
        self.vm = vm
        self.cpu = vm.cpu_seconds() if vm else 0.0

    def done(self, what: str) -> None:
        now = time.monotonic()
        cpu = self.vm.cpu_seconds() if self.vm else 0.0
        print(
            f"hostvm set-up: {what}: {now - self.last:.0f} s, host VM CPU {cpu - self.cpu:.0f} s"
            f" (total {now - self.start:.0f} s, CPU {cpu:.0f} s; load {load()})"
        )
        self.last, self.cpu = now, cpu


class GuestExited(AssertionError):
    """A nested guest's QEMU exited before the guest's first tick."""


#: The guests whose QEMU exited in their first boot and were launched again (at most one per module).
RELAUNCHED: list[str] = []


def wait_first_tick(vm: HostVM, name: str, slow: float = 600) -> None:
    """Wait for a just launched guest's first ticks (FIRST_BOOT_S); after *slow* seconds without, print what the
    host VM and the guest are doing. A guest whose QEMU exited fails at once, with QEMU's log."""
    deadline = time.monotonic() + FIRST_BOOT_S
    said = False
    while not any(t.n > 2 for t in console_ticks(vm, name)):
        # A cheap look for its QEMU first (no python in the TCG host VM); cprctl's word when none is seen.
        alive = vm.exec(f"pgrep -f '[/]srv/vms/{name}/'", check=False).rc == 0
        state = "running" if alive else vm.status()[name]["state"]
        if state != "running":
            raise GuestExited(f"{name} is {state} before its first tick:\n{diagnose(vm, name)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {state}, no tick after {FIRST_BOOT_S} s or less:\n{diagnose(vm, name)}")
        if not said and time.monotonic() > deadline - FIRST_BOOT_S + slow:
            print(f"hostvm set-up: {name} has not ticked in {slow:.0f} s (load {load()}):\n{diagnose(vm, name)}")
            said = True
        time.sleep(5)


def diagnose(vm: HostVM, name: str) -> str:
    """What the host VM does: its load and top processes, the VMs' states, the nested QEMUs' threads and KVM's
    counters, its kernel's last lines; the guest's QEMU log and console."""
    script = f"""uptime; top -b -n 1 -w 200 | head -n 15; cprctl status
for p in $(pgrep -f qemu-system-x86_64); do ps -L -o pid,tid,pcpu,stat,wchan:24,comm -p $p; done
(cd /sys/kernel/debug/kvm 2>/dev/null && grep -H . exits halt_exits irq_exits io_exits mmio_exits pf_taken \
    pf_guest nmi_injections irq_injections request_irq_exits 2>/dev/null)
dmesg | tail -n 20; echo "-- {name}'s qemu.log:"; tail -c 3000 /var/lib/cprctl/vms/{name}/qemu.log
journalctl -b --no-pager -o cat -u 'cprctl-{name}.scope' | tail -n 20
echo "-- {name}'s console:"; tail -c 1500 /srv/vms/{name}/console.log"""
    return vm.exec(script, timeout=120, check=False).out


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def wait_mem_ok(host: HostVM, name: str, after: int, timeout: float = 120) -> None:
    """Wait for a ``mem ok`` line past console offset *after*."""
    deadline = time.monotonic() + timeout
    while "mem ok" not in console_text(host, name)[after:]:
        assert time.monotonic() < deadline, f"{name}: no 'mem ok' after the reboot:\n{console_text(host, name)[-1500:]}"
        time.sleep(2)


def snapshot(host: HostVM) -> dict[str, tuple[str, int, int]]:
    """Each guest's `mark_of`."""
    return {name: mark_of(host, name) for name in GUESTS}


def mark_of(host: HostVM, name: str) -> tuple[str, int, int]:
    """Nested guest *name*'s boot id, its last tick number and where that tick ends on its console."""
    last = list(TICK.finditer(console_text(host, name)))[-1]  # the console may end in a half line: start past this
    return last["boot"], int(last["n"]), last.end()


def assert_back(
    host: HostVM, before: dict[str, tuple[str, int, int]], names: tuple[str, ...] = tuple(GUESTS), crashed: bool = False
) -> None:
    """Every guest in *names* runs again: the same boot id, the counter on without a gap, RAM intact.

    After a power cut (*crashed*) the guests' console files, which QEMU writes and nobody syncs, may have lost
    what reached only the host's page cache: the ticks printed between the snapshot and the save. The counter
    may then jump forward once, never back (a guest restored from an older state would count again).
    """
    st = host.status()
    for name in names:
        boot, last, mark = before[name]
        if st[name]["state"] != "running":  # the unit's whole journal of this boot: the restore's error in full
            said = f"{name} is {st[name]['state']}, not running: {st[name]}\ncprctl-guests.service:\n{journal(host)}"
            print(said)
            raise AssertionError(said)
        wait_tick(host, name, last + 1)
        text = console_text(host, name)
        after = [(m["boot"], int(m["n"])) for m in TICK.finditer(text, min(mark, len(text)))]
        assert {b for b, _ in after} == {boot}, f"{name} rebooted: {text[-1500:]}"
        ns = [n for _, n in after]
        steps = [b - a for a, b in zip([last, *ns], ns, strict=False)]
        jumps = [d for d in steps if d != 1]
        ok = not jumps or (crashed and len(jumps) == 1 and jumps[0] > 1)
        assert ok, f"{name}: counter not continuous from {last}: {ns}"
        mark = min(mark, len(text))
        wait_mem_ok(host, name, mark)
        text = console_text(host, name)[mark:]
        assert "mem BAD" not in text and "memfill exited" not in text, text[-1500:]


def crash_line(host: HostVM, mark: int) -> str:
    """The line crash-when printed on the host VM's console just before its reset."""
    lines = [ln for ln in host.console_since(mark).splitlines() if "crash: " in ln]
    assert lines, f"the host was not reset by crash-when:\n{host.tail()}"
    print(lines[-1])
    return lines[-1]


def journal(host: HostVM, boots: str = "-b") -> str:
    return host.exec(f"journalctl {boots} -u cprctl-guests.service --no-pager -o cat", check=False).out


@panic_retry
def test_systemctl_reboot(host: HostVM) -> None:
    before = snapshot(host)
    took = host.reboot_with("systemctl reboot")
    print(f"systemctl reboot: host back in {took:.0f} s (load {load()})")
    assert_back(host, before)
    prev = journal(host, "-b -1")
    assert "file: saved" in prev and "anon: saved" in prev, prev


@panic_retry
def test_cprctl_reboot_kexec_into_other_kernel(host: HostVM) -> None:
    """``cprctl reboot --kexec``: into the newest installed kernel (not the one booted), every guest back."""
    before = snapshot(host)
    running = host.sh("uname -r").strip()
    (other,) = set(host.image.kernels) - {running}
    plan = host.sh("cprctl reboot --kexec --dry-run")  # exits non-zero when the reboot would be refused
    assert f"/boot/vmlinuz-{other}" in plan, plan
    took = host.reboot_with("cprctl reboot --kexec")
    print(f"cprctl reboot --kexec {running} -> {other}: host back in {took:.0f} s (load {load()})")
    assert host.sh("uname -r").strip() == other
    assert_back(host, before)
    prev = journal(host, "-b -1")
    assert "file: saved" in prev and "anon: saved" in prev, prev


@panic_retry
def test_crash_right_after_save_all(host: HostVM) -> None:
    """A power cut right after ``save-all --reboot`` returned: only what the save made durable survives, and every
    guest comes back from exactly that, its counter on from the tick before the save (none counted twice)."""
    before = snapshot(host)
    host.sh("sync")  # what the guests wrote up to here is durable: the save's own flushes must do the rest
    # The cut comes the moment save-all returned (no shutdown, no sync of anything the save wrote): a page the
    # save did not flush is still in the page cache then, and is lost. Nor does the kernel's flusher write any of
    # it back meanwhile: it writes a file's dirty pages 30 s after the file was first dirtied, about as long as
    # the save takes here. Only the guests' consoles are flushed first (an fsync of those files alone, which
    # writes back no other file's pages): they then end at the last tick before the save, so a guest whose RAM
    # came back older than its stop (a RAM file's flush missing) counts again from an older tick, or hangs or
    # panics; the strict check below fails on each. Checked once: with both flushes of the RAM file removed, the
    # file guest counted again from the tick of the `sync` above (README, *The flush check*).
    host.sh("sysctl -qw vm.dirty_expire_centisecs=360000")  # an hour; the cut resets it
    consoles = " ".join(f"/srv/vms/{n}/console.log" for n in GUESTS)
    host.reboot_with(f"cprctl save-all --reboot && sync {consoles} && {{ {POWER_CUT}; }}", timeout=600)
    assert_back(host, before)  # strict: no tick lost from the consoles, none counted twice


@panic_retry
def test_crash_in_the_middle_of_restore_all(host: HostVM) -> None:
    """A boot cut in the middle of the unit's restore-all, while no guest has resumed yet: the boot after that
    finishes the job, every guest back as it was saved at the shutdown before."""
    before = snapshot(host)
    host.arm_crash_at_restore()
    mark = host.console_mark()
    host.spawn("systemctl reboot")
    host.wait_silent()
    host.wait_boot(timeout=1200)  # two boots: the one cut in the middle of its restore-all, and the next
    moment = crash_line(host, mark)
    assert all(f"{n}=True/" in moment for n in GUESTS), moment  # every VM still saved when the cut came
    assert_back(host, before, crashed=True)


@panic_retry
def test_crash_in_the_middle_of_save_all(host: HostVM) -> None:
    """One VM saved, the next not yet: the saved one restores; the other is never loaded from a partial
    state file: it is cold-booted, or status says in one line why it is not running."""
    before = snapshot(host)
    host.put("/usr/local/sbin/crash-when", CRASH_WHEN, 0o755)
    mark = host.console_mark()
    host.spawn("/usr/bin/python3 /usr/local/sbin/crash-when save 300 & exec cprctl save-all --reboot --parallel 1")
    host.wait_silent()
    host.wait_boot()
    moment = crash_line(host, mark)
    st = host.status()
    saved = [n for n in GUESTS if n in moment.split("crash:")[-1] and f"{n}=True/None" in moment]
    assert len(saved) == 1, (moment, st)
    assert_back(host, before, (saved[0],), crashed=True)
    (other,) = set(GUESTS) - set(saved)
    boot = before[other][0]
    if st[other]["state"] == "running":  # cold-booted: a new boot of the guest, never the partial state
        deadline = time.monotonic() + FIRST_BOOT_S
        while not {t.boot for t in console_ticks(host, other)} - {boot}:
            assert time.monotonic() < deadline, f"{other} runs but never booted afresh:\n{console_text(host, other)}"
            time.sleep(2)
        assert f"{other}: cold-booted" in journal(host), journal(host)
        return
    # Not running: said in one line (status and the boot's journal), then booted afresh for the next tests.
    detail = host.sh(f"cprctl status {other}")
    lines = [ln for ln in (detail + journal(host)).splitlines() if other in ln and "lost" in ln]
    assert lines, (st[other], detail, journal(host))
    host.exec(f"cprctl remove {other}; rm -rf /srv/vms/{other}", check=False)
    launch_nested(host, other, **GUESTS[other])
    wait_tick(host, other, 2, timeout=FIRST_BOOT_S)
    wait_mem_ok(host, other, 0)
