"""The person's model is never lost, on a real hsmdifd with real llama.cpp: refused
loads, thread counts and contexts out of range, long prompts, and every control call
cancelled at many points of its life."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.placement.gguf_model import read_model_shape
from hsmdifd.placement.memory_estimate import estimate_memory
from hsmdifd.placement.profile import usable_cpus
from tests import tinymodel
from tests.conftest import Daemon, MakeDaemon, child_pids

MiB = 1024 * 1024
CANCEL_POINTS_MS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 300)


def status(d: Daemon) -> dict[str, object]:
    r = d.ctl("--json", "status")
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout)
    return result


def model_of(d: Daemon) -> dict[str, object]:
    model = status(d)["model"]
    return model if isinstance(model, dict) else {"state": "idle"}


def assert_prompt_works(d: Daemon) -> None:
    r = d.ctl("prompt", "Say something", "--max-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] >= 1


def refused_by_llama_cpp(path: Path) -> Path:
    """A model whose header reads well but which llama.cpp refuses: a phi3 header over
    llama's tensors (phi3 wants its own, fused attention tensor)."""
    return tinymodel.write_tiny_llama(path, architecture="phi3")


@pytest.fixture
def control(daemon: Daemon) -> Iterator[pb_grpc.ControlStub]:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        yield pb_grpc.ControlStub(channel)


# A load that llama.cpp refuses.


def test_a_refused_load_keeps_the_working_model(
    daemon: Daemon, tiny_model: Path, tmp_path: Path
) -> None:
    assert daemon.ctl("load", str(tiny_model)).returncode == 0
    engine = child_pids(daemon.proc.pid)  # type: ignore[union-attr]
    bad = refused_by_llama_cpp(tmp_path / "refused.gguf")
    r = daemon.ctl("load", str(bad))
    assert r.returncode == 1 and "llama.cpp could not load" in r.stderr, r.stderr
    # llama.cpp's own reason, not llama-cpp-python's "Failed to load model from file".
    assert "has wrong shape" in r.stderr and "Failed to load" not in r.stderr, r.stderr
    model = model_of(daemon)
    assert model["state"] == "ready" and model["path"] == str(tiny_model), model
    assert child_pids(daemon.proc.pid) == engine  # type: ignore[union-attr]
    assert_prompt_works(daemon)
    assert_prompt_works(daemon)
    # No prompt tried the refused file again.
    assert daemon.log().count(f"loading {bad}") == 1, daemon.log()


def test_where_memory_holds_one_model_a_refused_load_loads_the_old_one_again(
    make_daemon: MakeDaemon, tiny_model: Path, tmp_path: Path
) -> None:
    need = estimate_memory(read_model_shape(tiny_model), 512).total
    d = make_daemon(resources=f"memory_override_mb = {math.ceil(need * 1.5 / MiB)}")
    d.start()
    assert d.ctl("load", str(tiny_model)).returncode == 0
    bad = refused_by_llama_cpp(tmp_path / "refused.gguf")
    r = d.ctl("load", str(bad))
    assert r.returncode == 1, r.stderr
    assert "llama.cpp could not load" in r.stderr, r.stderr
    assert f"{tiny_model} had been unloaded to make room" in r.stderr, r.stderr
    assert "is loaded again" in r.stderr, r.stderr
    model = model_of(d)
    assert model["state"] == "ready" and model["path"] == str(tiny_model), model
    assert_prompt_works(d)
    assert d.log().count(f"loading {bad}") == 1, d.log()


def test_a_refused_first_load_is_not_retried_by_the_next_prompt(
    daemon: Daemon, tiny_model: Path, tmp_path: Path
) -> None:
    bad = refused_by_llama_cpp(tmp_path / "refused.gguf")
    assert daemon.ctl("load", str(bad)).returncode == 1
    assert_prompt_works(daemon)  # the default, not the refused file
    assert model_of(daemon)["path"] == str(tiny_model)
    assert daemon.log().count(f"loading {bad}") == 1, daemon.log()


# Figures out of range.


def test_more_threads_than_the_device_has_are_refused(daemon: Daemon, tiny_model: Path) -> None:
    assert daemon.ctl("load", str(tiny_model)).returncode == 0
    cpus = usable_cpus()
    too_many = max(cpus + 1, 999)  # over this device's CPUs, under hsmdifctl's own bound
    r = daemon.ctl("load", str(tiny_model), "--threads", str(too_many))
    assert r.returncode == 1
    assert f"--threads {too_many} is more than this device has" in r.stderr, r.stderr
    assert f"give at most {cpus}" in r.stderr, r.stderr
    assert model_of(daemon)["state"] == "ready"
    assert_prompt_works(daemon)


