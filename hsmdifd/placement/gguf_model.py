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

import bisect
import codecs
import mmap
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from hsmdif.limits import shorten

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

# The header reader's budget. Every count, length and offset in a header is checked
# against the bytes the file has left before anything is read or allocated for it, and
# against these bounds, so a damaged or hostile file is refused in milliseconds with a
# few MiB of memory. Gemma 3 270M's header (262,144 tokens) is 4.3 MiB, read in 40 ms.
#
# Bytes of header (metadata and tensor descriptions) read at most: 64 MiB, plus 256 bytes
# for each token of the vocabulary (tokenizer.ggml.tokens), which with its scores, types
# and merges is most of a large header.
HEADER_BYTES = 64 * MIB
HEADER_BYTES_PER_TOKEN = 256
# Seconds a header may take to read, checked between entries: a file on a stalled or
# very slow disk is refused rather than holding the model lock.
HEADER_SECONDS = 5.0
# Counts beyond any real model (the largest have a few thousand tensors, a hundred keys
# and 262,144 tokens); each bounds the time spent on one header.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 14
MAX_VOCAB = 1 << 22
# llama.cpp's own bounds: LLAMA_MAX_LAYERS, GGML_MAX_NAME - 1, GGML_MAX_DIMS.
MAX_LAYERS = 512
_MAX_TENSOR_NAME = 63
_MAX_DIMS = 4

