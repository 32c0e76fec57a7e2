"""The model plane on the root: which model, the plan that places its layers, the
leases on the workers that hold them, and one load, unload or generation at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from hsmdifd import planner
from hsmdifd.bundled import ensure_bundled_model
from hsmdifd.cluster import Cluster, Held
from hsmdifd.config import Config
from hsmdifd.engine import Engine, LoadSpec
from hsmdifd.errors import RequestError
from hsmdifd.gguf_model import (
    ModelFileError,
    ModelNotFoundError,
    ModelShape,
    estimate_memory,
    read_model_shape,
)
from hsmdifd.proto import hsmdif_pb2 as pb
from hsmdifd.rpc import parse_endpoint

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def plan_to_pb(plan: planner.Plan, model: str, endpoints: tuple[str, ...] = ()) -> pb.PlanReply:
    total = plan.predicted_seconds_per_token or 1.0
    reply = pb.PlanReply(
        standalone=plan.standalone,
        model_bytes=plan.model_bytes,
        predicted_tokens_per_s=plan.predicted_tokens_per_s,
        strategy=plan.strategy.value,
        n_ctx=plan.n_ctx,
        n_gpu_layers=plan.n_gpu_layers,
        tensor_split=plan.tensor_split,
        model=model,
    )
    remote = iter(endpoints)
    for i, share in enumerate(plan.shares):
        d = share.device
        reply.devices.append(
            pb.PlanShare(
                name=d.name,
                address=d.address,
                node_id=d.node_id,
                first_layer=share.first_layer,
                layers=share.n_layers,
                holds_output=share.holds_output,
                bytes=share.bytes,
                capacity_bytes=d.usable_bytes,
                predicted_share=share.predicted_seconds_per_token / total,
                speed=d.speed,
                endpoint=next(remote, "") if i else "",
            )
        )
    return reply


def _strategy(name: str, default: str) -> planner.Strategy:
    try:
        return planner.Strategy(name or default)
    except ValueError:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unknown strategy {name!r}: use capacity or latency",
        ) from None


class Models:
    """Loads, unloads and runs models on the local engine, one request at a time."""

    def __init__(self, config: Config, engine: Engine, cluster: Cluster) -> None:
        self._config = config
        self._engine = engine
        self._cluster = cluster
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._held: list[Held] = []
        self._last_request: pb.LoadRequest | None = None
        self._reload = False  # the next prompt loads _last_request again
        self._loaded: tuple[ModelShape, planner.Plan, tuple[int, int]] | None = None
        self.in_flight = 0

    @property
    def info(self) -> pb.ModelInfo:
        return self._engine.info

    @property
    def placed_on(self) -> set[str]:
        """Node ids of the workers holding layers of the loaded model."""
        return {h.node_id for h in self._held}

    def reconfigure(self, config: Config) -> None:
        self._config = config

    async def shape(self, model_path: str) -> ModelShape:
        """The checked header of `model_path` (empty: the default model)."""
        path = model_path or self._config.model.default
        if not path:
            try:
                path = str(await asyncio.to_thread(ensure_bundled_model, self._config.state_dir))
            except (OSError, ValueError) as e:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"cannot prepare the bundled model in {self._config.state_dir}: {e}",
                ) from e
        try:
            return await asyncio.to_thread(read_model_shape, Path(path).expanduser())
        except ModelNotFoundError as e:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(e)) from e
        except ModelFileError as e:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e

    def plan(
        self, shape: ModelShape, n_ctx: int, strategy: str, extra_local: int = 0
    ) -> planner.Plan:
        """Place `shape` on the live devices; RequestError when they cannot hold it."""
        n_ctx = n_ctx or self._config.model.context_length
        if n_ctx < 16:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"--max-seq-len {n_ctx} is too small: give at least 16 tokens",
            )
        credit = {p.node_id: p.bytes for p in self._engine.info.plan.devices[1:]}
        devices = self._cluster.capacities(extra_local, credit)
        if len(devices) == 1:
            estimate = estimate_memory(shape, n_ctx)
            usable = devices[0].usable_bytes
            if estimate.total > usable:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{shape.name} does not fit this device: it needs about "
                    f"{estimate.total // MIB} MiB at a context of {n_ctx} tokens (weights "
                    f"{estimate.weights // MIB} MiB, KV cache {estimate.kv_cache // MIB} MiB, "
                    f"compute {estimate.compute // MIB} MiB, runtime {estimate.margin // MIB} "
                    f"MiB) but {usable // MIB} MiB are usable; try a smaller --max-seq-len or "
                    "a smaller model",
                )
        try:
            return planner.plan(
                shape, n_ctx, devices, _strategy(strategy, self._config.model.strategy)
            )
        except planner.PlanError as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None

    async def describe(self, request: pb.PlanRequest) -> pb.PlanReply:
        """The plan for a model, without loading anything."""
        if request.num_parameters or request.quantize:
            try:
                shape = planner.hypothetical_shape(request.num_parameters, request.quantize)
            except ValueError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        else:
            shape = await self.shape(request.model_path)
        plan = self.plan(shape, request.max_seq_len, request.strategy, self._engine.footprint())
        return plan_to_pb(plan, shape.path or shape.name)

    async def load(self, request: pb.LoadRequest) -> AsyncIterator[pb.LoadEvent]:
        yield pb.LoadEvent(progress=pb.LoadProgress(fraction=0.0, stage="checking"))
        async with self._lock:
            async for event in self._load(request):
                yield event
            self._arm_idle_timer()

    async def _load(self, request: pb.LoadRequest) -> AsyncIterator[pb.LoadEvent]:
        shape = await self.shape(request.model_path)
        plan = self.plan(shape, request.max_seq_len, request.strategy, self._engine.footprint())
        threads = request.threads or self._config.threads
        await self._unload()
        self._last_request = request
        if not plan.standalone:
            yield pb.LoadEvent(progress=pb.LoadProgress(fraction=0.0, stage="leasing"))
            self._held = await self._cluster.acquire_leases(plan)
        endpoints = tuple(h.endpoint for h in self._held)
        spec = LoadSpec(shape, plan.n_ctx, threads, plan, tuple(h.local for h in self._held))
        log.info(
            "loading %s (context %d, %d threads) on %s",
            shape.path,
            plan.n_ctx,
            threads,
            ", ".join(f"{s.device.name}: {s.n_layers} layers" for s in plan.shares),
        )
        try:
            async for event in self._engine.load(spec):
                if event.HasField("loaded"):
                    self._engine.info.plan.CopyFrom(plan_to_pb(plan, shape.path, endpoints))
                    event.loaded.plan.CopyFrom(self._engine.info.plan)
                yield event
        except RequestError as e:
            await self._release()
            raise await self._name_lost_worker(e) from e
        except BaseException:
            await self._release()
            raise
        epoch = self._cluster.epoch()
        self._loaded = (shape, plan, (epoch.policy_version, epoch.generation))
        log.info("loaded %s in %.2f s", shape.path, self.info.load_seconds)

    async def _name_lost_worker(self, error: RequestError) -> RequestError:
        """Add which RPC worker stopped answering, when one did."""
        if error.code != grpc.StatusCode.ABORTED:
            return error
        plan = self._engine.info.plan
        lost = [p for p in plan.devices if p.endpoint and not await _reachable(p.endpoint)]
        if not lost:
            return error
        names = ", ".join(f"{p.name} ({p.endpoint})" for p in lost)
        return RequestError(error.code, f"{error}; the RPC worker on {names} stopped answering")

    async def _release(self) -> None:
        held, self._held = self._held, []
        await self._cluster.release_leases(held)

    async def _unload(self) -> bool:
        self._loaded = None
        was_loaded = await self._engine.unload()
        await self._release()
        return was_loaded

    async def unload(self) -> bool:
        async with self._lock:
            self._reload = False
            return await self._unload()

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        """Stream an answer, loading the model first when none is ready."""
        self.in_flight += 1
        try:
            async with self._lock:
                self._cancel_idle_timer()
                if self._engine.state != pb.READY:
                    # After a failure or an unload to plan anew, what was loaded last;
                    # else the default.
                    again = (
                        self._last_request
                        if self._reload or self._engine.state == pb.FAILED
                        else None
                    )
                    self._reload = False
                    async for load_event in self._load(again or pb.LoadRequest()):
                        if load_event.HasField("progress"):
                            yield pb.GenerateEvent(loading=load_event.progress)
                if request.max_tokens == 0:
                    request.max_tokens = self._config.model.max_tokens
                try:
                    async for event in self._engine.generate(request):
                        yield event
                except RequestError as e:
                    error = await self._name_lost_worker(e)
                    if self._engine.state != pb.READY:
                        await self._release()
                    raise error from e
        finally:
            self.in_flight -= 1
            self._arm_idle_timer()

    async def lost_devices(self, live: set[str]) -> None:
        """A device holding layers is gone: unload, and the next prompt plans anew.

        With an answer or a load in flight, end the engine instead: llama.cpp would
        wait on that device's RPC worker for ever (a frozen device keeps its
        connections open), and the request fails naming the device.
        """
        gone = [h.name for h in self._held if h.node_id not in live]
        if not gone:
            return
        if self.in_flight or self._lock.locked():
            await self._engine.abandon(
                f"{', '.join(gone)} stopped answering (no heartbeat for "
                f"{self._config.timing.dead_after:g} s) and held layers of the model: "
                "the request was cut off; the next prompt plans without it"
            )
            return
        async with self._lock:
            if self._held and not self.placed_on <= live:
                await self._unload_to_replan("a device holding layers is gone")

    async def leases_lost(self, stalled: float) -> None:
        """This device stopped for `stalled` seconds, long enough for the devices
        holding layers to count it as gone and end their leases."""
        ended = self._held
        if not ended or self.in_flight:
            return
        async with self._lock:
            if self._held is ended:  # not loaded anew, on fresh leases, while this waited
                await self._unload_to_replan(
                    f"this device stopped for {stalled:.1f} s and its leases ended"
                )

    async def _unload_to_replan(self, why: str) -> None:
        """Unload what is split over devices; the next prompt loads it again, planned
        anew over the devices there are then."""
        if self._loaded is None:
            return
        log.warning("%s: unloading %s to plan it anew", why, self.info.path)
        await self._unload()
        self._reload = True

    async def replan(self) -> None:
        """Reload when the policy or the membership changed and a fresh plan would use
        other devices (a device that would give a better plan joined, say). Only idle:
        never while an answer is in flight."""
        if self._loaded is None or self.in_flight or self._lock.locked():
            return
        shape, plan, seen = self._loaded
        epoch = self._cluster.epoch()
        if (epoch.policy_version, epoch.generation) == seen or self._last_request is None:
            return
        self._loaded = (shape, plan, (epoch.policy_version, epoch.generation))
        request = self._last_request
        try:
            fresh = self.plan(shape, plan.n_ctx, request.strategy, self._engine.footprint())
        except RequestError:
            return  # what is loaded keeps working; a prompt will say what is wrong
        before = [s.device.node_id for s in plan.shares]
        after = [s.device.node_id for s in fresh.shares]
        if before == after:
            return
        log.info("re-planning %s: %s instead of %s", shape.path, after, before)
        async with self._lock:
            if not self.in_flight:
                async for _ in self._load(request):
                    pass

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
                await self.unload()

        self._idle_task = asyncio.get_running_loop().create_task(unload())

    async def close(self) -> None:
        self._cancel_idle_timer()
        with contextlib.suppress(Exception):
            await self._unload()


async def _reachable(endpoint: str) -> bool:
    host, port = parse_endpoint(endpoint)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
