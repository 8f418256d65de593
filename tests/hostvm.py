"""A real host for the reboot tests: a Debian 13 VM booted under QEMU, driven through its guest agent.

The image (built once with mmdebstrap, cached under ``~/.cache/cprctl-hostvm/KEY``, KEY changing with
the recipe) holds the cloud kernel and a second kernel version (for kexec), systemd, QEMU, qemu-guest-agent,
kexec-tools and a venv with cprctl's dependencies. Each test module boots it once over a qcow2 overlay,
with a second small disk carrying this checkout and the test guest in; cprctl is pip-installed from it
into the venv. Commands run through the agent's ``guest-exec``, as an operator with only the agent would.
Nested guests run with ``-accel kvm`` (the host VM's ``-cpu max`` emulates SVM), about 10x faster than
nested TCG.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cprctl._demo import TICK, Tick, guest_argv

from .cache import cached

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CPRCTL_HOSTVM_CACHE", Path.home() / ".cache" / "cprctl-hostvm"))
#: Bump when the recipe below changes meaning; the key also covers the packages, deps and mirror.
RECIPE = "2"
PACKAGES = (
    "linux-image-cloud-amd64,systemd-sysv,udev,dbus,procps,kmod,python3,python3-venv,qemu-system-x86,"
    "qemu-utils,qemu-guest-agent,kexec-tools,e2fsprogs,iproute2,ca-certificates,pciutils"
)
VENV = "/opt/cprctl/venv"
QEMU = "/usr/bin/qemu-system-x86_64"
GUEST = "/opt/guest"  # the test guest inside the host VM
SRC = "/opt/cprctl/src"  # the checkout's package, copied from the data disk
IMAGE_SIZE = "12G"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Run in the root after mmdebstrap: a second cloud kernel (another version of the same suite, the
#: highest one that is not the installed one), the venv, an empty root password, fstab, the agent.
SECOND_KERNEL_HOOK = r"""
set -e
root="$1"
have=$(chroot "$root" dpkg-query -W -f '${Package}\n' 'linux-image-[0-9]*-cloud-amd64')
other=$(chroot "$root" apt-cache pkgnames linux-image- | grep -E '^linux-image-[0-9].*-cloud-amd64$' \
        | grep -vxF "$have" | sort -V | tail -n 1)
[ -n "$other" ] || { echo "no second cloud kernel version in the archive" >&2; exit 1; }
chroot "$root" apt-get install -y -q --no-install-recommends "$other"
"""


def _deps() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def _mirror() -> str:
    """The Debian mirror this machine's own apt sources use (never a name written here)."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and parts[-3:-2] and parts[1].rstrip("/").endswith("/debian"):
                return parts[1]
    raise RuntimeError("no Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list")


