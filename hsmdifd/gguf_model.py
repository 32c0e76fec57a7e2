"""Read a GGUF model's header into a ModelShape, and estimate what llama.cpp allocates for it.

The header is parsed here rather than with gguf.GGUFReader, which builds numpy objects for
every vocabulary entry and takes 9.5 s on Gemma 3 270M's 262k tokens; this takes 25 ms.
The gguf package still supplies the value types and the tensor type sizes.

The estimate follows llama.cpp as llama-cpp-python 0.3.36 drives it on the CPU with its
defaults: n_batch = n_ubatch = 512, f16 KV cache, flash attention off (the Llama default),
one sequence, and a full-size SWA cache: llama-cpp-python leaves swa_full at llama.cpp's
default, true, so Gemma 3's sliding-window layers get n_ctx cells like the others
(swa_full=False would give them pad(window + n_ubatch, 256) cells).

Measured on x86-64 (AVX2, AVX-512), MiB. "logged" sums the model, KV, output and compute
buffers llama.cpp reports with verbose=True; "RSS" is the growth of the process from
after `import llama_cpp` to after evaluating a prompt that fills the context:

    model                     n_ctx  weights        KV  compute  logged  estimate    RSS
    tiny llama 2x64 f16         512    0.35        0.12    5.76     6.23     12.37   13.4
    synthetic 16x1024 f32      2048  358.72       32      79.01   469.73    506.87  505.7
    same, n_ff 2048            2048  550.72       32      79.01   661.73    698.87  697.8
    same, Q4_0 blocks          2048   79.93+76.50 32      79.01   267.44    304.57  303.6
    Gemma 3 270M Q4_K_M        2048  235.16+12.66 36     515.50   799.32    855.32  378.5
    Gemma 3 270M Q4_K_M        4096  235.16+12.66 72     515.50   835.32    899.32  458.8

What the logs do not show: (1) the CPU backend copies Q4_0 and Q4_K matrices into a
repacked layout (the "+" above), so a Q4_0 model takes about twice its file size; (2) the
CPU backend's work buffer holds the attention scores once more as f16 (32 MiB for the
synthetic models); (3) the vocabulary tables take about 170 bytes per token (44 MiB for
Gemma). And one thing the logs overstate: the compute buffer is sized for logits of all
n_ubatch tokens (512 MiB for Gemma's 262k vocabulary) but llama-cpp-python asks for one
row, so that part stays untouched and Gemma's RSS is half the logged sum. The estimate
keeps it: it is what llama.cpp reserves, and a batch asking for every row touches it.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MIB = 1 << 20

# llama.cpp rounds the context up to a whole number of 256-cell pages (llama_context, and
# the KV cache is allocated for the rounded size).
CTX_PAD = 256
# f32 activations, in units of one n_embd-wide row per token, that stay live beside the
# attention scores at the attention peak of the compute graph (layer input, residual,
# Q, K, V, attention output). Fitted to the logged compute buffers: 5.5 (16x1024) to 6 (2x64).
ATTENTION_ROWS = 6
# llama.cpp's memory outside the buffers it logs and outside the vocabulary: contexts,
# graph metadata, thread pool, batch and sampler arrays. Measured 3.7-5.7 MiB of RSS;
# rounded up, as an estimate that plans memory had better be.
# The host process itself (Python, numpy, the llama.cpp shared libraries: about 45 MiB
# of RSS) is not part of any estimate.
RUNTIME_OVERHEAD = 6 * MIB
# Vocabulary tables (token strings, token-to-id map, merge tables): measured 166 bytes per
# token with Gemma 3's 262,144 tokens (44 MiB); rounded up.
VOCAB_BYTES_PER_TOKEN = 176
# Tensor types that ggml's CPU backend copies into a repacked layout when the CPU has the
# kernels for them (measured on x86-64: Q4_0 and Q4_K are repacked, Q5_0/Q6_K/Q8_0 are not;
# IQ4_NL per ggml-cpu's repack table). The token embedding is read by row and never repacked.
REPACKED_TYPES = frozenset(
    {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.IQ4_NL}
)

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: _U32,
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: _U64,
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# Longer strings (keys, tensor names, chat templates are all far shorter) mean a damaged header.
_MAX_STRING = 16 * MIB
# Numeric arrays up to this length are kept (per-layer head counts); longer ones are skipped.
_KEPT_ARRAY_LENGTH = 4096


class ModelFileError(Exception):
    """A model file that cannot be used.

    str() is a user-facing sentence saying what is wrong and what to do.
    """


class ModelNotFoundError(ModelFileError):
    """The model file does not exist."""


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


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes llama.cpp allocates on one device, by purpose."""

    weights: int
    kv_cache: int
    compute: int
    margin: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.margin


