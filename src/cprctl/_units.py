"""systemd integration: ``cprctl-guests.service`` saves every VM at shutdown and restores them at boot.

Like libvirt-guests, the unit is a oneshot that stays active: ``ExecStart``
(at boot) runs ``restore-all`` (through `cprctl._boot`, which imports less), ``ExecStop`` (at shutdown, before the
filesystems it needs are unmounted) runs ``save-all --shutdown-unsaveable``:
every VM that can be saved is, the others are shut down cleanly. ``ExecStart`` is
prefixed with ``-``: a boot whose ``restore-all`` failed for one VM (it keeps its
checkpoint and says why) leaves the unit active all the same, so the next shutdown
still saves the VMs that run; a failed unit would run no ``ExecStop``, and systemd
would stop every VM's scope unsaved. Each VM's
QEMU runs in a scope of its own ordered ``Before=`` this unit (see
`cprctl._host.systemd`), so systemd stops no VM before the save is done.

The stop timeout is a floor sized from the VMs' RAM at install time; while
saves make progress cprctl extends it (sd_notify ``EXTEND_TIMEOUT_USEC``), so
VMs added later are not cut short, yet a wedged save ends when progress stops.

As root the unit is a system unit; ``--user`` makes it a unit of the user's
manager (it runs at boot only with lingering: ``loginctl enable-linger``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ._checkpoint.vm import open_vm
from ._host import systemd
from ._qemu.argv import host_files, host_network, ram_layout, size_bytes
from ._store import StateDir
from .errors import UsageError

UNIT = systemd.GUESTS_UNIT
SYSTEM_DEST = Path("/etc/systemd/system")
__all__ = ("UNIT", "install", "size_bytes", "unit_text", "user_dest")

#: The unit's CPU weight while the host boots or shuts down (systemd's default for every unit: 100).
STARTUP_CPU_WEIGHT = 1000
#: Assumed worst-case write speed for RAM that goes into state files (bytes/s) when sizing the stop timeout.
SLOW_DISK = 100_000_000


def user_dest() -> Path:
    """Where user units go: ``$XDG_CONFIG_HOME/systemd/user``."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def _facts(sd: StateDir) -> tuple[list[str], int, bool]:
    """Folders the unit needs mounted (the state directory's, and those of every file a VM's QEMU opens:
    binary, disks, kernel, firmware, RAM files), the bytes of RAM saves will write, and whether a VM
    attaches to the host's network (a tap or bridge)."""
    mounts = {str(sd.path)}
    written = 0
    network = False
    for name in sd.names():
        argv = open_vm(sd, name).record.argv
        mounts.update(os.path.dirname(os.path.abspath(p)) for p in host_files(argv))
        network = network or host_network(argv)
        written += sum(size_bytes(b.size) for b in ram_layout(argv).backends if not b.named_shared_file)
    return sorted(mounts), written, network


def boot_command(exe: str) -> str:
    """What the unit runs at boot: ``PYTHON -m cprctl._boot restore-all`` with the python of the ``cprctl``
    command *exe* (its ``#!`` line), which imports less than the CLI before the first restore (`cprctl._boot`);
    ``EXE restore-all`` when that python is not known or cannot import it."""
    try:
        with open(exe, "rb") as f:
            first = f.readline(4096).decode(errors="replace")
    except OSError:
        first = ""
    python = first[2:].split()[:1] if first.startswith("#!") else []
    if python and os.path.isabs(python[0]) and " " not in python[0] and _imports_boot(python[0]):
        return f"{python[0]} -m cprctl._boot restore-all"
    return f"{exe} restore-all"


def _imports_boot(python: str) -> bool:
    """Whether *python* imports `cprctl._boot` as the unit would run it (from /, no PYTHONPATH)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        done = subprocess.run([python, "-c", "import cprctl._boot"], cwd="/", env=env, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def unit_text(sd: StateDir, exe: str | None = None, user: bool = False) -> str:
    """The unit for state directory *sd*, with mounts and stop timeout sized from its VMs now."""
    exe = exe or shutil.which("cprctl") or str(Path(sys.argv[0]).resolve())
    mounts, written, network = _facts(sd)
    timeout = max(300, 120 + written // SLOW_DISK)
    state = str(sd.path)
    # Restores start as early as the VMs allow: after the mounts their files live on (RequiresMountsFor=;
    # a network filesystem's mount is itself after the network) and, only when a VM has a tap or bridge,
    # after network.target (the host's bridges and taps configured). Not network-online.target: a VM needs
    # no routable address on the host, and waiting for one can take minutes. At shutdown the order
    # reverses, so those mounts and the network stay until the saves are done.
    # A user manager cannot order itself after the system's network.
    system_deps = "After=network.target\n" if network and not user else ""
    return f"""[Unit]
Description=Save running QEMU VMs at shutdown and restore them at boot (cprctl, cpr-reboot)
{system_deps}RequiresMountsFor={" ".join(mounts)}

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=CPRCTL_STATE_DIR={state}
ExecStart=-{boot_command(exe)}
ExecStop={exe} save-all --shutdown-unsaveable
# A floor sized from the VMs' RAM at install ({written >> 20} MiB written at most); cprctl extends it
# (sd_notify EXTEND_TIMEOUT_USEC) while saves and loads make progress, never without progress.
TimeoutStartSec={timeout}
TimeoutStopSec={timeout}
NotifyAccess=all
# At boot and shutdown (only then) the restores and saves are the guests' downtime: they come before
# the rest of the host's services starting or stopping beside them (the cgroup's CPU weight, default 100).
StartupCPUWeight={STARTUP_CPU_WEIGHT}
# VMs run in scopes of their own (cprctl-NAME.scope, ordered Before= this unit). QEMUs an older
# cprctl restored at boot live in this unit's cgroup: never kill one that could not be saved.
KillMode=process
StandardOutput=journal
StandardError=journal
SyslogIdentifier=cprctl

[Install]
WantedBy={"default.target" if user else "multi-user.target"}
"""


def install(sd: StateDir, dest: Path | None = None, enable: bool = True, user: bool = False) -> Path:
    """Write the unit into *dest* (default: the system's, or with *user* the user's unit folder);
    with *enable* (and systemd running) reload and enable it.

    :raise UsageError: not root without *user*, *dest* not writable, or systemctl refuses (one line each).
    """
    if not user and os.geteuid() != 0 and dest is None:
        raise UsageError("install-units needs root for a system unit; as a user: cprctl install-units --user")
    dest = dest or (user_dest() if user else SYSTEM_DEST)
    path = dest / UNIT
    try:
        dest.mkdir(parents=True, exist_ok=True)
        path.write_text(unit_text(sd, user=user))
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    if enable and systemd.booted():
        flag = ["--user"] if user else []
        for args in (["daemon-reload"], ["enable", UNIT]):
            done = subprocess.run(["systemctl", *flag, *args], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                why = done.stderr.strip().splitlines()[-1:] or ["failed"]
                raise UsageError(f"wrote {path}, but 'systemctl {' '.join(flag + args)}' failed: {why[0]}")
    return path


def lingering() -> bool | None:
    """Whether this user's manager runs from boot (``loginctl enable-linger``); None when unknown."""
    try:
        done = subprocess.run(
            ["loginctl", "show-user", str(os.getuid()), "-p", "Linger", "--value"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"yes": True, "no": False}.get(done.stdout.strip())
