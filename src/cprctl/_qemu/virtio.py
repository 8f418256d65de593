"""What a running QEMU's virtio devices really have: the size of each virtqueue, and the most it allocated.

A device's queue sizes are migrated (``vring.num`` per queue) and a QEMU that
loads them refuses any larger than what it allocated for that queue
(``vring.num_default``; QEMU >= 11 checks it). Machine-type compatibility does
not pin the allocation across builds: Debian 13's QEMU 10.0.13 allocates 1024
entries for every virtqueue whatever the device's properties say (its
``queue-size`` still reads 256), where 10.0.2 and 11.1 allocate the
properties' values (virtio-blk 256, virtio-serial 128...). So the real sizes
are asked here, of the QEMU itself (``x-query-virtio*``), not read from QOM
properties.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from ..errors import QemuError
from .qmp import Monitor

#: QEMU's VIRTIO_QUEUE_MAX: no device has more queues.
VIRTIO_QUEUE_MAX = 1024
#: Queues asked at once (QEMU takes up to 8 commands in flight on a monitor before it stops reading).
QUEUES_AT_ONCE = 8


class VirtioDevice(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One virtio device of a QEMU: its backend's QOM path and type, and per virtqueue its size and maximum."""

    path: str
    qom_type: str
    #: ``vring.num`` of each queue (what the guest runs with; migrated).
    sizes: tuple[int, ...]
    #: ``vring.num_default`` of each queue (what this QEMU allocated: the most it loads).
    maxima: tuple[int, ...]

    @property
    def device(self) -> str:
        """The device as an operator names it: its ``id`` when it has one, else its QOM path."""
        parent = self.path.removesuffix("/virtio-backend")
        head, _, last = parent.rpartition("/")
        return last if head == "/machine/peripheral" else parent


async def devices(mon: Monitor) -> list[VirtioDevice]:
    """The virtio devices of the QEMU behind *mon*, with their queues (none when it cannot say).

    :raise QemuError: when QEMU fails a query it offers.
    """
    try:
        listed = await mon.execute("x-query-virtio")
    except QemuError as exc:
        # QEMU without the command, or one whose VM has no virtio device (it says so as an error).
        if exc.error_class == "CommandNotFound" or "No virtio devices found" in str(exc):
            return []
        raise
    return list(await asyncio.gather(*(_device(mon, d["path"]) for d in listed)))


async def _device(mon: Monitor, path: str) -> VirtioDevice:
    """One device's queues, asked queue by queue until QEMU says there is no such queue.

    Not ``x-query-virtio-status`` (which counts them): QEMU 11.1.3 aborts on it
    (``visit_start_struct: Assertion ... failed``), killing the VM.
    """
    qom_type = await mon.execute("qom-get", {"path": path, "property": "type"})
    sizes: list[int] = []
    maxima: list[int] = []
    for first in range(0, VIRTIO_QUEUE_MAX, QUEUES_AT_ONCE):
        # Asked QUEUES_AT_ONCE at a time (a virtio-serial device has 64 queues): the round trips overlap.
        batch = range(first, min(first + QUEUES_AT_ONCE, VIRTIO_QUEUE_MAX))
        answers = await asyncio.gather(*(_queue(mon, path, q) for q in batch))
        for q in answers:
            if q is None:
                return VirtioDevice(path, str(qom_type), tuple(sizes), tuple(maxima))
            sizes.append(int(q["vring-num"]))
            maxima.append(int(q["vring-num-default"]))
    return VirtioDevice(path, str(qom_type), tuple(sizes), tuple(maxima))


async def _queue(mon: Monitor, path: str, queue: int) -> dict[str, Any] | None:
    """Queue *queue* of the device at *path*, or None past its last queue."""
    try:
        answer: dict[str, Any] = await mon.execute("x-query-virtio-queue-status", {"path": path, "queue": queue})
    except QemuError as exc:
        if exc.error_class == "GenericError":  # "Invalid virtqueue number N": past the last queue
            return None
        raise
    return answer
