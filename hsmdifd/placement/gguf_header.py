"""Parse a GGUF file's header (metadata and tensor descriptions, no tensor data) within a
budget of bytes and time, and say in a sentence why a file that fails is unusable.

The header is parsed here rather than with gguf.GGUFReader, which builds numpy objects for
every vocabulary entry and takes 9.5 s on Gemma 3 270M's 262k tokens; this takes 25 ms.
The gguf package still supplies the value types and the tensor type sizes.
"""

from __future__ import annotations

import mmap
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from hsmdif.limits import shorten
from hsmdifd.daemon import timing
from hsmdifd.placement import gguf_cursor
from hsmdifd.placement.gguf_cursor import (
    MAX_STRING,
    MIB,
    BadText,
    Cursor,
    Damaged,
    OverBudget,
    Str,
    TooSlow,
    Truncated,
    UnsupportedVersion,
    Value,
    key_name,
)

# Counts beyond any real model (the largest have a few thousand tensors and a hundred
# keys); each bounds the time spent on one header.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 14
# llama.cpp's own bounds: GGML_MAX_NAME - 1, GGML_MAX_DIMS.
_MAX_TENSOR_NAME = 63
_MAX_DIMS = 4

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# The smallest a metadata entry can be (key length, a 1-byte key, type, a 1-byte value)
# and a tensor description (name length, type, offset, with no name and no dimensions).
_MIN_KEY_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
# Metadata keys are names like "llama.block_count".
_MAX_KEY = 1024


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


class Tensor(NamedTuple):
    """One tensor's description in the header."""

    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]  # ggml order: ne[0] first
    n_bytes: int
    offset: int  # from the start of the data section


class Header(NamedTuple):
    metadata: dict[bytes, Value]
    tensors: list[Tensor]
    data_start: int


class TensorTable(NamedTuple):
    data_start: int
    """Where the tensor data starts in the file: the header's size, aligned."""
    tensors: tuple[Tensor, ...]


def read_tensor_table(path: str | os.PathLike[str]) -> TensorTable:
    """The tensor descriptions of the GGUF file at `path` (no tensor data), read as fast
    as its shape and with the same checks of the header and the same errors; not the
    checks of the metadata a load needs (read_model_shape does those)."""

    def table(p: Path, shown: str, size: int, header: Header, buf: mmap.mmap) -> TensorTable:
        return TensorTable(header.data_start, tuple(header.tensors))

    return read_header(Path(path), table)


_R = TypeVar("_R")


def read_header(p: Path, then: Callable[[Path, str, int, Header, mmap.mmap], _R]) -> _R:
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
                header = parse(buf, time.monotonic() + timing.HEADER_SECONDS)
                return then(p, shown, len(buf), header, buf)
    except PermissionError:
        raise ModelUnreadableError(
            f"permission denied reading {shown}; make it readable by the user hsmdifd runs as"
        ) from None
    except OSError as e:
        raise ModelUnreadableError(f"cannot read {shown}: {e.strerror or e}") from None
    except Truncated as e:
        raise ModelDamagedError(
            f"{shown} is truncated or damaged: {e or 'its header runs past the end of the file'}"
            f" ({size:,} bytes); download or copy it again"
        ) from None
    except Damaged as e:
        raise ModelDamagedError(f"{shown} is damaged: {e}; download or copy it again") from None
    except OverBudget:
        raise ModelDamagedError(
            f"{shown} has a header larger than hsmdifd reads "
            f"({gguf_cursor.HEADER_BYTES // MIB} MiB plus {gguf_cursor.HEADER_BYTES_PER_TOKEN} "
            "bytes per vocabulary token); it is damaged or not a model llama.cpp can load"
        ) from None
    except TooSlow:
        raise ModelDamagedError(
            f"reading the header of {shown} took more than {timing.HEADER_SECONDS:g} s; the "
            "file is damaged, or on a disk too slow to load a model from"
        ) from None
    except BadText as e:
        raise ModelUnsupportedError(
            f"{shown} cannot be loaded: {e}, and llama.cpp ends the whole process on such a "
            "vocabulary rather than refusing it; the file is damaged or was converted wrongly: "
            "download it again or convert the model again with a current llama.cpp"
        ) from None
    except UnsupportedVersion as e:
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


