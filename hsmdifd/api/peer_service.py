"""The Peer service other daemons call over TCP, every call authenticated."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.api.control_service import add_guarded, check_generate, check_load, check_plan
from hsmdifd.api.routing import Router
from hsmdifd.cluster import auth, peer_auth
from hsmdifd.cluster.peer_channel import PROTOCOL_VERSION
from hsmdifd.cluster.policy import policy_to_pb
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon.errors import RequestError
from hsmdifd.daemon.logs import LogLimiter
from hsmdifd.engine.models import Models
from hsmdifd.placement.leases import Leases

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
_CHALLENGE = re.compile(r"[0-9a-f]{32}")
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class PeerService(pb_grpc.PeerServicer):
    def __init__(
        self, cluster: Cluster, models: Models, leases: Leases, secret: bytes, router: Router
    ) -> None:
        self._cluster, self._models, self._leases = cluster, models, leases
        self._secret, self._router = secret, router
        self._log = LogLimiter(log)

    async def Hello(self, request: pb.HelloRequest, context: Context) -> pb.HelloReply:
        """Prove this device holds the secret, before the caller sends any proof."""
        if not _CHALLENGE.fullmatch(request.challenge) or not _NODE_ID.fullmatch(request.caller_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a malformed challenge: Hello takes 32 lowercase hex digits and the caller's "
                "node id (1 to 128 letters, digits, - or _)",
            )
        me = self._cluster.identity.node_id
        return pb.HelloReply(
            protocol_version=PROTOCOL_VERSION,
            node_id=me,
            proof=auth.hello_proof(self._secret, request.challenge, request.caller_id, me),
        )

    async def Status(self, request: pb.PeerStatus, context: Context) -> pb.PeerStatus:
        caller = peer_auth.caller_id.get()
        if request.device.id != caller:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"status for {request.device.id} sent by {caller}",
            )
        self._cluster.observe(request)
        return self._cluster.local_status()

    async def SetPolicy(self, request: pb.Policy, context: Context) -> pb.Policy:
        if self._cluster.adopt_policy(request, peer_auth.caller_id.get() or ""):
            log.info(
                "policy version %d received from %s", request.version, peer_auth.caller_id.get()
            )
        return policy_to_pb(self._cluster.policy)

    async def _refuse_unless_root(self, context: Context) -> None:
        if not self._cluster.is_root:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self._cluster.identity.name} is not the root; the root is "
                f"{self._cluster.root_name()}",
            )

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateEvent]:
        await self._refuse_unless_root(context)
        try:
            check_generate(request)
            async for event in self._router.generate_here(request):  # in the root's queue
                yield event
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def Load(self, request: pb.LoadRequest, context: Context) -> AsyncIterator[pb.LoadEvent]:
        await self._refuse_unless_root(context)
        try:
            check_load(request)  # a peer's hsmdifctl checked it; a peer's bug may not have
            async for event in self._models.load(request):
                yield event
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def Unload(self, request: pb.UnloadRequest, context: Context) -> pb.UnloadReply:
        await self._refuse_unless_root(context)
        return pb.UnloadReply(was_loaded=await self._models.unload())

    async def Plan(self, request: pb.PlanRequest, context: Context) -> pb.PlanReply:
        await self._refuse_unless_root(context)
        try:
            check_plan(request)
            return await self._models.describe(request)
        except RequestError as e:
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises

    async def StartRpc(self, request: pb.LeaseRequest, context: Context) -> pb.Lease:
        try:
            return await self._leases.start(request, peer_auth.caller_id.get() or "")
        except RequestError as e:
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises

    async def StopRpc(self, request: pb.LeaseEnd, context: Context) -> pb.LeaseEnd:
        await self._leases.end(request.lease_id)
        return request


def add_peer_service(service: PeerService, server: grpc.aio.Server) -> None:
    """Serve `service` as add_PeerServicer_to_server does, except that an undecodable
    request (its proof checked over its bytes) gets INVALID_ARGUMENT with a sentence,
    and an error no handler expected gets INTERNAL with one rate-limited traceback."""
    add_guarded(pb_grpc.add_PeerServicer_to_server, service, server, service._log)
