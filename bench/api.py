"""The HTTP API: streamed /v1/completions versus `hsmdifctl prompt --raw` (raw text) and
streamed /v1/chat/completions versus `hsmdifctl chat` (one user turn, through the same
chat template), same daemon, same model (the bundled Gemma 3 270M), greedy, run
alternately in one process run (medians). Each pair has its prompt, and a raw prompt
always follows a chat turn, so that no request finds its start in the engine's KV
cache (the first token aside); then 1, 2, 4
and 8 concurrent streams: aggregate tokens/s and p50/p99 time to first token, which
shows the queue. Prints tables and merges `api` into bench/results.json.

    python -m bench.api [--reps N] [--tokens N] [--threads N] [--quick] [--no-concurrent]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.standalone import CONTEXT, PROMPT, RESULTS, cache_dir, run_hsmdif
from hsmdifd.daemon.bundled import bundled_model_path

LEVELS = (1, 2, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_daemon(directory: Path, threads: int, port: int) -> subprocess.Popen[bytes]:
    config = directory / "hsmdifd.toml"
    config.write_text(
        f"[resources]\nthreads = {threads}\nmemory_reserve_mb = 0\n"
        f"[model]\ncontext_length = {CONTEXT}\n"
    )
    sock = directory / "ctl.sock"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "hsmdifd", "--config", str(config), "--socket", str(sock)),
            *("--state-dir", str(cache_dir()), "--no-mdns", "--http", f"127.0.0.1:{port}"),
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("hsmdifd did not start")
        time.sleep(0.05)
    ctl = [sys.executable, "-m", "hsmdifctl", "--socket", str(sock), "load"]
    subprocess.run(ctl, check=True, capture_output=True)
    return proc


def stream(port: int, path: str, tokens: int, prompt: str = PROMPT) -> tuple[float, float, int]:
    """(time to first token in ms, decode tokens/s, tokens) of one streamed request,
    timed here at the client as hsmdifctl times itself."""
    body: dict[str, Any] = {
        "model": bundled_model_path(cache_dir()).stem,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {response.read()[:300]!r}")
    first = 0.0
    produced = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            produced = event["usage"]["completion_tokens"]
        choice = (event.get("choices") or [{}])[0]
        if not first and (choice.get("text") or choice.get("delta", {}).get("content")):
            first = time.perf_counter()
    ended = time.perf_counter()
    conn.close()
    rate = (produced - 1) / (ended - first) if produced > 1 and ended > first else 0.0
    return (first - started) * 1000, rate, produced


STATS_LINE = re.compile(
    r"Generated (\d+) tokens .*Inference speed: ([\d.]+) tokens/second "
    r"\(first token after (\d+) ms\)"
)


def run_chat(sock: Path, tokens: int, prompt: str) -> tuple[float, float]:
    """(time to first token in ms, decode tokens/s) of one `hsmdifctl chat` turn, timed
    by hsmdifctl at the client (its closing line on stderr)."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "hsmdifctl", "--socket", str(sock), "chat"),
            *("--temperature", "0", "--max-tokens", str(tokens)),
        ],
        input=prompt + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    found = STATS_LINE.search(result.stderr)
    if not found:
        raise RuntimeError(f"hsmdifctl chat printed no figures: {result.stderr[-300:]!r}")
    return float(found[3]), float(found[2])