# The architectures the llama.cpp built into llama-cpp-python 0.3.36 knows (LLM_ARCH_NAMES
# in src/llama-arch.cpp); it refuses any other with "unknown model architecture".
_ARCHITECTURE_NAMES = """
    llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert
    modern-bert nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom
    stablelm qwen qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35
    qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm
    minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2
    mamba mamba2 maple jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2
    olmoe muse-glimmer openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4
    chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron nemotron_h
    nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe
    granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe
    bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe
    hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream
    smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2
    minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2
    step35 spark2_5 llama-embed maincoder kimi-linear kimi-k3 glm5-next talkie mellum
    nanbeige qwen3tts pockettts
"""
LLAMA_ARCHITECTURES = frozenset(_ARCHITECTURE_NAMES.split())

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
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
# The smallest a metadata entry can be (key length, a 1-byte key, type, a 1-byte value)
# and a tensor description (name length, type, offset, with no name and no dimensions).
_MIN_KEY_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
# Metadata keys are names like "llama.block_count"; strings (chat templates, the
# Hugging Face tokenizer JSON some converters embed) stay below 16 MiB.
_MAX_KEY = 1024
_MAX_STRING = 16 * MIB
# String values kept for the shape (others are only skipped), and their longest kept form.
_KEPT_STRING = 1 * MIB
# Arrays of strings whose every entry llama.cpp decodes as UTF-8 (it aborts the process
# on an invalid one rather than refusing the file).
_UTF8_ARRAYS = frozenset({b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges"})
# Entries skipped between two looks at the clock.
_CHUNK = 1 << 12
_UTF8_WINDOW = 4 * MIB


class ModelFileError(Exception):
    """A model file that cannot be used.

    str() is a user-facing sentence saying what is wrong and what to do.
    """


class ModelNotFoundError(ModelFileError):
    """The model file does not exist."""


class ModelUnreadableError(ModelFileError):
    """The path names something that cannot be read as a file (permissions, a directory)."""


class ModelDamagedError(ModelFileError):
    """The file is not a well-formed GGUF file: truncated, corrupt, or over the budget."""


class ModelUnsupportedError(ModelFileError):
    """A well-formed GGUF file that llama.cpp would refuse (or abort on) when loading."""


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
    """Read the header of the GGUF file at `path` (no tensor data), within the budget above.

    Raises a ModelFileError (ModelNotFoundError when it is missing) if the file is one
    llama.cpp could not load, with a sentence saying what is wrong and what to do.
    """
    return _read_header(Path(path), _shape)


class TensorTable(NamedTuple):
    data_start: int
    """Where the tensor data starts in the file: the header's size, aligned."""
    tensors: tuple[Tensor, ...]


def read_tensor_table(path: str | os.PathLike[str]) -> TensorTable:
    """The tensor descriptions of the GGUF file at `path` (no tensor data), read as fast
    as its shape and with the same checks of the header and the same errors; not the
    checks of the metadata a load needs (read_model_shape does those)."""

    def table(p: Path, shown: str, size: int, header: _Header, buf: mmap.mmap) -> TensorTable:
        return TensorTable(header.data_start, tuple(header.tensors))

    return _read_header(Path(path), table)


_R = TypeVar("_R")


def _read_header(p: Path, then: Callable[[Path, str, int, _Header, mmap.mmap], _R]) -> _R:
    """Parse the header of `p`, within the budget above, and hand it to `then`;
    every failure a ModelFileError with a sentence."""
    size = _regular_file_size(p)
    shown = shorten(str(p), 200)
    try:
        with p.open("rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise ModelDamagedError(
                    f"{shown} is not a GGUF model file (it does not start with the GGUF "
                    "magic); give the path to a .gguf model file"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse(buf, time.monotonic() + HEADER_SECONDS)
                return then(p, shown, len(buf), header, buf)
    except PermissionError:
        raise ModelUnreadableError(
            f"permission denied reading {shown}; make it readable by the user hsmdifd runs as"
        ) from None
    except OSError as e:
        raise ModelUnreadableError(f"cannot read {shown}: {e.strerror or e}") from None
    except _Truncated as e:
        raise ModelDamagedError(
            f"{shown} is truncated or damaged: {e or 'its header runs past the end of the file'}"
            f" ({size:,} bytes); download or copy it again"
        ) from None
    except _Damaged as e:
        raise ModelDamagedError(f"{shown} is damaged: {e}; download or copy it again") from None
    except _OverBudget:
        raise ModelDamagedError(
            f"{shown} has a header larger than hsmdifd reads ({HEADER_BYTES // MIB} MiB plus "
            f"{HEADER_BYTES_PER_TOKEN} bytes per vocabulary token); it is damaged or not a "
            "model llama.cpp can load"
        ) from None
    except _TooSlow:
        raise ModelDamagedError(
            f"reading the header of {shown} took more than {HEADER_SECONDS:g} s; the file is "
            "damaged, or on a disk too slow to load a model from"
        ) from None
    except _BadText as e:
        raise ModelUnsupportedError(
            f"{shown} cannot be loaded: {e}, and llama.cpp ends the whole process on such a "
            "vocabulary rather than refusing it; the file is damaged or was converted wrongly: "
            "download it again or convert the model again with a current llama.cpp"
        ) from None
    except _UnsupportedVersion as e:
        raise ModelUnsupportedError(
            f"{shown} is GGUF version {e}, which hsmdifd cannot read (it reads versions 2 "
            "and 3); convert the model again with a current llama.cpp"
        ) from None


def _regular_file_size(p: Path) -> int:
    shown = shorten(str(p), 200)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"model file not found: {shown}; give the path to a .gguf file"
        ) from None
    except PermissionError:
        raise ModelUnreadableError(
            f"permission denied reaching {shown}; make it and its directories readable by "
            "the user hsmdifd runs as"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelUnreadableError(f"cannot read {shown}: {getattr(e, 'strerror', e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelUnreadableError(
            f"{shown} is a directory, not a model file; give the path to a .gguf file in it"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ModelUnreadableError(f"{shown} is not a regular file; give the path to a .gguf file")
    if st.st_size == 0:
        raise ModelDamagedError(
            f"{shown} is empty (0 bytes), not a GGUF model file; download or copy it again"
        )
    return st.st_size


class _Truncated(Exception):
    """The header runs past the end of the file; str() may say where."""


class _Damaged(Exception):
    """The header holds what no valid GGUF file holds; str() says what."""


class _OverBudget(Exception):
    """The header is larger than the budget allows."""


class _TooSlow(Exception):
    """Reading the header took longer than the budget allows."""


class _UnsupportedVersion(Exception):
    """A GGUF version this parser does not know; str() is the version."""


class _Str(NamedTuple):
    start: int
    length: int


class _Array(NamedTuple):
    item_type: GGUFValueType
    length: int
    start: int  # of the first item


class _Value(NamedTuple):
    vtype: GGUFValueType
    value: int | float | bool | _Str | _Array


class Tensor(NamedTuple):
    """One tensor's description in the header."""

    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]  # ggml order: ne[0] first
    n_bytes: int
    offset: int  # from the start of the data section


class _Header(NamedTuple):
    metadata: dict[bytes, _Value]
    tensors: list[Tensor]
    data_start: int


def _key(raw: bytes) -> str:
    return repr(shorten(raw.decode("utf-8", "replace")))


class _Cursor:
    """Reads little-endian GGUF values from a buffer, never past `limit` nor `deadline`."""

    def __init__(self, buf: mmap.mmap, deadline: float) -> None:
        self.buf = buf
        self.size = len(buf)
        self.limit = min(self.size, HEADER_BYTES)
        self.deadline = deadline
        self.pos = 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str = "") -> int:
        """Step over `n` bytes; where they start."""
        start = self.pos
        if n > self.limit - start:
            if n <= self.size - start:
                raise _OverBudget
            raise _Truncated(what and f"{what} needs {n:,} bytes but {self.left():,} are left")
        self.pos = start + n
        return start

    def scalar(self, fmt: struct.Struct) -> int | float | bool:
        (value,) = fmt.unpack_from(self.buf, self.need(fmt.size))
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.scalar(_U32))

    def u64(self) -> int:
        return int(self.scalar(_U64))

    def string(self, longest: int, what: str) -> _Str:
        n = self.u64()
        if n > longest:
            if n > self.left():
                raise _Truncated(f"{what} says it is {n:,} bytes long")
            raise _Damaged(f"{what} is {n:,} bytes long (at most {longest:,})")
        return _Str(self.need(n, what), n)

    def text(self, s: _Str) -> str:
        return self.buf[s.start : s.start + s.length].decode("utf-8", "replace")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TooSlow

    def value(self, key: bytes, raw_type: int) -> _Value:
        vtype = _value_type(raw_type, key)
        if vtype in _SCALARS:
            return _Value(vtype, self.scalar(_SCALARS[vtype]))
        if vtype == GGUFValueType.STRING:
            return _Value(vtype, self.string(_MAX_STRING, f"the value of {_key(key)}"))
        item_type = _value_type(self.u32(), key)
        length = self.u64()
        what = f"the array {_key(key)} of {length:,} items"
        if item_type == GGUFValueType.ARRAY:
            raise _Damaged(f"{_key(key)} is an array of arrays, which GGUF does not allow")
        if item_type == GGUFValueType.STRING:
            if length > self.left() // 8:
                raise _Truncated(f"{what} needs at least {8 * length:,} bytes")
            if length > MAX_VOCAB:
                raise _Damaged(f"{what} is longer than hsmdifd reads ({MAX_VOCAB:,} strings)")
            if key == b"tokenizer.ggml.tokens":
                self.limit = min(self.size, HEADER_BYTES + HEADER_BYTES_PER_TOKEN * length)
            start = self.pos
            self._skip_strings(key, length, key in _UTF8_ARRAYS)
            return _Value(vtype, _Array(item_type, length, start))
        fmt = _SCALARS[item_type]
        return _Value(vtype, _Array(item_type, length, self.need(length * fmt.size, what)))

    def _skip_strings(self, key: bytes, count: int, check_utf8: bool) -> None:
        # The hot loop of a 262k-token vocabulary: one unpack per string; the clock, the
        # bounds and the UTF-8 of the strings checked once per chunk.
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        for first in range(0, count, _CHUNK):
            self.check_time()
            start, prefixes, longest = pos, list[int](), 0
            append = prefixes.append
            try:
                for _ in range(first, min(count, first + _CHUNK)):
                    append(pos)
                    (n,) = unpack(buf, pos)
                    if n > longest:  # noqa: PLR1730 - a call to max() costs more here
                        longest = n
                    pos += 8 + n
            except (struct.error, OverflowError):  # a length that runs past the end
                pos = self.size + 1
            if pos > self.limit:
                self.pos = last = prefixes[-1]
                n = unpack(buf, last)[0] if last + 8 <= self.size else 0
                self.need(8 + n, f"string {first + len(prefixes) - 1:,} of {_key(key)}")
            if check_utf8:
                _check_utf8(
                    buf, key, start=start, end=pos, prefixes=prefixes, first=first, longest=longest
                )
        self.pos = pos


def _check_utf8(
    buf: mmap.mmap,
    key: bytes,
    *,
    start: int,
    end: int,
    prefixes: list[int],
    first: int,
    longest: int,
) -> None:
    """Raise _BadText unless every string between `start` and `end` is UTF-8.

    `prefixes` are where their 8-byte lengths are. Lengths below 128 are ASCII bytes,
    which no multi-byte sequence can span: the window as it is then is valid exactly
    when each string is. Otherwise (or to find the culprit) the lengths are overwritten
    with NULs first. A window over _UTF8_WINDOW bytes is checked string by string
    instead, without a copy.
    """
    if end - start > _UTF8_WINDOW:
        for index, at in enumerate(prefixes):
            (n,) = _U64.unpack_from(buf, at)
            if error := _utf8_error(buf, at + 8, n):
                text = bytes(buf[at + 8 : at + 8 + min(n, 24)])
                raise _BadText(key, first + index, text, error.start, error.reason)
        return
    if longest < 0x80:
        try:
            buf[start:end].decode("utf-8")
        except UnicodeDecodeError:
            pass  # find which string, below
        else:
            return
    window = bytearray(buf[start:end])
    blank = bytes(8)
    for at in prefixes:
        window[at - start : at - start + 8] = blank
    try:
        window.decode("utf-8")
    except UnicodeDecodeError as e:
        index = bisect.bisect_right(prefixes, start + e.start) - 1
        head = prefixes[index] + 8
        (n,) = _U64.unpack_from(buf, prefixes[index])
        text = bytes(buf[head : head + min(n, 24)])
        raise _BadText(key, first + index, text, start + e.start - head, e.reason) from None


def _utf8_error(buf: mmap.mmap, start: int, n: int) -> UnicodeDecodeError | None:
    """The error decoding `n` bytes at `start` as UTF-8, a window at a time (a long string
    is never copied whole); its start is from `start`."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for at in range(start, start + n, _UTF8_WINDOW):
        chunk = buf[at : min(at + _UTF8_WINDOW, start + n)]
        try:
            decoder.decode(chunk, final=at + len(chunk) >= start + n)
        except UnicodeDecodeError as e:
            return UnicodeDecodeError("utf-8", b"", at - start + e.start, 0, e.reason)
    return None


class _BadText(Exception):
    """A vocabulary entry that is not UTF-8."""

    def __init__(self, key: bytes, index: int, head: bytes, at: int, reason: str) -> None:
        super().__init__(
            f"entry {index:,} of {_key(key)} is not valid UTF-8 ({reason} at byte {at} of "
            f"{head!r}…)"
        )


def _value_type(raw: int, key: bytes) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Damaged(f"the metadata value {_key(key)} has the unknown type {raw:,}") from None


def _parse(buf: mmap.mmap, deadline: float) -> _Header:
    cur = _Cursor(buf, deadline)
    cur.pos = len(_GGUF_MAGIC)
    version = cur.u32()
    if version not in _SUPPORTED_VERSIONS:
        raise _UnsupportedVersion(version)
    n_tensors, n_kv = cur.u64(), cur.u64()
    least = n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KEY_BYTES
    if least > cur.left():
        raise _Truncated(
            f"its header says it holds {n_tensors:,} tensors and {n_kv:,} metadata keys, "
            f"which take at least {least:,} bytes, but {cur.left():,} bytes follow"
        )
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise _Damaged(
            f"its header says it holds {n_tensors:,} tensors and {n_kv:,} metadata keys "
            f"(hsmdifd reads at most {MAX_TENSORS:,} and {MAX_KEYS:,})"
        )
    metadata: dict[bytes, _Value] = {}
    for i in range(n_kv):
        cur.check_time()
        s = cur.string(_MAX_KEY, f"metadata key {i:,}")
        if s.length == 0:
            raise _Damaged(f"metadata key {i:,} is empty")
        key = bytes(buf[s.start : s.start + s.length])
        if key in metadata:
            raise _Damaged(f"the metadata key {_key(key)} appears twice")
        metadata[key] = cur.value(key, cur.u32())
    alignment = _alignment(metadata)

    tensors: list[Tensor] = []
    names: set[str] = set()
    for i in range(n_tensors):
        cur.check_time()
        tensor = _read_tensor_info(cur, i)
        if tensor.name in names:
            raise _Damaged(f"the tensor name {tensor.name!r} appears twice")
        names.add(tensor.name)
        tensors.append(tensor)
    data_start = -(-cur.pos // alignment) * alignment
    if tensors and data_start > cur.size:
        raise _Truncated("its data section starts past the end of the file")
    _check_layout(tensors, alignment)
    return _Header(metadata, tensors, data_start)


def _alignment(metadata: dict[bytes, _Value]) -> int:
    entry = metadata.get(b"general.alignment")
    if entry is None:
        return _DEFAULT_ALIGNMENT
    if entry.vtype != GGUFValueType.UINT32:
        raise _Damaged(f"general.alignment has the type {entry.vtype.name}, not UINT32")
    value = int(entry.value)  # type: ignore[arg-type]
    if value <= 0 or value & (value - 1):
        raise _Damaged(f"general.alignment is {value:,}, not a power of two")
    return value


def _read_tensor_info(cur: _Cursor, index: int) -> Tensor:
    s = cur.string(_MAX_STRING, f"the name of tensor {index:,}")
    name = cur.text(_Str(s.start, min(s.length, _MAX_TENSOR_NAME + 1)))
    if s.length > _MAX_TENSOR_NAME:
        raise _Damaged(
            f"the name of tensor {index:,} ({shorten(name)!r}) is {s.length:,} bytes long "
            f"(llama.cpp takes at most {_MAX_TENSOR_NAME})"
        )
    n_dims = cur.u32()
    if n_dims > _MAX_DIMS:
        raise _Damaged(f"tensor {name!r} has {n_dims:,} dimensions (at most {_MAX_DIMS})")
    dims = tuple(cur.u64() for _ in range(n_dims))
    raw_type = cur.u32()
    offset = cur.u64()
    if any(d >= 1 << 63 for d in dims):
        raise _Damaged(f"tensor {name!r} has a negative dimension {dims}")
    n_elements = 1
    for d in dims:
        n_elements *= d
    if n_elements >= 1 << 63:
        raise _Damaged(f"tensor {name!r} has the shape {dims}, whose size overflows")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Damaged(f"tensor {name!r} has the unknown type {raw_type:,}") from None
    if dims and dims[0] % block_size:
        raise _Damaged(
            f"tensor {name!r} of type {qtype.name} has rows of {dims[0]:,} values, not a "
            f"multiple of its block size ({block_size})"
        )
    return Tensor(name, qtype, dims, n_elements // block_size * type_size, offset)


def _check_layout(tensors: list[Tensor], alignment: int) -> None:
    """llama.cpp reads the tensors back to back, in header order, each aligned."""
    expected = 0
    previous: Tensor | None = None
    for t in tensors:
        if t.offset != expected:
            if previous is not None and t.offset < expected:
                raise _Damaged(
                    f"tensor {t.name!r} starts at byte {t.offset:,} of the data section, "
                    f"inside the tensor before it ({previous.name!r}, which ends at byte "
                    f"{previous.offset + previous.n_bytes:,})"
                )
            raise _Damaged(
                f"tensor {t.name!r} starts at byte {t.offset:,} of the data section, where "
                f"llama.cpp expects byte {expected:,}"
            )
        expected += -(-t.n_bytes // alignment) * alignment
        previous = t


class _Meta:
    """Typed reads of the metadata, each refusing what llama.cpp would refuse."""

    def __init__(self, shown: str, metadata: dict[bytes, _Value], buf: mmap.mmap) -> None:
        self.shown = shown
        self.metadata = metadata
        self.buf = buf

    def refuse(self, what: str, todo: str = "") -> ModelUnsupportedError:
        todo = todo or "convert the model again with a current llama.cpp, or choose another file"
        return ModelUnsupportedError(
            f"{self.shown} cannot be loaded: {what}, which llama.cpp refuses; {todo}"
        )

    def get(self, key: str) -> _Value | None:
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
        if not isinstance(entry.value, _Str):
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
        if not isinstance(entry.value, _Array):
            return [self.u32(key)] * n_layer
        array = entry.value
        kinds = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.BOOL)
        if array.item_type not in kinds:
            raise self.refuse(f"its {key} is an array of {array.item_type.name}")
        if array.length != n_layer:
            raise self.refuse(f"its {key} has {array.length:,} entries for {n_layer} layers")
        fmt = _SCALARS[array.item_type]
        items = [
            int(v)
            for (v,) in fmt.iter_unpack(self.buf[array.start : array.start + n_layer * fmt.size])
        ]
        if min(items) < 0:
            raise self.refuse(f"its {key} holds the negative value {min(items)}")
        return items


def _blocks(tensors: Iterable[Tensor]) -> set[int]:
    return {int(m.group(1)) for t in tensors if (m := _LAYER_TENSOR.match(t.name))}


def _shape(p: Path, shown: str, size: int, header: _Header, buf: mmap.mmap) -> ModelShape:
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
        if not isinstance(tokens.value, _Array) or tokens.value.item_type != GGUFValueType.STRING:
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
    _check_tensors(
        meta,
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


# The tensors of architectures whose layout is checked, by name (in a layer: after
# "blk.N."), as ggml shapes over E (embedding), V (vocabulary), K (head width), and per
# layer Q (query width), KV (key width), VV (value width), O (attention output) and F
# (feed-forward width); "?" marks an optional tensor.
_LLAMA_LAYER = {
    "attn_norm.weight": ("E",),
    "attn_q.weight": ("E", "Q"),
    "attn_k.weight": ("E", "KV"),
    "attn_v.weight": ("E", "VV"),
    "attn_output.weight": ("O", "E"),
    "ffn_norm.weight": ("E",),
    "ffn_gate.weight": ("E", "F"),
    "ffn_up.weight": ("E", "F"),
    "ffn_down.weight": ("F", "E"),
}
_GEMMA3_LAYER = {
    **_LLAMA_LAYER,
    "attn_q_norm.weight": ("K",),
    "attn_k_norm.weight": ("K",),
    "post_attention_norm.weight": ("E",),
    "post_ffw_norm.weight": ("E",),
}
_GLOBAL = {
    "token_embd.weight": ("E", "V"),
    "output_norm.weight": ("E",),
    "output.weight?": ("E", "V"),
}
_CHECKED = {"llama": _LLAMA_LAYER, "gemma3": _GEMMA3_LAYER}
# A llama model with experts has these in place of ffn_gate, ffn_up and ffn_down.
_LLAMA_DENSE_FFN = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def _check_tensors(
    meta: _Meta,
    arch: str,
    *,
    tensors: list[Tensor],
    n_layer: int,
    dims: dict[str, int],
    heads: list[int],
    heads_kv: list[int],
    n_ffs: list[int],
    value_length: int,
) -> None:
    """The tensors llama.cpp needs for `arch`, in the shapes its metadata implies."""
    layer = _CHECKED.get(arch)
    if layer is None:
        return
    by_name = {t.name: t.dims for t in tensors}
    has_experts = any(".ffn_gate_inp." in name for name in by_name)

    def check(name: str, symbols: tuple[str, ...], values: dict[str, int], optional: bool) -> None:
        found = by_name.get(name)
        if found is None:
            if optional:
                return
            raise meta.refuse(f"it lacks the tensor {name!r}, which a {arch} model needs")
        expected = tuple(values[s] for s in symbols)
        if found != expected:
            raise meta.refuse(
                f"its tensor {name!r} has the shape {list(found)} where its metadata implies "
                f"{list(expected)}"
            )

    for name, symbols in _GLOBAL.items():
        check(name.rstrip("?"), symbols, dims, name.endswith("?"))
    for il in range(n_layer):
        values = {
            **dims,
            "Q": heads[il] * dims["K"],
            "KV": heads_kv[il] * dims["K"],
            "VV": heads_kv[il] * value_length,
            "O": heads[il] * value_length,
            "F": n_ffs[il],
        }
        for name, symbols in layer.items():
            optional = has_experts and name in _LLAMA_DENSE_FFN
            check(f"blk.{il}.{name}", symbols, values, optional)
