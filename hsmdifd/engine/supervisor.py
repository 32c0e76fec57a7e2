"""The engine supervisor: runs the engine child and tracks its state.

States: IDLE (no child), LOADING, READY, FAILED (the last load failed or the
child died; `error` says why). The child owns the model; unloading ends the
child, which returns every byte to the OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine.process import EngineProcess, describe_exit
from hsmdifd.engine.prompts import base_model_request
from hsmdifd.placement.gguf_model import ModelShape
from hsmdifd.placement.planner import Plan

log = logging.getLogger(__name__)

T = TypeVar("T")
_serial = itertools.count()


async def finish(step: Awaitable[T]) -> T:
    """Await `step` to its end even when the caller is cancelled meanwhile, then pass
    the cancellation on: a change of state (a child started or ended, leases taken or
    released) is never left half done, so what the daemon says and the processes that
    run always agree."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: an error of the step goes with the cancellation
        raise asyncio.CancelledError
    return task.result()


@dataclass(frozen=True)
class LoadSpec:
    """What to load: a checked model, how to run it, and where its layers go."""

    shape: ModelShape
    context_length: int
    threads: int
    plan: Plan
    endpoints: tuple[str, ...] = ()  # leased RPC endpoints, in registration order

    @property
    def estimated_bytes(self) -> int:
        return self.plan.total_bytes


