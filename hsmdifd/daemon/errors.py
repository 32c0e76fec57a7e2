"""The errors the daemon speaks in: a request that fails (a gRPC status and a sentence),
a startup that fails (a sentence)."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that cannot be served; `str()` says what was wrong and what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""
