"""The state directory: where each VM's record, sockets, logs and checkpoint live, and its locks."""

from .lock import VMLock
from .statedir import StateDir, validate_name

__all__ = ("StateDir", "VMLock", "validate_name")
