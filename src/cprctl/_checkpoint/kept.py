"""Keeping the QEMU build each VM runs on, for as long as a VM or a checkpoint needs it.

`keep` takes a copy of the running QEMU's build (see `cprctl._store.builds`) and
records its id on the VM (``VMRecord.build``); `save` records it on the
checkpoint (``Checkpoint.build``), and a restore whose binary cannot load the
checkpoint runs the kept build instead (`restore.restore`). `collect` removes
the builds no record refers to any more.

A copy is taken when it is cheap and still possible: at launch, adopt, start,
restore and update (the files on disk are then usually the ones QEMU runs, so
they are hard-linked), and at the latest before a save (from ``/proc/PID/exe``
and ``/proc/PID/map_files`` when a package replaced them meanwhile). Keeping
never fails the operation it serves: a build that cannot be kept is reported
and the VM has none (``status`` shows ``build: null``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .._qemu import probe, process
from .._qemu.build import Part, RunningBuild, build_id, file_build_id, running_build
from .._qemu.process import Binary
from .._store.builds import GRACE, BuildMeta, Builds, File
from .._store.statedir import RECORD_FILE
from ..errors import CprctlError, QemuError
from . import compat, record
from .compat import Loadability
from .record import Proof, ProofHow
from .report import Quiet, Reporter
from .vm import VM


def builds(vm: VM) -> Builds:
    """The kept builds of *vm*'s state directory."""
    return Builds(vm.folder.parent.parent)


def launcher_build(vm: VM, binary: str | None = None) -> str | None:
    """The id of the kept build whose launcher *binary* (default: the VM's argv[0]) is, else None."""
    path = Path(binary or vm.record.argv[0])
    store = builds(vm)
    if path.parent.name == "bin" and path.parent.parent.parent == store.root:
        build = path.parent.parent.name
        return build if store.meta(build) is not None else None
    return None


