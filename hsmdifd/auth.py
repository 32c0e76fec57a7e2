"""The cluster secret and the proof every peer RPC carries.

Every device holds the same secret: 32 random bytes, hex-encoded in a mode-0600 file.
A caller sends `x-hsmdif-auth: v1.<node_id>.<unix_ms>.<nonce>.<mac>`, where
mac = HMAC-SHA256(secret, "req\\n<method>\\n<node_id>\\n<unix_ms>\\n<nonce>").
The server refuses with UNAUTHENTICATED a missing or malformed proof, a wrong MAC,
a time more than `skew` seconds (30 by default) off its own clock, and a nonce seen
before within that window. Before the handler runs it proves itself in its initial
metadata: `x-hsmdif-auth-reply: v1.<server_node_id>.<mac>`, where
mac = HMAC-SHA256(secret, "rep\\n<method>\\n<nonce>\\n<server_node_id>"), and the
caller checks it. A device without the secret can neither call a peer nor answer as
one. The secret never crosses the network, but messages are neither encrypted nor
signed: this proves who is talking, not that nobody on the path altered a message.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import heapq
import hmac
import inspect
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

log = logging.getLogger(__name__)

AUTH_KEY = "x-hsmdif-auth"
REPLY_KEY = "x-hsmdif-auth-reply"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
DEFAULT_SKEW = 30.0
MAX_NONCES = 100_000
CREATE_HINT = (
    "make one with `hsmdifctl cluster init --out FILE` and copy the same file to every device"
)

Metadata = tuple[tuple[str, str | bytes], ...]
MetadataIn = Iterable[tuple[str, str | bytes]] | None
Clock = Callable[[], float]
Context = grpc.aio.ServicerContext[Any, Any]

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerBase = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryBase = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _StreamBase = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _ServerBase = grpc.aio.ServerInterceptor
    _UnaryBase = grpc.aio.UnaryUnaryClientInterceptor
    _StreamBase = grpc.aio.UnaryStreamClientInterceptor

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_REQUEST = re.compile(r"v1\.([A-Za-z0-9_-]{1,128})\.([0-9]{1,16})\.([0-9a-f]{32})\.([0-9a-f]{64})")
_REPLY = re.compile(r"v1\.([A-Za-z0-9_-]{1,128})\.([0-9a-f]{64})")

caller_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hsmdif_caller_id", default=None
)
"""The node id of the authenticated caller, set by `AuthServerInterceptor` for each handler."""


class SecretError(Exception):
    """A cluster secret file that cannot be used; the message says what to do."""


class AuthError(grpc.RpcError):
    """A proof that does not check out. An `RpcError`, so peer-call error handling sees it."""

    def __init__(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED):
        super().__init__(reason)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self)


def generate_secret() -> bytes:
    """A new cluster secret."""
    return secrets.token_bytes(SECRET_BYTES)


def write_secret_file(path: Path) -> None:
    """Write a new secret to `path`: mode 0600 from the start, whole or not at all, no overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(generate_secret().hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and refuses an existing `path`
    except FileExistsError:
        raise SecretError(
            f"{path} already exists: remove it first to replace the cluster secret"
        ) from None
    except OSError as e:
        raise SecretError(f"cannot write the cluster secret {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_secret(path: Path) -> bytes:
    """The secret in `path`, or a `SecretError` that says what is wrong and what to do."""
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode & 0o777
            text = f.read(4096).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        raise SecretError(f"no cluster secret at {path}: {CREATE_HINT}") from None
    except OSError as e:
        raise SecretError(f"cannot read the cluster secret {path}: {e.strerror}") from None
    if mode & 0o077:
        raise SecretError(
            f"the cluster secret {path} is open to other users (mode {mode:o}): "
            f"run `chmod 600 {path}`"
        )
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"{path} does not hold a hex-encoded secret: {CREATE_HINT}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"the cluster secret in {path} has {len(secret)} bytes, fewer than "
            f"{MIN_SECRET_BYTES}: {CREATE_HINT}"
        )
    return secret


def _mac(secret: bytes, *fields: str) -> str:
    return hmac.new(secret, "\n".join(fields).encode(), hashlib.sha256).hexdigest()


def _check_id(node_id: str) -> None:
    if not _ID.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} is not 1-128 letters, digits, '-' or '_'")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _one(metadata: MetadataIn, key: str) -> str | None:
    values = [v for k, v in metadata or () if k == key]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise AuthError("malformed proof")
    return values[0]


def sign(secret: bytes, node_id: str, method: str, now: Clock = time.time) -> tuple[Metadata, str]:
    """The metadata proving a call to `method`, and its nonce (to check the reply with)."""
    _check_id(node_id)
    stamp, nonce = str(int(now() * 1000)), secrets.token_hex(16)
    mac = _mac(secret, "req", method, node_id, stamp, nonce)
    return ((AUTH_KEY, f"v1.{node_id}.{stamp}.{nonce}.{mac}"),), nonce


def sign_reply(secret: bytes, method: str, nonce: str, node_id: str) -> Metadata:
    """The initial metadata a server sends to prove it holds the secret."""
    _check_id(node_id)
    return ((REPLY_KEY, f"v1.{node_id}.{_mac(secret, 'rep', method, nonce, node_id)}"),)


