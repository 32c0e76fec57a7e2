"""The Control service hsmdifctl talks to over the Unix socket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from hsmdifd import __version__
from hsmdifd.errors import RequestError
from hsmdifd.models import Models
from hsmdifd.node import Identity
from hsmdifd.proto import hsmdif_pb2 as pb
from hsmdifd.proto import hsmdif_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_ROLES = {"user", "assistant", "system"}
Context = grpc.aio.ServicerContext[Any, Any]


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
    def __init__(
        self,
        identity: Identity,
        models: Models,
        device_profile: Callable[[bool], pb.DeviceProfile],
    ) -> None:
        self._identity = identity
        self._models = models
        self._device_profile = device_profile
        self._started = time.monotonic()

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusReply:
        return pb.StatusReply(
            node_id=self._identity.node_id,
            name=self._identity.name,
            role="root",
            root_name=self._identity.name,
            model=self._models.info,
            version=__version__,
            address=self._identity.address,
            uptime_seconds=time.monotonic() - self._started,
        )

    async def Devices(self, request: pb.DevicesRequest, context: Context) -> pb.DevicesReply:
        profile = await asyncio.to_thread(self._device_profile, request.refresh_speed)
        return pb.DevicesReply(devices=[profile])

    async def Load(self, request: pb.LoadRequest, context: Context) -> AsyncIterator[pb.LoadEvent]:
        try:
            async for event in self._models.load(request):
                yield event
        except RequestError as e:
            log.warning("load refused: %s", e)
            await context.abort(e.code, str(e))

    async def Unload(self, request: pb.UnloadRequest, context: Context) -> pb.UnloadReply:
        return pb.UnloadReply(was_loaded=await self._models.unload())

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateEvent]:
        try:
            check_generate(request)
            async for event in self._models.generate(request):
                yield event
        except RequestError as e:
            log.warning("generation failed: %s", e)
            await context.abort(e.code, str(e))
