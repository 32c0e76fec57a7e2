"""Scaling: hsmdif's tokens/s and per-token latency on 1 to 4 hosts, same model.

For N hosts, each daemon declares the usable memory with which the planner needs
exactly N of them (see bench.distributed for the hosts: one core, one thread each).
Decoding a single stream through a pipeline is sequential, so more hosts add room
for a bigger model, not speed: what this measures is what each hop costs. Prints a
table and merges `scaling` into bench/results.json.

    sudo python -m bench.scaling [--hosts N ...] [--reps N] [--tokens N] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.common import RESULTS, merge_results
from bench.distributed import MODEL, measure, run_facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 24 tokens")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    if args.quick:
        args.hosts, args.reps, args.tokens = [1, 2, 3], 2, 24
    model = MODEL.path()
    by_hosts: dict[str, Any] = {}
    print(f"{'hosts':<7}{'layers':<28}{'tokens/s':>9}{'ms/token':>10}{'TTFT ms':>9}{'B/token':>9}")
    stopped = ""
    for n in args.hosts:
        try:
            r = measure(n, model, args.reps, args.tokens, hand=False)
        except KeyboardInterrupt:  # bench.run's budget ran out: keep what was measured
            stopped = f"stopped at its time budget before {n} hosts"
            print(f"== {stopped}", flush=True)
            break
        by_hosts[str(n)] = {
            "tokens_per_s": r["hsmdif_tokens_per_s"],
            "ms_per_token": r["ms_per_token"],
            "ttft_ms": r["hsmdif_ttft_ms"],
            "wire_bytes_per_token": r["wire_bytes_per_token"],
            "layers": r["layers"],
            "output_layer": r["output_layer"],
        }
        layers = " ".join(f"{k}:{v}" for k, v in r["layers"].items())
        print(
            f"{n:<7}{layers:<28}{r['hsmdif_tokens_per_s']:>9.2f}{r['ms_per_token']:>10.2f}"
            f"{r['hsmdif_ttft_ms']:>9.1f}{r['wire_bytes_per_token']:>9}",
            flush=True,
        )
    result = {
        "by_hosts": by_hosts,
        **run_facts(model, args.tokens, args.reps),
        **({"partial": stopped} if stopped else {}),
    }
    merge_results(args.results, "scaling", result)


if __name__ == "__main__":
    main()
