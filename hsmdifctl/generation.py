"""The commands that generate: prompt (one answer) and chat (a conversation)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import grpc

from hsmdif import limits
from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifctl import render
from hsmdifctl.arguments import UsageError, prompt_problem
from hsmdifctl.client import ping
from hsmdifctl.session import CommandFailed, Session


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
