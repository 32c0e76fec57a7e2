"""The OpenAI-compatible HTTP API, against a real hsmdifd, driven by the real `openai`
SDK and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from tests.conftest import Daemon, MakeDaemon, child_pids, run_ctl, run_hsmdifd, slow_model
from tests.tinymodel import write_tiny_llama

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_with_http(d: Daemon) -> Daemon:
    d.http = f"127.0.0.1:{free_port()}"
    d.start()
    return d


def client(d: Daemon, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{d.http}/v1", api_key=key, max_retries=0, timeout=60)


def conn(d: Daemon) -> http.client.HTTPConnection:
    host, port = d.http.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def post(d: Daemon, path: str, body: object) -> tuple[int, dict[str, str], bytes]:
    c = conn(d)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


@pytest.fixture
def api(make_daemon: MakeDaemon) -> Daemon:
    return start_with_http(make_daemon())


def test_models_list_names_the_default_model(api: Daemon) -> None:
    models = client(api).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].owned_by == "hsmdif"


def test_chat_completion_and_usage(api: Daemon) -> None:
    answer = client(api).chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert answer.usage.completion_tokens <= 6 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_completion_streamed_with_usage(api: Daemon) -> None:
    stream = client(api).chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    whole = client(api).chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
    )
    assert whole.choices[0].message.content == text  # greedy: the same answer


def test_completion_streamed_and_not(api: Daemon) -> None:
    c = client(api)
    whole = c.completions.create(model="tiny", prompt="once upon", max_tokens=8, temperature=0)
    assert whole.choices[0].text and whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    pieces = c.completions.create(
        model="tiny", prompt="once upon", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


def test_stop_sequences_cut_without_leaking(api: Daemon) -> None:
    c = client(api)
    full = c.completions.create(model="tiny", prompt="once upon", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert len(text) > 6
    stop = text[3:6]
    expected = text[: text.find(stop)]
    cut = c.completions.create(
        model="tiny", prompt="once upon", max_tokens=24, temperature=0, stop=[stop, "\x00"]
    )
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model="tiny", prompt="once upon", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == expected
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_errors_are_the_sdks_exceptions(api: Daemon) -> None:
    c = client(api)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="tiny", messages=HELLO, n=2)
    assert "'n'" in bad.value.message and bad.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=HELLO, temperature=9)
    with pytest.raises(openai.NotFoundError) as missing:
        c.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert "tiny" in missing.value.message  # the known ids
    long_prompt = "word " * 600  # longer than the context of 512
    with pytest.raises(openai.BadRequestError) as long:
        c.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    assert "512" in long.value.message


def test_sse_framing_line_by_line(api: Daemon) -> None:
    c = conn(api)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True}
    c.request("POST", "/v1/chat/completions", json.dumps(body))
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type", "").startswith("text/event-stream")
    lines = r.read().decode().split("\n")
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events)
    # every event is one data line followed by a blank line
    assert lines[1::2] == [""] * len(lines[1::2]) and lines[-2:] == ["", ""]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_unknown_route_is_an_openai_404(api: Daemon) -> None:
    c = conn(api)
    c.request("GET", "/v1/nothing")
    r = c.getresponse()
    error = json.loads(r.read())["error"]
    assert r.status == 404 and set(error) == {"message", "type", "param", "code"}


def test_health_and_metrics_count_the_requests(api: Daemon) -> None:
    c = client(api)
    c.models.list()
    c.completions.create(model="tiny", prompt="once", max_tokens=3, temperature=0)
    # An answer hsmdifctl asked for counts as one HTTP asked for, tokens and timings.
    answered = api.ctl("prompt", "once", "--raw", "--max-tokens", "2", "--temperature", "0")
    assert answered.returncode == 0, answered.stderr
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="once", max_tokens=3)
    h = conn(api)
    h.request("GET", "/health")
    r = h.getresponse()
    health = json.loads(r.read())
    assert r.status == 200 and health["state"] == "ready" and health["model"] == "tiny"
    h.request("GET", "/metrics")
    text = h.getresponse().read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def requests(endpoint: str, status: str) -> float:
        key = (
            "hsmdif_http_requests_total",
            (("endpoint", endpoint), ("status", status)),
        )
        return samples.get(key, 0.0)

    assert requests("/v1/models", "200") == 1
    assert requests("/v1/completions", "200") == 1
    assert requests("/v1/completions", "404") == 1
    assert requests("/health", "200") == 1
    assert samples[("hsmdif_completion_tokens_total", ())] == 3 + 2
    assert samples[("hsmdif_time_to_first_token_seconds_count", ())] == 2
    assert samples[("hsmdif_queue_depth", ())] == 0
    assert samples[("hsmdif_model_loaded", (("model", "tiny"),))] == 1
    assert samples[("hsmdif_members_alive", ())] >= 1
    layers = [v for (name, _), v in samples.items() if name == "hsmdif_device_layers"]
    assert layers == [3]  # the tiny model's 2 layers and its output layer, all here


@pytest.fixture
def slow_api(make_daemon: MakeDaemon, short_dir: Path) -> Iterator[Daemon]:
    d = make_daemon(model=slow_model(short_dir), extra="[api]\nmax_queue = 1\n")
    start_with_http(d)
    assert d.ctl("load", "--max-seq-len", "2048").returncode == 0
    yield d


LONG = {"model": "slow", "prompt": "once upon", "max_tokens": 1500, "temperature": 0}


def status(d: Daemon) -> dict[str, Any]:
    r = d.ctl("--json", "status", timeout=10)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def in_flight(d: Daemon) -> int:
    """The root's requests in flight, asked over the control socket (fast enough to time)."""
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        return pb_grpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=5).in_flight


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def test_a_client_that_goes_away_frees_the_engine_at_once(slow_api: Daemon) -> None:
    c = conn(slow_api)
    c.request("POST", "/v1/completions", json.dumps({**LONG, "stream": True}))
    r = c.getresponse()
    assert r.status == 200 and r.fp is not None
    r.fp.readline()  # the first event has come: the engine is answering
    assert in_flight(slow_api) == 1
    assert c.sock is not None
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    left = time.monotonic()
    wait_for(lambda: in_flight(slow_api) == 0, 5)
    freed = time.monotonic() - left
    print(f"the engine was free {1000 * freed:.0f} ms after the client left")
    assert freed < 0.1
    started = time.monotonic()
    answer = client(slow_api).completions.create(
        model="slow", prompt="hi", max_tokens=2, temperature=0
    )
    assert answer.choices[0].finish_reason == "length"
    assert time.monotonic() - started < 3.0  # not the seconds 1500 tokens take


