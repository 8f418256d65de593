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
    t = timeline.make(cp(fleet_done_at=101.0), restore_at=131.0, running_at=131.5, boot_at=110.0, cprctl_at=130.2)
    seg = timeline.segments(t)
    assert seg == {
        "save": 0.4, "shutdown": 0.6, "reboot": 9.0, "boot": 20.2, "queue": 0.8, "restore": 0.5, "total": 31.5,
    }  # fmt: skip
    assert timeline.describe(seg) == "31.5 s: save 0.4, shutdown 0.6, reboot 9.0, boot 20.2, queue 0.8, restore 0.5"


def test_saved_alone_or_restored_in_the_same_boot() -> None:
    alone = timeline.segments(timeline.make(cp(), 140.0, 140.2, boot_at=110.0, cprctl_at=None))
    assert alone == {"save": 0.4, "reboot": 9.6, "boot": 30.0, "queue": 0.0, "restore": 0.2, "total": 40.2}
    same = timeline.segments(Timeline(100.0, 100.4, 105.0, 105.3))
    assert same == {"save": 0.4, "saved": 4.6, "restore": 0.3, "total": 5.3}
