"""Where the daemon's socket and state live by default: the same for hsmdifd and
hsmdifctl."""

from __future__ import annotations

import os
from pathlib import Path


def default_socket_path() -> Path:
    """`/run/hsmdifd/control.sock` for root, `$XDG_RUNTIME_DIR/hsmdifd/control.sock` otherwise."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0 or not runtime:
        return Path("/run/hsmdifd/control.sock")
    return Path(runtime) / "hsmdifd" / "control.sock"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/hsmdifd")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hsmdifd"
