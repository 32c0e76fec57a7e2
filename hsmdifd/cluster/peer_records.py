"""What this device knows of each peer, the events membership reports, and how alive a
peer counts as: pure functions of the records and the clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster.election import Member, MemberState, id_conflicts


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


def peer_state(record: PeerRecord, now: float, interval: float, dead_after: float) -> MemberState:
    """How alive `record` is at `now`: alive while it answered within two heartbeat
    intervals, suspect after that, dead after `dead_after` seconds or on a goodbye."""
    if record.problem is not None:
        return record.problem
    if record.gone or record.status is None:
        return MemberState.DEAD
    age = now - record.last_seen
    if age > dead_after:
        return MemberState.DEAD
    if age > 2 * interval:
        return MemberState.SUSPECT
    return MemberState.ALIVE


def election_members(
    records: Iterable[PeerRecord], state: Callable[[PeerRecord], MemberState]
) -> list[Member]:
    """Peers with a known identity, as the election sees them: of two that use one node
    id, the one that started later is left out."""
    known = [r for r in records if r.status and not r.status.duplicate_of]
    conflicts = id_conflicts((r.node_id, r.address, r.status.started_at) for r in known if r.status)
    refused = {(c.node_id, c.address) for x in conflicts.values() for c in x.refused}
    out = []
    for r in known:
        if r.status is None or (r.node_id, r.address) in refused:
            continue
        d = r.status.device
        out.append(Member(d.id, d.name, d.address, d.memory_total_bytes, state(r)))
    return out


def device_of(record: PeerRecord) -> pb.DeviceProfile | None:
    """A peer's figures as it reports them, overridden by declared ones.

    The election uses what the peer itself reports, so that every device
    decides from the same inputs; declared figures serve display and planning.
    """
    if record.status is None:
        return None
    device = pb.DeviceProfile()
    device.CopyFrom(record.status.device)
    if record.declared is not None:
        _apply_declared(device, record.declared)
    return device


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
