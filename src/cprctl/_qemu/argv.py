"""Reading and editing a QEMU command line, without running anything.

Pure functions over ``list[str]``: which options an argv has, its machine type,
its guest RAM backends, its QMP socket; and the edits cprctl makes (pin the
machine type, add sockets, add ``-incoming defer``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

#: QEMU options that take no argument (qemu-options.hx, HAS_ARG = 0).
FLAGS = frozenset(
    [
        "h",
        "help",
        "version",
        "nodefaults",
        "S",
        "s",
        "snapshot",
        "nographic",
        "no-quit",
        "full-screen",
        "enable-kvm",
        "no-reboot",
        "no-shutdown",
        "daemonize",
        "no-user-config",
        "mem-prealloc",
        "win2k-hack",
        "no-hpet",
        "no-acpi",
        "usb",
        "enable-sync-profile",
        "preconfig",
        "only-migratable",
        "xen-attach",
        "xen-domid-restrict",
        "alt-grab",
        "ctrl-grab",
        "no-fd-bootchk",
        "singlestep",
        "semihosting",
        "perfmap",
        "jitdump",
        "enable-fips",
    ]
)
TRUE = frozenset({"on", "yes", "true", "y"})


@dataclass(frozen=True)
class Opt:
    """One option of an argv: ``name`` without dashes (``""`` for a positional), its value, its index."""

    name: str
    value: str | None
    index: int


def parse(argv: Sequence[str]) -> list[Opt]:
    """Split ``argv[1:]`` into options; ``argv[0]`` is the binary."""
    opts: list[Opt] = []
    i = 1
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and len(word) > 1:
            name = word.lstrip("-")
            if name in FLAGS:
                opts.append(Opt(name, None, i))
                i += 1
                continue
            opts.append(Opt(name, argv[i + 1] if i + 1 < len(argv) else None, i))
            i += 2
        else:
            opts.append(Opt("", word, i))
            i += 1
    return opts


def split_keyval(text: str, implied: str) -> dict[str, str]:
    """Parse QEMU's ``a,k=v,k2=v2`` syntax (``,,`` is a literal comma); ``a`` goes to *implied*."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return {str(k): _json_str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    items: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            items.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    items.append(current)
    result: dict[str, str] = {}
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq and n == 0:
            result[implied] = key
        elif eq:
            result[key] = value
        elif key:
            result[key] = "on"
    return result


