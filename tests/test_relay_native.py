"""The relays' native copy loop and TLS, through a real RootRelay and WorkerRelay pair on
127.0.0.1 in front of a plain TCP server: every byte arrives once and in order, in
both directions at once, a half-closed side still gets its answer, a closed relay
wakes its loop, and the native calls refuse what is not theirs with a sentence."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from array import array
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmdifd.cluster import tls
from hsmdifd.engine import relay
from hsmdifd.engine.relay import _native, secure

HOST = "127.0.0.1"
SECRET = bytes(range(32))
ROOT, WORKER = "root-node", "worker-node"
T = TypeVar("T")


def _recv_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    return bytes(data)


class Server:
    """A TCP server on loopback; `handle(conn)` runs in a thread per connection."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self._sock = socket.create_server((HOST, 0))
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._sock.accept()
                threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._handle(conn)

    def close(self) -> None:
        self._sock.close()


def echo(conn: socket.socket) -> None:
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)


def answer_after_eof(conn: socket.socket) -> None:
    """Read the whole request (until the client's FIN), then answer with its length."""
    request = _recv_all(conn)
    conn.sendall(b"got %d" % len(request))


@dataclass
class Pair:
    """A root relay and a worker relay for one lease, run on a loop of their own."""

    loop: asyncio.AbstractEventLoop
    worker: relay.WorkerRelay
    roots: relay.RootRelays

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def local(self) -> tuple[str, int]:
        host, port = self.roots.local_endpoints[0].split(":")
        return host, int(port)

    def connect(self) -> socket.socket:
        """A connection to the root relay, waiting for the previous to be gone."""
        return socket.create_connection(self.local, timeout=30)


@contextlib.contextmanager
def relay_pair(
    creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials],
    target: int,
    data_plane: str = "tls",
) -> Iterator[Pair]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    root_creds, worker_creds = creds if data_plane == "tls" else (None, None)
    token = secrets.token_bytes(relay.TOKEN_BYTES)

    async def open_pair() -> Pair:
        worker = relay.WorkerRelay(worker_creds, ROOT, token, HOST, target, data_plane=data_plane)
        await worker.start()
        roots = await relay.open_root_relays(
            root_creds, [(worker.endpoint, token, WORKER)], data_plane
        )
        return Pair(loop, worker, roots)

    pair = asyncio.run_coroutine_threadsafe(open_pair(), loop).result(30)
    try:
        yield pair
    finally:
        pair.call(pair.roots.close())
        pair.call(pair.worker.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def creds(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[tls.DeviceCredentials, tls.DeviceCredentials]:
    state = tmp_path_factory.mktemp("state")
    return (
        tls.device_credentials(SECRET, ROOT, state / "root"),
        tls.device_credentials(SECRET, WORKER, state / "worker"),
    )


@pytest.fixture(scope="module")
def echo_pair(creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials]) -> Iterator[Pair]:
    server = Server(echo)
    with relay_pair(creds, server.port) as pair:
        yield pair
    server.close()


def _roundtrip(pair: Pair, chunks: list[bytes]) -> bytes:
    """Send `chunks` one write each, shut the write half, read the echo to the end."""
    received = bytearray()
    with pair.connect() as sock:
        reader = threading.Thread(target=lambda: received.extend(_recv_all(sock)))
        reader.start()
        for chunk in chunks:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reader.join(60)
        assert not reader.is_alive(), "the echo never ended"
    return bytes(received)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=64),
            st.integers(1, 600_000).map(secrets.token_bytes),
        ),
        max_size=8,
    )
)
def test_every_byte_arrives_once_in_order(echo_pair: Pair, chunks: list[bytes]) -> None:
    """Writes of 1 byte to 600 KB (over two of the loop's buffers), through TLS both ways."""
    assert _roundtrip(echo_pair, chunks) == b"".join(chunks)


