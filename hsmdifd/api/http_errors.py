"""HTTP answers other than 200, shaped as OpenAI's error objects, and the cluster's
errors mapped onto them."""

from __future__ import annotations

import grpc
from aiohttp import web

from hsmdifd.api import openai_shapes
from hsmdifd.api.queue import QUEUE_FULL
from hsmdifd.daemon.errors import RequestError

RETRY_AFTER = "2"  # seconds: a queue drains or a root is chosen within a few


class ApiError(Exception):
    """An answer other than 200, as OpenAI shapes it."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        retry: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.retry = status, kind, param, code, retry

    def response(self) -> web.Response:
        headers = {"Retry-After": RETRY_AFTER} if self.retry else None
        body = openai_shapes.error_body(str(self), self.kind, self.param, self.code)
        return web.json_response(body, status=self.status, headers=headers)


def from_request_error(e: RequestError, param: str | None = None) -> ApiError:
    """The HTTP answer for the cluster's error."""
    message = str(e)
    if e.code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, message, param=param)
    if e.code == grpc.StatusCode.UNAVAILABLE or (
        e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and QUEUE_FULL in message
    ):
        return ApiError(503, message, "server_error", code="unavailable", retry=True)
    if e.code == grpc.StatusCode.FAILED_PRECONDITION and "is not the root" in message:
        return ApiError(503, message, "server_error", code="unavailable", retry=True)
    return ApiError(500, message, "server_error", code=e.code.name.lower())
