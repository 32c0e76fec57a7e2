"""`hsmdifctl`: the command line for hsmdifd.

Exit codes: 0 ok, 1 the command failed, 2 usage, 3 the daemon is unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from hsmdif import keyfiles, limits
from hsmdif.limits import quoted, shorten
from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifctl import render
from hsmdifctl.client import (
    Unreachable,
    connect,
    ping,
    probe,
    socket_path,
    socket_path_problem,
    unary,
    watched,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class CommandFailed(Exception):
    """The daemon refused or failed the request; the message is for the user."""


class UsageError(Exception):
    """The command line asks for something no request can carry; exit 2 with the message."""


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quoted(text)} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:,} (got {shorten(text)})")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,} (got {shorten(text)})")
        return value

    return parse


def finite_number(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number from `low` to `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quoted(text)} is not a number") from None
        if not low <= value <= high:  # NaN compares false, infinities fall outside
            raise argparse.ArgumentTypeError(
                f"must be a number between {low:g} and {high:g} (got {shorten(text)})"
            )
        return value

    return parse


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


@dataclass
class Session:
    """One command's connection to the daemon."""

    stub: pb_grpc.ControlStub
    json: bool
    path: Path = field(default_factory=Path)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    told: set[str] = field(default_factory=set)  # notices already shown

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        """A unary call that gives up, with Unreachable, on a daemon that stops answering."""
        return unary(method, request, self.stub, self.path)

    def events(self, call: Any) -> Iterator[Any]:
        """The events of a streaming call, watched in the same way."""
        return watched(call, self.stub, self.path)


def cmd_status(s: Session, args: argparse.Namespace) -> None:
    reply = ping(s.stub, s.path)
    if s.json:
        render.print_json(render.status_dict(reply), s.out)
    else:
        print(render.status_text(reply), file=s.out)


def cmd_devices(s: Session, args: argparse.Namespace) -> None:
    if args.priority or args.prioritize_by_memory:
        request = pb.SetPriorityRequest(
            devices=args.priority or [], by_memory=args.prioritize_by_memory
        )
        policy = s.call(s.stub.SetPriority, request)
        if not s.json:
            print(f"Policy version {policy.version}: {render.policy_text(policy)}", file=s.err)
    reply = s.call(s.stub.Devices, pb.DevicesRequest(refresh_speed=args.refresh_speed))
    if s.json:
        render.print_json([render.device_dict(d) for d in reply.devices], s.out)
    else:
        print(render.devices_text(list(reply.devices)), file=s.out)


def cmd_load(s: Session, args: argparse.Namespace) -> None:
    model = absolute(args.model)
    request = pb.LoadRequest(
        model_path=model,
        max_seq_len=args.max_seq_len,
        threads=args.threads,
        strategy=args.strategy,
        quantize=args.quantize,
    )
    progress = render.Progress("Loading")
    try:
        for event in s.events(s.stub.Load(request)):
            if event.HasField("progress"):
                if event.progress.note:
                    progress.clear()
                    print(event.progress.note, file=s.err)
                progress.update(event.progress.fraction, event.progress.stage)
            else:
                progress.clear()
                if s.json:
                    render.print_json(render.model_dict(event.loaded), s.out)
                else:
                    print(render.loaded_text(event.loaded), file=s.out)
    finally:
        progress.clear()


def absolute(model: str) -> str:
    """A relative path that exists here, made absolute: the daemon runs elsewhere."""
    if model and not os.path.isabs(model) and os.path.exists(model):
        return os.path.abspath(model)
    return model


def cmd_plan(s: Session, args: argparse.Namespace) -> None:
    if args.num_parameters and not args.quantize:
        raise UsageError("--num-parameters and --quantize go together")
    if args.num_parameters and args.model:
        raise UsageError("give a MODEL file or --num-parameters, not both")
    reply = s.call(
        s.stub.Plan,
        pb.PlanRequest(
            model_path=absolute(args.model),
            max_seq_len=args.max_seq_len,
            strategy=args.strategy,
            num_parameters=args.num_parameters,
            quantize=args.quantize,
        ),
    )
    if s.json:
        render.print_json(render.plan_dict(reply), s.out)
    else:
        print(render.plan_text(reply), file=s.out)


def cmd_unload(s: Session, args: argparse.Namespace) -> None:
    reply = s.call(s.stub.Unload, pb.UnloadRequest())
    if s.json:
        render.print_json({"unloaded": reply.was_loaded}, s.out)
    else:
        print("Unloaded the model" if reply.was_loaded else "No model was loaded", file=s.out)