def _json_str(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def options(argv: Sequence[str], *names: str) -> list[Opt]:
    """The options of *argv* named any of *names*, in order."""
    return [o for o in parse(argv) if o.name in names]


# -- machine type ----------------------------------------------------------------------------

_IMPLIED = {
    "machine": "type",
    "M": "type",
    "object": "qom-type",
    "device": "driver",
    "chardev": "backend",
    "numa": "type",
    "mon": "chardev",
    "global": "global",
}


def machine_props(argv: Sequence[str]) -> dict[str, str]:
    """All ``-machine``/``-M`` properties merged, later options winning."""
    merged: dict[str, str] = {}
    for opt in options(argv, "machine", "M"):
        merged.update(split_keyval(opt.value or "", "type"))
    return merged


def machine_type(argv: Sequence[str]) -> str | None:
    """The machine type *argv* asks for (maybe an alias such as ``q35``), or None for the default."""
    return machine_props(argv).get("type") or None


def with_machine_type(argv: Sequence[str], machine: str) -> list[str]:
    """*argv* with its machine type set to *machine*: in its last ``-machine`` option, else added."""
    out = list(argv)
    found = options(argv, "machine", "M")
    for opt in reversed(found):
        props = split_keyval(opt.value or "", "type")
        if "type" in props:
            out[opt.index + 1] = _replace_type(opt.value or "", machine)
            return out
    if found:
        last = found[-1]
        out[last.index + 1] = f"{machine},{last.value}" if last.value else machine
        return out
    return [out[0], "-machine", machine, *out[1:]]


def _replace_type(value: str, machine: str) -> str:
    head, comma, rest = value.partition(",")
    if head.startswith("type="):
        return f"type={machine}{comma}{rest}"
    if "=" not in head:
        return f"{machine}{comma}{rest}"
    return ",".join(f"type={machine}" if part.startswith("type=") else part for part in value.split(","))


# -- guest RAM -------------------------------------------------------------------------------

BackendKind = Literal["file", "memfd", "ram", "epc", "default", "mem-path"]


_BACKEND_KINDS: dict[str, BackendKind] = {"file": "file", "memfd": "memfd", "ram": "ram", "epc": "epc"}


@dataclass(frozen=True)
class RamBackend:
    """One source of guest RAM named by the argv."""

    id: str
    kind: BackendKind
    share: bool = False
    path: str | None = None
    size: str | None = None
    #: ``discard-data=on``: QEMU discards the file's contents when it exits.
    discard: bool = False
    #: ``prealloc=on``: QEMU touches every page when it starts.
    prealloc: bool = False

    @property
    def named_shared_file(self) -> bool:
        """A ``memory-backend-file`` with ``share=on`` that outlives QEMU: candidate for staying in place."""
        return self.kind == "file" and self.share and bool(self.path) and not self.discard


@dataclass(frozen=True)
class RamLayout:
    """Guest RAM as the argv sets it up."""

    backends: list[RamBackend] = field(default_factory=list)
    size: str | None = None


def ram_layout(argv: Sequence[str]) -> RamLayout:
    """Every RAM backend of *argv*, including QEMU's implicit main RAM when no backend is named.

    Main RAM comes from ``-machine memory-backend=ID`` or ``-numa node,memdev=ID``;
    without either it is an anonymous (or ``-mem-path``, private) block QEMU makes itself.
    """
    objects: dict[str, RamBackend] = {}
    for opt in options(argv, "object"):
        props = split_keyval(opt.value or "", "qom-type")
        qom = props.get("qom-type", "")
        if qom.startswith("memory-backend-"):
            kind = _BACKEND_KINDS.get(qom.removeprefix("memory-backend-"), "ram")
            share = props.get("share", "on" if kind == "memfd" else "off") in TRUE
            ident = props.get("id", "")
            objects[ident] = RamBackend(
                ident,
                kind,
                share,
                props.get("mem-path"),
                props.get("size"),
                props.get("discard-data", "off") in TRUE,
                props.get("prealloc", "off") in TRUE,
            )
    size = next((split_keyval(o.value or "", "size").get("size") for o in reversed(options(argv, "m"))), None)
    main = machine_props(argv).get("memory-backend")
    numa = [split_keyval(o.value or "", "type") for o in options(argv, "numa")]
    uses_memdev = main is not None or any(n.get("memdev") for n in numa)
    backends = list(objects.values())
    if not uses_memdev:
        mem_path = next((o.value for o in reversed(options(argv, "mem-path"))), None)
        if mem_path:
            backends.insert(0, RamBackend("main", "mem-path", False, mem_path, size))
        else:
            backends.insert(0, RamBackend("main", "default", False, None, size))
    return RamLayout(backends, size)


def size_bytes(text: str | None) -> int:
    """QEMU's size syntax (``512M``, ``4G``, ``size=2G,maxmem=8G``; a bare number is MiB) in bytes; 0 if unknown."""
    m = _SIZE.fullmatch((text or "").strip().removeprefix("size=").split(",")[0])
    if not m:
        return 0
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30, "T": 40}[(m.group(2) or "M").upper()]


_SIZE = re.compile(r"(\d+)([KMGT]?)", re.I)


# -- sockets, devices ------------------------------------------------------------------------


def unix_chardevs(argv: Sequence[str], servers_only: bool = False) -> dict[str, str]:
    """``{id: path}`` of the unix socket ``-chardev``s of *argv* (only those QEMU serves, with *servers_only*)."""
    found = {}
    for opt in options(argv, "chardev"):
        props = split_keyval(opt.value or "", "backend")
        if props.get("backend") == "socket" and props.get("path") and (_is_server(props) or not servers_only):
            found[props.get("id", "")] = props["path"]
    return found


def _unix_servers(argv: Sequence[str], *names: str) -> list[str]:
    """Paths of ``-NAME unix:PATH,server=on`` options (``-qmp``, ``-monitor``, ``-serial``)."""
    paths = []
    for opt in options(argv, *names):
        value = opt.value or ""
        if value.startswith("unix:") and _is_server(props := split_keyval(value[5:], "path")):
            paths.append(props["path"])
    return paths


def served_sockets(argv: Sequence[str]) -> list[str]:
    """Every path QEMU holds for *argv* that a second QEMU must take at a side path.

    The unix sockets it serves (QMP, monitors, consoles, the guest agent), and its ``-pidfile``
    (locked by QEMU, and unlinked when it exits).
    """
    pidfile = [o.value for o in options(argv, "pidfile") if o.value]
    return [
        *unix_chardevs(argv, servers_only=True).values(),
        *_unix_servers(argv, "qmp", "monitor", "serial"),
        *pidfile,
    ]


def qmp_socket(argv: Sequence[str]) -> str | None:
    """The path of a unix QMP server socket *argv* already has, if any."""
    if qmp := _unix_servers(argv, "qmp"):
        return qmp[0]
    chardevs = unix_chardevs(argv, servers_only=True)
    for opt in options(argv, "mon"):
        props = split_keyval(opt.value or "", "chardev")
        if props.get("mode") == "control" and props.get("chardev") in chardevs:
            return chardevs[props["chardev"]]
    return None


