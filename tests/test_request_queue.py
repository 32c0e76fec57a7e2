"""The request queue at the root: first come first served, bounded, cancellable."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hsmdifd.api.queue import QUEUE_FULL, QueueFull, RequestQueue


async def _hold(queue: RequestQueue, name: str, order: list[str], release: asyncio.Event) -> None:
    async with queue.slot():
        order.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_fifo_and_bounded() -> None:
    async def run() -> None:
        queue = RequestQueue(max_waiting=2)
        order: list[str] = []
        releases = {n: asyncio.Event() for n in "abc"}
        tasks = [asyncio.create_task(_hold(queue, n, order, releases[n])) for n in "abc"]
        await _settle()
        assert (queue.running, queue.waiting) == (1, 2)
        with pytest.raises(QueueFull) as e:
            async with queue.slot():
                pass
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and QUEUE_FULL in str(e.value)
        for n in "abc":
            releases[n].set()
            await _settle()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"]
        assert (queue.running, queue.waiting) == (0, 0)

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_at_once() -> None:
    async def run() -> None:
        queue = RequestQueue(max_waiting=1)
        order: list[str] = []
        release = asyncio.Event()
        first = asyncio.create_task(_hold(queue, "a", order, release))
        second = asyncio.create_task(_hold(queue, "b", order, release))
        await _settle()
        assert queue.waiting == 1
        second.cancel()
        await _settle()
        assert queue.waiting == 0
        third = asyncio.create_task(_hold(queue, "c", order, release))  # room again
        await _settle()
        release.set()
        await asyncio.gather(first, third)
        assert order == ["a", "c"] and queue.running == 0

    asyncio.run(run())


def test_a_waiter_cancelled_as_its_turn_comes_passes_it_on() -> None:
    async def run() -> None:
        queue = RequestQueue(max_waiting=2)
        order: list[str] = []
        release = asyncio.Event()
        first = asyncio.create_task(_hold(queue, "a", order, release))
        await _settle()
        second = asyncio.create_task(_hold(queue, "b", order, asyncio.Event()))
        third = asyncio.create_task(_hold(queue, "c", order, release))
        await _settle()
        release.set()
        await asyncio.sleep(0)  # a ends and hands the turn to b ...
        second.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(first, third)
        assert order == ["a", "c"] and queue.running == 0

    asyncio.run(run())
