"""The engine supervisor: runs the engine child and tracks its state.

States: IDLE (no child), LOADING, READY, FAILED (the last load failed or the
child died; `error` says why). The child owns the model; unloading ends the
child, which returns every byte to the OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from hsmdifd.children import start_child, stop_child
from hsmdifd.errors import RequestError
from hsmdifd.gguf_model import ModelShape
from hsmdifd.planner import Plan
from hsmdifd.proto import hsmdif_pb2 as pb
from hsmdifd.proto import hsmdif_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """What to load: a checked model, how to run it, and where its layers go."""

    shape: ModelShape
    context_length: int
    threads: int
    plan: Plan
    endpoints: tuple[str, ...] = ()  # leased RPC endpoints, in registration order

    @property
    def estimated_bytes(self) -> int:
        return self.plan.total_bytes


class _Child:
    """One running engine process and the channel to it."""

    def __init__(self, proc: asyncio.subprocess.Process, socket_path: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
        self.stub = pb_grpc.EngineStub(self.channel)
        self.abandoned = ""  # why the daemon ended it mid-request, if it did

    @classmethod
    async def start(cls, socket_path: Path) -> _Child:
        socket_path.unlink(missing_ok=True)
        proc = await start_child("hsmdifd.engine_child", "--socket", str(socket_path))
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
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit status {returncode}"


def _cancelled_itself() -> bool:
    """Whether the running task is being cancelled (its client went away), rather than
    waiting on a call whose channel was closed under it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def base_model_request(request: pb.GenerateRequest, name: str) -> tuple[pb.GenerateRequest, str]:
    """How a model without a chat template of its own (a base model) takes `request`,
    and the sentence that says so: a prompt is completed as written; a conversation
    still goes through chat turns, which such a model follows poorly."""
    prompt = request.raw or (
        request.complete_if_base
        and len(request.messages) == 1
        and request.messages[0].role == "user"
    )
    if not prompt:
        return request, (
            f"{name} is not instruction-tuned (its file has no chat template): the "
            "conversation is put in chat turns it was not trained on, so answers may read "
            "poorly; for such a model, a prompt to complete works better"
        )
    if not request.raw:
        as_written = pb.GenerateRequest()
        as_written.CopyFrom(request)
        as_written.ClearField("messages")
        as_written.prompt = request.messages[0].content
        as_written.raw = True
        request = as_written
    return request, (
        f"{name} is not instruction-tuned (its file has no chat template): it continues "
        "the prompt as written rather than answering it"
    )


