"""``restore-all`` as cprctl-guests.service runs it at boot: ``python -m cprctl._boot restore-all``.

It is ``cprctl restore-all`` under a unit, without the command line's machinery. Python's start-up is
part of every guest's downtime at boot (the timeline's ``queue_python``, benchmarks/reboot.py), and click
and the CLI (`cprctl.cli`) are about a sixth of the imports before the first restore; this entry imports
what the restores need and no more. Its output is the CLI's under a unit: a line per step (the journal)
and the unit's ``STATUS=`` (`systemd.Notifier`), exit 1 unless every VM came back, and on a `CprctlError`
one line and its exit status. The unit falls back to ``cprctl restore-all`` where the ``cprctl`` command's
python is not known (`cprctl._units`).
"""

from __future__ import annotations

import signal
import sys

USAGE = "usage: python -m cprctl._boot restore-all (cprctl-guests.service's start; by hand: cprctl restore-all)"
#: What an interrupted command says (Ctrl-C or SIGTERM), here and in the CLI (`cprctl.cli.run`).
INTERRUPTED = "cprctl: interrupted; the operation was rolled back or kept restorable (see 'cprctl status')"


def interrupt_on_sigterm() -> None:
    """Make SIGTERM a KeyboardInterrupt, as Ctrl-C: the operation under way rolls back, then exit 130."""
    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str] | None = None) -> int:
    """Restore every saved VM as the unit does at boot; the exit status."""
    if (sys.argv[1:] if argv is None else argv) != ["restore-all"]:
        print(USAGE, file=sys.stderr)
        return 2
    from . import _api
    from ._checkpoint.fleet import summary
    from ._host import systemd
    from .errors import CprctlError

    interrupt_on_sigterm()
    rep = systemd.Notifier()
    try:
        outcomes = _api.restore_all(reporter=rep)
    except CprctlError as exc:
        print(f"cprctl: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(INTERRUPTED)
        return 130
    rep.status(summary(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
