"""Where a VM's downtime went, from its guest's stop to its running again (pure).

Across a host reboot the times come from the VM's checkpoint (its guest's stop, its save, the end of the
``save-all`` that saved it) and from the boot that restored it (the kernel's start, the start of the cprctl
that restored it, its restore's start and the guest's resume):

    save       guest stopped -> its checkpoint recorded (its state on disk)
    shutdown   -> the end of the save-all (the other VMs' saves)
    reboot     -> the new kernel's start: the rest of the shutdown, the firmware or kexec
    kernel     -> its init (PID 1) started: the kernel's own start-up
    boot       -> cprctl started: the initrd and systemd up to the unit
    queue      -> its restore began: cprctl's start-up, restores before its own
    restore    -> its guest running again

`shares` splits the same downtime by who spent it: QEMU (its migration after the guest stopped, its start,
its load from ``migrate-incoming`` to the loaded state, and its ``cont``), the host (the shutdown after the
save, other VMs' saves included: the host goes down once all are saved; firmware or kexec, kernel, systemd up
to the unit) and cprctl (everything else: hashing and flushing after the save, python's start and imports at
boot, the restores queued before this one, the state file's checks, setting QEMU's migration parameters, the
RAM's verification, the records it writes, the scope it starts QEMU in).

At boot the ``queue`` is split further in the restore's steps (`queue_steps`): ``queue_python`` (python's
start, its imports and the arguments, up to ``restore-all``'s start) and ``queue_states`` (every VM's state,
interrupted operations finished); the rest of it is the restores before this one, its lock and its recovery.

Without a reboot in between, ``saved`` (its checkpoint -> its restore) stands for shutdown, reboot, kernel,
boot and queue. In a container (systemd-nspawn) the kernel does not restart: ``reboot`` runs to the start
of the container's init, and there is no ``kernel``.
"""

from __future__ import annotations

from .record import Checkpoint, Timeline

#: The segments, in order (a timeline has those its times allow).
SEGMENTS = ("save", "shutdown", "reboot", "kernel", "boot", "queue", "saved", "restore")


def make(
    cp: Checkpoint,
    restore_at: float,
    running_at: float,
    boot_at: float | None,
    cprctl_at: float | None,
    init_at: float | None = None,
    restore_ms: dict[str, float] | None = None,
) -> Timeline:
    """The timeline of a restore from *cp* (whose steps took *restore_ms*); *boot_at*, *cprctl_at* and
    *init_at* only when the host rebooted since the save."""
    return Timeline(
        cp.stopped_at,
        cp.saved_at,
        restore_at,
        running_at,
        cp.fleet_done_at,
        boot_at,
        cprctl_at,
        init_at,
        dict(cp.timings_ms),
        dict(restore_ms or {}),
    )


def queue_steps(cprctl_at: float | None, marks: dict[str, float]) -> dict[str, float]:
    """Milliseconds of the queue's first steps (see the module's doc) from this process's *marks*
    (`clock.mark`: ``restore_all``, ``states``) and its start *cprctl_at*; those it has."""
    out = {}
    start, states = marks.get("restore_all"), marks.get("states")
    if cprctl_at is not None and start is not None and start >= cprctl_at:
        out["queue_python"] = (start - cprctl_at) * 1000
    if start is not None and states is not None and states >= start:
        out["queue_states"] = (states - start) * 1000
    return {k: round(v, 1) for k, v in out.items()}


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
        started = t.cprctl_at if t.cprctl_at is not None else t.restore_at
        # Marks of this boot that came after the shutdown (a container's kernel, say, did not restart).
        kernel, init = (
            at if at is not None and shutdown_end <= at <= started else None for at in (t.boot_at, t.init_at)
        )
        up = kernel if kernel is not None else init if init is not None else started
        out["reboot"] = up - shutdown_end
        if kernel is not None and init is not None:
            out["kernel"] = init - kernel
        out["boot"] = started - (init if init is not None else up)
        out["queue"] = t.restore_at - started
    out["restore"] = t.running_at - t.restore_at
    out["total"] = t.running_at - t.stopped_at
    return {k: round(v, 3) for k, v in out.items()}


#: Segments that are the host's own (across a reboot); ``saved`` (no reboot) is idle time, nobody's.
HOST = ("shutdown", "reboot", "kernel", "boot")


def shares(t: Timeline) -> dict[str, float] | None:
    """Seconds of the downtime that were QEMU's, the host's and cprctl's (see the module's doc), then
    ``idle`` (saved without a reboot) and ``total``; None when the save's or restore's steps were not
    recorded (an older cprctl)."""
    if "migrate_stopped" not in t.save_ms or "load" not in t.restore_ms:
        return None
    seg = segments(t)
    save = seg["save"]
    qemu_save = min(save, t.save_ms["migrate_stopped"] / 1000)
    r = t.restore_ms  # QEMU's own steps: its start (less cprctl's ``spawn``, the scope), load and ``cont``
    qemu_restore = (r.get("start", 0.0) - r.get("spawn", 0.0) + r["load"] + r.get("cont", 0.0)) / 1000
    qemu_restore = min(seg["restore"], qemu_restore)
    host = sum(seg.get(k, 0.0) for k in HOST)
    idle = seg.get("saved", 0.0)
    qemu = qemu_save + qemu_restore
    out = {"qemu": qemu, "host": host, "cprctl": seg["total"] - qemu - host - idle, "idle": idle, "total": seg["total"]}
    return {k: round(v, 3) for k, v in out.items()}


def describe(seconds: dict[str, float]) -> str:
    """One line: ``41.2 s: save 0.3, shutdown 1.0, reboot 12.1, boot 20.5, queue 0.2, restore 7.1``."""
    parts = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total")
    return f"{seconds['total']:.1f} s: {parts}"
