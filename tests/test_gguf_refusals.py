"""Each file llama.cpp would refuse (or abort on) is refused first, with a sentence that
names the field, shows the value shortened and says what to do."""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from hsmdifd.daemon import timing
from hsmdifd.placement import gguf_cursor
from hsmdifd.placement.gguf_header import ModelDamagedError, ModelFileError, ModelUnsupportedError
from hsmdifd.placement.gguf_model import read_model_shape
from tests.gguf_layout import Layout, put, read_layout
from tests.tinymodel import write_tiny_llama

Patch = Callable[[bytearray, Layout], None]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf").read_bytes()


def value(key: str, number: int) -> Patch:
    return lambda data, layout: put(data, layout.int_named(f"value of {key}"), number)


def field(name: str, number: int) -> Patch:
    return lambda data, layout: put(data, layout.int_named(name), number)


def retype(key: str, vtype: int) -> Patch:
    """Give `key` another type tag of the same width (UINT32 -> INT32, say)."""
    return lambda data, layout: put(data, layout.int_named(f"type of {key}"), vtype)


def text(name: str, new: bytes) -> Patch:
    """Overwrite the start of the string called `name`."""

    def patch(data: bytearray, layout: Layout) -> None:
        f = next(s for s in layout.strings if s.name == name)
        data[f.offset : f.offset + len(new)] = new

    return patch


def tensor_offset(tensor: str, number: int) -> Patch:
    return lambda data, layout: put(data, layout.tensors[tensor]["offset"], number)


CASES: list[tuple[str, Patch, type[ModelFileError], list[str]]] = [
    (
        "block_count 2^31",
        value("llama.block_count", 2**31),
        ModelUnsupportedError,
        ["its llama.block_count is 2,147,483,648 (llama.cpp holds 1 to 512)"],
    ),
    (
        "block_count 2^40 as UINT64",
        retype("llama.block_count", 10),  # UINT64 over 8 bytes would shift: the tag says it
        ModelFileError,
        [],
    ),
    (
        "block_count past the blocks present",
        value("llama.block_count", 3),
        ModelUnsupportedError,
        ["its llama.block_count is 3 but it holds no tensors for block 2 (it holds tensors for 2"],
    ),
    (
        "block_count short of the blocks present",
        value("llama.block_count", 1),
        ModelUnsupportedError,
        ["it holds tensors for block 1, past its llama.block_count of 1"],
    ),
    (
        "block_count as INT32",
        retype("llama.block_count", 5),
        ModelUnsupportedError,
        ["its llama.block_count has the type INT32, not UINT32"],
    ),
    (
        "unknown architecture",
        text("value of general.architecture", b"lxama"),
        ModelUnsupportedError,
        ["its architecture 'lxama' is not one this llama.cpp knows", "choose a model of a"],
    ),
    (
        "n_head 7",
        value("llama.attention.head_count", 7),
        ModelUnsupportedError,
        ["its llama.embedding_length (64) is not a multiple of llama.attention.head_count (7)"],
    ),
    (
        "n_head_kv 0",
        value("llama.attention.head_count_kv", 0),
        ModelUnsupportedError,
        ["its llama.attention.head_count_kv is 0, which llama.cpp refuses"],
    ),
    (
        "n_head not a multiple of n_head_kv",
        value("llama.attention.head_count_kv", 3),
        ModelUnsupportedError,
        ["is not a multiple of llama.attention.head_count_kv (3)"],
    ),
    (
        "wrong shape",
        value("llama.attention.head_count", 8),
        ModelUnsupportedError,
        [
            "its tensor 'blk.0.attn_k.weight' has the shape [64, 32] where its metadata "
            "implies [64, 16]"
        ],
    ),
    (
        "wrong feed-forward width",
        value("llama.feed_forward_length", 256),
        ModelUnsupportedError,
        ["its tensor 'blk.0.ffn_gate.weight' has the shape [64, 128] where its metadata implies"],
    ),
    (
        "missing tensor",
        text("name of tensor 8", b"blk.0.ffn_uq"),
        ModelUnsupportedError,
        ["it lacks the tensor 'blk.0.ffn_up.weight', which a llama model needs"],
    ),
    (
        "overlapping tensors",
        tensor_offset("blk.0.attn_q.weight", 0),
        ModelDamagedError,
        ["tensor 'blk.0.attn_q.weight' starts at byte 0 of the data section, inside the tensor"],
    ),
    (
        "a gap between tensors",
        tensor_offset("output.weight", 2**40),
        ModelDamagedError,
        ["tensor 'output.weight' starts at byte 1,099,511,627,776 of the data section, where"],
    ),
    (
        "vocabulary not UTF-8",
        text("tokenizer.ggml.tokens[0]", b"\xff"),
        ModelUnsupportedError,
        [
            "entry 0 of 'tokenizer.ggml.tokens' is not valid UTF-8 (invalid start byte",
            "llama.cpp ends the whole process",
        ],
    ),
    (
        "a surrogate in the vocabulary",
        text("tokenizer.ggml.tokens[1]", b"\xed\xa0\x80"),
        ModelUnsupportedError,
        ["entry 1 of 'tokenizer.ggml.tokens' is not valid UTF-8"],
    ),
    (
        "tensor count 2^40",
        field("tensor count", 2**40),
        ModelDamagedError,
        ["its header says it holds 1,099,511,627,776 tensors", "truncated or damaged"],
    ),
    (
        "metadata key count 2^64-1",
        field("metadata key count", 2**64 - 1),
        ModelDamagedError,
        ["18,446,744,073,709,551,615 metadata keys"],
    ),
    (
        "key length 2^64-1",
        field("length of key 0", 2**64 - 1),
        ModelDamagedError,
        ["metadata key 0 says it is 18,446,744,073,709,551,615 bytes long"],
    ),
    (
        "vocabulary length 2^63",
        field("length of tokenizer.ggml.tokens", 2**63),
        ModelDamagedError,
        ["the array 'tokenizer.ggml.tokens' of 9,223,372,036,854,775,808 items needs at least"],
    ),
    (
        "a dimension of -1",
        field("dimension 0 of output_norm.weight", 2**64 - 1),
        ModelDamagedError,
        ["tensor 'output_norm.weight' has a negative dimension"],
    ),
    (
        "an unknown tensor type",
        field("type of output_norm.weight", 2**31),
        ModelDamagedError,
        ["tensor 'output_norm.weight' has the unknown type 2,147,483,648"],
    ),
    (
        "an unknown value type",
        field("type of general.name", 99),
        ModelDamagedError,
        ["the metadata value 'general.name' has the unknown type 99"],
    ),
    (
        "five dimensions",
        field("dimension count of output_norm.weight", 5),
        ModelDamagedError,
        ["tensor 'output_norm.weight' has 5 dimensions (at most 4)"],
    ),
    (
        "a duplicate key",
        text("key 3", b"general.architecture"),  # over llama.context_length, as long
        ModelDamagedError,
        ["the metadata key 'general.architecture' appears twice"],
    ),
]


