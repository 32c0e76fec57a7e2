"""llama.cpp RPC driven by hand, timed: the reference the benchmarks compare against.

    python -m bench.llama_rpc MODEL [--endpoint HOST:PORT]... [--n-ctx N] [--threads N]

Registers the endpoints (in order, as the engine does), then answers commands read
one per line on stdin with one JSON line each on stdout:

    load K [A B ...]   load with n_gpu_layers=K and tensor_split=[A, B, ...]
                       -> {"load_seconds": S}
    gen N              greedy generation of N tokens from PROMPT
                       -> {"ttft_ms": T, "tokens_per_s": R, "tokens": N}
    fill               evaluate a prompt that fills the context -> {"tokens": N}
    rss                -> {"rss": bytes resident in this process}
    quit

With --verbose, llama.cpp's log (its buffer sizes among it) goes to stderr.

A new `load` frees the model loaded before, so one process measures many splits
over the same registered servers. Timing is that of bench.standalone: time to the
first token, then tokens per second from the first token to the last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

import psutil

from hsmdifd.engine import rpc
from hsmdifd.engine.child import REPEAT_LAST_N, REPEAT_PENALTY

PROMPT = "once upon a time"


def generate(llm: Any, tokens: int, text: str = PROMPT) -> dict[str, float]:
    """Time a greedy generation of `tokens` tokens after `text`: time to first token,
    then tokens per second from the first token to the last."""
    prompt = llm.tokenize(text.encode(), add_bos=True, special=False)
    start = time.perf_counter()
    first = 0.0
    produced = 0
    for _token in llm.generate(
        prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=REPEAT_PENALTY
    ):
        produced += 1
        if produced == 1:
            first = time.perf_counter()
        if produced >= tokens:
            break
    end = time.perf_counter()
    rate = (produced - 1) / (end - first) if produced > 1 else 0.0
    return {"ttft_ms": (first - start) * 1000, "tokens_per_s": rate, "tokens": produced}


def fill(llm: Any) -> int:
    """Evaluate the prompt repeated to one token short of the context; the token count."""
    piece = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    tokens = [llm.token_bos()] + piece * (llm.n_ctx() // len(piece))
    tokens = tokens[: llm.n_ctx() - 1]
    llm.reset()
    llm.eval(tokens)
    return len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.llama_rpc")
    parser.add_argument("model")
    parser.add_argument("--endpoint", action="append", default=[])
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    if args.endpoint:
        rpc.register_servers(args.endpoint)
    import llama_cpp

    llm: Any = None
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "load":
            llm = None
            gc.collect()
            started = time.perf_counter()
            k = int(rest[0])
            split = [float(x) for x in rest[1:]]
            llm = llama_cpp.Llama(
                model_path=args.model,
                n_gpu_layers=k,
                tensor_split=split or None,
                n_ctx=args.n_ctx,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                last_n_tokens_size=REPEAT_LAST_N,
                verbose=args.verbose,
            )
            reply: dict[str, float] = {"load_seconds": time.perf_counter() - started}
        elif command == "gen":
            reply = generate(llm, int(rest[0]))
        elif command == "fill":
            reply = {"tokens": fill(llm)}
        elif command == "rss":
            reply = {"rss": psutil.Process().memory_info().rss}
        else:
            break
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
