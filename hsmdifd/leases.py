"""Leases: the rpc-worker child this device runs while a root holds its layers.

One lease at a time: a new plan replaces the old lease. The lease ends, and the
child with it, when the root ends it, when the root is no longer live, or when
the daemon stops. A lease is granted only to the root this device follows
itself, under a policy at least as new as its own (fencing: a deposed root never
drives a worker); a refusal is ABORTED, for the root to ask again once the views
agree. The RPC port is open only while the lease lasts.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from hsmdifd import election
from hsmdifd.children import start_child, stop_child
from hsmdifd.errors import RequestError
from hsmdifd.proto import hsmdif_pb2 as pb
from hsmdifd.rpc import free_port

log = logging.getLogger(__name__)


@dataclass
class _Held:
    lease_id: str
    holder: str  # the root's node id
    endpoint: str
    proc: asyncio.subprocess.Process


class Leases:
    def __init__(
        self,
        host: str,
        cache_dir: Path,
        threads: int,
        refusal: Callable[[election.Epoch], str | None],
    ) -> None:
        """`refusal(epoch)` says why a lease asked under `epoch` is refused, or None."""
        self._host = host
        self._refusal = refusal
        self._cache_dir = cache_dir
        self._threads = threads
        self._held: _Held | None = None
        self._lock = asyncio.Lock()

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
            if reason := self._refusal(offered):
                raise RequestError(grpc.StatusCode.ABORTED, reason)
            await self._end()
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            port = free_port(self._host)
            endpoint = f"{self._host}:{port}"
            proc = await start_child(
                "hsmdifd.rpc_worker",
                "--endpoint",
                endpoint,
                "--cache-dir",
                str(self._cache_dir),
                "--threads",
                str(request.threads or self._threads),
            )
            if proc is None:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, f"the rpc-worker on {endpoint} did not start"
                )
            self._held = _Held(str(uuid.uuid4()), caller, endpoint, proc)
            log.info("lease %s for %s: rpc-worker on %s", self._held.lease_id, caller, endpoint)
            return pb.Lease(lease_id=self._held.lease_id, endpoint=endpoint)

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
            await stop_child(held.proc)
            log.info("lease %s ended; %s closed", held.lease_id, held.endpoint)

    async def close(self) -> None:
        async with self._lock:
            await self._end()
