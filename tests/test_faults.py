"""Fault injection on the real QEMU and guest: every row ends with the VM not lost (issue 3).

"Not lost" means: still running as before, or saved and then restored with its
boot id, counter and RAM pattern intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cprctl
from cprctl import BusyError, CheckFailed, CheckpointError, MigrationError, QemuError
from cprctl._checkpoint import canary, record, statefile
from cprctl._qemu import process

from .guestvm import QEMU, GuestVM, cli, op_step, record_of, short_tmp, spawn_cli, wait_record

pytestmark = pytest.mark.qemu


def restore_or_running(vm: GuestVM, mark: int, fill: int) -> str:
    """Bring the VM back whichever way the fault left it; which way that was."""
    state = vm.status().state
    assert state in ("running", "saved"), f"VM left {state}"
    if state == "saved":
        cprctl.restore(vm.name, state_dir=vm.state_dir)
    vm.assert_continued(mark, fill=fill)
    return state


class KillQemuAt:
    """A reporter that SIGKILLs the VM's QEMU when a step message contains *text*."""

    def __init__(self, pid: int, text: str) -> None:
        self.pid, self.text, self.fired = pid, text, False

    def step(self, message: str) -> None:
        if self.text in message and not self.fired:
            self.fired = True
            os.kill(self.pid, signal.SIGKILL)
            assert process.wait_gone(self.pid, 10)

    def progress(self, done: int, total: int, what: str = "saving") -> None:
        pass


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    root = short_tmp("cprtiny")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=700", "tmpfs", str(root)], check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)
    root.rmdir()


def test_save_onto_a_too_small_filesystem(state_dir: Path, tiny_fs: Path) -> None:
    sd = tiny_fs / "state"
    vm = GuestVM.launch("tiny", sd, ram="anon", fill=64, work=state_dir.parent / "tiny-work")
    with pytest.raises(CheckFailed, match="MiB free"):
        cprctl.save("tiny", state_dir=sd)
    mark = vm.mark()
    with pytest.raises(MigrationError, match="migration failed"):
        cprctl.save("tiny", force=True, state_dir=sd)
    assert vm.status().state == "running"
    assert not (sd / "vms" / "tiny" / "state.cpr").exists(), "partial state file left"
    vm.assert_continued(mark)
    vm.stop()


def test_qemu_killed_before_the_checkpoint(state_dir: Path) -> None:
    vm = GuestVM.launch("qk1", state_dir, fill=0)
    pid = vm.status().pid
    assert pid
    with pytest.raises(QemuError, match=r"QEMU died during the save.*state is lost"):
        cprctl.save("qk1", reporter=KillQemuAt(pid, "saving"), state_dir=state_dir)
    st = vm.status()
    assert st.state == "stopped" and st.operation is None and st.state_file is None
    assert not (state_dir / "vms" / "qk1" / "state.cpr").exists()


def test_qemu_killed_after_the_checkpoint(state_dir: Path) -> None:
    vm = GuestVM.launch("qk2", state_dir, fill=32)
    pid = vm.status().pid
    assert pid
    mark = vm.mark()
    cprctl.save("qk2", reporter=KillQemuAt(pid, "checkpoint recorded"), state_dir=state_dir)
    assert vm.status().state == "saved"
    cprctl.restore("qk2", state_dir=state_dir)
    vm.assert_continued(mark, fill=32)
    vm.stop()


@pytest.mark.parametrize("step", ["migrating", "suspending"])
def test_cprctl_killed_during_save(state_dir: Path, step: str) -> None:
    name = f"ck-{step}"
    fill = 400 if step == "migrating" else 32
    vm = GuestVM.launch(name, state_dir, ram="anon", ram_mib=512, fill=fill)
    mark = vm.mark()
    proc = spawn_cli("save", name, "--suspend", "always" if step == "suspending" else "never", state_dir=state_dir)
    wait_record(state_dir, name, lambda r: op_step(r) == ("save", step))
    proc.kill()
    proc.wait()
    out = cli("status", name, state_dir=state_dir)  # the next command finishes or rolls back
    assert out.returncode == 0 and "interrupted" in out.stderr, out.stderr
    restore_or_running(vm, mark, fill)
    vm.stop()


