"""Membership: the peers this device knows, how alive they are, and the policy.

Every known address (from mDNS hints and static peers) gets a heartbeat task
that calls `Peer.Status` with this device's own status; a peer's heartbeats to
us count as well. A peer is alive while it answered within two heartbeat
intervals, suspect after that, dead after `dead_after` seconds or at once on an
mDNS goodbye. What the election uses comes from the peer's own status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from hsmdifd import auth
from hsmdifd.election import Member, MemberState, id_conflicts
from hsmdifd.proto import hsmdif_pb2 as pb
from hsmdifd.proto import hsmdif_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1


@dataclass
class PeerRecord:
    """What this device knows about one peer."""

    address: str
    node_id: str = ""
    status: pb.PeerStatus | None = None
    last_seen: float = float("-inf")  # monotonic time of the last authenticated contact
    problem: MemberState | None = None  # UNAUTHENTICATED or INCOMPATIBLE
    reason: str = ""
    gone: bool = False  # an mDNS goodbye arrived
    declared: pb.DeviceProfile | None = None
    alias_of: str = ""  # the address the peer advertises, when it differs from this one


@dataclass
class _Link:
    channel: grpc.aio.Channel
    stub: pb_grpc.PeerAsyncStub
    task: asyncio.Task[None] | None = None


class Membership:
    def __init__(
        self,
        *,
        node_id: str,
        secret: bytes,
        local_status: Callable[[], pb.PeerStatus],
        on_change: Callable[[], None],
        heartbeat_interval: float,
        dead_after: float,
    ) -> None:
        self._node_id = node_id
        self._secret = secret
        self._local_status = local_status
        self._on_change = on_change
        self.interval = heartbeat_interval
        self.dead_after = dead_after
        self._peers: dict[str, PeerRecord] = {}  # by address
        self._links: dict[str, _Link] = {}
        self.generation = 0
        self._live: frozenset[str] = frozenset()
        self.duplicate_of = ""  # set when this device's id is another's and we are newer

    # ---- what the rest of the daemon reads ----------------------------------------

    def state_of(self, record: PeerRecord, now: float) -> MemberState:
        if record.problem is not None:
            return record.problem
        if record.gone or record.status is None:
            return MemberState.DEAD
        age = now - record.last_seen
        if age > self.dead_after:
            return MemberState.DEAD
        if age > 2 * self.interval:
            return MemberState.SUSPECT
        return MemberState.ALIVE

    def records(self) -> list[PeerRecord]:
        return list(self._peers.values())

    def members(self) -> list[Member]:
        """Peers with a known identity, as the election sees them."""
        now = time.monotonic()
        known = [r for r in self._peers.values() if r.status and not r.status.duplicate_of]
        conflicts = id_conflicts(
            (r.node_id, r.address, r.status.started_at) for r in known if r.status
        )
        refused = {(c.node_id, c.address) for x in conflicts.values() for c in x.refused}
        out = []
        for r in known:
            if r.status is None or (r.node_id, r.address) in refused:
                continue
            d = r.status.device
            out.append(Member(d.id, d.name, d.address, d.memory_total_bytes, self.state_of(r, now)))
        return out

    def status_of(self, node_id: str) -> pb.PeerStatus | None:
        for r in self._peers.values():
            if r.node_id == node_id:
                return r.status
        return None

    def device_of(self, node_id: str) -> pb.DeviceProfile | None:
        """A peer's figures as it reports them, overridden by declared ones.

        The election uses what the peer itself reports, so that every device
        decides from the same inputs; declared figures serve display and planning.
        """
        for r in self._peers.values():
            if r.node_id == node_id and r.status is not None:
                device = pb.DeviceProfile()
                device.CopyFrom(r.status.device)
                if r.declared is not None:
                    _apply_declared(device, r.declared)
                return device
        return None

    def stub_for(self, node_id: str) -> pb_grpc.PeerAsyncStub | None:
        for r in self._peers.values():
            if r.node_id == node_id and r.address in self._links:
                return self._links[r.address].stub
        return None

    def refresh(self) -> None:
        """Recompute who is live; bump the generation and notify when that changed."""
        live = frozenset(m.node_id for m in self.members() if m.live)
        if live != self._live:
            self._live = live
            self.generation += 1
            self._on_change()

    # ---- inputs ------------------------------------------------------------------

    def add_address(self, address: str, declared: pb.DeviceProfile | None = None) -> None:
        """Start heartbeating `address` (a static peer or an mDNS hint)."""
        record = self._peers.get(address)
        if record is None:
            record = self._peers[address] = PeerRecord(address=address)
        record.gone = False
        if declared is not None:
            record.declared = declared
        if address not in self._links:
            # A peer that restarts is heard again within a heartbeat, not after gRPC's
            # default reconnect backoff (1 s, growing to 2 minutes).
            backoff_ms = int(self.interval * 1000)
            channel = grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                    ("grpc.max_reconnect_backoff_ms", backoff_ms),
                ],
                interceptors=auth.client_interceptors(self._secret, self._node_id),
            )
            link = _Link(channel=channel, stub=pb_grpc.PeerStub(channel))
            link.task = asyncio.get_running_loop().create_task(self._heartbeat(address, link))
            self._links[address] = link

    def goodbye(self, node_id: str) -> None:
        for r in self._peers.values():
            if r.node_id == node_id:
                r.gone = True
        self.refresh()

    def observe(self, status: pb.PeerStatus) -> None:
        """A peer's status, from its heartbeat to us or its answer to ours."""
        address = status.device.address
        if status.device.id == self._node_id:
            self._duplicate(status)
            return
        if status.protocol_version != PROTOCOL_VERSION:
            self._mark(address, MemberState.INCOMPATIBLE, f"protocol {status.protocol_version}")
            return
        record = self._peers.get(address)
        if record is None:
            self.add_address(address)
            record = self._peers[address]
        record.node_id = status.device.id
        record.status = status
        record.last_seen = time.monotonic()
        record.problem = None
        record.reason = ""
        record.gone = False
        self.refresh()

    def _duplicate(self, other: pb.PeerStatus) -> None:
        mine = self._local_status()
        if other.device.address == mine.device.address and other.started_at == mine.started_at:
            return  # ourselves, through an address that reaches us
        if other.duplicate_of:
            return  # the other one already stepped back
        if (other.started_at, other.device.address) < (mine.started_at, mine.device.address):
            if not self.duplicate_of:
                log.error(
                    "node id %s is also used by %s, which started first: this device "
                    "will not join; delete node_id in the state directory and restart",
                    self._node_id,
                    other.device.address,
                )
            self.duplicate_of = other.device.address
            self._on_change()

    def _mark(self, address: str, state: MemberState, reason: str) -> None:
        record = self._peers.setdefault(address, PeerRecord(address=address))
        if record.problem != state:
            log.warning("peer %s is %s: %s", address, state.value, reason)
        record.problem = state
        record.reason = reason
        self.refresh()

    async def _heartbeat(self, address: str, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                reply = await link.stub.Status(self._local_status(), timeout=2 * self.interval)
            except auth.AuthError as e:
                self._mark(address, MemberState.UNAUTHENTICATED, e.details())
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._mark(address, MemberState.UNAUTHENTICATED, e.details() or "")
                else:
                    log.debug("heartbeat to %s failed: %s", address, e.code().name)
                    self.refresh()
            else:
                if reply.device.id == self._node_id and reply.started_at == (
                    self._local_status().started_at
                ):
                    await self._forget(address)  # an address that reaches this very daemon
                    return
                if reply.device.address != address:
                    self._peers[address].alias_of = reply.device.address
                self.observe(reply)
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def _forget(self, address: str) -> None:
        self._peers.pop(address, None)
        link = self._links.pop(address, None)
        if link is not None:
            await link.channel.close(None)

    async def close(self) -> None:
        for link in self._links.values():
            if link.task is not None:
                link.task.cancel()
        for link in self._links.values():
            if link.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await link.task
            await link.channel.close(None)
        self._links.clear()


def _apply_declared(device: pb.DeviceProfile, declared: pb.DeviceProfile) -> None:
    """Figures from a devices file override the measured ones."""
    if declared.memory_total_bytes:
        device.memory_total_bytes = declared.memory_total_bytes
    if declared.memory_usable_bytes:
        device.memory_usable_bytes = declared.memory_usable_bytes
    if declared.speed:
        device.speed = declared.speed
    if declared.load:
        device.load = declared.load
    device.declared = True
