"""What this device offers the cluster: memory, speed and load, and the figures it reports.

Memory is what is available, capped by the cgroup limit where one applies (v1 or v2),
minus the configured reserve. Speed is a short memory-bandwidth benchmark, cached in
the state directory under a hardware fingerprint. Nothing here raises on a missing or
odd cgroup file: what cannot be read is treated as no limit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import psutil

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.daemon import cgroups, timing
from hsmdifd.placement import rpc_protocol

if TYPE_CHECKING:
    from hsmdifd.daemon.config import Config
    from hsmdifd.daemon.node import Identity

log = logging.getLogger(__name__)

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
MIB = 1024 * 1024
BENCH_MATRIX_BYTES = 64 * MIB
"""Larger than the last-level cache of the devices we run on, so the benchmark reads RAM."""

# cpu_percent(interval=None) compares with the previous call; the first call returns 0.0.
psutil.cpu_percent(interval=None)


@dataclass(frozen=True)
class CgroupMemory:
    limit_bytes: int | None  # smallest limit on our cgroup or its parents; None: no limit
    usage_bytes: int | None  # usage of the cgroup setting the limit, less reclaimable cache


@dataclass(frozen=True)
class MemoryFigures:
    total_bytes: int  # physical memory, or the cgroup limit when smaller
    usable_bytes: int  # available (under the cgroup too) less the reserve; or the override
    limit_bytes: int  # the cgroup limit; 0 when none applies
    declared: bool  # True when usable_bytes is the configured override

    def as_profile(self) -> pb.DeviceProfile:
        """These figures in the fields of a device's profile."""
        return pb.DeviceProfile(
            memory_total_bytes=self.total_bytes,
            memory_usable_bytes=self.usable_bytes,
            memory_limit_bytes=self.limit_bytes,
            memory_declared=self.declared,
        )


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):  # missing, unreadable, not text
        return ""