def verify_reply(secret: bytes, method: str, nonce: str, initial_metadata: MetadataIn) -> str:
    """The server's node id once its proof checks out; `AuthError` otherwise."""
    match = _REPLY.fullmatch(_one(initial_metadata, REPLY_KEY) or "")
    if match is None:
        raise AuthError("the peer sent no valid proof of the cluster secret")
    node_id, mac = match.groups()
    if not hmac.compare_digest(mac, _mac(secret, "rep", method, nonce, node_id)):
        raise AuthError("the peer does not hold our cluster secret")
    return node_id


def reply_node_id(initial_metadata: MetadataIn) -> str | None:
    """The server's node id in a reply that `AuthClientInterceptor` has already verified."""
    match = _REPLY.fullmatch(_one(initial_metadata, REPLY_KEY) or "")
    return match.group(1) if match else None


class RequestVerifier:
    """The server's check of one request proof, with a bounded cache of recent nonces."""

    def __init__(
        self,
        secret: bytes,
        skew: float = DEFAULT_SKEW,
        now: Clock = time.time,
        limit: int = MAX_NONCES,
    ) -> None:
        self._secret, self._skew, self._now, self._limit = secret, skew, now, limit
        self._expiries: list[tuple[float, str]] = []
        self._nonces: set[str] = set()

    def verify(self, method: str, metadata: MetadataIn) -> tuple[str, str]:
        """The caller's node id and the nonce; `AuthError` with a short reason otherwise."""
        value = _one(metadata, AUTH_KEY)
        if value is None:
            raise AuthError("missing proof")
        match = _REQUEST.fullmatch(value)
        if match is None:
            raise AuthError("malformed proof")
        node_id, stamp, nonce, mac = match.groups()
        if not hmac.compare_digest(mac, _mac(self._secret, "req", method, node_id, stamp, nonce)):
            raise AuthError("wrong cluster secret")
        now, sent = self._now(), int(stamp) / 1000
        if abs(now - sent) > self._skew:
            raise AuthError(f"clock skew of {abs(now - sent):.0f} s: check the clocks")
        while self._expiries and self._expiries[0][0] < now:
            self._nonces.discard(heapq.heappop(self._expiries)[1])
        if nonce in self._nonces:
            raise AuthError("replayed request")
        if len(self._nonces) >= self._limit:
            raise AuthError("too many requests: try again", grpc.StatusCode.RESOURCE_EXHAUSTED)
        self._nonces.add(nonce)
        heapq.heappush(self._expiries, (sent + self._skew, nonce))
        return node_id, nonce


def _wrap(
    behavior: Callable[..., Any], streaming: bool, enter: Callable[[Context], Awaitable[None]]
) -> Any:
    """Async `behavior` run after `enter`, as a coroutine or an async generator like it."""

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        await enter(context)
        async for item in behavior(request, context):
            yield item

    async def unary(request: Any, context: Context) -> Any:
        await enter(context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return stream if streaming and not inspect.iscoroutinefunction(behavior) else unary


class AuthServerInterceptor(_ServerBase):
    """Check every call's proof, prove ourselves back, and set `caller_id` for the handler."""

    def __init__(
        self, secret: bytes, node_id: str, skew: float = DEFAULT_SKEW, now: Clock = time.time
    ) -> None:
        _check_id(node_id)
        self._secret, self._node_id = secret, node_id
        self._verifier = RequestVerifier(secret, skew, now)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            return None  # type: ignore[return-value]  # the stubs miss this Optional
        method = _text(handler_call_details.method)

        async def enter(context: Context) -> None:
            try:
                caller, nonce = self._verifier.verify(method, context.invocation_metadata())
            except AuthError as e:
                log.warning("refused %s from %s: %s", method, context.peer(), e)
                await context.abort(e.code(), str(e))
            await context.send_initial_metadata(
                sign_reply(self._secret, method, nonce, self._node_id)
            )
            caller_id.set(caller)

        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        make: Callable[..., Handler] = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(
            _wrap(getattr(handler, kind), handler.response_streaming, enter),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _ClientProof:
    def __init__(self, secret: bytes, node_id: str, now: Clock = time.time) -> None:
        _check_id(node_id)
        self._secret, self._node_id, self._now = secret, node_id, now

    async def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        method = _text(details.method)
        proof, nonce = sign(self._secret, self._node_id, method, self._now)
        metadata = [(k, v) for k, v in details.metadata or () if k != AUTH_KEY] + list(proof)
        # ClientCallDetails is a namedtuple: keep timeout, credentials, wait_for_ready.
        call = await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), request)
        try:
            verify_reply(self._secret, method, nonce, await call.initial_metadata())
        except AuthError:
            if call.done() and await call.code() != grpc.StatusCode.OK:
                return call  # refused or failed: the call's own error says more
            call.cancel()
            raise
        except asyncio.CancelledError:
            call.cancel()
            raise
        return call


class AuthClientInterceptor(_ClientProof, _UnaryBase):
    """Sign unary-unary calls; the call fails with `AuthError` unless the server proves itself."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request)


class AuthStreamClientInterceptor(_ClientProof, _StreamBase):
    """Sign unary-stream calls; no message arrives unless the server proves itself first."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request)


def client_interceptors(secret: bytes, node_id: str, now: Clock = time.time) -> list[Any]:
    """Both client interceptors: a channel files each object under one kind of call only."""
    return [
        AuthClientInterceptor(secret, node_id, now),
        AuthStreamClientInterceptor(secret, node_id, now),
    ]
