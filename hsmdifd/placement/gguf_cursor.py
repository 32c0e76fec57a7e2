"""A cursor over a GGUF header that reads nothing past the file's end nor past its budget.

Every count, length and offset in a header is checked against the bytes the file has
left before anything is read or allocated for it, and against the bounds below, so a
damaged or hostile file is refused in milliseconds with a few MiB of memory. Gemma 3
270M's header (262,144 tokens) is 4.3 MiB, read in 40 ms. The failures are exceptions
without the file's name; `gguf_header.read_header` turns them into sentences.
"""

from __future__ import annotations

import bisect
import codecs
import mmap
import struct
import time
from typing import NamedTuple

from gguf.constants import GGUFValueType

from hsmdif.limits import shorten

MIB = 1 << 20

# Bytes of header (metadata and tensor descriptions) read at most: 64 MiB, plus 256 bytes
# for each token of the vocabulary (tokenizer.ggml.tokens), which with its scores, types
# and merges is most of a large header.
HEADER_BYTES = 64 * MIB
HEADER_BYTES_PER_TOKEN = 256
# Strings in a vocabulary array at most (the largest real ones hold 262,144 tokens).
MAX_VOCAB = 1 << 22

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
SCALARS = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: U32,
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: U64,
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# Strings (chat templates, the Hugging Face tokenizer JSON some converters embed) stay
# below 16 MiB.
MAX_STRING = 16 * MIB
# Arrays of strings whose every entry llama.cpp decodes as UTF-8 (it aborts the process
# on an invalid one rather than refusing the file).
_UTF8_ARRAYS = frozenset({b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges"})
# Entries skipped between two looks at the clock.
_CHUNK = 1 << 12
_UTF8_WINDOW = 4 * MIB


class Truncated(Exception):
    """The header runs past the end of the file; str() may say where."""


class Damaged(Exception):
    """The header holds what no valid GGUF file holds; str() says what."""


class OverBudget(Exception):
    """The header is larger than the budget allows."""


class TooSlow(Exception):
    """Reading the header took longer than the budget allows."""


class UnsupportedVersion(Exception):
    """A GGUF version this parser does not know; str() is the version."""


class Str(NamedTuple):
    start: int
    length: int


class Array(NamedTuple):
    item_type: GGUFValueType
    length: int
    start: int  # of the first item


class Value(NamedTuple):
    vtype: GGUFValueType
    value: int | float | bool | Str | Array


def key_name(raw: bytes) -> str:
    return repr(shorten(raw.decode("utf-8", "replace")))


class Cursor:
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
                raise OverBudget
            raise Truncated(what and f"{what} needs {n:,} bytes but {self.left():,} are left")
        self.pos = start + n
        return start

    def scalar(self, fmt: struct.Struct) -> int | float | bool:
        (value,) = fmt.unpack_from(self.buf, self.need(fmt.size))
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.scalar(U32))

    def u64(self) -> int:
        return int(self.scalar(U64))

    def string(self, longest: int, what: str) -> Str:
        n = self.u64()
        if n > longest:
            if n > self.left():
                raise Truncated(f"{what} says it is {n:,} bytes long")
            raise Damaged(f"{what} is {n:,} bytes long (at most {longest:,})")
        return Str(self.need(n, what), n)

    def text(self, s: Str) -> str:
        return self.buf[s.start : s.start + s.length].decode("utf-8", "replace")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TooSlow

    def value(self, key: bytes, raw_type: int) -> Value:
        vtype = value_type(raw_type, key)
        if vtype in SCALARS:
            return Value(vtype, self.scalar(SCALARS[vtype]))
        if vtype == GGUFValueType.STRING:
            return Value(vtype, self.string(MAX_STRING, f"the value of {key_name(key)}"))
        item_type = value_type(self.u32(), key)
        length = self.u64()
        what = f"the array {key_name(key)} of {length:,} items"
        if item_type == GGUFValueType.ARRAY:
            raise Damaged(f"{key_name(key)} is an array of arrays, which GGUF does not allow")
        if item_type == GGUFValueType.STRING:
            if length > self.left() // 8:
                raise Truncated(f"{what} needs at least {8 * length:,} bytes")
            if length > MAX_VOCAB:
                raise Damaged(f"{what} is longer than hsmdifd reads ({MAX_VOCAB:,} strings)")
            if key == b"tokenizer.ggml.tokens":
                self.limit = min(self.size, HEADER_BYTES + HEADER_BYTES_PER_TOKEN * length)
            start = self.pos
            self._skip_strings(key, length, key in _UTF8_ARRAYS)
            return Value(vtype, Array(item_type, length, start))
        fmt = SCALARS[item_type]
        return Value(vtype, Array(item_type, length, self.need(length * fmt.size, what)))

    def _skip_strings(self, key: bytes, count: int, check_utf8: bool) -> None:
        # The hot loop of a 262k-token vocabulary: one unpack per string; the clock, the
        # bounds and the UTF-8 of the strings checked once per chunk.
        unpack, buf, pos = U64.unpack_from, self.buf, self.pos
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
                self.need(8 + n, f"string {first + len(prefixes) - 1:,} of {key_name(key)}")
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
    """Raise BadText unless every string between `start` and `end` is UTF-8.

    `prefixes` are where their 8-byte lengths are. Lengths below 128 are ASCII bytes,
    which no multi-byte sequence can span: the window as it is then is valid exactly
    when each string is. Otherwise (or to find the culprit) the lengths are overwritten
    with NULs first. A window over _UTF8_WINDOW bytes is checked string by string
    instead, without a copy.
    """
    if end - start > _UTF8_WINDOW:
        for index, at in enumerate(prefixes):
            (n,) = U64.unpack_from(buf, at)
            if error := _utf8_error(buf, at + 8, n):
                text = bytes(buf[at + 8 : at + 8 + min(n, 24)])
                raise BadText(key, first + index, text, error.start, error.reason)
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
        (n,) = U64.unpack_from(buf, prefixes[index])
        text = bytes(buf[head : head + min(n, 24)])
        raise BadText(key, first + index, text, start + e.start - head, e.reason) from None


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


class BadText(Exception):
    """A vocabulary entry that is not UTF-8."""

    def __init__(self, key: bytes, index: int, head: bytes, at: int, reason: str) -> None:
        super().__init__(
            f"entry {index:,} of {key_name(key)} is not valid UTF-8 ({reason} at byte {at} of "
            f"{head!r}…)"
        )


def value_type(raw: int, key: bytes) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise Damaged(f"the metadata value {key_name(key)} has the unknown type {raw:,}") from None
