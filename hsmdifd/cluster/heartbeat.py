"""The heartbeat task of one peer address: prove it holds the secret, then exchange
statuses every interval; and the check that a goodbye is true."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import auth
from hsmdifd.cluster.election import MemberState
from hsmdifd.cluster.peer_channel import (
    PROTOCOL_VERSION,
    WRONG_CERTIFICATE,
    Link,
    refused_certificate,
)
from hsmdifd.daemon import timing

if TYPE_CHECKING:
    from hsmdifd.cluster.membership import Membership

log = logging.getLogger(__name__)


async def confirm_gone(m: Membership, address: str) -> None:
    """Dead unless `address` proves, at once, that it is still there."""
    link = m.links.get(address)
    if link is None:
        return
    challenge = secrets.token_hex(16)
    try:
        reply = await link.stub.Hello(
            pb.HelloRequest(challenge=challenge, caller_id=m.node_id),
            timeout=m.interval,
        )
        auth.check_hello(m.secret, challenge, m.node_id, reply.node_id, reply.proof)
    except grpc.RpcError:
        record = m.peers.get(address)
        if record is not None:
            record.gone = True
            m.refresh()


async def hello(m: Membership, address: str, link: Link) -> bool:
    """Ask `address` to prove it holds the secret; True once it has."""
    challenge = secrets.token_hex(16)
    try:
        reply = await link.stub.Hello(
            pb.HelloRequest(challenge=challenge, caller_id=m.node_id),
            timeout=2 * m.interval,
        )
        auth.check_hello(m.secret, challenge, m.node_id, reply.node_id, reply.proof)
    except auth.AuthError as e:
        m.mark(address, MemberState.UNAUTHENTICATED, e.details())
        return False
    except grpc.aio.AioRpcError as e:
        if refused_certificate(e):
            m.mark(address, MemberState.UNAUTHENTICATED, WRONG_CERTIFICATE)
        else:
            log.debug("hello to %s failed: %s", address, e.code().name)
        return False
    if reply.protocol_version != PROTOCOL_VERSION:
        m.mark(address, MemberState.INCOMPATIBLE, f"protocol {reply.protocol_version}")
        return False
    link.proven = reply.node_id
    record = m.peers.get(address)
    if record is not None:
        record.problem, record.reason = None, ""
    return True


async def heartbeat(m: Membership, address: str, link: Link) -> None:
    loop = asyncio.get_running_loop()
    backoff = m.interval
    while True:
        started = loop.time()
        record = m.peers.get(address)
        if record is None:
            return
        if record.hinted and record.status is None:
            # Announced, and not yet a device of its own: it has a bounded time to
            # become one (an address that relays to a real device never does).
            left = m.unproven_timeout - (m.now() - record.first_seen)
            if left <= 0:
                log.info("forgetting %s: it never proved it holds the cluster secret", address)
                m.drop(address)
                return
        else:
            left = float("inf")
        if link.proven is None and not await hello(m, address, link):
            if record.hinted:  # an address nobody listed: ask less and less often
                backoff = min(backoff * 2, timing.HELLO_BACKOFF_MAX)
            pause = min(backoff - (loop.time() - started), left)
            await asyncio.sleep(max(0.0, pause))
            continue
        backoff = m.interval
        try:
            reply = await link.stub.Status(m.local_status(), timeout=2 * m.interval)
        except auth.AuthError as e:
            m.mark(address, MemberState.UNAUTHENTICATED, e.details())
            link.proven = None
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # Another daemon at this address now, or it lost the secret: prove anew.
                log.info("heartbeat to %s refused: %s", address, e.details())
                link.proven = None
            else:
                log.debug("heartbeat to %s failed: %s", address, e.code().name)
                m.refresh()
        else:
            if reply.device.id != link.proven:
                log.warning(
                    "%s answered as %s, not as %s: proving anew",
                    address,
                    reply.device.id,
                    link.proven,
                )
                link.proven = None
                continue
            if reply.device.id == m.node_id and reply.started_at == (m.local_status().started_at):
                m.drop(address)  # an address that reaches this very daemon
                return
            if reply.device.address != address:
                if record.hinted:
                    # Announced here, but the device lives at its own address (which
                    # observing it follows): this one is a relay, or a stale record.
                    m.observe(reply)
                    m.drop(address)
                    return
                record.alias_of = reply.device.address
            m.observe(reply)
        await asyncio.sleep(max(0.0, m.interval - (loop.time() - started)))
