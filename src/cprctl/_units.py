"""systemd integration: ``cprctl-guests.service`` saves every VM at shutdown and restores them at boot.

Like libvirt-guests, the unit is a oneshot that stays active: ``ExecStart``
(at boot) runs ``restore-all``, ``ExecStop`` (at shutdown, before the
filesystems it needs are unmounted) runs ``save-all --reboot``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ._checkpoint.vm import open_vm
from ._qemu.argv import ram_layout, size_bytes
from ._store import StateDir

UNIT = "cprctl-guests.service"
__all__ = ("UNIT", "install", "size_bytes", "unit_text")

#: Assumed worst-case write speed for RAM that goes into state files (bytes/s) when sizing the stop timeout.
SLOW_DISK = 100_000_000


def _facts(sd: StateDir) -> tuple[list[str], int]:
    """Folders the unit needs mounted, and the bytes of RAM saves will write."""
    mounts = {str(sd.path)}
    written = 0
    for name in sd.names():
        argv = open_vm(sd, name).record.argv
        for b in ram_layout(argv).backends:
            if b.named_shared_file and b.path:
                mounts.add(os.path.dirname(os.path.abspath(b.path)))
            else:
                written += size_bytes(b.size)
    return sorted(mounts), written


def unit_text(sd: StateDir, exe: str | None = None) -> str:
    """The unit for state directory *sd*, with mounts and stop timeout sized from its VMs now."""
    exe = exe or shutil.which("cprctl") or str(Path(sys.argv[0]).resolve())
    mounts, written = _facts(sd)
    timeout = max(300, 120 + written // SLOW_DISK)
    state = str(sd.path)
    return f"""[Unit]
Description=Save running QEMU VMs at shutdown and restore them at boot (cprctl, cpr-reboot)
After=local-fs.target remote-fs.target network-online.target
Wants=network-online.target
RequiresMountsFor={" ".join(mounts)}

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=CPRCTL_STATE_DIR={state}
ExecStart={exe} restore-all
ExecStop={exe} save-all --reboot
# Saves that write RAM need time: sized from the VMs' RAM at install ({written >> 20} MiB written at most).
TimeoutStartSec={timeout}
TimeoutStopSec={timeout}
# QEMUs restored at boot live in this unit's cgroup; never kill one that could not be saved.
KillMode=process
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=multi-user.target
"""


def install(sd: StateDir, dest: Path = Path("/etc/systemd/system"), enable: bool = True) -> Path:
    """Write the unit into *dest*; with *enable* (and systemd running) reload and enable it."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / UNIT
    path.write_text(unit_text(sd))
    if enable and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        subprocess.run(["systemctl", "enable", UNIT], check=False)
    return path
