"""Other real QEMU releases for the tests: Debian 13's (10.0.x) and Debian unstable's (11.x).

Both need a newer glibc than this machine's, so each runs from a Debian root
built by ``scripts/qemu-root.sh`` (mmdebstrap, cached under
``~/.cache/cprctl-qemu-roots``, built on first use) through the wrapper beside
it, which runs the root's QEMU on this host with the same pid, paths and
devices (see the script). ``CPRCTL_QEMU_ROOTS`` moves the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CPRCTL_QEMU_ROOTS", Path.home() / ".cache" / "cprctl-qemu-roots"))


def available() -> str | None:
    """Why the roots cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (chroot, mount namespaces)"
    missing = [t for t in ("mmdebstrap", "unshare", "chroot") if not shutil.which(t)]
    return f"needs {', '.join(missing)} (scripts/install-deps.sh)" if missing else None


def qemu(suite: str) -> Path:
    """The wrapper that runs *suite*'s QEMU (``trixie`` or ``unstable``), its root built on first use."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "qemu-root.sh"), suite, str(CACHE)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, f"qemu-root.sh {suite} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return (CACHE / suite).resolve() / "qemu-system-x86_64"


def debian_mirror() -> str:
    """The Debian mirror this machine's own apt sources use for bookworm (never written into the tests)."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in source.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] != "#")
            if "bookworm" in fields.get("Suites", "").split() and (uris := fields.get("URIs", "").split()):
                return uris[0]
    legacy = Path("/etc/apt/sources.list")
    for line in legacy.read_text().splitlines() if legacy.exists() else []:
        words = line.split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
            return words[1]
    raise AssertionError("no Debian apt source on this machine to take the mirror from")


def root_of(wrapper: Path) -> Path:
    return wrapper.parent / "root"


def switchable(wrapper: Path, folder: Path) -> Path:
    """A wrapper at *folder* running the QEMU of *wrapper*'s root through a symlink ``folder/root``, so that
    `switch` can replace the QEMU under it as a package upgrade does (running QEMUs keep theirs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "root").symlink_to(root_of(wrapper))
    text = wrapper.read_text().replace(str(root_of(wrapper)), str(folder / "root"))
    path = folder / "qemu-system-x86_64"
    path.write_text(text)
    path.chmod(0o755)
    return path


def switch(folder: Path, to: Path) -> None:
    """Point *folder*'s wrapper at the root of wrapper *to*, atomically (a rename, as dpkg installs)."""
    tmp = folder / "root.new"
    tmp.symlink_to(root_of(to))
    os.rename(tmp, folder / "root")
