"""Tests for hsmdifd.cluster.election: ranking, the root, epochs, policies, priority names and
duplicate ids; examples first, then properties over generated clusters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmdifd.cluster.election import (
    DEFAULT_POLICY,
    Claim,
    Epoch,
    IdConflict,
    Member,
    MemberState,
    Policy,
    PriorityError,
    RootClaim,
    UnknownDevice,
    View,
    choose_root,
    elect,
    grants_lease,
    id_conflicts,
    newer_policy,
    rank,
    resolve_priority,
    succession,
)

GiB = 1024**3
ALIVE = MemberState.ALIVE
NOT_LIVE = (MemberState.DEAD, MemberState.UNAUTHENTICATED, MemberState.INCOMPATIBLE)


def member(node_id: str, memory_gib: int = 8, state: MemberState = ALIVE) -> Member:
    address = f"10.0.0.{ord(node_id[0])}:9999"
    return Member(node_id, f"dev-{node_id}", address, memory_gib * GiB, state)


def ids(members: tuple[Member, ...]) -> list[str]:
    return [m.node_id for m in members]


# Ranking and election.


def test_default_policy_ranks_by_memory_then_id() -> None:
    members = [member("c", 8), member("a", 16), member("b", 8), member("d", 4)]
    assert ids(rank(members, DEFAULT_POLICY)) == ["a", "b", "c", "d"]
    assert elect(members, DEFAULT_POLICY) == member("a", 16)


def test_order_comes_first_then_memory() -> None:
    members = [member("a", 4), member("b", 32), member("c", 16), member("d", 8)]
    policy = Policy(version=3, order=("d", "a"))
    assert ids(rank(members, policy)) == ["d", "a", "b", "c"]


def test_order_may_name_absent_devices() -> None:
    members = [member("a", 4), member("b", 32)]
    assert ids(rank(members, Policy(1, ("gone", "a")))) == ["a", "b"]


def test_by_memory_only_ignores_order() -> None:
    members = [member("a", 4), member("b", 32)]
    assert ids(rank(members, Policy(2, ("a",), by_memory_only=True))) == ["b", "a"]


@pytest.mark.parametrize("state", NOT_LIVE)
def test_elect_skips_members_that_are_not_live(state: MemberState) -> None:
    members = [member("a", 64, state), member("b", 8)]
    assert elect(members, DEFAULT_POLICY) == member("b", 8)
    assert ids(rank(members, DEFAULT_POLICY)) == ["a", "b"]


def test_a_suspect_member_can_be_root() -> None:
    suspect = member("a", 64, MemberState.SUSPECT)
    assert elect([suspect, member("b", 8)], DEFAULT_POLICY) == suspect


def test_no_live_member_means_no_root() -> None:
    assert elect([], DEFAULT_POLICY) is None
    assert elect([member("a", state=MemberState.DEAD)], DEFAULT_POLICY) is None


# No mid-stream takeover.


def test_busy_root_stays_when_a_preferred_device_joins() -> None:
    policy = Policy(1, ("big",))
    members = [member("big", 64), member("small", 8)]
    assert choose_root(members, policy, "small", current_root_busy=True) == member("small", 8)
    assert choose_root(members, policy, "small", current_root_busy=False) == member("big", 64)


def test_dead_root_is_replaced_even_when_busy() -> None:
    members = [member("a", 8, MemberState.DEAD), member("b", 4)]
    assert choose_root(members, DEFAULT_POLICY, "a", current_root_busy=True) == member("b", 4)


def test_unknown_current_root_means_plain_election() -> None:
    members = [member("a", 8), member("b", 4)]
    assert choose_root(members, DEFAULT_POLICY, "gone", True) == member("a", 8)
    assert choose_root(members, DEFAULT_POLICY, None, True) == member("a", 8)


# Epochs and policies.


def test_a_worker_serves_the_root_it_follows_under_a_policy_as_new() -> None:
    current = Epoch(3, "root", 7)
    assert grants_lease(current, current)
    assert grants_lease(Epoch(3, "root", 0), current), "generations are each device's own"
    assert grants_lease(Epoch(4, "root", 0), current), "the root may hold a newer policy"
    assert not grants_lease(Epoch(2, "root", 7), current), "an older policy"
    assert not grants_lease(Epoch(9, "other", 9), current), "not the root this device follows"


def test_newer_policy_prefers_higher_version() -> None:
    old, new = Policy(1, ("a", "b")), Policy(2)
    assert newer_policy(old, new) == new
    assert newer_policy(new, old) == new


def test_newer_policy_settles_equal_versions_the_same_way_both_ways() -> None:
    a, b = Policy(5, ("a",)), Policy(5, ("b",))
    assert newer_policy(a, b) == newer_policy(b, a) == b


# Priority names.

KITCHEN = Member("id-k", "kitchen", "192.168.1.10:9999", 16 * GiB, ALIVE)
ATTIC = Member("id-a", "attic", "192.168.1.11:9999", 8 * GiB, MemberState.DEAD)
LOCAL = Member("id-l", "laptop", "[fe80::1]:9999", 4 * GiB, ALIVE)
DEVICES = (KITCHEN, ATTIC, LOCAL)


def test_resolve_accepts_ids_names_addresses_and_hosts() -> None:
    names = ["id-a", "KITCHEN", "[fe80::1]:9999"]
    assert resolve_priority(names, DEVICES) == ("id-a", "id-k", "id-l")
    assert resolve_priority(["192.168.1.11", "fe80::1"], DEVICES) == ("id-a", "id-l")
    assert resolve_priority([], DEVICES) == ()


def test_an_exact_id_wins_over_a_name() -> None:
    named_like_an_id = Member("attic", "cellar", "192.168.1.20:9999", GiB, ALIVE)
    assert resolve_priority(["attic"], [*DEVICES, named_like_an_id]) == ("attic",)


def test_unknown_names_are_listed_with_the_known_devices() -> None:
    with pytest.raises(UnknownDevice) as caught:
        resolve_priority(["kitchen", "garage", "10.9.9.9"], DEVICES)
    message = str(caught.value)
    assert "'garage'" in message and "'10.9.9.9'" in message
    assert "'kitchen'" not in message
    for device in DEVICES:
        assert f"{device.name} ({device.address})" in message


def test_unknown_name_with_no_devices_known() -> None:
    with pytest.raises(UnknownDevice, match="known devices: none yet"):
        resolve_priority(["garage"], [])


def test_the_same_device_named_twice_is_refused() -> None:
    with pytest.raises(PriorityError, match="more than once") as caught:
        resolve_priority(["kitchen", "attic", "192.168.1.10:9999"], DEVICES)
    assert not isinstance(caught.value, UnknownDevice)
    assert "'kitchen' and '192.168.1.10:9999'" in str(caught.value)


def test_an_ambiguous_name_is_refused() -> None:
    twin = Member("id-t", "kitchen", "192.168.1.12:9999", GiB, ALIVE)
    with pytest.raises(PriorityError, match="by its address or id") as caught:
        resolve_priority(["kitchen"], [*DEVICES, twin])
    assert "192.168.1.10:9999" in str(caught.value) and "id-t" in str(caught.value)
    assert resolve_priority(["192.168.1.12:9999", "id-k"], [*DEVICES, twin]) == ("id-t", "id-k")


def test_a_bare_host_shared_by_two_daemons_is_ambiguous() -> None:
    one = Member("id-1", "one", "127.0.0.1:9001", GiB, ALIVE)
    two = Member("id-2", "two", "127.0.0.1:9002", GiB, ALIVE)
    with pytest.raises(PriorityError, match="several devices"):
        resolve_priority(["127.0.0.1"], [one, two])


# Duplicate ids.


def test_the_newer_claimant_of_an_id_must_refuse() -> None:
    claims = [("x", "10.0.0.1:9999", 100.0), ("x", "10.0.0.2:9999", 200.0), ("y", "h:1", 5.0)]
    assert id_conflicts(claims) == {
        "x": IdConflict(Claim("x", "10.0.0.1:9999", 100.0), (Claim("x", "10.0.0.2:9999", 200.0),))
    }


def test_repeated_sightings_of_one_address_are_no_conflict() -> None:
    assert id_conflicts([("x", "a:1", 10.0), ("x", "a:1", 10.0), ("x", "a:1", 12.0)]) == {}


def test_id_conflicts_with_three_claimants_and_a_tie() -> None:
    claims = [Claim("x", "c:1", 3.0), Claim("x", "b:1", 1.0), Claim("x", "a:1", 3.0)]
    conflict = id_conflicts(claims)["x"]
    assert conflict.keeper == Claim("x", "b:1", 1.0)
    assert conflict.refused == (Claim("x", "a:1", 3.0), Claim("x", "c:1", 3.0))


# Properties.

states = st.sampled_from(MemberState)
members_st = st.builds(
    Member,
    node_id=st.text("abcdef", min_size=1, max_size=3),
    name=st.text("xyz", min_size=1, max_size=2),
    address=st.sampled_from(["h1:1", "h1:2", "h2:1"]),
    memory_total_bytes=st.integers(0, 4).map(lambda n: n * GiB),
    state=states,
)
member_lists = st.lists(members_st, max_size=8, unique_by=lambda m: m.node_id)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Member], Policy]:
    members = draw(member_lists)
    candidates = [m.node_id for m in members] + ["absent"]
    order = draw(st.lists(st.sampled_from(candidates), max_size=6))
    return members, Policy(draw(st.integers(0, 3)), tuple(order), draw(st.booleans()))


policies = st.builds(
    Policy,
    st.integers(0, 3),
    st.lists(st.sampled_from("abc"), max_size=3).map(tuple),
    st.booleans(),
)
epochs = st.builds(Epoch, st.integers(0, 3), st.sampled_from("ab"), st.integers(0, 3))


@given(clusters())
def test_elect_returns_a_live_member_or_none_when_none_is(
    cluster: tuple[list[Member], Policy],
) -> None:
    members, policy = cluster
    root = elect(members, policy)
    if any(m.live for m in members):
        assert root is not None and root.live and root in members
    else:
        assert root is None


@given(clusters())
def test_root_is_never_ranked_below_a_live_member(cluster: tuple[list[Member], Policy]) -> None:
    members, policy = cluster
    ranked = rank(members, policy)
    root = elect(members, policy)
    for m in members:
        if m.live:
            assert root is not None and ranked.index(root) <= ranked.index(m)


@given(clusters())
def test_rank_is_a_permutation_that_follows_the_policy(
    cluster: tuple[list[Member], Policy],
) -> None:
    members, policy = cluster
    ranked = rank(members, policy)
    assert sorted(ids(ranked)) == sorted(m.node_id for m in members)
    order = () if policy.by_memory_only else policy.order
    named = [m for m in ranked if m.node_id in order]
    assert ranked[: len(named)] == tuple(named)
    assert ids(tuple(named)) == [i for i in dict.fromkeys(order) if i in ids(ranked)]
    rest = ranked[len(named) :]
    assert list(rest) == sorted(rest, key=lambda m: (-m.memory_total_bytes, m.node_id))


@given(st.data(), clusters())
def test_input_order_does_not_matter(
    data: st.DataObject, cluster: tuple[list[Member], Policy]
) -> None:
    members, policy = cluster
    shuffled = data.draw(st.permutations(members))
    assert rank(shuffled, policy) == rank(members, policy)
    assert elect(shuffled, policy) == elect(members, policy)
    current = data.draw(st.sampled_from([None, "absent", *ids(tuple(members))]))
    busy = data.draw(st.booleans())
    assert choose_root(shuffled, policy, current, busy) == choose_root(
        members, policy, current, busy
    )


@given(member_lists, st.lists(st.text("abcdef", max_size=3)))
def test_by_memory_only_elects_the_most_memory(members: list[Member], order: list[str]) -> None:
    root = elect(members, Policy(1, tuple(order), by_memory_only=True))
    live = [m.memory_total_bytes for m in members if m.live]
    assert (root.memory_total_bytes if root else None) == (max(live) if live else None)


@given(epochs, epochs)
def test_two_roots_never_both_hold_a_worker(a: Epoch, b: Epoch) -> None:
    current = Epoch(max(a.policy_version, b.policy_version), a.root_id, 0)
    if a.root_id != b.root_id:
        assert not (grants_lease(a, current) and grants_lease(b, current))
    assert grants_lease(a, current) == (a.policy_version == current.policy_version)


@given(policies, policies, policies)
def test_newer_policy_is_commutative_and_associative(a: Policy, b: Policy, c: Policy) -> None:
    assert newer_policy(a, b) == newer_policy(b, a)
    assert newer_policy(newer_policy(a, b), c) == newer_policy(a, newer_policy(b, c))
    assert newer_policy(a, b) in (a, b)
    assert newer_policy(a, b).version == max(a.version, b.version)


@st.composite
def named_devices(draw: st.DrawFn) -> list[Member]:
    """Devices whose ids, names, addresses and hosts are all distinct."""
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=6), max_size=6, unique=True))
    n = len(names)
    uuids = draw(st.lists(st.uuids(), min_size=n, max_size=n, unique=True))
    ports = draw(st.lists(st.integers(1, 65535), min_size=n, max_size=n))
    state = draw(st.lists(states, min_size=n, max_size=n))
    return [
        Member(str(uuids[i]), names[i], f"10.1.{i}.{i + 1}:{ports[i]}", i * GiB, state[i])
        for i in range(n)
    ]


SPELLINGS: dict[str, Callable[[Member], str]] = {
    "id": lambda m: m.node_id,
    "name": lambda m: m.name,
    "upper-case name": lambda m: m.name.upper(),
    "address": lambda m: m.address,
    "host": lambda m: m.address.rpartition(":")[0],
}


@given(st.data(), named_devices())
def test_resolve_priority_round_trips(data: st.DataObject, devices: list[Member]) -> None:
    chosen = data.draw(st.permutations(devices))[: data.draw(st.integers(0, len(devices)))]
    names = [SPELLINGS[data.draw(st.sampled_from(sorted(SPELLINGS)))](m) for m in chosen]
    assert resolve_priority(names, devices) == tuple(m.node_id for m in chosen)


@given(st.data(), clusters())
def test_choose_root_never_leaves_a_busy_live_root(
    data: st.DataObject, cluster: tuple[list[Member], Policy]
) -> None:
    members, policy = cluster
    live = [m for m in members if m.live]
    current = data.draw(st.sampled_from(live)) if live else None
    if current is not None:
        assert choose_root(members, policy, current.node_id, True) == current
        assert choose_root(members, policy, current.node_id, False) == elect(members, policy)
    for m in members:
        if not m.live:
            assert choose_root(members, policy, m.node_id, True) == elect(members, policy)


@given(st.lists(st.tuples(st.sampled_from("xy"), st.sampled_from("abc"), st.integers(0, 3))))
def test_id_conflicts_keep_the_earliest_and_refuse_the_rest(
    claims: list[tuple[str, str, int]],
) -> None:
    conflicts = id_conflicts([(i, a, float(t)) for i, a, t in claims])
    for node_id in "xy":
        addresses = {a for i, a, _ in claims if i == node_id}
        if len(addresses) < 2:
            assert node_id not in conflicts
            continue
        conflict = conflicts[node_id]
        all_claims = (conflict.keeper, *conflict.refused)
        assert {c.address for c in all_claims} == addresses
        assert all(conflict.keeper.started_at <= c.started_at for c in conflict.refused)
        first = min(t for i, _, t in claims if i == node_id)
        assert conflict.keeper.started_at == first


def test_member_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        KITCHEN.name = "other"  # type: ignore[misc]


# Root succession: whom a device follows, from what it knows.


@st.composite
def views(draw: st.DrawFn) -> View:
    peers, policy = draw(clusters())
    me = draw(st.sampled_from(["me", *ids(tuple(peers))])) if draw(st.booleans()) else "me"
    members = [m for m in peers if m.node_id != me]
    members.append(member(me, draw(st.integers(0, 4)), ALIVE))
    known = ids(tuple(members))
    live = [m.node_id for m in members if m.live and m.node_id != me]
    claims = (
        {
            i: RootClaim(draw(st.sampled_from([*known, "absent"])), draw(st.booleans()))
            for i in draw(st.lists(st.sampled_from(live), unique=True))
            if live
        }
        if live
        else {}
    )
    return View(
        me=me,
        members=tuple(members),
        policy=policy,
        current=draw(st.sampled_from([*known, "absent"])),
        claims=claims,
        busy=draw(st.booleans()),
        refused=draw(st.booleans()),
    )


@given(views())
def test_succession_names_a_live_device_or_this_one(view: View) -> None:
    root = succession(view)
    live = {m.node_id for m in view.members if m.live}
    assert root == view.me or root in live


@given(views())
def test_without_claims_the_election_decides(view: View) -> None:
    quiet = dataclasses.replace(view, claims={}, busy=False, refused=False)
    elected = elect(quiet.members, quiet.policy)
    assert succession(quiet) == (elected.node_id if elected else quiet.me)


@given(views())
def test_a_busy_root_keeps_the_root(view: View) -> None:
    """No takeover mid-answer: this device, root and answering, stays root."""
    busy = dataclasses.replace(view, current=view.me, busy=True, refused=False, claims={})
    assert succession(busy) == view.me


@given(views())
def test_a_live_root_is_followed_to_whom_it_names(view: View) -> None:
    live = {m.node_id for m in view.members if m.live}
    root = view.current
    if root == view.me or root not in live or root not in view.claims:
        return
    named = view.claims[root].names
    result = succession(view)
    if named in live and named != view.me:
        assert result == named
    elif named not in live:
        assert result == root


@given(st.data(), views())
def test_succession_does_not_depend_on_the_order_things_were_learnt(
    data: st.DataObject, view: View
) -> None:
    shuffled = dataclasses.replace(view, members=tuple(data.draw(st.permutations(view.members))))
    assert succession(shuffled) == succession(view)


def test_a_device_handed_the_root_waits_for_the_election_to_agree() -> None:
    """h1 (root) names h0, but h0's own election says h1: h0 keeps following h1."""
    h0, h1 = member("a", 4), member("b", 16)
    view = View(
        me="a",
        members=(h0, h1),
        policy=DEFAULT_POLICY,
        current="b",
        claims={"b": RootClaim("a")},
    )
    assert succession(view) == "b"
