"""Resume: what an answer loses when a worker holding layers is SIGKILLed mid-answer.

Three hosts, each declaring a usable memory with which the planner needs exactly two
of them for the synthetic f32 model; the root and one worker hold it, the third is the
spare the answer goes on with. A greedy answer streams to a client on the root's
control socket; after `--kill-at` tokens the worker's daemon and rpc-worker are
SIGKILLed. The gap is from the kill to the next token reaching the client (median of
`--reps`), next to the model's first load time and the plain re-prefill time (the
engine, loaded and idle, asked to continue from the same tokens). The answer's token
ids are compared with an answer that lost nothing: tokens duplicated and tokens lost
(both must be 0). The killed worker is started again between repetitions. Prints one
line per repetition and merges `resume` into bench/results.json.

    sudo python -m bench.resume [--reps N] [--tokens N] [--kill-at N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    MIB,
    N_CTX,
    RESULTS,
    hsmdif_cluster,
    loaded_plan,
    median,
    merge_results,
    root_of,
    scratch_dir,
    usable_for,
)
from bench.distributed import MODEL
from hsmdifd.placement.gguf_model import read_model_shape
from tests.conftest import Daemon, child_pids
from tests.test_cluster import agree, wait_until
from tests.test_resume import Stream

TARGET_GAP_SECONDS = 3.0


def sigkill(d: Daemon) -> None:
    """SIGKILL a daemon and its children (its rpc-worker) at once."""
    assert d.proc is not None
    pids = [d.proc.pid, *child_pids(d.proc.pid)]
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    d.proc.wait()


def lost_and_duplicated(reference: list[int], seen: list[int]) -> tuple[int, int]:
    """Tokens of `reference` missing from `seen`, and tokens in `seen` beyond it."""
    lost = duplicated = 0
    matcher = difflib.SequenceMatcher(None, reference, seen, autojunk=False)
    for op, a, b, c, d in matcher.get_opcodes():
        if op in ("delete", "replace"):
            lost += b - a
        if op in ("insert", "replace"):
            duplicated += d - c
    return lost, duplicated


def measure(model: Path, reps: int, tokens: int, kill_at: int) -> dict[str, Any]:
    shape = read_model_shape(model)
    usable = usable_for(shape, N_CTX, 2)
    limit = 2 * usable + 768 * MIB
    with (
        scratch_dir() as base,
        hsmdif_cluster(
            3, model, base, usable_bytes=usable, memory_limit_bytes=limit, cpu_quota=None
        ) as (_, daemons),
    ):
        root = root_of(daemons)
        r = root.ctl("--json", "load", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"hsmdifctl load failed: {r.stderr.strip()}")
        first_load = float(json.loads(r.stdout)["load_seconds"])
        reference = Stream(root, tokens).run()
        if reference.error or len(reference.tokens) != tokens:
            raise RuntimeError(f"the reference answer failed: {reference.error}")
        rows: list[dict[str, Any]] = []
        for rep in range(reps):
            holders = [d["name"] for d in loaded_plan(root)["devices"]]
            if len(holders) != 2:
                raise RuntimeError(f"the plan uses {holders}, not two hosts")
            victim = next(d for d in daemons if d.dir.name == holders[1])
            answer = Stream(root, tokens, kill_at).run(functools.partial(sigkill, victim))
            if answer.error or answer.stats is None:
                raise RuntimeError(f"rep {rep}: the answer ended: {answer.error}")
            lost, duplicated = lost_and_duplicated(reference.tokens, answer.tokens)
            at = list(answer.stats.resumed_at)
            # The engine, loaded on the new split and idle, continuing from the same tokens
            # after another prompt (none of them left in its KV cache).
            kept = at[0] if at else kill_at
            other = Stream(root, 1)
            other.request.prompt = "z"
            other.run()
            prefill = Stream(root, kept + 1, produced=tuple(answer.tokens[:kept])).run()
            row = {
                "gap_seconds": round(answer.gap(), 3),
                "engine_gap_seconds": round(answer.stats.resume_gap_seconds, 3),
                "re_prefill_seconds": round(prefill.first_token_seconds(), 3),
                "resumed_at": at,
                "lost": victim.dir.name,
                "tokens": len(answer.tokens),
                "tokens_lost": lost,
                "tokens_duplicated": duplicated,
            }
            rows.append(row)
            print(f"rep {rep}: {json.dumps(row)}", flush=True)
            victim.start()
            wait_until(lambda: agree(list(daemons)), 60, f"{victim.dir.name} back")
            r = root.ctl("load", timeout=300)  # placed anew over all three, as at first
            if r.returncode != 0:
                raise RuntimeError(f"hsmdifctl load failed: {r.stderr.strip()}")
    gaps = [row["gap_seconds"] for row in rows]
    return {
        "gap_seconds": round(median(gaps), 3),
        "gaps": gaps,
        "target_gap_seconds": TARGET_GAP_SECONDS,
        "first_load_seconds": round(first_load, 3),
        "re_prefill_seconds": round(median([row["re_prefill_seconds"] for row in rows]), 3),
        "tokens_lost": sum(row["tokens_lost"] for row in rows),
        "tokens_duplicated": sum(row["tokens_duplicated"] for row in rows),
        "reps": rows,
        "model": MODEL.name,
        "model_mb": round(model.stat().st_size / MIB),
        "tokens": tokens,
        "kill_at": kill_at,
        "usable_mb_per_host": round(usable / MIB),
    }


def report_text(r: dict[str, Any]) -> str:
    """The RESULTS.md section (bench/report.py)."""
    rows = [
        f"| {i} | {row['lost']} | {row['resumed_at']} | {row['gap_seconds']:.2f} | "
        f"{row['engine_gap_seconds']:.2f} | {row['re_prefill_seconds']:.2f} | "
        f"{row['tokens_lost']} | {row['tokens_duplicated']} |"
        for i, row in enumerate(r["reps"])
    ]
    return (
        f"{r['model']} ({r['model_mb']} MB) on 2 of 3 hosts ({r['usable_mb_per_host']} MiB "
        f"usable each), a greedy answer of {r['tokens']} tokens; the worker holding layers "
        f"SIGKILLed after {r['kill_at']} tokens. Gap: kill to the next token at the client "
        f"(median {r['gap_seconds']:.2f} s, target {r['target_gap_seconds']:g} s), against "
        f"the model's first load ({r['first_load_seconds']:.2f} s) and a plain re-prefill "
        f"of the same tokens ({r['re_prefill_seconds']:.2f} s). Tokens lost "
        f"{r['tokens_lost']}, duplicated {r['tokens_duplicated']} (against an answer that "
        "lost nothing).\n\n"
        "| rep | lost | resumed at token | gap s | root's gap s | re-prefill s | lost | "
        "duplicated |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--kill-at", type=int, default=24)
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 48 tokens")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.tokens, args.kill_at = 2, 48, 12
    result = measure(MODEL.path(), args.reps, args.tokens, args.kill_at)
    print(
        f"gap {result['gap_seconds']:.2f} s (target {TARGET_GAP_SECONDS:g} s), first load "
        f"{result['first_load_seconds']:.2f} s, re-prefill {result['re_prefill_seconds']:.2f} s, "
        f"tokens lost {result['tokens_lost']}, duplicated {result['tokens_duplicated']}"
    )
    merge_results(args.results, "resume", result)


if __name__ == "__main__":
    main()
