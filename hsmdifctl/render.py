"""Rendering, separate from transport: every reply as text for people or as JSON."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from hsmdif.proto import hsmdif_pb2 as pb

MIB = 1024 * 1024
STATE_NAMES = {pb.IDLE: "idle", pb.LOADING: "loading", pb.READY: "ready", pb.FAILED: "failed"}


def print_json(value: Any, out: TextIO = sys.stdout) -> None:
    json.dump(value, out, indent=2)
    out.write("\n")


def model_dict(model: pb.ModelInfo) -> dict[str, Any] | None:
    if model.state in (pb.IDLE, pb.MODEL_STATE_UNSPECIFIED):
        return None
    return {
        "path": model.path,
        "name": model.name,
        "state": STATE_NAMES.get(model.state, "unknown"),
        "size_bytes": model.size_bytes,
        "context_length": model.context_length,
        "threads": model.threads,
        "architecture": model.architecture,
        "n_layer": model.n_layer,
        "estimated_bytes": model.estimated_bytes,
        "load_seconds": round(model.load_seconds, 3),
        "error": model.error or None,
    }


def policy_text(policy: pb.Policy) -> str:
    if policy.by_memory or not policy.order:
        return "by total memory"
    names = policy.order_names or policy.order
    return "in the order " + ", ".join(names) + ", then by total memory"


# The status fields shown as they are: JSON key, StatusReply field.
STATUS_FIELDS = (
    ("id", "node_id"),
    ("name", "name"),
    ("role", "role"),
    ("root", "root_name"),
    ("generating", "generating"),
    ("queued", "queued"),
    ("in_flight", "in_flight"),
    ("max_queue", "max_queue"),
    ("address", "address"),
    ("version", "version"),
)


def status_dict(reply: pb.StatusReply) -> dict[str, Any]:
    return {
        **{key: getattr(reply, name) for key, name in STATUS_FIELDS},
        "uptime_seconds": round(reply.uptime_seconds, 1),
        "model": model_dict(reply.model),
        "epoch": {
            "policy_version": reply.epoch.policy_version,
            "root_id": reply.epoch.root_id,
            "generation": reply.epoch.generation,
        },
        "policy": {
            "version": reply.policy.version,
            "order": list(reply.policy.order),
            "order_names": list(reply.policy.order_names),
            "by_memory": reply.policy.by_memory or not reply.policy.order,
        },
        "warning": reply.warning or None,
    }


def queue_text(reply: pb.StatusReply) -> str:
    bound = f" (at most {reply.max_queue})" if reply.max_queue else ""
    return f"{reply.in_flight} in flight, {reply.queued} waiting{bound}"


def status_text(reply: pb.StatusReply) -> str:
    lines = [
        f"node:    {reply.name} ({reply.node_id})",
        f"role:    {reply.role}",
        f"root:    {reply.root_name}{', answering' if reply.generating else ''}",
        f"queue:   {queue_text(reply)}",
        f"address: {reply.address}",
        f"policy:  version {reply.policy.version}, {policy_text(reply.policy)}",
    ]
    if reply.warning:
        lines.append(f"warning: {reply.warning}")
    model = model_dict(reply.model)
    if model is None:
        lines.append("model:   none loaded (hsmdifctl load [MODEL])")
    else:
        lines.append(f"model:   {model['name']} [{model['state']}]")
        lines.append(f"  path:    {model['path']}")
        lines.append(f"  size:    {model['size_bytes'] / MIB:.0f} MiB")
        lines.append(f"  context: {model['context_length']} tokens, {model['threads']} threads")
        if model["error"]:
            lines.append(f"  error:   {model['error']}")
    return "\n".join(lines)


def device_dict(d: pb.DeviceProfile) -> dict[str, Any]:
    return {
        "name": d.name,
        "address": d.address,
        "id": d.id,
        "role": d.role,
        "state": d.state,
        "memory_total_mb": d.memory_total_bytes // MIB,
        "memory_free_mb": d.memory_usable_bytes // MIB,
        "memory_limit_mb": d.memory_limit_bytes // MIB or None,
        "speed": round(d.speed, 2),
        "load": round(d.load, 3),
        "threads": d.threads,
        "figures": "declared" if d.declared else "measured",
        "rank": d.rank or None,
        "layers": d.layers,
        "share_bytes": d.share_bytes,
        "rpc_protocol": d.rpc_protocol,
        "problem": d.problem,
    }


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def devices_text(devices: list[pb.DeviceProfile]) -> str:
    header = [
        "RANK",
        "NAME",
        "ADDRESS",
        "ROLE",
        "STATE",
        "TOTAL",
        "FREE",
        "SPEED",
        "LOAD",
        "FIGURES",
        "LAYERS",
    ]
    rows = []
    for d in map(device_dict, devices):
        rows.append(
            [
                str(d["rank"] or "-"),
                d["name"] or "?",
                d["address"],
                d["role"],
                d["state"],
                f"{d['memory_total_mb']} MiB",
                f"{d['memory_free_mb']} MiB",
                f"{d['speed']:.1f}",
                f"{d['load'] * 100:.0f}%",
                d["figures"],
                f"{d['layers']} ({d['share_bytes'] // MIB} MiB)" if d["layers"] else "-",
            ]
        )
    notes = [f"{d.name or d.address}: {d.problem}" for d in devices if d.problem]
    return "\n".join([table(rows, header), *notes])


def loaded_text(model: pb.ModelInfo) -> str:
    return (
        f"Loaded {model.name or model.path} ({model.size_bytes / MIB:.0f} MiB, context "
        f"{model.context_length} tokens, {model.threads} threads) in {model.load_seconds:.2f} s"
    )


def stats_dict(stats: pb.GenerateStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "time_to_first_token_ms": round(stats.time_to_first_token_ms, 2),
        "tokens_per_second": round(stats.decode_tokens_per_second, 2),
        "finish_reason": stats.finish_reason,
        "total_seconds": round(stats.total_seconds, 3),
        "resumes": stats.resumes,
        "resume_gap_seconds": round(stats.resume_gap_seconds, 3),
        "resumed_at": list(stats.resumed_at),
    }


def stats_text(stats: pb.GenerateStats) -> str:
    text = (
        f"Generated {stats.completion_tokens} tokens (prompt {stats.prompt_tokens} tokens). "
        f"Inference speed: {stats.decode_tokens_per_second:.1f} tokens/second "
        f"(first token after {stats.time_to_first_token_ms:.0f} ms)"
    )
    if stats.resumes:
        times = "once" if stats.resumes == 1 else f"{stats.resumes} times"
        text += (
            f". Resumed {times} after losing a device "
            f"({stats.resume_gap_seconds:.1f} s without tokens)"
        )
    return text


class Progress:
    """A one-line progress display on stderr, drawn only on a terminal."""

    def __init__(self, label: str, out: TextIO = sys.stderr) -> None:
        self._label = label
        self._out = out
        self._shown = False
        self._last: tuple[int, str] = (-1, "")

    def update(self, fraction: float, stage: str = "") -> None:
        if not self._out.isatty():
            return
        percent = int(fraction * 100)
        if (percent, stage) == self._last:
            return
        self._last = (percent, stage)
        bar = "#" * (percent // 5)
        # The stage may be long ("quantizing to Q4_K_M: blk.0.ffn_down.weight"): what a
        # longer one left is cleared to the end of the line.
        self._out.write(f"\r{self._label} [{bar:<20}] {percent:3d}% {stage:<10}\033[K")
        self._out.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._out.write("\r\033[K")
            self._out.flush()
            self._shown = False


def plan_dict(plan: pb.PlanReply) -> dict[str, Any]:
    return {
        "model": plan.model,
        "standalone": plan.standalone,
        "model_bytes": plan.model_bytes,
        "predicted_tokens_per_s": round(plan.predicted_tokens_per_s, 2),
        "strategy": plan.strategy,
        "n_ctx": plan.n_ctx,
        "n_gpu_layers": plan.n_gpu_layers,
        "tensor_split": [round(x, 3) for x in plan.tensor_split],
        "devices": [
            {
                "name": d.name,
                "address": d.address,
                "id": d.node_id,
                "layers": d.layers,
                "first_layer": d.first_layer,
                "holds_output": d.holds_output,
                "bytes": d.bytes,
                "capacity_bytes": d.capacity_bytes,
                "speed": round(d.speed, 2),
                "predicted_share": round(d.predicted_share, 3),
                "endpoint": d.endpoint or None,
            }
            for d in plan.devices
        ],
    }


def plan_text(plan: pb.PlanReply) -> str:
    where = "on the root alone" if plan.standalone else f"over {len(plan.devices)} devices"
    header = ["DEVICE", "ADDRESS", "LAYERS", "MEMORY", "CAPACITY", "SPEED", "TIME"]
    rows = []
    for d in plan.devices:
        last = d.first_layer + d.layers - 1
        layers = f"{d.layers} ({d.first_layer}-{last})" if d.layers else "0"
        rows.append(
            [
                d.name,
                d.address,
                layers + (" +output" if d.holds_output and not plan.standalone else ""),
                f"{d.bytes / MIB:.0f} MiB",
                f"{d.capacity_bytes / MIB:.0f} MiB",
                f"{d.speed:.1f}",
                f"{d.predicted_share * 100:.0f}%",
            ]
        )
    return (
        f"{plan.model}: {plan.model_bytes / MIB:.0f} MiB of weights, context {plan.n_ctx}, "
        f"{where} ({plan.strategy} split)\n"
        + table(rows, header)
        + f"\npredicted: {plan.predicted_tokens_per_s:.1f} tokens/second"
    )


def allocation_text(plan: pb.PlanReply) -> str:
    """The seed's lines: "Device 10.0.0.1:9999 allocated 12 layers (Memory: ..., Speed: ...)"."""
    return "\n".join(
        f"Device {d.address} allocated {d.layers + d.holds_output} layers "
        f"(Memory: {d.capacity_bytes // MIB} MB, Speed: {d.speed:.1f})"
        for d in plan.devices
    )
