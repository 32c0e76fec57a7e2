"""The gRPC interceptors that put a proof on every peer call and check the proofs that
arrive (the proofs themselves are in auth.py)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from hsmdifd.cluster.auth import (
    AUTH_KEY,
    DEFAULT_SKEW,
    AuthError,
    Clock,
    Context,
    RequestVerifier,
    check_id,
    digest,
    sign,
    sign_reply,
    text,
    verify_reply,
)
from hsmdifd.daemon.logs import LogLimiter

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerBase = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryBase = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _StreamBase = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _ServerBase = grpc.aio.ServerInterceptor
    _UnaryBase = grpc.aio.UnaryUnaryClientInterceptor
    _StreamBase = grpc.aio.UnaryStreamClientInterceptor

caller_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hsmdif_caller_id", default=None
)
"""The node id of the authenticated caller, set by `AuthServerInterceptor` for each handler."""


def _wrap(
    behavior: Callable[..., Any],
    streaming: bool,
    enter: Callable[[Any, Context], Awaitable[str]],
    leave: Callable[[Any, Context, str], None],
) -> Any:
    """Async `behavior` run after `enter` (which returns the nonce), as a coroutine or an
    async generator like it; `leave` sees a unary reply before it goes out."""

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        await enter(request, context)
        async for item in behavior(request, context):
            yield item

    async def unary(request: Any, context: Context) -> Any:
        nonce = await enter(request, context)
        result = behavior(request, context)
        reply = await result if inspect.isawaitable(result) else result
        if reply is not None and not streaming:
            leave(reply, context, nonce)
        return reply

    return stream if streaming and not inspect.iscoroutinefunction(behavior) else unary


class AuthServerInterceptor(_ServerBase):
    """Check every call's proof, prove ourselves back, and set `caller_id` for the handler.

    Methods in `open_methods` (the challenge a caller starts with) take no proof.
    `cert_id(context)` gives the node id of the caller's TLS certificate, where the
    transport has one; a proof that names another caller is refused.
    """

    def __init__(
        self,
        secret: bytes,
        node_id: str,
        skew: float = DEFAULT_SKEW,
        now: Clock = time.time,
        *,
        open_methods: frozenset[str] = frozenset(),
        cert_id: Callable[[Context], str | None] = lambda _: None,
    ) -> None:
        check_id(node_id)
        self._secret, self._node_id = secret, node_id
        self._verifier = RequestVerifier(secret, node_id, skew, now)
        self._open = open_methods
        self._cert_id = cert_id
        self._refusals = LogLimiter(log)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            return None  # type: ignore[return-value]  # the stubs miss this Optional
        method = text(handler_call_details.method)
        if method in self._open:
            return handler

        async def enter(request: Any, context: Context) -> str:
            try:
                if request is None or not isinstance(request, bytes | Message):
                    raise AuthError("a streamed request cannot be checked")
                caller, nonce = self._verifier.verify(
                    method, context.invocation_metadata(), digest(request)
                )
                certified = self._cert_id(context)
                if certified is not None and certified != caller:
                    raise AuthError(f"a proof for {caller} over the connection of {certified}")
            except AuthError as e:
                self._refusals.warning(
                    f"refused {method}", "refused %s from %s: %s", method, context.peer(), e
                )
                await context.abort(e.code(), str(e))
            await context.send_initial_metadata(
                sign_reply(self._secret, method, nonce, self._node_id)
            )
            caller_id.set(caller)
            return nonce

        def leave(reply: Any, context: Context, nonce: str) -> None:
            context.set_trailing_metadata(
                sign_reply(self._secret, method, nonce, self._node_id, digest(reply))
            )

        if handler.request_streaming:
            # A proof covers one request body: a stream of them cannot be checked. No
            # peer method streams its requests; gRPC answers UNIMPLEMENTED.
            return None  # type: ignore[return-value]
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        make: Callable[..., Handler] = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(
            _wrap(getattr(handler, kind), handler.response_streaming, enter, leave),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _ClientProof:
    """Signs each call for the device behind one channel. `receiver()` is that device's
    node id once it has proved it holds the secret (None before: no proof is sent)."""

    def __init__(
        self,
        secret: bytes,
        node_id: str,
        receiver: Callable[[], str | None],
        now: Clock = time.time,
        open_methods: frozenset[str] = frozenset(),
    ) -> None:
        check_id(node_id)
        self._secret, self._node_id, self._now = secret, node_id, now
        self._receiver, self._open = receiver, open_methods

    async def _call(
        self, continuation: Callable[..., Any], details: Any, request: Any, unary: bool
    ) -> Any:
        method = text(details.method)
        if method in self._open:
            return await continuation(details, request)
        receiver = self._receiver()
        if receiver is None:
            raise AuthError(
                "the peer has not yet proved that it holds the cluster secret",
                grpc.StatusCode.UNAVAILABLE,
            )
        proof, nonce = sign(
            self._secret, self._node_id, receiver, method, digest(request), now=self._now
        )
        metadata = [(k, v) for k, v in details.metadata or () if k != AUTH_KEY] + list(proof)
        # ClientCallDetails is a namedtuple: keep timeout, credentials, wait_for_ready.
        call = await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), request)
        try:
            verify_reply(
                self._secret, method, nonce, await call.initial_metadata(), expected=receiver
            )
            if unary:
                reply = await call
                trailer = await call.trailing_metadata()
                verify_reply(self._secret, method, nonce, trailer, digest(reply), expected=receiver)
        except AuthError:
            if call.done() and await call.code() != grpc.StatusCode.OK:
                return call  # refused or failed: the call's own error says more
            call.cancel()
            raise
        except grpc.aio.AioRpcError:
            return call  # the call failed: awaiting it raises the same error
        except asyncio.CancelledError:
            call.cancel()
            raise
        return call


class AuthClientInterceptor(_ClientProof, _UnaryBase):
    """Sign unary-unary calls; the call fails with `AuthError` unless the server proves
    itself and its reply."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request, unary=True)


class AuthStreamClientInterceptor(_ClientProof, _StreamBase):
    """Sign unary-stream calls; no message arrives unless the server proves itself first."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request, unary=False)


def client_interceptors(
    secret: bytes,
    node_id: str,
    receiver: Callable[[], str | None],
    now: Clock = time.time,
    open_methods: frozenset[str] = frozenset(),
) -> list[Any]:
    """Both client interceptors: a channel files each object under one kind of call only."""
    return [
        AuthClientInterceptor(secret, node_id, receiver, now, open_methods),
        AuthStreamClientInterceptor(secret, node_id, receiver, now, open_methods),
    ]