def binary_build(vm: VM, binary: str) -> str | None:
    """The build id of *binary* (a path, or a kept build's launcher); None when it cannot be read.
    Hashed once per file version in this process."""
    if (launched := launcher_build(vm, binary)) is not None:
        return launched
    try:
        st = os.stat(binary)
    except OSError:
        return None
    key = (binary, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashed:
        try:
            _hashed[key] = file_build_id(binary)
        except QemuError:
            return None
    return _hashed[key]


_hashed: dict[tuple[str, int, int, int, int], str] = {}


def same_build(vm: VM, binary: str, build: str | None) -> bool:
    """Whether *binary* (a path, or a kept build's launcher) is *build*; True when *build* is unknown
    (a checkpoint written before builds were kept). Without hashing when the kept executable is a hard
    link of *binary* (the usual case until a package replaces it)."""
    return build is None or _linked(vm, binary, build) or binary_build(vm, binary) == build


def _linked(vm: VM, binary: str, build: str) -> bool:
    meta = builds(vm).meta(build)
    try:
        return meta is not None and os.path.samefile(binary, builds(vm).folder(build) / "exe" / Path(meta.path).name)
    except OSError:
        return False


def loadability(vm: VM, binary: str | None = None) -> Loadability:
    """What is known about loading *vm*'s state (its checkpoint's, else its running QEMU's) into *binary*
    (default: the one a restore would use, its argv[0])."""
    r = vm.record
    source = r.checkpoint.build if r.checkpoint is not None else r.build
    binary = binary or r.argv[0]
    target = source if source and _linked(vm, binary, source) else binary_build(vm, binary)
    proof = r.proof(source, target) if source and target else None
    launcher = builds(vm).launcher(source) if source else None
    return compat.loadability(source, target, binary, proof, launcher.parent.parent.name if launcher else None)


def learn(vm: VM, source: str | None, binary: str, loads: bool, how: ProofHow, reason: str = "") -> None:
    """Record on *vm* (not committed) whether its state as build *source* writes it loaded into *binary*."""
    if not source or _linked(vm, binary, source):
        return  # its own build: nothing to learn
    target = binary_build(vm, binary)
    if source and target and source != target:
        vm.record.learn(Proof(source, target, loads, how, time.time(), reason))


def settle(vm: VM, previous: str, reporter: Reporter | None = None, hint: str | None = None) -> None:
    """After a new QEMU took *vm* over (restore, update): record its build, and on a kept build's launcher
    the binary it came from (``kept_from``: ``update-all`` tries it again). Not committed.

    *hint*: the build it probably is (the checkpoint's): taken without hashing when the kept executable is
    a hard link of the one running."""
    r = vm.record
    if launcher_build(vm) is not None:
        if launcher_build(vm, previous) is None:
            r.kept_from = previous
    else:
        r.kept_from = None
    r.build = hint if hint and r.pid and _linked(vm, f"/proc/{r.pid}/exe", hint) else None
    keep(vm, reporter)


def keep(vm: VM, reporter: Reporter | None = None) -> str | None:
    """Keep the build of *vm*'s running QEMU and record its id in ``vm.record.build`` (not committed).

    Cheap when it is kept already (a VM's recorded build, or one with the same executable). Returns the id,
    or None when the VM does not run or its build cannot be kept (reported as a warning).
    """
    r, store = vm.record, builds(vm)
    if not process.alive(r.pid) or r.pid is None:
        return None
    try:
        found = launcher_build(vm) or _kept_already(vm, store) or _take(store, r.pid, r.argv[0])
    except (CprctlError, OSError) as exc:
        (reporter or Quiet()).step(f"warning: {vm.name}: its QEMU build could not be kept: {exc}")
        return None
    store.touch(found)
    r.build = found
    return found


def _kept_already(vm: VM, store: Builds) -> str | None:
    build = vm.record.build
    return build if build and store.meta(build) is not None else None


def _take(store: Builds, pid: int, launcher: str) -> str:
    build = build_id(pid)
    if store.meta(build) is not None:
        return build
    rb = running_build(pid)
    meta = BuildMeta(build, rb.exe.path, _version(rb), time.time(), rb.replaced, rb.loader.name)
    store.keep(meta, _file(rb.exe), _file(rb.loader), _files(rb.libs), _files(rb.modules), _datadirs(rb, pid, launcher))
    return build


def _file(part: Part) -> File:
    return File(part.name, part.source)


def _files(parts: tuple[Part, ...]) -> list[File]:
    return [_file(p) for p in parts]


def _version(rb: RunningBuild) -> str:
    if rb.replaced:
        return ""
    try:
        return ".".join(map(str, Binary(rb.exe.path).version))
    except CprctlError:
        return ""


def _datadirs(rb: RunningBuild, pid: int, launcher: str) -> list[str]:
    """Where the binary at the executable's path looks for data files (``-L help``); after an upgrade that is
    the new package's, the best there is. A QEMU that runs in another root (a wrapper that chroots it,
    *launcher*) is asked through its wrapper, and its dirs are read in the root it runs in."""
    root = probe.process_root(pid)
    path: str | None = launcher if root != "/" else rb.exe.path
    if not path or not os.path.exists(path):
        import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

        path = shutil.which(os.path.basename(rb.exe.path))
    if not path:
        return []
    try:
        out = Binary(path).run("-L", "help")
    except CprctlError:
        return []
    dirs = [os.path.join(root, line.strip().lstrip("/")) for line in out.splitlines() if line.strip()]
    return [d for d in dirs if os.path.isdir(d)]


def referenced(state_dir: Path) -> set[str]:
    """Every build a VM record of *state_dir* refers to (running on it, or its checkpoint written by it)."""
    found: set[str] = set()
    vms = state_dir / "vms"
    for rec_path in vms.glob(f"*/{RECORD_FILE}") if vms.is_dir() else ():
        try:
            rec = record.load(rec_path)
        except CprctlError:
            return found | {"*"}  # a record cannot be read: collect nothing
        found |= {b for b in (rec.build, rec.checkpoint.build if rec.checkpoint else None) if b}
    return found


def collect(state_dir: Path, grace: float = GRACE) -> list[str]:
    """Remove the kept builds of *state_dir* no record refers to (see `Builds.collect`); the removed ids."""
    refs = referenced(state_dir)
    if "*" in refs:
        return []
    return Builds(state_dir).collect(refs, grace)