def test_cprctl_killed_during_restore(state_dir: Path) -> None:
    vm = GuestVM.launch("ckr", state_dir, ram="anon", ram_mib=512, fill=400)
    mark = vm.mark()
    cprctl.save("ckr", state_dir=state_dir)
    proc = spawn_cli("restore", "ckr", state_dir=state_dir)
    wait_record(state_dir, "ckr", lambda r: op_step(r) == ("restore", "started"))
    proc.kill()
    proc.wait()
    out = cli("status", "ckr", state_dir=state_dir)
    assert out.returncode == 0 and "interrupted" in out.stderr, out.stderr
    restore_or_running(vm, mark, 400)
    vm.stop()


def test_ctrl_c_during_save_rolls_back(state_dir: Path) -> None:
    vm = GuestVM.launch("intr", state_dir, ram="anon", ram_mib=512, fill=400)
    mark = vm.mark()
    proc = spawn_cli("save", "intr", state_dir=state_dir)
    wait_record(state_dir, "intr", lambda r: op_step(r) == ("save", "migrating"))
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err
    assert vm.status().state == "running"
    assert not (state_dir / "vms" / "intr" / "state.cpr").exists()
    vm.assert_continued(mark, fill=400)
    vm.stop()


def _saved(state_dir: Path, name: str, **kw: object) -> tuple[GuestVM, int, Path]:
    vm = GuestVM.launch(name, state_dir, fill=32, **kw)  # type: ignore[arg-type]
    mark = vm.mark()
    saved = cprctl.save(name, state_dir=state_dir)
    return vm, mark, Path(saved.state_file)


def _qemu_starts(vm: GuestVM) -> int:
    return (vm.state_dir / "vms" / vm.name / "qemu.log").read_text().count("--- cprctl")


def test_truncated_state_file_refused_before_qemu_starts(state_dir: Path) -> None:
    vm, mark, path = _saved(state_dir, "trunc")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    starts = _qemu_starts(vm)
    out = cli("restore", "trunc", state_dir=state_dir)
    assert out.returncode != 0 and "truncated" in out.stderr, out.stderr
    assert _qemu_starts(vm) == starts and vm.status().state == "saved"
    path.write_bytes(data)  # the operator puts the file back: the checkpoint is still good
    cprctl.restore("trunc", state_dir=state_dir)
    vm.assert_continued(mark, fill=32)
    vm.stop()


def test_flipped_byte_refused_and_the_guest_never_runs(state_dir: Path) -> None:
    vm, mark, path = _saved(state_dir, "flip")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: digest"):
        cprctl.restore("flip", state_dir=state_dir)
    # QEMU may have started (paused, -S) while the digest ran: it is gone, the checkpoint is kept.
    assert vm.status().state == "saved" and path.exists()
    assert not _new_qemus(vm), "the refused restore left a QEMU running"
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cprctl.restore("flip", state_dir=state_dir)
    vm.assert_continued(mark, fill=32)  # no tick between: the guest never ran on the corrupt file
    vm.stop()


class SlowVerify:
    """A reporter that holds the digest's last chunk for *hold* seconds (QEMU meanwhile finishes the
    load) and records what it heard."""

    def __init__(self, hold: float) -> None:
        self.hold, self.steps, self.seen = hold, list[str](), set[str]()

    def step(self, message: str) -> None:
        self.steps.append(message)

    def progress(self, done: int, total: int, what: str = "saving") -> None:
        self.seen.add(what)
        if what == "verifying" and done >= total:
            time.sleep(self.hold)