def test_a_padded_context_is_the_one_figure(daemon: Daemon) -> None:
    """llama.cpp pads a context of 300 up; the engine uses what it got throughout."""
    assert daemon.ctl("load", "--max-seq-len", "300").returncode == 0
    n_ctx = model_of(daemon)["context_length"]
    assert isinstance(n_ctx, int) and n_ctx >= 300
    words = " ".join(["hello", "world,"] * 125)  # 250 words, about 375 tokens
    r = daemon.ctl("prompt", words, "--max-tokens", "4", "--json")
    if n_ctx > 400:
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["prompt_tokens"] > 300
    else:
        assert r.returncode == 1 and f"context of {n_ctx}" in r.stderr, r.stderr
    assert model_of(daemon)["state"] == "ready"
    assert_prompt_works(daemon)


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(
    daemon: Daemon, control: pb_grpc.ControlStub
) -> None:
    assert daemon.ctl("load", "--max-seq-len", "256").returncode == 0
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(control.Generate(pb.GenerateRequest(prompt="a" * 300_000, raw=True), timeout=30))
    assert time.monotonic() - started < 2
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(caught.value.details())
    assert "300000 bytes" in details and "context of 256 tokens" in details, details
    assert "at most 4096 bytes" in details, details
    assert_prompt_works(daemon)


def prefill_model(directory: Path) -> Path:
    """A model whose prefill of a full 2048-token context takes seconds on 2 cores."""
    return tinymodel.write_tiny_llama(
        directory / "prefill.gguf", n_layer=8, n_embd=512, n_ff=1024, n_ctx_train=2048
    )


def test_a_cancelled_prefill_frees_the_engine_within_100_ms(
    make_daemon: MakeDaemon, short_dir: Path
) -> None:
    d = make_daemon(model=prefill_model(short_dir))
    d.start()
    assert d.ctl("load", "--max-seq-len", "2048").returncode == 0
    short = pb.GenerateRequest(prompt="hello", raw=True, max_tokens=1, temperature=0)
    long = pb.GenerateRequest(prompt="the " * 1900, raw=True, max_tokens=1, temperature=0)
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        stub = pb_grpc.ControlStub(channel)

        def answer(request: pb.GenerateRequest) -> float:
            started = time.monotonic()
            events = list(stub.Generate(request, timeout=60))
            assert events[-1].HasField("done")
            return time.monotonic() - started

        whole = answer(long)
        assert whole > 0.5, f"the prefill took only {whole:.2f} s: the test needs longer"
        alone = min(answer(short) for _ in range(3))
        for delay in (0.05, 0.2, whole / 2):
            call = stub.Generate(long)
            time.sleep(delay)
            call.cancel()  # type: ignore[no-untyped-call]
            waited = answer(short) - alone
            assert waited < 0.1, (
                f"cancelled {delay:.2f} s in, the engine stayed busy {waited:.3f} s"
            )


# Cancellation at every point.


def settle(d: Daemon, timeout: float = 15) -> tuple[str, list[int]]:
    """Wait until the state and the engine processes agree; return both."""
    deadline = time.monotonic() + timeout
    while True:
        state = str(model_of(d)["state"])
        engines = child_pids(d.proc.pid)  # type: ignore[union-attr]
        if (state == "ready" and len(engines) == 1) or (
            state in ("idle", "failed") and not engines
        ):
            return state, engines
        if time.monotonic() > deadline:
            raise AssertionError(f"state {state} with engine processes {engines}:\n{d.log()}")
        time.sleep(0.02)


def test_cancelled_load_unload_and_generate_leave_state_and_processes_agreeing(
    daemon: Daemon, tiny_model: Path, control: pb_grpc.ControlStub
) -> None:
    load = pb.LoadRequest(model_path=str(tiny_model))
    prompt = pb.GenerateRequest(prompt="once upon", raw=True, max_tokens=200, temperature=0)
    for ms in CANCEL_POINTS_MS:
        for loaded_before in (False, True):
            if loaded_before:
                list(control.Load(load, timeout=60))
            else:
                control.Unload(pb.UnloadRequest(), timeout=30)
            call = control.Load(load)
            time.sleep(ms / 1000)
            call.cancel()  # type: ignore[no-untyped-call]
            state, _ = settle(daemon)
            assert state in ("ready", "idle"), (ms, loaded_before, state)
            if loaded_before:
                assert state == "ready", f"a load cancelled {ms} ms in lost the model"

        list(control.Load(load, timeout=60))
        future = control.Unload.future(pb.UnloadRequest())
        time.sleep(ms / 1000)
        future.cancel()  # type: ignore[no-untyped-call]
        settle(daemon)

        for loaded_before in (False, True):
            if loaded_before:
                list(control.Load(load, timeout=60))
            else:
                control.Unload(pb.UnloadRequest(), timeout=30)
            answer = control.Generate(prompt)
            time.sleep(ms / 1000)
            answer.cancel()  # type: ignore[no-untyped-call]
            state, _ = settle(daemon)
            if loaded_before:
                assert state == "ready", f"an answer cancelled {ms} ms in lost the model"
        assert_prompt_works(daemon)
        assert model_of(daemon)["state"] == "ready"


def test_five_loads_cancelled_50_to_300_ms_in_leave_no_engine_behind(
    daemon: Daemon, tiny_model: Path, control: pb_grpc.ControlStub
) -> None:
    for ms in (50, 100, 150, 200, 300):
        call = control.Load(pb.LoadRequest(model_path=str(tiny_model)))
        time.sleep(ms / 1000)
        call.cancel()  # type: ignore[no-untyped-call]
        state, engines = settle(daemon)
        assert len(engines) == (state == "ready"), (ms, state, engines)
    assert_prompt_works(daemon)
    assert len(child_pids(daemon.proc.pid)) == 1  # type: ignore[union-attr]