def _key() -> str:
    import hashlib

    text = "\n".join([RECIPE, PACKAGES, SECOND_KERNEL_HOOK, *_deps(), _mirror()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _run(cmd: list[str], timeout: float = 1800, **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)[:300]} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return done  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Image:
    """A built host image: the raw root disk and the kernels copied out of its /boot."""

    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "root.img"

    @property
    def kernels(self) -> list[str]:
        """Installed kernel versions, the one /vmlinuz points to (booted by default) first."""
        return json.loads((self.folder / "kernels.json").read_text())  # type: ignore[no-any-return]

    def vmlinuz(self, version: str) -> Path:
        return self.folder / f"vmlinuz-{version}"

    def initrd(self, version: str) -> Path:
        return self.folder / f"initrd.img-{version}"


def _customize(root: Path) -> None:
    """Everything after mmdebstrap that runs against the root from outside."""
    for path in ("etc/pip.conf", "etc/xdg/pip"):
        src = Path("/") / path
        if src.is_dir():
            shutil.copytree(src, root / path, dirs_exist_ok=True)
        elif src.exists():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / path)
    # This machine's local CAs (a proxy's, say, that pip must trust to reach the index).
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir():
        shutil.copytree(local, root / local.relative_to("/"), dirs_exist_ok=True)
        _run(["chroot", str(root), "update-ca-certificates"])
    _run(["chroot", str(root), "python3", "-m", "venv", VENV])
    pip = ["chroot", str(root), f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, *_deps(), "setuptools>=77", "wheel"])
    _run(["chroot", str(root), "passwd", "-d", "root"])
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (root / "etc/hostname").write_text("cprhost\n")
    wants = root / "etc/systemd/system/dev-virtio\\x2dports-org.qemu.guest_agent.0.device.wants"
    wants.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (wants / "qemu-guest-agent.service").symlink_to("/usr/lib/systemd/system/qemu-guest-agent.service")
    # Nothing of these is wanted in a test host and each costs boot time or disk writes under TCG.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer"):
        (root / "etc/systemd/system" / unit).unlink(missing_ok=True)
        with contextlib.suppress(FileExistsError):
            (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    (root / "etc/modules-load.d/cprctl-test.conf").write_text("kvm_amd\n")
    # Under TCG on a busy machine a boot's units can take minutes: systemd's 90 s default failed
    # systemd-modules-load (kvm_amd) on a load of 15 on 2 cores.
    (root / "etc/systemd/system.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/system.conf.d/90-cprctl-test.conf").write_text(
        "[Manager]\nDefaultTimeoutStartSec=900s\nDefaultDeviceTimeoutSec=900s\n"
    )
    (root / "etc/sysctl.d/90-cprctl-test.conf").write_text("kernel.sysrq = 1\n")


def _build(dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".build.", dir=dest.parent))
    try:
        root = tmp / "root"
        _run(
            [
                "mmdebstrap",
                "--variant=apt",
                f"--include={PACKAGES}",
                "--customize-hook=" + SECOND_KERNEL_HOOK.replace("\n", "\n"),
                "trixie",
                str(root),
                f"deb {_mirror()} trixie main",
            ]
        )
        _customize(root)
        versions = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
        default = os.readlink(root / "vmlinuz").split("vmlinuz-", 1)[1]
        out = tmp / "out"
        out.mkdir()
        for v in versions:
            shutil.copy(root / f"boot/vmlinuz-{v}", out / f"vmlinuz-{v}")
            shutil.copy(root / f"boot/initrd.img-{v}", out / f"initrd.img-{v}")
        (out / "kernels.json").write_text(json.dumps([default, *(v for v in versions if v != default)]))
        _run(["truncate", "-s", IMAGE_SIZE, str(out / "root.img")])
        _run(["mkfs.ext4", "-q", "-F", "-L", "cprhost", "-d", str(root), str(out / "root.img")])
        out.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_image() -> Image:
    """The host image for the current recipe, built on first use (one builder at a time)."""
    return Image(cached(CACHE, _key(), "kernels.json", _timed_build))


def _timed_build(dest: Path) -> None:
    t = time.monotonic()
    _build(dest)
    (dest / "build-seconds").write_text(f"{time.monotonic() - t:.0f}\n")


