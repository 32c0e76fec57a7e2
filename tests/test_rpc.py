"""The ggml RPC data plane with real processes on loopback: rpc-workers and split loads.

Registering servers is process-global and a dead server aborts the process, so every
split load runs in its own `python -m tests.rpc_client`. llama_cpp is imported plainly:
without it these tests fail rather than skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from hsmdifd.engine import rpc
from tests.tinymodel import write_tiny_llama

REPO = Path(__file__).parent.parent
HOST = "127.0.0.1"
HASH_THRESHOLD = 10 << 20  # ggml-rpc.cpp caches weight tensors larger than this
# ggml prints a backtrace through gdb before it aborts: slow, and noise in test logs.
CHILD_ENV = {**os.environ, "GGML_NO_BACKTRACE": "1"}
# Logits of a split run against a local one: equal here (f32 weights are not repacked),
# but quantized weights use repacked CPU kernels locally and plain ones remotely.
LOGIT_TOLERANCE = 0.02  # of the largest logit's magnitude


@dataclass
class Worker:
    """A running `python -m hsmdifd.engine.rpc_worker` and its log."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_worker(directory: Path, cache_dir: Path | None, env: dict[str, str]) -> Worker:
    for _ in range(3):  # free_port's race: another process may take the port first
        endpoint = f"{HOST}:{rpc.free_port(HOST)}"
        log = directory / f"worker-{endpoint.replace(':', '-')}.log"
        cmd = [sys.executable, "-m", "hsmdifd.engine.rpc_worker", "--endpoint", endpoint]
        cmd += ["--threads", "1", *(["--cache-dir", str(cache_dir)] if cache_dir else [])]
        with log.open("wb") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env
            )
        assert proc.stdout is not None
        worker = Worker(endpoint, proc, log)
        if proc.stdout.readline().strip() == b"ready":
            return worker
        worker.stop()
        if "could not listen" not in worker.log_text():
            raise AssertionError(f"the rpc-worker did not start:\n{worker.log_text()}")
    raise AssertionError("no free port for an rpc-worker after 3 tries")


StartWorker = Callable[..., Worker]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Start rpc-workers on free loopback ports; every one is ended afterwards."""
    started: list[Worker] = []

    def start(cache_dir: Path | None = None, env: dict[str, str] | None = None) -> Worker:
        started.append(_start_worker(tmp_path, cache_dir, {**CHILD_ENV, **(env or {})}))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


@dataclass
class ClientRun:
    returncode: int
    stdout: str
    log: str  # llama.cpp's verbose log

    @property
    def result(self) -> dict[str, list[float]]:
        lines = [line for line in self.stdout.splitlines() if line.startswith("result ")]
        assert lines, f"the client gave no result (exit {self.returncode}):\n{self.log[-3000:]}"
        result: dict[str, list[float]] = json.loads(lines[-1].removeprefix("result "))
        return result

    @property
    def tokens(self) -> list[int]:
        return [int(t) for t in self.result["tokens"]]

    @property
    def logits(self) -> np.typing.NDArray[np.float64]:
        return np.array(self.result["logits"])

    @property
    def load_seconds(self) -> float:
        return float(self.stdout.split("loaded ", 1)[1].split()[0])


def _python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
        env=CHILD_ENV,
    )


def _client_args(model: Path, endpoints: list[str], n_gpu_layers: int, *args: str) -> list[str]:
    """Arguments to `python` for a client run of `model` split over `endpoints`."""
    cmd = ["-m", "tests.rpc_client", str(model), f"--n-gpu-layers={n_gpu_layers}"]
    for endpoint in endpoints:
        cmd += ["--endpoint", endpoint]
    if endpoints:
        cmd += ["--split", *("1" for _ in endpoints)]
    return [*cmd, *args]


def run_client(
    model: Path, endpoints: list[str], n_gpu_layers: int, *args: str, timeout: float = 120
) -> ClientRun:
    """Load `model` split over `endpoints` in a fresh process and generate greedily."""
    done = _python(*_client_args(model, endpoints, n_gpu_layers, *args), timeout=timeout)
    return ClientRun(done.returncode, done.stdout, done.stderr)


def _model_buffer_mib(log: str, endpoint: str) -> float:
    """The size of the weights llama.cpp put on `endpoint`'s device, from its verbose log."""
    found = re.search(
        rf"^load_tensors: +RPC\d+\[{re.escape(endpoint)}\] model buffer size = +([\d.]+) MiB$",
        log,
        re.M,
    )
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def split_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(
        tmp_path_factory.mktemp("models") / "split.gguf", n_layer=4, n_embd=128, dtype="f32"
    )


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """215 MB, whose 16 MiB matrices pass the RPC server's cache threshold."""
    path = write_tiny_llama(
        tmp_path_factory.mktemp("models") / "big.gguf",
        n_layer=2,
        n_embd=2048,
        n_head=16,
        n_head_kv=8,
        n_ff=2048,
        dtype="f32",
    )
    yield path
    path.unlink()


