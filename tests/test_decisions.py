"""The cluster's and the placer's decisions as pure functions, property-tested: what a
worker says when it refuses a lease, the next policy a person's order makes, how alive a
peer counts, the rate announcements are followed at, and whether a load request fits.
Before, each was reached only through daemons in network namespaces."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import election
from hsmdifd.cluster.clocks import TokenBucket
from hsmdifd.cluster.election import Epoch, Member, MemberState, Policy
from hsmdifd.cluster.peer_records import PeerRecord, election_members, peer_state
from hsmdifd.cluster.policy import next_policy, policy_with_names
from hsmdifd.daemon.errors import RequestError
from hsmdifd.placement import fitting, planner
from hsmdifd.placement.memory_estimate import MIB
from tests.test_planner import cluster, synthetic

ids = st.sampled_from(["a", "b", "c"])
epochs = st.builds(Epoch, st.integers(0, 5), ids, st.integers(0, 3))


@given(epochs, epochs)
def test_a_worker_refuses_a_lease_exactly_when_it_does_not_grant_it_and_says_why(
    offered: Epoch, current: Epoch
) -> None:
    why = election.lease_refusal(offered, current, "the attic")
    assert (why is None) == election.grants_lease(offered, current)
    if why is not None and offered.policy_version < current.policy_version:
        assert why == (
            f"the root holds policy version {offered.policy_version}, this device "
            f"version {current.policy_version}"
        )
    elif why is not None:
        assert why == "this device follows the attic as root"


MEMBERS = [
    Member("id-a", "kitchen", "10.0.0.1:9999", 8 << 30, MemberState.ALIVE),
    Member("id-b", "attic", "10.0.0.2:9999", 4 << 30, MemberState.ALIVE),
]


@given(st.integers(0, 1000), st.lists(st.sampled_from(["kitchen", "attic", "id-b"]), max_size=2))
def test_a_new_priority_order_is_one_version_on(version: int, names: list[str]) -> None:
    current = Policy(version, ("id-a",), False)
    try:
        new = next_policy(current, names, False, MEMBERS)
    except RequestError as e:  # a device named twice
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT
        return
    assert new.version == version + 1 and not new.by_memory_only
    assert set(new.order) <= {"id-a", "id-b"} and len(new.order) == len(names)
    by_memory = next_policy(current, names, True, MEMBERS)
    assert by_memory == Policy(version + 1, (), True)


def test_a_priority_order_naming_no_device_or_past_the_last_version_is_refused() -> None:
    with pytest.raises(RequestError) as unknown:
        next_policy(Policy(3), ["cellar"], False, MEMBERS)
    assert unknown.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cellar" in str(unknown.value)
    with pytest.raises(RequestError) as full:
        next_policy(Policy(election.MAX_POLICY_VERSION), [], True, MEMBERS)
    assert full.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "delete policy.json in every state directory" in str(full.value)


def test_a_policy_shown_to_people_names_the_devices_it_knows() -> None:
    shown = policy_with_names(Policy(4, ("id-b", "id-gone", "id-a")), MEMBERS)
    assert list(shown.order) == ["id-b", "id-gone", "id-a"]
    assert list(shown.order_names) == ["attic", "id-gone", "kitchen"]


def _record(**fields: object) -> PeerRecord:
    status = pb.PeerStatus(device=pb.DeviceProfile(id="id-b", name="attic"))
    return PeerRecord(address="10.0.0.2:9999", node_id="id-b", status=status, **fields)  # type: ignore[arg-type]


@given(
    st.floats(0.05, 2.0),
    st.floats(1.0, 10.0),
    st.floats(0.0, 30.0),
    st.booleans(),
)
def test_a_peer_is_alive_then_suspect_then_dead_as_its_silence_grows(
    interval: float, dead_factor: float, age: float, gone: bool
) -> None:
    dead_after = 2 * interval * dead_factor
    record = _record(last_seen=100.0, gone=gone)
    state = peer_state(record, 100.0 + age, interval, dead_after)
    if gone or age > dead_after:
        assert state is MemberState.DEAD
    elif age > 2 * interval:
        assert state is MemberState.SUSPECT
    else:
        assert state is MemberState.ALIVE


@given(st.sampled_from([MemberState.UNAUTHENTICATED, MemberState.INCOMPATIBLE]))
def test_a_peer_with_a_problem_is_that_problem_however_recently_heard(
    problem: MemberState,
) -> None:
    record = _record(last_seen=100.0, problem=problem)
    assert peer_state(record, 100.0, 0.5, 1.5) is problem
    assert peer_state(PeerRecord(address="x:1"), 0.0, 0.5, 1.5) is MemberState.DEAD  # unheard


def test_of_two_peers_with_one_id_the_one_that_started_later_is_left_out() -> None:
    def record(address: str, started_at: float) -> PeerRecord:
        device = pb.DeviceProfile(id="id-b", name="attic", address=address)
        status = pb.PeerStatus(device=device, started_at=started_at)
        return PeerRecord(address=address, node_id="id-b", status=status, last_seen=0.0)

    members = election_members(
        [record("10.0.0.2:9999", 20.0), record("10.0.0.3:9999", 10.0)],
        lambda _: MemberState.ALIVE,
    )
    assert [m.address for m in members] == ["10.0.0.3:9999"]


@given(
    st.integers(1, 10),
    st.floats(0.1, 5.0),
    st.lists(st.floats(0.0, 0.5), min_size=1, max_size=60),
)
def test_announcements_are_followed_at_most_a_burst_then_one_per_interval(
    burst: int, interval: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(burst, interval)
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now)
    assert taken <= burst + now / interval + 1e-9
    assert taken >= min(len(gaps), burst)  # the first `burst` are always followed


@given(st.integers(0, 64), st.integers(1, 64), st.integers(1, 64))
def test_a_load_gets_the_threads_it_asks_for_up_to_what_the_device_has(
    asked: int, default: int, cpus: int
) -> None:
    if asked > cpus:
        with pytest.raises(RequestError) as refused:
            fitting.thread_count(asked, default, lambda: cpus)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"give at most {cpus}" in str(refused.value)
    else:
        assert fitting.thread_count(asked, default, lambda: cpus) == (asked or default)


@given(st.integers(0, 15))
def test_a_context_under_16_tokens_is_refused(n_ctx: int) -> None:
    with pytest.raises(RequestError) as refused:
        fitting.plan_on(synthetic(), n_ctx, cluster(8), "", "capacity")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"--max-seq-len {n_ctx} is too small" in str(refused.value)


def test_a_model_too_big_for_the_one_device_is_refused_with_its_figures() -> None:
    devices = [planner.DeviceCapacity("0", "dev0", "10.0.0.1:9999", 100 * MIB, 5.0, 0.0)]
    with pytest.raises(RequestError) as refused:
        fitting.plan_on(synthetic(), 2048, devices, "", "capacity")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "does not fit this device" in str(refused.value)
    assert "but 100 MiB are usable" in str(refused.value)


def test_an_unknown_strategy_is_refused_and_the_default_serves_when_none_is_asked() -> None:
    with pytest.raises(RequestError) as refused:
        fitting.plan_on(synthetic(), 2048, cluster(8), "fastest", "capacity")
    assert str(refused.value) == "unknown strategy 'fastest': use capacity or latency"
    plan = fitting.plan_on(synthetic(), 2048, cluster(8), "", "latency")
    assert plan.strategy is planner.Strategy.LATENCY
