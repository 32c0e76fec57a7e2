"""The leases this device holds on workers while it is root, and the relays that carry
their RPC streams."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster import auth, tls
from hsmdifd.daemon import timing
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine import relay
from hsmdifd.placement import planner

if TYPE_CHECKING:
    from hsmdifd.cluster.view import Cluster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Held:
    """A lease this root holds on a worker."""

    node_id: str
    name: str
    lease_id: str
    endpoint: str  # the worker's relay, as the person is shown it
    local: str = ""  # what the engine connects to: this device's relay to `endpoint`
    bytes: int = 0  # the memory the plan gives the worker's share


class RootLeases:
    """Leases asked of workers for a plan, ended on unload, a new plan or a worker gone."""

    def __init__(
        self, cluster: Cluster, credentials: tls.DeviceCredentials | None, data_plane: str
    ) -> None:
        self._cluster = cluster
        self._tls = credentials
        self._data_plane = data_plane
        self._relays: dict[str, relay.RootRelays] = {}  # by lease id
        self.released: dict[str, tuple[int, float]] = {}  # node id: bytes, when (unix)
        self._background: set[asyncio.Task[None]] = set()  # leases ending on devices gone

    async def close(self) -> None:
        for relays in self._relays.values():
            await relays.close()
        self._relays.clear()
        for task in self._background:
            task.cancel()

    async def acquire(self, plan: planner.Plan) -> list[Held]:
        """An RPC endpoint from each remote device of `plan`, in registration order."""
        held: list[Held] = []
        shares = {s.device.node_id: s.bytes for s in plan.shares[1:]}
        for device in plan.rpc_endpoints_order:
            try:
                lease = await self._lease(device)
            except (RequestError, grpc.aio.AioRpcError, auth.AuthError) as e:
                await self.release(held)
                reason = str(e) if isinstance(e, RequestError) else e.details()
                code = e.code if isinstance(e, RequestError) else e.code()
                raise RequestError(
                    code, f"{device.name} ({device.address}) gave no RPC endpoint: {reason}"
                ) from e
            try:
                relays = await relay.open_root_relays(
                    self._tls,
                    [(lease.endpoint, lease.token, device.node_id)],
                    self._data_plane,
                )
            except BaseException:
                held.append(Held(device.node_id, device.name, lease.lease_id, lease.endpoint))
                await self.release(held)
                raise
            self._relays[lease.lease_id] = relays
            self.released.pop(device.node_id, None)  # planned with what it holds now
            (local,) = relays.local_endpoints
            held.append(
                Held(
                    device.node_id,
                    device.name,
                    lease.lease_id,
                    lease.endpoint,
                    local,
                    shares.get(device.node_id, 0),
                )
            )
        return held

    async def _lease(self, device: planner.DeviceCapacity) -> pb.Lease:
        """Ask `device` for a lease; again, for a while, when its view of the root or the
        policy lags behind this device's (it refuses with ABORTED until it catches up),
        or when the channel to it is still connecting (UNAVAILABLE: a device that just
        came back is live before this device's channel to it has reconnected)."""
        deadline = time.monotonic() + timing.LEASE_RETRY
        while True:
            membership = self._cluster.membership
            stub = membership.stub_for(device.node_id) if membership else None
            if stub is None or membership is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "it is not reachable")
            try:
                return await stub.StartRpc(
                    pb.LeaseRequest(epoch=self._cluster.epoch_pb()), timeout=timing.LEASE_TIMEOUT
                )
            except (grpc.aio.AioRpcError, auth.AuthError) as e:
                # AuthError: the link to it has not proved itself (again) yet.
                retried = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
                retry = e.code() in retried and self._cluster.is_root
                if not retry or time.monotonic() > deadline:
                    raise
                if device.node_id not in self._cluster.live_ids():
                    raise  # it died meanwhile: the caller plans without it
            await asyncio.sleep(membership.interval)

    async def release(self, held: list[Held]) -> None:
        """End `held`. Leases on devices that are gone end in the background: a frozen
        device answers late, or never."""
        live = self._cluster.live_ids()
        waits = []
        for lease in held:
            if relays := self._relays.pop(lease.lease_id, None):
                await relays.close()  # nothing here reaches that worker any more
            # Until the worker reports figures measured after this, its memory looks as
            # full as when the lease held it: count the share as free meanwhile.
            self.released[lease.node_id] = (lease.bytes, time.time())
            membership = self._cluster.membership
            stub = membership.stub_for(lease.node_id) if membership else None
            if stub is None:
                continue
            call = self._end_lease(stub, lease)
            if lease.node_id in live:
                waits.append(call)
            else:
                task = asyncio.create_task(call)
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        await asyncio.gather(*waits)

    async def _end_lease(self, stub: pb_grpc.PeerAsyncStub, lease: Held) -> None:
        try:
            await stub.StopRpc(pb.LeaseEnd(lease_id=lease.lease_id), timeout=timing.LEASE_TIMEOUT)
        except (grpc.aio.AioRpcError, auth.AuthError) as e:  # AuthError: not proven again yet
            log.info("ending the lease on %s: %s", lease.name, e.code().name)
