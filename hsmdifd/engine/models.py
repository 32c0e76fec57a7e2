"""The model plane on the root: one load, unload or generation at a time, and what
the model does when the cluster changes. Where a model goes and how it gets there is
placer.py's; what to do is decided in lifecycle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon.config import Config
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine import resume
from hsmdifd.engine.place_again import place_again
from hsmdifd.engine.prompts import check_prompt_size, prompt_bytes
from hsmdifd.engine.resume import Answer
from hsmdifd.engine.supervisor import Engine, finish
from hsmdifd.placement import planner
from hsmdifd.placement.lifecycle import Action, Loaded, Wanted, after_change, moves
from hsmdifd.placement.placer import Placer, plan_to_pb

log = logging.getLogger(__name__)

__all__ = ["Models", "plan_to_pb"]


class Models:
    """Loads, unloads and runs models on the local engine, one request at a time; the
    placer owns the model that serves and the person's choice."""

    def __init__(self, config: Config, engine: Engine, cluster: Cluster) -> None:
        self._config = config
        self._engine = engine
        self._cluster = cluster
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._placer = Placer(config, engine, cluster)
        self.in_flight = 0
        self._background: set[asyncio.Task[None]] = set()
        engine.on_death = self._engine_died

    def _engine_died(self) -> None:
        """The engine died with no request to notice: end its leases now, so that no
        worker keeps a relay open for it (the next prompt loads the model again)."""
        task = asyncio.get_running_loop().create_task(self._forget_dead_engine())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _forget_dead_engine(self) -> None:
        async with self._lock:  # a request in flight handles it itself, first
            if self._engine.state == pb.FAILED and self._placer.loaded is not None:
                log.info("ending the leases of the engine that died")
                await finish(self._placer.forget())

    @property
    def info(self) -> pb.ModelInfo:
        """The engine's status, with the plan of the model that serves."""
        info = self._engine.info
        loaded = self._placer.loaded
        if loaded is not None and info.state == pb.READY:
            info.plan.CopyFrom(plan_to_pb(loaded.plan, loaded.shape.path, loaded.endpoints))
        return info

    @property
    def loaded(self) -> Loaded | None:
        return self._placer.loaded

    @property
    def wanted(self) -> Wanted | None:
        return self._placer.wanted

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self._placer.reconfigure(config)

    async def describe(self, request: pb.PlanRequest) -> pb.PlanReply:
        """The plan for a model, without loading anything."""
        if request.num_parameters:
            try:
                shape = planner.hypothetical_shape(request.num_parameters, request.quantize)
            except ValueError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        else:
            shape = await self._placer.shape(request.model_path)
            if level := self._placer.quantize_level(request.quantize):
                shape = await self._placer.planned_copy(shape, level)
        plan = self._placer.plan(
            shape, request.max_seq_len, request.strategy, self._engine.footprint()
        )
        return plan_to_pb(plan, shape.path or shape.name)

    async def load(self, request: pb.LoadRequest) -> AsyncGenerator[pb.LoadEvent, None]:
        """The person's choice: load `request`, keeping what serves until it is ready."""
        yield pb.LoadEvent(progress=pb.LoadProgress(fraction=0.0, stage="checking"))
        async with self._lock:
            async with contextlib.aclosing(self._placer.place(request, chosen=True)) as events:
                async for event in events:
                    yield event
            self._arm_idle_timer()

    async def unload(self) -> bool:
        """The person's unload: nothing is wanted any more."""
        async with self._lock:
            self._placer.forget_choice()
            return await self._placer.unload()

    async def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.GenerateEvent, None]:
        """Stream an answer, loading what is wanted (else the default) when none serves."""
        self.in_flight += 1
        try:
            async with self._lock:
                self._cancel_idle_timer()
                path = request.model_path  # a continuation begun on a root that was lost
                if self._engine.state != pb.READY or (path and path != self._engine.info.path):
                    wanted = self._placer.wanted
                    again = wanted.request if wanted else pb.LoadRequest()
                    if path:
                        again = pb.LoadRequest(model_path=path, max_seq_len=request.context_length)
                    places = self._placer.place(again, chosen=False)
                    try:
                        async with contextlib.aclosing(places) as events:
                            async for load_event in events:
                                if load_event.HasField("progress"):
                                    yield pb.GenerateEvent(loading=load_event.progress)
                    except RequestError as e:
                        if path and e.code == grpc.StatusCode.NOT_FOUND:
                            here = self._cluster.identity.name
                            raise RequestError(e.code, resume.no_file_here(here, path, e)) from e
                        raise
                check_prompt_size(prompt_bytes(request), self._engine.n_ctx)
                if request.max_tokens == 0:
                    request.max_tokens = self._config.model.max_tokens
                answer = Answer(request, time.monotonic(), list(request.produced_tokens))
                while True:
                    loaded = self._placer.loaded
                    leases = loaded.leases if loaded else ()
                    try:
                        answering = self._engine.generate(answer.next_request())
                        async with contextlib.aclosing(answering) as stream:
                            async for event in stream:
                                for out in answer.see(event, time.monotonic()):
                                    yield out
                        return
                    except RequestError as e:
                        await place_again(
                            answer,
                            e,
                            leases,
                            engine=self._engine,
                            placer=self._placer,
                            cluster=self._cluster,
                        )
        finally:
            self.in_flight -= 1
            self._arm_idle_timer()

    def _busy(self) -> bool:
        return self.in_flight > 0 or self._lock.locked()

    def busy(self) -> bool:
        """An answer or a load is in flight."""
        return self._busy()

    def engine_up(self) -> bool:
        """An engine is up here: loading, ready or failed."""
        return self._engine.state != pb.IDLE

    def after_change(self, live: frozenset[str]) -> Action:
        """What the model plane would do after a change that left `live` (pure)."""
        loaded = self._placer.loaded
        placing = frozenset(h.node_id for h in self._placer.placing)
        return after_change(loaded, placing, live, self._cluster.epoch(), self._busy())

    async def step_down(self) -> None:
        """Another device is root: unload, keeping the person's choice (this device
        loads it again if it becomes root)."""
        async with self._lock:
            if self.in_flight:
                return
            log.info("no longer root: unloading %s", self._engine.info.path)
            await self._placer.unload()

    async def lost_devices(self, live: set[str]) -> None:
        """A device holding layers is gone: unload, and the next prompt plans anew.

        With an answer or a load in flight, end the engine instead: llama.cpp would
        wait on that device's RPC worker for ever (a frozen device keeps its
        connections open), and the request fails naming the device.
        """
        loaded = self._placer.loaded
        placing = frozenset(h.node_id for h in self._placer.placing)
        action = after_change(loaded, placing, frozenset(live), self._cluster.epoch(), self._busy())
        if action is Action.ABANDON:
            held = (*self._placer.placing, *(loaded.leases if loaded else ()))
            gone = sorted({h.name for h in held if h.node_id not in live})
            await self._engine.abandon(
                f"{', '.join(gone)} stopped answering (no heartbeat for "
                f"{self._config.timing.dead_after:g} s) and held layers of the model: "
                "the request was cut off; the next prompt plans without it"
            )
        elif action is Action.UNLOAD:
            async with self._lock:
                if self._placer.loaded is loaded:
                    await self._unload_to_replan("a device holding layers is gone")

    async def leases_lost(self, stalled: float) -> None:
        """This device stopped for `stalled` seconds, long enough for the devices
        holding layers to count it as gone and end their leases."""
        loaded = self._placer.loaded
        if loaded is None or not loaded.leases or self.in_flight:
            return
        async with self._lock:
            if self._placer.loaded is loaded:  # not loaded anew, on fresh leases, while this waited
                await self._unload_to_replan(
                    f"this device stopped for {stalled:.1f} s and its leases ended"
                )

    async def _unload_to_replan(self, why: str) -> None:
        """Unload what is split over devices; the next prompt loads what is wanted again,
        planned anew over the devices there are then."""
        if self._placer.loaded is None:
            return
        log.warning("%s: unloading %s to plan it anew", why, self._placer.loaded.shape.path)
        await self._placer.unload()

    async def replan(self) -> None:
        """Place the model anew when the policy or the membership changed and a fresh
        plan would use other devices (a device that would give a better plan joined,
        say). Only idle: never while an answer is in flight. The new placement is loaded
        beside the old where memory holds both; else the old is unloaded first, and
        loaded again where it was when the new one fails."""
        loaded = self._placer.loaded
        epoch = self._cluster.epoch()
        live = frozenset(self._cluster.live_ids())
        if after_change(loaded, frozenset(), live, epoch, self._busy()) is not Action.REPLAN:
            return
        assert loaded is not None
        seen = self._placer.seen(epoch)  # whatever follows
        try:
            fresh = self._placer.plan(
                loaded.shape, loaded.plan.n_ctx, loaded.request.strategy, self._engine.footprint()
            )
        except RequestError:
            return  # what is loaded keeps working; a prompt will say what is wrong
        if not moves(loaded.plan, fresh):
            return
        before = [s.device.name for s in loaded.plan.shares]
        after = [s.device.name for s in fresh.shares]
        log.info("re-planning %s: %s instead of %s", loaded.shape.path, after, before)
        async with self._lock:
            if self.in_flight or self._placer.loaded is not seen:
                return
            try:
                places = self._placer.place(loaded.request, False, (loaded.shape, fresh))
                async with contextlib.aclosing(places) as events:
                    async for _ in events:
                        pass
            except RequestError as e:
                log.warning("re-planning %s failed: %s", loaded.shape.path, e)

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        keep_alive = self._config.model.keep_alive
        if keep_alive > 0 and self._engine.state == pb.READY and self.in_flight == 0:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(keep_alive, self._unload_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _unload_idle(self) -> None:
        async def unload() -> None:
            if self.in_flight == 0 and not self._lock.locked():
                log.info(
                    "unloading %s after %.0f s idle", self.info.path, self._config.model.keep_alive
                )
                async with self._lock:  # still wanted: the next prompt loads it again
                    await self._placer.unload()

        self._idle_task = asyncio.get_running_loop().create_task(unload())

    async def close(self) -> None:
        self._cancel_idle_timer()
        await self._engine.discard_spare()
        self._engine.on_death = None
        for task in self._background:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._placer.unload()
