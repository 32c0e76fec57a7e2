"""What a device does after the cluster changed: follow.decide over generated snapshots."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hsmdifd.cluster.follow import Snapshot, Step, decide
from hsmdifd.placement.lifecycle import Action

ids = st.sampled_from(["a", "b", "c", "d"])
snapshots = st.builds(
    Snapshot,
    is_root=st.booleans(),
    live=st.frozensets(ids),
    forwarded_to=st.frozensets(ids),
    lease_holder=st.none() | ids,
    model_loaded=st.booleans(),
    in_flight=st.booleans(),
    model=st.sampled_from(list(Action)),
)
MODEL_STEPS = {Step.CUT_OFF, Step.UNLOAD, Step.REPLAN}


@given(snapshots)
def test_each_step_once_and_in_a_fixed_order(s: Snapshot) -> None:
    steps = decide(s)
    assert len(set(steps)) == len(steps)
    order = list(Step)
    assert list(steps) == sorted(steps, key=order.index)


@given(snapshots)
def test_calls_to_a_root_that_is_gone_end_and_only_those(s: Snapshot) -> None:
    assert (Step.END_ORPHANED in decide(s)) == bool(s.forwarded_to - s.live)


@given(snapshots)
def test_a_lease_ends_exactly_when_its_root_is_gone(s: Snapshot) -> None:
    gone = s.lease_holder is not None and s.lease_holder not in s.live
    assert (Step.END_LEASE in decide(s)) == gone


@given(snapshots)
def test_only_the_root_acts_on_its_model(s: Snapshot) -> None:
    steps = set(decide(s))
    if not s.is_root:
        assert not steps & MODEL_STEPS
    else:
        assert Step.STEP_DOWN not in steps
        expected = {
            Action.ABANDON: {Step.CUT_OFF},
            Action.UNLOAD: {Step.UNLOAD},
            Action.REPLAN: {Step.REPLAN},
            Action.NOTHING: set(),
        }[s.model]
        assert steps & MODEL_STEPS == expected


@given(snapshots)
def test_a_device_that_is_no_longer_root_unloads_only_when_idle(s: Snapshot) -> None:
    stepping_down = Step.STEP_DOWN in decide(s)
    assert stepping_down == (not s.is_root and s.model_loaded and not s.in_flight)
