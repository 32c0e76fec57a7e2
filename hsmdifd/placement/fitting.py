"""Whether a load request can be placed: its context, its thread count, its strategy and
the memory of the devices it would go on. Pure but for the CPU count; each refusal a
RequestError with a sentence."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from hsmdifd.daemon.errors import RequestError
from hsmdifd.placement import planner
from hsmdifd.placement.gguf_model import ModelShape
from hsmdifd.placement.memory_estimate import MIB, estimate_memory
from hsmdifd.placement.profile import usable_cpus

MIN_CONTEXT = 16


def strategy(name: str, default: str) -> planner.Strategy:
    try:
        return planner.Strategy(name or default)
    except ValueError:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unknown strategy {name!r}: use capacity or latency",
        ) from None


def plan_on(
    shape: ModelShape,
    n_ctx: int,
    devices: Sequence[planner.DeviceCapacity],
    strategy_name: str,
    default_strategy: str,
) -> planner.Plan:
    """Place `shape` with a context of `n_ctx` on `devices` (this one first); RequestError
    when they cannot hold it."""
    if n_ctx < MIN_CONTEXT:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"--max-seq-len {n_ctx} is too small: give at least {MIN_CONTEXT} tokens",
        )
    if len(devices) == 1:
        estimate = estimate_memory(shape, n_ctx)
        usable = devices[0].usable_bytes
        if estimate.total > usable:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{shape.name} does not fit this device: it needs about "
                f"{estimate.total // MIB} MiB at a context of {n_ctx} tokens (weights "
                f"{estimate.weights // MIB} MiB, KV cache {estimate.kv_cache // MIB} MiB, "
                f"compute {estimate.compute // MIB} MiB, runtime {estimate.margin // MIB} "
                f"MiB) but {usable // MIB} MiB are usable; try a smaller --max-seq-len or "
                "a smaller model",
            )
    try:
        return planner.plan(shape, n_ctx, devices, strategy(strategy_name, default_strategy))
    except planner.PlanError as e:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None


def thread_count(asked: int, default: int, cpus: Callable[[], int] = usable_cpus) -> int:
    """The thread count to load with: `asked`, or `default` when it is 0. A count above
    what this device has is refused (llama.cpp would load, then crash on every prompt)."""
    if not asked:
        return default
    available = cpus()
    if asked > available:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"--threads {asked} is more than this device has: it may use "
            f"{available} CPUs (its CPU affinity and cgroup quota); give at most {available}",
        )
    return asked
