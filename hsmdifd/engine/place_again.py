"""Placing the model again mid-answer, after a device holding layers was lost, so
that the answer can go on (what to ask the engine next is `resume.Answer`'s)."""

from __future__ import annotations

import contextlib
import logging
import time

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster.root_leases import Held
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine import resume
from hsmdifd.engine.resume import Answer
from hsmdifd.engine.supervisor import Engine, finish
from hsmdifd.placement.placer import Placer, name_lost_worker

log = logging.getLogger(__name__)


async def place_again(
    answer: Answer,
    error: RequestError,
    leases: tuple[Held, ...],
    *,
    engine: Engine,
    placer: Placer,
    cluster: Cluster,
) -> None:
    """The answer in flight failed with `error`: when a device holding layers was
    lost, place the model again over the devices left, ready to go on; else, or
    when it cannot go on, raise the error that ends the answer."""
    lost_at = time.monotonic()
    if error.code == grpc.StatusCode.ABORTED:  # the engine died or was ended
        engine.prepare()  # the next one starts while the loss is looked into
    try:
        error = await name_lost_worker(error, leases, cluster)
        # Workers whose RPC stopped answering now: a heartbeat of a worker's daemon may
        # make it plannable again before the plan below, but its share was lost.
        probed = cluster.unreachable_ids & {h.node_id for h in leases}
        if engine.state == pb.READY:
            raise error  # the engine refused the request: nothing was lost
        await finish(placer.forget())  # FAILED says why until the next load
        planned = {d.node_id for d in cluster.capacities()}
        lost = [h.name for h in leases if h.node_id not in planned or h.node_id in probed]
        if not lost:
            raise error
        if not answer.may_resume():
            raise RequestError(error.code, resume.gave_up(lost, answer.resumes)) from error
    except BaseException:
        await engine.discard_spare()
        raise
    answer.lost(lost_at)
    log.warning("%s mid-answer: placing the model again to go on", resume.lost_sentence(lost))
    wanted = placer.wanted
    again = wanted.request if wanted else pb.LoadRequest()
    try:
        async with contextlib.aclosing(placer.place(again, chosen=False)) as events:
            async for _ in events:
                pass
    except RequestError as e:
        await engine.discard_spare()  # the plan failed before the engine was asked
        raise RequestError(e.code, resume.cannot_hold(lost, str(e))) from e
    placed = placer.loaded
    on = [s.device.name for s in placed.plan.shares] if placed else []
    answer.resuming(lost, on)
