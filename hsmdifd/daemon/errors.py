"""The one error type a request can fail with: a gRPC status and a sentence."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that cannot be served; `str()` says what was wrong and what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
