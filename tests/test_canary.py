"""Unit tests of the kept RAM's canary (`canary`): the sample, the comparison, and a real file (no QEMU)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from cprctl._checkpoint import canary, record
from cprctl._checkpoint.record import Checkpoint, RamCanary
from cprctl.errors import CheckpointError

MIB = 1 << 20


@pytest.mark.parametrize(
    ("pages", "drawn"),
    [
        (0, 0),
        (100, 100),  # a small file: every page
        (32768, 1024),  # 128 MiB: 1/32 of its pages
        (262144, 1024),  # 1 GiB: 1/256
        (524288, 2048),  # 2 GiB
        (1 << 20, 4096),  # 4 GiB: the cap
        (16 << 18, 4096),  # 16 GiB
    ],
)
def test_sample_size(pages: int, drawn: int) -> None:
    assert canary.sample_size(pages) == drawn


def test_the_sample_is_the_first_last_and_random_pages_from_the_seed() -> None:
    size = 128 * MIB
    pages = canary.sample_pages(size, 1)
    assert len(pages) == 1026 and len(set(pages)) == 1026 and pages == sorted(pages)
    assert pages[0] == 0 and pages[-1] == size // canary.PAGE - 1
    assert canary.sample_pages(size, 1) == pages  # the restore draws the same pages
    assert canary.sample_pages(size, 2) != pages  # a new seed, other pages
    # The drawing is part of the record's format (`SCHEME`): it must not change under a saved VM.
    assert pages[:8] == [0, 22, 107, 161, 169, 180, 232, 273]


def test_small_and_odd_sizes() -> None:
    assert canary.sample_pages(0, 5) == []
    assert canary.sample_pages(1, 5) == [0]
    assert canary.sample_pages(4097, 5) == [0, 1]  # a partial last page is a page
    assert canary.sample_pages(1030 * canary.PAGE, 5) == sorted(set(canary.sample_pages(1030 * canary.PAGE, 5)))
    assert len(canary.sample_pages(1030 * canary.PAGE, 5)) == 1026


def test_differing_counts_page_digests() -> None:
    a = bytes(range(24))
    assert canary.differing(a, a) == 0
    assert canary.differing(a, a[:8] + bytes(8) + a[16:]) == 1
    assert canary.differing(a, a[:8]) == 2  # missing digests differ


def test_kept_files_only_with_x_ignore_shared() -> None:
    argv = [
        "qemu-system-x86_64",
        "-object",
        "memory-backend-file,id=m0,size=128M,mem-path=vm.ram,share=on",
        "-object",
        "memory-backend-file,id=m1,size=64M,mem-path=/srv/gone.ram,share=on,discard-data=on",
        "-object",
        "memory-backend-memfd,id=m2,size=64M",
        "-object",
        "memory-backend-file,id=m3,size=64M,mem-path=/srv/private.ram,share=off",
        "-machine",
        "memory-backend=m0",
    ]
    assert canary.kept_files(argv, {"x-ignore-shared": True}, "/var/vm") == ["/var/vm/vm.ram"]
    assert canary.kept_files(argv, {"x-ignore-shared": False}, "/var/vm") == []  # written to the state file
    assert canary.kept_files(argv, {}, "/") == []


def _ram_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _rewrite_page(path: Path, page: int) -> None:
    with open(path, "r+b") as f:
        f.seek(page * canary.PAGE + 100)
        old = f.read(1)
        f.seek(page * canary.PAGE + 100)
        f.write(bytes([old[0] ^ 0xFF]))


def _checkpoint(kept: list[RamCanary]) -> Checkpoint:
    return Checkpoint("/s/state.cpr", 1, "d", {}, {}, "in-place", False, True, 1.0, 2.0, "10.0.2", kept_ram=kept)


def test_an_untouched_file_passes_and_a_rewritten_sampled_page_is_caught(tmp_path: Path) -> None:
    ram = _ram_file(tmp_path / "vm.ram", 8 * MIB)  # 2048 pages: 1026 sampled
    c = canary.take(str(ram))
    assert c.size == 8 * MIB and canary.sampled(c) == 1026 and c.scheme == canary.SCHEME
    assert canary.problem(c) is None
    pages = canary.sample_pages(c.size, c.seed)
    _rewrite_page(ram, pages[5])
    _rewrite_page(ram, pages[-1])  # the last page
    assert (why := canary.problem(c)) is not None and why.startswith("2 of 1026 sampled pages differ (writes lost")
    with pytest.raises(CheckpointError) as err:
        canary.check("vm1", _checkpoint([c]))
    said = str(err.value)
    assert "\n" not in said and said.startswith(f"vm1: RAM file {ram} is not what the save left: 2 of 1026")
    assert "host crash" in said and "cannot resume" in said


def test_a_page_outside_the_sample_is_not_seen(tmp_path: Path) -> None:
    """The canary samples: a page it did not draw can change unseen (see the odds in `canary`)."""
    ram = _ram_file(tmp_path / "vm.ram", 8 * MIB)
    c = canary.take(str(ram))
    unsampled = sorted(set(range(2048)) - set(canary.sample_pages(c.size, c.seed)))[0]
    _rewrite_page(ram, unsampled)
    assert canary.problem(c) is None


def test_an_older_copy_of_the_file_is_caught(tmp_path: Path) -> None:
    ram = _ram_file(tmp_path / "vm.ram", 4 * MIB)
    old = ram.read_bytes()
    data = bytearray(old)
    for page in range(0, len(data) // canary.PAGE, 3):  # the guest wrote a third of its pages since
        data[page * canary.PAGE] ^= 1
    ram.write_bytes(bytes(data))
    c = canary.take(str(ram))
    ram.write_bytes(old)  # a backup put back
    assert (why := canary.problem(c)) is not None and " of 1024 sampled pages differ" in why  # every page
    assert int(why.split()[0]) == len(range(0, 1024, 3))


def test_truncated_missing_and_unknown_scheme(tmp_path: Path) -> None:
    ram = _ram_file(tmp_path / "vm.ram", 1 * MIB)
    c = canary.take(str(ram))
    os.truncate(ram, MIB // 2)
    assert canary.problem(c) == f"it is {MIB // 2} bytes, the save left {MIB} (truncated or replaced since)"
    ram.unlink()
    assert canary.problem(c) == "it is missing (deleted or moved since the save)"
    with pytest.raises(CheckpointError, match="is not what the save left: it is missing"):
        canary.check("vm1", _checkpoint([c]))
    assert canary.problem(msgspec.structs.replace(c, scheme="sha1-2m-9")) is None  # not checked
    canary.check("vm1", _checkpoint([]))  # an older checkpoint: nothing to check


def test_take_kept_reads_the_files_and_skips_what_is_not_a_file(tmp_path: Path) -> None:
    ram = _ram_file(tmp_path / "vm.ram", 64 * 1024)
    argv = [
        "qemu",
        "-object",
        f"memory-backend-file,id=m0,size=64K,mem-path={ram},share=on",
        "-object",
        "memory-backend-file,id=m1,size=64K,mem-path=/dev/null,share=on",  # e.g. a device DAX: no read()
    ]
    kept = canary.take_kept(argv, {"x-ignore-shared": True})
    assert [k.path for k in kept] == [str(ram)] and canary.sampled(kept[0]) == 16


def test_retake_after_a_qemu_wrote_the_file(tmp_path: Path) -> None:
    """A QEMU that loaded the checkpoint but never ran the guest (a trial, a failed restore) may have written
    KVM's clock records into the kept RAM: the canary is taken again from the same pages."""
    ram = _ram_file(tmp_path / "vm.ram", 8 * MIB)
    cp = _checkpoint([canary.take(str(ram))])
    first = cp.kept_ram[0]
    _rewrite_page(ram, canary.sample_pages(first.size, first.seed)[3])
    assert canary.problem(first) is not None
    canary.retake(cp)
    assert cp.kept_ram[0].seed == first.seed and canary.problem(cp.kept_ram[0]) is None
    os.truncate(ram, MIB)  # not a QEMU's doing: the canary stays, and the restore refuses it
    canary.retake(cp)
    assert canary.problem(cp.kept_ram[0]) == f"it is {MIB} bytes, the save left {8 * MIB} (truncated or replaced since)"


def test_a_checkpoint_with_a_canary_round_trips_and_an_older_one_has_none(tmp_path: Path) -> None:
    ram = _ram_file(tmp_path / "vm.ram", 64 * 1024)
    rec = record.VMRecord("vm1", ["qemu"], "/s/qmp", "launch", "pc", "/s/log")
    rec.checkpoint = _checkpoint([canary.take(str(ram))])
    record.save(tmp_path / "vm.json", rec)
    assert record.load(tmp_path / "vm.json") == rec
    data = msgspec.json.decode((tmp_path / "vm.json").read_bytes())
    del data["checkpoint"]["kept_ram"]
    older = record.decode(msgspec.json.encode(data), "vm.json")
    assert older.checkpoint is not None and older.checkpoint.kept_ram == []


def test_the_records_default_scheme_is_this_one() -> None:
    assert RamCanary("/r", 0, 0, b"").scheme == canary.SCHEME
