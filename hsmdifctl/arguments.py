"""hsmdifctl's command line: the parser, the types of its values, and the checks of what
no request can carry, all before a connection is made."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hsmdif import limits
from hsmdif.limits import quoted, shorten
from hsmdifctl.client import socket_path_problem


class UsageError(Exception):
    """The command line asks for something no request can carry; exit 2 with the message."""


_N = TypeVar("_N", int, float)


def _bounded(
    convert: Callable[[str], _N], kind: str, refusal: Callable[[_N, str], str | None]
) -> Callable[[str], _N]:
    """An argparse type: `text` converted to a `kind`, refused with `refusal`'s sentence."""

    def parse(text: str) -> _N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quoted(text)} is not {kind}") from None
        if problem := refusal(value, shorten(text)):
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def refusal(value: int, shown: str) -> str | None:
        if value < low:
            return f"must be at least {low:,} (got {shown})"
        if value > high:
            return f"must be at most {high:,} (got {shown})"
        return None

    return _bounded(int, "a whole number", refusal)


def finite_number(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number from `low` to `high`."""

    def refusal(value: float, shown: str) -> str | None:
        if not low <= value <= high:  # NaN compares false, infinities fall outside
            return f"must be a number between {low:g} and {high:g} (got {shown})"
        return None

    return _bounded(float, "a number", refusal)


temperature = finite_number(limits.MIN_TEMPERATURE, limits.MAX_TEMPERATURE)
seed = whole_number(0, limits.MAX_SEED)
max_tokens = whole_number(1, limits.MAX_TOKENS)
context_length = whole_number(limits.MIN_CONTEXT, limits.MAX_CONTEXT)
threads = whole_number(1, limits.MAX_THREADS)
num_parameters = finite_number(limits.MIN_PARAMETERS, limits.MAX_PARAMETERS)


def build_parser() -> argparse.ArgumentParser:
    def global_options(parser: argparse.ArgumentParser, default: object) -> None:
        parser.add_argument("--socket", metavar="PATH", default=default, help="control socket")
        parser.add_argument("--json", action="store_true", default=default, help="print JSON")

    # The options may come before or after COMMAND; after it they must not reset
    # what was given before, hence SUPPRESS as their default there.
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="hsmdifctl", description="Control hsmdifd.")
    global_options(p, None)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("status", parents=[common], help="this device, the root and the model")
    devices = sub.add_parser("devices", parents=[common], help="the devices and their figures")
    devices.add_argument(
        "--refresh-speed", action="store_true", help="measure this device's speed again"
    )
    order = devices.add_mutually_exclusive_group()
    order.add_argument(
        "--priority",
        nargs="+",
        metavar="DEVICE",
        help="set the cluster's priority order: names, addresses or node ids, highest first",
    )
    order.add_argument(
        "--prioritize-by-memory",
        action="store_true",
        help="order the cluster by total memory (the default policy)",
    )

    cluster = sub.add_parser("cluster", parents=[common], help="cluster set-up")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    init = cluster_sub.add_parser("init", help="write a new cluster secret")
    init.add_argument("--out", required=True, type=Path, metavar="FILE")
    key = sub.add_parser("api-key", help="write a new key for the HTTP API")
    key.add_argument("--out", required=True, type=Path, metavar="FILE")

    load = sub.add_parser("load", parents=[common], help="load a model (default: the bundled one)")
    load.add_argument("model", nargs="?", default="", metavar="MODEL", help="path to a .gguf file")
    load.add_argument("--max-seq-len", type=context_length, default=0, metavar="N")
    load.add_argument("--threads", type=threads, default=0, metavar="N")
    load.add_argument("--strategy", choices=["capacity", "latency"], default="")
    load.add_argument(
        "--quantize",
        choices=["4bit", "8bit"],
        default="",
        help="load an F32, F16 or BF16 model as a Q4_K_M or Q8_0 copy, made once and kept "
        "on the root (default: [model] quantize of the root's configuration)",
    )

    plan = sub.add_parser(
        "plan", parents=[common], help="show how a model would be split, without loading it"
    )
    plan.add_argument("model", nargs="?", default="", metavar="MODEL", help="path to a .gguf file")
    plan.add_argument("--max-seq-len", type=context_length, default=0, metavar="N")
    plan.add_argument("--strategy", choices=["capacity", "latency"], default="")
    plan.add_argument(
        "--num-parameters",
        type=num_parameters,
        default=0.0,
        metavar="N",
        help="plan a hypothetical model of N parameters (e.g. 30e9), no file needed",
    )
    plan.add_argument(
        "--quantize",
        choices=["4bit", "8bit"],
        default="",
        help="with MODEL: plan its quantized copy, without quantizing; "
        "with --num-parameters: the hypothetical model's quantization",
    )

    sub.add_parser("unload", parents=[common], help="unload the model")

    def sampling(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-tokens", type=max_tokens, default=0, metavar="N")
        parser.add_argument("--temperature", type=temperature, metavar="T")
        parser.add_argument("--seed", type=seed, metavar="S")

    prompt = sub.add_parser("prompt", parents=[common], help="answer one prompt")
    prompt.add_argument("text", metavar="TEXT", help="the prompt; - reads it from stdin")
    prompt.add_argument("--raw", action="store_true", help="no chat template")
    prompt.add_argument(
        "-v", "--verbose", action="store_true", help="print how the model is split over devices"
    )
    sampling(prompt)

    chat = sub.add_parser("chat", parents=[common], help="an interactive conversation")
    sampling(chat)
    return p


def prompt_problem(text: str, source: str) -> str | None:
    """Why `text` cannot be sent as a prompt, or None."""
    if not limits.is_utf8(text):
        return (
            f"the prompt {source} is not valid UTF-8 text ({quoted(text)}); give it as "
            "UTF-8 (check the terminal's or the file's encoding)"
        )
    size = limits.utf8_size(text)
    if size > limits.MAX_PROMPT_BYTES:
        return (
            f"the prompt is {size:,} bytes, more than hsmdifd takes "
            f"({limits.MAX_PROMPT_BYTES:,} bytes); shorten it"
        )
    return None


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before connecting, what no request can carry: text that is not UTF-8
    (argv holds raw bytes), paths and names beyond the daemon's bounds."""
    model = getattr(args, "model", "")
    if model:
        if not limits.is_utf8(model):
            raise UsageError(
                f"the model path {quoted(model)} is not valid UTF-8, which hsmdifd's "
                "requests cannot carry; rename the file (or a directory above it) in UTF-8"
            )
        if limits.utf8_size(model) > limits.MAX_PATH_BYTES:
            raise UsageError(
                f"the model path {quoted(model)} is {limits.utf8_size(model):,} bytes "
                f"long, more than a path can be ({limits.MAX_PATH_BYTES:,} bytes)"
            )
    text = getattr(args, "text", "-")
    if text != "-" and (problem := prompt_problem(text, "given")):
        raise UsageError(problem)
    devices = getattr(args, "priority", None) or []
    if len(devices) > limits.MAX_DEVICES:
        raise UsageError(
            f"--priority names {len(devices):,} devices (at most {limits.MAX_DEVICES:,})"
        )
    for name in devices:
        if not limits.is_utf8(name) or limits.utf8_size(name) > limits.MAX_NAME_BYTES:
            raise UsageError(
                f"the device {quoted(name)} is not a name hsmdifd can know: give a name, "
                "address or node id from `hsmdifctl devices`"
            )
    if args.socket and (problem := socket_path_problem(Path(args.socket))):
        raise UsageError(problem)
