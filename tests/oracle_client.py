"""llama.cpp RPC driven by hand, as the engine drives it: the oracle for split runs.

    python -m tests.oracle_client MODEL --endpoint HOST:PORT ... --n-gpu-layers K
        --split A B ... --n-ctx N --tokens N PROMPT

Registers the endpoints, loads with the same n_gpu_layers and tensor_split, and
prints the text of a greedy generation from the raw PROMPT.
"""

from __future__ import annotations

import argparse
import codecs
import sys

from hsmdifd.engine import rpc
from hsmdifd.engine.child import REPEAT_LAST_N, REPEAT_PENALTY


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.oracle_client")
    parser.add_argument("model")
    parser.add_argument("prompt")
    parser.add_argument("--endpoint", action="append", default=[])
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--split", type=float, nargs="*")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=16)
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
    tokens = llm.tokenize(args.prompt.encode(), add_bos=True, special=False)
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
        if produced >= args.tokens:
            break
    text.append(decoder.decode(b"", final=True))
    sys.stdout.write("".join(text))


if __name__ == "__main__":
    main()
