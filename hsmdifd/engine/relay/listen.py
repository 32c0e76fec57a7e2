"""What both ends of a relay share before the copy: the data-plane mode, the listening
socket the daemon's loop accepts on, and the log of refused connections."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable

from hsmdifd.cluster.tls import DeviceCredentials
from hsmdifd.daemon import timing
from hsmdifd.daemon.logs import LogLimiter
from hsmdifd.engine.relay.splice import nodelay

log = logging.getLogger(__name__)

DATA_PLANES = ("tls", "plain")
_ACCEPTS_PER_WAKE = 16


@functools.cache
def _warn_plain() -> None:
    """Once per process."""
    log.warning(
        'data_plane = "plain": llama.cpp RPC traffic crosses the network unencrypted and '
        "any host that reaches a worker's relay port first is served"
    )


def check_mode(data_plane: str, creds: DeviceCredentials | None) -> DeviceCredentials | None:
    """The credentials the relay uses: None for "plain"; raises on a mode without them."""
    if data_plane not in DATA_PLANES:
        raise ValueError(f"data_plane must be one of {', '.join(DATA_PLANES)}, not {data_plane!r}")
    if data_plane == "plain":
        _warn_plain()
        return None
    if creds is None:
        raise ValueError('data_plane = "tls" needs this device\'s TLS credentials')
    return creds


class Refusals:
    """Rate-limited log lines about refused connections."""

    def __init__(self, relay: str) -> None:
        self._relay = relay
        self._lines = LogLimiter(log)

    def note(self, peer: object, reason: str) -> None:
        self._lines.warning(
            "refused", "%s refused a connection from %s: %s", self._relay, peer, reason
        )


def is_loopback(peer: object) -> bool:
    try:
        return isinstance(peer, tuple) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


class Listener:
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
                log.warning(
                    "accepting on port %d: %s; pausing for %.0f s",
                    self.port,
                    e,
                    timing.ACCEPT_PAUSE,
                )
                self._pause()
                return
            try:
                conn.setblocking(True)
                nodelay(conn)
                self._on_accept(conn, peer)
            except Exception:
                log.exception("a connection to port %d could not be handled", self.port)
                conn.close()

    def _pause(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.call_later(timing.ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._ready)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
