"""The model plane on this device: which model to load, whether it fits, and
serialising loads, unloads and generations on the one engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from hsmdifd.bundled import ensure_bundled_model
from hsmdifd.config import Config
from hsmdifd.engine import Engine, LoadSpec
from hsmdifd.errors import RequestError
from hsmdifd.gguf_model import (
    ModelFileError,
    ModelNotFoundError,
    estimate_memory,
    read_model_shape,
)
from hsmdifd.proto import hsmdif_pb2 as pb

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class Models:
    """Loads, unloads and runs models on the local engine, one request at a time."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        usable_memory: Callable[[], int],
    ) -> None:
        self._config = config
        self._engine = engine
        self._usable_memory = usable_memory
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.in_flight = 0

    @property
    def info(self) -> pb.ModelInfo:
        return self._engine.info

    def reconfigure(self, config: Config) -> None:
        self._config = config

    async def resolve(self, request: pb.LoadRequest) -> LoadSpec:
        """Check the model file and that it fits; raise RequestError otherwise."""
        path = request.model_path or self._config.model.default
        if not path:
            try:
                path = str(await asyncio.to_thread(ensure_bundled_model, self._config.state_dir))
            except (OSError, ValueError) as e:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"cannot prepare the bundled model in {self._config.state_dir}: {e}",
                ) from e
        try:
            shape = await asyncio.to_thread(read_model_shape, Path(path).expanduser())
        except ModelNotFoundError as e:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(e)) from e
        except ModelFileError as e:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        n_ctx = request.max_seq_len or self._config.model.context_length
        if n_ctx < 16:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"--max-seq-len {n_ctx} is too small: give at least 16 tokens",
            )
        estimate = estimate_memory(shape, n_ctx)
        # What the loaded model holds comes back when it is replaced.
        usable = self._usable_memory() + self._engine.footprint()
        if estimate.total > usable:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{shape.name} does not fit this device: it needs about "
                f"{estimate.total // MIB} MiB at a context of {n_ctx} tokens (weights "
                f"{estimate.weights // MIB} MiB, KV cache {estimate.kv_cache // MIB} MiB, compute "
                f"{estimate.compute // MIB} MiB, runtime {estimate.margin // MIB} MiB) but "
                f"{usable // MIB} MiB are usable; try a smaller --max-seq-len or a smaller model",
            )
        return LoadSpec(
            shape=shape,
            context_length=n_ctx,
            threads=request.threads or self._config.threads,
            estimated_bytes=estimate.total,
        )

    async def load(self, request: pb.LoadRequest) -> AsyncIterator[pb.LoadEvent]:
        yield pb.LoadEvent(progress=pb.LoadProgress(fraction=0.0, stage="checking"))
        async with self._lock:
            spec = await self.resolve(request)
            log.info(
                "loading %s (context %d, %d threads)",
                spec.shape.path,
                spec.context_length,
                spec.threads,
            )
            async for event in self._engine.load(spec):
                yield event
            log.info("loaded %s in %.2f s", spec.shape.path, self.info.load_seconds)
            self._arm_idle_timer()

    async def unload(self) -> bool:
        async with self._lock:
            return await self._engine.unload()

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        """Stream an answer, loading the model first when none is ready."""
        self.in_flight += 1
        try:
            async with self._lock:
                self._cancel_idle_timer()
                if self._engine.state != pb.READY:
                    async for load_event in self._load_for_prompt():
                        if load_event.HasField("progress"):
                            yield pb.GenerateEvent(loading=load_event.progress)
                if request.max_tokens == 0:
                    request.max_tokens = self._config.model.max_tokens
                async for event in self._engine.generate(request):
                    yield event
        finally:
            self.in_flight -= 1
            self._arm_idle_timer()

    async def _load_for_prompt(self) -> AsyncIterator[pb.LoadEvent]:
        """Load the model that failed last, or the default one."""
        last = self._engine.last_spec
        if self._engine.state == pb.FAILED and last is not None:
            log.info("reloading %s after the engine failed", last.shape.path)
            spec = last
        else:
            spec = await self.resolve(pb.LoadRequest())
        async for event in self._engine.load(spec):
            yield event

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        keep_alive = self._config.model.keep_alive
        if keep_alive > 0 and self._engine.state == pb.READY and self.in_flight == 0:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(keep_alive, self._unload_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _unload_idle(self) -> None:
        async def unload() -> None:
            if self.in_flight == 0 and not self._lock.locked():
                log.info(
                    "unloading %s after %.0f s idle", self.info.path, self._config.model.keep_alive
                )
                await self.unload()

        self._idle_task = asyncio.get_running_loop().create_task(unload())

    async def close(self) -> None:
        self._cancel_idle_timer()
        with contextlib.suppress(Exception):
            await self._engine.unload()
