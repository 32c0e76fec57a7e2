"""The cluster secret file, and the proofs over a real gRPC server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from hsmdifd.cluster import auth, cluster_secret, peer_auth

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
        seen.append(peer_auth.caller_id.get())
        return str(dict(context.invocation_metadata() or ()).get("x-echo", "")).encode() or request

    async def count(request: bytes, context: Context) -> AsyncIterator[bytes]:
        seen.append(peer_auth.caller_id.get())
        for i in range(3):
            yield b"%d" % i

    async def write(request: bytes, context: Context) -> None:
        seen.append(peer_auth.caller_id.get())
        await context.write(b"w")

    async def chat(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        seen.append(peer_auth.caller_id.get())
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
    interceptor: peer_auth.AuthServerInterceptor | None,
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


def to(receiver: str | None) -> Callable[[], str | None]:
    return lambda: receiver


def signed(
    caller: str, method: str, body: bytes, receiver: str = "server-1", **kw: Any
) -> tuple[auth.Metadata, str]:
    return auth.sign(SECRET, caller, receiver, method, auth.digest(body), **kw)


def test_same_secret_unary_call_names_both_ends() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = peer_auth.AuthServerInterceptor(SECRET, "server-1")
        async with (
            serve(server, echo_service(seen)) as target,
            channel(
                target, peer_auth.client_interceptors(SECRET, "client-1", to("server-1"))
            ) as ch,
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
        server = peer_auth.AuthServerInterceptor(SECRET, "server-1")
        async with serve(server, echo_service(seen)) as target, channel(target) as ch:
            metadata, nonce = signed("client-2", UNARY, b"x")
            call = unary(ch)(b"x", metadata=metadata)
            assert await call == b"x"
            reply = await call.initial_metadata()
            assert auth.verify_reply(SECRET, UNARY, nonce, reply) == "server-1"
            with pytest.raises(auth.AuthError):
                auth.verify_reply(OTHER, UNARY, nonce, reply)
            with pytest.raises(auth.AuthError):  # bound to the nonce: no replaying a reply
                auth.verify_reply(SECRET, UNARY, "0" * 32, reply)
            with pytest.raises(auth.AuthError, match="not server-2"):
                auth.verify_reply(SECRET, UNARY, nonce, reply, expected="server-2")
            # The trailing proof covers the reply's bytes.
            trailer = await call.trailing_metadata()
            body = auth.digest(b"x")
            assert auth.verify_reply(SECRET, UNARY, nonce, trailer, body) == "server-1"
            with pytest.raises(auth.AuthError):
                auth.verify_reply(SECRET, UNARY, nonce, trailer, auth.digest(b"forged"))
        assert seen == ["client-2"]

    run(main())


def test_each_handler_sees_its_own_caller() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = peer_auth.AuthServerInterceptor(SECRET, "server-1")
        async with (
            serve(server, echo_service(seen)) as target,
            channel(target, peer_auth.client_interceptors(SECRET, "node-a", to("server-1"))) as a,
            channel(target, peer_auth.client_interceptors(SECRET, "node-b", to("server-1"))) as b,
        ):
            calls = [unary(ch)(b"x") for _ in range(10) for ch in (a, b)]
            assert await asyncio.gather(*calls) == [b"x"] * 20
        assert sorted(s or "" for s in seen) == ["node-a"] * 10 + ["node-b"] * 10
        assert peer_auth.caller_id.get() is None

    run(main())


def test_streamed_requests_are_refused() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = peer_auth.AuthServerInterceptor(SECRET, "server-1")
        async with serve(server, echo_service(seen)) as target, channel(target) as ch:
            chat = ch.stream_stream(
                f"/{SERVICE}/Chat", request_serializer=identity, response_deserializer=identity
            )
            metadata, _ = signed("client-4", f"/{SERVICE}/Chat", b"")
            refused = await refusal(chat(iter([b"a", b"b"]), metadata=metadata).read())
            # UNIMPLEMENTED, or INTERNAL when the client was still sending as it ended.
            assert refused[0] in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)
        assert seen == []

    run(main())


def test_wrong_secret_missing_or_malformed_proof_is_refused() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = peer_auth.AuthServerInterceptor(SECRET, "server-1")
        wrong = "wrong cluster secret, or a request altered on the way"
        async with serve(server, echo_service(seen)) as target:
            intruder = peer_auth.client_interceptors(OTHER, "intruder", to("server-1"))
            async with channel(target, intruder) as ch:
                assert await refusal(unary(ch)(b"x")) == (grpc.StatusCode.UNAUTHENTICATED, wrong)
                code, details = await refusal(streaming(ch)(b"x").read())
                assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, wrong)
            async with channel(target) as ch:
                missing = await refusal(unary(ch)(b"x"))
                assert missing == (grpc.StatusCode.UNAUTHENTICATED, "missing proof")
                bad = ((auth.AUTH_KEY, "v1.client.12.zz.00"),)
                malformed = await refusal(unary(ch)(b"x", metadata=bad))
                assert malformed == (grpc.StatusCode.UNAUTHENTICATED, "malformed proof")
                # A proof covers one method: it cannot be moved to another.
                metadata, _ = signed("client", STREAM, b"x")
                moved = await refusal(unary(ch)(b"x", metadata=metadata))
                assert moved == (grpc.StatusCode.UNAUTHENTICATED, wrong)
                # ... nor to another body.
                metadata, _ = signed("client", UNARY, b"policy version 1")
                altered = await refusal(unary(ch)(b"policy version 1000", metadata=metadata))
                assert altered == (grpc.StatusCode.UNAUTHENTICATED, wrong)
                # ... nor to another receiver.
                metadata, _ = signed("client", UNARY, b"x", receiver="server-2")
                elsewhere = await refusal(unary(ch)(b"x", metadata=metadata))
                assert elsewhere == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "a proof for server-2, not for this device",
                )
        assert seen == []

    run(main())


def test_replayed_request_is_refused() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = peer_auth.AuthServerInterceptor(SECRET, "server-1")
        async with serve(server, echo_service(seen)) as target, channel(target) as ch:
            metadata, _ = signed("client", UNARY, b"once")
            assert await unary(ch)(b"once", metadata=metadata) == b"once"
            replay = await refusal(unary(ch)(b"once", metadata=metadata))
            assert replay == (grpc.StatusCode.UNAUTHENTICATED, "replayed request")
            metadata, _ = signed("client", STREAM, b"")
            assert [m async for m in streaming(ch)(b"", metadata=metadata)] == [b"0", b"1", b"2"]
            replay = await refusal(streaming(ch)(b"", metadata=metadata).read())
            assert replay == (grpc.StatusCode.UNAUTHENTICATED, "replayed request")
        assert seen == ["client", "client"]

    run(main())


def test_no_proof_leaves_before_the_receiver_proved_itself() -> None:
    """A collector without the secret, posing as a peer, is sent nothing it could replay."""

    async def main() -> None:
        received: list[dict[str, Any]] = []

        async def collect(request: bytes, context: Context) -> bytes:
            received.append(dict(context.invocation_metadata() or ()))
            return b""

        codec: dict[str, Any] = {"request_deserializer": identity, "response_serializer": identity}
        collector = {"Echo": grpc.unary_unary_rpc_method_handler(collect, **codec)}
        async with (
            serve(None, collector) as target,
            channel(target, peer_auth.client_interceptors(SECRET, "client", to(None))) as ch,
        ):
            with pytest.raises(auth.AuthError, match="not yet proved"):
                await unary(ch)(b"status")
        assert received == []

    run(main())


def test_hello_proves_the_secret_for_one_challenge_and_caller() -> None:
    challenge = "ab" * 16
    proof = auth.hello_proof(SECRET, challenge, "caller", "server-1")
    auth.check_hello(SECRET, challenge, "caller", "server-1", proof)
    for args in (
        (OTHER, challenge, "caller", "server-1"),  # another secret
        (SECRET, "cd" * 16, "caller", "server-1"),  # another challenge: no replaying
        (SECRET, challenge, "other", "server-1"),  # made for another caller
        (SECRET, challenge, "caller", "server-2"),  # claims another id
    ):
        with pytest.raises(auth.AuthError):
            auth.check_hello(*args, proof)
    with pytest.raises(auth.AuthError):
        auth.check_hello(SECRET, challenge, "caller", "not an id!", proof)


def test_streaming_calls_are_signed_and_checked() -> None:
    async def main() -> None:
        seen: list[str | None] = []
        server = peer_auth.AuthServerInterceptor(SECRET, "server-1")
        async with (
            serve(server, echo_service(seen)) as target,
            channel(
                target, peer_auth.client_interceptors(SECRET, "client-3", to("server-1"))
            ) as ch,
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
        nonce = str(proof).split(".")[4]
        if secret is not None:
            await context.send_initial_metadata(auth.sign_reply(secret, method, nonce, "server-1"))

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
            channel(target, peer_auth.client_interceptors(SECRET, "client", to("server-1"))) as ch,
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
        cluster_secret.write_secret_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 2 * cluster_secret.SECRET_BYTES
    secret = cluster_secret.load_secret(path)
    assert len(secret) == cluster_secret.SECRET_BYTES
    with pytest.raises(cluster_secret.SecretError, match="already exists"):
        cluster_secret.write_secret_file(path)
    assert cluster_secret.load_secret(path) == secret
    assert os.listdir(path.parent) == ["cluster.secret"]
    assert cluster_secret.generate_secret() != cluster_secret.generate_secret()


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
    with pytest.raises(cluster_secret.SecretError) as info:
        cluster_secret.load_secret(path)
    assert message.format(path=path) in str(info.value)


def test_load_secret_accepts_a_minimal_secret(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    path.write_text("0f" * 16)
    path.chmod(0o600)
    assert cluster_secret.load_secret(path) == b"\x0f" * 16
