"""Split a model's layers over the cluster's devices: shape and devices in, a plan out.

Pure: frozen values in and out, no I/O. Memory per device comes from
memory_estimate.estimate_memory for the number of layers the device holds (counted as the
largest layers, so a block's figure never understates it). The root also holds the
token embedding; the shape does not say whether the output shares it (tied), so the
root is charged the larger of the non-output non-repeating bytes and the output's bytes.

Time per token follows memory-bound decode: a device reads each of its layers' weights
and, at a half-full context, their KV cache once per token, at its effective speed
(GB/s); the output device reads the output matrix; each device but the root adds one
network hop. The pipeline is sequential, so the plan's time is the sum of the shares.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from hsmdifd.placement.gguf_model import ModelShape
from hsmdifd.placement.memory_estimate import CTX_PAD, MIB, estimate_memory

HOP_SECONDS = 0.002  # default cost per token of one network hop on a LAN (assumed, not measured)
MIN_SPEED = 0.01  # GB/s assumed for a device that reports no speed (0): it comes last
LOAD_PENALTY = 0.5  # a fully busy device runs at half its speed


@dataclass(frozen=True)
class DeviceCapacity:
    """One live device as the planner sees it."""

    node_id: str
    name: str
    address: str  # host:port of the daemon
    usable_bytes: int  # usable memory now (free, cgroup-capped, minus the reserve)
    speed: float  # GB/s of matrix-vector work; higher is faster
    load: float = 0.0  # CPU utilisation, 0..1

    def __post_init__(self) -> None:
        if self.usable_bytes < 0 or not self.speed >= 0 or not math.isfinite(self.speed):
            raise ValueError(f"device {self.name}: usable_bytes and speed must be >= 0")
        if not math.isfinite(self.load):
            raise ValueError(f"device {self.name}: load must be a number between 0 and 1")

    @property
    def effective_speed(self) -> float:
        """max(speed, MIN_SPEED) * (1 - LOAD_PENALTY * load), load clamped to 0..1."""
        return max(self.speed, MIN_SPEED) * (1 - LOAD_PENALTY * min(max(self.load, 0.0), 1.0))


class Strategy(enum.Enum):
    CAPACITY = "capacity"  # layers in proportion to usable memory x speed
    LATENCY = "latency"  # layers where the predicted time per token is least


@dataclass(frozen=True)
class DeviceShare:
    """One device's part of a plan: a contiguous block of repeating layers."""

    device: DeviceCapacity
    first_layer: int
    n_layers: int  # layers [first_layer, first_layer + n_layers)
    holds_output: bool  # computes the logits
    bytes: int  # estimated memory on this device
    predicted_seconds_per_token: float  # its layers, output and incoming hop


@dataclass(frozen=True)
class Plan:
    """Devices in pipeline order (the first is the root), their layers, memory and speed.

    llama.cpp mapping: with n_gpu_layers = k the root keeps the first n_layer + 1 - k
    layers, and the last k (the output layer counts as one) go to the RPC devices in
    registration order, cut by tensor_split. So k = (layers off the root) + 1, and
    tensor_split holds each remote device's layer count, plus one for the last. Example:
    32 layers as root 10, A 12, B 10 + output gives n_gpu_layers = 23, tensor_split =
    (12.0, 11.0), rpc_endpoints_order = (A, B). Standalone: 0, (), ().
    """

    shares: tuple[DeviceShare, ...]
    standalone: bool  # the root alone, no RPC
    model_bytes: int  # the model's weights (the GGUF tensors)
    n_ctx: int  # the context planned for (the trained one when 0 was asked)
    strategy: Strategy
    predicted_tokens_per_s: float

    @property
    def predicted_seconds_per_token(self) -> float:
        return sum(s.predicted_seconds_per_token for s in self.shares)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shares)

    @property
    def n_gpu_layers(self) -> int:
        return 0 if self.standalone else sum(s.n_layers for s in self.shares[1:]) + 1

    @property
    def tensor_split(self) -> tuple[float, ...]:
        return tuple(float(s.n_layers + s.holds_output) for s in self.shares[1:])

    @property
    def rpc_endpoints_order(self) -> tuple[DeviceCapacity, ...]:
        """The remote devices in the order their leased RPC endpoints must be registered."""
        return tuple(s.device for s in self.shares[1:])


class PlanError(Exception):
    """The devices cannot hold the model; str() says by how much and what to do."""