def _data_disk(path: Path, guest: Path) -> None:
    """A small ext4 disk with this checkout's package (``src/cprctl``) and the test guest."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        stage = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / "src" / "cprctl", stage / "src" / "cprctl", ignore=ignore)
        version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        (stage / "version").write_text(f"{version}\n")
        (stage / "guest").mkdir()
        for name in ("vmlinuz", "initrd.img"):
            shutil.copy(guest / name, stage / "guest" / name)
        _run(["truncate", "-s", "256M", str(path)])
        _run(["mkfs.ext4", "-q", "-F", "-L", "cprdata", "-d", str(stage), str(path)])


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: What a Debian host's GRUB does by default (``GRUB_TIMEOUT=5``: the menu waits 5 s), booting the kernel
#: and initrd the image's /vmlinuz and /initrd.img point to, from the root filesystem (label ``cprhost``).
GRUB_CFG = """\
set timeout=5
insmod part_msdos
insmod ext2
search --no-floppy --label cprhost --set=root
menuentry 'Debian GNU/Linux' {{
    linux /vmlinuz {cmdline}
    initrd /initrd.img
}}
"""
UEFI_TOOLS = {"grub-mkstandalone": "grub-common", "mformat": "mtools", str(OVMF_CODE): "ovmf"}
GRUB_EFI = Path("/usr/lib/grub/x86_64-efi")


def uefi_disks(work: Path, cmdline: str) -> list[str]:
    """QEMU arguments for a UEFI boot as a Debian host's: OVMF (its variables in *work*) and a third disk,
    an EFI system partition (on SATA) with GRUB as the removable-media loader (``EFI/BOOT/BOOTX64.EFI``),
    whose menu boots the root filesystem's kernel with *cmdline*. The root and data disks stay vda and vdb.

    :raise RuntimeError: a tool is missing (which Debian package has it).
    """
    missing = sorted({pkg for tool, pkg in UEFI_TOOLS.items() if not (shutil.which(tool) or Path(tool).exists())})
    if not GRUB_EFI.is_dir():
        missing.append("grub-efi-amd64-bin")
    if missing:
        raise RuntimeError(f"a UEFI boot of the host VM needs: apt-get install {' '.join(missing)}")
    vars_fd = work / "OVMF_VARS.fd"
    shutil.copy(OVMF_VARS, vars_fd)
    cfg, efi, esp = work / "grub.cfg", work / "BOOTX64.EFI", work / "esp.img"
    cfg.write_text(GRUB_CFG.format(cmdline=cmdline))
    # Every module in its memdisk, as /boot/grub holds them on a Debian host (`search` tries each filesystem's).
    _run(["grub-mkstandalone", "-O", "x86_64-efi", "-o", str(efi), "--modules=part_msdos ext2 fat",
          "--locales=", "--fonts=", f"boot/grub/grub.cfg={cfg}"])  # fmt: skip
    _esp(esp, efi)
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
        "-drive", f"file={esp},if=none,id=esp,format=raw",
        # On q35's own SATA (AHCI): a virtio disk of its own would take a PCI slot before the root disk's
        # (QEMU adds ``if=virtio`` drives' devices after every -device), and root=/dev/vda would name it.
        # No bootindex: with one, OVMF connects only the devices in the boot order, and GRUB would not see
        # the root disk; without, it connects all and boots the first EFI loader it finds (the ESP's).
        "-device", "ide-hd,drive=esp,bus=ide.0",
    ]  # fmt: skip


def _esp(path: Path, loader: Path, mib: int = 64) -> None:
    """A disk of *mib* MiB with one MBR partition of type EF (EFI system) from 1 MiB on, FAT, holding *loader*
    as ``EFI/BOOT/BOOTX64.EFI``."""
    import struct

    start = 2048
    with open(path, "wb") as f:
        f.truncate(mib << 20)
        lba = b"\xfe\xff\xff"  # CHS fields unused: LBA addressing
        f.seek(0x1BE)
        f.write(struct.pack("<B3sB3sII", 0, lba, 0xEF, lba, start, (mib << 20) // 512 - start))
        f.seek(0x1FE)
        f.write(b"\x55\xaa")
    part = f"{path}@@{start * 512}"
    _run(["mformat", "-i", part, "-F", "-v", "ESP", "::"])
    _run(["mmd", "-i", part, "::/EFI", "::/EFI/BOOT"])
    _run(["mcopy", "-i", part, str(loader), "::/EFI/BOOT/BOOTX64.EFI"])


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (a killed pytest leaves no host VM behind)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class AgentError(RuntimeError):
    pass


class Agent:
    """A synchronous client of the host VM's guest agent over its chardev socket (QEMU is the server)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock:
            self.sock.close()
        self.sock = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(self.path))
            self.sock = s
        return self.sock

    def _read_until(self, sep: bytes, deadline: float) -> bytes:
        sock = self._connect()
        while sep not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the guest agent did not answer")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                self.close()
                raise AgentError("the agent socket closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(sep)
        return head

    def _sync(self, timeout: float) -> None:
        """Discard whatever an earlier, timed-out call left; the agent answers from here on in order."""
        deadline = time.monotonic() + timeout
        token = random.randrange(1, 2**31)
        sock = self._connect()
        self.buf = b""
        sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
        while True:
            self._read_until(b"\xff", deadline)
            line = self._read_until(b"\n", deadline)
            with contextlib.suppress(ValueError):
                if json.loads(line).get("return") == token:
                    return

    def call(self, command: str, timeout: float = 30, **arguments: object) -> object:
        try:
            self._sync(min(timeout, 10))
            sock = self._connect()
            sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
            deadline = time.monotonic() + timeout
            while True:
                line = self._read_until(b"\n", deadline)
                with contextlib.suppress(ValueError):
                    reply = json.loads(line.strip(b"\xff"))
                    if "error" in reply:
                        raise AgentError(f"{command}: {reply['error'].get('desc')}")
                    if "return" in reply:
                        return reply["return"]
        except (OSError, TimeoutError):
            self.close()
            raise

    def answers(self, timeout: float = 5) -> bool:
        try:
            self.call("guest-ping", timeout=timeout)
        except (OSError, TimeoutError, AgentError):
            return False
        return True


@dataclass
class Result:
    rc: int
    out: str
    err: str


#: A power cut, in a script run inside: sysrq b resets the host at once (no sync, no shutdown).
POWER_CUT = "echo 1 > /proc/sys/kernel/sysrq; echo b > /proc/sysrq-trigger"

#: The host VM's TCG and vCPUs: ONE vCPU. With two (one TCG thread each) its kernel panicked under its KVM on a
#: quiet machine in every run (``corrupted stack end detected inside scheduler``, 20-80 s after the nested
#: guests' launch; 30 Nov 07:42, 10:05 and 10:38 at a load of 1-2, each retry too) and never at a load of 3-12,
#: where the two vCPU threads rarely run at the same moment: a race between them in TCG's SVM/NPT emulation
#: fits. ``tcg,thread=single`` with two vCPUs avoided it but its nested guests printed nothing in 10 min. One vCPU
#: avoided it on the quiet machine (30 Nov 11:34, soak at a load of 1: four cycles of first boots, nested guests
#: ticking 81-167 s after launch, as fast as with two) and in whole module runs (README, *The host VM's own
#: faults*). CPRCTL_HOSTVM_ACCEL and CPRCTL_HOSTVM_SMP override them.
ACCEL = os.environ.get("CPRCTL_HOSTVM_ACCEL", "tcg,thread=multi")
SMP = os.environ.get("CPRCTL_HOSTVM_SMP", "1")


#: The host VM's emulated NVDIMM (persistent memory), a sparse file of this machine in the work folder.
PMEM_MIB = 512
#: Where its fsdax namespace's ext4 is mounted ``-o dax`` inside (from fstab, at every boot).
PMEM_MOUNT = "/mnt/pmem"
#: The IOMMU on for the host VM's devices (VFIO needs it); ``iommu=pt``: the host VM's own devices keep
#: direct DMA (identity-mapped), only those bound to VFIO go through its page tables.
DEVICES_APPEND = "intel_iommu=on iommu=pt"
#: QEMU's ``edu`` test PCI device, assigned to a nested guest through VFIO.
EDU = "1234:11e8"


def device_args(work: Path) -> list[str]:
    """QEMU arguments for the host VM's devices: an emulated IOMMU (before every other PCI device), an NVDIMM
    on a sparse file in *work* (its contents outlive the host VM's resets, as persistent memory's outlive a
    power cut), and the ``edu`` device for VFIO."""
    pmem = work / "pmem.img"
    with open(pmem, "wb") as f:
        f.truncate(PMEM_MIB << 20)
    return [
        "-device", "intel-iommu,caching-mode=on",
        "-object", f"memory-backend-file,id=pmem0,share=on,mem-path={pmem},size={PMEM_MIB}M",
        "-device", "nvdimm,memdev=pmem0,id=nvdimm0",
        "-device", "edu,id=edu0",
    ]  # fmt: skip


class HostVM:
    """The host VM's QEMU, started by this process, and its agent channel.

    *firmware* ``kernel`` (the tests): QEMU loads the image's default kernel itself (``-kernel``, SeaBIOS
    boots it at once); ``uefi``: as a Debian host boots, UEFI firmware (OVMF) then GRUB from an EFI system
    partition (Debian's menu timeout) then the kernel GRUB reads from the root filesystem (`uefi_disks`).
    *devices*: with an IOMMU, an NVDIMM and the ``edu`` PCI device (`device_args`; `setup_pmem`, `bind_edu`).
    """

    def __init__(
        self,
        image: Image,
        work: Path,
        guest: Path,
        extra: tuple[str, ...] = (),
        append: str = "",
        firmware: str = "kernel",
        devices: bool = False,
    ) -> None:
        self.image = image
        self.guest, self.extra, self.append, self.firmware = guest, extra, append, firmware
        self.devices = devices
        self.start(work)

    def start(self, work: Path) -> None:
        """Boot the host VM from the image afresh: a new overlay and data disk in *work*."""
        image, guest, extra, append, firmware = self.image, self.guest, self.extra, self.append, self.firmware
        self.work = work
        self.kernel = image.kernels[0]
        self.overlay = work / "overlay.qcow2"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.disk), str(self.overlay)])
        self.data = work / "data.img"
        _data_disk(self.data, guest)
        self.console = work / "console.log"
        self.agent = Agent(work / "qga.sock")
        machine, memory, own = "q35", "3G", []
        if self.devices:
            machine, memory, own = "q35,nvdimm=on", f"3G,slots=2,maxmem={3072 + PMEM_MIB}M", device_args(work)
            append = f"{DEVICES_APPEND} {append}"
        cmdline = f"root=/dev/vda rw console=ttyS0 {append}".strip()
        if firmware == "uefi":
            boot = uefi_disks(work, cmdline)
        else:
            boot = ["-kernel", str(image.vmlinuz(self.kernel)), "-initrd", str(image.initrd(self.kernel))]
            boot += ["-append", cmdline]
        argv = [
            QEMU,
            "-accel", ACCEL, "-cpu", "max", "-smp", SMP, "-m", memory, "-machine", machine,
            "-display", "none", "-nodefaults",
            *own,
            "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
            "-drive", f"file={self.data},if=virtio,format=raw",
            *boot,
            "-chardev", f"file,id=con0,path={self.console},append=on", "-serial", "chardev:con0",
            "-chardev", f"socket,id=qga0,path={self.agent.path},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off",
            *extra,
        ]  # fmt: skip
        self.log = open(work / "qemu.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        self.boot_id = ""
        self.scanned = 0  # console bytes `check_alive` has looked at
        self.wait_boot()

    # -- the channel -------------------------------------------------------------------------------
    def exec(self, script: str, timeout: float = 300, check: bool = True) -> Result:
        """Run *script* with sh as root inside, through guest-exec; its exit code and output."""
        env = [f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "COLUMNS=250"]
        started = self.agent.call("guest-exec", path="/bin/sh", arg=["-c", script], env=env, **{"capture-output": True})
        pid = started["pid"]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            st: dict[str, object] = self.agent.call("guest-exec-status", pid=pid)  # type: ignore[assignment]
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                self.check_alive()
                raise TimeoutError(f"{script[:200]}: still running after {timeout:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
        res = Result(
            int(st.get("exitcode", -1)),  # type: ignore[call-overload]
            base64.b64decode(str(st.get("out-data", ""))).decode(errors="replace"),
            base64.b64decode(str(st.get("err-data", ""))).decode(errors="replace"),
        )
        if check and res.rc != 0:
            raise AssertionError(f"{script}\nrc={res.rc}\n{res.out[-3000:]}\n{res.err[-3000:]}")
        return res

    def sh(self, script: str, timeout: float = 300) -> str:
        return self.exec(script, timeout).out

    def spawn(self, script: str) -> None:
        """Start *script* inside and return at once (its output goes to /dev/null)."""
        self.agent.call("guest-exec", path="/bin/sh", arg=["-c", f"({script}) >/dev/null 2>&1 &"], env=[f"PATH={PATH}"])

    # -- boots ---------------------------------------------------------------------------------------
    def wait_boot(self, timeout: float = 600) -> str:
        """Wait until a boot other than the last one seen runs with systemd up; its boot id."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            assert time.monotonic() < deadline, f"the host VM did not boot in {timeout:.0f} s:\n{self.tail()}"
            if self.agent.answers(timeout=5):
                with contextlib.suppress(OSError, TimeoutError, AgentError, AssertionError):
                    boot = self.sh("cat /proc/sys/kernel/random/boot_id", timeout=30).strip()
                    if boot and boot != self.boot_id:
                        state = self.exec("systemctl is-system-running --wait", timeout=300, check=False).out.strip()
                        assert state in ("running", "degraded"), f"host state {state}:\n{self.sh('systemctl --failed')}"
                        self.boot_id = boot
                        return boot
            time.sleep(1)

    #: What the host VM's kernel prints when it panics (then it hangs: nothing answers again).
    PANIC = "Kernel panic - not syncing"

    def check_alive(self) -> None:
        """Fail at once, with what the console says, when the host VM's QEMU exited or its kernel panicked."""
        assert self.proc.poll() is None, f"the host VM's QEMU exited:\n{self.tail()}"
        try:
            with open(self.console, "rb") as f:
                f.seek(self.scanned)
                data = f.read()
        except FileNotFoundError:  # QEMU has not opened it yet
            return
        if (at := data.find(self.PANIC.encode())) >= 0:
            text = data[max(0, at - 1500) : at + 2500].decode(errors="replace")
            raise AssertionError(f"the host VM's kernel panicked:\n{text}")
        self.scanned = max(self.scanned, self.scanned + len(data) - len(self.PANIC))  # a part line: read again

    def panic_since(self, mark: int) -> str:
        """The host VM's kernel panic on its console past byte *mark*, with the lines around it; "" if none."""
        text = self.console_since(mark)
        at = text.find(self.PANIC)
        return text[max(0, at - 3000) : at + 2500] if at >= 0 else ""

    def wait_silent(self, timeout: float = 600) -> None:
        """Wait until the agent stops answering (the host is going down); it answers until late."""
        deadline = time.monotonic() + timeout
        while self.agent.answers(timeout=3):
            self.check_alive()
            assert time.monotonic() < deadline, f"the host VM did not go down in {timeout:.0f} s:\n{self.tail()}"
            time.sleep(0.5)

    def reboot_with(self, script: str, timeout: float = 900) -> float:
        """Run *script* (which takes the host down), wait for the next boot; seconds it took."""
        t = time.monotonic()
        self.spawn(script)
        self.wait_silent(timeout)
        self.wait_boot(timeout)
        return time.monotonic() - t

    def console_since(self, mark: int) -> str:
        """The host VM's serial console past byte offset *mark* (``console_since(0)``: all of it)."""
        with open(self.console, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def console_mark(self) -> int:
        return self.console.stat().st_size

    def tail(self, n: int = 4000) -> str:
        try:
            return self.console.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """CPU time the host VM's QEMU has used so far (user and system): what its work costs on a machine
        shared with other QEMUs, where wall-clock time mostly measures the others."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.agent.close()
        self.log.close()

    # -- set-up --------------------------------------------------------------------------------------
    def install(self) -> None:
        """Install the checkout into the image's venv (its package on the venv's path, metadata for
        ``--version``, the ``cprctl`` command; no pip: under TCG it alone took a minute), install and
        start the units, put the test guest in place. One guest-exec: each costs seconds on a busy host."""
        self.sh(INSTALL, timeout=900)

    def wait_kvm(self, timeout: float = 120) -> None:
        self.sh(f"for i in $(seq {int(timeout)}); do [ -c /dev/kvm ] && exit 0; sleep 1; done; exit 1", timeout + 30)

    def put(self, path: str, text: str, mode: int = 0o644) -> None:
        handle = self.agent.call("guest-file-open", path=path, mode="w")
        self.agent.call("guest-file-write", handle=handle, **{"buf-b64": base64.b64encode(text.encode()).decode()})
        self.agent.call("guest-file-close", handle=handle)
        self.sh(f"chmod {mode:o} {path}")

    def arm_crash_at_restore(self) -> None:
        """At the next boot, reset the host in the middle of the unit's restore-all (once). Synced: armed for
        the boot after a power cut too."""
        self.put("/usr/local/sbin/crash-when", CRASH_WHEN, 0o755)
        self.put("/etc/systemd/system/crash-restore.service", CRASH_UNIT)
        self.sh(
            "mkdir -p /etc/systemd/system/cprctl-guests.service.wants && ln -sf ../crash-restore.service"
            " /etc/systemd/system/cprctl-guests.service.wants/ && systemctl daemon-reload && sync"
        )

    def status(self) -> dict[str, dict[str, object]]:
        rows = json.loads(self.sh("cprctl status --json"))
        return {r["name"]: r for r in rows}

    def setup_pmem(self) -> None:
        """Make the NVDIMM an fsdax namespace with ext4 on it, in fstab mounted ``-o dax`` at every boot."""
        self.sh(PMEM_SETUP, timeout=300)

    def bind_edu(self) -> str:
        """Bind the ``edu`` device to vfio-pci, now and at every boot; its PCI address."""
        return self.sh(BIND_EDU, timeout=120).strip()


#: The checkout's install inside (see `HostVM.install`), from the data disk on /dev/vdb.
INSTALL = f"""set -e
mkdir -p /mnt/data && mount -o ro /dev/vdb /mnt/data
rm -rf {SRC} && mkdir -p {SRC} {GUEST} && cp -a /mnt/data/src/cprctl {SRC}/ && cp /mnt/data/guest/* {GUEST}/
version=$(cat /mnt/data/version)
umount /mnt/data
site=$(echo {VENV}/lib/python3*/site-packages)
rm -rf "$site"/cprctl-*.dist-info && mkdir "$site/cprctl-$version.dist-info"
printf 'Metadata-Version: 2.1\\nName: cprctl\\nVersion: %s\\n' "$version" > "$site/cprctl-$version.dist-info/METADATA"
echo {SRC} > "$site/cprctl.pth"
printf '#!{VENV}/bin/python\\nimport sys\\nfrom cprctl.cli import main\\nsys.exit(main())\\n' > /usr/local/bin/cprctl
chmod 755 /usr/local/bin/cprctl
cprctl install-units
systemctl start cprctl-guests.service
"""

#: The NVDIMM, seen without labels as one raw namespace (no DAX: ext4 refuses ``-o dax`` on it), made an
#: fsdax namespace through sysfs as ``ndctl create-namespace -m fsdax`` would (the image has no ndctl): its
#: pfn device claims the namespace (memmap on the NVDIMM itself) and writes its info block there, which the
#: kernel finds again at every boot. Then ext4 (4 KiB blocks: DAX needs the page size) in fstab with ``dax``,
#: so it is mounted at every boot before ``cprctl-guests.service`` (its ``RequiresMountsFor=``).
PMEM_SETUP = f"""set -e
nd=/sys/bus/nd/devices
ns=$(cd $nd && ls -d namespace*.0 | head -n 1)
if [ "$(cat $nd/$ns/mode)" != memory ]; then
    pfn=$(cat $nd/region0/pfn_seed)
    echo $ns > /sys/bus/nd/drivers/nd_pmem/unbind
    echo $ns > $nd/$pfn/namespace
    echo pmem > $nd/$pfn/mode
    cat /proc/sys/kernel/random/uuid > $nd/$pfn/uuid
    echo $pfn > /sys/bus/nd/drivers/nd_pmem/bind
fi
udevadm settle
[ "$(cat /sys/block/pmem0/queue/dax)" = 1 ]
mkfs.ext4 -q -F -b 4096 -L cprpmem /dev/pmem0
mkdir -p {PMEM_MOUNT}
echo '/dev/pmem0 {PMEM_MOUNT} ext4 dax 0 2' >> /etc/fstab
systemctl daemon-reload
mount {PMEM_MOUNT}
grep -q ' {PMEM_MOUNT} ext4 .*dax=always' /proc/mounts
sync
"""

#: vfio-pci takes every ``edu`` device (none has a driver of its own), now and at every boot (as an operator
#: makes an assignment last: ``options vfio-pci ids=`` and the module loaded by systemd-modules-load, before
#: ``cprctl-guests.service``); prints the first one's address.
BIND_EDU = f"""set -e
echo 'options vfio-pci ids={EDU}' > /etc/modprobe.d/cprctl-edu.conf
echo vfio-pci > /etc/modules-load.d/cprctl-edu.conf
sync
modprobe vfio-pci
echo "{EDU.replace(":", " ")}" > /sys/bus/pci/drivers/vfio-pci/new_id 2>/dev/null || true
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor) $(cat $d/device)" = "0x{EDU.replace(":", " 0x")}" ] || continue
    [ "$(basename $(readlink $d/driver))" = vfio-pci ]
    [ -c /dev/vfio/$(basename $(readlink $d/iommu_group)) ]
    basename $d
    exit 0
