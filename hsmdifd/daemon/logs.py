"""Log lines that bad input would repeat: a flood of refusals costs one line per kind
every `every` seconds, with a count of what was left out."""

from __future__ import annotations

import logging
import threading
import time

from hsmdifd.daemon import timing


class LogLimiter:
    """At most one line per kind every `every` seconds, counting the rest; safe from any
    thread (the data-plane relays log from theirs)."""

    def __init__(self, logger: logging.Logger, every: float = timing.LOG_EVERY) -> None:
        self._log, self._every = logger, every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._lock = threading.Lock()

    def allows(self, kind: str) -> bool:
        """Whether a line about `kind` may be logged now; if not, it is counted."""
        with self._lock:
            now = time.monotonic()
            if now - self._last.get(kind, -self._every) < self._every:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return False
            self._last[kind] = now
            return True

    def warning(self, kind: str, message: str, *args: object) -> None:
        if not self.allows(kind):
            return
        with self._lock:
            quiet = self._quiet.pop(kind, 0)
        if quiet:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, quiet, self._every)
        self._log.warning(message, *args)
