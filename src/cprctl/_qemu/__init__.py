"""Everything that talks to QEMU: its binary, its process, QMP, and the guest agent.

Nothing outside this package starts a process or opens a socket to QEMU.
"""

from . import argv
from .agent import Agent
from .process import Binary, alive, cmdline, kill, log_tail, spawn, wait_gone
from .qmp import Monitor

__all__ = ("Agent", "Binary", "Monitor", "alive", "argv", "cmdline", "kill", "log_tail", "spawn", "wait_gone")