def concurrent(port: int, streams: int, tokens: int) -> tuple[float, list[float]]:
    """Aggregate tokens/s of `streams` requests at once, and each one's TTFT (ms)."""
    results: list[tuple[float, float, int]] = []

    def one() -> None:
        results.append(stream(port, "/v1/chat/completions", tokens))

    threads = [threading.Thread(target=one) for _ in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return sum(n for _, _, n in results) / wall, [t for t, _, _ in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 48 tokens")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    parser.add_argument(
        "--no-concurrent", action="store_true", help="the side-by-side pairs only, no streams"
    )
    args = parser.parse_args()
    if args.quick:
        args.reps, args.tokens = 3, 48
    port = free_port()
    side: dict[str, list[tuple[float, float]]] = {
        "cli": [],
        "cli_chat": [],
        "chat": [],
        "completions": [],
    }
    levels: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in LEVELS}
    with tempfile.TemporaryDirectory(prefix="hsm-bench-", dir="/tmp") as tmp:
        sock = Path(tmp) / "ctl.sock"
        daemon = start_daemon(Path(tmp), args.threads, port)
        try:
            run_hsmdif(sock, 8)  # warm up
            stream(port, "/v1/chat/completions", 8)
            for rep in range(args.reps):
                # A pair (hsmdifctl, HTTP) has one prompt, so one answer; a raw prompt
                # always follows a chat turn and the other way round, so no request
                # finds more than the first token of its prompt in the engine's KV cache.
                raw, turn = f"Story {2 * rep}. {PROMPT}", f"Story {2 * rep + 1}. {PROMPT}"
                side["cli"].append(run_hsmdif(sock, args.tokens, raw))
                side["cli_chat"].append(run_chat(sock, args.tokens, turn))
                side["completions"].append(stream(port, "/v1/completions", args.tokens, raw)[:2])
                side["chat"].append(stream(port, "/v1/chat/completions", args.tokens, turn)[:2])
            for _ in range(0 if args.no_concurrent else max(1, args.reps // 2)):
                for n in LEVELS:
                    rate, ttfts = concurrent(port, n, args.tokens)
                    levels[n][0].append(rate)
                    levels[n][1].extend(ttfts)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)

    med = {
        k: (statistics.median(t for t, _ in v), statistics.median(r for _, r in v))
        for k, v in side.items()
    }
    result: dict[str, Any] = {
        "cli_ttft_ms": round(med["cli"][0], 2),
        "cli_tokens_per_s": round(med["cli"][1], 2),
        "cli_chat_ttft_ms": round(med["cli_chat"][0], 2),
        "cli_chat_tokens_per_s": round(med["cli_chat"][1], 2),
        "threads": args.threads,
        "tokens": args.tokens,
        "reps": args.reps,
        "model": bundled_model_path(cache_dir()).name,
    }
    print(f"{'':<30}{'ttft ms':>10}{'tokens/s':>10}{'decode ratio':>14}{'ttft diff':>11}")
    for name, against, label in (
        ("completions", "cli", "/v1/completions stream"),
        ("chat", "cli_chat", "/v1/chat/completions stream"),
    ):
        cli_ttft, cli_tps = med[against]
        cli_label = "hsmdifctl prompt --raw" if against == "cli" else "hsmdifctl chat"
        print(f"{cli_label:<30}{cli_ttft:>10.1f}{cli_tps:>10.2f}{'':>14}{'':>11}")
        ttft, tps = med[name]
        ratio, diff = tps / cli_tps, ttft - cli_ttft
        result[f"{name}_ttft_ms"] = round(ttft, 2)
        result[f"{name}_tokens_per_s"] = round(tps, 2)
        result[f"{name}_decode_ratio"] = round(ratio, 4)
        result[f"{name}_ttft_overhead_ms"] = round(diff, 2)
        print(f"{label:<30}{ttft:>10.1f}{tps:>10.2f}{ratio:>14.3f}{diff:>+11.1f}")
    print(f"\n{'streams':<10}{'aggregate tokens/s':>20}{'p50 ttft ms':>14}{'p99 ttft ms':>14}")
    result["concurrent"] = {}
    for n, (rates, ttfts) in ((n, v) for n, v in levels.items() if v[0]):
        rate = statistics.median(rates)
        p50, p99 = percentile(ttfts, 0.5), percentile(ttfts, 0.99)
        result["concurrent"][str(n)] = {
            "aggregate_tokens_per_s": round(rate, 2),
            "p50_ttft_ms": round(p50, 1),
            "p99_ttft_ms": round(p99, 1),
        }
        print(f"{n:<10}{rate:>20.2f}{p50:>14.1f}{p99:>14.1f}")
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    results["api"] = result
    args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
