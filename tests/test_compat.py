"""Binary compatibility (pure): what a QEMU binary lacks to take a VM, and reading its help listings."""

from __future__ import annotations

from pathlib import Path

from cprctl._checkpoint.compat import binary_findings, firmware
from cprctl._qemu.probe import BinaryInfo, devices, machines, migration_schema

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
