"""Whether a running guest's ACPI power-management I/O block is decoded, as QEMU's memory map shows it.

On q35 the block is QEMU's ``ich9-pm`` region in the ``I/O`` address space. QEMU enables it, at
PMBASE, when the guest's firmware writes the ICH9 LPC bridge's PMBASE with ACPI_CNTL's enable bit
set, and disables it when ACPI_CNTL is cleared or the bridge is reset (hw/isa/lpc_ich9.c,
hw/acpi/ich9.c ``ich9_pm_iospace_update``). A guest whose block is off cannot enter S3: its sleep
request (PM1a_CNT at PMBASE+4) goes nowhere. SeaBIOS leaves it off after an S3 wake.

Read from the host through HMP ``info mtree -D`` (``-D``: disabled regions too, each marked
``[disabled]``), without touching the guest: about 15 KB and 2 ms here.
"""

from __future__ import annotations

import re

from ..errors import QemuError
from .qmp import Monitor

#: QEMU's name of q35's ACPI PM block (the ICH9 LPC bridge's).
PM_REGION = "ich9-pm"
#: The HMP command: the memory tree with its disabled regions shown.
MTREE = "info mtree -D"

_SECTION = "address-space: I/O"
_REGION = re.compile(
    r"(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \(prio -?\d+, [^)]*\): (?P<name>\S+)(?P<disabled> \[disabled\])?\s*$"
)


def io_section(mtree: str) -> list[str]:
    """The lines of the ``I/O`` address space in *mtree* (``info mtree`` text), its header excluded."""
    lines = mtree.replace("\r\n", "\n").split("\n")
    if _SECTION not in lines:
        return []
    body = lines[lines.index(_SECTION) + 1 :]
    return body[: body.index("")] if "" in body else body


def pm_block_mapped(mtree: str) -> bool | None:
    """Whether *mtree* (``info mtree -D`` text) shows the ACPI PM block mapped in the I/O space.

    None when it does not name the block (a machine without ICH9, e.g. ``pc`` or ``microvm``; a QEMU
    whose text reads otherwise).
    """
    for line in io_section(mtree):
        region = _REGION.search(line)
        if region and region["name"] == PM_REGION:
            return not region["disabled"]
    return None


async def acpi_pm_mapped(mon: Monitor) -> bool | None:
    """Whether the guest's ACPI PM block is decoded now (see `pm_block_mapped`); None when unknown."""
    try:
        text = await mon.execute("human-monitor-command", {"command-line": MTREE}, timeout=10.0)
    except QemuError:
        return None
    return pm_block_mapped(str(text))
