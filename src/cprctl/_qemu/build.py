"""What a running QEMU is made of: its executable, the ELF files it maps, and where each can still be read.

A package upgrade renames new files over the old ones (or deletes them); the
running QEMU keeps the old ones mapped, and ``/proc/PID/exe`` and
``/proc/PID/map_files/`` still reach them (the latter needs root). A path on
disk is read only while it is still the very file QEMU mapped (same device and
inode), so a copy taken from here is the build that runs, not the one apt put
in its place.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..errors import QemuError

ELF_MAGIC = b"\x7fELF"
#: QEMU's loadable modules (``/usr/lib/x86_64-linux-gnu/qemu/hw-display-virtio-gpu.so``...).
MODULE_PREFIXES = ("accel-", "audio-", "block-", "chardev-", "hw-", "ui-")


@dataclass(frozen=True)
class Part:
    """One file of a running build: its name in the kept copy and where to read it now."""

    name: str
    source: str
    #: The path QEMU mapped (for the record; may be deleted or replaced by now).
    path: str


@dataclass(frozen=True)
class RunningBuild:
    """The files process *pid* runs: executable, dynamic loader, shared libraries, QEMU modules."""

    pid: int
    exe: Part
    loader: Part
    libs: tuple[Part, ...]
    modules: tuple[Part, ...]

    @property
    def replaced(self) -> bool:
        """Whether the executable's path on disk is no longer the file that runs."""
        return self.exe.source != self.exe.path


@dataclass(frozen=True)
class _Mapping:
    start_end: str
    dev: tuple[int, int]
    inode: int
    path: str


def build_id(pid: int) -> str:
    """The build id of the QEMU process *pid* runs: the start of its executable's SHA-256.

    :raise QemuError: the process is gone or its executable cannot be read.
    """
    return file_build_id(f"/proc/{pid}/exe")


def file_build_id(path: str) -> str:
    """The build id of the QEMU executable at *path* (see `build_id`).

    :raise QemuError: it cannot be read.
    """
    import hashlib  # only here: a restore at boot rarely hashes (`kept.same_build`)

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as exe:
            while chunk := exe.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise QemuError(f"cannot read the QEMU executable {path}: {exc.strerror}") from exc
    return digest.hexdigest()[:16]


def running_build(pid: int) -> RunningBuild:
    """The files QEMU process *pid* runs, each with a source to copy it from.

    :raise QemuError: the process is gone, its maps are unreadable, or a file it maps can no longer be read
        (replaced on disk and ``/proc/PID/map_files`` is closed to this user).
    """
    exe_path = _exe_path(pid)
    exe = Part(os.path.basename(exe_path), _exe_source(pid, exe_path), exe_path)
    loader: Part | None = None
    libs: list[Part] = []
    modules: list[Part] = []
    for m in _elf_mappings(pid):
        if m.path == exe_path:
            continue
        source = _source(pid, m)
        part = Part(soname(source) or os.path.basename(m.path), source, m.path)
        if _is_loader(part.name):
            loader = part
        elif part.name.startswith(MODULE_PREFIXES) and os.path.basename(os.path.dirname(m.path)) == "qemu":
            modules.append(part)
        else:
            libs.append(part)
    if loader is None:
        raise QemuError(f"process {pid} maps no dynamic loader (a static QEMU needs no kept libraries)")
    if exe.source == exe.path:  # the package on disk is still this build: its other modules are too
        modules += _unmapped_modules(exe_path, modules)
    return RunningBuild(pid, exe, loader, tuple(libs), tuple(modules))


