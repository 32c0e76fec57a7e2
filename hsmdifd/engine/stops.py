"""Stop strings: an answer ends where one begins, and none of it is passed on."""

from __future__ import annotations


class StopFilter:
    """Cuts a stream of text at the first stop string, never passing on any of it: the
    last `longest stop - 1` characters are held back until they cannot start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can go out now; after a stop string, nothing more."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        tail = self._tail + text
        cut = min((i for i in (tail.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._tail = ""
            return tail[:cut]
        keep = min(self._hold, len(tail))
        self._tail = tail[len(tail) - keep :]
        return tail[: len(tail) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the answer."""
        tail, self._tail = self._tail, ""
        return "" if self.stopped else tail


# ---------------------------------------------------------------- responses
