"""The model file a load uses: the default or the named one, its checked header, and its
quantized copy; every failure a RequestError with a sentence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.daemon.bundled import ensure_bundled_model
from hsmdifd.daemon.errors import RequestError
from hsmdifd.placement import planner, quantize
from hsmdifd.placement.gguf_header import ModelFileError, ModelNotFoundError, ModelUnreadableError
from hsmdifd.placement.gguf_model import ModelShape, read_model_shape

log = logging.getLogger(__name__)


async def source(model_path: str, default: str, state_dir: Path) -> Path:
    """The file `model_path` names (empty: the default model, prepared when bundled)."""
    path = model_path or default
    if not path:
        try:
            return await asyncio.to_thread(ensure_bundled_model, state_dir)
        except (OSError, ValueError) as e:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot prepare the bundled model in {state_dir}: {e}",
            ) from e
    return Path(path).expanduser()


async def read_shape(path: Path) -> ModelShape:
    """The checked header of the file at `path`."""
    try:
        return await asyncio.to_thread(read_model_shape, path)
    except ModelFileError as e:
        raise model_file_refused(e) from e


async def quantized(
    source: Path, level: str, state_dir: Path, threads: int
) -> AsyncGenerator[pb.LoadEvent | Path, None]:
    """Quantize `source` to `level` (or find its copy): the quantizer's progress, then
    its note, as load events; last, the file to load. Closing this early (a cancelled
    load) ends the quantizer, which leaves no partial file."""
    events: asyncio.Queue[pb.LoadEvent | None] = asyncio.Queue()

    def progress(fraction: float, stage: str) -> None:
        step = pb.LoadProgress(fraction=fraction, stage=stage)
        events.put_nowait(pb.LoadEvent(progress=step))

    task = asyncio.ensure_future(quantize.quantize(source, level, state_dir, progress, threads))
    task.add_done_callback(lambda _: events.put_nowait(None))
    try:
        while (event := await events.get()) is not None:
            yield event
        result = task.result()
    except quantize.NoRoomError as e:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
    except quantize.QuantizeError as e:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
    except ModelFileError as e:
        raise model_file_refused(e) from e
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        elif not task.cancelled():
            task.exception()  # retrieved, whether raised above or not
    log.info("%s", result.note)
    done = pb.LoadProgress(
        fraction=1.0 if result.made else 0.0,
        stage="quantized" if result.made else "checking",
        note=result.note,
    )
    yield pb.LoadEvent(progress=done)
    yield result.path


async def planned_copy(shape: ModelShape, level: str, state_dir: Path) -> ModelShape:
    """`shape` as its `level` copy would load, without quantizing: the copy's own
    shape when it is cached, `shape` itself when the file is quantized already, else
    `shape` scaled to the estimated size of the copy."""
    source = Path(shape.path)
    try:
        if await asyncio.to_thread(quantize.quantized_types, source):
            return shape
        cached = quantize.cache_path(source, state_dir, level)
        if cached.exists():
            return await read_shape(cached)
        size = await asyncio.to_thread(quantize.estimate_bytes, source, level)
    except quantize.QuantizeError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    except ModelFileError as e:
        raise model_file_refused(e) from e
    except OSError as e:
        raise model_file_refused(ModelUnreadableError(f"cannot read {source}: {e}")) from e
    return planner.quantized_shape(shape, size, repacked=level == "4bit")


def model_file_refused(error: ModelFileError) -> RequestError:
    code = grpc.StatusCode.NOT_FOUND
    if not isinstance(error, ModelNotFoundError):
        code = grpc.StatusCode.FAILED_PRECONDITION
    return RequestError(code, str(error))
