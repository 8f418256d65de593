"""Where a VM's downtime went, from its guest's stop to its running again (pure).

Across a host reboot the times come from the VM's checkpoint (its guest's stop, its save, the end of the
``save-all`` that saved it) and from the boot that restored it (the kernel's start, the start of the cprctl
that restored it, its restore's start and the guest's resume):

    save       guest stopped -> its checkpoint recorded (its state on disk)
    shutdown   -> the end of the save-all (the other VMs' saves)
    reboot     -> the new kernel's start: the rest of the shutdown, the firmware or kexec
    boot       -> cprctl started: the kernel, the initrd and systemd up to the unit
    queue      -> its restore began: cprctl's start-up, restores before its own
    restore    -> its guest running again

Without a reboot in between, ``saved`` (its checkpoint -> its restore) stands for shutdown, reboot, boot
and queue.
"""

from __future__ import annotations

from .record import Checkpoint, Timeline

#: The segments, in order (a timeline has those its times allow).
SEGMENTS = ("save", "shutdown", "reboot", "boot", "queue", "saved", "restore")


def make(
    cp: Checkpoint, restore_at: float, running_at: float, boot_at: float | None, cprctl_at: float | None
) -> Timeline:
    """The timeline of a restore from *cp*; *boot_at* and *cprctl_at* only when the host rebooted since the save."""
    return Timeline(cp.stopped_at, cp.saved_at, restore_at, running_at, cp.fleet_done_at, boot_at, cprctl_at)


def segments(t: Timeline) -> dict[str, float]:
    """Seconds of each segment (see the module's doc), then ``total``: guest stop to guest running."""
    out = {"save": t.saved_at - t.stopped_at}
    if t.boot_at is None:
        out["saved"] = t.restore_at - t.saved_at
    else:
        shutdown_end = t.saved_at
        if t.fleet_done_at is not None:
            out["shutdown"] = t.fleet_done_at - t.saved_at
            shutdown_end = t.fleet_done_at
        out["reboot"] = t.boot_at - shutdown_end
        started = t.cprctl_at if t.cprctl_at is not None else t.restore_at
        out["boot"] = started - t.boot_at
        out["queue"] = t.restore_at - started
    out["restore"] = t.running_at - t.restore_at
    out["total"] = t.running_at - t.stopped_at
    return {k: round(v, 3) for k, v in out.items()}


def describe(seconds: dict[str, float]) -> str:
    """One line: ``41.2 s: save 0.3, shutdown 1.0, reboot 12.1, boot 20.5, queue 0.2, restore 7.1``."""
    parts = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total")
    return f"{seconds['total']:.1f} s: {parts}"
