"""Per-device TLS credentials: files, the derived cluster CA, and real gRPC over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmdifd.cluster import certificates, tls

SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))
SERVICE = "test.Echo"
METHOD = f"/{SERVICE}/Echo"

Context = grpc.aio.ServicerContext[Any, Any]


def identity(data: bytes) -> bytes:
    return data


@contextlib.asynccontextmanager
async def serve(creds: tls.DeviceCredentials, seen: list[str | None]) -> AsyncIterator[str]:
    """A mutual-TLS echo server on 127.0.0.1; notes the node id each call came from."""

    async def echo(request: bytes, context: Context) -> bytes:
        seen.append(tls.peer_node_id_from_auth_context(context.auth_context()))
        return request

    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=identity, response_serializer=identity
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(creds))
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def call(channel: grpc.aio.Channel, payload: bytes = b"hello") -> bytes:
    unary = channel.unary_unary(METHOD, request_serializer=identity, response_deserializer=identity)
    reply: bytes = await unary(payload, timeout=10)
    return reply


def secure_channel(target: str, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, creds, options=tls.CHANNEL_OPTIONS)


@pytest.fixture
def server_creds(tmp_path: Path) -> tls.DeviceCredentials:
    return tls.device_credentials(SECRET, "server-node", tmp_path / "server")


def test_grpc_mutual_tls_names_the_client(
    tmp_path: Path, server_creds: tls.DeviceCredentials
) -> None:
    client = tls.device_credentials(SECRET, "client-node", tmp_path / "client")

    async def main() -> list[str | None]:
        seen: list[str | None] = []
        async with (
            serve(server_creds, seen) as target,
            secure_channel(target, tls.channel_credentials(client)) as channel,
        ):
            assert await call(channel) == b"hello"
        return seen

    assert asyncio.run(main()) == ["client-node"]


async def refused(target: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    async with secure_channel(target, creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(channel)
    return info.value.code()


def test_grpc_refuses_a_client_of_another_secret(
    tmp_path: Path, server_creds: tls.DeviceCredentials
) -> None:
    stranger = tls.device_credentials(OTHER, "stranger", tmp_path / "stranger")

    async def main() -> grpc.StatusCode:
        seen: list[str | None] = []
        async with serve(server_creds, seen) as target:
            # The stranger even trusts our CA: only its own certificate is foreign.
            creds = grpc.ssl_channel_credentials(
                server_creds.ca_pem, stranger.key_pem, stranger.cert_pem
            )
            code = await refused(target, creds)
        assert seen == []
        return code

    assert asyncio.run(main()) == grpc.StatusCode.UNAVAILABLE


def test_grpc_refuses_a_client_without_a_certificate(server_creds: tls.DeviceCredentials) -> None:
    async def main() -> grpc.StatusCode:
        seen: list[str | None] = []
        async with serve(server_creds, seen) as target:
            code = await refused(target, grpc.ssl_channel_credentials(server_creds.ca_pem))
        assert seen == []
        return code

    assert asyncio.run(main()) == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_of_another_secret(
    tmp_path: Path, server_creds: tls.DeviceCredentials
) -> None:
    stranger = tls.device_credentials(OTHER, "stranger", tmp_path / "stranger")
    client = tls.device_credentials(SECRET, "client-node", tmp_path / "client")

    async def main() -> grpc.StatusCode:
        async with serve(stranger, []) as target:
            return await refused(target, tls.channel_credentials(client))

    assert asyncio.run(main()) == grpc.StatusCode.UNAVAILABLE


def test_grpc_plaintext_client_gets_nothing(server_creds: tls.DeviceCredentials) -> None:
    async def main() -> grpc.StatusCode:
        seen: list[str | None] = []
        async with serve(server_creds, seen) as target, grpc.aio.insecure_channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch)
        assert seen == []
        return info.value.code()

    assert asyncio.run(main()) == grpc.StatusCode.UNAVAILABLE


def test_ssl_contexts_speak_tls13_and_name_the_peer(
    tmp_path: Path, server_creds: tls.DeviceCredentials
) -> None:
    client = tls.device_credentials(SECRET, "client-node", tmp_path / "client")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        raw = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        with contextlib.ExitStack() as stack:
            stack.enter_context(raw)
            stack.enter_context(accepted)
            server_side: list[ssl.SSLSocket] = []

            def handshake() -> None:
                server_side.append(
                    tls.server_context(server_creds).wrap_socket(accepted, server_side=True)
                )

            async def both() -> ssl.SSLSocket:
                task = asyncio.create_task(asyncio.to_thread(handshake))
                secure = await asyncio.to_thread(
                    tls.client_context(client).wrap_socket, raw, server_hostname=tls.TARGET_NAME
                )
                await task
                return secure

            secure = asyncio.run(both())
            stack.enter_context(secure)
            stack.enter_context(server_side[0])
            assert secure.version() == "TLSv1.3"
            assert tls.cert_node_id(secure) == "server-node"
            assert tls.cert_node_id(server_side[0]) == "client-node"
            secure.sendall(b"ping")
            assert server_side[0].recv(4) == b"ping"


def test_ssl_server_refuses_a_client_without_a_certificate(
    server_creds: tls.DeviceCredentials,
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=server_creds.ca_pem.decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with raw, accepted:

            def serve_side() -> None:
                with pytest.raises(ssl.SSLError):
                    tls.server_context(server_creds).wrap_socket(accepted, server_side=True)

            async def both() -> None:
                task = asyncio.create_task(asyncio.to_thread(serve_side))
                with contextlib.suppress(ssl.SSLError, OSError):
                    secure = await asyncio.to_thread(
                        context.wrap_socket, raw, server_hostname=tls.TARGET_NAME
                    )
                    secure.recv(1)  # TLS 1.3: the refusal arrives after the client's Finished
                await task

            asyncio.run(both())


def test_key_is_private_and_kept(tmp_path: Path) -> None:
    first = tls.device_credentials(SECRET, "node-a", tmp_path)
    key_file = tmp_path / "tls" / "device.key"

    again = tls.device_credentials(SECRET, "node-a", tmp_path)

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    assert again == first  # same key, and the certificate was not issued again
    assert first.key_pem == key_file.read_bytes()
    assert len(first.fingerprint()) == 64


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    tls.device_credentials(SECRET, "node-a", tmp_path)
    (tmp_path / "tls" / "device.key").chmod(0o644)

    with pytest.raises(tls.TlsError, match="readable by others: chmod 600"):
        tls.device_credentials(SECRET, "node-a", tmp_path)


def test_certificate_names_the_node(tmp_path: Path) -> None:
    creds = tls.device_credentials(SECRET, "node-a", tmp_path)
    cert = x509.load_pem_x509_certificate(creds.cert_pem)

    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [tls.TARGET_NAME]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["hsmdif:node:node-a"]
    assert tls.cert_node_id(cert.public_bytes(serialization.Encoding.DER)) == "node-a"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3650
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(creds.ca_pem))


def test_certificate_is_issued_again_when_the_secret_changes(tmp_path: Path) -> None:
    before = tls.device_credentials(SECRET, "node-a", tmp_path)

    after = tls.device_credentials(OTHER, "node-a", tmp_path)

    assert after.key_pem == before.key_pem  # the device keeps its key
    assert after.cert_pem != before.cert_pem
    assert after.ca_pem != before.ca_pem
    new_ca = x509.load_pem_x509_certificate(after.ca_pem)
    x509.load_pem_x509_certificate(after.cert_pem).verify_directly_issued_by(new_ca)
    assert tls.device_credentials(OTHER, "node-a", tmp_path) == after


def test_certificate_is_issued_again_for_another_node_id(tmp_path: Path) -> None:
    tls.device_credentials(SECRET, "node-a", tmp_path)

    renamed = tls.device_credentials(SECRET, "node-b", tmp_path)

    assert (
        tls.cert_node_id(
            x509.load_pem_x509_certificate(renamed.cert_pem).public_bytes(
                serialization.Encoding.DER
            )
        )
        == "node-b"
    )


def test_every_device_builds_the_same_ca(tmp_path: Path) -> None:
    a = tls.device_credentials(SECRET, "node-a", tmp_path / "a")
    b = tls.device_credentials(SECRET, "node-b", tmp_path / "b")
    ca_a = x509.load_pem_x509_certificate(a.ca_pem)
    ca_b = x509.load_pem_x509_certificate(b.ca_pem)

    assert ca_a.subject == ca_b.subject
    assert ca_a.public_key() == ca_b.public_key()
    # Each device's CA certificate verifies the other device's certificate.
    x509.load_pem_x509_certificate(b.cert_pem).verify_directly_issued_by(ca_a)
    x509.load_pem_x509_certificate(a.cert_pem).verify_directly_issued_by(ca_b)


def _scalar(secret: bytes) -> int:
    return certificates.ca_private_key(secret).private_numbers().private_value


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.binary(min_size=1, max_size=64))
def test_ca_key_is_a_function_of_the_secret(first: bytes, second: bytes) -> None:
    key = certificates.ca_private_key(first)

    assert isinstance(key.curve, ec.SECP256R1)
    assert _scalar(first) == _scalar(first)
    assert 1 <= _scalar(first) < 2**256
    if first != second:
        assert _scalar(first) != _scalar(second)


def test_peer_node_id_needs_tls() -> None:
    assert tls.peer_node_id_from_auth_context({}) is None
    assert tls.peer_node_id_from_auth_context({"transport_security_type": [b"insecure"]}) is None
    verified = {"transport_security_type": [b"ssl"], "x509_common_name": [b"node-a"]}
    assert tls.peer_node_id_from_auth_context(verified) == "node-a"
