"""Loading the next kernel for a kexec reboot: which kernel, which command line, ``kexec -l``.

Choosing is pure (`newest_kernel`, `boot_cmdline` take what they read as arguments);
`load` runs kexec-tools' ``kexec -l``, which needs root.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

BOOT = Path("/boot")
PROC_CMDLINE = Path("/proc/cmdline")
KEXEC_LOADED = Path("/sys/kernel/kexec_loaded")
#: Words of the running command line that name the running kernel and initrd (a boot loader adds
#: them; the kernel being loaded gets its own initrd from ``kexec --initrd``).
DROPPED_WORDS = ("BOOT_IMAGE=", "initrd=")


@dataclass(frozen=True)
class KexecKernel:
    """What ``kexec -l`` loads."""

    kernel: str
    initrd: str | None
    cmdline: str


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for kernel versions: numbers compare as numbers (``6.12.10`` after ``6.12.9``)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|[^\d.+~-]+", version))


def installed_kernels(files: list[str]) -> dict[str, str]:
    """Kernel versions to their ``vmlinuz-VERSION`` file names, among the names of a boot folder."""
    return {f.removeprefix("vmlinuz-"): f for f in files if f.startswith("vmlinuz-") and not f.endswith(".old")}


def initrd_for(kernel: Path) -> Path | None:
    """``initrd.img-VERSION`` beside ``vmlinuz-VERSION`` (Debian's names), if it is there."""
    if not kernel.name.startswith("vmlinuz-"):
        return None
    initrd = kernel.with_name("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    return initrd if initrd.is_file() else None


def newest_kernel(boot: Path = BOOT) -> Path:
    """The newest installed kernel in *boot* (by version, not by date).

    :raise UsageError: there is none.
    """
    try:
        names = [p.name for p in boot.iterdir() if p.is_file()]
    except OSError as exc:
        raise UsageError(f"cannot list {boot}: {exc.strerror}; give --kernel") from None
    kernels = installed_kernels(names)
    if not kernels:
        raise UsageError(f"no kernel (vmlinuz-VERSION) in {boot}; give --kernel and --initrd")
    return boot / kernels[max(kernels, key=version_key)]


def boot_cmdline(running: str) -> str:
    """The running kernel's command line for the next one: without ``BOOT_IMAGE=`` and ``initrd=``."""
    return " ".join(w for w in running.split() if not w.startswith(DROPPED_WORDS))


def choose(
    kernel: str | None = None,
    initrd: str | None = None,
    append: str | None = None,
    boot: Path = BOOT,
    proc_cmdline: Path = PROC_CMDLINE,
) -> KexecKernel:
    """The kernel to load: *kernel* (default: the newest in *boot*), its *initrd* (default: the
    ``initrd.img-VERSION`` beside it), and *append* (default: the running command line, see `boot_cmdline`).

    :raise UsageError: a file is missing, or there is no kernel to choose.
    """
    path = Path(kernel) if kernel else newest_kernel(boot)
    if not path.is_file():
        raise UsageError(f"--kernel {path}: no such file")
    if initrd and not Path(initrd).is_file():
        raise UsageError(f"--initrd {initrd}: no such file")
    ramdisk = initrd or (str(found) if (found := initrd_for(path)) else None)
    if append is None:
        try:
            append = boot_cmdline(proc_cmdline.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {proc_cmdline}: {exc.strerror}; give --append") from None
    return KexecKernel(str(path), ramdisk, append)


def command(k: KexecKernel) -> list[str]:
    """The ``kexec -l`` command line that loads *k*."""
    return ["kexec", "-l", k.kernel, *([f"--initrd={k.initrd}"] if k.initrd else []), f"--append={k.cmdline}"]


def available() -> bool:
    """Whether kexec-tools' ``kexec`` is installed."""
    return shutil.which("kexec") is not None


def load(k: KexecKernel) -> None:
    """Load *k* as the kernel the next ``systemctl kexec`` boots.

    :raise UsageError: ``kexec`` is missing or refuses (its last line of output).
    """
    if not available():
        raise UsageError("kexec is not installed (apt-get install kexec-tools)")
    try:
        done = subprocess.run(command(k), capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"kexec -l {k.kernel} failed: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
        raise UsageError(f"kexec -l {k.kernel} failed: {why}")


def unload() -> None:
    """Forget a loaded kernel (``kexec -u``); best effort."""
    if available():
        subprocess.run(["kexec", "-u"], capture_output=True, timeout=60, check=False)


def loaded() -> bool:
    """Whether a kernel is loaded for kexec."""
    try:
        return KEXEC_LOADED.read_text().strip() == "1"
    except OSError:
        return False
