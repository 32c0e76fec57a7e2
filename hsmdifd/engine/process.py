"""One engine child process and the channel to it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import psutil

from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.daemon.children import sigkill_cause, start_child, stop_child
from hsmdifd.daemon.errors import RequestError


class EngineProcess:
    """One running engine process and the channel to it."""

    def __init__(self, proc: asyncio.subprocess.Process, socket_path: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
        self.stub = pb_grpc.EngineStub(self.channel)
        self.abandoned = ""  # why the daemon ended it mid-request, if it did

    @classmethod
    async def start(cls, socket_path: Path) -> EngineProcess:
        socket_path.unlink(missing_ok=True)
        proc = await start_child("hsmdifd.engine.child", "--socket", str(socket_path))
        if proc is None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                "the engine process did not start; see the daemon's log",
            )
        return cls(proc, socket_path)

    def private_bytes(self) -> int:
        """Resident memory that ending the child gives back: its RSS less file-backed
        pages (the mapped model file stays in the page cache, and may be charged to
        whoever read it first)."""
        try:
            info = psutil.Process(self.proc.pid).memory_info()
        except psutil.Error:
            return 0
        return max(0, int(info.rss) - int(getattr(info, "shared", 0)))

    async def stop(self) -> None:
        await self.channel.close(None)
        await stop_child(self.proc)
        self.socket_path.unlink(missing_ok=True)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = sigkill_cause() if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit status {returncode}"
