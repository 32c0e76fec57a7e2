"""The cluster secret and the proofs every peer RPC carries.

Every device holds the same secret: 32 random bytes, hex-encoded in a mode-0600 file.

A device first proves itself to a caller: `Peer.Hello` answers a fresh challenge with
HMAC(secret, "hello", challenge, caller, node_id). Only then does the caller send it
proofs of its own, each good for one request to that one receiver:
`x-hsmdif-auth: v2.<caller>.<receiver>.<unix_ms>.<nonce>.<mac>`, where
mac = HMAC-SHA256(secret, "req", method, caller, receiver, unix_ms, nonce, sha256(body))
(fields joined by newlines; the body in protobuf's deterministic encoding). The server
refuses with UNAUTHENTICATED a missing or malformed proof, a wrong MAC (another secret
or an altered body), a proof made for another receiver, a request more than `skew`
seconds (30 by default) old or ahead of its clock, and a nonce seen before within that
window. Before the handler runs it proves itself in its initial metadata
(`x-hsmdif-auth-reply: v2.<server>.<mac>` over the request's nonce), and a unary reply
carries a second proof in its trailing metadata over the nonce and the reply's digest
(`x-hsmdif-auth-body`); the caller checks both. A captured proof is worth nothing
elsewhere: not to another device, not for another body, not twice.

Between devices the channel is also TLS with per-device certificates (tls.py), which
encrypts everything these proofs do not hide.
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
from google.protobuf.message import Message

from hsmdif import keyfiles
from hsmdifd.daemon import timing
from hsmdifd.daemon.logs import LogLimiter

log = logging.getLogger(__name__)

AUTH_KEY = "x-hsmdif-auth"
REPLY_KEY = "x-hsmdif-auth-reply"
TRAILER_KEY = "x-hsmdif-auth-body"
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
SECRET_BYTES = keyfiles.SECRET_BYTES
MIN_SECRET_BYTES = 16
DEFAULT_SKEW = timing.PROOF_WINDOW
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
_REQUEST = re.compile(
    r"v2\.([A-Za-z0-9_-]{1,128})\.([A-Za-z0-9_-]{1,128})\.([0-9]{1,16})"
    r"\.([0-9a-f]{32})\.([0-9a-f]{64})"
)
_REPLY = re.compile(r"v2\.([A-Za-z0-9_-]{1,128})\.([0-9a-f]{64})")

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
    try:
        keyfiles.new_cluster_secret(path)
    except keyfiles.KeyFileError as e:
        raise SecretError(str(e)) from None


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


def digest(message: Any) -> str:
    """The SHA-256 of a message's bytes: raw bytes as they are, protobuf messages in
    their deterministic encoding (the same on both ends whatever the wire order)."""
    data = message if isinstance(message, bytes) else message.SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest()


def sign(
    secret: bytes,
    node_id: str,
    receiver: str,
    method: str,
    body: str,
    *,
    now: Clock = time.time,
) -> tuple[Metadata, str]:
    """The metadata proving one call to `method` on `receiver` with a body of digest
    `body`, and its nonce (to check the reply with)."""
    _check_id(node_id)
    _check_id(receiver)
    stamp, nonce = str(int(now() * 1000)), secrets.token_hex(16)
    mac = _mac(secret, "req", method, node_id, receiver, stamp, nonce, body)
    return ((AUTH_KEY, f"v2.{node_id}.{receiver}.{stamp}.{nonce}.{mac}"),), nonce


def sign_reply(secret: bytes, method: str, nonce: str, node_id: str, body: str = "") -> Metadata:
    """The metadata a server sends to prove it holds the secret: in the initial metadata
    bound to the request's nonce (body ''), in the trailing metadata to its reply too."""
    _check_id(node_id)
    key = TRAILER_KEY if body else REPLY_KEY
    return ((key, f"v2.{node_id}.{_mac(secret, 'rep', method, nonce, node_id, body)}"),)


