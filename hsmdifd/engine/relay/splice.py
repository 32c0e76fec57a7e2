"""The relays' copy loop: two connected sockets copied into each other.

One thread per session runs the native loop (`_native.splice`, without the GIL): it
polls both sockets and moves whatever is ready, TLS records included, in either
direction. A decoded token is about seven requests to each worker (llama.cpp writes
each in one send or two) and one answer: each is one wake-up of that thread and a
read and a write, with no Python in between (the counts are in `Traffic`;
`python -m bench.relay --decode` prints them). The relay passes bytes on as they come
and knows nothing of llama.cpp's framing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import socket
import threading
from array import array
from collections.abc import Callable

from hsmdifd.daemon import timing
from hsmdifd.engine.relay import _native
from hsmdifd.engine.relay.secure import Session

BUFFER_BYTES = 256 * 1024
"""Bytes each direction of a splice reads at once (`_native.c` BUFFER_BYTES)."""
_PR_SET_NAME = 15


class Traffic:
    """What the sessions of one relay carried, per direction: reads and bytes.

    "out" is from the side that connected to the relay to the side it connects to
    (llama.cpp to the worker, at both ends). The native loop adds to `cells` as it
    goes, one session at a time; readers see figures at most one read behind.
    """

    def __init__(self) -> None:
        self.cells = array("Q", [0, 0, 0, 0])
        """reads out, bytes out, reads in, bytes in."""

    @property
    def reads_out(self) -> int:
        return self.cells[0]

    @property
    def bytes_out(self) -> int:
        return self.cells[1]

    @property
    def reads_in(self) -> int:
        return self.cells[2]

    @property
    def bytes_in(self) -> int:
        return self.cells[3]


@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return getattr(libc, "prctl", None)
    except OSError:
        return None


def name_thread(name: str) -> None:
    """Give the calling thread `name` (15 bytes at most) in `ps -L`, `top -H` and /proc.

    The benchmarks find the relays' CPU time by these names.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Shut the TCP connection under `sock` (an `SSLSocket` too), waking blocked readers.

    `socket.socket.shutdown` itself, not `SSLSocket.shutdown`, which drops the TLS
    state that another thread may be reading through.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, how)


def nodelay(sock: socket.socket) -> None:
    """Send each write at once: an RPC message waits for no ACK of the one before."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer of a TCP connection has closed its side, without reading from it.

    Peeks at the TCP stream itself, under TLS too.
    """
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


End = socket.socket | Session
"""One side of a splice: a plain socket, or a TLS session over one."""


def sock_of(end: End) -> socket.socket:
    """The socket under `end`."""
    return end.sock if isinstance(end, Session) else end


def _parts(end: End) -> tuple[socket.socket, object | None]:
    return sock_of(end), end.handle if isinstance(end, Session) else None


class Splice:
    """Two connected sockets copied into each other by one thread.

    `a` is the side that connected to the relay. A direction ends when its source
    closes; the end is passed on (a TLS close_notify and the TCP write half) and the
    other direction runs until its own source closes, for at most
    `timing.RELAY_LINGER` seconds. A reset or a failed write ends both at once.
    When both have ended, `on_end` runs, then both sockets close and `done` is set.
    `abort()` ends both at once, from any thread.
    """

    def __init__(
        self,
        a: End,
        b: End,
        name: str,
        traffic: Traffic,
        on_end: Callable[[], None] = lambda: None,
    ) -> None:
        """`name` names the thread (15 bytes of it in `ps -L`)."""
        self._a, self._b = _parts(a), _parts(b)
        self._name = name
        self._traffic = traffic
        self._on_end = on_end
        self.done = threading.Event()
        self.stopped_by: str | None = None
        """Why the loop stopped early (a reset, a failed write), once `done`."""

    def start(self) -> None:
        threading.Thread(target=self._run, name=self._name, daemon=True).start()

    def abort(self) -> None:
        shutdown(self._a[0])
        shutdown(self._b[0])

    def _run(self) -> None:
        name_thread(self._name)
        (a, a_tls), (b, b_tls) = self._a, self._b
        try:
            self.stopped_by = _native.splice(
                a.fileno(), a_tls, b.fileno(), b_tls, timing.RELAY_LINGER, self._traffic.cells
            )
        except (OSError, ValueError) as e:  # a socket already closed
            self.stopped_by = str(e)
        finally:
            try:
                self._on_end()
            finally:
                for sock in (a, b):
                    shutdown(sock)
                    sock.close()
                self.done.set()
