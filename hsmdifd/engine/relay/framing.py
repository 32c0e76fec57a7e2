"""Where llama.cpp's RPC requests begin and end, so a root relay can send several in one.

Each request is a command byte, a little-endian u64 payload size and the payload.
SET_TENSOR (llama.cpp writes a decode step's inputs with it) gets no reply, and the
server does nothing with its tensor until a later command asks for a computation:
a relay may hold such requests back and send them together with whatever follows.
So may a request not yet whole: llama.cpp is writing the rest, and the server can
act on none of it before. A decoded token then crosses the TLS leg and the worker's
relay as one write instead of one per request or piece of one (each write costs a
wake-up and a TLS record at both relays, and a TCP segment on every leg).

`RequestFraming` decides nothing about the bytes themselves: they pass unchanged
whatever it concludes. A stream that does not begin with HELLO, or shows a command
or a size no llama.cpp request has, is not followed: nothing of it is held back.
"""

from __future__ import annotations

HEADER_BYTES = 9
"""A request's command byte and its u64 payload size."""
RPC_CMD_SET_TENSOR = 6
RPC_CMD_HELLO = 14
ONE_WAY = frozenset({RPC_CMD_SET_TENSOR})
"""Requests that get no reply and start nothing on the server."""
MAX_COMMAND = 31
"""llama.cpp's RPC has fewer commands (HELLO is 14)."""
MAX_PAYLOAD = 1 << 34
"""More than any tensor llama.cpp sends in one request."""


class RequestFraming:
    """Follows a stream of requests fed in pieces of any size."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._payload_left = 0
        self._one_way_only = True  # every request since the last flush is in ONE_WAY
        self._requests = 0
        self.lost = False
        """Whether the stream turned out not to be llama.cpp's requests."""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the stream."""
        i, n = 0, len(data)
        while i < n and not self.lost:
            if self._payload_left:
                take = min(self._payload_left, n - i)
                self._payload_left -= take
                i += take
                continue
            take = min(HEADER_BYTES - len(self._header), n - i)
            self._header += data[i : i + take]
            i += take
            if len(self._header) == HEADER_BYTES:
                command = self._header[0]
                size = int.from_bytes(self._header[1:], "little")
                first = self._requests == 0
                self._requests += 1
                if (
                    command > MAX_COMMAND
                    or size > MAX_PAYLOAD
                    or (first and command != RPC_CMD_HELLO)
                ):
                    self.lost = True
                if command not in ONE_WAY:
                    self._one_way_only = False
                self._payload_left = size
                self._header.clear()

    def may_hold(self) -> bool:
        """Whether the bytes fed since `flushed` can wait for more: they end inside a
        request, or every request in them is one that needs no answer."""
        if self.lost:
            return False
        return self._one_way_only or bool(self._payload_left or self._header)

    def missing(self) -> int:
        """Bytes that the request being fed still lacks (of its header, then of its
        payload); 0 between requests."""
        if self.lost:
            return 0
        if self._header:
            return HEADER_BYTES - len(self._header)
        return self._payload_left

    def flushed(self) -> None:
        """The bytes fed so far have been sent on."""
        self._one_way_only = True