def _unmapped_modules(exe_path: str, mapped: list[Part]) -> list[Part]:
    """The modules of the build at *exe_path* that its QEMU has not loaded (yet): a kept build must have them
    all, or its QEMU loads another build's from its built-in module directory and fails (``-device help``
    loads every module)."""
    prefix = os.path.dirname(os.path.dirname(exe_path))
    guesses = [os.path.join(prefix, lib, "qemu") for lib in ("lib/x86_64-linux-gnu", "lib", "lib64")]
    dirs = {os.path.dirname(p.path) for p in mapped} or {d for d in guesses if os.path.isdir(d)}
    have = {p.name for p in mapped}
    found: list[Part] = []
    for d in sorted(dirs):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if name.startswith(MODULE_PREFIXES) and name.endswith(".so") and name not in have:
                have.add(name)
                found.append(Part(name, os.path.join(d, name), os.path.join(d, name)))
    return found


def soname(path: str) -> str | None:
    """The ``DT_SONAME`` of the 64-bit little-endian ELF shared object at *path* (the name the dynamic
    loader looks it up by, e.g. ``libglib-2.0.so.0``), or None when it has none or cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:6] != b"\x7fELF\x02\x01":
                return None
            phoff, phentsize, phnum = struct.unpack_from("<Q", head, 32)[0], *struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            headers = [struct.unpack_from("<IIQQQQQQ", table, i * phentsize) for i in range(phnum)]
            loads = [(h[3], h[2], h[5]) for h in headers if h[0] == 1]  # PT_LOAD: vaddr, offset, filesz
            dyn = next((h for h in headers if h[0] == 2), None)  # PT_DYNAMIC
            if dyn is None:
                return None
            f.seek(dyn[2])
            raw = f.read(dyn[5])
            entries = dict(reversed([struct.unpack_from("<qQ", raw, i) for i in range(0, len(raw) - 15, 16)]))
            if 14 not in entries or 5 not in entries:  # DT_SONAME, DT_STRTAB
                return None
            strtab = next(off + entries[5] - va for va, off, size in loads if va <= entries[5] < va + size)
            f.seek(strtab + entries[14])
            return f.read(256).split(b"\0", 1)[0].decode() or None
    except (OSError, struct.error, StopIteration, UnicodeDecodeError):
        return None


def _exe_path(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError as exc:
        raise QemuError(f"process {pid} is gone: {exc.strerror}") from exc


def _exe_source(pid: int, path: str) -> str:
    try:
        running, on_disk = os.stat(f"/proc/{pid}/exe"), os.stat(path)
    except OSError:
        return f"/proc/{pid}/exe"
    return path if (running.st_dev, running.st_ino) == (on_disk.st_dev, on_disk.st_ino) else f"/proc/{pid}/exe"


def _is_loader(name: str) -> bool:
    return name.startswith("ld-linux") or (name.startswith("ld-") and ".so" in name and name[3:4].isalpha())


def _maps(pid: int) -> list[_Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise QemuError(f"cannot read the memory maps of process {pid}: {exc.strerror}") from exc
    found: list[_Mapping] = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].startswith(("/dev/", "/memfd:")):
            continue
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        found.append(_Mapping(fields[0], (major, minor), int(fields[4]), fields[5].removesuffix(" (deleted)")))
    return found


def _elf_mappings(pid: int) -> list[_Mapping]:
    """One mapping per distinct ELF file (RAM files, locale archives and the like are left out)."""
    seen: dict[tuple[tuple[int, int], int], _Mapping] = {}
    for m in _maps(pid):
        if (m.dev, m.inode) not in seen and _is_elf(pid, m):
            seen[(m.dev, m.inode)] = m
    return list(seen.values())


def _is_elf(pid: int, m: _Mapping) -> bool:
    try:
        with open(_source(pid, m), "rb") as f:
            return f.read(4) == ELF_MAGIC
    except (OSError, QemuError):
        return False


def _source(pid: int, m: _Mapping) -> str:
    """Where mapping *m*'s file can be read: its path while that is still the file, else ``map_files``."""
    try:
        st = os.stat(m.path)
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == (*m.dev, m.inode):
            return m.path
    except OSError:
        pass
    mapped = f"/proc/{pid}/map_files/{m.start_end}"
    if os.access(mapped, os.R_OK):
        return mapped
    raise QemuError(f"process {pid} maps {m.path}, which was replaced on disk and cannot be read here (not root)")
