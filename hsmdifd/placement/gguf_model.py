"""Read a GGUF model's header into a ModelShape: what the planner needs to know about it.

The header is read by `gguf_header` within its budget; the metadata is checked here the
way llama.cpp checks it at load time, so a file it would refuse (or abort on) is refused
before a load, with a sentence saying what is wrong and what to do.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType, GGUFValueType

from hsmdif.limits import shorten
from hsmdifd.placement.gguf_architectures import LLAMA_ARCHITECTURES, check_tensors
from hsmdifd.placement.gguf_cursor import MIB, SCALARS, Array, Str, Value
from hsmdifd.placement.gguf_header import (
    Header,
    ModelDamagedError,
    ModelUnsupportedError,
    Tensor,
    read_header,
)

# Tensor types that ggml's CPU backend copies into a repacked layout when the CPU has the
# kernels for them (measured on x86-64: Q4_0 and Q4_K are repacked, Q5_0/Q6_K/Q8_0 are not;
# IQ4_NL per ggml-cpu's repack table). The token embedding is read by row and never repacked.
REPACKED_TYPES = frozenset(
    {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.IQ4_NL}
)
# llama.cpp's own bound: LLAMA_MAX_LAYERS.
MAX_LAYERS = 512
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.")
# String values kept for the shape (others are only skipped), and their longest kept form.
_KEPT_STRING = 1 * MIB


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model, read from its GGUF header."""

    path: str
    size_bytes: int
    architecture: str
    name: str
    n_layer: int
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    layer_bytes: tuple[int, ...]
    nonrepeating_bytes: int
    output_bytes: int
    kv_bytes_per_token_per_layer: int
    sliding_window: int
    chat_template: str | None
    n_ff: int = 0  # {arch}.feed_forward_length; 0 when the header does not say
    key_length: int = 0  # per head
    value_length: int = 0  # per head
    repack_bytes: int = 0  # bytes of the tensors the CPU backend may copy into a repacked layout

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.nonrepeating_bytes


def read_model_shape(path: str | os.PathLike[str]) -> ModelShape:
    """Read the header of the GGUF file at `path` (no tensor data), within the budget above.

    Raises a ModelFileError (ModelNotFoundError when it is missing) if the file is one
    llama.cpp could not load, with a sentence saying what is wrong and what to do.
    """
    return read_header(Path(path), _shape)


class _Meta:
    """Typed reads of the metadata, each refusing what llama.cpp would refuse."""

    def __init__(self, shown: str, metadata: dict[bytes, Value], buf: mmap.mmap) -> None:
        self.shown = shown
        self.metadata = metadata
        self.buf = buf

    def refuse(self, what: str, todo: str = "") -> ModelUnsupportedError:
        todo = todo or "convert the model again with a current llama.cpp, or choose another file"
        return ModelUnsupportedError(
            f"{self.shown} cannot be loaded: {what}, which llama.cpp refuses; {todo}"
        )

    def get(self, key: str) -> Value | None:
        return self.metadata.get(key.encode())

    def missing(self, key: str) -> ModelUnsupportedError:
        return ModelUnsupportedError(
            f"{self.shown} lacks the metadata key {key!r}, which llama.cpp needs; it is not a "
            "complete model file: convert the model again with a current llama.cpp"
        )

    def string(self, key: str) -> str | None:
        entry = self.get(key)
        if entry is None:
            return None
        if not isinstance(entry.value, Str):
            raise self.refuse(f"its {key} has the type {entry.vtype.name}, not a string")
        if entry.value.length > _KEPT_STRING:
            return None
        return self.buf[entry.value.start : entry.value.start + entry.value.length].decode(
            "utf-8", "replace"
        )

    def u32(self, key: str, default: int | None = None) -> int:
        entry = self.get(key)
        if entry is None:
            if default is None:
                raise self.missing(key)
            return default
        if entry.vtype != GGUFValueType.UINT32:
            raise self.refuse(f"its {key} has the type {entry.vtype.name}, not UINT32")
        return int(entry.value)  # type: ignore[arg-type]

    def per_layer(self, key: str, n_layer: int, default: list[int] | None) -> list[int]:
        """A value that is one UINT32, or an array with one entry per layer."""
        entry = self.get(key)
        if entry is None:
            if default is None:
                raise self.missing(key)
            return list(default)
        if not isinstance(entry.value, Array):
            return [self.u32(key)] * n_layer
        array = entry.value
        kinds = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.BOOL)
        if array.item_type not in kinds:
            raise self.refuse(f"its {key} is an array of {array.item_type.name}")
        if array.length != n_layer:
            raise self.refuse(f"its {key} has {array.length:,} entries for {n_layer} layers")
        fmt = SCALARS[array.item_type]
        items = [
            int(v)
            for (v,) in fmt.iter_unpack(self.buf[array.start : array.start + n_layer * fmt.size])
        ]
        if min(items) < 0:
            raise self.refuse(f"its {key} holds the negative value {min(items)}")
        return items


def _blocks(tensors: Iterable[Tensor]) -> set[int]:
    return {int(m.group(1)) for t in tensors if (m := _LAYER_TENSOR.match(t.name))}


