"""Kept QEMU builds: a runnable copy of each QEMU a VM runs on or a checkpoint was written by.

Layout, under ``STATE_DIR/builds/ID/`` (ID: the start of the executable's SHA-256)::

    bin/NAME          the launcher: runs the kept executable through the kept loader with the kept
                      libraries, modules and data files (``-L``); a VM runs on the build by this path
    exe/NAME          the executable
    lib/              the dynamic loader and every shared library the QEMU mapped
    modules/          QEMU's loadable modules it had loaded (``QEMU_MODULE_DIR``)
    share/            its data directories' files (firmware, option ROMs, keymaps), first one wins
    build.json        where each came from

Files are hard links where the source is on the same filesystem (a package
upgrade renames over the path or unlinks it, so the linked inode stays as it
was), else copies. A build is written under a temporary name and renamed into
place, so a build directory is always complete. `collect` removes the builds
no VM or checkpoint refers to; one written or used within `GRACE` seconds is
spared (another cprctl may be about to record it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from ..errors import StateDirError

BUILDS = "builds"
META = "build.json"
#: Seconds during which a build nobody refers to yet is not collected.
GRACE = 600.0


class File(msgspec.Struct, frozen=True):
    """One file to keep: its name in the build and where to read it."""

    name: str
    source: str


class BuildMeta(msgspec.Struct, frozen=True):
    """What ``build.json`` says about a kept build."""

    id: str
    #: The path the executable ran from, and its QEMU version (``10.0.2``) when known.
    path: str
    version: str = ""
    created: float = 0.0
    #: Taken after the executable's path was replaced on disk: data files come from the new package.
    late: bool = False
    loader: str = ""


class Builds:
    """The kept builds of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / BUILDS

    def folder(self, build: str) -> Path:
        if not build or "/" in build or build.startswith("."):
            raise StateDirError(f"invalid build id {build!r}")
        return self.root / build

    def launcher(self, build: str) -> Path | None:
        """The launcher of kept *build*, or None when it is not kept."""
        folder = self.folder(build)
        meta = self.meta(build)
        return folder / "bin" / os.path.basename(meta.path) if meta else None

    def meta(self, build: str) -> BuildMeta | None:
        try:
            return msgspec.json.decode((self.folder(build) / META).read_bytes(), type=BuildMeta)
        except (OSError, msgspec.DecodeError):
            return None

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / META).is_file())

    def touch(self, build: str) -> None:
        """Mark *build* as used now (see `GRACE`)."""
        with contextlib.suppress(OSError):
            os.utime(self.folder(build) / META)

    def keep(
        self,
        meta: BuildMeta,
        exe: File,
        loader: File,
        libs: Sequence[File],
        modules: Sequence[File],
        datadirs: Sequence[str],
    ) -> Path:
        """Keep a build (unless it is kept already); its launcher.

        :raise StateDirError: a file cannot be read or written.
        """
        if (launcher := self.launcher(meta.id)) is not None:
            self.touch(meta.id)
            return launcher
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.root / f".{meta.id}.{os.getpid()}.tmp"
        import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for sub in ("bin", "exe", "lib", "modules", "share"):
                (tmp / sub).mkdir(parents=True)
            _place(exe, tmp / "exe", 0o755)
            for f in (loader, *libs):
                _place(f, tmp / "lib", 0o755)
            for f in modules:
                _place(f, tmp / "modules", 0o755)
            _keep_data(datadirs, tmp / "share")
            final = self.folder(meta.id)
            name = os.path.basename(meta.path)
            _write_launcher(tmp / "bin" / name, final, name, loader.name, meta)
            (tmp / META).write_bytes(msgspec.json.encode(meta))
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.meta(meta.id) is None:  # else another cprctl kept it first (the rename found it there)
                raise StateDirError(f"cannot keep QEMU build {meta.id} in {self.root}: {exc}") from exc
        return self.folder(meta.id) / "bin" / os.path.basename(meta.path)

    def collect(self, referenced: Iterable[str], grace: float = GRACE) -> list[str]:
        """Remove every kept build not in *referenced* and not used within *grace* seconds; the removed ids."""
        keep, now, gone = set(referenced), time.time(), []
        for build in self.ids():
            meta = self.folder(build) / META
            with contextlib.suppress(OSError):
                if build not in keep and now - meta.stat().st_mtime >= grace:
                    import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

                    shutil.rmtree(self.folder(build))
                    gone.append(build)
        return gone


def _place(f: File, folder: Path, mode: int) -> None:
    """Link *f* into *folder* (a copy across filesystems or from ``/proc``)."""
    dest = folder / f.name
    if dest.exists():
        return
    if not f.source.startswith("/proc/"):
        with contextlib.suppress(OSError):
            os.link(f.source, dest)
            return
    import shutil  # here: restore-all at boot needs none of it (its bz2, lzma; `cprctl._boot`)

    shutil.copyfile(f.source, dest)
    os.chmod(dest, mode)


def _keep_data(datadirs: Sequence[str], share: Path) -> None:
    """Every file of each data dir (symlinks followed, subfolders such as ``keymaps/`` too); first dir wins."""
    seen: set[str] = set()
    for top in datadirs:
        for folder, dirs, names in os.walk(top, followlinks=True):
            seen.add(os.path.realpath(folder))
            dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in seen]  # no link loops
            rel = os.path.relpath(folder, top)
            for name in names:
                dest_dir = share / rel
                dest_dir.mkdir(parents=True, exist_ok=True)
                src = os.path.realpath(os.path.join(folder, name))
                if os.path.isfile(src):
                    _place(File(name, src), dest_dir, 0o644)


def _write_launcher(path: Path, final: Path, name: str, loader: str, meta: BuildMeta) -> None:
    """A script that runs the kept executable as its own build; it shows itself as argv[0] (``exec -a``)."""
    q = shlex.quote
    path.write_text(
        "#!/bin/bash\n"
        f"# cprctl kept QEMU build {meta.id}: {meta.path} {meta.version}\n"
        f"export QEMU_MODULE_DIR={q(str(final / 'modules'))}\n"
        f'exec -a "$0" {q(str(final / "lib" / loader))} --library-path {q(str(final / "lib"))} '
        f'{q(str(final / "exe" / name))} -L {q(str(final / "share"))} "$@"\n'
    )
    path.chmod(0o755)
