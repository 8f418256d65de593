"""Real host reboots: a Debian 13 host VM (tests/hostvm.py) rebooted, kexec'd and crashed with VMs inside.

Two nested guests run under ``cprctl-guests.service``: ``file`` with its RAM in a shared file (kept in
place across the reboot) and ``anon`` with anonymous RAM (written to the state file). After every reboot
both must run again with the same guest boot id, the tick counter going on where it stopped and their RAM
pattern verifying. The tests share one host VM and run in order; each leaves both guests running.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cprctl._demo import TICK

from .guestvm import guest_dir
from .hostvm import CRASH_WHEN, HostVM, cached_image, console_text, console_ticks, launch_nested, wait_tick

pytestmark = [pytest.mark.qemu, pytest.mark.hostvm]

if os.geteuid() != 0 or not shutil.which("mmdebstrap") or not shutil.which("mkfs.ext4"):
    pytest.skip("needs root, mmdebstrap and mkfs.ext4 (scripts/install-deps.sh)", allow_module_level=True)

GUESTS = {"file": {"ram": "file"}, "anon": {"ram": "anon"}}
FILL = 8


@pytest.fixture(scope="module")
def host() -> Iterator[HostVM]:
    t = time.monotonic()
    image = cached_image()
    print(f"host image: {time.monotonic() - t:.0f} s ({image.folder})")
    work = Path(tempfile.mkdtemp(prefix="cprctl-hostvm.", dir="/var/tmp"))
    vm: HostVM | None = None
    try:
        t = time.monotonic()
        vm = HostVM(image, work, guest_dir())
        print(f"host VM booted: {time.monotonic() - t:.0f} s")
        vm.install()
        vm.wait_kvm()
        for name, kw in GUESTS.items():
            launch_nested(vm, name, fill=FILL, **kw)  # type: ignore[arg-type]
        for name in GUESTS:
            # A first boot under the host VM's (TCG-emulated) SVM took 2 to 11 min here: its kernel's
            # decompressor crawled in some runs, quiet machine or not.
            wait_tick(vm, name, 2, timeout=900)
            wait_mem_ok(vm, name, 0)
        print(f"host VM ready with guests: {time.monotonic() - t:.0f} s")
        yield vm
    except BaseException:
        if vm:
            print(vm.tail())
        raise
    finally:
        if vm:
            vm.stop()
        shutil.rmtree(work, ignore_errors=True)


def wait_mem_ok(host: HostVM, name: str, after: int, timeout: float = 120) -> None:
    """Wait for a ``mem ok`` line past console offset *after*."""
    deadline = time.monotonic() + timeout
    while "mem ok" not in console_text(host, name)[after:]:
        assert time.monotonic() < deadline, f"{name}: no 'mem ok' after the reboot:\n{console_text(host, name)[-1500:]}"
        time.sleep(2)


def snapshot(host: HostVM) -> dict[str, tuple[str, int, int]]:
    """Each guest's current boot id, its last tick number and its console's length."""
    out = {}
    for name in GUESTS:
        text = console_text(host, name)
        last = list(TICK.finditer(text))[-1]  # the console may end in a line half written: start past this one
        out[name] = (last["boot"], int(last["n"]), last.end())
    return out


def assert_back(host: HostVM, before: dict[str, tuple[str, int, int]], names: tuple[str, ...] = tuple(GUESTS)) -> None:
    """Every guest in *names* runs again: the same boot id, the counter on without a gap, RAM intact."""
    st = host.status()
    for name in names:
        boot, last, mark = before[name]
        assert st[name]["state"] == "running", (name, st[name], journal(host))
        wait_tick(host, name, last + 1)
        text = console_text(host, name)
        after = [(m["boot"], int(m["n"])) for m in TICK.finditer(text, mark)]
        assert {b for b, _ in after} == {boot}, f"{name} rebooted: {text[-1500:]}"
        ns = [n for _, n in after]
        assert ns == list(range(last + 1, last + 1 + len(ns))), f"{name}: counter not continuous from {last}: {ns}"
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


def test_systemctl_reboot(host: HostVM) -> None:
    before = snapshot(host)
    took = host.reboot_with("systemctl reboot")
    print(f"systemctl reboot: host back in {took:.0f} s")
    assert_back(host, before)
    prev = journal(host, "-b -1")
    assert "file: saved" in prev and "anon: saved" in prev, prev


def test_kexec_into_other_kernel(host: HostVM) -> None:
    before = snapshot(host)
    running = host.sh("uname -r").strip()
    other = next(v for v in host.image.kernels if v != running)
    host.sh(f"kexec -l /boot/vmlinuz-{other} --initrd=/boot/initrd.img-{other} --reuse-cmdline")
    took = host.reboot_with("systemctl kexec")
    print(f"systemctl kexec {running} -> {other}: host back in {took:.0f} s")
    assert host.sh("uname -r").strip() == other
    assert_back(host, before)


def test_crash_right_after_save_all(host: HostVM) -> None:
    before = snapshot(host)
    out = host.sh("cprctl save-all --reboot", timeout=600)
    st = host.status()
    assert all(st[n]["state"] == "saved" for n in GUESTS), (out, st)
    host.crash()  # no sync, no shutdown: only what the save made durable survives
    host.wait_silent()
    host.wait_boot()
    assert_back(host, before)


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
    assert_back(host, before, (saved[0],))
    (other,) = set(GUESTS) - set(saved)
    boot = before[other][0]
    if st[other]["state"] == "running":  # cold-booted: a new boot of the guest, never the partial state
        deadline = time.monotonic() + 900
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
    launch_nested(host, other, fill=FILL, **GUESTS[other])  # type: ignore[arg-type]
    wait_tick(host, other, 2, timeout=900)
    wait_mem_ok(host, other, 0)


def test_crash_in_the_middle_of_restore_all(host: HostVM) -> None:
    """A power cut while the unit's restore-all restores at boot: the boot after it finishes the job."""
    before = snapshot(host)
    host.arm_crash_at_restore()
    mark = host.console_mark()
    host.reboot_with("systemctl reboot")  # the shutdown saves; the boot crashes mid-restore, boots again
    crash_line(host, mark)
    assert_back(host, before)