_ALONE, _ROOT, _MIDDLE, _LAST = "alone", "root", "middle", "last"


def _cells(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD  # llama.cpp's KV cells for a context of n_ctx


def _bytes(shape: ModelShape, n_ctx: int, role: str, layers: int) -> int:
    """Memory of a device holding `layers` repeating layers in `role`."""
    if role == _ALONE:
        return estimate_memory(shape, n_ctx).total
    est = estimate_memory(
        shape, n_ctx, n_layers=layers, computes_logits=role == _LAST, repacks=role == _ROOT
    )
    if role != _ROOT:
        return est.total
    return est.total + max(shape.nonrepeating_bytes - shape.output_bytes, shape.output_bytes)


def _cap(shape: ModelShape, n_ctx: int, role: str, usable: int) -> int:
    """The most layers a device can hold in `role`; -1 if not even none."""
    lo, hi = -1, shape.n_layer
    while lo < hi:  # the estimate grows with the layer count
        mid = (lo + hi + 1) // 2
        if _bytes(shape, n_ctx, role, mid) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _select(shape: ModelShape, n_ctx: int, devices: Sequence[DeviceCapacity]) -> list[int] | None:
    """Layer caps of the shortest prefix of `devices` that can hold the model, or None.

    A prefix holds it when the root and its last device (which holds the output) can
    hold their fixed parts, and the caps add up to n_layer; a middle device that cannot
    hold a layer takes no part.
    """
    root, *rest = devices
    if _bytes(shape, n_ctx, _ALONE, shape.n_layer) <= root.usable_bytes:
        return [shape.n_layer]
    caps = [_cap(shape, n_ctx, _ROOT, root.usable_bytes)]
    for device in rest:
        last = _cap(shape, n_ctx, _LAST, device.usable_bytes)
        if min(caps[0], last) >= 0 and sum(max(c, 0) for c in caps) + last >= shape.n_layer:
            return [*caps, last]
        caps.append(_cap(shape, n_ctx, _MIDDLE, device.usable_bytes))
    return None


def _split_capacity(devices: Sequence[DeviceCapacity], caps: list[int], n_layer: int) -> list[int]:
    """Layers in proportion to usable memory x speed, capped; the remainder to the fastest."""
    caps = [max(c, 0) for c in caps]
    weights = [
        d.usable_bytes * d.effective_speed * (c > 0) for d, c in zip(devices, caps, strict=True)
    ]
    total = sum(weights)
    ks = [min(c, math.floor(n_layer * w / total)) for c, w in zip(caps, weights, strict=True)]
    rest = n_layer - sum(ks)
    for i in sorted(range(len(devices)), key=lambda i: (-devices[i].effective_speed, i)):
        add = min(rest, caps[i] - ks[i])
        ks[i] += add
        rest -= add
    return ks


def _split_latency(per_layer: list[float], caps: list[int], n_layer: int, hop: float) -> list[int]:
    """The layer counts of least predicted time (exact, by dynamic programming over devices).

    Each middle device that takes layers adds a hop; the root and the last device always
    take part, so their hops are a constant.
    """
    best = [0.0] + [math.inf] * n_layer  # best[n]: least time for n layers so far
    picks: list[list[int]] = []
    for i, (p, cap) in enumerate(zip(per_layer, caps, strict=True)):
        fixed = hop if 0 < i < len(caps) - 1 else 0.0
        new, pick = [math.inf] * (n_layer + 1), [0] * (n_layer + 1)
        for n in range(n_layer + 1):
            for k in range(min(max(cap, 0), n) + 1):
                t = best[n - k] + k * p + (fixed if k else 0.0)
                if t < new[n]:
                    new[n], pick[n] = t, k
        best = new
        picks.append(pick)
    ks, n = [], n_layer
    for pick in reversed(picks):
        ks.append(pick[n])
        n -= pick[n]
    return ks[::-1]


def plan(
    shape: ModelShape,
    n_ctx: int,
    devices: Sequence[DeviceCapacity],
    strategy: Strategy = Strategy.CAPACITY,
    hop_seconds: float = HOP_SECONDS,
) -> Plan:
    """Plan `shape` with a context of `n_ctx` (0: the trained one) over `devices`.

    `devices` are in cluster priority order; devices[0] is the root and always takes
    part. Only the shortest prefix that can hold the model is used (standalone when the
    root can); both strategies split among those same devices, latency's choice never
    predicted slower than capacity's. Raises PlanError when no prefix can hold it.
    """
    if not devices or hop_seconds < 0 or n_ctx < 0:
        raise ValueError("plan needs at least one device, n_ctx >= 0 and hop_seconds >= 0")
    n_ctx = n_ctx or shape.n_ctx_train
    caps = _select(shape, n_ctx, devices)
    if caps is None:
        raise PlanError(_shortfall(shape, n_ctx, devices))
    chosen = devices[: len(caps)]
    kv_read = _cells(n_ctx) // 2 * shape.kv_bytes_per_token_per_layer
    layer_read = sum(shape.layer_bytes) / shape.n_layer + kv_read
    per_layer = [layer_read / (d.effective_speed * 1e9) for d in chosen]
    if len(chosen) == 1:
        ks = caps
    elif strategy is Strategy.LATENCY:
        ks = _split_latency(per_layer, caps, shape.n_layer, hop_seconds)
    else:
        ks = _split_capacity(chosen, caps, shape.n_layer)

    shares, first = [], 0
    for i, (device, k) in enumerate(zip(chosen, ks, strict=True)):
        last, root = i == len(chosen) - 1, i == 0
        if not (k or root or last):
            continue  # a middle device with no layers takes no part
        role = _ALONE if root and last else _ROOT if root else _LAST if last else _MIDDLE
        seconds = k * per_layer[i] + (0.0 if root else hop_seconds)
        if last:
            seconds += shape.output_bytes / (device.effective_speed * 1e9)
        shares.append(DeviceShare(device, first, k, last, _bytes(shape, n_ctx, role, k), seconds))
        first += k
    total = sum(s.predicted_seconds_per_token for s in shares)
    return Plan(
        shares=tuple(shares),
        standalone=len(shares) == 1,
        model_bytes=shape.weight_bytes,
        n_ctx=n_ctx,
        strategy=strategy,
        predicted_tokens_per_s=1 / total if total > 0 else math.inf,
    )


def _shortfall(shape: ModelShape, n_ctx: int, devices: Sequence[DeviceCapacity]) -> str:
    """A sentence saying what each device has, what the model needs and how much is missing."""
    usable = [d.usable_bytes for d in devices]
    alone = _bytes(shape, n_ctx, _ALONE, shape.n_layer)
    if len(devices) == 1:
        short = alone - usable[0]
    else:
        roles = [_ROOT] + [_MIDDLE] * (len(devices) - 2) + [_LAST]
        short = held = 0
        for role, u in zip(roles, usable, strict=True):
            cap = _cap(shape, n_ctx, role, u)
            held += max(cap, 0)
            if cap < 0 and role != _MIDDLE:  # the root or the output device lacks room
                short += _bytes(shape, n_ctx, role, 0) - u
        layer = max(shape.layer_bytes) + _cells(n_ctx) * shape.kv_bytes_per_token_per_layer
        short += max(shape.n_layer - held, 0) * layer
    short_mib, alone_mib = -(-max(short, 1) // MIB), -(-alone // MIB)
    have = ", ".join(f"{d.name} ({d.address}) {d.usable_bytes // MIB} MiB" for d in devices)
    return (
        f"{shape.name} does not fit with a context of {n_ctx} tokens: the cluster is about "
        f"{short_mib} MiB short of holding it (it needs about {alone_mib} MiB "
        f"on one device; usable now: {have}, {sum(usable) // MIB} MiB in all). Free memory "
        "on a device, add a device, or choose a smaller context or a smaller quantisation."
    )


# Known sizes by architecture: parameters, n_layer, n_embd, in rows (llama: GPT-2 small's
# shape at 125M, TinyLlama 1.1B, OpenLLaMA 3B, LLaMA 7B to 65B and Llama 2 70B, Llama 3.1 405B).
_SIZES = {
    "llama": tuple(
        zip(
            (0.125e9, 1.1e9, 3e9, 7e9, 13e9, 32.5e9, 68e9, 405e9),
            (12, 22, 26, 32, 40, 60, 80, 126),
            (768, 2048, 3200, 4096, 5120, 6656, 8192, 16384),
            strict=True,
        )
    )
}
_BYTES_PER_PARAMETER = {"4bit": 0.5625, "8bit": 1.0625}  # Q4_K and Q8_0 blocks with scales
_HEAD_DIM = 128
_VOCAB = 32000


def hypothetical_shape(
    num_parameters: float, quantize: str, architecture: str = "llama"
) -> ModelShape:
    """An approximate shape of a model not at hand, for `hsmdifctl plan --num-parameters`.

    n_layer and n_embd are interpolated (log-linearly in the parameter count, n_embd
    rounded to 128) from known sizes (7B 32x4096, 13B 40x5120, 30-34B 60x6656,
    65-70B 80x8192; 125M, 1.1B, 3B and 405B points widen the range; clamped beyond it).
    Vocabulary 32000, untied output, heads of 128, n_head_kv = n_head / 8 from 30B on,
    n_ff = 8/3 n_embd rounded up to 256, trained context 4096. The layers share what the
    parameters leave after the embedding and output, at 0.5625 bytes per parameter for
    '4bit' (Q4_K, repacked on the root) or 1.0625 for '8bit' (Q8_0, not repacked).
    """
    table = _SIZES.get(architecture)
    if table is None:
        raise ValueError(f"no size table for {architecture!r}; known: {', '.join(_SIZES)}")
    if quantize not in _BYTES_PER_PARAMETER:
        raise ValueError(f"quantize must be one of {', '.join(_BYTES_PER_PARAMETER)}")
    if not num_parameters >= 1e8:
        raise ValueError("num_parameters must be at least 1e8")
    p = min(max(num_parameters, table[0][0]), table[-1][0])
    lower = max(row for row in table if row[0] <= p)
    upper = min(row for row in table if row[0] >= p)
    t = math.log(p / lower[0]) / math.log(upper[0] / lower[0]) if upper != lower else 0.0
    n_layer = round(lower[1] + t * (upper[1] - lower[1]))
    n_embd = _HEAD_DIM * round((lower[2] + t * (upper[2] - lower[2])) / _HEAD_DIM)
    n_head = n_embd // _HEAD_DIM
    n_head_kv = max(1, n_head // 8) if num_parameters >= 30e9 else n_head
    per_param = _BYTES_PER_PARAMETER[quantize]
    embedding = round(_VOCAB * n_embd * per_param)
    layer = round((num_parameters - 2 * _VOCAB * n_embd) / n_layer * per_param)
    layers = (layer,) * n_layer
    return ModelShape(
        path="",
        size_bytes=n_layer * layer + 2 * embedding + 4 * n_embd,
        architecture=architecture,
        name=f"{architecture} {num_parameters / 1e9:g}B {quantize}",
        n_layer=n_layer,
        n_vocab=_VOCAB,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ctx_train=4096,
        layer_bytes=layers,
        nonrepeating_bytes=2 * embedding + 4 * n_embd,  # token embedding, output, f32 norm
        output_bytes=embedding,
        kv_bytes_per_token_per_layer=2 * n_head_kv * 2 * _HEAD_DIM,  # f16 K and V
        sliding_window=0,
        chat_template=None,
        n_ff=256 * -(-8 * n_embd // (3 * 256)),
        key_length=_HEAD_DIM,
        value_length=_HEAD_DIM,
        repack_bytes=n_layer * layer + embedding if quantize == "4bit" else 0,
    )


def quantized_shape(shape: ModelShape, size_bytes: int, repacked: bool) -> ModelShape:
    """`shape` as a quantized copy of `size_bytes` would have it, without the copy at hand
    (`hsmdifctl plan MODEL --quantize`): its weights scaled to what the copy's size leaves
    after the header, every layer, the non-repeating tensors and the output by the same
    ratio. `repacked`: the layers' matrices become a type the CPU backend repacks (Q4_K),
    so the root holds them twice."""
    if size_bytes < 0:
        raise ValueError("size_bytes must be >= 0")
    header = max(0, shape.size_bytes - shape.weight_bytes)
    weights = max(0, size_bytes - header)
    ratio = weights / shape.weight_bytes if shape.weight_bytes else 0.0
    layers = tuple(round(b * ratio) for b in shape.layer_bytes)
    nonrepeating = max(0, weights - sum(layers))
    return dataclasses.replace(
        shape,
        size_bytes=header + sum(layers) + nonrepeating,
        layer_bytes=layers,
        nonrepeating_bytes=nonrepeating,
        output_bytes=min(round(shape.output_bytes * ratio), nonrepeating),
        repack_bytes=sum(layers) if repacked else 0,
    )
