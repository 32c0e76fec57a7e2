"""The cluster as this device sees it: membership, the policy, and the root.

Without a cluster secret the device runs alone and is its own root. With one,
it serves the peer service (see server.py), announces itself over mDNS, heartbeats
its peers, and every device computes the root from the same inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster import device_list, election, tls
from hsmdifd.cluster.discovery import Discovery, Hint, encode_txt
from hsmdifd.cluster.forwarding import Forwarded, Forwards
from hsmdifd.cluster.membership import Membership
from hsmdifd.cluster.peer_channel import PROTOCOL_VERSION
from hsmdifd.cluster.peer_records import Event, Seen
from hsmdifd.cluster.policy import (
    describe_policy,
    load_policy,
    next_policy,
    policy_from_pb,
    policy_to_pb,
    policy_with_names,
    save_policy,
)
from hsmdifd.cluster.root_leases import Held, RootLeases
from hsmdifd.daemon.config import Config
from hsmdifd.daemon.errors import RequestError
from hsmdifd.daemon.logs import LogLimiter
from hsmdifd.daemon.node import Identity
from hsmdifd.placement import planner

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class Cluster:
    def __init__(
        self,
        config: Config,
        identity: Identity,
        secret: bytes | None,
        *,
        busy: Callable[[], bool],
        model: Callable[[], pb.ModelInfo],
        waiting: Callable[[], tuple[int, int]] = lambda: (0, 0),
        declared: dict[str, pb.DeviceProfile] | None = None,
        credentials: tls.DeviceCredentials | None = None,
    ) -> None:
        """`waiting()`: requests waiting here for the engine, and how many may wait."""
        self._tls = credentials
        self.unreachable_ids: set[str] = set()  # RPC gone, not heard from since
        self._config = config
        self.identity = identity
        self._secret = secret
        self._busy = busy
        self._model = model
        self._waiting = waiting
        self._declared = declared or {}
        self._policy_path = config.state_dir / "policy.json"
        self.policy = load_policy(self._policy_path)
        self._policy_refusals = LogLimiter(log)
        self.started_at = time.time()
        self.device = pb.DeviceProfile(
            id=identity.node_id, name=identity.name, address=identity.address
        )
        self.root_id = identity.node_id
        self.membership: Membership | None = None
        self._discovery: Discovery | None = None
        self.leases = RootLeases(self, credentials, config.cluster.data_plane)
        self._forwards = Forwards()
        self.changed = asyncio.Event()
        self._seen: tuple[str, frozenset[str], election.Policy] | None = None

    @property
    def heartbeat_interval(self) -> float:
        return self._config.timing.heartbeat_interval

    @property
    def enabled(self) -> bool:
        return self._secret is not None

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._secret is None:
            return
        self.membership = _membership(
            self._config,
            self.identity,
            self._secret,
            self._tls,
            local_status=self.local_status,
            on_event=self._handle,
        )
        for address, declared in [
            *((a, None) for a in self._config.network.peers),
            *self._declared.items(),
        ]:
            if address != self.identity.address:
                self.membership.add_address(address, declared)
        if self._config.network.mdns:
            self._discovery = _discovery(self.identity, self._config.timing.mdns_ttl, self)
            await self._discovery.start()

    async def stop(self) -> None:
        await self.leases.close()
        if self._discovery is not None:
            await self._discovery.stop()
        if self.membership is not None:
            await self.membership.close()

    # ---- this device ---------------------------------------------------------------

    def set_device(self, device: pb.DeviceProfile) -> None:
        """The latest local figures (measured off the loop by the caller)."""
        self.device = device

    def local_status(self) -> pb.PeerStatus:
        device = pb.DeviceProfile()
        device.CopyFrom(self.device)
        queued, max_queue = self._waiting()
        return pb.PeerStatus(
            protocol_version=PROTOCOL_VERSION,
            device=device,
            policy=policy_to_pb(self.policy),
            epoch=self.epoch_pb(),
            generating=self._busy(),
            started_at=self.started_at,
            model=self._model(),
            duplicate_of=self.membership.duplicate_of if self.membership else "",
            queued=queued,
            max_queue=max_queue,
        )

    # ---- members, policy and the root ---------------------------------------------

    def members(self) -> list[election.Member]:
        me = election.Member(
            self.identity.node_id,
            self.identity.name,
            self.identity.address,
            self.device.memory_total_bytes,
            election.MemberState.ALIVE,
        )
        peers = self.membership.members() if self.membership else []
        return [me, *(m for m in peers if m.node_id != me.node_id)]

    def live_ids(self) -> set[str]:
        """The node ids of the live devices, this one included."""
        return {m.node_id for m in self.members() if m.live}

    @property
    def refused(self) -> str:
        """The address of the device whose id this one duplicates, or ''."""
        return self.membership.duplicate_of if self.membership else ""

    @property
    def is_root(self) -> bool:
        return self.root_id == self.identity.node_id

    def epoch(self) -> election.Epoch:
        generation = self.membership.generation if self.membership else 0
        return election.Epoch(self.policy.version, self.root_id, generation)

    def epoch_pb(self) -> pb.Epoch:
        e = self.epoch()
        return pb.Epoch(policy_version=e.policy_version, root_id=e.root_id, generation=e.generation)

    def view(self) -> election.View:
        """What this device knows of the cluster, for deciding whom to follow."""
        claims = self.membership.root_claims() if self.membership is not None else {}
        return election.View(
            me=self.identity.node_id,
            members=tuple(self.members()),
            policy=self.policy,
            current=self.root_id,
            claims=claims,
            busy=self._busy(),
            refused=bool(self.refused),
        )

    def _recompute(self) -> None:
        """Decide who is root now (election.succession), and wake the follower when the
        root, the live set or the policy changed."""
        view = self.view()
        new_root = election.succession(view)
        live = frozenset(m.node_id for m in view.members if m.live)
        if new_root != self.root_id:
            names = {m.node_id: m.name for m in view.members}
            log.info("root is now %s (%s)", names.get(new_root, new_root), new_root)
            self.root_id = new_root
        # Wake the follower only for what it acts on, not for every heartbeat.
        seen = (self.root_id, live, self.policy)
        if seen != self._seen:
            self._seen = seen
            self.changed.set()

    def adopt_policy(self, message: pb.Policy, sender: str = "") -> bool:
        """Take `message` if it is newer than ours; True when it was. A version far ahead
        of ours is refused: no honest device gets there (each change adds one)."""
        offered = policy_from_pb(message)
        if election.newer_policy(self.policy, offered) == self.policy or offered == self.policy:
            return False
        if refusal := election.policy_refusal(self.policy, offered):
            self._policy_refusals.warning(
                "policy",
                "refusing policy version %d from %s: %s",
                offered.version,
                sender or "this device",
                refusal,
            )
            return False
        self.policy = offered
        save_policy(self._policy_path, offered)
        log.info("policy version %d: %s", offered.version, describe_policy(offered))
        self._recompute()
        return True

    def observe(self, status: pb.PeerStatus) -> None:
        """A peer's heartbeat to this device."""
        if self.membership is not None:
            self.membership.observe(status)

    def unreachable(self, node_ids: set[str]) -> None:
        """llama.cpp lost its connection to these workers: plan without them until they
        are heard from again."""
        self.unreachable_ids |= node_ids

    def _handle(self, event: Event) -> None:
        """What membership saw: a peer's status carries its policy and whom it names as
        root; any event may change the root."""
        if isinstance(event, Seen):
            self.unreachable_ids.discard(event.status.device.id)
        if isinstance(event, Seen) and event.status.policy.version > self.policy.version:
            status = event.status
            self.adopt_policy(status.policy, status.device.name or status.device.id)
        self._recompute()

    async def set_priority(self, names: list[str], by_memory: bool) -> election.Policy:
        """Make, persist and push a new policy; RequestError for an unknown device."""
        self.adopt_policy(policy_to_pb(next_policy(self.policy, names, by_memory, self.members())))
        await self.push_policy()
        return self.policy

    async def push_policy(self) -> None:
        if self.membership is not None:
            await _push_policy(self.membership, self.policy)

    def forwarding(self, call: grpc.aio.Call) -> contextlib.AbstractContextManager[Forwarded]:
        """Watch `call`, just made to the root, until it ends."""
        return self._forwards.watching(self.root_id, self.root_name(), call)

    def forwarded_to(self) -> frozenset[str]:
        """The roots of the calls forwarded from here that are in flight."""
        return self._forwards.roots()

    def cancel_orphaned(self, live: set[str]) -> None:
        """Cancel the calls to a root that is no longer live."""
        self._forwards.cancel_orphaned(live)

    def root_status(self) -> pb.PeerStatus | None:
        """What the root last said of itself, when it is another device."""
        return self.membership.status_of(self.root_id) if self.membership else None

    def root_stub(self) -> pb_grpc.PeerAsyncStub:
        """The stub of the root when it is another device."""
        stub = self.membership.stub_for(self.root_id) if self.membership else None
        if stub is None or self.root_status() is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the root is not reachable yet; retry")
        return stub

    def policy_for_people(self) -> pb.Policy:
        """The policy with the names of the devices it orders."""
        return policy_with_names(self.policy, self.members())

    # ---- placement: capacities and leases -----------------------------------------

    def capacities(
        self, extra_local_bytes: int = 0, credit: dict[str, int] | None = None
    ) -> list[planner.DeviceCapacity]:
        """Live devices for the planner: this device (the root) first, then by priority."""
        return device_list.capacities(self, extra_local_bytes, credit)

    async def acquire_leases(self, plan: planner.Plan) -> list[Held]:
        """An RPC endpoint from each remote device of `plan`, in registration order."""
        return await self.leases.acquire(plan)

    def lease_refusal(self, offered: election.Epoch) -> str | None:
        """Why this device, as a worker, refuses a lease asked under `offered`; None grants it."""
        return election.lease_refusal(offered, self.epoch(), self.root_name())

    async def release_leases(self, held: list[Held]) -> None:
        """End `held` (in the background on devices that are gone)."""
        await self.leases.release(held)

    def root_name(self) -> str:
        if self.is_root:
            return self.identity.name
        status = self.root_status()
        return status.device.name if status else self.root_id

    def devices(self) -> list[pb.DeviceProfile]:
        """Every known device, in priority order, with role, state and rank."""
        return device_list.devices(self)


