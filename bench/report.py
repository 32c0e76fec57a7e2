"""Render bench/results.json as bench/RESULTS.md and the plot bench/results.png.

python -m bench.report [RESULTS_JSON] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import resume
from hsmdifd.placement.planner import HOP_SECONDS

BENCH = Path(__file__).parent
PLOT = "results.png"  # beside RESULTS.md

# (key, comparison, target): ">=" and "<=" compare the value, "|<=|" its magnitude.
TARGETS: list[tuple[str, str, float]] = [
    ("standalone.decode_ratio", ">=", 0.97),
    ("standalone.ttft_overhead_ms", "<=", 20),
    ("distributed.decode_ratio", ">=", 0.97),
    ("heterogeneous.speedup_vs_memory_split", ">=", 1.3),
    ("heterogeneous.speedup_vs_exo_split", ">=", 1.0),
    ("heterogeneous.fraction_of_best", ">=", 0.95),
    ("memory.worst_error", "|<=|", 0.10),
    ("api.completions_decode_ratio", ">=", 0.97),
    ("api.completions_ttft_overhead_ms", "<=", 10),
    ("api.chat_decode_ratio", ">=", 0.97),
    ("api.chat_ttft_overhead_ms", "<=", 10),
    ("resume.gap_seconds", "<=", 3.0),
]
RULE_NAMES = {
    "llama_cpp_default": "llama.cpp default (memory)",
    "exo": "exo (fewest hosts, memory)",
    "capacity": "hsmdif capacity",
    "latency": "hsmdif latency",
    "hsmdif_default": "hsmdif default",
    "best": "best (brute force)",
    "capacity_sustained_speed": "capacity, sustained speed*",
    "latency_sustained_speed": "latency, sustained speed*",
    "capacity_speed_at_100ms_period": "capacity, speed at 100 ms period*",
}


def get(results: dict[str, Any], dotted: str) -> Any:
    value: Any = results
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def met(value: float, comparison: str, target: float) -> bool:
    if comparison == ">=":
        return value >= target
    if comparison == "<=":
        return value <= target
    return abs(value) <= target


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def layers_text(layers: dict[str, int]) -> str:
    return " / ".join(f"{k} {v}" for k, v in layers.items())


# --- sections -------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> str:
    rows = []
    for key, comparison, target in TARGETS:
        value = get(results, key)
        shown = f"{'±' if comparison == '|<=|' else comparison.strip('|')} {target:g}"
        verdict = (
            "not measured"
            if value is None
            else "met"
            if met(value, comparison, target)
            else "**missed**"
        )
        rows.append([f"`{key}`", "-" if value is None else f"{value:.4g}", shown, verdict])
    return table(["figure", "value", "target", ""], rows)


def machine_text(results: dict[str, Any]) -> str:
    run = results.get("run", {})
    m = run.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    rows = [
        ["date (UTC)", run.get("date", "-")],
        ["run", "quick (`make bench-quick`)" if run.get("quick") else "full (`make bench`)"],
        ["CPU", f"{m.get('cpu', '-')}, {m.get('cores', '-')} cores"],
        ["memory", f"{m.get('memory_gib', '-')} GiB"],
        ["system", f"{m.get('os', '-')}, kernel {m.get('kernel', '-')}"],
        ["Python", m.get("python", "-")],
        ["versions", versions or "-"],
        ["commit", f"`{m.get('commit', '-')}`"],
        [
            "time per benchmark (s)",
            ", ".join(f"{k} {v}" for k, v in run.get("seconds", {}).items()),
        ],
    ]
    for name, date in run.get("rerun", {}).items():
        rows.append([f"{name} measured again", date])
    if run.get("failed_then_rerun"):
        rows.append(["failed, then measured again", ", ".join(run["failed_then_rerun"])])
    if run.get("failed"):
        rows.append(["failed", ", ".join(run["failed"])])
    if run.get("partial"):
        rows.append(["stopped at the time budget (figures so far kept)", ", ".join(run["partial"])])
    return table(["", ""], rows)


HOW = """\
Every figure is a ratio or a median measured side by side in one run: the machine
is shared, so absolute tokens/s move from run to run while the comparisons hold.