def verify_reply(
    secret: bytes,
    method: str,
    nonce: str,
    metadata: MetadataIn,
    body: str = "",
    *,
    expected: str | None = None,
) -> str:
    """The server's node id once its proof (of the nonce, and of the reply `body` when
    given) checks out, and is `expected` when that is given; `AuthError` otherwise."""
    match = _REPLY.fullmatch(_one(metadata, TRAILER_KEY if body else REPLY_KEY) or "")
    if match is None:
        raise AuthError("the peer sent no valid proof of the cluster secret")
    node_id, mac = match.groups()
    if not hmac.compare_digest(mac, _mac(secret, "rep", method, nonce, node_id, body)):
        raise AuthError("the peer does not hold our cluster secret")
    if expected is not None and node_id != expected:
        raise AuthError(f"the peer answered as {node_id}, not {expected}")
    return node_id


def reply_node_id(initial_metadata: MetadataIn) -> str | None:
    """The server's node id in a reply that `AuthClientInterceptor` has already verified."""
    match = _REPLY.fullmatch(_one(initial_metadata, REPLY_KEY) or "")
    return match.group(1) if match else None


def hello_proof(secret: bytes, challenge: str, caller: str, node_id: str) -> str:
    """A device's answer to a challenge: proves it holds the secret before anyone sends
    it a proof of their own (which would bind its node id)."""
    return _mac(secret, "hello", challenge, caller, node_id)


def check_hello(secret: bytes, challenge: str, caller: str, node_id: str, proof: str) -> None:
    """`AuthError` unless `proof` answers `challenge` for `node_id`."""
    if not _ID.fullmatch(node_id) or not hmac.compare_digest(
        proof.encode(), hello_proof(secret, challenge, caller, node_id).encode()
    ):
        raise AuthError("the peer does not hold our cluster secret")


class RequestVerifier:
    """The server's check of one request proof, with a bounded cache of recent nonces."""

    def __init__(
        self,
        secret: bytes,
        node_id: str,
        skew: float = DEFAULT_SKEW,
        now: Clock = time.time,
        limit: int = MAX_NONCES,
    ) -> None:
        self._secret, self._node_id, self._skew, self._now = secret, node_id, skew, now
        self._limit = limit
        self._expiries: list[tuple[float, str]] = []
        self._nonces: set[str] = set()

    def verify(self, method: str, metadata: MetadataIn, body: str) -> tuple[str, str]:
        """The caller's node id and the nonce; `AuthError` with a short reason otherwise."""
        value = _one(metadata, AUTH_KEY)
        if value is None:
            raise AuthError("missing proof")
        match = _REQUEST.fullmatch(value)
        if match is None:
            raise AuthError("malformed proof")
        node_id, receiver, stamp, nonce, mac = match.groups()
        expected = _mac(self._secret, "req", method, node_id, receiver, stamp, nonce, body)
        if not hmac.compare_digest(mac, expected):
            raise AuthError("wrong cluster secret, or a request altered on the way")
        if receiver != self._node_id:
            raise AuthError(f"a proof for {receiver}, not for this device", PERMISSION_DENIED)
        now, sent = self._now(), int(stamp) / 1000
        if sent < now - self._skew:
            raise AuthError(
                f"stale request, sent {now - sent:.0f} s ago (a delayed or replayed call; "
                "if it keeps happening, check that the clocks agree)"
            )
        if sent > now + self._skew:
            raise AuthError(
                f"clock skew: the caller's clock is {sent - now:.0f} s ahead: check the clocks"
            )
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
        _check_id(node_id)
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
        method = _text(handler_call_details.method)
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
        _check_id(node_id)
        self._secret, self._node_id, self._now = secret, node_id, now
        self._receiver, self._open = receiver, open_methods

    async def _call(
        self, continuation: Callable[..., Any], details: Any, request: Any, unary: bool
    ) -> Any:
        method = _text(details.method)
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