class Engine:
    """Supervises at most one engine child; every public method is loop-safe."""

    def __init__(self, socket_path: Path) -> None:
        self._socket_path = socket_path
        self._child: _Child | None = None
        self._watch: asyncio.Task[None] | None = None
        self._info = pb.ModelInfo(state=pb.IDLE)

    @property
    def info(self) -> pb.ModelInfo:
        return self._info

    @property
    def state(self) -> pb.ModelState.ValueType:
        return self._info.state

    def footprint(self) -> int:
        """Memory the loaded model gives back when it is replaced (0 when none)."""
        return self._child.private_bytes() if self._child else 0

    async def load(self, spec: LoadSpec) -> AsyncIterator[pb.LoadEvent]:
        """Replace whatever is loaded by `spec`, yielding progress, then the model."""
        await self.unload()
        shape = spec.shape
        self._info = pb.ModelInfo(
            state=pb.LOADING,
            path=shape.path,
            name=shape.name,
            size_bytes=shape.size_bytes,
            context_length=spec.context_length,
            threads=spec.threads,
            architecture=shape.architecture,
            n_layer=shape.n_layer,
            estimated_bytes=spec.estimated_bytes,
            chat_template=shape.chat_template is not None,
        )
        child = None
        try:
            child = self._child = await _Child.start(self._socket_path)
            request = pb.EngineLoadRequest(
                model_path=shape.path,
                context_length=spec.context_length,
                threads=spec.threads,
                rpc_endpoints=spec.endpoints,
            )
            if spec.endpoints:
                request.n_gpu_layers = spec.plan.n_gpu_layers
                request.tensor_split.extend(spec.plan.tensor_split)
            async for event in child.stub.Load(request):
                if event.HasField("loaded"):
                    self._info.MergeFrom(event.loaded)
                    self._info.state = pb.READY
                    self._watch = asyncio.create_task(self._watch_child(child))
                    yield pb.LoadEvent(loaded=self._info)
                else:
                    yield event
        except (asyncio.CancelledError, GeneratorExit) as e:
            if isinstance(e, GeneratorExit) or _cancelled_itself():
                await self._stop_child()
                self._info = pb.ModelInfo(state=pb.IDLE)
                raise
            raise await self._load_failed(e, child) from e
        except Exception as e:
            error = await self._load_failed(e, child)
            if error is e:
                raise
            raise error from e

    async def _load_failed(self, error: BaseException, child: _Child | None) -> BaseException:
        error = await self._failed_child_error(error, "loading", child)
        await self._stop_child()
        self._info.state = pb.FAILED
        self._info.error = str(error)
        return error

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        child = self._child
        if child is None or self.state != pb.READY:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "no model is loaded")
        if not self._info.chat_template:
            request, notice = base_model_request(request, self._info.name or self._info.path)
            yield pb.GenerateEvent(notice=notice)
        try:
            async for event in child.stub.Generate(request):
                yield event
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError) and _cancelled_itself():
                raise
            raise await self._failed_child_error(e, "generating", child) from e

    async def abandon(self, reason: str) -> None:
        """End the child whatever it is doing, when what it waits on will never answer
        (llama.cpp waits on an RPC worker for ever). The request in flight fails with
        `reason`; the next prompt loads again."""
        child = self._child
        if child is None:
            return
        log.error("%s: ending the engine process", reason)
        child.abandoned = reason
        await self._stop_child()
        self._info.state = pb.FAILED
        self._info.error = reason

    async def _failed_child_error(
        self, error: BaseException, doing: str, child: _Child | None
    ) -> BaseException:
        """Turn an error from the child's channel into a sentence for the user.

        The child's death shows as UNAVAILABLE, or as a cancelled call when the channel
        was closed first (by the watcher, or by abandon(), which says why); either way
        the exit status tells.
        """
        cancelled = isinstance(error, asyncio.CancelledError)
        if not cancelled and not isinstance(error, grpc.aio.AioRpcError):
            return error
        if child is not None and child.abandoned:
            return RequestError(grpc.StatusCode.ABORTED, child.abandoned)
        code = grpc.StatusCode.CANCELLED
        details = "the call to the engine process was closed"
        if isinstance(error, grpc.aio.AioRpcError):
            code, details = error.code(), error.details() or error.code().name
        if child is not None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 2.0)
            if child.proc.returncode is not None:
                return RequestError(
                    grpc.StatusCode.ABORTED,
                    f"the engine process died while {doing} "
                    f"({describe_exit(child.proc.returncode)}); the model is no longer "
                    "loaded: the next prompt loads it again",
                )
        if code == grpc.StatusCode.CANCELLED:
            code = grpc.StatusCode.ABORTED  # the client did not cancel: never pass that on
        return RequestError(code, details)

    async def _watch_child(self, child: _Child) -> None:
        returncode = await child.proc.wait()
        if self._child is child:
            reason = describe_exit(returncode)
            log.error(
                "the engine process died (%s); %s is no longer loaded", reason, self._info.path
            )
            self._info.state = pb.FAILED
            self._info.error = f"the engine process died ({reason})"
            await self._stop_child()

    async def _stop_child(self) -> None:
        child, self._child = self._child, None
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
        if child is not None:
            await child.stop()

    async def unload(self) -> bool:
        """End the child; True when a model was loaded."""
        was_loaded = self.state == pb.READY
        await self._stop_child()
        self._info = pb.ModelInfo(state=pb.IDLE)
        return was_loaded

    @staticmethod
    def child_socket(runtime_dir: Path) -> Path:
        return runtime_dir / f"engine-{os.getpid()}.sock"