done
echo "no edu device" >&2
exit 1
"""

#: Copied into the host VM: runs a shell script in a nested guest through its agent (``guest-exec``, the
#: test guest's busybox sh): ``gx AGENT_SOCKET SCRIPT``; its output and exit code.
GX = """import asyncio, base64, sys
from cprctl._qemu.agent import Agent
async def main(path, script):
    async with Agent(path, "gx", timeout=300) as agent:  # a busy host: its answers can take minutes
        started = await agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})
        while not (st := await agent.execute("guest-exec-status", {"pid": started["pid"]})).get("exited"):
            await asyncio.sleep(0.2)
    sys.stdout.write(base64.b64decode(st.get("out-data", "")).decode(errors="replace"))
    sys.stderr.write(base64.b64decode(st.get("err-data", "")).decode(errors="replace"))
    return int(st.get("exitcode", 1))
sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
"""

#: Run in a nested guest: finds the ``edu`` device on its PCI bus and talks to it through its BAR 0
#: (busybox devmem): register 0x00 is its identification (0x010000ed), 0x04 gives back the bitwise NOT of
#: what was written.
EDU_PROBE = f"""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor) $(cat $d/device)" = "0x{EDU.replace(":", " 0x")}" ] || continue
    read -r bar _ < $d/resource
    devmem $((bar + 4)) 32 0x12345678
    echo "edu $(basename $d) id=$(devmem $bar 32) not=$(devmem $((bar + 4)) 32)"
    exit 0
