"""The Ansible module and rolling playbook (ansible/) on two local "hosts", each with its own state dir."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import cprctl

from .guestvm import GuestVM, qemu_copy, record_of, upgrade_binary

pytestmark = pytest.mark.qemu

ANSIBLE_DIR = Path(__file__).resolve().parent.parent / "ansible"
PLAYBOOK = ANSIBLE_DIR / "rolling-update.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
FILL = 16

if not ANSIBLE_PLAYBOOK.exists():
    pytest.skip("ansible-core is not installed in this venv (pip install -e '.[dev]')", allow_module_level=True)


class Hosts:
    """Two inventory hosts, both ``ansible_connection=local``, each with its own state dir and 2 demo VMs."""

    def __init__(self, root: Path, state_a: Path, state_b: Path) -> None:
        self.root = root
        self.state = {"hostA": state_a, "hostB": state_b}
        self.vms: dict[str, list[GuestVM]] = {"hostA": [], "hostB": []}
        self.inventory = root / "inventory.ini"
        self.inventory.write_text(
            "[cprctl_hosts]\n"
            + "".join(f"{h} cprctl_state_dir={sd}\n" for h, sd in self.state.items())
            + f"\n[cprctl_hosts:vars]\nansible_connection=local\nansible_python_interpreter={sys.executable}\n"
        )
        self.tmp = root / "ansible-tmp"
        self.tmp.mkdir(exist_ok=True)

    def all_vms(self) -> list[GuestVM]:
        return [vm for vms in self.vms.values() for vm in vms]

    def records(self, host: str) -> dict[str, dict[str, object]]:
        return {vm.name: record_of(vm.state_dir, vm.name) for vm in self.vms[host]}

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / "local"),
            "ANSIBLE_REMOTE_TEMP": str(self.tmp / "remote"),
            "ANSIBLE_HOME": str(self.tmp / "home"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "default",
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "LC_ALL": "C.UTF-8",
        }
        env.pop("CPRCTL_STATE_DIR", None)
        return env

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd, cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )

    def play(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """The rolling playbook, reboot simulated."""
        cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), str(PLAYBOOK), "-e", "cprctl_simulate_reboot=true"]
        return self.run([*cmd, *args], timeout)

    def adhoc(
        self, pattern: str, module: str, args: str, *extra: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """An ad-hoc ``ansible PATTERN -m MODULE -a ARGS`` (*extra*: e.g. ``--check``)."""
        exe = str(ANSIBLE_PLAYBOOK.with_name("ansible"))
        return self.run([exe, "-i", str(self.inventory), pattern, *extra, "-m", module, "-a", args], timeout)


def recap(out: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters per host."""
    got = {}
    for m in re.finditer(r"^(host\w+)\s*:\s*(.*)$", out.split("PLAY RECAP", 1)[-1], re.M):
        got[m[1]] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[2])}
    return got


@pytest.fixture(scope="module")
def hosts(state_dir: Path) -> Iterator[Hosts]:
    root = state_dir.parent
    h = Hosts(root, state_dir, root / "hostB")
    for host, names in (("hostA", ("a1", "a2")), ("hostB", ("b1", "b2"))):
        h.vms[host] = [GuestVM.launch(n, h.state[host], fill=FILL) for n in names]
    yield h
    for vm in h.all_vms():
        vm.stop()


def assert_untouched(h: Hosts, host: str, before: dict[str, dict[str, object]]) -> None:
    """Every VM of *host* still runs, has no checkpoint and its record never changed (never saved)."""
    for vm in h.vms[host]:
        st = vm.status()
        assert st.state == "running" and st.state_file is None, f"{vm.name}: {st}"
    assert h.records(host) == before


def test_check_mode_changes_nothing(hosts: Hosts) -> None:
    before = {host: hosts.records(host) for host in hosts.state}
    out = hosts.play("--check")
    assert out.returncode == 0, out.stdout + out.stderr
    counts = recap(out.stdout)
    assert set(counts) == {"hostA", "hostB"}
    for host in hosts.state:
        assert counts[host]["failed"] == 0 and counts[host]["changed"] == 1, counts  # only the save "would" change
        assert_untouched(hosts, host, before[host])


