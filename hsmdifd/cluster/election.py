"""Who is root: the cluster policy, the ranking of members, epochs and duplicate ids.

Pure functions over frozen dataclasses: every node that holds the same members and
policy computes the same root, whatever order it learnt them in.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # a heartbeat is late, but dead_after has not passed
    DEAD = "dead"
    UNAUTHENTICATED = "unauthenticated"
    INCOMPATIBLE = "incompatible"


LIVE_STATES = frozenset({MemberState.ALIVE, MemberState.SUSPECT})


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str
    address: str  # host:port
    memory_total_bytes: int
    state: MemberState

    @property
    def live(self) -> bool:
        """Eligible for root: alive or suspect."""
        return self.state in LIVE_STATES


@dataclass(frozen=True)
class Policy:
    version: int = 0
    order: tuple[str, ...] = ()  # node ids first, in this order; then by memory
    by_memory_only: bool = False  # ignore `order`


DEFAULT_POLICY = Policy()


def rank(members: Iterable[Member], policy: Policy) -> tuple[Member, ...]:
    """All members, highest priority first: `order`, then memory descending, then id."""
    order = () if policy.by_memory_only else policy.order
    position: dict[str, int] = {}
    for index, node_id in enumerate(order):
        position.setdefault(node_id, index)

    def key(m: Member) -> tuple[int, int, str, str, str, str]:
        # Past node_id the key only separates records sharing an id, keeping it total.
        where = position.get(m.node_id, len(order))
        return (where, -m.memory_total_bytes, m.node_id, m.address, m.name, m.state.value)

    return tuple(sorted(members, key=key))


def elect(members: Iterable[Member], policy: Policy) -> Member | None:
    """The first live member in rank order; None when no member is live."""
    return next((m for m in rank(members, policy) if m.live), None)


def choose_root(
    members: Iterable[Member],
    policy: Policy,
    current_root_id: str | None,
    current_root_busy: bool,
) -> Member | None:
    """`elect`, except that a live root with a generation in flight stays root."""
    ranked = rank(members, policy)
    if current_root_busy and current_root_id is not None:
        current = next((m for m in ranked if m.node_id == current_root_id and m.live), None)
        if current is not None:
            return current
    return next((m for m in ranked if m.live), None)


@dataclass(frozen=True)
class RootClaim:
    """What a live peer last said of the root: whom it names, and whether it is itself
    answering a request (only a root does)."""

    names: str
    generating: bool = False


@dataclass(frozen=True)
class View:
    """What one device knows when it decides whom to follow as root."""

    me: str
    members: tuple[Member, ...]  # this device included
    policy: Policy
    current: str  # the root it follows now
    claims: Mapping[str, RootClaim] = field(default_factory=dict)  # by node id, peers only
    busy: bool = False  # this device has an answer in flight
    refused: bool = False  # this device's id is another's, which started first


def succession(view: View) -> str:
    """The node id this device follows as root next.

    A live root decides its own succession, since only it knows for sure whether an
    answer is in flight: the others follow whom it names. A device that is root itself
    (or joins) defers to a live root that is busy; otherwise, and when the root is
    gone, the election decides (`choose_root`: a busy root stays).
    """
    me = view.me
    members = [m for m in view.members if not (view.refused and m.node_id == me)]
    live = {m.node_id: m for m in members if m.live}
    current = view.current
    claim = view.claims.get(current) if current != me and current in live else None
    if claim is not None:
        named = claim.names if claim.names in live else current
        elected = elect(members, view.policy)
        if named == me and elected is not None and elected.node_id != me:
            # Named by a root that has not yet seen this device hand the root over to
            # it: taking it back would have the two hand it to each other for ever.
            # Wait until the announcement follows the election.
            return current
        return named
    for m in rank(live.values(), view.policy):
        c = view.claims.get(m.node_id)
        if m.node_id != me and c is not None and c.names == m.node_id and c.generating:
            return m.node_id
    keep = current if current in live else None
    root = choose_root(members, view.policy, keep, view.busy)
    return root.node_id if root else me


@dataclass(frozen=True)
class Epoch:
    """A device's view: the root it follows and the policy it holds; what a root
    stamps on its leases."""

    policy_version: int
    root_id: str
    generation: int  # this device's count of membership changes


def grants_lease(offered: Epoch, current: Epoch) -> bool:
    """Whether a worker whose view is `current` serves a root asking under `offered`.

    Fencing: a worker serves only the root it follows itself, under a policy at least
    as new as its own, so a deposed root never drives it. Membership generations are
    each device's own count and are not compared: a root that restarted counts from
    zero. Views agree within a heartbeat, so a refusal is worth asking again.
    """
    return offered.root_id == current.root_id and offered.policy_version >= current.policy_version


MAX_POLICY_VERSION = 2**53
"""Policy versions stay below this (exact in JSON and in every language's numbers)."""
MAX_POLICY_JUMP = 1000
"""How far ahead of a device's own policy version an offered one may be. Every change
adds one, so only a forged or broken policy jumps further."""


def policy_refusal(current: Policy, offered: Policy) -> str | None:
    """Why a device holding `current` refuses `offered`; None when it may take it.

    A device that never held a policy (version 0) takes any version within bounds: it is
    catching up with a cluster that has changed its policy many times.
    """
    if offered.version > MAX_POLICY_VERSION:
        return f"version {offered.version} is over the limit of {MAX_POLICY_VERSION}"
    if current.version and offered.version > current.version + MAX_POLICY_JUMP:
        return (
            f"version {offered.version} is more than {MAX_POLICY_JUMP} ahead of this "
            f"device's {current.version}"
        )
    if len(offered.order) > 1024:
        return f"an order of {len(offered.order)} devices"
    return None


def newer_policy(a: Policy, b: Policy) -> Policy:
    """The higher version; equal versions are settled by content, the same on every node."""
    return max(a, b, key=lambda p: (p.version, p.order, p.by_memory_only))


class PriorityError(ValueError):
    """A priority list that cannot be resolved; `str()` says what to change."""


class UnknownDevice(PriorityError):
    """A name in a priority list matches no known device."""


def _aliases(member: Member) -> set[str]:
    host = member.address.rpartition(":")[0] or member.address
    names = {member.name, member.address, host, host.strip("[]")}
    return {n.casefold() for n in names}


def _describe(member: Member) -> str:
    return f"{member.name} ({member.address}, id {member.node_id})"


def resolve_priority(names: Sequence[str], members: Iterable[Member]) -> tuple[str, ...]:
    """Node ids for `names`: ids match exactly and first; names, addresses, hosts any case."""
    known = sorted(members, key=lambda m: (m.name, m.address, m.node_id))
    found: list[tuple[str, Member]] = []
    unknown: list[str] = []
    ambiguous: list[str] = []
    for name in names:
        exact = {m.node_id: m for m in known if m.node_id == name}
        matches = exact or {m.node_id: m for m in known if name.casefold() in _aliases(m)}
        if not matches:
            unknown.append(repr(name))
        elif len(matches) > 1:
            some = "; ".join(_describe(m) for m in matches.values())
            ambiguous.append(f"{name!r} matches several devices: {some}")
        else:
            (member,) = matches.values()
            found.append((name, member))
    if unknown:
        listing = "; ".join(f"{m.name} ({m.address})" for m in known) or "none yet"
        raise UnknownDevice(f"unknown device: {', '.join(unknown)}; known devices: {listing}")
    if ambiguous:
        raise PriorityError(f"{'. '.join(ambiguous)}. Name the device by its address or id")
    seen: dict[str, list[str]] = {}
    for name, member in found:
        seen.setdefault(member.node_id, []).append(repr(name))
    twice = [
        f"{' and '.join(e)} all name {_describe(m)}"
        for m in known
        if len(e := seen.get(m.node_id, [])) > 1
    ]
    if twice:
        raise PriorityError(f"a device is named more than once: {'; '.join(twice)}")
    return tuple(member.node_id for _, member in found)


class Claim(NamedTuple):
    """One observation: `address` runs a daemon with `node_id`, started at `started_at`."""

    node_id: str
    address: str
    started_at: float  # seconds since the Unix epoch, as the claimant reports it


@dataclass(frozen=True)
class IdConflict:
    keeper: Claim  # the earliest started: it keeps the id
    refused: tuple[Claim, ...]  # started later: each must refuse to join


def id_conflicts(claims: Iterable[tuple[str, str, float]]) -> dict[str, IdConflict]:
    """Node ids claimed from more than one address, with who keeps the id and who refuses.

    Repeated sightings of one address count once, at their earliest start time; equal
    start times are settled by address, so every node reaches the same verdict.
    """
    earliest: dict[tuple[str, str], float] = {}
    for node_id, address, started_at in claims:
        key = (node_id, address)
        earliest[key] = min(earliest.get(key, started_at), started_at)
    by_id: dict[str, list[Claim]] = {}
    for (node_id, address), started_at in earliest.items():
        by_id.setdefault(node_id, []).append(Claim(node_id, address, started_at))
    conflicts: dict[str, IdConflict] = {}
    for node_id, group in sorted(by_id.items()):
        if len(group) > 1:
            keeper, *refused = sorted(group, key=lambda c: (c.started_at, c.address))
            conflicts[node_id] = IdConflict(keeper, tuple(refused))
    return conflicts


def lease_refusal(offered: Epoch, current: Epoch, root_name: str) -> str | None:
    """Why a worker in `current`, following `root_name`, refuses a lease asked under
    `offered`; None grants it."""
    if grants_lease(offered, current):
        return None
    if offered.policy_version < current.policy_version:
        return (
            f"the root holds policy version {offered.policy_version}, this device "
            f"version {current.policy_version}"
        )
    return f"this device follows {root_name} as root"
