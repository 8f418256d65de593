"""Unit tests of the pure planning and check rules."""

from __future__ import annotations

import pytest

from cprctl._checkpoint import plan as plan_module
from cprctl._checkpoint.plan import UNCAPPED, Facts, RamFact, choose, findings
from cprctl._qemu.argv import RamBackend

SHARED = RamFact(RamBackend("ram0", "file", True, "/var/lib/vm/ram", "1G"), "file", "ext4")
SHM = RamFact(RamBackend("ram0", "file", True, "/dev/shm/ram", "1G"), "file", "tmpfs")
ANON = RamFact(RamBackend("main", "default", False, None, "1G"))
DIRPATH = RamFact(RamBackend("ram0", "file", True, "/dev/hugepages", "1G"), "dir", "hugetlbfs")
GIB = 1 << 30


def facts(*ram: RamFact, **kw: object) -> Facts:
    base = dict(
        name="vm",
        qemu_version=(10, 0, 2),
        has_cpr_mode=True,
        machine="pc-q35-10.0",
        ram=list(ram),
        ram_bytes=GIB,
        state_fs="ext4",
        state_free=100 * GIB,
        s3_enabled=True,
    )
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


def codes(found: list) -> set[str]:  # type: ignore[type-arg]
    return {f.code for f in found if f.blocking}


def test_shared_file_stays_in_place() -> None:
    plan = choose(facts(SHARED))
    assert plan.strategy == "in-place"
    assert plan.capabilities == {"x-ignore-shared": True, "mapped-ram": False, "multifd": False}
    assert plan.parameters["mode"] == "cpr-reboot"
    assert plan.expected_bytes < GIB


def test_anonymous_ram_is_written_as_mapped_ram_and_shared_stays() -> None:
    plan = choose(facts(SHARED, ANON, ram_bytes=2 * GIB, cores=2, state_dio=True))
    assert plan.strategy == "mapped-ram"
    assert plan.capabilities == {"x-ignore-shared": True, "mapped-ram": True, "multifd": True}
    assert plan.parameters["max-bandwidth"] == UNCAPPED
    assert plan.parameters["multifd-channels"] == 2
    assert plan.parameters["direct-io"] is True, "measured faster here: see plan.DIRECT_IO"
    assert GIB < plan.expected_bytes < 2 * GIB  # only the anonymous GiB is written


def test_direct_io_only_where_wanted_the_filesystem_takes_it_and_qemu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "DIRECT_IO", True)
    assert choose(facts(ANON, state_dio=True)).parameters["direct-io"] is True
    assert choose(facts(ANON, state_dio=False)).parameters["direct-io"] is False
    assert choose(facts(SHARED, state_dio=True)).parameters["direct-io"] is False
    assert "direct-io" not in choose(facts(ANON, state_dio=True, qemu_version=(9, 0, 0))).parameters


def test_check_says_how_the_save_would_run() -> None:
    def how(f: Facts, **kw: object) -> str:
        return next(x.message for x in findings(f, **kw) if x.code == "save-plan")  # type: ignore[arg-type]

    assert "stays in place" in how(facts(SHARED))
    assert "mapped-ram with 2 multifd channel(s) and O_DIRECT" in how(facts(ANON, cores=2, state_dio=True))
    assert "tmpfs refuses it" in how(facts(ANON, state_dio=False, state_fs="tmpfs"))
    assert "one migration stream" in how(facts(ANON), strategy="stream")


def test_every_capability_is_set_so_a_previous_save_leaves_nothing_on() -> None:
    for strategy in ("auto", "in-place", "stream", "mapped-ram"):
        caps = choose(facts(SHARED), strategy=strategy).capabilities  # type: ignore[arg-type]
        assert set(caps) == {"x-ignore-shared", "mapped-ram", "multifd"}


def test_explicit_stream_writes_all_ram_even_shared() -> None:
    plan = choose(facts(SHARED, ram_bytes=GIB), strategy="stream")
    assert plan.strategy == "stream" and not any(plan.capabilities.values())
    assert plan.expected_bytes > GIB


def test_stream_or_mapped_ram_carries_tmpfs_ram_across_a_reboot() -> None:
    assert "ram-volatile-ram0" in codes(findings(facts(SHM), reboot=True))
    assert codes(findings(facts(SHM), reboot=True, strategy="mapped-ram")) == set()


def test_directory_mem_path_is_flagged_and_written() -> None:
    found = findings(facts(DIRPATH))
    assert any(f.code == "ram-dir-ram0" and "unlinked" in f.message for f in found)
    plan = choose(facts(DIRPATH))
    assert plan.strategy == "mapped-ram" and plan.capabilities["x-ignore-shared"] is False


def test_old_qemu_and_incompatible_caps_refused() -> None:
    found = findings(
        facts(SHARED, qemu_version=(8, 2, 0), has_cpr_mode=False, enabled_caps=frozenset({"postcopy-ram"}))
    )
    assert codes(found) == {"qemu-version", "no-cpr-mode", "cap-postcopy-ram"}


