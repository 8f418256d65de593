"""The ``cprctl`` command: a thin shell over the Python API (`cprctl._api`)."""

from __future__ import annotations

import getpass
import json
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from . import _api
from ._boot import INTERRUPTED, interrupt_on_sigterm
from ._host import systemd
from .errors import CheckFailed, CprctlError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from ._checkpoint.fleet import VMOutcome
    from ._checkpoint.reboot import RebootPlan

T = TypeVar("T")
#: The width of a console that is not a terminal: no value is cut.
UNLIMITED_WIDTH = 100_000


class _LazyConsole:
    """A rich `Console`, imported and made on first use: rich costs ~25 ms of start-up, which a
    ``cprctl restore`` would pay inside the guest's pause (its steps are printed with click)."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            console = Console(stderr=self._stderr, highlight=False)
            if not console.is_terminal:
                # Not a terminal (a pipe, a file, the guest agent's guest-exec): rich would cut tables at
                # 80 columns ("cprctl-g…"); whole values instead, each table as wide as its content.
                console.width = UNLIMITED_WIDTH
            self._console = console
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


err = _LazyConsole(stderr=True)
out = _LazyConsole(stderr=False)


class TermReporter:
    """Steps as lines on stderr; progress bars for long saves, verifications and loads on a terminal."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()  # the digest reports from worker threads, the load from the loop

    def step(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"{click.style('•', dim=True)} {message}", err=True)

    def progress(self, done: int, total: int, what: str = "saving") -> None:
        if self.quiet or total < (256 << 20) or not sys.stderr.isatty():
            return
        with self._lock:
            if self._bar is None:
                from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

                self._bar = Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    console=err.get(),
                    transient=True,
                )
                self._bar.start()
            if what not in self._tasks:
                self._tasks[what] = self._bar.add_task(what, total=total)
            self._bar.update(self._tasks[what], completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def fail(exc: CprctlError) -> NoReturn:
    err.print(f"cprctl: error: {exc}", markup=False, soft_wrap=True)
    sys.exit(exc.exit_code)


def run(fn: Callable[[], T]) -> T:
    """Call *fn*; a `CprctlError` becomes one line and its exit status, Ctrl-C or SIGTERM exit 130
    after the operation rolled itself back."""
    interrupt_on_sigterm()
    try:
        return fn()
    except CprctlError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print(INTERRUPTED)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-dir",
    envvar="CPRCTL_STATE_DIR",
    type=click.Path(file_okay=False),
    help="State directory [env CPRCTL_STATE_DIR; default /var/lib/cprctl as root].",
)
@click.version_option(package_name="cprctl")
@click.pass_context
def main(ctx: click.Context, state_dir: str | None) -> None:
    """Checkpoint and restart QEMU VMs with cpr-reboot: update QEMU or reboot the host, keep the guests."""
    ctx.obj = state_dir


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--agent", is_flag=True, help="Add a guest agent channel (qemu-ga) to the VM.")
@click.argument("qemu_argv", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_obj
def launch(state_dir: str | None, name: str, agent: bool, qemu_argv: Sequence[str]) -> None:
    """Start QEMU detached under management: cprctl launch NAME [--agent] -- QEMU ARGS..."""
    rec = run(lambda: _api.launch(name, list(qemu_argv), agent=agent, state_dir=state_dir))
    out.print(f"{name}: running, pid {rec.pid}, machine {rec.machine}, QMP {rec.qmp}")


@main.command()
@click.argument("name")
@click.option("--qmp", required=True, help="QMP unix socket of the running QEMU.")
@click.option("--qga", help="Guest agent socket, if not in its command line.")
@click.pass_obj
def adopt(state_dir: str | None, name: str, qmp: str, qga: str | None) -> None:
    """Manage a running QEMU that something else started."""
    rec = run(lambda: _api.adopt(name, qmp, qga=qga, state_dir=state_dir))
    out.print(f"{name}: adopted pid {rec.pid}, machine {rec.machine}")


_suspend = click.option(
    "--suspend",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Suspend the guest first (auto: when it has VFIO devices).",
)
_force = click.option("--force", is_flag=True, help="Override the findings that are safe to override.")
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@main.command()
@click.argument("name")
@_suspend
@click.option(
    "--strategy",
    type=click.Choice(["auto", "in-place", "stream"]),
    default="auto",
    show_default=True,
    help="Keep RAM in place (shared file) or write it to the state file.",
)
@click.option("--reboot", is_flag=True, help="Require what a host reboot needs; flush RAM files to disk.")
@click.option("--verify-disks", type=click.Choice(["sampled", "full"]), default="sampled", show_default=True)
@_force
@_json
@click.pass_obj
def save(
    state_dir: str | None,
    name: str,
    suspend: Any,
    strategy: Any,
    reboot: bool,
    verify_disks: Any,
    force: bool,
    as_json: bool,
) -> None:
    """Checkpoint a running VM to its state file and stop its QEMU."""
    rep = TermReporter(quiet=as_json)
    try:
        res = run(
            lambda: _api.save(
                name,
                suspend=suspend,
                strategy=strategy,
                reboot=reboot,
                force=force,
                verify_disks=verify_disks,
                reporter=rep,
                state_dir=state_dir,
            )
        )
    finally:
        rep.close()
    if as_json:
        out.print_json(json.dumps(res.__dict__))
    else:
        out.print(
            f"{name}: saved ({res.strategy}{', suspended' if res.suspended else ''}), "
            f"state file {res.state_file} {res.size / 1e6:.1f} MB; QEMU stopped"
        )


@main.command()
@click.argument("name")
@click.option("--qemu", help="Restart on this QEMU binary instead of the recorded one.")
@click.option("--no-sync-time", is_flag=True, help="Do not set the guest clock from the host.")
@click.option("--force", is_flag=True, help="Restore even if a disk changed since the save.")
@_json
@click.pass_obj
def restore(state_dir: str | None, name: str, qemu: str | None, no_sync_time: bool, force: bool, as_json: bool) -> None:
    """Restart a saved VM with -incoming and resume it."""
    rep = TermReporter(quiet=as_json)
    res = run(
        lambda: _api.restore(
            name, qemu=qemu, force=force, sync_time=not no_sync_time, reporter=rep, state_dir=state_dir
        )
    )
    if as_json:
        out.print_json(json.dumps(res.__dict__))
    else:
        kept = f" on the kept build that wrote the checkpoint ({res.fallback})" if res.fallback else ""
        out.print(f"{name}: {res.status}, pid {res.pid}; guest paused {res.pause_ms:.0f} ms{kept}")


@main.command()
@click.argument("name")
@click.option("--qemu", required=True, help="The new QEMU binary.")
@_suspend
@click.option("--cold", is_flag=True, help="Save to a file and restart, even where a warm standby could run.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "standby", "cpr-transfer"]),
    default="auto",
    show_default=True,
    help="How a warm update hands the guest over: QEMU's cpr-transfer, or the standby (auto picks).",
)
@click.option("--no-sync-time", is_flag=True, help="Do not set the guest clock from the host (cold path).")
@_force
@_json
@click.pass_obj
def update(
    state_dir: str | None,
    name: str,
    qemu: str,
    suspend: Any,
    cold: bool,
    mode: Any,
    no_sync_time: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Move a running VM onto another QEMU binary (warm standby when possible, else save + restore)."""
    rep = TermReporter(quiet=as_json)
    res = run(
        lambda: _api.update(
            name,
            qemu,
            suspend=suspend,
            force=force,
            warm=not cold,
            sync_time=not no_sync_time,
            mode=mode,
            reporter=rep,
            state_dir=state_dir,
        )
    )
    if as_json:
        out.print_json(json.dumps(res.__dict__))
    else:
        how = {"cpr-transfer": "cpr-transfer", "standby": "warm standby"}.get(res.mode, f"cold: {res.cold_reason}")
        if res.mode_reason:
            how += f"; no cpr-transfer: {res.mode_reason}"
        out.print(f"{name}: running on {qemu}, pid {res.pid}; guest paused {res.pause_ms:.1f} ms ({how})")


@main.command()
@click.argument("name", required=False)
@_json
@click.pass_obj
def status(state_dir: str | None, name: str | None, as_json: bool) -> None:
    """State of each managed VM."""
    rows = run(lambda: _api.status(name, reporter=TermReporter(), state_dir=state_dir))
    if as_json:
        data = [{**r.to_dict(), "last_pause_ms": r.last_pause_ms} for r in rows]
        out.print_json(json.dumps(data if name is None else data[0]))
        return
    from rich.table import Table

    units = any(r.unit for r in rows)  # a column only where systemd places VMs
    table = Table("VM", "state", "pid", *(["unit"] if units else []), "QMP", "agent", "state file", "last pause")
    for r in rows:
        size = f"{r.state_file} ({r.state_file_bytes / 1e6:.1f} MB)" if r.state_file_bytes is not None else "-"
        pause = f"{r.last_pause_ms:.0f} ms" if r.last_pause_ms is not None else "-"
        if r.downtime and "reboot" in r.downtime:  # across a host reboot: where it went
            from ._checkpoint.timeline import describe

            pause = describe(r.downtime)
            if r.downtime_shares:
                pause += f"; cprctl's own {r.downtime_shares['cprctl']:.1f} s"
        state = f"{r.state} [yellow](binary replaced)[/]" if r.binary_replaced else r.state
        state = f"{state} [yellow](kept build)[/]" if r.kept_from else state
        if r.loads == "fails":
            state += (
                " [yellow](state fails on disk QEMU; kept build takes it)[/]"
                if r.fallback_build
                else " [red](state fails on disk QEMU, no kept build)[/]"
            )
        if r.boot_pending:
            state = f"{state} ({r.lost or 'powered off at shutdown'}; restore-all boots it)"
        elif r.lost:
            state = f"{state} (cold-booted: {r.lost})"
        unit = [r.unit or "-"] if units else []
        table.add_row(r.name, state, str(r.pid or "-"), *unit, r.qmp, r.qga or "-", size, pause)
    out.print(table)


@main.command()
@click.argument("name")
@click.option("--reboot", is_flag=True, help="Also require what a host reboot needs.")
@_suspend
@click.option("--qemu", help="Also check that this QEMU binary can take the VM (as update does).")
@click.option("--trial", is_flag=True, help="Saved VM: load its checkpoint into the restore's binary (-S), kill it.")
@_json
@click.pass_obj
def check(
    state_dir: str | None, name: str, reboot: bool, suspend: Any, qemu: str | None, trial: bool, as_json: bool
) -> None:
    """Preflight check: would a save (and a reboot, or a move onto --qemu BINARY) keep this VM? Exit 1 on errors."""
    found = run(lambda: _api.check(name, reboot=reboot, suspend=suspend, qemu=qemu, trial=trial, state_dir=state_dir))
    bad = [f for f in found if f.blocking]
    if as_json:
        out.print_json(json.dumps([f.__dict__ | {"blocking": f.blocking} for f in found]))
    else:
        colour = {"error": "red", "warning": "yellow", "info": "dim"}
        for f in found:
            fix = f" [dim](fix: {f.fix})[/]" if f.fix else ""
            out.print(f"[{colour[f.severity]}]{f.severity:7}[/] {f.message}{fix}")
        out.print(f"{name}: {'refused' if bad else 'ok'}")
    if bad:
        sys.exit(CheckFailed.exit_code)


def _summary(outcomes: list[VMOutcome], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps([o.__dict__ | {"ok": o.ok} for o in outcomes]))
    else:
        from rich.table import Table

        table = Table("VM", "outcome", "detail")
        colour = {
            "saved": "green",
            "restored": "green",
            "updated": "green",
            "cold-booted": "yellow",
            "skipped": "dim",
            "left running": "yellow",
            "shut down": "yellow",
            "failed": "red",
        }
        for o in outcomes:
            table.add_row(o.name, f"[{colour[o.outcome]}]{o.outcome}[/]", o.detail, end_section=False)
        out.print(table)
    if not all(o.ok for o in outcomes):
        sys.exit(1)


_parallel = click.option("--parallel", type=click.IntRange(1, 256), help="VMs at a time [default: one per core].")


def _fleet_reporter(as_json: bool) -> TermReporter | systemd.Notifier:
    """Under a unit (cprctl-guests.service): lines for the journal and sd_notify; else the terminal's."""
    return systemd.Notifier() if systemd.under_unit() else TermReporter(quiet=as_json)


def _unit_status(rep: TermReporter | systemd.Notifier, outcomes: list[VMOutcome], as_json: bool) -> None:
    """Under a unit: the per-VM lines are in the journal already; sum them up in the unit's status."""
    if not isinstance(rep, systemd.Notifier):
        _summary(outcomes, as_json)
        return
    from ._checkpoint.fleet import summary

    rep.status(summary(outcomes))
    if not all(o.ok for o in outcomes):
        sys.exit(1)


@main.command("save-all")
@click.option("--reboot", is_flag=True, help="Every VM must pass 'check --reboot' first, or none is touched.")
@click.option(
    "--shutdown-unsaveable",
    is_flag=True,
    help="The host is going down: save each VM that passes 'check --reboot', shut the others down cleanly.",
)
@click.option("--trial", is_flag=True, help="Then load each checkpoint into the restore's binary (-S) and kill it.")
@_parallel
@_suspend
@_force
@_json
@click.pass_obj
def save_all(
    state_dir: str | None,
    reboot: bool,
    shutdown_unsaveable: bool,
    trial: bool,
    parallel: int | None,
    suspend: Any,
    force: bool,
    as_json: bool,
) -> None:
    """Save every running VM (before a host reboot or a QEMU upgrade). Exit 1 unless all were saved."""
    rep = _fleet_reporter(as_json)
    outcomes = run(
        lambda: _api.save_all(
            reboot=reboot,
            parallel=parallel,
            suspend=suspend,
            force=force,
            shutdown_unsaveable=shutdown_unsaveable,
            trial=trial,
            reporter=rep,
            state_dir=state_dir,
        )
    )
    _unit_status(rep, outcomes, as_json)


@main.command("restore-all")
@_parallel
@click.option("--no-sync-time", is_flag=True, help="Do not set the guests' clocks from the host.")
@_json
@click.pass_obj
def restore_all(state_dir: str | None, parallel: int | None, no_sync_time: bool, as_json: bool) -> None:
    """Restore every saved VM (after a host reboot or a QEMU upgrade). Exit 1 unless all came back."""
    rep = _fleet_reporter(as_json)
    outcomes = run(
        lambda: _api.restore_all(parallel=parallel, sync_time=not no_sync_time, reporter=rep, state_dir=state_dir)
    )
    _unit_status(rep, outcomes, as_json)


@main.command()
@click.option("--kexec", "use_kexec", is_flag=True, help="Load a kernel and reboot into it with kexec (no firmware).")
@click.option("--kernel", help="Kernel to kexec [default: the newest vmlinuz-VERSION in /boot].")
@click.option("--initrd", help="Its initrd [default: initrd.img-VERSION beside the kernel].")
@click.option("--append", help="Its command line [default: the running one, without BOOT_IMAGE= and initrd=].")
@click.option("--dry-run", is_flag=True, help="Print the plan and each VM's expected downtime; touch nothing.")
@_suspend
@_force
@_json
@click.pass_obj
def reboot(
    state_dir: str | None,
    use_kexec: bool,
    kernel: str | None,
    initrd: str | None,
    append: str | None,
    dry_run: bool,
    suspend: Any,
    force: bool,
    as_json: bool,
) -> None:
    """Reboot the host (systemctl reboot, or kexec) once its shutdown is sure to save every VM."""
    plan = run(
        lambda: _api.reboot(
            kexec=use_kexec,
            kernel=kernel,
            initrd=initrd,
            append=append,
            dry_run=dry_run,
            suspend=suspend,
            force=force,
            reporter=TermReporter(quiet=as_json),
            state_dir=state_dir,
        )
    )
    if as_json:
        from dataclasses import asdict

        out.print_json(json.dumps(asdict(plan) | {"ok": not plan.refusals}))
    else:
        for line in _reboot_lines(plan):
            click.echo(line)
    if plan.refusals:
        sys.exit(1)


def _reboot_lines(plan: RebootPlan) -> list[str]:
    """The plan of ``cprctl reboot``, one line each (whole values: no table to cut them)."""
    k = plan.kernel
    if k is not None:
        how = f"systemctl kexec into {k.kernel} (initrd {k.initrd or 'none'}; {k.cmdline})"
    else:
        how = "systemctl kexec (no kernel chosen)" if plan.how == "kexec" else "systemctl reboot"
    lines = [
        f"{'rebooting' if plan.started else 'plan'}: {how}; cprctl-guests.service saves every VM at shutdown"
        f" (about {plan.saves_s:.1f} s of saves) and restores them at boot"
    ]
    for v in plan.vms:
        if v.state == "stopped":
            lines.append(f"{v.name}: stopped, {'booted afresh at boot' if v.boot_pending else 'left alone'}")
            continue
        low, high = plan.downtime_s(v)
        what = (
            f"saved at shutdown ({v.strategy}, {v.written_bytes / 1e6:.0f} MB of RAM written)"
            if v.state == "running"
            else f"{v.state} already"
        )
        span = f"{low:.1f} s" if abs(high - low) < 0.05 else f"{low:.1f}-{high:.1f} s"
        host = f" (last time {plan.last_host_s:.1f} s)" if plan.last_host_s is not None else ""
        lines.append(f"{v.name}: {what}, restored at boot; expected downtime {span} + the host's own reboot{host}")
    lines += [f"refused: {r}" for r in plan.refusals]
    return lines


@main.command("update-all")
@click.option("--qemu", help="Move every running VM onto this binary [default: VMs whose binary was replaced on disk].")
@_parallel
@_suspend
@_force
@_json
@click.pass_obj
def update_all(
    state_dir: str | None, qemu: str | None, parallel: int | None, suspend: Any, force: bool, as_json: bool
) -> None:
    """Move VMs onto a new QEMU, warm where possible (after a package upgrade). Exit 1 unless all moved."""
    outcomes = run(
        lambda: _api.update_all(
            qemu=qemu,
            parallel=parallel,
            suspend=suspend,
            force=force,
            reporter=TermReporter(quiet=as_json),
            state_dir=state_dir,
        )
    )
    _summary(outcomes, as_json)


@main.command()
@click.argument("name")
@click.pass_obj
def start(state_dir: str | None, name: str) -> None:
    """Boot a stopped VM afresh from its recorded command line (a cold boot)."""
    rec = run(lambda: _api.start(name, state_dir=state_dir))
    out.print(f"{name}: running, pid {rec.pid} (booted afresh)")


@main.command()
@click.argument("name")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.pass_obj
def ping(state_dir: str | None, name: str, timeout: float) -> None:
    """Check that the VM's guest agent answers (guest-ping)."""
    ms = run(lambda: _api.ping(name, timeout=timeout, state_dir=state_dir))
    out.print(f"{name}: guest agent answered in {ms:.1f} ms")


@main.command()
@click.argument("name")
@click.pass_obj
def stop(state_dir: str | None, name: str) -> None:
    """Power a running VM off (its state is not saved)."""
    run(lambda: _api.stop(name, state_dir=state_dir))
    out.print(f"{name}: stopped")


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Also discard a checkpoint.")
@click.pass_obj
def remove(state_dir: str | None, name: str, force: bool) -> None:
    """Stop managing a VM that is not running, and delete its folder."""
    run(lambda: _api.remove(name, force=force, state_dir=state_dir))
    out.print(f"{name}: removed")


@main.command("install-units")
@click.option(
    "--dest", type=click.Path(file_okay=False), help="Unit folder [default: /etc/systemd/system; --user: ~/.config]."
)
@click.option("--user", is_flag=True, help="A unit of your user's manager (needs lingering to run at boot).")
@click.option("--no-enable", is_flag=True, help="Only write the unit; do not reload or enable it.")
@click.pass_obj
def install_units(state_dir: str | None, dest: str | None, user: bool, no_enable: bool) -> None:
    """Install cprctl-guests.service: save-all at shutdown (others shut down cleanly), restore-all at boot."""
    from pathlib import Path

    from . import _units
    from ._store import StateDir

    path = run(
        lambda: _units.install(StateDir(state_dir), Path(dest) if dest else None, enable=not no_enable, user=user)
    )
    out.print(f"wrote {path}")
    if user and _units.lingering() is not True:
        out.print(f"note: it runs at boot only with lingering: loginctl enable-linger {getpass.getuser()}")


@main.command()
@click.option(
    "--guest",
    envvar="CPRCTL_DEMO_GUEST",
    type=click.Path(file_okay=False, exists=True),
    required=True,
    help="Folder with the demo guest's vmlinuz and initrd.img [env CPRCTL_DEMO_GUEST].",
)
@click.option("--qemu", default="qemu-system-x86_64", show_default=True)
@click.pass_obj
def demo(state_dir: str | None, guest: str, qemu: str) -> None:
    """Launch the demo guest, save it, show QEMU gone, restore it, show it continuing."""
    from ._demo import run_demo

    run(lambda: run_demo(guest, qemu, state_dir, out.get()))
