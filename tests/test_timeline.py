"""Where a VM's downtime went (pure): the segments of a timeline add up to its pause."""

from __future__ import annotations

from cprctl._checkpoint import timeline
from cprctl._checkpoint.record import Checkpoint, Timeline


def cp(**kw: object) -> Checkpoint:
    base: dict[str, object] = dict(
        state_file="/s", size=1, digest="d", capabilities={}, parameters={}, strategy="in-place",
        suspended=False, was_running=True, stopped_at=100.0, saved_at=100.4, qemu_version="10.0.2",
    )  # fmt: skip
    return Checkpoint(**{**base, **kw})  # type: ignore[arg-type]


def test_across_a_reboot_after_save_all() -> None:
    t = timeline.make(
        cp(fleet_done_at=101.0), restore_at=131.0, running_at=131.5, boot_at=110.0, cprctl_at=130.2, init_at=112.0
    )
    seg = timeline.segments(t)
    assert seg == {
        "save": 0.4, "shutdown": 0.6, "reboot": 9.0, "kernel": 2.0, "boot": 18.2, "queue": 0.8, "restore": 0.5,
        "total": 31.5,
    }  # fmt: skip
    assert timeline.describe(seg) == (
        "31.5 s: save 0.4, shutdown 0.6, reboot 9.0, kernel 2.0, boot 18.2, queue 0.8, restore 0.5"
    )


def test_in_a_container_the_kernel_did_not_restart() -> None:
    """systemd-nspawn: the kernel started long before the save; the container's init after it."""
    t = timeline.make(cp(fleet_done_at=101.0), 131.0, 131.5, boot_at=50.0, cprctl_at=130.2, init_at=115.0)
    assert timeline.segments(t) == {
        "save": 0.4, "shutdown": 0.6, "reboot": 14.0, "boot": 15.2, "queue": 0.8, "restore": 0.5, "total": 31.5,
    }  # fmt: skip


def test_saved_alone_or_restored_in_the_same_boot() -> None:
    alone = timeline.segments(timeline.make(cp(), 140.0, 140.2, boot_at=110.0, cprctl_at=None))
    assert alone == {"save": 0.4, "reboot": 9.6, "boot": 30.0, "queue": 0.0, "restore": 0.2, "total": 40.2}
    same = timeline.segments(Timeline(100.0, 100.4, 105.0, 105.3))
    assert same == {"save": 0.4, "saved": 4.6, "restore": 0.3, "total": 5.3}


def test_shares_split_the_downtime_into_qemu_host_and_cprctl() -> None:
    """QEMU: its migration after the stop, its start (less the scope's spawn), load and cont; the host: shutdown,
    reboot, kernel and boot; cprctl: the rest (hashing, queue, checks, records)."""
    saved = cp(fleet_done_at=101.0, timings_ms={"migrate": 350.0, "migrate_stopped": 300.0, "digest": 80.0})
    steps = {"check": 100.0, "spawn": 50.0, "start": 150.0, "load": 200.0, "verify_wait": 20.0, "cont": 30.0}
    t = timeline.make(saved, 131.0, 131.5, boot_at=110.0, cprctl_at=130.2, init_at=112.0, restore_ms=steps)
    assert t.save_ms["digest"] == 80.0 and t.restore_ms == steps
    sh = timeline.shares(t)
    # qemu: 0.3 + (0.15 - 0.05 + 0.2 + 0.03); host: 0.6 + 9 + 2 + 18.2; cprctl: 31.5 - 0.63 - 29.8
    assert sh == {"qemu": 0.63, "host": 29.8, "cprctl": 1.07, "idle": 0.0, "total": 31.5}
    assert sum(v for k, v in sh.items() if k != "total") == sh["total"]


def test_shares_without_a_reboot_count_the_wait_as_idle() -> None:
    saved = cp(timings_ms={"migrate_stopped": 300.0})
    t = timeline.make(saved, 105.0, 105.3, None, None, restore_ms={"start": 100.0, "load": 100.0})
    assert timeline.shares(t) == {"qemu": 0.5, "host": 0.0, "cprctl": 0.2, "idle": 4.6, "total": 5.3}


def test_shares_of_an_older_record_are_unknown() -> None:
    """A checkpoint an older cprctl wrote has no migrate_stopped step: no split rather than a wrong one."""
    t = timeline.make(cp(timings_ms={"migrate": 300.0}), 105.0, 105.3, None, None, restore_ms={"load": 100.0})
    assert timeline.shares(t) is None
    assert timeline.shares(Timeline(100.0, 100.4, 105.0, 105.3)) is None


def test_queue_steps_split_the_queue_at_boot_by_this_process_marks() -> None:
    """python's start and imports up to restore-all's start, then every VM's state; marks before the
    process's start (or missing) give no step."""
    marks = {"restore_all": 130.5, "states": 130.75}
    assert timeline.queue_steps(130.2, marks) == {"queue_python": 300.0, "queue_states": 250.0}
    assert timeline.queue_steps(None, marks) == {"queue_states": 250.0}
    assert timeline.queue_steps(131.0, {"restore_all": 130.5}) == {}
    assert timeline.queue_steps(130.2, {}) == {}
    # They are steps of the restore, beside its own: the shares do not change.
    saved = cp(fleet_done_at=101.0, timings_ms={"migrate_stopped": 300.0})
    steps = {"check": 100.0, "spawn": 50.0, "start": 150.0, "load": 200.0}
    plain = timeline.make(saved, 131.0, 131.5, 110.0, 130.2, 112.0, steps)
    split = timeline.make(saved, 131.0, 131.5, 110.0, 130.2, 112.0, {**steps, **timeline.queue_steps(130.2, marks)})
    assert timeline.shares(split) == timeline.shares(plain)
    assert split.restore_ms["queue_python"] == 300.0
