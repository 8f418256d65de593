"""Issue 15's scenario end to end: a real apt upgrade of QEMU under running VMs on a systemd host, then a reboot.

A Debian 13 (trixie) root with systemd and Debian 13's QEMU (10.0.x) is built
once with mmdebstrap and cached under ``~/.cache/cprctl-upgrade-root/KEY``
(``CPRCTL_UPGRADE_ROOT_CACHE``); the build also downloads, once, the .debs
that ``apt-get install -t unstable qemu-system-x86 qemu-utils`` installs from
Debian unstable (QEMU 11.x and what it needs, glibc among them) into
``/opt/unstable-debs`` of the root. Each run copies the root, puts this
worktree's cprctl and the test guest in (as ``test_systemd_host`` does) and
boots it once with ``systemd-nspawn --boot``. Inside, as an operator would:

- ``cprctl install-units``; three VMs launched with ``--agent`` from a login
  session: RAM in a shared file (``file``), anonymous RAM (``anon``), RAM in a
  shared file plus VNC and a TCP QMP server (``vnc``);
- the upgrade: ``apt-get install`` of the unstable .debs while they run (a real
  package upgrade: dpkg replaces the executable and the libraries);
- ``status`` says ``binary_replaced``; ``update-all`` moves each VM onto 11.x
  or refuses in one line naming the device, and the VM runs on;
- ``systemctl poweroff`` and a boot: ``cprctl-guests.service`` saves every VM
  at shutdown and restores it at boot, on 11.x or on the kept 10.0 build that
  wrote its checkpoint, saying why; every guest runs on in the same boot (its
  boot id, read from its serial console, unchanged), its counter continuous and
  its RAM pattern intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cprctl._demo import guest_argv, ticks

from .cache import cached
from .qemuroots import debian_mirror
from .test_systemd_host import Container, _deps, _install, _run, install_venv, wait_ticks

pytestmark = pytest.mark.qemu

CACHE = Path.home() / ".cache" / "cprctl-upgrade-root"
#: Bump when the recipe below changes meaning; the key also covers the packages, Python deps and mirror.
RECIPE = "1"
PACKAGES = "systemd-sysv,dbus,libpam-systemd,procps,python3,python3-venv,qemu-system-x86,qemu-utils,ca-certificates"
UPGRADE = "qemu-system-x86 qemu-utils"
DEBS = "/opt/unstable-debs"
QEMU = "/usr/bin/qemu-system-x86_64"
NOCHECK = 'Acquire::Check-Valid-Until "false";'  # the unstable snapshot's Release file has expired
VMS = ("file", "anon", "vnc")
FILL = 8


def _cache() -> Path:
    return Path(os.environ.get("CPRCTL_UPGRADE_ROOT_CACHE", CACHE))


def _key() -> str:
    text = "\n".join([RECIPE, PACKAGES, UPGRADE, debian_mirror(), *_deps()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _build_root(dest: Path) -> None:
    """mmdebstrap a Debian 13 root with systemd and QEMU, unstable's QEMU .debs downloaded beside it (not
    installed; unstable's source removed again), and a venv with cprctl's dependencies for its Python 3.13
    (wheels downloaded here with this host's pip configuration, installed offline inside)."""
    mirror = debian_mirror()
    tmp = Path(tempfile.mkdtemp(prefix=".build.", dir=dest.parent))
    try:
        root = tmp / "root"
        unstable = '"$1/etc/apt/sources.list.d/unstable.list"'
        hooks = [
            f"echo 'deb {mirror} unstable main' > {unstable}",
            'chroot "$1" apt-get update -qq',
            f'mkdir -p "$1{DEBS}/partial" && chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq'
            f" --download-only -t unstable -o Dir::Cache::archives={DEBS} {UPGRADE}",
            f'rm -rf {unstable} "$1{DEBS}/partial" "$1{DEBS}/lock" && chroot "$1" apt-get update -qq',
        ]
        _run(
            [
                "mmdebstrap",
                "-q",
                "--variant=apt",
                f"--include={PACKAGES}",
                f"--aptopt={NOCHECK}",
                *(f"--customize-hook={h}" for h in hooks),
                "trixie",
                str(root),
                f"deb {mirror} trixie main",
            ],
            timeout=1800,
        )
        assert list((root / DEBS.lstrip("/")).glob("qemu-system-x86_*.deb")), "no unstable QEMU .deb downloaded"
        install_venv(root, "3.13")
        root.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_root() -> Path:
    return cached(_cache(), _key(), "usr/bin/qemu-system-x86_64", _build_root)


def vm_argv(name: str) -> str:
    folder = Path(f"/srv/vms/{name}")
    extra: tuple[str, ...] = ()
    if name == "vnc":  # a VNC server and a TCP QMP server, on the container's own loopback
        extra = ("-vnc", "127.0.0.1:1", "-qmp", "tcp:127.0.0.1:4444,server=on,wait=off")
    argv = guest_argv(
        QEMU,
        Path("/opt/guest"),
        folder,
        ram_mib=128,
        fill_mib=FILL,
        ram="anon" if name == "anon" else "file",
        extra=extra,
    )
    return shlex.join(argv)


def qemu_version(c: Container, binary: str = QEMU) -> str:
    out = c.sh(f"{binary} --version").stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    assert m, out
    return m[1]


@dataclass
class Scenario:
    c: Container
    work: Path
    old: str = ""
    new: str = ""
    #: Per VM: its guest's boot id, and its pid before the upgrade.
    boots: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def console(self, name: str) -> Path:
        return self.c.root / f"srv/vms/{name}/console.log"

    def mark(self, name: str) -> int:
        return len(self.c.read(f"/srv/vms/{name}/console.log"))

    def assert_continued(self, name: str, mark: int, timeout: float = 180) -> None:
        """Same guest boot, counter continuous, RAM pattern verified after *mark*."""
        deadline = time.monotonic() + timeout
        while "mem ok" not in (text := self.c.read(f"/srv/vms/{name}/console.log"))[mark:]:
            assert time.monotonic() < deadline, f"{name}: no 'mem ok' after the mark:\n{text[-800:]}"
            time.sleep(0.2)
        seen = ticks(self.console(name))
        assert {t.boot for t in seen} == {self.boots[name]}, f"{name} booted afresh: {sorted({t.boot for t in seen})}"
        ns = [t.n for t in seen]
        assert ns == list(range(1, len(ns) + 1)), f"{name}: counter not continuous: {ns}"
        assert "mem BAD" not in text and "memfill exited" not in text, text[-800:]


@pytest.fixture(scope="module")
def sc() -> Iterator[Scenario]:
    t = time.monotonic()
    base = cached_root()
    built = time.monotonic() - t
    work = Path(tempfile.mkdtemp(prefix="cprctl-upg.", dir="/var/tmp"))
    root = work / "root"
    _run(["cp", "-a", str(base), str(root)])
    _install(root)
    c = Container(root, work / "boot1.log", private_network=True)
    s = Scenario(c, work, timings={"root": built, "boot": time.monotonic() - t - built})
    try:
        yield s
    finally:
        s.c.kill()
        print("timings (s):", {k: round(v, 1) for k, v in s.timings.items()})
        shutil.rmtree(work, ignore_errors=True)


def test_vms_run_on_debian_13s_qemu_under_the_unit(sc: Scenario) -> None:
    c = sc.c
    t = time.monotonic()
    sc.old = qemu_version(c)
    assert sc.old.startswith("10.0."), sc.old
    c.sh("cprctl install-units")
    assert c.sh("systemctl is-enabled cprctl-guests.service").stdout.strip() == "enabled"
    c.sh("systemctl start cprctl-guests.service")
    for i, name in enumerate(VMS):
        c.sh(f"mkdir -p /srv/vms/{name}")
        c.sh(f"systemd-run --scope --unit=session-{i} -- cprctl launch {name} --agent -- {vm_argv(name)}")
    for name in VMS:
        wait_ticks(c, name, 2, timeout=300)
        seen = ticks(sc.console(name))
        assert len({x.boot for x in seen}) == 1, seen
        sc.boots[name] = seen[0].boot
    st = c.status()
    for name in VMS:
        assert st[name]["state"] == "running" and st[name]["machine"] == "pc-q35-10.0", st[name]
        assert st[name]["unit"] == f"cprctl-{name}.scope" and st[name]["build"], st[name]
        assert not st[name]["binary_replaced"], st[name]
        sc.pids[name] = int(st[name]["pid"])  # type: ignore[call-overload]
    sc.timings["launch"] = time.monotonic() - t


def test_apt_upgrade_replaces_the_running_binary(sc: Scenario) -> None:
    c = sc.c
    t = time.monotonic()
    out = c.sh(
        f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Acquire::Check-Valid-Until=false {DEBS}/*.deb",
        timeout=900,
    ).stdout
    sc.timings["apt"] = time.monotonic() - t
    sc.new = qemu_version(c)
    assert sc.new.startswith("11."), (sc.new, out[-2000:])
    print(f"apt upgraded QEMU {sc.old} -> {sc.new} in {sc.timings['apt']:.1f} s")
    st = c.status()
    for name in VMS:
        assert st[name]["state"] == "running" and st[name]["pid"] == sc.pids[name], st[name]
        assert st[name]["binary_replaced"], st[name]
    assert c.sh("cprctl status").stdout.count("(binary replaced)") == len(VMS)


def test_update_all_moves_or_refuses_each_vm_and_it_runs_on(sc: Scenario) -> None:
    c = sc.c
    marks = {n: sc.mark(n) for n in VMS}
    t = time.monotonic()
    done = c.sh("cprctl update-all --json", check=False, timeout=900)
    sc.timings["update-all"] = time.monotonic() - t
    got = {o["name"]: o for o in json.loads(done.stdout)}
    print(json.dumps(got, indent=1))
    st = c.status()
    for name in VMS:
        assert st[name]["state"] == "running", st[name]
        if got[name]["outcome"] == "updated":
            assert not st[name]["binary_replaced"], st[name]
        else:
            # Known: virtio-serial (the agent's channel) allocates 1024 entries per queue in 10.0.13 and 11.x
            # no more than 128, and has no property to size them: refused, naming it, on one line.
            detail = str(got[name]["detail"])
            assert "\n" not in detail and "virtio-serial" in detail, got[name]
            assert "hung up" not in detail.split("(")[0], detail
            assert st[name]["pid"] == sc.pids[name] and st[name]["binary_replaced"], st[name]
            assert st[name]["loads"] == "fails" and st[name]["fallback_build"] == st[name]["build"], st[name]
            assert "virtio-serial" in str(st[name]["loads_detail"]), st[name]
            assert "warning" not in str(st[name]["loads_detail"]), st[name]
        sc.assert_continued(name, marks[name])
    assert done.returncode == (0 if all(o["outcome"] == "updated" for o in got.values()) else 1)
    # Each VM's check --reboot knows where its state loads: a warning, not a refusal, while a kept build can.
    for name in VMS:
        check = c.sh(f"cprctl check {name} --reboot", check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"does not load into {QEMU}" in check.stdout and "kept build" in check.stdout, check.stdout
    print(check.stdout, c.sh("cprctl status").stdout)


def test_poweroff_and_boot_keep_every_vm_in_its_guest_boot(sc: Scenario) -> None:
    c = sc.c
    before = c.status()
    marks = {n: sc.mark(n) for n in VMS}
    logs = {n: len(c.read(f"/var/lib/cprctl/vms/{n}/qemu.log")) for n in VMS}  # update-all's standbys were killed
    t = time.monotonic()
    c.poweroff()
    sc.timings["poweroff"] = time.monotonic() - t
    for name in VMS:
        log = c.read(f"/var/lib/cprctl/vms/{name}/qemu.log")[logs[name] :]
        assert "terminating on signal" not in log, f"{name} was killed at shutdown:\n{log[-1500:]}"
    t = time.monotonic()
    c2 = Container(c.root, sc.work / "boot2.log", private_network=True)
    sc.c = c2
    sc.timings["boot2"] = time.monotonic() - t
    journal = c2.sh(
        "journalctl -b -1 -u cprctl-guests.service --no-pager; journalctl -b -u cprctl-guests.service --no-pager"
    ).stdout
    print(journal)
    assert c2.sh("systemctl is-active cprctl-guests.service").stdout.strip() == "active", journal
    st = c2.status()
    print(c2.sh("cprctl status").stdout)
    for name in VMS:
        assert f"{name}: saved" in journal and f"{name}: restored" in journal, journal
        assert st[name]["state"] == "running", (name, st[name], journal)
        assert st[name]["unit"] == f"cprctl-{name}.scope", st[name]
        sc.assert_continued(name, marks[name])
        if before[name]["binary_replaced"]:  # refused by update-all: restored on the kept 10.0 build, saying why
            assert st[name]["kept_from"] == QEMU and st[name]["binary_replaced"], st[name]
            assert st[name]["build"] == before[name]["build"], (st[name], before[name])
            line = re.search(rf"{name}: restored: .*", journal)
            assert line and "the build that wrote the checkpoint" in line[0], journal
            # The reason is why the binary on disk could not, not a warning QEMU 11.1 prints at every start;
            # update-all's standby taught it, so the boot starts no 11.x QEMU only to see it refuse again.
            why = line[0].partition("its binary could not: ")[2]
            assert why.startswith("known not to load its state: ") and "virtio-serial" in why, line[0]
            assert "warning" not in why, line[0]
            assert f"{name}: starting {QEMU} " not in journal, journal
        else:  # on the new QEMU at its path
            assert st[name]["kept_from"] is None and not st[name]["binary_replaced"], st[name]
    assert c2.sh("cprctl status").stdout.count("(kept build)") == sum(1 for n in VMS if before[n]["binary_replaced"])