done
echo "no edu device"
exit 1
"""


def nested_exec(host: HostVM, name: str, script: str) -> str:
    """*script* run in nested guest *name* through its agent (guest-exec); its output."""
    if host.exec("test -e /usr/local/sbin/gx", check=False).rc != 0:
        host.put("/usr/local/sbin/gx", GX)
    return host.sh(f"{VENV}/bin/python /usr/local/sbin/gx /var/lib/cprctl/vms/{name}/qga.sock {shlex.quote(script)}")


#: Copied into the host VM: polls the VM records (5 ms) and resets the host at the moment named by argv[1]:
#: ``save``: one VM saved (checkpoint, no operation) while another is not yet; ``restore``: a restore under
#: way (its QEMU loading) while no restore got further and every VM still has its checkpoint: no guest can
#: resume in the 50 ms before the cut (a guest that ran again on its restored state and then lost it in a
#: power cut can only boot afresh). A power cut there, with no sync.
CRASH_WHEN = """\
import json, pathlib, sys, time
when = sys.argv[1]
deadline = time.monotonic() + float(sys.argv[2])
def records():
    out = []
    for p in pathlib.Path("/var/lib/cprctl/vms").glob("*/vm.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return out
def moment(recs):
    if when == "save":
        saved = [r for r in recs if r.get("checkpoint") and not r.get("operation")]
        return bool(saved) and any(not r.get("checkpoint") for r in recs)
    ops = [r.get("operation") or {} for r in recs]
    steps = [(o.get("steps") or [["started"]])[-1][0] for o in ops if o.get("kind") == "restore"]
    return all(r.get("checkpoint") for r in recs) and bool(steps) and set(steps) == {"started"}
while time.monotonic() < deadline:
    recs = records()
    if moment(recs):
        line = " ".join(f"{r['name']}={bool(r.get('checkpoint'))}/{(r.get('operation') or {}).get('kind')}"
                        for r in recs)
        with open("/dev/kmsg", "w") as kmsg:  # to the serial console, which the test reads from outside
            print("crash: " + line, file=kmsg, flush=True)
        time.sleep(0.05)
        pathlib.Path("/proc/sys/kernel/sysrq").write_text("1")
        pathlib.Path("/proc/sysrq-trigger").write_text("b")
    time.sleep(0.005)
sys.exit("crash-when: the moment never came")
"""

#: A unit that arms the restore crash for the next boot only: it disarms itself durably (sync, before
#: cprctl-guests.service starts) and then watches the restore.
CRASH_UNIT = """\
[Unit]
DefaultDependencies=no
After=local-fs.target
Before=cprctl-guests.service

[Service]
ExecStartPre=/bin/sh -c 'rm -f /etc/systemd/system/cprctl-guests.service.wants/crash-restore.service && sync'
ExecStart=/usr/bin/python3 /usr/local/sbin/crash-when restore 600
"""


# -- nested guests -----------------------------------------------------------------------------------
def nested_argv(name: str, *, ram: str = "file", ram_mib: int = 128, fill: int = 32, ram_path: str | None = None,
                extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """The test guest's command line inside the host VM, under the host VM's KVM."""
    argv = guest_argv(
        QEMU,
        Path(GUEST),
        Path(f"/srv/vms/{name}"),
        ram_mib=ram_mib,
        fill_mib=fill,
        ram=ram,
        ram_path=Path(ram_path) if ram_path else None,
        extra=extra,
    )
    argv[argv.index("tcg")] = "kvm"
    # Without SVM of its own: under KVM, -cpu max hands the host VM's (emulated) SVM on to the guest and its
    # migration stream carries KVM's nested state, which failed to load at boot for the anonymous-RAM guest
    # ('Failed to set nested state: Invalid argument').
    argv[argv.index("max")] = "max,-svm"
    argv[argv.index("q35")] = "pc-q35-10.0"  # pinned: the restore must meet the same machine
    return argv


def console_ticks(host: HostVM, name: str) -> list[Tick]:
    text = host.exec(f"cat /srv/vms/{name}/console.log", check=False).out
    return [Tick(m["boot"], int(m["n"]), float(m["up"])) for m in TICK.finditer(text)]


def console_text(host: HostVM, name: str) -> str:
    return host.exec(f"cat /srv/vms/{name}/console.log", check=False).out


def wait_tick(host: HostVM, name: str, above: int, timeout: float = 300) -> list[Tick]:
    """Wait until nested guest *name* printed a tick numbered above *above*; all its ticks."""
    deadline = time.monotonic() + timeout
    while True:
        found = console_ticks(host, name)
        if any(t.n > above for t in found):
            return found
        assert time.monotonic() < deadline, f"{name}: no tick past {above}:\n{console_text(host, name)[-1500:]}"
        time.sleep(2)


def launch_nested(host: HostVM, name: str, **kw: object) -> None:
    argv = nested_argv(name, **kw)  # type: ignore[arg-type]
    host.sh(f"mkdir -p /srv/vms/{name} && cprctl launch {name} --agent -- {shlex.join(argv)}")


def launch_all(host: HostVM, guests: dict[str, dict[str, object]]) -> None:
    """`launch_nested` for each of *guests* (name: its keywords), side by side in one guest-exec."""
    lines = []
    for name, kw in guests.items():
        argv = nested_argv(name, **kw)  # type: ignore[arg-type]
        lines.append(f"(mkdir -p /srv/vms/{name} && cprctl launch {name} --agent -- {shlex.join(argv)}) &")
        lines.append('pids="$pids $!"')
    wait = "rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc"
    host.sh("\n".join(["pids=", *lines, wait]), timeout=900)