def _is_server(props: dict[str, str]) -> bool:
    return props.get("server", "off") in TRUE


def device_drivers(argv: Sequence[str]) -> list[str]:
    """The driver of every ``-device``."""
    return [split_keyval(o.value or "", "driver").get("driver", "") for o in options(argv, "device")]


def device_ids(argv: Sequence[str]) -> set[str]:
    """The ``id`` of every ``-device`` that has one."""
    ids = (split_keyval(o.value or "", "driver").get("id") for o in options(argv, "device"))
    return {i for i in ids if i}


#: Options naming a host file QEMU opens at start-up, and the property that names it (``""``: the value).
_FILE_OPTIONS = {
    "drive": "file",
    "blockdev": "filename",
    "kernel": "",
    "initrd": "",
    "bios": "",
    "pflash": "",
}


def host_files(argv: Sequence[str]) -> list[str]:
    """Absolute paths of the host files QEMU needs to start: its binary, disk images, kernel, initrd,
    firmware and RAM files (``mem-path``); not network block devices (``nbd:``, ``rbd:``...)."""
    found = [argv[0]] if argv else []
    for opt in options(argv, *_FILE_OPTIONS):
        key = _FILE_OPTIONS[opt.name]
        value = split_keyval(opt.value or "", "driver").get(key) if key else opt.value
        found.append(value or "")
    found += [b.path or "" for b in ram_layout(argv).backends]
    return sorted({p for p in found if p.startswith("/")})


def host_network(argv: Sequence[str]) -> bool:
    """Whether QEMU attaches to the host's network at start-up (a tap or bridge netdev)."""
    kinds = (split_keyval(o.value or "", "type").get("type") for o in options(argv, "netdev", "nic", "net"))
    return any(k in ("tap", "bridge") for k in kinds)


def has_vfio(argv: Sequence[str]) -> bool:
    return any(d.startswith("vfio") for d in device_drivers(argv))


def s3_enabled(argv: Sequence[str]) -> bool:
    """Whether *argv* turns the guest's ACPI S3 (suspend to RAM) on."""
    for opt in options(argv, "global"):
        key, _, value = (opt.value or "").partition("=")
        if key.lower() in ("ich9-lpc.disable_s3", "piix4_pm.disable_s3"):
            return value in ("0", "off", "false", "no")
    return False


def uefi_firmware(argv: Sequence[str]) -> bool:
    """Whether *argv* boots UEFI firmware (pflash drives, ``-machine pflash0=``, or a ``-bios`` OVMF/edk2 image)
    rather than QEMU's default SeaBIOS."""
    if any("if=pflash" in (o.value or "") for o in options(argv, "drive")) or "pflash0" in machine_props(argv):
        return True
    return any(re.search(r"ovmf|edk2", o.value or "", re.IGNORECASE) for o in options(argv, "bios"))


def qmp_args(path: str, ident: str = "cprctl-qmp") -> list[str]:
    return ["-chardev", f"socket,id={ident},path={path},server=on,wait=off", "-mon", f"chardev={ident},mode=control"]


def agent_args(path: str, ident: str = "cprctl-qga") -> list[str]:
    return [
        "-chardev",
        f"socket,id={ident},path={path},server=on,wait=off",
        "-device",
        f"virtio-serial-pci,id={ident}-serial",
        "-device",
        f"virtserialport,bus={ident}-serial.0,chardev={ident},name=org.qemu.guest_agent.0",
    ]


def agent_socket(argv: Sequence[str]) -> str | None:
    """The host socket of a guest agent channel (``org.qemu.guest_agent.0``) in *argv*, if any."""
    chardevs = unix_chardevs(argv)
    for opt in options(argv, "device"):
        props = split_keyval(opt.value or "", "driver")
        if props.get("name") == "org.qemu.guest_agent.0" and props.get("chardev") in chardevs:
            return chardevs[props["chardev"]]
    return None


def for_relaunch(argv: Sequence[str]) -> list[str]:
    """*argv* without what must not be repeated on a restart: ``-incoming`` and ``-daemonize``."""
    drop: set[int] = set()
    for opt in parse(argv):
        if opt.name == "incoming":
            drop.update({opt.index, opt.index + 1})
        elif opt.name == "daemonize":
            drop.add(opt.index)
    return [w for i, w in enumerate(argv) if i not in drop]


def incoming(argv: Sequence[str]) -> list[str]:
    """*argv* started to wait for a migration stream (``-incoming defer``)."""
    return [*for_relaunch(argv), "-incoming", "defer"]
