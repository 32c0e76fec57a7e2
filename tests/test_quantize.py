"""Quantizing on load: llama.cpp's quantizer into a cache, reused, refused, cancelled cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import gguf
import pytest

from hsmdifd.placement import quantize as q
from hsmdifd.placement.gguf_header import ModelNotFoundError
from hsmdifd.placement.quantize import GIB
from tests.tinymodel import write_tiny_llama


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Rows of 256 weights: whole K-quant blocks, so 4bit really gives Q4_K.
    path = tmp_path_factory.mktemp("f16") / "tiny-f16.gguf"
    return write_tiny_llama(path, n_embd=256, n_head=4, n_head_kv=2, n_ff=256)


@pytest.fixture
def source(tmp_path: Path, f16_model: Path) -> Path:
    path = tmp_path / "models" / "tiny-f16.gguf"
    path.parent.mkdir()
    shutil.copyfile(f16_model, path)
    return path


def types_in(path: Path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def answer(path: Path) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=False, seed=1)
    try:
        out: Any = llm("the model", max_tokens=8, temperature=0.0)
        return str(out["choices"][0]["text"])
    finally:
        llm.close()


class Run(NamedTuple):
    result: q.Quantized
    progress: list[tuple[float, str]]


def run(source: Path, name: str, state: Path) -> Run:
    seen: list[tuple[float, str]] = []
    result = asyncio.run(q.quantize(source, name, state, lambda f, s: seen.append((f, s))))
    return Run(result, seen)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every quantizer run, by its output file."""
    runs: list[Path] = []
    real = q._run_quantizer

    async def counting(source: Path, out: Path, *args: Any) -> None:
        runs.append(out)
        await real(source, out, *args)

    monkeypatch.setattr(q, "_run_quantizer", counting)
    yield runs


@pytest.mark.parametrize(("name", "kind"), [("4bit", "Q4_K"), ("8bit", "Q8_0")])
def test_quantizes_loads_answers_and_reuses(
    source: Path, tmp_path: Path, counted: list[Path], name: str, kind: str
) -> None:
    state = tmp_path / "state"
    first = run(source, name, state)
    assert first.result.made and len(counted) == 1
    out = first.result.path
    assert out.parent == state / "quantized" and out.name.endswith(f"-{q.LEVELS[name].name}.gguf")
    assert kind in types_in(out) and not types_in(out) & {"F16", "BF16"}
    assert out.stat().st_size < source.stat().st_size
    assert out.stat().st_size <= q.estimate_bytes(source, name)
    fractions = [f for f, _ in first.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(s.startswith(f"quantizing to {q.LEVELS[name].name}: ") for _, s in first.progress)
    assert answer(out)
    assert os.listdir(out.parent) == [out.name]  # no partial file left

    mtime = out.stat().st_mtime_ns
    again = run(source, name, state)
    assert again.result == q.Quantized(
        out, made=False, note=f"using the {q.LEVELS[name].name} copy {out}"
    )
    assert len(counted) == 1 and again.progress == []  # measured: no second quantization
    assert out.stat().st_mtime_ns == mtime


def test_a_changed_source_is_quantized_anew(
    source: Path, tmp_path: Path, counted: list[Path]
) -> None:
    state = tmp_path / "state"
    first = run(source, "8bit", state).result.path
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    second = run(source, "8bit", state)
    assert second.result.made and second.result.path != first and len(counted) == 2


def test_an_already_quantized_file_loads_as_is(
    source: Path, tmp_path: Path, counted: list[Path]
) -> None:
    quantized = run(source, "8bit", tmp_path / "state").result.path
    result = run(quantized, "4bit", tmp_path / "state").result
    assert result == q.Quantized(
        quantized, made=False, note=f"{quantized} is already quantized (Q8_0); loading it as it is"
    )
    assert len(counted) == 1


def test_refused_with_the_figures_when_the_disk_lacks_room(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: list[Path]
) -> None:
    full = SimpleNamespace(total=GIB, used=GIB - 1024, free=1024)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: full)
    with pytest.raises(q.QuantizeError) as caught:
        run(source, "4bit", tmp_path / "state")
    needed = (q.estimate_bytes(source, "4bit") + q.MARGIN_BYTES) / q.GIB
    message = str(caught.value)
    assert f"needs up to {needed:.2f} GiB in {tmp_path / 'state' / 'quantized'}" in message
    assert "which has 0.00 GiB free: free some space there" in message
    assert counted == [] and os.listdir(tmp_path / "state" / "quantized") == []


def test_a_cancelled_quantization_leaves_no_partial_file(source: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def cancel_at_first_progress() -> None:
        task: asyncio.Task[q.Quantized] | None = None

        def on_progress(fraction: float, stage: str) -> None:
            assert task is not None
            task.cancel()

        task = asyncio.create_task(q.quantize(source, "8bit", state, on_progress))
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_at_first_progress())
    assert os.listdir(state / "quantized") == []
    assert run(source, "8bit", state).result.made  # and the next load quantizes whole


def test_a_partial_file_left_by_a_killed_daemon_is_removed(source: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    target = q.cache_path(source, state, "8bit")
    target.parent.mkdir(parents=True)
    stale = target.with_name(f".{target.name}.partial-999999")
    stale.write_bytes(b"GGUF half")
    assert run(source, "8bit", state).result.path == target
    assert os.listdir(target.parent) == [target.name]


def test_an_unwritable_cache_is_a_sentence(source: Path, tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state directory should be")
    with pytest.raises(q.QuantizeError) as caught:
        run(source, "8bit", tmp_path / "state")
    assert f"cannot use {tmp_path / 'state' / 'quantized'} for quantized models" in str(
        caught.value
    )


def test_unknown_levels_and_missing_sources(tmp_path: Path, source: Path) -> None:
    with pytest.raises(
        q.QuantizeError, match="unknown quantization '2bit': give one of 4bit, 8bit"
    ):
        run(source, "2bit", tmp_path)
    with pytest.raises(ModelNotFoundError, match="model file not found"):
        run(tmp_path / "nowhere.gguf", "4bit", tmp_path)


def test_a_failing_quantizer_says_what_llama_cpp_said(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = q.Level("Q8_0", 9999, 34 / 32)  # no such llama_ftype
    monkeypatch.setitem(q.LEVELS, "8bit", bad)
    with pytest.raises(q.QuantizeError) as caught:
        run(source, "8bit", tmp_path / "state")
    assert "llama.cpp could not quantize" in str(caught.value)
    assert os.listdir(tmp_path / "state" / "quantized") == []