def with_sampling(request: pb.GenerateRequest, args: argparse.Namespace) -> pb.GenerateRequest:
    request.max_tokens = args.max_tokens
    if args.temperature is not None:
        request.temperature = args.temperature
    if args.seed is not None:
        request.seed = args.seed
    return request


def stream(
    s: Session,
    request: pb.GenerateRequest,
    on_text: Callable[[str], None],
    tokens: list[int] | None = None,
) -> pb.GenerateStats:
    """Run one generation, passing each piece of text on; Ctrl-C cancels it.

    The returned timings are the ones seen here, at the client: time to first
    token from the request being sent (a model load excluded), and tokens per
    second from the first piece of text to the end.
    """
    progress = render.Progress("Loading model")
    started = time.perf_counter()
    first = 0.0
    call = s.stub.Generate(request)
    try:
        for event in s.events(call):
            kind = event.WhichOneof("event")
            if kind == "text":
                if not first:
                    first = time.perf_counter()
                    progress.clear()
                on_text(event.text)
                if tokens is not None:  # the ids of the tokens of the text
                    tokens.extend(event.tokens)
            elif kind == "loading":
                progress.update(event.loading.fraction, event.loading.stage)
                started = time.perf_counter()
            elif kind == "notice" and event.notice not in s.told:
                s.told.add(event.notice)
                progress.clear()
                print(f"hsmdifctl: {event.notice}", file=s.err)
            elif kind == "done":
                return client_timings(event.done, started, first, time.perf_counter())
    except KeyboardInterrupt:
        call.cancel()  # type: ignore[no-untyped-call]
        raise
    finally:
        progress.clear()
    raise CommandFailed("the answer ended before it was complete")


def client_timings(
    stats: pb.GenerateStats, started: float, first: float, ended: float
) -> pb.GenerateStats:
    if first:
        stats.time_to_first_token_ms = (first - started) * 1000
        if stats.completion_tokens > 1 and ended > first:
            stats.decode_tokens_per_second = (stats.completion_tokens - 1) / (ended - first)
    stats.total_seconds = ended - started
    return stats


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


def read_stdin() -> str:
    try:
        return sys.stdin.read(limits.MAX_PROMPT_BYTES + 1)
    except UnicodeDecodeError as e:
        raise UsageError(
            f"the prompt on stdin is not valid UTF-8 text ({e.reason} at byte {e.start:,}); "
            "give it as UTF-8"
        ) from None


def cmd_prompt(s: Session, args: argparse.Namespace) -> None:
    text = read_stdin() if args.text == "-" else args.text
    if problem := prompt_problem(text, "on stdin" if args.text == "-" else "given"):
        raise UsageError(problem)
    if not text.strip():
        raise CommandFailed("the prompt is empty: give some text, or - to read it from stdin")
    if args.raw:
        request = pb.GenerateRequest(prompt=text, raw=True)
    else:
        # A base model (no chat template of its own) completes the text as written.
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content=text)], complete_if_base=True
        )
    pieces: list[str] = []

    def show(piece: str) -> None:
        pieces.append(piece)
        if not s.json:
            s.out.write(piece)
            s.out.flush()

    tokens: list[int] = []
    stats = stream(s, with_sampling(request, args), show, tokens)
    if args.verbose and not s.json:
        s.out.write("\n")
        print(render.allocation_text(ping(s.stub, s.path).model.plan), file=s.err)
    if s.json:
        answer = {"text": "".join(pieces), "tokens": tokens, **render.stats_dict(stats)}
        render.print_json(answer, s.out)
    else:
        s.out.write("\n")
        print(render.stats_text(stats), file=s.err)


