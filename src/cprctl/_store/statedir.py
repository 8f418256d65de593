"""Finding, creating and guarding the state directory and its VM folders."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import StateDirError, UsageError

ENV_VAR = "CPRCTL_STATE_DIR"
NAME_MAX = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RECORD_FILE = "vm.json"


def validate_name(name: str) -> str:
    """Return *name* if it is a safe VM name, else raise `UsageError`.

    A name is 1 to 64 characters of letters, digits, ``_ . -``, starting with a
    letter or digit: it becomes a folder name and part of socket paths.
    """
    if not name:
        raise UsageError("invalid VM name: empty")
    if len(name) > NAME_MAX:
        raise UsageError(f"invalid VM name: {len(name)} characters, at most {NAME_MAX}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid VM name {name!r}: use letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


def default_path() -> Path:
    """The state directory: ``$CPRCTL_STATE_DIR``, else /var/lib/cprctl for root, else XDG's."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cprctl")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "cprctl"


def _guard(path: Path, what: str) -> None:
    """Refuse a folder that is a symlink, not a folder, or writable by other users."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"{what} {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"{what} {path} is not a directory")
    if st.st_mode & 0o022 or st.st_uid != os.geteuid():
        raise StateDirError(
            f"{what} {path} is writable by others or not owned by uid {os.geteuid()}; "
            f"fix: chown {os.geteuid()} {path} && chmod 700 {path}"
        )


def _mkdir_private(path: Path, what: str) -> None:
    _guard(path, what)
    try:
        path.mkdir(mode=0o700, parents=False, exist_ok=True)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"cannot create {what} {path}: {exc.strerror}") from exc
    _guard(path, what)


class StateDir:
    """The state directory; one folder per VM under ``vms/``."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    @property
    def vms(self) -> Path:
        return self.path / "vms"

    def vm_dir(self, name: str) -> Path:
        """The folder of VM *name* (validated, not created)."""
        return self.vms / validate_name(name)

    def create_vm_dir(self, name: str) -> Path:
        """Create the state directory and VM *name*'s folder, private to this user."""
        _mkdir_private(self.path, "state directory")
        _mkdir_private(self.vms, "state directory")
        folder = self.vm_dir(name)
        _mkdir_private(folder, "VM folder")
        return folder

    def existing_vm_dir(self, name: str) -> Path | None:
        """VM *name*'s folder if it holds a record (after the safety checks), else None."""
        folder = self.vm_dir(name)
        _guard(self.path, "state directory")
        _guard(self.vms, "state directory")
        _guard(folder, "VM folder")
        return folder if (folder / RECORD_FILE).is_file() else None

    def names(self) -> list[str]:
        """Names of all managed VMs, sorted."""
        if not self.vms.is_dir():
            return []
        _guard(self.path, "state directory")
        _guard(self.vms, "state directory")
        return sorted(p.name for p in self.vms.iterdir() if (p / RECORD_FILE).is_file())
