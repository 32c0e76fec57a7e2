"""The cluster secret file, and the proofs over a real gRPC server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from hsmdifd import auth

SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))
SERVICE = "test.Echo"
UNARY = f"/{SERVICE}/Echo"
STREAM = f"/{SERVICE}/Count"
WRITES = f"/{SERVICE}/Write"

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def identity(data: bytes) -> bytes:
    return data


def echo_service(seen: list[str | None]) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Echo, Count (async generator), Write (context.write), Chat (stream-stream).

    Each notes its caller, after a pause so that concurrent calls interleave.
    """

    async def echo(request: bytes, context: Context) -> bytes:
        await asyncio.sleep(0)
        seen.append(auth.caller_id.get())
        return str(dict(context.invocation_metadata() or ()).get("x-echo", "")).encode() or request

    async def count(request: bytes, context: Context) -> AsyncIterator[bytes]:
        seen.append(auth.caller_id.get())
        for i in range(3):
            yield b"%d" % i

    async def write(request: bytes, context: Context) -> None:
        seen.append(auth.caller_id.get())
        await context.write(b"w")

    async def chat(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        seen.append(auth.caller_id.get())
        async for request in requests:
            yield request.upper()

    codec: dict[str, Any] = {"request_deserializer": identity, "response_serializer": identity}
    return {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, **codec),
        "Count": grpc.unary_stream_rpc_method_handler(count, **codec),
        "Write": grpc.unary_stream_rpc_method_handler(write, **codec),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, **codec),
    }


@contextlib.asynccontextmanager
async def serve(
    interceptor: auth.AuthServerInterceptor | None,
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
) -> AsyncIterator[str]:
    """A real server on 127.0.0.1 and an ephemeral port; yields its address."""
    server = grpc.aio.server(interceptors=[interceptor] if interceptor else None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def channel(target: str, client: list[Any] | None = None) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, interceptors=client)


def unary(ch: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return ch.unary_unary(UNARY, request_serializer=identity, response_deserializer=identity)


def streaming(ch: grpc.aio.Channel, method: str = STREAM) -> Any:
    return ch.unary_stream(method, request_serializer=identity, response_deserializer=identity)


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


def test_same_secret_unary_call_names_both_ends() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1")
        async with (
            serve(server, echo_service(seen)) as target,
            channel(target, auth.client_interceptors(SECRET, "client-1")) as ch,
        ):
            call = unary(ch)(b"hello")
            assert await call == b"hello"
            assert auth.reply_node_id(await call.initial_metadata()) == "server-1"
            # The caller's own metadata and timeout pass through the interceptor.
            assert await unary(ch)(b"", metadata=(("x-echo", "kept"),), timeout=10) == b"kept"
        assert seen == ["client-1", "client-1"]

    run(main())


def test_sign_and_verify_reply_without_client_interceptor() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1")
        async with serve(server, echo_service(seen)) as target, channel(target) as ch:
            metadata, nonce = auth.sign(SECRET, "client-2", UNARY)
            call = unary(ch)(b"x", metadata=metadata)
            assert await call == b"x"
            reply = await call.initial_metadata()
            assert auth.verify_reply(SECRET, UNARY, nonce, reply) == "server-1"
            with pytest.raises(auth.AuthError):
                auth.verify_reply(OTHER, UNARY, nonce, reply)
            with pytest.raises(auth.AuthError):  # bound to the nonce: no replaying a reply
                auth.verify_reply(SECRET, UNARY, "0" * 32, reply)
        assert seen == ["client-2"]

    run(main())


def test_each_handler_sees_its_own_caller() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1")
        async with (
            serve(server, echo_service(seen)) as target,
            channel(target, auth.client_interceptors(SECRET, "node-a")) as a,
            channel(target, auth.client_interceptors(SECRET, "node-b")) as b,
        ):
            calls = [unary(ch)(b"x") for _ in range(10) for ch in (a, b)]
            assert await asyncio.gather(*calls) == [b"x"] * 20
        assert sorted(s or "" for s in seen) == ["node-a"] * 10 + ["node-b"] * 10
        assert auth.caller_id.get() is None

    run(main())


def test_stream_stream_handlers_are_checked_too() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1")
        async with serve(server, echo_service(seen)) as target, channel(target) as ch:
            chat = ch.stream_stream(
                f"/{SERVICE}/Chat", request_serializer=identity, response_deserializer=identity
            )
            metadata, nonce = auth.sign(SECRET, "client-4", f"/{SERVICE}/Chat")
            call = chat(iter([b"a", b"b"]), metadata=metadata)
            assert [m async for m in call] == [b"A", b"B"]
            reply = await call.initial_metadata()
            assert auth.verify_reply(SECRET, f"/{SERVICE}/Chat", nonce, reply) == "server-1"
            refused = await refusal(chat(iter([b"a"])).read())
            assert refused == (grpc.StatusCode.UNAUTHENTICATED, "missing proof")
        assert seen == ["client-4"]

    run(main())


def test_wrong_secret_missing_or_malformed_proof_is_refused() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1")
        async with serve(server, echo_service(seen)) as target:
            async with channel(target, auth.client_interceptors(OTHER, "intruder")) as ch:
                assert await refusal(unary(ch)(b"x")) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "wrong cluster secret",
                )
                code, details = await refusal(streaming(ch)(b"x").read())
                assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "wrong cluster secret")
            async with channel(target) as ch:
                missing = await refusal(unary(ch)(b"x"))
                assert missing == (grpc.StatusCode.UNAUTHENTICATED, "missing proof")
                bad = ((auth.AUTH_KEY, "v1.client.12.zz.00"),)
                malformed = await refusal(unary(ch)(b"x", metadata=bad))
                assert malformed == (grpc.StatusCode.UNAUTHENTICATED, "malformed proof")
                # A proof covers one method: it cannot be moved to another.
                metadata, _ = auth.sign(SECRET, "client", STREAM)
                moved = await refusal(unary(ch)(b"x", metadata=metadata))
                assert moved == (grpc.StatusCode.UNAUTHENTICATED, "wrong cluster secret")
        assert seen == []

    run(main())


