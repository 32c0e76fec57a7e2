"""The model on the root as values, and the decisions over them, pure.

`Wanted` is the request the person chose; `Loaded` is what serves it now: the request,
its shape, the plan that placed it, the leases it runs on and the epoch it was placed
under. `Models` (models.py) holds one of each and does what these functions decide.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import election
from hsmdifd.cluster.root_leases import Held
from hsmdifd.placement import planner
from hsmdifd.placement.gguf_model import ModelShape


def frozen_request(request: pb.LoadRequest) -> pb.LoadRequest:
    """A copy of `request` that nothing else holds: the values below keep it as given."""
    copy = pb.LoadRequest()
    copy.CopyFrom(request)
    return copy


@dataclass(frozen=True)
class Wanted:
    """The model the person chose (an empty request: the configured default). It
    outlives unloads to re-plan and failures: the next prompt loads it again. Only the
    person's own unload, or a new choice that loaded, replaces it."""

    request: pb.LoadRequest


@dataclass(frozen=True)
class Loaded:
    """The model that serves: one value, replaced whole, never changed."""

    request: pb.LoadRequest  # as the person gave it (an empty path: the default)
    shape: ModelShape
    plan: planner.Plan
    leases: tuple[Held, ...]  # in the plan's registration order
    epoch: election.Epoch  # the root's view when it was placed

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(h.endpoint for h in self.leases)

    @property
    def placed_on(self) -> frozenset[str]:
        """Node ids of the workers holding its layers."""
        return frozenset(h.node_id for h in self.leases)

    @property
    def credit(self) -> dict[str, int]:
        """Memory each worker gives back when it is placed anew, by node id."""
        return {s.device.node_id: s.bytes for s in self.plan.shares[1:]}


class Action(enum.Enum):
    """What the root does with its model after a change in the cluster."""

    NOTHING = "nothing"
    ABANDON = "abandon"  # a device holding layers is gone mid-request: end the engine
    UNLOAD = "unload"  # the same, idle: unload; the next prompt places it anew
    REPLAN = "replan"  # idle, the cluster moved on: place it anew if a plan differs


def after_change(
    loaded: Loaded | None,
    placing: frozenset[str],
    live: frozenset[str],
    epoch: election.Epoch,
    busy: bool,
) -> Action:
    """The action after a change; `placing` names the workers of a load in flight."""
    holders = placing | (loaded.placed_on if loaded else frozenset())
    if not holders <= live:
        return Action.ABANDON if busy else Action.UNLOAD
    if loaded is None or busy or loaded.epoch == epoch:
        return Action.NOTHING
    return Action.REPLAN


def moves(before: planner.Plan, after: planner.Plan) -> bool:
    """Whether a fresh plan places the model on other devices (a re-plan reloads)."""
    return [s.device.node_id for s in before.shares] != [s.device.node_id for s in after.shares]


class Order(enum.Enum):
    """How a new placement replaces the loaded one."""

    BESIDE = "beside"  # load beside it, swap when ready: it serves until then, or on
    REPLACE = "replace"  # unload first; when the new one fails, load the old one again


BESIDE_HEADROOM = 1.25
"""How much more than its estimated share a device must have free to load a model beside
the one that serves: the estimate errs by up to 10 %, and both engines read the model
file through the page cache of a device that may be near its memory limit."""


def load_order(loaded: Loaded | None, plan: planner.Plan, free: Mapping[str, int]) -> Order:
    """BESIDE when every device of `plan` has room for its share, with headroom, while
    the loaded model stays in memory (`free`: usable bytes by node id, nothing credited
    back) and no worker of `plan` holds the loaded model's layers: a worker runs one lease
    at a time, and a new lease would end the old one under the model that serves."""
    if loaded is None:
        return Order.REPLACE
    if any(s.device.node_id in loaded.placed_on for s in plan.shares[1:]):
        return Order.REPLACE
    if all(s.bytes * BESIDE_HEADROOM <= free.get(s.device.node_id, 0) for s in plan.shares):
        return Order.BESIDE
    return Order.REPLACE


TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
"""Failures of the moment (a device away, memory short now): the request stays wanted."""


def wanted_after(
    wanted: Wanted | None,
    request: pb.LoadRequest,
    chosen: bool,
    failure: grpc.StatusCode | None,
    serving: pb.LoadRequest | None,
) -> Wanted | None:
    """What is wanted after a load of `request` (`chosen`: the person's new choice, else
    a reload of what is wanted) ended with `failure` (None: it loaded), `serving` being
    the request of the model that serves after it (kept, or loaded again).

    A load that worked is wanted from then on. A new choice that failed never is: the
    next prompt must not try a refused file again. A reload that failed for the moment
    stays wanted, as does one whose model serves on; one refused for good (the file
    changed and llama.cpp refuses it) with nothing serving is dropped, for the same
    reason.
    """
    if failure is None:
        return Wanted(frozen_request(request))
    if chosen or failure in TRANSIENT or (serving is not None and serving == request):
        return wanted
    return None
