"""Binary compatibility (pure): what a QEMU binary lacks to take a VM, and reading its help listings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cprctl._checkpoint.compat import (
    QueueMismatch,
    binary_findings,
    firmware,
    handover_mode,
    queue_args,
    queue_mismatches,
    size_property,
    transfer_blockers,
)
from cprctl._qemu.probe import BinaryInfo, devices, machines, migration_schema
from cprctl._qemu.virtio import VirtioDevice
from cprctl.errors import CheckFailed

ARGV = [
    "/usr/bin/qemu-system-x86_64",
    "-machine",
    "pc-q35-10.0,memory-backend=ram0",
    "-cpu",
    "max,+pdpe1gb",
    "-object",
    "memory-backend-file,id=ram0,size=1G,mem-path=/x,share=on",
    "-netdev",
    "user,id=n0",
    "-nic",
    "tap,ifname=t0",
    "-device",
    "virtio-net-pci,netdev=n0",
    "-kernel",
    "vmlinuz",
]
CAPS = {"x-ignore-shared": True, "mapped-ram": False, "multifd": False}
PARAMS = {"mode": "cpr-reboot", "max-bandwidth": 1 << 40, "direct-io": False}


def info(tmp: Path, **over: object) -> BinaryInfo:
    base: dict[str, object] = dict(
        path="/opt/q",
        version=(10, 0, 2),
        machines=frozenset({"pc-q35-10.0", "q35"}),
        devices=frozenset({"virtio-net-pci"}),
        objects=frozenset({"memory-backend-file"}),
        netdevs=frozenset({"user", "tap"}),
        cpus=frozenset({"max", "host"}),
        datadirs=(str(tmp),),
        modes=frozenset({"normal", "cpr-reboot"}),
        capabilities=frozenset(CAPS),
        parameters=frozenset(PARAMS),
    )
    return BinaryInfo(**{**base, **over})  # type: ignore[arg-type]


def lacks(tmp: Path, **over: object) -> list[str]:
    (tmp / "bios-256k.bin").touch()
    (tmp / "vmlinuz").touch()
    return [f.message for f in binary_findings(info(tmp, **over), ARGV, "pc-q35-10.0", CAPS, PARAMS, str(tmp))]


def test_a_binary_with_everything_takes_the_vm(tmp_path: Path) -> None:
    assert lacks(tmp_path) == []


def test_each_missing_piece_is_named(tmp_path: Path) -> None:
    assert lacks(tmp_path, machines=frozenset({"q35"})) == ["/opt/q lacks machine type pc-q35-10.0"]
    assert lacks(tmp_path, devices=frozenset()) == ["/opt/q lacks device virtio-net-pci"]
    assert lacks(tmp_path, objects=frozenset()) == ["/opt/q lacks object type memory-backend-file"]
    assert lacks(tmp_path, netdevs=frozenset({"user"})) == ["/opt/q lacks network backend tap"]
    assert lacks(tmp_path, cpus=frozenset({"host"})) == ["/opt/q lacks CPU model max"]
    assert lacks(tmp_path, modes=frozenset({"normal"})) == ["/opt/q has no migration mode cpr-reboot"]
    assert lacks(tmp_path, parameters=frozenset({"mode", "max-bandwidth"})) == [
        "/opt/q lacks migration parameter direct-io"
    ]
    assert lacks(tmp_path, capabilities=frozenset({"x-ignore-shared"})) == [
        "/opt/q lacks migration capability mapped-ram",
        "/opt/q lacks migration capability multifd",
    ]
    assert lacks(tmp_path, version=(8, 2, 0)) == ["/opt/q is QEMU 8.2.0; cpr-reboot needs QEMU >= 9.0"]


def test_missing_firmware_and_kernel_are_named(tmp_path: Path) -> None:
    found = binary_findings(info(tmp_path), ARGV, "pc-q35-10.0", CAPS, PARAMS, str(tmp_path))
    assert [f.message for f in found] == [
        f"/opt/q would not find {tmp_path}/vmlinuz",
        f"/opt/q would not find {tmp_path}/bios-256k.bin",
    ]
    assert all(f.blocking for f in found)


def test_firmware_paths() -> None:
    argv = [
        "/x/qemu-system-aarch64",
        "-bios",
        "edk2.fd",
        "-drive",
        "if=pflash,file=vars.fd",
        "-device",
        "e1000,romfile=/r/e.rom",
    ]
    assert firmware(argv, ("/usr/share/qemu",), "/vm") == ["/usr/share/qemu/edk2.fd", "/vm/vars.fd", "/r/e.rom"]


def test_help_listings() -> None:
    text = 'Network devices:\nname "virtio-net-pci", bus PCI, alias "virtio-net"\nname "e1000", bus PCI\n'
    assert devices(text) == {"virtio-net-pci", "virtio-net", "e1000"}
    text = (
        "Supported machines are:\nq35                  Standard PC (alias of pc-q35-10.0)\npc-q35-10.0  Standard PC\n"
    )
    assert machines(text) == {"q35", "pc-q35-10.0"}


def test_migration_schema() -> None:
    schema = [
        {"name": "1", "meta-type": "enum", "values": ["normal", "cpr-reboot", "cpr-transfer"]},
        {"name": "2", "meta-type": "enum", "values": ["xbzrle", "x-ignore-shared"]},
        {"name": "migrate-set-parameters", "meta-type": "command", "arg-type": "3"},
        {"name": "3", "meta-type": "object", "members": [{"name": "mode"}, {"name": "direct-io"}]},
    ]
    modes, caps, params = migration_schema(schema)
    assert modes == {"normal", "cpr-reboot", "cpr-transfer"}
    assert caps == {"xbzrle", "x-ignore-shared"} and params == {"mode", "direct-io"}


# Queue sizes as measured: Debian 13's QEMU 10.0.13 allocates 1024 entries for every virtqueue, 11.1.3 what
# the properties say (virtio-blk 256; virtio-serial 128 for data, 32 for control; virtio-net 256, 256, 64).
BLK = "/machine/peripheral/blk0/virtio-backend"
SER = "/machine/peripheral-anon/device[1]/virtio-backend"
NET = "/machine/peripheral/net0/virtio-backend"


def test_queue_mismatches_name_each_larger_queue_and_the_property_that_sizes_it() -> None:
    old = [
        VirtioDevice(BLK, "virtio-blk-device", (1024,), (1024,)),
        VirtioDevice(SER, "virtio-serial-device", (1024, 1024), (1024, 1024)),
        VirtioDevice(NET, "virtio-net-device", (1024, 1024, 1024), (1024, 1024, 1024)),
    ]
    new = [
        VirtioDevice(BLK, "virtio-blk-device", (256,), (256,)),
        VirtioDevice(SER, "virtio-serial-device", (128, 32), (128, 32)),
        VirtioDevice(NET, "virtio-net-device", (256, 256, 64), (256, 256, 64)),
    ]
    found = queue_mismatches(old, new)
    got = [(m.device, m.queue, m.size, m.maximum, m.prop) for m in found]
    assert got == [
        ("blk0", 0, 1024, 256, "queue-size"),
        (SER.removesuffix("/virtio-backend"), 0, 1024, 128, None),
        (SER.removesuffix("/virtio-backend"), 1, 1024, 32, None),
        ("net0", 0, 1024, 256, "rx_queue_size"),
        ("net0", 1, 1024, 256, "tx_queue_size"),
        ("net0", 2, 1024, 64, None),
    ]
    assert queue_mismatches(new, old) == [], "smaller queues load"
    assert queue_mismatches(old, []) == [], "a device the new QEMU lacks is QEMU's to name"


def test_queue_args_add_a_global_per_property_then_refuse_what_they_cannot_raise() -> None:
    blk = QueueMismatch("blk0", "virtio-blk-device", 0, 1024, 256, "queue-size")
    args = queue_args("vm", "/q11", [blk], [])
    assert args == ["-global", "virtio-blk-device.queue-size=1024"]
    assert queue_args("vm", "/q11", [blk], ["-global", "ICH9-LPC.disable_s3=0"]) == [
        "-global",
        "ICH9-LPC.disable_s3=0",
        *args,
    ]
    with pytest.raises(CheckFailed, match=r"virtio-blk-device.queue-size=1024 does not raise it"):
        queue_args("vm", "/q11", [blk], args)  # tried already: the build caps it
    ser = QueueMismatch("agent", "virtio-serial-device", 0, 1024, 128, None)
    with pytest.raises(CheckFailed) as refused:
        queue_args("vm", "/q11", [blk, ser], [])
    text = str(refused.value)
    assert "\n" not in text and "virtio-serial-device agent: its queue 0 has 1024 entries" in text
    assert "/q11 allocates 128 and no property sizes that queue" in text
    assert (
        size_property("virtio-net-device", 4, 5) is None and size_property("virtio-net-device", 4, 6) == "rx_queue_size"
    )


def test_firmware_of_a_binary_in_another_root_is_looked_for_there(tmp_path: Path) -> None:
    (tmp_path / "usr/share/seabios").mkdir(parents=True)
    (tmp_path / "usr/share/seabios/bios-256k.bin").write_bytes(b"")
    dirs = ("/usr/share/qemu", "/usr/share/seabios")
    argv = ["/w/qemu-system-x86_64", "-kernel", "/k/vmlinuz"]
    assert firmware(argv, dirs, "/", str(tmp_path)) == [
        "/k/vmlinuz",  # the host's path (a wrapper binds it in)
        str(tmp_path / "usr/share/seabios/bios-256k.bin"),
    ]


XFER = ["q", "-machine", "pc-q35-10.0,aux-ram-share=on", "-object", "memory-backend-memfd,id=m0,size=1G"]
XFER += ["-machine", "memory-backend=m0"]


def test_cpr_transfer_needs_the_mode_in_both_qemus_and_every_ram_block_shared(tmp_path: Path) -> None:
    new = info(tmp_path, modes=frozenset({"normal", "cpr-reboot", "cpr-transfer"}))
    assert transfer_blockers(XFER, (10, 0, 2), new) == []
    assert transfer_blockers(XFER, (9, 2, 0), new) == ["the running QEMU 9.2.0 has no cpr-transfer (QEMU >= 10.0)"]
    assert transfer_blockers(XFER, (10, 0, 2), info(tmp_path)) == ["/opt/q has no cpr-transfer"]
    no_aux = [w.replace(",aux-ram-share=on", "") for w in XFER]
    assert transfer_blockers(no_aux, (10, 0, 2), new) == ["the VM was started without -machine aux-ram-share=on"]
    private = [w.replace("memfd,", "ram,") for w in XFER]
    assert transfer_blockers(private, (10, 0, 2), new) == ["RAM backend 'm0' is not share=on"]
    plain = ["q", "-machine", "q35,aux-ram-share=on", "-m", "1G"]
    assert transfer_blockers(plain, (10, 0, 2), new) == ["its main RAM is not a memory backend with share=on"]
    assert "suspended" in transfer_blockers(XFER, (10, 0, 2), new, suspend=True)[0]


def test_auto_takes_cpr_transfer_wherever_it_can_run() -> None:
    assert handover_mode("auto", []) == ("cpr-transfer", None)
    assert handover_mode("cpr-transfer", []) == ("cpr-transfer", None)
    assert handover_mode("standby", []) == ("standby", None)
    assert handover_mode("auto", ["no aux"]) == ("standby", "no aux")  # update reports it only when asked
    assert handover_mode("cpr-transfer", ["no aux", "private"]) == ("standby", "no aux; private")
