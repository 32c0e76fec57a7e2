"""Distributed: hsmdif split over 2 and 3 hosts versus llama.cpp RPC driven by hand.

Each host is a network namespace with a CPU quota of one core and one llama.cpp
thread. Its daemon declares a usable memory (memory_override_mb) with which the
planner needs exactly N hosts for the synthetic f32 model; the cgroup cap leaves
room beside it for the by-hand rpc-worker. The by-hand run uses the very split the
daemon loaded (n_gpu_layers, tensor_split, registration order) with fresh
rpc-workers on the same hosts and a client in the root's host. Generations
alternate between the two; the figures are medians, the ratio the median of the
ratios of back-to-back pairs. Per decoded token (a generation of 96 tokens, 48 in
the quick run, less one of 1): bytes on the wire from the root host's veth
counters (every RPC byte passes through the root), the CPU time of the root's
processes (daemon and engine, or the by-hand client) and of hsmdifctl, that of the
relays' copy threads (found by their names in /proc: the root daemon's, and the
workers' together), and that of the rpc-workers (computing the same graph either
way). The same costs with `data_plane = "plain"` come from a second cluster of the
same hosts, without the by-hand run (not in the quick run, which must fit its time
budget on a busy machine, unless --plain). Prints a table, what separates each ratio
from 0.97 with a bootstrap interval of the ratio, and merges `distributed` into
bench/results.json.

    sudo python -m bench.distributed [--reps N] [--tokens N] [--quick [--plain]]
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from bench.common import (
    MIB,
    N_CTX,
    RESULTS,
    BenchDaemon,
    HandRpc,
    Synthetic,
    Timing,
    children_cpu_seconds,
    cpu_seconds,
    hsmdif_cluster,
    hsmdif_prompt,
    link_bytes,
    loaded_plan,
    median,
    merge_results,
    per_token,
    root_of,
    scratch_dir,
    usable_for,
)
from hsmdifd.placement.gguf_model import read_model_shape
from tests.conftest import Daemon
from tests.netns import Host

MODEL = Synthetic(n_layer=10, n_embd=1024, n_ff=2816)
CPU_QUOTA = 1.0
COST_TOKENS = 96  # tokens of the generations that measure bytes and CPU per token
QUICK_COST_TOKENS = 48  # in the quick run


ENGINE = "hsmdifd.engine.child"  # in the engine child's command line
RPC_WORKER = "hsmdifd.engine.rpc_worker"  # in the rpc-workers' command lines
RELAY_THREAD = "relay "  # how the relays' copy threads are named (hsmdifd.engine.relay.splice)


def relay_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time so far of the relays' copy threads in these processes and their children.

    From schedstat (nanoseconds; utime and stime are counted in 10 ms ticks).
    """
    total = 0
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            for task in Path(f"/proc/{proc.pid}/task").glob("*"):
                try:
                    if (task / "comm").read_text().startswith(RELAY_THREAD):
                        total += int((task / "schedstat").read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    continue  # a thread that ended meanwhile
    return total / 1e9


def child_cpu_seconds(pids: Sequence[int], module: str = ENGINE) -> float:
    """CPU time so far of the children running `module` among the descendants of `pids`."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if module in " ".join(proc.cmdline()):
                        times = proc.cpu_times()
                        total += times.user + times.system
    return total


def ratio_interval(ratios: Sequence[float], draws: int = 2000) -> tuple[float, float]:
    """A 90 % bootstrap interval of the median of `ratios` (a fixed seed: the same pairs
    give the same interval)."""
    pick = random.Random(0)
    medians = sorted(median(pick.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.05 * draws)], medians[int(0.95 * draws) - 1]


def cost_meters(root: Daemon, daemons: Sequence[Daemon]) -> dict[str, Callable[[], float]]:
    """What `per_token` counts of an hsmdif generation: wire bytes, CPU of the root, of the
    relays and of the rpc-workers."""
    host = root.host
    assert root.proc is not None and host is not None
    daemon = root.proc.pid
    workers = [d.proc.pid for d in daemons if d is not root and d.proc is not None]
    return {
        "wire_bytes_per_token": lambda: float(link_bytes(host)),
        "root_cpu_ms_per_token": lambda: cpu_seconds(daemon) * 1000,
        "hsmdifctl_cpu_ms_per_token": lambda: children_cpu_seconds() * 1000,
        "root_engine_cpu_ms_per_token": lambda: child_cpu_seconds([daemon]) * 1000,
        "root_relay_cpu_ms_per_token": lambda: relay_cpu_seconds([daemon]) * 1000,
        "worker_relay_cpu_ms_per_token": lambda: relay_cpu_seconds(workers) * 1000,
        "rpc_workers_cpu_ms_per_token": lambda: child_cpu_seconds(workers, RPC_WORKER) * 1000,
    }


def summarise(runs: list[Timing]) -> tuple[float, float]:
    """Median tokens/s and median time to first token (ms)."""
    return median([r.tokens_per_s for r in runs]), median([r.ttft_ms for r in runs])


def rounded(costs: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Bytes to the byte, milliseconds to 0.01."""
    return {prefix + k: round(v) if "bytes" in k else round(v, 2) for k, v in costs.items()}


class Split(NamedTuple):
    """A model loaded over namespace hosts, a daemon on each."""

    daemons: list[BenchDaemon]
    root: Daemon
    order: list[Host]
    """The hosts in the plan's order, the root's first."""
    plan: dict[str, Any]
    usable: int | None
    """The memory each daemon declares (None on one host), so that the plan needs them all."""


@contextlib.contextmanager
def loaded_split(hosts: int, model: Path, data_plane: str = "tls") -> Iterator[Split]:
    """`hosts` namespace hosts with a daemon each, the model loaded over all of them."""
    shape = read_model_shape(model)
    usable = usable_for(shape, N_CTX, hosts) if hosts > 1 else None
    # Room for the daemon, its rpc-worker or engine, and a by-hand worker with the same layers.
    limit = 2 * (usable or 2 * shape.size_bytes) + 768 * MIB
    with (
        scratch_dir() as base,
        hsmdif_cluster(
            hosts,
            model,
            base,
            usable_bytes=usable,
            memory_limit_bytes=limit,
            cpu_quota=CPU_QUOTA,
            data_plane=data_plane,
        ) as (cluster, daemons),
    ):
        root = root_of(daemons)
        r = root.ctl("load", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"hsmdifctl load failed: {r.stderr.strip()}")
        plan = loaded_plan(root)
        by_name = {f"h{h.index}": h for h in cluster.hosts}
        order = [by_name[d["name"]] for d in plan["devices"]]
        if len(order) != hosts:
            raise RuntimeError(f"the plan uses {len(order)} hosts, not {hosts}: {plan}")
        yield Split(daemons, root, order, plan, usable)


def measure(
    hosts: int,
    model: Path,
    reps: int,
    tokens: int,
    hand: bool,
    *,
    data_plane: str = "tls",
    cost_tokens: int = COST_TOKENS,
) -> dict[str, Any]:
    """hsmdif on `hosts` hosts (and, with `hand`, llama.cpp RPC by hand beside it)."""
    with loaded_split(hosts, model, data_plane) as (daemons, root, order, plan, usable):
        output = next(d for d in plan["devices"] if d["holds_output"])
        result: dict[str, Any] = {
            "layers": {d["name"]: d["layers"] for d in plan["devices"]},
            "root": plan["devices"][0]["name"],
            "output_layer": output["name"],
            "output_layer_remote": output["name"] != plan["devices"][0]["name"],
            "n_gpu_layers": plan["n_gpu_layers"],
            "tensor_split": plan["tensor_split"],
        }
        if usable:
            result["usable_mb_per_host"] = round(usable / MIB)
        ours: list[Timing] = []
        theirs: list[Timing] = []
        hsmdif_prompt(root, 8)  # warm up
        costs = cost_meters(root, daemons)
        if not hand:
            ours = [hsmdif_prompt(root, tokens) for _ in range(reps)]
            measured = per_token(lambda n: hsmdif_prompt(root, n), cost_tokens, costs)
            result.update(rounded(measured))
            if not ours:  # the costs alone
                return result
        else:
            with HandRpc(order[0], order[1:], model, plan["n_ctx"]) as by_hand:
                by_hand.load(plan["n_gpu_layers"], plan["tensor_split"])
                by_hand.generate(8)
                for i in range(reps):  # alternate which goes first
                    if i % 2:
                        theirs.append(by_hand.generate(tokens))
                    ours.append(hsmdif_prompt(root, tokens))
                    if not i % 2:
                        theirs.append(by_hand.generate(tokens))
                measured = per_token(lambda n: hsmdif_prompt(root, n), cost_tokens, costs)
                result.update(rounded(measured))
                client = by_hand.client_pid
                measured = per_token(
                    by_hand.generate,
                    cost_tokens,
                    {
                        "wire_bytes_per_token": lambda: float(link_bytes(order[0])),
                        "root_cpu_ms_per_token": lambda: cpu_seconds(client) * 1000,
                        "rpc_workers_cpu_ms_per_token": lambda: (
                            sum(cpu_seconds(p) for p in by_hand.worker_pids) * 1000
                        ),
                    },
                )
                result.update(rounded(measured, "llama_rpc_"))
            t_tps, t_ttft = summarise(theirs)
            result["llama_rpc_tokens_per_s_runs"] = [round(r.tokens_per_s, 2) for r in theirs]
            result["llama_rpc_tokens_per_s"] = round(t_tps, 2)
            result["llama_rpc_ttft_ms"] = round(t_ttft, 1)
        h_tps, h_ttft = summarise(ours)
        result["hsmdif_tokens_per_s_runs"] = [round(r.tokens_per_s, 2) for r in ours]
        result["hsmdif_tokens_per_s"] = round(h_tps, 2)
        result["hsmdif_ttft_ms"] = round(h_ttft, 1)
        result["ms_per_token"] = round(1000 / h_tps, 2)
        result["completion_tokens"] = min(r.tokens for r in ours)
        if hand:  # pairs run back to back: the median of their ratios drifts least
            ratios = [a.tokens_per_s / b.tokens_per_s for a, b in zip(ours, theirs, strict=True)]
            result["decode_ratio"] = round(median(ratios), 4)
            result["decode_ratio_interval"] = [round(x, 4) for x in ratio_interval(ratios)]
            result["ttft_overhead_ms"] = round(h_ttft - result["llama_rpc_ttft_ms"], 1)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="5 repetitions of 32 tokens")
    parser.add_argument(
        "--plain", action="store_true", help='the data_plane = "plain" costs in a quick run too'
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.tokens = 5, 32
    model = MODEL.path()
    cost = QUICK_COST_TOKENS if args.quick else COST_TOKENS
    by_hosts = {
        str(n): measure(n, model, args.reps, args.tokens, hand=True, cost_tokens=cost)
        for n in (2, 3)
    }
    for n in (2, 3) if args.plain or not args.quick else ():
        plain = measure(n, model, 0, args.tokens, False, data_plane="plain", cost_tokens=cost)
        by_hosts[str(n)]["plain"] = {k: v for k, v in plain.items() if k.endswith("_per_token")}
    print_table(by_hosts)
    print_gap(by_hosts)
    result = {
        "decode_ratio": min(r["decode_ratio"] for r in by_hosts.values()),
        "by_hosts": by_hosts,
        **run_facts(model, args.tokens, args.reps),
    }
    merge_results(args.results, "distributed", result)


def print_table(by_hosts: dict[str, dict[str, Any]]) -> None:
    """Speeds, then bytes and CPU per token, side by side for each number of hosts."""
    header = f"{'hosts':<6}{'layers':<22}{'output':<8}{'llama.cpp RPC':>14}{'hsmdif':>9}"
    print(header + f"{'ratio':>8}{'TTFT +ms':>10}")
    for n, r in by_hosts.items():
        layers = " ".join(f"{k}:{v}" for k, v in r["layers"].items())
        print(
            f"{n:<6}{layers:<22}{r['output_layer']:<8}{r['llama_rpc_tokens_per_s']:>14.2f}"
            f"{r['hsmdif_tokens_per_s']:>9.2f}{r['decode_ratio']:>8.3f}"
            f"{r['ttft_overhead_ms']:>+10.1f}"
        )
    print(
        f"\n{'per token':<10}{'B by hand':>10}{'B tls':>8}{'B plain':>8}"
        f"{'root CPU ms by hand':>20}{'hsmdif (engine)':>16}"
        f"{'relays ms root+workers tls':>28}{'plain':>14}"
    )
    for n, r in by_hosts.items():
        plain = r.get("plain", {})

        def relays(f: dict[str, Any]) -> str:
            if "root_relay_cpu_ms_per_token" not in f:
                return "-"
            return (
                f"{f['root_relay_cpu_ms_per_token']:.2f} + {f['worker_relay_cpu_ms_per_token']:.2f}"
            )

        print(
            f"{n + ' hosts':<10}{r['llama_rpc_wire_bytes_per_token']:>10}"
            f"{r['wire_bytes_per_token']:>8}{plain.get('wire_bytes_per_token', '-'):>8}"
            f"{r['llama_rpc_root_cpu_ms_per_token']:>20.2f}{r['root_cpu_ms_per_token']:>8.2f}"
            f"{'(' + format(r['root_engine_cpu_ms_per_token'], '.2f') + ')':>8}"
            f"{relays(r):>28}{relays(plain):>14}"
        )


def print_gap(by_hosts: dict[str, dict[str, Any]]) -> None:
    """What separates each ratio from 0.97, in milliseconds per token."""
    for n, r in by_hosts.items():
        hand, ours = 1000 / r["llama_rpc_tokens_per_s"], 1000 / r["hsmdif_tokens_per_s"]
        relays = r["root_relay_cpu_ms_per_token"] + r["worker_relay_cpu_ms_per_token"]
        daemon = r["root_cpu_ms_per_token"] - r["root_engine_cpu_ms_per_token"]
        low, high = r["decode_ratio_interval"]
        print(
            f"{n} hosts: {hand:.2f} ms/token by hand, {ours:.2f} through hsmdif "
            f"(0.97 allows {hand / 0.97:.2f}); ratio {r['decode_ratio']:.3f}, 90 % of "
            f"resampled medians in {low:.3f}-{high:.3f}; CPU per token: relays "
            f"{relays:.2f} ms, the root daemon {daemon:.2f} ms with its relays, hsmdifctl "
            f"{r['hsmdifctl_cpu_ms_per_token']:.2f} ms; engine "
            f"{r['root_engine_cpu_ms_per_token']:.2f} ms against the by-hand client's "
            f"{r['llama_rpc_root_cpu_ms_per_token']:.2f}, "
            f"rpc-workers {r['rpc_workers_cpu_ms_per_token']:.2f} ms against "
            f"{r['llama_rpc_rpc_workers_cpu_ms_per_token']:.2f} by hand (the same graph)"
        )


def run_facts(model: Path, tokens: int, reps: int) -> dict[str, Any]:
    """How a distributed or scaling run was made, for results.json."""
    return {
        "model": MODEL.name,
        "model_mb": round(model.stat().st_size / MIB),
        "threads_per_host": 1,
        "cpu_quota_per_host": CPU_QUOTA,
        "tokens": tokens,
        "reps": reps,
        "context": N_CTX,
    }


if __name__ == "__main__":
    main()
