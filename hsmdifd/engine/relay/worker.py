"""The worker's end of a lease's relay: the holder alone, one connection at a time."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import time

from hsmdifd.cluster.tls import DeviceCredentials, TlsError
from hsmdifd.daemon import timing
from hsmdifd.engine.relay import secure
from hsmdifd.engine.relay.listen import Listener, Refusals, check_mode
from hsmdifd.engine.relay.splice import (
    End,
    Splice,
    Traffic,
    nodelay,
    peer_closed,
    shutdown,
    sock_of,
)

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
"""Length of a lease's token, the first bytes a root sends to the worker relay."""
_MAX_PENDING = 16
"""Connections a worker relay authenticates at once; a newer one evicts the oldest."""


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
        self._creds = check_mode(data_plane, creds)
        if self._creds is not None and len(token) != TOKEN_BYTES:
            raise ValueError(f"a lease token is {TOKEN_BYTES} bytes, not {len(token)}")
        self._context = secure.server_context(self._creds) if self._creds else None
        self._holder = holder
        self._token = token
        self._host = host
        self._target = ("127.0.0.1", target_port)
        self._listener = Listener(host, self._accepted)
        self._lock = threading.Lock()
        # Duplicates of the connections being authenticated: shutting one down wakes
        # its handshake, whatever object the TLS layer made of the original.
        self._pending: list[socket.socket] = []
        self._claimed = False  # by an authenticated connection of the holder
        self._released = threading.Condition(self._lock)
        self._session: Splice | None = None
        self._client: End | None = None  # the session's connection from the root
        self._closing = False
        self._refusals = Refusals(f"the relay for {holder}")
        self.traffic = Traffic()
        """What the holder's connections carried ("out": from the root to the rpc-worker)."""

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
                self._claimed
                and self._client is not None
                and not peer_closed(sock_of(self._client))
            )
            if not refused:
                handle = conn.dup()
                self._pending.append(handle)
                if len(self._pending) > _MAX_PENDING:
                    evicted = self._pending.pop(0)
        if refused:
            shutdown(conn)
            conn.close()
            self._refusals.note(peer, "busy with the lease holder's connection")
            return
        if evicted is not None:
            shutdown(evicted)  # its thread sees the handshake fail and closes it
        threading.Thread(
            target=self._admit, args=(conn, handle, peer), name=f"relay admit {peer}", daemon=True
        ).start()

    def _authenticate(self, conn: socket.socket) -> End:
        """The connection, under TLS, once the holder proved itself; raises otherwise."""
        if self._context is None:
            return conn
        deadline = time.monotonic() + timing.RELAY_HANDSHAKE_TIMEOUT
        session = secure.Session.accept(self._context, conn, timing.RELAY_HANDSHAKE_TIMEOUT)
        peer = session.peer_node_id()
        if peer != self._holder:
            raise PermissionError(f"its certificate is node {peer}'s, not the lease holder's")
        token = session.recv_exact(TOKEN_BYTES, max(0.0, deadline - time.monotonic()))
        if not hmac.compare_digest(token, self._token):
            raise PermissionError("wrong lease token")
        return session

    def _admit(self, conn: socket.socket, handle: socket.socket, peer: object) -> None:
        try:
            try:
                client = self._authenticate(conn)
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
                    self._claimed, self._client = True, client
            if refused:
                self._refusals.note(peer, "busy with the lease holder's connection")
                shutdown(conn)
                conn.close()
                return
            self._splice(client, peer)
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._pending.remove(handle)
            handle.close()

    def _splice(self, client: End, peer: object) -> None:
        """Splice an authenticated connection to the rpc-worker; the relay is claimed."""
        try:
            upstream = socket.create_connection(self._target, timing.RPC_CONNECT_TIMEOUT)
        except OSError as e:
            log.warning("the rpc-worker on %s:%d cannot be reached: %s", *self._target, e)
            self._release()
            shutdown(sock_of(client))
            sock_of(client).close()
            return
        nodelay(upstream)
        session = Splice(client, upstream, "relay worker", self.traffic, self._release)
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
            shutdown(handle)
        if session is not None:
            session.abort()
            await asyncio.to_thread(session.done.wait, timing.CHILD_STOP_TIMEOUT)
