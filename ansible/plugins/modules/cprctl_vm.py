#!/usr/bin/python
"""Ansible module ``cprctl_vm``: check, save and restore the QEMU VMs of a host with cprctl."""

from __future__ import annotations

import time
import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import cprctl
except ImportError:
    cprctl = None  # type: ignore[assignment]
    CPRCTL_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    CPRCTL_IMPORT_ERROR = None

DOCUMENTATION = r"""
---
module: cprctl_vm
short_description: Checkpoint and restore the QEMU VMs of a host with cprctl (cpr-reboot)
description:
  - Drives cprctl's Python API on the managed host (cprctl must be importable by
    C(ansible_python_interpreter)).
  - C(checked) runs the preflight check and fails on any blocking finding; it never changes anything.
  - C(saved) saves one VM, or every running VM of the host (cprctl save-all); a VM that is already
    saved is not changed. For save-all, VMs that could not be saved are left running by cprctl.
  - C(restored) restores one VM, or every saved VM (cprctl restore-all); a running VM is not changed.
  - C(updated) moves every running VM whose QEMU binary a package upgrade replaced on disk onto the
    binary now there (cprctl update-all), warm where it can; with O(qemu), every running VM (or the one
    O(name)d) onto that binary. A binary that cannot take a VM is refused and the VM keeps running.
    In check mode it says which VMs would move, with the check of the new binary.
  - C(running) is the same as C(restored) (it reads better with O(health)). A VM that is C(stopped)
    (powered off, no checkpoint) is skipped when no O(name) is given, and fails when it is named.
  - With O(health), every running VM's guest agent must answer C(guest-ping); a VM without agent
    is healthy when it runs.
options:
  state:
    description: What the VMs should be.
    type: str
    required: true
    choices: [checked, saved, restored, updated, running]
  name:
    description: One VM; default every VM managed in the state directory.
    type: str
  reboot:
    description: For C(checked) and C(saved), require what a host reboot needs (C(check --reboot)).
    type: bool
    default: false
  qemu:
    description: For C(updated), the QEMU binary to move onto; default the binary at each VM's own path.
    type: path
  state_dir:
    description: cprctl's state directory; default cprctl's own (C($CPRCTL_STATE_DIR), /var/lib/cprctl).
    type: path
  parallel:
    description: How many VMs save-all/restore-all handle at a time (default one per core).
    type: int
  health:
    description: After the operation, require every running VM's guest agent to answer C(guest-ping).
    type: bool
    default: false
  health_timeout:
    description: Seconds to wait for each guest agent.
    type: float
    default: 30
supports_check_mode: true
"""

EXAMPLES = r"""
- name: Gate - every VM would survive a save and a reboot
  cprctl_vm:
    state: checked
    reboot: true

- name: Save every VM
  cprctl_vm:
    state: saved
    reboot: true

- name: After "apt upgrade" replaced QEMU, move every VM onto it while they run
  cprctl_vm:
    state: updated
    health: true

- name: Restore every VM and check their guest agents
  cprctl_vm:
    state: restored
    health: true
"""

RETURN = r"""
vms:
  description: One entry per VM considered.
  returned: always
  type: list
  elements: dict
  contains:
    name: {description: The VM's name, type: str}
    outcome:
      description: >-
        ok, refused, saved, restored, updated, already saved, already running, up to date, would save,
        would restore, would update, left running, failed, skipped
      type: str
    detail: {description: Why, or what happened, type: str}
    findings: {description: The check's findings (checked, and saved/restored/updated in check mode), type: list}
    warm: {description: For C(updated), whether the VM moved warm, type: bool}
    pause_ms: {description: For C(updated), the guest's pause, type: float}
health:
  description: One entry per VM whose health was checked (with O(health)).
  returned: when health is true
  type: list
  elements: dict
"""

#: VMOutcome.outcome values that mean the VM completed (or needed nothing).
DONE = (
    "saved",
    "restored",
    "updated",
    "skipped",
    "already saved",
    "already running",
    "up to date",
    "ok",
    "would save",
    "would restore",
    "would update",
)