@pytest.mark.parametrize(
    ("patch", "error", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_refusal_says_what_was_wrong(
    tiny: bytes, tmp_path: Path, patch: Patch, error: type[ModelFileError], says: list[str]
) -> None:
    data = bytearray(tiny)
    patch(data, read_layout(tiny))
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(data))

    with pytest.raises(error) as info:
        read_model_shape(path)

    message = str(info.value)
    assert message.startswith(str(path)) or str(path) in message
    for fragment in says:
        assert fragment in message
    assert len(message) < 600


def test_a_sparse_file_claiming_2_to_the_40_tensors_is_refused_at_once(tmp_path: Path) -> None:
    """The issue's case: 66 s and 1.4 GiB before; now under a millisecond and a few KiB."""
    path = tmp_path / "sparse.gguf"
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0))
        f.truncate(256 << 20)

    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ModelDamagedError) as info:
        read_model_shape(path)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert elapsed < 0.5
    assert peak < 1 << 20
    assert "holds 1,099,511,627,776 tensors" in str(info.value)


@pytest.mark.parametrize("count", [2**16 + 1, 2**20, 2**24])
def test_counts_beyond_any_model_are_refused_without_reading_on(tmp_path: Path, count: int) -> None:
    path = tmp_path / "sparse.gguf"
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, count, 0))
        f.truncate(1 << 30)

    started = time.perf_counter()
    with pytest.raises(ModelDamagedError) as info:
        read_model_shape(path)

    assert time.perf_counter() - started < 0.5
    assert "hsmdifd reads at most 65,536 and 16,384" in str(info.value)


def test_a_zero_filled_header_stops_at_the_first_repeat(tmp_path: Path) -> None:
    path = tmp_path / "zeros.gguf"
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 60_000, 0))
        f.truncate(256 << 20)

    with pytest.raises(ModelDamagedError) as info:
        read_model_shape(path)

    assert "the tensor name '' appears twice" in str(info.value)


def test_a_header_over_the_byte_budget_is_refused(
    tiny: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_cursor, "HEADER_BYTES", 4096)
    monkeypatch.setattr(gguf_cursor, "HEADER_BYTES_PER_TOKEN", 0)
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny)

    with pytest.raises(ModelDamagedError) as info:
        read_model_shape(path)

    assert "has a header larger than hsmdifd reads (0 MiB plus 0 bytes per vocabulary" in str(
        info.value
    )


def test_a_header_over_the_time_budget_is_refused(
    tiny: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timing, "HEADER_SECONDS", -1.0)
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny)

    with pytest.raises(ModelDamagedError) as info:
        read_model_shape(path)

    assert f"reading the header of {path} took more than -1 s" in str(info.value)