def test_replayed_request_is_refused() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1")
        async with serve(server, echo_service(seen)) as target, channel(target) as ch:
            metadata, _ = auth.sign(SECRET, "client", UNARY)
            assert await unary(ch)(b"once", metadata=metadata) == b"once"
            replay = await refusal(unary(ch)(b"twice", metadata=metadata))
            assert replay == (grpc.StatusCode.UNAUTHENTICATED, "replayed request")
            metadata, _ = auth.sign(SECRET, "client", STREAM)
            assert [m async for m in streaming(ch)(b"", metadata=metadata)] == [b"0", b"1", b"2"]
            replay = await refusal(streaming(ch)(b"", metadata=metadata).read())
            assert replay == (grpc.StatusCode.UNAUTHENTICATED, "replayed request")
        assert seen == ["client", "client"]

    run(main())


def shifted(offset: float) -> Callable[[], float]:
    return lambda: time.time() + offset


def test_clock_skew_beyond_the_window_is_refused() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1", skew=30.0)
        async with serve(server, echo_service(seen)) as target:
            for offset, ok in ((-20.0, True), (45.0, False), (-45.0, False)):
                client = auth.client_interceptors(SECRET, "client", now=shifted(offset))
                async with channel(target, client) as ch:
                    if ok:
                        assert await unary(ch)(b"x") == b"x"
                    else:
                        assert await refusal(unary(ch)(b"x")) == (
                            grpc.StatusCode.UNAUTHENTICATED,
                            "clock skew of 45 s: check the clocks",
                        )
        assert seen == ["client"]

    run(main())


