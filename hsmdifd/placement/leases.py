"""Leases: the rpc-worker child this device runs while a root holds its layers.

One lease at a time: a new plan replaces the old lease. The lease ends, and the
child with it, when the root ends it, when the root is no longer live, or when
the daemon stops. A lease is granted only to the root this device follows
itself, under a policy at least as new as its own (fencing: a deposed root never
drives a worker); a refusal is ABORTED, for the root to ask again once the views
agree.

The rpc-worker listens on 127.0.0.1 only; the network reaches it through the
lease's `WorkerRelay`, which admits the holding root alone (its certificate and
the lease's token, returned in the `pb.Lease` reply over the authenticated peer
channel), one connection at a time. The relay port is open only while the lease
lasts: ending the lease closes the relay first, then ends the child. The child is
sent a keepalive byte every heartbeat and exits when none came for `dead_after`
seconds, so a frozen daemon's rpc-worker goes too; a child that ends closes its
relay at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import election
from hsmdifd.cluster.tls import DeviceCredentials
from hsmdifd.daemon import timing
from hsmdifd.daemon.children import start_child, stop_child
from hsmdifd.daemon.errors import RequestError
from hsmdifd.engine.relay import TOKEN_BYTES, WorkerRelay
from hsmdifd.engine.rpc import free_port

log = logging.getLogger(__name__)


LOOPBACK = "127.0.0.1"


@dataclass
class _Held:
    lease_id: str
    holder: str  # the root's node id
    endpoint: str  # the relay's, on the cluster address
    proc: asyncio.subprocess.Process
    relay: WorkerRelay
    keepalive: asyncio.Task[None]


@dataclass(eq=False)
class Leases:
    """The RPC lease this device grants as a worker: one root at a time.

    `refusal(epoch)` says why a lease asked under `epoch` is refused, or None. `host` is
    the cluster address relays listen on. `data_plane` is "tls" (needs `credentials`;
    what the daemon passes by default) or "plain". The rpc-worker gets a keepalive byte
    every `keepalive_interval` and exits after `dead_after` seconds without one.
    `released` runs each time an rpc-worker has exited (its memory is free again): the
    daemon measures the device anew then, so that a plan made right after counts that
    memory (this device is often the next root when the one it served is lost).
    """

    host: str
    cache_dir: Path
    threads: int
    refusal: Callable[[election.Epoch], str | None]
    _: KW_ONLY
    credentials: DeviceCredentials | None = None
    data_plane: str = "plain"
    keepalive_interval: float = timing.HEARTBEAT_INTERVAL
    dead_after: float = timing.DEAD_AFTER
    released: Callable[[], Awaitable[None]] | None = None
    _held: _Held | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    def __post_init__(self) -> None:
        if self.data_plane == "tls" and self.credentials is None:
            raise ValueError('data_plane = "tls" needs this device\'s TLS credentials')

    @property
    def holder(self) -> str | None:
        return self._held.holder if self._held else None

    async def start(self, request: pb.LeaseRequest, caller: str) -> pb.Lease:
        offered = election.Epoch(
            request.epoch.policy_version, request.epoch.root_id, request.epoch.generation
        )
        if offered.root_id != caller:
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED, "a lease is asked for by the root only"
            )
        async with self._lock:
            if reason := self.refusal(offered):
                raise RequestError(grpc.StatusCode.ABORTED, reason)
            await self._end()
            self._held = await self._start(caller, request.threads or self.threads)
            log.info(
                "lease %s for %s: relay on %s",
                self._held.lease_id,
                caller,
                self._held.endpoint,
            )
            return pb.Lease(
                lease_id=self._held.lease_id,
                endpoint=self._held.endpoint,
                token=self._held.relay.token,
            )

    async def _start(self, caller: str, threads: int) -> _Held:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        port = free_port(LOOPBACK)
        loopback = f"{LOOPBACK}:{port}"
        proc = await start_child(
            "hsmdifd.engine.rpc_worker",
            "--endpoint",
            loopback,
            "--cache-dir",
            str(self.cache_dir),
            "--threads",
            str(threads),
            "--keepalive",
            str(self.dead_after),
        )
        if proc is None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, f"the rpc-worker on {loopback} did not start"
            )
        relay = WorkerRelay(
            self.credentials,
            caller,
            secrets.token_bytes(TOKEN_BYTES),
            self.host,
            port,
            data_plane=self.data_plane,
        )
        try:
            await relay.start()
        except OSError as e:
            await stop_child(proc)
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, f"cannot listen for the relay on {self.host}: {e}"
            ) from e
        lease_id = str(uuid.uuid4())
        keepalive = asyncio.create_task(self._keepalive(lease_id, proc, relay))
        return _Held(lease_id, caller, relay.endpoint, proc, relay, keepalive)

    async def _keepalive(
        self, lease_id: str, proc: asyncio.subprocess.Process, relay: WorkerRelay
    ) -> None:
        """A byte to the rpc-worker every interval; closes the relay if the worker ends."""
        assert proc.stdin is not None
        try:
            while proc.returncode is None:
                proc.stdin.write(b".")
                try:
                    await asyncio.wait_for(proc.wait(), self.keepalive_interval)
                except TimeoutError:
                    continue
        except (BrokenPipeError, ConnectionResetError):
            await proc.wait()
        log.warning(
            "the rpc-worker of lease %s ended (status %s): its relay is closed",
            lease_id,
            proc.returncode,
        )
        await relay.close()
        await self._released()

    async def end(self, lease_id: str) -> None:
        async with self._lock:
            if self._held is not None and self._held.lease_id == lease_id:
                await self._end()

    async def holder_gone(self, live: set[str]) -> None:
        """End the lease when its root is no longer live."""
        if self._held is not None and self._held.holder not in live:
            log.info("the root holding lease %s is gone", self._held.lease_id)
            async with self._lock:
                await self._end()

    async def _end(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held.keepalive
            await held.relay.close()
            await stop_child(held.proc)
            log.info("lease %s ended; %s closed", held.lease_id, held.endpoint)
            await self._released()

    async def _released(self) -> None:
        if self.released is None:
            return
        try:
            await self.released()
        except Exception:
            log.exception("what runs after a lease's rpc-worker exited failed")

    async def close(self) -> None:
        async with self._lock:
            await self._end()
