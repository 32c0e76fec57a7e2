"""Membership: the peers this device knows, how alive they are, and the policy.

Every known address (from mDNS hints and static peers) gets a heartbeat task.
It first asks the address to prove it holds the cluster secret (`Peer.Hello`); only
then does it call `Peer.Status` with this device's own status, each call with a proof
bound to the device that answered the challenge. A peer's heartbeats to us count as
well. Membership tells one subscriber what happened, as typed events: `Seen` (a
peer's status, from a heartbeat either way: an answer to ours is handled as theirs),
`LiveChanged` (the set of live peers is another) and `DuplicateId` (this device's id
is another's, which started first).
A peer is alive while it answered within two heartbeat intervals, suspect after that,
dead after `dead_after` seconds or at once on an mDNS goodbye. What the election uses
comes from the peer's own status.

mDNS says only where to knock. An announced address that has not proved itself within
`unproven_timeout` seconds is forgotten, as it is on its goodbye; new announced
addresses are admitted at a bounded rate and only a bounded number wait unproven, so a
flood of announcements costs bounded memory and CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster.clocks import StallFreeClock, TokenBucket
from hsmdifd.cluster.election import Member, MemberState, RootClaim
from hsmdifd.cluster.heartbeat import confirm_gone, heartbeat
from hsmdifd.cluster.peer_channel import PROTOCOL_VERSION, Link, LinkSettings
from hsmdifd.cluster.peer_records import (
    DuplicateId,
    Event,
    LiveChanged,
    PeerRecord,
    Seen,
    device_of,
    election_members,
    peer_state,
)
from hsmdifd.daemon import timing
from hsmdifd.daemon.logs import LogLimiter

log = logging.getLogger(__name__)

MAX_UNPROVEN = 16
"""Announced addresses waiting to prove themselves at once; more are turned away."""
HINT_BURST = 8
"""New announced addresses admitted at once, then one per `hint_interval`."""


class Membership:
    def __init__(
        self,
        *,
        node_id: str,
        secret: bytes,
        local_status: Callable[[], pb.PeerStatus],
        on_event: Callable[[Event], None],
        heartbeat_interval: float,
        dead_after: float,
        credentials: grpc.ChannelCredentials | None = None,
        channel_extra: Sequence[tuple[str, Any]] = (),
        unproven_timeout: float = timing.UNPROVEN_TIMEOUT,
        hint_interval: float = timing.HINT_INTERVAL,
    ) -> None:
        self.node_id, self.secret, self.local_status = node_id, secret, local_status
        self.interval, self.dead_after = heartbeat_interval, dead_after
        self.unproven_timeout = unproven_timeout
        self._on_event = on_event
        self._links = LinkSettings(
            secret, node_id, heartbeat_interval, credentials, tuple(channel_extra)
        )
        self._hints = TokenBucket(HINT_BURST, hint_interval)
        self.peers: dict[str, PeerRecord] = {}  # by address
        self.links: dict[str, Link] = {}
        self.generation = 0
        self._live: frozenset[str] = frozenset()
        self.duplicate_of = ""  # set when this device's id is another's and we are newer
        self._turned_away = LogLimiter(log)
        self._clock = StallFreeClock(max_step=dead_after / 2)
        self._ticker: asyncio.Task[None] | None = None

    def now(self) -> float:
        """The clock peers' silence is measured by: time this device itself stood still
        (stopped, suspended, swapping) does not count against them."""
        return self._clock()

    # ---- what the rest of the daemon reads ----------------------------------------

    def state_of(self, record: PeerRecord, now: float) -> MemberState:
        return peer_state(record, now, self.interval, self.dead_after)

    def records(self) -> list[PeerRecord]:
        return list(self.peers.values())

    def members(self) -> list[Member]:
        """Peers with a known identity, as the election sees them."""
        now = self.now()
        return election_members(self.peers.values(), lambda r: self.state_of(r, now))

    def root_claims(self) -> dict[str, RootClaim]:
        """Whom each live peer names as root, and whether it is generating."""
        claims = {}
        for m in self.members():
            status = self.status_of(m.node_id)
            if status is not None and m.live:
                claims[m.node_id] = RootClaim(status.epoch.root_id, status.generating)
        return claims

    def status_of(self, node_id: str) -> pb.PeerStatus | None:
        for r in self.peers.values():
            if r.node_id == node_id:
                return r.status
        return None

    def device_of(self, node_id: str) -> pb.DeviceProfile | None:
        """A peer's figures as it reports them, overridden by declared ones."""
        for r in self.peers.values():
            if r.node_id == node_id and r.status is not None:
                return device_of(r)
        return None

    def stub_for(self, node_id: str) -> pb_grpc.PeerAsyncStub | None:
        for r in self.peers.values():
            if r.node_id == node_id and r.address in self.links:
                return self.links[r.address].stub
        return None

    def refresh(self) -> None:
        """Recompute who is live; bump the generation and notify when that changed."""
        live = frozenset(m.node_id for m in self.members() if m.live)
        if live != self._live:
            self._live = live
            self.generation += 1
            self._on_event(LiveChanged(live, self.generation))

    # ---- inputs ------------------------------------------------------------------

    def add_address(
        self, address: str, declared: pb.DeviceProfile | None = None, *, hinted: bool = False
    ) -> None:
        """Start heartbeating `address` (a static peer, a caller, or with `hinted` an mDNS
        announcement, which is forgotten unless it proves itself)."""
        record = self.peers.get(address)
        if record is None:
            record = self.peers[address] = PeerRecord(
                address=address, hinted=hinted, first_seen=time.monotonic()
            )
        elif not hinted:
            record.hinted = False
        record.gone = False
        if declared is not None:
            record.declared = declared
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        if address not in self.links:
            link = self._links.open(address, lambda: self._proven(address))
            link.task = asyncio.get_running_loop().create_task(heartbeat(self, address, link))
            self.links[address] = link

    def add_hint(self, address: str) -> bool:
        """An mDNS announcement of `address`: followed when known, or when few announced
        addresses wait to prove themselves and the rate allows; False when turned away."""
        record = self.peers.get(address)
        if record is not None:
            record.gone = False
            return True
        waiting = sum(1 for r in self.peers.values() if r.hinted and r.status is None)
        if waiting >= MAX_UNPROVEN or not self._hints.take(time.monotonic()):
            self._turned_away.warning(
                "announcement",
                "not following the announcement of %s: %d announced addresses have not "
                "proved they hold the cluster secret yet",
                address,
                waiting,
            )
            return False
        self.add_address(address, hinted=True)
        return True

    def _proven(self, address: str) -> str | None:
        link = self.links.get(address)
        return link.proven if link is not None else None

    def goodbye(self, node_id: str, address: str = "") -> None:
        """An mDNS goodbye (or expiry) for `node_id` announced at `address`.

        Anyone can send one, so a goodbye only makes this device ask at once: a peer that
        does not answer is dead, one that answers stays. An address that never proved
        itself is forgotten.
        """
        for r in list(self.peers.values()):
            if r.node_id == node_id and r.status is not None and r.address in self.links:
                task = asyncio.get_running_loop().create_task(confirm_gone(self, r.address))
                _closing.add(task)
                task.add_done_callback(_closing.discard)
            elif r.address == address and r.hinted and r.status is None:
                self.drop(address)

    def drop(self, address: str) -> None:
        """Forget `address` and stop heartbeating it."""
        self.peers.pop(address, None)
        link = self.links.pop(address, None)
        if link is not None:
            if link.task is not None and link.task is not asyncio.current_task():
                link.task.cancel()
            task = asyncio.get_running_loop().create_task(link.channel.close(None))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    def observe(self, status: pb.PeerStatus) -> None:
        """A peer's status, from its heartbeat to us or its answer to ours."""
        address = status.device.address
        if status.device.id == self.node_id:
            self._duplicate(status)
            return
        if status.protocol_version != PROTOCOL_VERSION:
            self.mark(address, MemberState.INCOMPATIBLE, f"protocol {status.protocol_version}")
            return
        record = self.peers.get(address)
        if record is None:
            self.add_address(address)
            record = self.peers[address]
        record.node_id = status.device.id
        record.status = status
        record.last_seen = self.now()
        record.problem = None
        record.reason = ""
        record.gone = False
        self.refresh()
        self._on_event(Seen(status))

    def _duplicate(self, other: pb.PeerStatus) -> None:
        mine = self.local_status()
        if other.device.address == mine.device.address and other.started_at == mine.started_at:
            return  # ourselves, through an address that reaches us
        if other.duplicate_of:
            return  # the other one already stepped back
        if (other.started_at, other.device.address) < (mine.started_at, mine.device.address):
            if not self.duplicate_of:
                log.error(
                    "node id %s is also used by %s, which started first: this device "
                    "will not join; delete node_id in the state directory and restart",
                    self.node_id,
                    other.device.address,
                )
            self.duplicate_of = other.device.address
            self._on_event(DuplicateId(other.device.address))

    def mark(self, address: str, state: MemberState, reason: str) -> None:
        record = self.peers.setdefault(address, PeerRecord(address=address))
        if record.problem != state:
            log.warning("peer %s is %s: %s", address, state.value, reason)
        record.problem = state
        record.reason = reason
        self.refresh()

    async def _tick(self) -> None:
        """Read the clock and the live set several times a heartbeat interval, so that a
        silent peer counts as dead on time and the clock sees this device's own stalls."""
        while True:
            await asyncio.sleep(self.interval / 2)
            self.refresh()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for link in self.links.values():
            if link.task is not None:
                link.task.cancel()
        for link in self.links.values():
            if link.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await link.task
            await link.channel.close(None)
        self.links.clear()


_closing: set[asyncio.Task[None]] = set()
