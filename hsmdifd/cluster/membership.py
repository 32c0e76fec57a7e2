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
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster import auth
from hsmdifd.cluster.election import Member, MemberState, id_conflicts
from hsmdifd.daemon.logs import LogLimiter

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
HELLO_METHOD = "/hsmdif.v1.Peer/Hello"
OPEN_METHODS = frozenset({HELLO_METHOD})
MAX_UNPROVEN = 16
"""Announced addresses waiting to prove themselves at once; more are turned away."""
HINT_BURST = 8
"""New announced addresses admitted at once, then one per `hint_interval`."""


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
    hinted: bool = False  # known from mDNS only: forgotten unless it proves itself
    first_seen: float = 0.0  # monotonic time the address became known


@dataclass(frozen=True)
class Seen:
    """A peer's status arrived: in its heartbeat to us, or in its answer to ours."""

    status: pb.PeerStatus


@dataclass(frozen=True)
class LiveChanged:
    """The live peers are now `live`; `generation` counts such changes."""

    live: frozenset[str]
    generation: int


@dataclass(frozen=True)
class DuplicateId:
    """This device's node id is also used at `address`, by a daemon that started first."""

    address: str


Event = Seen | LiveChanged | DuplicateId


@dataclass
class _Link:
    channel: grpc.aio.Channel
    stub: pb_grpc.PeerAsyncStub
    task: asyncio.Task[None] | None = None
    proven: str | None = None  # the node id that answered our challenge on this link


