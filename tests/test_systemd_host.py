"""Under a real systemd: VMs survive the host's ``systemctl poweroff`` and the next boot.

A Debian 12 root (systemd, QEMU from bookworm-backports, a venv with cprctl's
dependencies) is built once with mmdebstrap and cached under
``~/.cache/cprctl-sysroot/KEY`` (KEY changes with the recipe). Each run copies
it, puts this worktree's cprctl and the test guest in, boots it with
``systemd-nspawn --boot`` and, inside, installs ``cprctl-guests.service`` and
launches four VMs the ways an operator would:

- ``sess``: from a login session (``systemd-run --scope``);
- ``unit``: from a unit of the operator's own (``systemd-run --wait``), which ends at once;
- ``upd``: launched, then warm-updated from a session (the new QEMU is started by that session);
- ``shm``: RAM in /dev/shm, which a reboot erases: it cannot be saved, so shutdown powers it off;
- ``adp``: adopted, started by a script from a session; ``usr``: a non-root operator's, with a user unit.

Then ``systemctl poweroff`` and a second boot of the same root: the first three
run on with the same guest boot id, ``shm`` was shut down cleanly (by its guest
agent; QEMU was not killed) and booted afresh by ``restore-all``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cprctl._demo import guest_argv, ticks

from .cache import cached
from .guestvm import guest_dir

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CPRCTL_SYSROOT_CACHE", Path.home() / ".cache" / "cprctl-sysroot"))
#: Bump when the recipe below changes meaning; the cache key also covers the packages and Python deps.
RECIPE = "1"
PACKAGES = "systemd-sysv,dbus,libpam-systemd,procps,python3,python3-venv,ca-certificates"
BACKPORTS = "qemu-system-x86 qemu-utils"
VENV = "/opt/cprctl/venv"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
QEMU = "/usr/bin/qemu-system-x86_64"
#: The guest's stand-in for /sbin/shutdown, which qemu-ga's guest-shutdown runs (busybox has none).
SHUTDOWN_SHIM = '#!/bin/sh\necho "guest: shutdown $*: powering off" >/dev/console\nsync\nexec poweroff -f\n'

if os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("mmdebstrap"):
    pytest.skip("needs root, systemd-nspawn and mmdebstrap (scripts/install-deps.sh)", allow_module_level=True)


def _deps() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def _apt_sources() -> list[Path]:
    """The host's apt sources (bookworm, its security and backports suites), given to mmdebstrap as is."""
    found = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists() and any(line.startswith("deb ") for line in legacy.read_text().splitlines()):
        found.append(legacy)
    return found


