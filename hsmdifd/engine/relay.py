"""The guarded data plane: llama.cpp RPC through a per-lease mutual-TLS relay.

llama.cpp's RPC server has no authentication and serves whoever connects first, so
the rpc-worker listens on 127.0.0.1 only and the daemon holding the lease relays to it:

    root: engine child --TCP--> RootRelay (127.0.0.1:eph) ==TLS 1.3==> WorkerRelay
          (worker's cluster address:eph) --TCP--> rpc-worker (127.0.0.1:eph)

A `WorkerRelay` accepts one connection at a time, and only from the root holding
the lease: a certificate of the cluster CA whose node id is the holder's, followed
by the lease's 32-byte token as the first bytes. Anything else is closed without a
byte of the RPC server's, and a connection arriving while one is spliced is closed
at once rather than left in a backlog (unless the root already closed the live one:
llama.cpp reconnects at once, and the newcomer is admitted, after the same checks,
when the old one's teardown is done). Bytes are copied by a thread per direction
(`recv_into`/`sendall`, 256 KiB buffers, the GIL released in the socket calls): no
Python work per RPC message.

How the root uses it (the integration in `Cluster.acquire_leases` / `Models`): each
`pb.Lease` reply carries `endpoint` (the worker relay) and `token`. After acquiring
the leases, call

    relays = await open_root_relays(creds, [(lease.endpoint, lease.token, worker_node_id),
                                            ...], data_plane)

and give the engine child `relays.local_endpoints` (same order) instead of the
workers' endpoints. Keep `relays` with the held leases and `await relays.close()`
when the leases are released or the engine child ends (before or after StopRpc,
either is fine), so that nothing local can reach the workers any more. The local
endpoints accept connections from loopback only, one at a time; a connection
llama.cpp makes right after closing the previous one waits for the previous to be
closed all the way to the worker (otherwise the worker would refuse it as a second
connection).

`data_plane="plain"` (for a link the person trusts) keeps the same relays without
TLS and without the token: the rpc-worker is still reachable only through the relay,
one connection at a time, but anyone on the LAN can be that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hsmdifd.cluster.tls import (
    TARGET_NAME,
    DeviceCredentials,
    TlsError,
    cert_node_id,
    client_context,
)
from hsmdifd.cluster.tls import server_context as tls_server_context
from hsmdifd.daemon import timing
from hsmdifd.daemon.logs import LogLimiter

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
"""Length of a lease's token, the first bytes a root sends to the worker relay."""
BUFFER_BYTES = 256 * 1024
"""Bytes each direction of a splice reads at once."""
DATA_PLANES = ("tls", "plain")
_MAX_PENDING = 16
"""Connections a worker relay authenticates at once; a newer one evicts the oldest."""
_ACCEPTS_PER_WAKE = 16
"""Seconds between two log lines about refused connections of one relay."""


@functools.cache
def _warn_plain() -> None:
    """Once per process."""
    log.warning(
        'data_plane = "plain": llama.cpp RPC traffic crosses the network unencrypted and '
        "any host that reaches a worker's relay port first is served"
    )


def _check_mode(data_plane: str, creds: DeviceCredentials | None) -> DeviceCredentials | None:
    if data_plane not in DATA_PLANES:
        raise ValueError(f"data_plane must be one of {', '.join(DATA_PLANES)}, not {data_plane!r}")
    if data_plane == "plain":
        _warn_plain()
        return None
    if creds is None:
        raise ValueError('data_plane = "tls" needs this device\'s TLS credentials')
    return creds


def _half_closable(context: ssl.SSLContext) -> ssl.SSLContext:
    """Let a TCP FIN end one direction of a relayed TLS connection only.

    A relay cannot send a TLS close_notify while another thread reads the same
    connection, so it ends its direction by shutting the TCP write half. OpenSSL
    takes that EOF for a fatal error and answers with an alert that kills the
    other direction too; with this option it reads it as a close_notify, and TLS
    1.3 lets the other direction go on. Truncation is harmless here: llama.cpp RPC
    messages carry their length, so a cut one is seen.
    """
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


