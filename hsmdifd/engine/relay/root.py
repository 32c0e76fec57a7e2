"""The root's end of a lease's relay: a loopback port for the engine child, each of its
connections carried (over TLS, with the lease's token) to the worker's relay."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from hsmdifd.cluster import tls
from hsmdifd.daemon import timing
from hsmdifd.engine.relay import secure
from hsmdifd.engine.relay.listen import Listener, Refusals, check_mode, is_loopback
from hsmdifd.engine.relay.splice import End, Splice, Traffic, peer_closed, sock_of
from hsmdifd.engine.relay.splice import nodelay as _nodelay
from hsmdifd.engine.relay.splice import shutdown as _shutdown

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Local:
    """One connection of llama.cpp's to a root relay."""

    sock: socket.socket
    done: threading.Event = field(default_factory=threading.Event)
    splice: Splice | None = None
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
        creds: tls.DeviceCredentials | None,
        endpoint: str,
        token: bytes,
        worker_node_id: str,
        *,
        data_plane: str = "tls",
    ) -> None:
        self._creds = check_mode(data_plane, creds)
        self._context = secure.client_context(self._creds) if self._creds else None
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdecimal():
            raise ValueError(f"relay endpoint {endpoint!r} is not HOST:PORT")
        self._remote = (host, int(port))
        self._remote_text = endpoint
        self._token = token
        self._worker = worker_node_id
        self._listener = Listener("127.0.0.1", self._accepted)
        self._lock = threading.Lock()
        self._last: _Local | None = None
        self._closing = False
        self._live: set[_Local] = set()
        self._refusals = Refusals(f"the local relay to {endpoint}")
        self.traffic = Traffic()
        """What llama.cpp's connections carried ("out": to the worker)."""

    @property
    def local_endpoint(self) -> str:
        return f"127.0.0.1:{self._listener.port}"

    async def start(self) -> None:
        self._listener.start()

    def _accepted(self, conn: socket.socket, peer: object) -> None:
        with self._lock:
            previous = self._last
            if not is_loopback(peer):
                refused = "not from this device"
            elif self._closing:
                refused = "closing"
            elif previous is None or previous.done.is_set() or peer_closed(previous.sock):
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

    def _connect(self) -> End:
        sock = socket.create_connection(self._remote, timing.RPC_CONNECT_TIMEOUT)
        _nodelay(sock)
        if self._context is None:
            return sock
        try:
            session = secure.Session.connect(self._context, sock, timing.RELAY_HANDSHAKE_TIMEOUT)
            peer = session.peer_node_id()
            if peer != self._worker:
                raise PermissionError(f"the relay is node {peer}'s, not {self._worker}'s")
            session.send_all(self._token, timing.RELAY_HANDSHAKE_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return session

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
            except (OSError, ValueError, tls.TlsError) as e:
                log.warning("cannot reach the relay at %s: %s", self._remote_text, e)
                _shutdown(local.sock)
                local.sock.close()
                return
            splice = Splice(local.sock, upstream, "relay root", self.traffic)
            with self._lock:
                local.upstream, local.splice = sock_of(upstream), splice
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
    def traffic(self) -> list[Traffic]:
        """What each relay carried, in the order of the leases."""
        return [relay.traffic for relay in self._relays]

    @property
    def local_endpoints(self) -> list[str]:
        """What to give llama.cpp, in the order of the leases."""
        return [relay.local_endpoint for relay in self._relays]

    async def close(self) -> None:
        await asyncio.gather(*(relay.close() for relay in self._relays))


async def open_root_relays(
    creds: tls.DeviceCredentials | None,
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