def test_both_directions_at_full_speed_at_once(
    creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials],
) -> None:
    """The server sends 24 MB while it reads 24 MB: neither direction waits on the other."""
    size = 24 * 1024 * 1024
    payload = secrets.token_bytes(size)
    got_by_server = bytearray()

    def blast(conn: socket.socket) -> None:
        reader = threading.Thread(target=lambda: got_by_server.extend(_recv_all(conn)))
        reader.start()
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        reader.join(60)

    server = Server(blast)
    try:
        with relay_pair(creds, server.port) as pair, pair.connect() as sock:
            got_by_client = bytearray()
            reader = threading.Thread(target=lambda: got_by_client.extend(_recv_all(sock)))
            reader.start()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reader.join(120)
            assert bytes(got_by_client) == payload
            deadline = time.monotonic() + 10
            while len(got_by_server) < size and time.monotonic() < deadline:
                time.sleep(0.05)
            assert bytes(got_by_server) == payload
            for traffic in (pair.worker.traffic, pair.roots.traffic[0]):
                assert traffic.bytes_out == size  # llama.cpp's side to the worker's
                assert traffic.bytes_in == size
                assert traffic.reads_out >= size // relay.BUFFER_BYTES
    finally:
        server.close()


@pytest.mark.parametrize("data_plane", ["tls", "plain"])
def test_a_half_closed_request_still_gets_its_answer(
    creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials], data_plane: str
) -> None:
    """The request's end (a FIN, passed on as close_notify and FIN) does not cut the answer."""
    server = Server(answer_after_eof)
    try:
        with relay_pair(creds, server.port, data_plane) as pair, pair.connect() as sock:
            sock.sendall(b"x" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            assert _recv_all(sock) == b"got 100000"
    finally:
        server.close()


def test_closing_the_relays_cuts_an_idle_connection_at_once(
    creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials],
) -> None:
    server = Server(echo)
    try:
        with relay_pair(creds, server.port) as pair:
            sock = pair.connect()
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            started = time.monotonic()
            pair.call(pair.roots.close())
            pair.call(pair.worker.close())
            sock.settimeout(5)
            with contextlib.suppress(ConnectionError):
                assert sock.recv(1) == b""
            assert time.monotonic() - started < 2.0
            sock.close()
    finally:
        server.close()


# ---------------------------------------------------------------- the native calls


def test_a_handshake_with_a_peer_that_speaks_no_tls_says_so(
    creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials],
) -> None:
    server = Server(lambda conn: conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" * 10))
    try:
        with (
            socket.create_connection((HOST, server.port)) as sock,
            pytest.raises(ConnectionError, match="TLS handshake"),
        ):
            secure.Session.connect(secure.client_context(creds[0]), sock, 5)
    finally:
        server.close()


def test_a_silent_peer_times_the_handshake_out(
    creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials],
) -> None:
    server = Server(lambda conn: time.sleep(3))
    try:
        with socket.create_connection((HOST, server.port)) as sock:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="timed out"):
                secure.Session.connect(secure.client_context(creds[0]), sock, 0.3)
            assert 0.25 < time.monotonic() - started < 2.0
    finally:
        server.close()


def test_credentials_that_are_not_pem_are_refused_with_a_sentence(
    creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials],
) -> None:
    root = creds[0]
    with pytest.raises(ValueError, match="CA certificate cannot be read"):
        _native.context(False, root.cert_pem, root.key_pem, b"not a certificate")
    with pytest.raises(ValueError, match="device's certificate cannot be read"):
        _native.context(False, b"garbage", root.key_pem, root.ca_pem)
    with pytest.raises(ValueError, match="device's key cannot be read"):
        _native.context(False, root.cert_pem, creds[1].key_pem, root.ca_pem)  # not its key


def test_splice_refuses_what_is_not_its_own() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError, match="32 aligned bytes"):
            _native.splice(a.fileno(), None, b.fileno(), None, 1.0, array("Q", [0]))
        with pytest.raises(ValueError):
            _native.splice(a.fileno(), object(), b.fileno(), None, 1.0, array("Q", [0] * 4))
        with pytest.raises(OSError):
            _native.splice(-1, None, b.fileno(), None, 1.0, array("Q", [0] * 4))