class _Refusals:
    """Rate-limited log lines about refused connections."""

    def __init__(self, relay: str) -> None:
        self._relay = relay
        self._lines = LogLimiter(log)

    def note(self, peer: object, reason: str) -> None:
        self._lines.warning(
            "refused", "%s refused a connection from %s: %s", self._relay, peer, reason
        )


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Shut the TCP connection under `sock` (an `SSLSocket` too), waking blocked readers.

    `socket.socket.shutdown` itself, not `SSLSocket.shutdown`, which drops the TLS
    state that another thread may be reading through.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, how)


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer of a TCP connection has closed its side, without reading from it.

    Peeks at the TCP stream itself, under TLS too.
    """
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _is_loopback(peer: object) -> bool:
    try:
        return isinstance(peer, tuple) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed before the token")
        data += chunk
    return bytes(data)


class _Splice:
    """Two connected sockets copied into each other by a thread per direction.

    A direction ends when its source closes; the end is passed on (the other side's
    write half is shut) and the other direction runs until its own source closes,
    for at most `timing.RELAY_LINGER` seconds. When both have ended, `on_end` runs,
    then both sockets close and `done` is set. `abort()` ends both at once.
    """

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        name: str,
        on_end: Callable[[], None] = lambda: None,
    ) -> None:
        self._a, self._b = a, b
        self._name = name
        self._on_end = on_end
        self._running = 2
        self._lock = threading.Lock()
        self._linger: threading.Timer | None = None
        self.done = threading.Event()

    def start(self) -> None:
        for src, dst, arrow in ((self._a, self._b, "->"), (self._b, self._a, "<-")):
            threading.Thread(
                target=self._pump, args=(src, dst), name=f"{self._name} {arrow}", daemon=True
            ).start()

    def abort(self) -> None:
        _shutdown(self._a)
        _shutdown(self._b)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        buffer = bytearray(BUFFER_BYTES)
        view = memoryview(buffer)
        try:
            while n := src.recv_into(buffer):
                dst.sendall(view[:n])
        except ssl.SSLEOFError:
            # The peer shut its TCP write half without a TLS close_notify, as the
            # relays do (a close_notify cannot be sent while another thread reads):
            # an end like any other, the records before it were authenticated.
            pass
        except (OSError, ValueError):
            self.abort()  # a reset or a failed write: nothing more can pass either way
        finally:
            self._ended(dst)

    def _ended(self, dst: socket.socket) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
            if not last:
                self._linger = threading.Timer(timing.RELAY_LINGER, self.abort)
                self._linger.daemon = True
                self._linger.start()
        if not last:
            _shutdown(dst, socket.SHUT_WR)
            return
        if self._linger is not None:
            self._linger.cancel()
        try:
            self._on_end()
        finally:
            for sock in (self._a, self._b):
                _shutdown(sock)
                sock.close()
            self.done.set()


class _Listener:
    """A listening socket whose connections the asyncio loop accepts (cheap, never blocks)."""

    def __init__(self, host: str, on_accept: Callable[[socket.socket, object], None]) -> None:
        self._host = host
        self._on_accept = on_accept
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((self._host, 0))
            sock.listen(8)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            if self._sock is None:
                return
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say: pause rather than spin
                log.warning("accepting on port %d: %s; pausing for a second", self.port, e)
                self._pause()
                return
            try:
                conn.setblocking(True)
                _nodelay(conn)
                self._on_accept(conn, peer)
            except Exception:
                log.exception("a connection to port %d could not be handled", self.port)
                conn.close()

    def _pause(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.call_later(1.0, self._resume)

    def _resume(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._ready)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()


class WorkerRelay:
    """The worker's end of one lease: a TLS port on the cluster address, spliced to the
    rpc-worker on `127.0.0.1:target_port` for the lease holder only."""

    def __init__(
        self,
        creds: DeviceCredentials | None,
        holder: str,
        token: bytes,
        host: str,
        target_port: int,
        *,
        data_plane: str = "tls",
    ) -> None:
        """`holder` is the root's node id, `token` the lease's secret, `host` where to listen."""
        self._creds = _check_mode(data_plane, creds)
        if self._creds is not None and len(token) != TOKEN_BYTES:
            raise ValueError(f"a lease token is {TOKEN_BYTES} bytes, not {len(token)}")
        self._context = _half_closable(tls_server_context(self._creds)) if self._creds else None
        self._holder = holder
        self._token = token
        self._host = host
        self._target = ("127.0.0.1", target_port)
        self._listener = _Listener(host, self._accepted)
        self._lock = threading.Lock()
        # Duplicates of the connections being authenticated: shutting one down wakes
        # its handshake, whatever object the TLS layer made of the original.
        self._pending: list[socket.socket] = []
        self._claimed = False  # by an authenticated connection of the holder
        self._released = threading.Condition(self._lock)
        self._session: _Splice | None = None
        self._client: socket.socket | None = None  # the session's connection from the root
        self._closing = False
        self._refusals = _Refusals(f"the relay for {holder}")

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self.port}"

    @property
    def token(self) -> bytes:
        return self._token

    async def start(self) -> None:
        """Listen; `endpoint` is then the address to give the root."""
        self._listener.start()

    def _accepted(self, conn: socket.socket, peer: object) -> None:
        evicted: socket.socket | None = None
        with self._lock:
            # One that arrives as the last one closes is let through: llama.cpp
            # reconnects at once (rpc.register_servers probes, then ggml connects).
            refused = self._closing or (
                self._claimed and self._client is not None and not _peer_closed(self._client)
            )
            if not refused:
                handle = conn.dup()
                self._pending.append(handle)
                if len(self._pending) > _MAX_PENDING:
                    evicted = self._pending.pop(0)
        if refused:
            _shutdown(conn)
            conn.close()
            self._refusals.note(peer, "busy with the lease holder's connection")
            return
        if evicted is not None:
            _shutdown(evicted)  # its thread sees the handshake fail and closes it
        threading.Thread(
            target=self._admit, args=(conn, handle, peer), name=f"relay admit {peer}", daemon=True
        ).start()

    def _authenticate(self, conn: socket.socket) -> socket.socket:
        """The connection, over TLS, once the holder proved itself; raises otherwise."""
        if self._context is None:
            return conn
        deadline = time.monotonic() + timing.RELAY_HANDSHAKE_TIMEOUT
        conn.settimeout(timing.RELAY_HANDSHAKE_TIMEOUT)
        secure = self._context.wrap_socket(conn, server_side=True)
        try:
            peer = cert_node_id(secure)
            if peer != self._holder:
                raise PermissionError(f"its certificate is node {peer}'s, not the lease holder's")
            if not hmac.compare_digest(_recv_exact(secure, TOKEN_BYTES, deadline), self._token):
                raise PermissionError("wrong lease token")
        except BaseException:
            secure.close()
            raise
        return secure

    def _admit(self, conn: socket.socket, handle: socket.socket, peer: object) -> None:
        try:
            try:
                conn = self._authenticate(conn)
            except (OSError, ValueError, TlsError) as e:
                self._refusals.note(peer, str(e) or type(e).__name__)
                conn.close()
                return
            with self._lock:
                self._released.wait_for(
                    lambda: self._closing or not self._claimed, timing.RELAY_LINGER
                )
                refused = self._closing or self._claimed
                if not refused:
                    self._claimed, self._client = True, conn
            if refused:
                self._refusals.note(peer, "busy with the lease holder's connection")
                _shutdown(conn)
                conn.close()
                return
            self._splice(conn, peer)
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._pending.remove(handle)
            handle.close()

    def _splice(self, conn: socket.socket, peer: object) -> None:
        """Splice an authenticated connection to the rpc-worker; the relay is claimed."""
        try:
            upstream = socket.create_connection(self._target, timing.RPC_CONNECT_TIMEOUT)
        except OSError as e:
            log.warning("the rpc-worker on %s:%d cannot be reached: %s", *self._target, e)
            self._release()
            _shutdown(conn)
            conn.close()
            return
        conn.settimeout(None)
        upstream.settimeout(None)
        _nodelay(upstream)
        session = _Splice(conn, upstream, f"relay {self.port}", self._release)
        with self._lock:
            closing = self._closing
            self._session = session
        session.start()
        if closing:
            session.abort()
        log.info("relay %s: the lease holder connected from %s", self.endpoint, peer)

    def _release(self) -> None:
        with self._lock:
            self._claimed = False
            self._session = self._client = None
            self._released.notify_all()

    async def close(self) -> None:
        """Stop listening and cut the live connection, at once."""
        with self._lock:
            self._closing = True
            self._released.notify_all()
            session, pending = self._session, list(self._pending)
        self._listener.close()
        for handle in pending:
            _shutdown(handle)
        if session is not None:
            session.abort()
            await asyncio.to_thread(session.done.wait, timing.CHILD_STOP_TIMEOUT)


@dataclass(eq=False)
class _Local:
    """One connection of llama.cpp's to a root relay."""

    sock: socket.socket
    done: threading.Event = field(default_factory=threading.Event)
    splice: _Splice | None = None
    upstream: socket.socket | None = None

    def abort(self) -> None:
        _shutdown(self.sock)
        if self.upstream is not None:
            _shutdown(self.upstream)
        if self.splice is not None:
            self.splice.abort()


