"""Standalone: hsmdifctl prompt through a real daemon versus llama-cpp-python called directly.

Same model (the bundled Gemma 3 270M), threads, context, prompt and greedy
sampling; the two are run alternately in one process run, and the figures are
medians. Prints a table and merges `standalone` into bench/results.json.

    python -m bench.standalone [--reps N] [--tokens N] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.llama_rpc import generate
from hsmdifd.daemon.bundled import ensure_bundled_model
from hsmdifd.engine.child import REPEAT_LAST_N

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results.json"
PROMPT = "The history of the city of Paris begins"
CONTEXT = 2048


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsmdif" / "bench-state"


def run_direct(llm: Any, tokens: int) -> tuple[float, float]:
    """(time to first token in ms, decode tokens/s) of llama-cpp-python's own loop."""
    timing = generate(llm, tokens, PROMPT)
    return timing["ttft_ms"], timing["tokens_per_s"]


def run_hsmdif(socket: Path, tokens: int, prompt: str = PROMPT) -> tuple[float, float]:
    """The same through `hsmdifctl prompt`, timed by hsmdifctl at the client."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hsmdifctl",
            "--socket",
            str(socket),
            "prompt",
            prompt,
            "--raw",
            "--json",
            "--temperature",
            "0",
            "--max-tokens",
            str(tokens),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    answer = json.loads(result.stdout)
    return float(answer["time_to_first_token_ms"]), float(answer["tokens_per_second"])


def start_daemon(directory: Path, threads: int) -> subprocess.Popen[bytes]:
    config = directory / "hsmdifd.toml"
    config.write_text(
        f"[resources]\nthreads = {threads}\nmemory_reserve_mb = 0\n"
        f"[model]\ncontext_length = {CONTEXT}\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hsmdifd",
            "--config",
            str(config),
            "--socket",
            str(directory / "ctl.sock"),
            "--state-dir",
            str(cache_dir()),
            "--no-mdns",
            "--http",
            "off",
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (directory / "ctl.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("hsmdifd did not start")
        time.sleep(0.05)
    subprocess.run(
        [sys.executable, "-m", "hsmdifctl", "--socket", str(directory / "ctl.sock"), "load"],
        check=True,
        capture_output=True,
    )
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 32 tokens")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.tokens = 2, 32

    import llama_cpp

    model = ensure_bundled_model(cache_dir())
    llm = llama_cpp.Llama(
        str(model),
        n_ctx=CONTEXT,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        last_n_tokens_size=REPEAT_LAST_N,
        verbose=False,
    )
    direct: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="hsm-bench-", dir="/tmp") as tmp:
        daemon = start_daemon(Path(tmp), args.threads)
        try:
            run_direct(llm, 8)  # warm both up
            run_hsmdif(Path(tmp) / "ctl.sock", 8)
            for _ in range(args.reps):
                direct.append(run_direct(llm, args.tokens))
                ours.append(run_hsmdif(Path(tmp) / "ctl.sock", args.tokens))
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)

    d_ttft = statistics.median(t for t, _ in direct)
    d_tps = statistics.median(r for _, r in direct)
    h_ttft = statistics.median(t for t, _ in ours)
    h_tps = statistics.median(r for _, r in ours)
    result = {
        "decode_ratio": round(h_tps / d_tps, 4),
        "ttft_overhead_ms": round(h_ttft - d_ttft, 2),
        "direct_tokens_per_s": round(d_tps, 2),
        "hsmdif_tokens_per_s": round(h_tps, 2),
        "direct_ttft_ms": round(d_ttft, 2),
        "hsmdif_ttft_ms": round(h_ttft, 2),
        "threads": args.threads,
        "tokens": args.tokens,
        "reps": args.reps,
        "context": CONTEXT,
        "model": model.name,
    }
    print(f"{'':<28}{'llama-cpp-python':>18}{'hsmdifctl prompt':>18}{'ratio / diff':>14}")
    print(f"{'decode tokens/s':<28}{d_tps:>18.2f}{h_tps:>18.2f}{h_tps / d_tps:>14.3f}")
    print(
        f"{'time to first token (ms)':<28}{d_ttft:>18.1f}{h_ttft:>18.1f}{h_ttft - d_ttft:>+14.1f}"
    )
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    results["standalone"] = result
    args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
