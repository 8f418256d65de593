"""Pre-copy for a warm update: RAM that is not in a named shared file moves while the guest runs.

A cpr-reboot migration stops the guest before it sends anything, so over a
socket it copies every page of anonymous, memfd or private RAM with the guest
stopped (3 s for 2 GiB here). QEMU's normal mode instead copies RAM while the
guest runs, pass after pass over the pages dirtied meanwhile, and stops the
guest only when what is left fits ``downtime-limit``.

What QEMU's source says (migration/ram.c ``migrate_ram_is_ignored``,
migration/migration.c): ``x-ignore-shared`` skips a block that is shared and
a named file *whatever the mode*, so RAM in shared files stays in place in
normal mode too (both QEMUs map the same file; the incoming one writes no RAM
while ``inmigrate``, and the outgoing one stops at the switch-over). Only
cpr modes stop the VM when the migration starts; normal mode stops it at the
switch-over. Both modes are therefore safe for ``memory-backend-file,share=on``;
cpr-reboot stays the path when *all* RAM is in place (nothing to pre-copy, and
it measured 5-13 ms).

``cpr-transfer`` (QEMU >= 10.0: RAM in memfd or ``aux-ram-share`` handed over as fds, nothing
copied) is not used: like every cpr mode it stops the guest when the migration starts
(docs/devel/migration/CPR.rst: "CPR unconditionally stops VM execution before memory is saved"),
and the new QEMU finishes creating its devices only once it has the fds, so that start-up falls
inside the pause; pre-copy keeps the guest running through all of it and pauses ~10 ms here.

Convergence: ``auto-converge`` throttles the vCPUs of a guest that dirties
faster than the socket carries. If it still has not converged after
`MAX_PASSES` dirty-bitmap passes or `MAX_PRECOPY_S` seconds, ``downtime-limit``
is raised so QEMU finishes with the guest stopped (stop-and-copy of what is
left); the result says so and how long the stop was.
"""

from __future__ import annotations

import time
from typing import Any

from .._qemu.qmp import Monitor
from .plan import Facts, Plan, ram_in_place
from .report import Reporter

#: The guest pause a pre-copy aims at (``downtime-limit``, ms).
TARGET_PAUSE_MS = 50
#: Bounds on pre-copy before it is let finish with the guest stopped.
MAX_PASSES = 30
MAX_PRECOPY_S = 120.0
#: ``downtime-limit`` once pre-copy gave up converging (QEMU's maximum: 2000 s).
STOP_AND_COPY_MS = 2_000_000
#: The whole migration, pre-copy and stop-and-copy, as for the in-place handover.
MIGRATION_TIMEOUT_S = 3600.0
#: Warm-update pause measured here with all RAM in place (benchmarks/RESULTS.md).
IN_PLACE_PAUSE = "5-15 ms"


def precopy_plan(plan: Plan) -> Plan:
    """*plan* (a socket plan that streams RAM) as a normal-mode pre-copy aiming at `TARGET_PAUSE_MS`."""
    caps = {**plan.capabilities, "auto-converge": True}
    params = {**plan.parameters, "mode": "normal", "downtime-limit": TARGET_PAUSE_MS}
    return Plan(plan.strategy, plan.suspend, caps, params, plan.expected_bytes)


def is_precopy(plan: Plan) -> bool:
    return plan.parameters.get("mode") == "normal"


def incoming_side(plan: Plan) -> tuple[dict[str, bool], dict[str, Any]]:
    """The capabilities and parameters the incoming QEMU gets: only those both ends must agree on."""
    caps = {k: v for k, v in plan.capabilities.items() if k != "auto-converge"}
    params = {k: v for k, v in plan.parameters.items() if k not in ("max-bandwidth", "downtime-limit")}
    return caps, params


def warm_path(facts: Facts) -> str:
    """Which warm path ``update`` takes for *facts*, and the pause to expect (for ``check``)."""
    if ram_in_place(facts):
        return f"RAM stays in place (cpr-reboot, x-ignore-shared); pause ~{IN_PLACE_PAUSE} (device state only)"
    moved = sum(r.bytes for r in facts.ram if not r.in_place) or facts.ram_bytes
    return (
        f"{moved / (1 << 20):.0f} MiB of RAM not in a shared file is pre-copied while the guest runs "
        f"(normal mode, auto-converge); pause target {TARGET_PAUSE_MS} ms, more if the guest dirties RAM "
        f"faster than it can be copied for {MAX_PRECOPY_S:.0f} s"
    )


async def run(old: Monitor, reporter: Reporter, name: str) -> dict[str, float]:
    """Wait for the pre-copy migration *old* runs to complete, forcing stop-and-copy when it will not converge.

    Figures: ``precopy`` (ms from start to completion), ``passes``, ``downtime``
    (QEMU's own), ``stop_and_copy`` (1 when the bound was hit).

    :raise MigrationError: when the migration fails (the old QEMU then runs the guest again).
    """
    t = time.monotonic()
    forced = False

    async def converging(info: dict[str, Any]) -> None:
        nonlocal forced
        passes = int(info.get("ram", {}).get("dirty-sync-count", 0))
        if not forced and (passes > MAX_PASSES or time.monotonic() - t > MAX_PRECOPY_S):
            forced = True
            left = info.get("ram", {}).get("remaining", 0)
            reporter.step(
                f"{name}: pre-copy did not converge to {TARGET_PAUSE_MS} ms after {passes} passes; "
                f"finishing with the guest stopped ({left / (1 << 20):.0f} MiB left)"
            )
            await old.execute("migrate-set-parameters", {"downtime-limit": STOP_AND_COPY_MS})

    info = await old.wait_migration(MIGRATION_TIMEOUT_S, on_progress=converging)
    ram = info.get("ram", {})
    return {
        "precopy": (time.monotonic() - t) * 1000,
        "passes": float(ram.get("dirty-sync-count", 0)),
        "downtime": float(info.get("downtime", 0)),
        "stop_and_copy": 1.0 if forced else 0.0,
    }
