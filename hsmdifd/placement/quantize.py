"""Quantize an F32, F16 or BF16 GGUF once, with llama.cpp's own quantizer, into a cache.

`quantize(source, "4bit" | "8bit", state_dir)` returns the file to load: the cached
Q4_K_M or Q8_0 copy when there is one, a new one otherwise, or the source itself
(with a note) when it is quantized already. The cache lives in
`<state_dir>/quantized/`, keyed by the source file's identity (its real path, size,
modification time and inode), so an edited or replaced source is quantized anew.

llama.cpp quantizes in a child process (`python -m hsmdifd.placement.quantize`): the daemon's
loop stays free, progress comes from the per-tensor lines llama.cpp prints, and a
cancelled quantization ends the child and removes its partial file. The output is
written under a temporary name and renamed into place whole, so the cache never holds
a partial file. Before starting, the free space of the cache's file system is
checked against an upper bound of the output size; a quantization that would not fit
is refused with the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType

from hsmdifd.daemon import children
from hsmdifd.placement.gguf_header import read_tensor_table
from hsmdifd.placement.gguf_model import read_model_shape

GIB = 1024**3
MARGIN_BYTES = 16 * 1024 * 1024  # for the file system's own needs, beyond the estimate


@dataclass(frozen=True)
class Level:
    name: str
    """The llama.cpp type name, as `llama-quantize` spells it."""
    ftype: int
    """llama.cpp's `llama_ftype` for the whole file."""
    bytes_per_weight: float
    """An upper bound: the largest block type this level gives a matrix with whole blocks."""


LEVELS = {
    "4bit": Level("Q4_K_M", 15, 210 / 256),  # Q4_K, with some matrices in Q6_K
    "8bit": Level("Q8_0", 7, 34 / 32),
}
_FALLBACK_BYTES_PER_WEIGHT = 34 / 32  # a row that is not whole K-blocks falls back, at most Q8_0
_FLOAT_TYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
}
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")

Progress = Callable[[float, str], None]


class QuantizeError(Exception):
    """A quantization that cannot be done; the message says why and what to do."""


class NoRoomError(QuantizeError):
    """No room for the quantized copy in the cache; the message gives the figures."""


@dataclass(frozen=True)
class Quantized:
    path: Path
    """The file to load."""
    made: bool
    """True when this call ran the quantizer; False for a cached copy or the source as is."""
    note: str = ""


def level(name: str) -> Level:
    try:
        return LEVELS[name]
    except KeyError:
        raise QuantizeError(
            f"unknown quantization {name!r}: give one of {', '.join(LEVELS)}"
        ) from None


def cache_path(source: Path, state_dir: Path, name: str) -> Path:
    """Where the `name` ("4bit", "8bit") copy of `source` is kept, keyed by its identity."""
    real = source.resolve()
    st = real.stat()
    identity = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_dev}\0{st.st_ino}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return state_dir / "quantized" / f"{real.stem}-{key}-{level(name).name}.gguf"


def estimate_bytes(source: Path, name: str) -> int:
    """An upper bound of the quantized file's size: the header, and each tensor at most.

    Read with the daemon's own header reader: milliseconds, where gguf.GGUFReader takes
    seconds on a large vocabulary."""
    per_weight = level(name).bytes_per_weight
    table = read_tensor_table(source)
    total = table.data_start
    for t in table.tensors:
        if len(t.dims) < 2 or t.qtype not in _FLOAT_TYPES:
            total += t.n_bytes  # norms and biases stay as they are
            continue
        n_elements = 1
        for d in t.dims:
            n_elements *= d
        whole_blocks = t.dims[0] % 256 == 0
        bound = per_weight if whole_blocks else max(per_weight, _FALLBACK_BYTES_PER_WEIGHT)
        total += min(t.n_bytes, int(n_elements * bound) + 64)
    return total


def quantized_types(source: Path) -> set[str]:
    """The non-float types of the source's matrices: empty when it can be quantized."""
    return {
        t.qtype.name
        for t in read_tensor_table(source).tensors
        if len(t.dims) >= 2 and t.qtype not in _FLOAT_TYPES
    }


async def quantize(
    source: Path,
    name: str,
    state_dir: Path,
    progress: Progress | None = None,
    threads: int = 0,
) -> Quantized:
    """The file to load for `source` at `name` ("4bit", "8bit"); QuantizeError if it cannot be.

    A damaged or missing source raises ModelFileError, as a load of it would.
    """
    target_level = level(name)
    await asyncio.to_thread(read_model_shape, source)  # the daemon's own checks and messages
    already = await asyncio.to_thread(quantized_types, source)
    if already:
        return Quantized(
            source,
            made=False,
            note=f"{source} is already quantized ({', '.join(sorted(already))}); "
            "loading it as it is",
        )
    target = cache_path(source, state_dir, name)
    if target.exists():
        return Quantized(target, made=False, note=f"using the {target_level.name} copy {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            stale.unlink(missing_ok=True)  # left by a daemon that was killed mid-way
        free = shutil.disk_usage(target.parent).free
    except OSError as e:
        raise QuantizeError(
            f"cannot use {target.parent} for quantized models: {e.strerror or e}; "
            "check the state directory's owner and mode (hsmdifd --check-config)"
        ) from None
    needed = await asyncio.to_thread(estimate_bytes, source, name) + MARGIN_BYTES
    if free < needed:
        raise NoRoomError(
            f"quantizing {source} to {target_level.name} needs up to {needed / GIB:.2f} GiB "
            f"in {target.parent}, which has {free / GIB:.2f} GiB free: free some space there, "
            f"or quantize elsewhere with `llama-quantize` and load that file"
        )
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        await _run_quantizer(source, partial, target_level, threads, progress)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return Quantized(target, made=True, note=f"quantized {source} to {target_level.name}")


async def _run_quantizer(
    source: Path, out: Path, lvl: Level, threads: int, progress: Progress | None
) -> None:
    child = await asyncio.create_subprocess_exec(
        *children.command(
            "hsmdifd.placement.quantize", str(source), str(out), str(lvl.ftype), str(threads)
        ),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert child.stdout is not None
    tail: list[str] = []
    try:
        async for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail = [*tail[-9:], line]
            match = _PROGRESS.search(line)
            if match and progress is not None:
                done, total, tensor = int(match[1]), int(match[2]), match[3]
                progress(done / max(total, 1), f"quantizing to {lvl.name}: {tensor}")
        returncode = await child.wait()
    except BaseException:  # cancelled: the child must not outlive the request
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await asyncio.shield(child.wait())
        raise
    if returncode != 0:
        detail = "; ".join(line for line in tail if line and not _PROGRESS.search(line))
        raise QuantizeError(
            f"llama.cpp could not quantize {source} to {lvl.name} (exit {returncode}): "
            f"{detail or 'no message'}"
        )


def main(argv: list[str]) -> int:
    """The child: quantize argv[0] into argv[1] as llama_ftype argv[2] with argv[3] threads."""
    import llama_cpp

    source, out, ftype, threads = argv
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(threads)
    rc = llama_cpp.llama_model_quantize(source.encode(), out.encode(), params)
    sys.stdout.flush()
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