def channel_options(interval: float) -> list[tuple[str, int | str]]:
    """Peer channel options: reconnect within a heartbeat, and find out within a couple of
    seconds that a connection died (a cut cable leaves TCP retransmitting for minutes)."""
    interval_ms = int(interval * 1000)
    return [
        ("grpc.initial_reconnect_backoff_ms", interval_ms),
        ("grpc.min_reconnect_backoff_ms", interval_ms),
        ("grpc.max_reconnect_backoff_ms", interval_ms),
        ("grpc.keepalive_time_ms", max(1000, 2 * interval_ms)),
        ("grpc.keepalive_timeout_ms", max(1000, 2 * interval_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_keepalive_options(interval: float) -> list[tuple[str, int | str]]:
    """What the peer server accepts of the channels above (a server refuses pings more
    frequent than it allows, closing the connection), and its own pings."""
    interval_ms = int(interval * 1000)
    return [
        ("grpc.keepalive_time_ms", max(1000, 2 * interval_ms)),
        ("grpc.keepalive_timeout_ms", max(1000, 2 * interval_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", max(500, interval_ms)),
        ("grpc.http2.max_ping_strikes", 0),
    ]


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
        unproven_timeout: float = 30.0,
        hint_interval: float = 1.0,
    ) -> None:
        self._node_id = node_id
        self._secret = secret
        self._local_status = local_status
        self._on_event = on_event
        self._credentials = credentials
        self._channel_extra = list(channel_extra)
        self.interval = heartbeat_interval
        self.dead_after = dead_after
        self.unproven_timeout = unproven_timeout
        self._hints = _TokenBucket(HINT_BURST, hint_interval)
        self._peers: dict[str, PeerRecord] = {}  # by address
        self._links: dict[str, _Link] = {}
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
        now = self.now()
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
            self._on_event(LiveChanged(live, self.generation))

    # ---- inputs ------------------------------------------------------------------

    def add_address(
        self, address: str, declared: pb.DeviceProfile | None = None, *, hinted: bool = False
    ) -> None:
        """Start heartbeating `address` (a static peer, a caller, or with `hinted` an mDNS
        announcement, which is forgotten unless it proves itself)."""
        record = self._peers.get(address)
        if record is None:
            record = self._peers[address] = PeerRecord(
                address=address, hinted=hinted, first_seen=time.monotonic()
            )
        elif not hinted:
            record.hinted = False
        record.gone = False
        if declared is not None:
            record.declared = declared
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        if address not in self._links:
            options = channel_options(self.interval) + self._channel_extra
            interceptors = auth.client_interceptors(
                self._secret,
                self._node_id,
                lambda: self._proven(address),
                open_methods=OPEN_METHODS,
            )
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(
                    address, self._credentials, options=options, interceptors=interceptors
                )
            else:
                channel = grpc.aio.insecure_channel(
                    address, options=options, interceptors=interceptors
                )
            link = _Link(channel=channel, stub=pb_grpc.PeerStub(channel))
            link.task = asyncio.get_running_loop().create_task(self._heartbeat(address, link))
            self._links[address] = link

    def add_hint(self, address: str) -> bool:
        """An mDNS announcement of `address`: followed when known, or when few announced
        addresses wait to prove themselves and the rate allows; False when turned away."""
        record = self._peers.get(address)
        if record is not None:
            record.gone = False
            return True
        waiting = sum(1 for r in self._peers.values() if r.hinted and r.status is None)
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
        link = self._links.get(address)
        return link.proven if link is not None else None

    def goodbye(self, node_id: str, address: str = "") -> None:
        """An mDNS goodbye (or expiry) for `node_id` announced at `address`.

        Anyone can send one, so a goodbye only makes this device ask at once: a peer that
        does not answer is dead, one that answers stays. An address that never proved
        itself is forgotten.
        """
        for r in list(self._peers.values()):
            if r.node_id == node_id and r.status is not None and r.address in self._links:
                task = asyncio.get_running_loop().create_task(self._confirm_gone(r.address))
                _closing.add(task)
                task.add_done_callback(_closing.discard)
            elif r.address == address and r.hinted and r.status is None:
                self._drop(address)

    async def _confirm_gone(self, address: str) -> None:
        """Dead unless `address` proves, at once, that it is still there."""
        link = self._links.get(address)
        if link is None:
            return
        challenge = secrets.token_hex(16)
        try:
            reply = await link.stub.Hello(
                pb.HelloRequest(challenge=challenge, caller_id=self._node_id),
                timeout=self.interval,
            )
            auth.check_hello(self._secret, challenge, self._node_id, reply.node_id, reply.proof)
        except grpc.RpcError:
            record = self._peers.get(address)
            if record is not None:
                record.gone = True
                self.refresh()

    def _drop(self, address: str) -> None:
        """Forget `address` and stop heartbeating it."""
        self._peers.pop(address, None)
        link = self._links.pop(address, None)
        if link is not None:
            if link.task is not None and link.task is not asyncio.current_task():
                link.task.cancel()
            task = asyncio.get_running_loop().create_task(link.channel.close(None))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

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
        record.last_seen = self.now()
        record.problem = None
        record.reason = ""
        record.gone = False
        self.refresh()
        self._on_event(Seen(status))

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
            self._on_event(DuplicateId(other.device.address))

    def _mark(self, address: str, state: MemberState, reason: str) -> None:
        record = self._peers.setdefault(address, PeerRecord(address=address))
        if record.problem != state:
            log.warning("peer %s is %s: %s", address, state.value, reason)
        record.problem = state
        record.reason = reason
        self.refresh()

    async def _hello(self, address: str, link: _Link) -> bool:
        """Ask `address` to prove it holds the secret; True once it has."""
        challenge = secrets.token_hex(16)
        try:
            reply = await link.stub.Hello(
                pb.HelloRequest(challenge=challenge, caller_id=self._node_id),
                timeout=2 * self.interval,
            )
            auth.check_hello(self._secret, challenge, self._node_id, reply.node_id, reply.proof)
        except auth.AuthError as e:
            self._mark(address, MemberState.UNAUTHENTICATED, e.details())
            return False
        except grpc.aio.AioRpcError as e:
            if _refused_certificate(e):
                self._mark(address, MemberState.UNAUTHENTICATED, WRONG_CERTIFICATE)
            else:
                log.debug("hello to %s failed: %s", address, e.code().name)
            return False
        if reply.protocol_version != PROTOCOL_VERSION:
            self._mark(address, MemberState.INCOMPATIBLE, f"protocol {reply.protocol_version}")
            return False
        link.proven = reply.node_id
        record = self._peers.get(address)
        if record is not None:
            record.problem, record.reason = None, ""
        return True

    async def _heartbeat(self, address: str, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.interval
        while True:
            started = loop.time()
            record = self._peers.get(address)
            if record is None:
                return
            if record.hinted and record.status is None:
                # Announced, and not yet a device of its own: it has a bounded time to
                # become one (an address that relays to a real device never does).
                left = self.unproven_timeout - (self.now() - record.first_seen)
                if left <= 0:
                    log.info("forgetting %s: it never proved it holds the cluster secret", address)
                    self._drop(address)
                    return
            else:
                left = float("inf")
            if link.proven is None and not await self._hello(address, link):
                if record.hinted:  # an address nobody listed: ask less and less often
                    backoff = min(backoff * 2, 8.0)
                pause = min(backoff - (loop.time() - started), left)
                await asyncio.sleep(max(0.0, pause))
                continue
            backoff = self.interval
            try:
                reply = await link.stub.Status(self._local_status(), timeout=2 * self.interval)
            except auth.AuthError as e:
                self._mark(address, MemberState.UNAUTHENTICATED, e.details())
                link.proven = None
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # Another daemon at this address now, or it lost the secret: prove anew.
                    log.info("heartbeat to %s refused: %s", address, e.details())
                    link.proven = None
                else:
                    log.debug("heartbeat to %s failed: %s", address, e.code().name)
                    self.refresh()
            else:
                if reply.device.id != link.proven:
                    log.warning(
                        "%s answered as %s, not as %s: proving anew",
                        address,
                        reply.device.id,
                        link.proven,
                    )
                    link.proven = None
                    continue
                if reply.device.id == self._node_id and reply.started_at == (
                    self._local_status().started_at
                ):
                    self._drop(address)  # an address that reaches this very daemon
                    return
                if reply.device.address != address:
                    if record.hinted:
                        # Announced here, but the device lives at its own address (which
                        # observing it follows): this one is a relay, or a stale record.
                        self.observe(reply)
                        self._drop(address)
                        return
                    record.alias_of = reply.device.address
                self.observe(reply)
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

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
        for link in self._links.values():
            if link.task is not None:
                link.task.cancel()
        for link in self._links.values():
            if link.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await link.task
            await link.channel.close(None)
        self._links.clear()


_closing: set[asyncio.Task[None]] = set()


class StallFreeClock:
    """Monotonic seconds that advance at most `max_step` between two readings.

    Membership reads it several times a heartbeat interval. When this device stood still
    for a while, the first reading after it woke advances only `max_step`: its peers
    count as silent for what they really were, not for the time this device did not
    listen, so a woken device does not declare them dead and itself root before their
    next heartbeat has had a chance to arrive.
    """

    def __init__(self, max_step: float, source: Callable[[], float] = time.monotonic) -> None:
        self._max_step, self._source = max_step, source
        self._real = source()
        self._value = self._real

    def __call__(self) -> float:
        real = self._source()
        self._value += min(max(0.0, real - self._real), self._max_step)
        self._real = real
        return self._value


WRONG_CERTIFICATE = "its TLS certificate was not made with this cluster's secret"


def _refused_certificate(error: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed in the TLS handshake over the other side's certificate: a
    device with another secret (gRPC says so only in the details)."""
    details = error.details() or ""
    return "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details


class _TokenBucket:
    """`burst` at once, then one every `interval` seconds."""

    def __init__(self, burst: int, interval: float) -> None:
        self._burst, self._interval = burst, interval
        self._tokens, self._at = float(burst), float("-inf")

    def take(self, now: float) -> bool:
        if self._at != float("-inf"):
            self._tokens = min(self._burst, self._tokens + (now - self._at) / self._interval)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _apply_declared(device: pb.DeviceProfile, declared: pb.DeviceProfile) -> None:
    """Figures from a devices file override the measured ones."""
    if declared.memory_total_bytes:
        device.memory_total_bytes = declared.memory_total_bytes
    if declared.memory_usable_bytes:
        device.memory_usable_bytes = declared.memory_usable_bytes
        device.memory_declared = True
    if declared.speed:
        device.speed = declared.speed
    if declared.load:
        device.load = declared.load
    device.declared = True