def _splice_in_thread(
    a: socket.socket, b: socket.socket, linger: float
) -> tuple[threading.Thread, array[int], list[str | None]]:
    counters = array("Q", [0] * 4)
    result: list[str | None] = []
    thread = threading.Thread(
        target=lambda: result.append(
            _native.splice(a.fileno(), None, b.fileno(), None, linger, counters)
        )
    )
    thread.start()
    return thread, counters, result


def test_a_splice_passes_each_end_on_and_counts() -> None:
    """The loop itself, plain on both sides: a FIN each way ends it cleanly."""
    left, a = socket.socketpair()
    b, right = socket.socketpair()
    thread, counters, result = _splice_in_thread(a, b, 5.0)
    left.sendall(b"hello")
    left.shutdown(socket.SHUT_WR)
    assert _recv_all(right) == b"hello"  # the FIN passed on, the other way still open
    right.sendall(b"back")
    right.shutdown(socket.SHUT_WR)
    assert _recv_all(left) == b"back"
    thread.join(5)
    assert result == [None]
    assert list(counters) == [1, 5, 1, 4]
    for sock in (left, a, b, right):
        sock.close()


def test_a_splice_waits_for_the_other_direction_for_its_linger_only() -> None:
    left, a = socket.socketpair()
    b, right = socket.socketpair()
    thread, _, result = _splice_in_thread(a, b, 0.5)
    started = time.monotonic()
    left.shutdown(socket.SHUT_WR)
    thread.join(5)
    assert 0.4 < time.monotonic() - started < 3.0
    assert result == ["the other direction did not end in time"]
    for sock in (left, a, b, right):
        sock.close()


# ---------------------------------------------------------------- what an outsider sends

MARKER = b"ECHO-ME-IF-YOU-CAN"


def _send_and_collect(port: int, data: bytes) -> bytes:
    """Send `data` to the worker relay and read until it closes (or 5 s)."""
    got = bytearray()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(1 << 16):
                got += chunk
    return bytes(got)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(
        st.binary(max_size=4096),
        # a TLS handshake record header with any body: what the C side is handed first
        st.builds(
            lambda version, body: b"\x16\x03" + version + len(body).to_bytes(2, "big") + body,
            st.sampled_from([b"\x01", b"\x03", b"\x04"]),
            st.binary(max_size=2048),
        ),
    )
)
def test_garbage_to_the_worker_relay_reaches_nothing(echo_pair: Pair, data: bytes) -> None:
    """Random bytes and malformed TLS records: refused, nothing relayed, the relay serves on."""
    reply = _send_and_collect(echo_pair.worker.port, data + MARKER)
    assert MARKER not in reply
    assert not reply or reply[0] in (0x15, 0x16)  # a TLS alert (or a ServerHello), no data


def test_the_lease_holder_is_served_after_a_barrage(
    echo_pair: Pair, creds: tuple[tls.DeviceCredentials, tls.DeviceCredentials]
) -> None:
    """Truncated handshakes, the holder's certificate with wrong tokens, then the real root."""
    context = tls.client_context(creds[0])
    for length in (14, 31, 33, 200):  # the first 32 bytes are a wrong token
        with socket.create_connection((HOST, echo_pair.worker.port), timeout=10) as raw:
            secure_sock = context.wrap_socket(raw, server_hostname=tls.TARGET_NAME)
            with contextlib.suppress(OSError):
                secure_sock.sendall(secrets.token_bytes(length) + MARKER)
                assert MARKER not in secure_sock.recv(1 << 16)
            secure_sock.close()
    assert _send_and_collect(echo_pair.worker.port, b"") == b""
    for cut in (5, 50, 300):
        with socket.create_connection((HOST, echo_pair.worker.port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00" + bytes(cut))
            raw.close()
    assert _roundtrip(echo_pair, [b"still", b" served"]) == b"still served"