def test_a_full_queue_is_a_503_with_retry_after(slow_api: Daemon) -> None:
    """max_queue = 1: one answering, one waiting, the third refused (HTTP and gRPC)."""
    results: list[tuple[int, dict[str, str], bytes]] = []

    def ask() -> None:
        results.append(post(slow_api, "/v1/completions", LONG))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: status(slow_api)["queued"] == 1)
    with grpc.insecure_channel(f"unix:{slow_api.socket}") as channel:
        busy = time.monotonic()
        reply = pb_grpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=5)
        assert time.monotonic() - busy < 1.0  # status answers while the engine is busy
    assert (reply.in_flight, reply.queued, reply.max_queue) == (1, 1, 1)
    assert "1 in flight, 1 waiting" in slow_api.ctl("status").stdout
    code, headers, body = post(slow_api, "/v1/completions", {**LONG, "max_tokens": 2})
    assert code == 503 and headers["Retry-After"].isdigit()
    assert "queue is full" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:  # as the SDK sees it
        client(slow_api).completions.create(model="slow", prompt="hi", max_tokens=2)
    assert e.value.status_code == 503
    cli = slow_api.ctl("prompt", "hi", "--max-tokens", "2")  # gRPC: RESOURCE_EXHAUSTED
    assert cli.returncode == 1 and "queue is full" in cli.stderr
    for t in threads:
        t.join(120)
    assert sorted(code for code, _, _ in results) == [200, 200]


