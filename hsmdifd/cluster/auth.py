"""The proofs every peer RPC carries, made and checked with the cluster secret.

Every device holds the same secret (cluster_secret.py); peer_auth.py puts these proofs
on calls and checks them as gRPC interceptors.

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

import hashlib
import heapq
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from hsmdifd.daemon import timing

log = logging.getLogger(__name__)

AUTH_KEY = "x-hsmdif-auth"
REPLY_KEY = "x-hsmdif-auth-reply"
TRAILER_KEY = "x-hsmdif-auth-body"
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
DEFAULT_SKEW = timing.PROOF_WINDOW
MAX_NONCES = 100_000

Metadata = tuple[tuple[str, str | bytes], ...]
MetadataIn = Iterable[tuple[str, str | bytes]] | None
Clock = Callable[[], float]
Context = grpc.aio.ServicerContext[Any, Any]

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_REQUEST = re.compile(
    r"v2\.([A-Za-z0-9_-]{1,128})\.([A-Za-z0-9_-]{1,128})\.([0-9]{1,16})"
    r"\.([0-9a-f]{32})\.([0-9a-f]{64})"
)
_REPLY = re.compile(r"v2\.([A-Za-z0-9_-]{1,128})\.([0-9a-f]{64})")


class AuthError(grpc.RpcError):
    """A proof that does not check out. An `RpcError`, so peer-call error handling sees it."""

    def __init__(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED):
        super().__init__(reason)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self)


def _mac(secret: bytes, *fields: str) -> str:
    return hmac.new(secret, "\n".join(fields).encode(), hashlib.sha256).hexdigest()


def check_id(node_id: str) -> None:
    if not _ID.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} is not 1-128 letters, digits, '-' or '_'")


def text(value: str | bytes) -> str:
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
    check_id(node_id)
    check_id(receiver)
    stamp, nonce = str(int(now() * 1000)), secrets.token_hex(16)
    mac = _mac(secret, "req", method, node_id, receiver, stamp, nonce, body)
    return ((AUTH_KEY, f"v2.{node_id}.{receiver}.{stamp}.{nonce}.{mac}"),), nonce


def sign_reply(secret: bytes, method: str, nonce: str, node_id: str, body: str = "") -> Metadata:
    """The metadata a server sends to prove it holds the secret: in the initial metadata
    bound to the request's nonce (body ''), in the trailing metadata to its reply too."""
    check_id(node_id)
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


@dataclass
class RequestVerifier:
    """The server's check of one request proof, with a bounded cache of recent nonces."""

    secret: bytes
    node_id: str
    skew: float = DEFAULT_SKEW
    now: Clock = time.time
    limit: int = MAX_NONCES
    _expiries: list[tuple[float, str]] = field(default_factory=list, init=False)
    _nonces: set[str] = field(default_factory=set, init=False)

    def verify(self, method: str, metadata: MetadataIn, body: str) -> tuple[str, str]:
        """The caller's node id and the nonce; `AuthError` with a short reason otherwise."""
        value = _one(metadata, AUTH_KEY)
        if value is None:
            raise AuthError("missing proof")
        match = _REQUEST.fullmatch(value)
        if match is None:
            raise AuthError("malformed proof")
        node_id, receiver, stamp, nonce, mac = match.groups()
        expected = _mac(self.secret, "req", method, node_id, receiver, stamp, nonce, body)
        if not hmac.compare_digest(mac, expected):
            raise AuthError("wrong cluster secret, or a request altered on the way")
        if receiver != self.node_id:
            raise AuthError(f"a proof for {receiver}, not for this device", PERMISSION_DENIED)
        now, sent = self.now(), int(stamp) / 1000
        if sent < now - self.skew:
            raise AuthError(
                f"stale request, sent {now - sent:.0f} s ago (a delayed or replayed call; "
                "if it keeps happening, check that the clocks agree)"
            )
        if sent > now + self.skew:
            raise AuthError(
                f"clock skew: the caller's clock is {sent - now:.0f} s ahead: check the clocks"
            )
        while self._expiries and self._expiries[0][0] < now:
            self._nonces.discard(heapq.heappop(self._expiries)[1])
        if nonce in self._nonces:
            raise AuthError("replayed request")
        if len(self._nonces) >= self.limit:
            raise AuthError("too many requests: try again", grpc.StatusCode.RESOURCE_EXHAUSTED)
        self._nonces.add(nonce)
        heapq.heappush(self._expiries, (sent + self.skew, nonce))
        return node_id, nonce
