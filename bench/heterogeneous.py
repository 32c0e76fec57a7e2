"""Heterogeneous: split rules compared on 3 hosts of 100 %, 50 % and 25 % of a core.

Every host gets a CPU quota with a 4 ms period (the shortest that a 25 % quota
allows, 1 ms being the least quota), and one llama.cpp thread: with the harness's
100 ms period a pipeline stage that is idle most of the time runs at full speed,
so the quota would limit only its duty cycle, not its speed. Memory caps are equal
and leave room for at most 60 % of the layers on any host, so at least two hosts
are needed (the cgroup limit is the cap plus room for the process itself).

Rules, all run as llama.cpp RPC by hand (rpc-workers in h1 and h2, the client in h0,
the root), on the same hosts and model:

- hsmdif's default strategy (hsmdifd.daemon.config.ModelConfig.strategy), `capacity` and
  `latency`: hsmdifd.placement.planner.plan over DeviceCapacity figures with usable memory =
  the cap and speed = hsmdifd.placement.profile.measure_speed run in each host under its quota
  (the median of three calls);
- llama.cpp's default: every host, layers in proportion to free memory;
- exo's rule: the fewest hosts whose memory covers the model, layers in proportion
  to memory;
- the best split found by brute force over the layer counts (each briefly measured).

The rules' splits and the best few candidates are then measured again in alternating
rounds; figures are medians, ratios the median of the ratios within each round. Also
shown, as a diagnosis: the planner's splits with the sustained speed of each host
(bytes over elapsed time) instead of measure_speed's best repetition, and with what
measure_speed reports under the harness's 100 ms period. Prints a table and merges
`heterogeneous` into bench/results.json.

    sudo python -m bench.heterogeneous [--rounds N] [--tokens N] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    N_CTX,
    PREFIX,
    RESULTS,
    HandRpc,
    Synthetic,
    measure_speed_in,
    median,
    merge_results,
    run_in,
    splits_for,
)
from hsmdifd.daemon.config import ModelConfig
from hsmdifd.placement.gguf_model import ModelShape, read_model_shape
from hsmdifd.placement.memory_estimate import estimate_memory
from hsmdifd.placement.planner import DeviceCapacity, Plan, Strategy, plan
from tests.netns import Cluster

MODEL = Synthetic(n_layer=10, n_embd=1024, n_ff=2816)
QUOTAS = (1.0, 0.5, 0.25)
CPU_PERIOD_US = 4000
MAX_SHARE = 0.6  # of the model's layers, on any one host
PROCESS_ROOM = 256 * MIB  # cgroup room above the cap for the process itself (Python, libraries)

Counts = tuple[int, ...]

SUSTAINED_SPEED = """
import time, numpy as np
m = np.ones((4096, 4096), dtype=np.float32); v = np.ones(4096, dtype=np.float32)
out = np.empty(4096, dtype=np.float32)
n, start = 0, time.perf_counter()
while n < 3 or time.perf_counter() - start < {seconds}:
    np.einsum("ij,j->i", m, v, out=out); n += 1
print(n * m.nbytes / (time.perf_counter() - start) / 1e9)
"""


def set_cpu_period(cluster: Cluster, period_us: int) -> None:
    """Give every host's CPU quota the period `period_us`, keeping its share."""
    for host, share in zip(cluster.hosts, cluster.cpu_quotas, strict=True):
        if share is None:
            continue
        quota = max(1000, round(share * period_us))
        for directory in host.cgroups:
            if (directory / "cpu.max").exists():
                (directory / "cpu.max").write_text(f"{quota} {period_us}")
            elif (directory / "cpu.cfs_period_us").exists():
                (directory / "cpu.cfs_quota_us").write_text("-1")
                (directory / "cpu.cfs_period_us").write_text(str(period_us))
                (directory / "cpu.cfs_quota_us").write_text(str(quota))


def memory_cap(shape: ModelShape, n_ctx: int, most: int) -> int:
    """Usable bytes that hold `most` layers in any role (with the embedding and the
    logits), plus a quarter of a layer, but not one layer more."""
    est = estimate_memory(shape, n_ctx, n_layers=most, computes_logits=True, repacks=True)
    cap = est.total + shape.nonrepeating_bytes + max(shape.layer_bytes) // 4
    more = estimate_memory(shape, n_ctx, n_layers=most + 1, computes_logits=False, repacks=False)
    if more.total <= cap:
        raise ValueError(f"{shape.name}: layers too small for a cap at {most} layers")
    return cap