def _to_int(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:  # empty, "max", garbage
        return None
    return value if value >= 0 else None


def _cgroup_dirs(proc_cgroup: Path, cgroup_root: Path, controller: str) -> tuple[int, list[Path]]:
    """The cgroup version and this process's directories for `controller`, innermost first."""
    version, base, cgroup = 0, cgroup_root, ""
    for line in _read(proc_cgroup).splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controller in controllers.split(","):  # v1 wins: a controller has one hierarchy
            version, base, cgroup = 1, cgroup_root / controller, path
            break
        if hierarchy == "0" and controllers == "":
            version, cgroup = 2, path
    if version == 0:
        return 0, []
    parts = [p for p in PurePosixPath(cgroup).parts if p != "/"]
    if ".." in parts:  # outside our cgroup namespace: only the root we can see applies
        parts = []
    # The daemon's own leaf (and its children's) is not the device: measure above them.
    parts = cgroups.outside_leaves(parts, lambda parent: cgroups.laid_out(base.joinpath(*parent)))
    return version, [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def read_cgroup_memory(
    proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> CgroupMemory:
    """The memory limit and usage of this process's cgroup (v1 or v2).

    A parent's limit applies too, so the smallest limit up to the root wins, with the
    usage of the cgroup that sets it. A limit above physical memory or >= 2**62 (v1's
    "unlimited"), "max", or a file that is missing or unreadable means no limit.
    """
    version, dirs = _cgroup_dirs(proc_cgroup, cgroup_root, "memory")
    if version == 2:
        limit_file, usage_file, prefix = "memory.max", "memory.current", ""
    else:
        limit_file, usage_file, prefix = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_"
    physical = psutil.virtual_memory().total
    limit: int | None = None
    where = dirs[0] if dirs else None
    for directory in dirs:
        value = _to_int(_read(directory / limit_file))
        if value is None or value > physical or value >= 2**62:
            continue
        if limit is None or value < limit:
            limit, where = value, directory
    if where is None:
        return CgroupMemory(limit_bytes=None, usage_bytes=None)
    usage = _to_int(_read(where / usage_file))
    if usage is not None:
        usage = max(0, usage - reclaimable_cache(_read(where / "memory.stat"), prefix))
    return CgroupMemory(limit_bytes=limit, usage_bytes=usage)


RECLAIMABLE = ("active_file", "inactive_file")
"""The file-backed page cache on both LRU lists (v2 `file` would add shmem, which only
swap can free)."""
NOT_RECLAIMABLE = ("file_mapped", "file_dirty", "file_writeback")
"""Cache that is in use: pages mapped by a process (a loaded model's weights, which
would be read back from disk at once) and pages that must first be written."""
V1_NAMES = {"file_mapped": "mapped_file", "file_dirty": "dirty", "file_writeback": "writeback"}


def reclaimable_cache(stat: str, prefix: str = "") -> int:
    """Bytes of page cache in a cgroup's `memory.stat` that the kernel frees on demand.

    Both the active and the inactive file lists count: a model file read by an engine
    that has since ended stays on the active list, and counting it as used made the
    device look 150 MiB smaller after every unload. Mapped, dirty and writeback pages do
    not count. `prefix` is "total_" for v1, whose hierarchical keys also differ in name.
    """
    values: dict[str, int] = {}
    for line in stat.splitlines():
        key, _, value = line.partition(" ")
        if (number := _to_int(value.strip())) is not None:
            values[key] = number

    def get(name: str) -> int:
        if prefix:
            name = prefix + V1_NAMES.get(name, name)
        return values.get(name, 0)

    return max(0, sum(map(get, RECLAIMABLE)) - sum(map(get, NOT_RECLAIMABLE)))


def memory_figures(
    reserve_bytes: int = 0, override_bytes: int | None = None, cgroup: CgroupMemory | None = None
) -> MemoryFigures:
    """This device's memory; `cgroup` defaults to `read_cgroup_memory()`.

    A declared `override_bytes` replaces the measured usable figure (the reserve is then
    not subtracted), but is never more than the total.
    """
    vm = psutil.virtual_memory()
    cg = read_cgroup_memory() if cgroup is None else cgroup
    total, available = vm.total, vm.available
    if cg.limit_bytes is not None:
        total = min(total, cg.limit_bytes)
        available = min(available, cg.limit_bytes - (cg.usage_bytes or 0))
    if override_bytes is not None:
        usable = max(0, min(override_bytes, total))
    else:
        usable = max(0, min(available, total) - reserve_bytes)
    return MemoryFigures(
        total_bytes=total,
        usable_bytes=usable,
        limit_bytes=cg.limit_bytes or 0,
        declared=override_bytes is not None,
    )


def _cpu_model() -> str:
    cpuinfo = (line.partition(":") for line in _read(Path("/proc/cpuinfo")).splitlines())
    found: dict[str, str] = {}
    for key, _, value in cpuinfo:
        found.setdefault(key.strip(), value.strip())
    # x86 names the model; arm64 Linux gives only the part number and the board.
    keys = ("model name", "CPU part", "Hardware", "Model")
    return "/".join(found.get(k, "") for k in keys) if found else platform.processor()


def _cpu_quota(proc_cgroup: Path, cgroup_root: Path) -> str:
    version, dirs = _cgroup_dirs(proc_cgroup, cgroup_root, "cpu")
    names = ["cpu.max"] if version == 2 else ["cpu.cfs_quota_us", "cpu.cfs_period_us"]
    return ",".join(_read(d / name) for d in dirs for name in names)


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on: its affinity (else os.cpu_count()), capped by
    the tightest cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), rounded up: 1.5 CPUs of quota can keep two threads busy."""
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    version, dirs = _cgroup_dirs(proc_cgroup, cgroup_root, "cpu")
    for directory in dirs:
        if version == 2:
            quota_text, _, period_text = _read(directory / "cpu.max").partition(" ")
        else:
            quota_text = _read(directory / "cpu.cfs_quota_us")
            period_text = _read(directory / "cpu.cfs_period_us")
        quota, period = _to_int(quota_text), _to_int(period_text.strip())
        if quota and period:  # "max", -1 or missing: no quota here
            cpus = min(cpus, max(1, math.ceil(quota / period)))
    return max(1, cpus)


def hardware_fingerprint(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> str:
    """A short hash that changes when the CPU, cores, memory, arch or CPU quota change."""
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    facts = [
        _cpu_model(),
        str(os.cpu_count()),
        str(usable_cores),
        str(psutil.virtual_memory().total),
        platform.machine(),
        _cpu_quota(proc_cgroup, cgroup_root),
    ]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]


def measure_speed(threads: int = 1, seconds: float = timing.SPEED_BENCHMARK) -> float:
    """GB/s of float32 matrix-vector products on a 64 MiB matrix; higher is faster.

    llama.cpp decode is memory-bound matrix-vector work, so this tracks its speed.
    Blocking for about `seconds`; the best of the repetitions counts. The product is
    numpy's own einsum loop, which uses one thread and releases the GIL, so the figure
    is that of exactly `threads` threads, each taking a block of rows; no BLAS and no
    process-wide thread setting is involved.
    """
    threads = max(1, threads)
    cols = 4096
    matrix = np.ones((BENCH_MATRIX_BYTES // (4 * cols), cols), dtype=np.float32)
    vector = np.ones(cols, dtype=np.float32)
    out = np.empty(matrix.shape[0], dtype=np.float32)
    bounds = np.linspace(0, matrix.shape[0], threads + 1).astype(int)
    blocks = [(matrix[a:b], out[a:b]) for a, b in itertools.pairwise(bounds)]

    def product(block: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]) -> None:
        np.einsum("ij,j->i", block[0], vector, out=block[1])

    best = math.inf
    with ThreadPoolExecutor(max_workers=threads) as pool:
        deadline = time.perf_counter() + seconds
        repetitions = 0
        while repetitions < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            list(pool.map(product, blocks))
            best = min(best, time.perf_counter() - start)
            repetitions += 1
    return matrix.nbytes / max(best, 1e-9) / 1e9


def cached_speed(
    state_dir: Path, *, refresh: bool = False, measure: Callable[[], float] = measure_speed
) -> float:
    """The speed cached in `state_dir/speed.json`, measured again when the hardware
    fingerprint differs, the file is missing or corrupt, or `refresh` is set."""
    path = state_dir / "speed.json"
    fingerprint = hardware_fingerprint()
    try:
        cached = json.loads(path.read_text())
        speed = float(cached["speed"])
        if not refresh and cached["fingerprint"] == fingerprint and 0 < speed < math.inf:
            return speed
    except (OSError, ValueError, TypeError, KeyError):
        pass  # missing or corrupt: measure again
    speed = measure()
    log.info("measured speed %.2f GB/s (fingerprint %s)", speed, fingerprint)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".speed.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            json.dump({"fingerprint": fingerprint, "speed": speed, "measured_at": now}, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise
    return speed


def cpu_load() -> float:
    """CPU utilisation of the whole machine, 0..1, since the previous call.

    The module primes psutil at import, so the first call measures from then on.
    """
    return min(1.0, max(0.0, psutil.cpu_percent(interval=None) / 100.0))


def device_profile(
    config: Config, identity: Identity, refresh_speed: bool = False
) -> pb.DeviceProfile:
    """The figures this device reports (blocking: the speed benchmark may run)."""
    res = config.resources
    override = res.memory_override_mb * MIB if res.memory_override_mb else None
    memory = memory_figures(res.memory_reserve_mb * MIB, override)
    device = pb.DeviceProfile(id=identity.node_id, name=identity.name, address=identity.address)
    device.MergeFrom(memory.as_profile())
    device.speed = res.speed_override or cached_speed(config.state_dir, refresh=refresh_speed)
    device.load, device.threads = cpu_load(), config.threads
    device.role, device.state = "root", "alive"
    device.declared = memory.declared or bool(res.speed_override)
    device.measured_at, device.rpc_protocol = time.time(), rpc_protocol.protocol()
    return device
