"""Unit tests of the pure argv analysis (no QEMU)."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from cprctl._qemu import argv as qa

Q = "/usr/bin/qemu-system-x86_64"


def test_parse_flags_and_values() -> None:
    opts = qa.parse([Q, "-nographic", "-m", "512M", "disk.img", "--machine", "q35"])
    assert [(o.name, o.value) for o in opts] == [
        ("nographic", None),
        ("m", "512M"),
        ("", "disk.img"),
        ("machine", "q35"),
    ]


def test_keyval_escaped_comma_and_implied_key() -> None:
    assert qa.split_keyval("file,id=r,mem-path=/a,,b,share=on", "qom-type") == {
        "qom-type": "file",
        "id": "r",
        "mem-path": "/a,b",
        "share": "on",
    }


def test_keyval_json_object() -> None:
    props = qa.split_keyval('{"qom-type":"memory-backend-file","id":"m","share":true,"size":1024}', "qom-type")
    assert props == {"qom-type": "memory-backend-file", "id": "m", "share": "on", "size": "1024"}


def test_machine_type_forms() -> None:
    assert qa.machine_type([Q, "-M", "q35"]) == "q35"
    assert qa.machine_type([Q, "-machine", "type=pc,accel=tcg"]) == "pc"
    assert qa.machine_type([Q, "-machine", "accel=tcg"]) is None
    assert qa.machine_type([Q, "-m", "1G"]) is None
    assert qa.machine_type([Q, "-machine", "q35", "-machine", "pc-q35-9.0,accel=tcg"]) == "pc-q35-9.0"


def test_pin_machine_type() -> None:
    assert qa.with_machine_type([Q, "-machine", "q35,accel=tcg"], "pc-q35-10.0") == [
        Q,
        "-machine",
        "pc-q35-10.0,accel=tcg",
    ]
    assert qa.with_machine_type([Q, "-machine", "accel=tcg,type=q35"], "pc-q35-10.0") == [
        Q,
        "-machine",
        "accel=tcg,type=pc-q35-10.0",
    ]
    assert qa.with_machine_type([Q, "-machine", "accel=tcg"], "pc-i440fx-10.0") == [
        Q,
        "-machine",
        "pc-i440fx-10.0,accel=tcg",
    ]
    assert qa.with_machine_type([Q, "-m", "1G"], "pc-i440fx-10.0") == [Q, "-machine", "pc-i440fx-10.0", "-m", "1G"]
    # the pinned type is found again
    pinned = qa.with_machine_type([Q, "-M", "q35", "-machine", "memory-backend=r"], "pc-q35-10.0")
    assert qa.machine_type(pinned) == "pc-q35-10.0"


def test_ram_layout_shared_file_is_in_place_candidate() -> None:
    argv = [
        Q,
        "-m",
        "1G",
        "-object",
        "memory-backend-file,id=ram0,size=1G,mem-path=/dev/shm/vm,share=on",
        "-machine",
        "q35,memory-backend=ram0",
    ]
    (b,) = qa.ram_layout(argv).backends
    assert b == qa.RamBackend("ram0", "file", True, "/dev/shm/vm", "1G")
    assert b.named_shared_file


def test_ram_layout_default_ram_is_anonymous() -> None:
    (b,) = qa.ram_layout([Q, "-m", "1G"]).backends
    assert b.kind == "default" and not b.named_shared_file


def test_ram_layout_backend_not_used_as_main_ram_adds_default() -> None:
    argv = [Q, "-object", "memory-backend-file,id=d,size=1G,mem-path=/x,share=on"]
    kinds = [b.kind for b in qa.ram_layout(argv).backends]
    assert kinds == ["default", "file"]


def test_ram_layout_numa_memdevs_and_memfd() -> None:
    argv = [
        Q,
        "-object",
        "memory-backend-memfd,id=a,size=1G",
        "-object",
        "memory-backend-file,id=b,size=1G,mem-path=/f,share=off",
        "-numa",
        "node,memdev=a",
        "-numa",
        "node,memdev=b",
    ]
    backends = qa.ram_layout(argv).backends
    assert [(b.id, b.kind, b.share) for b in backends] == [("a", "memfd", True), ("b", "file", False)]
    assert not any(b.named_shared_file for b in backends)


def test_legacy_mem_path_is_private() -> None:
    (b,) = qa.ram_layout([Q, "-m", "1G", "-mem-path", "/hugepages"]).backends
    assert b.kind == "mem-path" and not b.named_shared_file


def test_qmp_socket_detection() -> None:
    assert qa.qmp_socket([Q, "-qmp", "unix:/run/q.sock,server=on,wait=off"]) == "/run/q.sock"
    assert qa.qmp_socket([Q, "-qmp", "unix:/run/q.sock,server,nowait"]) == "/run/q.sock"
    assert qa.qmp_socket([Q, "-qmp", "tcp:127.0.0.1:4444,server=on"]) is None
    argv = [Q, *qa.qmp_args("/s/qmp.sock")]
    assert qa.qmp_socket(argv) == "/s/qmp.sock"
    assert qa.qmp_socket([Q, "-chardev", "socket,id=c,path=/x,server=on", "-mon", "chardev=c,mode=readline"]) is None


def test_agent_socket_roundtrip() -> None:
    assert qa.agent_socket([Q, *qa.agent_args("/s/qga.sock")]) == "/s/qga.sock"
    assert qa.agent_socket([Q, "-m", "1G"]) is None


def test_vfio_and_s3() -> None:
    assert qa.has_vfio([Q, "-device", "vfio-pci,host=0000:01:00.0"])
    assert not qa.has_vfio([Q, "-device", "virtio-net-pci"])
    assert qa.s3_enabled([Q, "-global", "ICH9-LPC.disable_s3=0"])
    assert not qa.s3_enabled([Q, "-global", "ICH9-LPC.disable_s3=1"])
    assert not qa.s3_enabled([Q])


def test_incoming_replaces_old_incoming_and_daemonize() -> None:
    argv = [Q, "-daemonize", "-m", "1G", "-incoming", "tcp:0:4444"]
    assert qa.incoming(argv) == [Q, "-m", "1G", "-incoming", "defer"]


_word = st.text(string.ascii_letters + string.digits + "-_=,./:", min_size=0, max_size=12)


@given(st.lists(_word, max_size=12))
def test_parse_never_crashes_and_indexes_are_in_range(words: list[str]) -> None:
    argv = [Q, *words]
    for opt in qa.parse(argv):
        assert 1 <= opt.index < len(argv)
    qa.ram_layout(argv)
    qa.machine_type(argv)
    qa.qmp_socket(argv)


@given(st.lists(_word, max_size=10), st.sampled_from(["pc-q35-10.0", "pc-i440fx-9.2"]))
def test_pinning_is_idempotent_and_found(words: list[str], machine: str) -> None:
    argv = [Q, *[w for w in words if not w.startswith("-")]]
    pinned = qa.with_machine_type(argv, machine)
    assert qa.machine_type(pinned) == machine
    assert qa.with_machine_type(pinned, machine) == pinned


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z-]{0,8}", fullmatch=True),
        st.text(string.ascii_letters + string.digits + ",/.", max_size=10),
        max_size=5,
    )
)
def test_keyval_roundtrips_with_escaped_commas(props: dict[str, str]) -> None:
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in props.items())
    assert qa.split_keyval(text, "implied") == props if props else True


def test_discard_data_backend_cannot_stay_in_place() -> None:
    argv = [
        Q,
        "-object",
        "memory-backend-file,id=r,size=1G,mem-path=/f,share=on,discard-data=on,prealloc=on",
        "-machine",
        "memory-backend=r",
    ]
    (b,) = qa.ram_layout(argv).backends
    assert b.discard and b.prealloc and not b.named_shared_file


def test_served_sockets_cover_qmp_monitor_agent_and_console() -> None:
    argv = [
        Q,
        *qa.qmp_args("/s/qmp.sock"),
        *qa.agent_args("/s/qga.sock"),
        "-monitor",
        "unix:/s/mon,server=on",
        "-serial",
        "unix:/s/con,server,nowait",
        "-chardev",
        "socket,id=c,path=/s/client",
    ]
    assert sorted(qa.served_sockets(argv)) == ["/s/con", "/s/mon", "/s/qga.sock", "/s/qmp.sock"]


def test_uefi_firmware() -> None:
    assert not qa.uefi_firmware(["qemu", "-machine", "q35"])
    assert qa.uefi_firmware(["qemu", "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"])
    assert qa.uefi_firmware(["qemu", "-machine", "q35,pflash0=code"])
    assert qa.uefi_firmware(["qemu", "-bios", "/usr/share/ovmf/OVMF.fd"])
    assert not qa.uefi_firmware(["qemu", "-bios", "/usr/share/seabios/bios-256k.bin"])
