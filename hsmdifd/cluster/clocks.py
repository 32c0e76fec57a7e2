"""Clocks and rates the cluster plane measures by."""

from __future__ import annotations

import time
from collections.abc import Callable


class StallFreeClock:
    """Monotonic seconds that advance at most `max_step` between two readings.

    Membership reads it several times a heartbeat interval. When this device stood still
    for a while, the first reading after it woke advances only `max_step`: its peers
    count as silent for what they really were, not for the time this device did not
    listen, so a woken device does not declare them dead and itself root before their
    next heartbeat has had a chance to arrive.
    """

    def __init__(self, max_step: float, source: Callable[[], float] = time.monotonic) -> None:
        self._max_step, self._source = max_step, source
        self._real = source()
        self._value = self._real

    def __call__(self) -> float:
        real = self._source()
        self._value += min(max(0.0, real - self._real), self._max_step)
        self._real = real
        return self._value


class TokenBucket:
    """`burst` at once, then one every `interval` seconds."""

    def __init__(self, burst: int, interval: float) -> None:
        self._burst, self._interval = burst, interval
        self._tokens, self._at = float(burst), float("-inf")

    def take(self, now: float) -> bool:
        if self._at != float("-inf"):
            self._tokens = min(self._burst, self._tokens + (now - self._at) / self._interval)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
