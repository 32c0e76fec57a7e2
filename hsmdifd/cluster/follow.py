"""What this device does after the cluster changed (the root, the live set or the
policy): decided by `decide` from a frozen snapshot, carried out by `Follower`, one
change at a time."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from hsmdifd.cluster.view import Cluster
from hsmdifd.engine.models import Models
from hsmdifd.placement.leases import Leases
from hsmdifd.placement.lifecycle import Action

log = logging.getLogger(__name__)


class Step(enum.Enum):
    END_ORPHANED = "end the calls forwarded to a root that is gone"
    END_LEASE = "end the lease of a root that is gone"
    STEP_DOWN = "unload: another device is root now"
    CUT_OFF = "end the answer in flight: a device holding layers is gone"
    UNLOAD = "unload: a device holding layers is gone; the next prompt plans anew"
    REPLAN = "place the model anew if a fresh plan differs"


@dataclass(frozen=True)
class Snapshot:
    is_root: bool
    live: frozenset[str]  # node ids, this device included
    forwarded_to: frozenset[str]  # the roots of calls forwarded from here, in flight
    lease_holder: str | None  # the root holding this device's lease, as a worker
    model_loaded: bool  # an engine is up here (loading, ready or failed)
    in_flight: bool  # an answer or a load is in flight here
    model: Action  # what the model plane says of the change (lifecycle.after_change)


_MODEL_STEPS = {
    Action.ABANDON: Step.CUT_OFF,
    Action.UNLOAD: Step.UNLOAD,
    Action.REPLAN: Step.REPLAN,
}


def decide(s: Snapshot) -> tuple[Step, ...]:
    """The steps to take, in order."""
    steps = []
    if s.forwarded_to - s.live:
        steps.append(Step.END_ORPHANED)
    if s.lease_holder is not None and s.lease_holder not in s.live:
        steps.append(Step.END_LEASE)
    if not s.is_root:
        if s.model_loaded and not s.in_flight:
            steps.append(Step.STEP_DOWN)
    elif s.model in _MODEL_STEPS:
        steps.append(_MODEL_STEPS[s.model])
    return tuple(steps)


class Follower:
    """Waits for the cluster's change signal and carries out what `decide` says."""

    def __init__(self, cluster: Cluster, models: Models, leases: Leases | None) -> None:
        self._cluster, self._models, self._leases = cluster, models, leases

    def snapshot(self) -> Snapshot:
        live = frozenset(self._cluster.live_ids())
        return Snapshot(
            is_root=self._cluster.is_root,
            live=live,
            forwarded_to=self._cluster.forwarded_to(),
            lease_holder=self._leases.holder if self._leases else None,
            model_loaded=self._models.engine_up(),
            in_flight=self._models.busy(),
            model=self._models.after_change(live),
        )

    async def run(self) -> None:
        while True:
            await self._cluster.changed.wait()
            self._cluster.changed.clear()
            try:
                await self.follow()
            except Exception:
                log.exception("following a change in the cluster failed")

    async def follow(self) -> None:
        snapshot = self.snapshot()
        for step in decide(snapshot):
            log.debug("cluster changed: %s", step.value)
            await self._carry_out(step, snapshot.live)

    async def _carry_out(self, step: Step, live: frozenset[str]) -> None:
        if step is Step.END_ORPHANED:
            self._cluster.cancel_orphaned(set(live))
        elif step is Step.END_LEASE and self._leases is not None:
            await self._leases.holder_gone(set(live))
        elif step is Step.STEP_DOWN:
            await self._models.step_down()
        elif step in (Step.CUT_OFF, Step.UNLOAD):
            await self._models.lost_devices(set(live))
        elif step is Step.REPLAN:
            await self._models.replan()
