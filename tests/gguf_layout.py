"""Where each field of a GGUF header lies, for tests that damage one field at a time.

Written apart from hsmdifd.placement.gguf_model, so that a mistake there is not repeated here:
it walks a well-formed header (the tiny model's, Gemma's) and records the offset and
width of every integer (counts, lengths, type tags, dimensions, offsets, integer
values) and every string, named as a person would name them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

# GGUF value types and their widths (gguf.GGUFValueType, written out).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64 = range(12)
FLOAT64 = 12
WIDTH = {
    UINT8: 1,
    INT8: 1,
    UINT16: 2,
    INT16: 2,
    UINT32: 4,
    INT32: 4,
    FLOAT32: 4,
    BOOL: 1,
    UINT64: 8,
    INT64: 8,
    FLOAT64: 8,
}
INTEGER = {UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64}
# Array entries recorded per array: the first ones, then one in SAMPLE_EVERY.
FIRST_ENTRIES = 32
SAMPLE_EVERY = 997


@dataclass(frozen=True)
class Field:
    offset: int
    width: int  # bytes
    name: str


@dataclass
class Layout:
    """The fields of one header. `header_end` is where the data section starts."""

    ints: list[Field] = field(default_factory=list)
    strings: list[Field] = field(default_factory=list)  # width: the string's bytes
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    header_end: int = 0
    keys: dict[str, Field] = field(default_factory=dict)  # value fields, by key
    tensors: dict[str, dict[str, Field]] = field(default_factory=dict)

    def int_named(self, name: str) -> Field:
        return next(f for f in self.ints if f.name == name)


def read_layout(data: bytes) -> Layout:
    out = Layout()
    pos = 4

    def u(width: int, name: str) -> int:
        nonlocal pos
        out.ints.append(Field(pos, width, name))
        value = int.from_bytes(data[pos : pos + width], "little")
        pos += width
        return value

    def string(name: str) -> str:
        nonlocal pos
        n = u(8, f"length of {name}")
        out.strings.append(Field(pos, n, name))
        text = data[pos : pos + n].decode("utf-8", "replace")
        pos += n
        return text

    u(4, "version")
    n_tensors = u(8, "tensor count")
    n_kv = u(8, "metadata key count")
    out.regions["fixed header"] = (0, pos)
    alignment = 32
    for i in range(n_kv):
        key = string(f"key {i}")
        vtype = u(4, f"type of {key}")
        if vtype == STRING:
            out.keys[key] = Field(pos, 8, key)
            string(f"value of {key}")
        elif vtype == ARRAY:
            item = u(4, f"item type of {key}")
            length = u(8, f"length of {key}")
            out.keys[key] = Field(pos, length, key)
            for j in range(length):
                recorded = j < FIRST_ENTRIES or j % SAMPLE_EVERY == 0
                if item == STRING:
                    if recorded:
                        string(f"{key}[{j}]")
                    else:
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                elif recorded and item in INTEGER:
                    u(WIDTH[item], f"{key}[{j}]")
                else:
                    pos += WIDTH[item]
        else:
            out.keys[key] = Field(pos, WIDTH[vtype], key)
            if key == "general.alignment":
                alignment = struct.unpack_from("<I", data, pos)[0]
            if vtype in INTEGER:
                u(WIDTH[vtype], f"value of {key}")
            else:
                pos += WIDTH[vtype]
    out.regions["metadata"] = (out.regions["fixed header"][1], pos)
    for i in range(n_tensors):
        start = len(out.ints)
        name = string(f"name of tensor {i}")
        n_dims = u(4, f"dimension count of {name}")
        for d in range(n_dims):
            u(8, f"dimension {d} of {name}")
        u(4, f"type of {name}")
        u(8, f"offset of {name}")
        out.tensors[name] = {f.name.split(" of ")[0]: f for f in out.ints[start:]}
    out.regions["tensor descriptions"] = (out.regions["metadata"][1], pos)
    out.header_end = -(-pos // alignment) * alignment
    return out


def read_header(path: Path, limit: int = 64 << 20) -> bytes:
    """The first bytes of `path`, enough for its header (Gemma's is 6.5 MB)."""
    with path.open("rb") as f:
        return f.read(limit)


def put(data: bytearray, f: Field, value: int) -> None:
    """Write `value`, cut to the field's width, over the field."""
    data[f.offset : f.offset + f.width] = (value % (1 << (8 * f.width))).to_bytes(f.width, "little")