def _capped(usable: int, total: int) -> int:
    return min(usable, total) if total else usable


def _membership(
    config: Config,
    identity: Identity,
    secret: bytes,
    credentials: tls.DeviceCredentials | None,
    *,
    local_status: Callable[[], pb.PeerStatus],
    on_event: Callable[[Event], None],
) -> Membership:
    timing = config.timing
    return Membership(
        node_id=identity.node_id,
        secret=secret,
        local_status=local_status,
        on_event=on_event,
        heartbeat_interval=timing.heartbeat_interval,
        dead_after=timing.dead_after,
        credentials=tls.channel_credentials(credentials) if credentials else None,
        channel_extra=tls.CHANNEL_OPTIONS,
        unproven_timeout=timing.unproven_timeout,
    )


def _discovery(identity: Identity, ttl: int, cluster: Cluster) -> Discovery:
    """This device announced over mDNS with its current figures, and the others followed."""
    host, port = identity.address.rsplit(":", 1)

    def txt() -> dict[str, str]:
        return encode_txt(
            node_id=identity.node_id,
            protocol_version=PROTOCOL_VERSION,
            port=int(port),
            memory_mb=cluster.device.memory_usable_bytes // MIB,
            speed=cluster.device.speed,
            policy=cluster.policy.version,
        )

    membership = cluster.membership
    assert membership is not None

    def on_hint(hint: Hint) -> None:
        # A hint with our own id from another address is followed too: it may be
        # a copy of this device's state directory, which must be found out.
        if hint.address == identity.address:
            return
        if hint.protocol_version != PROTOCOL_VERSION:
            log.debug("%s speaks protocol %d", hint.address, hint.protocol_version)
        membership.add_hint(hint.address)

    return Discovery(
        instance=f"{identity.name}-{identity.node_id[:8]}",
        host=host,
        port=int(port),
        txt=txt,
        on_hint=on_hint,
        on_goodbye=membership.goodbye,
        ttl=ttl,
    )


async def _push_policy(membership: Membership, policy: election.Policy) -> None:
    """Send `policy` to every live peer."""
    message = policy_to_pb(policy)
    calls = []
    for m in membership.members():
        stub = membership.stub_for(m.node_id)
        if m.live and stub is not None:
            calls.append(stub.SetPolicy(message, timeout=2 * membership.interval))
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, BaseException):
            log.warning("pushing the policy failed for a peer: %s", result)
