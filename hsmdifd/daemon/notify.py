"""systemd integration: sd_notify, the watchdog and journald logging.

Nothing at all is sent where `NOTIFY_SOCKET` is unset (no systemd, or macOS).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from hsmdifd.daemon import timing

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    """Send `state` (e.g. "READY=1") to the service manager, if there is one."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        import systemd.daemon
    except ImportError:  # pragma: no cover - systemd-python is a Linux dependency
        log.warning("NOTIFY_SOCKET is set but systemd-python is not installed")
        return
    systemd.daemon.notify(state)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        return int(usec) / 1_000_000 * timing.WATCHDOG_FRACTION
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog for as long as the event loop is responsive."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def setup_logging(verbose: bool = False) -> None:
    """Log to journald when systemd started us, to stderr otherwise."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") and os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="hsmdifd")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        except ImportError:  # pragma: no cover
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s hsmdifd %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
