"""The Control service hsmdifctl talks to over the Unix socket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from hsmdifd import __version__
from hsmdifd.cluster import Cluster
from hsmdifd.errors import RequestError
from hsmdifd.proto import hsmdif_pb2 as pb
from hsmdifd.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.routing import Router

log = logging.getLogger(__name__)

_ROLES = {"user", "assistant", "system"}
Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


def check_generate(request: pb.GenerateRequest) -> None:
    """Refuse a malformed generation request before it reaches the engine."""
    if request.max_tokens < 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"--max-tokens must be at least 1 (got {request.max_tokens})",
        )
    if request.HasField("temperature") and not 0.0 <= request.temperature <= 5.0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"--temperature must be between 0 and 5 (got {request.temperature:g})",
        )
    if request.raw:
        if not request.prompt:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        return
    if not request.messages or not any(m.content.strip() for m in request.messages):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
    for m in request.messages:
        if m.role not in _ROLES:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown message role {m.role!r}: use user, assistant or system",
            )


class ControlService(pb_grpc.ControlServicer):
    """Answers hsmdifctl; model requests go to the root, wherever it is."""

    def __init__(
        self,
        cluster: Cluster,
        router: Router,
        device_profile: Callable[[bool], pb.DeviceProfile],
    ) -> None:
        self._cluster = cluster
        self._router = router
        self._device_profile = device_profile
        self._started = time.monotonic()

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusReply:
        cluster = self._cluster
        model = self._router.model_info()
        warning = ""
        if cluster.refused:
            warning = (
                f"this device's node id is also used by {cluster.refused}, which started "
                "first: it does not join; delete node_id in the state directory and restart"
            )
        elif not cluster.enabled:
            warning = "no cluster secret: this device runs alone (see hsmdifctl cluster init)"
        queued, in_flight, max_queue = self._router.load_counts()
        return pb.StatusReply(
            node_id=cluster.identity.node_id,
            name=cluster.identity.name,
            role="root" if cluster.is_root else "worker",
            root_name=cluster.root_name(),
            model=model,
            version=__version__,
            address=cluster.identity.address,
            uptime_seconds=time.monotonic() - self._started,
            epoch=cluster.epoch_pb(),
            policy=cluster.policy_for_people(),
            warning=warning,
            generating=self._router.generating(),
            queued=queued,
            in_flight=in_flight,
            max_queue=max_queue,
        )

    async def Devices(self, request: pb.DevicesRequest, context: Context) -> pb.DevicesReply:
        device = await asyncio.to_thread(self._device_profile, request.refresh_speed)
        self._cluster.set_device(device)
        devices = self._cluster.devices()
        shares = {p.node_id: p for p in self._router.model_info().plan.devices}
        for d in devices:
            if d.id in shares:
                d.layers = shares[d.id].layers + shares[d.id].holds_output
                d.share_bytes = shares[d.id].bytes
        return pb.DevicesReply(devices=devices)

    async def SetPriority(self, request: pb.SetPriorityRequest, context: Context) -> pb.Policy:
        if not request.by_memory and not request.devices:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "name the devices in priority order, or give --prioritize-by-memory",
            )
        try:
            await self._cluster.set_priority(list(request.devices), request.by_memory)
        except RequestError as e:
            await context.abort(e.code, str(e))
        return self._cluster.policy_for_people()

    async def Plan(self, request: pb.PlanRequest, context: Context) -> pb.PlanReply:
        try:
            return await self._router.plan(request)
        except RequestError as e:
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises

    async def Load(self, request: pb.LoadRequest, context: Context) -> AsyncIterator[pb.LoadEvent]:
        try:
            async for event in self._router.load(request):
                yield event
        except RequestError as e:
            log.warning("load refused: %s", e)
            await context.abort(e.code, str(e))

    async def Unload(self, request: pb.UnloadRequest, context: Context) -> pb.UnloadReply:
        try:
            return await self._router.unload(request)
        except RequestError as e:
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateEvent]:
        try:
            check_generate(request)
            async for event in self._router.generate(request):
                yield event
        except RequestError as e:
            log.warning("generation failed: %s", e)
            await context.abort(e.code, str(e))