def _data_offset(path: Path) -> int:
    """An offset in the middle of the file's data (not a hole): a byte of guest RAM."""
    fd = os.open(path, os.O_RDONLY)
    try:
        middle = os.lseek(fd, path.stat().st_size // 2, os.SEEK_DATA)
    finally:
        os.close(fd)
    return middle + 4096 + 123


def test_corrupt_ram_is_caught_after_qemu_loaded_it_and_the_guest_never_runs(state_dir: Path) -> None:
    """A bit flipped in the RAM pages of a mapped-ram state file: the save hashed the guest's RAM from QEMU's
    memory and nothing reads those pages but QEMU's load, so it is caught in the memory QEMU loaded."""
    vm = GuestVM.launch("late", state_dir, ram="anon", ram_mib=256, fill=96)
    mark = vm.mark()
    path = Path(cprctl.save("late", state_dir=state_dir).state_file)
    assert "pc.ram" in record_of(state_dir, "late")["checkpoint"]["ram"]  # type: ignore[index]
    at = _data_offset(path)
    with open(path, "r+b") as f:
        f.seek(at)
        good = f.read(1)
        f.seek(at)
        f.write(bytes([good[0] ^ 0x40]))
    check = cli("check", "late", state_dir=state_dir)  # check reads the file: the pages as QEMU would load them
    said = " ".join((check.stdout + check.stderr).split())  # rich wraps lines
    assert check.returncode != 0 and "digest of RAM block pc.ram" in said, said
    starts = _qemu_starts(vm)
    reporter = SlowVerify(hold=10.0)
    with pytest.raises(CheckpointError, match=r"corrupt: digest of RAM block pc\.ram as QEMU loaded it"):
        cprctl.restore("late", reporter=reporter, state_dir=state_dir)
    assert _qemu_starts(vm) == starts + 1, "QEMU did not start while the digest ran"
    assert "loading" in reporter.seen, "QEMU did not load while the digest ran"
    assert not [s for s in reporter.steps if "again after" in s], reporter.steps
    assert vm.status().state == "saved" and path.exists()
    assert not _new_qemus(vm), "the refused restore left a QEMU running"
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(good)
    cprctl.restore("late", state_dir=state_dir)
    vm.assert_continued(mark, fill=96)  # a tick during the hold would break the counter
    vm.stop()


def test_corrupt_device_state_of_a_mapped_ram_file_is_refused(state_dir: Path) -> None:
    vm = GuestVM.launch("dev", state_dir, ram="anon", fill=32)
    mark = vm.mark()
    path = Path(cprctl.save("dev", state_dir=state_dir).state_file)
    at = path.stat().st_size - 200  # the device state, after the last RAM block's pages
    with open(path, "r+b") as f:
        f.seek(at)
        good = f.read(1)
        f.seek(at)
        f.write(bytes([good[0] ^ 0x01]))
    with pytest.raises(CheckpointError, match="corrupt: digest xxh3_128d"):
        cprctl.restore("dev", state_dir=state_dir)
    assert vm.status().state == "saved" and path.exists()
    assert not _new_qemus(vm), "the refused restore left a QEMU running"
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(good)
    cprctl.restore("dev", state_dir=state_dir)
    vm.assert_continued(mark, fill=32)
    vm.stop()


def test_a_checkpoint_with_the_old_whole_file_digest_still_restores(state_dir: Path) -> None:
    """Records written before issue 17 hold the whole file's digest and no RAM blocks: verified as then."""
    vm = GuestVM.launch("old", state_dir, ram="anon", fill=32)
    mark = vm.mark()
    path = Path(cprctl.save("old", state_dir=state_dir).state_file)
    record_path = state_dir / "vms" / "old" / "vm.json"
    record = json.loads(record_path.read_text())
    record["checkpoint"].pop("ram")
    record["checkpoint"]["digest"] = statefile.digest(path)[1]
    good = json.dumps(record)
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x01
    path.write_bytes(bytes(data))
    record_path.write_text(good)
    with pytest.raises(CheckpointError, match="corrupt: digest xxh3_128c"):
        cprctl.restore("old", state_dir=state_dir)
    data[-200] ^= 0x01
    path.write_bytes(bytes(data))
    cprctl.restore("old", state_dir=state_dir)
    vm.assert_continued(mark, fill=32)
    vm.stop()


def _new_qemus(vm: GuestVM) -> list[int]:
    """QEMU processes (not zombies) whose command line names this VM's QMP socket."""
    sock = str(record_of(vm.state_dir, vm.name)["qmp"])
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "qemu-system" in cmd and sock in cmd and state != "Z":
            found.append(pid)
    return found


def test_disk_written_between_save_and_restore(state_dir: Path) -> None:
    disk = state_dir.parent / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "256M"], check=True)
    extra = ("-drive", f"file={disk},if=none,id=d0,format=qcow2", "-device", "virtio-blk-pci,drive=d0")
    vm, mark, _path = _saved(state_dir, "disk", extra=extra)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(disk)], check=True, capture_output=True)
    out = cli("restore", "disk", state_dir=state_dir)
    assert out.returncode != 0 and str(disk) in out.stderr and "changed since the save" in out.stderr
    assert vm.status().state == "saved"
    cprctl.restore("disk", force=True, state_dir=state_dir)  # the operator accepts the risk knowingly
    vm.assert_continued(mark, fill=32)
    vm.stop()


