"""What a warm update can hand to the new QEMU, and the argv that receives it (pure; issue 11)."""

from __future__ import annotations

import pytest

from cprctl._checkpoint.plan import warm_blockers
from cprctl._qemu import fds
from cprctl._qemu.argv import served_sockets

Q = "qemu-system-x86_64"


@pytest.mark.parametrize(
    "extra",
    [
        ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"],
        ["-netdev", "tap,id=n0,fd=7"],
        ["-nic", "tap,ifname=tap0,script=no,downscript=no,model=virtio"],
        ["-vnc", "127.0.0.1:5,password=on"],
        ["-vnc", "none"],
        ["-chardev", "socket,id=c0,host=127.0.0.1,port=4444,server=on,wait=off"],
        ["-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"],
        ["-monitor", "telnet:127.0.0.1:4445,server,nowait"],
        ["-serial", "tcp::4446,server=on,wait=off"],
        ["-pidfile", "/run/q.pid"],
        ["-chardev", "socket,id=c1,host=127.0.0.1,port=4444"],  # a client: nothing held
    ],
)
def test_handed_over_resources_do_not_block_a_warm_update(extra: list[str]) -> None:
    assert warm_blockers([Q, "-m", "1G", *extra]) == []


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["-netdev", "tap,id=n0,ifname=tap0,script=no"], "downscript"),
        (["-netdev", "tap,id=n0,ifname=tap0,downscript=no,vhost=on"], "vhost"),
        (["-netdev", "tap,id=n0,ifname=tap0,downscript=no,queues=4"], "multiqueue"),
        (["-netdev", "tap,id=n0,downscript=no"], "ifname"),
        (["-netdev", "bridge,id=n0,br=br0"], "bridge"),
        (["-netdev", "user,id=n0,hostfwd=tcp::2222-:22"], "host port"),
        (["-vnc", "unix:/run/vnc.sock"], "VNC"),
        (["-vnc", ":1,websocket=5701"], "VNC"),
        (["-spice", "port=5930"], "SPICE"),
        (["-chardev", "socket,id=c0,port=0,server=on"], "no fixed port"),
    ],
)
def test_what_cannot_be_handed_over_is_named(extra: list[str], why: str) -> None:
    found = warm_blockers([Q, *extra])
    assert len(found) == 1 and why in found[0], found


def test_ports() -> None:
    assert fds.vnc_port("127.0.0.1:5,password=on") == 5905
    assert fds.vnc_port(":0") == 5900
    assert fds.vnc_port("none") is None
    assert fds.tcp_port("tcp:127.0.0.1:4444,server=on,wait=off") == 4444
    assert fds.tcp_port("tcp:127.0.0.1:4444") is None  # a client
    assert fds.chardev_port("socket,id=c,host=::1,port=99,server=on") == 99


def test_the_pidfile_moves_with_the_served_sockets() -> None:
    assert served_sockets([Q, "-pidfile", "/run/q.pid", "-qmp", "unix:/run/q.sock,server=on"]) == [
        "/run/q.sock",
        "/run/q.pid",
    ]


def test_a_socket_the_running_qemu_does_not_hold_is_refused_and_nothing_leaks() -> None:
    import os
    import socket

    from cprctl._qemu.fds import HandoverError, hand_over

    with socket.socket() as s:  # this process listens on a port; the "QEMU" (our pid) holds it once
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        before = len(os.listdir("/proc/self/fd"))
        got = hand_over(os.getpid(), [Q, "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"], "/tmp/x.sock")
        fd = got.fds[0]
        assert got.argv[1:] == [
            *("-chardev", f"socket,id=cprctl-fd0,fd={fd},server=on,wait=off"),
            *("-mon", "chardev=cprctl-fd0,mode=control"),
        ]
        got.close()
        assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(HandoverError, match="0 sockets listening"):  # closed now: nothing listens there
        hand_over(os.getpid(), [Q, "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"], "/tmp/x.sock")
    assert len(os.listdir("/proc/self/fd")) == before - 1
