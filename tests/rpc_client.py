"""A llama.cpp client for tests/test_rpc.py, run as its own process.

Registering RPC servers is process-global and a dead server aborts the process, so
every split run gets a fresh interpreter:

    python -m tests.rpc_client MODEL [--endpoint HOST:PORT]... [--n-gpu-layers K]
        [--split A B ...] [--tokens N | --forever]

It loads the model with llama.cpp's verbose log on stderr, then prints on stdout
`loaded SECONDS`, one `token ID` per greedy token as it is produced, and finally
`result JSON` holding the tokens and the logits of the first step.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hsmdifd.engine import rpc

PROMPT = b"hello world, the model"
N_CTX = 256


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.rpc_client")
    parser.add_argument("model")
    parser.add_argument("--endpoint", action="append", default=[])
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--split", type=float, nargs="*")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--forever", action="store_true", help="generate until killed")
    args = parser.parse_args()

    rpc.register_servers(args.endpoint)
    import llama_cpp

    started = time.monotonic()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_gpu_layers=args.n_gpu_layers,
        tensor_split=args.split or None,
        n_ctx=N_CTX,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        verbose=True,
    )
    print(f"loaded {time.monotonic() - started:.4f}", flush=True)

    prompt = llm.tokenize(PROMPT, add_bos=True)
    llm.eval(prompt)
    first_logits = llm.scores[llm.n_tokens - 1].tolist()
    tokens: list[int] = []
    while True:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        print(f"token {token}", flush=True)
        if len(tokens) >= args.tokens and not args.forever:
            break
        if llm.n_tokens >= N_CTX - 1:
            llm.reset()  # type: ignore[no-untyped-call]
            llm.eval(prompt)
        else:
            llm.eval([token])
    print("result " + json.dumps({"tokens": tokens, "logits": first_logits}), flush=True)


if __name__ == "__main__":
    main()