def entry(name: str, outcome: str, detail: str = "", findings: list[Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "outcome": outcome, "detail": detail}
    if findings is not None:
        out["findings"] = [
            {"code": f.code, "severity": f.severity, "message": f.message, "fix": f.fix} for f in findings
        ]
    return out


def first_error(findings: list[Any]) -> str:
    worst = next((f for f in findings if f.blocking), None)
    if worst is None:
        return ""
    return f"{worst.message}; fix: {worst.fix}" if worst.fix else worst.message


class Runner:
    def __init__(self, module: AnsibleModule) -> None:
        self.m = module
        p = module.params
        self.name: str | None = p["name"]
        self.reboot: bool = p["reboot"]
        self.sd: str | None = p["state_dir"]
        self.parallel: int | None = p["parallel"]
        self.check_mode: bool = module.check_mode

    def statuses(self) -> list[Any]:
        return cprctl.status(self.name, state_dir=self.sd)

    def check_one(self, name: str, state: str) -> dict[str, Any]:
        findings = cprctl.check(name, reboot=self.reboot, state_dir=self.sd)
        why = first_error(findings)
        return entry(name, "refused" if why else "ok", why or f"{state}: check passed", findings)

    # -- states --------------------------------------------------------------------------------

    def checked(self) -> tuple[bool, list[dict[str, Any]]]:
        vms = []
        for st in self.statuses():
            if st.state == "stopped" and self.name is None:
                vms.append(entry(st.name, "skipped", "stopped"))
            else:
                vms.append(self.check_one(st.name, st.state))
        return False, vms

    def saved(self) -> tuple[bool, list[dict[str, Any]]]:
        statuses = self.statuses()
        if self.check_mode:
            return self._predict(statuses, "running", "saved", "would save", "already saved")
        if self.name is not None:
            st = statuses[0]
            if st.state == "saved":
                return False, [entry(st.name, "already saved", st.state_file or "")]
            if st.state != "running":
                return False, [entry(st.name, "failed", f"{st.name} is {st.state}, not running")]
            try:
                res = cprctl.save(st.name, reboot=self.reboot, state_dir=self.sd)
            except cprctl.CprctlError as exc:
                left = cprctl.status(st.name, state_dir=self.sd)[0].state == "running"
                return False, [entry(st.name, "left running" if left else "failed", str(exc))]
            return True, [entry(st.name, "saved", f"strategy {res.strategy}, {res.state_file}")]
        try:
            outcomes = cprctl.save_all(reboot=self.reboot, parallel=self.parallel, state_dir=self.sd)
        except cprctl.FleetCheckFailed as exc:
            vms = [
                entry(s.name, "refused", first_error(exc.refused[s.name]), exc.refused[s.name])
                if s.name in exc.refused
                else entry(s.name, "left running" if s.state == "running" else "skipped", f"{s.state}, not touched")
                for s in statuses
            ]
            self.m.fail_json(msg=str(exc), changed=False, vms=vms)
        return self._fleet(outcomes, "saved", statuses)

    def restored(self) -> tuple[bool, list[dict[str, Any]]]:
        statuses = self.statuses()
        if self.check_mode:
            changed, vms = self._predict(statuses, "saved", "running", "would restore", "already running")
        elif self.name is not None:
            st = statuses[0]
            if st.state == "running":
                changed, vms = False, [entry(st.name, "already running")]
            elif st.state in ("saved", "broken"):
                try:
                    res = cprctl.restore(st.name, state_dir=self.sd)
                    changed, vms = True, [entry(st.name, "restored", f"paused {res.pause_ms:.0f} ms")]
                except cprctl.CprctlError as exc:
                    changed, vms = False, [entry(st.name, "failed", str(exc))]
            else:
                changed, vms = False, [entry(st.name, "failed", f"{st.name} is {st.state}: nothing to restore")]
        else:
            outcomes = cprctl.restore_all(parallel=self.parallel, state_dir=self.sd)
            changed, vms = self._fleet(outcomes, "restored", statuses)
        return changed, vms

    def updated(self) -> tuple[bool, list[dict[str, Any]]]:
        qemu = self.m.params["qemu"]
        statuses = self.statuses()
        if self.check_mode or self.name is not None:
            vms = [self._update_one(st, qemu) for st in statuses]
            return any(v["outcome"] in ("updated", "would update") for v in vms), vms
        outcomes = cprctl.update_all(qemu=qemu, parallel=self.parallel, state_dir=self.sd)
        vms = []
        for o in outcomes:
            outcome = "up to date" if o.outcome == "skipped" and o.state == "running" else o.outcome
            vms.append(entry(o.name, outcome, o.detail) | {"warm": o.warm, "pause_ms": o.pause_ms})
        return any(o.outcome == "updated" for o in outcomes), vms

    def _update_one(self, st: Any, qemu: str | None) -> dict[str, Any]:
        """Update one VM (or, in check mode, say whether it would move and whether the binary takes it)."""
        if st.state != "running":
            return entry(st.name, "skipped" if self.name is None else "failed", f"{st.state}, not running")
        if not qemu and not st.binary_replaced:
            return entry(st.name, "up to date", "runs the binary on disk")
        target = qemu or st.argv[0]
        if self.check_mode:
            findings = cprctl.check(st.name, qemu=target, state_dir=self.sd)
            why = first_error(findings)
            return entry(st.name, "refused" if why else "would update", why or f"onto {target}", findings)
        try:
            res = cprctl.update(st.name, target, state_dir=self.sd)
        except cprctl.CprctlError as exc:
            return entry(st.name, "failed", str(exc))
        how = "warm" if res.warm else f"cold ({res.cold_reason})"
        return entry(st.name, "updated", f"{how}, paused {res.pause_ms:.1f} ms") | {
            "warm": res.warm,
            "pause_ms": res.pause_ms,
        }

    # -- helpers -------------------------------------------------------------------------------

    def _fleet(self, outcomes: list[Any], verb: str, statuses: list[Any]) -> tuple[bool, list[dict[str, Any]]]:
        """Map save_all/restore_all outcomes; an already-done VM reads as such, not as 'skipped'."""
        already = "already saved" if verb == "saved" else "already running"
        before = {s.name: s.state for s in statuses}
        done_state = "saved" if verb == "saved" else "running"
        vms = []
        for o in outcomes:
            if o.outcome == "skipped" and before.get(o.name) == done_state:
                vms.append(entry(o.name, already))
            elif o.outcome == "skipped" and before.get(o.name) == "broken":
                vms.append(entry(o.name, "failed", "broken: see 'cprctl status'"))
            else:
                vms.append(entry(o.name, o.outcome, o.detail))
        return any(o.outcome == verb for o in outcomes), vms

    def _predict(
        self, statuses: list[Any], from_state: str, to_state: str, would: str, already: str
    ) -> tuple[bool, list[dict[str, Any]]]:
        """Check mode: what would change, with the check's verdict on each VM that would; touches nothing."""
        vms = []
        for st in statuses:
            if st.state == to_state:
                vms.append(entry(st.name, already))
            elif st.state == from_state or (to_state == "running" and st.state == "broken"):
                res = self.check_one(st.name, st.state)
                if res["outcome"] == "ok":
                    res["outcome"], res["detail"] = would, ""
                vms.append(res)
            elif self.name is None:
                vms.append(entry(st.name, "skipped", st.state))
            else:
                vms.append(entry(st.name, "failed", f"{st.name} is {st.state}"))
        if to_state == "saved" and self.reboot and self.name is None and any(v["outcome"] == "refused" for v in vms):
            # save-all --reboot refuses as a whole: nothing would be saved.
            for v in vms:
                if v["outcome"] == would:
                    v["outcome"], v["detail"] = "left running", "not touched: another VM fails its reboot check"
        return any(v["outcome"] == would for v in vms), vms

    def health(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for st in self.statuses():
            if st.state != "running" and self.check_mode:
                out.append({"name": st.name, "healthy": True, "detail": f"{st.state}, not checked in check mode"})
            elif st.state == "stopped" and self.name is None:
                out.append({"name": st.name, "healthy": True, "detail": "stopped, skipped"})
            elif st.state != "running":
                out.append({"name": st.name, "healthy": False, "detail": f"{st.state}, not running"})
            elif not st.qga:
                out.append({"name": st.name, "healthy": True, "detail": "running, no guest agent"})
            else:
                ok, detail = ping(st.name, self.sd, timeout)
                out.append({"name": st.name, "healthy": ok, "detail": detail})
        return out


def ping(name: str, state_dir: str | None, timeout: float) -> tuple[bool, str]:
    """Whether the VM's guest agent answers guest-ping within *timeout* seconds (retrying)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            ms = cprctl.ping(name, timeout=min(5.0, max(1.0, timeout)), state_dir=state_dir)
            return True, f"guest agent answers ({ms:.0f} ms)"
        except cprctl.CprctlError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            return False, last
        time.sleep(1)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {
                "type": "str",
                "required": True,
                "choices": ["checked", "saved", "restored", "updated", "running"],
            },
            "qemu": {"type": "path"},
            "name": {"type": "str"},
            "reboot": {"type": "bool", "default": False},
            "state_dir": {"type": "path"},
            "parallel": {"type": "int"},
            "health": {"type": "bool", "default": False},
            "health_timeout": {"type": "float", "default": 30.0},
        },
        supports_check_mode=True,
    )
    if CPRCTL_IMPORT_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib("cprctl", reason="(set ansible_python_interpreter to cprctl's python)"),
            exception=CPRCTL_IMPORT_ERROR,
        )
    if module.params["parallel"] is not None and module.params["parallel"] < 1:
        module.fail_json(msg="parallel must be at least 1")

    run = Runner(module)
    state = module.params["state"]
    try:
        if state == "checked":
            changed, vms = run.checked()
        elif state == "saved":
            changed, vms = run.saved()
        elif state == "updated":
            changed, vms = run.updated()
        else:
            changed, vms = run.restored()
        result: dict[str, Any] = {"changed": changed, "vms": vms, "state": state}
        if module.params["health"]:
            result["health"] = run.health(module.params["health_timeout"])
    except cprctl.CprctlError as exc:
        module.fail_json(msg=str(exc), changed=False, error=type(exc).__name__)

    bad = [v for v in vms if v["outcome"] not in DONE]
    if bad:
        what = "refused by the check" if state == "checked" else "did not complete"
        lines = "; ".join(f"{v['name']}: {v['outcome']}: {v['detail']}" for v in bad)
        module.fail_json(msg=f"{len(bad)} of {len(vms)} VM(s) {what}: {lines}", **result)
    sick = [h for h in result.get("health", []) if not h["healthy"]]
    if sick:
        lines = "; ".join(f"{h['name']}: {h['detail']}" for h in sick)
        module.fail_json(msg=f"{len(sick)} VM(s) unhealthy: {lines}", **result)
    if not vms:
        result["msg"] = "no VMs managed in this state directory"
    else:
        counts: dict[str, int] = {}
        for v in vms:
            counts[v["outcome"]] = counts.get(v["outcome"], 0) + 1
        result["msg"] = ", ".join(f"{n} {o}" for o, n in counts.items())
    module.exit_json(**result)


if __name__ == "__main__":
    main()
