"""The Control service refuses bad input with INVALID_ARGUMENT and a sentence, never a
traceback: table tests of each check, and a real gRPC server fed undecodable bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from hsmdif import limits
from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api.control_service import (
    ControlService,
    add_control_service,
    check_generate,
    check_load,
    check_plan,
    check_priority,
)
from hsmdifd.daemon.errors import RequestError

LONG = "x" * 20_000


def user(text: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=text)])


def refusal(check: Any, request: Message, *args: Any) -> str:
    with pytest.raises(RequestError) as info:
        check(request, *args)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = str(info.value)
    assert len(message) < 400, "user input is echoed shortened"
    return message


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.LoadRequest(model_path="/tmp/a\0b.gguf"), "'/tmp/a\\0b.gguf' holds a NUL byte"),
        (pb.LoadRequest(model_path="/" + LONG), "is 20,001 bytes long, more than a path can be"),
        (pb.LoadRequest(max_seq_len=2**32 - 1), "--max-seq-len must be between 16 and"),
        (pb.LoadRequest(max_seq_len=3), "(got 3)"),
        (pb.LoadRequest(threads=100_000), "--threads 100,000 is more than the engine can use"),
        (pb.LoadRequest(strategy=LONG), "unknown strategy 'xxxxxxxx"),
        (pb.LoadRequest(quantize="2bit"), "--quantize must be 4bit or 8bit (got '2bit')"),
    ],
)
def test_load_refusals(request_: pb.LoadRequest, says: str) -> None:
    assert says in refusal(check_load, request_)


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.PlanRequest(num_parameters=float("inf"), quantize="4bit"), "(got inf)"),
        (pb.PlanRequest(num_parameters=float("nan"), quantize="4bit"), "(got nan)"),
        (pb.PlanRequest(num_parameters=-1, quantize="4bit"), "(got -1)"),
        (pb.PlanRequest(num_parameters=1e9, quantize="3bit"), "--quantize must be 4bit or 8bit"),
        (pb.PlanRequest(model_path="a\0"), "holds a NUL byte"),
        (pb.PlanRequest(model_path="m.gguf", quantize="q4"), "--quantize must be 4bit or 8bit"),
        (pb.PlanRequest(num_parameters=1e9), "--quantize must be 4bit or 8bit (got '')"),
        (pb.PlanRequest(num_parameters=1e9, quantize="4bit", model_path="m"), "not both"),
    ],
)
def test_plan_refusals(request_: pb.PlanRequest, says: str) -> None:
    assert says in refusal(check_plan, request_)


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.GenerateRequest(max_tokens=2**31 - 1, raw=True, prompt="hi"), "--max-tokens must be"),
        (pb.GenerateRequest(max_tokens=-5, raw=True, prompt="hi"), "(got -5)"),
        (
            pb.GenerateRequest(temperature=float("nan"), raw=True, prompt="hi"),
            "--temperature must be a number between 0 and 5 (got nan)",
        ),
        (pb.GenerateRequest(temperature=float("inf"), raw=True, prompt="hi"), "(got inf)"),
        (user("a" * (limits.MAX_PROMPT_BYTES + 1)), "more than hsmdifd takes (1,048,576 bytes)"),
        (
            pb.GenerateRequest(messages=[pb.ChatMessage(role=LONG, content="hi")]),
            "unknown message role 'xxx",
        ),
        (user("   "), "the prompt is empty"),
    ],
)
def test_generate_refusals(request_: pb.GenerateRequest, says: str) -> None:
    assert says in refusal(check_generate, request_)


def test_the_prompt_bound_is_a_parameter() -> None:
    assert "more than hsmdifd takes (10 bytes)" in refusal(check_generate, user("a" * 11), 10)
    check_generate(user("a" * 10), 10)


def test_priority_refusals() -> None:
    many = pb.SetPriorityRequest(devices=["a"] * (limits.MAX_DEVICES + 1))
    assert "at most 1,024" in refusal(check_priority, many)
    assert "no NUL byte" in refusal(check_priority, pb.SetPriorityRequest(devices=["a\0"]))
    assert "at most 4,096 bytes" in refusal(check_priority, pb.SetPriorityRequest(devices=[LONG]))


class _Cluster:
    is_root = True


class _Router:
    """Fails every request the way a bug would."""

    async def plan(self, request: pb.PlanRequest) -> pb.PlanReply:
        raise ValueError("Value out of range: 4294967296")

    async def load(self, request: pb.LoadRequest) -> AsyncIterator[pb.LoadEvent]:
        for event in (pb.LoadEvent(),):
            if request.model_path:
                raise ValueError("boom")
            yield event


METHODS = ["Status", "Devices", "Load", "Unload", "Generate", "SetPriority", "Plan"]
STREAMS = {"Load", "Generate"}


async def _call_raw(port: int, method: str, payload: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        path = f"/hsmdif.v1.Control/{method}"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if method in STREAMS:
                async for _ in channel.unary_stream(path, None, None)(payload):
                    pass
            else:
                await channel.unary_unary(path, None, None)(payload)
    return info.value


def _closed_loop_report(record: logging.LogRecord) -> bool:
    """asyncio's report of gRPC's poller calling into the loop of an earlier test of the
    same process, closed since: gRPC's, not the service's."""
    error = record.exc_info[1] if record.exc_info else None
    return record.name == "asyncio" and "Event loop is closed" in str(error)


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    """What the test's code logged, formatted as caplog.text has it."""
    return "\n".join(caplog.handler.format(r) for r in caplog.records if not _closed_loop_report(r))


async def _serve(test: Any) -> Any:
    service = ControlService(_Cluster(), _Router(), lambda _: pb.DeviceProfile())  # type: ignore[arg-type]
    server = grpc.aio.server()
    add_control_service(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await test(port)
    finally:
        await server.stop(None)


def test_undecodable_requests_are_refused_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def test(port: int) -> list[grpc.aio.AioRpcError]:
        return [
            await _call_raw(port, method, b"\xff\xff\xff\xff")
            for method in METHODS
            for _ in range(5)
        ]

    errors = asyncio.run(_serve(test))

    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the request could not be decoded" in (error.details() or "")
    assert "Traceback" not in _log_text(caplog)
    assert "DecodeError" not in _log_text(caplog).replace("could not be decoded", "")
    # Five of each, logged once each.
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) == len(METHODS)


def test_an_unexpected_error_is_internal_with_a_sentence(caplog: pytest.LogCaptureFixture) -> None:
    async def test(port: int) -> list[grpc.aio.AioRpcError]:
        plan = pb.PlanRequest(model_path="/m.gguf").SerializeToString()
        load = pb.LoadRequest(model_path="/m.gguf").SerializeToString()
        return [await _call_raw(port, "Plan", plan) for _ in range(3)] + [
            await _call_raw(port, "Load", load)
        ]

    errors = asyncio.run(_serve(test))

    for error in errors:
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "hsmdifd failed on this request (ValueError: " in (error.details() or "")
    assert _log_text(caplog).count("Traceback") == 2  # once for Plan, once for Load


def test_repeated_bad_requests_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def test(port: int) -> list[grpc.aio.AioRpcError]:
        bad = pb.LoadRequest(threads=100_000).SerializeToString()
        return [await _call_raw(port, "Load", bad) for _ in range(20)]

    errors = asyncio.run(_serve(test))

    assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert len([r for r in caplog.records if "load refused" in r.getMessage()]) == 1