def _refused_before_qemu_starts(vm: GuestVM, state_file: Path, *said: str) -> str:
    """A CLI restore of *vm* fails in one line naming *said*, no QEMU started, and the checkpoint is kept."""
    starts = _qemu_starts(vm)
    out = cli("restore", vm.name, state_dir=vm.state_dir)
    errors = [line for line in out.stderr.splitlines() if line.startswith("cprctl: error:")]
    assert out.returncode == 1 and len(errors) == 1, out.stderr
    assert all(s in errors[0] for s in said), errors[0]
    assert _qemu_starts(vm) == starts and not _new_qemus(vm), "a QEMU was started on the RAM file"
    assert vm.status().state == "saved" and state_file.exists()
    return errors[0]


def test_kept_ram_file_not_as_saved_is_refused_before_qemu_starts(state_dir: Path) -> None:
    """RAM kept in place (`x-ignore-shared`) is not in the state file: the save samples its pages (`canary`),
    and the restore refuses a RAM file that is not what the save left before any QEMU maps it: older content
    in some pages (writes a host crash lost), truncated, deleted. Each time the checkpoint is kept, and once
    the file is back the guest goes on as if nothing happened."""
    vm = GuestVM.launch("kept", state_dir, fill=32)
    ram_path = vm.work / "ram"  # guest_argv's RAM file
    older = ram_path.read_bytes()  # the RAM file a few guest ticks before the save
    time.sleep(2)
    mark = vm.mark()
    state_file = Path(cprctl.save("kept", state_dir=state_dir).state_file)
    cp = record.load(state_dir / "vms" / "kept" / "vm.json").checkpoint
    assert cp is not None and cp.strategy == "in-place" and "canary" in cp.timings_ms
    [kept] = cp.kept_ram
    assert kept.path == str(ram_path) and kept.size == 256 << 20 and canary.sampled(kept) == 1026
    status = json.loads(cli("status", "kept", "--json", state_dir=state_dir).stdout)
    assert status["kept_ram"] == [{"path": str(ram_path), "bytes": 256 << 20, "pages_sampled": 1026}]
    check = cli("check", "kept", state_dir=state_dir)
    assert check.returncode == 0 and "1026 of 65536 pages" in " ".join(check.stdout.split()), check.stdout
    saved = ram_path.read_bytes()

    # (a) Stale pages: the sampled pages the guest wrote since the copy get their older content back (as if
    # their write-back was lost), and two more sampled pages other bytes (so that some page is always stale).
    page = canary.PAGE
    sampled = canary.sample_pages(kept.size, kept.seed)
    moved = [p for p in sampled if older[p * page : (p + 1) * page] != saved[p * page : (p + 1) * page]]
    flipped = [p for p in sampled[len(sampled) // 3 :: len(sampled) // 3][:2] if p not in moved]
    with open(ram_path, "r+b") as f:
        for p in moved:
            f.seek(p * page)
            f.write(older[p * page : (p + 1) * page])
        for p in flipped:
            f.seek(p * page + 512)
            f.write(bytes(b ^ 0x5A for b in saved[p * page + 512 : p * page + 520]))
    line = _refused_before_qemu_starts(
        vm, state_file, str(ram_path), f"{len(moved) + len(flipped)} of 1026 sampled pages differ", "cannot resume"
    )
    assert "not what the save left" in line and "writes lost in a host crash" in line
    print(f"{len(moved)} sampled pages given their older content, {len(flipped)} rewritten: {line}")
    check = cli("check", "kept", state_dir=state_dir)  # where a saved VM's verification is shown
    said = " ".join(check.stdout.split())  # rich wraps lines
    assert check.returncode == 1 and "sampled pages differ" in said, said
    ram_path.write_bytes(saved)

    # (b) Truncated (to half), then (c) deleted; the file put back each time.
    kept_aside = ram_path.with_name("kept-aside.ram")
    os.rename(ram_path, kept_aside)
    ram_path.write_bytes(saved[: len(saved) // 2])
    _refused_before_qemu_starts(vm, state_file, str(ram_path), f"it is {128 << 20} bytes, the save left {256 << 20}")
    ram_path.unlink()
    _refused_before_qemu_starts(vm, state_file, str(ram_path), "it is missing", "cannot resume")
    os.rename(kept_aside, ram_path)

    # Untouched: restored as before; the guest never ran on a bad file (its counter has no gap or repeat).
    res = cprctl.restore("kept", state_dir=state_dir)
    print(f"save's canary {cp.timings_ms['canary']:.1f} ms; restore's check step {res.timings_ms['check']:.1f} ms")
    vm.assert_continued(mark, fill=32)
    vm.stop()


def test_suspend_with_a_silent_agent_leaves_the_guest_alone(state_dir: Path) -> None:
    vm = GuestVM.launch("silent", state_dir, fill=32, kernel_args="agent=0")
    mark = vm.mark()
    t = time.monotonic()
    with pytest.raises(CheckFailed, match="guest agent does not answer"):
        cprctl.save("silent", suspend="always", state_dir=state_dir)
    assert time.monotonic() - t < 60
    assert vm.status().state == "running"
    assert "suspending" not in vm.text()
    vm.assert_continued(mark, fill=32, agent=False)
    vm.stop()


def test_two_saves_at_once_exactly_one_proceeds(state_dir: Path) -> None:
    vm = GuestVM.launch("twice", state_dir, ram="anon", ram_mib=512, fill=300)
    mark = vm.mark()
    procs = [spawn_cli("save", "twice", state_dir=state_dir) for _ in range(2)]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0 and sum(rc == 0 for rc, _ in results) == 1, results
    loser = next(err for rc, err in results if rc != 0)
    assert "busy: 'save' by pid" in loser or "saved already" in loser, loser
    cprctl.restore("twice", state_dir=state_dir)
    vm.assert_continued(mark, fill=300)
    vm.stop()


def test_check_reboot_refuses_ram_in_dev_shm_and_passes_on_disk(state_dir: Path) -> None:
    shm = Path("/dev/shm") / f"cprctl-test-{os.getpid()}"
    try:
        GuestVM.launch("shm", state_dir, fill=0, ram_path=shm)
        out = cli("check", "shm", "--reboot", state_dir=state_dir)
        assert out.returncode != 0 and "tmpfs" in out.stdout and "fix:" in out.stdout, out.stdout
        with pytest.raises(CheckFailed, match="reboot erases"):
            cprctl.save("shm", reboot=True, state_dir=state_dir)
        assert cli("check", "shm", state_dir=state_dir).returncode == 0  # fine without a reboot
        cprctl.stop("shm", state_dir=state_dir)
    finally:
        shm.unlink(missing_ok=True)
    vm = GuestVM.launch("disk-ram", state_dir, fill=0)  # RAM file under /tmp, on the root disk
    out = cli("check", "disk-ram", "--reboot", state_dir=state_dir)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout
    vm.stop()


def test_busy_error_names_the_holder(state_dir: Path) -> None:
    from cprctl._store import StateDir, VMLock

    vm = GuestVM.launch("locked", state_dir, fill=0)
    lock = VMLock(StateDir(state_dir).vm_dir("locked"), "locked", "restore")
    with lock, pytest.raises(BusyError, match=f"'restore' by pid {os.getpid()}"):
        cprctl.save("locked", state_dir=state_dir)
    vm.stop()


def test_cprctl_killed_during_warm_update(state_dir: Path) -> None:
    vm = GuestVM.launch("ckw", state_dir, fill=32)
    mark = vm.mark()
    proc = spawn_cli("update", "ckw", "--qemu", QEMU, state_dir=state_dir)
    wait_record(state_dir, "ckw", lambda r: op_step(r) == ("update", "standby"))
    proc.kill()
    proc.wait()
    out = cli("status", "ckw", state_dir=state_dir)
    assert out.returncode == 0 and "interrupted" in out.stderr, out.stderr
    assert restore_or_running(vm, mark, 32) == "running"
    assert cli("check", "ckw", state_dir=state_dir).returncode == 0  # QMP answers at its usual path
    leftovers = [p.name for p in (state_dir / "vms" / "ckw").iterdir() if "~" in p.name]
    assert not leftovers, leftovers
    vm.stop()


def test_update_to_a_broken_binary_is_refused_and_the_vm_runs_on(state_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "qemu-broken"
    broken.write_text(
        f'#!/bin/sh\ncase "$1" in --version|-machine) exec {QEMU} "$@";; esac\n'
        'echo "qemu-broken: cannot start" >&2\nexit 1\n'
    )
    broken.chmod(0o755)
    vm = GuestVM.launch("brk", state_dir, fill=32)
    mark, pid = vm.mark(), vm.status().pid
    for warm in (True, False):
        with pytest.raises(QemuError, match=r"refused, nothing touched.*cannot start"):
            cprctl.update("brk", str(broken), warm=warm, state_dir=state_dir)
        st = vm.status()
        assert st.state == "running" and st.pid == pid and st.argv[0] == QEMU, "the VM was touched"
    vm.assert_continued(mark, fill=32)
    vm.stop()


def test_hotplugged_device_is_refused_before_anything_is_touched(state_dir: Path) -> None:
    import asyncio

    from cprctl._qemu.qmp import Monitor

    vm = GuestVM.launch("hot", state_dir, fill=0)
    st = vm.status()

    async def plug(cmd: str, args: dict[str, object]) -> None:
        async with Monitor(st.qmp, "hot", st.pid) as mon:
            await mon.execute(cmd, args)

    asyncio.run(plug("object-add", {"qom-type": "memory-backend-ram", "id": "m1", "size": 64 << 20}))
    with pytest.raises(CheckFailed, match="memory backend 'm1' was plugged in at run time"):
        cprctl.save("hot", state_dir=state_dir)
    assert vm.status().state == "running" and vm.status().state_file is None
    assert cli("check", "hot", state_dir=state_dir).returncode != 0
    asyncio.run(plug("object-del", {"id": "m1"}))
    assert cli("check", "hot", state_dir=state_dir).returncode == 0
    mark = vm.mark()
    cprctl.save("hot", state_dir=state_dir)
    cprctl.restore("hot", state_dir=state_dir)
    vm.assert_continued(mark, fill=0)
    vm.stop()


def test_hotplugged_pci_device_is_refused(state_dir: Path) -> None:
    import asyncio

    from cprctl._qemu.qmp import Monitor

    vm = GuestVM.launch("hotdev", state_dir, fill=0, extra=("-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"))
    st = vm.status()

    async def plug() -> None:
        async with Monitor(st.qmp, "hotdev", st.pid) as mon:
            await mon.execute("device_add", {"driver": "virtio-rng-pci", "id": "rng0", "bus": "rp1"})

    asyncio.run(plug())
    out = cli("check", "hotdev", state_dir=state_dir)
    assert out.returncode != 0 and "device 'rng0'" in out.stdout and "rp1" not in out.stdout, out.stdout
    with pytest.raises(CheckFailed, match="device 'rng0'"):
        cprctl.save("hotdev", state_dir=state_dir)
    assert vm.status().state == "running"
    vm.stop()


def test_new_qemu_dying_during_a_warm_update_resumes_the_guest_on_the_old_one(state_dir: Path) -> None:
    vm = GuestVM.launch("wdie", state_dir, fill=32)
    old_pid = vm.status().pid
    mark = vm.mark()

    class KillNew(KillQemuAt):
        def step(self, message: str) -> None:
            if "handing the guest over to pid" in message:
                self.pid = int(message.rsplit(" ", 1)[1])
                super().step(message)

    killer = KillNew(0, "handing the guest over")
    with pytest.raises(QemuError, match=r"warm update failed.*guest runs on the old QEMU"):
        cprctl.update("wdie", QEMU, reporter=killer, state_dir=state_dir)
    assert killer.fired
    st = vm.status()
    assert st.state == "running" and st.pid == old_pid and st.operation is None
    vm.assert_continued(mark, fill=32)
    assert cli("check", "wdie", state_dir=state_dir).returncode == 0  # QMP still at its usual path
    vm.stop()


def test_a_qemu_slow_to_open_qmp_is_waited_for(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU that opens its QMP socket later than a running one must answer (a busy host at boot) is
    not killed: launch and a cold boot wait for it (`qmp.START_TIMEOUT`), and only then give up."""
    from cprctl._demo import guest_argv
    from cprctl._qemu import qmp

    from .guestvm import guest_dir, wrapper

    work = state_dir.parent / "slow-work"
    slow = wrapper(work, "qemu-system-x86_64", "sleep 2")
    argv = guest_argv(str(slow), guest_dir(), work, ram_mib=128, fill_mib=0, ram="anon")
    with monkeypatch.context() as m:
        m.setattr(qmp, "CONNECT_TIMEOUT", 0.5)  # stands for the 30 s a running QEMU gets
        rec = cprctl.launch("slow", argv, state_dir=state_dir)
    assert process.alive(rec.pid)
    cprctl.stop("slow", state_dir=state_dir)
    with monkeypatch.context() as m:
        m.setattr(qmp, "CONNECT_TIMEOUT", 0.5)
        rec = cprctl.start("slow", state_dir=state_dir)  # as restore-all's cold boot of a VM lost at shutdown
    assert process.alive(rec.pid)
    cprctl.stop("slow", state_dir=state_dir)