def _shape(p: Path, shown: str, size: int, header: Header, buf: mmap.mmap) -> ModelShape:
    meta, tensors = _Meta(shown, header.metadata, buf), header.tensors
    arch = meta.string("general.architecture")
    if not arch:
        raise ModelUnsupportedError(
            f"{shown} lacks the metadata key 'general.architecture'; it is not a llama.cpp "
            "model file: give the path to a .gguf model converted for llama.cpp"
        )
    if arch not in LLAMA_ARCHITECTURES:
        raise meta.refuse(
            f"its architecture {shorten(arch)!r} is not one this llama.cpp knows (it knows "
            f"{len(LLAMA_ARCHITECTURES)}, such as llama, gemma3, qwen3 and mistral3)",
            "choose a model of a supported architecture",
        )

    block_count = f"{arch}.block_count"
    n_layer = meta.u32(block_count)
    if not 1 <= n_layer <= MAX_LAYERS:
        raise meta.refuse(f"its {block_count} is {n_layer:,} (llama.cpp holds 1 to {MAX_LAYERS})")
    blocks = _blocks(tensors)
    if missing := [i for i in range(n_layer) if i not in blocks]:
        raise meta.refuse(
            f"its {block_count} is {n_layer:,} but it holds no tensors for block {missing[0]} "
            f"(it holds tensors for {len(blocks)} blocks)"
        )
    if blocks and max(blocks) >= n_layer:
        raise meta.refuse(
            f"it holds tensors for block {max(blocks)}, past its {block_count} of {n_layer}"
        )

    n_embd = meta.u32(f"{arch}.embedding_length")
    head_count = f"{arch}.attention.head_count"
    heads = meta.per_layer(head_count, n_layer, None)
    heads_kv = meta.per_layer(f"{arch}.attention.head_count_kv", n_layer, heads)
    n_head, n_head_kv = max(heads), max(heads_kv)
    if n_embd == 0 or n_head == 0:
        raise meta.refuse(f"its {arch}.embedding_length is {n_embd} and {head_count} {n_head}")
    if n_head_kv == 0:
        raise meta.refuse(f"its {arch}.attention.head_count_kv is 0")
    key_name, value_name = f"{arch}.attention.key_length", f"{arch}.attention.value_length"
    if (meta.get(key_name) is None or meta.get(value_name) is None) and n_embd % n_head:
        raise meta.refuse(
            f"its {arch}.embedding_length ({n_embd}) is not a multiple of {head_count} "
            f"({n_head}), and no {key_name} says how wide a head is"
        )
    for il in range(n_layer):
        if heads_kv[il] and heads[il] % heads_kv[il]:
            raise meta.refuse(
                f"its {head_count} ({heads[il]}) is not a multiple of "
                f"{arch}.attention.head_count_kv ({heads_kv[il]}) in layer {il}"
            )
    key_length = meta.u32(key_name, n_embd // n_head)
    value_length = meta.u32(value_name, n_embd // n_head)
    if key_length == 0 or value_length == 0:
        raise meta.refuse(f"its heads are {key_length} wide ({key_name}, {value_name})")
    n_ffs = meta.per_layer(f"{arch}.feed_forward_length", n_layer, [0] * n_layer)

    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens.value, Array) or tokens.value.item_type != GGUFValueType.STRING:
            raise meta.refuse("its tokenizer.ggml.tokens is not an array of strings")
        n_vocab = tokens.value.length
    else:
        n_vocab = meta.u32(f"{arch}.vocab_size")
    if n_vocab == 0:
        raise meta.refuse("its vocabulary is empty")

    dims = {
        "E": n_embd,
        "V": n_vocab,
        "K": key_length,
    }
    check_tensors(
        meta.refuse,
        arch,
        tensors=tensors,
        n_layer=n_layer,
        dims=dims,
        heads=heads,
        heads_kv=heads_kv,
        n_ffs=n_ffs,
        value_length=value_length,
    )

    end_of_data = header.data_start + max((t.offset + t.n_bytes for t in tensors), default=0)
    if end_of_data > size:
        raise ModelDamagedError(
            f"{shown} is truncated: its tensors need {end_of_data} bytes but the file has only "
            f"{size}; download or copy it again"
        )

    layer_bytes = [0] * n_layer  # n_layer is at most MAX_LAYERS, each block present
    nonrepeating = 0
    by_name: dict[str, int] = {}
    for t in tensors:
        by_name[t.name] = t.n_bytes
        match = _LAYER_TENSOR.match(t.name)
        if match:
            layer_bytes[int(match.group(1))] += t.n_bytes
        else:
            nonrepeating += t.n_bytes
    output_bytes = by_name.get("output.weight", by_name.get("token_embd.weight", 0))
    repack_bytes = sum(
        t.n_bytes
        for t in tensors
        if t.qtype in REPACKED_TYPES and len(t.dims) == 2 and t.name != "token_embd.weight"
    )

    name = meta.string("general.name")
    return ModelShape(
        path=str(p),
        size_bytes=size,
        architecture=arch,
        name=name if name else p.stem,
        n_layer=n_layer,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ctx_train=meta.u32(f"{arch}.context_length"),
        layer_bytes=tuple(layer_bytes),
        nonrepeating_bytes=nonrepeating,
        output_bytes=output_bytes,
        kv_bytes_per_token_per_layer=2 * n_head_kv * (key_length + value_length),
        sliding_window=meta.u32(f"{arch}.attention.sliding_window", 0),
        chat_template=meta.string("tokenizer.chat_template"),
        n_ff=max(n_ffs),
        key_length=key_length,
        value_length=value_length,
        repack_bytes=repack_bytes,
    )
