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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster import auth, election, tls
from hsmdifd.cluster.discovery import Discovery, Hint, encode_txt
from hsmdifd.cluster.membership import PROTOCOL_VERSION, Event, Membership, Seen
from hsmdifd.cluster.policy import (
    describe_policy,
    load_policy,
    policy_from_pb,
    policy_to_pb,
    save_policy,
)
from hsmdifd.daemon import timing
from hsmdifd.daemon.config import Config
from hsmdifd.daemon.errors import RequestError
from hsmdifd.daemon.logs import LogLimiter
from hsmdifd.daemon.node import Identity
from hsmdifd.engine import relay
from hsmdifd.placement import planner, rpc_protocol

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass
class Forwarded:
    """A call this device made to the root, cancelled if the root stops being live
    (a frozen root keeps its connections open: the call would wait for ever)."""

    root_id: str
    root_name: str
    call: grpc.aio.Call
    orphaned: bool = False


@dataclass(frozen=True)
class Held:
    """A lease this root holds on a worker."""

    node_id: str
    name: str
    lease_id: str
    endpoint: str  # the worker's relay, as the person is shown it
    local: str = ""  # what the engine connects to: this device's relay to `endpoint`
    bytes: int = 0  # the memory the plan gives the worker's share


class Cluster:
    def __init__(
        self,
        config: Config,
        identity: Identity,
        secret: bytes | None,
        *,
        busy: Callable[[], bool],
        model: Callable[[], pb.ModelInfo],
        declared: dict[str, pb.DeviceProfile] | None = None,
        credentials: tls.DeviceCredentials | None = None,
    ) -> None:
        self._tls = credentials
        self._relays: dict[str, relay.RootRelays] = {}  # by lease id
        self._released: dict[str, tuple[int, float]] = {}  # node id: bytes, when (unix)
        self._unreachable: set[str] = set()  # RPC gone, not heard from since
        self._config = config
        self.identity = identity
        self._secret = secret
        self._busy = busy
        self._model = model
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
        self._background: set[asyncio.Task[None]] = set()  # leases ending on devices gone
        self._forwarded: list[Forwarded] = []
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
        timing = self._config.timing
        self.membership = Membership(
            node_id=self.identity.node_id,
            secret=self._secret,
            local_status=self.local_status,
            on_event=self._handle,
            heartbeat_interval=timing.heartbeat_interval,
            dead_after=timing.dead_after,
            credentials=tls.channel_credentials(self._tls) if self._tls else None,
            channel_extra=tls.CHANNEL_OPTIONS,
            unproven_timeout=timing.unproven_timeout,
        )
        for address in self._config.network.peers:
            if address != self.identity.address:
                self.membership.add_address(address)
        for address, declared in self._declared.items():
            if address != self.identity.address:
                self.membership.add_address(address, declared)
        if self._config.network.mdns:
            host, port = self.identity.address.rsplit(":", 1)
            self._discovery = Discovery(
                instance=f"{self.identity.name}-{self.identity.node_id[:8]}",
                host=host,
                port=int(port),
                txt=self._txt,
                on_hint=self._on_hint,
                on_goodbye=self.membership.goodbye,
                ttl=timing.mdns_ttl,
            )
            await self._discovery.start()

    async def stop(self) -> None:
        for relays in self._relays.values():
            await relays.close()
        self._relays.clear()
        for task in self._background:
            task.cancel()
        if self._discovery is not None:
            await self._discovery.stop()
        if self.membership is not None:
            await self.membership.close()

    def _txt(self) -> dict[str, str]:
        port = int(self.identity.address.rsplit(":", 1)[1])
        return encode_txt(
            node_id=self.identity.node_id,
            protocol_version=PROTOCOL_VERSION,
            port=port,
            memory_mb=self.device.memory_usable_bytes // MIB,
            speed=self.device.speed,
            policy=self.policy.version,
        )

    def _on_hint(self, hint: Hint) -> None:
        # A hint with our own id from another address is followed too: it may be
        # a copy of this device's state directory, which must be found out.
        if hint.address == self.identity.address or self.membership is None:
            return
        if hint.protocol_version != PROTOCOL_VERSION:
            log.debug("%s speaks protocol %d", hint.address, hint.protocol_version)
        self.membership.add_hint(hint.address)

    # ---- this device ---------------------------------------------------------------

    def set_device(self, device: pb.DeviceProfile) -> None:
        """The latest local figures (measured off the loop by the caller)."""
        self.device = device

    def local_status(self) -> pb.PeerStatus:
        device = pb.DeviceProfile()
        device.CopyFrom(self.device)
        return pb.PeerStatus(
            protocol_version=PROTOCOL_VERSION,
            device=device,
            policy=policy_to_pb(self.policy),
            epoch=self.epoch_pb(),
            generating=self._busy(),
            started_at=self.started_at,
            model=self._model(),
            duplicate_of=self.membership.duplicate_of if self.membership else "",
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
        claims = {}
        if self.membership is not None:
            for m in self.membership.members():
                status = self.membership.status_of(m.node_id)
                if status is not None and m.live:
                    claims[m.node_id] = election.RootClaim(status.epoch.root_id, status.generating)
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
        self._unreachable |= node_ids

    def _handle(self, event: Event) -> None:
        """What membership saw: a peer's status carries its policy and whom it names as
        root; any event may change the root."""
        if isinstance(event, Seen):
            self._unreachable.discard(event.status.device.id)
        if isinstance(event, Seen) and event.status.policy.version > self.policy.version:
            status = event.status
            self.adopt_policy(status.policy, status.device.name or status.device.id)
        self._recompute()

    async def set_priority(self, names: list[str], by_memory: bool) -> election.Policy:
        """Make, persist and push a new policy; RequestError for an unknown device."""
        if by_memory:
            order: tuple[str, ...] = ()
        else:
            try:
                order = election.resolve_priority(names, self.members())
            except election.PriorityError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if self.policy.version >= election.MAX_POLICY_VERSION:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the policy version is at its limit ({election.MAX_POLICY_VERSION}); "
                "delete policy.json in every state directory and restart",
            )
        policy = election.Policy(self.policy.version + 1, order, by_memory)
        self.adopt_policy(policy_to_pb(policy))
        await self.push_policy()
        return self.policy

    async def push_policy(self) -> None:
        if self.membership is None:
            return
        message = policy_to_pb(self.policy)
        calls = []
        for m in self.membership.members():
            stub = self.membership.stub_for(m.node_id)
            if m.live and stub is not None:
                calls.append(stub.SetPolicy(message, timeout=2 * self.membership.interval))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("pushing the policy failed for a peer: %s", result)

    @contextlib.contextmanager
    def forwarding(self, call: grpc.aio.Call) -> Iterator[Forwarded]:
        """Watch `call`, just made to the root, until it ends."""
        forwarded = Forwarded(self.root_id, self.root_name(), call)
        self._forwarded.append(forwarded)
        try:
            yield forwarded
        finally:
            self._forwarded.remove(forwarded)

    def forwarded_to(self) -> frozenset[str]:
        """The roots of the calls forwarded from here that are in flight."""
        return frozenset(f.root_id for f in self._forwarded if not f.orphaned)

    def cancel_orphaned(self, live: set[str]) -> None:
        """Cancel the calls to a root that is no longer live."""
        for forwarded in self._forwarded:
            if forwarded.root_id not in live and not forwarded.orphaned:
                log.warning(
                    "the root %s stopped answering: ending a call to it", forwarded.root_name
                )
                forwarded.orphaned = True
                forwarded.call.cancel()

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
        message = policy_to_pb(self.policy)
        names = {m.node_id: m.name for m in self.members()}
        message.order_names.extend(names.get(i, i) for i in self.policy.order)
        return message

    # ---- placement: capacities and leases -----------------------------------------

    def capacities(
        self, extra_local_bytes: int = 0, credit: dict[str, int] | None = None
    ) -> list[planner.DeviceCapacity]:
        """Live devices for the planner: this device (the root) first, then by priority.

        `extra_local_bytes` is memory here that a reload gives back (the loaded model),
        `credit` the same on workers, by node id (the layers they hold for us).
        """
        credit = credit or {}
        me = self.device
        if me.memory_declared:  # a configured figure does not drop as a model loads
            extra_local_bytes = 0
        out = [
            planner.DeviceCapacity(
                node_id=me.id,
                name=me.name,
                address=me.address,
                usable_bytes=_capped(
                    me.memory_usable_bytes + extra_local_bytes, me.memory_total_bytes
                ),
                speed=me.speed,
                load=me.load,
            )
        ]
        if self.membership is None:
            return out
        for member in election.rank(self.members(), self.policy):
            device = self.membership.device_of(member.node_id)
            if member.node_id == me.id or not member.live or device is None:
                continue
            if rpc_protocol.refusal(me.rpc_protocol, device.rpc_protocol):
                continue
            if member.node_id in self._unreachable:
                continue  # its RPC connection failed; membership has not caught up yet
            freed, released_at = self._released.get(member.node_id, (0, 0.0))
            if device.memory_declared or device.measured_at >= released_at:
                freed = 0
            out.append(
                planner.DeviceCapacity(
                    node_id=member.node_id,
                    name=member.name,
                    address=member.address,
                    usable_bytes=_capped(
                        device.memory_usable_bytes
                        + freed
                        + (0 if device.memory_declared else credit.get(member.node_id, 0)),
                        device.memory_total_bytes,
                    ),
                    speed=device.speed,
                    load=device.load,
                )
            )
        return out

    async def acquire_leases(self, plan: planner.Plan) -> list[Held]:
        """An RPC endpoint from each remote device of `plan`, in registration order."""
        held: list[Held] = []
        shares = {s.device.node_id: s.bytes for s in plan.shares[1:]}
        for device in plan.rpc_endpoints_order:
            try:
                lease = await self._lease(device)
            except (RequestError, grpc.aio.AioRpcError, auth.AuthError) as e:
                await self.release_leases(held)
                reason = str(e) if isinstance(e, RequestError) else e.details()
                code = e.code if isinstance(e, RequestError) else e.code()
                raise RequestError(
                    code, f"{device.name} ({device.address}) gave no RPC endpoint: {reason}"
                ) from e
            try:
                relays = await relay.open_root_relays(
                    self._tls,
                    [(lease.endpoint, lease.token, device.node_id)],
                    self._config.cluster.data_plane,
                )
            except BaseException:
                held.append(Held(device.node_id, device.name, lease.lease_id, lease.endpoint))
                await self.release_leases(held)
                raise
            self._relays[lease.lease_id] = relays
            self._released.pop(device.node_id, None)  # planned with what it holds now
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
            stub = self.membership.stub_for(device.node_id) if self.membership else None
            if stub is None or self.membership is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "it is not reachable")
            try:
                return await stub.StartRpc(
                    pb.LeaseRequest(epoch=self.epoch_pb()), timeout=timing.LEASE_TIMEOUT
                )
            except (grpc.aio.AioRpcError, auth.AuthError) as e:
                # AuthError: the link to it has not proved itself (again) yet.
                retried = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
                retry = e.code() in retried and self.is_root
                if not retry or time.monotonic() > deadline:
                    raise
                if device.node_id not in self.live_ids():
                    raise  # it died meanwhile: the caller plans without it
            await asyncio.sleep(self.membership.interval)

    def lease_refusal(self, offered: election.Epoch) -> str | None:
        """Why this device, as a worker, refuses a lease asked under `offered`; None grants it."""
        current = self.epoch()
        if election.grants_lease(offered, current):
            return None
        if offered.policy_version < current.policy_version:
            return (
                f"the root holds policy version {offered.policy_version}, this device "
                f"version {current.policy_version}"
            )
        return f"this device follows {self.root_name()} as root"

    async def release_leases(self, held: list[Held]) -> None:
        """End `held`. Leases on devices that are gone end in the background: a frozen
        device answers late, or never."""
        live = self.live_ids()
        waits = []
        for lease in held:
            if relays := self._relays.pop(lease.lease_id, None):
                await relays.close()  # nothing here reaches that worker any more
            # Until the worker reports figures measured after this, its memory looks as
            # full as when the lease held it: count the share as free meanwhile.
            self._released[lease.node_id] = (lease.bytes, time.time())
            stub = self.membership.stub_for(lease.node_id) if self.membership else None
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

    def root_name(self) -> str:
        if self.is_root:
            return self.identity.name
        status = self.root_status()
        return status.device.name if status else self.root_id

    def devices(self) -> list[pb.DeviceProfile]:
        """Every known device, in priority order, with role, state and rank."""
        ranked = election.rank(self.members(), self.policy)
        by_id = {m.node_id: m for m in ranked}
        out = []
        for rank, member in enumerate(ranked, 1):
            if member.node_id == self.identity.node_id:
                device = pb.DeviceProfile()
                device.CopyFrom(self.device)
            else:
                known = self.membership.device_of(member.node_id) if self.membership else None
                device = known or pb.DeviceProfile(id=member.node_id)
            device.rank = rank
            device.state = by_id[member.node_id].state.value
            if member.node_id != self.identity.node_id and (
                why := rpc_protocol.refusal(self.device.rpc_protocol, device.rpc_protocol)
            ):
                device.problem = f"not planned onto: {why}"
            device.role = "root" if member.node_id == self.root_id else "worker"
            out.append(device)
        if self.membership is not None:
            now = self.membership.now()
            for record in self.membership.records():
                state = self.membership.state_of(record, now)
                unknown = record.status is None and not record.alias_of
                if unknown and state not in election.LIVE_STATES:
                    out.append(
                        pb.DeviceProfile(address=record.address, state=state.value, role="-")
                    )
        return out


def _capped(usable: int, total: int) -> int:
    return min(usable, total) if total else usable
