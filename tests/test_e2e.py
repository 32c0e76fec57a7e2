"""End to end: a real hsmdifd subprocess, real llama.cpp, driven by real hsmdifctl."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.daemon.timing import STREAM_INTERVAL
from tests.conftest import Daemon, MakeDaemon, child_pids, run_ctl, run_hsmdifd, slow_model
from tests.tinymodel import write_garbage, write_truncated


def status(d: Daemon) -> dict[str, object]:
    r = d.ctl("--json", "status")
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout)
    return result


LONG_ANSWER = pb.GenerateRequest(prompt="once upon", raw=True, max_tokens=2000, temperature=0)
"""Greedy decoding of the slow model runs to this limit: nothing ends it early."""


@pytest.fixture
def slow_daemon(make_daemon: MakeDaemon, short_dir: Path) -> Daemon:
    """A daemon with the slow model loaded, with room for LONG_ANSWER."""
    d = make_daemon(model=slow_model(short_dir))
    d.start()
    assert d.ctl("load", "--max-seq-len", "2048").returncode == 0
    return d


def assert_prompt_works(d: Daemon) -> None:
    r = d.ctl("prompt", "Say something", "--max-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["completion_tokens"] >= 1
    assert answer["text"].strip()


def test_status_alone_is_root(daemon: Daemon) -> None:
    s = status(daemon)
    assert s["role"] == "root"
    assert s["root"] == s["name"]
    assert re.fullmatch(r"[0-9a-f-]{36}", str(s["id"]))
    assert s["model"] is None
    assert (daemon.state_dir / "node_id").read_text().strip() == s["id"]
    human = daemon.ctl("status")
    assert human.returncode == 0 and "root" in human.stdout and "none loaded" in human.stdout


def test_devices_lists_this_device(daemon: Daemon) -> None:
    r = daemon.ctl("devices", "--json")
    assert r.returncode == 0, r.stderr
    (device,) = json.loads(r.stdout)
    for key in ("name", "address", "id", "role", "state", "memory_total_mb", "speed"):
        assert key in device
    assert device["role"] == "root" and device["state"] == "alive"
    assert 0 < device["memory_free_mb"] <= device["memory_total_mb"]
    assert device["speed"] > 0
    table = daemon.ctl("devices")
    assert table.returncode == 0 and device["name"] in table.stdout and "FREE" in table.stdout


def test_load_prompt_unload(daemon: Daemon, tiny_model: Path) -> None:
    r = daemon.ctl("load", str(tiny_model), "--max-seq-len", "256")
    assert r.returncode == 0, r.stderr
    assert "Loaded" in r.stdout and "context 256" in r.stdout
    model = status(daemon)["model"]
    assert isinstance(model, dict)
    assert model["state"] == "ready" and model["path"] == str(tiny_model)
    assert model["context_length"] == 256

    r = daemon.ctl("prompt", "Hello there", "--max-tokens", "12", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert re.search(r"Generated \d+ tokens.*Inference speed: [\d.]+ tokens/second", r.stderr)
    # Weights stay loaded between prompts: the same engine process answers again.
    pid_before = child_pids(daemon.proc.pid)  # type: ignore[union-attr]
    assert_prompt_works(daemon)
    assert child_pids(daemon.proc.pid) == pid_before  # type: ignore[union-attr]
    # When memory runs out, the kernel ends the engine, not the daemon.
    (engine,) = pid_before
    assert Path(f"/proc/{engine}/oom_score_adj").read_text().strip() == "1000"
    assert Path(f"/proc/{daemon.proc.pid}/oom_score_adj").read_text().strip() != "1000"  # type: ignore[union-attr]

    r = daemon.ctl("unload")
    assert r.returncode == 0 and "Unloaded" in r.stdout
    assert status(daemon)["model"] is None
    assert child_pids(daemon.proc.pid) == []  # type: ignore[union-attr]


def test_same_seed_repeats(daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = pb_grpc.ControlStub(channel)
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="Tell me a story")],
            max_tokens=16,
            seed=7,
            temperature=0.8,
        )
        events = list(stub.Generate(request))
        again = list(stub.Generate(request))
    texts = [e.text for e in events if e.WhichOneof("event") == "text"]
    done = events[-1].done
    assert done.completion_tokens >= 1 and "".join(texts)
    assert done.decode_tokens_per_second > 0 or done.completion_tokens == 1
    assert "".join(texts) == "".join(e.text for e in again if e.WhichOneof("event") == "text")


def test_answer_streams_while_it_is_generated(slow_daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{slow_daemon.socket}") as channel:
        stub = pb_grpc.ControlStub(channel)
        arrived: list[tuple[float, pb.GenerateEvent]] = []
        for event in stub.Generate(LONG_ANSWER):
            if not arrived:
                answering = stub.Status(pb.StatusRequest(), timeout=5).generating
            arrived.append((time.monotonic(), event))
        answered = stub.Status(pb.StatusRequest(), timeout=5).generating
    # Status tells whether an answer is being generated.
    assert answering and not answered
    texts = [at for at, e in arrived if e.WhichOneof("event") == "text"]
    ended, last = arrived[-1]
    assert last.done.completion_tokens == 2000 and last.done.finish_reason == "length"
    # The first words show at once, and the rest keeps coming while it is generated,
    # a few tokens to a message.
    assert ended - texts[0] > 4 * STREAM_INTERVAL, "the answer arrived all at the end"
    assert 4 <= len(texts) < 2000


def test_prompt_loads_default_model_and_reads_stdin(daemon: Daemon) -> None:
    r = daemon.ctl("prompt", "-", "--max-tokens", "5", "--json", input="from stdin")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert 1 <= answer["completion_tokens"] <= 5
    assert answer["prompt_tokens"] > 3
    model = status(daemon)["model"]
    assert isinstance(model, dict) and model["state"] == "ready"


def test_raw_prompt_skips_the_template(daemon: Daemon) -> None:
    chat = json.loads(daemon.ctl("prompt", "hi", "--max-tokens", "1", "--json").stdout)
    raw = json.loads(daemon.ctl("prompt", "hi", "--raw", "--max-tokens", "1", "--json").stdout)
    assert raw["prompt_tokens"] < chat["prompt_tokens"]


def test_chat_keeps_history(daemon: Daemon) -> None:
    r = daemon.ctl("chat", "--max-tokens", "6", input="first question\nsecond question\nexit\n")
    assert r.returncode == 0, r.stderr
    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", r.stderr)]
    answers = [int(n) for n in re.findall(r"Generated (\d+) tokens", r.stderr)]
    assert len(prompts) == 2, r.stderr
    # The second turn carries the first question and answer.
    assert prompts[1] > prompts[0] + answers[0]


def test_bad_model_files_are_refused_and_nothing_is_lost(
    daemon: Daemon, tiny_model: Path, tmp_path: Path
) -> None:
    assert daemon.ctl("load", str(tiny_model)).returncode == 0
    pids = child_pids(daemon.proc.pid)  # type: ignore[union-attr]
    garbage = write_garbage(tmp_path / "random.gguf", 100_000)
    truncated = write_truncated(tiny_model, tmp_path / "cut.gguf", 0.5)
    cases = {
        str(tmp_path / "missing.gguf"): "not found",
        str(garbage): "not a GGUF",
        str(truncated): "truncated",
    }
    for path, expected in cases.items():
        r = daemon.ctl("load", path)
        assert r.returncode == 1, (path, r.stdout, r.stderr)
        assert expected in r.stderr and path in r.stderr, r.stderr
        model = status(daemon)["model"]
        assert isinstance(model, dict) and model["path"] == str(tiny_model)
        assert model["state"] == "ready"
        assert_prompt_works(daemon)
    assert child_pids(daemon.proc.pid) == pids  # type: ignore[union-attr]


def test_model_too_big_for_memory_is_refused_with_numbers(make_daemon: MakeDaemon) -> None:
    d = make_daemon(resources="memory_override_mb = 1")
    d.start()
    r = d.ctl("load")
    assert r.returncode == 1
    assert re.search(
        r"does not fit this device: it needs about \d+ MiB .* but \d+ MiB are usable", r.stderr
    ), r.stderr
    assert status(d)["model"] is None


def test_prompt_longer_than_context(daemon: Daemon) -> None:
    assert daemon.ctl("load", "--max-seq-len", "256").returncode == 0
    r = daemon.ctl("prompt", "word " * 400)
    assert r.returncode == 1
    assert "context of 256" in r.stderr and "--max-seq-len" in r.stderr, r.stderr
    assert_prompt_works(daemon)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prompt", "hi", "--max-tokens", "0"], "must be at least 1"),
        (["prompt", "hi", "--max-tokens", "-3"], "must be at least 1"),
        (["prompt", "hi", "--temperature", "hot"], "not a number"),
        (["frobnicate"], "invalid choice"),
        (["status", "--frob"], "unrecognized arguments"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2(daemon: Daemon, args: list[str], expected: str) -> None:
    r = daemon.ctl(*args)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr
    assert status(daemon)["role"] == "root"


def test_empty_prompt_is_refused(daemon: Daemon) -> None:
    r = daemon.ctl("prompt", "   ")
    assert r.returncode == 1 and "empty" in r.stderr


def test_daemon_not_running_exits_3(short_dir: Path) -> None:
    r = run_ctl("--socket", str(short_dir / "none.sock"), "status")
    assert r.returncode == 3
    assert "hsmdifd is not running (no socket at" in r.stderr
    stale = short_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    r = run_ctl("--socket", str(stale), "status")
    assert r.returncode == 3 and "stale socket" in r.stderr


def test_socket_permission_denied_exits_3(daemon: Daemon) -> None:
    mode = daemon.socket.stat().st_mode & 0o777
    assert mode == 0o660
    if os.geteuid() == 0:
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        prefix = []
        daemon.socket.chmod(0)
    r = subprocess.run(
        [*prefix, sys.executable, "-m", "hsmdifctl", "--socket", str(daemon.socket), "status"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
        check=False,
    )
    daemon.socket.chmod(mode)
    assert r.returncode == 3, r.stderr
    assert "permission denied" in r.stderr and "hsmdif group" in r.stderr


def test_env_socket_is_used(daemon: Daemon) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "hsmdifctl", "status"],
        capture_output=True,
        text=True,
        env={**os.environ, "HSMDIF_SOCKET": str(daemon.socket)},
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_second_daemon_on_same_socket_refuses(daemon: Daemon) -> None:
    r = run_hsmdifd(
        "--config",
        str(daemon.config),
        "--socket",
        str(daemon.socket),
        "--state-dir",
        str(daemon.dir / "other"),
        "--no-mdns",
    )
    assert r.returncode == 1
    assert "another hsmdifd is already running on" in r.stderr
    assert daemon.socket.exists()
    assert status(daemon)["role"] == "root"


def test_stale_socket_is_replaced(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d.socket))
    s.close()
    d.start()
    assert status(d)["role"] == "root"


def test_config_with_unknown_key(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nprot = 9999\n")
    r = run_hsmdifd("--check-config", "--config", str(bad))
    assert r.returncode == 2
    assert "network.prot" in r.stderr and str(bad) in r.stderr
    d = make_daemon()
    d.config.write_text("[model]\ncontext_length = 'long'\n")
    r = run_hsmdifd("--config", str(d.config), "--socket", str(d.socket))
    assert r.returncode == 1
    assert "'model.context_length' must be an integer" in r.stderr
    good = run_hsmdifd("--check-config", "--config", "etc/hsmdifd.toml")
    assert good.returncode == 0, good.stderr


def test_notify_ready_after_socket_and_stopping_on_sigterm(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    d.start()
    assert d.notify is not None
    # READY=1 has arrived: the socket must accept at once.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.socket))
    assert d.ctl("load").returncode == 0
    children = child_pids(d.proc.pid)  # type: ignore[union-attr]
    assert children, "a loaded model runs in a child process"
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    messages = d.notify.wait_for("STOPPING=1")
    assert messages.index(next(m for m in messages if "READY=1" in m)) < len(messages) - 1
    assert d.stop() == 0
    assert not d.socket.exists()
    assert not any(psutil.pid_exists(pid) for pid in children)
    assert not list(d.dir.glob("engine-*.sock"))


def test_sighup_reloads_config(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    d.start()
    assert d.proc is not None and d.notify is not None
    d.config.write_text(d.config.read_text().replace("max_tokens = 32", "max_tokens = 3"))
    d.notify.messages.clear()
    d.proc.send_signal(signal.SIGHUP)
    messages = d.notify.wait_for("READY=1")
    assert any("RELOADING=1" in m for m in messages)
    r = d.ctl("prompt", "count", "--json", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] <= 3


def test_engine_killed_mid_generation(slow_daemon: Daemon) -> None:
    d = slow_daemon
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        stub = pb_grpc.ControlStub(channel)
        full = list(stub.Generate(LONG_ANSWER))
        assert full[-1].done.finish_reason == "length"
        (engine,) = child_pids(d.proc.pid)  # type: ignore[union-attr]
        stream = stub.Generate(LONG_ANSWER)
        with pytest.raises(grpc.RpcError) as caught:
            for event in stream:
                if event.WhichOneof("event") == "text" and psutil.pid_exists(engine):
                    os.kill(engine, signal.SIGKILL)
    details = str(caught.value.details())
    assert "engine process died" in details and "SIGKILL" in details
    model = status(d)["model"]
    assert isinstance(model, dict) and model["state"] == "failed"
    assert "SIGKILL" in str(model["error"])
    # The daemon lives on, and the next load works.
    assert d.proc.poll() is None  # type: ignore[union-attr]
    r = d.ctl("load", "--max-seq-len", "256")
    assert r.returncode == 0, r.stderr
    assert_prompt_works(d)


def test_prompt_after_engine_crash_reloads(daemon: Daemon) -> None:
    assert daemon.ctl("load").returncode == 0
    (engine,) = child_pids(daemon.proc.pid)  # type: ignore[union-attr]
    os.kill(engine, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while status(daemon)["model"]["state"] != "failed":  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_prompt_works(daemon)


def test_sigterm_during_generation_ends_cleanly(make_daemon: MakeDaemon, short_dir: Path) -> None:
    d = make_daemon(model=slow_model(short_dir), extra="[timing]\nshutdown_grace = 0.5\n")
    d.start()
    assert d.ctl("load", "--max-seq-len", "2048").returncode == 0
    children = child_pids(d.proc.pid)  # type: ignore[union-attr]
    proc = d.ctl_popen(
        "prompt",
        "once",
        "--raw",
        "--max-tokens",
        "2000",
        "--temperature",
        "0",
    )
    assert proc.stdout is not None
    proc.stdout.read(1)  # the answer has started
    assert d.stop() == 0
    _, err = proc.communicate(timeout=30)
    assert proc.returncode in (1, 3)
    assert "hsmdifd" in err
    assert not d.socket.exists()
    assert not any(psutil.pid_exists(pid) for pid in children)


def test_chat_ctrl_c_stops_the_answer_not_the_chat(slow_daemon: Daemon) -> None:
    d = slow_daemon
    chat = d.ctl_popen(
        "chat",
        "--max-tokens",
        "1500",
        "--temperature",
        "0",
    )
    assert chat.stdin is not None and chat.stdout is not None
    chat.stdin.write("tell me everything\n")
    chat.stdin.flush()
    chat.stdout.read(1)  # the answer has started
    chat.send_signal(signal.SIGINT)
    _, err = chat.communicate("and now?\nexit\n", timeout=120)
    assert chat.returncode == 0, err
    assert "[answer stopped]" in err
    # The second question was answered in the same conversation.
    assert re.search(r"Generated \d+ tokens \(prompt (\d+) tokens\)", err)
    assert d.proc is not None and d.proc.poll() is None


@pytest.mark.gemma
def test_bundled_gemma_answers(make_daemon: MakeDaemon) -> None:
    d = make_daemon(model=None)
    d.start()
    r = d.ctl(
        "prompt", "What is the capital of France?", "--max-tokens", "24", "--json", timeout=600
    )
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["text"].strip()
    assert answer["completion_tokens"] >= 1
    model = status(d)["model"]
    assert isinstance(model, dict)
    assert model["path"] == str(d.state_dir / "models" / "gemma-3-270m-q4_k_m.gguf")
    assert model["architecture"] == "gemma3"


def test_watchdog_pings_at_half_the_interval(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    d.start(env={"WATCHDOG_USEC": "400000"})
    assert d.notify is not None
    # Pings keep coming while the daemon runs (every 0.2 s here).
    for _ in range(3):
        d.notify.messages.clear()
        d.notify.wait_for("WATCHDOG=1", timeout=5)