- **Hosts** are network namespaces joined by a bridge (`tests/netns.py`), each with
  its own cgroup (memory cap, CPU quota), and llama.cpp runs one thread per host: the
  daemons' `threads = 1`, rpc-workers `--threads 1`, the by-hand client `n_threads = 1`.
  Processes are not bound to cores: a quota keeps each host to its share, and a
  pipeline computes on one host at a time.
- **distributed, scaling**: a quota of one CPU per host (100 ms period). The split is
  forced by the usable memory each daemon declares (`memory_override_mb`), chosen so
  that the planner needs exactly N hosts for the synthetic f32 model; the cgroup
  caps leave room for the by-hand rpc-worker beside the daemon's own.
- **heterogeneous**: quotas of 100 %, 50 % and 25 % of a core with a 4 ms period.
  With the harness's 100 ms period a pipeline stage that idles most of each token
  runs at full speed: the quota then limits a duty cycle, not the speed. 4 ms is the
  shortest period that allows a 25 % quota (the least quota is 1 ms).
- **standalone, limit**: outside the namespaces, both cores, not bound.
- llama.cpp RPC "by hand" is `bench/llama_rpc.py`: rpc-workers started directly in
  the hosts, the endpoints registered in the same order and the model loaded with
  the same `n_gpu_layers` and `tensor_split` the daemon uses, timed as
  `bench/standalone.py` times llama-cpp-python (first token, then tokens/s from the
  first token to the last).
