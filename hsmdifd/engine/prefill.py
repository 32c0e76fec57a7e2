"""Evaluating a prompt in the engine child: in chunks, looking for a cancellation
between them, keeping what the KV cache holds of the previous request."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from hsmdifd.daemon import timing

log = logging.getLogger(__name__)


MIN_CHUNK = 8
"""Tokens a prefill evaluates at the least at a time (but for the prompt's last few):
a split model takes about as long for 8 tokens as for 1."""


def next_chunk(chunk: int, elapsed: float, fastest: float, n_batch: int) -> int:
    """The next prefill chunk after one of `chunk` tokens took `elapsed` seconds, the
    fastest full chunk so far having taken `fastest`: sized to take timing.PREFILL_CHUNK, or
    twice the fastest when that is longer (a split model spends most of an evaluation
    on reading its weights and on round trips, whatever the number of tokens: one token
    at a time would take as long per token as decoding)."""
    budget = max(timing.PREFILL_CHUNK, 2 * fastest)
    return max(MIN_CHUNK, min(n_batch, int(chunk * budget / max(elapsed, 1e-6))))


def prefill(llm: Any, tokens: list[int], ended: threading.Event) -> bool:
    """Evaluate the prompt in chunks sized by `next_chunk` (at most n_batch tokens),
    looking for a cancellation between them; False when cancelled.

    The tokens of the previous request that start this prompt stay in the KV cache
    (a chat repeats its history), as llama-cpp-python's own generate() would keep them.
    """
    cached = 0
    for a, b in zip(llm.input_ids[: llm.n_tokens], tokens[:-1], strict=False):
        if a != b:
            break
        cached += 1
    llm.n_tokens = min(llm.n_tokens, cached)  # eval() drops the KV cache past this
    chunk, fastest = MIN_CHUNK, float("inf")
    started, kept = time.monotonic(), llm.n_tokens
    while llm.n_tokens < len(tokens):
        if ended.is_set():
            return False
        start = time.monotonic()
        batch = tokens[llm.n_tokens : llm.n_tokens + chunk]
        llm.eval(batch)
        elapsed = time.monotonic() - start
        if len(batch) == chunk:  # the prompt's last few tokens say little of the cost
            fastest = min(fastest, elapsed)
            chunk = next_chunk(chunk, elapsed, fastest, llm.n_batch)
    took = time.monotonic() - started
    log.info("evaluated %d tokens in %.2f s (%d cached)", len(tokens) - kept, took, kept)
    return not ended.is_set()