# Llama's n_gpu_layers=4 on 4 blocks + output: block 0 stays local, blocks 1-2 go to
# the first server, block 3 and the output layer to the second.
SPLIT_LAYERS = 4


def test_require_rpc_says_how_to_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "llama_supports_rpc", lambda: False)

    assert not rpc.supports_rpc()
    with pytest.raises(rpc.RpcUnavailable) as error:
        rpc.require_rpc()
    assert "built without the RPC backend" in str(error.value)
    assert 'CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall' in str(error.value)
    assert "llama-cpp-python==0.3.36" in str(error.value)
    assert "make venv" in str(error.value)


def test_require_rpc_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)

    assert not rpc.supports_rpc()
    with pytest.raises(rpc.RpcUnavailable, match=r"cannot be imported.*make venv"):
        rpc.require_rpc()


def test_this_build_supports_rpc() -> None:
    assert rpc.supports_rpc()
    rpc.require_rpc()


@pytest.mark.parametrize(
    ("endpoint", "listen", "expected"),
    [
        ("10.0.0.2:50052", False, ("10.0.0.2", 50052)),
        ("pi-4.local:50052", False, ("pi-4.local", 50052)),
        ("0.0.0.0:0", True, ("0.0.0.0", 0)),
    ],
)
def test_parse_endpoint(endpoint: str, listen: bool, expected: tuple[str, int]) -> None:
    assert rpc.parse_endpoint(endpoint, listen=listen) == expected


@pytest.mark.parametrize(
    ("endpoint", "listen"),
    [
        ("10.0.0.2", False),
        (":50052", False),
        ("10.0.0.2:port", False),
        ("10.0.0.2:0", False),
        ("10.0.0.2:65536", False),
        ("::1:50052", False),
        ("localhost:50052", True),
    ],
)
def test_parse_endpoint_refuses(endpoint: str, listen: bool) -> None:
    with pytest.raises(ValueError, match="RPC endpoint"):
        rpc.parse_endpoint(endpoint, listen=listen)


def test_unreachable_endpoint_is_an_error_not_an_abort() -> None:
    endpoint = f"{HOST}:{rpc.free_port(HOST)}"  # nothing listens there

    with pytest.raises(rpc.RpcServerUnreachable) as error:
        rpc.register_servers([endpoint])

    assert error.value.endpoint == endpoint
    assert f"the RPC server at {endpoint} cannot be reached" in str(error.value)


def test_duplicate_endpoints_are_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        rpc.register_servers(["10.0.0.2:50052", "10.0.0.2:50052"])


def test_ggml_itself_aborts_on_an_unreachable_endpoint() -> None:
    """Why register_servers checks first: ggml's add_server aborts the whole process."""
    endpoint = f"{HOST}:{rpc.free_port(HOST)}"
    code = f"from hsmdifd.engine import rpc; rpc._ggml().add_server(b'{endpoint}')"

    done = _python("-c", code)

    assert done.returncode == -signal.SIGABRT
    assert f"Failed to connect to {endpoint}" in done.stderr


def test_a_second_copy_of_libggml_is_refused() -> None:
    """libggml.so (not .so.0) is a second registry llama.cpp never sees: refuse it."""
    code = textwrap.dedent(
        """
        from hsmdifd.engine import rpc
        rpc._SONAMES = ("libggml-base.so", "libggml.so")
        try:
            rpc._ggml()
        except rpc.RpcUnavailable as e:
            print(e)
        """
    )

    done = _python("-c", code)

    assert done.returncode == 0, done.stderr
    assert "is not the libggml-base.so libllama uses" in done.stdout


def test_worker_exits_when_its_stdin_closes(start_worker: StartWorker) -> None:
    worker = start_worker()
    assert worker.proc.poll() is None
    assert worker.proc.stdin is not None

    worker.proc.stdin.close()

    assert worker.proc.wait(10) == 0


def test_worker_on_a_taken_port_exits_without_ready(tmp_path: Path) -> None:
    worker = _start_worker(tmp_path, None, CHILD_ENV)
    second = subprocess.Popen(
        [sys.executable, "-m", "hsmdifd.engine.rpc_worker", "--endpoint", worker.endpoint],
        stdin=subprocess.PIPE,  # held open: a closed stdin would end the worker at once
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=CHILD_ENV,
    )
    try:
        returncode = second.wait(30)
        stdout, stderr = second.communicate()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
        worker.stop()

    assert returncode == 1
    assert stdout == ""
    assert f"could not listen on {worker.endpoint}" in stderr