def test_reboot_refuses_ram_on_tmpfs_but_not_on_disk() -> None:
    assert "ram-volatile-ram0" in codes(findings(facts(SHM), reboot=True))
    assert codes(findings(facts(SHM))) == set()
    assert codes(findings(facts(SHARED), reboot=True)) == set()
    assert "state-volatile" in codes(findings(facts(SHARED, state_fs="tmpfs"), reboot=True))


def test_space_uses_the_plan() -> None:
    assert "space" in codes(findings(facts(ANON, state_free=GIB // 2)))
    assert "space" not in codes(findings(facts(SHARED, state_free=GIB // 2)))


@pytest.mark.parametrize(
    "kw, code",
    [
        ({"agent_configured": False}, "agent-missing"),
        ({"agent_configured": True, "agent_answers": False}, "agent-silent"),
        ({"agent_configured": True, "agent_answers": True, "agent_can_suspend": False}, "agent-no-suspend"),
        (
            {"agent_configured": True, "agent_answers": True, "agent_can_suspend": True, "s3_enabled": False},
            "s3-disabled",
        ),
    ],
)
def test_vfio_needs_a_working_agent_and_s3(kw: dict[str, object], code: str) -> None:
    found = findings(facts(SHARED, vfio=["/machine/peripheral/gpu"], **kw))
    assert code in codes(found)
    assert choose(facts(SHARED, vfio=["x"])).suspend


def test_vfio_with_suspend_never_refused() -> None:
    assert "vfio-no-suspend" in codes(findings(facts(SHARED, vfio=["x"]), suspend="never"))


def test_vfio_with_working_agent_passes() -> None:
    ok = facts(SHARED, vfio=["x"], agent_configured=True, agent_answers=True, agent_can_suspend=True)
    assert codes(findings(ok)) == set()


def test_unversioned_machine_warns() -> None:
    found = findings(facts(SHARED, machine="q35"))
    assert any(f.code == "machine-unpinned" and f.severity == "warning" for f in found)


def test_findings_sorted_worst_first() -> None:
    found = findings(facts(ANON, DIRPATH, qemu_version=(8, 0, 0)))
    order = [f.severity for f in found]
    assert order == sorted(order, key=["error", "warning", "info"].index)


def test_hotplugged_hardware_blocks_the_save() -> None:
    found = findings(facts(SHARED, hotplugged=["device 'rng0'"]))
    assert "hotplugged" in codes(found)
    assert any("rng0" in f.message for f in found if f.code == "hotplugged")


AGENT = {"agent_configured": True, "agent_answers": True, "agent_can_suspend": True}


@pytest.mark.parametrize(
    ("machine", "seabios", "warned"),
    [("pc-q35-10.0", True, True), ("pc-q35-10.0", False, False), ("pc-i440fx-10.0", True, False)],
)
def test_a_q35_guest_on_seabios_is_warned_it_suspends_once(machine: str, seabios: bool, warned: bool) -> None:
    # Seen on QEMU 10.0.2: after the first wake SeaBIOS leaves the ICH9 PMBASE reset, and the next S3 never holds.
    found = findings(facts(SHARED, vfio=["hostdev0"], machine=machine, seabios=seabios, **AGENT))
    once = [f for f in found if f.code == "s3-once"]
    assert bool(once) == warned, found
    assert not [f for f in found if f.blocking], found
    if once:
        assert "once per boot" in once[0].message and "OVMF" in once[0].fix


def test_no_suspend_no_s3_warning() -> None:
    assert "s3-once" not in {f.code for f in findings(facts(SHARED, seabios=True, **AGENT))}


def test_an_unmapped_acpi_pm_block_refuses_a_suspend() -> None:
    """Measured, not guessed: a guest whose ACPI PM block is off cannot enter S3 (its sleep request goes nowhere)."""
    found = findings(facts(SHARED, vfio=["hostdev0"], seabios=True, acpi_pm_mapped=False, **AGENT))
    off = [f for f in found if f.code == "acpi-pm-unmapped"]
    assert off and off[0].blocking and not off[0].forceable, found
    assert "not decoded (SeaBIOS" in off[0].message and "until it reboots" in off[0].message
    assert "reboot the guest" in off[0].fix and "OVMF" in off[0].fix and "--suspend" not in off[0].fix
    assert "s3-once" not in {f.code for f in found}, "said once, as the error"
    always = findings(facts(SHARED, seabios=True, acpi_pm_mapped=False, **AGENT), suspend="always")
    fix = next(f.fix for f in always if f.code == "acpi-pm-unmapped")
    assert fix.endswith("or save it with --suspend auto")
    ovmf = findings(facts(SHARED, seabios=False, acpi_pm_mapped=False, **AGENT), suspend="always")
    assert "acpi-pm-unmapped" in codes(ovmf) and "SeaBIOS" not in " ".join(f.message for f in ovmf)


def test_a_mapped_or_unknown_acpi_pm_block_or_no_suspend_refuses_nothing() -> None:
    for mapped in (True, None):
        found = findings(facts(SHARED, seabios=True, acpi_pm_mapped=mapped, **AGENT), suspend="always")
        assert not codes(found) and "s3-once" in {f.code for f in found}, found
    unplanned = findings(facts(SHARED, seabios=True, acpi_pm_mapped=False, **AGENT), suspend="never")
    assert not codes(unplanned), unplanned