def parse(buf: mmap.mmap, deadline: float) -> Header:
    cur = Cursor(buf, deadline)
    cur.pos = len(_GGUF_MAGIC)
    version = cur.u32()
    if version not in _SUPPORTED_VERSIONS:
        raise UnsupportedVersion(version)
    n_tensors, n_kv = cur.u64(), cur.u64()
    least = n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KEY_BYTES
    if least > cur.left():
        raise Truncated(
            f"its header says it holds {n_tensors:,} tensors and {n_kv:,} metadata keys, "
            f"which take at least {least:,} bytes, but {cur.left():,} bytes follow"
        )
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise Damaged(
            f"its header says it holds {n_tensors:,} tensors and {n_kv:,} metadata keys "
            f"(hsmdifd reads at most {MAX_TENSORS:,} and {MAX_KEYS:,})"
        )
    metadata: dict[bytes, Value] = {}
    for i in range(n_kv):
        cur.check_time()
        s = cur.string(_MAX_KEY, f"metadata key {i:,}")
        if s.length == 0:
            raise Damaged(f"metadata key {i:,} is empty")
        key = bytes(buf[s.start : s.start + s.length])
        if key in metadata:
            raise Damaged(f"the metadata key {key_name(key)} appears twice")
        metadata[key] = cur.value(key, cur.u32())
    alignment = _alignment(metadata)

    tensors: list[Tensor] = []
    names: set[str] = set()
    for i in range(n_tensors):
        cur.check_time()
        tensor = _read_tensor_info(cur, i)
        if tensor.name in names:
            raise Damaged(f"the tensor name {tensor.name!r} appears twice")
        names.add(tensor.name)
        tensors.append(tensor)
    data_start = -(-cur.pos // alignment) * alignment
    if tensors and data_start > cur.size:
        raise Truncated("its data section starts past the end of the file")
    _check_layout(tensors, alignment)
    return Header(metadata, tensors, data_start)


def _alignment(metadata: dict[bytes, Value]) -> int:
    entry = metadata.get(b"general.alignment")
    if entry is None:
        return _DEFAULT_ALIGNMENT
    if entry.vtype != GGUFValueType.UINT32:
        raise Damaged(f"general.alignment has the type {entry.vtype.name}, not UINT32")
    value = int(entry.value)  # type: ignore[arg-type]
    if value <= 0 or value & (value - 1):
        raise Damaged(f"general.alignment is {value:,}, not a power of two")
    return value


def _read_tensor_info(cur: Cursor, index: int) -> Tensor:
    s = cur.string(MAX_STRING, f"the name of tensor {index:,}")
    name = cur.text(Str(s.start, min(s.length, _MAX_TENSOR_NAME + 1)))
    if s.length > _MAX_TENSOR_NAME:
        raise Damaged(
            f"the name of tensor {index:,} ({shorten(name)!r}) is {s.length:,} bytes long "
            f"(llama.cpp takes at most {_MAX_TENSOR_NAME})"
        )
    n_dims = cur.u32()
    if n_dims > _MAX_DIMS:
        raise Damaged(f"tensor {name!r} has {n_dims:,} dimensions (at most {_MAX_DIMS})")
    dims = tuple(cur.u64() for _ in range(n_dims))
    raw_type = cur.u32()
    offset = cur.u64()
    if any(d >= 1 << 63 for d in dims):
        raise Damaged(f"tensor {name!r} has a negative dimension {dims}")
    n_elements = 1
    for d in dims:
        n_elements *= d
    if n_elements >= 1 << 63:
        raise Damaged(f"tensor {name!r} has the shape {dims}, whose size overflows")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise Damaged(f"tensor {name!r} has the unknown type {raw_type:,}") from None
    if dims and dims[0] % block_size:
        raise Damaged(
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
                raise Damaged(
                    f"tensor {t.name!r} starts at byte {t.offset:,} of the data section, "
                    f"inside the tensor before it ({previous.name!r}, which ends at byte "
                    f"{previous.offset + previous.n_bytes:,})"
                )
            raise Damaged(
                f"tensor {t.name!r} starts at byte {t.offset:,} of the data section, where "
                f"llama.cpp expects byte {expected:,}"
            )
        expected += -(-t.n_bytes // alignment) * alignment
        previous = t
