"""Models' re-plan decisions in process: a real engine and the tiny model, and a stand-in
for the few Cluster methods Models calls (the multi-host check is test_replan.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import cast

import grpc
import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster.election import Epoch
from hsmdifd.cluster.root_leases import Held
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon.config import Config, ModelConfig, ResourcesConfig, StateConfig
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine.models import Models
from hsmdifd.engine.supervisor import Engine
from hsmdifd.placement import planner
from hsmdifd.placement.gguf_model import read_model_shape
from hsmdifd.placement.memory_estimate import estimate_memory

MiB = 1024 * 1024


class StandInCluster:
    """The root's view: this device alone at first, then a worker joins whose channel
    is still connecting (every lease fails with UNAVAILABLE)."""

    def __init__(self, root_bytes: int) -> None:
        self.root_bytes = root_bytes
        self.worker = False
        self.generation = 1
        self.leases_asked = 0

    def epoch(self) -> Epoch:
        return Epoch(1, "root", self.generation)

    def live_ids(self) -> set[str]:
        return {"root", "w1"} if self.worker else {"root"}

    def capacities(
        self, extra_local_bytes: int = 0, credit: dict[str, int] | None = None
    ) -> list[planner.DeviceCapacity]:
        out = [planner.DeviceCapacity("root", "root", "r:9999", self.root_bytes, 10.0)]
        if self.worker:
            w1 = 1024 * MiB + (credit or {}).get("w1", 0)
            out.append(planner.DeviceCapacity("w1", "w1", "w:9999", w1, 10.0))
        return out

    async def acquire_leases(self, plan: planner.Plan) -> list[Held]:
        self.leases_asked += 1
        await asyncio.sleep(0.01)
        raise RequestError(
            grpc.StatusCode.UNAVAILABLE, "w1 (w:9999) gave no RPC endpoint: Connection refused"
        )

    async def release_leases(self, held: list[Held]) -> None:
        assert not held


def make_models(tmp_path: Path, cluster: StandInCluster, declared_mb: int = 0) -> Models:
    config = Config(
        state=StateConfig(dir=str(tmp_path / "state")),
        resources=ResourcesConfig(threads=1, memory_reserve_mb=0, memory_override_mb=declared_mb),
        model=ModelConfig(default="", context_length=256, max_tokens=4),
    )
    engine = Engine(tmp_path / "engine.sock")
    return Models(config, engine, cast(Cluster, cluster))


async def answer(models: Models) -> str:
    request = pb.GenerateRequest(prompt="hello", raw=True, max_tokens=2, temperature=0)
    return "".join([e.text async for e in models.generate(request)])


@pytest.mark.parametrize("declared", [False, True])
def test_a_failed_re_plan_keeps_the_persons_model(
    tmp_path: Path, tiny_model: Path, declared: bool
) -> None:
    """The re-plan that a returning worker sets off fails on its lease: the person's
    model serves on (loaded beside, where memory holds both), or is loaded again where
    it was (where it does not: a declared memory figure counts the loaded model as
    taking its share of it); never the default model."""
    need = estimate_memory(read_model_shape(tiny_model), 256).total

    async def run() -> None:
        cluster = StandInCluster(root_bytes=2 * need)
        models = make_models(tmp_path, cluster, declared_mb=2 * need // MiB if declared else 0)
        chosen = pb.LoadRequest(model_path=str(tiny_model), max_seq_len=256)
        try:
            async for _ in models.load(chosen):
                pass
            before = models.loaded
            assert before is not None and before.plan.standalone
            engine = models._engine.pids()
            # The worker comes back; a fresh plan would put most of the model on it.
            cluster.worker = True
            cluster.generation += 1
            cluster.root_bytes = need * 19 // 20  # the root keeps its share, w1 the layers
            await models.replan()
            assert cluster.leases_asked == 1
            after = models.loaded
            assert after is not None and after.plan.standalone
            assert after.request == chosen and models.info.state == pb.READY
            assert models.wanted is not None and models.wanted.request == chosen
            assert models.info.path == str(tiny_model)
            if declared:  # unloaded to make room, then loaded again where it was
                assert models._engine.pids() != engine
                assert after.plan == before.plan
            else:  # the model served throughout
                assert models._engine.pids() == engine
                assert after == dataclasses.replace(before, epoch=cluster.epoch())
            assert await answer(models)
            # The epoch was seen: the same view does not re-plan again.
            await models.replan()
            assert cluster.leases_asked == 1
        finally:
            await models.close()

    asyncio.run(run())


def test_an_unload_to_re_plan_keeps_the_choice_for_the_next_prompt(
    tmp_path: Path, tiny_model: Path, short_dir: Path
) -> None:
    other = short_dir / "other.gguf"
    other.write_bytes(tiny_model.read_bytes())

    async def run() -> None:
        cluster = StandInCluster(root_bytes=1024 * MiB)
        models = make_models(tmp_path, cluster)
        chosen = pb.LoadRequest(model_path=str(other), max_seq_len=256)
        try:
            async for _ in models.load(chosen):
                pass
            await models.leases_lost(9.0)  # nothing split: nothing to do
            assert models.info.state == pb.READY
            await models._unload_to_replan("a test")
            assert models.info.state == pb.IDLE
            assert await answer(models)
            assert models.info.path == str(other)  # not the default
            assert await models.unload()
            assert models.wanted is None  # the person's unload: nothing wanted
        finally:
            await models.close()

    asyncio.run(run())


class WorkerDiesWhileLeased(StandInCluster):
    """The worker of a fresh plan dies as its lease is asked for (a prompt right after
    a loss, before the loss was noticed)."""

    async def acquire_leases(self, plan: planner.Plan) -> list[Held]:
        self.worker = False
        self.root_bytes *= 4
        return await super().acquire_leases(plan)


def test_a_device_that_died_while_leased_is_planned_around(
    tmp_path: Path, tiny_model: Path
) -> None:
    need = estimate_memory(read_model_shape(tiny_model), 256).total

    async def run() -> None:
        cluster = WorkerDiesWhileLeased(root_bytes=need * 4 // 5)
        cluster.worker = True
        models = make_models(tmp_path, cluster)
        chosen = pb.LoadRequest(model_path=str(tiny_model), max_seq_len=256)
        try:
            async for _ in models.load(chosen):
                pass
            assert cluster.leases_asked == 1
            loaded = models.loaded
            assert loaded is not None and loaded.plan.standalone
            assert await answer(models)
        finally:
            await models.close()

    asyncio.run(run())
