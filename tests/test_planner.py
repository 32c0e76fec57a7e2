"""Tests for hsmdifd.placement.planner: examples first, then properties over generated models and
clusters, checked against a brute-force search and llama.cpp's layer assignment."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmdifd.placement.gguf_model import ModelShape
from hsmdifd.placement.memory_estimate import MIB, estimate_memory
from hsmdifd.placement.planner import (
    MIN_SPEED,
    DeviceCapacity,
    Plan,
    PlanError,
    Strategy,
    hypothetical_shape,
    plan,
    quantized_shape,
)

GiB = 1 << 30


def device(i: int, usable: int, speed: float = 5.0, load: float = 0.0) -> DeviceCapacity:
    return DeviceCapacity(str(i), f"dev{i}", f"10.0.0.{i + 1}:9999", usable, speed, load)


def cluster(*gib: int) -> list[DeviceCapacity]:
    return [device(i, g * GiB) for i, g in enumerate(gib)]


def synthetic(n_layer: int = 10, layer: int = 64 * MIB, output: int = 8 * MIB) -> ModelShape:
    return ModelShape(
        path="",
        size_bytes=0,
        architecture="llama",
        name="synthetic",
        n_layer=n_layer,
        n_vocab=1000,
        n_embd=64,
        n_head=4,
        n_head_kv=4,
        n_ctx_train=512,
        layer_bytes=(layer,) * n_layer,
        nonrepeating_bytes=2 * output,
        output_bytes=output,
        kv_bytes_per_token_per_layer=256,
        sliding_window=0,
        chat_template=None,
    )


def role_bytes(shape: ModelShape, n_ctx: int, role: str, k: int) -> int:
    """The documented memory rule for a device holding k layers in a role."""
    if role == "alone":
        return estimate_memory(shape, n_ctx).total
    est = estimate_memory(
        shape, n_ctx, n_layers=k, computes_logits=role == "last", repacks=role == "root"
    )
    embedding = max(shape.nonrepeating_bytes - shape.output_bytes, shape.output_bytes)
    return est.total + (embedding if role == "root" else 0)


def roles(n: int) -> list[str]:
    return ["alone"] if n == 1 else ["root"] + ["middle"] * (n - 2) + ["last"]


def prefix_holds(shape: ModelShape, n_ctx: int, devices: Sequence[DeviceCapacity]) -> bool:
    """Brute force: some layer counts fit every device (a middle one may take none)."""
    memo: dict[tuple[str, int], int] = {}

    def fits(role: str, k: int, usable: int) -> bool:
        if role == "middle" and k == 0:
            return True
        if (role, k) not in memo:
            memo[role, k] = role_bytes(shape, n_ctx, role, k)
        return memo[role, k] <= usable

    n, m = shape.n_layer, len(devices)
    for cuts in itertools.combinations(range(n + m - 1), m - 1):
        bounds = (-1, *cuts, n + m - 1)
        ks = [b - a - 1 for a, b in itertools.pairwise(bounds)]
        if all(fits(r, k, d.usable_bytes) for r, k, d in zip(roles(m), ks, devices, strict=True)):
            return True
    return False


def llama_cpp_assignment(n_layer: int, n_gpu_layers: int, split: tuple[float, ...]) -> list[int]:
    """The RPC device of each layer and then the output (-1: the root's CPU), computed as
    llama.cpp's load_tensors does it, in float32."""
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    cumulative = np.cumsum(np.array(split or [1.0], dtype=np.float32), dtype=np.float32)
    bounds = cumulative / cumulative[-1]
    devices = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            devices.append(-1)
        else:
            x = np.float32(il - i_gpu_start) / np.float32(act)
            devices.append(int(np.searchsorted(bounds, x, side="right")))
    return devices


def expected_assignment(p: Plan) -> list[int]:
    layers = [i - 1 for i, s in enumerate(p.shares) for _ in range(s.n_layers)]
    return [*layers, -1 if p.standalone else len(p.shares) - 2]


# Examples.


def test_a_30b_4bit_model_spreads_over_at_least_three_devices() -> None:
    shape = hypothetical_shape(30e9, "4bit")
    p = plan(shape, 2048, cluster(8, 4, 4, 4, 4))

    assert len(p.shares) >= 3
    assert all(s.bytes <= s.device.usable_bytes for s in p.shares)
    assert sum(s.n_layers for s in p.shares) == shape.n_layer
    assert p.shares[-1].holds_output and p.n_gpu_layers == shape.n_layer + 1 - p.shares[0].n_layers
    assert 0 < p.predicted_tokens_per_s < math.inf


def test_a_30b_4bit_model_does_not_fit_8_4_4_4_gib_as_the_root_repacks_its_layers() -> None:
    # The root's Q4_K layers take twice their size (a repacked copy), so 20 GiB fall short.
    with pytest.raises(PlanError, match=r"about \d+ MiB short"):
        plan(hypothetical_shape(30e9, "4bit"), 2048, cluster(8, 4, 4, 4))


def test_a_small_model_runs_standalone_on_the_root() -> None:
    shape = hypothetical_shape(1.1e9, "4bit")
    p = plan(shape, 4096, cluster(8, 16))

    assert p.standalone
    [share] = p.shares
    assert (share.first_layer, share.n_layers, share.holds_output) == (0, shape.n_layer, True)
    assert share.bytes == estimate_memory(shape, 4096).total
    assert (p.n_gpu_layers, p.tensor_split, p.rpc_endpoints_order) == (0, (), ())


def test_too_small_a_cluster_names_every_device_and_the_shortfall() -> None:
    shape = hypothetical_shape(70e9, "4bit")
    devices = cluster(4, 4, 2)
    with pytest.raises(PlanError) as raised:
        plan(shape, 2048, devices)

    text = str(raised.value)
    for d in devices:
        assert f"{d.name} ({d.address}) {d.usable_bytes // MIB} MiB" in text
    assert "10240 MiB in all" in text
    found = re.search(r"about (\d+) MiB short", text)
    assert found and int(found[1]) >= (shape.weight_bytes - 10 * GiB) // MIB
    assert "add a device" in text


def test_three_device_split_maps_to_n_gpu_layers_and_tensor_split() -> None:
    shape, n_ctx = synthetic(n_layer=10), 512
    # Memory for exactly 3, 4 and 3 (+ output) layers: the only split that fits.
    usable = [role_bytes(shape, n_ctx, r, k) for r, k in (("root", 3), ("middle", 4), ("last", 3))]
    devices = [device(i, u) for i, u in enumerate(usable)]
    p = plan(shape, n_ctx, devices)

    assert [(s.first_layer, s.n_layers, s.holds_output) for s in p.shares] == [
        (0, 3, False),
        (3, 4, False),
        (7, 3, True),
    ]
    assert p.n_gpu_layers == 8
    assert p.tensor_split == (4.0, 4.0)
    assert p.rpc_endpoints_order == (devices[1], devices[2])
    assert llama_cpp_assignment(10, 8, (4.0, 4.0)) == [-1] * 3 + [0] * 4 + [1] * 4


def test_latency_fills_the_fast_device_and_is_faster() -> None:
    shape, n_ctx = synthetic(n_layer=10), 512
    devices = [
        device(0, role_bytes(shape, n_ctx, "root", 8), speed=1.0),
        device(1, role_bytes(shape, n_ctx, "last", 9), speed=2.0),
    ]
    capacity = plan(shape, n_ctx, devices, Strategy.CAPACITY)
    latency = plan(shape, n_ctx, devices, Strategy.LATENCY)

    assert [s.n_layers for s in latency.shares] == [1, 9]
    assert [s.n_layers for s in capacity.shares] == [3, 7]
    assert latency.predicted_tokens_per_s > capacity.predicted_tokens_per_s


def test_a_middle_device_without_room_for_a_layer_takes_no_part() -> None:
    shape, n_ctx = synthetic(n_layer=10), 512
    devices = [device(0, role_bytes(shape, n_ctx, "root", 4)), device(1, MIB), device(2, 4 * GiB)]
    p = plan(shape, n_ctx, devices)

    assert [s.device for s in p.shares] == [devices[0], devices[2]]
    assert p.rpc_endpoints_order == (devices[2],)


def test_effective_speed_halves_at_full_load_and_floors_unknown_speed() -> None:
    assert device(0, 0, speed=10.0, load=1.0).effective_speed == 5.0
    assert device(0, 0, speed=10.0, load=0.5).effective_speed == 7.5
    assert device(0, 0, speed=10.0, load=3.0).effective_speed == 5.0
    assert device(0, 0, speed=0.0).effective_speed == MIN_SPEED
    with pytest.raises(ValueError):
        device(0, -1)


def test_plan_needs_a_device() -> None:
    with pytest.raises(ValueError):
        plan(synthetic(), 512, [])


@pytest.mark.parametrize(
    ("parameters", "n_layer", "n_embd"), [(7e9, 32, 4096), (13e9, 40, 5120), (70e9, 81, 8320)]
)
def test_hypothetical_shape_follows_the_llama_table(
    parameters: float, n_layer: int, n_embd: int
) -> None:
    shape = hypothetical_shape(parameters, "8bit")
    assert (shape.n_layer, shape.n_embd, shape.n_vocab) == (n_layer, n_embd, 32000)
    assert shape.weight_bytes == pytest.approx(parameters * 1.0625, rel=1e-3)
    assert shape.repack_bytes == 0


def test_hypothetical_30b_interpolates_and_uses_grouped_query_attention() -> None:
    shape = hypothetical_shape(30e9, "4bit")
    assert 40 < shape.n_layer <= 60 and 5120 < shape.n_embd <= 6656
    assert shape.n_head_kv == shape.n_head // 8
    assert shape.weight_bytes == pytest.approx(30e9 * 0.5625, rel=1e-3)
    assert shape.repack_bytes == sum(shape.layer_bytes) + shape.output_bytes


@pytest.mark.parametrize(
    ("parameters", "quantize", "architecture"),
    [(7e9, "3bit", "llama"), (7e9, "4bit", "gpt-neox"), (1e6, "4bit", "llama")],
)
def test_hypothetical_shape_refuses_what_it_cannot_approximate(
    parameters: float, quantize: str, architecture: str
) -> None:
    with pytest.raises(ValueError):
        hypothetical_shape(parameters, quantize, architecture)


# Properties over small synthetic models and random clusters.


def mebibytes(most: int) -> st.SearchStrategy[int]:
    """Sizes up to `most` MiB, spread evenly (plain large integers cluster near zero)."""
    return st.tuples(st.integers(0, 64), st.integers(0, MIB)).map(
        lambda parts: parts[0] * most * MIB // 64 + parts[1]
    )


@st.composite
def shapes(draw: st.DrawFn) -> ModelShape:
    n_layer = draw(st.integers(1, 8))
    layers = draw(st.lists(mebibytes(200), min_size=n_layer, max_size=n_layer))
    output = draw(mebibytes(32))
    tied = draw(st.booleans())
    n_head = draw(st.integers(1, 8))
    return ModelShape(
        path="",
        size_bytes=0,
        architecture="llama",
        name="generated",
        n_layer=n_layer,
        n_vocab=draw(st.integers(16, 4096)),
        n_embd=draw(st.sampled_from([16, 64, 256])),
        n_head=n_head,
        n_head_kv=n_head,
        n_ctx_train=draw(st.sampled_from([256, 1024, 4096])),
        layer_bytes=tuple(layers),
        nonrepeating_bytes=output + (64 if tied else draw(mebibytes(32))),
        output_bytes=output,
        kv_bytes_per_token_per_layer=draw(st.integers(0, 4096)),
        sliding_window=draw(st.sampled_from([0, 128])),
        chat_template=None,
        n_ff=draw(st.integers(0, 1024)),
        key_length=draw(st.integers(0, 64)),
        value_length=draw(st.integers(0, 64)),
        repack_bytes=draw(st.integers(0, sum(layers) + output)),
    )


devices_lists = st.lists(
    st.tuples(mebibytes(1024), st.floats(0, 100), st.floats(0, 1)),
    min_size=1,
    max_size=5,
).map(lambda specs: [device(i, *spec) for i, spec in enumerate(specs)])


@settings(deadline=None)
@given(
    shape=shapes(),
    n_ctx=st.sampled_from([0, 1, 300, 2048]),
    devices=devices_lists,
    strategy=st.sampled_from(Strategy),
    hop=st.floats(0, 0.01),
)
def test_plans_fit_place_every_layer_once_and_use_the_fewest_devices(
    shape: ModelShape,
    n_ctx: int,
    devices: list[DeviceCapacity],
    strategy: Strategy,
    hop: float,
) -> None:
    holds = [prefix_holds(shape, n_ctx, devices[:m]) for m in range(1, len(devices) + 1)]
    if not any(holds):
        with pytest.raises(PlanError, match=r"about [1-9]\d* MiB short"):
            plan(shape, n_ctx, devices, strategy, hop)
        return
    p = plan(shape, n_ctx, devices, strategy, hop)

    used = int(p.shares[-1].device.node_id) + 1
    assert holds.index(True) + 1 == used  # the fewest: no shorter prefix holds it
    assert p.standalone == holds[0] == (used == 1)
    assert p.shares[0].device == devices[0]
    positions = [int(s.device.node_id) for s in p.shares]
    assert positions == sorted(set(positions))  # in priority order, each once
    assert p.n_ctx == (n_ctx or shape.n_ctx_train)

    first = 0
    for i, s in enumerate(p.shares):
        role = roles(len(p.shares))[i]
        assert s.first_layer == first
        assert s.n_layers > 0 or role != "middle"
        assert s.holds_output == (i == len(p.shares) - 1)
        assert s.bytes == role_bytes(shape, n_ctx, role, s.n_layers) <= s.device.usable_bytes
        first += s.n_layers
    assert first == shape.n_layer
    seconds = p.predicted_seconds_per_token
    assert p.predicted_tokens_per_s == (pytest.approx(1 / seconds) if seconds else math.inf)
    assert llama_cpp_assignment(shape.n_layer, p.n_gpu_layers, p.tensor_split) == (
        expected_assignment(p)
    )


@settings(deadline=None)
@given(
    shape=shapes(),
    n_ctx=st.sampled_from([0, 2048]),
    devices=devices_lists,
    hop=st.floats(0, 0.01),
)
def test_latency_is_never_predicted_slower_than_capacity(
    shape: ModelShape, n_ctx: int, devices: list[DeviceCapacity], hop: float
) -> None:
    try:
        capacity = plan(shape, n_ctx, devices, Strategy.CAPACITY, hop)
    except PlanError:
        return
    latency = plan(shape, n_ctx, devices, Strategy.LATENCY, hop)

    assert latency.shares[-1].device == capacity.shares[-1].device  # the same devices
    slower = latency.predicted_seconds_per_token - capacity.predicted_seconds_per_token
    assert slower <= 1e-9 * capacity.predicted_seconds_per_token


@settings(deadline=None)
@given(shape=shapes(), size=mebibytes(2048), repacked=st.booleans())
def test_a_quantized_shape_has_the_size_asked_in_the_same_proportions(
    shape: ModelShape, size: int, repacked: bool
) -> None:
    quantized = quantized_shape(shape, size, repacked)
    # size_bytes is 0 in the generated shapes: no header, the weights are the size.
    assert abs(quantized.weight_bytes - size) <= shape.n_layer
    assert quantized.size_bytes == quantized.weight_bytes
    ratio = size / shape.weight_bytes if shape.weight_bytes else 0.0
    for before, after in zip(shape.layer_bytes, quantized.layer_bytes, strict=True):
        assert after == round(before * ratio)
    assert quantized.output_bytes <= quantized.nonrepeating_bytes
    assert quantized.repack_bytes == (sum(quantized.layer_bytes) if repacked else 0)
    unchanged = ("n_layer", "n_embd", "n_head", "n_vocab", "kv_bytes_per_token_per_layer")
    assert all(getattr(quantized, k) == getattr(shape, k) for k in unchanged)


def test_a_quantized_shape_keeps_the_header_and_plans_smaller() -> None:
    f16 = dataclasses.replace(
        hypothetical_shape(7e9, "8bit"), size_bytes=0, repack_bytes=0, path="/m/f16.gguf"
    )
    f16 = dataclasses.replace(f16, size_bytes=f16.weight_bytes + 4 * MIB)  # a 4 MiB header
    estimate = f16.size_bytes // 3
    quantized = quantized_shape(f16, estimate, repacked=True)
    assert quantized.size_bytes == estimate
    assert quantized.weight_bytes == estimate - 4 * MIB
    assert quantized.path == f16.path
    devices = [device(0, 64 * GiB)]
    assert plan(quantized, 2048, devices).model_bytes < plan(f16, 2048, devices).model_bytes
    with pytest.raises(ValueError):
        quantized_shape(f16, -1, repacked=False)