def _cancelled_itself() -> bool:
    """Whether the running task is being cancelled (its client went away), rather than
    waiting on a call whose channel was closed under it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Engine:
    """Supervises the engine child; every public method is loop-safe.

    One child serves (`READY`). A load may start a second one beside it, the candidate,
    and swap it in once it has loaded: the serving model is kept until the new one is
    ready, and kept for good when the new one fails. Every change of state runs through
    `finish`, so a cancelled caller never leaves a child without a state that says so.
    """

    def __init__(self, socket_path: Path) -> None:
        self._socket_path = socket_path
        self._child: EngineProcess | None = None
        self._candidate: EngineProcess | None = None
        self._watch: asyncio.Task[None] | None = None
        self._spare: asyncio.Task[EngineProcess] | None = None  # started ahead of a load
        self._info = pb.ModelInfo(state=pb.IDLE)
        self.on_death: Callable[[], None] | None = None
        """Called when the serving child dies by itself (crash, abort, OOM kill)."""

    @property
    def info(self) -> pb.ModelInfo:
        """The serving model, as a copy: only the engine changes its state."""
        info = pb.ModelInfo()
        info.CopyFrom(self._info)
        return info

    @property
    def state(self) -> pb.ModelState.ValueType:
        return self._info.state

    @property
    def n_ctx(self) -> int:
        """The context llama.cpp runs the serving model with (it pads the one asked for)."""
        return self._info.context_length

    def pids(self) -> list[int]:
        return [c.proc.pid for c in (self._child, self._candidate) if c is not None]

    def footprint(self) -> int:
        """Memory the loaded model gives back when it is replaced (0 when none)."""
        return self._child.private_bytes() if self._child else 0

    async def load(self, spec: LoadSpec, keep: bool = False) -> AsyncGenerator[pb.LoadEvent, None]:
        """Load `spec`, yielding progress, then the model once it serves.

        Without `keep` whatever is loaded is ended first. With it, the serving model
        goes on serving until the new one has loaded, and stays when the new one fails
        or the load is cancelled.
        """
        if not keep or self._child is None:
            await self.unload()
            self._info = _loading_info(spec)
        child = None
        try:
            child = await finish(self._start_candidate())
            request = pb.EngineLoadRequest(
                model_path=spec.shape.path,
                context_length=spec.context_length,
                threads=spec.threads,
                rpc_endpoints=spec.endpoints,
            )
            if spec.endpoints:
                request.n_gpu_layers = spec.plan.n_gpu_layers
                request.tensor_split.extend(spec.plan.tensor_split)
            loaded = None
            async for event in child.stub.Load(request):
                if event.HasField("loaded"):
                    loaded = event.loaded
                else:
                    yield event
            if loaded is None:
                raise RequestError(grpc.StatusCode.INTERNAL, "the engine process said nothing")
            await finish(self._swap_in(child, spec, loaded))
        except (asyncio.CancelledError, GeneratorExit) as e:
            if isinstance(e, GeneratorExit) or _cancelled_itself():
                await finish(self._drop_candidate(None))
                raise
            raise await finish(self._load_failed(e, child)) from e
        except Exception as e:
            error = await finish(self._load_failed(e, child))
            if error is e:
                raise
            raise error from e
        yield pb.LoadEvent(loaded=self.info)

    def _next_socket(self) -> Path:
        return self._socket_path.with_name(f"{self._socket_path.stem}-{next(_serial)}.sock")

    def prepare(self) -> None:
        """Start an engine process now for the load that follows (an answer that goes on
        after a lost device): its start overlaps the leasing."""
        if self._spare is None:
            self._spare = asyncio.ensure_future(EngineProcess.start(self._next_socket()))

    async def discard_spare(self) -> None:
        """End the process prepare() started, when no load follows after all."""
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(RequestError):
                await (await finish(spare)).stop()

    async def _start_candidate(self) -> EngineProcess:
        spare, self._spare = self._spare, None
        child = None
        if spare is not None:
            with contextlib.suppress(RequestError):
                child = await spare
        self._candidate = child or await EngineProcess.start(self._next_socket())
        return self._candidate

    async def _swap_in(self, child: EngineProcess, spec: LoadSpec, loaded: pb.ModelInfo) -> None:
        old = self._child
        self._stop_watch()
        self._child, self._candidate = child, None
        self._info = _loading_info(spec)
        self._info.MergeFrom(loaded)
        self._info.state = pb.READY
        self._watch = asyncio.create_task(self._watch_child(child))
        if old is not None:
            await old.stop()

    async def _drop_candidate(self, error: BaseException | None) -> None:
        """End the candidate; with no model kept, the state says why (IDLE when the load
        was cancelled, FAILED with `error`)."""
        child, self._candidate = self._candidate, None
        if child is not None:
            await child.stop()
        if self._child is None:
            self._info = pb.ModelInfo(state=pb.IDLE)
            if error is not None:
                self._info.state = pb.FAILED
                self._info.error = str(error)

    async def _load_failed(
        self, error: BaseException, child: EngineProcess | None
    ) -> BaseException:
        error = await self._failed_child_error(error, "loading", child)
        await self._drop_candidate(error)
        return error

    async def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.GenerateEvent, None]:
        child = self._child
        if child is None or self.state != pb.READY:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "no model is loaded")
        if not self._info.chat_template:
            request, notice = base_model_request(request, self._info.name or self._info.path)
            yield pb.GenerateEvent(notice=notice)
        try:
            async for event in child.stub.Generate(request):
                yield event
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError) and _cancelled_itself():
                raise
            raise await self._failed_child_error(e, "generating", child) from e

    async def abandon(self, reason: str) -> None:
        """End the children whatever they are doing, when what they wait on will never
        answer (llama.cpp waits on an RPC worker for ever). The request in flight fails
        with `reason`; the next prompt loads again."""
        if self._child is None and self._candidate is None:
            return
        log.error("%s: ending the engine process", reason)
        await finish(self._abandon(reason))

    async def _abandon(self, reason: str) -> None:
        children = [c for c in (self._candidate, self._child) if c is not None]
        for child in children:
            child.abandoned = reason
        self._stop_watch()
        self._child = self._candidate = None
        self._info = pb.ModelInfo(state=pb.FAILED, error=reason)
        for child in children:
            await child.stop()

    async def _failed_child_error(
        self, error: BaseException, doing: str, child: EngineProcess | None
    ) -> BaseException:
        """Turn an error from the child's channel into a sentence for the user.

        The child's death shows as UNAVAILABLE, or as a cancelled call when the channel
        was closed first (by the watcher, or by abandon(), which says why); either way
        the exit status tells.
        """
        cancelled = isinstance(error, asyncio.CancelledError)
        if not cancelled and not isinstance(error, grpc.aio.AioRpcError):
            return error
        if child is not None and child.abandoned:
            return RequestError(grpc.StatusCode.ABORTED, child.abandoned)
        code = grpc.StatusCode.CANCELLED
        details = "the call to the engine process was closed"
        if isinstance(error, grpc.aio.AioRpcError):
            code, details = error.code(), error.details() or error.code().name
        if child is not None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 2.0)
            if child.proc.returncode is not None:
                return RequestError(
                    grpc.StatusCode.ABORTED,
                    f"the engine process died while {doing} "
                    f"({describe_exit(child.proc.returncode)}); the model is no longer "
                    "loaded: the next prompt loads it again",
                )
        if code == grpc.StatusCode.CANCELLED:
            code = grpc.StatusCode.ABORTED  # the client did not cancel: never pass that on
        return RequestError(code, details)

    async def _watch_child(self, child: EngineProcess) -> None:
        returncode = await child.proc.wait()
        if self._child is child:
            reason = describe_exit(returncode)
            log.error(
                "the engine process died (%s); %s is no longer loaded", reason, self._info.path
            )
            self._child, self._watch = None, None
            self._info.state = pb.FAILED
            self._info.error = f"the engine process died ({reason})"
            await child.stop()
            if self.on_death is not None:
                self.on_death()

    def _stop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()

    async def unload(self) -> bool:
        """End the children; True when a model was loaded."""
        was_loaded = self.state == pb.READY
        await finish(self._unload())
        return was_loaded

    async def _unload(self) -> None:
        children = [c for c in (self._candidate, self._child) if c is not None]
        self._stop_watch()
        self._child = self._candidate = None
        self._info = pb.ModelInfo(state=pb.IDLE)
        for child in children:
            await child.stop()

    @staticmethod
    def child_socket(runtime_dir: Path) -> Path:
        return runtime_dir / f"engine-{os.getpid()}.sock"


def _loading_info(spec: LoadSpec) -> pb.ModelInfo:
    shape = spec.shape
    return pb.ModelInfo(
        state=pb.LOADING,
        path=shape.path,
        name=shape.name,
        size_bytes=shape.size_bytes,
        context_length=spec.context_length,
        threads=spec.threads,
        architecture=shape.architecture,
        n_layer=shape.n_layer,
        estimated_bytes=spec.estimated_bytes,
        chat_template=shape.chat_template is not None,
    )
