"""The gRPC channel this device keeps to each peer address: its options, its proofs, and
what its failures mean."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster import peer_auth
from hsmdifd.daemon import timing

PROTOCOL_VERSION = 2
HELLO_METHOD = "/hsmdif.v1.Peer/Hello"
OPEN_METHODS = frozenset({HELLO_METHOD})
WRONG_CERTIFICATE = "its TLS certificate was not made with this cluster's secret"


@dataclass
class Link:
    """A channel to one peer address, and who proved to be at its other end."""

    channel: grpc.aio.Channel
    stub: pb_grpc.PeerAsyncStub
    task: asyncio.Task[None] | None = None
    proven: str | None = None  # the node id that answered our challenge on this link


def channel_options(interval: float) -> list[tuple[str, int | str]]:
    """Peer channel options: reconnect within a heartbeat, and find out within a couple of
    seconds that a connection died (a cut cable leaves TCP retransmitting for minutes)."""
    interval_ms = int(interval * 1000)
    keepalive_floor = int(timing.KEEPALIVE_FLOOR * 1000)
    return [
        ("grpc.initial_reconnect_backoff_ms", interval_ms),
        ("grpc.min_reconnect_backoff_ms", interval_ms),
        ("grpc.max_reconnect_backoff_ms", interval_ms),
        ("grpc.keepalive_time_ms", max(keepalive_floor, 2 * interval_ms)),
        ("grpc.keepalive_timeout_ms", max(keepalive_floor, 2 * interval_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_keepalive_options(interval: float) -> list[tuple[str, int | str]]:
    """What the peer server accepts of the channels above (a server refuses pings more
    frequent than it allows, closing the connection), and its own pings."""
    interval_ms = int(interval * 1000)
    keepalive_floor = int(timing.KEEPALIVE_FLOOR * 1000)
    return [
        ("grpc.keepalive_time_ms", max(keepalive_floor, 2 * interval_ms)),
        ("grpc.keepalive_timeout_ms", max(keepalive_floor, 2 * interval_ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            max(int(timing.PING_FLOOR * 1000), interval_ms),
        ),
        ("grpc.http2.max_ping_strikes", 0),
    ]


@dataclass(frozen=True)
class LinkSettings:
    """What every channel to a peer address is made with."""

    secret: bytes
    node_id: str
    interval: float  # the heartbeat interval
    credentials: grpc.ChannelCredentials | None
    extra: tuple[tuple[str, Any], ...] = ()

    def open(self, address: str, proven: Callable[[], str | None]) -> Link:
        """A channel to `address` whose calls carry proofs bound to the node id that
        `proven` says answered this device's challenge."""
        options = channel_options(self.interval) + list(self.extra)
        interceptors = peer_auth.client_interceptors(
            self.secret, self.node_id, proven, open_methods=OPEN_METHODS
        )
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(
                address, self.credentials, options=options, interceptors=interceptors
            )
        else:
            channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        return Link(channel=channel, stub=pb_grpc.PeerStub(channel))


def refused_certificate(error: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed in the TLS handshake over the other side's certificate: a
    device with another secret (gRPC says so only in the details)."""
    details = error.details() or ""
    return "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details