def estimate_memory(
    shape: ModelShape,
    n_ctx: int,
    n_ubatch: int = 512,
    n_layers: int | None = None,
    computes_logits: bool = True,
    *,
    repacks: bool = True,
) -> MemoryEstimate:
    """Estimate the memory of running `shape` with a context of `n_ctx` tokens (0: the trained one).

    With `n_layers` set, the figure is for a device holding that many layers (the largest
    ones) and, if `computes_logits`, the output layer; the token embedding, which stays on
    the root, is then not included. `repacks` is false for RPC servers, which keep the
    weights as they are.
    """
    if n_ctx < 0 or n_ubatch < 1:
        raise ValueError("n_ctx must be >= 0 and n_ubatch >= 1")
    layers = shape.n_layer if n_layers is None else n_layers
    if not 0 <= layers <= shape.n_layer:
        raise ValueError(f"n_layers must be between 0 and {shape.n_layer}")
    n_ctx = n_ctx or shape.n_ctx_train
    cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    tokens = min(n_ubatch, n_ctx)  # llama.cpp caps the batch at the context size

    if n_layers is None:
        weights = shape.weight_bytes
    else:
        weights = sum(sorted(shape.layer_bytes)[shape.n_layer - layers :])
        weights += shape.output_bytes if computes_logits else 0
    if repacks:
        weights += shape.repack_bytes * layers // shape.n_layer
    return MemoryEstimate(
        weights=weights,
        kv_cache=layers * cells * shape.kv_bytes_per_token_per_layer,
        compute=_compute_bytes(shape, cells, tokens, layers > 0, computes_logits),
        margin=RUNTIME_OVERHEAD + VOCAB_BYTES_PER_TOKEN * shape.n_vocab,
    )


def _compute_bytes(
    shape: ModelShape, cells: int, tokens: int, has_layers: bool, computes_logits: bool
) -> int:
    """The compute buffer (the peak of the worst-case graph) plus the CPU backend's work buffer."""
    f32 = 4
    peak = work = 0
    if has_layers:
        # Without flash attention the scores are an f32 [cells, tokens, n_head] tensor, next
        # to one f32 [cells, tokens] mask per attention kind (SWA models have two).
        scores = shape.n_head * cells * tokens * f32
        masks = (2 if shape.sliding_window else 1) * cells * tokens * f32
        rows = ATTENTION_ROWS * max(shape.n_embd, shape.n_head * shape.key_length) * tokens * f32
        ffn = (2 * shape.n_ff + 2 * shape.n_embd) * tokens * f32
        peak = max(scores + masks + rows, ffn)
        # The softmaxed scores are converted to f16 to be multiplied by the f16 V cache.
        work = shape.n_head * cells * tokens * 2
    if computes_logits:
        # Logits for every token of the ubatch, beside the final norm's input and output,
        # plus the output buffer for the one row llama-cpp-python asks for.
        peak = max(peak, (shape.n_vocab + 2 * shape.n_embd) * tokens * f32)
        peak += shape.n_vocab * f32
    return peak + work