def test_rolling_update_keeps_every_vm(hosts: Hosts) -> None:
    marks = {vm.name: vm.mark() for vm in hosts.all_vms()}
    out = hosts.play()
    assert out.returncode == 0, out.stdout + out.stderr
    counts = recap(out.stdout)
    for host in hosts.state:
        assert counts[host]["failed"] == 0 and counts[host]["changed"] == 2, counts  # save + restore
    # serial: 1 - hostA was saved and restored before hostB was touched.
    assert out.stdout.index("[hostA]") < out.stdout.index("[hostB]")
    for vm in hosts.all_vms():
        vm.assert_continued(marks[vm.name], fill=FILL)
        assert vm.status().last_pause_ms is not None
    assert {s.state for sd in hosts.state.values() for s in cprctl.status(state_dir=sd)} == {"running"}


def test_module_is_idempotent(hosts: Hosts) -> None:
    vm = hosts.vms["hostA"][0]
    mark = vm.mark()
    sd = "state_dir={{ cprctl_state_dir }}"
    for args, changed in (
        ("state=saved reboot=true name=a1", True),
        ("state=saved reboot=true name=a1", False),
        ("state=checked reboot=true", False),  # a saved VM's checkpoint verifies; a running one passes
        ("state=restored", True),
        ("state=restored", False),
        ("state=running name=a1 health=true", False),
    ):
        out = hosts.adhoc("hostA", "cprctl_vm", f"{args} {sd}")
        assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
        assert f"hostA | {'CHANGED' if changed else 'SUCCESS'}" in out.stdout, f"{args}: {out.stdout}"
    vm.assert_continued(mark, fill=FILL)


def test_a_failing_host_stops_the_roll(hosts: Hosts) -> None:
    shm = Path("/dev/shm") / f"cprctl-ansible-{os.getpid()}"
    bad: GuestVM | None = None
    try:
        bad = GuestVM.launch("shm1", hosts.state["hostA"], fill=0, ram_path=shm)
        hosts.vms["hostA"].append(bad)
        before = {host: hosts.records(host) for host in hosts.state}
        out = hosts.play()
        assert out.returncode != 0, out.stdout + out.stderr
        assert "shm1" in out.stdout and "refused" in out.stdout, out.stdout
        assert "hostB" not in out.stdout.split("PLAY RECAP", 1)[0], "the roll went on to hostB"
        assert_untouched(hosts, "hostA", before["hostA"])
        assert_untouched(hosts, "hostB", before["hostB"])
        for vm in hosts.all_vms():
            assert vm.agent_answers()
    finally:
        if bad is not None:
            hosts.vms["hostA"].remove(bad)
            bad.stop()
            cprctl.remove("shm1", state_dir=hosts.state["hostA"])
        shm.unlink(missing_ok=True)
        shutil.rmtree(hosts.root / "shm1-work", ignore_errors=True)


def test_qemu_upgrade_moves_vms_warm_without_a_save(hosts: Hosts) -> None:
    binary = qemu_copy(hosts.root / "pkg" / "bin")
    vm = GuestVM.launch("up1", hosts.state["hostB"], fill=FILL, qemu=str(binary))
    hosts.vms["hostB"].append(vm)
    upgrade_binary(binary)  # apt ran while the VMs run
    assert vm.status().binary_replaced
    sd = "state_dir={{ cprctl_state_dir }}"
    out = hosts.adhoc("hostB", "cprctl_vm", f"state=updated {sd}", "--check")
    assert out.returncode == 0 and "would update" in out.stdout and "hostB | CHANGED" in out.stdout, out.stdout
    assert vm.status().binary_replaced, "check mode moved it"
    before = {host: hosts.records(host) for host in hosts.state}
    marks = {v.name: v.mark() for v in hosts.all_vms()}
    out = hosts.play("-e", "cprctl_upgrade_qemu=true")
    assert out.returncode == 0, out.stdout + out.stderr
    counts = recap(out.stdout)
    assert counts["hostA"]["changed"] == 0 and counts["hostB"]["changed"] == 1, counts  # only up1 moved
    st = vm.status()
    assert st.state == "running" and not st.binary_replaced and st.pid != before["hostB"]["up1"]["pid"]
    for v in hosts.all_vms():
        v.assert_continued(marks[v.name], fill=FILL)
    assert hosts.records("hostA") == before["hostA"], "a VM was touched for an upgrade that did not concern it"
    hosts.vms["hostB"].remove(vm)
    vm.stop()
