"""Handing host resources only one QEMU can hold (tap devices, listening TCP sockets) to a new QEMU.

The new QEMU of a warm update cannot open a tap device or bind a TCP port the
running QEMU holds. Instead cprctl takes a copy of the running QEMU's open file
descriptor with pidfd_getfd(2) (root, or ptrace permission over it) and starts
the new QEMU with it: ``-netdev tap,fd=N`` for a tap, ``-chardev socket,fd=N,server=on``
for a TCP chardev, monitor or QMP server, and QMP ``display-update`` for a VNC
server. Both copies refer to one open file, so the port never stops listening
and the tap keeps its queue; QEMU reads a tap and accepts on a socket only while
its guest runs or its main loop polls, and the old QEMU is paused from the switch on.

The argv given to the new QEMU is not recorded: the record keeps the original
``ifname=``/``host=``/``port=`` form, for later cold restarts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QemuError
from . import argv as qargv

_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


class HandoverError(QemuError):
    """A resource of the running QEMU could not be handed to the new one (nothing was changed)."""


@dataclass
class Handover:
    """The new QEMU's argv with handed-over fds, and the fds cprctl holds for it until it has them."""

    argv: list[str]
    #: Passed to the new QEMU at its start (same numbers in the child). Files, so that none leaks.
    files: list[io.FileIO] = field(default_factory=list)
    #: The VNC server's listening socket, given to the new QEMU over QMP (``getfd``).
    vnc: io.FileIO | None = None
    #: The unix socket the new QEMU's VNC server waits on until then (removed afterwards).
    vnc_side: str | None = None

    @property
    def fds(self) -> list[int]:
        return [f.fileno() for f in self.files]

    def _add(self, fd: int) -> int:
        self.files.append(io.FileIO(fd, "r", closefd=True))
        return fd

    def close(self) -> None:
        """Close cprctl's copies of the fds passed at start (the new QEMU has its own)."""
        for f in self.files:
            f.close()
        self.files = []