def test_a_reachable_listen_needs_a_key(make_daemon: MakeDaemon, short_dir: Path) -> None:
    d = make_daemon()
    r = run_hsmdifd(
        "--config", str(d.config), "--socket", str(d.socket), "--state-dir", str(d.state_dir),
        "--no-mdns", "--http", f"0.0.0.0:{free_port()}",
    )  # fmt: skip
    assert r.returncode == 1
    assert "without a key" in r.stderr and "hsmdifctl api-key --out" in r.stderr


def test_with_a_key_a_request_without_it_is_401(make_daemon: MakeDaemon, short_dir: Path) -> None:
    key_file = short_dir / "api.key"
    made = run_ctl("api-key", "--out", str(key_file))
    assert made.returncode == 0, made.stderr
    key = key_file.read_text().strip()
    d = make_daemon(extra=f'[api]\napi_key_file = "{key_file}"\n')
    d.http = f"0.0.0.0:{free_port()}"
    d.start()
    d.http = d.http.replace("0.0.0.0", "127.0.0.1")
    with pytest.raises(openai.AuthenticationError):
        client(d, "wrong").models.list()
    assert client(d, key).models.list().data[0].id == "tiny"
    h = conn(d)
    h.request("GET", "/health")  # open: a load balancer's probe carries no key
    assert h.getresponse().status == 200


def test_a_base_model_completes_the_prompt_and_says_so(
    make_daemon: MakeDaemon, short_dir: Path
) -> None:
    base = write_tiny_llama(short_dir / "base.gguf", chat_template=None)
    d = start_with_http(make_daemon(model=base))
    r = d.ctl("prompt", "once upon", "--max-tokens", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("not instruction-tuned") == 1
    raw = d.ctl("prompt", "--raw", "once upon", "--max-tokens", "4", "--temperature", "0")
    assert raw.stdout == r.stdout  # completed as written, not in chat turns
    chat = client(d).chat.completions.create(
        model="base",
        messages=HELLO,
        max_tokens=4,
    )
    assert chat.choices[0].message.content is not None
    assert d.log().count("not instruction-tuned") == 1


def test_naming_the_default_model_loads_it(api: Daemon, short_dir: Path) -> None:
    other = write_tiny_llama(short_dir / "other.gguf")
    assert api.ctl("load", str(other)).returncode == 0
    c = client(api)
    assert [m.id for m in c.models.list().data] == ["other", "tiny"]
    c.completions.create(model="other", prompt="once", max_tokens=2)
    assert "other.gguf" in api.ctl("status").stdout
    c.completions.create(model="tiny", prompt="once", max_tokens=2)
    assert "tiny.gguf" in api.ctl("status").stdout


def test_an_engine_that_dies_is_a_500_with_its_sentence(slow_api: Daemon) -> None:
    assert slow_api.proc is not None
    (engine,) = child_pids(slow_api.proc.pid)
    failed: list[BaseException] = []

    def ask() -> None:
        try:
            client(slow_api).completions.create(
                model="slow", prompt="once upon", max_tokens=1500, temperature=0
            )
        except openai.APIStatusError as e:
            failed.append(e)

    asker = threading.Thread(target=ask)
    asker.start()
    wait_for(lambda: in_flight(slow_api) == 1)
    time.sleep(0.2)  # the answer is under way
    os.kill(engine, signal.SIGKILL)
    asker.join(60)
    (error,) = failed
    assert isinstance(error, openai.InternalServerError) and error.status_code == 500
    assert "engine process died" in error.message and "SIGKILL" in error.message


def test_cors_preflight_and_origin(make_daemon: MakeDaemon) -> None:
    d = start_with_http(make_daemon(extra='[api]\ncors_origins = ["http://ui.lan"]\n'))
    c = conn(d)
    headers = {
        "Origin": "http://ui.lan",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    c.request("OPTIONS", "/v1/chat/completions", headers=headers)
    r = c.getresponse()
    r.read()
    assert r.status == 204 and r.getheader("Access-Control-Allow-Origin") == "http://ui.lan"
    assert "authorization" in (r.getheader("Access-Control-Allow-Headers") or "")
    c.request("GET", "/v1/models", headers={"Origin": "http://elsewhere"})
    r = c.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("Access-Control-Allow-Origin") is None