def read_model_shape(path: str | os.PathLike[str]) -> ModelShape:
    """Read the header of the GGUF file at `path` (no tensor data).

    Raises ModelFileError (ModelNotFoundError when it is missing) if the file is unusable.
    """
    p = Path(path)
    size = _regular_file_size(p)
    try:
        with p.open("rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise ModelFileError(
                    f"{p} is not a GGUF model file (it does not start with the GGUF magic); "
                    "give the path to a .gguf model file"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse(buf)
    except PermissionError:
        raise ModelFileError(
            f"permission denied reading {p}; make it readable by the user hsmdifd runs as"
        ) from None
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from None
    except _Truncated:
        raise ModelFileError(
            f"{p} is truncated or damaged: its header runs past the end of the file "
            f"({size} bytes); download or copy it again"
        ) from None
    except _Damaged as e:
        raise ModelFileError(f"{p} is damaged: {e}; download or copy it again") from None
    except _UnsupportedVersion as e:
        raise ModelFileError(
            f"{p} is GGUF version {e}, which hsmdifd cannot read (it reads versions 2 and 3); "
            "convert the model again with a current llama.cpp"
        ) from None
    return _shape(p, size, header)


def _regular_file_size(p: Path) -> int:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"model file not found: {p}; give the path to a .gguf file"
        ) from None
    except PermissionError:
        raise ModelFileError(
            f"permission denied reaching {p}; make it and its directories readable by "
            "the user hsmdifd runs as"
        ) from None
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(
            f"{p} is a directory, not a model file; give the path to a .gguf file in it"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{p} is not a regular file; give the path to a .gguf file")
    if st.st_size == 0:
        raise ModelFileError(
            f"{p} is empty (0 bytes), not a GGUF model file; download or copy it again"
        )
    return st.st_size


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _Damaged(Exception):
    """The header holds what no valid GGUF file holds; str() says what."""


class _UnsupportedVersion(Exception):
    """A GGUF version this parser does not know; str() is the version."""


class _Array(NamedTuple):
    length: int
    items: tuple[int | float, ...]  # kept for short numeric arrays only


class _Tensor(NamedTuple):
    name: str
    qtype: GGMLQuantizationType
    n_dims: int
    n_bytes: int
    offset: int  # from the start of the data section


class _Header(NamedTuple):
    metadata: dict[str, object]
    tensors: list[_Tensor]
    data_start: int


class _Cursor:
    """Reads little-endian GGUF values from a buffer, raising _Truncated at its end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def scalar(self, fmt: struct.Struct) -> int | float:
        end = self.pos + fmt.size
        if end > self.size:
            raise _Truncated
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos = end
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.scalar(_U32))

    def u64(self) -> int:
        return int(self.scalar(_U64))

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise _Damaged(f"it holds a string of {n} bytes")
        start = self.pos
        self.skip(n)
        return self.buf[start : self.pos].decode("utf-8", errors="replace")

    def value(self, raw_type: int) -> object:
        vtype = _value_type(raw_type)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        item_type, length = _value_type(self.u32()), self.u64()
        fmt = _SCALARS.get(item_type)
        if fmt is not None:
            start = self.pos
            self.skip(length * fmt.size)
            if length > _KEPT_ARRAY_LENGTH:
                return _Array(length, ())
            items = tuple(item for (item,) in fmt.iter_unpack(self.buf[start : self.pos]))
            return _Array(length, items)
        if item_type == GGUFValueType.STRING:
            self._skip_strings(length)
        else:
            for _ in range(length):
                self.value(item_type)
        return _Array(length, ())

    def _skip_strings(self, count: int) -> None:
        # The hot loop of a 262k-token vocabulary: kept to one unpack per string.
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            raise _Truncated from None
        if pos > self.size:
            raise _Truncated
        self.pos = pos


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Damaged(f"a metadata value has the unknown type {raw}") from None


def _parse(buf: mmap.mmap) -> _Header:
    cur = _Cursor(buf)
    cur.pos = len(_GGUF_MAGIC)
    try:
        version = cur.u32()
        if version not in _SUPPORTED_VERSIONS:
            raise _UnsupportedVersion(version)
        n_tensors, n_kv = cur.u64(), cur.u64()
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.u32())
        tensors = [_read_tensor_info(cur) for _ in range(n_tensors)]
    except RecursionError:
        raise _Damaged("its metadata nests arrays without end") from None
    except (ValueError, OverflowError, struct.error) as e:
        raise _Damaged(str(e)) from None
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Damaged(f"general.alignment is {alignment!r}, not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    return _Header(metadata, tensors, data_start)


def _read_tensor_info(cur: _Cursor) -> _Tensor:
    name = cur.string()
    n_dims = cur.u32()
    if n_dims > _MAX_DIMS:
        raise _Damaged(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
    n_elements = 1
    for _ in range(n_dims):
        n_elements *= cur.u64()
    raw_type = cur.u32()
    offset = cur.u64()
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise _Damaged(f"tensor {name!r} has the unknown type {raw_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return _Tensor(name, qtype, n_dims, n_elements * type_size // block_size, offset)


def _shape(p: Path, size: int, header: _Header) -> ModelShape:
    meta, tensors = header.metadata, header.tensors
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(
            f"{p} lacks the metadata key 'general.architecture'; it is not a llama.cpp model file"
        )

    def get(key: str, default: int | None = None) -> int:
        return _int_key(p, meta, key, default)

    n_layer = get(f"{arch}.block_count")
    n_embd = get(f"{arch}.embedding_length")
    n_head = get(f"{arch}.attention.head_count")
    if min(n_layer, n_embd, n_head) <= 0:
        raise ModelFileError(
            f"{p} has {n_layer} layers, {n_embd} embedding width and {n_head} heads; "
            "it is not a usable model file"
        )
    n_head_kv = get(f"{arch}.attention.head_count_kv", n_head)
    key_length = get(f"{arch}.attention.key_length", n_embd // n_head)
    value_length = get(f"{arch}.attention.value_length", n_embd // n_head)

    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, _Array) else get(f"{arch}.vocab_size")

    end_of_data = header.data_start + max((t.offset + t.n_bytes for t in tensors), default=0)
    if end_of_data > size:
        raise ModelFileError(
            f"{p} is truncated: its tensors need {end_of_data} bytes but the file has only "
            f"{size}; download or copy it again"
        )

    layer_bytes = [0] * n_layer
    nonrepeating = 0
    by_name: dict[str, int] = {}
    for t in tensors:
        by_name[t.name] = t.n_bytes
        match = _LAYER_TENSOR.match(t.name)
        if match and int(match.group(1)) < n_layer:
            layer_bytes[int(match.group(1))] += t.n_bytes
        else:
            nonrepeating += t.n_bytes
    output_bytes = by_name.get("output.weight", by_name.get("token_embd.weight", 0))
    repack_bytes = sum(
        t.n_bytes
        for t in tensors
        if t.qtype in REPACKED_TYPES and t.n_dims == 2 and t.name != "token_embd.weight"
    )

    name = meta.get("general.name")
    template = meta.get("tokenizer.chat_template")
    return ModelShape(
        path=str(p),
        size_bytes=size,
        architecture=arch,
        name=name if isinstance(name, str) and name else p.stem,
        n_layer=n_layer,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ctx_train=get(f"{arch}.context_length"),
        layer_bytes=tuple(layer_bytes),
        nonrepeating_bytes=nonrepeating,
        output_bytes=output_bytes,
        kv_bytes_per_token_per_layer=2 * n_head_kv * (key_length + value_length),
        sliding_window=get(f"{arch}.attention.sliding_window", 0),
        chat_template=template if isinstance(template, str) else None,
        n_ff=get(f"{arch}.feed_forward_length", 0),
        key_length=key_length,
        value_length=value_length,
        repack_bytes=repack_bytes,
    )


def _int_key(p: Path, meta: dict[str, object], key: str, default: int | None) -> int:
    """An integer metadata value; per-layer arrays give their largest entry."""
    value = meta.get(key, default)
    if value is None:
        raise ModelFileError(f"{p} lacks the metadata key {key!r}; it is not a complete model file")
    if isinstance(value, _Array) and value.items:
        value = max(value.items)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFileError(f"{p} has a non-integer {key!r} ({value!r}); it is damaged")
    return value