def proportional(n_layer: int, weights: Sequence[float]) -> Counts:
    """Layers in proportion to `weights`, largest remainders first (ties: the earlier)."""
    total = sum(weights)
    exact = [n_layer * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: n_layer - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


def exo_rule(shape: ModelShape, n_ctx: int, usable: Sequence[int]) -> Counts:
    """The fewest hosts (most memory first) whose memory covers the model, by memory."""
    need = estimate_memory(shape, n_ctx).total
    order = sorted(range(len(usable)), key=lambda i: (-usable[i], i))
    n = next(n for n in range(1, len(order) + 1) if sum(usable[i] for i in order[:n]) >= need)
    chosen = sorted(order[:n])
    shares = proportional(shape.n_layer, [usable[i] for i in chosen])
    counts = dict(zip(chosen, shares, strict=True))
    return tuple(counts.get(i, 0) for i in range(len(usable)))


def plan_counts(p: Plan, names: Sequence[str]) -> Counts:
    held = {s.device.name: s.n_layers for s in p.shares}
    return tuple(held.get(n, 0) for n in names)


def candidates(n_layer: int, hosts: int, most: int) -> list[Counts]:
    """Every split of `n_layer` layers over `hosts` hosts with at most `most` each."""
    return [c for c in itertools.product(range(most + 1), repeat=hosts) if sum(c) == n_layer]


def time_split(rpc: HandRpc, counts: Counts, tokens: int, reps: int) -> list[float]:
    """Tokens/s of `reps` generations with the split `counts` (after a warm-up)."""
    rpc.load(*splits_for(counts))
    rpc.generate(4)
    return [rpc.generate(tokens).tokens_per_s for _ in range(reps)]


def label(counts: Counts) -> str:
    return "/".join(map(str, counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the final comparison")
    parser.add_argument("--reps", type=int, default=2, help="generations per split and round")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--screen-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=4, help="brute-force finalists")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 24 tokens, 3 finalists")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens, args.screen_tokens, args.top = 2, 16, 8, 2

    model = MODEL.path()
    shape = read_model_shape(model)
    most = math.floor(MAX_SHARE * shape.n_layer)
    usable = memory_cap(shape, N_CTX, most)
    names = [f"h{i}" for i in range(len(QUOTAS))]
    default = Strategy(ModelConfig().strategy)

    limit = usable + PROCESS_ROOM
    with Cluster(len(QUOTAS), memory_limit_bytes=limit, cpu_quota=QUOTAS, prefix=PREFIX) as cluster:
        hosts = cluster.hosts
        at_long_period = [measure_speed_in(h) for h in hosts]
        set_cpu_period(cluster, CPU_PERIOD_US)
        speeds = [median([measure_speed_in(h) for _ in range(3)]) for h in hosts]
        sustained = [float(run_in(h, SUSTAINED_SPEED.format(seconds=1.0))) for h in hosts]

        def devices(figures: Sequence[float]) -> list[DeviceCapacity]:
            return [
                DeviceCapacity(n, n, f"{h.address}:9999", usable, s)
                for n, h, s in zip(names, hosts, figures, strict=True)
            ]

        plans = {
            "hsmdif_default": plan(shape, N_CTX, devices(speeds), default),
            "capacity": plan(shape, N_CTX, devices(speeds), Strategy.CAPACITY),
            "latency": plan(shape, N_CTX, devices(speeds), Strategy.LATENCY),
            "capacity_sustained_speed": plan(shape, N_CTX, devices(sustained), Strategy.CAPACITY),
            "latency_sustained_speed": plan(shape, N_CTX, devices(sustained), Strategy.LATENCY),
            "capacity_speed_at_100ms_period": plan(
                shape, N_CTX, devices(at_long_period), Strategy.CAPACITY
            ),
        }
        rules: dict[str, Counts] = {k: plan_counts(p, names) for k, p in plans.items()}
        rules["llama_cpp_default"] = proportional(shape.n_layer, [usable] * len(hosts))
        rules["exo"] = exo_rule(shape, N_CTX, [usable] * len(hosts))

        screened: dict[Counts, float] = {}
        final: dict[Counts, list[float]] = {}  # one median per round
        stopped = ""
        rounds_done = 0
        with HandRpc(hosts[0], hosts[1:], model, N_CTX) as rpc:
            # The rules first: if the time budget runs out, what they score is kept.
            finalists = list(dict.fromkeys(rules.values()))
            try:
                for r in range(args.rounds):
                    shift = r % len(finalists)
                    for counts in finalists[shift:] + finalists[:shift]:
                        runs = time_split(rpc, counts, args.tokens, args.reps)
                        final.setdefault(counts, []).append(median(runs))
                    rounds_done += 1
                for counts in candidates(shape.n_layer, len(hosts), most):
                    screened[counts] = median(time_split(rpc, counts, args.screen_tokens, 1))
                    print(f"  {label(counts):<8} {screened[counts]:6.2f} tokens/s", flush=True)
                ranked = sorted(screened, key=lambda c: -screened[c])
                best_screened = [c for c in ranked[: args.top] if c not in final]
                for _ in range(args.rounds):
                    for counts in best_screened:
                        runs = time_split(rpc, counts, args.tokens, args.reps)
                        final.setdefault(counts, []).append(median(runs))
            except KeyboardInterrupt:  # bench.run's budget ran out: keep what was measured
                stopped = (
                    f"stopped at its time budget after {rounds_done} full rounds of the rules "
                    f"and {len(screened)} screened splits"
                )
                print(f"== {stopped}", flush=True)
        if not rounds_done:
            raise SystemExit("bench.heterogeneous: stopped before one round of the rules")
        final = {c: v[:rounds_done] if c in rules.values() else v for c, v in final.items()}
        final = {c: v for c, v in final.items() if v}
        ranked = sorted(screened, key=lambda c: -screened[c])

    rates = {c: median(v) for c, v in final.items()}
    best = max(rates, key=lambda c: rates[c])
    rules["best"] = best
    splits: dict[str, Any] = {}
    for name, counts in rules.items():
        entry: dict[str, Any] = {
            "layers": dict(zip(names, counts, strict=True)),
            "tokens_per_s": round(rates[counts], 2),
        }
        if name in plans:
            entry["predicted_tokens_per_s"] = round(plans[name].predicted_tokens_per_s, 2)
        splits[name] = entry
    ours = final[rules["hsmdif_default"]]

    def versus(other: Counts) -> float:
        """Median over rounds of the ratio within each round (they drift together); a
        split measured in other rounds (a screened finalist) by its median."""
        theirs = final[other]
        if len(theirs) == len(ours) and other in rules.values():
            return round(median([a / b for a, b in zip(ours, theirs, strict=True)]), 4)
        return round(median(ours) / median(theirs), 4)

    result: dict[str, Any] = {
        "speedup_vs_memory_split": versus(rules["llama_cpp_default"]),
        "speedup_vs_exo_split": versus(rules["exo"]),
        "fraction_of_best": versus(best),
        "default_strategy": default.value,
        "splits": splits,
        "hosts": {
            n: {
                "cpu_quota": q,
                "speed": round(s, 2),
                "sustained_speed": round(u, 2),
                "speed_at_100ms_period": round(a, 2),
            }
            for n, q, s, u, a in zip(names, QUOTAS, speeds, sustained, at_long_period, strict=True)
        },
        "root": names[0],
        "usable_mb_per_host": round(usable / MIB),
        "max_layers_per_host": most,
        "n_layer": shape.n_layer,
        "model": MODEL.name,
        "cpu_period_ms": CPU_PERIOD_US / 1000,
        "candidates": len(screened),
        "screening_tokens_per_s": {label(c): round(screened[c], 2) for c in ranked},
        "rounds": rounds_done,
        "tokens": args.tokens,
        **({"partial": stopped} if stopped else {}),
    }
    print(f"{'rule':<28}{'layers h0/h1/h2':<18}{'tokens/s':>10}{'predicted':>11}")
    for name, entry in splits.items():
        predicted = entry.get("predicted_tokens_per_s")
        print(
            f"{name:<28}{label(rules[name]):<18}{entry['tokens_per_s']:>10.2f}"
            f"{'' if predicted is None else f'{predicted:.2f}':>11}"
        )
    for key in ("speedup_vs_memory_split", "speedup_vs_exo_split", "fraction_of_best"):
        print(f"{key:<28}{result[key]:.3f}")
    merge_results(args.results, "heterogeneous", result)


if __name__ == "__main__":
    main()
