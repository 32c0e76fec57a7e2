"""`hsmdifctl load MODEL --quantize` and `plan MODEL --quantize` against a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from hsmdifd.daemon.errors import RequestError
from hsmdifd.placement import model_files
from hsmdifd.placement import quantize as q
from tests.conftest import Daemon, MakeDaemon
from tests.tinymodel import write_tiny_llama


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Rows of 256 weights: whole K-quant blocks, so 4bit really gives Q4_K.
    path = tmp_path_factory.mktemp("f16") / "tiny-f16.gguf"
    return write_tiny_llama(path, n_embd=256, n_head=4, n_head_kv=2, n_ff=256)


@pytest.fixture(scope="module")
def big_f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough that quantizing it on one thread takes a few seconds."""
    path = tmp_path_factory.mktemp("f16big") / "big-f16.gguf"
    return write_tiny_llama(path, n_layer=8, n_embd=1024, n_head=8, n_head_kv=4, n_ff=2816)


def status(d: Daemon) -> dict[str, Any]:
    r = d.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def cached(d: Daemon) -> list[Path]:
    folder = d.state_dir / "quantized"
    return sorted(folder.iterdir()) if folder.exists() else []


def answers(d: Daemon) -> None:
    r = d.ctl("prompt", "the model", "--raw", "--max-tokens", "4", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@pytest.mark.parametrize(("name", "kind"), [("4bit", "Q4_K_M"), ("8bit", "Q8_0")])
def test_load_quantizes_once_answers_and_reuses_the_copy(
    make_daemon: MakeDaemon, f16_model: Path, name: str, kind: str
) -> None:
    d = make_daemon()
    d.start()
    r = d.ctl("load", str(f16_model), "--quantize", name)
    assert r.returncode == 0, r.stderr
    (copy,) = cached(d)
    assert copy.name.endswith(f"-{kind}.gguf")
    assert f"quantized {f16_model} to {kind}" in r.stderr
    model = status(d)["model"]
    assert model["state"] == "ready" and model["path"] == str(copy)
    assert model["size_bytes"] < f16_model.stat().st_size
    answers(d)

    before = copy.stat()
    assert d.ctl("unload").returncode == 0
    r = d.ctl("load", str(f16_model), "--quantize", name)
    assert r.returncode == 0, r.stderr
    assert f"using the {kind} copy {copy}" in r.stderr
    after = copy.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert cached(d) == [copy]
    log = d.log()
    assert log.count(f"quantized {f16_model} to {kind}") == 1  # measured: no second run
    assert f"using the {kind} copy {copy}" in log
    assert status(d)["model"]["path"] == str(copy)
    answers(d)


def test_an_already_quantized_file_loads_as_is_with_a_note(
    make_daemon: MakeDaemon, f16_model: Path, tmp_path: Path
) -> None:
    made = asyncio.run(q.quantize(f16_model, "8bit", tmp_path / "elsewhere")).path
    d = make_daemon()
    d.start()
    r = d.ctl("load", str(made), "--quantize", "4bit")
    assert r.returncode == 0, r.stderr
    assert f"{made} is already quantized (Q8_0); loading it as it is" in r.stderr
    assert status(d)["model"]["path"] == str(made)
    assert cached(d) == []
    answers(d)


def test_plan_shows_the_quantized_size_without_quantizing_or_loading(
    make_daemon: MakeDaemon, f16_model: Path
) -> None:
    d = make_daemon()
    d.start()
    plain = d.ctl("plan", str(f16_model), "--json")
    assert plain.returncode == 0, plain.stderr
    planned = {}
    for name in ("4bit", "8bit"):
        r = d.ctl("plan", str(f16_model), "--quantize", name, "--json")
        assert r.returncode == 0, r.stderr
        planned[name] = json.loads(r.stdout)["model_bytes"]
        assert planned[name] <= q.estimate_bytes(f16_model, name)
    assert planned["4bit"] < planned["8bit"] < json.loads(plain.stdout)["model_bytes"]
    human = d.ctl("plan", str(f16_model), "--quantize", "4bit")
    assert human.returncode == 0 and f"{planned['4bit'] / 2**20:.0f} MiB of weights" in human.stdout
    assert status(d)["model"] is None and cached(d) == []


def test_the_configured_quantization_applies_to_a_load_without_the_flag(
    make_daemon: MakeDaemon, f16_model: Path
) -> None:
    d = make_daemon(model=f16_model, extra='quantize = "8bit"\n')
    d.start()
    r = d.ctl("load")  # the default model, F16
    assert r.returncode == 0, r.stderr
    (copy,) = cached(d)
    assert f"quantized {f16_model} to Q8_0" in r.stderr
    assert status(d)["model"]["path"] == str(copy)
    plain = json.loads(d.ctl("plan", str(f16_model), "--json").stdout)["model_bytes"]
    assert plain < f16_model.stat().st_size  # planned as the copy it would load
    answers(d)


def test_a_load_cancelled_while_quantizing_leaves_no_partial_file_and_the_old_model(
    make_daemon: MakeDaemon, big_f16_model: Path, tiny_model: Path
) -> None:
    d = make_daemon()
    d.start()
    assert d.ctl("load", str(tiny_model)).returncode == 0
    # On a terminal, as a person would see it, so that the progress line is drawn.
    master, slave = pty.openpty()
    load = ["load", str(big_f16_model), "--quantize", "4bit", "--threads", "1"]
    ctl = subprocess.Popen(
        [sys.executable, "-m", "hsmdifctl", "--socket", str(d.socket), *load],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"quantizing to Q4_K_M" not in seen:
            assert time.monotonic() < deadline, f"no quantizing progress: {seen!r}"
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                seen += os.read(master, 4096)
        ctl.kill()
        ctl.wait()
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait()
        os.close(master)

    assert d.proc is not None
    deadline = time.monotonic() + 30
    while quantizers(d.proc.pid) or cached(d):  # the quantizer ends, then its file goes
        assert time.monotonic() < deadline, f"left after the cancelled load: {cached(d)}"
        time.sleep(0.05)
    assert cached(d) == []  # no partial file, and no copy
    model = status(d)["model"]
    assert model["state"] == "ready" and model["path"] == str(tiny_model)
    answers(d)
    assert f"quantized {big_f16_model}" not in d.log()


def quantizers(pid: int) -> list[int]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "hsmdifd.placement.quantize" in child.cmdline():
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


async def refusal(state_dir: Path, source: Path) -> RequestError:
    with pytest.raises(RequestError) as caught:
        async for _ in model_files.quantized(source, "4bit", state_dir, 1):
            pass
    return caught.value


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (q.NoRoomError("needs up to 1.00 GiB"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (q.QuantizeError("llama.cpp could not"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_a_refused_quantization_is_a_sentence_with_its_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: q.QuantizeError, code: Any
) -> None:
    async def refuse(*args: Any) -> q.Quantized:
        raise error

    monkeypatch.setattr(q, "quantize", refuse)
    refused = asyncio.run(refusal(tmp_path, tmp_path / "m.gguf"))
    assert (refused.code, str(refused)) == (code, str(error))


def test_a_missing_source_is_not_found(tmp_path: Path) -> None:
    refused = asyncio.run(refusal(tmp_path, tmp_path / "nowhere.gguf"))
    assert refused.code == grpc.StatusCode.NOT_FOUND and "model file not found" in str(refused)
