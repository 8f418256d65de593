"""Unit tests of the on-disk record, the state directory and the lock (real files, no QEMU)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import typing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cprctl._checkpoint import record
from cprctl._checkpoint.record import Checkpoint, Operation, VMRecord
from cprctl._store import StateDir, VMLock, validate_name
from cprctl.errors import BusyError, RecordError, StateDirError, UsageError


def _rec() -> VMRecord:
    return VMRecord(
        name="vm1",
        argv=["/usr/bin/qemu-system-x86_64", "-m", "1G"],
        qmp="/s/qmp.sock",
        origin="launch",
        machine="pc-q35-10.0",
        log="/s/qemu.log",
        pid=42,
    )


def test_roundtrip_with_checkpoint_and_journal(tmp_path: Path) -> None:
    rec = _rec()
    rec.checkpoint = Checkpoint(
        state_file="/s/state.cpr",
        size=10,
        digest="xxh3_128:ab",
        capabilities={"x": True},
        parameters={"mode": "cpr-reboot"},
        strategy="in-place",
        suspended=False,
        was_running=True,
        stopped_at=1.0,
        saved_at=2.0,
        qemu_version="10.0.2",
    )
    rec.operation = Operation("save", 1, 3.0)
    rec.operation.mark("migrating")
    record.save(tmp_path / "vm.json", rec)
    back = record.load(tmp_path / "vm.json")
    assert back == rec
    assert back.operation is not None and back.operation.step == "migrating"
    assert (tmp_path / "vm.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["vm.json"]  # no temp file left


@pytest.mark.parametrize(
    ("kind", "steps"),
    [("save", record.SaveStep), ("restore", record.RestoreStep), ("update", record.UpdateStep)],
)
def test_every_journal_step_round_trips_as_its_string(kind: record.OpKind, steps: object) -> None:
    rec = _rec()
    rec.operation = op = Operation(kind, 1, 3.0)
    for step in typing.get_args(steps):
        op.mark(step)
    data = record.encode(rec)
    written = [s for s, _ in json.loads(data)["operation"]["steps"]]
    assert written == list(typing.get_args(steps))  # the strings records on disk hold
    back = record.decode(data, "vm.json")
    assert back.operation is not None and back.operation.steps == op.steps


def test_an_unknown_journal_step_is_a_clear_error() -> None:
    rec = _rec()
    rec.operation = Operation("update", 1, 3.0)
    rec.operation.mark("standby")
    with pytest.raises(RecordError, match="malformed record"):
        record.decode(record.encode(rec).replace(b'"standby"', b'"standbye"'), "vm.json")


@pytest.mark.parametrize(
    "data, words",
    [
        (b"{not json", "malformed record"),
        (b'{"version": 1, "name": "x"}', "malformed record"),
        (b'{"version": 99}', "version 99 is not understood"),
        (b'{"version": 0}', "version 0 is not understood"),
        (b"[]", "malformed record"),
    ],
)
def test_bad_records_are_clear_errors(data: bytes, words: str) -> None:
    with pytest.raises(RecordError, match=words):
        record.decode(data, "vm.json")


def test_unknown_field_is_refused() -> None:
    data = json.loads(record.encode(_rec()))
    data["surprise"] = 1
    with pytest.raises(RecordError, match="malformed"):
        record.decode(json.dumps(data).encode(), "vm.json")


@given(st.binary(max_size=200))
def test_decode_raises_only_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        record.decode(data, "x")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=10,
    )
)
def test_decode_of_any_json_raises_only_record_error(value: object) -> None:
    base = json.loads(record.encode(_rec()))
    for key in ("argv", "pid", "checkpoint", "version"):
        with contextlib.suppress(RecordError):
            record.decode(json.dumps({**base, key: value}).encode(), "x")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 65, ".hidden", "a..b", "-rf", "a b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid VM name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["vm1", "web-01.prod", "A_b", "x" * 64])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


def test_state_dir_is_private(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "state")
    folder = sd.create_vm_dir("vm1")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert folder.stat().st_mode & 0o777 == 0o700


def test_state_dir_symlink_and_world_writable_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(StateDirError, match="symlink"):
        StateDir(tmp_path / "link").create_vm_dir("vm1")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(StateDirError, match="writable by others"):
        StateDir(open_dir).create_vm_dir("vm1")


def test_state_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPRCTL_STATE_DIR", str(tmp_path))
    assert StateDir().path == tmp_path


def test_lock_is_exclusive_and_names_holder(tmp_path: Path) -> None:
    with VMLock(tmp_path, "vm1", "save"), pytest.raises(BusyError, match=f"'save' by pid {os.getpid()}"):
        VMLock(tmp_path, "vm1", "restore").__enter__()
    with VMLock(tmp_path, "vm1", "restore"):
        pass


def test_lock_names_a_holder_that_has_not_written_its_name_yet(tmp_path: Path) -> None:
    """Between taking the flock and writing its name, a holder is a moment away: the loser waits for the name."""
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    late = threading.Timer(0.05, lambda: os.pwrite(fd, b"'save' by pid 4242 since 12:00:00\n", 0))
    late.start()
    try:
        with pytest.raises(BusyError, match="'save' by pid 4242"):
            VMLock(tmp_path, "vm1", "restore").__enter__()
    finally:
        late.join()
        os.close(fd)


def test_a_record_of_before_the_timeline_parses() -> None:
    """Records written before lost, boot_id and timeline (and a checkpoint without boot_id) still load."""
    from cprctl._checkpoint.record import decode

    old = (
        b'{"version":1,"name":"a","argv":["q"],"qmp":"/q","origin":"launch","machine":"m","log":"/l",'
        b'"checkpoint":{"state_file":"/s","size":1,"digest":"d","capabilities":{},"parameters":{},'
        b'"strategy":"in-place","suspended":false,"was_running":true,"stopped_at":1.0,"saved_at":2.0,'
        b'"qemu_version":"10.0.2"}}'
    )
    rec = decode(old, "old")
    assert rec.lost is None and rec.boot_id is None and rec.timeline is None
    assert rec.checkpoint is not None and rec.checkpoint.boot_id == "" and rec.checkpoint.fleet_done_at is None