def _key() -> str:
    text = "\n".join([RECIPE, PACKAGES, BACKPORTS, *_deps(), *(p.read_text() for p in _apt_sources())])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _run(cmd: list[str], timeout: float = 900, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    assert done.returncode == 0, (
        f"{' '.join(cmd)[:300]} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    )
    return done


def _build_root(dest: Path) -> None:
    """mmdebstrap a Debian 12 root with systemd and QEMU, and a venv with cprctl's dependencies
    (downloaded here, with this host's pip configuration and CA bundle, installed offline inside)."""
    tmp = Path(tempfile.mkdtemp(prefix=".build.", dir=dest.parent))
    try:
        root = tmp / "root"
        hook = f'chroot "$1" apt-get install -y -q -t bookworm-backports {BACKPORTS}'
        _run(
            [
                "mmdebstrap",
                "--variant=apt",
                f"--include={PACKAGES}",
                f"--customize-hook={hook}",
                "bookworm",
                str(root),
                *map(str, _apt_sources()),
            ]
        )
        install_venv(root)
        root.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_venv(root: Path, python_version: str | None = None) -> None:
    """A venv with cprctl's dependencies at VENV in *root*: wheels downloaded here with this host's pip
    configuration (for *python_version* when the root's Python is another), installed offline inside."""
    wheels = root / "opt/cprctl/wheels"
    pin = ["--python-version", python_version, "--only-binary=:all:"] if python_version else []
    _run([sys.executable, "-m", "pip", "download", "-q", *pin, "-d", str(wheels), *_deps()])
    nspawn = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit"]
    _run([*nspawn, "python3", "-m", "venv", VENV])
    _run([*nspawn, f"{VENV}/bin/pip", "install", "-q", "--no-index", "-f", "/opt/cprctl/wheels", *_deps()])
    shutil.rmtree(wheels)


def cached_root() -> Path:
    """The cached root for the current recipe, built on first use (one builder at a time)."""
    return cached(CACHE, _key(), "usr/bin/qemu-system-x86_64", _build_root)


def _install(root: Path) -> None:
    """This worktree's cprctl (on the cached venv's path), the test guest, and tools, into *root*."""
    src = root / "opt/cprctl/src"
    shutil.copytree(REPO / "src" / "cprctl", src / "cprctl", ignore=shutil.ignore_patterns("__pycache__"))
    site = next((root / VENV.lstrip("/")).glob("lib/python3*/site-packages"))
    (site / "cprctl-src.pth").write_text("/opt/cprctl/src\n")
    exe = root / "usr/local/bin/cprctl"
    exe.write_text(f"#!{VENV}/bin/python3\nimport sys\nfrom cprctl.cli import main\nsys.exit(main())\n")
    exe.chmod(0o755)
    guest = root / "opt/guest"
    guest.mkdir(parents=True)
    shutil.copy(guest_dir() / "vmlinuz", guest / "vmlinuz")
    # The guest's initramfs plus a second archive with the shutdown stand-in (the kernel unpacks both).
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sbin").mkdir()
        (Path(tmp) / "sbin/shutdown").write_text(SHUTDOWN_SHIM)
        (Path(tmp) / "sbin/shutdown").chmod(0o755)
        extra = _run(["sh", "-c", "echo sbin; echo sbin/shutdown"], cwd=tmp).stdout
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], input=extra.encode(), cwd=tmp, capture_output=True, check=True
        ).stdout
    (guest / "initrd.img").write_bytes((guest_dir() / "initrd.img").read_bytes() + gzip.compress(archive))


