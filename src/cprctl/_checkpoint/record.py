"""The on-disk record of one VM: a versioned JSON file, parsed strictly, written atomically.

The record is the single source of truth about a managed VM: the exact argv
cprctl runs, its sockets and process, its checkpoint once saved, and the
journal of an operation in flight (so a killed cprctl can be finished or
rolled back by the next one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import msgspec

from .._qemu.virtio import VirtioDevice
from ..errors import RecordError

#: The record format this cprctl writes; it reads this one and older ones.
VERSION = 1

Origin = Literal["launch", "adopt"]
OpKind = Literal["save", "restore", "update"]

# The journal steps of an operation, in order, per kind; "started" is its step before any is marked.
# Recovery (`vm.recover`) decides by them, so they are typed: mypy refuses a step that is none of these.
# The strings are what records on disk hold.
SaveStep = Literal["started", "planned", "suspending", "migrating", "saved"]
RestoreStep = Literal["started", "verified", "resuming", "resumed"]
UpdateStep = Literal["started", "standby", "migrating", "switched"]
Step = Literal[SaveStep, RestoreStep, UpdateStep]
#: Restore steps from which the guest may have run on the new QEMU: recovery only goes forward.
GUEST_RESUMED: tuple[RestoreStep, ...] = ("resuming", "resumed")


class DiskPrint(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a disk image looked like when the VM was saved."""

    path: str
    size: int
    inode: int
    mtime_ns: int
    digest: str
    full: bool = False


class RamPrint(msgspec.Struct, forbid_unknown_fields=True):
    """A RAM block of a mapped-ram checkpoint as the saved guest had it: bytes in use and their digest."""

    used: int
    digest: str


class RamCanary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A RAM file kept in place (``x-ignore-shared``) as the save left it: its size and the digests of a
    sample of its pages (`canary`), checked before a restore starts QEMU on it."""

    path: str
    size: int
    #: Draws the sampled pages (`canary.sample_pages`): a new one at each save.
    seed: int
    #: The xxh3-64 digest of each sampled 4 KiB page in page order, 8 bytes each (canonical, big-endian).
    digests: bytes
    #: How the pages were drawn and hashed; a canary of a scheme this cprctl does not know is not checked.
    scheme: str = "xxh3_64-4k-1"


class Checkpoint(msgspec.Struct, forbid_unknown_fields=True):
    """A completed save: everything restore needs to mirror it and to verify it."""

    state_file: str
    size: int
    digest: str
    capabilities: dict[str, bool]
    parameters: dict[str, str | int | bool]
    strategy: str
    suspended: bool
    was_running: bool
    stopped_at: float
    saved_at: float
    qemu_version: str
    disks: list[DiskPrint] = []
    #: The state file's inode and mtime when it was hashed.
    inode: int = 0
    mtime_ns: int = 0
    ram_files: list[str] = []
    timings_ms: dict[str, float] = {}
    #: The VM's virtio devices and their queue sizes at the save (a restore on another build checks them).
    virtio: list[VirtioDevice] = []
    #: The kept QEMU build (`cprctl._store.builds`) that wrote it: restore falls back to it.
    build: str | None = None
    #: The host's boot id at the save: a restore in another boot came after a host reboot.
    boot_id: str = ""
    #: When the ``save-all`` that saved it ended (the host's shutdown goes on from there); None when saved alone.
    fleet_done_at: float | None = None
    #: mapped-ram saves that hashed the guest's RAM from QEMU's memory (issue 17): each RAM block in the
    #: state file by name; *digest* is then that of the file's other bytes (`statefile.device_digest`).
    #: Empty: *digest* is the whole file's (older saves, in-place and stream saves).
    ram: dict[str, RamPrint] = {}
    #: Each RAM file kept in place (not in the state file): its canary (`canary`). Empty: none was kept, or
    #: the checkpoint was recorded before the canary existed (then nothing is checked).
    kept_ram: list[RamCanary] = []


ProofHow = Literal["update", "restore", "trial"]


class Proof(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Whether the state of this VM, as build *source* writes it, loads into build *target* (a fact learnt
    when it was tried: a warm update's standby, a restore, a trial load)."""

    source: str
    target: str
    loads: bool
    how: ProofHow
    at: float
    #: Why it did not load: QEMU's own error line, or the refusal of the preflight.
    reason: str = ""


#: How many proofs a record keeps (the newest; one per source and target).
MAX_PROOFS = 8


class Timeline(msgspec.Struct, forbid_unknown_fields=True):
    """A VM's last downtime, from its guest's stop to its running again (Unix times); see `timeline.segments`."""

    stopped_at: float
    saved_at: float
    restore_at: float
    running_at: float
    #: The end of the ``save-all`` that saved it, if one did.
    fleet_done_at: float | None = None
    #: Across a host reboot: the new kernel's start, and when the cprctl that restored it started (at boot,
    #: the unit's ``restore-all``); None when restored in the boot that saved it.
    boot_at: float | None = None
    cprctl_at: float | None = None
    #: When the boot's init (PID 1) started: the kernel's own start-up ends there (in a container, whose
    #: kernel does not restart, the container's boot begins there).
    init_at: float | None = None
    #: The save's and the restore's own steps (ms; ``Checkpoint.timings_ms``, `RestoreResult.timings_ms`):
    #: `timeline.shares` splits the downtime by them into QEMU's, cprctl's and the host's.
    save_ms: dict[str, float] = {}
    restore_ms: dict[str, float] = {}


