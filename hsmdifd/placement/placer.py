"""Placing a model on the root: its checked header, the plan over the live devices,
the leases on the workers and the engine's load; the one owner of the model that
serves (`Loaded`) and of the person's choice (`Wanted`), see lifecycle.py.

Models (models.py) calls it under its lock, one change at a time. Every change of
state here runs to its end through `finish`, cancelled caller or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator
from pathlib import Path

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import election
from hsmdifd.cluster.root_leases import Held
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon import timing
from hsmdifd.daemon.config import Config
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine.rpc import parse_endpoint
from hsmdifd.engine.supervisor import Engine, LoadSpec, finish
from hsmdifd.placement import fitting, model_files, planner
from hsmdifd.placement.gguf_model import ModelShape
from hsmdifd.placement.lifecycle import (
    Loaded,
    Order,
    Wanted,
    frozen_request,
    load_order,
    wanted_after,
)

log = logging.getLogger(__name__)


def plan_to_pb(plan: planner.Plan, model: str, endpoints: tuple[str, ...] = ()) -> pb.PlanReply:
    reply = pb.PlanReply(model=model, standalone=plan.standalone, n_ctx=plan.n_ctx)
    reply.strategy, reply.model_bytes = plan.strategy.value, plan.model_bytes
    reply.n_gpu_layers = plan.n_gpu_layers
    reply.tensor_split.extend(plan.tensor_split)
    reply.predicted_tokens_per_s = plan.predicted_tokens_per_s
    total = plan.predicted_seconds_per_token or 1.0
    remote = iter(endpoints)
    for i, share in enumerate(plan.shares):
        reply.devices.append(_share_pb(share, total, next(remote, "") if i else ""))
    return reply


def _share_pb(share: planner.DeviceShare, total: float, endpoint: str) -> pb.PlanShare:
    """One device's share of a plan; `total` the plan's seconds per token."""
    d = share.device
    row = pb.PlanShare(name=d.name, address=d.address, node_id=d.node_id, speed=d.speed)
    row.capacity_bytes, row.endpoint = d.usable_bytes, endpoint
    row.first_layer, row.layers = share.first_layer, share.n_layers
    row.holds_output, row.bytes = share.holds_output, share.bytes
    row.predicted_share = share.predicted_seconds_per_token / total
    return row


class Placer:
    """Loads what is asked where the plan says, keeping what serves where it can."""

    def __init__(self, config: Config, engine: Engine, cluster: Cluster) -> None:
        self._config = config
        self._engine = engine
        self._cluster = cluster
        self._wanted: Wanted | None = None
        self._loaded: Loaded | None = None
        self._placing: tuple[Held, ...] = ()  # leases taken for the load in flight

    @property
    def loaded(self) -> Loaded | None:
        return self._loaded

    @property
    def wanted(self) -> Wanted | None:
        return self._wanted

    @property
    def placing(self) -> tuple[Held, ...]:
        """The leases taken for the load in flight."""
        return self._placing

    def reconfigure(self, config: Config) -> None:
        self._config = config

    def forget_choice(self) -> None:
        """The person unloaded: nothing is wanted any more."""
        self._wanted = None

    def seen(self, epoch: election.Epoch) -> Loaded | None:
        """Mark the cluster's view `epoch` as seen by what serves (a re-plan looked)."""
        if self._loaded is not None:
            self._loaded = dataclasses.replace(self._loaded, epoch=epoch)
        return self._loaded

    async def shape(self, model_path: str) -> ModelShape:
        """The checked header of `model_path` (empty: the default model)."""
        return await model_files.read_shape(await self.source(model_path))

    async def source(self, model_path: str) -> Path:
        """The file `model_path` names (empty: the default model, prepared when bundled)."""
        return await model_files.source(
            model_path, self._config.model.default, self._config.state_dir
        )

    def quantize_level(self, asked: str) -> str:
        """The quantization a request asks for ("4bit", "8bit"), else the configured one."""
        return asked or self._config.model.quantize

    async def planned_copy(self, shape: ModelShape, level: str) -> ModelShape:
        """`shape` as its `level` copy would load, without quantizing."""
        return await model_files.planned_copy(shape, level, self._config.state_dir)

    def plan(
        self, shape: ModelShape, n_ctx: int, strategy: str, extra_local: int = 0
    ) -> planner.Plan:
        """Place `shape` on the live devices; RequestError when they cannot hold it."""
        credit = self._loaded.credit if self._loaded else {}
        return fitting.plan_on(
            shape,
            n_ctx or self._config.model.context_length,
            self._cluster.capacities(extra_local, credit),
            strategy,
            self._config.model.strategy,
        )

    def threads(self, request: pb.LoadRequest) -> int:
        """The thread count to load with; more than this device has is refused."""
        return fitting.thread_count(request.threads, self._config.threads)

    async def place(
        self,
        request: pb.LoadRequest,
        chosen: bool,
        known: tuple[ModelShape, planner.Plan] | None = None,
    ) -> AsyncGenerator[pb.LoadEvent, None]:
        """Load `request` (`chosen`: the person's new choice; else what is wanted, again),
        planned anew or placed as `known`; then say what is wanted from now on."""
        try:
            async with contextlib.aclosing(self._place_once(request, known)) as events:
                async for event in events:
                    if event.HasField("loaded"):  # said before the caller may stop listening
                        self._after(request, chosen, None)
                    yield event
        except RequestError as e:
            self._after(request, chosen, e.code)
            raise
        except Exception:
            self._after(request, chosen, grpc.StatusCode.UNKNOWN)
            raise

    def _after(
        self, request: pb.LoadRequest, chosen: bool, failure: grpc.StatusCode | None
    ) -> None:
        serving = self._loaded.request if self._loaded else None
        self._wanted = wanted_after(self._wanted, request, chosen, failure, serving)

    async def _place_once(
        self, request: pb.LoadRequest, known: tuple[ModelShape, planner.Plan] | None
    ) -> AsyncGenerator[pb.LoadEvent, None]:
        if self._loaded is not None and self._engine.state != pb.READY:
            await self.unload()  # the engine died under it: its leases go too
        threads = self.threads(request)
        if known is not None:
            shape = known[0]
        else:
            path = await self.source(request.model_path)
            if level := self.quantize_level(request.quantize):
                made = model_files.quantized(path, level, self._config.state_dir, threads)
                async with contextlib.aclosing(made) as steps:
                    async for step in steps:
                        if isinstance(step, Path):
                            path = step
                        else:
                            yield step
            shape = await model_files.read_shape(path)
        old = self._loaded  # what serves now: kept, or loaded again if it must go first
        for attempt in (1, 2):
            if known is not None and attempt == 1:
                plan = known[1]
            else:
                footprint = self._engine.footprint()
                plan = self.plan(shape, request.max_seq_len, request.strategy, footprint)
            order = load_order(self._loaded, plan, self._free(self._loaded))
            if self._loaded is not None and order is Order.REPLACE:
                log.info("unloading %s first: memory does not hold both", self._loaded.shape.path)
                await self.unload()
            try:
                async with contextlib.aclosing(
                    self._start(request, shape, plan, threads, order)
                ) as events:
                    async for event in events:
                        yield event
                return
            except RequestError as e:
                gone = [s.device.name for s in plan.shares if s.device.node_id not in self._live()]
                if attempt == 1 and gone:
                    # A device of the plan died while it was leased or loaded (a prompt
                    # right after a loss, before the death was noticed): plan again.
                    log.warning("%s; planning again without %s", e, ", ".join(gone))
                    continue
                if old is None or self._loaded is old:
                    raise  # nothing was lost: what served serves on
                raise await self._restore(old, e) from e

    def _live(self) -> set[str]:
        return self._cluster.live_ids()

    def _free(self, loaded: Loaded | None) -> dict[str, int]:
        """Usable memory by node id with `loaded` still in it. A declared figure stays
        the same whatever runs, so the root's share of `loaded` comes off it."""
        free = {d.node_id: d.usable_bytes for d in self._cluster.capacities()}
        if loaded is not None and self._config.resources.memory_override_mb:
            root = loaded.plan.shares[0]
            free[root.device.node_id] = max(0, free.get(root.device.node_id, 0) - root.bytes)
        return free

    async def _restore(self, old: Loaded, error: RequestError) -> RequestError:
        """Load `old` again, where it was, after `error` ended what replaced it; the
        error, saying what became of `old`."""
        name = old.shape.path
        try:
            threads = self.threads(old.request)
            async with contextlib.aclosing(
                self._start(old.request, old.shape, old.plan, threads, Order.REPLACE)
            ) as events:
                async for _ in events:
                    pass
        except RequestError as again:
            log.warning("loading %s again failed: %s", name, again)
            return RequestError(
                error.code,
                f"{error}; {name} had been unloaded to make room (memory does not hold "
                f"both) and could not be loaded again ({again}): the next prompt tries",
            )
        log.info("%s is loaded again", name)
        return RequestError(
            error.code,
            f"{error}; {name} had been unloaded to make room (memory does not hold both) "
            "and is loaded again",
        )

    async def _start(
        self,
        request: pb.LoadRequest,
        shape: ModelShape,
        plan: planner.Plan,
        threads: int,
        order: Order,
    ) -> AsyncGenerator[pb.LoadEvent, None]:
        """Lease the workers of `plan` and load it; `_loaded` says so once it serves."""
        try:
            if not plan.standalone:
                yield pb.LoadEvent(progress=pb.LoadProgress(fraction=0.0, stage="leasing"))
                await finish(self._lease(plan))
            endpoints = tuple(h.endpoint for h in self._placing)
            local = tuple(h.local for h in self._placing)  # the relays to the workers
            spec = LoadSpec(shape, plan.n_ctx, threads, plan, local)
            log.info(
                "loading %s (context %d, %d threads) on %s",
                shape.path,
                plan.n_ctx,
                threads,
                ", ".join(f"{s.device.name}: {s.n_layers} layers" for s in plan.shares),
            )
            loads = self._engine.load(spec, keep=order is Order.BESIDE)
            async with contextlib.aclosing(loads) as events:
                async for event in events:
                    if event.HasField("loaded"):
                        await finish(self._serve(request, shape, plan))
                        event.loaded.plan.CopyFrom(plan_to_pb(plan, shape.path, endpoints))
                    yield event
        except RequestError as e:
            placing = self._placing
            await finish(self._drop_placing())
            raise await name_lost_worker(e, placing, self._cluster) from e
        except BaseException:
            await finish(self._drop_placing())
            raise
        log.info("loaded %s in %.2f s", shape.path, self._engine.info.load_seconds)

    async def _lease(self, plan: planner.Plan) -> None:
        self._placing = tuple(await self._cluster.acquire_leases(plan))

    async def _serve(self, request: pb.LoadRequest, shape: ModelShape, plan: planner.Plan) -> None:
        """The engine serves the new model: it is the loaded one; the leases of the one
        it replaced (loaded beside it) end."""
        old = self._loaded
        epoch = self._cluster.epoch()
        self._loaded = Loaded(frozen_request(request), shape, plan, self._placing, epoch)
        self._placing = ()
        if old is not None:
            await self._cluster.release_leases(list(old.leases))

    async def _drop_placing(self) -> None:
        placing, self._placing = self._placing, ()
        await self._cluster.release_leases(list(placing))

    async def forget(self) -> None:
        """The engine lost the model (its process died): end the leases it ran on."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            await self._cluster.release_leases(list(loaded.leases))

    async def unload(self) -> bool:
        return await finish(self._unload_now())

    async def _unload_now(self) -> bool:
        loaded, self._loaded = self._loaded, None
        was_loaded = await self._engine.unload()
        if loaded is not None:
            await self._cluster.release_leases(list(loaded.leases))
        return was_loaded


async def name_lost_worker(
    error: RequestError, leases: tuple[Held, ...], cluster: Cluster | None = None
) -> RequestError:
    """Add which RPC worker stopped answering, when one did; `cluster` then leaves it out
    of plans until it is heard from again (membership would say so only later)."""
    if error.code != grpc.StatusCode.ABORTED:
        return error
    lost = [h for h in leases if not await _reachable(h.endpoint)]
    if not lost:
        return error
    if cluster is not None:
        cluster.unreachable({h.node_id for h in lost})
    names = ", ".join(f"{h.name} ({h.endpoint})" for h in lost)
    return RequestError(error.code, f"{error}; the RPC worker on {names} stopped answering")


async def _reachable(endpoint: str) -> bool:
    host, port = parse_endpoint(endpoint)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timing.RPC_PROBE_TIMEOUT
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
