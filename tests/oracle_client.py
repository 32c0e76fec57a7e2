"""llama.cpp RPC driven by hand, as the engine drives it: the oracle for split runs.

    python -m tests.oracle_client MODEL --endpoint HOST:PORT ... --n-gpu-layers K
        --split A B ... --n-ctx N --tokens N PROMPT

Registers the endpoints, loads with the same n_gpu_layers and tensor_split, and
prints the text of a greedy generation from the raw PROMPT.
"""

from __future__ import annotations

import argparse
import codecs
import subprocess
import sys
from pathlib import Path
from typing import Any

from hsmdifd.engine import rpc
from hsmdifd.engine.child import REPEAT_LAST_N, REPEAT_PENALTY

WORKER = [sys.executable, "-m", "hsmdifd.engine.rpc_worker"]
ORACLE = [sys.executable, "-m", "tests.oracle_client"]


def by_hand(
    hosts: dict[str, Any], plan: dict[str, Any], model: Path, prompt: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run this oracle on the split `plan` (`hsmdifctl plan --json`) with fresh
    rpc-workers on the same hosts (`hosts`: netns hosts by device name), passing `args`
    on; the workers end with it."""
    from tests.conftest import REPO, free_port_in

    workers, endpoints = [], []
    try:
        for device in plan["devices"][1:]:
            host = hosts[device["name"]]
            endpoint = f"{host.address}:{free_port_in(host)}"
            proc = host.popen(
                [*WORKER, "--endpoint", endpoint, "--threads", "2"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=REPO,
            )
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            workers.append(proc)
            endpoints += ["--endpoint", endpoint]
        result: subprocess.CompletedProcess[str] = hosts[plan["devices"][0]["name"]].run(
            [
                *ORACLE,
                str(model),
                prompt,
                *endpoints,
                "--n-gpu-layers",
                str(plan["n_gpu_layers"]),
                "--split",
                *(str(x) for x in plan["tensor_split"]),
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            check=False,
        )
    finally:
        for proc in workers:
            proc.kill()
            proc.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.oracle_client")
    parser.add_argument("model")
    parser.add_argument("prompt")
    parser.add_argument("--endpoint", action="append", default=[])
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--split", type=float, nargs="*")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=16)
    # A continuation: these token ids follow the prompt; print the ids produced after.
    parser.add_argument("--after", type=int, nargs="*", default=[])
    parser.add_argument("--ids", action="store_true", help="print token ids, not text")
    args = parser.parse_args()
    rpc.register_servers(args.endpoint)
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_gpu_layers=args.n_gpu_layers,
        tensor_split=args.split or None,
        n_ctx=args.n_ctx,
        n_threads=1,
        n_threads_batch=1,
        last_n_tokens_size=REPEAT_LAST_N,
        verbose=False,
    )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = []
    tokens = llm.tokenize(args.prompt.encode(), add_bos=True, special=False) + args.after
    ids: list[int] = []
    vocab = llm._model.vocab
    for produced, token in enumerate(
        llm.generate(
            tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=REPEAT_PENALTY
        ),
        1,
    ):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        text.append(decoder.decode(llm.detokenize([token])))
        ids.append(token)
        if produced >= args.tokens:
            break
    text.append(decoder.decode(b"", final=True))
    sys.stdout.write(" ".join(map(str, ids)) if args.ids else "".join(text))


if __name__ == "__main__":
    main()