class Operation(msgspec.Struct, forbid_unknown_fields=True):
    """The journal of an operation in flight; cleared when it ends either way."""

    kind: OpKind
    pid: int
    started: float
    steps: list[tuple[Step, float]] = []
    state_file: str | None = None
    suspended_by_us: bool = False
    new_pid: int | None = None
    #: ``update``: the new QEMU binary, and the suffix of the socket paths it binds until it takes over.
    binary: str | None = None
    socket_suffix: str = "~"
    #: The `VMRecord.compat_args` the new QEMU of an update was started with.
    compat_args: list[str] = []

    @property
    def step(self) -> Step:
        return self.steps[-1][0] if self.steps else "started"

    def mark(self, step: Step) -> None:
        self.steps.append((step, time.time()))


class VMRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One managed VM."""

    name: str
    argv: list[str]
    qmp: str
    origin: Origin
    machine: str
    log: str
    version: int = VERSION
    qga: str | None = None
    cwd: str = "/"
    pid: int | None = None
    checkpoint: Checkpoint | None = None
    operation: Operation | None = None
    last_pause_ms: float | None = None
    created: float = 0.0
    #: The systemd unit QEMU runs in (``cprctl-NAME.scope``), read from ``/proc/PID/cgroup`` at each
    #: write; None without systemd or while no QEMU runs.
    unit: str | None = None
    #: A host shutdown powered the VM off (it could not be saved), or its running state was lost
    #: (`lost`): the next ``restore-all`` boots it afresh.
    boot_pending: bool = False
    #: Arguments cprctl adds after ``argv`` whenever it starts the VM's QEMU (``-global TYPE.PROP=VALUE``
    #: pairs that size virtqueues as the VM has them, see `compat.queue_args`); ``argv`` stays the operator's.
    compat_args: list[str] = []
    #: The kept QEMU build (`cprctl._store.builds`) the running QEMU is; None until one is kept.
    build: str | None = None
    #: When the VM runs on a kept build's launcher (argv[0]) because the binary at this path could not
    #: take it: that path, which ``update-all`` tries again.
    kept_from: str | None = None
    #: What is known about loading this VM's state into other builds (see `Proof`); newest last.
    proofs: list[Proof] = []
    #: Why the VM's running state was lost, one line (e.g. the host went down during its save); shown by
    #: ``status`` and ``restore-all`` until its next save or stop.
    lost: str | None = None
    #: The host's boot id when the record was last written: a QEMU pid of an earlier boot is no process of ours.
    boot_id: str | None = None
    #: Its last downtime from a save to a restore, and where it went.
    timeline: Timeline | None = None

    @property
    def binary(self) -> str:
        return self.argv[0]

    def learn(self, proof: Proof) -> None:
        """Record *proof*, replacing an older one for the same source and target."""
        kept = [p for p in self.proofs if (p.source, p.target) != (proof.source, proof.target)]
        self.proofs = [*kept, proof][-MAX_PROOFS:]

    def proof(self, source: str, target: str) -> Proof | None:
        return next((p for p in reversed(self.proofs) if (p.source, p.target) == (source, target)), None)


class _Versioned(msgspec.Struct):
    version: int


def decode(data: bytes, where: str) -> VMRecord:
    """Parse a record strictly.

    :raise RecordError: for anything but a well-formed record of a known version.
    """
    try:
        version = msgspec.json.decode(data, type=_Versioned).version
    except msgspec.DecodeError as exc:
        raise RecordError(f"{where}: malformed record ({exc}); fix or remove it") from None
    if version > VERSION or version < 1:
        raise RecordError(
            f"{where}: record version {version} is not understood by this cprctl "
            f"(knows up to {VERSION}); use the cprctl that wrote it"
        )
    try:
        return msgspec.json.decode(data, type=VMRecord)
    except msgspec.DecodeError as exc:
        raise RecordError(f"{where}: malformed record ({exc}); fix or remove it") from None


def encode(record: VMRecord) -> bytes:
    return msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n"


def load(path: Path) -> VMRecord:
    """Read and parse the record at *path*.

    :raise RecordError: when it cannot be read or parsed.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"{path}: cannot read record: {exc.strerror}") from None
    return decode(data, str(path))


def write_atomic(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace *path* with *data*: temp file, fsync, rename, fsync the folder. Without *durable*, no fsync:
    other processes see the new content at once, but a host crash may leave the old one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: Path, record: VMRecord, durable: bool = True) -> None:
    """Write *record* to *path* atomically (0600); see `write_atomic` for *durable*."""
    write_atomic(path, encode(record), durable=durable)