def test_nonces_expire_after_the_window_and_the_cache_is_bounded() -> None:
    clock = [1000.0]
    verifier = auth.RequestVerifier(SECRET, skew=30.0, now=lambda: clock[0], limit=1)
    first, _ = auth.sign(SECRET, "client", UNARY, now=lambda: clock[0])
    assert verifier.verify(UNARY, first)[0] == "client"
    second, _ = auth.sign(SECRET, "client", UNARY, now=lambda: clock[0])
    with pytest.raises(auth.AuthError) as info:
        verifier.verify(UNARY, second)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    clock[0] += 31  # the first nonce has expired and made room
    third, _ = auth.sign(SECRET, "client", UNARY, now=lambda: clock[0])
    assert verifier.verify(UNARY, third)[0] == "client"
    with pytest.raises(auth.AuthError, match="clock skew of 31 s"):
        verifier.verify(UNARY, first)


def test_streaming_calls_are_signed_and_checked() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = auth.AuthServerInterceptor(SECRET, "server-1")
        async with (
            serve(server, echo_service(seen)) as target,
            channel(target, auth.client_interceptors(SECRET, "client-3")) as ch,
        ):
            call = streaming(ch)(b"")
            assert [m async for m in call] == [b"0", b"1", b"2"]
            assert auth.reply_node_id(await call.initial_metadata()) == "server-1"
            assert [m async for m in streaming(ch, WRITES)(b"")] == [b"w"]
        assert seen == ["client-3", "client-3"]

    run(main())


def impostor(secret: bytes | None) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A peer without our secret: it skips the check and answers with its own proof, if any."""

    async def reply(method: str, context: Context) -> None:
        proof = dict(context.invocation_metadata() or ())[auth.AUTH_KEY]
        nonce = str(proof).split(".")[3]
        if secret is not None:
            await context.send_initial_metadata(auth.sign_reply(secret, method, nonce, "fake"))

    async def status(request: bytes, context: Context) -> bytes:
        await reply(UNARY, context)
        return b"false status"

    async def count(request: bytes, context: Context) -> AsyncIterator[bytes]:
        await reply(STREAM, context)
        yield b"false token"

    codec: dict[str, Any] = {"request_deserializer": identity, "response_serializer": identity}
    return {
        "Echo": grpc.unary_unary_rpc_method_handler(status, **codec),
        "Count": grpc.unary_stream_rpc_method_handler(count, **codec),
    }


@pytest.mark.parametrize("secret", [OTHER, None], ids=["other-secret", "no-proof"])
def test_client_refuses_a_peer_without_the_secret(secret: bytes | None) -> None:
    async def main() -> None:
        async with (
            serve(None, impostor(secret)) as target,
            channel(target, auth.client_interceptors(SECRET, "client")) as ch,
        ):
            with pytest.raises(auth.AuthError, match="peer"):
                await unary(ch)(b"status?")
            with pytest.raises(auth.AuthError):
                async for _ in streaming(ch)(b""):
                    pass

    run(main())


def test_secret_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cluster.secret"
    old = os.umask(0)
    try:
        auth.write_secret_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 2 * auth.SECRET_BYTES
    secret = auth.load_secret(path)
    assert len(secret) == auth.SECRET_BYTES
    with pytest.raises(auth.SecretError, match="already exists"):
        auth.write_secret_file(path)
    assert auth.load_secret(path) == secret
    assert os.listdir(path.parent) == ["cluster.secret"]
    assert auth.generate_secret() != auth.generate_secret()


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "no cluster secret at"),
        ("ab" * 32, 0o644, "chmod 600 {path}"),
        ("ab" * 32, 0o640, "chmod 600 {path}"),
        ("not hex at all", 0o600, "does not hold a hex-encoded secret"),
        ("ab" * 15, 0o600, "has 15 bytes, fewer than 16"),
        ("", 0o600, "has 0 bytes"),
    ],
    ids=["missing", "world-readable", "group-readable", "not-hex", "short", "empty"],
)
def test_load_secret_explains_what_is_wrong(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    path = tmp_path / "cluster.secret"
    if content is not None:
        path.write_text(content + "\n")
        path.chmod(mode)
    with pytest.raises(auth.SecretError) as info:
        auth.load_secret(path)
    assert message.format(path=path) in str(info.value)


def test_load_secret_accepts_a_minimal_secret(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    path.write_text("0f" * 16)
    path.chmod(0o600)
    assert auth.load_secret(path) == b"\x0f" * 16
