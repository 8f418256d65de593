"""Unit tests of reading the ACPI PM block's state from ``info mtree -D`` (no QEMU).

The texts are excerpts of what QEMU 10.0.2 answered here (human-monitor-command, with its CRLF line ends
restored by `qmp_answer`): the test guest (q35, SeaBIOS) after its boot, and after one S3 suspend and
wake; the same guest's text without ``-D``; and a ``-machine pc`` QEMU after SeaBIOS ran.
"""

from __future__ import annotations

from cprctl._qemu.acpi import io_section, pm_block_mapped

BOOTED = """\
    00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi

address-space: I/O
  0000000000000000-000000000000ffff (prio 0, i/o): io
    0000000000000514-000000000000051b (prio 0, i/o): fwcfg.dma
    0000000000000600-000000000000067f (prio 0, i/o): ich9-pm
      0000000000000600-0000000000000603 (prio 0, i/o): acpi-evt
      0000000000000604-0000000000000605 (prio 0, i/o): acpi-cnt
      0000000000000608-000000000000060b (prio 0, i/o): acpi-tmr
      0000000000000620-000000000000062f (prio 0, i/o): acpi-gpe0
      0000000000000630-0000000000000637 (prio 0, i/o): acpi-smi
      0000000000000660-000000000000067f (prio 0, i/o): sm-tco
    0000000000000700-000000000000073f (prio 1, i/o): pm-smbus
    000000000000c080-000000000000c09f (prio 1, i/o): e1000e-io
    000000000000c0a0-000000000000c0bf (prio 1, i/o): ahci-idp

address-space: virtio-pci-cfg-mem-as
  00000000fe000000-00000000fe003fff (prio 1, i/o): virtio-pci
"""

WOKE = """\
    00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi

address-space: I/O
  0000000000000000-000000000000ffff (prio 0, i/o): io
    0000000000000000-000000000000007f (prio 0, i/o): ich9-pm [disabled]
      0000000000000000-0000000000000003 (prio 0, i/o): acpi-evt
      0000000000000004-0000000000000005 (prio 0, i/o): acpi-cnt
      0000000000000008-000000000000000b (prio 0, i/o): acpi-tmr
      0000000000000020-000000000000002f (prio 0, i/o): acpi-gpe0
      0000000000000030-0000000000000037 (prio 0, i/o): acpi-smi
      0000000000000060-000000000000007f (prio 0, i/o): sm-tco
    0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
    0000000000000008-000000000000000f (prio 0, i/o): dma-cont
    000000000000c080-000000000000c09f (prio 1, i/o): e1000e-io
    000000000000c0a0-000000000000c0bf (prio 1, i/o): ahci-idp

address-space: virtio-pci-cfg-mem-as
  00000000fe000000-00000000fe003fff (prio 1, i/o): virtio-pci
"""

#: Plain ``info mtree`` after the wake: the disabled block's own line is left out, its subregions are not.
WOKE_WITHOUT_D = """\
  0000000000000000-ffffffffffffffff (prio 0, i/o): bus master container
    0000000000000000-ffffffffffffffff (prio 0, i/o): alias bus master @system 0000000000000000-ffffffffffffffff

address-space: I/O
  0000000000000000-000000000000ffff (prio 0, i/o): io
      0000000000000000-0000000000000003 (prio 0, i/o): acpi-evt
      0000000000000004-0000000000000005 (prio 0, i/o): acpi-cnt
      0000000000000008-000000000000000b (prio 0, i/o): acpi-tmr
      0000000000000020-000000000000002f (prio 0, i/o): acpi-gpe0
      0000000000000030-0000000000000037 (prio 0, i/o): acpi-smi
      0000000000000060-000000000000007f (prio 0, i/o): sm-tco
    0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
    0000000000000008-000000000000000f (prio 0, i/o): dma-cont
    0000000000000020-0000000000000021 (prio 0, i/o): pic
    000000000000c080-000000000000c09f (prio 1, i/o): e1000e-io
    000000000000c0a0-000000000000c0bf (prio 1, i/o): ahci-idp

address-space: mch
  0000000000000000-ffffffffffffffff (prio 0, i/o): bus master container
"""

PC = """\
  0000000000000000-ffffffffffffffff (prio 0, i/o): bus master container

address-space: I/O
  0000000000000000-000000000000ffff (prio 0, i/o): io
    0000000000000514-000000000000051b (prio 0, i/o): fwcfg.dma
    0000000000000600-000000000000063f (prio 0, i/o): piix4-pm
      0000000000000600-0000000000000603 (prio 0, i/o): acpi-evt
      0000000000000604-0000000000000605 (prio 0, i/o): acpi-cnt
      0000000000000608-000000000000060b (prio 0, i/o): acpi-tmr
    0000000000000700-000000000000073f (prio 0, i/o): pm-smbus
    0000000000000cf8-0000000000000cfb (prio 0, i/o): pci-conf-idx
    0000000000000cf9-0000000000000cf9 (prio 1, i/o): piix-reset-control
    0000000000000cfc-0000000000000cff (prio 0, i/o): pci-conf-data
      000000000000c008-000000000000c00b (prio 0, i/o): piix-bmdma
      000000000000c00c-000000000000c00f (prio 0, i/o): bmdma

address-space: PIIX3
  0000000000000000-ffffffffffffffff (prio 0, i/o): bus master container
"""


def qmp_answer(text: str) -> str:
    """*text* as QMP hands it over: HMP ends its lines with CRLF."""
    return text.replace("\n", "\r\n")


def test_the_block_is_mapped_after_boot() -> None:
    assert pm_block_mapped(qmp_answer(BOOTED)) is True
    assert pm_block_mapped(BOOTED) is True


def test_the_block_is_off_after_a_seabios_s3_wake() -> None:
    assert pm_block_mapped(qmp_answer(WOKE)) is False


def test_unknown_without_the_blocks_own_line() -> None:
    """Plain ``info mtree`` hides a disabled block's line: that reads as unknown, never as mapped."""
    assert pm_block_mapped(qmp_answer(WOKE_WITHOUT_D)) is None


def test_unknown_on_a_machine_without_ich9() -> None:
    assert pm_block_mapped(qmp_answer(PC)) is None


def test_only_the_io_address_space_counts() -> None:
    elsewhere = WOKE.replace("address-space: I/O", "address-space: mch")
    assert pm_block_mapped(elsewhere) is None
    assert pm_block_mapped("") is None
    assert pm_block_mapped("unknown command: 'info mtree -D'\r\n") is None


def test_io_section_ends_at_the_next_address_space() -> None:
    lines = io_section(qmp_answer(BOOTED))
    assert lines[0].endswith("): io") and lines[-1].endswith("): ahci-idp")
    assert len(lines) == 12