def getfd(pid: int, target: int) -> int:
    """A copy, in this process, of file descriptor *target* of process *pid* (pidfd_getfd(2)).

    :raise HandoverError: when the process is gone, or this process may not take its fds.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise HandoverError(f"cannot open process {pid}: {exc.strerror}") from exc
    import ctypes  # here: only a warm handover takes fds (restore-all at boot never, `cprctl._boot`)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise HandoverError(f"cannot take fd {target} of QEMU pid {pid} (pidfd_getfd: {os.strerror(err)})")
        return fd
    finally:
        os.close(pidfd)


def tap_fd(pid: int, ifname: str) -> int:
    """The fd number, in process *pid*, of its open tap device *ifname* (fdinfo ``iff:``).

    :raise HandoverError: when it has none or more than one.
    """
    found = []
    for info in _fdinfos(pid):
        with contextlib.suppress(OSError):
            if re.search(rf"^iff:\s*{re.escape(ifname)}$", info.read_text(), re.MULTILINE):
                found.append(int(info.name))
    if len(found) != 1:
        raise HandoverError(f"QEMU pid {pid} has {len(found)} open fds on tap {ifname}, expected one")
    return found[0]


def listening_fd(pid: int, port: int) -> int:
    """The fd number, in process *pid*, of its TCP socket listening on *port*.

    :raise HandoverError: when it has none or more than one (e.g. IPv4 and IPv6).
    """
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(cols[9])
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(entry)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    found.append(int(entry.name))
    if len(found) != 1:
        raise HandoverError(f"QEMU pid {pid} has {len(found)} sockets listening on TCP port {port}, expected one")
    return found[0]


def _fdinfos(pid: int) -> list[Path]:
    try:
        return list(Path(f"/proc/{pid}/fdinfo").iterdir())
    except OSError as exc:
        raise HandoverError(f"cannot read the fds of QEMU pid {pid}: {exc.strerror}") from exc


# -- what can be handed over, and the argv that receives it (pure) ----------------------------------

#: Address properties a socket chardev given ``fd=`` must not have.
_INET_KEYS = ("host", "port", "to", "ipv4", "ipv6", "numeric", "path", "abstract", "tight")
#: Tap properties invalid with ``fd=`` (net/tap.c).
_TAP_KEYS = ("type", "fd", "ifname", "script", "downscript", "vnet_hdr", "queues", "helper", "br")
_LEGACY_MODE = {"qmp": "control", "monitor": "readline"}


def tcp_port(value: str) -> int | None:
    """The port of a legacy ``tcp:HOST:PORT,...``/``telnet:...`` server option, or None (not one, or port 0)."""
    head = value.split(",", 1)[0]
    proto, _, hostport = head.partition(":")
    if proto not in ("tcp", "telnet") or not _is_server(value):
        return None
    port = hostport.rpartition(":")[2]
    return int(port) if port.isdigit() and int(port) else None


def chardev_port(value: str) -> int | None:
    """The port of a ``-chardev socket,...,port=P,server=on``, or None (not one, or port 0)."""
    props = qargv.split_keyval(value, "backend")
    if props.get("backend") not in ("socket", "telnet") or not props.get("port") or not _is_server(value):
        return None
    return int(props["port"]) if props["port"].isdigit() and int(props["port"]) else None


def vnc_port(value: str) -> int | None:
    """The TCP port of a ``-vnc [HOST]:DISPLAY,...`` server, or None (``none``, unix, no display)."""
    head = value.split(",", 1)[0]
    if head in ("", "none") or head.startswith("unix:"):
        return None
    display = head.rpartition(":")[2]
    return 5900 + int(display) if display.isdigit() else None


def unhandable(argv: Sequence[str]) -> list[str]:
    """Why resources of *argv* that only one QEMU can hold cannot be handed to a new QEMU (pure)."""
    why = []
    for opt in qargv.options(argv, "netdev", "nic", "net"):
        props = qargv.split_keyval(opt.value or "", "type")
        kind = props.get("type")
        if kind == "tap":
            why += _tap_problems(props)
        elif kind in ("bridge", "vhost-user", "vhost-vdpa", "l2tpv3", "vde"):
            why.append(f"network backend {kind} can be attached to one QEMU at a time")
        elif props.get("hostfwd") or props.get("listen"):
            why.append("a network backend listens on a host port held by the running QEMU")
    for opt in qargv.options(argv, "chardev"):
        value = opt.value or ""
        if "port=" in value and _is_server(value) and chardev_port(value) is None:
            why.append(f"TCP server chardev {value.split(',', 1)[0]!r} has no fixed port to hand over")
    for opt in qargv.options(argv, "qmp", "monitor", "serial", "parallel"):
        value = opt.value or ""
        served = value.split(":", 1)[0] in ("tcp", "telnet") and _is_server(value)
        if served and (tcp_port(value) is None or opt.name == "parallel"):
            why.append(f"-{opt.name} {value.split(',', 1)[0]} cannot be handed over")
    for opt in qargv.options(argv, "vnc"):
        value = opt.value or ""
        props = qargv.split_keyval(value, "vnc")
        if props.get("vnc", "").startswith("unix:") or props.get("websocket") or props.get("to"):
            why.append("the VNC server (unix socket, websocket or port range) cannot be handed over")
        elif vnc_port(value) is None and props.get("vnc") != "none":
            why.append(f"the VNC server {props.get('vnc')!r} has no fixed port to hand over")
    if qargv.options(argv, "spice"):
        why.append("a SPICE server port is held by the running QEMU")
    return why


def _tap_problems(props: dict[str, str]) -> list[str]:
    if props.get("vhost", "off") in qargv.TRUE or "vhostfd" in props or "vhostfds" in props:
        return ["tap with vhost=on: the vhost-net fd is not handed over"]
    if "fds" in props or int(props.get("queues", "1") or 1) > 1:
        return ["multiqueue tap: its fds are not handed over"]
    if "fd" in props:
        return []
    if not props.get("ifname"):
        return ["tap without ifname=: its device cannot be found in the running QEMU"]
    if props.get("downscript") != "no":
        return [f"tap {props['ifname']} has a downscript the old QEMU would run on exit (set downscript=no)"]
    return []


def _is_server(value: str) -> bool:
    return bool(re.search(r"(^|,)server(=(on|yes|true|y))?(,|$)", value))


def hand_over(pid: int, argv: Sequence[str], side: str) -> Handover:
    """The argv of a new QEMU that takes the tap devices and TCP servers of QEMU *pid*, with their fds.

    *side* is a unix socket path the new VNC server waits on until `Handover.vnc_fd` is given to it.

    :raise HandoverError: when a resource cannot be found or taken (the fds taken so far are closed).
    """
    out = Handover(list(argv))
    try:
        _take(pid, out, side)
    except BaseException:
        out.close()
        if out.vnc is not None:
            out.vnc.close()
        raise
    return out


def _take(pid: int, out: Handover, side: str) -> None:
    extra: list[str] = []
    n = 0
    for opt in reversed(qargv.parse(out.argv)):  # reversed: rewrites keep earlier indexes valid
        value = opt.value or ""
        if opt.name in ("netdev", "nic", "net") and (props := qargv.split_keyval(value, "type")).get("type") == "tap":
            target = int(props["fd"]) if "fd" in props else tap_fd(pid, props["ifname"])
            fd = out._add(getfd(pid, target))
            keep = {k: v for k, v in props.items() if k not in _TAP_KEYS}
            out.argv[opt.index + 1] = ",".join(["tap", f"fd={fd}", *(f"{k}={v}" for k, v in keep.items())])
        elif opt.name == "chardev" and (port := chardev_port(value)) is not None:
            fd = out._add(getfd(pid, listening_fd(pid, port)))
            kept = [w for w in _split(value) if w.partition("=")[0] not in _INET_KEYS]
            out.argv[opt.index + 1] = ",".join([*kept, f"fd={fd}"])
        elif opt.name in ("qmp", "monitor", "serial") and (port := tcp_port(value)) is not None:
            fd = out._add(getfd(pid, listening_fd(pid, port)))
            ident = f"cprctl-fd{n}"
            n += 1
            opts = [w for w in _split(value)[1:] if w.partition("=")[0] not in (*_INET_KEYS, "pretty")]
            telnet = ["telnet=on"] if value.startswith("telnet:") else []
            extra += ["-chardev", ",".join(["socket", f"id={ident}", f"fd={fd}", *telnet, *opts])]
            if opt.name == "serial":
                out.argv[opt.index + 1] = f"chardev:{ident}"
            else:
                del out.argv[opt.index : opt.index + 2]
                extra += ["-mon", f"chardev={ident},mode={_LEGACY_MODE[opt.name]}"]
        elif opt.name == "vnc" and (port := vnc_port(value)) is not None:
            out.vnc = io.FileIO(getfd(pid, listening_fd(pid, port)), "r", closefd=True)
            out.vnc_side = side
            rest = value.split(",", 1)[1:]
            out.argv[opt.index + 1] = ",".join([f"unix:{side}", *rest])
    out.argv += extra


def _split(value: str) -> list[str]:
    """``a,b=c`` split at single commas (``,,`` is a literal comma, kept as it is)."""
    return [w.replace("\0", ",,") for w in value.replace(",,", "\0").split(",")]
