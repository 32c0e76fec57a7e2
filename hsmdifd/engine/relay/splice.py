"""The relays' copy loop: two connected sockets copied into each other.

Each direction has a thread of its own that blocks in `recv_into` (the GIL released)
and writes what it read with one `sendall`: one wake-up per segment that arrives, no
Python work per RPC message beyond that, nothing polled. A decoded token is about
seven requests to each worker (llama.cpp writes each in one send or two) and one
answer: that many wake-ups per relay each way (the counts are in `Traffic`;
`python -m bench.relay --decode` prints them). The relay passes bytes on as they
come and knows nothing of llama.cpp's framing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hsmdifd.daemon import timing

BUFFER_BYTES = 256 * 1024
"""Bytes each direction of a splice reads at once."""
_PR_SET_NAME = 15


@dataclass
class Traffic:
    """What the sessions of one relay carried, per direction: reads and bytes.

    "out" is from the side that connected to the relay to the side it connects to
    (llama.cpp to the worker, at both ends). Each direction's thread alone writes
    its fields; readers see figures at most one read behind.
    """

    reads_out: int = 0
    bytes_out: int = 0
    reads_in: int = 0
    bytes_in: int = 0

    def count(self, outward: bool, n: int) -> None:
        if outward:
            self.reads_out += 1
            self.bytes_out += n
        else:
            self.reads_in += 1
            self.bytes_in += n


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


def half_closable(context: ssl.SSLContext) -> ssl.SSLContext:
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


class Splice:
    """Two connected sockets copied into each other by a thread per direction.

    `a` is the side that connected to the relay. A direction ends when its source
    closes; the end is passed on (the other side's write half is shut) and the
    other direction runs until its own source closes, for at most
    `timing.RELAY_LINGER` seconds. When both have ended, `on_end` runs, then both
    sockets close and `done` is set. `abort()` ends both at once.
    """

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        name: str,
        traffic: Traffic,
        on_end: Callable[[], None] = lambda: None,
    ) -> None:
        """`name` names the threads: "NAME >" copies from `a` to `b`, "NAME <" back."""
        self._a, self._b = a, b
        self._name = name
        self._traffic = traffic
        self._on_end = on_end
        self._running = 2
        self._lock = threading.Lock()
        self._linger: threading.Timer | None = None
        self.done = threading.Event()

    def start(self) -> None:
        for src, dst, arrow in ((self._a, self._b, ">"), (self._b, self._a, "<")):
            threading.Thread(
                target=self._pump,
                args=(src, dst, f"{self._name} {arrow}"),
                name=f"{self._name} {arrow}",
                daemon=True,
            ).start()

    def abort(self) -> None:
        shutdown(self._a)
        shutdown(self._b)

    def _pump(self, src: socket.socket, dst: socket.socket, name: str) -> None:
        name_thread(name)
        outward = src is self._a
        count = self._traffic.count
        buffer = bytearray(BUFFER_BYTES)
        view = memoryview(buffer)
        try:
            while n := src.recv_into(buffer):
                dst.sendall(view[:n])
                count(outward, n)
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
            shutdown(dst, socket.SHUT_WR)
            return
        if self._linger is not None:
            self._linger.cancel()
        try:
            self._on_end()
        finally:
            for sock in (self._a, self._b):
                shutdown(sock)
                sock.close()
            self.done.set()