class RootRelay:
    """The root's end of one lease: a loopback port for the engine child, each of its
    connections carried over TLS to the worker's relay."""

    def __init__(
        self,
        creds: DeviceCredentials | None,
        endpoint: str,
        token: bytes,
        worker_node_id: str,
        *,
        data_plane: str = "tls",
    ) -> None:
        self._creds = _check_mode(data_plane, creds)
        self._context = _half_closable(client_context(self._creds)) if self._creds else None
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdecimal():
            raise ValueError(f"relay endpoint {endpoint!r} is not HOST:PORT")
        self._remote = (host, int(port))
        self._remote_text = endpoint
        self._token = token
        self._worker = worker_node_id
        self._listener = _Listener("127.0.0.1", self._accepted)
        self._lock = threading.Lock()
        self._last: _Local | None = None
        self._closing = False
        self._live: set[_Local] = set()
        self._refusals = _Refusals(f"the local relay to {endpoint}")

    @property
    def local_endpoint(self) -> str:
        return f"127.0.0.1:{self._listener.port}"

    async def start(self) -> None:
        self._listener.start()

    def _accepted(self, conn: socket.socket, peer: object) -> None:
        with self._lock:
            previous = self._last
            if not _is_loopback(peer):
                refused = "not from this device"
            elif self._closing:
                refused = "closing"
            elif previous is None or previous.done.is_set() or _peer_closed(previous.sock):
                refused = ""  # a previous one that is closing is followed, once closed
            else:
                refused = "another connection is live"
            if not refused:
                local = _Local(conn)
                self._last = local
                self._live.add(local)
        if refused:
            _shutdown(conn)
            conn.close()
            self._refusals.note(peer, refused)
            return
        threading.Thread(
            target=self._carry, args=(local, previous), name="root relay", daemon=True
        ).start()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._remote, timing.RPC_CONNECT_TIMEOUT)
        _nodelay(sock)
        if self._context is None:
            return sock
        sock.settimeout(timing.RELAY_HANDSHAKE_TIMEOUT)
        try:
            secure = self._context.wrap_socket(sock, server_hostname=TARGET_NAME)
        except BaseException:
            sock.close()
            raise
        try:
            peer = cert_node_id(secure)
            if peer != self._worker:
                raise PermissionError(f"the relay is node {peer}'s, not {self._worker}'s")
            secure.sendall(self._token)
        except BaseException:
            secure.close()
            raise
        return secure

    def _carry(self, local: _Local, previous: _Local | None) -> None:
        try:
            if previous is not None and not previous.done.wait(timing.RELAY_LINGER):
                previous.abort()
                previous.done.wait(timing.RELAY_LINGER)
            if self._stopping():
                local.sock.close()
                return
            try:
                upstream = self._connect()
            except (OSError, ValueError, TlsError) as e:
                log.warning("cannot reach the relay at %s: %s", self._remote_text, e)
                _shutdown(local.sock)
                local.sock.close()
                return
            upstream.settimeout(None)
            splice = _Splice(local.sock, upstream, f"root relay {self._remote_text}")
            with self._lock:
                local.upstream, local.splice = upstream, splice
                closing = self._closing
            splice.start()
            if closing:
                splice.abort()
            splice.done.wait()
        finally:
            with self._lock:
                self._live.discard(local)
            local.done.set()

    def _stopping(self) -> bool:
        with self._lock:
            return self._closing

    async def close(self) -> None:
        """Stop listening and cut every connection, at once."""
        with self._lock:
            self._closing = True
            live = list(self._live)
        self._listener.close()
        for local in live:
            local.abort()
        for local in live:
            await asyncio.to_thread(local.done.wait, timing.CHILD_STOP_TIMEOUT)


class RootRelays:
    """The root relays of one set of leases, in the leases' order."""

    def __init__(self, relays: Sequence[RootRelay]) -> None:
        self._relays = list(relays)

    @property
    def local_endpoints(self) -> list[str]:
        """What to give llama.cpp, in the order of the leases."""
        return [relay.local_endpoint for relay in self._relays]

    async def close(self) -> None:
        await asyncio.gather(*(relay.close() for relay in self._relays))


async def open_root_relays(
    creds: DeviceCredentials | None,
    leases: Sequence[tuple[str, bytes, str]],
    data_plane: str = "tls",
) -> RootRelays:
    """A local relay for each `(endpoint, token, worker_node_id)` of the leases held."""
    relays: list[RootRelay] = []
    try:
        for endpoint, token, worker in leases:
            relay = RootRelay(creds, endpoint, token, worker, data_plane=data_plane)
            await relay.start()
            relays.append(relay)
    except BaseException:
        await RootRelays(relays).close()
        raise
    return RootRelays(relays)