class Container:
    """A booted systemd-nspawn container of *root*."""

    def __init__(self, root: Path, log: Path, private_network: bool = False) -> None:
        self.root = root
        self.log = log
        boot = ["systemd-nspawn", "-D", str(root), "--boot", "--register=no", "--keep-unit", "--console=read-only"]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [*boot, *(["--private-network"] if private_network else [])],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self.pid = self._init_pid()
            self._wait_booted()
        except BaseException:
            self.kill()
            raise

    def _wait_booted(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not Path(f"/proc/{self.pid}/root/run/systemd/private").exists():  # the manager's socket
            assert time.monotonic() < deadline, f"no systemd manager in the container:\n{self.log.read_text()[-2000:]}"
            time.sleep(0.1)
        state = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout).stdout.strip()
        assert state in ("running", "degraded"), f"container state {state}:\n{self.sh('systemctl --failed').stdout}"

    def _init_pid(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"systemd-nspawn exited:\n{self.log.read_text()[-2000:]}"
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    if children := (task / "children").read_text().split():
                        pid = int(children[0])
                        if Path(f"/proc/{pid}/exe").resolve().name == "systemd":
                            return pid
            time.sleep(0.1)
        raise AssertionError(f"the container's systemd did not start:\n{self.log.read_text()[-2000:]}")

    def sh(self, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run *script* with sh inside the container (as root, as from a shell on the host's console)."""
        env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "COLUMNS": "250"}
        cmd = ["nsenter", "-t", str(self.pid), "-a", "--", "sh", "-c", f"cd / && {script}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check:
            assert done.returncode == 0, f"{script}\nrc={done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def poweroff(self, timeout: float = 600) -> None:
        self.sh("systemctl poweroff", check=False)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"poweroff did not finish in {timeout} s:\n{self.log.read_text()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                os.kill(self.pid, 9)  # the PID namespace's init: everything inside dies with it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def read(self, path: str) -> str:
        with contextlib.suppress(OSError):
            return (self.root / path.lstrip("/")).read_text(errors="replace")
        return ""

    def status(self) -> dict[str, dict[str, object]]:
        rows = json.loads(self.sh("cprctl status --json").stdout)
        return {r["name"]: r for r in rows}


def vm_argv(name: str, ram_path: str | None = None) -> str:
    argv = guest_argv(
        QEMU,
        Path("/opt/guest"),
        Path(f"/srv/vms/{name}"),
        ram_mib=128,
        fill_mib=0,
        ram_path=Path(ram_path or f"/srv/vms/{name}/ram"),
    )
    return shlex.join(argv)


def as_op(script: str) -> str:
    """*script* run as the non-root user ``op`` (uid 1000), with its manager's runtime folder."""
    return f"runuser -u op -- env XDG_RUNTIME_DIR=/run/user/1000 PATH={PATH} COLUMNS=250 sh -c {shlex.quote(script)}"


def boot_ids(c: Container, name: str) -> set[str]:
    path = c.root / f"srv/vms/{name}/console.log"
    return {t.boot for t in ticks(path)} if path.exists() else set()


def wait_ticks(c: Container, name: str, after: int, timeout: float = 120) -> None:
    """Wait until VM *name* printed a tick numbered above *after*."""
    path = c.root / f"srv/vms/{name}/console.log"
    deadline = time.monotonic() + timeout
    while not (path.exists() and any(t.n > after for t in ticks(path))):
        assert time.monotonic() < deadline, (
            f"{name}: no tick past {after}:\n{c.read(f'/srv/vms/{name}/console.log')[-800:]}"
        )
        time.sleep(0.2)


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[Container, Path]]:
    base = cached_root()
    work = Path(tempfile.mkdtemp(prefix="cprctl-sysd.", dir="/var/tmp"))
    root = work / "root"
    _run(["cp", "-a", str(base), str(root)])
    _install(root)
    c = Container(root, work / "boot1.log")
    try:
        yield c, work
    finally:
        c.kill()
        shutil.rmtree(work, ignore_errors=True)


def test_vms_survive_poweroff_and_boot(host: tuple[Container, Path]) -> None:
    c, work = host
    c.sh("cprctl install-units && systemctl start cprctl-guests.service")
    c.sh("mkdir -p /srv/vms/sess /srv/vms/unit /srv/vms/upd /srv/vms/shm")
    # From a login session, from an operator's unit that ends at once, and a plain launch to update.
    c.sh(f"systemd-run --scope --unit=session-a -- cprctl launch sess --agent -- {vm_argv('sess')}")
    c.sh(f"systemd-run --wait --unit=own-unit -- cprctl launch unit --agent -- {vm_argv('unit')}")
    c.sh(f"cprctl launch upd --agent -- {vm_argv('upd')}")
    c.sh(f"cprctl launch shm --agent -- {vm_argv('shm', '/dev/shm/shm.ram')}")
    # Adopted: a QEMU a script daemonized from a session is moved into a scope of its own; one that
    # is the main process of a service stays there, and check --reboot says what shutdown would do.
    c.sh("mkdir -p /srv/vms/adp /srv/vms/svc")
    qmp = "-qmp unix:/srv/vms/{0}/qmp.sock,server=on,wait=off"
    c.sh(f"systemd-run --scope --unit=session-c -- {vm_argv('adp')} {qmp.format('adp')} -daemonize")
    c.sh(f"systemd-run --unit=foreign -- {vm_argv('svc')} {qmp.format('svc')}")
    c.sh("sleep 1; cprctl adopt adp --qmp /srv/vms/adp/qmp.sock && cprctl adopt svc --qmp /srv/vms/svc/qmp.sock")
    # A non-root operator: a user unit (with lingering), the VM in a scope of the user's manager.
    c.sh(
        "useradd -m -u 1000 op && loginctl enable-linger op && mkdir -p /srv/vms/usr && chown op /srv/vms/usr"
        " && for i in $(seq 100); do [ -S /run/user/1000/systemd/private ] && break; sleep 0.1; done"
    )
    user = c.sh(as_op("cprctl install-units --user && systemctl --user start cprctl-guests.service")).stdout
    assert "lingering" not in user, user
    c.sh(as_op(f"cprctl launch usr --agent -- {vm_argv('usr')}"))
    for name in ("sess", "unit", "upd", "shm", "adp", "svc", "usr"):
        wait_ticks(c, name, 2)
    usr_unit = json.loads(c.sh(as_op("cprctl status usr --json")).stdout)["unit"]
    assert usr_unit == "cprctl-usr.scope", usr_unit
    svc = c.sh("cprctl check svc --reboot").stdout
    assert "QEMU runs in foreign.service: at shutdown systemd would stop it without a save" in svc, svc
    c.sh("cprctl stop svc && cprctl remove svc")
    out = c.sh(f"systemd-run --scope --unit=session-b -- cprctl update upd --qemu {QEMU}").stdout
    assert "warm standby" in out, out

    st = c.status()
    assert all(st[n]["state"] == "running" for n in ("sess", "unit", "upd", "shm", "adp")), st
    for name in ("sess", "unit", "upd", "shm", "adp"):
        assert str(st[name]["unit"]).startswith(f"cprctl-{name}"), st[name]
        pid = st[name]["pid"]
        cg = c.sh(f"cat /proc/{pid}/cgroup").stdout
        assert f"/machine.slice/{st[name]['unit']}" in cg, cg
    check = c.sh("cprctl check sess --reboot").stdout
    assert "cprctl-guests.service is installed and enabled" in check, check
    assert "stops only after the save" in check, check
    # The shm VM cannot survive a reboot (its RAM is on tmpfs), which check --reboot says.
    assert c.sh("cprctl check shm --reboot", check=False).returncode == 1
    before = {n: boot_ids(c, n) for n in ("sess", "unit", "upd", "shm", "adp")}
    assert all(len(ids) == 1 for ids in before.values()), before
    counts = {n: max(t.n for t in ticks(c.root / f"srv/vms/{n}/console.log")) for n in before}
    before_usr = boot_ids(c, "usr")
    counts_usr = max(t.n for t in ticks(c.root / "srv/vms/usr/console.log"))
    print(c.sh("systemctl status --no-pager cprctl-sess.scope cprctl-guests.service", check=False).stdout)

    t = time.monotonic()
    c.poweroff()
    print(f"poweroff took {time.monotonic() - t:.1f} s")
    journal1 = c.log.read_text(errors="replace")
    for name in ("sess", "unit", "upd", "adp"):
        log = c.read(f"/var/lib/cprctl/vms/{name}/qemu.log")
        assert "terminating on signal" not in log, f"{name} was killed at shutdown:\n{log[-1500:]}"
    shm_log = c.read("/var/lib/cprctl/vms/shm/qemu.log")
    assert "terminating on signal" not in shm_log, shm_log[-1500:]
    assert "guest: shutdown" in c.read("/srv/vms/shm/console.log"), "the shm guest was not shut down cleanly"

    c2 = Container(c.root, work / "boot2.log")
    try:
        c2.sh("systemctl is-active cprctl-guests.service")
        st = c2.status()
        journal = c2.sh(
            "journalctl -b -1 -u cprctl-guests.service --no-pager; journalctl -b -u cprctl-guests.service --no-pager"
        ).stdout
        print(journal)
        for name in ("sess", "unit", "upd", "adp"):
            assert st[name]["state"] == "running", (name, st[name], journal, journal1[-2000:])
            assert st[name]["unit"] == f"cprctl-{name}.scope" or str(st[name]["unit"]).startswith(f"cprctl-{name}"), st[
                name
            ]
            wait_ticks(c2, name, counts[name] + 1)
            assert boot_ids(c2, name) == before[name], f"{name} rebooted: {boot_ids(c2, name)} vs {before[name]}"
        usr = json.loads(c2.sh(as_op("cprctl status usr --json")).stdout)
        assert usr["state"] == "running" and usr["unit"] == "cprctl-usr.scope", usr
        wait_ticks(c2, "usr", counts_usr + 1)
        assert boot_ids(c2, "usr") == before_usr, "usr rebooted"
        assert st["shm"]["state"] == "running", st["shm"]
        deadline = time.monotonic() + 120
        while len(boot_ids(c2, "shm")) < 2:  # booted afresh: a second boot id on its console
            assert time.monotonic() < deadline, (
                "shm was not booted afresh:\n" + c2.read("/srv/vms/shm/console.log")[-800:]
            )
            time.sleep(0.2)
        assert "sess: restored" in journal and "shm: cold-booted" in journal and "shm: shut down" in journal, journal
        print(
            c2.sh(
                "systemctl status --no-pager cprctl-guests.service; systemctl list-units --no-pager 'cprctl-*'",
                check=False,
            ).stdout
        )
    finally:
        c2.kill()
