"""Memory: hsmdif's estimate versus what llama.cpp takes, per device.

Measured as hsmdifd/placement/memory_estimate.py describes: the buffers llama.cpp logs (model, KV,
output, compute) and the growth of the process's RSS from before the model is
created to after a prompt that fills the context. The figure compared is the larger
of the two, the memory a device must be able to give: llama.cpp reserves buffers it
may not touch (Gemma's logits for a whole batch), and the process touches memory it
does not log (the vocabulary, the CPU backend's work buffer).

Standalone: the tiny test model, the bundled Gemma 3 270M and the synthetic f32
model, each loaded alone (estimate: memory_estimate.estimate_memory). Split: the
synthetic model over 3 hosts by llama.cpp RPC by hand, as hsmdifd.placement.planner.plan
places it (estimate: each share's bytes; RSS of the root's client and of each
rpc-worker). Prints a table and merges `memory` into bench/results.json.

    sudo python -m bench.memory [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    MIB,
    PREFIX,
    RESULTS,
    HandRpc,
    cache_dir,
    merge_results,
    splits_for,
    usable_for,
)
from bench.distributed import MODEL
from hsmdifd.daemon.bundled import ensure_bundled_model
from hsmdifd.placement.gguf_model import read_model_shape
from hsmdifd.placement.memory_estimate import estimate_memory
from hsmdifd.placement.planner import DeviceCapacity, Strategy, plan
from tests.conftest import REPO
from tests.netns import Cluster
from tests.tinymodel import write_tiny_llama

TARGET = 0.10
_BUFFER = re.compile(r"^\w+:\s+(?P<device>\S+)\s+(?P<kind>\w+) buffer size =\s+(?P<mib>[\d.]+) MiB")


def logged_buffers(log: str) -> dict[str, float]:
    """Bytes of the buffers llama.cpp logged, by device ("CPU" for the local ones)."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        m = _BUFFER.match(line)
        if m:
            device = "CPU" if m["device"].startswith("CPU") else m["device"]
            out[device] = out.get(device, 0.0) + float(m["mib"]) * MIB
    return out


def compare(estimate: int, logged: float, rss: int) -> dict[str, Any]:
    measured = max(logged, rss)
    return {
        "estimate_mib": round(estimate / MIB, 1),
        "logged_mib": round(logged / MIB, 1),
        "rss_growth_mib": round(rss / MIB, 1),
        "measured_mib": round(measured / MIB, 1),
        "error": round(estimate / measured - 1, 4),
        "within_target": abs(estimate / measured - 1) <= TARGET,
    }


RUNS = 3
"""Fresh processes per standalone model: the RSS growth moves by about a MiB from one
to the next (13.0 to 14.0 MiB for the tiny model), 10 % of the tiny model's; the
median is compared."""


def standalone(model: Path, n_ctx: int, threads: int) -> dict[str, Any]:
    """One device: the model loaded alone in a fresh process, RUNS times."""
    options = ["--verbose", "--n-ctx", str(n_ctx), "--threads", str(threads)]
    growths = []
    for _ in range(RUNS):
        r = subprocess.run(
            [sys.executable, "-m", "bench.llama_rpc", str(model), *options],
            input="rss\nload 0\nfill\nrss\nquit\n",
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
            check=True,
        )
        before, _load, _fill, after = (json.loads(line) for line in r.stdout.splitlines())
        growths.append(after["rss"] - before["rss"])
    logged = sum(logged_buffers(r.stderr).values())  # the same buffers every run
    estimate = estimate_memory(read_model_shape(model), n_ctx).total
    return {"n_ctx": n_ctx, **compare(estimate, logged, int(statistics.median(growths)))}


def split(model: Path, n_ctx: int) -> dict[str, Any]:
    """The model over 3 hosts, placed by the planner; each device's estimate and use."""
    shape = read_model_shape(model)
    usable = usable_for(shape, n_ctx, 3)
    with Cluster(3, prefix=PREFIX) as cluster, tempfile.TemporaryDirectory() as tmp:
        names = [f"h{h.index}" for h in cluster.hosts]
        devices = [
            DeviceCapacity(n, n, f"{h.address}:9999", usable, 1.0)
            for n, h in zip(names, cluster.hosts, strict=True)
        ]
        p = plan(shape, n_ctx, devices, Strategy.CAPACITY)
        counts = [next((s.n_layers for s in p.shares if s.device.name == n), 0) for n in names]
        estimates = {s.device.name: s.bytes for s in p.shares}
        log = Path(tmp) / "llama.log"
        with HandRpc(cluster.hosts[0], cluster.hosts[1:], model, n_ctx, log=log) as rpc:
            pids = dict(zip(names, [rpc.client_pid, *rpc.worker_pids], strict=True))
            rpc.ask("rss")  # the client has started: llama_cpp is imported, servers registered
            before = {n: psutil.Process(pid).memory_info().rss for n, pid in pids.items()}
            rpc.load(*splits_for(counts))
            rpc.ask("fill")
            after = {n: psutil.Process(pid).memory_info().rss for n, pid in pids.items()}
            endpoints = dict(zip(rpc.endpoints, names[1:], strict=True))
        logged = {
            endpoints.get(device.partition("[")[2].rstrip("]"), names[0]): b
            for device, b in logged_buffers(log.read_text()).items()
        }
    return {
        "n_ctx": n_ctx,
        "layers": dict(zip(names, counts, strict=True)),
        "devices": {
            n: compare(estimates[n], logged.get(n, 0.0), after[n] - before[n])
            for n in names
            if n in estimates
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="contexts of 512 tokens")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    n_ctx = 512 if args.quick else 2048
    models = cache_dir() / "bench-models"
    models.mkdir(parents=True, exist_ok=True)
    tiny = models / "tiny.gguf"
    if not tiny.exists():
        write_tiny_llama(tiny)
    gemma = ensure_bundled_model(cache_dir() / "bench-state")
    synthetic = MODEL.path()
    alone = {
        "tiny": standalone(tiny, 512, 2),
        "gemma": standalone(gemma, n_ctx, 2),
        "synthetic": standalone(synthetic, n_ctx, 2),
    }
    spread = split(synthetic, n_ctx)
    rows = [(name, "alone", r) for name, r in alone.items()]
    rows += [("synthetic", f"split {n}", r) for n, r in spread["devices"].items()]
    print(f"{'model':<11}{'device':<10}{'estimate':>10}{'logged':>9}{'RSS':>9}{'error':>8}")
    for name, device, r in rows:
        print(
            f"{name:<11}{device:<10}{r['estimate_mib']:>10.1f}{r['logged_mib']:>9.1f}"
            f"{r['rss_growth_mib']:>9.1f}{r['error']:>+8.1%}"
        )
    errors = [r["error"] for _, _, r in rows]
    result = {
        "worst_error": max(errors, key=abs),
        "within_target": all(abs(e) <= TARGET for e in errors),
        "target": TARGET,
        "standalone": alone,
        "split": {"model": MODEL.name, **spread},
        "models": {"tiny": tiny.name, "gemma": gemma.name, "synthetic": MODEL.name},
    }
    merge_results(args.results, "memory", result)


if __name__ == "__main__":
    main()
