"""Kept builds and load proofs, the pure parts: deciding, parsing QEMU's log, the store's files (no QEMU)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import pytest

from cprctl._checkpoint import record
from cprctl._checkpoint.compat import fallback_binary, load_finding, loadability
from cprctl._checkpoint.record import Proof, VMRecord
from cprctl._qemu.build import soname
from cprctl._qemu.process import qemu_error
from cprctl._store.builds import BuildMeta, Builds, File


def test_fallback_goes_to_the_own_binary_while_it_is_the_writing_build_else_to_the_kept_copy() -> None:
    assert fallback_binary("/new", False, "/usr/bin/q", True, "/k/bin/q") == "/usr/bin/q"
    assert fallback_binary("/usr/bin/q", False, "/usr/bin/q", False, "/k/bin/q") == "/k/bin/q"
    assert fallback_binary("/usr/bin/q", False, "/usr/bin/q", False, None) is None
    assert fallback_binary("/k/bin/q", True, "/k/bin/q", True, "/k/bin/q") is None  # the kept build itself failed
    # The binary that failed is the build that wrote the checkpoint: a copy of it would fail the same way.
    assert fallback_binary("/usr/bin/q", True, "/usr/bin/q", True, "/k/bin/q") is None
    assert fallback_binary("/opt/q", True, "/usr/bin/q", True, "/k/bin/q") is None


def proof(loads: bool, reason: str = "") -> Proof:
    return Proof("aaa", "bbb", loads, "update", time.time(), reason)


@pytest.mark.parametrize(
    ("source", "target", "found", "kept", "verdict", "severity"),
    [
        ("aaa", "aaa", None, "aaa", "same-build", "info"),
        ("aaa", "bbb", proof(True), "aaa", "proven", "info"),
        ("aaa", "bbb", None, "aaa", "unproven", "info"),
        ("aaa", "bbb", None, None, "unproven", "warning"),
        ("aaa", "bbb", proof(False, "VQ 0 vring.num 1024 exceeds allocated max 128"), "aaa", "fails", "warning"),
        ("aaa", "bbb", proof(False, "VQ 0 vring.num 1024 exceeds allocated max 128"), None, "fails", "error"),
        ("aaa", None, None, "aaa", "fails", "warning"),  # the binary is gone; the kept build takes it
        (None, "bbb", None, None, "unknown", "warning"),
    ],
)
def test_loadability_and_its_finding(
    source: str | None, target: str | None, found: Proof | None, kept: str | None, verdict: str, severity: str
) -> None:
    load = loadability(source, target, "/usr/bin/q", found, kept)
    assert load.verdict == verdict
    assert load.restorable == (verdict != "fails" or kept is not None)
    f = load_finding("vm1", load)
    assert f.severity == severity and "/usr/bin/q" in f.message
    if found is not None and not found.loads:
        assert "vring.num 1024" in f.message  # QEMU's own reason, in the one line
    if kept and verdict in ("fails", "unproven"):
        assert f"kept build {kept}" in f.message


def test_qemus_own_error_line_is_picked_from_the_last_run(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_text(
        "--- cprctl 2026-11-29 10:00:00: qemu-system-x86_64 -m 1G\n"
        "qemu-system-x86_64: an old error of an earlier run\n"
        "--- cprctl 2026-11-29 11:00:00: qemu-system-x86_64 -incoming defer\n"
        "qemu-system-x86_64: warning: nic has no peer\n"
        "qemu-system-x86_64: -mon chardev=cprctl-qmp,mode=control: warning: '-mon' is deprecated, use '-object'\n"
        "qemu-system-x86_64: VQ 0 vring.num 1024 exceeds allocated max 128\n"
        "qemu-system-x86_64: Failed to load virtio-console:virtio\n"
        "qemu-system-x86_64: error while loading state for instance 0x0 of device '0000:00:03.0/virtio-console'\n"
        "qemu-system-x86_64: load of migration failed: Invalid argument\n"
    )
    assert qemu_error(log) == (
        "VQ 0 vring.num 1024 exceeds allocated max 128; "
        "error while loading state for instance 0x0 of device '0000:00:03.0/virtio-console'"
    )
    log.write_text("--- cprctl 1: q\nqemu-system-x86_64: load of migration failed: Invalid argument\n")
    assert qemu_error(log) == "load of migration failed: Invalid argument"  # nothing better said
    log.write_text("--- cprctl 1: q\nsimulated: cannot load here\n")
    assert qemu_error(log) == "simulated: cannot load here"  # a wrapper's own line
    log.write_text("qemu-system-x86_64: old\n--- cprctl 1: q\n")
    assert qemu_error(log) == ""  # the last run said nothing
    # QEMU 11.1 warns at every start about the monitor cprctl adds (found in tests/test_upgrade_scenario.py: the
    # warning stood as the reason a refused restore fell back); warnings are never QEMU's error.
    log.write_text("--- cprctl 1: q\nqemu-system-x86_64: -mon chardev=c,mode=control: warning: '-mon' is deprecated\n")
    assert qemu_error(log) == ""
    # Nor is its note that cprctl killed it (after a refusal) the reason; a kill by another process is.
    killed = "--- cprctl 1: q\nqemu-system-x86_64: terminating on signal 15 from pid {}\n"
    log.write_text(killed.format(os.getpid()))
    assert qemu_error(log) == ""
    log.write_text(killed.format(1))
    assert qemu_error(log) == "terminating on signal 15 from pid 1"
    assert qemu_error(tmp_path / "missing") == ""


def test_a_shared_library_is_kept_under_the_name_the_loader_looks_for() -> None:
    paths = ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6")
    libc = next(p for p in paths if os.path.exists(p))
    assert soname(os.path.realpath(libc)) == "libc.so.6"
    assert soname("/etc/hostname") is None


def fake_build(tmp_path: Path, build: str) -> tuple[BuildMeta, File, File, list[File]]:
    src = tmp_path / f"src-{build}"
    src.mkdir()
    for name in ("qemu-system-x86_64", "ld-linux-x86-64.so.2", "libglib-2.0.so.0"):
        (src / name).write_bytes(b"\x7fELF" + name.encode())
    meta = BuildMeta(build, "/usr/bin/qemu-system-x86_64", "10.0.2", time.time())
    return (
        meta,
        File("qemu-system-x86_64", str(src / "qemu-system-x86_64")),
        File("ld-linux-x86-64.so.2", str(src / "ld-linux-x86-64.so.2")),
        [File("libglib-2.0.so.0", str(src / "libglib-2.0.so.0"))],
    )


def test_the_store_keeps_a_build_once_and_collects_what_nothing_refers_to(tmp_path: Path) -> None:
    data = tmp_path / "share"
    (data / "keymaps").mkdir(parents=True)
    (data / "bios-256k.bin").write_bytes(b"bios")
    (data / "keymaps" / "en-us").write_text("map")
    store = Builds(tmp_path / "state")
    assert store.ids() == [] and store.launcher("0123") is None
    for build in ("0123", "4567"):
        meta, exe, loader, libs = fake_build(tmp_path, build)
        launcher = store.keep(meta, exe, loader, libs, [], [str(data)])
        assert launcher == store.folder(build) / "bin" / "qemu-system-x86_64" and os.access(launcher, os.X_OK)
        assert store.keep(meta, exe, loader, libs, [], [str(data)]) == launcher  # kept once
    folder = store.folder("0123")
    assert (folder / "share" / "keymaps" / "en-us").read_text() == "map"
    assert (folder / "lib" / "libglib-2.0.so.0").exists() and (folder / "exe" / "qemu-system-x86_64").exists()
    text = launcher.read_text()
    assert "--library-path" in text and "QEMU_MODULE_DIR" in text and 'exec -a "$0"' in text
    assert store.collect({"0123"}) == []  # both just kept: spared for GRACE
    assert store.collect({"0123"}, grace=0) == ["4567"] and store.ids() == ["0123"]
    with pytest.raises(Exception, match="invalid build id"):
        store.folder("../x")


def test_records_without_builds_or_proofs_still_load_and_proofs_keep_the_newest() -> None:
    old = {"name": "a", "argv": ["q"], "qmp": "/q", "origin": "launch", "machine": "pc", "log": "/l", "version": 1}
    rec = record.decode(msgspec.json.encode(old), "vm.json")
    assert rec.build is None and rec.kept_from is None and rec.proofs == []
    rec.learn(proof(False, "no"))
    rec.learn(proof(True))
    assert len(rec.proofs) == 1 and rec.proof("aaa", "bbb") == rec.proofs[0] and rec.proofs[0].loads
    for i in range(record.MAX_PROOFS + 3):
        rec.learn(Proof("aaa", f"t{i}", True, "trial", float(i)))
    assert len(rec.proofs) == record.MAX_PROOFS and rec.proofs[-1].target == f"t{record.MAX_PROOFS + 2}"
    again = record.decode(record.encode(rec), "vm.json")
    assert again == rec and isinstance(again, VMRecord)
