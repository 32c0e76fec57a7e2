"""One request queue at the root, for every source (the CLI, the HTTP API, requests
forwarded by other devices): first come, first served, with a bounded number waiting.

The engine answers one request at a time. Without a bound, a burst of requests would
pile up on the model lock for ever; with one, the request past the bound is refused at
once with a sentence, and the client can ask again later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

import grpc

from hsmdifd.daemon.errors import RequestError

QUEUE_FULL = "the request queue is full"
"""How a refusal for a full queue starts, wherever it is relayed (HTTP tells it from
other RESOURCE_EXHAUSTED errors by this)."""


class QueueFull(RequestError):
    def __init__(self, waiting: int) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{QUEUE_FULL} ({waiting} requests are waiting for the model); ask again "
            "in a moment, or raise [api] max_queue",
        )


class RequestQueue:
    """At most `concurrency` requests hold a slot; at most `max_waiting` wait for one,
    in the order they came."""

    def __init__(self, max_waiting: int, concurrency: int = 1) -> None:
        self.max_waiting = max_waiting
        self._concurrency = concurrency
        self._running = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def resize(self, max_waiting: int) -> None:
        """A new bound (a configuration reload); those already waiting stay."""
        self.max_waiting = max_waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a turn; QueueFull when too many wait already. A waiter that is
        cancelled leaves the queue at once."""
        if self._running < self._concurrency and not self._waiting:
            self._running += 1
        else:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting))
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn  # _release counted this request as running
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # granted as it was cancelled: pass the turn on
                else:
                    self._waiting.remove(turn)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self._running -= 1
        while self._waiting and self._running < self._concurrency:
            turn = self._waiting.popleft()
            if not turn.done():
                self._running += 1
                turn.set_result(None)
