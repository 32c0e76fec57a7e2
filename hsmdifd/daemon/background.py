"""The daemon's background loops, and the set of tasks they run in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api.metrics import Metrics
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon import timing
from hsmdifd.daemon.config import TimingConfig
from hsmdifd.engine.models import Models

log = logging.getLogger(__name__)


class Background:
    """Tasks that run until the daemon stops; `aclose` cancels them all, then waits for
    each (what one raises on the way out is not another's concern)."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def watch_metrics(metrics: Metrics) -> None:
    while True:
        metrics.watch()
        await asyncio.sleep(timing.METRICS_WATCH)


async def measure_device(cluster: Cluster, measure: Callable[[], pb.DeviceProfile]) -> None:
    """Measure this device now, off the loop, and make the figures current."""
    cluster.set_device(await asyncio.to_thread(measure))


async def refresh_device(cluster: Cluster, measure: Callable[[], pb.DeviceProfile]) -> None:
    """Keep this device's figures current."""
    while True:
        try:
            await measure_device(cluster, measure)
        except Exception:
            log.exception("measuring this device failed")
        await asyncio.sleep(timing.DEVICE_REFRESH)


async def notice_own_stalls(models: Models, timings: Callable[[], TimingConfig]) -> None:
    """Notice when this device itself stopped (suspended, swapping, SIGSTOP) for
    long enough that its peers counted it as gone: they ended the leases it held,
    so a model split over them is loaded anew rather than failing the next
    prompt. The boot-time clock also runs while the system sleeps."""
    interval = timings().heartbeat_interval
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    while True:
        await asyncio.sleep(interval)
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        gap, before = now - before, now
        # Peers heard nothing for up to the gap plus a heartbeat interval.
        if gap + interval > timings().dead_after:
            await models.leases_lost(gap)