def cmd_chat(s: Session, args: argparse.Namespace) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "Chatting with hsmdifd. Type exit or press Ctrl-D to leave; Ctrl-C stops an answer.",
            file=s.err,
        )
    history: list[pb.ChatMessage] = []
    pieces: list[str] = []

    def show(piece: str) -> None:
        pieces.append(piece)
        s.out.write(piece)
        s.out.flush()

    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            s.out.write("\n")
            continue
        except UnicodeDecodeError as e:
            print(f"hsmdifctl: that line is not valid UTF-8 text ({e.reason})", file=s.err)
            continue
        text = line.strip()
        if text in ("exit", "quit"):
            break
        if not text:
            continue
        if problem := prompt_problem(text, "typed"):
            print(f"hsmdifctl: {problem}", file=s.err)
            continue
        history.append(pb.ChatMessage(role="user", content=text))
        pieces.clear()
        request = with_sampling(pb.GenerateRequest(messages=history), args)
        try:
            stats = stream(s, request, show)
            s.out.write("\n")
            print(render.stats_text(stats), file=s.err)
        except KeyboardInterrupt:
            s.out.write("\n")
            print("[answer stopped]", file=s.err)
        except grpc.RpcError as e:
            history.pop()
            s.out.write("\n")
            print(f"hsmdifctl: {e.details()}", file=s.err)
            continue
        history.append(pb.ChatMessage(role="assistant", content="".join(pieces)))


COMMANDS: dict[str, Callable[[Session, argparse.Namespace], None]] = {
    "status": cmd_status,
    "devices": cmd_devices,
    "load": cmd_load,
    "plan": cmd_plan,
    "unload": cmd_unload,
    "prompt": cmd_prompt,
    "chat": cmd_chat,
}


def cluster_init(out: Path) -> int:
    """Write a new cluster secret; no daemon needed."""
    try:
        keyfiles.new_cluster_secret(out)
    except (keyfiles.KeyFileError, OSError) as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"Wrote a new cluster secret to {out} (mode 0600).\n"
        "Copy the same file to every device, keeping it private, for example:\n"
        f"  scp {out} DEVICE:/etc/hsmdif/cluster.secret\n"
        'then set secret_file = "/etc/hsmdif/cluster.secret" in [cluster] of each\n'
        "device's /etc/hsmdif/hsmdifd.toml (or start hsmdifd with --secret-file) and\n"
        "restart hsmdifd. The file must be readable by hsmdifd only:\n"
        "  chown hsmdif: /etc/hsmdif/cluster.secret && chmod 600 /etc/hsmdif/cluster.secret"
    )
    return EXIT_OK


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


def api_key_init(out: Path) -> int:
    """Write a new HTTP API key; no daemon needed."""
    try:
        keyfiles.new_api_key(out)
    except (keyfiles.KeyFileError, OSError) as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"Wrote a new HTTP API key to {out} (mode 0600).\n"
        f'Set api_key_file = "{out}" in [api] of hsmdifd.toml, make the file readable by\n'
        f"hsmdifd (chown hsmdif: {out}) and restart hsmdifd. Clients send it as\n"
        "  Authorization: Bearer KEY   (the openai SDK: api_key=KEY)"
    )
    return EXIT_OK


def entry() -> None:
    """The `hsmdifctl` program: `main`, then out at once. The interpreter's own teardown
    can wait for ever on gRPC's threads (now and then, after a stream has ended); there
    is nothing left to tidy once the output is flushed."""
    try:
        code = main()
    except SystemExit as e:  # argparse: usage errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        code = code or EXIT_FAILED
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "cluster":
            return cluster_init(args.out)
        if args.command == "api-key":
            return api_key_init(args.out)
        check_arguments(args)
        return run(args)
    except UsageError as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader of stdout went away (| head): say nothing more, and keep the flush
        # at exit from failing again (the recipe of Python's signal documentation).
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nhsmdifctl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: a sentence, never a traceback
        print(
            f"hsmdifctl: unexpected error ({type(e).__name__}: {shorten(str(e), 200)}); "
            "please report it",
            file=sys.stderr,
        )
        return EXIT_FAILED


def run(args: argparse.Namespace) -> int:
    path: Path = socket_path(args.socket)
    try:
        channel, stub = connect(path)
    except Unreachable as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        with channel:
            session = Session(stub=stub, json=bool(args.json), path=path)
            if args.command != "status":
                ping(stub, path)  # a daemon that accepts but does not answer is found now
            COMMANDS[args.command](session, args)
    except Unreachable as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except grpc.RpcError as e:
        return report_rpc_error(e, path)
    return EXIT_OK


def report_rpc_error(error: grpc.RpcError, path: Path) -> int:
    code = error.code()
    details = error.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        try:
            probe(path)
        except Unreachable:
            print(
                f"hsmdifctl: hsmdifd stopped during the request ({path} is gone)", file=sys.stderr
            )
            return EXIT_UNREACHABLE
    if code == grpc.StatusCode.CANCELLED and not details:
        details = "the request was cancelled (hsmdifd is stopping?)"
    print(f"hsmdifctl: {details or code.name}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