def test_layers_go_to_the_rpc_workers(split_model: Path, start_worker: StartWorker) -> None:
    """The soname trap: with the wrong libggml every layer silently stays local."""
    first, second = start_worker(), start_worker()

    run = run_client(split_model, [first.endpoint, second.endpoint], SPLIT_LAYERS)

    assert run.returncode == 0, run.log[-3000:]
    assert _model_buffer_mib(run.log, first.endpoint) > 0, run.log
    assert _model_buffer_mib(run.log, second.endpoint) > 0, run.log
    assigned = re.findall(r"layer +(\d+) assigned to device (\w+)", run.log)
    assert assigned == [("0", "CPU"), ("1", "RPC0"), ("2", "RPC0"), ("3", "RPC1"), ("4", "RPC1")]
    for worker in (first, second):
        assert "Accepted client connection" in worker.log_text()


def test_split_run_repeats_exactly_and_matches_local(
    split_model: Path, start_worker: StartWorker
) -> None:
    endpoints = [start_worker().endpoint, start_worker().endpoint]

    once = run_client(split_model, endpoints, SPLIT_LAYERS)
    again = run_client(split_model, endpoints, SPLIT_LAYERS)
    local = run_client(split_model, [], 0)

    assert len(once.tokens) == 16
    assert once.tokens == again.tokens  # the exact oracle: same split, same servers
    np.testing.assert_array_equal(once.logits, again.logits)
    assert once.tokens[0] == local.tokens[0]
    scale = float(np.abs(local.logits).max())
    np.testing.assert_allclose(once.logits, local.logits, rtol=0, atol=LOGIT_TOLERANCE * scale)


def test_tensor_cache_serves_a_reload(
    big_model: Path, start_worker: StartWorker, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "rpc"  # missing: the worker must create it
    worker = start_worker(cache_dir=cache, env={"GGML_RPC_DEBUG": "1"})

    try:
        first = run_client(big_model, [worker.endpoint], 3, "--tokens=2")
        assert first.returncode == 0, first.log[-3000:]
        cached = {p.name: p.stat().st_size for p in cache.iterdir()}
        before = len(worker.log_text())
        second = run_client(big_model, [worker.endpoint], 3, "--tokens=2")
        assert second.returncode == 0, second.log[-3000:]
        reload_log = worker.log_text()[before:]
        after = {p.name: p.stat().st_size for p in cache.iterdir()}
    finally:
        worker.stop()
        with contextlib.suppress(FileNotFoundError):
            for path in cache.iterdir():
                path.unlink()

    assert cached, "the first load cached no tensor"
    assert all(size > HASH_THRESHOLD for size in cached.values())
    assert after == cached
    # The reload sent hashes, not the large tensors themselves.
    assert set(re.findall(r"^\[set_tensor_hash\] .*hash: ([0-9a-f]+)$", reload_log, re.M)) == set(
        cached
    )
    sizes = [int(s) for s in re.findall(r"^\[set_tensor\] .*size: (\d+)$", reload_log, re.M)]
    assert all(size <= HASH_THRESHOLD for size in sizes)
    assert first.tokens == second.tokens
    assert second.load_seconds < first.load_seconds
    print(
        f"tensor cache: first load {first.load_seconds:.2f} s, reload "
        f"{second.load_seconds:.2f} s, ratio {first.load_seconds / second.load_seconds:.1f}"
    )


def test_client_aborts_when_a_worker_dies(split_model: Path, start_worker: StartWorker) -> None:
    """llama.cpp aborts (SIGABRT) when a server goes: why the engine is a child process."""
    first, second = start_worker(), start_worker()
    args = _client_args(split_model, [first.endpoint, second.endpoint], SPLIT_LAYERS, "--forever")
    client = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=CHILD_ENV,
    )
    try:
        assert client.stdout is not None
        produced = 0
        while produced < 20:
            line = client.stdout.readline()
            assert line, "the client stopped before generating"
            produced += line.startswith("token ")
        second.proc.kill()
        started = time.monotonic()
        _, log = client.communicate(timeout=30)
        seconds = time.monotonic() - started
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()

    assert client.returncode == -signal.SIGABRT
    assert "Remote RPC server crashed" in log
    assert seconds < 10
    assert first.proc.poll() is None  # the other worker serves on