"""


def standalone_text(s: dict[str, Any]) -> str:
    rows = [
        ["decode tokens/s", fmt(s["direct_tokens_per_s"]), fmt(s["hsmdif_tokens_per_s"])],
        ["time to first token (ms)", fmt(s["direct_ttft_ms"], 1), fmt(s["hsmdif_ttft_ms"], 1)],
    ]
    return (
        f"{s['model']}, {s['threads']} threads, context {s['context']}, "
        f"{s['reps']} x {s['tokens']} tokens.\n\n"
        + table(["", "llama-cpp-python", "hsmdifctl prompt"], rows)
    )


def distributed_text(d: dict[str, Any]) -> str:
    rows = []
    for n, r in d["by_hosts"].items():
        output = r["output_layer"] + (" (remote)" if r["output_layer_remote"] else " (root)")
        rows.append(
            [
                n,
                layers_text(r["layers"]),
                output,
                fmt(r["llama_rpc_tokens_per_s"]),
                fmt(r["hsmdif_tokens_per_s"]),
                fmt(r["decode_ratio"], 3),
                f"{r['llama_rpc_ttft_ms']:.1f} / {r['hsmdif_ttft_ms']:.1f}",
                f"{r['llama_rpc_wire_bytes_per_token']} / {r['wire_bytes_per_token']}",
                f"{r['llama_rpc_root_cpu_ms_per_token']:.2f} / {r['root_cpu_ms_per_token']:.2f}"
                f" + {r['hsmdifctl_cpu_ms_per_token']:.2f}",
            ]
        )
    header = ["hosts", "layers (root first)", "output layer", "llama.cpp RPC t/s"]
    header += ["hsmdif t/s", "ratio", "TTFT ms (RPC / hsmdif)", "bytes/token (RPC / hsmdif)"]
    header += ["root CPU ms/token (RPC / hsmdif + hsmdifctl)"]
    return (
        f"{d['model']} ({d['model_mb']} MB), context {d['context']}, {d['reps']} x "
        f"{d['tokens']} tokens each. Per token, from a generation of N tokens less one "
        "of 1: bytes on the root host's veth, received plus sent (every RPC byte passes "
        "the root; the daemons' heartbeats are included and amount to well under 1 %), "
        "and CPU time of the root's processes (the daemon and its engine, or the by-hand "
        "client) and of hsmdifctl.\n\n" + table(header, rows)
    )


def heterogeneous_text(h: dict[str, Any]) -> str:
    rows = []
    for name, entry in h["splits"].items():
        rows.append(
            [
                RULE_NAMES.get(name, name),
                " / ".join(str(v) for v in entry["layers"].values()),
                fmt(entry["tokens_per_s"]),
                fmt(entry.get("predicted_tokens_per_s")),
            ]
        )
    hosts = []
    for name, x in h["hosts"].items():
        hosts.append(
            [
                name,
                f"{x['cpu_quota'] * 100:.0f} %",
                fmt(x["speed"]),
                fmt(x["sustained_speed"]),
                fmt(x.get("speed_at_100ms_period")),
            ]
        )
    return (
        f"{h['model']}, {h['n_layer']} layers; every host may hold at most "
        f"{h['max_layers_per_host']} ({h['usable_mb_per_host']} MiB usable each); root "
        f"{h['root']}. hsmdif's default strategy is `{h['default_strategy']}`. "
        f"{h['candidates']} splits screened, then the rules' splits and the best "
        f"screened ones measured in {h['rounds']} alternating rounds. How each rule's "
        "split is derived: `bench/heterogeneous.py`.\n\n"
        + table(["rule", "layers h0 / h1 / h2", "tokens/s", "planner's prediction"], rows)
        + "\n\n\\* diagnoses, not rules hsmdif has: the planner given each host's "
        "sustained speed (bytes over elapsed time) instead of measure_speed's best "
        "repetition, or the speed measure_speed reports under the harness's 100 ms quota "
        "period (what a daemon sees on a device whose CPU is shared by a quota).\n\n"
        + table(
            ["host", "CPU quota", "measure_speed GB/s", "sustained GB/s", "at 100 ms period"],
            hosts,
        )
    )


def scaling_text(s: dict[str, Any]) -> str:
    rows = [
        [
            n,
            layers_text(r["layers"]),
            fmt(r["tokens_per_s"]),
            fmt(r["ms_per_token"]),
            fmt(r["ttft_ms"], 1),
            str(r["wire_bytes_per_token"]),
        ]
        for n, r in s["by_hosts"].items()
    ]
    header = ["hosts", "layers (root first)", "tokens/s", "ms/token", "TTFT ms", "bytes/token"]
    return (
        f"hsmdif through `hsmdifctl prompt`, {s['model']} ({s['model_mb']} MB), "
        f"{s['reps']} x {s['tokens']} tokens.\n\n" + table(header, rows)
    )


def memory_text(m: dict[str, Any]) -> str:
    rows = []
    for name, r in m["standalone"].items():
        rows.append([name, "alone", *memory_row(r)])
    split = m["split"]
    for name, r in split["devices"].items():
        device = f"{name} of 3 ({split['layers'][name]} layers)"
        rows.append(["synthetic", device, *memory_row({"n_ctx": split["n_ctx"], **r})])
    header = ["model", "device", "context", "estimate MiB", "logged MiB", "RSS growth MiB"]
    header += ["error"]
    return (
        "Measured = the larger of llama.cpp's logged buffers and the process's RSS "
        "growth (from before the model is created to after a prompt that fills the "
        "context; alone, the median of 3 fresh processes). Error = estimate / measured - 1."
        "\n\n" + table(header, rows)
    )


def memory_row(r: dict[str, Any]) -> list[str]:
    return [
        str(r.get("n_ctx", "")),
        fmt(r["estimate_mib"], 1),
        fmt(r["logged_mib"], 1),
        fmt(r["rss_growth_mib"], 1),
        f"{r['error']:+.1%}",
    ]


def limit_text(x: dict[str, Any]) -> str:
    rows = []
    for m in x["models"].values():
        for t, r in m["by_threads"].items():
            rows.append(
                [
                    m["model"],
                    t,
                    f"{m['bytes_per_token'] / 1e6:.1f}",
                    fmt(x["copy_bandwidth_gb_per_s"][t], 1),
                    fmt(r["bound_tokens_per_s"], 1),
                    fmt(r["tokens_per_s"]),
                    fmt(r["fraction_of_bound"], 3),
                ]
            )
    header = ["model", "threads", "MB read/token", "copy GB/s", "bound t/s", "t/s", "fraction"]
    return (
        "Bound = numpy copy bandwidth (read + write bytes, as STREAM counts them) / bytes "
        "a decode step reads (layers, output matrix, KV cache so far).\n\n" + table(header, rows)
    )


def control_text(c: dict[str, Any]) -> str:
    rows = [
        ["`Status` RPC p50 / p99 (ms)", f"{c['status_rpc_p50_ms']} / {c['status_rpc_p99_ms']}"],
        ["`hsmdifctl status` p50 (ms, the whole process)", fmt(c["status_cli_p50_ms"], 1)],
        ["re-election after a root SIGKILL, median (s)", fmt(c["reelection_median_s"], 3)],
        ["priority propagation, median (s)", fmt(c["priority_propagation_median_s"], 3)],
    ]
    return f"{c['hosts']} hosts, {c['rounds']} rounds.\n\n" + table(["", ""], rows)


def findings(results: dict[str, Any]) -> str:
    """Observations the figures support, and what a missed target would need."""
    notes = []
    h = results.get("heterogeneous")
    if h:
        full, *_, slow = h["hosts"].values()
        notes.append(
            f"`hsmdifd.placement.profile.measure_speed` keeps the best repetition. Under the "
            f"harness's 100 ms quota period it reported the 25 % host at "
            f"{slow['speed_at_100ms_period']:.1f} GB/s against {full['speed_at_100ms_period']:.1f} "
            "for the full one: a quota (a device busy with other work) is invisible to it, "
            "as it is to the daemon's start-up measurement. A sustained figure (bytes over "
            f"elapsed time) gave {slow['sustained_speed']:.1f} at the 4 ms period."
        )
        default = h["splits"]["hsmdif_default"]
        if default.get("predicted_tokens_per_s"):
            notes.append(
                f"The planner predicted {default['predicted_tokens_per_s']:.1f} tokens/s for "
                f"its split and {default['tokens_per_s']:.1f} were measured: llama.cpp reads "
                "weights faster than the numpy product measure_speed times, and "
                f"HOP_SECONDS ({HOP_SECONDS * 1000:.0f} ms) is an assumption."
            )
        hundred = h["splits"].get("capacity_speed_at_100ms_period")
        if hundred and hundred["layers"] != default["layers"]:
            rate = hundred["tokens_per_s"]
            of_best = rate / h["splits"]["best"]["tokens_per_s"]
            of_exo = rate / h["splits"]["exo"]["tokens_per_s"]
            notes.append(
                "With the speeds measure_speed gave under the 100 ms period, the capacity "
                f"rule would have chosen {' / '.join(map(str, hundred['layers'].values()))}: "
                f"{rate:.2f} tokens/s, {of_best:.2f} of the best and {of_exo:.2f} of exo's split."
            )
        missed = [
            k
            for k, c, t in TARGETS
            if k.startswith("heterogeneous.")
            and get(results, k) is not None
            and not met(get(results, k), c, t)
        ]
        if missed:
            best = h["splits"]["best"]
            notes.append(
                f"Missed: {', '.join(missed)}. hsmdif's default split was "
                f"{' / '.join(map(str, default['layers'].values()))} at "
                f"{default['tokens_per_s']:.2f} tokens/s, the best "
                f"{' / '.join(map(str, best['layers'].values()))} at {best['tokens_per_s']:.2f}. "
                "The planner would need per-device speed figures that reflect sustained "
                "throughput (and, better, the per-layer times observed in real runs) and a "
                "measured hop cost instead of the assumed one."
            )
    s = results.get("scaling", {}).get("by_hosts", {})
    if len(s) > 1:
        xs = [int(n) for n in s]
        ys = [r["ms_per_token"] for r in s.values()]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        notes.append(
            f"Each extra host added {slope:.2f} ms per token (least squares over "
            f"{len(xs)} host counts; veth on one machine), against the planner's assumed "
            f"{HOP_SECONDS * 1000:.0f} ms per hop (`HOP_SECONDS`, not measured)."
        )
    st = results.get("standalone")
    if st and not met(st["decode_ratio"], ">=", 0.97):
        notes.append(
            f"Missed `standalone.decode_ratio` ({st['decode_ratio']:.3f}): hsmdifctl prompt "
            f"{st['hsmdif_tokens_per_s']:.2f} against llama-cpp-python "
            f"{st['direct_tokens_per_s']:.2f} tokens/s, {st['reps']} runs each (the "
            "distributed figures below measure the same per-token relay in more detail)."
        )
    d = results.get("distributed")
    if d and not met(d["decode_ratio"], ">=", 0.97):
        n, w = min(d["by_hosts"].items(), key=lambda kv: kv[1]["decode_ratio"])
        slower = 1000 / w["hsmdif_tokens_per_s"] - 1000 / w["llama_rpc_tokens_per_s"]
        extra = w["root_cpu_ms_per_token"] - w["llama_rpc_root_cpu_ms_per_token"]
        notes.append(
            f"Missed `distributed.decode_ratio` ({d['decode_ratio']:.3f}, worst at {n} hosts): "
            f"hsmdif {w['hsmdif_tokens_per_s']:.2f} against llama.cpp RPC "
            f"{w['llama_rpc_tokens_per_s']:.2f} tokens/s with the same split, {slower:.2f} ms "
            f"more per token. The root's daemon and engine spend {extra:.2f} ms more CPU per "
            f"token than the by-hand client, and hsmdifctl {w['hsmdifctl_cpu_ms_per_token']:.2f} "
            "ms: the per-token relay (the engine's stream, the daemon's re-streaming, "
            "hsmdifctl) costs about what decoding loses, on a machine whose two cores all "
            "hosts share."
        )
    m = results.get("memory")
    if m and not m["within_target"]:
        rows = [(f"{n} alone", r) for n, r in m["standalone"].items()]
        rows += [(f"synthetic split, {n}", r) for n, r in m["split"]["devices"].items()]
        over = "; ".join(
            f"{name}: estimate {r['estimate_mib']} MiB, RSS growth {r['rss_growth_mib']} MiB, "
            f"logged {r['logged_mib']} MiB ({r['error']:+.1%})"
            for name, r in rows
            if not r["within_target"]
        )
        notes.append(
            f"Missed the memory target ({m['target']:.0%}): {over}. The estimate's fixed "
            "runtime margin (memory_estimate.RUNTIME_OVERHEAD) is smaller than what a process "
            "touches beyond llama.cpp's buffers; on rpc-workers that excess is larger still."
        )
    return "\n".join(f"- {n}" for n in notes) if notes else "- (none)"


def api_text(a: dict[str, Any]) -> str:
    """bench.api: the HTTP API against hsmdifctl, and under concurrent streams."""
    rows = [
        "| path | TTFT ms | decode tokens/s | decode ratio | TTFT overhead ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, label, cli, cli_label in (
        ("completions", "/v1/completions", "cli", "hsmdifctl prompt --raw"),
        ("chat", "/v1/chat/completions", "cli_chat", "hsmdifctl chat"),
    ):
        if f"{cli}_ttft_ms" in a:
            rows.append(
                f"| {cli_label} | {a[f'{cli}_ttft_ms']:.1f} | {a[f'{cli}_tokens_per_s']:.2f} | | |"
            )
        rows.append(
            f"| {label}, streamed | {a[f'{key}_ttft_ms']:.1f} | {a[f'{key}_tokens_per_s']:.2f} "
            f"| {a[f'{key}_decode_ratio']:.3f} | {a[f'{key}_ttft_overhead_ms']:+.1f} |"
        )
    rows += [
        "",
        "| concurrent streams | aggregate tokens/s | p50 TTFT ms | p99 TTFT ms |",
        "| --- | --- | --- | --- |",
    ]
    for n, c in a["concurrent"].items():
        rows.append(
            f"| {n} | {c['aggregate_tokens_per_s']:.2f} | {c['p50_ttft_ms']:.1f} "
            f"| {c['p99_ttft_ms']:.1f} |"
        )
    return (
        f"{a['model']}, {a['threads']} threads, {a['tokens']} tokens, {a['reps']} runs each, "
        "greedy, timed at the client, each HTTP path against the hsmdifctl command that "
        "sends the same kind of prompt: /v1/completions against hsmdifctl prompt --raw (raw "
        "text), /v1/chat/completions against hsmdifctl chat (one user turn through the same "
        "chat template), a pair with one prompt; a raw prompt always follows a chat turn, so "
        "no request finds its start in the engine's KV cache. Concurrent streams wait in "
        "the root's one queue: TTFT grows with the streams ahead.\n\n" + "\n".join(rows)
    )


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("Standalone", "standalone", standalone_text),
    ("Distributed", "distributed", distributed_text),
    ("Heterogeneous hosts", "heterogeneous", heterogeneous_text),
    ("Scaling", "scaling", scaling_text),
    ("Memory", "memory", memory_text),
    ("Memory-bandwidth limit", "limit", limit_text),
    ("Control plane", "control", control_text),
    ("HTTP API", "api", api_text),
    ("Resuming after a lost worker", "resume", resume.report_text),
]


def write_report(results: dict[str, Any], path: Path) -> None:
    parts = [
        "# Benchmark results",
        "Written by `python -m bench.run` (`make bench`, `make bench-quick`) from "
        "`bench/results.json`.",
        machine_text(results),
        "## Targets",
        summary(results),
        f"![tokens per second by split rule and by host count]({PLOT})",
        "## How",
        HOW,
    ]
    for title, key, render in SECTIONS:
        parts.append(f"## {title}")
        parts.append(render(results[key]) if key in results else "Not measured in this run.")
    parts += ["## Findings", findings(results)]
    path.write_text("\n\n".join(parts) + "\n")


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Tokens/s by split strategy (heterogeneous) and by device count (scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    h = results.get("heterogeneous")
    if h:
        order = ["llama_cpp_default", "exo", "capacity", "latency", "hsmdif_default", "best"]
        names = [n for n in order if n in h["splits"]]
        rates = [h["splits"][n]["tokens_per_s"] for n in names]
        colours = ["#999999", "#999999", "#4c72b0", "#4c72b0", "#dd8452", "#55a868"]
        bars = left.barh(range(len(names)), rates, color=colours[: len(names)])
        left.set_yticks(range(len(names)), [RULE_NAMES[n] for n in names])
        left.invert_yaxis()
        for bar, n in zip(bars, names, strict=True):
            split = "/".join(str(v) for v in h["splits"][n]["layers"].values())
            left.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {split}", va="center")
        left.set_xlabel("decode tokens/s")
        left.set_title("Split rules, hosts at 100 / 50 / 25 % of a core")
        left.set_xlim(0, max(rates) * 1.2)
    s = results.get("scaling")
    if s:
        hosts = sorted(s["by_hosts"], key=int)
        right.plot(
            [int(n) for n in hosts],
            [s["by_hosts"][n]["tokens_per_s"] for n in hosts],
            "o-",
            color="#dd8452",
            label="hsmdif (scaling run)",
        )
    d = results.get("distributed")
    if d:
        hosts = sorted(d["by_hosts"], key=int)
        right.plot(
            [int(n) for n in hosts],
            [d["by_hosts"][n]["llama_rpc_tokens_per_s"] for n in hosts],
            "s",
            color="#4c72b0",
            label="llama.cpp RPC by hand (distributed run)",
        )
        right.plot(
            [int(n) for n in hosts],
            [d["by_hosts"][n]["hsmdif_tokens_per_s"] for n in hosts],
            "^",
            color="#dd8452",
            label="hsmdif beside it",
        )
    if s or d:
        right.set_xticks([1, 2, 3, 4])
        right.set_ylim(bottom=0)
        right.set_xlabel("hosts (one core and one thread each)")
        right.set_ylabel("decode tokens/s")
        right.set_title("Same model over 1 to 4 hosts")
        right.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="?", type=Path, default=BENCH / "results.json")
    parser.add_argument("--out", type=Path, default=BENCH)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    write_plot(results, args.out / PLOT)
    write_report(results, args.out / "RESULTS.md")


if __name__ == "__main__":
    main()
