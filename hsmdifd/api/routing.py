"""Root-or-forward, chosen in one place: every source of requests (the control socket,
the HTTP API) hands a model request to `Router`, which runs it here when this device is
the root and forwards it to the root otherwise, watching the call so that it ends when
the root stops answering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api.queue import RequestQueue
from hsmdifd.cluster.forwarding import Forwarded
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon import timing
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine.models import Models
from hsmdifd.engine.resume import Answer

log = logging.getLogger(__name__)

T = TypeVar("T")


class Router:
    """Model requests, answered by the root wherever it is."""

    def __init__(self, cluster: Cluster, models: Models, queue: RequestQueue) -> None:
        self._cluster = cluster
        self._models = models
        self.queue = queue

    @property
    def here(self) -> bool:
        """Whether this device is the root, so requests run here."""
        return self._cluster.is_root

    def model_info(self) -> pb.ModelInfo:
        """The loaded model, as the root reports it."""
        if self.here:
            return self._models.info
        status = self._cluster.root_status()
        return status.model if status else pb.ModelInfo()

    def root_known(self) -> bool:
        """Whether requests have somewhere to go: this device, or a root that answers."""
        return self.here or self._cluster.root_status() is not None

    def load_counts(self) -> tuple[int, int, int]:
        """Requests waiting at the root, those it is answering, and how many may wait."""
        if self.here:
            return self.queue.waiting, self.queue.running, self.queue.max_waiting
        status = self._cluster.root_status()
        if status is None:
            return 0, 0, 0
        return status.queued, int(status.generating), status.max_queue

    def generating(self) -> bool:
        """Whether the root has an answer in flight."""
        if self.here:
            return self._models.in_flight > 0
        status = self._cluster.root_status()
        return status is not None and status.generating

    async def plan(self, request: pb.PlanRequest) -> pb.PlanReply:
        if self.here:
            return await self._models.describe(request)
        return await _ask_root(self._cluster, self._cluster.root_stub().Plan(request))

    async def load(self, request: pb.LoadRequest) -> AsyncIterator[pb.LoadEvent]:
        if self.here:
            async for event in self._models.load(request):
                yield event
        else:
            async for event in _relay(self._cluster, self._cluster.root_stub().Load(request)):
                yield event

    async def unload(self, request: pb.UnloadRequest) -> pb.UnloadReply:
        if self.here:
            return pb.UnloadReply(was_loaded=await self._models.unload())
        return await _ask_root(self._cluster, self._cluster.root_stub().Unload(request))

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        """Answer `request` at the root. When the root is lost mid-answer, ask the root
        elected after it to go on from the tokens relayed so far (the stream carries
        their ids), with the same model file."""
        answer = Answer(request, time.monotonic(), list(request.produced_tokens))
        while True:
            root_id = self._cluster.root_id
            remote = not self.here
            if remote and not answer.model_path:
                model = self.model_info()
                answer.model_path, answer.context_length = model.path, model.context_length
            try:
                async for event in self._generate_once(answer.next_request()):
                    for out in answer.see(event, time.monotonic()):
                        yield out
                return
            except RequestError as e:
                lost_at = time.monotonic()
                lost = remote and e.code == grpc.StatusCode.UNAVAILABLE and bool(answer.produced)
                if not lost or not answer.may_resume():
                    raise
                if not await self._next_root(root_id):
                    raise
                answer.lost(lost_at)
                answer.resuming([self._name_of(root_id)], [self._name_of(self._cluster.root_id)])
                log.warning("the root was lost mid-answer: asking the new one to go on")

    async def _next_root(self, lost: str) -> bool:
        """Wait for a root other than `lost`; False when none comes in time."""
        deadline = time.monotonic() + timing.NEW_ROOT
        while time.monotonic() < deadline:
            root = self._cluster.root_id
            if root != lost and (self.here or self._cluster.root_status() is not None):
                return True
            await asyncio.sleep(self._cluster.heartbeat_interval / 2)
        return False

    def _name_of(self, node_id: str) -> str:
        names = {m.node_id: m.name for m in self._cluster.members()}
        return names.get(node_id) or node_id[:8]

    async def _generate_once(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        deadline = asyncio.get_running_loop().time() + timing.LEASE_RETRY
        while True:
            if self.here:
                async for event in self.generate_here(request):
                    yield event
                return
            stub = self._cluster.root_stub()
            started = False
            try:
                async for event in _relay(self._cluster, stub.Generate(request)):
                    started = True
                    yield event
                return
            except RequestError as e:
                # The device this one took for root has not taken the root yet, or has
                # handed it on: views agree within a heartbeat or two, so ask again.
                late = asyncio.get_running_loop().time() > deadline
                if started or late or e.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                if "is not the root" not in str(e):
                    raise
            await asyncio.sleep(self._cluster.heartbeat_interval)

    async def generate_here(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        """Answer on this device's engine, in turn with every other request."""
        async with self.queue.slot():
            async for event in self._models.generate(request):
                yield event


def _from_root(error: BaseException, forwarded: Forwarded) -> RequestError | None:
    """The sentence for a call to the root that failed; None when it was this
    request that was cancelled (its client went away)."""
    root = forwarded.root_name
    if forwarded.orphaned:
        return RequestError(
            grpc.StatusCode.UNAVAILABLE,
            f"the root ({root}) stopped answering and counts as gone; ask again: the "
            "devices left choose another root",
        )
    if not isinstance(error, grpc.aio.AioRpcError):
        return None
    details = error.details() or error.code().name
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        details = f"the root ({root}) cannot be reached: {details}"
    else:
        details = f"on the root ({root}): {details}"
    return RequestError(error.code(), details)


@contextlib.contextmanager
def _naming_the_root(cluster: Cluster, call: grpc.aio.Call) -> Iterator[None]:
    """Watch `call`, made to the root, and turn its errors into sentences naming it."""
    with cluster.forwarding(call) as forwarded:
        try:
            yield
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            if error := _from_root(e, forwarded):
                raise error from e
            raise


async def _ask_root(cluster: Cluster, call: grpc.aio.UnaryUnaryCall[Any, T]) -> T:
    """The root's answer to `call`; its errors name the root."""
    with _naming_the_root(cluster, call):
        return await call


async def _relay(cluster: Cluster, call: grpc.aio.UnaryStreamCall[Any, T]) -> AsyncIterator[T]:
    """Pass a stream from the root on; its errors name the root."""
    with _naming_the_root(cluster, call):
        async for event in call:
            yield event
