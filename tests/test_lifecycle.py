"""Tests for hsmdifd.placement.lifecycle: the loaded model as one value and the decisions over it
(what to do after a change, how to replace a model, what stays wanted); examples
first, then properties over generated plans and clusters."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster.election import Epoch
from hsmdifd.cluster.root_leases import Held
from hsmdifd.placement import planner
from hsmdifd.placement.lifecycle import (
    BESIDE_HEADROOM,
    TRANSIENT,
    Action,
    Loaded,
    Order,
    Wanted,
    after_change,
    frozen_request,
    load_order,
    moves,
    wanted_after,
)
from hsmdifd.placement.planner import hypothetical_shape

MiB = 1024 * 1024
GiB = 1024 * MiB
ROOT = "root"
WORKERS = ("w1", "w2", "w3", "w4")
SHAPE = hypothetical_shape(1e9, "4bit")


def device(node_id: str) -> planner.DeviceCapacity:
    return planner.DeviceCapacity(node_id, f"name-{node_id}", f"{node_id}:9999", GiB, 1.0)


def make_plan(workers: tuple[str, ...], share_bytes: tuple[int, ...] = ()) -> planner.Plan:
    ids = (ROOT, *workers)
    sizes = share_bytes or tuple(100 * MiB for _ in ids)
    shares = tuple(
        planner.DeviceShare(device(node), i, 1, i == len(ids) - 1, size, 0.01)
        for i, (node, size) in enumerate(zip(ids, sizes, strict=True))
    )
    return planner.Plan(
        shares=shares,
        standalone=not workers,
        model_bytes=sum(sizes),
        n_ctx=512,
        strategy=planner.Strategy.CAPACITY,
        predicted_tokens_per_s=10.0,
    )


def make_loaded(
    workers: tuple[str, ...], epoch: Epoch | None = None, path: str = "/m.gguf"
) -> Loaded:
    leases = tuple(Held(w, f"name-{w}", f"lease-{w}", f"{w}:5000") for w in workers)
    request = pb.LoadRequest(model_path=path)
    placed = epoch or Epoch(1, ROOT, 1)
    return Loaded(frozen_request(request), SHAPE, make_plan(workers), leases, placed)


# The value.


def test_loaded_is_frozen_and_keeps_the_request_as_given() -> None:
    request = pb.LoadRequest(model_path="/big.gguf", max_seq_len=300)
    loaded = Loaded(frozen_request(request), SHAPE, make_plan(("w1",)), (), Epoch(1, ROOT, 1))
    request.model_path = "/changed.gguf"  # the caller's message changes later
    assert loaded.request.model_path == "/big.gguf"
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.epoch = Epoch(2, ROOT, 2)  # type: ignore[misc]


def test_placed_on_endpoints_and_credit_derive_from_the_value() -> None:
    loaded = make_loaded(("w1", "w2"))
    assert loaded.placed_on == {"w1", "w2"}
    assert loaded.endpoints == ("w1:5000", "w2:5000")
    assert loaded.credit == {"w1": 100 * MiB, "w2": 100 * MiB}  # the root's own share aside


# After a change.

EPOCH = Epoch(1, ROOT, 1)
LATER = Epoch(1, ROOT, 2)


def test_a_lost_holder_abandons_when_busy_and_unloads_when_idle() -> None:
    loaded = make_loaded(("w1", "w2"))
    live = frozenset({ROOT, "w1"})
    assert after_change(loaded, frozenset(), live, LATER, busy=True) is Action.ABANDON
    assert after_change(loaded, frozenset(), live, LATER, busy=False) is Action.UNLOAD


def test_a_load_in_flight_on_a_lost_worker_is_abandoned() -> None:
    live = frozenset({ROOT, "w1"})
    assert after_change(None, frozenset({"w2"}), live, LATER, busy=True) is Action.ABANDON


def test_a_moved_epoch_re_plans_only_when_idle() -> None:
    loaded = make_loaded(("w1",))
    live = frozenset({ROOT, "w1", "w2"})
    assert after_change(loaded, frozenset(), live, LATER, busy=False) is Action.REPLAN
    assert after_change(loaded, frozenset(), live, LATER, busy=True) is Action.NOTHING
    assert after_change(loaded, frozenset(), live, EPOCH, busy=False) is Action.NOTHING
    assert after_change(None, frozenset(), live, LATER, busy=False) is Action.NOTHING


ids = st.frozensets(st.sampled_from(WORKERS))
worker_tuples = st.lists(st.sampled_from(WORKERS), unique=True, max_size=4).map(tuple)
epochs = st.builds(Epoch, st.integers(0, 3), st.just(ROOT), st.integers(0, 3))


@given(worker_tuples, ids, ids, st.tuples(epochs, epochs), st.booleans())
def test_after_change_properties(
    workers: tuple[str, ...],
    placing: frozenset[str],
    live_workers: frozenset[str],
    placed_now: tuple[Epoch, Epoch],
    busy: bool,
) -> None:
    placed, now = placed_now
    loaded = make_loaded(workers, placed)
    live = live_workers | {ROOT}
    action = after_change(loaded, placing, live, now, busy)
    lost = not (set(workers) | placing) <= live
    # A lost holder is always acted on, at once while busy (llama.cpp would wait for ever).
    assert lost == (action in (Action.ABANDON, Action.UNLOAD))
    if lost:
        assert (action is Action.ABANDON) == busy
    # Nothing is ever reloaded under a request in flight, nor without a change.
    if action is Action.REPLAN:
        assert not busy and placed != now
    # Without a model and without a load in flight there is nothing to do.
    assert after_change(None, frozenset(), live, now, busy) is Action.NOTHING


@given(worker_tuples, worker_tuples)
def test_moves_exactly_when_the_devices_differ(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    assert moves(make_plan(a), make_plan(b)) == (a != b)
    assert not moves(make_plan(a), make_plan(a))


# Replacing a model.


def test_a_new_model_loads_beside_the_old_where_memory_holds_both() -> None:
    loaded = make_loaded(())
    plan = make_plan((), (300 * MiB,))
    assert load_order(loaded, plan, {ROOT: 400 * MiB}) is Order.BESIDE
    assert load_order(loaded, plan, {ROOT: 200 * MiB}) is Order.REPLACE
    assert load_order(loaded, plan, {ROOT: 320 * MiB}) is Order.REPLACE  # no headroom
    assert load_order(None, plan, {ROOT: 400 * MiB}) is Order.REPLACE  # nothing to keep


def test_a_worker_of_both_placements_forces_replace() -> None:
    """A worker runs one lease at a time: a new lease would end the one the old model
    runs on."""
    loaded = make_loaded(("w1",))
    free = {ROOT: GiB, "w1": GiB, "w2": GiB}
    assert load_order(loaded, make_plan(("w1",)), free) is Order.REPLACE
    assert load_order(loaded, make_plan(("w2",)), free) is Order.BESIDE


@given(
    worker_tuples,
    worker_tuples,
    st.dictionaries(st.sampled_from((ROOT, *WORKERS)), st.integers(0, 2 * GiB)),
    st.integers(0, GiB),
)
def test_load_order_properties(
    old: tuple[str, ...], new: tuple[str, ...], free: dict[str, int], size: int
) -> None:
    loaded = make_loaded(old)
    plan = make_plan(new, tuple(size for _ in range(len(new) + 1)))
    order = load_order(loaded, plan, free)
    if order is Order.BESIDE:
        # Never two leases asked of one worker, never a device asked for more than it has.
        assert not set(old) & set(new)
        assert all(s.bytes * BESIDE_HEADROOM <= free.get(s.device.node_id, 0) for s in plan.shares)
    elif not set(old) & set(new):
        assert any(s.bytes * BESIDE_HEADROOM > free.get(s.device.node_id, 0) for s in plan.shares)


# What stays wanted.

BIG = pb.LoadRequest(model_path="/big.gguf")
BAD = pb.LoadRequest(model_path="/refused.gguf")


def test_a_refused_new_choice_is_never_wanted() -> None:
    wanted = Wanted(BIG)
    code = grpc.StatusCode.FAILED_PRECONDITION
    assert wanted_after(wanted, BAD, True, code, BIG) == wanted
    assert wanted_after(wanted, BAD, True, code, None) == wanted  # even with nothing loaded
    assert wanted_after(None, BAD, True, code, None) is None


def test_a_failed_re_plan_keeps_the_persons_model_wanted() -> None:
    wanted = Wanted(BIG)
    assert wanted_after(wanted, BIG, False, grpc.StatusCode.UNAVAILABLE, None) == wanted
    # Placed anew it failed for good, but it serves again where it was.
    assert wanted_after(wanted, BIG, False, grpc.StatusCode.FAILED_PRECONDITION, BIG) == wanted


# What is wanted, the load's request, whether the person chose it, how it failed (None:
# it did not), and what serves: the arguments of wanted_after.
Change = tuple[Wanted | None, pb.LoadRequest, bool, grpc.StatusCode | None, pb.LoadRequest | None]
changes = st.tuples(
    st.one_of(st.none(), st.sampled_from((BIG, BAD, pb.LoadRequest())).map(Wanted)),
    st.sampled_from((BIG, BAD, pb.LoadRequest())),
    st.booleans(),
    st.one_of(st.none(), st.sampled_from(list(grpc.StatusCode))),
    st.one_of(st.none(), st.sampled_from((BIG, BAD))),
)


@given(changes)
def test_wanted_after_properties(change: Change) -> None:
    wanted, request, chosen, failure, serving = change
    after = wanted_after(*change)
    if failure is None:
        assert after == Wanted(request)
        return
    # A failed load never becomes wanted unless it already was.
    assert after is None or after == wanted
    # A new choice that failed leaves the person's model as it was.
    if chosen:
        assert after == wanted
    # What is wanted is dropped only when it failed for good and nothing serves it.
    if after is None and wanted is not None:
        assert not chosen and failure not in TRANSIENT and serving != request
