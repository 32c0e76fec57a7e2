"""Limit: decode tokens/s against the memory-bandwidth bound of this machine.

Decoding one token reads every layer's weights, the output matrix and the KV cache
written so far; at best it runs at copy bandwidth / those bytes. The bandwidth is
numpy's copy of 256 MiB arrays (read and write bytes counted, the best of 9, as
STREAM does), on 1 and on 2 threads; decoding is llama.cpp on this machine's cores
(no RPC, no namespace), the synthetic f32 model and the bundled Gemma 3 270M. A
stream that only reads can beat a copy, so a fraction a little over 1 is possible.
Prints a table and merges `limit` into bench/results.json.

    python -m bench.limit [--reps N] [--tokens N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, cache_dir, median, merge_results
from bench.distributed import MODEL
from bench.llama_rpc import PROMPT
from hsmdifd.daemon.bundled import ensure_bundled_model
from hsmdifd.placement.gguf_model import read_model_shape
from tests.conftest import REPO

ARRAY_BYTES = 256 * 1024 * 1024


def copy_bandwidth(threads: int, reps: int = 9) -> float:
    """GB/s of numpy copies on `threads` threads at once, each its own arrays (the best
    repetition, as STREAM reports it: the bound is what the machine can do)."""
    pairs = [(np.ones(ARRAY_BYTES // 8), np.empty(ARRAY_BYTES // 8)) for _ in range(threads)]
    times = []

    def copy(
        barrier: threading.Barrier, src: np.ndarray[Any, Any], dst: np.ndarray[Any, Any]
    ) -> None:
        barrier.wait()
        np.copyto(dst, src)

    for _ in range(reps):
        barrier = threading.Barrier(threads + 1)
        workers = [threading.Thread(target=copy, args=(barrier, *pair)) for pair in pairs]
        for w in workers:
            w.start()
        barrier.wait()
        start = time.perf_counter()
        for w in workers:
            w.join()
        times.append(time.perf_counter() - start)
    return 2 * ARRAY_BYTES * threads / min(times) / 1e9


def decode_rate(model: Path, threads: int, tokens: int, reps: int) -> float:
    """Median decode tokens/s of llama.cpp on `threads` threads (bench.llama_rpc)."""
    commands = ["load 0", "gen 8", *[f"gen {tokens}"] * reps, "quit"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.llama_rpc",
            str(model),
            "--threads",
            str(threads),
            "--n-ctx",
            "512",
        ],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=True,
    )
    replies = [json.loads(line) for line in r.stdout.splitlines()][2:]
    return median([float(a["tokens_per_s"]) for a in replies])


def bytes_per_token(model: Path, position: int) -> int:
    """Bytes one decode step reads: layers, output matrix, KV cache up to `position`."""
    shape = read_model_shape(model)
    kv = position * shape.kv_bytes_per_token_per_layer * shape.n_layer
    return sum(shape.layer_bytes) + shape.output_bytes + kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 32 tokens")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.tokens = 3, 32
    cores = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, cores})
    bandwidth = {t: copy_bandwidth(t) for t in thread_counts}
    models = {
        "synthetic": MODEL.path(),
        "gemma": ensure_bundled_model(cache_dir() / "bench-state"),
    }
    prompt_tokens = len(PROMPT.split()) + 1  # about: the byte-level tokens differ little
    out: dict[str, Any] = {}
    header = f"{'model':<11}{'threads':>8}{'MB/token':>10}{'bound t/s':>11}"
    print(f"{header}{'tokens/s':>10}{'fraction':>10}")
    for name, path in models.items():
        per_token = bytes_per_token(path, prompt_tokens + args.tokens // 2)
        by_threads = {}
        for t in thread_counts:
            rate = decode_rate(path, t, args.tokens, args.reps)
            bound = bandwidth[t] * 1e9 / per_token
            by_threads[str(t)] = {
                "tokens_per_s": round(rate, 2),
                "bound_tokens_per_s": round(bound, 2),
                "fraction_of_bound": round(rate / bound, 4),
            }
            print(
                f"{name:<11}{t:>8}{per_token / 1e6:>10.1f}{bound:>11.1f}{rate:>10.2f}"
                f"{rate / bound:>10.3f}"
            )
        out[name] = {"bytes_per_token": per_token, "model": path.name, "by_threads": by_threads}
    result = {
        "fraction_of_bound": {
            n: m["by_threads"][str(cores)]["fraction_of_bound"] for n, m in out.items()
        },
        "copy_bandwidth_gb_per_s": {str(t): round(b, 2) for t, b in bandwidth.items()},
        "models": out,
        "threads": cores,
        "tokens": args.tokens,
        "reps": args.reps,
    }
    merge_results(args.results, "limit", result)


if __name__ == "__main__":
    main()
