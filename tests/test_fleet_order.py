"""The order restore-all starts restores in (`fleet.restore_order`): pure logic, no QEMU."""

from __future__ import annotations

from cprctl._checkpoint.fleet import restore_order


def test_quickest_first_then_by_name() -> None:
    costs = {"big": 4 << 30, "inplace-b": 900_000, "cold": 0, "inplace-a": 900_000, "mid": 1 << 30}
    assert restore_order(costs) == ["cold", "inplace-a", "inplace-b", "mid", "big"]


def test_no_vms() -> None:
    assert restore_order({}) == []
